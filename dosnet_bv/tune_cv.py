"""``--tune --cv K``: a tuned model against the defaults on family-grouped K-fold CV (nested).

The outer folds are those of ``--cv K`` and ``--ablation --cv K`` (``runs.cv_splits`` on the
families, ``split_seed``). For each outer fold the search of ``dosnet_bv.tune`` runs on that fold's
training families only (its own ``tune.folds`` family-grouped inner folds; the outer test fold is
never read by the search), then the defaults (params as given) and the fold's best trial are both
trained on the same rows with the same seeds and scored on the outer test fold, at the ablation's
budget (``ablation.ablation_budget``: quick unless ``--full``). The spread is over (fold, seed)
runs, and the two are also compared fold by fold (mean over seeds), since the folds differ more
than the models.

Run folder: ``fold<f>/`` holds each outer fold's study (``study.db``, ``trials.csv``,
``best_params.json``, plots), ``results/`` one JSON per (model, fold, seed) run; the same command
resumes an interrupted study where it stopped. Outputs: ``tune_cv.json``, ``tune_cv.md``,
``tune_cv.log``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dosnet_bv import report
from dosnet_bv.ablation import ModelSpec, ablation_budget, model_result, run_model
from dosnet_bv.cv_ablation import SUBSETS, site_subsets
from dosnet_bv.data import Dataset
from dosnet_bv.outputs import Log, write_json, write_text
from dosnet_bv.params import TARGET_UNITS, TrainError, validate_params
from dosnet_bv.resume import ResultStore, check_resume
from dosnet_bv.runs import cv_splits

MODELS = ("default", "tuned")


@dataclass(frozen=True)
class FoldChoice:
    """What the search of one outer fold chose: the best trial's number, its mean inner validation
    loss and its hyperparameter values, and how many trials the study finished."""

    fold: int
    trial: int
    val_loss: float
    values: dict
    trials: int


@dataclass(frozen=True)
class Paired:
    """Tuned minus default test MAE of one target, fold by fold (each the mean over seeds): the
    differences (negative: tuned better) and in how many folds the tuned model was better."""

    target: str
    subset: str
    differences: tuple
    tuned_better: int


@dataclass(frozen=True)
class TuneCVResult:
    """The nested comparison: per model a ``report.summarise`` summary over (fold, seed) runs, the
    per-fold choices and the paired differences."""

    k: int
    seeds: tuple
    budget: str
    summaries: dict
    choices: tuple
    paired: tuple
    seconds: float

    def markdown(self, targets: list) -> str:
        head = ["model", "runs"] + [f"{t} MAE {s.replace('test_', '').replace('test', 'all')}"
                                    for t in targets for s in SUBSETS]
        if "valence" in targets:
            head += ["valence right, all", "valence right, cation"]
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for m in MODELS:
            s = self.summaries[m]
            row = [m, str(s["test"][targets[0]]["n_seeds"])]
            row += [report.pm(s.get(sub, {}).get(t, {}).get("mae"), 3) for t in targets for sub in SUBSETS]
            if "valence" in targets:
                row += [report.pm(s["test"]["valence"].get("accuracy"), 3),
                        report.pm(s.get("test_cation", {}).get("valence", {}).get("accuracy"), 3)]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        for p in self.paired:
            where = {"test": "all sites", "test_cation": "cation sites", "test_anion": "anion sites"}[p.subset]
            lines.append(f"- {p.target} on {where}, tuned minus default per fold: "
                         + ", ".join(f"{d:+.3f}" for d in p.differences)
                         + f" {TARGET_UNITS.get(p.target, '')}; tuned better in {p.tuned_better} of {len(p.differences)} folds")
        lines.append("")
        lines.append("| outer fold | trials | best inner val loss | chosen |")
        lines.append("|---:|---:|---:|---|")
        for c in self.choices:
            lines.append(f"| {c.fold + 1} | {c.trials} | {c.val_loss:.4g} | {json.dumps(c.values)} |")
        return "\n".join(lines)


def tuned_spec(params: dict, values: dict) -> ModelSpec:
    """The tuned model as a ``ModelSpec``: params with the trial's values (checked together)."""
    p = validate_params({**params, **values})
    families = [] if p["fusion"] == "none" else list(p["structure_families"])
    return ModelSpec("tuned", "dosnet", p["fusion"], families, p["structure_input"],
                     {k: v for k, v in values.items() if k not in ("fusion", "structure_families", "structure_input")})


def default_spec(params: dict) -> ModelSpec:
    families = [] if params["fusion"] == "none" else list(params["structure_families"])
    return ModelSpec("default", "dosnet", params["fusion"], families, params["structure_input"])


def paired(per_fold: dict, targets: list) -> tuple:
    """``per_fold[model][f]`` = list of that fold's run scores: tuned minus default per fold."""
    out = []
    folds = sorted(set(per_fold["default"]) & set(per_fold["tuned"]))
    for t in targets:
        for subset in ("test", "test_cation"):
            diffs = []
            for f in folds:
                mae = {m: [r[subset][t]["mae"] for r in per_fold[m][f] if r.get(subset, {}).get(t, {}).get("mae")
                           is not None] for m in MODELS}
                if mae["default"] and mae["tuned"]:
                    diffs.append(float(np.mean(mae["tuned"]) - np.mean(mae["default"])))
            if diffs:
                out.append(Paired(t, subset, tuple(round(d, 4) for d in diffs), sum(d < 0 for d in diffs)))
    return tuple(out)


def run_tune_cv(params: dict, data: Dataset, out_dir, k: int, n_seeds: int = 3, trials: int | None = None,
                full: bool = False, log: Log | None = None) -> TuneCVResult:
    """Nested CV: search on each outer fold's training families, then default vs tuned on its test
    fold over ``n_seeds`` seeds. Writes ``tune_cv.json`` / ``tune_cv.md``; resumes."""
    from tqdm import tqdm

    from dosnet_bv.tune import run_tune

    if "tune" not in params:
        raise TrainError("--tune needs a 'tune' section in params.json")
    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = log or Log(out / "tune_cv.log", printer=tqdm.write)
    epoch_log = Log(log.path, quiet=True)
    run_params, budget = ablation_budget(params, full)
    seeds = tuple(params["seed"] + i for i in range(n_seeds))
    folds = cv_splits(data.groups(params["split_by"]), k, params["cv_val_fraction"], params["split_seed"])
    n_trials = trials if trials is not None else params["tune"]["trials"]
    check_resume(out / "tune_cv_config.json",
                 {"data_file": data.path, "n_samples": data.n, "k": k, "split_by": params["split_by"],
                  "split_seed": params["split_seed"], "params": run_params, "trials": n_trials}, log)
    write_json(out / "params.json", params)
    log(f"nested tuning on {data.path}: {data.n} samples, {k} outer folds grouped by {params['split_by']}; per fold "
        f"{n_trials} trials on {params['tune']['folds']} inner folds of its training families (at most "
        f"{params['tune']['epochs']} epochs each), then default and tuned with seeds {', '.join(map(str, seeds))}; "
        f"{budget}")
    log(f"run folder {out}; if interrupted, the same command with --out {out} resumes")
    store = ResultStore(out / "results", log)
    choices, per_fold = [], {m: {} for m in MODELS}
    runs: dict = {m: [] for m in MODELS}
    for f, (train, val, test) in enumerate(folds):
        pool = np.sort(np.concatenate([train, val]))
        # the search trains with the budget's learning-rate schedule too (a cosine over tune.epochs
        # when the quick budget replaced upstream's step schedule, laid out for 60 epochs)
        summary = run_tune(run_params, data, out / f"fold{f}", n_trials, progress=True, pool=pool)
        best = summary.get("best")
        if best is None:
            raise TrainError(f"outer fold {f + 1}: no trial of its search completed (see {out / f'fold{f}' / 'tune.log'})")
        done = sum(v for s, v in summary["trials"].items() if s in ("complete", "pruned", "fail"))
        choices.append(FoldChoice(f, best["trial"], float(best["value"]), best["params"], done))
        specs = {"default": default_spec(run_params), "tuned": tuned_spec(run_params, best["params"])}
        rows = {"train": train, "val": val, **site_subsets(data, test)}
        for m in MODELS:
            for s in seeds:
                job = store.get(f"{m}__fold{f}__seed{s}",
                                lambda: run_model(specs[m], s, run_params, data, train, rows, None, epoch_log),
                                model_result)
                sc = job.value["scores"]
                runs[m].append(sc)
                per_fold[m].setdefault(f, []).append(sc)
                log(f"outer fold {f + 1}, {m}, seed {s}: test MAE "
                    + ", ".join(f"{t} {sc['test'][t]['mae']:.4f}" for t in sc["test"])
                    + (" (resumed)" if job.resumed else f" ({job.value['seconds']:.0f} s)")
                    + f"; elapsed {report.duration(time.time() - t0)}")
    result = TuneCVResult(k, seeds, budget, {m: report.summarise(runs[m]) for m in MODELS}, tuple(choices),
                          paired(per_fold, params["targets"]), round(time.time() - t0, 1))
    write_json(out / "tune_cv.json", {**asdict(result), "data_file": data.path, "split_by": params["split_by"]})
    table = result.markdown(params["targets"])
    write_text(out / "tune_cv.md", f"# Tuned against default on {k}-fold CV by {params['split_by']} (nested)\n\n"
                                   f"{budget}\n\n{table}\n")
    log(table)
    return result
