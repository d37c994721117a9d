"""Records -> one HDF5 file of DOSnet inputs: gridded DOS channels, structure vector, bond valence
targets, per-sample metadata and a material-grouped train/val/test split.

The file layout (dataset and attribute names, ``schema_version``) is owned by ``data_prep.h5schema``;
this module featurises records and writes through ``h5schema.Writer``.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from data_prep import __version__, h5schema
from data_prep.h5schema import SPLITS, TARGETS, BuildError  # noqa: F401  (re-exported for build's callers)
from data_prep.layout import DEFAULT_N_NEIGHBOURS, REFERENCE_RULE, EnergyGrid, channel_labels
from data_prep.records import MaterialRecord, RecordError
from data_prep.shards import select_records
from data_prep.split import grouped_split

#: Keys of a params.json ``data`` section that say how train.py reads the h5 (``dosnet_bv.streaming``);
#: build ignores them, so one params.json can hold both.
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

    def __post_init__(self):
        f = tuple(float(x) for x in self.split_fractions)
        if len(f) != 3 or min(f) < 0 or abs(sum(f) - 1) > 1e-6:
            raise BuildError(f"split fractions must be three non-negative numbers summing to 1, got {self.split_fractions}")
        self.split_fractions = f
        self.structure_families = tuple(self.structure_families)

    def as_dict(self) -> dict:
        return {"grid": self.grid.as_dict(), "n_neighbours": self.n_neighbours,
                "bv_cutoff_ang": self.bv_cutoff_ang, "structure_families": list(self.structure_families),
                "split_fractions": list(self.split_fractions), "split_seed": self.split_seed,
                "symprec": self.symprec}

    @classmethod
    def from_params(cls, params: dict) -> "BuildConfig":
        """From the ``data`` section of a params.json (keys as in ``as_dict``; all optional).
        The keys that tell train.py how to read the file (``TRAIN_READ_KEYS``) are ignored."""
        problem = data_section_problem(params or {}, for_training=False)
        if problem:
            raise BuildError(f"params 'data': {problem}")
        d = {k: v for k, v in dict(params or {}).items() if k not in TRAIN_READ_KEYS}
        if "grid" in d:
            d["grid"] = EnergyGrid.from_dict(d["grid"])
        return cls(**d)


def _count(v, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


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
    valences: list = field(default_factory=list)   # per site of the structure (migration targets)


def featurise_record(record: MaterialRecord, cfg: BuildConfig):
    """One record -> ``MaterialSamples``, or ``(material_id, reason)`` when it must be skipped."""
    from data_prep.bond_valence import BondValenceError, assign_valences, compute_targets
    from data_prep.samples import SampleSelectionError, sample_dos, select_samples
    from data_prep.structure_features import StructureFeaturizer

    mid = record.material_id
    try:
        record.validate()
    except RecordError as exc:
        return mid, f"invalid record: {exc}"
    s = record.structure
    try:
        valences = record.provenance.get("bv_valences")  # BVAnalyzer valences stored by the source
        if valences is None or len(valences) != len(s):
            valences = assign_valences(s)
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
    if not (np.all(np.isfinite(dos)) and np.all(np.isfinite(feats))):
        return mid, "non-finite values in the gridded DOS or structure features"
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
        valences=[int(v) for v in valences])


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
             shard: tuple[int, int] | None = None, dos_compression: str | None = "lzf",
             migration_cache=None, migration_time_limit_s: float | None = None) -> dict:
    """Featurise every record and write one h5 atomically. Returns a summary dict.

    ``shard`` = (I, N): keep only the records of shard I of N (``data_prep.shards``; stored as the
    ``shard`` attribute); ``python -m data_prep merge`` joins the N parts into the unsharded file.
    ``dos_compression``: "lzf" (default) or None. Uncompressed costs more disk but reads ~13x
    faster (0.02 vs 0.3 ms of CPU per 2000 x 27 sample): what streaming training wants when the
    CPU is busy (README, section Scaling).
    ``migration_cache``: JSON of BVSE barriers (``data_prep.migration``) read, and extended with the
    missing materials when bvlain is installed; None keeps computed barriers in memory only.
    """
    import h5py
    from tqdm import tqdm

    from data_prep.bond_valence import CITATIONS as BV_CITATIONS
    from data_prep.structure_features import StructureFeaturizer

    cfg = cfg or BuildConfig()
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise BuildError(f"{out_path} exists; pass --overwrite to replace it")
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
    if n_procs > 1 and len(jobs) > 4:
        with mp.get_context("spawn").Pool(n_procs, initializer=_quiet_worker) as pool:
            for r in pool.imap(_work, jobs, chunksize=4):
                _collect(r, results, skipped)
                bar.update()
    else:
        for j in jobs:
            _collect(_work(j), results, skipped)
            bar.update()
    bar.close()
    ids = [r.material_id for r in results]
    dup = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
    if dup:
        raise BuildError(f"duplicate material ids in the records: {dup[:10]}")
    if not results:
        raise BuildError(f"no material could be featurised ({len(skipped)} skipped; first: "
                         f"{next(iter(skipped.items()), None)})")
    results.sort(key=lambda r: r.material_id)
    split_of = grouped_split(ids, cfg.split_fractions, cfg.split_seed)
    from data_prep.migration import build_targets

    mig = build_targets(results, migration_cache, n_procs, migration_time_limit_s, progress)
    feat = StructureFeaturizer(cfg.structure_families, symprec=cfg.symprec)
    n = sum(len(r.site_index) for r in results)
    P, C = cfg.grid.n_points, results[0].dos.shape[2]
    out_path.parent.mkdir(parents=True, exist_ok=True)
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
                np.concatenate([r.site_index for r in results]),
                neighbour_indices=np.concatenate([r.neighbour_indices for r in results]).reshape(n, cfg.n_neighbours),
                neighbour_distances_ang=np.concatenate([r.neighbour_distances_ang for r in results]).reshape(
                    n, cfg.n_neighbours),
                multiplicity=np.concatenate([r.multiplicity for r in results]),
                outside_weight=np.concatenate([r.outside for r in results]))
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
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    manifest = {"n_records": len(paths), "n_materials": len(results), "n_samples": n, "skipped": skipped,
                "migration": {"counts": mig["info"]["counts"], "missing": mig["reasons"]},
                **({"shard": f"{shard[0]}/{shard[1]}"} if shard is not None else {})}
    manifest_path = out_path.with_suffix(".manifest.json")
    from data_prep.records import atomic_write_bytes

    atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return {**manifest, "out": str(out_path), "manifest": str(manifest_path)}


def _collect(r, results, skipped):
    if isinstance(r, tuple):
        skipped[r[0]] = r[1]
    else:
        results.append(r)


def _quiet_worker():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import warnings

    warnings.filterwarnings("ignore")
