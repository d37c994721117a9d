"""Is a gap of the embedded PBE records the LCAO basis or the structure? Band edges of committed
records' structures on one k-mesh, with the recipe's LCAO basis and with plane waves.

    python bench/pbe_basis.py [MATERIAL_ID ...] [--kdensity 4] [--ecut 400] [--json PATH]

For each material (default: GeS and SnS of the AFLOW prototype library, the same B16 structure
type; GeS's record has no gap where Materials Project's PBE gives about 1.2 eV) it runs two PBE
SCFs on the record's structure with the same Gamma-centred k-mesh (``--kdensity`` points per
inverse Angstrom) and Fermi-Dirac width (0.05 eV): GPAW LCAO with the recipe's basis and grid
(``pbe.basis_for``, ``pbe.gpaw_h``), and plane waves at ``--ecut`` eV. It prints the band edges
on the mesh (highest occupied and lowest unoccupied band over all k-points; a negative gap is a
band overlap). The same gap from both says the basis is not the cause. Needs the 'compute' extra;
about 15 CPU-minutes for the two defaults.
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

import numpy as np  # noqa: E402

from data_prep.embedded import pbe  # noqa: E402
from data_prep.records import MaterialRecord  # noqa: E402

DEFAULT = ("proto-GeS-AB-oP8-62-c-c", "proto-SnS-AB-oP8-62-c-c")


def band_edges(calc) -> tuple[float, float]:
    """(VBM, CBM) over the calculation's irreducible k-points, for a closed-shell calculation."""
    n_k = len(calc.get_ibz_k_points())
    eig = np.array([calc.get_eigenvalues(kpt=k) for k in range(n_k)])
    n_occ = int(round(calc.get_number_of_electrons())) // 2
    return float(eig[:, n_occ - 1].max()), float(eig[:, n_occ].min())


def edges(record: MaterialRecord, mode: str, kdensity: float, ecut: float) -> dict:
    from gpaw import GPAW, PW
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = AseAtomsAdaptor.get_atoms(record.structure)
    common = dict(xc="PBE", kpts={"density": kdensity, "gamma": True},
                  occupations={"name": "fermi-dirac", "width": 0.05}, txt=os.devnull)
    if mode == "lcao":
        calc = GPAW(mode="lcao", basis=pbe.basis_for(record.structure)[0], h=pbe.gpaw_h(atoms.cell[:]), **common)
    else:
        calc = GPAW(mode=PW(ecut), **common)
    atoms.calc = calc
    t0 = time.process_time()
    atoms.get_potential_energy()
    vbm, cbm = band_edges(calc)
    return {"mode": mode, "vbm_ev": vbm, "cbm_ev": cbm, "gap_ev": cbm - vbm,
            "n_kpoints_ibz": len(calc.get_ibz_k_points()), "cpu_s": round(time.process_time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("materials", nargs="*", default=list(DEFAULT), help="record ids in data_prep/embedded/spectra_pbe")
    ap.add_argument("--records", type=Path, default=ROOT / "data_prep" / "embedded" / "spectra_pbe")
    ap.add_argument("--kdensity", type=float, default=4.0)
    ap.add_argument("--ecut", type=float, default=400.0, help="plane-wave cutoff, eV")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = []
    for mid in args.materials:
        path = args.records / f"{mid}.npz"
        if not path.is_file():
            print(f"pbe_basis: error: no record {path}", file=sys.stderr)
            return 2
        rec = MaterialRecord.from_npz(path)
        for mode in ("lcao", "pw"):
            r = {"material_id": mid, "record_gap_ev": float(rec.spectrum.band_gap_ev), **edges(rec, mode, args.kdensity, args.ecut)}
            rows.append(r)
            print(f"{mid:32s} {mode:4s} gap on the mesh {r['gap_ev']:+.3f} eV (VBM {r['vbm_ev']:.3f}, CBM "
                  f"{r['cbm_ev']:.3f}; {r['n_kpoints_ibz']} k; record's gap {r['record_gap_ev']:.3f}) "
                  f"{r['cpu_s']:.0f} CPU-s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"kdensity": args.kdensity, "ecut_ev": args.ecut, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
