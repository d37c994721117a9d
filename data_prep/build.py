"""Records -> one HDF5 file of DOSnet inputs: gridded DOS channels, structure vector, bond valence
targets, per-sample metadata and a material-grouped train/val/test split.

File layout (``n`` samples, ``P`` grid points, ``C = (1 + n_neighbours) * 9`` channels, ``F``
structure features, ``M`` materials):

- ``dos`` (n, P, C) float32, states/eV, chunked one sample per chunk; attrs ``channel_labels``.
- ``structure`` (n, F) float32; ``structure_labels`` (F,) and ``structure_families`` (F,) strings.
- ``targets/bvs_vu``, ``targets/valence``, ``targets/bvs_deviation_vu``, ``targets/gii_vu`` (n,)
  float32 (gii is the material's value repeated on its samples).
- ``meta/material_id``, ``meta/element``, ``meta/origin`` (n,) strings; ``meta/site_index`` (n,),
  ``meta/neighbour_indices`` (n, n_neighbours), ``meta/multiplicity`` (n,) int32;
  ``meta/neighbour_distances_ang`` (n, n_neighbours); ``meta/outside_weight`` (n, C) states
  beyond the grid window.
- ``split`` (n,) strings ``train``/``val``/``test``, grouped by material.
- ``materials/*`` (M,): ``material_id``, ``formula``, ``origin``, ``method``, ``split``,
  ``structure_json`` (pymatgen ``Structure.as_dict``), ``gii_vu``, ``band_gap_ev``,
  ``reference_ev``, ``f_weight_fraction``, ``n_samples``.
- root attrs: grid, reference-level rule, parameters, citations, skipped materials with reasons,
  source package versions, data_prep version.
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

from data_prep import __version__
from data_prep.layout import DEFAULT_N_NEIGHBOURS, REFERENCE_RULE, EnergyGrid, channel_labels
from data_prep.records import MaterialRecord, RecordError

TARGETS = ("bvs_vu", "valence", "bvs_deviation_vu", "gii_vu")
SPLITS = ("train", "val", "test")
#: Keys of a params.json ``data`` section that train.py reads (how to read the h5, see stream.py);
#: build ignores them, so one params.json can hold both.
TRAIN_READ_KEYS = ("in_memory", "block_samples", "shuffle_buffer")


class BuildError(Exception):
    """A problem with the build as a whole (bad option, duplicate ids, existing output)."""


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
        d = {k: v for k, v in dict(params or {}).items() if k not in TRAIN_READ_KEYS}
        known = set(cls().as_dict())
        unknown = sorted(set(d) - known)
        if unknown:
            raise BuildError(f"unknown data parameter(s) {unknown}; known: {sorted(known)}")
        if "grid" in d:
            d["grid"] = EnergyGrid.from_dict(d["grid"])
        return cls(**d)


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
        elements=[x.element for x in samples], outside=outside.astype(np.float32), bv_params=t["params"])


def _work(args):
    path, cfg = args
    try:
        rec = MaterialRecord.from_npz(path)
    except RecordError as exc:
        return Path(path).stem, str(exc)
    return featurise_record(rec, cfg)


# ----------------------------------------------------------------------------- split
def grouped_split(material_ids, fractions=(0.8, 0.1, 0.1), seed: int = 88) -> dict[str, str]:
    """Assign each material (not each sample) to train/val/test: deterministic for a seed."""
    ids = sorted(set(material_ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    n = len(ids)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    if n >= 3:  # keep every split non-empty where there are enough materials
        n_train = min(max(n_train, 1), n - 2) if fractions[2] > 0 and fractions[1] > 0 else n_train
        n_val = min(max(n_val, 1 if fractions[1] > 0 else 0), n - n_train - (1 if fractions[2] > 0 else 0))
    labels = {}
    for rank, i in enumerate(order):
        labels[ids[i]] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return labels


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
             shard: tuple[int, int] | None = None, dos_compression: str | None = "lzf") -> dict:
    """Featurise every record and write one h5 atomically. Returns a summary dict.

    ``shard`` = (I, N): keep only the records of shard I of N (``data_prep.shards``; stored as the
    ``shard`` attribute); ``python -m data_prep merge`` joins the N parts into the unsharded file.
    ``dos_compression``: "lzf" (default) or None. Uncompressed costs more disk but reads ~13x
    faster (0.02 vs 0.3 ms of CPU per 2000 x 27 sample): what streaming training wants when the
    CPU is busy (README, section Scaling).
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
        from data_prep.shards import select_records

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
    feat = StructureFeaturizer(cfg.structure_families, symprec=cfg.symprec)
    n = sum(len(r.site_index) for r in results)
    P, C = cfg.grid.n_points, results[0].dos.shape[2]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    str_dt = h5py.string_dtype()
    try:
        with h5py.File(tmp, "w") as h:
            dos = h.create_dataset("dos", (n, P, C), dtype="float32", chunks=(1, P, C), compression=dos_compression)
            dos.attrs["channel_labels"] = channel_labels(cfg.n_neighbours)
            dos.attrs["units"] = "states/eV per cell, spin summed"
            i = 0
            for r in tqdm(results, desc="writing", unit="material", disable=not progress):
                dos[i:i + len(r.site_index)] = r.dos
                i += len(r.site_index)
            h["structure"] = np.concatenate([r.structure for r in results]).astype(np.float32)
            h["structure_labels"] = np.array(feat.feature_labels(), dtype=object).astype(str_dt)
            h["structure_families"] = np.array(feat.families_of_labels(), dtype=object).astype(str_dt)
            for name in TARGETS:
                h[f"targets/{name}"] = np.concatenate([r.targets[name] for r in results]).astype(np.float32)
            rep = lambda get: np.concatenate([[get(r)] * len(r.site_index) for r in results])  # noqa: E731
            h.create_dataset("meta/material_id", data=rep(lambda r: r.material_id).astype(object), dtype=str_dt)
            h.create_dataset("meta/origin", data=rep(lambda r: r.origin).astype(object), dtype=str_dt)
            h.create_dataset("meta/element", data=np.array(sum((r.elements for r in results), []), dtype=object), dtype=str_dt)
            h["meta/site_index"] = np.concatenate([r.site_index for r in results])
            h["meta/neighbour_indices"] = np.concatenate([r.neighbour_indices for r in results]).reshape(n, cfg.n_neighbours)
            h["meta/neighbour_distances_ang"] = np.concatenate([r.neighbour_distances_ang for r in results]).reshape(n, cfg.n_neighbours)
            h["meta/multiplicity"] = np.concatenate([r.multiplicity for r in results])
            h["meta/outside_weight"] = np.concatenate([r.outside for r in results])
            h.create_dataset("split", data=rep(lambda r: split_of[r.material_id]).astype(object), dtype=str_dt)
            m = h.create_group("materials")
            for key in ("material_id", "formula", "origin", "method", "structure_json"):
                m.create_dataset(key, data=np.array([getattr(r, key) for r in results], dtype=object), dtype=str_dt)
            m.create_dataset("split", data=np.array([split_of[r.material_id] for r in results], dtype=object), dtype=str_dt)
            for key in ("gii_vu", "band_gap_ev", "reference_ev", "f_weight_fraction"):
                m[key] = np.array([getattr(r, key) for r in results], dtype=np.float64)
            m["n_samples"] = np.array([len(r.site_index) for r in results], dtype=np.int32)
            m.create_dataset("bv_params_json", data=np.array([json.dumps(r.bv_params) for r in results], dtype=object), dtype=str_dt)
            h.attrs["grid"] = json.dumps(cfg.grid.as_dict())
            h.attrs["config"] = json.dumps(cfg.as_dict())
            h.attrs["reference_rule"] = REFERENCE_RULE
            h.attrs["citations"] = json.dumps({"bond_valence": BV_CITATIONS, "structure_features": feat.citations()})
            h.attrs["skipped"] = json.dumps(skipped, sort_keys=True)
            h.attrs["versions"] = json.dumps(_versions())
            h.attrs["source"] = source
            h.attrs["data_prep_version"] = __version__
            if shard is not None:
                h.attrs["shard"] = f"{shard[0]}/{shard[1]}"
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    manifest = {"n_records": len(paths), "n_materials": len(results), "n_samples": n, "skipped": skipped,
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
