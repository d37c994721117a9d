"""What a run writes: the log (``Log``), JSON files, ``predictions.csv``, ``history.csv`` and the
figures (``parity.png``, ``learning_curve.png``). ``pyplot`` is the project's one lazy matplotlib
import (``data_prep.plotting``), used by every module that draws."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from data_prep.plotting import pyplot
from dosnet_bv.data import Dataset, target_matrix

__all__ = ["Log", "pyplot", "write_json", "write_predictions", "write_history", "plot_parity", "plot_learning_curve"]


class Log:
    """Print and append to a log file (``train.log`` of the run folder)."""

    def __init__(self, path=None, quiet: bool = False, printer=None):
        self.path = Path(path) if path else None
        self.quiet = quiet
        self.printer = printer  # e.g. tqdm.write, so that lines and a progress bar do not mix

    def __call__(self, msg: str = "") -> None:
        if not self.quiet:
            if self.printer:
                self.printer(msg)
            else:
                print(msg, flush=True)
        if self.path:
            with open(self.path, "a") as fh:
                fh.write(msg + "\n")


def write_predictions(path, data: Dataset, targets, parts) -> None:
    """``predictions.csv``: material_id, site_index, element, origin, split, [fold,] then
    ``<target>_true`` and ``<target>_pred`` per target. ``parts``: list of
    ``(split label, rows, (len(rows), T) predictions, fold or None)``."""
    with_fold = any(p[3] is not None for p in parts)
    y = target_matrix(data, targets)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["material_id", "site_index", "element", "origin", "split"] + (["fold"] if with_fold else [])
                   + [f"{t}_{k}" for t in targets for k in ("true", "pred")])
        for label, rows, pred, fold in parts:
            for r, p in zip(rows, pred):
                w.writerow([data.material_id[r], int(data.site_index[r]), data.element[r], data.origin[r], label]
                           + ([fold] if with_fold else [])
                           + [f"{v:.6f}" for j in range(len(targets)) for v in (y[r, j], p[j])])


def write_history(path, history: dict) -> None:
    keys = sorted(history)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["epoch"] + keys)
        for e in range(len(history[keys[0]]) if keys else 0):
            w.writerow([e + 1] + [f"{history[k][e]:.6g}" for k in keys])


def plot_parity(path, targets, groups) -> None:
    """One panel per target: predicted vs true. ``groups``: list of (label, y_true (n, T), y_pred (n, T))."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 4.2), squeeze=False)
    colours = {"train": "0.7", "val": "tab:blue", "test": "tab:red"}
    for j, t in enumerate(targets):
        ax = axes[0, j]
        lo, hi = np.inf, -np.inf
        for label, yt, yp in groups:
            if len(yt) == 0:
                continue
            mae = np.mean(np.abs(yp[:, j] - yt[:, j]))
            ax.scatter(yt[:, j], yp[:, j], s=8, alpha=0.6, color=colours.get(label), label=f"{label} (MAE {mae:.3f})")
            lo, hi = min(lo, yt[:, j].min(), yp[:, j].min()), max(hi, yt[:, j].max(), yp[:, j].max())
        if np.isfinite(lo):
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel(f"true {t}")
        ax.set_ylabel(f"predicted {t}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_learning_curve(path, histories: list, best_epochs: list) -> None:
    """Training and validation loss vs epoch (one pair of lines per history: CV folds)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, (h, best) in enumerate(zip(histories, best_epochs)):
        tag = f" fold {k + 1}" if len(histories) > 1 else ""
        epochs = np.arange(1, len(h.get("loss", [])) + 1)
        line, = ax.plot(epochs, h.get("loss", []), label=f"train{tag}")
        if "val_loss" in h:
            ax.plot(epochs, h["val_loss"], ls="--", color=line.get_color(), label=f"val{tag}")
        if best:
            ax.axvline(best, color=line.get_color(), ls=":", lw=0.8, label="best epoch" if k == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (weighted sum over targets)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=1) + "\n")
