"""Method gap: models trained on the GFN1-xTB spectra, scored on the PBE spectra of the same sites.

Usage::

    python -m data_prep build --source records data_prep/embedded/spectra_pbe --out data/pbe.h5
    python bench/method_gap.py --xtb data/embedded.h5 --pbe data/pbe.h5 [--models gbt_dos,dos,dos_bonds]
                               [--seeds 1] [--out runs/method-gap]

The two files are joined into one dataset (xTB samples first). Folds are those of
``train.py --ablation --cv K`` on the xTB file (``runs.cv_splits`` over its families, params'
``cv_folds``, ``cv_val_fraction`` and ``split_seed``), so the xTB scores on a whole test fold repeat
that study's. Training and early stopping see xTB samples only; each fold's model then predicts
its test sites twice: with their xTB DOS and, for the sites that also have a PBE record (same
material id and site index), with the PBE DOS. Structure, bonds and targets of a matched site are
the same in both files (checked), so the difference between the two scores is the method gap
alone: what a user crosses when a model trained on the embedded xTB set reads a DFT DOS.

Writes ``method_gap.json`` and ``method_gap.md`` to ``--out``; every (model, fold, seed) result is kept
in ``results/`` and an interrupted study resumes with the same command.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SUBSETS = ("xtb", "pbe", "xtb_cation", "pbe_cation")


def joined(a, b):
    """One ``Dataset`` of ``a``'s samples followed by ``b``'s (same grid, channels and structure
    columns, else a TrainError naming what differs). The bond table is kept only when both have one."""
    from dosnet_bv.data import Dataset
    from dosnet_bv.params import TrainError

    if a.streaming or b.streaming:
        raise TrainError("method gap: both files must fit in memory (params data.in_memory)")
    for what, x, y in (("grid energies", a.energies_ev, b.energies_ev), ("channels", a.channel_labels, b.channel_labels),
                       ("structure columns", a.structure_labels, b.structure_labels)):
        same = np.array_equal(np.asarray(x), np.asarray(y)) if x is not None and y is not None else x is y
        if not same:
            raise TrainError(f"method gap: {a.path} and {b.path} differ in their {what}; build both with one params.json")
    cat = {}
    for f in dataclasses.fields(Dataset):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if f.name == "targets":
            cat[f.name] = {t: np.concatenate([va[t], vb[t]]) for t in va if t in vb}
        elif f.name == "bonds":
            cat[f.name] = type(va).concatenate([va, vb]) if va is not None and vb is not None else None
        elif isinstance(va, np.ndarray) and f.name not in ("energies_ev",):
            cat[f.name] = np.concatenate([va, vb])
        else:
            cat[f.name] = va
    cat["path"] = f"{a.path} + {b.path}"
    return Dataset(**cat)


def matched(a, b) -> tuple[np.ndarray, np.ndarray]:
    """(rows of a, rows of b) of the sites present in both (same material id and site index), with
    identical targets where both files hold one, and identical structure columns (a TrainError names
    the first site that differs)."""
    from dosnet_bv.params import TrainError

    kb = {(m, int(s)): i for i, (m, s) in enumerate(zip(b.material_id, b.site_index))}
    pairs = [(i, kb[(m, int(s))]) for i, (m, s) in enumerate(zip(a.material_id, a.site_index)) if (m, int(s)) in kb]
    ia = np.array([p[0] for p in pairs], dtype=int)
    ib = np.array([p[1] for p in pairs], dtype=int)
    for t in a.targets:
        if t in b.targets and len(ia):
            ya, yb = a.targets[t][ia], b.targets[t][ib]
            bad = np.isfinite(ya) & np.isfinite(yb) & (ya != yb)  # NaN: not computed in that file (e.g. no barrier)
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                raise TrainError(f"method gap: {t} of {a.material_id[ia[j]]} site {a.site_index[ia[j]]} differs "
                                 f"between the files ({ya[j]:g} vs {yb[j]:g}): not the same structure")
    if len(ia) and not np.allclose(a.structure[ia], b.structure[ib], atol=1e-5):
        raise TrainError("method gap: matched sites have different structure vectors: not the same structures")
    return ia, ib


def fold_rows(data, n_a: int, ia: np.ndarray, ib: np.ndarray, test: np.ndarray) -> dict:
    """The scored subsets of one fold: the matched test sites with their xTB DOS and with their
    PBE DOS (rows ``n_a + ib`` of the joined set, in the same order), and their cation sites."""
    on_test = np.isin(ia, test)
    xa, xb = ia[on_test], n_a + ib[on_test]
    cation = data.targets["valence"][xa] > 0 if "valence" in data.targets else np.zeros(len(xa), bool)
    return {"xtb": xa, "pbe": xb, "xtb_cation": xa[cation], "pbe_cation": xb[cation]}


def pooled(runs: list, subset: str, target: str) -> dict:
    """MAE (and for valence the fraction rounded right) over the sites of every fold of one seed,
    then mean ± std over seeds: ``{"n", "mae", "mae_std", "right", "right_std"}``."""
    by_seed: dict = {}
    for r in runs:
        sc = r["scores"].get(subset, {}).get(target)
        if sc and sc.get("n"):
            by_seed.setdefault(r["seed"], []).append(sc)
    out = {"n": 0}
    vals = {"mae": [], "right": []}
    for seed, scs in by_seed.items():
        n = sum(s["n"] for s in scs)
        out["n"] = n
        vals["mae"].append(sum(s["mae"] * s["n"] for s in scs) / n)
        if all(s.get("accuracy") is not None for s in scs):
            vals["right"].append(sum(s["accuracy"] * s["n"] for s in scs) / n)
    for k, v in vals.items():
        if v:
            out[k], out[f"{k}_std"] = float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    return out


def main(argv=None) -> int:
    from dosnet_bv.ablation import Features, ablation_budget, model_result, run_model
    from dosnet_bv.cv_ablation import CV_MODELS, parse_models
    from dosnet_bv.data import load_data
    from dosnet_bv.outputs import Log, write_json, write_text
    from dosnet_bv.params import TrainError, load_params
    from dosnet_bv.resume import ResultStore
    from dosnet_bv.runs import cv_splits

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--xtb", default="data/embedded.h5")
    ap.add_argument("--pbe", required=True)
    ap.add_argument("--params", default="params.json")
    ap.add_argument("--models", default="gbt_dos,dos,dos_bonds")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--out", default="runs/method-gap")
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params)
        models = parse_models(args.models)
        a, b = load_data(args.xtb, params), load_data(args.pbe, params)
        ia, ib = matched(a, b)
        if not len(ia):
            raise TrainError(f"method gap: no site of {args.pbe} is in {args.xtb}")
        data = joined(a, b)
    except TrainError as exc:
        print(f"method_gap: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "method_gap.log")
    run_params, budget = ablation_budget(params)
    k = params["cv_folds"]
    folds = cv_splits(a.groups(params["split_by"]), k, params["cv_val_fraction"], params["split_seed"])
    seeds = [params["seed"] + i for i in range(args.seeds)]
    log(f"{len(ia)} matched sites in {len(set(a.material_id[ia]))} materials, {len(set(a.groups()[ia]))} families; "
        f"{k} folds of {args.xtb} by {params['split_by']}; {budget}")
    store = ResultStore(out / "results", log)
    features = Features(data, run_params, log)
    fams = list(params["structure_families"])
    results: dict = {m: [] for m in models}
    t0 = time.time()
    for m in models:
        for f, (train, val, test) in enumerate(folds):
            sub = fold_rows(data, a.n, ia, ib, test)
            for s in (seeds[:1] if CV_MODELS[m].kind == "baseline" else seeds):
                rows = {"train": train, "val": val, "test": test, **{x: r for x, r in sub.items() if len(r)}}
                job = store.get(f"{m}__fold{f}__seed{s}",
                                lambda: run_model(CV_MODELS[m].spec(fams), s, run_params, data, train, rows, features,
                                                  Log(log.path, quiet=True)), model_result)
                results[m].append({"fold": f, "seed": s, **job.value})
                sc = job.value["scores"]
                log(f"{CV_MODELS[m].label}, fold {f + 1}, seed {s}: bvs_vu MAE whole fold {sc['test']['bvs_vu']['mae']:.3f}"
                    + (f", matched xTB {sc['xtb']['bvs_vu']['mae']:.3f} vs PBE {sc['pbe']['bvs_vu']['mae']:.3f}"
                       if "xtb" in sc else ", no matched site") + f"; elapsed {time.time() - t0:.0f} s")
    targets = params["targets"]
    table = {m: {x: {t: pooled(results[m], x, t) for t in targets} for x in SUBSETS + ("test",)} for m in models}
    write_json(out / "method_gap.json", {"xtb": args.xtb, "pbe": args.pbe, "matched_sites": int(len(ia)),
                                         "matched_materials": int(len(set(a.material_id[ia]))), "budget": budget,
                                         "seeds": seeds, "k": k, "models": table,
                                         "runs": {m: [{x: y for x, y in r.items() if x != "predictions"} for r in rs]
                                                  for m, rs in results.items()}})
    lines = ["| model | sites | bvs_vu MAE, xTB DOS | PBE DOS | cation, xTB | cation, PBE | valence right, xTB | PBE |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in models:
        r = table[m]

        def cell(x, t="bvs_vu", key="mae"):
            v = r[x][t]
            if key not in v:
                return "-"
            return (f"{100 * v[key]:.1f} %" if key == "right" else f"{v[key]:.3f}") + \
                (f" ± {100 * v[key + '_std'] if key == 'right' else v[key + '_std']:.{1 if key == 'right' else 3}f}"
                 if len(seeds) > 1 and CV_MODELS[m].kind != "baseline" else "")
        lines.append(f"| {CV_MODELS[m].label} | {r['xtb']['bvs_vu']['n']} | {cell('xtb')} | {cell('pbe')} | "
                     f"{cell('xtb_cation')} | {cell('pbe_cation')} | {cell('xtb', 'valence', 'right')} | "
                     f"{cell('pbe', 'valence', 'right')} |")
    text = "\n".join(lines)
    write_text(out / "method_gap.md", f"# Method gap: trained on xTB, scored on PBE\n\n{budget}\n\n{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
