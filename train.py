"""``python train.py --params params.json``: train, validate and test DOSnet-BV on a data_prep h5.

    python train.py --params params.json [--data FILE] [--epochs N] [--out RUN]
                    [--fusion F] [--targets T [T ...]] [--seed S] [--tensorboard]
    python train.py --params params.json --cv [K]            # grouped K-fold CV (by family)
    python train.py --predict RUN_DIR --data FILE [--out DIR] # predictions with a saved model
    python train.py --resume RUN_DIR                         # continue an interrupted single run or --cv
    python train.py --params params.json --ablation [--seeds 3] [--full]   # baselines + ablation table
    python train.py --params params.json --ablation --cv 5 [--models dos_bonds,gbt_structure]  # on unseen families
    python train.py --combine RUN_A RUN_B [...] --out DIR   # one report from --ablation --cv K parts
    python train.py --side-by-side xTB=RUN_A PBE=RUN_B --out FILE.md   # finished studies in one table
    python train.py --params params.json --learning-curve [--from-ablation RUN/ablation.json]
    python train.py --params params.json --learning-curve --cv 5 [--models dos_bonds,bv_fitted]  # on unseen families
    python train.py --params params.json --importance RUN_DIR [--data FILE]  # feature importance on the test split
    python train.py --params params.json --tune [--trials N] [--study NAME] [--storage URL]  # hyperparameter search

This file is the command line only; the work is done by the package ``dosnet_bv`` (one module per
concern: ``params``, ``data``, ``scalers``, ``fit``, ``metrics``, ``outputs``, ``runs``,
``ablation``, ``learning_curve``, ...) and the network is ``net.py``. Every hyperparameter and
path comes from params.json (``dosnet_bv.params.PARAM_RULES``); flags only override. ``--seed``
changes the initialisation and batch order, never the split (``split_seed``, fixed as upstream's).

Run folder ``<out_dir>/<fusion>-<targets>-<time>/`` (or ``--out``): ``params.json`` (as used),
``model.keras``, ``scalers.json``, ``metrics.json``, ``predictions.csv``, ``history.csv``,
``parity.png``, ``learning_curve.png``, ``train.log`` (with ``model.summary()``) and, with
``--tensorboard``, ``tensorboard/``. ``--tune`` (``dosnet_bv.tune``) writes ``<out_dir>/tune-<study>/``
(or ``--out``): ``best_params.json``, ``trials.csv``, the search's plots and its SQLite study.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from dosnet_bv.ablation import QUICK_EPOCHS, QUICK_PATIENCE, run_ablation
from dosnet_bv.cli import OneLineParser, run_command
from dosnet_bv.data import load_data, structure_columns
from dosnet_bv.cv_ablation import CV_MODELS, parse_models
from dosnet_bv.learning_curve import CV_CURVE_MODELS, run_cv_learning_curve, run_learning_curve
from dosnet_bv.outputs import prepare_run_folder
from dosnet_bv.params import BV_TARGETS, FUSIONS, TrainError, load_params, resolve_data_file, validate_params
from dosnet_bv.runs import check_resumable, cv_resumable, predict_run, run_cv, run_experiment, run_importance

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def parse_args(argv=None):
    p = OneLineParser(prog="train.py", description="Train, validate and test DOSnet-BV on a data_prep h5.")
    p.add_argument("--params", default="params.json", help="experiment parameters (JSON); flags override")
    p.add_argument("--data", help="data file (overrides data_file)")
    p.add_argument("--epochs", type=int, help="maximum epochs (overrides epochs)")
    p.add_argument("--out", help="run folder (default: <out_dir>/<fusion>-<targets>-<time>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in an existing --out folder (else an existing, non-empty one is refused)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the interrupted single run in RUN_DIR from its last epoch's checkpoint, or the "
                        "interrupted --cv run after its finished folds (with the params it was started with; --data "
                        "may point to a moved data file)")
    p.add_argument("--fusion", help="overrides fusion: " + ", ".join(FUSIONS))
    p.add_argument("--targets", nargs="+", help="overrides targets: some of " + ", ".join(BV_TARGETS))
    p.add_argument("--seed", type=int, help="overrides seed (initialisation and batch order; the split stays)")
    p.add_argument("--cv", type=int, nargs="?", const=0, metavar="K",
                   help="grouped K-fold cross-validation by family (K defaults to cv_folds); an interrupted one "
                        "in --out resumes after its finished folds")
    p.add_argument("--tensorboard", action="store_true",
                   help="write TensorBoard logs to RUN/tensorboard (as upstream does; costs time)")
    p.add_argument("--predict", metavar="RUN_DIR", help="predict --data with the model saved in RUN_DIR")
    p.add_argument("--ablation", action="store_true",
                   help="baselines, DOSnet fusions and structure families off one at a time, over --seeds seeds "
                        "(default run folder <out_dir>/ablation-<time>; an existing one resumes)")
    p.add_argument("--models", metavar="A,B",
                   help=f"with --ablation --cv K: run only these of the family-grouped ablation's models "
                        f"({', '.join(CV_MODELS)}; default all); more can be added later in the same --out. "
                        f"With --learning-curve --cv K: the curve's models (default {','.join(CV_CURVE_MODELS)})")
    p.add_argument("--combine", nargs="+", metavar="PART",
                   help="one report (cv_ablation.json/.md in --out) from --ablation --cv K runs of different "
                        "--models on the same data, folds and budget (their cv_ablation.json files or run folders)")
    p.add_argument("--side-by-side", nargs="+", metavar="LABEL=RUN",
                   help="one table of finished --ablation --cv runs (e.g. material- vs family-grouped, xTB vs PBE); "
                        "needs --out FILE.md")
    p.add_argument("--learning-curve", action="store_true",
                   help="best DOSnet model and best baseline on 5-100 %% of the training materials; with --cv K "
                        "on every fold of the family-grouped split, for --models")
    p.add_argument("--from-ablation", metavar="ABLATION_JSON",
                   help="with --learning-curve: take the models chosen in this ablation.json")
    p.add_argument("--importance", metavar="RUN_DIR",
                   help="feature importance of the model saved in RUN_DIR on its test split (RUN_DIR/importance/)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per model for --ablation / --learning-curve (default 3)")
    p.add_argument("--full", action="store_true",
                   help=f"--ablation / --learning-curve with params' epochs and patience (default: at most "
                        f"{QUICK_EPOCHS} epochs, patience {QUICK_PATIENCE})")
    p.add_argument("--tune", action="store_true",
                   help="hyperparameter search (Optuna) over params' tune section on family-grouped folds of the "
                        "non-test data; run folder <out_dir>/tune-<study> (or --out); the same command resumes. "
                        "With --cv K: nested, a search in each outer fold, then tuned vs default over --seeds seeds")
    p.add_argument("--trials", type=int, metavar="N",
                   help="with --tune: finished trials the study should reach, all workers together (default tune.trials)")
    p.add_argument("--study", metavar="NAME", help="with --tune: study name (default dosnet-bv)")
    p.add_argument("--storage", metavar="URL",
                   help="with --tune: Optuna storage: a database URL (sqlite:///FILE, postgresql+psycopg2://...) or journal:FILE "
                        "(default: sqlite in the run folder)")
    return p.parse_args(argv)


def check_flags(args) -> str | None:
    """The flag combinations that make sense; returns the study (ablation, learning-curve) or None."""
    if args.cv is not None and (args.cv < 0 or args.cv == 1):
        raise TrainError(f"--cv K needs K >= 2, got {args.cv}")
    if (args.trials is not None or args.study or args.storage) and not args.tune:
        raise TrainError("--trials, --study and --storage go with --tune")
    if args.tune and (args.ablation or args.learning_curve or args.tensorboard):
        raise TrainError("--tune runs alone or with --cv K (no --ablation, --learning-curve, --tensorboard)")
    if args.tune and args.cv is not None and (args.storage or args.study):
        raise TrainError("--tune --cv K keeps one study per outer fold in its run folder (no --storage, --study)")
    if args.trials is not None and args.trials < 1:
        raise TrainError(f"--trials needs at least 1, got {args.trials}")
    study = "ablation" if args.ablation else "learning-curve" if args.learning_curve else None
    if args.ablation and args.learning_curve:
        raise TrainError("--ablation and --learning-curve: run one at a time (--learning-curve --from-ablation "
                         "RUN/ablation.json uses the ablation's choices)")
    if args.models and not ((args.ablation or args.learning_curve) and args.cv is not None):
        raise TrainError("--models goes with --ablation --cv K or --learning-curve --cv K (on unseen families)")
    if args.from_ablation and not args.learning_curve:
        raise TrainError("--from-ablation needs --learning-curve")
    if args.from_ablation and args.cv is not None:
        raise TrainError("--learning-curve --cv K takes its models from --models, not --from-ablation")
    if (args.full or args.seeds != 3) and not (study or (args.tune and args.cv is not None)):
        raise TrainError("--full and --seeds go with --ablation, --learning-curve or --tune --cv K")
    if args.seeds < 1:
        raise TrainError(f"--seeds needs at least 1, got {args.seeds}")
    if args.tensorboard and study:
        raise TrainError("--tensorboard goes with a single run or --cv")
    if args.overwrite and study:
        raise TrainError(f"--overwrite goes with a single run or --cv (--{study} resumes in an existing folder)")
    return study


def resume(args) -> None:
    """``--resume RUN_DIR``: the run's own params.json, its data file (or --data), its checkpoint
    (a single run) or its finished folds (a ``--cv`` run)."""
    others = [f for f, v in (("--params", args.params != "params.json"), ("--epochs", args.epochs),
                             ("--fusion", args.fusion), ("--targets", args.targets), ("--seed", args.seed is not None),
                             ("--cv", args.cv is not None), ("--out", args.out), ("--overwrite", args.overwrite),
                             ("--predict", args.predict), ("--importance", args.importance),
                             ("--ablation", args.ablation), ("--learning-curve", args.learning_curve),
                             ("--combine", args.combine)) if v]
    if others:
        raise TrainError(f"--resume RUN_DIR continues the run with its own params; it cannot be combined with "
                         f"{others[0]}")
    run = Path(args.resume)
    cv = check_resumable(run)
    params = load_params(run / "params.json")
    if args.data:
        params["data_file"] = args.data
    data = load_data(resolve_data_file(params["data_file"]), params)
    if cv:
        run_cv(params, data, params["cv_folds"], run, tensorboard=args.tensorboard)
    else:
        run_experiment(params, data, run, tensorboard=args.tensorboard, resume=True)


def _reads_finished_runs(flag: str, args, models_allowed: bool) -> None:
    """``flag`` only reads finished runs: refuse the flags that would start work (one line)."""
    others = [f for f, v in (("--predict", args.predict), ("--importance", args.importance), ("--cv", args.cv is not None),
                             ("--ablation", args.ablation), ("--learning-curve", args.learning_curve),
                             ("--tune", args.tune), ("--data", args.data),
                             ("--models", args.models and not models_allowed)) if v]
    if others:
        raise TrainError(f"{flag} reads finished runs only; it cannot be combined with {others[0]}")


def dispatch(args) -> None:
    if args.resume:
        resume(args)
        return
    if args.combine:
        from dosnet_bv.cv_ablation import combine

        _reads_finished_runs("--combine", args, models_allowed=False)
        if not args.out:
            raise TrainError("--combine needs --out DIR (where the combined cv_ablation.json and .md go)")
        res = combine(args.combine, args.out)
        print(f"{len(res['models'])} models from {len(args.combine)} parts -> {Path(args.out) / 'cv_ablation.md'}")
        return
    if args.side_by_side:
        from dosnet_bv.cv_ablation import side_by_side

        _reads_finished_runs("--side-by-side", args, models_allowed=True)
        if not args.out:
            raise TrainError("--side-by-side needs --out FILE.md (where the table goes)")
        side_by_side(args.side_by_side, args.out, parse_models(args.models) if args.models else None)
        print(f"{len(args.side_by_side)} studies side by side -> {args.out}")
        return
    if args.predict:
        if not args.data:
            raise TrainError("--predict RUN_DIR needs --data FILE")
        predict_run(args.predict, args.data, args.out)
        return
    if args.importance:
        if args.cv is not None or args.ablation or args.learning_curve or args.tune:
            raise TrainError("--importance RUN_DIR runs alone (no --cv, --ablation, --learning-curve, --tune)")
        run_importance(args.importance, load_params(args.params), args.data, args.out)
        return
    study = check_flags(args)
    params = load_params(args.params)
    overrides = {"data_file": args.data, "epochs": args.epochs, "fusion": args.fusion,
                 "targets": args.targets, "seed": args.seed}
    params.update({k: v for k, v in overrides.items() if v is not None})
    if args.cv:
        params["cv_folds"] = args.cv
    validate_params(params)
    data = load_data(resolve_data_file(params["data_file"]), params)
    structure_columns(data, params["structure_families"])  # fail before training on a bad family
    if args.tune and args.cv is not None:  # nested: a search inside each outer fold, then default vs tuned
        from dosnet_bv.tune_cv import run_tune_cv

        out = Path(args.out) if args.out else Path(params["out_dir"]) / f"tune-cv{params['cv_folds']}"
        run_tune_cv(params, data, out, params["cv_folds"], args.seeds, args.trials, args.full)
        return
    if args.tune:
        from dosnet_bv.tune import run_tune

        run_tune(params, data, args.out, args.trials, args.study, args.storage)
        return
    cv = params["cv_folds"] if args.cv is not None else None
    name = (study or f"{params['fusion']}-{'+'.join(params['targets'])}") + (f"-cv{cv}" if cv else "")
    out = Path(args.out) if args.out else Path(params["out_dir"]) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not study and not (cv and cv_resumable(out) and not args.overwrite):  # an interrupted --cv resumes
        prepare_run_folder(out, args.overwrite)
    if args.ablation and cv:
        from dosnet_bv.cv_ablation import run_cv_ablation

        run_cv_ablation(params, data, out, cv, args.seeds, parse_models(args.models), args.full)
    elif args.ablation:
        run_ablation(params, data, out, args.seeds, args.full)
    elif args.learning_curve and cv:
        run_cv_learning_curve(params, data, out, cv, args.seeds, parse_models(args.models, CV_CURVE_MODELS),
                              args.full)
    elif args.learning_curve:
        run_learning_curve(params, data, out, args.seeds, args.full, args.from_ablation)
    elif cv:
        run_cv(params, data, cv, out, tensorboard=args.tensorboard)
    else:
        run_experiment(params, data, out, tensorboard=args.tensorboard)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: dispatch(args))


if __name__ == "__main__":
    sys.exit(main())
