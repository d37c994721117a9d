"""PBE projected DOS of one crystal with GPAW in LCAO mode, projected by Löwdin per atom and (l, m).

This is the method behind the embedded dataset (it replaces GFN1-xTB, whose Γ-supercell DOS did
not converge and collapsed the gaps of oxides). The recipe follows the Materials Project where it
matters for comparing with MP's DOS:

- **Functional**: PBE (MP's GGA), PAW setups and double-zeta-polarised (dzp) LCAO basis sets of
  the ``gpaw-data`` package (Cs: szp(dzp), :data:`BASIS_OVERRIDES`); real-space grid points at most ``h`` = 0.25 Å apart along every lattice
  vector (:func:`gpaw_h`; GPAW's own rule from ``h`` left them up to 0.4-0.65 Å apart in
  non-orthogonal cells, which made calcite's and Bi2Te3's spectra wrong), in the Niggli cell when
  that is more orthogonal than the given one (:func:`calculation_cell`).
- **GGA+U**: Dudarev U on the d shell with MP's values for oxides and fluorides of Co, Cr, Fe, Mn,
  Mo, Ni, V and W (:data:`MP_U_EV`); none otherwise (MP applies U only there).
- **Spin**: spin-polarised, ferromagnetic start, when a transition-metal site has a partly filled
  d shell in its bond-valence oxidation state (0 < n_d < 10); start moments from MP's MAGMOM table
  (:data:`MP_MAGMOM`, default 0.6 μB), and where a d4-d7 ion could be high spin also from its
  high-spin moment, keeping the lower energy (:func:`spin_starts`: from MP's 0.6 μB, GPAW left
  rock-salt CoO a low-spin metal). Closed-shell compounds are run spin-paired (MP's spin-
  polarised runs of those converge to zero moment, so only the cost differs). Spins are summed
  into the 9 channels, as for MP records.
- **k-points**: self-consistent run on a Γ-centred mesh of density :data:`SCF_KDENSITY` (points per
  Å⁻¹, ASE's definition), then a non-self-consistent step at :data:`DOS_KDENSITY` with
  point-group symmetry off (with it on, the three p channels of O in rock salt come out unequal
  because GPAW does not rotate the projections) but time reversal on (:data:`DOS_TIME_REVERSAL`:
  k and -k have the same energies and, the LCAO basis being real, the same projected weights, so
  each pair is diagonalised once and unfolded onto the full mesh) and every LCAO band (``nbands='nao'``,
  so the spectrum reaches well past +6 eV), on an *even* Γ-centred mesh, which holds both Γ and
  the zone-boundary points where band edges usually sit: with odd meshes the VBM (the reference
  level) of SrTiO3 (at R) moved by 28 meV between densities d and 2d and shifted every site's DOS
  by as much (per-site L1 0.32).
- **DOS integration** (:data:`DOS_METHOD`): linear tetrahedra on the full mesh
  (:func:`tetrahedron_states`), as MP's ISMEAR = -5, counted per 0.01 eV bin so that flat
  semicore levels and narrow d bands keep all their states; the band weights are the
  tetrahedron's corner mean. Sampling the k-points instead (``"states"``, the first 13 records)
  left SrTiO3 unconverged at density 5 against 10 (per-site L1 0.245 on Sr, 0.131 on Ti, at
  σ = 0.1 eV); ``bench/pbe_convergence.py`` writes the check for the current recipe to
  ``pbe_checks.json`` (numbers in data_prep/README.md).
- **Projection** (:data:`PROJECTION`): Löwdin on the LCAO coefficients. For band n at k the
  weight of basis function μ is |(S^½ c_n)_μ|² (S the overlap matrix with the PAW corrections):
  never negative, and it sums to 1 over μ; zetas and polarisation functions of the same (l, m) are
  summed. Mulliken's gross populations Re[C*_nμ (C Sᵀ)_nμ] (``projection="mulliken"``, the
  records computed before 2026-12-06) also sum to 1 but go negative on electropositive cations
  with diffuse basis functions (Mg in spinel: -0.36 states of negative weight, 0.24 net in the grid),
  which left those sites' DOS unconverged in k. GPAW's PAW-projector PDOS is not used: it sums to
  1.14-1.45× the total DOS.

Weights carry k-point weight × spin degeneracy, so they count states per cell as
:class:`data_prep.records.Spectrum` requires, and the occupied weight equals the valence electron
count of the PAW setups (``n_electrons``). Energies are in eV, absolute (GPAW's zero).

GPAW is an optional dependency (the ``compute`` extra): ``make train``/``make test`` read the
committed spectra and never import this module's calculator functions.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pymatgen.core import Element, Lattice, Structure

from data_prep.layout import N_ORBITALS, ORBITAL_GROUPS
from data_prep.records import Spectrum

METHOD = "PBE (GPAW LCAO dzp)"
HARTREE_EV = 27.211386245988
GRID_SPACING_ANG = 0.25
SCF_KDENSITY = 2.0
DOS_KDENSITY = 5.0
SMEARING_EV = 0.05
BASIS = "dzp"
#: how the NSCF eigenvalues become a DOS: "tetrahedron" (linear tetrahedron interpolation of the
#: band weights on the full mesh, sampled every TETRA_STEP_EV; what MP's ISMEAR = -5 does) or
#: "states" (the discrete k-point states, broadened later by the grid's Gaussian)
DOS_METHOD = "tetrahedron"
#: the DOS step diagonalises one of each pair k, -k (no spin-orbit coupling: both have the same
#: eigenvalues and |S^½ c|² weights); tetrahedra get the pair's values at both points. Halves the
#: step's diagonalisations; the same spectra as without it up to the free mixing of degenerate
#: bands (per-site L1 1.5e-4 on MgO, tests/test_pbe.py)
DOS_TIME_REVERSAL = True
TETRA_STEP_EV = 0.01
#: how a band's weight is shared among the basis functions: "mulliken" (gross populations
#: Re[C* (C Sᵀ)], can be negative) or "lowdin" (|S^½ c|², never negative); both sum to 1 per band.
#: Löwdin, because Mulliken gave the Mg sites of spinel MgAl2O4 -0.36 states of negative weight
#: (whole spectrum) against 0.24 net inside the grid and left them, and Sr in SrTiO3, unconverged
#: in k (per-site L1 0.175 / 0.116 between DOS densities 5 and 10; Löwdin 0.033 / 0.059).
PROJECTION = "lowdin"
#: what a record's provenance says for each projection (records before 2026-12-06: Mulliken)
PROJECTION_LABELS = {"mulliken": "Mulliken on LCAO coefficients", "lowdin": "Löwdin on LCAO coefficients"}
PROJECTIONS = tuple(PROJECTION_LABELS)


#: real-space grid points per lattice vector come in multiples of this (GPAW's own choice)
GRID_MULTIPLE = 4
#: records made before the grid rule (``gpaw_h``) are outdated when GPAW's rule had left their
#: points further apart than this along a lattice vector (Å); nearer, they stay: MgO's primitive
#: cell at 0.37 Å moved by a per-site L1 of 0.03 against a 0.25 Å grid
MAX_OLD_GRID_SPACING_ANG = 0.35

#: the recipe's settings a record states in ``provenance["calculation"]`` and must share with
#: :class:`PBESettings` to be current (besides the projection); the GPAW version is recorded, not compared
RECIPE_KEYS = ("basis", "h_ang", "scf_kdensity", "dos_kdensity", "dos_method")


def outdated_recipe(provenance: dict, structure: Structure | None = None) -> str | None:
    """Why a record of this recipe (GPAW, ``provenance["calculation"]``) is outdated: relaxed before
    the symmetric relaxation (``relax.symmetrise``), projected by another scheme than
    :data:`PROJECTION`, made with another value of a :data:`RECIPE_KEYS` setting than :class:`PBESettings`, or (given the record's ``structure``) with other basis overrides than :func:`basis_for`'s, computed in another cell
    than :func:`calculation_cell`'s or on a grid coarser than :data:`MAX_OLD_GRID_SPACING_ANG`
    along a lattice vector (records before :func:`gpaw_h`); None when current, or when not a GPAW
    record at all."""
    calc = provenance.get("calculation") or {}
    if not isinstance(calc, dict) or calc.get("code") != "GPAW":
        return None
    fix = "python -m data_prep compute-embedded --method pbe recomputes it"
    relaxation = provenance.get("relaxation")
    if isinstance(relaxation, dict) and "symmetry" not in relaxation:
        return ("relaxed without the symmetric relaxation beside the free one (the 0.02 Å rattle stayed in "
                f"and the cell had no symmetry; now relax.symmetrise): {fix}")
    symmetry = relaxation.get("symmetry") if isinstance(relaxation, dict) else None
    if (isinstance(symmetry, dict) and symmetry.get("kept") == "free relaxation, symmetrised"
            and "tolerances_tried" not in symmetry):
        return ("a relaxation that broke the start's symmetry was symmetrised at 0.01 Å only (most came out P1; "
                f"now the largest of relax.SYMPREC_TRIES_ANG that keeps the energy gain): {fix}")
    if calc.get("projection") != PROJECTION_LABELS[PROJECTION]:
        return (f"DOS projected by an outdated scheme ({calc.get('projection')!r}, the recipe now uses "
                f"{PROJECTION_LABELS[PROJECTION]!r}): {fix}")
    current = PBESettings().as_dict()
    changed = [f"{k} {calc[k]!r} (now {current[k]!r})" for k in RECIPE_KEYS if k in calc and calc[k] != current[k]]
    if changed:
        return f"made with outdated settings: {', '.join(changed)}: {fix}"
    if structure is not None and calc.get("basis_overrides", {}) != basis_for(structure)[1]:
        return (f"made with the basis overrides {calc.get('basis_overrides', {})} (now {basis_for(structure)[1]}: "
                f"pbe.BASIS_OVERRIDES): {fix}")
    if structure is not None and not calc.get("niggli_reduced") and calculation_cell(structure)[1]:
        angles = ", ".join(f"{a:.0f}" for a in structure.lattice.angles)
        return f"computed in a cell with angles {angles}°, not in its more orthogonal Niggli cell: {fix}"
    valences = provenance.get("bv_valences")
    if (structure is not None and calc.get("spin_polarised") and "spin_starts" not in calc and valences is not None
            and len(valences) == len(structure) and len(spin_starts(structure, valences)) > 1):
        return f"spin-polarised from MP's start moments only (now also from high spin, pbe.spin_starts): {fix}"
    if structure is not None and "h_gpaw_ang" not in calc:
        cell = structure.get_reduced_structure() if calc.get("niggli_reduced") else structure
        spacing = gpaw_h_grid_spacing(cell.lattice.matrix, calc.get("h_ang", GRID_SPACING_ANG))
        if spacing > MAX_OLD_GRID_SPACING_ANG:
            return (f"real-space grid points {spacing:.2f} Å apart along a lattice vector (GPAW's rule from h; "
                    f"now at most {GRID_SPACING_ANG} Å, pbe.gpaw_h): {fix}")
    return None


#: MP's U values (eV, Dudarev) for oxides and fluorides (pymatgen MPRelaxSet / MPScanRelaxSet GGA+U).
MP_U_EV = {"Co": 3.32, "Cr": 3.7, "Fe": 5.3, "Mn": 3.9, "Mo": 4.38, "Ni": 6.2, "V": 3.25, "W": 6.2}
MP_U_ANIONS = frozenset({"O", "F"})
#: MP's initial magnetic moments (μB) by element; other elements start at MP_MAGMOM_DEFAULT.
MP_MAGMOM = {"Co": 0.6, "Cr": 5.0, "Fe": 5.0, "Mn": 5.0, "Mo": 5.0, "Ni": 5.0, "V": 5.0, "W": 5.0}
MP_MAGMOM_DEFAULT = 0.6
#: the largest start moment GPAW 26.7's neutral-atom guess can place in the dzp basis (measured with
#: ``Setup.calculate_initial_occupation_numbers``: Fe 8 s+d electrons, at most 6 of one spin; Co
#: likewise 3; Ni, Mn, Cr, V, Mo, W take 6 or more, above MP's values)
ATOM_START_MAX_MAGMOM = {"Fe": 4.0, "Co": 3.0}

#: channel offset of each l in layout.ORBITALS (s; py pz px; dxy dyz dz2 dxz dx2). GPAW's real
#: spherical harmonics come in the same m order (p: y, z, x; d: xy, yz, 3z²-r², zx, x²-y²).
_L_OFFSET = {0: 0, 1: 1, 2: 4}


#: how records are compacted (``xtb.compact``): a k-mesh gives ~10^4 states; merging runs of states
#: within 0.02 eV (a fifth of the 0.1 eV smearing) changes the gridded DOS by well under 1 %
COMPACT = {"merge_tol_ev": 0.02, "weight_threshold": 1e-4}


#: a record is refused when a band's projected weights miss 1 by more than this, or when the
#: occupied weight misses the electron count by more than the other (the committed records: 3e-8, 6e-9)
MAX_BAND_WEIGHT_ERROR = 1e-4
MAX_ELECTRON_COUNT_ERROR = 1e-3


class PBEError(RuntimeError):
    """The calculation cannot run or did not give a usable spectrum (message says why)."""


#: elements that take another basis than :data:`BASIS` (derived from the same dzp file). Cs's
#: dzp basis leaves the LCAO overlap matrix S(k) numerically singular in dense packings: GPAW
#: 26.7 on the real CsCl (CsCl cell, SCF mesh, 36 k-points) gave a smallest eigenvalue of
#: -3.0e-6 (7 k-points below 1e-6) and its Cholesky step failed, as for CsF in the CsCl cell,
#: CsBr in the KBr cell and CsOH, while rock-salt CsCl passed at 5.7e-6; with szp(dzp) on Cs
#: alone the minimum is 2.2e-5. Other elements sit near 1e-6 too (SrTiO3 4.9e-7, BaO 2.4e-6)
#: and pass: the Löwdin weights use S^(1/2), which amplifies nothing.
BASIS_OVERRIDES = {"Cs": "szp(dzp)"}


@dataclass
class PBESettings:
    h_ang: float = GRID_SPACING_ANG
    scf_kdensity: float = SCF_KDENSITY
    dos_kdensity: float = DOS_KDENSITY
    smearing_ev: float = SMEARING_EV
    basis: str = BASIS
    basis_overrides: dict = field(default_factory=lambda: dict(BASIS_OVERRIDES))
    max_scf_iter: int = 300
    dos_method: str = DOS_METHOD
    projection: str = PROJECTION
    time_reversal: bool = DOS_TIME_REVERSAL

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PBEResult:
    spectrum: Spectrum
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# what GPAW can do (no calculator needed)
def basis_for(structure: Structure, settings: PBESettings | None = None) -> tuple[str | dict, dict]:
    """(GPAW's ``basis`` argument for ``structure``, the overrides it uses: {element: basis}):
    ``settings.basis`` for every element but those of ``settings.basis_overrides`` present."""
    settings = settings or PBESettings()
    present = {e.symbol for e in structure.composition.elements}
    used = {el: b for el, b in sorted(settings.basis_overrides.items()) if el in present}
    return ({"default": settings.basis, **used} if used else settings.basis), used


def setups_dir() -> Path | None:
    """Folder of the PAW setups of the ``gpaw-data`` package (None if it is not installed)."""
    try:
        import gpaw_data  # noqa: F401
    except ImportError:
        return None
    d = Path(gpaw_data.__file__).parent / "setups"
    return d if d.is_dir() else None


def available_elements() -> frozenset[str]:
    """Elements with both a PBE PAW setup and a dzp basis in ``gpaw-data``."""
    d = setups_dir()
    if d is None:
        return frozenset()
    names = {p.name for p in d.iterdir()}
    out = set()
    for el in Element:
        sym = el.symbol
        if f"{sym}.PBE.gz" in names and any(n.startswith(f"{sym}.") and n.endswith(f"{BASIS}.basis.gz")
                                            for n in names):
            out.add(sym)
    return frozenset(out)


def n_d_electrons(element: str, valence: int) -> int | None:
    """d-electron count of a transition-metal ion (group - oxidation state), None otherwise."""
    el = Element(element)
    if not el.is_transition_metal or el.is_lanthanoid or el.is_actinoid:
        return None
    group = el.group
    if group is None or not 3 <= group <= 12:
        return None
    return group - int(valence)


def spin_polarised(structure: Structure, valences: list[int] | None) -> bool:
    """True when a site is an open-shell d ion (0 < n_d < 10) in its bond-valence state."""
    if valences is None:
        return any(s.specie.symbol in MP_MAGMOM for s in structure)
    for site, v in zip(structure, valences):
        nd = n_d_electrons(site.specie.symbol, v)
        if nd is not None and 0 < nd < 10:
            return True
    return False


def initial_magmoms(structure: Structure, valences: list[int] | None = None) -> list[float]:
    """MP's start moments, capped at the high-spin moment of each d ion in its bond-valence state
    and at what GPAW's neutral-atom start can hold (``ATOM_START_MAX_MAGMOM``): MP's 5 μB on Fe
    leaves GPAW no way to place the atom's electrons in its basis ('Bad basis for Fe' in FeO, Fe2+,
    and in chalcopyrite FeCuS2, Fe3+); closed d shells keep MP's default. Only the start changes:
    the SCF finds the moment."""
    out = []
    for i, site in enumerate(structure):
        el = site.specie.symbol
        m = MP_MAGMOM.get(el, MP_MAGMOM_DEFAULT)
        nd = n_d_electrons(el, valences[i]) if valences is not None else None
        if nd is not None and 0 <= nd <= 10:
            m = min(m, max(float(min(nd, 10 - nd)), MP_MAGMOM_DEFAULT))
        m = min(m, ATOM_START_MAX_MAGMOM.get(el, m))
        out.append(m)
    return out


#: d-electron counts with a low- and a high-spin state in an octahedral field
SPIN_STATE_D_COUNTS = frozenset({4, 5, 6, 7})


def high_spin_magmoms(structure: Structure, valences: list[int]) -> list[float]:
    """Start moments at the high-spin moment, min(n_d, 10 - n_d) μB, of each d ion with a spin-state
    choice in its bond-valence state (d4-d7, :data:`SPIN_STATE_D_COUNTS`; within
    ``ATOM_START_MAX_MAGMOM``); other sites as :func:`initial_magmoms`."""
    out = initial_magmoms(structure, valences)
    for i, (site, v) in enumerate(zip(structure, valences)):
        el = site.specie.symbol
        nd = n_d_electrons(el, v)
        if nd in SPIN_STATE_D_COUNTS:
            out[i] = min(float(min(nd, 10 - nd)), ATOM_START_MAX_MAGMOM.get(el, 10.0))
    return out


def spin_starts(structure: Structure, valences: list[int] | None) -> list[list[float]]:
    """The start moments the SCF runs from (the lower energy wins): MP's (:func:`initial_magmoms`),
    and the high-spin one (:func:`high_spin_magmoms`) where that differs. MP starts Co at 0.6 μB;
    VASP leaves that low-spin start where high spin is lower, GPAW does not: rock-salt CoO stayed
    a 1 μB metal, 0.18 eV per cell above the high-spin state (3 μB) a 3 μB start reaches. LiCoO2,
    whose Co3+ is low spin, keeps the low-spin result on energy (0.78 eV per cell below the 4 μB
    state the high-spin start ends in; gap 2.59 eV, nonmagnetic, as MP)."""
    mp = initial_magmoms(structure, valences)
    if valences is None:
        return [mp]
    hs = high_spin_magmoms(structure, valences)
    return [mp] if np.allclose(hs, mp) else [mp, hs]


def hubbard_u(structure: Structure) -> dict[str, float]:
    """{element: U_eV} as MP applies it: only in oxides and fluorides, only for MP_U_EV elements."""
    elements = {e.symbol for e in structure.composition.elements}
    if not elements & MP_U_ANIONS:
        return {}
    return {e: MP_U_EV[e] for e in sorted(elements) if e in MP_U_EV}


def gpaw_version() -> str:
    try:
        import gpaw
        return gpaw.__version__
    except ImportError:
        return "not installed"


# --------------------------------------------------------------------------------------------
# the calculation
def _basis_channels(setups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(atom_M, channel_M, is_f_M) for the LCAO basis functions M of the calculation."""
    atom, chan, is_f = [], [], []
    for a, setup in enumerate(setups):
        for l in (bf.l for bf in setup.basis_functions_J):
            for m in range(2 * l + 1):
                atom.append(a)
                if l in _L_OFFSET:
                    chan.append(_L_OFFSET[l] + m)
                    is_f.append(False)
                else:
                    chan.append(0)
                    is_f.append(True)
    return np.array(atom), np.array(chan), np.array(is_f)


def mulliken_weights(C_nM: np.ndarray, S_MM: np.ndarray) -> np.ndarray:
    """(n_bands, n_basis) Mulliken gross weights Re[C* (C Sᵀ)]; each row sums to the band's norm (1)."""
    return (C_nM.conj() * (C_nM @ S_MM.T)).real


def lowdin_weights(C_nM: np.ndarray, S_MM: np.ndarray) -> np.ndarray:
    """(n_bands, n_basis) Löwdin weights |S^½ c_n|²: the band's coefficients on the symmetrically
    orthogonalised basis, squared. Never negative; each row sums to c_n† S c_n, the band's norm (1)."""
    lam, U = np.linalg.eigh(S_MM)
    if lam.min() <= 0:
        raise PBEError(f"overlap matrix not positive definite (smallest eigenvalue {lam.min():.2e})")
    s_half = (U * np.sqrt(lam)) @ U.conj().T
    return np.abs(C_nM @ s_half.T) ** 2


def band_weights(C_nM: np.ndarray, S_MM: np.ndarray, projection: str = PROJECTION) -> np.ndarray:
    """(n_bands, n_basis) weights of each band on each basis function by ``projection``."""
    if projection == "mulliken":
        return mulliken_weights(C_nM, S_MM)
    if projection == "lowdin":
        return lowdin_weights(C_nM, S_MM)
    raise PBEError(f"unknown projection {projection!r} ({' or '.join(PROJECTIONS)})")


def _mesh(atoms, density: float, even: bool = False) -> list[int]:
    """Monkhorst-Pack size of a k-point density (points per Å⁻¹), as ASE computes it for GPAW."""
    from ase.calculators.calculator import kptdensity2monkhorstpack

    return [int(x) for x in kptdensity2monkhorstpack(atoms, density, even=even)]


def gpaw_h_grid_spacing(cell, h: float = GRID_SPACING_ANG) -> float:
    """The largest point spacing along a lattice vector (Å) that GPAW's rule from ``h`` gives
    (``gpaw.utilities.h2gpts``: the distance between lattice planes over ``h``, rounded to a
    multiple of 4; GPAW may add points to fit the symmetry, never remove them)."""
    cell = np.asarray(cell, float)
    planes = (np.linalg.inv(cell) ** 2).sum(0) ** -0.5
    m = GRID_MULTIPLE
    n = np.maximum(m, (planes / h / m + 0.5).astype(int) * m)
    return float((np.linalg.norm(cell, axis=1) / n).max())


def gpaw_h(cell, h: float = GRID_SPACING_ANG) -> float:
    """The ``h`` to give GPAW so that its grid points lie at most ``h`` apart along every lattice vector.

    GPAW's rule divides the distance between lattice planes instead of the vector's length and
    rounds to the nearest multiple of 4: in a non-orthogonal cell the points then lie further apart
    than ``h`` along the vectors, 0.37 Å in MgO's primitive cell, 0.40 in calcite's (46°) and
    0.53-0.65 in the rhombohedral cells of MoS2, Bi2Te3 or LiCoO2 (24-33°), whose spectra were
    wrong. The ``h`` returned is smaller (MgO's primitive cell: 12 points per vector instead of 8,
    gap 4.62 eV instead of 4.84); passing ``h`` rather than fixed grid sizes lets GPAW still fit
    the grid to the crystal's symmetry."""
    cell = np.asarray(cell, float)
    planes = (np.linalg.inv(cell) ** 2).sum(0) ** -0.5
    hh = h * float((planes / np.linalg.norm(cell, axis=1)).min())
    while gpaw_h_grid_spacing(cell, hh) > h + 1e-9:
        hh *= 0.98
    return hh


#: The SCF drops point-group symmetry when keeping it would enlarge the real-space grid by more than
#: this factor (:func:`grid_points`): GPAW makes axes that a symmetry operation relates equally fine, so
#: in a Niggli cell of a rhombohedral crystal (3.0, 3.0, 24.3 Å for R-3m Zn3Ni7O10) the 12 x 12 x 112
#: points of the recipe became 112³, 87 times as many, and the run timed out.
MAX_GRID_INFLATION = 1.5


def grid_points(atoms, h_gpaw: float, magmoms=None, symmorphic: bool = True) -> tuple[int, int]:
    """(points of the real-space grid ``h_gpaw`` gives, points of the grid GPAW makes of it to fit
    the crystal's symmetry: its point operations, or with ``symmorphic`` False also those with
    fractional translations), by GPAW's own rules (``gpaw.utilities.gpts``)."""
    import warnings
    from types import SimpleNamespace

    from ase.units import Bohr
    from gpaw.new.symmetry import create_symmetries_object
    from gpaw.utilities.gpts import get_number_of_grid_points

    cell = atoms.cell.complete() / Bohr
    mode = SimpleNamespace(name="lcao", ecut=None)
    plain = get_number_of_grid_points(cell, h_gpaw / Bohr, mode, True, None)
    with warnings.catch_warnings():  # "inconsistent with symmetries" / "using symmetrized grid": the point here
        warnings.simplefilter("ignore")
        sym = create_symmetries_object(atoms, magmoms=magmoms, symmorphic=symmorphic)
        fitted = get_number_of_grid_points(cell, h_gpaw / Bohr, mode, True, sym)
    return int(np.prod(plain)), int(np.prod(fitted))


def scf_symmetry(atoms, h_gpaw: float, magmoms=None) -> tuple[dict, int, int]:
    """GPAW's ``symmetry`` keyword for the SCF: every space-group operation (fractional translations
    too: CoO in the BeO-beta framework, P4_2/mnm, 16 operations instead of GPAW's default 8, SCF
    67 instead of 85 CPU-s, the same energy to 1e-11 eV) unless fitting the grid to them enlarges it
    by more than :data:`MAX_GRID_INFLATION`, then the point operations alone, then none (time reversal
    kept); with the grid sizes (recipe's, fitted to the last symmetry tried)."""
    n_fitted = 0
    for kw in ({"symmorphic": False}, {"symmorphic": True}):
        n_plain, n_fitted = grid_points(atoms, h_gpaw, magmoms, symmorphic=kw["symmorphic"])
        if n_fitted <= MAX_GRID_INFLATION * n_plain:
            return kw, n_plain, n_fitted
    return {"point_group": False, "time_reversal": True}, n_plain, n_fitted


def _scf(structure: Structure, valences: list[int] | None, settings: PBESettings, txt: str | None):
    """Self-consistent PBE(+U) run: (calculator, atoms, info) or PBEError."""
    try:
        from gpaw import GPAW
        from pymatgen.io.ase import AseAtomsAdaptor
    except ImportError as exc:
        raise PBEError(f"GPAW is not installed ({exc}); install the 'compute' extra (see data_prep/README.md)")
    missing = sorted({e.symbol for e in structure.composition.elements} - available_elements())
    if missing:
        raise PBEError(f"no GPAW PAW setup or {settings.basis} basis for {', '.join(missing)}")
    t0 = time.perf_counter()
    spin = spin_polarised(structure, valences)
    starts = spin_starts(structure, valences) if spin else [None]
    u = hubbard_u(structure)
    setups = {el: f":d,{val}" for el, val in u.items()} or "paw"
    occupations = {"name": "fermi-dirac", "width": settings.smearing_ev}
    runs, errors = [], []
    for start in starts:  # one SCF per start; the lowest energy wins
        atoms = AseAtomsAdaptor.get_atoms(structure)
        if start is not None:
            atoms.set_initial_magnetic_moments(start)
        h_gpaw = gpaw_h(atoms.cell[:], settings.h_ang)
        symmetry, n_plain, n_fitted = scf_symmetry(atoms, h_gpaw, start)  # per start: the moments can break it
        sym_info = {"scf_symmorphic_only": bool(symmetry.get("symmorphic", True))}
        if not symmetry.get("point_group", True):  # see MAX_GRID_INFLATION
            sym_info.update(scf_point_group=False, grid_points=n_plain, grid_points_with_point_group=n_fitted)
        calc = GPAW(mode="lcao", basis=basis_for(structure, settings)[0], xc="PBE", h=h_gpaw, setups=setups,
                    kpts={"density": settings.scf_kdensity, "gamma": True}, occupations=occupations,
                    spinpol=spin, maxiter=settings.max_scf_iter, txt=txt or os.devnull,
                    symmetry=symmetry)
        atoms.calc = calc
        try:
            runs.append((float(atoms.get_potential_energy()), calc, atoms, start, sym_info))
        except Exception as exc:  # SCF not converged and friends
            errors.append(f"{type(exc).__name__}: {exc}")
    if not runs:
        raise PBEError(f"SCF failed: {'; '.join(errors)}")
    energy, calc, atoms, start, sym_info = min(runs, key=lambda r: r[0])
    info = {"spin_polarised": spin, "hubbard_u_ev": u, "energy_ev": energy, "h_gpaw_ang": round(h_gpaw, 5),
            "grid_spacing_max_ang": round(gpaw_h_grid_spacing(atoms.cell[:], h_gpaw), 4),
            "magmom_total": float(calc.get_magnetic_moment()) if spin else 0.0,
            "kpts_scf": _mesh(atoms, settings.scf_kdensity), "seconds_scf": round(time.perf_counter() - t0, 2),
            **sym_info}
    if spin:
        info["spin_starts"] = [{"start_magmoms": s_, "energy_ev": round(e_, 5), "magmom_total": round(float(c_.get_magnetic_moment()), 4)}
                               for e_, c_, _, s_, _ in runs]
        info["spin_start_failures"] = errors
    return calc, atoms, info


def fermi_dirac(e_ev: np.ndarray, mu_ev: float, width_ev: float) -> np.ndarray:
    """Occupation (0-1) of levels ``e_ev`` at chemical potential ``mu_ev`` and Fermi-Dirac width."""
    return 0.5 * (1.0 - np.tanh(0.5 * (np.asarray(e_ev, float) - mu_ev) / width_ev))


def fermi_level(eigs: list, weights: list, n_electrons: float, width_ev: float) -> float:
    """Chemical potential (eV) at which levels ``eigs[i]`` (one array per k-point and spin, each
    level holding ``weights[i]`` electrons when full) hold ``n_electrons`` with Fermi-Dirac
    smearing ``width_ev``; bisection to 1e-9 eV."""
    e = np.concatenate([np.asarray(x, float) for x in eigs])
    w = np.concatenate([np.full(len(x), float(wt)) for x, wt in zip(eigs, weights)])
    if not 0 < n_electrons < w.sum():
        raise PBEError(f"cannot place {n_electrons:g} electrons in {w.sum():g} states")
    lo, hi = e.min() - 50 * width_ev, e.max() + 50 * width_ev
    while hi - lo > 1e-9:
        mid = 0.5 * (lo + hi)
        if (w * fermi_dirac(e, mid, width_ev)).sum() < n_electrons:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _mesh_index(kpt_kc: np.ndarray, size: list[int]) -> np.ndarray:
    """(K, 3) integer position of each full-mesh k-point in the (n1, n2, n3) Monkhorst-Pack array."""
    n = np.asarray(size)
    idx = np.rint(np.asarray(kpt_kc) * n).astype(int) % n
    flat = np.ravel_multi_index(idx.T, n)
    if np.unique(flat).size != flat.size or flat.size != int(np.prod(n)):
        raise PBEError(f"k-points do not form the full {size} mesh (symmetry reduction?)")
    return idx


#: the corners (cube offsets) of the 6 tetrahedra around the cube diagonal from (0,0,0) to (1,1,1):
#: one per order in which the three axes are stepped
_TETRA_PATHS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


def _tetrahedra(cell: np.ndarray, size) -> np.ndarray:
    """(6, 4, 3) integer corner offsets of the 6 tetrahedra of a mesh cube, split along its
    shortest main diagonal in reciprocal space (Blöchl et al., PRB 49, 16223 (1994))."""
    recip = np.linalg.inv(np.asarray(cell, float)).T / np.asarray(size)[:, None]  # rows: mesh steps
    starts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    lengths = [np.linalg.norm((1 - 2 * p) @ recip) for p in starts]
    p = starts[int(np.argmin(lengths))]
    out = []
    for path in _TETRA_PATHS:
        corner = p.copy()
        corners = [corner.copy()]
        for axis in path:
            corner[axis] = 1 - corner[axis]
            corners.append(corner.copy())
        out.append(corners)
    return np.array(out)


def _cumulative_states(e: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Fraction (0-1) of a tetrahedron's states below ``x``; ``e`` (..., 4) sorted, strictly rising."""
    e0, e1, e2, e3 = (e[..., i] for i in range(4))
    out = np.where(x >= e3, 1.0, 0.0)
    r1 = (x > e0) & (x <= e1)
    r2 = (x > e1) & (x <= e2)
    r3 = (x > e2) & (x < e3)
    with np.errstate(all="ignore"):
        n1 = (x - e0) ** 3 / ((e1 - e0) * (e2 - e0) * (e3 - e0))
        d = x - e1
        n2 = ((e1 - e0) ** 2 + 3 * (e1 - e0) * d + 3 * d ** 2
              - ((e2 - e0) + (e3 - e1)) * d ** 3 / ((e2 - e1) * (e3 - e1))) / ((e2 - e0) * (e3 - e0))
        n3 = 1.0 - (e3 - x) ** 3 / ((e3 - e0) * (e3 - e1) * (e3 - e2))
    out = np.where(r1, n1, out)
    out = np.where(r2, n2, out)
    out = np.where(r3, n3, out)
    return np.clip(out, 0.0, 1.0)


def _corner_states(e: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(..., 4) share of each corner in a tetrahedron's states below ``x`` when a quantity varies
    linearly inside it (``e`` (..., 4) sorted, strictly rising): Σ_i w_i c_i(x) is the integral of
    w over the occupied part, and Σ_i c_i(x) equals ``_cumulative_states``. Regions 1 and 3 follow
    from the small tetrahedron at corner 0 (occupied) or 3 (empty): its volume times the mean of
    its corner values; region 2 is Blöchl et al., PRB 49, 16223 (1994), appendix B, written with no
    division by e1 - e0 or e3 - e2 (which may be a rounding-size bump)."""
    e0, e1, e2, e3 = (e[..., i] for i in range(4))
    out = np.where((x >= e3)[..., None], 0.25, 0.0) * np.ones(e.shape)
    r1 = (x > e0) & (x <= e1)
    r2 = (x > e1) & (x <= e2)
    r3 = (x > e2) & (x < e3)
    with np.errstate(all="ignore"):
        t1, t2, t3 = (x - e0) / (e1 - e0), (x - e0) / (e2 - e0), (x - e0) / (e3 - e0)
        v = t1 * t2 * t3
        c1 = np.stack([v * (1 - (t1 + t2 + t3) / 4), v * t1 / 4, v * t2 / 4, v * t3 / 4], axis=-1)
        s0, s1, s2 = (e3 - x) / (e3 - e0), (e3 - x) / (e3 - e1), (e3 - x) / (e3 - e2)
        u = s0 * s1 * s2
        c3 = np.stack([0.25 - u * s0 / 4, 0.25 - u * s1 / 4, 0.25 - u * s2 / 4,
                       0.25 - u * (1 - (s0 + s1 + s2) / 4)], axis=-1)
        d0, d1 = x - e0, x - e1
        k1 = d0 ** 2 / (4 * (e3 - e0) * (e2 - e0))
        k2 = d0 * d1 * (e2 - x) / (4 * (e2 - e1) * (e2 - e0) * (e3 - e0))
        k3 = d1 ** 2 * (e3 - x) / (4 * (e2 - e1) * (e3 - e1) * (e3 - e0))
        c2 = np.stack([k1 + (k1 + k2) * (e2 - x) / (e2 - e0) + (k1 + k2 + k3) * (e3 - x) / (e3 - e0),
                       k1 + k2 + k3 + (k2 + k3) * (e2 - x) / (e2 - e1) + k3 * (e3 - x) / (e3 - e1),
                       (k1 + k2) * d0 / (e2 - e0) + (k2 + k3) * d1 / (e2 - e1),
                       (k1 + k2 + k3) * d0 / (e3 - e0) + k3 * d1 / (e3 - e1)], axis=-1)
    out = np.where(r1[..., None], c1, out)
    out = np.where(r2[..., None], c2, out)
    out = np.where(r3[..., None], c3, out)
    return np.clip(out, 0.0, 0.25)


def tetrahedron_states(cell: np.ndarray, size: list[int], kpt_kc: np.ndarray, eig_kn: np.ndarray,
                       w_knc: np.ndarray, energies_ev: np.ndarray, max_items: int = 4_000_000,
                       weights: str = "mean") -> np.ndarray:
    """(len(energies), C) projected DOS per eV by the linear tetrahedron method on the full mesh.

    ``eig_kn`` (K, bands) in eV and ``w_knc`` (K, bands, C) channel weights per band (spin degeneracy
    included, no k-point weight); ``energies_ev`` a uniform grid whose points are the centres of bins
    of one step. Each tetrahedron's states are counted per bin from the analytic integrated DOS of
    its linear band (differences at the bin edges), so every state is kept however flat its band
    (a semicore level, a narrow d band) and the DOS integrates exactly to the mean weight over k of
    the bands inside the grid. A channel's weight is the tetrahedron's corner mean, constant inside
    it (``weights="mean"``, every record), or varies linearly between its corner values
    (``"linear"``: each corner's share of the states in a bin from ``_corner_states``; exact for a
    weight linear in the band energy). Measured on SrTiO3 (10³ vs 18³ mesh, per-site L1 at 0.1 eV):
    the two agree to 0.03 on 10³ and 0.01 on 18³, and linear weights leave the mesh convergence as
    it was (Sr 0.1156 vs 0.1155; Ti, O 0.040-0.046 either way), so the records keep the corner
    mean. The integration MP's ISMEAR = -5 does (there with Blöchl's corrections).
    """
    if weights not in ("linear", "mean"):
        raise PBEError(f"tetrahedron weights must be 'linear' or 'mean', not {weights!r}")
    linear = weights == "linear"
    from scipy.sparse import coo_matrix

    energies_ev = np.asarray(energies_ev, float)
    step = float(energies_ev[1] - energies_ev[0])
    n_bins = energies_ev.size
    edge0 = energies_ev[0] - 0.5 * step
    n = np.asarray(size)
    idx = _mesh_index(kpt_kc, size)
    eigs = np.zeros(tuple(size) + eig_kn.shape[1:])
    w = np.zeros(tuple(size) + w_knc.shape[1:])
    eigs[idx[:, 0], idx[:, 1], idx[:, 2]] = eig_kn
    w[idx[:, 0], idx[:, 1], idx[:, 2]] = w_knc
    origins = np.indices(size).reshape(3, -1).T  # (K, 3) every cube of the periodic mesh
    n_k, n_bands, n_ch = origins.shape[0], eig_kn.shape[1], w_knc.shape[2]
    tets = _tetrahedra(cell, size)
    dos = np.zeros((n_bins, n_ch))
    v = 1.0 / (6 * n_k)  # volume fraction of one tetrahedron
    chunk = max(1, max_items // (6 * n_k * max(1, n_ch) * (4 if linear else 1)))  # bands per pass (bounded memory)
    bump = np.arange(4) * 1e-9  # breaks exact degeneracies (eV); far below any bin
    for b0 in range(0, n_bands, chunk):
        bands = slice(b0, min(n_bands, b0 + chunk))
        e_list, w_list = [], []
        for t in tets:
            c = (origins[:, None, :] + t[None, :, :]) % n  # (K, 4, 3)
            e_list.append(eigs[c[..., 0], c[..., 1], c[..., 2], bands])  # (K, 4, nb)
            wc = w[c[..., 0], c[..., 1], c[..., 2], bands]  # (K, 4, nb, C)
            w_list.append(wc.transpose(0, 2, 1, 3) if linear else wc.mean(axis=1))  # (K, nb, 4, C) | (K, nb, C)
        e = np.concatenate(e_list).transpose(0, 2, 1).reshape(-1, 4)  # (items, 4)
        if linear:
            wm = np.concatenate(w_list).reshape(-1, 4, n_ch)  # (items, 4 corners, C), then in energy order
            order = np.argsort(e, axis=1, kind="stable")
            wm = np.take_along_axis(wm, order[:, :, None], axis=1)
            e = np.take_along_axis(e, order, axis=1) + bump
        else:
            wm = np.concatenate(w_list).reshape(-1, n_ch)  # (items, C)
            e = np.sort(e, axis=1) + bump
        lo = np.floor((e[:, 0] - edge0) / step).astype(np.int64)
        hi = np.floor((e[:, 3] - edge0) / step).astype(np.int64)
        keep = (hi >= 0) & (lo < n_bins)
        e, wm, lo, hi = e[keep], wm[keep], lo[keep], hi[keep]
        items = np.arange(len(e))
        count = _corner_states if linear else _cumulative_states  # (items, 4) or (items,)
        rows, cols, vals = [], [], []
        prev = count(e, edge0 + lo * step)
        for j in range(int((hi - lo).max(initial=-1)) + 1):
            live = lo + j <= hi
            if not live.any():
                break
            x = edge0 + (lo + j + 1) * step
            cur = count(e, x)
            b = lo + j
            ok = live & (b >= 0) & (b < n_bins)
            rows.append(b[ok])
            cols.append(items[ok])
            vals.append((cur - prev)[ok])
            prev = cur
        if rows:
            r, c_, val = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals) * v
            if linear:
                for i in range(4):
                    dos += coo_matrix((val[:, i], (r, c_)), shape=(n_bins, len(e))).tocsr() @ wm[:, i, :]
            else:
                dos += coo_matrix((val, (r, c_)), shape=(n_bins, len(e))).tocsr() @ wm
    return dos / step


def _nscf_spectrum(calc, atoms, structure: Structure, density: float, dos_method: str,
                   window_ev: tuple[float, float], txt: str | None, smearing_ev: float = SMEARING_EV,
                   projection: str = PROJECTION, time_reversal: bool = DOS_TIME_REVERSAL):
    """Non-self-consistent DOS on an even Γ-centred mesh: (Spectrum, info)."""
    t0 = time.perf_counter()
    size = _mesh(atoms, density, even=True)
    symmetry = {"point_group": False, "time_reversal": True} if time_reversal else "off"
    nscf = calc.fixed_density(kpts={"density": density, "gamma": True, "even": True}, symmetry=symmetry,
                              nbands="nao", txt=txt or os.devnull)
    ibz = nscf.dft.ibzwfs
    n_electrons = float(nscf.get_number_of_electrons())
    efermi_scf_ev = float(ibz.fermi_level) * HARTREE_EV
    homo, lumo = (float(x) * HARTREE_EV for x in ibz.get_homo_lumo())
    gap_ev = max(0.0, lumo - homo)
    if not math.isfinite(gap_ev):
        raise PBEError("band gap is not finite")
    # the Fermi level of the DOS mesh itself: the SCF's, kept by GPAW's fixed-density step, puts
    # the wrong number of electrons below it on another mesh (a metal, CuTe: 33.1 of 34)
    efermi_ev = fermi_level([np.asarray(w.eig_n) * HARTREE_EV for w in ibz._wfs_u],  # noqa: SLF001
                            [float(w.weight) * float(w.spin_degeneracy) for w in ibz._wfs_u],  # noqa: SLF001
                            n_electrons, smearing_ev)
    ref_ev = Spectrum.reference_from(homo, efermi_ev, gap_ev)

    atom_M, chan_M, f_M = _basis_channels(nscf.dft.setups)
    n_atoms = len(structure)
    to_atom = np.zeros((atom_M.size, n_atoms))
    to_atom[np.arange(atom_M.size), atom_M] = 1.0
    to_chan = np.zeros((atom_M.size, n_atoms * N_ORBITALS))  # basis function -> (atom, orbital) channel
    nf = ~f_M
    to_chan[np.nonzero(nf)[0], atom_M[nf] * N_ORBITALS + chan_M[nf]] = 1.0
    lo, hi = ref_ev + window_ev[0], ref_ev + window_ev[1]
    per_spin: dict[int, dict[str, list]] = {}
    f_weight = np.zeros(n_atoms)
    outside = np.zeros(n_atoms)
    occupied = 0.0
    worst_sum = 0.0  # largest |sum of a band's weights - 1| (channels + f vs the total DOS)
    for wfs in ibz._wfs_u:  # noqa: SLF001 - GPAW's per-(k, spin) LCAO wave functions
        eig_ev = np.asarray(wfs.eig_n) * HARTREE_EV
        kw = float(wfs.weight) * float(wfs.spin_degeneracy)
        occupied += kw * float(np.sum(fermi_dirac(eig_ev, efermi_ev, smearing_ev)))
        q = band_weights(np.asarray(wfs.C_nM.data), np.asarray(wfs.S_MM.data), projection)  # (n, M), rows sum to 1
        worst_sum = max(worst_sum, float(np.abs(q.sum(axis=1) - 1.0).max()))
        if q.shape[1] != atom_M.size:
            raise PBEError(f"basis layout mismatch: {q.shape[1]} coefficients, {atom_M.size} basis functions")
        inside = (eig_ev >= lo) & (eig_ev <= hi)
        outside += kw * (q[~inside] @ to_atom).sum(axis=0)
        if f_M.any():
            f_weight += kw * np.bincount(atom_M[f_M], weights=q[inside][:, f_M].sum(axis=0), minlength=n_atoms)
        d = per_spin.setdefault(int(wfs.spin), {"k": [], "eig": [], "w": [], "kw": []})
        d["k"].append(np.asarray(wfs.k))
        d["eig"].append(eig_ev)
        d["w"].append((q * float(wfs.spin_degeneracy)) @ to_chan)
        d["kw"].append(float(wfs.weight))
    kpt_kc = np.asarray(ibz.ibz.kpt_kc)
    bz_kc, bz2ibz = np.asarray(ibz.ibz.bz.kpt_Kc), np.asarray(ibz.ibz.bz2ibz_K)  # the full mesh, its partners
    if dos_method == "tetrahedron":
        energies = np.arange(lo, hi + 0.5 * TETRA_STEP_EV, TETRA_STEP_EV)
        dos = np.zeros((energies.size, n_atoms * N_ORBITALS))
        for d in per_spin.values():
            row = np.full(len(kpt_kc), -1)
            row[np.array(d["k"])] = np.arange(len(d["k"]))
            full = row[bz2ibz]  # each mesh point -> its computed partner (itself, or -k)
            if (full < 0).any():
                raise PBEError("a k-point of the DOS mesh has no computed partner")
            eig_kn = np.array(d["eig"])[full]
            bands = np.nonzero((eig_kn.max(axis=0) >= lo) & (eig_kn.min(axis=0) <= hi))[0]
            if bands.size:
                dos += tetrahedron_states(atoms.cell[:], size, bz_kc, eig_kn[:, bands],
                                          np.array(d["w"])[full][:, bands], energies)
        w = (dos * TETRA_STEP_EV).reshape(energies.size, n_atoms, N_ORBITALS)
        keep = np.abs(w).sum(axis=(1, 2)) > 0
        e, w = energies[keep], w[keep]
    elif dos_method == "states":
        e_list, w_list = [], []
        for d in per_spin.values():
            for eig_ev, wk, kw in zip(d["eig"], d["w"], d["kw"]):
                sel = (eig_ev >= lo) & (eig_ev <= hi)
                e_list.append(eig_ev[sel])
                w_list.append(kw * wk[sel])
        e = np.concatenate(e_list)
        w = np.concatenate(w_list).reshape(e.size, n_atoms, N_ORBITALS)
    else:
        raise PBEError(f"unknown dos_method {dos_method!r} (tetrahedron or states)")
    if e.size == 0:
        raise PBEError("no states inside the energy window")
    # what the projection promises (rows sum to 1, the occupied weight is the electron count): a
    # record that breaks it would be wrong in every channel, so it is refused, not stored
    if worst_sum > MAX_BAND_WEIGHT_ERROR:
        raise PBEError(f"projected weights of a band sum to 1 +- {worst_sum:.2g} (allowed {MAX_BAND_WEIGHT_ERROR:g})")
    if abs(occupied - n_electrons) > MAX_ELECTRON_COUNT_ERROR:
        raise PBEError(f"occupied weight {occupied:.6f} is not the electron count {n_electrons:g}")
    spectrum = Spectrum(energies_ev=e, weights=w, reference_ev=ref_ev, efermi_ev=efermi_ev, band_gap_ev=gap_ev,
                        f_weight=f_weight, n_electrons=n_electrons)
    info = {"dos_kdensity": density, "dos_method": dos_method, "efermi_scf_ev": efermi_scf_ev, "kpts_dos": size,
            "n_kpoints_dos": int(bz_kc.shape[0]), "n_kpoints_dos_computed": int(kpt_kc.shape[0]),
            "dos_time_reversal": bool(time_reversal),
            "homo_ev": homo, "lumo_ev": lumo, "occupied_weight": occupied,
            "weight_outside_window": [round(float(x), 6) for x in outside], "max_band_weight_error": worst_sum,
            "seconds_dos": round(time.perf_counter() - t0, 2)}
    return spectrum, info


#: cell angles (degrees) outside which GPAW warns "Results may be wrong!"
GOOD_ANGLES_DEG = (40.0, 140.0)
#: a cell is computed in its Niggli cell when that is more orthogonal by more than this (degrees,
#: largest |angle - 90°|)
ORTHOGONALITY_GAIN_DEG = 1.0


def skewed(structure: Structure) -> bool:
    """True when a cell angle lies outside :data:`GOOD_ANGLES_DEG` (GPAW's warning range)."""
    lo, hi = GOOD_ANGLES_DEG
    return not all(lo < a < hi for a in structure.lattice.angles)


def _skew_deg(structure: Structure) -> float:
    return max(abs(a - 90.0) for a in structure.lattice.angles)


def calculation_cell(structure: Structure) -> tuple[Structure, bool]:
    """(the cell GPAW computes, whether it is the Niggli-reduced one).

    A cell whose Niggli cell is more orthogonal (:data:`ORTHOGONALITY_GAIN_DEG`) is computed in the
    Niggli cell: the same atoms at the same Cartesian positions, in the same order, so the per-site
    spectra still match ``structure``; its angles lie within 60-120°. GPAW warns below 40°, and on
    its own grid rule such cells were wrong (Bi2Te3, 24°: gap 0.61 eV, its Niggli cell 0.39, the
    hexagonal cell 0.39; 3R-MoS2, 29°: 0.88 / 0.64 / 0.64); most of that error was the grid
    (:func:`gpaw_h`: calcite's 46° cell gave 5.64 eV on GPAW's rule and 5.17 on ≤ 0.25 Å, its
    Niggli cell 5.16, the hexagonal one 5.14). The Niggli cell also keeps the grid small."""
    reduced = structure.get_reduced_structure()
    if _skew_deg(structure) <= _skew_deg(reduced) + ORTHOGONALITY_GAIN_DEG:
        return structure, False
    if skewed(reduced):  # cannot happen for a Niggli cell; refuse rather than compute a wrong one
        raise PBEError(f"cell angles {reduced.lattice.angles} outside {GOOD_ANGLES_DEG} even when Niggli-reduced")
    return reduced, True


#: a lattice angle this close (degrees) to 60, 90 or 120° is set to it when GPAW cannot build its
#: finite-difference Laplacian on the cell's grid (:func:`gpaw_ready`)
SNAP_TOLERANCE_DEG = 0.5
_IDEAL_ANGLES_DEG = (60.0, 90.0, 120.0)


def weird_grid(cell, h: float = GRID_SPACING_ANG) -> bool:
    """Whether GPAW refuses the grid of ``cell`` (rows: lattice vectors, Å) at ``h`` (through
    :func:`gpaw_h`) with "You have a weird unit cell!". Its Laplacian stencil for a general cell is
    a least-squares fit over the shortest grid directions; in a cell a few hundredths of a degree
    from hexagonal (a CHGNet relaxation that stopped at fmax 0.1 eV/Å after its 0.02 Å rattle) that
    fit can come out rank-deficient (25 of 200 random cells within ±0.03-0.05° of 90/90/120°;
    none of 200 near-cubic ones). Needs GPAW; asks its own stencil code on GPAW's grid size."""
    from types import SimpleNamespace

    from gpaw.fd_operators import GUCLaplace
    from gpaw.utilities import h2gpts

    cell = np.asarray(cell, float)
    n_c = np.asarray(h2gpts(gpaw_h(cell, h), cell, idiv=GRID_MULTIPLE))
    grid = SimpleNamespace(h_cv=cell / n_c[:, None] / 0.52917721)  # GPAW works in Bohr
    try:
        GUCLaplace(grid, -0.5, 3)
    except ValueError:
        return True
    except Exception:  # the stencil was found; the stand-in grid lacks what the operator needs next
        return False
    return False


def snapped_cell(structure: Structure, tolerance_deg: float = SNAP_TOLERANCE_DEG) -> Structure | None:
    """``structure`` with each lattice angle within ``tolerance_deg`` of 60, 90 or 120° set to it:
    lengths, fractional coordinates, site order and properties kept, the new lattice turned onto
    the old one (least-squares rotation) so that the Cartesian frame, and with it the m channels,
    stays put. None when an angle is further than that from all three."""
    lat = structure.lattice
    angles = []
    for a in lat.angles:
        ideal = min(_IDEAL_ANGLES_DEG, key=lambda x: abs(x - a))
        if abs(ideal - a) > tolerance_deg:
            return None
        angles.append(ideal)
    new = Lattice.from_parameters(*lat.abc, *angles).matrix
    u, _, vt = np.linalg.svd(new.T @ lat.matrix)
    rot = u @ vt
    if np.linalg.det(rot) < 0:  # a proper rotation only
        u[:, -1] *= -1
        rot = u @ vt
    return Structure(Lattice(new @ rot), structure.species, structure.frac_coords,
                     site_properties=structure.site_properties)


def gpaw_ready(structure: Structure, h: float = GRID_SPACING_ANG) -> tuple[Structure, dict | None]:
    """(the structure to compute and record, what was changed or None). A cell whose grid GPAW
    would refuse (:func:`weird_grid`, in the cell :func:`calculation_cell` picks) has its angles
    set to the ideal ones (:func:`snapped_cell`) when that cures it; the change is reported
    (angles before and after, the largest site displacement); otherwise the structure is returned
    as it is and GPAW will say why it fails. Needs GPAW."""
    if not weird_grid(calculation_cell(structure)[0].lattice.matrix, h):
        return structure, None
    fixed = snapped_cell(structure)
    if fixed is None or weird_grid(calculation_cell(fixed)[0].lattice.matrix, h):
        return structure, None
    shift = np.linalg.norm(fixed.cart_coords - structure.cart_coords, axis=1).max()
    return fixed, {"reason": "GPAW's Laplacian stencil refused the cell's grid (weird unit cell)",
                   "angles_before_deg": [round(a, 4) for a in structure.lattice.angles],
                   "angles_after_deg": [round(a, 4) for a in fixed.lattice.angles],
                   "max_site_shift_ang": round(float(shift), 5)}


def run_pbe(structure: Structure, valences: list[int] | None = None, settings: PBESettings | None = None,
            window_ev: tuple[float, float] = (-16.0, 8.0), txt: str | None = None) -> PBEResult:
    """PBE(+U) projected DOS of ``structure`` (see the module docstring).

    ``window_ev``: only states within this window relative to the reference level are projected
    (the weight of the rest is still counted per atom in ``info['weight_outside_window']``).
    """
    settings = settings or PBESettings()
    t0 = time.perf_counter()
    structure, reduced = calculation_cell(structure)
    calc, atoms, scf_info = _scf(structure, valences, settings, txt)
    if reduced:
        scf_info["niggli_reduced"] = True
    spectrum, dos_info = _nscf_spectrum(calc, atoms, structure, settings.dos_kdensity, settings.dos_method,
                                        window_ev, txt, settings.smearing_ev, settings.projection,
                                        settings.time_reversal)
    info = {
        "code": "GPAW", "gpaw_version": gpaw_version(), "mode": "lcao", "xc": "PBE", "basis": settings.basis,
        "basis_overrides": basis_for(structure, settings)[1],
        "h_ang": settings.h_ang, "scf_kdensity": settings.scf_kdensity,
        "smearing": f"fermi-dirac {settings.smearing_ev} eV", **scf_info, **dos_info,
        "seconds": round(time.perf_counter() - t0, 2), "projection": PROJECTION_LABELS[settings.projection],
    }
    return PBEResult(spectrum, info)


# --------------------------------------------------------------------------------------------
# checks: k-point convergence and reference gaps (bench/pbe_convergence.py writes the committed result)
#: PBE gaps (eV) the recipe must reproduce within GAP_TOLERANCE_EV (measured with this recipe when
#: it was set up; PBE literature values are close: MgO ~4.5, rutile ~1.8, SrTiO3 ~1.8, spinel ~5.2).
REFERENCE_GAPS_EV = {"MgO": 4.64, "TiO2": 1.77, "SrTiO3": 1.76, "MgAl2O4": 5.33}
GAP_TOLERANCE_EV = 0.3
#: per-site normalised L1 distance (0-2) allowed between DOS k-densities d and 2d at sigma 0.1 eV
#: (and between grid spacings h and GRID_CHECK_H_ANG, and between two cells of one crystal)
L1_TOLERANCE = 0.1
#: the finer grid spacing the grid check compares the recipe's with (Å)
GRID_CHECK_H_ANG = 0.18
#: gaps of one crystal computed in two cells (the calculation cell and the conventional one) may differ by this
CELL_GAP_TOLERANCE_EV = 0.05
#: how the real-space grid follows from h (the checks file states it; see gpaw_h)
GRID_RULE = "points at most h apart along every lattice vector (pbe.gpaw_h)"


def site_dos(spectrum: Spectrum, sigma_ev: float = 0.1) -> np.ndarray:
    """(n_points, atoms, 9) DOS on the layout's grid with Gaussian smearing ``sigma_ev``."""
    from dataclasses import replace

    from data_prep.embedded.xtb import compact, gaussian_site_dos
    from data_prep.layout import DEFAULT_GRID

    grid = replace(DEFAULT_GRID, sigma_ev=sigma_ev)
    return gaussian_site_dos(compact(spectrum, grid, **COMPACT)[0], grid)


def per_site_l1(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(atoms,) L1 distance between two (n_points, atoms, 9) DOS, each site normalised to unit area (0-2)."""
    out = []
    for i in range(a.shape[1]):
        x, y = a[:, i].ravel(), b[:, i].ravel()
        out.append(float(np.abs(x / max(x.sum(), 1e-300) - y / max(y.sum(), 1e-300)).sum()))
    return np.array(out)


def element_dos(structure: Structure, dos: np.ndarray) -> dict[str, np.ndarray]:
    """Mean gridded site DOS per element and l, (points, 3: s, p, d), summed over m: what two cells
    of one crystal share (the m channels follow the Cartesian axes, and a conventional standard
    cell is turned against the primitive one)."""
    out = {}
    for el in sorted({site.specie.symbol for site in structure}):
        idx = [i for i, site in enumerate(structure) if site.specie.symbol == el]
        mean = dos[:, idx].mean(axis=1)
        out[el] = np.stack([mean[:, list(idx_l)].sum(axis=1) for idx_l in ORBITAL_GROUPS.values()], axis=1)
    return out


def grid_convergence(structure: Structure, valences: list[int] | None = None, fine_h: float = GRID_CHECK_H_ANG,
                     sigma_ev: float = 0.1, settings: PBESettings | None = None) -> dict:
    """The recipe's DOS against one on a finer real-space grid (``fine_h``; both by :func:`gpaw_h`)."""
    settings = settings or PBESettings()
    base = run_pbe(structure, valences, settings)
    fine = run_pbe(structure, valences, PBESettings(**{**settings.as_dict(), "h_ang": fine_h}))
    l1 = per_site_l1(site_dos(base.spectrum, sigma_ev), site_dos(fine.spectrum, sigma_ev))
    return {"formula": structure.composition.reduced_formula, "n_sites": len(structure),
            "h_ang": [settings.h_ang, fine_h], "h_gpaw_ang": [base.info["h_gpaw_ang"], fine.info["h_gpaw_ang"]],
            "niggli_reduced": bool(base.info.get("niggli_reduced")), "sigma_ev": sigma_ev,
            "per_site_l1": [round(float(x), 4) for x in l1], "max_l1": round(float(l1.max()), 4),
            "band_gap_ev": [round(base.spectrum.band_gap_ev, 4), round(fine.spectrum.band_gap_ev, 4)],
            "seconds": [base.info["seconds"], fine.info["seconds"]]}


def cell_check(structure: Structure, valences: list[int] | None = None, sigma_ev: float = 0.1,
               settings: PBESettings | None = None) -> dict:
    """One crystal in the recipe's cell (:func:`calculation_cell`) and in its conventional standard
    cell: per-element L1 of the mean site DOS per l (:func:`element_dos`), and the gaps."""
    from pymatgen.analysis.bond_valence import BVAnalyzer
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    settings = settings or PBESettings()
    conv = SpacegroupAnalyzer(structure).get_conventional_standard_structure()
    runs = {}
    for name, cell, val in (("recipe", structure, valences), ("conventional", conv, BVAnalyzer().get_valences(conv))):
        r = run_pbe(cell, val, settings)
        calc_cell = calculation_cell(cell)[0]
        runs[name] = (r, element_dos(calc_cell, site_dos(r.spectrum, sigma_ev)), calc_cell)
    (a, ea, ca), (b, eb, cb) = runs["recipe"], runs["conventional"]
    l1 = {el: round(float(per_site_l1(ea[el][:, None], eb[el][:, None])[0]), 4) for el in ea}
    return {"formula": structure.composition.reduced_formula,
            "cells": {"recipe": {"n_sites": len(ca), "angles": [round(x, 1) for x in ca.lattice.angles],
                                 "niggli_reduced": bool(a.info.get("niggli_reduced"))},
                      "conventional": {"n_sites": len(cb), "angles": [round(x, 1) for x in cb.lattice.angles]}},
            "original_angles": [round(x, 1) for x in structure.lattice.angles], "sigma_ev": sigma_ev,
            "element_l1": l1, "max_l1": max(l1.values()),
            "band_gap_ev": [round(a.spectrum.band_gap_ev, 4), round(b.spectrum.band_gap_ev, 4)],
            "seconds": [a.info["seconds"], b.info["seconds"]]}


def kpoint_convergence(structure: Structure, valences: list[int] | None = None, density: float = DOS_KDENSITY,
                       sigma_ev: float = 0.1, settings: PBESettings | None = None, save_dos=None) -> dict:
    """DOS at k-density ``density`` vs ``2 * density`` (one SCF, two NSCF steps): per-site L1 and gaps.

    ``save_dos``: a path; both gridded site DOS, (n_points, atoms, 9) each, are written there
    (npz: ``base``, ``fine``, ``energies_ev`` relative to the reference level, ``elements``), to
    see where two meshes differ."""
    settings = settings or PBESettings()
    structure, _ = calculation_cell(structure)
    calc, atoms, _ = _scf(structure, valences, settings, None)
    window = (-16.0, 8.0)
    base, base_info = _nscf_spectrum(calc, atoms, structure, density, settings.dos_method, window, None,
                                     settings.smearing_ev, settings.projection, settings.time_reversal)
    fine, fine_info = _nscf_spectrum(calc, atoms, structure, 2 * density, settings.dos_method, window, None,
                                     settings.smearing_ev, settings.projection, settings.time_reversal)
    a, b = site_dos(base, sigma_ev), site_dos(fine, sigma_ev)
    l1 = per_site_l1(a, b)
    if save_dos is not None:
        from data_prep.layout import DEFAULT_GRID

        energies = DEFAULT_GRID.emin_ev + DEFAULT_GRID.step_ev * np.arange(a.shape[0])
        np.savez_compressed(save_dos, base=a, fine=b, energies_ev=energies,
                            elements=np.array([site.specie.symbol for site in structure]))
    return {"formula": structure.composition.reduced_formula, "n_sites": len(structure),
            "dos_kdensity": [density, 2 * density], "kpts_dos": [base_info["kpts_dos"], fine_info["kpts_dos"]],
            "sigma_ev": sigma_ev, "per_site_l1": [round(float(x), 4) for x in l1], "max_l1": round(float(l1.max()), 4),
            "band_gap_ev": [round(base.band_gap_ev, 4), round(fine.band_gap_ev, 4)],
            "seconds": [base_info["seconds_dos"], fine_info["seconds_dos"]]}
