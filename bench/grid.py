"""Benchmark: per-sample DOS input, vectorised gridding vs a naive pymatgen loop, same records.

Usage::

    python bench/grid.py [--source auto|synthetic|embedded] [--repeats N] [--json PATH]

Records: the committed embedded spectra (``data_prep/embedded/spectra/*.npz``) when present
(``--source auto`` picks them, up to ``--max-records``), otherwise ~20 synthetic records: real
crystal structures built with pymatgen (rocksalts, rutiles, perovskites, fluorites, wurtzite,
corundum, spinel, quartz, ...) with a random spectrum of a few hundred states per material
(energies spread over -30..+12 eV around the reference, a share of them outside the grid
window; per-state weights spread over a few atoms and the 9 orbitals, 2 states per state,
fixed seed). Samples are selected once (``samples.select_samples``, timed separately) and both
paths produce the same (n_samples, n_points, 27) array for every material.

- **vectorised**: ``samples.sample_dos`` — every atom a material's samples need is gridded once
  (``grid.grid_atoms``: one Gaussian matrix per energy chunk, one matmul over all atoms and
  orbitals), then the samples index into it.
- **naive**: the spectral form is first turned into a pymatgen ``CompleteDos`` (not timed; an
  MP download comes as one): per atom and orbital, each state's weight is put into the bin of
  the *target grid itself* (bins of width ``step`` centred on the grid energies shifted by the
  reference, density = weight / step; states outside the bins are dropped), wrapped as
  ``Dos``/``CompleteDos`` with ``Spin.up``. Then, for each sample, for each of its 3 atoms and
  each of the 9 ``Orbital``\\ s: ``cdos.get_site_orbital_dos(site, orbital)`` followed by
  ``Dos.get_smeared_densities(sigma)[Spin.up]`` (pymatgen's ``gaussian_filter1d`` with sigma in
  grid points), and the 27 columns are stacked. Because the histogram is already on the target
  grid no interpolation is needed — the naive path's best case. Its result differs from the
  vectorised one by the binning (energies moved by up to step/2) and at the window edges
  (pymatgen reflects there; states beyond the window are lost); the table reports the interior
  difference as a sanity check.

Both paths are timed as the best of ``--repeats`` passes over all records.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data_prep.layout import DEFAULT_GRID, N_ORBITALS, ORBITALS, EnergyGrid  # noqa: E402
from data_prep.records import Spectrum, load_records  # noqa: E402
from data_prep.samples import sample_dos, select_samples  # noqa: E402

EMBEDDED_SPECTRA = ROOT / "data_prep" / "embedded" / "spectra"


# --- records ---------------------------------------------------------------------------------
def _prototypes():
    """(name, spacegroup, lattice, species, fractional coords) of real crystal structures."""
    from pymatgen.core import Lattice

    c, h, t = Lattice.cubic, Lattice.hexagonal, Lattice.tetragonal
    return [
        ("NaCl", "Fm-3m", c(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        ("MgO", "Fm-3m", c(4.21), ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        ("LiF", "Fm-3m", c(4.03), ["Li", "F"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        ("NiO", "Fm-3m", c(4.18), ["Ni", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        ("CsCl", "Pm-3m", c(4.12), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        ("ZnS", "F-43m", c(5.41), ["Zn", "S"], [[0, 0, 0], [0.25, 0.25, 0.25]]),
        ("CaF2", "Fm-3m", c(5.46), ["Ca", "F"], [[0, 0, 0], [0.25, 0.25, 0.25]]),
        ("CeO2", "Fm-3m", c(5.41), ["Ce", "O"], [[0, 0, 0], [0.25, 0.25, 0.25]]),
        ("TiO2-rutile", "P4_2/mnm", t(4.594, 2.959), ["Ti", "O"], [[0, 0, 0], [0.305, 0.305, 0]]),
        ("SnO2", "P4_2/mnm", t(4.737, 3.186), ["Sn", "O"], [[0, 0, 0], [0.307, 0.307, 0]]),
        ("SrTiO3", "Pm-3m", c(3.905), ["Sr", "Ti", "O"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]]),
        ("BaTiO3", "Pm-3m", c(4.00), ["Ba", "Ti", "O"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]]),
        ("KNbO3", "Pm-3m", c(4.02), ["K", "Nb", "O"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]]),
        ("PbTiO3", "P4mm", t(3.90, 4.15), ["Pb", "Ti", "O", "O"],
         [[0, 0, 0], [0.5, 0.5, 0.54], [0.5, 0.5, 0.11], [0.5, 0, 0.62]]),
        ("ZnO", "P6_3mc", h(3.25, 5.21), ["Zn", "O"], [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.382]]),
        ("MoS2", "P6_3/mmc", h(3.16, 12.29), ["Mo", "S"], [[1 / 3, 2 / 3, 0.25], [1 / 3, 2 / 3, 0.621]]),
        ("Al2O3", "R-3c", h(4.76, 12.99), ["Al", "O"], [[0, 0, 0.352], [0.306, 0, 0.25]]),
        ("SiO2-quartz", "P3_221", h(4.913, 5.405), ["Si", "O"], [[0.4697, 0, 2 / 3], [0.4135, 0.2669, 0.2143]]),
        ("Cu2O", "Pn-3m", c(4.27), ["O", "Cu"], [[0, 0, 0], [0.25, 0.25, 0.25]]),
        ("MgAl2O4", "Fd-3m", c(8.08), ["Mg", "Al", "O"],
         [[0, 0, 0], [0.625, 0.625, 0.625], [0.388, 0.388, 0.388]]),
    ]


def synthetic_records(seed: int = 7):
    """[(name, structure, spectrum)] for the prototypes, with random spectra (fixed seed)."""
    from pymatgen.core import Structure

    rng = np.random.default_rng(seed)
    out = []
    for name, sg, lat, species, coords in _prototypes():
        s = Structure.from_spacegroup(sg, lat, species, coords)
        n_atoms = len(s)
        n_states = int(np.clip(12 * n_atoms, 200, 900))
        reference = rng.uniform(-6.0, 2.0)
        e = reference + rng.uniform(-30.0, 12.0, n_states)
        # each state lives mostly on a few atoms (sparse Dirichlet) and a few orbitals
        on_atoms = rng.dirichlet(np.full(n_atoms, 0.3), size=n_states)
        on_orbs = rng.dirichlet(np.full(N_ORBITALS, 0.5), size=(n_states, n_atoms))
        w = 2.0 * on_atoms[:, :, None] * on_orbs
        spec = Spectrum(energies_ev=e, weights=w.astype(np.float32), reference_ev=reference,
                        efermi_ev=reference, band_gap_ev=0.0)
        spec.validate(n_atoms)
        out.append((name, s, spec))
    return out


def embedded_records(max_records: int):
    recs = load_records(EMBEDDED_SPECTRA)[:max_records]
    return [(r.material_id, r.structure, r.spectrum) for r in recs]


# --- the naive path --------------------------------------------------------------------------
def pymatgen_orbitals():
    """pymatgen ``Orbital`` members in ``layout.ORBITALS`` order (by enum value, 0..8).

    Looked up by value, not name: recent pymatgen renamed ``dx2`` to ``dx2_y2``.
    """
    from pymatgen.electronic_structure.core import Orbital

    orbitals = [Orbital(i) for i in range(N_ORBITALS)]
    for orb, name in zip(orbitals, ORBITALS):
        if not orb.name.startswith(name):
            raise RuntimeError(f"pymatgen Orbital order changed: {orb.name} where {name} was expected")
    return orbitals


def to_complete_dos(structure, spectrum: Spectrum, grid: EnergyGrid):
    """CompleteDos whose per-site, per-orbital densities are histograms on the target grid."""
    from pymatgen.electronic_structure.core import Spin
    from pymatgen.electronic_structure.dos import CompleteDos, Dos

    h = grid.step_ev
    energies_abs = grid.energies_ev + spectrum.reference_ev
    e_rel = np.asarray(spectrum.energies_ev, dtype=float) - spectrum.reference_ev
    bins = np.floor((e_rel - (grid.emin_ev - 0.5 * h)) / h).astype(np.int64)
    ok = (bins >= 0) & (bins < grid.n_points)
    dens = np.zeros((grid.n_points, len(structure), N_ORBITALS))
    np.add.at(dens, bins[ok], np.asarray(spectrum.weights, dtype=float)[ok])
    dens /= h
    orbitals = pymatgen_orbitals()
    pdos = {structure[a]: {orb: {Spin.up: dens[:, a, o].copy()} for o, orb in enumerate(orbitals)}
            for a in range(len(structure))}
    total = Dos(spectrum.efermi_ev, energies_abs, {Spin.up: dens.sum(axis=(1, 2))})
    return CompleteDos(structure, total, pdos)


def naive_sample_dos(cdos, samples, grid: EnergyGrid) -> np.ndarray:
    from pymatgen.electronic_structure.core import Spin

    orbitals = pymatgen_orbitals()
    out = []
    for smp in samples:
        cols = []
        for atom in smp.atom_indices:
            site = cdos.structure[atom]
            for orb in orbitals:
                d = cdos.get_site_orbital_dos(site, orb)
                cols.append(d.get_smeared_densities(grid.sigma_ev)[Spin.up])
        out.append(np.stack(cols, axis=1).astype(np.float32))
    return np.stack(out)


# --- timing ----------------------------------------------------------------------------------
def _best(fn, repeats):
    best = float("inf")
    result = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def run(source: str = "auto", repeats: int = 5, naive_repeats: int = 2, max_records: int = 40,
        grid: EnergyGrid = DEFAULT_GRID) -> dict:
    if source == "embedded" or (source == "auto" and any(EMBEDDED_SPECTRA.glob("*.npz"))):
        records, used = embedded_records(max_records), "embedded"
    else:
        records, used = synthetic_records(), "synthetic"

    select_samples(records[0][1])  # warm-up (pymatgen's symmetry imports)
    t_sel, selections = _best(lambda: [select_samples(s) for _, s, _ in records], 1)
    n_samples = sum(len(x) for x in selections)
    n_atoms = sum(len(s) for _, s, _ in records)
    n_states = sum(np.shape(sp.energies_ev)[0] for _, _, sp in records)

    def vectorised():
        return [sample_dos(sp, s, smp, grid) for (_, s, sp), smp in zip(records, selections)]

    t0 = time.perf_counter()
    cdoses = [to_complete_dos(s, sp, grid) for _, s, sp in records]
    t_setup = time.perf_counter() - t0

    def naive():
        return [naive_sample_dos(cd, smp, grid) for cd, smp in zip(cdoses, selections)]

    vectorised()  # warm-up (imports, BLAS threads)
    t_vec, x_vec = _best(vectorised, repeats)
    t_naive, x_naive = _best(naive, naive_repeats)

    # sanity: the two agree away from the window edges up to the naive path's binning
    margin = int(np.ceil(6 * grid.sigma_ev / grid.step_ev))
    diffs = [np.abs(a[:, margin:-margin] - b[:, margin:-margin]).max() / max(a.max(), 1e-12)
             for a, b in zip(x_vec, x_naive)]
    return {
        "source": used, "records": len(records), "atoms": int(n_atoms), "states": int(n_states),
        "samples": int(n_samples), "grid": grid.as_dict(),
        "vectorised_s": t_vec, "naive_s": t_naive, "naive_setup_s": t_setup, "selection_s": t_sel,
        "vectorised_samples_per_s": n_samples / t_vec, "naive_samples_per_s": n_samples / t_naive,
        "selection_samples_per_s": n_samples / t_sel, "ratio": t_naive / t_vec,
        "max_interior_diff_rel_to_peak": float(max(diffs)),
        "repeats": repeats, "naive_repeats": naive_repeats,
        "machine": {"python": platform.python_version(), "numpy": np.__version__,
                    "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
    }


def format_table(r: dict) -> str:
    rows = [
        ("vectorised (sample_dos)", r["vectorised_s"], r["vectorised_samples_per_s"]),
        ("naive pymatgen loop", r["naive_s"], r["naive_samples_per_s"]),
        ("sample selection (both)", r["selection_s"], r["selection_samples_per_s"]),
    ]
    lines = [f"{r['records']} {r['source']} records, {r['atoms']} atoms, {r['states']} states, "
             f"{r['samples']} samples; grid {r['grid']['n_points']} points, sigma {r['grid']['sigma_ev']} eV",
             f"{'path':<26}{'seconds':>10}{'samples/s':>12}"]
    lines += [f"{name:<26}{t:>10.4f}{rate:>12.0f}" for name, t, rate in rows]
    lines.append(f"speed-up vectorised / naive: {r['ratio']:.1f}x (goal >= 20x)")
    lines.append(f"naive CompleteDos construction (untimed above): {r['naive_setup_s']:.3f} s; "
                 f"max interior difference / peak: {r['max_interior_diff_rel_to_peak']:.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", choices=("auto", "synthetic", "embedded"), default="auto")
    ap.add_argument("--repeats", type=int, default=5, help="passes of the vectorised path (best is kept)")
    ap.add_argument("--naive-repeats", type=int, default=2)
    ap.add_argument("--max-records", type=int, default=40, help="embedded records to use at most")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    res = run(args.source, max(1, args.repeats), max(1, args.naive_repeats), args.max_records)
    print(format_table(res))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
