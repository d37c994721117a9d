"""``python train.py --params params.json``: train, validate and test DOSnet-BV on a data_prep h5.

    python train.py --params params.json [--data FILE] [--epochs N] [--out RUN]
                    [--fusion F] [--targets T [T ...]] [--seed S]
    python train.py --params params.json --cv [K]            # grouped K-fold CV by material
    python train.py --predict RUN_DIR --data FILE [--out DIR] # predictions with a saved model

Every hyperparameter and path comes from params.json (see ``PARAM_RULES``); flags only override.
The data file is an h5 written by ``python -m data_prep build`` (layout: ``data_prep/build.py``):
per sample the gridded DOS of a site and its neighbours, the site's structure vector and its
bond-valence targets, and a train/val/test split grouped by material. Every scaler (per-channel
DOS, structure columns, targets) is fitted on the training rows only and saved with the model;
training stops early on the validation loss (best weights restored) and the test split is
predicted once, at the end. Same seed, same metrics on a CPU.

Run folder ``<out_dir>/<fusion>-<targets>-<time>/`` (or ``--out``): ``params.json`` (as used),
``model.keras``, ``scalers.json``, ``metrics.json``, ``predictions.csv``, ``history.csv``,
``parity.png``, ``learning_curve.png``, ``train.log``.

For ablations and learning curves: ``data = load_data(path, params)`` once, then
``run_experiment(params, data, out_dir)`` (or ``run_cv``) per configuration; each returns the
metrics dict that it also writes to ``metrics.json``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parent
SPLITS = ("train", "val", "test")
# Names net.py accepts. Repeated here so that params are checked before TensorFlow is imported
# (its import prints to stderr); tests/test_bv_model.py checks they equal net.py's.
BV_TARGETS = ("bvs_vu", "bvs_deviation_vu", "valence")
FUSIONS = ("none", "late", "early", "structure_only")
LR_SCHEDULES = ("dosnet_step", "constant", "cosine")
LOSSES = ("log_cosh", "mse", "mae")


class TrainError(Exception):
    """A user-facing problem (bad params, bad data file): reported on one line, no traceback."""


# =========================================================================== parameters
def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _split_ok(v) -> bool:
    if v == "stored":
        return True
    return (isinstance(v, list) and len(v) == 3 and all(_num(x) and x >= 0 for x in v)
            and abs(sum(v) - 1) < 1e-6 and v[0] > 0 and v[1] > 0)


def _zero_tail_ok(v) -> bool:
    return v is None or (isinstance(v, list) and len(v) == 2 and all(_int(x) and x >= 0 for x in v) and v[0] <= v[1])


#: key -> (check, what the value must be). params.json must hold exactly these keys.
PARAM_RULES: dict = {
    "data_file": (lambda v: isinstance(v, str) and v != "", "a path (string)"),
    "targets": (lambda v: isinstance(v, list) and v and all(isinstance(t, str) for t in v) and len(set(v)) == len(v),
                "a non-empty list of distinct target names"),
    "loss_weights": (lambda v: isinstance(v, dict) and all(_num(w) and w >= 0 for w in v.values()),
                     "an object {target: non-negative number}"),
    "target_scaling": (lambda v: v in ("standard", "none"), "'standard' or 'none'"),
    "fusion": (lambda v: v in FUSIONS, "one of " + ", ".join(FUSIONS)),
    "structure_families": (lambda v: isinstance(v, list) and all(isinstance(f, str) for f in v) and len(set(v)) == len(v),
                           "a list of distinct structure feature family names"),
    "structure_units": (lambda v: isinstance(v, list) and v and all(_int(u) and u > 0 for u in v),
                        "a non-empty list of positive integers"),
    "early_channels": (lambda v: _int(v) and v > 0, "a positive integer"),
    "dropout": (lambda v: _num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "epochs": (lambda v: _int(v) and v > 0, "a positive integer"),
    "batch_size": (lambda v: _int(v) and v > 0, "a positive integer"),
    "loss": (lambda v: v in LOSSES, "one of " + ", ".join(LOSSES)),
    "optimizer": (lambda v: v == "adam", "'adam'"),
    "learning_rate": (lambda v: _num(v) and v > 0, "a positive number"),
    "lr_schedule": (lambda v: v in LR_SCHEDULES, "one of " + ", ".join(LR_SCHEDULES)),
    "early_stopping_patience": (lambda v: _int(v) and v >= 0, "a non-negative integer (0: no early stopping)"),
    "split": (_split_ok, "'stored' or three fractions [train, val, test] summing to 1"),
    "split_seed": (_int, "an integer"),
    "seed": (_int, "an integer"),
    "cv_folds": (lambda v: _int(v) and v >= 2, "an integer >= 2"),
    "cv_val_fraction": (lambda v: _num(v) and 0 < v < 1, "a number in (0, 1)"),
    "channels": (lambda v: _int(v) and v > 0, "a positive integer"),
    "length": (lambda v: _int(v) and v > 0, "a positive integer"),
    "n_neighbours": (lambda v: _int(v) and v >= 0, "a non-negative integer"),
    "zero_tail": (_zero_tail_ok, "null or [start, stop] grid indices"),
    "out_dir": (lambda v: isinstance(v, str) and v != "", "a folder (string)"),
}


def load_params(path) -> dict:
    """Read and check a params.json (``validate_params``)."""
    path = Path(path)
    try:
        params = json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainError(f"params file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainError(f"cannot read params file {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise TrainError(f"params file {path} is not valid JSON: {exc}") from None
    if not isinstance(params, dict):
        raise TrainError(f"params file {path} must hold a JSON object")
    return validate_params(params)


def validate_params(params: dict) -> dict:
    """Check every key against ``PARAM_RULES``; the first problem raises ``TrainError`` naming the key."""
    unknown = sorted(set(params) - set(PARAM_RULES))
    if unknown:
        raise TrainError(f"params: unknown key {unknown[0]!r} (known keys: {', '.join(PARAM_RULES)})")
    for key, (ok, what) in PARAM_RULES.items():
        if key not in params:
            raise TrainError(f"params: missing key {key!r} ({what})")
        if not ok(params[key]):
            raise TrainError(f"params: {key!r} must be {what}, got {json.dumps(params[key])}")
    for key in ("targets", "loss_weights"):
        bad = [t for t in params[key] if t not in BV_TARGETS]
        if bad:
            raise TrainError(f"params: {key!r} has unknown target {bad[0]!r}; expected some of {', '.join(BV_TARGETS)}")
    if params["fusion"] != "none" and not params["structure_families"]:
        raise TrainError(f"params: 'structure_families' is empty but fusion {params['fusion']!r} needs the structure vector")
    return params


# =========================================================================== data
@dataclass
class Dataset:
    """Samples of one data_prep h5, in memory. n samples, L grid points, A atoms, C channels per
    atom, F structure features (all of the file's columns; a run selects families).

    dos: (n, L, A*C) float32, states/eV, atom-major channels (site, nbr1, ...; 9 orbitals each).
    structure: (n, F) float32; structure_labels, structure_families: (F,) names.
    targets: name -> (n,) float64 (bvs_vu and bvs_deviation_vu in valence units, valence in e).
    material_id, element, origin, split: (n,) str; site_index: (n,) int.
    """

    path: str
    dos: np.ndarray
    structure: np.ndarray
    structure_labels: list
    structure_families: list
    targets: dict
    material_id: np.ndarray
    element: np.ndarray
    origin: np.ndarray
    site_index: np.ndarray
    split: np.ndarray
    channel_labels: list

    @property
    def n(self) -> int:
        return len(self.material_id)


def load_data(path, params: dict, resplit: bool = True) -> Dataset:
    """Read a data_prep h5 into numpy arrays and check it against ``params``.

    The one place that reads the data file: a streaming ``tf.data`` reader can replace it. Checks
    the input width (``length``, ``channels``, ``n_neighbours``) and that every sample is finite;
    applies ``zero_tail``; with ``resplit`` and ``split`` = [fractions], re-splits by material
    (``split_seed``), else keeps the stored split.
    """
    from data_prep.build import BuildError, grouped_split
    from data_prep.dataset import open_h5

    try:
        h = open_h5(path)
    except BuildError as exc:
        raise TrainError(f"{exc} (params key 'data_file' or --data)") from None
    try:
        with h:
            need = ("structure_families", "meta/element", "meta/origin", "meta/site_index")
            missing = [k for k in need if k not in h]
            if missing:
                raise TrainError(f"{path} is not a data_prep file: missing {missing}")
            n, length, width = h["dos"].shape
            atoms = 1 + params["n_neighbours"]
            if length != params["length"]:
                raise TrainError(f"params: 'length' is {params['length']} but {path} has {length} grid points per DOS")
            if width != atoms * params["channels"]:
                key = "n_neighbours" if width % params["channels"] == 0 else "channels"
                raise TrainError(f"params: {key!r} does not match {path}: its DOS has {width} channels, params give "
                                 f"{atoms} atoms (1 + n_neighbours) x {params['channels']} channels")
            dos = np.empty((n, length, width), dtype=np.float32)
            step = 256
            for i in range(0, n, step):  # chunk by chunk: bounded memory beyond the result
                dos[i:i + step] = h["dos"][i:i + step]
                if not np.all(np.isfinite(dos[i:i + step])):
                    raise TrainError(f"{path}: DOS of samples {i}..{min(i + step, n) - 1} contains NaN or infinite values")
            labels = list(h["dos"].attrs.get("channel_labels", [f"ch{j}" for j in range(width)]))
            data = Dataset(
                path=str(path), dos=dos, structure=np.asarray(h["structure"][...], dtype=np.float32),
                structure_labels=list(h["structure_labels"].asstr()[...]),
                structure_families=list(h["structure_families"].asstr()[...]),
                targets={t: np.asarray(h[f"targets/{t}"][...], dtype=np.float64) for t in BV_TARGETS},
                material_id=h["meta/material_id"].asstr()[...], element=h["meta/element"].asstr()[...],
                origin=h["meta/origin"].asstr()[...], site_index=np.asarray(h["meta/site_index"][...]),
                split=h["split"].asstr()[...], channel_labels=[str(x) for x in labels])
    except TrainError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise TrainError(f"cannot read {path}: {exc}") from None
    lens = {len(data.structure), len(data.material_id), len(data.element), len(data.split), len(data.site_index),
            *(len(y) for y in data.targets.values())}
    f = data.structure.shape[1]
    if lens != {n} or len(data.structure_labels) != f or len(data.structure_families) != f:
        raise TrainError(f"{path}: arrays disagree in length (dos has {n} samples)")
    if not np.all(np.isfinite(data.structure)):
        raise TrainError(f"{path}: the structure vector contains NaN or infinite values")
    for t in params["targets"]:
        if not np.all(np.isfinite(data.targets[t])):
            raise TrainError(f"{path}: target {t!r} contains NaN or infinite values")
    if params["zero_tail"] is not None:
        lo, hi = params["zero_tail"]
        if hi > length:
            raise TrainError(f"params: 'zero_tail' {params['zero_tail']} reaches past the {length} grid points")
        data.dos[:, lo:hi, :] = 0.0
    if resplit and params["split"] != "stored":
        of = grouped_split(data.material_id, tuple(params["split"]), params["split_seed"])
        data.split = np.array([of[m] for m in data.material_id])
    bad = sorted(set(data.split) - set(SPLITS))
    if bad:
        raise TrainError(f"{path}: unknown split label {bad[0]!r} (expected train, val, test)")
    return data


def structure_columns(data: Dataset, families) -> np.ndarray:
    """Column indices of ``data.structure`` whose family is in ``families`` (file order)."""
    present = set(data.structure_families)
    missing = [f for f in families if f not in present]
    if missing:
        raise TrainError(f"params: 'structure_families' has {missing[0]!r}, which {data.path} does not hold "
                         f"(it has {', '.join(dict.fromkeys(data.structure_families))})")
    return np.array([i for i, f in enumerate(data.structure_families) if f in set(families)], dtype=int)


# =========================================================================== scalers
@dataclass
class Scaler:
    """Standardisation over the last axis, ``(x - mean) / scale``, fitted on training rows only."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, rows, chunk: int = 256) -> "Scaler":
        """Statistics of ``x[rows]`` over every axis but the last (float64, chunked: no big copy)."""
        rows = np.asarray(rows)
        if rows.size == 0:
            raise TrainError("cannot fit a scaler: no training rows")
        s = np.zeros(x.shape[-1])
        s2 = np.zeros(x.shape[-1])
        count = 0
        for i in range(0, len(rows), chunk):
            part = x[rows[i:i + chunk]].reshape(-1, x.shape[-1]).astype(np.float64)
            s += part.sum(axis=0)
            s2 += (part ** 2).sum(axis=0)
            count += part.shape[0]
        mean = s / count
        var = np.maximum(s2 / count - mean ** 2, 0.0)
        std = np.sqrt(var)
        ok = std > 1e-8 * np.maximum(np.abs(mean), 1.0)
        return cls(mean, np.where(ok, std, 1.0))

    @classmethod
    def identity(cls, width: int) -> "Scaler":
        return cls(np.zeros(width), np.ones(width))

    def transform(self, x: np.ndarray, rows=None, chunk: int = 256) -> np.ndarray:
        """A NEW float32 array of the standardised ``x[rows]`` (all rows when None)."""
        rows = np.arange(len(x)) if rows is None else np.asarray(rows)
        out = np.empty((len(rows),) + x.shape[1:], dtype=np.float32)
        for i in range(0, len(rows), chunk):
            out[i:i + chunk] = (x[rows[i:i + chunk]] - self.mean) / self.scale
        return out

    def inverse(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, dtype=np.float64) * self.scale + self.mean

    def as_dict(self, labels) -> dict:
        return {"labels": list(labels), "mean": self.mean.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Scaler":
        return cls(np.asarray(d["mean"], dtype=np.float64), np.asarray(d["scale"], dtype=np.float64))


def fit_scalers(params: dict, data: Dataset, train_rows) -> dict:
    """DOS (per channel), structure (per selected column) and target scalers from ``train_rows``.

    Returns ``{"dos", "structure", "targets": Scaler or None, "structure_columns", "json"}``; the
    ``json`` entry is what ``scalers.json`` stores (labels next to each statistic).
    """
    fusion, targets = params["fusion"], params["targets"]
    cols = structure_columns(data, params["structure_families"]) if fusion != "none" else np.zeros(0, int)
    dos = Scaler.fit(data.dos, train_rows) if fusion != "structure_only" else None
    struct = Scaler.fit(data.structure[:, cols], train_rows) if fusion != "none" else None
    y = target_matrix(data, targets)
    ys = Scaler.fit(y, train_rows) if params["target_scaling"] == "standard" else Scaler.identity(len(targets))
    js = {"dos": dos.as_dict(data.channel_labels) if dos else None,
          "structure": struct.as_dict([data.structure_labels[i] for i in cols]) if struct else None,
          "targets": ys.as_dict(targets), "target_scaling": params["target_scaling"],
          "target_train_mean": y[np.asarray(train_rows)].mean(axis=0).tolist(),
          "n_train_rows": int(len(train_rows))}
    return {"dos": dos, "structure": struct, "targets": ys, "structure_columns": cols, "json": js}


def scalers_from_json(js: dict, data: Dataset) -> dict:
    """Saved scalers (``scalers.json``) for ``data``: structure columns found by label."""
    cols = np.zeros(0, int)
    if js["structure"] is not None:
        where = {lab: i for i, lab in enumerate(data.structure_labels)}
        missing = [lab for lab in js["structure"]["labels"] if lab not in where]
        if missing:
            raise TrainError(f"{data.path} lacks the structure feature {missing[0]!r} that the model was trained on")
        cols = np.array([where[lab] for lab in js["structure"]["labels"]], dtype=int)
    return {"dos": Scaler.from_dict(js["dos"]) if js["dos"] else None,
            "structure": Scaler.from_dict(js["structure"]) if js["structure"] else None,
            "targets": Scaler.from_dict(js["targets"]), "structure_columns": cols, "json": js}


def target_matrix(data: Dataset, targets) -> np.ndarray:
    """(n, T) float64 physical target values, columns in ``targets`` order."""
    return np.stack([data.targets[t] for t in targets], axis=1)


def model_inputs(params: dict, data: Dataset, scalers: dict, rows) -> dict:
    """Standardised inputs of ``rows`` keyed by the network's input names: ``atom{i}_dos``
    (len(rows), L, C) float32 for each atom, ``structure`` (len(rows), F) float32."""
    out = {}
    if params["fusion"] != "structure_only":
        x = scalers["dos"].transform(data.dos, rows)
        c = params["channels"]
        for i in range(1 + params["n_neighbours"]):
            out[f"atom{i + 1}_dos"] = np.ascontiguousarray(x[:, :, i * c:(i + 1) * c])
        del x
    if params["fusion"] != "none":
        out["structure"] = scalers["structure"].transform(data.structure[:, scalers["structure_columns"]], rows)
    return out


# =========================================================================== training
class Log:
    """Print and append to a log file (``train.log`` of the run folder)."""

    def __init__(self, path=None, quiet: bool = False):
        self.path = Path(path) if path else None
        self.quiet = quiet

    def __call__(self, msg: str = "") -> None:
        if not self.quiet:
            print(msg, flush=True)
        if self.path:
            with open(self.path, "a") as fh:
                fh.write(msg + "\n")


def _tf_setup(seed: int) -> None:
    """Fresh Keras state, seeded Python/NumPy/TF generators and deterministic TF ops (CPU)."""
    import keras
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def _predict(model, inputs: dict, targets, batch_size: int) -> np.ndarray:
    """(n, T) network outputs (standardised units), columns in ``targets`` order."""
    out = model.predict(inputs, batch_size=batch_size, verbose=0)
    if not isinstance(out, dict):
        out = {targets[0]: out}
    return np.concatenate([np.asarray(out[t]).reshape(-1, 1) for t in targets], axis=1).astype(np.float64)


def fit_predict(params: dict, data: Dataset, train_rows, val_rows, predict_rows: dict, log: Log) -> dict:
    """Fit scalers on ``train_rows``, train with early stopping on ``val_rows``, then predict.

    ``predict_rows``: name -> row indices to predict after training (e.g. train/val/test).
    Returns ``model``, ``scalers``, ``history`` (dict of per-epoch lists), ``best_epoch`` (1-based),
    ``predictions`` (name -> (len(rows), T) float64 in physical units) and ``seconds`` of training.
    """
    import keras

    import net

    targets = params["targets"]
    scalers = fit_scalers(params, data, train_rows)
    y = target_matrix(data, targets)
    y_scaled = (y - scalers["targets"].mean) / scalers["targets"].scale

    def y_of(rows):
        return {t: y_scaled[rows, j:j + 1].astype(np.float32) for j, t in enumerate(targets)}

    x_tr, x_va = model_inputs(params, data, scalers, train_rows), model_inputs(params, data, scalers, val_rows)
    _tf_setup(params["seed"])
    model = net.compile_model(net.build_model(params, len(scalers["structure_columns"])), params)
    epochs = params["epochs"]
    callbacks = [keras.callbacks.LearningRateScheduler(lambda epoch, lr: net.learning_rate(epoch, params)),
                 _epoch_log(log, epochs, targets, scalers["targets"].scale)]
    if params["early_stopping_patience"] > 0:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=params["early_stopping_patience"],
                                                       restore_best_weights=True))
    t0 = time.time()
    hist = model.fit(x_tr, y_of(train_rows), validation_data=(x_va, y_of(val_rows)), epochs=epochs,
                     batch_size=params["batch_size"], shuffle=True, verbose=0, callbacks=callbacks)
    seconds = time.time() - t0
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    val = history.get("val_loss", [])
    best = int(np.argmin(val)) + 1 if val and params["early_stopping_patience"] > 0 else len(val)
    del x_tr, x_va
    preds = {}
    for name, rows in predict_rows.items():
        if len(rows):
            z = _predict(model, model_inputs(params, data, scalers, rows), targets, params["batch_size"])
            preds[name] = scalers["targets"].inverse(z)
        else:
            preds[name] = np.zeros((0, len(targets)))
    return {"model": model, "scalers": scalers, "history": history, "best_epoch": best,
            "predictions": preds, "seconds": seconds}


def _epoch_log(log: Log, epochs: int, targets, target_scale) -> "keras.callbacks.Callback":  # noqa: F821
    """A Keras callback writing one ``log`` line per epoch (built here: keras is imported lazily)."""
    import keras

    class EpochLog(keras.callbacks.Callback):
        """One log line per epoch: losses, validation MAE per target in physical units, learning rate."""

        def __init__(self, log, epochs, targets, target_scale):
            super().__init__()
            self.log, self.epochs, self.targets, self.scale = log, epochs, targets, target_scale

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.time()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            parts = [f"epoch {epoch + 1:3d}/{self.epochs}", f"loss {logs.get('loss', float('nan')):.4f}",
                     f"val_loss {logs.get('val_loss', float('nan')):.4f}"]
            for j, t in enumerate(self.targets):
                key = next((k for k in (f"val_{t}_mae", "val_mae") if k in logs), None)
                if key:
                    parts.append(f"val MAE {t} {float(logs[key]) * self.scale[j]:.4f}")
            lr = self.model.optimizer.learning_rate
            parts.append(f"lr {float(np.asarray(lr)):.2g}")
            parts.append(f"{time.time() - self.t0:.1f} s")
            self.log("  ".join(parts))

    return EpochLog(log, epochs, targets, target_scale)


# =========================================================================== metrics
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


# =========================================================================== outputs
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


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_parity(path, targets, groups) -> None:
    """One panel per target: predicted vs true. ``groups``: list of (label, y_true (n, T), y_pred (n, T))."""
    plt = _plt()
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
    plt = _plt()
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


def _write_json(path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=1) + "\n")


def _data_counts(data: Dataset, rows_by: dict) -> dict:
    return {k: {"samples": int(len(r)), "materials": int(len(set(data.material_id[r])))} for k, r in rows_by.items()}


# =========================================================================== run modes
def run_experiment(params: dict, data: Dataset, out_dir, log: Log | None = None) -> dict:
    """Train on the train split, stop early on val, predict train/val/test; write the run folder.

    Returns the metrics written to ``metrics.json``: ``splits`` -> split -> target -> MAE, RMSE,
    R², per-element MAE, mean-baseline MAE (and valence accuracy), plus counts and timing.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = log or Log(out / "train.log")
    targets = params["targets"]
    _write_json(out / "params.json", params)
    rows = {s: np.flatnonzero(data.split == s) for s in SPLITS}
    for s in ("train", "val"):
        if not len(rows[s]):
            raise TrainError(f"{data.path}: the {s} split is empty (params key 'split')")
    counts = _data_counts(data, rows)
    log(f"DOSnet-BV: {data.n} samples from {data.path}; fusion {params['fusion']}, targets {', '.join(targets)}; "
        + ", ".join(f"{s} {c['materials']} materials / {c['samples']} samples" for s, c in counts.items()))
    res = fit_predict(params, data, rows["train"], rows["val"], rows, log)
    res["model"].save(out / "model.keras")
    _write_json(out / "scalers.json", res["scalers"]["json"])
    write_history(out / "history.csv", res["history"])
    train_mean = target_matrix(data, targets)[rows["train"]].mean(axis=0)
    metrics = {"data_file": data.path, "fusion": params["fusion"], "targets": targets, "counts": counts,
               "epochs_run": len(res["history"].get("loss", [])), "best_epoch": res["best_epoch"],
               "train_seconds": round(res["seconds"], 1),
               "train_samples_per_s": round(len(rows["train"]) * len(res["history"].get("loss", [])) / max(res["seconds"], 1e-9), 1),
               "splits": {s: metrics_for(targets, data, rows[s], res["predictions"][s], train_mean) for s in SPLITS}}
    _write_json(out / "metrics.json", metrics)
    write_predictions(out / "predictions.csv", data, targets,
                      [(s, rows[s], res["predictions"][s], None) for s in SPLITS])
    y = target_matrix(data, targets)
    plot_parity(out / "parity.png", targets, [(s, y[rows[s]], res["predictions"][s]) for s in SPLITS])
    plot_learning_curve(out / "learning_curve.png", [res["history"]], [res["best_epoch"]])
    log(f"trained {metrics['epochs_run']} epochs in {res['seconds']:.0f} s (best epoch {res['best_epoch']}, "
        f"{metrics['train_samples_per_s']:.0f} samples/s)")
    log(summary_table(metrics["splits"], targets))
    log(f"run folder: {out}")
    return metrics


def cv_splits(material_ids, k: int, val_fraction: float, seed: int) -> list:
    """Grouped K-fold by material: ``[(train_rows, val_rows, test_rows), ...]``, one per fold.

    Materials are shuffled with ``seed`` and dealt, largest first, to the fold with the fewest
    samples so far; inside each fold's training part a ``val_fraction`` of the materials (at least
    one) is held out for early stopping. Every material is in exactly one test fold.
    """
    material_ids = np.asarray(material_ids)
    ids, counts = np.unique(material_ids, return_counts=True)
    if len(ids) < k + 1:
        raise TrainError(f"--cv {k}: needs more than {k} materials, the data have {len(ids)} (params key 'cv_folds')")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    order = order[np.argsort(-counts[order], kind="stable")]
    load, fold_of = np.zeros(k, int), {}
    for i in order:
        f = int(np.argmin(load))
        fold_of[ids[i]] = f
        load[f] += counts[i]
    fold = np.array([fold_of[m] for m in material_ids])
    out = []
    for f in range(k):
        test = np.flatnonzero(fold == f)
        rest_ids = np.array(sorted(set(material_ids[fold != f])))
        n_val = max(1, int(round(val_fraction * len(rest_ids))))
        val_ids = set(rest_ids[np.random.default_rng(seed + 1000 + f).permutation(len(rest_ids))[:n_val]])
        is_val = np.array([m in val_ids for m in material_ids])
        out.append((np.flatnonzero((fold != f) & ~is_val), np.flatnonzero((fold != f) & is_val), test))
    return out


def run_cv(params: dict, data: Dataset, k: int, out_dir, log: Log | None = None) -> dict:
    """Grouped K-fold cross-validation: every sample predicted once, by the model of the fold
    that held its material out. Writes params, metrics (overall and per fold), predictions
    (with the fold), parity plot, learning curves and log; no model is kept."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = log or Log(out / "train.log")
    targets = params["targets"]
    _write_json(out / "params.json", params)
    folds = cv_splits(data.material_id, k, params["cv_val_fraction"], params["seed"])
    log(f"DOSnet-BV {k}-fold CV (grouped by material): {data.n} samples, {len(set(data.material_id))} materials "
        f"from {data.path}; fusion {params['fusion']}, targets {', '.join(targets)}")
    pred = np.full((data.n, len(targets)), np.nan)
    base = np.full((data.n, len(targets)), np.nan)  # the mean predictor of each sample's fold
    fold_metrics, histories, bests, parts = [], [], [], []
    y = target_matrix(data, targets)
    t0 = time.time()
    for f, (tr, va, te) in enumerate(folds):
        log(f"fold {f + 1}/{k}: train {len(tr)}, val {len(va)}, test {len(te)} samples")
        res = fit_predict({**params, "seed": params["seed"] + f}, data, tr, va, {"test": te}, log)
        pred[te] = res["predictions"]["test"]
        train_mean = y[tr].mean(axis=0)
        base[te] = train_mean
        fold_metrics.append({"fold": f + 1, "counts": _data_counts(data, {"train": tr, "val": va, "test": te}),
                             "best_epoch": res["best_epoch"], **metrics_for(targets, data, te, pred[te], train_mean)})
        histories.append(res["history"])
        bests.append(res["best_epoch"])
        parts.append(("test", te, pred[te], f + 1))
        del res
    all_rows = np.arange(data.n)
    metrics = {"data_file": data.path, "fusion": params["fusion"], "targets": targets, "cv_folds": k,
               "seconds": round(time.time() - t0, 1),
               "splits": {"cv": metrics_for(targets, data, all_rows, pred, base)}, "folds": fold_metrics}
    _write_json(out / "metrics.json", metrics)
    write_predictions(out / "predictions.csv", data, targets, parts)
    plot_parity(out / "parity.png", targets, [("test", y, pred)])
    plot_learning_curve(out / "learning_curve.png", histories, bests)
    log(summary_table(metrics["splits"], targets))
    log(f"run folder: {out}")
    return metrics


def predict_run(run_dir, data_path, out_dir=None, log: Log | None = None) -> Path:
    """Predictions for every sample of ``data_path`` with the model and scalers saved in ``run_dir``.

    Writes ``predictions.csv`` (split = the file's stored split) and ``metrics.json`` into
    ``out_dir`` (default ``<run_dir>/predict-<data file stem>``); returns that folder.
    """
    run_dir = Path(run_dir)
    for name in ("params.json", "scalers.json", "model.keras"):
        if not (run_dir / name).is_file():
            raise TrainError(f"--predict: {run_dir / name} not found (is {run_dir} a train.py run folder?)")
    params = load_params(run_dir / "params.json")
    try:
        js = json.loads((run_dir / "scalers.json").read_text())
    except json.JSONDecodeError as exc:
        raise TrainError(f"--predict: {run_dir / 'scalers.json'} is not valid JSON: {exc}") from None
    data = load_data(data_path, params, resplit=False)
    scalers = scalers_from_json(js, data)
    out = Path(out_dir) if out_dir else run_dir / f"predict-{Path(data_path).stem}"
    out.mkdir(parents=True, exist_ok=True)
    log = log or Log(out / "predict.log")
    import keras

    model = keras.models.load_model(run_dir / "model.keras", compile=False)
    targets = params["targets"]
    rows = np.arange(data.n)
    pred = scalers["targets"].inverse(_predict(model, model_inputs(params, data, scalers, rows), targets,
                                               params["batch_size"]))
    labels = [s for s in SPLITS if np.any(data.split == s)]
    write_predictions(out / "predictions.csv", data, targets,
                      [(s, np.flatnonzero(data.split == s), pred[data.split == s], None) for s in labels])
    train_mean = np.asarray(js["target_train_mean"])
    metrics = {"model": str(run_dir), "data_file": str(data_path), "targets": targets,
               "splits": {"all": metrics_for(targets, data, rows, pred, train_mean),
                          **{s: metrics_for(targets, data, np.flatnonzero(data.split == s), pred[data.split == s],
                                            train_mean) for s in labels}}}
    _write_json(out / "metrics.json", metrics)
    log(f"predicted {data.n} samples of {data_path} with {run_dir / 'model.keras'}")
    log(summary_table(metrics["splits"], targets))
    log(f"predictions: {out / 'predictions.csv'}")
    return out


# =========================================================================== command line
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    p = _Parser(prog="train.py", description="Train, validate and test DOSnet-BV on a data_prep h5.")
    p.add_argument("--params", default="params.json", help="experiment parameters (JSON); flags override")
    p.add_argument("--data", help="data file (overrides data_file)")
    p.add_argument("--epochs", type=int, help="maximum epochs (overrides epochs)")
    p.add_argument("--out", help="run folder (default: <out_dir>/<fusion>-<targets>-<time>)")
    p.add_argument("--fusion", help="overrides fusion: " + ", ".join(FUSIONS))
    p.add_argument("--targets", nargs="+", help="overrides targets: some of " + ", ".join(BV_TARGETS))
    p.add_argument("--seed", type=int, help="overrides seed")
    p.add_argument("--cv", type=int, nargs="?", const=0, metavar="K",
                   help="grouped K-fold cross-validation by material (K defaults to cv_folds)")
    p.add_argument("--predict", metavar="RUN_DIR", help="predict --data with the model saved in RUN_DIR")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.predict:
            if not args.data:
                raise TrainError("--predict RUN_DIR needs --data FILE")
            predict_run(args.predict, args.data, args.out)
            return 0
        if args.cv is not None and (args.cv < 0 or args.cv == 1):
            raise TrainError(f"--cv K needs K >= 2, got {args.cv}")
        params = load_params(args.params)
        overrides = {"data_file": args.data, "epochs": args.epochs, "fusion": args.fusion,
                     "targets": args.targets, "seed": args.seed}
        params.update({k: v for k, v in overrides.items() if v is not None})
        if args.cv:
            params["cv_folds"] = args.cv
        validate_params(params)
        data_file = Path(params["data_file"])
        if not data_file.is_absolute() and not data_file.exists() and (ROOT / data_file).exists():
            data_file = ROOT / data_file
        if not data_file.is_file():
            hint = "; build it with: make data" if params["data_file"] == "data/embedded.h5" else ""
            raise TrainError(f"data file not found: {params['data_file']} (params key 'data_file' or --data){hint}")
        data = load_data(data_file, params)
        structure_columns(data, params["structure_families"])  # fail before training on a bad family
        cv = params["cv_folds"] if args.cv is not None else None
        name = f"{params['fusion']}-{'+'.join(params['targets'])}" + (f"-cv{cv}" if cv else "")
        out = Path(args.out) if args.out else Path(params["out_dir"]) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if cv:
            run_cv(params, data, cv, out)
        else:
            run_experiment(params, data, out)
        return 0
    except TrainError as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("train.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
