"""Records -> one HDF5 file of DOSnet inputs: gridded DOS channels, structure vector, bond table
(``data_prep.bonds``), bond valence targets, per-sample metadata and a grouped train/val/test split.

The file layout (dataset and attribute names, ``schema_version``) is owned by ``data_prep.h5schema``;
this module featurises records and writes through ``h5schema.Writer``.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import signal
import tempfile
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from data_prep import __version__, h5schema
from data_prep.bond_valence import MIN_ANION_CONTACT_RATIO
from data_prep.bonds import DEFAULT_CUTOFF_ANG as BOND_CUTOFF_ANG, DEFAULT_SLOTS as BOND_SLOTS, BondTable
from data_prep.h5schema import SPLITS, TARGETS, BuildError  # noqa: F401  (re-exported for build's callers)
from data_prep.layout import DEFAULT_N_NEIGHBOURS, REFERENCE_RULE, EnergyGrid, channel_labels
from data_prep.records import MaterialRecord, RecordError
from data_prep.shards import select_records
from data_prep.split import grouped_split

#: Keys of a params.json ``data`` section that say how train.py reads the h5 (``dosnet_bv.streaming``);
#: build ignores them, so one params.json can hold both.
SPLIT_BY = ("family", "material")
TRAIN_READ_KEYS = ("in_memory", "block_samples", "shuffle_buffer")
#: What a params.json ``data`` section must be (``data_section_problem``).
DATA_SECTION_RULE = ("an object with in_memory ('auto', true or false), block_samples (a positive integer) and "
                     "shuffle_buffer (a non-negative integer), and optionally data_prep build keys")


@dataclass
class BuildConfig:
    """Everything that decides the content of the h5 (stored in its attributes)."""

    grid: EnergyGrid = field(default_factory=EnergyGrid)
    n_neighbours: int = DEFAULT_N_NEIGHBOURS
    bv_cutoff_ang: float = 6.0
    structure_families: tuple[str, ...] = ("site", "neighbours", "coordination", "distances", "gaussian", "global")
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_seed: int = 88
    symprec: float = 0.01
    split_by: str = "family"  # "family" (data_prep.families) or "material" (for comparison)
    bond_cutoff_ang: float = BOND_CUTOFF_ANG  # the bond table (data_prep.bonds): neighbours within this
    bond_slots: int = BOND_SLOTS  # ... padded or truncated (nearest kept) to this many per sample
    # skip a material with two full-valence anions closer than this fraction of the sum of their
    # ionic radii (bond_valence.closest_anion_contact); 0 keeps them (the h5 of figures measured
    # before 2026-12-07)
    min_anion_contact_ratio: float = MIN_ANION_CONTACT_RATIO

    def __post_init__(self):
        if self.split_by not in SPLIT_BY:
            raise BuildError(f"split_by must be one of {list(SPLIT_BY)}, got {self.split_by!r}")
        try:
            f = tuple(float(x) for x in self.split_fractions)
        except (TypeError, ValueError):
            f = ()
        if len(f) != 3 or min(f) < 0 or abs(sum(f) - 1) > 1e-6:
            raise BuildError(f"split fractions must be three non-negative numbers summing to 1, got {self.split_fractions}")
        self.split_fractions = f
        self.structure_families = tuple(self.structure_families)
        # checked here, in the main process: a bad value must not reach the workers (symprec < 0
        # crashes spglib there)
        if not isinstance(self.grid, EnergyGrid):
            raise BuildError(f"grid must be an EnergyGrid, got {self.grid!r}")
        checks = {"n_neighbours": (_count(self.n_neighbours, 0), "a non-negative integer"),
                  "bv_cutoff_ang": (_positive(self.bv_cutoff_ang), "a positive number (Angstrom)"),
                  "symprec": (_positive(self.symprec), "a positive number (Angstrom)"),
                  "bond_cutoff_ang": (_positive(self.bond_cutoff_ang), "a positive number (Angstrom)"),
                  "bond_slots": (_count(self.bond_slots, 1), "a positive integer (neighbour slots per sample)"),
                  "min_anion_contact_ratio": (_finite(self.min_anion_contact_ratio) and 0 <= self.min_anion_contact_ratio
                                              < 1.5, "a number in [0, 1.5) (0: no check)"),
                  "split_seed": (_count(self.split_seed, 0) and self.split_seed < 2 ** 32, "an integer in [0, 2**32)")}
        bad = next((k for k, (ok, _) in checks.items() if not ok), None)
        if bad:
            raise BuildError(f"{bad} must be {checks[bad][1]}, got {json.dumps(getattr(self, bad))}")

    def as_dict(self) -> dict:
        return {"grid": self.grid.as_dict(), "n_neighbours": self.n_neighbours,
                "bv_cutoff_ang": self.bv_cutoff_ang, "structure_families": list(self.structure_families),
                "split_fractions": list(self.split_fractions), "split_seed": self.split_seed,
                "symprec": self.symprec, "split_by": self.split_by, "bond_cutoff_ang": self.bond_cutoff_ang,
                "bond_slots": self.bond_slots, "min_anion_contact_ratio": self.min_anion_contact_ratio}

    @classmethod
    def from_params(cls, params: dict) -> "BuildConfig":
        """From the ``data`` section of a params.json (keys as in ``as_dict``; all optional).
        The keys that tell train.py how to read the file (``TRAIN_READ_KEYS``) are ignored."""
        problem = data_section_problem(params or {}, for_training=False)
        if problem:
            raise BuildError(f"params 'data': {problem}")
        d = {k: v for k, v in dict(params or {}).items() if k not in TRAIN_READ_KEYS}
        if "grid" in d:
            d["grid"] = grid_from_dict(d["grid"])
        return cls(**d)


def grid_from_dict(d) -> EnergyGrid:
    """``EnergyGrid.from_dict`` with every value checked; a bad one -> ``BuildError``."""
    if not isinstance(d, dict):
        raise BuildError(f"grid must be an object, got {json.dumps(d)}")
    unknown = sorted(set(d) - {"emin_ev", "emax_ev", "n_points", "sigma_ev"})
    if unknown:
        raise BuildError(f"grid: unknown key(s) {unknown}")
    for k, v in d.items():
        ok = _count(v, 2) if k == "n_points" else _positive(v) if k == "sigma_ev" else _finite(v)
        if not ok:
            what = "an integer >= 2" if k == "n_points" else "a positive number" if k == "sigma_ev" else "a number"
            raise BuildError(f"grid: {k} must be {what}, got {json.dumps(v)}")
    try:
        return EnergyGrid.from_dict(d)
    except ValueError as exc:
        raise BuildError(f"grid: {exc}") from None


def _count(v, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v) -> bool:
    return _finite(v) and v > 0


def data_section_problem(section, for_training: bool = True) -> str | None:
    """The one check of a params.json ``data`` section (``DATA_SECTION_RULE``), used by build
    (``BuildConfig.from_params``) and by train.py (``dosnet_bv.params``): what is wrong, or None.

    ``for_training``: the read keys (``TRAIN_READ_KEYS``) are required; build only needs them valid
    when present. Build keys must be ``BuildConfig`` fields (their values are checked when built).
    """
    if not isinstance(section, dict):
        return "not an object"
    known = set(BuildConfig().as_dict())
    unknown = sorted(set(section) - known - set(TRAIN_READ_KEYS))
    if unknown:
        return f"unknown data parameter(s) {unknown}; known: {sorted(known | set(TRAIN_READ_KEYS))}"
    missing = [k for k in TRAIN_READ_KEYS if k not in section]
    if for_training and missing:
        return f"missing {missing}"
    checks = {"in_memory": lambda v: v == "auto" or isinstance(v, bool), "block_samples": lambda v: _count(v, 1),
              "shuffle_buffer": lambda v: _count(v, 0)}
    bad = [k for k, ok in checks.items() if k in section and not ok(section[k])]
    return f"bad value of {bad[0]}: {json.dumps(section[bad[0]])}" if bad else None


# ----------------------------------------------------------------------------- per material
@dataclass
class MaterialSamples:
    material_id: str
    formula: str
    origin: str
    method: str
    structure_json: str
    band_gap_ev: float
    reference_ev: float
    f_weight_fraction: float
    gii_vu: float
    dos: np.ndarray            # (k, P, C) float32
    structure: np.ndarray      # (k, F) float32
    targets: dict              # name -> (k,)
    site_index: np.ndarray
    neighbour_indices: np.ndarray
    neighbour_distances_ang: np.ndarray
    multiplicity: np.ndarray
    elements: list
    outside: np.ndarray
    bv_params: list
    parent_id: str = ""        # the real structure it was derived from (itself when real)
    family_id: str = ""        # set by build_h5 over all materials (data_prep.families)
    prototype_group: str = ""
    valences: list = field(default_factory=list)   # per site of the structure (migration targets)
    bonds: BondTable | None = None  # (k, bond_slots) neighbour table of the samples (data_prep.bonds)


def featurise_record(record: MaterialRecord, cfg: BuildConfig):
    """One record -> ``MaterialSamples``, or ``(material_id, reason)`` when it must be skipped."""
    from data_prep.bond_valence import BondValenceError, assign_valences, closest_anion_contact, compute_targets
    from data_prep.bonds import bond_table
    from data_prep.samples import SampleSelectionError, sample_dos, select_samples
    from data_prep.structure_features import StructureFeaturizer

    mid = record.material_id
    try:
        record.validate()
    except RecordError as exc:
        return mid, f"invalid record: {exc}"
    from data_prep.embedded.pbe import outdated_recipe

    outdated = outdated_recipe(record.provenance, record.structure)
    if outdated:
        return mid, outdated
    s = record.structure
    try:
        valences = record.provenance.get("bv_valences")  # BVAnalyzer valences stored by the source
        if valences is None or len(valences) != len(s):
            valences = assign_valences(s)
        v = np.asarray(valences, dtype=float)
        bad = np.flatnonzero(~(np.abs(v) <= h5schema.TARGET_LIMIT))
        if len(bad):
            return mid, (f"implausible valence {v[bad[0]]:g} at site {bad[0]} "
                         f"(|valence| must be <= {h5schema.TARGET_LIMIT:g})")
        contact = closest_anion_contact(s, valences, cfg.min_anion_contact_ratio)
        if contact is not None:
            return mid, (f"bond valence: anion-anion contact {contact.text} ({contact.ratio:.2f} x the sum of their "
                         f"ionic radii, below {cfg.min_anion_contact_ratio:g}): bonded anions (a dimer, a chain) or a "
                         f"wrong structure, which the all-ionic valences misdescribe")
        t = compute_targets(s, cfg.bv_cutoff_ang, valences=valences)
    except BondValenceError as exc:
        return mid, f"bond valence: {exc}"
    try:
        samples = select_samples(s, cfg.n_neighbours, cfg.symprec)
    except (SampleSelectionError, ValueError) as exc:
        return mid, f"sample selection: {exc}"
    dos, outside = sample_dos(record.spectrum, s, samples, cfg.grid, return_outside=True)
    sites = np.array([x.site_index for x in samples], dtype=np.int32)
    feats = StructureFeaturizer(cfg.structure_families, symprec=cfg.symprec).featurize(s, sites)
    bonds = bond_table(s, sites, cfg.bond_cutoff_ang, cfg.bond_slots)
    if not (np.all(np.isfinite(dos)) and np.all(np.isfinite(feats))):
        return mid, "non-finite values in the gridded DOS or structure features"
    if not np.any(dos):
        return mid, (f"the DOS lies entirely outside the energy window [{cfg.grid.emin_ev:g}, {cfg.grid.emax_ev:g}] eV "
                     f"(relative to the reference level): every sample would be all zeros")
    for name in ("bvs_vu", "valence", "bvs_deviation_vu"):
        v = np.asarray(t[name])[sites]
        bad = np.flatnonzero(~(np.abs(v) <= h5schema.TARGET_LIMIT))
        if len(bad):
            return mid, (f"implausible {name} {v[bad[0]]:g} at site {sites[bad[0]]} "
                         f"(|{name}| must be <= {h5schema.TARGET_LIMIT:g} v.u.)")
    sp = record.spectrum
    fw = 0.0 if sp.f_weight is None else float(np.sum(sp.f_weight))
    total = float(np.sum(sp.weights)) + fw
    return MaterialSamples(
        material_id=mid, formula=record.formula, origin=record.origin, method=record.method,
        structure_json=json.dumps(s.as_dict()), band_gap_ev=float(sp.band_gap_ev),
        reference_ev=float(sp.reference_ev), f_weight_fraction=fw / total if total > 0 else 0.0,
        gii_vu=float(t["gii_vu"]), dos=dos, structure=feats.astype(np.float32),
        targets={"bvs_vu": t["bvs_vu"][sites], "valence": t["valence"][sites],
                 "bvs_deviation_vu": t["bvs_deviation_vu"][sites],
                 "gii_vu": np.full(len(sites), t["gii_vu"])},
        site_index=sites, neighbour_indices=np.array([x.neighbour_indices for x in samples], dtype=np.int32),
        neighbour_distances_ang=np.array([x.neighbour_distances_ang for x in samples], dtype=np.float32),
        multiplicity=np.array([x.multiplicity for x in samples], dtype=np.int32),
        elements=[x.element for x in samples], outside=outside.astype(np.float32), bv_params=t["params"],
        parent_id=str(record.provenance.get("parent_id") or mid),
        valences=[int(v) for v in valences], bonds=bonds)


def _work(args):
    path, cfg = args
    try:
        rec = MaterialRecord.from_npz(path)
    except RecordError as exc:
        return Path(path).stem, str(exc)
    return featurise_record(rec, cfg)


# ----------------------------------------------------------------------------- writing
def _versions() -> dict:
    out = {"data_prep": __version__}
    for pkg in ("pymatgen", "numpy", "h5py", "tblite", "mp-api"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def build_h5(record_paths, out_path, cfg: BuildConfig | None = None, overwrite: bool = False,
             n_procs: int | None = None, progress: bool = True, source: str = "records",
             shard: tuple[int, int] | None = None, dos_compression: str | None = "lzf", work=None,
             migration_cache=None, migration_time_limit_s: float | None = None) -> dict:
    """Featurise every record and write one h5 atomically. Returns a summary dict.

    ``shard`` = (I, N): keep only the records of shard I of N (``data_prep.shards``; stored as the
    ``shard`` attribute); ``python -m data_prep merge`` joins the N parts into the unsharded file.
    ``dos_compression``: "lzf" (default) or None. Uncompressed costs more disk but reads ~13x
    faster (0.02 vs 0.3 ms of CPU per 2000 x 27 sample): what streaming training wants when the
    CPU is busy (README, section Scaling).

    The output location is checked first (a writable folder, not a folder name) and locked for the
    build (``output_lock``: a second build to the same file is refused). Featurising runs in a
    process pool that notices a dead worker (``featurise_all``). ``work``: the per-record function
    (default ``_work``; tests pass one that crashes).
    ``migration_cache``: JSON of BVSE barriers (``data_prep.migration``) read, and extended with the
    missing materials when bvlain is installed; None keeps computed barriers in memory only.
    """
    cfg = cfg or BuildConfig()
    out_path = Path(out_path)
    check_output(out_path, overwrite)
    with output_lock(out_path):
        check_output(out_path, overwrite)  # again: a build that finished while this one waited
        return _build_locked(record_paths, out_path, cfg, n_procs, progress, source, shard, dos_compression, work,
                             migration_cache, migration_time_limit_s)


def _build_locked(record_paths, out_path: Path, cfg: BuildConfig, n_procs, progress, source, shard,
                  dos_compression, work, migration_cache=None, migration_time_limit_s=None) -> dict:
    import h5py
    from tqdm import tqdm

    from data_prep.bond_valence import CITATIONS as BV_CITATIONS
    from data_prep.structure_features import StructureFeaturizer

    paths = sorted(str(p) for p in record_paths)
    if not paths:
        raise BuildError("no records to build from")
    if shard is not None:
        n_all = len(paths)
        paths = select_records(paths, shard)
        if not paths:
            raise BuildError(f"shard {shard[0]}/{shard[1]} holds none of the {n_all} records: use fewer shards")
    n_procs = n_procs or min(2, os.cpu_count() or 1)
    results, skipped = [], {}
    jobs = [(p, cfg) for p in paths]
    bar = tqdm(total=len(jobs), desc="featurising", unit="material", disable=not progress)
    try:
        with closing(featurise_all(jobs, n_procs, work or _work)) as featurised:
            for r in featurised:
                _collect(r, results, skipped)
                bar.update()
    finally:
        bar.close()
    ids = [r.material_id for r in results]
    dup = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
    if dup:
        raise BuildError(f"duplicate material ids in the records: {dup[:10]}")
    if not results:
        raise BuildError(f"no material could be featurised ({len(skipped)} skipped; first: "
                         f"{next(iter(skipped.items()), None)})")
    results.sort(key=lambda r: r.material_id)
    families = assign_family_ids(results)
    group_of = {r.material_id: r.family_id for r in results} if cfg.split_by == "family" else None
    split_of = grouped_split(ids, cfg.split_fractions, cfg.split_seed, group_of=group_of)
    from data_prep.migration import build_targets

    mig = build_targets(results, migration_cache, n_procs, migration_time_limit_s, progress)
    feat = StructureFeaturizer(cfg.structure_families, symprec=cfg.symprec)
    n = sum(len(r.site_index) for r in results)
    P, C = cfg.grid.n_points, results[0].dos.shape[2]
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as h:
            w = h5schema.Writer(h)
            dos = w.dos(n, P, C, channel_labels(cfg.n_neighbours), "states/eV per cell, spin summed",
                        compression=dos_compression)
            i = 0
            for r in tqdm(results, desc="writing", unit="material", disable=not progress):
                dos[i:i + len(r.site_index)] = r.dos
                i += len(r.site_index)
            w.structure(np.concatenate([r.structure for r in results]), feat.feature_labels(),
                        feat.families_of_labels())
            w.targets({name: np.concatenate([r.targets[name] for r in results]) for name in TARGETS})
            rep = lambda get: np.concatenate([[get(r)] * len(r.site_index) for r in results])  # noqa: E731
            w.sample_meta(
                rep(lambda r: r.material_id), sum((r.elements for r in results), []), rep(lambda r: r.origin),
                np.concatenate([r.site_index for r in results]), family_id=rep(lambda r: r.family_id),
                neighbour_indices=np.concatenate([r.neighbour_indices for r in results]).reshape(n, cfg.n_neighbours),
                neighbour_distances_ang=np.concatenate([r.neighbour_distances_ang for r in results]).reshape(
                    n, cfg.n_neighbours),
                multiplicity=np.concatenate([r.multiplicity for r in results]),
                outside_weight=np.concatenate([r.outside for r in results]))
            bonds = BondTable.concatenate([r.bonds for r in results])
            w.bonds(bonds, cfg.bond_cutoff_ang)
            w.migration(mig["per_sample"], mig["per_material"], mig["ion"], mig["info"])
            w.split(rep(lambda r: split_of[r.material_id]))
            w.materials(**{key: [getattr(r, key) for r in results] for key in h5schema.MATERIAL_STRINGS},
                        split=[split_of[r.material_id] for r in results],
                        **{key: np.array([getattr(r, key) for r in results], dtype=np.float64)
                           for key in h5schema.MATERIAL_FLOATS},
                        n_samples=np.array([len(r.site_index) for r in results], dtype=np.int32),
                        bv_params_json=[json.dumps(r.bv_params) for r in results])
            w.attrs(grid=json.dumps(cfg.grid.as_dict()), config=json.dumps(cfg.as_dict()),
                    reference_rule=REFERENCE_RULE,
                    citations=json.dumps({"bond_valence": BV_CITATIONS, "structure_features": feat.citations()}),
                    skipped=json.dumps(skipped, sort_keys=True), versions=json.dumps(_versions()), source=source,
                    data_prep_version=__version__)
            if shard is not None:
                w.attrs(shard=f"{shard[0]}/{shard[1]}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the h5 gets the user's usual permissions
        os.replace(tmp, out_path)
    except OSError as exc:  # disk full, I/O error: one line (h5schema.H5WriteError)
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise h5schema.H5WriteError.of(out_path, exc) from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    manifest = {"n_records": len(paths), "n_materials": len(results), "n_samples": n, "skipped": skipped,
                "migration": {"counts": mig["info"]["counts"], "missing": mig["reasons"]},
                "bonds": bond_summary(results, cfg), "families": families,
                **({"shard": f"{shard[0]}/{shard[1]}"} if shard is not None else {})}
    manifest_path = out_path.with_suffix(".manifest.json")
    from data_prep.records import atomic_write_bytes

    atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return {**manifest, "out": str(out_path), "manifest": str(manifest_path)}


def bond_summary(results: list[MaterialSamples], cfg: BuildConfig) -> dict:
    """What the manifest records of the bond table: cutoff, slots, neighbour counts within the
    cutoff (quantiles, max) and the samples truncated to the slots (nearest kept), per material."""
    c = np.concatenate([r.bonds.n_within for r in results])
    truncated = {r.material_id: int(r.bonds.truncated.sum()) for r in results if r.bonds.truncated.any()}
    return {"cutoff_ang": cfg.bond_cutoff_ang, "slots": cfg.bond_slots,
            "neighbours_within_cutoff": {"min": int(c.min()), **{f"p{p}": float(np.percentile(c, p))
                                                                  for p in (50, 90, 95, 99)}, "max": int(c.max())},
            "samples_truncated": int(sum(truncated.values())), "truncated_by_material": truncated}


def assign_family_ids(results: list[MaterialSamples]) -> dict:
    """Set ``family_id`` and ``prototype_group`` of every result (``data_prep.families``): a real
    structure is its own parent; real parents of one prototype share a family, and a derived
    material whose (relaxed) structure left its parent's prototype joins the families it matches.
    Returns what the manifest records: ``family_statistics`` and the displaced materials' families."""
    from pymatgen.core import Structure

    from data_prep.families import assign_families, family_statistics

    items = []
    for r in results:
        real = r.parent_id == r.material_id
        structure = Structure.from_dict(json.loads(r.structure_json))
        items.append((r.material_id, r.origin, None if real else r.parent_id, structure))
    fams = assign_families(items)
    for r in results:
        r.family_id, r.prototype_group = fams[r.material_id].family_id, fams[r.material_id].prototype_group
    return {**family_statistics(fams),
            "displaced": {m: a.family_id for m, a in sorted(fams.items()) if a.displaced}}


@dataclass
class WorkerError:
    """An unexpected exception while featurising one record (returned by a worker, raised as a
    one-line ``BuildError`` by the main process)."""

    material_id: str
    message: str


def _collect(r, results, skipped):
    if isinstance(r, WorkerError):
        raise BuildError(f"featurising {r.material_id} failed: {r.message}")
    if isinstance(r, tuple):
        skipped[r[0]] = r[1]
    else:
        results.append(r)


# ----------------------------------------------------------------------------- output and workers
def check_output(out_path: Path, overwrite: bool) -> None:
    """Before any work: ``out_path`` is not a folder, not an existing file (unless ``overwrite``),
    and its folder exists (created if missing) and is writable."""
    if out_path.is_dir():
        raise BuildError(f"--out {out_path} is a folder; give a file name, e.g. {out_path / 'data.h5'}")
    if out_path.exists() and not overwrite:
        raise BuildError(f"{out_path} exists; pass --overwrite to replace it")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"cannot create the output folder {out_path.parent}: {exc.strerror or exc}") from None
    if not os.access(out_path.parent, os.W_OK | os.X_OK):
        raise BuildError(f"cannot write to the output folder {out_path.parent} (permission denied or read-only)")


@contextmanager
def output_lock(out_path: Path):
    """Hold an exclusive ``flock`` on ``.<name>.lock`` beside ``out_path`` for the build; another
    build to the same file is refused at once. The lock goes with the process (also on kill -9);
    the lock file is removed at the end."""
    import fcntl

    lock = out_path.parent / f".{out_path.name}.lock"
    refused = BuildError(f"another build is writing {out_path} (lock file {lock}); wait for it to finish or "
                         f"choose another --out")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o666)
    except OSError as exc:
        raise BuildError(f"cannot write to the output folder {out_path.parent}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise refused from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder finished and removed it between our open and flock
            raise refused
        try:
            yield
        finally:
            try:
                os.unlink(lock)
            except OSError:
                pass
    finally:
        os.close(fd)


_BUSY_DIR = None  # in a worker: where it notes the record it is featurising (featurise_all)


def _quiet_worker(busy_dir=None):
    global _BUSY_DIR
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's: it stops the workers
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import warnings

    warnings.filterwarnings("ignore")
    _BUSY_DIR = busy_dir


def _tracked(work, job):
    """``work(job)`` in a worker, with ``<busy dir>/<pid>`` naming the record while it runs, so that
    the main process can tell which record a worker died on."""
    note = Path(_BUSY_DIR) / str(os.getpid()) if _BUSY_DIR else None
    if note:
        note.write_text(str(job[0]))
    try:
        return work(job)
    except Exception as exc:  # noqa: BLE001 (an unexpected failure ends the build on one line)
        return WorkerError(Path(job[0]).stem, f"{type(exc).__name__}: {exc}".splitlines()[0])
    finally:
        if note:
            note.unlink(missing_ok=True)


def _stop(executor) -> None:
    """Stop a process pool now: cancel what has not started and terminate the workers (shutdown
    alone would wait for the running records)."""
    procs = list((getattr(executor, "_processes", None) or {}).values())  # CPython's worker table (shutdown clears it)
    executor.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(5)


def _dies_alone(work, job) -> bool:
    """True when ``work(job)`` kills a fresh single worker too."""
    ex = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_quiet_worker)
    try:
        ex.submit(_tracked, work, job).result()
        return False
    except BrokenProcessPool:
        return True
    finally:
        _stop(ex)


def featurise_all(jobs, n_procs: int, work):
    """Yield ``work(job)`` for every job (in completion order); in ``n_procs`` spawned processes
    when there are more than 4 jobs. A worker that dies (segfault, out of memory, kill) ends the
    build with a ``BuildError`` naming the record it was on; Ctrl-C terminates the workers at once."""
    if n_procs <= 1 or len(jobs) <= 4:
        for j in jobs:
            yield _tracked(work, j)
        return
    busy = tempfile.mkdtemp(prefix="data_prep-build-")
    ex = ProcessPoolExecutor(n_procs, mp_context=mp.get_context("spawn"), initializer=_quiet_worker,
                             initargs=(busy,))
    try:
        pending = {ex.submit(_tracked, work, j): j for j in jobs}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                pending.pop(f)
                try:
                    r = f.result()
                except BrokenProcessPool:
                    raise _worker_died(busy, work, jobs) from None
                yield r
    finally:
        _stop(ex)
        for note in Path(busy).glob("*"):
            note.unlink(missing_ok=True)
        os.rmdir(busy)


def _worker_died(busy: str, work, jobs) -> BuildError:
    """The ``BuildError`` for a dead worker: the records the workers were on, narrowed to the one
    that kills a worker again when retried alone."""
    on = sorted({p.read_text() for p in Path(busy).glob("*")})
    by_path = {str(j[0]): j for j in jobs}
    culprits = [p for p in on if p in by_path and _dies_alone(work, by_path[p])] if len(on) > 1 else on
    names = ", ".join(Path(p).stem for p in (culprits or on)) or "an unknown record"
    return BuildError(f"a featurising worker died (crashed, killed or out of memory) on {names}; "
                      f"remove or fix that record and build again")
