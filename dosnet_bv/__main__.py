"""``python -m dosnet_bv predict RUN_DIR PATH...``: predictions for your own DFT in one command.

    python -m dosnet_bv predict runs/my-run path/to/run1 path/to/run2/vasprun.xml [--format vasp] [--out DIR]
    python -m dosnet_bv predict runs/my-run mp-1234_dos.json --format pymatgen

Wraps ``python -m data_prep import`` (records in ``OUT/records``), ``python -m data_prep build
--source records`` (``OUT/mine.h5``, the grid of the run's params.json ``data`` section) and
``python train.py --predict RUN_DIR --data OUT/mine.h5`` (``OUT/predict``), then prints one line
per predicted site: the model's prediction beside the true bond valence sum (computed from the
structure). Every error is one line. RUN_DIR: a folder written by ``train.py`` (model.keras,
params.json, scalers.json). Note the method gap: the shipped model is trained on GFN1-xTB DOS.
"""
from __future__ import annotations

import csv
import sys
import tempfile
from pathlib import Path

from dosnet_bv.cli import OneLineParser, run_command
from dosnet_bv.params import TrainError


def _parser():
    p = OneLineParser(prog="python -m dosnet_bv", description="DOSnet-BV predictions for your own DFT")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=OneLineParser)
    q = sub.add_parser("predict", help="vasprun.xml / CompleteDos JSON -> per-site predictions table")
    q.add_argument("run", metavar="RUN_DIR", help="a train.py run folder (model.keras, params.json, scalers.json)")
    q.add_argument("paths", nargs="+", metavar="PATH", help="VASP run folders or vasprun.xml files "
                                                             "(or CompleteDos JSON with --format pymatgen)")
    q.add_argument("--format", choices=("vasp", "pymatgen"), default="vasp")
    q.add_argument("--out", help="folder for records, h5 and predictions (default: a new temporary folder)")
    return p


def predict(run_dir, paths, fmt: str = "vasp", out=None, echo=print) -> list[dict]:
    from data_prep.build import BuildConfig, BuildError, build_h5
    from data_prep.user_dft import import_runs
    from dosnet_bv.outputs import Log
    from dosnet_bv.params import load_params
    from dosnet_bv.runs import predict_run

    run_dir = Path(run_dir)
    if not (run_dir / "params.json").is_file():
        raise TrainError(f"{run_dir} is not a train.py run folder (no params.json)")
    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="dosnet_bv_predict_"))
    r = import_runs(fmt, paths, out / "records")
    for reason in r["failed"].values():
        echo(f"skipped: {reason}")
    if not r["written"]:
        raise TrainError("none of the inputs could be imported (reasons above)")
    params = load_params(run_dir / "params.json")
    try:
        cfg = BuildConfig.from_params(params.get("data", {}))
        h5 = out / "mine.h5"
        build_h5(r["written"], h5, cfg, overwrite=True, n_procs=1, progress=False, source=f"records:{out / 'records'}",
                 migration_cache=out / "records" / "migration_barriers.json")
    except BuildError as exc:
        raise TrainError(str(exc)) from None
    pred_dir = predict_run(run_dir, h5, out / "predict", Log(quiet=True))
    with open(pred_dir / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    targets = params["targets"]
    head = f"{'material':24s} {'site':>4s} {'el':3s} " + " ".join(f"{t + ' true':>14s} {t + ' pred':>14s}" for t in targets)
    echo(head)
    for row in rows:
        echo(f"{row['material_id']:24s} {row['site_index']:>4s} {row['element']:3s} "
             + " ".join(f"{float(row[t + '_true']):14.3f} {float(row[t + '_pred']):14.3f}" for t in targets))
    echo(f"files: {pred_dir} (predictions.csv, metrics.json); the model was trained on GFN1-xTB DOS, "
         "so DFT input crosses a method gap (README)")
    return rows


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    return run_command(lambda: predict(args.run, args.paths, args.format, args.out), prog="python -m dosnet_bv")


if __name__ == "__main__":
    sys.exit(main())
