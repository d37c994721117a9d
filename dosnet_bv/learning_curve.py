"""``--learning-curve``: test MAE of the best DOSnet model and the best baseline against the number
of training materials (nested subsets, several seeds), with power-law fits and the extrapolation
to 10^4 materials (``run_learning_curve``); ``--learning-curve --cv K``: the same on every fold of
the family-grouped K-fold split, for the models of the family-grouped ablation
(``run_cv_learning_curve``)."""
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
    curves, fits, extrap = power_laws(points, [spec.model for spec in specs], targets, n_10k)
    pub = published_with_fit()
    elapsed = time.time() - t_start
    result = {"data_file": data.path, "targets": targets, "seeds": seeds, "budget": budget_text, "full": full,
              "dosnet": {"model": dosnet, "fusion": fusion, "structure_families": families}, "baseline": baseline,
              "chosen_by": chosen_by, "fractions": list(LC_FRACTIONS), "points": points,
              "samples_per_material": per_material, "samples_at_1e4_materials": n_10k, "power_laws": extrap,
              "published": pub, "seconds": round(elapsed, 1), "runs_resumed": resumed}
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


def power_laws(points: list, models: list, targets, n_10k: float) -> tuple[dict, dict, list]:
    """``MAE = a N^-b`` per model and target, fitted to the points' mean test MAE against their
    training samples (all points, and the three largest subsets alone), extrapolated to ``n_10k``
    samples. Returns (curves for ``report.plot_learning_curves``, {(model, target): (a, b)}, one
    entry per model and target for the result file)."""
    curves, fits, extrap = {}, {}, []
    for model in models:
        pts = [p for p in points if p["model"] == model]
        c = {"n": [p["train_samples"] for p in pts]}
        for t in targets:
            c[t] = {"mean": [p["summary"]["test"][t]["mae"]["mean"] for p in pts],
                    "std": [p["summary"]["test"][t]["mae"]["std"] for p in pts]}
            try:
                a, b = report.fit_power_law(c["n"], c[t]["mean"])
            except ValueError:  # fewer than two points with MAE > 0 (e.g. an exact baseline)
                extrap.append({"model": model, "target": t, "a": None, "b": None})
                continue
            fits[(model, t)] = (a, b)
            e = {"model": model, "target": t, "a": a, "b": b, "mae_at_1e4_materials": a * n_10k ** (-b)}
            try:  # the same from the three largest subsets only: less sensitive to under-trained small ones
                a3, b3 = report.fit_power_law(c["n"][-3:], c[t]["mean"][-3:])
                e.update(a_largest3=a3, b_largest3=b3, mae_at_1e4_materials_largest3=a3 * n_10k ** (-b3))
            except ValueError:
                pass
            extrap.append(e)
        curves[model] = c
    return curves, fits, extrap


def published_with_fit() -> dict:
    """The published DOSnet adsorption learning curve with its power law (for shape)."""
    pub = report.published_learning_curve()
    a, b = report.fit_power_law(np.asarray(pub["fraction"]) * pub["n_total"], pub["mae"])
    return {**pub, "power_law": {"a": a, "b": b}}


#: ``--learning-curve --cv K`` without ``--models``: the bond-aware network, the tree that came
#: closest to it in the family-grouped ablations and the fitted bond valence form
CV_CURVE_MODELS = ("dos_bonds", "gbt_dos_structure", "bv_fitted")


def run_cv_learning_curve(params: dict, data: Dataset, out_dir, k: int, n_seeds: int = 3,
                          models: list | None = None, full: bool = False, log: Log | None = None) -> dict:
    """The learning curve on unseen families: on every fold of the family-grouped K-fold split
    (``runs.cv_splits`` with params' ``split_by``, ``cv_val_fraction`` and ``split_seed``: the
    folds of ``--ablation --cv K``), each model of ``models`` (keys of ``cv_ablation.CV_MODELS``,
    default ``CV_CURVE_MODELS``) trains on nested subsets of the fold's training materials
    (``training_subsets``, 5-100 %) and is scored on the fold's whole test part, all sites and
    cation and anion sites apart; validation rows stay whole. Baselines run once per fold,
    networks per seed; each point is the mean ± std over its (fold, seed) runs, so the spread holds
    both. Power laws as in ``run_learning_curve``. Writes ``learning_curve.md``, ``.csv``,
    ``.json``, ``.png``, ``learning_curve.log`` and ``results/``
    (``lc<percent>__<model>__fold<f>__seed<k>.json``): the same command resumes.
    """
    from tqdm import tqdm

    from dosnet_bv.cv_ablation import CV_MODELS, CVStudy, site_subsets

    t0 = time.time()
    fractions = f"fractions {', '.join(f'{f * 100:g} %' for f in LC_FRACTIONS)} of each fold's training materials; "
    st = CVStudy.start(params, data, out_dir, k, n_seeds, models or CV_CURVE_MODELS, full, log, "learning_curve",
                       {"fractions": list(LC_FRACTIONS)}, fractions)
    out, log, epoch_log, models, run_params, budget = st.out, st.log, st.epoch_log, st.models, st.params, st.budget
    seeds, folds, store, features, families = st.seeds, st.folds, st.store, st.features, st.families
    targets, by = params["targets"], params["split_by"]
    subsets = [training_subsets(data.material_id, train, LC_FRACTIONS, params["seed"]) for train, _, _ in folds]
    # the smallest subsets first: an interrupted curve has its cheap points
    jobs = [(i, m, f, s) for i in range(len(LC_FRACTIONS)) for m in models for f in range(k)
            for s in (seeds[:1] if CV_MODELS[m].kind == "baseline" else seeds)]
    runs: dict = {}
    resumed = 0
    bar = tqdm(total=len(jobs), unit="run", desc="runs", disable=None, leave=False)
    try:
        for n, (i, m, f, s) in enumerate(jobs, 1):
            frac, n_mat, tr = subsets[f][i]
            _, val, test = folds[f]
            rows = {"train": tr, "val": val, **site_subsets(data, test)}
            job = store.get(f"lc{frac * 100:g}__{m}__fold{f}__seed{s}",
                            lambda: run_model(CV_MODELS[m].spec(families), s, run_params, data, tr, rows, features,
                                              epoch_log), model_result)
            resumed += job.resumed
            runs.setdefault((i, m), []).append({"fold": f, "seed": s, "train_materials": n_mat,
                                                "train_samples": int(len(tr)), **job.value})
            bar.update()
            sc = job.value["scores"]["test"]
            log(f"[{n}/{len(jobs)}] {frac * 100:g} % ({n_mat} materials) {CV_MODELS[m].label}, fold {f + 1}, seed {s}: "
                f"test MAE " + ", ".join(f"{t} {sc[t]['mae']:.4f}" for t in targets)
                + (" (resumed)" if job.resumed else f" ({job.value['seconds']:.0f} s)")
                + f"; elapsed {report.duration(time.time() - t0)}")
    finally:
        bar.close()
    points = []
    for (i, m), rs in runs.items():
        points.append({"fraction": LC_FRACTIONS[i], "model": m, "label": CV_MODELS[m].label,
                       "train_materials": float(np.mean([r["train_materials"] for r in rs])),
                       "train_samples": float(np.mean([r["train_samples"] for r in rs])), "runs": len(rs),
                       "summary": report.summarise([r["scores"] for r in rs]),
                       "per_run": [{key: r[key] for key in ("fold", "seed", "train_materials", "train_samples",
                                                            "scores", "seconds")} for r in rs]})
    n_materials = len(set(data.material_id))
    per_material = data.n / n_materials
    n_10k = 1e4 * per_material
    curves, fits, extrap = power_laws(points, models, targets, n_10k)
    pub = published_with_fit()
    result = {"data_file": data.path, "targets": targets, "k": k, "split_by": by, "split_seed": params["split_seed"],
              "seeds": seeds, "budget": budget, "full": full, "models": models, "fractions": list(LC_FRACTIONS),
              "points": points, "samples_per_material": per_material, "samples_at_1e4_materials": n_10k,
              "power_laws": extrap, "published": pub, "seconds": round(time.time() - t0, 1),
              "runs_resumed": resumed}
    write_json(out / "learning_curve.json", result)
    with atomic_path(out / "learning_curve.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["fraction", "train_materials", "train_samples", "model", "target", "subset", "test_mae_mean",
                    "test_mae_std", "runs"])
        for p in points:
            for subset, per_target in p["summary"].items():
                if not subset.startswith("test"):
                    continue
                for t, e in per_target.items():
                    w.writerow([p["fraction"], f"{p['train_materials']:.1f}", f"{p['train_samples']:.1f}", p["model"],
                                t, subset, f"{e['mae']['mean']:.6g}", f"{e['mae']['std']:.6g}", e["n_seeds"]])
    report.plot_learning_curves(out / "learning_curve.png", curves, targets, TARGET_UNITS, fits, pub, n_10k)
    write_text(out / "learning_curve.md", report.cv_learning_curve_markdown(result, n_materials, TARGET_UNITS))
    log(f"learning curve finished in {report.duration(time.time() - t0)}; table: {out / 'learning_curve.md'}")
    return result
