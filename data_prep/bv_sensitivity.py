"""How much the choice among bvparm2020's entries moves the bond valence sums.

bvparm2020 lists several entries for many cation-anion pairs; ``data_prep.bond_valence`` takes
the most reliable one by a fixed rule (``BVParams.choose``), and ``BVParams.alternative`` names the
next-preferred entry with other values. For every pair kind (cation and anion with their oxidation
states) this module switches that pair alone to its alternative entry and records the change of the
bond valence sums of the pair's cation sites (``|ΔBVS|``, v.u.), and the largest change of an anion
site. Ni2+-S2- is the largest known case: Liu & Thorp's R0 from complexes (ref. ``j``, 1.937 A) vs
Brese & O'Keeffe's (``b``, 2.04 A) moves a Ni site by about 0.6 v.u.

Usage: ``python -m data_prep.bv_sensitivity --structures structures.json.gz --out bv_sensitivity.csv``
(a file written by ``data_prep.embedded.structures.write_structures_json``; without
``--structures`` the real structures are collected). Nothing here reads an h5 file.
"""
from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import numpy as np
from pymatgen.core import Structure

from data_prep.bond_valence import (DEFAULT_CUTOFF_ANG, BondValenceError, BVParams, pair_kinds,
                                    assign_valences, bond_valence_sums, bond_valence_sums_alternative)

COLUMNS = ("pair", "used_ref", "used_r0_ang", "used_b_ang", "used_tier", "alt_ref", "alt_r0_ang",
           "alt_b_ang", "alt_tier", "n_materials", "n_sites", "mean_abs_dbvs_vu", "max_abs_dbvs_vu",
           "max_abs_dbvs_anion_vu", "max_material")


def _items(records: Iterable) -> Iterable[tuple[str, Structure, list[int] | None]]:
    """(id, structure, valences or None) from tuples or objects with ``material_id``/``structure``
    (and ``provenance["bv_valences"]`` when present)."""
    for i, r in enumerate(records):
        if isinstance(r, tuple):
            mid, structure, valences = (r + (None,))[:3] if len(r) == 2 else r
        else:
            mid, structure = getattr(r, "material_id", str(i)), r.structure
            valences = (getattr(r, "provenance", None) or {}).get("bv_valences")
        yield str(mid), structure, valences


def sensitivity_rows(records: Iterable, cutoff_ang: float = DEFAULT_CUTOFF_ANG,
                     table: BVParams | None = None) -> tuple[list[dict], dict]:
    """One row per cation-anion pair kind met in ``records`` (sorted by pair), and a summary.

    ``records``: ``(material_id, structure[, valences])`` tuples, ``StructureEntry`` or
    ``MaterialRecord`` objects (valences from ``provenance["bv_valences"]``, else ``BVAnalyzer``).
    A material whose sums cannot be computed is skipped and counted in the summary.
    Rows: entry used and alternative (reference id, R0, b, tier; empty when there is no
    alternative), the number of materials and of cation sites of the pair, the mean and maximum
    ``|ΔBVS|`` of those sites, the largest ``|ΔBVS|`` of an anion site, and the material with the
    largest cation change.
    """
    table = table if table is not None else BVParams.default()
    acc: dict[tuple, dict] = defaultdict(lambda: {"materials": set(), "d": [], "d_an": 0.0, "max_mid": ""})
    skipped: dict[str, str] = {}
    n_ok = 0
    for mid, structure, valences in _items(records):
        try:
            if valences is None:
                valences = assign_valences(structure)
            v = np.asarray(valences, dtype=int)
            base = bond_valence_sums(structure, v, cutoff_ang, table)
            for pair in pair_kinds(structure, v):
                alt = bond_valence_sums_alternative(structure, v, cutoff_ang, table, pairs=[pair])
                d = np.abs(alt - base)
                cat_sites = [i for i, site in enumerate(structure)
                             if site.specie.symbol == pair[0] and v[i] == pair[1]]
                an_sites = [i for i, site in enumerate(structure)
                            if site.specie.symbol == pair[2] and v[i] == pair[3]]
                a = acc[pair]
                a["materials"].add(mid)
                dc = d[cat_sites]
                if dc.size and (not a["d"] or dc.max() > max(a["d"])):
                    a["max_mid"] = mid
                a["d"].extend(float(x) for x in dc)
                if an_sites:
                    a["d_an"] = max(a["d_an"], float(d[an_sites].max()))
            n_ok += 1
        except BondValenceError as exc:
            skipped[mid] = str(exc)
    rows = []
    for pair in sorted(acc):
        a = acc[pair]
        used, alt = table.choose(*pair), table.alternative(*pair)
        d = np.asarray(a["d"], dtype=float)
        rows.append({
            "pair": f"{pair[0]}{pair[1]:+d}-{pair[2]}{pair[3]:+d}",
            "used_ref": used.entry.ref_id, "used_r0_ang": used.entry.r0_ang, "used_b_ang": used.entry.b_ang,
            "used_tier": used.tier,
            "alt_ref": alt.entry.ref_id if alt else "", "alt_r0_ang": alt.entry.r0_ang if alt else "",
            "alt_b_ang": alt.entry.b_ang if alt else "", "alt_tier": alt.tier if alt else "",
            "n_materials": len(a["materials"]), "n_sites": int(d.size),
            "mean_abs_dbvs_vu": round(float(d.mean()), 4) if d.size else 0.0,
            "max_abs_dbvs_vu": round(float(d.max()), 4) if d.size else 0.0,
            "max_abs_dbvs_anion_vu": round(a["d_an"], 4),
            "max_material": a["max_mid"],
        })
    summary = {"n_materials": n_ok, "n_skipped": len(skipped), "skipped": skipped, "n_pairs": len(rows),
               "n_pairs_with_alternative": sum(1 for r in rows if r["alt_ref"]),
               "max_abs_dbvs_vu": max((r["max_abs_dbvs_vu"] for r in rows), default=0.0),
               "cutoff_ang": float(cutoff_ang), "table": table.describe()}
    return rows, summary


def write_table(rows: list[dict], path: str | os.PathLike) -> Path:
    """The rows as CSV (``COLUMNS``), sorted by the largest change first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        for r in sorted(rows, key=lambda r: (-float(r["max_abs_dbvs_vu"]), r["pair"])):
            w.writerow(r)
    return path


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - thin command line wrapper
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Sensitivity of the bond valence sums to the bvparm2020 entry.")
    ap.add_argument("--structures", default=None, help="structures file (write_structures_json); "
                                                       "default: collect the real structures")
    ap.add_argument("--out", default="bv_sensitivity.csv")
    ap.add_argument("--cutoff", type=float, default=DEFAULT_CUTOFF_ANG)
    args = ap.parse_args(argv)
    from data_prep.embedded import structures as S

    if args.structures:
        entries = S.read_structures_json(args.structures)
    else:
        entries = S.collect_structures(n_substituted=0, progress=True)
    rows, summary = sensitivity_rows(entries, args.cutoff)
    write_table(rows, args.out)
    summary.pop("skipped")
    print(json.dumps({"out": str(args.out), **summary}, indent=1, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
