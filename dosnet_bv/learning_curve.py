"""``--learning-curve``: test MAE of the best DOSnet model and the best baseline against the number
of training materials (nested subsets, several seeds), with power-law fits and the extrapolation
to 10^4 materials (``run_learning_curve``)."""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np

from dosnet_bv import report
from dosnet_bv.ablation import BASELINES, Features, ModelSpec, Study, cn_column, dosnet_key, model_result, run_model
from dosnet_bv.data import Dataset, structure_columns
from dosnet_bv.outputs import Log, atomic_path, write_json, write_text
from dosnet_bv.params import FUSIONS, TARGET_UNITS, TrainError
from dosnet_bv.resume import ResultStore, check_resume

LC_FRACTIONS = (0.05, 0.10, 0.25, 0.50, 1.0)


def training_subsets(material_ids, train_rows, fractions=LC_FRACTIONS, seed: int = 88) -> list:
    """Nested subsets of the training MATERIALS: ``[(fraction, n_materials, rows), ...]``.

    The training materials are shuffled once with ``seed``; a fraction f keeps the first
    ceil(f * M) of them (at least one) and all their samples, so every subset contains the smaller ones.
    """
    train_rows = np.asarray(train_rows)
    ids = np.array(sorted(set(np.asarray(material_ids)[train_rows])))
    order = np.random.default_rng(seed).permutation(len(ids))
    out = []
    for f in fractions:
        k = max(1, int(np.ceil(f * len(ids) - 1e-9)))
        keep = np.isin(np.asarray(material_ids)[train_rows], ids[order[:k]])
        out.append((float(f), k, train_rows[keep]))
    return out


def run_learning_curve(params: dict, data: Dataset, out_dir, n_seeds: int = 3, full: bool = False,
                       from_ablation=None, log: Log | None = None) -> dict:
    """Test MAE of the best DOSnet model and the best baseline trained on 5, 10, 25, 50 and 100 %
    of the training materials (nested subsets, ``training_subsets``; the same validation and test
    rows throughout), ``n_seeds`` seeds each.

    The DOSnet model is params' ``fusion`` and ``structure_families``, or ``best_dosnet`` of an
    ``ablation.json`` (``from_ablation``); the baseline is that file's ``best_baseline``, or else the
    baseline with the lowest validation normalised MAE on the full training set (one seed). Fits
    ``MAE = a N^-b`` (N training samples) per model and target and extrapolates to 10^4 materials.
    Writes ``learning_curve.md``, ``.csv``, ``.json``, ``.png``, ``learning_curve.log`` and
    ``results/`` (one file per point, model and seed, ``lc<percent>__<model>__seed<k>.json``, and per
    baseline candidate, ``select__<baseline>__seed<k>.json``): rerun with the same ``out_dir``, an
    interrupted curve resumes after its finished runs (a damaged file is reported on one line and
    recomputed; other settings, in ``learning_curve_config.json``, are refused).
    """
    from tqdm import tqdm

    t_start = time.time()
    st = Study.start(params, data, out_dir, "learning_curve", full, log)
    out, log, epoch_log, rows, run_params, budget_text = st.out, st.log, st.epoch_log, st.rows, st.params, st.budget
    targets = params["targets"]
    fusion, families, baseline, chosen_by = params["fusion"], list(params["structure_families"]), None, "params.json"
    dosnet = dosnet_key(fusion)
    if from_ablation:
        try:
            ab = json.loads(Path(from_ablation).read_text())
            best = ab["best_dosnet"]
            fusion, families, baseline = best["fusion"], list(best["structure_families"]), ab["best_baseline"]["model"]
            dosnet = str(best["model"])
        except FileNotFoundError:
            raise TrainError(f"--from-ablation: {from_ablation} not found") from None
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise TrainError(f"--from-ablation: {from_ablation} is not an ablation.json ({exc!r})") from None
        if fusion not in FUSIONS or baseline not in BASELINES:
            raise TrainError(f"--from-ablation: {from_ablation} names an unknown model ({fusion!r}, {baseline!r})")
        chosen_by = f"validation split of {from_ablation}"
    structure_columns(data, families)
    seeds = [params["seed"] + k for k in range(n_seeds)]
    check_resume(out / "learning_curve_config.json",
                 {"data_file": data.path, "n_samples": data.n, "seeds": seeds, "params": run_params,
                  "dosnet": {"model": dosnet, "fusion": fusion, "structure_families": families}, "baseline": baseline},
                 log)
    write_json(out / "params.json", params)
    store = ResultStore(out / "results", log)
    features = Features(data, run_params, log)  # the baselines' structure vector: params' families
    log(f"learning curve on {data.path}: {data.n} samples; seeds {', '.join(map(str, seeds))}; {budget_text}")
    log(f"run folder {out}; if interrupted, the same command with --out {out} resumes after the finished runs")
    resumed = 0
    if baseline is None:
        cand = [b for b in BASELINES if (b != "element_cn_mean" or cn_column(data) is not None)
                and (not b.startswith("bv_") or data.bonds is not None)]
        summ = {}
        for b in cand:
            job = store.get(f"select__{b}__seed{params['seed']}",
                            lambda: run_model(ModelSpec(b, "baseline"), params["seed"], run_params, data,
                                              rows["train"], rows, features, epoch_log), model_result)
            resumed += job.resumed
            summ[b] = report.summarise([job.value["scores"]])
        baseline = report.select_best(summ, cand, targets, "val")
        chosen_by += f"; baseline {baseline}: lowest validation nMAE of {', '.join(cand)} on the full training set"
    log(f"models: {dosnet} (structure families {', '.join(families) or '-'}) and {baseline} (chosen by {chosen_by})")
    subsets = training_subsets(data.material_id, rows["train"], LC_FRACTIONS, params["seed"])
    specs = [ModelSpec(dosnet, "dosnet", fusion, families),
             ModelSpec(baseline, "baseline", None, [])]
    points = []
    bar = tqdm(total=len(subsets) * len(specs) * len(seeds), unit="run", desc="runs", disable=None, leave=False)
    try:
        for f, k, tr in subsets:
            for spec in specs:
                per_seed = []
                for seed in seeds:
                    job = store.get(f"lc{f * 100:g}__{spec.model}__seed{seed}",
                                    lambda: run_model(spec, seed, run_params, data, tr, rows, features, epoch_log),
                                    model_result)
                    r = job.value
                    resumed += job.resumed
                    per_seed.append(r)
                    bar.update()
                    note = "from an earlier, interrupted run" if job.resumed else f"{r['seconds']:.0f} s"
                    log(f"{f * 100:5.1f} % ({k} materials, {len(tr)} samples) {spec.model} seed {seed}: test MAE "
                        + ", ".join(f"{t} {r['scores']['test'][t]['mae']:.4f}" for t in targets)
                        + f" ({note}; elapsed {report.duration(time.time() - t_start)})")
                points.append({"fraction": f, "train_materials": k, "train_samples": int(len(tr)),
                               "model": spec.model, "summary": report.summarise([r["scores"] for r in per_seed]),
                               "per_seed": [{"seed": s, **r} for s, r in zip(seeds, per_seed)]})
    finally:
        bar.close()
    n_materials = len(set(data.material_id))
    per_material = data.n / n_materials
    n_10k = 1e4 * per_material
    curves, fits, extrap = {}, {}, []
    for spec in specs:
        pts = [p for p in points if p["model"] == spec.model]
        c = {"n": [p["train_samples"] for p in pts]}
        for t in targets:
            c[t] = {"mean": [p["summary"]["test"][t]["mae"]["mean"] for p in pts],
                    "std": [p["summary"]["test"][t]["mae"]["std"] for p in pts]}
            try:
                a, b = report.fit_power_law(c["n"], c[t]["mean"])
            except ValueError:  # fewer than two points with MAE > 0 (e.g. an exact baseline)
                extrap.append({"model": spec.model, "target": t, "a": None, "b": None})
                continue
            fits[(spec.model, t)] = (a, b)
            e = {"model": spec.model, "target": t, "a": a, "b": b, "mae_at_1e4_materials": a * n_10k ** (-b)}
            try:  # the same from the three largest subsets only: less sensitive to under-trained small ones
                a3, b3 = report.fit_power_law(c["n"][-3:], c[t]["mean"][-3:])
                e.update(a_largest3=a3, b_largest3=b3, mae_at_1e4_materials_largest3=a3 * n_10k ** (-b3))
            except ValueError:
                pass
            extrap.append(e)
        curves[spec.model] = c
    pub = report.published_learning_curve()
    a_p, b_p = report.fit_power_law(np.asarray(pub["fraction"]) * pub["n_total"], pub["mae"])
    elapsed = time.time() - t_start
    result = {"data_file": data.path, "targets": targets, "seeds": seeds, "budget": budget_text, "full": full,
              "dosnet": {"model": dosnet, "fusion": fusion, "structure_families": families}, "baseline": baseline,
              "chosen_by": chosen_by, "fractions": list(LC_FRACTIONS), "points": points,
              "samples_per_material": per_material, "samples_at_1e4_materials": n_10k, "power_laws": extrap,
              "published": {**pub, "power_law": {"a": a_p, "b": b_p}}, "seconds": round(elapsed, 1),
              "runs_resumed": resumed}
    write_json(out / "learning_curve.json", result)
    with atomic_path(out / "learning_curve.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["fraction", "train_materials", "train_samples", "model", "target", "val_mae_mean", "val_mae_std",
                    "test_mae_mean", "test_mae_std", "test_nmae_mean", "test_nmae_std", "seeds"])
        for p in points:
            for t in targets:
                v, te = p["summary"]["val"][t], p["summary"]["test"][t]
                nm = te.get("nmae") or {"mean": float("nan"), "std": float("nan")}
                w.writerow([p["fraction"], p["train_materials"], p["train_samples"], p["model"], t,
                            *(f"{x:.6g}" for x in (v["mae"]["mean"], v["mae"]["std"], te["mae"]["mean"],
                                                   te["mae"]["std"], nm["mean"], nm["std"])), len(seeds)])
    report.plot_learning_curves(out / "learning_curve.png", curves, targets, TARGET_UNITS, fits, pub, n_10k)
    write_text(out / "learning_curve.md", report.learning_curve_markdown(result, n_materials, TARGET_UNITS))
    log(f"learning curve finished in {report.duration(elapsed)}; table: {out / 'learning_curve.md'}")
    return result
