"""``python -m DOSnet.compare FILE``: a DOSnet run's MAE/RMSE beside the published adsorption figures.

FILE is a ``CV_predict.txt`` or ``predict_test.txt`` (two columns: true, predicted, eV). The
published figures (Fung et al., Nat. Commun. 12, 88 (2021); 5-fold CV predictions released in
the upstream repository) live in ``DOSnet/published_adsorption.json`` with their source.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

PUBLISHED_PATH = Path(__file__).with_name("published_adsorption.json")


def published() -> dict:
    """The published figures: ``{"source": ..., "results": {adsorbate: {n, mae, rmse}}}``."""
    return json.loads(PUBLISHED_PATH.read_text())


def read_predictions(path) -> tuple[np.ndarray, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"predictions file not found: {path}")
    try:
        data = np.loadtxt(path, ndmin=2)
    except ValueError as exc:
        raise ValueError(f"{path} is not a two-column numeric file: {exc}") from None
    if data.shape[1] != 2 or data.shape[0] == 0:
        raise ValueError(f"{path} must have two columns (true, predicted) and at least one row; got {data.shape}")
    if not np.all(np.isfinite(data)):
        raise ValueError(f"{path} contains NaN or infinite values")
    return data[:, 0], data[:, 1]


def comparison_table(path, adsorbates=None, label: str | None = None) -> str:
    """Markdown table: this run's n/MAE/RMSE, then the published rows (all or the named ones)."""
    y, p = read_predictions(path)
    err = p - y
    mae, rmse = float(np.mean(np.abs(err))), float(np.sqrt(np.mean(err ** 2)))
    pub = published()
    rows = pub["results"]
    names = adsorbates or list(rows)
    unknown = [a for a in names if a not in rows]
    if unknown:
        raise ValueError(f"unknown adsorbate(s) {unknown}; published: {list(rows)}")
    lines = ["| data | n | MAE (eV) | RMSE (eV) |", "|---|---:|---:|---:|",
             f"| this run: {label or Path(path).name} | {len(y)} | {mae:.4f} | {rmse:.4f} |"]
    lines += [f"| published DOSnet, {a} | {rows[a]['n']} | {rows[a]['mae']:.4f} | {rows[a]['rmse']:.4f} |" for a in names]
    lines.append("")
    lines.append(f"Published figures: {pub['source']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m DOSnet.compare", description=__doc__.splitlines()[0])
    ap.add_argument("predictions", help="CV_predict.txt or predict_test.txt of a DOSnet run")
    ap.add_argument("--adsorbate", action="append", help="published row(s) to show (default: all)")
    ap.add_argument("--out", help="Markdown file to write (default: comparison.md beside the predictions)")
    args = ap.parse_args(argv)
    try:
        table = comparison_table(args.predictions, args.adsorbate)
    except ValueError as exc:
        print(f"DOSnet.compare: error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else Path(args.predictions).with_name("comparison.md")
    out.write_text(table)
    print(table, end="")
    print(f"(written to {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
