"""What a run writes: the log (``Log``), JSON files, ``predictions.csv``, ``history.csv`` and the
figures (``parity.png``, ``learning_curve.png``). ``pyplot`` is the project's one lazy matplotlib
import (``data_prep.plotting``), used by every module that draws."""
from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from data_prep.plotting import pyplot
from dosnet_bv.data import Dataset, target_matrix
from dosnet_bv.params import TrainError

__all__ = ["Log", "pyplot", "atomic_path", "prepare_run_folder", "write_text", "write_json", "write_predictions", "write_history", "plot_parity", "plot_learning_curve"]


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path`` (same suffix, so writers that choose the format by
    the suffix work); when the block ends without an error the file gets the user's umask
    permissions and is renamed to ``path`` in one step (``os.replace``), else it is removed.
    A reader thus sees the old file or the new one, never a half-written one (interrupt, kill -9,
    disk full)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


#: What a run folder of train.py may hold; ``metrics.json`` is written last and marks it complete
#: (``cv_config.json`` and ``results/fold<f>.json``: a ``--cv`` run's settings and finished folds).
RUN_FILES = ("metrics.json", "params.json", "model.keras", "scalers.json", "predictions.csv", "history.csv",
             "parity.png", "learning_curve.png", "train.log", "checkpoint.npz", "cv_config.json")
CV_FOLD_FILES = "results/fold*.json"


def prepare_run_folder(out, overwrite: bool) -> None:
    """Check the run folder ``out`` before any work: a new folder (or an empty one) is used as it
    is; an existing non-empty one is refused unless ``overwrite``, which first removes
    ``metrics.json`` (so the folder reads as incomplete until the new run finishes) and then the
    old run's other files, finished CV folds included (the new log starts empty)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise TrainError(f"--out {out} exists and is not empty; pass --overwrite to replace the run in it, "
                         f"or choose a new --out")
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for path in out.glob(CV_FOLD_FILES):
        path.unlink()


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
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
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
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def write_text(path, text: str) -> None:
    """``text`` to ``path`` atomically (``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj) -> None:
    """``obj`` as strict JSON (a NaN or infinity is written as null, never as bare ``NaN``),
    atomically (``atomic_path``)."""
    text = json.dumps(_finite(obj), indent=1, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _finite(obj):
    """``obj`` with every non-finite float replaced by None (JSON null)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
