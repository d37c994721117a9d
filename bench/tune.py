"""Trials per hour of ``train.py --tune`` on this machine, on a small budget.

    python bench/tune.py [--data data/embedded.h5] [--trials 4] [--epochs 3] [--folds 3] [--json PATH]

Runs ``dosnet_bv.tune.run_tune`` with the root params.json (its tune section's search space and
pruner; ``--epochs`` and ``--folds`` replace the section's budget, pruning stays on) on ``--data``
in a temporary run folder (SQLite storage, removed afterwards), in this one process. Reports the
trials run, their states, the wall time, trials per hour and seconds per fold-epoch (one trial is
at most folds x epochs fold-epochs; early stopping and pruning make it fewer). The first trial
includes TensorFlow's start-up and tracing, so trials per hour is also given without it. A full
search costs about (tune.epochs / --epochs) times as much per trial.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/embedded.h5", help="data file (default data/embedded.h5: make data)")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3, help="maximum epochs per fold (replaces tune.epochs)")
    ap.add_argument("--folds", type=int, default=3, help="folds per trial (replaces tune.folds)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    from dosnet_bv.data import load_data
    from dosnet_bv.params import load_params, resolve_data_file, validate_params
    from dosnet_bv.tune import run_tune

    params = load_params(ROOT / "params.json")
    params["data_file"] = str(resolve_data_file(args.data))
    params["tune"] = {**params["tune"], "epochs": args.epochs, "folds": args.folds,
                      "patience": min(params["tune"]["patience"], args.epochs)}
    validate_params(params)
    data = load_data(params["data_file"], params)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        summary = run_tune(params, data, Path(tmp) / "tune", trials=args.trials, progress=False)
        wall = time.time() - t0
        import optuna

        study = optuna.load_study(study_name=summary["study"], storage=summary["storage"])
        trials = [t for t in study.trials if t.state.is_finished()]
    durations = [t.duration.total_seconds() for t in trials if t.duration is not None]
    fold_epochs = sum(len(t.intermediate_values) for t in trials)  # one value per fold-epoch
    later = durations[1:]
    out = {"data": params["data_file"], "samples": int(data.n), "trials": len(trials),
           "states": {k: v for k, v in summary["trials"].items() if v},
           "epochs": args.epochs, "folds": args.folds, "wall_s": round(wall, 1),
           "trials_per_hour": round(len(trials) / wall * 3600, 2),
           "trials_per_hour_after_first": round(len(later) / sum(later) * 3600, 2) if later else None,
           "seconds_per_fold_epoch": round(sum(durations) / fold_epochs, 2) if fold_epochs else None,
           "cpu_count": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
