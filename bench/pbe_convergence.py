"""Convergence and accuracy check of the embedded PBE recipe (writes data_prep/embedded/pbe_checks.json).

For MgO, rutile TiO2, the ternaries SrTiO3 and spinel MgAl2O4 and CsCl (the embedded dataset's own
real structures; MgO an experimental rock-salt cell; CsCl for Cs's basis override) the DOS at the
recipe's k-point density d is compared with 2d (same SCF): per-site L1 distance of the unit-area
site DOS (0-2) at sigma 0.1 eV must stay below ``pbe.L1_TOLERANCE``. The PBE gaps of MgO, rutile,
SrTiO3 and spinel MgAl2O4 must lie within ``pbe.GAP_TOLERANCE_EV`` of ``pbe.REFERENCE_GAPS_EV``.
Grid: the DOS of MgO (primitive fcc cell), rutile and calcite (rhombohedral, computed in its Niggli
cell) on the recipe's grid against a finer one (``pbe.GRID_CHECK_H_ANG``), per-site L1 below the
same tolerance. Cell: calcite and Bi2Te3 in the recipe's cell against their conventional hexagonal
cells, per-element L1 of the mean site DOS below the tolerance and gaps within
``pbe.CELL_GAP_TOLERANCE_EV`` (their rhombohedral cells, computed as they were before 2026-12-06,
missed by 0.5 and 0.2 eV).
tests/test_pbe.py checks the committed result against the current recipe; rerun this script
(needs the 'compute' extra; about an hour of CPU) whenever pbe.py's settings change:

    python bench/pbe_convergence.py [--out data_prep/embedded/pbe_checks.json] [--only FORMULA ...]
                                    [--kinds convergence gaps grid cell] [--save-dos DIR]

``--only`` computes the named formulas' checks (of ``--kinds``, default all) and replaces just
those rows in ``--out`` (the other rows stay as they are; only valid while the recipe is unchanged).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_k, "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep.embedded import pbe  # noqa: E402
from data_prep.embedded.structures import collect_structures  # noqa: E402
from data_prep.records import atomic_write_bytes  # noqa: E402

#: which real structure stands for each formula (ids of the embedded collection)
CONVERGENCE = ("SrTiO3", "MgO", "TiO2", "MgAl2O4", "CsCl")
GAPS = ("MgO", "TiO2", "SrTiO3", "MgAl2O4")
GRID = ("MgO", "TiO2", "CaCO3")
CELL = ("CaCO3", "Bi2Te3")
KINDS = {"convergence": CONVERGENCE, "gaps": GAPS, "grid": GRID, "cell": CELL}
PREFERRED = {"TiO2": "rutile", "CaCO3": "calcite"}


def _rocksalt_mgo():
    """Experimental MgO (a = 4.212 A): the embedded set holds no real MgO."""
    from pymatgen.core import Lattice, Structure

    from data_prep.embedded.structures import StructureEntry

    h = 4.212 / 2
    s = Structure(Lattice([[0, h, h], [h, 0, h], [h, h, 0]]), ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    return StructureEntry("rocksalt-MgO-a4.212", "MgO", "prototype", s, {"bv_valences": [2, -2]})


def _pick(entries, formula):
    cands = [e for e in entries if e.formula == formula and e.origin != "substituted"]
    if not cands and formula == "MgO":
        return _rocksalt_mgo()
    want = PREFERRED.get(formula)
    if want:
        cands = [e for e in cands if want in e.material_id.lower()] or cands
    if not cands:
        raise SystemExit(f"no real {formula} in the embedded collection")
    return sorted(cands, key=lambda e: (len(e.structure), e.material_id))[0]


def _job(kind: str, formula: str, save_dir: str | None = None) -> dict:
    e = _pick(collect_structures(n_substituted=0, progress=False), formula)
    return {**_check(kind, formula, e, save_dir), "basis_overrides": pbe.basis_for(e.structure)[1]}


def _check(kind: str, formula: str, e, save_dir: str | None) -> dict:
    valences = e.provenance.get("bv_valences")
    if kind == "convergence":
        save = str(Path(save_dir) / f"{formula}.npz") if save_dir else None
        return {"material_id": e.material_id, **pbe.kpoint_convergence(e.structure, valences, save_dos=save)}
    if kind == "grid":
        return {"material_id": e.material_id, **pbe.grid_convergence(e.structure, valences)}
    if kind == "cell":
        return {"material_id": e.material_id, **pbe.cell_check(e.structure, valences)}
    r = pbe.run_pbe(e.structure, valences)
    return {"material_id": e.material_id, "formula": formula, "band_gap_ev": round(r.spectrum.band_gap_ev, 4),
            "reference_ev": pbe.REFERENCE_GAPS_EV[formula], "occupied_weight": round(r.info["occupied_weight"], 6),
            "n_electrons": r.spectrum.n_electrons, "max_band_weight_error": r.info["max_band_weight_error"],
            "seconds": r.info["seconds"]}


def _row_is_current(row: dict) -> bool:
    """Whether a row was computed with today's basis overrides (``pbe.BASIS_OVERRIDES``) for its
    elements (rows written before the overrides existed carry none: valid while none applies)."""
    from pymatgen.core import Composition

    elements = {el.symbol for el in Composition(row["formula"]).elements}
    want = {el: b for el, b in sorted(pbe.BASIS_OVERRIDES.items()) if el in elements}
    return (row.get("basis_overrides") or {}) == want


def _same_recipe(old: dict, new: dict, kept: list[dict]) -> bool:
    """Whether the rows ``kept`` of an existing checks file hold for the recipe of ``new``: the same
    settings (basis overrides compared per row), grid rule and GPAW (tests/test_pbe.py reads the
    file the same way)."""
    def settings(d):
        return {k: v for k, v in (d.get("settings") or {}).items() if k != "basis_overrides"}
    return (settings(old) == settings(new) and all(old.get(k) == new[k] for k in ("grid_rule", "gpaw_version"))
            and all(_row_is_current(row) for row in kept))


def main(argv=None) -> int:
    from concurrent.futures import ProcessPoolExecutor

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "data_prep" / "embedded" / "pbe_checks.json"))
    ap.add_argument("--procs", type=int, default=2, help="calculations run side by side (one core each)")
    ap.add_argument("--only", nargs="+", metavar="FORMULA", choices=sorted({f for fs in KINDS.values() for f in fs}),
                    help="recompute only these formulas' rows of an existing --out")
    ap.add_argument("--kinds", nargs="+", choices=list(KINDS), help="with --only: recompute only these kinds of check")
    ap.add_argument("--save-dos", metavar="DIR", help="also write both gridded site DOS of each convergence "
                    "check to DIR/FORMULA.npz (base, fine, energies_ev, elements)")
    args = ap.parse_args(argv)
    result = {"settings": pbe.PBESettings().as_dict(), "grid_rule": pbe.GRID_RULE, "gpaw_version": pbe.gpaw_version(),
              "l1_tolerance": pbe.L1_TOLERANCE, "gap_tolerance_ev": pbe.GAP_TOLERANCE_EV,
              "cell_gap_tolerance_ev": pbe.CELL_GAP_TOLERANCE_EV, "grid_check_h_ang": pbe.GRID_CHECK_H_ANG,
              "reference_gaps_ev": pbe.REFERENCE_GAPS_EV, **{kind: [] for kind in KINDS}}
    # the longest first (the cell check of calcite computes 30 atoms), so two processes finish together
    jobs = [(kind, f) for kind in ("cell", "convergence", "grid", "gaps") for f in KINDS[kind]]
    if args.only:
        old = json.loads(Path(args.out).read_text())
        kinds = args.kinds or list(KINDS)
        jobs = [(kind, f) for kind, f in jobs if f in args.only and kind in kinds]
        for kind in KINDS:
            result[kind] = [row for row in old.get(kind, []) if row["formula"] not in args.only or kind not in kinds]
        if not _same_recipe(old, result, [row for kind in KINDS for row in result[kind]]):
            raise SystemExit(f"{args.out} was computed with other settings or GPAW: rerun every check (no --only)")
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.procs) as pool:
        if args.save_dos:
            Path(args.save_dos).mkdir(parents=True, exist_ok=True)
        futures = [pool.submit(_job, kind, f, args.save_dos) for kind, f in jobs]
        for (kind, f), fut in zip(jobs, futures):
            row = fut.result()
            print(json.dumps({"check": kind, **row}), flush=True)
            result[kind].append(row)
    for kind, formulas in KINDS.items():
        result[kind].sort(key=lambda row: list(formulas).index(row["formula"]))
    result["seconds_total"] = round(time.perf_counter() - t0, 1) if not args.only else old.get("seconds_total")
    atomic_write_bytes(args.out, (json.dumps(result, indent=1) + "\n").encode())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
