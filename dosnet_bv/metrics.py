"""Scores of predictions: per target MAE, RMSE, R², mean-predictor MAE, per-element MAE and
valence accuracy (``metrics.json``), the plain-text summary table, sample/material counts."""
from __future__ import annotations

import numpy as np

from dosnet_bv.data import Dataset, target_matrix


def target_metrics(target: str, y_true, y_pred, elements, train_mean) -> dict:
    """MAE, RMSE, R² (None when the true values do not vary), MAE of the train-mean predictor
    (``train_mean``: a number, or one per sample in CV), per-element MAE, and for ``valence`` the
    accuracy of predictions rounded to the nearest integer."""
    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    n = int(y_true.size)
    if n == 0:
        return {"n": 0}
    err = y_pred - y_true
    sst = float(np.sum((y_true - y_true.mean()) ** 2))
    out = {"n": n, "mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err ** 2))),
           "r2": float(1 - np.sum(err ** 2) / sst) if sst > 1e-12 else None,
           "mean_baseline_mae": float(np.mean(np.abs(y_true - train_mean)))}
    if target == "valence":
        out["accuracy"] = float(np.mean(np.rint(y_pred) == np.rint(y_true)))
    elements = np.asarray(elements)
    out["per_element_mae"] = {str(e): {"n": int(np.sum(elements == e)), "mae": float(np.mean(np.abs(err[elements == e])))}
                              for e in sorted(set(elements))}
    return out


def metrics_for(targets, data: Dataset, rows, pred: np.ndarray, train_mean: np.ndarray) -> dict:
    """Per target metrics of ``rows``; ``train_mean``: (T,) or (len(rows), T) mean-predictor values."""
    y = target_matrix(data, targets)[rows]
    base = np.broadcast_to(np.asarray(train_mean, float), y.shape)
    return {t: target_metrics(t, y[:, j], pred[:, j], data.element[rows], base[:, j]) for j, t in enumerate(targets)}


def summary_table(metrics: dict, targets) -> str:
    """Plain-text table: one line per target and split."""
    head = f"{'target':18s} {'split':5s} {'n':>6s} {'MAE':>8s} {'RMSE':>8s} {'R2':>7s} {'acc':>6s} {'mean-MAE':>9s}"
    lines = [head, "-" * len(head)]
    for split, per in metrics.items():
        for t in targets:
            m = per.get(t, {"n": 0})
            if not m.get("n"):
                continue
            r2 = f"{m['r2']:7.3f}" if m.get("r2") is not None else f"{'-':>7s}"
            acc = f"{m['accuracy']:6.3f}" if "accuracy" in m else f"{'-':>6s}"
            lines.append(f"{t:18s} {split:5s} {m['n']:6d} {m['mae']:8.4f} {m['rmse']:8.4f} {r2} {acc} "
                         f"{m['mean_baseline_mae']:9.4f}")
    return "\n".join(lines)


def data_counts(data: Dataset, rows_by: dict) -> dict:
    return {k: {"samples": int(len(r)), "materials": int(len(set(data.material_id[r])))} for k, r in rows_by.items()}
