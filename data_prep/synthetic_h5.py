"""A synthetic h5 in data_prep's layout (``data_prep/h5schema.py``), of any size, written fast: for the
scaling benches (``bench/streaming.py``, ``bench/throughput.py``) and the streaming tests.

``write_synthetic_h5(path, n_samples)``: ``n_samples`` samples of ``sites_per_material`` sites
each, P = ``n_points`` grid points, W = (1 + n_neighbours) * 9 channels. Each sample's DOS is one
of 64 smooth base spectra (Gaussian bands; zero in a gap and above the window, so the file
compresses like real data), scaled per channel by a random amplitude a (W,); the target is
learnable: ``bvs_vu = 2 + 0.5 * z(mean a of the site's s channel) + 0.3 * structure[:, 0]``. The
structure vector has 4 standard-normal columns per family (all six build families). Layout as a
real build: ``dos`` chunked one sample per chunk with lzf compression, grouped split by
``data_prep.split.grouped_split`` (0.8/0.1/0.1, seed 88), grid and config attributes.
Size: ``n_samples * n_points * W * 4`` bytes of DOS (216 kB per sample at 2000 x 27).

``bond_slots=K`` (default None: no bond table, the file as before) also writes a bond table
(``bonds/*``, ``data_prep.bonds.BondTable``, cutoff ``bond_cutoff_ang``) so that bond models
(``structure_input`` bonds/both) train on it: per sample 4..K neighbours (uniform), distances
ascending in 1.6..``bond_cutoff_ang`` Å, neighbour and centre elements drawn from O, Ti, Sr
(Z 8, 22, 38), the rest of the K slots empty (mask 0). Random and plausible in shape only; the
target does not depend on it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_prep.h5schema import Writer
from data_prep.layout import EnergyGrid, channel_labels
from data_prep.split import grouped_split

FAMILIES = ("site", "neighbours", "coordination", "distances", "gaussian", "global")


def samples_for_bytes(n_bytes: float, n_points: int = 2000, n_neighbours: int = 2) -> int:
    """Samples whose float32 DOS takes ``n_bytes``."""
    return max(1, int(n_bytes // (n_points * (1 + n_neighbours) * 9 * 4)))


def _base_spectra(rng, k: int, n_points: int, width: int) -> np.ndarray:
    """(k, P, W) float32 smooth spectra: a few Gaussian bands below a gap, a few above, zero elsewhere."""
    x = np.linspace(0.0, 1.0, n_points)
    out = np.zeros((k, n_points, width), np.float32)
    for _ in range(4):
        centre = rng.uniform(0.05, 0.45, (k, 1, width))  # valence bands
        out += (rng.uniform(0.1, 1.0, (k, 1, width)) * np.exp(-0.5 * ((x[None, :, None] - centre) / 0.03) ** 2))
    for _ in range(2):
        centre = rng.uniform(0.6, 0.85, (k, 1, width))  # empty bands above a gap
        out += (rng.uniform(0.05, 0.5, (k, 1, width)) * np.exp(-0.5 * ((x[None, :, None] - centre) / 0.03) ** 2))
    out[out < 1e-4] = 0.0
    return out


def write_synthetic_h5(path, n_samples: int, n_points: int = 2000, n_neighbours: int = 2,
                       sites_per_material: int = 4, seed: int = 0, block: int = 256, progress=None,
                       compression: str | None = "lzf", bond_slots: int | None = None,
                       bond_cutoff_ang: float = 6.0) -> dict:
    """Write the file (replacing one that exists); returns ``{"n_samples", "dos_bytes", "path"}``
    (plus ``"bond_slots"`` when a bond table is written).

    ``progress``: optional callable(samples written) for long files. ``compression`` of the DOS:
    "lzf" as ``build`` writes by default, or None (``build --dos-compression none``).
    ``bond_slots``: K, write a random bond table of K slots per sample (module docstring); None
    (default): none.
    """
    import h5py

    path = Path(path)
    rng = np.random.default_rng(seed)
    width = (1 + n_neighbours) * 9
    n = int(n_samples)
    n_mat = -(-n // sites_per_material)
    mids = np.array([f"syn-{i:07d}" for i in range(n_mat)])
    mid_of = np.repeat(mids, sites_per_material)[:n]
    of = grouped_split(mids, (0.8, 0.1, 0.1), 88)
    split = np.array([of[m] for m in mid_of])
    bank = _base_spectra(rng, 64, n_points, width)
    amp = rng.uniform(0.5, 1.5, (n, width)).astype(np.float32)
    structure = rng.normal(size=(n, 4 * len(FAMILIES))).astype(np.float32)
    a0 = amp[:, 0].astype(np.float64)
    bvs = 2.0 + 0.5 * (a0 - a0.mean()) / a0.std() + 0.3 * structure[:, 0]
    valence = np.rint(bvs)
    grid = EnergyGrid(n_points=n_points)
    with h5py.File(path, "w") as h:
        w = Writer(h)
        dos = w.dos(n, n_points, width, channel_labels(n_neighbours), "states/eV per cell, spin summed (synthetic)",
                    compression=compression)
        for i in range(0, n, block):
            j = min(n, i + block)
            dos[i:j] = bank[np.arange(i, j) % len(bank)] * amp[i:j, None, :]
            if progress:
                progress(j)
        w.structure(structure, [f"{f}_{k}" for f in FAMILIES for k in range(4)], [f for f in FAMILIES for _ in range(4)])
        w.targets({"bvs_vu": bvs, "valence": valence, "bvs_deviation_vu": bvs - valence, "gii_vu": np.zeros(n)})
        w.sample_meta(mid_of, np.array(["Ti", "O", "O", "Sr"] * n_mat)[:n], ["synthetic"] * n,
                      np.tile(np.arange(sites_per_material), n_mat)[:n].astype(np.int32))
        w.split(split)
        w.materials(material_id=mids, split=[of[m] for m in mids])
        if bond_slots:
            w.bonds(synthetic_bond_table(n, int(bond_slots), bond_cutoff_ang, seed), bond_cutoff_ang)
        w.attrs(grid=json.dumps(grid.as_dict()), source="synthetic")
    out = {"path": str(path), "n_samples": n, "dos_bytes": n * n_points * width * 4}
    if bond_slots:
        out["bond_slots"] = int(bond_slots)
    return out


#: Elements of the synthetic bond table (O, Ti, Sr: the site elements of the synthetic metadata).
BOND_ELEMENTS_Z = (8, 22, 38)


def synthetic_bond_table(n: int, slots: int, cutoff_ang: float = 6.0, seed: int = 0):
    """A random ``data_prep.bonds.BondTable`` of ``n`` samples and K = ``slots`` slots: per sample
    min(K, uniform 4..K) neighbours at ascending distances (Å) in 1.6..``cutoff_ang``, elements of
    ``BOND_ELEMENTS_Z``; empty slots 0 with mask 0 (the layout of ``data_prep.bonds.bond_table``)."""
    from data_prep.bonds import BondTable

    rng = np.random.default_rng(seed + 1)
    k = np.minimum(rng.integers(4, max(4, slots) + 1, n), slots)
    mask = (np.arange(slots)[None, :] < k[:, None]).astype(np.uint8)
    dist = np.sort(rng.uniform(1.6, cutoff_ang, (n, slots)), axis=1).astype(np.float32) * mask
    z = np.asarray(BOND_ELEMENTS_Z, np.int16)
    return BondTable(distance_ang=dist, neighbour_z=(z[rng.integers(0, len(z), (n, slots))] * mask).astype(np.int16),
                     mask=mask, centre_z=z[rng.integers(0, len(z), n)], n_within=k.astype(np.int32))
