"""``python -m data_prep merge OUT IN1 IN2 ...``: combine folders of records (e.g. the shards of a job array).

Every ``*.npz`` record of the inputs is copied into ``OUT``. A material present in more than one
folder (or already in ``OUT``) must be the same record in each: same identity, method, structure
(lattice, species, fractional coordinates) and spectrum arrays, compared numerically — provenance
such as the download time may differ. One that differs stops the merge before anything is written.
The skipped entries of the inputs' indexes are carried over, so a fetch into ``OUT`` resumes.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_prep.mp.fetch import peek_id
from data_prep.records import MaterialRecord, RecordError, atomic_write_bytes


class MergeError(Exception):
    """Inputs that cannot be merged (missing folder, unreadable record, differing duplicates)."""


def record_difference(a: MaterialRecord, b: MaterialRecord, atol: float = 1e-6) -> str | None:
    """``None`` when two records carry the same data, else what differs (provenance is ignored)."""
    for name in ("material_id", "formula", "origin", "method"):
        if getattr(a, name) != getattr(b, name):
            return f"{name} differs ({getattr(a, name)!r} vs {getattr(b, name)!r})"
    sa, sb = a.structure, b.structure
    if len(sa) != len(sb):
        return f"structure differs ({len(sa)} vs {len(sb)} sites)"
    if [s.species_string for s in sa] != [s.species_string for s in sb]:
        return "structure differs (species)"
    if not np.allclose(sa.lattice.matrix, sb.lattice.matrix, atol=atol, rtol=0):
        return "structure differs (lattice)"
    d = sa.frac_coords - sb.frac_coords
    if not np.allclose(d - np.round(d), 0.0, atol=atol):
        return "structure differs (fractional coordinates)"
    pa_, pb = a.spectrum, b.spectrum
    if pa_.energies_ev.shape != pb.energies_ev.shape or not np.allclose(pa_.energies_ev, pb.energies_ev,
                                                                       rtol=1e-9, atol=1e-9):
        return "spectrum energies differ"
    if pa_.weights.shape != pb.weights.shape or not np.allclose(pa_.weights, pb.weights, rtol=1e-6, atol=1e-9):
        return "spectrum weights differ"
    fa = np.zeros(len(sa)) if pa_.f_weight is None else np.asarray(pa_.f_weight)
    fb = np.zeros(len(sb)) if pb.f_weight is None else np.asarray(pb.f_weight)
    if not np.allclose(fa, fb, rtol=1e-6, atol=1e-9):
        return "f weights differ"
    for name in ("reference_ev", "efermi_ev", "band_gap_ev"):
        if not np.isclose(getattr(pa_, name), getattr(pb, name), rtol=0, atol=1e-9):
            return f"{name} differs ({getattr(pa_, name)} vs {getattr(pb, name)})"
    return None


def _index_entries(folder: Path) -> dict:
    out: dict = {}
    for p in sorted(folder.glob("index*.json")):
        try:
            for mid, e in (json.loads(p.read_text()).get("materials") or {}).items():
                if isinstance(e, dict):
                    out.setdefault(mid, e)
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
    return out


def merge_folders(out_dir, inputs) -> dict:
    """Merge record folders into ``out_dir``; returns counts. Raises ``MergeError`` on a conflict."""
    out = Path(out_dir)
    folders = [Path(p) for p in inputs]
    if not folders:
        raise MergeError("merge needs at least one input folder")
    for f in folders:
        if not f.is_dir():
            raise MergeError(f"input folder not found: {f}")
        if f.resolve() == out.resolve():
            raise MergeError(f"input {f} is the output folder")
    sources: dict[str, list[Path]] = {}
    for f in ([out] if out.is_dir() else []) + folders:
        for p in sorted(f.glob("*.npz")):
            try:
                mid = peek_id(p)
            except RecordError as exc:
                raise MergeError(str(exc)) from None
            sources.setdefault(mid, []).append(p)
    if not sources:
        raise MergeError(f"no *.npz records in {', '.join(map(str, folders))}")
    identical = 0
    for mid, paths in sources.items():
        if len(paths) < 2:
            continue
        try:
            first = MaterialRecord.from_npz(paths[0])
            for p in paths[1:]:
                diff = record_difference(first, MaterialRecord.from_npz(p))
                if diff:
                    raise MergeError(f"refusing to merge: {mid} differs between {paths[0].parent} and "
                                     f"{p.parent}: {diff}")
                identical += 1
        except RecordError as exc:
            raise MergeError(str(exc)) from None
    out.mkdir(parents=True, exist_ok=True)
    copied = 0
    entries = _index_entries(out)
    for f in folders:
        for mid, e in _index_entries(f).items():
            if e.get("status") == "skipped" and mid not in sources:
                entries.setdefault(mid, e)
            elif e.get("status") == "complete":
                entries[mid] = e
    for mid, paths in sorted(sources.items()):
        target = out / f"{mid}.npz"
        if not any(p.parent.resolve() == out.resolve() for p in paths):
            atomic_write_bytes(target, paths[0].read_bytes())
            copied += 1
        entry = dict(entries.get(mid) or {})
        entry.update({"status": "complete", "file": target.name, "bytes": target.stat().st_size})
        entries[mid] = entry
    atomic_write_bytes(out / "index.json", json.dumps(
        {"format": 1, "source": "merge", "inputs": [str(f) for f in folders],
         "materials": dict(sorted(entries.items()))}, indent=1).encode())
    n_skipped = sum(1 for e in entries.values() if e.get("status") == "skipped")
    return {"out": str(out), "records": len(sources), "copied": copied, "identical_duplicates": identical,
            "skipped_entries": n_skipped}
