"""Export an h5 built by ``data_prep build`` to plain ``.npy`` files or to the upstream DOSnet pickle.

``npy``: ``dos.npy`` (n, P, C) float32, ``structure.npy`` (n, F) float32, ``targets.npy``
(n, T) float32 with columns named in ``meta.json``, ``split.npy`` (n,) strings, ``meta.json``
(labels, per-sample ids, grid, provenance).
``upstream``: one pickle stream as read by ``python -m DOSnet``: the DOS with the energy
(eV relative to the reference level) as column 0, (n, P, 1 + C), then the chosen target (n,).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

from data_prep.h5schema import TARGETS, BuildError, open_h5
from data_prep.records import atomic_write_bytes


def _save_npy(path: Path, arr: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(path, buf.getvalue())


def export_npy(h5_path, out_dir, overwrite: bool = False) -> list[Path]:
    out_dir = Path(out_dir)
    names = ["dos.npy", "structure.npy", "targets.npy", "split.npy", "meta.json"]
    existing = [n for n in names if (out_dir / n).exists()]
    if existing and not overwrite:
        raise BuildError(f"{out_dir} already holds {existing}; pass --overwrite to replace them")
    out_dir.mkdir(parents=True, exist_ok=True)
    with open_h5(h5_path) as h:
        _save_npy(out_dir / "dos.npy", h.dos[...])
        _save_npy(out_dir / "structure.npy", h.structure())
        _save_npy(out_dir / "targets.npy", np.stack([h.target(t) for t in TARGETS], axis=1))
        _save_npy(out_dir / "split.npy", h.split().astype("U5"))
        meta = {
            "targets": list(TARGETS),
            "channel_labels": h.channel_labels(),
            "structure_labels": h.structure_labels(),
            "structure_families": h.structure_families(),
            "material_id": list(h.meta_strings("material_id")),
            "site_index": h.meta("site_index").tolist(),
            "element": list(h.meta_strings("element")),
            "grid": h.attr_json("grid"),
            "reference_rule": h.attr("reference_rule"),
            "source_h5": str(h5_path),
        }
    atomic_write_bytes(out_dir / "meta.json", json.dumps(meta, indent=1).encode())
    return [out_dir / n for n in names]


def export_upstream(h5_path, out_path, target: str = "bvs_vu", overwrite: bool = False) -> Path:
    """Upstream DOSnet pickle stream: DOS with energy column, then ``target``."""
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise BuildError(f"{out_path} exists; pass --overwrite to replace it")
    if target not in TARGETS:
        raise BuildError(f"unknown target {target!r}; expected one of {TARGETS}")
    with open_h5(h5_path) as h:
        dos = h.dos[...]
        y = h.target(target)
        grid = h.grid()
    if dos.shape[2] != 27:
        raise BuildError(f"the upstream DOSnet takes 3 atoms x 9 orbitals = 27 channels; this file has {dos.shape[2]}")
    full = np.empty((dos.shape[0], dos.shape[1], 1 + dos.shape[2]), dtype=np.float32)
    full[:, :, 0] = grid.energies_ev
    full[:, :, 1:] = dos
    import io

    buf = io.BytesIO()
    pickle.dump(full, buf, protocol=4)
    pickle.dump(y.astype(np.float32), buf, protocol=4)
    atomic_write_bytes(out_path, buf.getvalue())
    return out_path
