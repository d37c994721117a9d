"""Relax a hypothetical (substituted) structure with the CHGNet universal potential before its DOS.

Substituted structures keep their parent's geometry with a volume guess; relaxing them (positions
and cell) with CHGNet (Deng et al., Nat. Mach. Intell. 5, 1031 (2023); pretrained weights ship
inside the ``chgnet`` wheel, nothing is downloaded) gives the geometry the bond valence targets
and the DOS describe. Recipe:

1. **Isotropic start**: the cell is scaled uniformly to CHGNet's energy minimum along the volume
   (a scan over :data:`PRESCALE_FACTORS` times the guessed volume, refined by a parabola). The
   guess (pymatgen's DLS volume predictor) misses badly for some halides: RbCl, RbI and AgCl
   in rock salt came out about a third too small, and CHGNet puts them 4-7 % above experiment. A
   minimum at the edge of the scan rejects the structure.
2. A small random displacement (:data:`RATTLE_ANG`, seeded per material) so that cells sitting
   on a high-symmetry saddle can move, then FIRE on positions and cell to ``fmax``
   :data:`FMAX_EV_ANG`.
3. **Symmetry** (since 2026-12-06, :func:`symmetrise`): the isotropic start is also relaxed with
   its own space group held (found at :data:`SYMPREC_ANG`, in its primitive standard cell, no rattle;
   ASE's ``FixSymmetry``), and that structure is kept unless the free relaxation ends more than
   :data:`SYMMETRY_BREAK_EV_PER_ATOM` lower: then the free one is kept, made exact under the space
   group it has within the largest tolerance of :data:`SYMPREC_TRIES_ANG` (0.1, 0.05, then
   :data:`SYMPREC_ANG`) whose relaxation holding it still ends that much below the symmetric start,
   and relaxed again holding it (until late on 2026-12-06 only at :data:`SYMPREC_ANG`, which left 8 of the
   first 9 such structures in P1: the rattle's noise stays in the soft degrees of freedom). Without this the rattle
   stayed in the structure wherever its forces were already below ``fmax`` (rock-salt RbCl: 0 FIRE
   steps, sites up to 0.05 Å off), so all 130 substituted records of that time had no symmetry at
   all: GPAW ran their SCF on the full k-point mesh, and the h5 counted 6.4 symmetry-distinct sites
   per substituted material (3.2 when the same structures are classified at 0.1 Å): near-duplicate
   samples (recomputed, their bond valence sums moved by only 0.015 v.u. per site on average). A
   real instability of the parent's symmetry (a tilt that lowers the energy) is still found by the
   free relaxation and kept.

A relaxation that does not converge within :data:`MAX_STEPS`, or whose FIRE step changes the
volume by more than :data:`MAX_VOLUME_CHANGE` from the isotropic start (the framework does not
hold the substituted ions), is rejected with the reason (:class:`RelaxError`). Records computed
before 2026-12-06 07:00 started FIRE from the guess itself (no isotropic step); their
``volume_change`` is the same quantity (change during FIRE). Real (experimental) structures are
never relaxed.

``torch`` and ``chgnet`` are optional dependencies (the ``compute`` extra).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from pymatgen.core import Structure

FMAX_EV_ANG = 0.1
RATTLE_ANG = 0.02
#: tolerance (Å) of the space group found and held (that of data_prep build's site classes)
SYMPREC_ANG = 0.01
#: the free relaxation must end this much lower than the symmetric one to be kept (eV/atom): above
#: what relaxing to FMAX_EV_ANG leaves unrelaxed, below the gain of a real tilt or distortion
SYMMETRY_BREAK_EV_PER_ATOM = 0.001
#: tolerances (Å) tried, largest first, for the symmetry of a free relaxation that broke the start's:
#: at SYMPREC_ANG alone the rattle's noise left 8 of the first 9 such structures in P1
SYMPREC_TRIES_ANG = (0.1, 0.05, 0.01)
MAX_STEPS = 500
MAX_VOLUME_CHANGE = 0.30
#: volumes tried for the isotropic start, as multiples of the guessed volume
PRESCALE_FACTORS = tuple(float(f) for f in np.geomspace(0.5, 2.0, 15))


class RelaxError(RuntimeError):
    """The relaxation was rejected (did not converge, volume change too large, CHGNet missing)."""


@dataclass
class RelaxResult:
    structure: Structure
    info: dict
    valences: list[int] | None = None  # the input's per-site valences, in the relaxed structure's site order


@lru_cache(maxsize=1)
def _model():
    try:
        import torch
        from chgnet.model import CHGNet
    except ImportError as exc:
        raise RelaxError(f"CHGNet is not installed ({exc}); install the 'compute' extra") from exc
    torch.set_num_threads(1)
    return CHGNet.load(verbose=False)


def chgnet_version() -> str:
    try:
        from importlib.metadata import version
        return version("chgnet")
    except Exception:  # noqa: BLE001 - only for provenance
        return "not installed"


def _seed(material_id: str) -> int:
    return int.from_bytes(hashlib.sha256(material_id.encode()).digest()[:4], "little")


def isotropic_minimum(energy, factors=PRESCALE_FACTORS) -> float:
    """Volume factor of the lowest ``energy(factor)`` over ``factors``, refined by a parabola in
    log(factor) through the lowest point and its neighbours; :class:`RelaxError` when the lowest
    point is the first or last factor (no minimum inside the scan)."""
    f = np.asarray(factors, dtype=float)
    e = np.array([float(energy(x)) for x in f])
    if not np.all(np.isfinite(e)):
        raise RelaxError("CHGNet gave a non-finite energy in the isotropic volume scan")
    i = int(np.argmin(e))
    if i in (0, len(f) - 1):
        raise RelaxError(f"no energy minimum for uniform scaling between {f[0]:.2f}x and {f[-1]:.2f}x "
                         f"the guessed volume (lowest at {f[i]:.2f}x)")
    x = np.log(f[i - 1:i + 2])
    a, b, _ = np.polyfit(x, e[i - 1:i + 2], 2)
    best = -b / (2 * a) if a > 0 else x[1]
    return float(np.exp(np.clip(best, x[0], x[2])))


def symmetrise(atoms, fmax: float, max_steps: int, symprec_ang: float = SYMPREC_ANG, valences=None):
    """``atoms`` (with its calculator) made exactly symmetric under the space group it has within
    ``symprec_ang``, in its primitive standard cell (spglib's origin: the point operations GPAW
    uses, which carry no translation, are then symmetries of the cell), and relaxed to ``fmax``
    holding that symmetry. ``valences`` (per site of ``atoms``) follow their sites into the new
    cell. Returns (new atoms, provenance, valences); :class:`RelaxError` when the constrained
    relaxation does not converge."""
    from ase.constraints import FixSymmetry
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE
    from ase.spacegroup.symmetrize import check_symmetry
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    before = AseAtomsAdaptor.get_structure(atoms)
    before = Structure(before.lattice, [site.specie for site in before], before.frac_coords,
                       site_properties={"bv_valence": list(valences)} if valences is not None else None)
    try:
        standard = SpacegroupAnalyzer(before, symprec=symprec_ang).get_primitive_standard_structure(
            keep_site_properties=valences is not None)
    except Exception as exc:  # noqa: BLE001 - spglib found no cell
        raise RelaxError(f"symmetrising the relaxed cell failed: {type(exc).__name__}: {exc}") from exc
    if standard.composition.reduced_formula != before.composition.reduced_formula:  # checked, not assumed
        raise RelaxError(f"symmetrising changed the formula ({before.formula} -> {standard.formula})")
    new = AseAtomsAdaptor.get_atoms(Structure(standard.lattice, [site.specie for site in standard],
                                              standard.frac_coords))
    new.calc = atoms.calc
    new.set_constraint(FixSymmetry(new, symprec=1e-4))
    opt = FIRE(FrechetCellFilter(new), logfile=None)
    try:
        converged = bool(opt.run(fmax=fmax, steps=max_steps))
    except Exception as exc:  # noqa: BLE001 - as in relax()
        raise RelaxError(f"CHGNet relaxation with symmetry held failed: {type(exc).__name__}: {exc}") from exc
    finally:
        new.set_constraint()
    if not converged:
        raise RelaxError(f"CHGNet relaxation with symmetry held did not reach fmax {fmax} eV/Å in {max_steps} steps")
    ds = check_symmetry(new, symprec=1e-4)
    new_valences = [int(v) for v in standard.site_properties["bv_valence"]] if valences is not None else None
    return new, {"symprec_ang": symprec_ang, "space_group": str(ds.international),
                 "space_group_number": int(ds.number), "n_operations": int(len(ds.rotations)),
                 "cell": "primitive standard (SpacegroupAnalyzer)", "n_sites_before": len(before),
                 "steps": int(opt.nsteps)}, new_valences


def _symmetrise_broken(atoms, e_held: float, fmax: float, max_steps: int, symprec_ang: float, valences):
    """The free relaxation ``atoms`` (which broke the start's symmetry) symmetrised at the largest
    tolerance of :data:`SYMPREC_TRIES_ANG` (down to ``symprec_ang``) whose relaxation holding that
    symmetry still ends :data:`SYMMETRY_BREAK_EV_PER_ATOM` below the symmetric start's energy
    ``e_held`` (eV/atom); at ``symprec_ang`` itself it is kept whatever its energy. Returns
    :func:`symmetrise`'s triple and the tolerances tried with their space group and energy."""
    tolerances = [t for t in SYMPREC_TRIES_ANG if t > symprec_ang] + [symprec_ang]
    tries: list[dict] = []
    for tol in tolerances:
        last = tol == tolerances[-1]
        try:
            new, new_info, new_valences = symmetrise(atoms, fmax, max_steps, tol, valences)
        except RelaxError as exc:
            if last:
                raise
            tries.append({"symprec_ang": tol, "failed": str(exc)[:160]})
            continue
        gain = new.get_potential_energy() / len(new) - e_held
        tries.append({"symprec_ang": tol, "space_group": new_info["space_group"],
                      "minus_held_ev_per_atom": round(float(gain), 5)})
        if last or gain < -SYMMETRY_BREAK_EV_PER_ATOM:
            return new, new_info, new_valences, tries
    raise AssertionError("unreachable: the last tolerance returns or raises")


def relax(structure: Structure, material_id: str, fmax: float = FMAX_EV_ANG, max_steps: int = MAX_STEPS,
          rattle_ang: float = RATTLE_ANG, max_volume_change: float = MAX_VOLUME_CHANGE,
          symprec_ang: float | None = SYMPREC_ANG, valences: list[int] | None = None) -> RelaxResult:
    """CHGNet relaxation of positions and cell (FIRE), after a seeded random displacement, against
    the relaxation that holds the start's symmetry (module docstring, step 3; ``symprec_ang`` None
    skips that). ``valences``: per-site oxidation states of ``structure``, returned in the relaxed
    structure's site order (``RelaxResult.valences``; symmetrising may reorder the sites)."""
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE
    from chgnet.model.dynamics import CHGNetCalculator
    from pymatgen.io.ase import AseAtomsAdaptor

    model = _model()
    t0 = time.perf_counter()
    atoms = AseAtomsAdaptor.get_atoms(structure)
    calc = CHGNetCalculator(model=model, use_device="cpu", stress_weight=1 / 160.21766208)
    v_guess = structure.volume
    cell0 = atoms.cell.copy()

    def energy(factor: float) -> float:
        trial = atoms.copy()
        trial.set_cell(cell0 * factor ** (1 / 3), scale_atoms=True)
        trial.calc = calc
        return trial.get_potential_energy()

    try:
        prescale = isotropic_minimum(energy)
    except RelaxError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a graph without neighbours in a stretched cell
        raise RelaxError(f"CHGNet volume scan failed: {type(exc).__name__}: {exc}") from exc
    atoms.set_cell(cell0 * prescale ** (1 / 3), scale_atoms=True)
    start = atoms.copy()
    rng = np.random.default_rng(_seed(material_id))
    atoms.positions += rng.normal(0.0, rattle_ang, atoms.positions.shape)
    atoms.calc = calc
    v0 = atoms.get_volume()
    opt = FIRE(FrechetCellFilter(atoms), logfile=None)
    try:
        converged = bool(opt.run(fmax=fmax, steps=max_steps))
    except Exception as exc:  # noqa: BLE001 - a bad geometry can break the graph
        raise RelaxError(f"CHGNet relaxation failed: {type(exc).__name__}: {exc}") from exc
    info = {"model": "CHGNet", "chgnet_version": chgnet_version(),
            "optimizer": "isotropic volume scan, then FIRE + FrechetCellFilter", "fmax_ev_ang": fmax,
            "rattle_ang": rattle_ang, "converged": converged, "steps": int(opt.nsteps),
            "isotropic_prescale": round(float(prescale), 5)}
    if not converged:
        raise RelaxError(f"CHGNet relaxation did not reach fmax {fmax} eV/Å in {max_steps} steps")
    if symprec_ang:
        e_free = atoms.get_potential_energy() / len(atoms)
        start.calc = calc
        held, held_info, held_valences = symmetrise(start, fmax, max_steps, symprec_ang, valences)
        e_held = held.get_potential_energy() / len(held)
        broken = e_free < e_held - SYMMETRY_BREAK_EV_PER_ATOM
        tries: list[dict] = []
        if broken:
            atoms, held_info, valences, tries = _symmetrise_broken(atoms, e_held, fmax, max_steps, symprec_ang,
                                                                    valences)
        else:
            atoms, valences = held, held_valences
        info["symmetry"] = {**held_info, "kept": "free relaxation, symmetrised" if broken else "start's symmetry",
                            "free_minus_held_ev_per_atom": round(float(e_free - e_held), 5),
                            **({"tolerances_tried": tries} if broken else {})}
    relaxed = AseAtomsAdaptor.get_structure(atoms)
    relaxed = Structure(relaxed.lattice, [s.specie for s in relaxed], relaxed.frac_coords)
    v_site = relaxed.volume / len(relaxed)  # per site: the standard cell may be smaller than the start's
    dv = v_site / (v0 / len(structure)) - 1.0
    info.update({"volume_change_from_guess": round(float(v_site / (v_guess / len(structure)) - 1.0), 5),
                 "volume_change": round(float(dv), 5),
                 "energy_ev_per_atom": round(float(atoms.get_potential_energy()) / len(atoms), 5),
                 "seconds": round(time.perf_counter() - t0, 2)})
    if abs(dv) > max_volume_change:
        raise RelaxError(f"CHGNet relaxation changed the volume by {dv:+.0%} from its isotropic start "
                         f"(limit ±{max_volume_change:.0%})")
    return RelaxResult(relaxed, info, list(valences) if valences is not None else None)
