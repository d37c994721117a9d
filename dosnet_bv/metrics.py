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
    known = np.isfinite(y_true)  # predictions on a file without a migration barrier: no truth there
    if not np.all(known):
        y_true, y_pred, elements = y_true[known], y_pred[known], np.asarray(elements)[known]
        train_mean = np.broadcast_to(np.asarray(train_mean, float), known.shape)[known]
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


def material_metrics(y_true, y_pred, material_ids, train_mean) -> dict:
    """Per-material scores of a per-material target carried by several sites (the migration
    barriers): the mean prediction over a material's sites against its one true value."""
    known = np.isfinite(np.asarray(y_true, float))
    y_true, y_pred = np.asarray(y_true, float)[known], np.asarray(y_pred, float)[known]
    mids = np.asarray(material_ids)[known]
    train_mean = np.broadcast_to(np.asarray(train_mean, float), known.shape)[known]
    uniq, inv = np.unique(mids, return_inverse=True)
    count = np.bincount(inv, minlength=len(uniq))
    pred = np.bincount(inv, weights=np.asarray(y_pred, float), minlength=len(uniq)) / count
    true = np.bincount(inv, weights=np.asarray(y_true, float), minlength=len(uniq)) / count
    base = np.bincount(inv, weights=np.asarray(train_mean, float), minlength=len(uniq)) / count
    err = pred - true
    sst = float(np.sum((true - true.mean()) ** 2)) if len(true) else 0.0
    return {"n_materials": int(len(uniq)), "mae": float(np.mean(np.abs(err))) if len(uniq) else None,
            "rmse": float(np.sqrt(np.mean(err ** 2))) if len(uniq) else None,
            "r2": float(1 - np.sum(err ** 2) / sst) if sst > 1e-12 else None,
            "mean_baseline_mae": float(np.mean(np.abs(true - base))) if len(uniq) else None}


def metrics_for(targets, data: Dataset, rows, pred: np.ndarray, train_mean: np.ndarray) -> dict:
    """Per target metrics of ``rows``; ``train_mean``: (T,) or (len(rows), T) mean-predictor values.
    Migration targets (``params.MIGRATION_TARGETS``) also get ``per_material`` (``material_metrics``)."""
    from dosnet_bv.params import MIGRATION_TARGETS

    y = target_matrix(data, targets)[rows]
    base = np.broadcast_to(np.asarray(train_mean, float), y.shape)
    out = {t: target_metrics(t, y[:, j], pred[:, j], data.element[rows], base[:, j]) for j, t in enumerate(targets)}
    for j, t in enumerate(targets):
        if t in MIGRATION_TARGETS and len(rows):
            out[t]["per_material"] = material_metrics(y[:, j], pred[:, j], data.material_id[rows], base[:, j])
    return out


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
            pm = m.get("per_material")
            if pm and pm.get("n_materials"):  # one row per material (mean prediction over its sites)
                r2m = f"{pm['r2']:7.3f}" if pm.get("r2") is not None else f"{'-':>7s}"
                lines.append(f"{'  per material':18s} {split:5s} {pm['n_materials']:6d} {pm['mae']:8.4f} "
                             f"{pm['rmse']:8.4f} {r2m} {'-':>6s} {pm['mean_baseline_mae']:9.4f}")
    return "\n".join(lines)


def data_counts(data: Dataset, rows_by: dict) -> dict:
    return {k: {"samples": int(len(r)), "materials": int(len(set(data.material_id[r])))} for k, r in rows_by.items()}
