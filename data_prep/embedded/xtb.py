"""GFN1-xTB orbital-projected DOS of a crystal via tblite's Python API.

What is computed
----------------
One spin-restricted, self-consistent GFN1-xTB calculation (tblite ``Calculator``, periodic
boundary conditions, lattice and positions in Bohr) at the Γ point of a supercell
``structure * (na, nb, nc)``. Γ-point sampling of an ``n``-fold supercell is equivalent to
sampling the primitive Brillouin zone on the ``na × nb × nc`` Γ-centred grid, so the supercell
stands in for k-points. Each multiplicity is the smallest integer that makes the supercell's
*perpendicular width* along that axis (cell volume / area of the opposite face — the quantity
that controls the periodic-image distance, not the lattice length) at least ``min_length_ang``.

From the converged result we take the orbital energies ``e``, the orbital coefficients ``C``
(AO × MO), the Γ-point (lattice-summed) overlap ``S`` and the occupations. The Mulliken gross
population of molecular orbital ``i`` on atomic orbital ``μ`` is ``C[μ,i] * (S C)[μ,i]``; each
column sums to 1. Populations are summed over all shells of one angular momentum of an atom
(GFN1-xTB gives H a 1s and a diffuse 2s shell, and many main-group atoms a polarisation shell:
every s shell goes to channel ``s``, every p shell to ``py/pz/px`` by m, every d shell to the
five d channels by m) and folded from the supercell back onto the atoms of the input cell: the
images of one cell atom are translation-equivalent, so their populations are summed and divided
by the number of cells. Each atom keeps its *own* projection (m-resolved channels of
symmetry-equivalent atoms differ by the symmetry operation that relates them). Weights are
states per cell, spin-summed (×2), so the weights of all states sum to 2 × (AOs per cell) and
those of the occupied states to the valence electrons per cell. GFN1-xTB has no f shells; the
f weight is recorded as zeros (the code would route l = 3 shells there).

tblite facts relied on (tblite 0.8, checked in ``tests/test_xtb.py``)
--------------------------------------------------------------------
- ``Result.get`` keys: ``orbital-energies`` (Hartree, ascending), ``orbital-occupations``
  (spin-summed, 0..2 for a restricted run), ``orbital-coefficients`` (``[ao, mo]`` after the
  Python wrapper's transpose), ``overlap-matrix`` (only with ``save-integrals`` set).
- ``Calculator.get``: ``shell-map`` (shell → atom), ``angular-momenta`` (per shell),
  ``orbital-map`` (AO → shell). AOs are atom-major, shell by shell, the components of a shell
  contiguous.
- Component order inside a shell is the real-spherical-harmonic order m = -l..l, which is
  pymatgen's: p = (py, pz, px), d = (dxy, dyz, dz2, dxz, dx2-y2), positive phase. Verified
  from the overlap of a Ti atom's p/d AOs with an H s orbital placed along a random direction
  (proportional to the real harmonic of that direction), and by the m-resolved tests.
- A non-converged SCF raises ``TBLiteRuntimeError("SCF not converged ...")``; elements with
  Z > 86 are rejected. Both (and every other tblite failure) become :class:`XTBError`.

Supercell size: accuracy versus cost
------------------------------------
Convergence check (this machine, one thread; ``supercell_convergence``): relative L1 difference
``Σ|a - b| / Σ|b|`` over all grid points, atoms and the 9 channels of the Gaussian-gridded site
DOS (2000-point grid, σ = 0.1 eV, and σ = 0.3 eV for the coarse shape) against the largest
supercell computed:

  =====================  =========  =====  =====  ======  =========  =========
  material (min width)   supercell  atoms  AOs    s       L1 σ=0.1   L1 σ=0.3
  =====================  =========  =====  =====  ======  =========  =========
  NaCl prim. (6 Å)       2×2×2         16    104    0.4     0.69       0.37
  NaCl (8 Å; default)    3×3×3         54    351    1.7     0.39       0.09
  NaCl (10 Å, 864 AO)    4×4×4        128    832    8.3     0.11       0.014
  NaCl (14 Å, ref.)      5×5×5        250   1625   47       —          —
  MgO prim. (6 Å)        3×3×3         54    216    1.7     1.00       0.56
  MgO (8 Å; default)     4×4×4        128    512    6.5     0.92       0.38
  MgO (10 Å, ref.)       5×5×5        250   1000   27       —          —
  rutile TiO2 (6, 8 Å)   2×2×3         72    408    3.6     0.50       0.18
  TiO2 (default)         2×2×4         96    544    6.2     0.44       0.15
  TiO2 (10 Å, no cap)    3×3×4        216   1224   42       0.24       0.07
  TiO2 (12 Å, ref.)      3×3×5        270   1530   80       —          —
  =====================  =========  =====  =====  ======  =========  =========

A Γ-point supercell samples few distinct k-points (NaCl 4×4×4: 832 states, only 26 distinct
levels in the grid window), so at σ = 0.1 eV the gridded DOS is a set of sharp peaks that
moves from size to size; the coarse shape (σ = 0.3 eV) converges much faster. MgO is the worst
case: GFN1-xTB puts its very dispersive Mg-s conduction band at Γ almost onto the O-p valence
band (gap ~0.1 eV at every size, GFN2-xTB 0.8 eV; experiment 7.8 eV), and odd and even
supercells sample different k-points of narrow O-p bands. Real convergence at σ = 0.1 eV
would need thousands of atoms; the cost grows as the cube of the supercell's AO count (NaCl
250 atoms: 47 s; TiO2 270 atoms: 80 s; NiO 216 atoms: ~280 s because restricted open-shell
transition-metal compounds need many SCF cycles).

Defaults, from the cost side: ``MIN_LENGTH_ANG = 10`` with caps ``MAX_SUPERCELL_ATOMS = 128``
and ``MAX_SUPERCELL_AO = 560`` (first 864; lowered when the full set, measured at a fitted
1.2e-7 s × AO³ per material, came to ~4.3 h instead of the 3 h budget; 560 brings the whole
regeneration to ~1.4 h on 2 processes; NaCl then runs on 3×3×3, MgO and rutile are unchanged). When the requested widths would exceed a cap, the
multiplicities (no larger than requested) within the caps that keep the smallest width as large
as possible are used (ties: fewer cells); the width reached is in the provenance
(``min_width_reached_ang``). On 16 random real structures of the embedded set (2-40 atoms,
half with transition metals) this gave 10.9 s per material on each of 2 processes (5.2 s of
wall time per material; ~13 kB per compacted record), i.e. about 2 hours for 1,250 materials;
without the AO cap the same sample took 20.8 s per material (Fe2P alone 164 s). Over the 127
real structures the smallest width reached has median 9.3 Å (10 % of cells below 6.9 Å); a
third reach the 10 Å target under the first cap of 864 AOs, fewer under 560. Consistency matters more than
convergence here (every material is computed the same way, and a DOSnet sample is the
smeared site DOS), but the tables above say how far from a converged DOS the records are.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from pymatgen.core import Structure

from data_prep.layout import DEFAULT_GRID, GAP_THRESHOLD_EV, N_ORBITALS, EnergyGrid
from data_prep.records import Spectrum

HARTREE_EV = 27.211386245988
BOHR_ANG = 0.529177210903
KB_HARTREE_PER_K = 3.166811563e-6
METHOD = "GFN1-xTB"

#: Default minimum perpendicular width (Å) of the Γ-point supercell (see the module docstring).
MIN_LENGTH_ANG: float = 10.0
#: Default caps on the supercell (atoms, atomic orbitals); keep transition-metal compounds affordable.
MAX_SUPERCELL_ATOMS: int = 128
MAX_SUPERCELL_AO: int = 560
DEFAULT_ETEMP_K: float = 300.0
#: Energy padding (eV) outside the grid window within which compaction keeps states (10 σ).
DEFAULT_WINDOW_PAD_EV: float = 1.0
#: States closer than this (eV) are merged by compaction (weights summed, energy averaged).
DEFAULT_MERGE_TOL_EV: float = 1e-3
#: Weights of smaller magnitude are set to zero by compaction (they compress to nothing).
DEFAULT_WEIGHT_THRESHOLD: float = 1e-4
MAX_Z = 86

# AO channel of each (l, component) in layout.ORBITALS order; tblite's component order inside a
# shell equals pymatgen's (m = -l..l), so the offset is the component index.
_CHANNEL_OFFSET = {0: 0, 1: 1, 2: 4}


class XTBError(RuntimeError):
    """The GFN1-xTB calculation failed (tblite error, SCF not converged, unusable result)."""


@dataclass
class XTBResult:
    """A spectrum and what produced it."""

    spectrum: Spectrum
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# supercell
def perpendicular_widths(lattice_matrix) -> np.ndarray:
    """Distances between opposite faces of the cell (Å), one per lattice vector."""
    m = np.asarray(lattice_matrix, dtype=float)
    vol = abs(np.linalg.det(m))
    return np.array([vol / np.linalg.norm(np.cross(m[(i + 1) % 3], m[(i + 2) % 3])) for i in range(3)])


def supercell_multiplicity(lattice_matrix, n_atoms: int, min_length_ang: float,
                           max_atoms: int | None = MAX_SUPERCELL_ATOMS, n_ao_cell: int | None = None,
                           max_ao: int | None = None) -> tuple[int, int, int]:
    """Smallest ``(na, nb, nc)`` whose perpendicular widths are all >= ``min_length_ang``.

    If that needs more than ``max_atoms`` atoms (or, when ``n_ao_cell`` is given, more than
    ``max_ao`` atomic orbitals), the multiplicities (each no larger than the required one)
    within the caps that maximise the smallest width are used (ties: fewer cells); a cell that
    alone exceeds a cap is used as it is (1, 1, 1).
    """
    w = perpendicular_widths(lattice_matrix)
    need = [max(1, math.ceil(min_length_ang / wi - 1e-9)) for wi in w]

    def fits(n_cells):
        return ((max_atoms is None or n_atoms * n_cells <= max_atoms)
                and (max_ao is None or n_ao_cell is None or n_ao_cell * n_cells <= max_ao))

    if fits(math.prod(need)):
        return tuple(need)
    best, best_key = (1, 1, 1), None
    for n in itertools.product(*(range(1, k + 1) for k in need)):
        if not fits(math.prod(n)):
            continue
        key = (min(ni * wi for ni, wi in zip(n, w)), -math.prod(n))
        if best_key is None or key > best_key:
            best, best_key = n, key
    return tuple(int(x) for x in best)


def build_supercell(structure: Structure, mult) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Supercell arrays: (numbers, cartesian positions Å, lattice Å (rows), cell atom of each atom).

    Atoms are ordered cell-atom-major: the images of cell atom ``i`` are consecutive.
    """
    na, nb, nc = (int(x) for x in mult)
    lat = structure.lattice.matrix
    shifts = np.array(list(itertools.product(range(na), range(nb), range(nc))), dtype=float)
    frac = structure.frac_coords[:, None, :] + shifts[None, :, :]  # (A, ncell, 3)
    pos = (frac @ lat).reshape(-1, 3)
    numbers = np.repeat(np.array(structure.atomic_numbers, dtype=int), len(shifts))
    cell_atom = np.repeat(np.arange(len(structure)), len(shifts))
    sc_lat = lat * np.array([na, nb, nc], dtype=float)[:, None]
    return numbers, pos, sc_lat, cell_atom


# --------------------------------------------------------------------------------------------
# tblite
def tblite_version() -> str:
    from tblite import library

    return ".".join(str(x) for x in library.get_version())


def _quiet(*_args, **_kwargs):  # tblite logger callback
    return None


def _make_calculator(numbers, positions_ang, lattice_ang=None, *, uhf=None):
    from tblite.interface import Calculator

    kw = {}
    if lattice_ang is not None:
        kw = {"lattice": np.asarray(lattice_ang, float) / BOHR_ANG, "periodic": np.array([True, True, True])}
    calc = Calculator(METHOD, np.asarray(numbers, dtype=int), np.asarray(positions_ang, float) / BOHR_ANG,
                      uhf=uhf, color=False, logger=_quiet, **kw)
    calc.set("verbosity", 0)
    return calc


@lru_cache(maxsize=None)
def n_ao_of_element(z: int) -> int:
    """Number of GFN1-xTB atomic orbitals of element ``z`` (from tblite's basis)."""
    if not 1 <= z <= MAX_Z:
        raise XTBError(f"GFN1-xTB has no parameters for Z={z} (supported: 1..{MAX_Z})")
    calc = _make_calculator([z], np.zeros((1, 3)), uhf=z % 2)
    return int(len(calc.get("orbital-map")))


def ao_layout(calc) -> tuple[np.ndarray, np.ndarray]:
    """For each AO: (atom index, channel index in ``layout.ORBITALS`` or -1 for f / higher l)."""
    shell_atom = np.asarray(calc.get("shell-map"), dtype=int)
    shell_l = np.asarray(calc.get("angular-momenta"), dtype=int)
    ao_shell = np.asarray(calc.get("orbital-map"), dtype=int)
    atom = shell_atom[ao_shell]
    channel = np.full(ao_shell.size, -1, dtype=int)
    for sh in range(shell_atom.size):
        idx = np.flatnonzero(ao_shell == sh)
        l = int(shell_l[sh])
        if idx.size != 2 * l + 1:
            raise XTBError(f"tblite shell {sh} (l={l}) has {idx.size} AOs, expected {2 * l + 1}")
        if l in _CHANNEL_OFFSET:
            channel[idx] = _CHANNEL_OFFSET[l] + np.arange(2 * l + 1)
    return atom, channel


def _run_scf(numbers, positions_ang, lattice_ang, etemp_k, max_iter):
    from tblite.exceptions import TBLiteRuntimeError, TBLiteValueError

    try:
        calc = _make_calculator(numbers, positions_ang, lattice_ang)
        calc.set("save-integrals", 1)
        calc.set("temperature", float(etemp_k) * KB_HARTREE_PER_K)
        calc.set("max-iter", int(max_iter))
        res = calc.singlepoint()
        out = {
            "energies": np.asarray(res.get("orbital-energies"), dtype=float) * HARTREE_EV,
            "occupations": np.asarray(res.get("orbital-occupations"), dtype=float),
            "coefficients": np.asarray(res.get("orbital-coefficients"), dtype=float),
            "overlap": np.asarray(res.get("overlap-matrix"), dtype=float),
        }
        out["ao_atom"], out["ao_channel"] = ao_layout(calc)
    except (TBLiteRuntimeError, TBLiteValueError) as exc:
        raise XTBError(f"tblite {METHOD} failed: {exc}") from exc
    if out["energies"].ndim != 1:
        raise XTBError("tblite returned a spin-polarised result; expected spin-restricted")
    for k, v in out.items():
        if not np.all(np.isfinite(v)):
            raise XTBError(f"tblite returned non-finite {k}")
    return out


# --------------------------------------------------------------------------------------------
# analysis
def mulliken_gross(coefficients: np.ndarray, overlap: np.ndarray) -> np.ndarray:
    """Gross populations ``[ao, mo]``: ``C ⊙ (S C)``; each MO's column sums to 1."""
    return coefficients * (overlap @ coefficients)


def fermi_level(energies_ev, n_electrons: float, etemp_k: float) -> float:
    """Chemical potential (eV) of spin-restricted Fermi-Dirac filling with ``n_electrons``."""
    e = np.sort(np.asarray(energies_ev, float))
    kt = max(float(etemp_k), 1e-3) * KB_HARTREE_PER_K * HARTREE_EV

    def count(mu):
        x = np.clip((e - mu) / kt, -200.0, 200.0)
        return 2.0 * np.sum(1.0 / (1.0 + np.exp(x)))

    lo, hi = e[0] - 50 * kt - 1.0, e[-1] + 50 * kt + 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if count(mid) < n_electrons:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-9:
            break
    return 0.5 * (lo + hi)


def band_edges(energies_ev, n_electrons: float) -> tuple[float, float]:
    """(HOMO, LUMO) in eV of the aufbau filling of ``n_electrons`` (2 per orbital).

    An odd electron count leaves a half-filled orbital: HOMO = LUMO (a metal).
    """
    e = np.sort(np.asarray(energies_ev, float))
    n = int(round(n_electrons))
    k = n // 2
    if n <= 0 or k > e.size or (n % 2 == 0 and k >= e.size):
        raise XTBError(f"cannot place {n_electrons} electrons in {e.size} orbitals")
    if n % 2:
        return float(e[k]), float(e[k])
    return float(e[k - 1]), float(e[k])


def run_xtb(structure: Structure, min_length_ang: float = MIN_LENGTH_ANG, etemp_k: float = DEFAULT_ETEMP_K,
            max_atoms: int | None = MAX_SUPERCELL_ATOMS, max_ao: int | None = MAX_SUPERCELL_AO,
            max_iter: int = 250, multiplicity: tuple[int, int, int] | None = None) -> XTBResult:
    """GFN1-xTB spectrum of ``structure`` plus provenance (see the module docstring)."""
    t0 = time.perf_counter()
    if not structure.is_ordered:
        raise XTBError("structure is disordered; GFN1-xTB needs an ordered cell")
    bad = sorted({sp.symbol for sp in structure.species if not 1 <= sp.Z <= MAX_Z})
    if bad:
        raise XTBError(f"GFN1-xTB has no parameters for {', '.join(bad)} (supported: Z = 1..{MAX_Z})")
    n_atoms = len(structure)
    n_ao_cell = sum(n_ao_of_element(int(z)) for z in structure.atomic_numbers)
    mult = tuple(int(x) for x in multiplicity) if multiplicity is not None else \
        supercell_multiplicity(structure.lattice.matrix, n_atoms, min_length_ang, max_atoms, n_ao_cell, max_ao)
    ncell = math.prod(mult)
    numbers, pos, sc_lat, cell_atom = build_supercell(structure, mult)
    scf = _run_scf(numbers, pos, sc_lat, etemp_k, max_iter)
    t_scf = time.perf_counter() - t0

    energies, occ = scf["energies"], scf["occupations"]
    order = np.argsort(energies, kind="stable")
    energies, occ = energies[order], occ[order]
    coeff = scf["coefficients"][:, order]
    pop = mulliken_gross(coeff, scf["overlap"])  # [ao, mo]
    colsum = pop.sum(axis=0)
    if np.max(np.abs(colsum - 1.0)) > 1e-5:
        raise XTBError(f"Mulliken populations do not sum to 1 (max deviation {np.max(np.abs(colsum - 1)):.2e});"
                       " ill-conditioned overlap?")

    # fold AOs of the supercell onto (cell atom, channel); spin-summed states per cell
    ao_cell_atom = cell_atom[scf["ao_atom"]]
    ch = scf["ao_channel"]
    n_ao = ch.size
    proj = np.zeros((n_ao, n_atoms * N_ORBITALS))
    ok = ch >= 0
    proj[np.flatnonzero(ok), ao_cell_atom[ok] * N_ORBITALS + ch[ok]] = 1.0
    scale = 2.0 / ncell
    weights = (pop.T @ proj).reshape(-1, n_atoms, N_ORBITALS) * scale
    f_weight = np.zeros(n_atoms)
    if not np.all(ok):
        np.add.at(f_weight, ao_cell_atom[~ok], pop[~ok].sum(axis=1) * scale)

    n_el_sc = float(occ.sum())
    homo, lumo = band_edges(energies, n_el_sc)
    gap = max(lumo - homo, 0.0)
    efermi = 0.5 * (homo + lumo) if gap > GAP_THRESHOLD_EV else fermi_level(energies, n_el_sc, etemp_k)
    spectrum = Spectrum(
        energies_ev=energies, weights=weights,
        reference_ev=Spectrum.reference_from(homo, efermi, gap), efermi_ev=float(efermi),
        band_gap_ev=float(gap), f_weight=f_weight, n_electrons=n_el_sc / ncell)
    spectrum.validate(n_atoms)
    widths = perpendicular_widths(sc_lat)
    info = {
        "method": METHOD, "tblite_version": tblite_version(),
        "supercell": list(mult), "supercell_atoms": int(numbers.size), "n_ao_supercell": int(n_ao),
        "min_length_ang": float(min_length_ang), "min_width_reached_ang": round(float(widths.min()), 4),
        "max_supercell_atoms": max_atoms, "max_supercell_ao": max_ao, "etemp_k": float(etemp_k), "spin": "restricted",
        "kpoints": "gamma", "projection": "mulliken",
        "homo_ev": homo, "lumo_ev": lumo,
        "seconds_scf": round(t_scf, 3), "seconds": round(time.perf_counter() - t0, 3),
    }
    return XTBResult(spectrum, info)


def compute_spectrum(structure: Structure, min_length_ang: float = MIN_LENGTH_ANG,
                     etemp_k: float = DEFAULT_ETEMP_K, max_atoms: int | None = MAX_SUPERCELL_ATOMS,
                     max_ao: int | None = MAX_SUPERCELL_AO, **kwargs) -> Spectrum:
    """GFN1-xTB Γ-point-supercell spectrum (absolute eV, states per cell); see :func:`run_xtb`."""
    return run_xtb(structure, min_length_ang, etemp_k, max_atoms, max_ao, **kwargs).spectrum


# --------------------------------------------------------------------------------------------
# compaction
def compact(spectrum: Spectrum, grid: EnergyGrid = DEFAULT_GRID, window_pad_ev: float = DEFAULT_WINDOW_PAD_EV,
            merge_tol_ev: float = DEFAULT_MERGE_TOL_EV,
            weight_threshold: float = DEFAULT_WEIGHT_THRESHOLD) -> tuple[Spectrum, dict]:
    """Smaller spectrum with the same gridded DOS (to well within 1 %), and what was dropped.

    - states whose energy relative to the reference is more than ``window_pad_ev`` outside
      ``[grid.emin_ev, grid.emax_ev]`` are dropped; their weight per atom is summed into the
      summary (``dropped_below`` / ``dropped_above``, states per cell, one value per atom), so the
      electron count stays checkable (``n_electrons`` is kept);
    - runs of states whose neighbours are within ``merge_tol_ev`` (Γ-point supercells are highly
      degenerate) become one state at their weight-averaged energy with the summed weights;
    - weights below ``weight_threshold`` in magnitude become 0; what that removes is summed per
      atom into the summary (``cut_by_threshold``, states per cell).
    """
    e = np.asarray(spectrum.energies_ev, float)
    w = np.asarray(spectrum.weights, float)
    rel = e - spectrum.reference_ev
    lo, hi = grid.emin_ev - window_pad_ev, grid.emax_ev + window_pad_ev
    below, above = rel < lo, rel > hi
    keep = ~(below | above)
    summary = {
        "window_ev": [lo, hi], "merge_tol_ev": merge_tol_ev, "weight_threshold": weight_threshold,
        "n_states_in": int(e.size),
        "dropped_below": [round(float(x), 6) for x in w[below].sum(axis=(0, 2))],
        "dropped_above": [round(float(x), 6) for x in w[above].sum(axis=(0, 2))],
    }
    e, w = e[keep], w[keep]
    order = np.argsort(e, kind="stable")
    e, w = e[order], w[order]
    if merge_tol_ev > 0 and e.size > 1:
        group = np.empty(e.size, dtype=int)
        g, start = 0, e[0]
        for i, ei in enumerate(e):  # a group spans at most merge_tol_ev (no chaining through a band)
            if ei - start > merge_tol_ev:
                g, start = g + 1, ei
            group[i] = g
        n_groups = g + 1
        mass = np.abs(w).sum(axis=(1, 2)) + 1e-300
        e_new = np.bincount(group, weights=e * mass, minlength=n_groups) / np.bincount(group, weights=mass,
                                                                                         minlength=n_groups)
        w_new = np.zeros((n_groups,) + w.shape[1:])
        np.add.at(w_new, group, w)
        e, w = e_new, w_new
    if weight_threshold > 0:
        small = np.abs(w) < weight_threshold
        summary["cut_by_threshold"] = [round(float(x), 6) for x in np.where(small, w, 0.0).sum(axis=(0, 2))]
        w = np.where(small, 0.0, w)
    if e.size == 0:  # keep the record valid: one empty state at the reference
        e, w = np.array([spectrum.reference_ev]), np.zeros((1,) + w.shape[1:])
    summary["n_states_out"] = int(e.size)
    out = Spectrum(energies_ev=e, weights=w, reference_ev=spectrum.reference_ev, efermi_ev=spectrum.efermi_ev,
                   band_gap_ev=spectrum.band_gap_ev, f_weight=spectrum.f_weight, n_electrons=spectrum.n_electrons)
    return out, summary


def gaussian_site_dos(spectrum: Spectrum, grid: EnergyGrid = DEFAULT_GRID) -> np.ndarray:
    """(n_points, atoms, 9) Gaussian-smeared DOS relative to the reference (for checks only;
    the production gridder lives elsewhere). States are summed exactly, no cut-off."""
    x = grid.energies_ev[:, None] - (np.asarray(spectrum.energies_ev) - spectrum.reference_ev)[None, :]
    g = np.exp(-0.5 * (x / grid.sigma_ev) ** 2) / (grid.sigma_ev * math.sqrt(2 * math.pi))
    w = np.asarray(spectrum.weights, float)
    return (g @ w.reshape(w.shape[0], -1)).reshape(grid.n_points, *w.shape[1:])


def relative_l1(a: np.ndarray, b: np.ndarray) -> float:
    """Relative L1 difference ``sum|a - b| / sum|b|`` (b is the reference)."""
    return float(np.abs(a - b).sum() / max(np.abs(b).sum(), 1e-300))


def supercell_convergence(structure: Structure, min_lengths=(6.0, 8.0, 10.0, 12.0),
                          etemp_k: float = DEFAULT_ETEMP_K, grid: EnergyGrid = DEFAULT_GRID) -> list[dict]:
    """Gridded site DOS at several supercell sizes (no atom cap) against the largest one.

    Returns one row per size: min length, supercell, atoms, AOs, seconds, relative L1 to the last.
    """
    rows, dos = [], []
    for length in min_lengths:
        r = run_xtb(structure, length, etemp_k, max_atoms=None, max_ao=None)
        dos.append(gaussian_site_dos(r.spectrum, grid))
        rows.append({"min_length_ang": length, "supercell": r.info["supercell"],
                     "atoms": r.info["supercell_atoms"], "n_ao": r.info["n_ao_supercell"],
                     "seconds": r.info["seconds"], "band_gap_ev": round(r.spectrum.band_gap_ev, 3)})
    for row, d in zip(rows, dos):
        row["rel_l1_vs_largest"] = round(relative_l1(d, dos[-1]), 4)
    return rows


def single_thread_env() -> dict:
    """Environment variables that pin BLAS/OpenMP to one thread (set before tblite is loaded)."""
    return {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
