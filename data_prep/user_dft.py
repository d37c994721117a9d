"""A user's own DFT -> canonical records: ``python -m data_prep import vasp|pymatgen PATH... --out DIR``.

- ``vasp``: a run folder holding ``vasprun.xml`` (or ``vasprun.xml.gz``), or the file itself, read
  with pymatgen's ``Vasprun``. It needs site- and m-resolved projections (``LORBIT = 11``).
- ``pymatgen``: a ``CompleteDos`` JSON as pymatgen's ``CompleteDos.as_dict()`` / the Materials
  Project write it (``Dumpfn`` / ``json.dump``).

The DOS becomes the project's spectral form (``Spectrum.from_complete_dos``: every grid point is a
state of weight pdos * dE, spin channels summed, f orbitals counted aside), the reference level
follows ``layout.REFERENCE_RULE`` (VASP: band edges from the eigenvalues), valences come from
pymatgen's ``BVAnalyzer`` (``bond_valence.assign_valences``) and are stored as ``bv_valences``, and
the method is read from the run (PBE, PBE+U, r2SCAN, HSE, ...). Every problem is one line
(``DFTImportError``): no projections, l-resolved only (LORBIT = 10), a truncated file, a
disordered structure or one without assignable valences (not an ionic oxide/halide/chalcogenide),
and a DOS whose energies do not cover the layout's window.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from data_prep.layout import DEFAULT_GRID, EnergyGrid
from data_prep.records import MaterialRecord, RecordError, Spectrum

FORMATS = ("vasp", "pymatgen")


class DFTImportError(ValueError):
    """One user calculation cannot be imported (one-line reason)."""


def material_id_for(path: Path) -> str:
    """Record id from the run folder (or file stem): 'user-' + the name, unsafe characters replaced."""
    p = Path(path)
    name = p.name if p.is_dir() else (p.parent.name if p.name.startswith("vasprun") else p.stem)
    return "user-" + (re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_") or "run")


def _vasprun_file(path: Path) -> Path:
    if path.is_dir():
        for name in ("vasprun.xml", "vasprun.xml.gz"):
            if (path / name).is_file():
                return path / name
        raise DFTImportError(f"{path}: no vasprun.xml in this folder")
    if not path.is_file():
        raise DFTImportError(f"{path}: not found")
    return path


def method_of(vr) -> str:
    """The functional of a VASP run from its parameters: PBE, PBE+U, r2SCAN, HSE06, ..."""
    p, incar = vr.parameters, vr.incar
    if p.get("LHFCALC") or incar.get("LHFCALC"):
        screen = float(p.get("HFSCREEN", incar.get("HFSCREEN", 0.0)) or 0.0)
        base = "HSE06" if 0.19 <= screen <= 0.21 else ("HSE03" if abs(screen - 0.3) < 0.01 else "hybrid")
    elif str(incar.get("METAGGA", p.get("METAGGA", "--"))).upper() not in ("--", "NONE", ""):
        tag = str(incar.get("METAGGA", p.get("METAGGA"))).upper()
        base = {"R2SCAN": "r2SCAN", "SCAN": "SCAN", "RSCAN": "rSCAN"}.get(tag, tag)
    else:
        gga = str(p.get("GGA", incar.get("GGA", "--"))).upper()
        base = {"PE": "PBE", "--": "PBE", "PS": "PBEsol", "RE": "revPBE"}.get(gga, gga)
    if p.get("LDAU") or incar.get("LDAU"):
        base += "+U"
    return base


def _check_window(spectrum: Spectrum, grid: EnergyGrid, source: str) -> None:
    lo = float(np.min(spectrum.energies_ev) - spectrum.reference_ev)
    hi = float(np.max(spectrum.energies_ev) - spectrum.reference_ev)
    if lo > grid.emin_ev or hi < grid.emax_ev - grid.step_ev:
        raise DFTImportError(
            f"{source}: the DOS covers {lo:.2f}..{hi:.2f} eV around the reference level but the layout's "
            f"window is {grid.emin_ev:g}..{grid.emax_ev:g} eV: rerun with a wider EMIN/EMAX (and NEDOS)")


def _valences(structure, source: str) -> list[int]:
    from data_prep.bond_valence import BondValenceError, assign_valences

    if not structure.is_ordered:
        raise DFTImportError(f"{source}: the structure is disordered (partial occupancies); only ordered "
                             "structures have per-site bond valence sums")
    try:
        val = [int(v) for v in assign_valences(structure)]
    except BondValenceError as exc:
        raise DFTImportError(f"{source}: no valences for this structure ({exc}); an ionic compound "
                             "(oxide, halide, chalcogenide, ...) is needed") from None
    if not any(v < 0 for v in val) or not any(v > 0 for v in val):
        raise DFTImportError(f"{source}: BVAnalyzer finds no anion/cation pair (metallic or non-ionic "
                             "structure): bond valence sums need an ionic compound such as an oxide")
    return val


def band_edges(spectrum: Spectrum, tol_states_per_ev: float = 1e-3) -> tuple[float, float, float]:
    """(gap, cbm, vbm) from the spectral states around the Fermi level: the highest point at or below
    it and the lowest above it whose total density (weight / spacing) exceeds ``tol_states_per_ev``
    (pymatgen's tolerance); gap 0 when either side is empty (``CompleteDos.get_cbm_vbm`` misreads
    DOS tabulated only at the states, so the edges are found here for every source)."""
    e = np.asarray(spectrum.energies_ev, dtype=float)
    w = np.asarray(spectrum.weights, dtype=float).sum(axis=(1, 2))
    de = np.gradient(e) if len(e) > 1 else np.ones(1)
    on = w / np.where(de > 0, de, 1.0) > tol_states_per_ev
    below = e[on & (e <= spectrum.efermi_ev)]
    above = e[on & (e > spectrum.efermi_ev)]
    if not len(below) or not len(above):
        return 0.0, spectrum.efermi_ev, spectrum.efermi_ev
    vbm, cbm = float(below.max()), float(above.min())
    return cbm - vbm, cbm, vbm


def _spectrum(cdos, structure, source: str) -> Spectrum:
    from pymatgen.electronic_structure.core import OrbitalType

    if not cdos.pdos:
        raise DFTImportError(f"{source}: no projected DOS (set LORBIT = 11 for site- and m-resolved projections)")
    first = next(iter(cdos.pdos.values()))
    if first and all(isinstance(o, OrbitalType) for o in first):
        raise DFTImportError(f"{source}: only l-resolved projections (LORBIT = 10); rerun with LORBIT = 11 "
                             "for the m-resolved channels")
    try:
        sp = Spectrum.from_complete_dos(cdos, structure)
    except RecordError as exc:
        raise DFTImportError(f"{source}: {exc}") from None
    gap, _, vbm = band_edges(sp)
    sp.band_gap_ev, sp.reference_ev = gap, Spectrum.reference_from(vbm, sp.efermi_ev, gap)
    return sp


def record_from_vasprun(path, material_id: str | None = None, grid: EnergyGrid = DEFAULT_GRID) -> MaterialRecord:
    """One ``vasprun.xml`` (or its folder) -> a ``MaterialRecord`` (origin 'user')."""
    import xml.etree.ElementTree as ET

    from pymatgen.io.vasp import Vasprun

    f = _vasprun_file(Path(path))
    src = str(f)
    try:
        vr = Vasprun(str(f), parse_dos=True, parse_eigen=True, parse_projected_eigen=False,
                     parse_potcar_file=False, exception_on_bad_xml=True)
    except (ET.ParseError, EOFError) as exc:
        raise DFTImportError(f"{src}: truncated or malformed vasprun.xml ({exc}); did the run finish?") from None
    except Exception as exc:  # noqa: BLE001 - pymatgen raises many kinds on broken files
        if type(exc).__name__ in ("XMLSyntaxError", "ParseError"):  # lxml's, when pymatgen uses lxml
            first = str(exc).split("(")[0].strip()
            raise DFTImportError(f"{src}: truncated or malformed vasprun.xml ({first}); did the run finish?") from None
        raise DFTImportError(f"{src}: cannot read vasprun.xml ({type(exc).__name__}: {exc})"[:300]) from None
    if getattr(vr, "pdos", None) in (None, []) or not vr.complete_dos.pdos:
        raise DFTImportError(f"{src}: no projected DOS (set LORBIT = 11 for site- and m-resolved projections)")
    s = vr.final_structure
    val = _valences(s, src)
    sp = _spectrum(vr.complete_dos, s, src)
    try:  # band edges from the eigenvalues (more precise than the smeared DOS)
        gap, cbm, vbm, _ = vr.eigenvalue_band_properties
        if not np.isscalar(gap):
            gap, cbm, vbm = float(np.min(gap)), float(np.min(cbm)), float(np.max(vbm))
        sp.band_gap_ev = float(gap)
        sp.reference_ev = Spectrum.reference_from(float(vbm), sp.efermi_ev, float(gap))
    except Exception:  # noqa: BLE001 - no eigenvalues: keep the DOS-based edges
        pass
    _check_window(sp, grid, src)
    mid = material_id or material_id_for(Path(path))
    method = method_of(vr)
    rec = MaterialRecord(mid, s.composition.reduced_formula, "user", f"VASP {method}", s, sp,
                         {"source": "vasp", "path": str(Path(path).resolve()), "bv_valences": val,
                          "method": method, "lorbit": vr.parameters.get("LORBIT", vr.incar.get("LORBIT")),
                          "spin_polarized": bool(vr.is_spin), "nedos": int(len(sp.energies_ev))})
    rec.validate()
    return rec


def record_from_complete_dos_json(path, material_id: str | None = None, grid: EnergyGrid = DEFAULT_GRID,
                                  method: str = "unknown") -> MaterialRecord:
    """A pymatgen ``CompleteDos`` JSON (``as_dict``; the Materials Project's format) -> a record."""
    from pymatgen.electronic_structure.dos import CompleteDos

    f = Path(path)
    src = str(f)
    if not f.is_file():
        raise DFTImportError(f"{src}: not found")
    try:
        d = json.loads(f.read_text())
        cdos = CompleteDos.from_dict(d)
    except json.JSONDecodeError as exc:
        raise DFTImportError(f"{src}: not JSON (truncated?): {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise DFTImportError(f"{src}: not a pymatgen CompleteDos JSON ({type(exc).__name__}: {exc})"[:300]) from None
    s = cdos.structure
    val = _valences(s, src)
    sp = _spectrum(cdos, s, src)
    _check_window(sp, grid, src)
    meth = d.get("method") or method
    rec = MaterialRecord(material_id or "user-" + re.sub(r"[^A-Za-z0-9_.+-]+", "_", f.stem), s.composition.reduced_formula,
                         "user", meth, s, sp, {"source": "pymatgen-CompleteDos", "path": str(f.resolve()),
                                                 "bv_valences": val})
    rec.validate()
    return rec


def import_runs(fmt: str, paths, out_dir, grid: EnergyGrid = DEFAULT_GRID) -> dict:
    """Import every path; write ``out_dir/<id>.npz``. Returns {"written": [...], "failed": {path: reason}}."""
    if fmt not in FORMATS:
        raise DFTImportError(f"unknown format {fmt!r}; use one of {FORMATS}")
    out = Path(out_dir)
    written, failed = [], {}
    for p in paths:
        try:
            rec = record_from_vasprun(p, grid=grid) if fmt == "vasp" else record_from_complete_dos_json(p, grid=grid)
        except DFTImportError as exc:
            failed[str(p)] = str(exc)
            continue
        written.append(str(rec.save(out / f"{rec.material_id}.npz")))
    return {"written": written, "failed": failed}


def complete_dos_from_record(record: MaterialRecord, grid: EnergyGrid = DEFAULT_GRID):
    """A pymatgen ``CompleteDos`` holding exactly the states of ``record`` (for tests and export):
    the distinct state energies become the energy points and each state's weight is divided by the
    spacing that ``Spectrum.from_complete_dos`` multiplies back (``np.gradient``), spin up only.
    Two empty points 1 eV beyond ``grid``'s window at each end make it cover the window."""
    from pymatgen.electronic_structure.core import Orbital, Spin
    from pymatgen.electronic_structure.dos import CompleteDos, Dos

    sp = record.spectrum
    ref = sp.reference_ev
    pad = np.array([ref + grid.emin_ev - 2.0, ref + grid.emin_ev - 1.0, ref + grid.emax_ev + 1.0,
                    ref + grid.emax_ev + 2.0])
    e, inv = np.unique(np.concatenate([np.asarray(sp.energies_ev, dtype=float), pad]), return_inverse=True)
    w = np.zeros((len(e),) + sp.weights.shape[1:])
    np.add.at(w, inv[: len(sp.energies_ev)], np.asarray(sp.weights, dtype=float))
    de = np.gradient(e)
    dens = w / de[:, None, None]
    s = record.structure
    pdos = {site: {Orbital(j): {Spin.up: dens[:, i, j]} for j in range(dens.shape[2])} for i, site in enumerate(s)}
    total = Dos(sp.efermi_ev, e, {Spin.up: dens.sum(axis=(1, 2))})
    return CompleteDos(s, total, pdos)
