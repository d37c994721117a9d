"""``python train.py --params params.json``: train, validate and test DOSnet-BV on a data_prep h5.

    python train.py --params params.json [--data FILE] [--epochs N] [--out RUN]
                    [--fusion F] [--targets T [T ...]] [--seed S]
    python train.py --params params.json --cv [K]            # grouped K-fold CV by material
    python train.py --predict RUN_DIR --data FILE [--out DIR] # predictions with a saved model
    python train.py --params params.json --ablation [--seeds 3] [--full]   # baselines + ablation table
    python train.py --params params.json --learning-curve [--from-ablation RUN/ablation.json]
    python train.py --params params.json --importance RUN_DIR [--data FILE]  # feature importance on the test split

Every hyperparameter and path comes from params.json (see ``PARAM_RULES``); flags only override.
The data file is an h5 written by ``python -m data_prep build`` (layout: ``data_prep/build.py``):
per sample the gridded DOS of a site and its neighbours, the site's structure vector and its
bond-valence targets, and a train/val/test split grouped by material. Every scaler (per-channel
DOS, structure columns, targets) is fitted on the training rows only and saved with the model;
training stops early on the validation loss (best weights restored) and the test split is
predicted once, at the end. Same seed, same metrics on a CPU. A file too large for memory is
streamed through ``tf.data`` (params ``data``, ``DOSnet/streaming.py``); ``distribute`` trains on several
devices or machines (``DOSnet/distribute.py``); README, section Scaling.

Run folder ``<out_dir>/<fusion>-<targets>-<time>/`` (or ``--out``): ``params.json`` (as used),
``model.keras``, ``scalers.json``, ``metrics.json``, ``predictions.csv``, ``history.csv``,
``parity.png``, ``learning_curve.png``, ``train.log``.

For ablations and learning curves: ``data = load_data(path, params)`` once, then
``run_experiment(params, data, out_dir)`` (or ``run_cv``) per configuration; each returns the
metrics dict that it also writes to ``metrics.json``. ``--ablation`` (``run_ablation``) and
``--learning-curve`` (``run_learning_curve``) do this for the baselines and DOSnet variants and
write ``ablation.md``/``.json``/``.png`` and ``learning_curve.md``/``.csv``/``.json``/``.png``
(section "ablation and learning curve" below).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from DOSnet import report

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


#: Keys of the ``data`` section that say how train.py reads the file (``DOSnet/streaming.py``). The section
#: may also hold ``python -m data_prep build`` keys (grid, n_neighbours, ...): build reads those
#: and ignores these (``data_prep.build.TRAIN_READ_KEYS``); train.py ignores the build keys.
DATA_READ_KEYS = ("in_memory", "block_samples", "shuffle_buffer")
DISTRIBUTE = ("none", "mirrored", "multi_worker")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def _data_ok(v) -> bool:
    if not isinstance(v, dict) or set(DATA_READ_KEYS) - set(v):
        return False
    from data_prep.build import BuildConfig

    if set(v) - set(DATA_READ_KEYS) - set(BuildConfig().as_dict()):
        return False
    return ((v["in_memory"] == "auto" or isinstance(v["in_memory"], bool)) and _int(v["block_samples"])
            and v["block_samples"] > 0 and _int(v["shuffle_buffer"]) and v["shuffle_buffer"] >= 0)


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
    "data": (_data_ok, "an object with in_memory ('auto', true or false), block_samples (a positive integer) and "
                       "shuffle_buffer (a non-negative integer), and optionally data_prep build keys"),
    "distribute": (lambda v: v in DISTRIBUTE, "one of " + ", ".join(DISTRIBUTE)),
    "precision": (lambda v: v in PRECISIONS, "one of " + ", ".join(PRECISIONS)),
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
    "importance_window_ev": (lambda v: _num(v) and v > 0, "a positive number (eV)"),
    "importance_step_ev": (lambda v: _num(v) and v > 0, "a positive number (eV)"),
    "importance_repeats": (lambda v: _int(v) and v >= 2, "an integer >= 2"),
    "importance_ig_steps": (lambda v: _int(v) and v >= 1, "a positive integer"),
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

    dos: (n, L, A*C) float32, states/eV, atom-major channels (site, nbr1, ...; 9 orbitals each);
    a ``stream.H5DOS`` (read on demand, same indexing) when the run streams (``data.in_memory``).
    structure: (n, F) float32; structure_labels, structure_families: (F,) names.
    targets: name -> (n,) float64 (bvs_vu and bvs_deviation_vu in valence units, valence in e).
    material_id, element, origin, split: (n,) str; site_index: (n,) int.
    energies_ev: (L,) energies of the grid points relative to the reference level (the file's
    ``grid`` attribute; None if absent), sigma_ev: its smearing width.
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
    energies_ev: np.ndarray | None = None  # (L,) eV from the file's grid; None when it has none
    sigma_ev: float | None = None  # the grid's smearing width
    reading: str = "in memory"  # how the DOS is read (``stream.decide_in_memory``'s reason)

    @property
    def n(self) -> int:
        return len(self.material_id)

    @property
    def streaming(self) -> bool:
        """True when ``dos`` is read from the file on demand (``stream.H5DOS``)."""
        return not isinstance(self.dos, np.ndarray)


def load_data(path, params: dict, resplit: bool = True) -> Dataset:
    """Read a data_prep h5 into numpy arrays and check it against ``params``.

    The one place that reads the data file. Checks the input width (``length``, ``channels``,
    ``n_neighbours``) and that every sample is finite; applies ``zero_tail``; with ``resplit`` and
    ``split`` = [fractions], re-splits by material (``split_seed``), else keeps the stored split.
    The DOS is loaded unless ``data.in_memory`` (``stream.decide_in_memory``) says to stream it:
    then ``dos`` is a ``stream.H5DOS`` that reads samples on demand (zero_tail and the finiteness
    check applied per read) and everything else is loaded (a few hundred bytes per sample).
    """
    from DOSnet import streaming as stream
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
            in_memory, reading = stream.decide_in_memory(params["data"]["in_memory"], n * length * width * 4)
            dos = np.empty((n, length, width), dtype=np.float32) if in_memory else None
            step = 256
            for i in range(0, n if in_memory else 0, step):  # chunk by chunk: bounded memory beyond the result
                dos[i:i + step] = h["dos"][i:i + step]
                if not np.all(np.isfinite(dos[i:i + step])):
                    raise TrainError(f"{path}: DOS of samples {i}..{min(i + step, n) - 1} contains NaN or infinite values")
            labels = list(h["dos"].attrs.get("channel_labels", [f"ch{j}" for j in range(width)]))
            energies, sigma = None, None
            if "grid" in h.attrs:
                from data_prep.layout import EnergyGrid

                grid = EnergyGrid.from_dict(json.loads(h.attrs["grid"]))
                if grid.n_points == length:
                    energies, sigma = grid.energies_ev, grid.sigma_ev
            data = Dataset(
                path=str(path), dos=dos, structure=np.asarray(h["structure"][...], dtype=np.float32),
                structure_labels=list(h["structure_labels"].asstr()[...]),
                structure_families=list(h["structure_families"].asstr()[...]),
                targets={t: np.asarray(h[f"targets/{t}"][...], dtype=np.float64) for t in BV_TARGETS},
                material_id=h["meta/material_id"].asstr()[...], element=h["meta/element"].asstr()[...],
                origin=h["meta/origin"].asstr()[...], site_index=np.asarray(h["meta/site_index"][...]),
                split=h["split"].asstr()[...], channel_labels=[str(x) for x in labels],
                energies_ev=energies, sigma_ev=sigma, reading=reading)
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
        if not data.streaming:
            data.dos[:, lo:hi, :] = 0.0
    if data.streaming:
        data.dos = stream.H5DOS(path, params["zero_tail"])
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
    clip: float | None = None  # standardised values are clipped to [-clip, clip] when set

    @classmethod
    def fit(cls, x: np.ndarray, rows, chunk: int = 256, clip: float | None = None) -> "Scaler":
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
        return cls(mean, np.where(ok, std, 1.0), clip)

    @classmethod
    def identity(cls, width: int) -> "Scaler":
        return cls(np.zeros(width), np.ones(width))

    def transform(self, x: np.ndarray, rows=None, chunk: int = 256) -> np.ndarray:
        """A NEW float32 array of the standardised ``x[rows]`` (all rows when None)."""
        rows = np.arange(len(x)) if rows is None else np.asarray(rows)
        out = np.empty((len(rows),) + x.shape[1:], dtype=np.float32)
        for i in range(0, len(rows), chunk):
            out[i:i + chunk] = (x[rows[i:i + chunk]] - self.mean) / self.scale
        if self.clip is not None:
            np.clip(out, -self.clip, self.clip, out=out)
        return out

    def inverse(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, dtype=np.float64) * self.scale + self.mean

    def as_dict(self, labels) -> dict:
        return {"labels": list(labels), "mean": self.mean.tolist(), "scale": self.scale.tolist(), "clip": self.clip}

    @classmethod
    def from_dict(cls, d: dict) -> "Scaler":
        return cls(np.asarray(d["mean"], dtype=np.float64), np.asarray(d["scale"], dtype=np.float64), d.get("clip"))


#: Standardised structure features are clipped to +-this many training standard deviations. Some
#: columns are almost constant in training (e.g. the Gaussian-expansion bins below 1 A, non-zero
#: only for the few N-H / O-H crystals): ammonia's N-H bonds put 4,000 sigma into ``gauss_0.4``
#: and, unclipped, drove its test predictions to -300 v.u.
STRUCTURE_CLIP: float = 10.0


def fit_scalers(params: dict, data: Dataset, train_rows) -> dict:
    """DOS (per channel), structure (per selected column) and target scalers from ``train_rows``.

    Returns ``{"dos", "structure", "targets": Scaler or None, "structure_columns", "json"}``; the
    ``json`` entry is what ``scalers.json`` stores (labels next to each statistic).
    """
    fusion, targets = params["fusion"], params["targets"]
    cols = structure_columns(data, params["structure_families"]) if fusion != "none" else np.zeros(0, int)
    dos = Scaler.fit(data.dos, train_rows) if fusion != "structure_only" else None
    struct = (Scaler.fit(data.structure[:, cols], train_rows, clip=STRUCTURE_CLIP)
              if fusion != "none" else None)
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

    from DOSnet import distribute
    import net

    strategy = _strategy(params)  # first: a multi-worker strategy must precede every TF operation
    targets = params["targets"]
    with _stream_errors(data, data.streaming):
        scalers = fit_scalers(params, data, train_rows)
    y = target_matrix(data, targets)
    y_scaled = (y - scalers["targets"].mean) / scalers["targets"].scale
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    # tf.data input when streaming, and on several replicas (equal, non-empty per-replica batches)
    streaming = params["fusion"] != "structure_only" and (data.streaming or replicas > 1)
    log(f"input: {data.reading if data.streaming else 'in memory'}; {distribute.describe(strategy)}")

    def y_of(rows):
        return {t: y_scaled[rows, j:j + 1].astype(np.float32) for j, t in enumerate(targets)}

    if not streaming:
        x_tr, x_va = model_inputs(params, data, scalers, train_rows), model_inputs(params, data, scalers, val_rows)
    _tf_setup(params["seed"])
    n_structure = len(scalers["structure_columns"])
    with _model_scope(strategy, params["precision"]):
        model = net.compile_model(_build(params, n_structure), params)
    if streaming:
        x_tr = _stream(params, data, scalers, train_rows, y_scaled, True, replicas)
        x_va = _stream(params, data, scalers, val_rows, y_scaled, False, replicas)
        fit_data = {"x": x_tr, "validation_data": x_va, "shuffle": False}  # the stream shuffles
    else:
        fit_data = {"x": x_tr, "y": y_of(train_rows), "validation_data": (x_va, y_of(val_rows)),
                    "batch_size": params["batch_size"], "shuffle": True}
    epochs = params["epochs"]
    callbacks = [keras.callbacks.LearningRateScheduler(lambda epoch, lr: net.learning_rate(epoch, params)),
                 _epoch_log(log, epochs, targets, scalers["targets"].scale)]
    if params["early_stopping_patience"] > 0:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=params["early_stopping_patience"],
                                                       restore_best_weights=True))
    t0 = time.time()
    with _stream_errors(data, streaming):
        hist = model.fit(**fit_data, epochs=epochs, verbose=0, callbacks=callbacks)
    seconds = time.time() - t0
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    val = history.get("val_loss", [])
    best = int(np.argmin(val)) + 1 if val and params["early_stopping_patience"] > 0 else len(val)
    del x_tr, x_va, fit_data
    predictor, pred_replicas = model, replicas
    if distribute.worker_of(strategy)[1] > 1:  # each worker predicts every row alone: no collectives, row order kept
        pred_replicas = 1
        with _model_scope(None, params["precision"]):
            predictor = _build(params, n_structure)
        predictor.set_weights(model.get_weights())
    preds = {}
    for name, rows in predict_rows.items():
        if not len(rows):
            preds[name] = np.zeros((0, len(targets)))
        elif streaming:
            rows = np.asarray(rows)
            order = np.argsort(rows, kind="stable")  # the stream yields sorted rows
            with _stream_errors(data, True):
                z = _predict(predictor, _stream(params, data, scalers, rows, None, False, pred_replicas), targets,
                             params["batch_size"])
            preds[name] = np.empty_like(z)
            preds[name][order] = scalers["targets"].inverse(z)
        else:
            z = _predict(predictor, model_inputs(params, data, scalers, rows), targets, params["batch_size"])
            preds[name] = scalers["targets"].inverse(z)
    return {"model": model, "scalers": scalers, "history": history, "best_epoch": best,
            "predictions": preds, "seconds": seconds}


def _strategy(params: dict):
    """The run's ``tf.distribute`` strategy (``DOSnet/distribute.py``; None for ``distribute`` none)."""
    from DOSnet import distribute

    try:
        return distribute.strategy_for(params["distribute"])
    except distribute.DistributeError as exc:
        raise TrainError(str(exc)) from None


@contextmanager
def _model_scope(strategy, precision: str):
    """Build and compile inside: the strategy's scope and the ``precision`` dtype policy."""
    import keras

    old = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        with strategy.scope() if strategy is not None else nullcontext():
            yield
    finally:
        keras.mixed_precision.set_global_policy(old)


def _build(params: dict, n_structure: int):
    """``net.build_model``; under a mixed precision policy its outputs are cast to float32 (a
    float16 regression output would round the predictions to 3 significant digits)."""
    import keras

    import net

    model = net.build_model(params, n_structure)
    if params["precision"] == "float32":
        return model
    outputs = {t: keras.layers.Activation("linear", dtype="float32", name=f"{t}_float32")(model.outputs[j])
               for j, t in enumerate(model.output_names)}
    return keras.Model(model.inputs, {t: outputs[t] for t in params["targets"]}, name=model.name)


def _stream(params: dict, data: Dataset, scalers: dict, rows, y_scaled, shuffle: bool, replicas: int = 1):
    """``stream.input_dataset`` of ``rows`` (targets when ``y_scaled`` is given). Training
    (``shuffle``) on several replicas drops the last partial batch of each epoch; other passes use
    ``stream.safe_batch_size`` so that no replica gets an empty batch."""
    from DOSnet import streaming as stream

    cols = scalers["structure_columns"]
    structure = data.structure[:, cols] if params["fusion"] != "none" else None
    bsz = params["batch_size"] if shuffle else stream.safe_batch_size(len(rows), params["batch_size"], replicas)
    return stream.input_dataset(params, data.dos, scalers, rows, structure, y_scaled, shuffle, params["seed"], bsz,
                                drop_remainder=shuffle and replicas > 1)


@contextmanager
def _stream_errors(data: Dataset, streaming: bool):
    """Bad data met while streaming (``stream.StreamError``, also when raised inside tf.data) ->
    one-line ``TrainError``."""
    if not streaming:
        yield
        return
    import tensorflow as tf

    from DOSnet import streaming as stream

    try:
        yield
    except stream.StreamError as exc:
        raise TrainError(str(exc)) from None
    except tf.errors.OpError as exc:
        line = next((ln.strip() for ln in str(exc).splitlines() if "StreamError:" in ln), None)
        if line is None:
            raise
        raise TrainError(f"while streaming {data.path}: {line.split('StreamError:')[-1].strip()}") from None


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
    Under ``distribute`` multi_worker the chief writes ``out_dir``, worker i ``out_dir/worker<i>``.
    """
    from DOSnet import distribute

    out = Path(out_dir)
    worker = distribute.worker_of(_strategy(params))
    if worker[0] > 0:
        out = out / f"worker{worker[0]}"
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
               "input": data.reading, "distribute": params["distribute"],
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
    streaming = data.streaming and params["fusion"] != "structure_only"
    with _stream_errors(data, streaming):
        inputs = _stream(params, data, scalers, rows, None, False) if streaming else \
            model_inputs(params, data, scalers, rows)
        pred = scalers["targets"].inverse(_predict(model, inputs, targets, params["batch_size"]))
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


# =========================================================================== feature importance
def run_importance(run_dir, params: dict, data_path=None, out_dir=None, log: Log | None = None) -> dict:
    """``--importance RUN_DIR``: feature importance of the model saved in ``run_dir`` on its test
    split (the methods are ``DOSnet/importance.py``; this decides what they see).

    The run folder gives the model, its scalers and its params (data file, split, targets);
    ``params`` (``--params``) gives the ``importance_*`` settings and any key the run's params lack
    (added after the run was made); ``data_path`` (``--data``) replaces the run's data file. The
    test rows are the run's: the file's split, re-split as in training when the run's ``split`` is
    fractions. Every target of the run is explained. Reference
    DOS (occlusion fill and integrated-gradients baseline): the mean over the training rows of the
    DOS at each energy and channel, standardised; structure baseline: each column's training mean
    (0 after standardisation). Writes ``importance.md``, ``importance.json``, ``importance.log``,
    CSVs and figures into ``out_dir`` (default ``<run_dir>/importance``).
    """
    import keras

    from data_prep.layout import GAP_THRESHOLD_EV, N_ORBITALS, ORBITAL_GROUPS, EnergyGrid, atom_roles
    from DOSnet import importance

    t_start = time.time()
    run_dir = Path(run_dir)
    for name in ("params.json", "scalers.json", "model.keras"):
        if not (run_dir / name).is_file():
            raise TrainError(f"--importance: {run_dir / name} not found (is {run_dir} a train.py run folder?)")
    try:
        raw = json.loads((run_dir / "params.json").read_text())
        js = json.loads((run_dir / "scalers.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TrainError(f"--importance: cannot read the run folder {run_dir}: {exc}") from None
    keys = [k for k in PARAM_RULES if k.startswith("importance_")]  # --params' settings
    missing = {k: v for k, v in params.items() if k not in raw}  # keys added after the run was made
    run_params = validate_params({**missing, **raw, **{k: params[k] for k in keys}})
    path = Path(data_path or run_params["data_file"])
    if not path.is_absolute() and not path.exists() and (ROOT / path).exists():
        path = ROOT / path
    if not path.is_file():
        raise TrainError(f"--importance: data file not found: {path} (the run's data_file, or --data FILE)")
    data = load_data(path, run_params)
    scalers = scalers_from_json(js, data)
    rows = {s: np.flatnonzero(data.split == s) for s in SPLITS}
    fusion, targets, c = run_params["fusion"], run_params["targets"], run_params["channels"]
    if not len(rows["test"]) or (fusion != "structure_only" and not len(rows["train"])):
        raise TrainError(f"--importance: {path} needs test rows (to explain) and training rows (the reference DOS)")
    out = Path(out_dir) if out_dir else run_dir / "importance"
    out.mkdir(parents=True, exist_ok=True)
    log = log or Log(out / "importance.log")
    model = keras.models.load_model(run_dir / "model.keras", compile=False)
    x = model_inputs(run_params, data, scalers, rows["test"])
    roles = atom_roles(run_params["n_neighbours"])
    dos_names = [f"atom{i + 1}_dos" for i in range(len(roles))] if fusion != "structure_only" else []
    dos = np.concatenate([x.pop(k) for k in dos_names], axis=-1) if dos_names else None
    fill = None
    if dos is not None:  # training-mean DOS per energy and channel, chunked (no copy of the training rows)
        tr, total = rows["train"], np.zeros(data.dos.shape[1:])
        for i in range(0, len(tr), 256):
            total += data.dos[tr[i:i + 256]].sum(axis=0, dtype=np.float64)
        fill = ((total / len(tr) - scalers["dos"].mean) / scalers["dos"].scale).astype(np.float32)
    orbitals = ORBITAL_GROUPS if c == N_ORBITALS else {str(j): (j,) for j in range(c)}
    atom_group = {f"{r}:{g}": [a * c + i for i in idx] for a, r in enumerate(roles) for g, idx in orbitals.items()}
    blocks = {"channel": {lab: [k] for k, lab in enumerate(data.channel_labels)},
              "atom": {r: list(range(a * c, (a + 1) * c)) for a, r in enumerate(roles)},
              "orbital group": {g: [a * c + i for a in range(len(roles)) for i in idx] for g, idx in orbitals.items()},
              "atom x orbital group": atom_group}
    cols = scalers["structure_columns"]
    problem = importance.Problem(
        model=model, targets=targets, y_true=target_matrix(data, targets)[rows["test"]],
        y_mean=scalers["targets"].mean, y_scale=scalers["targets"].scale, dos=dos, dos_inputs=dos_names,
        dos_fill=fill, energies_ev=data.energies_ev if data.energies_ev is not None
        else EnergyGrid(n_points=data.dos.shape[1]).energies_ev, channel_labels=list(data.channel_labels),
        occlusion_groups=atom_group, channel_blocks=blocks, structure=x.get("structure"),
        structure_input="structure" if "structure" in x else None,
        structure_labels=[data.structure_labels[i] for i in cols],
        structure_families=[data.structure_families[i] for i in cols], sample_labels=data.element[rows["test"]],
        units=TARGET_UNITS, reference_note=f"E = 0: VBM (gap > {GAP_THRESHOLD_EV:g} eV) or Fermi level")
    settings = importance.Settings(window_ev=run_params["importance_window_ev"],
                                   step_ev=run_params["importance_step_ev"],
                                   repeats=run_params["importance_repeats"], ig_steps=run_params["importance_ig_steps"],
                                   seed=run_params["seed"])
    log(f"feature importance of {run_dir / 'model.keras'} (fusion {fusion}, targets {', '.join(targets)}) on the "
        f"test split of {path}: {len(rows['test'])} samples; loaded in {time.time() - t_start:.0f} s")
    res = importance.analyse(problem, settings, log=log)
    context = "\n".join([
        f"Model `{run_dir / 'model.keras'}` (fusion `{fusion}`), explained on the test split of `{path}` "
        f"({len(rows['test'])} samples, {len(set(data.material_id[rows['test']]))} materials); every target of the "
        f"run ({', '.join(targets)}); sample labels = the centre site's element.",
        "",
        "Reference DOS (occlusion fill and integrated-gradients baseline): the mean over the "
        f"{len(rows['train'])} training rows of the DOS at each energy and channel, in standardised units. It is "
        "not the all-zero standardised input: the DOS scaler standardises each channel over all energies "
        "together, so zero would be a flat spectrum at the channel's mean level. The structure baseline is the "
        "training mean of each column, which is exactly 0 after standardisation.",
        "",
        "Caveats: these numbers describe what this model uses, not physics. Neighbouring energies and the "
        "channels of one atom are correlated, so importance is shared between them (occlusion and block "
        "permutation of whole groups show the joint effect); permutation creates spectra and feature combinations "
        "that do not occur, and attributions depend on the baseline."])
    summary = importance.write_report(out, res, title=f"Feature importance: {run_dir.name}", context=context)
    elapsed = time.time() - t_start
    with open(out / "importance.md", "a") as fh:
        fh.write(f"Took {report.duration(elapsed)} in all (loading the run and the data, the analysis, the "
                 f"outputs).\n")
    summary["seconds_in_all"] = round(elapsed, 1)
    _write_json(out / "importance.json", summary)
    log(f"feature importance finished in {report.duration(elapsed)} (analysis "
        f"{report.duration(res['timing']['total']['seconds'])}); report: {out / 'importance.md'}")
    return summary


# =========================================================================== ablation and learning curve
# ``--ablation``: baselines, the four DOSnet fusions and the structure families switched off one at
# a time, each over several seeds on the same grouped split (``run_ablation``). ``--learning-curve``:
# test MAE against the number of training materials (``run_learning_curve``). The generic parts
# (DOS descriptors, baselines, seed statistics, tables, verdicts, power laws, plots) are in
# DOSnet/descriptors.py, DOSnet/baselines.py and DOSnet/report.py; this section decides which model
# runs on which rows of the data.

#: The default ("quick") budget of --ablation and --learning-curve: at most QUICK_EPOCHS epochs,
#: early stopping patience at most QUICK_PATIENCE; --full keeps params' ``epochs`` and patience.
#: Sized so that the default ablation of ~4000 samples x 2000 points x 27 channels (3 seeds, 4
#: fusions + 6 family ablations) finishes in under 2 h on 2 CPU cores: see the README. Upstream's
#: step schedule is laid out for 60 epochs (first decay at epoch 15), so within the quick budget
#: ``dosnet_step`` becomes ``cosine`` over the budget's epochs: the rate anneals to zero by the
#: last epoch instead of never decaying (10 epochs at a constant 1e-3 left the late model at a
#: test bvs_vu MAE of 0.30-0.36 v.u. against 0.21 after 60 epochs; 15 cosine epochs gave 0.27).
QUICK_EPOCHS = 25
QUICK_PATIENCE = 5
LC_FRACTIONS = (0.05, 0.10, 0.25, 0.50, 1.0)
BASELINES = {
    "mean": "mean predictor (train mean)",
    "element_mean": "per-element mean",
    "element_cn_mean": "per element + CN mean",
    "gbt_dos": "GBT on DOS descriptors",
    "gbt_structure": "GBT on structure vector",
    "gbt_dos_structure": "GBT on DOS descriptors + structure",
}
TARGET_UNITS = {"bvs_vu": "vu", "bvs_deviation_vu": "vu", "valence": ""}
#: Relative cost of one run for the time-left estimate (epoch times measured on 2 busy CPU cores).
_RUN_COST = {"none": 0.65, "late": 1.0, "early": 1.9, "structure_only": 0.2, "baseline": 0.1}


def ablation_budget(params: dict, full: bool = False) -> tuple[dict, str]:
    """(params with the ablation's epochs and patience, a sentence stating the budget)."""
    p = dict(params)
    patience = params["early_stopping_patience"]
    if full:
        text = f"full budget (--full): params' {p['epochs']} epochs, early stopping patience {patience}"
    else:
        p["epochs"] = min(params["epochs"], QUICK_EPOCHS)
        p["early_stopping_patience"] = min(patience, QUICK_PATIENCE) if patience > 0 else 0
        text = (f"quick budget (default): at most {p['epochs']} epoch{'s' * (p['epochs'] != 1)}, early stopping patience "
                f"{p['early_stopping_patience']} on the validation loss (params: {params['epochs']} epochs, "
                f"patience {patience}; --full uses those)")
        if p["lr_schedule"] == "dosnet_step" and p["epochs"] < params["epochs"]:
            p["lr_schedule"] = "cosine"
            text += "; upstream's step schedule (laid out for 60 epochs) replaced by a cosine over the budget"
    text += (f"; learning-rate schedule {p['lr_schedule']}; the targets {', '.join(p['targets'])} are trained "
             f"together as one {'multi-task ' if len(p['targets']) > 1 else ''}network per run; GBT: one model per "
             f"target, iterations chosen on the validation split")
    return p, text


def dosnet_key(fusion: str, dropped: str | None = None) -> str:
    """Model name of a DOSnet run: ``dosnet-<fusion>`` or ``dosnet-<fusion>-no-<family>``."""
    return f"dosnet-{fusion}" + (f"-no-{dropped}" if dropped else "")


def dos_descriptor_matrix(data: Dataset, params: dict) -> tuple[np.ndarray, list]:
    """(n, D) hand-crafted DOS descriptors and their names.

    ``DOSnet.descriptors`` of every DOS channel (atom x orbital) and, per atom, of the summed
    orbital groups with more than one orbital (p, d of ``data_prep.layout.ORBITAL_GROUPS``: the
    d-band centre of the classic d-band model is the ``<atom>:d_sum:centre_ev`` column). Energies
    from the file's grid (the default grid window with the file's length when it has none);
    ``dos_at_ref`` averages over +-sigma of the grid's smearing.
    """
    from data_prep.layout import N_ORBITALS, ORBITAL_GROUPS, EnergyGrid
    from DOSnet.descriptors import dos_descriptors, feature_names

    length = data.dos.shape[1]
    energies = data.energies_ev if data.energies_ev is not None else EnergyGrid(n_points=length).energies_ev
    window = data.sigma_ev if data.sigma_ev else EnergyGrid().sigma_ev
    blocks, names = [dos_descriptors(data.dos, energies, window)], feature_names(data.channel_labels)
    c = params["channels"]
    groups = [(g, idx) for g, idx in ORBITAL_GROUPS.items() if len(idx) > 1]
    if c == N_ORBITALS and groups:
        atoms = data.dos.shape[2] // c
        sums = np.empty((data.n, length, atoms * len(groups)), np.float32)
        labels = []
        for a in range(atoms):
            role = data.channel_labels[a * c].split(":")[0]
            for k, (g, idx) in enumerate(groups):
                sums[:, :, a * len(groups) + k] = data.dos[:, :, [a * c + i for i in idx]].sum(axis=2)
                labels.append(f"{role}:{g}_sum")
        blocks.append(dos_descriptors(sums, energies, window))
        names += feature_names(labels)
        del sums
    return np.concatenate(blocks, axis=1), names


class _Features:
    """Feature matrices of the tree baselines, computed once on first use: ``"dos"`` (descriptors),
    ``"structure"`` (params' structure families, raw values) and ``"dos_structure"`` (both)."""

    def __init__(self, data: Dataset, params: dict, log: Log):
        self.data, self.params, self.log, self.cache = data, params, log, {}

    def __call__(self, which: str) -> np.ndarray:
        if which not in self.cache:
            if which == "dos":
                t0 = time.time()
                x, names = dos_descriptor_matrix(self.data, self.params)
                self.log(f"DOS descriptors: {x.shape[1]} per sample ({len(names) // 7} channels x 7) in "
                         f"{time.time() - t0:.0f} s")
                self.cache[which] = x
            elif which == "structure":
                cols = structure_columns(self.data, self.params["structure_families"])
                self.cache[which] = self.data.structure[:, cols].astype(np.float64)
            else:
                self.cache[which] = np.concatenate([self("dos"), self("structure")], axis=1)
        return self.cache[which]


def cn_column(data: Dataset) -> int | None:
    """Index of the coordination-number column (label ``cn``) of the structure vector, or None."""
    return data.structure_labels.index("cn") if "cn" in data.structure_labels else None


def baseline_predictions(name: str, data: Dataset, targets, train_rows, val_rows, predict_rows: dict,
                         seed: int, features: _Features) -> dict:
    """Fit baseline ``name`` (a key of ``BASELINES``) on ``train_rows`` (GBT: iterations chosen on
    ``val_rows``); returns ``{name: (len(rows), T) predictions}`` for ``predict_rows``."""
    from DOSnet.baselines import GBT, GroupMean, mean_predictor

    y = target_matrix(data, targets)
    if name == "mean":
        return {k: mean_predictor(y[train_rows], len(r)) for k, r in predict_rows.items()}
    if name in ("element_mean", "element_cn_mean"):
        keys = data.element.astype(object).reshape(-1, 1)
        if name == "element_cn_mean":
            j = cn_column(data)
            if j is None:
                raise TrainError(f"{data.path} has no 'cn' structure column: per element + CN mean impossible")
            keys = np.column_stack([keys, np.rint(data.structure[:, j]).astype(int).astype(object)])
        model = GroupMean().fit(keys[train_rows], y[train_rows])
        return {k: model.predict(keys[r]) for k, r in predict_rows.items()}
    if name.startswith("gbt_"):
        x = features(name[len("gbt_"):])
        model = GBT(seed=seed).fit(x[train_rows], y[train_rows], x[val_rows], y[val_rows])
        return {k: model.predict(x[r]) for k, r in predict_rows.items()}
    raise TrainError(f"unknown baseline {name!r}; expected one of {', '.join(BASELINES)}")


def score_splits(data: Dataset, targets, rows: dict, preds: dict) -> dict:
    """``{split: {target: DOSnet.report.scores}}`` of predictions ``{split: (len(rows), T)}``."""
    from DOSnet.report import scores

    y = target_matrix(data, targets)
    return {s: {t: scores(y[rows[s], j], p[:, j], accuracy=(t == "valence")) for j, t in enumerate(targets)}
            for s, p in preds.items()}


def run_model(spec: dict, seed: int, params: dict, data: Dataset, train_rows, rows: dict, features: _Features,
              epoch_log: Log) -> dict:
    """One model and seed: fit on ``train_rows``, choose (epochs or iterations) on ``rows["val"]``,
    score val and test. spec: ``{"model", "kind": baseline | dosnet | families, "fusion",
    "structure_families"}``. Returns ``{"scores", "info", "seconds"}``."""
    t0 = time.time()
    targets = params["targets"]
    predict_rows = {"val": rows["val"], "test": rows["test"]}
    if spec["kind"] == "baseline":
        preds = baseline_predictions(spec["model"], data, targets, train_rows, rows["val"], predict_rows, seed,
                                     features)
        info = {}
    else:
        p = {**params, "fusion": spec["fusion"], "structure_families": spec["structure_families"], "seed": seed}
        epoch_log(f"--- {spec['model']} seed {seed}")
        res = fit_predict(p, data, train_rows, rows["val"], predict_rows, epoch_log)
        preds = res["predictions"]
        info = {"epochs_run": len(res["history"].get("loss", [])), "best_epoch": res["best_epoch"],
                "train_seconds": round(res["seconds"], 1)}
        del res
    eval_rows = {"val": rows["val"], "test": rows["test"]}
    return {"scores": score_splits(data, targets, eval_rows, preds), "info": info,
            "seconds": round(time.time() - t0, 1)}


def _check_resume(path: Path, config: dict) -> None:
    """Write the run's config, or check that an existing run folder was made with the same one."""
    if path.is_file():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(config)):
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != json.loads(json.dumps(config)).get(k))
            raise TrainError(f"{path.parent} holds a run with other settings ({', '.join(diff)}); "
                             f"choose a new --out to start afresh")
    else:
        _write_json(path, config)


class _Runner:
    """Runs (model, seed) jobs, caching each result as ``results/<model>__seed<k>.json`` so that an
    interrupted run resumes where it stopped; prints a line per job with elapsed and estimated
    remaining time, and drives a tqdm bar."""

    def __init__(self, out: Path, log: Log, n_jobs: int, total_cost: float, run):
        from tqdm import tqdm

        self.dir = out / "results"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log, self.run, self.total_cost = log, run, total_cost
        self.t0, self.i, self.n_jobs = time.time(), 0, n_jobs
        self.cost_done, self.cost_timed, self.time_spent = 0.0, 0.0, 0.0
        self.resumed_seconds = 0.0  # time the runs loaded from results/ had taken when they were made
        self.bar = tqdm(total=n_jobs, unit="run", desc="runs", disable=None, leave=False)

    def __call__(self, spec: dict, seed: int, cost: float, label: str) -> dict:
        path = self.dir / f"{spec['model']}__seed{seed}.json"
        self.i += 1
        if path.is_file():
            res, note = json.loads(path.read_text()), "from an earlier, interrupted run"
            self.resumed_seconds += res.get("seconds", 0.0)
        else:
            t = time.time()
            res = self.run(spec, seed)
            self.time_spent += time.time() - t
            self.cost_timed += cost
            _write_json(path, res)
            note = f"{res['seconds']:.0f} s"
        self.cost_done += cost
        self.bar.update()
        left = ""
        if self.cost_timed > 0 and self.cost_done < self.total_cost:
            left = f", about {report.duration(self.time_spent / self.cost_timed * (self.total_cost - self.cost_done))} left"
        sc = res["scores"]
        targets = list(sc["test"])
        vals = [sc["val"][t].get("nmae") for t in targets]
        val = f"{np.mean(vals):.3f}" if all(v is not None for v in vals) else "–"
        test = ", ".join(f"{t} {sc['test'][t]['mae']:.4f}" for t in targets)
        ep = f", {res['info']['epochs_run']} epochs" if res["info"].get("epochs_run") else ""
        self.log(f"[{self.i:2d}/{self.n_jobs}] {label} seed {seed}: val nMAE {val}, test MAE {test} ({note}{ep}; "
                 f"elapsed {report.duration(time.time() - self.t0)}{left})")
        return res

    def close(self):
        self.bar.close()


def run_ablation(params: dict, data: Dataset, out_dir, n_seeds: int = 3, full: bool = False,
                 log: Log | None = None) -> dict:
    """Every baseline and DOSnet variant over ``n_seeds`` seeds on the stored grouped split.

    Models: ``BASELINES``; DOSnet ``none``, ``late``, ``early``, ``structure_only``; then the
    structure families of params switched off one at a time in the best fused model (``late`` or
    ``early``, lowest validation normalised MAE averaged over targets; the test split is never
    used to choose). Seeds ``seed``, ``seed + 1``, ... vary the network's initialisation and batch
    order (the baselines are deterministic: their spread is 0); the split stays fixed. Writes ``ablation.md``,
    ``ablation.json``, ``ablation.png``, ``ablation.log`` and ``results/`` (one file per model and
    seed: rerunning with the same ``out_dir`` resumes). Returns the ablation.json content.
    """
    from tqdm import tqdm

    t_start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = log or Log(out / "ablation.log", printer=tqdm.write)
    epoch_log = Log(log.path, quiet=True)
    targets = params["targets"]
    run_params, budget_text = ablation_budget(params, full)
    seeds = [params["seed"] + k for k in range(n_seeds)]
    rows = {s: np.flatnonzero(data.split == s) for s in SPLITS}
    for s in SPLITS:
        if not len(rows[s]):
            raise TrainError(f"{data.path}: the {s} split is empty; the ablation needs train, val and test")
    families = list(params["structure_families"])
    if not families:
        raise TrainError("params: 'structure_families' is empty; the ablation's fused models need the structure vector")
    structure_columns(data, families)
    _check_resume(out / "ablation_config.json",
                  {"data_file": data.path, "n_samples": data.n, "seeds": seeds, "params": run_params})
    _write_json(out / "params.json", params)
    counts = _data_counts(data, rows)
    log(f"ablation on {data.path}: {data.n} samples; " + ", ".join(
        f"{s} {c['materials']} materials / {c['samples']} samples" for s, c in counts.items()))
    log(f"seeds {', '.join(map(str, seeds))}; {budget_text}")
    log(f"run folder {out}; if interrupted, the same command with --out {out} resumes after the finished runs")
    specs = []
    for name in BASELINES:
        if name == "element_cn_mean" and cn_column(data) is None:
            log(f"no 'cn' column in the structure vector of {data.path}: per element + CN mean left out")
            continue
        specs.append({"model": name, "kind": "baseline", "fusion": None, "structure_families": []})
    for fusion in FUSIONS:
        specs.append({"model": dosnet_key(fusion), "kind": "dosnet", "fusion": fusion, "structure_families": families})
    n_family = len(families) if len(families) > 1 else 0
    cost = lambda s: _RUN_COST[s["fusion"]] if s["fusion"] else _RUN_COST["baseline"]  # noqa: E731
    total = len(seeds) * (sum(cost(s) for s in specs) + n_family * max(_RUN_COST["late"], _RUN_COST["early"]))
    features = _Features(data, run_params, log)
    runner = _Runner(out, log, len(seeds) * (len(specs) + n_family), total,
                     lambda spec, seed: run_model(spec, seed, run_params, data, rows["train"], rows, features,
                                                  epoch_log))
    labels = {**BASELINES, **{dosnet_key(f): f"DOSnet {f}" for f in FUSIONS}}
    results: dict = {}

    def run_specs(todo):
        for spec in todo:
            results[spec["model"]] = [runner(spec, seed, cost(spec), labels[spec["model"]]) for seed in seeds]

    try:
        run_specs(specs)
        summaries = {m: report.summarise([r["scores"] for r in rs]) for m, rs in results.items()}
        best_fused = report.select_best(summaries, [dosnet_key("late"), dosnet_key("early")], targets, "val")
        fused = best_fused.split("-", 1)[1]
        # the estimate assumed the costlier fusion for the family runs; now the fusion is known
        runner.total_cost = runner.cost_done + len(seeds) * n_family * _RUN_COST[fused]
        log(f"best fused model on the validation split: {best_fused}; "
            f"switching its structure families off one at a time")
        if not n_family:
            log(f"only one structure family ({', '.join(families)}): no family to switch off")
        family_specs = []
        for fam in families[:len(families) if n_family else 0]:
            key = dosnet_key(fused, fam)
            labels[key] = f"DOSnet {fused} without {fam}"
            family_specs.append({"model": key, "kind": "families", "fusion": fused,
                                 "structure_families": [f for f in families if f != fam]})
        specs += family_specs
        run_specs(family_specs)
    finally:
        runner.close()
    summaries = {m: report.summarise([r["scores"] for r in rs]) for m, rs in results.items()}
    order = [s["model"] for s in specs]
    kinds = {s["model"]: s["kind"] for s in specs}
    dosnet_models = [m for m in order if kinds[m] != "baseline"]
    baseline_models = [m for m in order if kinds[m] == "baseline"]
    best_dosnet = report.select_best(summaries, dosnet_models, targets, "val")
    best_baseline = report.select_best(summaries, baseline_models, targets, "val")
    verdicts = [report.verdict(t, best_fused, summaries[best_fused], dosnet_key("none"), summaries[dosnet_key("none")],
                               TARGET_UNITS.get(t, "")) for t in targets]
    versus = []
    for t in targets:
        mine = summaries[best_dosnet]["test"][t]["mae"]["mean"]
        better = [m for m in baseline_models if summaries[m]["test"][t]["mae"]["mean"] <= mine]
        versus.append({"target": t, "best_dosnet": best_dosnet, "test_mae": mine, "beats_every_baseline": not better,
                       "baselines_at_least_as_good": better})
    elapsed = time.time() - t_start
    spec_of = {s["model"]: s for s in specs}
    result = {
        "data_file": data.path, "counts": counts, "targets": targets, "seeds": seeds, "budget": budget_text,
        "full": full, "epochs": run_params["epochs"], "early_stopping_patience": run_params["early_stopping_patience"],
        "seconds": round(elapsed, 1), "seconds_of_resumed_runs": round(runner.resumed_seconds, 1),
        "split_used_for_choices": "val",
        "best_fused": best_fused,
        "best_dosnet": {"model": best_dosnet, "fusion": spec_of[best_dosnet]["fusion"],
                        "structure_families": spec_of[best_dosnet]["structure_families"]},
        "best_baseline": {"model": best_baseline},
        "verdicts": verdicts, "dosnet_vs_baselines": versus,
        "models": {m: {"label": labels[m], "kind": kinds[m], "fusion": spec_of[m]["fusion"],
                       "structure_families": spec_of[m]["structure_families"], "summary": summaries[m],
                       "per_seed": [{"seed": s, **r} for s, r in zip(seeds, results[m])]} for m in order},
        "published": report.published()["results"],
    }
    _write_json(out / "ablation.json", result)
    report.plot_ablation(out / "ablation.png", summaries, order, targets, kinds, TARGET_UNITS,
                         {m: m for m in order})
    (out / "ablation.md").write_text(report.ablation_markdown(result, summaries, order, labels, kinds, SPLITS))
    log(report.markdown_table(summaries, order, targets, labels))
    for v in verdicts:
        log(v["text"].replace("**", "").replace("`", ""))
    resumed = f" (plus {report.duration(runner.resumed_seconds)} of runs resumed from {out / 'results'})" \
        if runner.resumed_seconds else ""
    log(f"ablation finished in {report.duration(elapsed)}{resumed}; table: {out / 'ablation.md'}")
    return result


def training_subsets(material_ids, train_rows, fractions=LC_FRACTIONS, seed: int = 88) -> list:
    """Nested subsets of the training MATERIALS: ``[(fraction, n_materials, rows), ...]``.

    The training materials are shuffled once with ``seed``; a fraction f keeps the first
    ceil(f * M) of them (at least one) and all their samples, so every subset contains the smaller ones.
    """
    train_rows = np.asarray(train_rows)
    ids = np.array(sorted(set(np.asarray(material_ids)[train_rows])))
    order = np.random.default_rng(seed).permutation(len(ids))
    out = []
    for f in fractions:
        k = max(1, int(np.ceil(f * len(ids) - 1e-9)))
        keep = np.isin(np.asarray(material_ids)[train_rows], ids[order[:k]])
        out.append((float(f), k, train_rows[keep]))
    return out


def run_learning_curve(params: dict, data: Dataset, out_dir, n_seeds: int = 3, full: bool = False,
                       from_ablation=None, log: Log | None = None) -> dict:
    """Test MAE of the best DOSnet model and the best baseline trained on 5, 10, 25, 50 and 100 %
    of the training materials (nested subsets, ``training_subsets``; the same validation and test
    rows throughout), ``n_seeds`` seeds each.

    The DOSnet model is params' ``fusion`` and ``structure_families``, or ``best_dosnet`` of an
    ``ablation.json`` (``from_ablation``); the baseline is that file's ``best_baseline``, or else the
    baseline with the lowest validation normalised MAE on the full training set (one seed). Fits
    ``MAE = a N^-b`` (N training samples) per model and target and extrapolates to 10^4 materials.
    Writes ``learning_curve.md``, ``.csv``, ``.json``, ``.png`` and ``learning_curve.log``.
    """
    from tqdm import tqdm

    t_start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = log or Log(out / "learning_curve.log", printer=tqdm.write)
    epoch_log = Log(log.path, quiet=True)
    targets = params["targets"]
    run_params, budget_text = ablation_budget(params, full)
    rows = {s: np.flatnonzero(data.split == s) for s in SPLITS}
    for s in SPLITS:
        if not len(rows[s]):
            raise TrainError(f"{data.path}: the {s} split is empty; the learning curve needs train, val and test")
    fusion, families, baseline, chosen_by = params["fusion"], list(params["structure_families"]), None, "params.json"
    dosnet = dosnet_key(fusion)
    if from_ablation:
        try:
            ab = json.loads(Path(from_ablation).read_text())
            best = ab["best_dosnet"]
            fusion, families, baseline = best["fusion"], list(best["structure_families"]), ab["best_baseline"]["model"]
            dosnet = str(best["model"])
        except FileNotFoundError:
            raise TrainError(f"--from-ablation: {from_ablation} not found") from None
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise TrainError(f"--from-ablation: {from_ablation} is not an ablation.json ({exc!r})") from None
        if fusion not in FUSIONS or baseline not in BASELINES:
            raise TrainError(f"--from-ablation: {from_ablation} names an unknown model ({fusion!r}, {baseline!r})")
        chosen_by = f"validation split of {from_ablation}"
    structure_columns(data, families)
    _write_json(out / "params.json", params)
    features = _Features(data, run_params, log)  # the baselines' structure vector: params' families
    seeds = [params["seed"] + k for k in range(n_seeds)]
    log(f"learning curve on {data.path}: {data.n} samples; seeds {', '.join(map(str, seeds))}; {budget_text}")
    if baseline is None:
        cand = [b for b in BASELINES if b != "element_cn_mean" or cn_column(data) is not None]
        summ = {}
        for b in cand:
            res = run_model({"model": b, "kind": "baseline"}, params["seed"], run_params, data, rows["train"], rows,
                            features, epoch_log)
            summ[b] = report.summarise([res["scores"]])
        baseline = report.select_best(summ, cand, targets, "val")
        chosen_by += f"; baseline {baseline}: lowest validation nMAE of {', '.join(cand)} on the full training set"
    log(f"models: {dosnet} (structure families {', '.join(families) or '-'}) and {baseline} (chosen by {chosen_by})")
    subsets = training_subsets(data.material_id, rows["train"], LC_FRACTIONS, params["seed"])
    specs = [{"model": dosnet, "kind": "dosnet", "fusion": fusion, "structure_families": families},
             {"model": baseline, "kind": "baseline", "fusion": None, "structure_families": []}]
    points = []
    bar = tqdm(total=len(subsets) * len(specs) * len(seeds), unit="run", desc="runs", disable=None, leave=False)
    try:
        for f, k, tr in subsets:
            for spec in specs:
                per_seed = []
                for seed in seeds:
                    r = run_model(spec, seed, run_params, data, tr, rows, features, epoch_log)
                    per_seed.append(r)
                    bar.update()
                    log(f"{f * 100:5.1f} % ({k} materials, {len(tr)} samples) {spec['model']} seed {seed}: test MAE "
                        + ", ".join(f"{t} {r['scores']['test'][t]['mae']:.4f}" for t in targets)
                        + f" ({r['seconds']:.0f} s; elapsed {report.duration(time.time() - t_start)})")
                points.append({"fraction": f, "train_materials": k, "train_samples": int(len(tr)),
                               "model": spec["model"], "summary": report.summarise([r["scores"] for r in per_seed]),
                               "per_seed": [{"seed": s, **r} for s, r in zip(seeds, per_seed)]})
    finally:
        bar.close()
    n_materials = len(set(data.material_id))
    per_material = data.n / n_materials
    n_10k = 1e4 * per_material
    curves, fits, extrap = {}, {}, []
    for spec in specs:
        pts = [p for p in points if p["model"] == spec["model"]]
        c = {"n": [p["train_samples"] for p in pts]}
        for t in targets:
            c[t] = {"mean": [p["summary"]["test"][t]["mae"]["mean"] for p in pts],
                    "std": [p["summary"]["test"][t]["mae"]["std"] for p in pts]}
            try:
                a, b = report.fit_power_law(c["n"], c[t]["mean"])
            except ValueError:  # fewer than two points with MAE > 0 (e.g. an exact baseline)
                extrap.append({"model": spec["model"], "target": t, "a": None, "b": None})
                continue
            fits[(spec["model"], t)] = (a, b)
            e = {"model": spec["model"], "target": t, "a": a, "b": b, "mae_at_1e4_materials": a * n_10k ** (-b)}
            try:  # the same from the three largest subsets only: less sensitive to under-trained small ones
                a3, b3 = report.fit_power_law(c["n"][-3:], c[t]["mean"][-3:])
                e.update(a_largest3=a3, b_largest3=b3, mae_at_1e4_materials_largest3=a3 * n_10k ** (-b3))
            except ValueError:
                pass
            extrap.append(e)
        curves[spec["model"]] = c
    pub = report.published_learning_curve()
    a_p, b_p = report.fit_power_law(np.asarray(pub["fraction"]) * pub["n_total"], pub["mae"])
    elapsed = time.time() - t_start
    result = {"data_file": data.path, "targets": targets, "seeds": seeds, "budget": budget_text, "full": full,
              "dosnet": {"model": dosnet, "fusion": fusion, "structure_families": families}, "baseline": baseline,
              "chosen_by": chosen_by, "fractions": list(LC_FRACTIONS), "points": points,
              "samples_per_material": per_material, "samples_at_1e4_materials": n_10k, "power_laws": extrap,
              "published": {**pub, "power_law": {"a": a_p, "b": b_p}}, "seconds": round(elapsed, 1)}
    _write_json(out / "learning_curve.json", result)
    with open(out / "learning_curve.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["fraction", "train_materials", "train_samples", "model", "target", "val_mae_mean", "val_mae_std",
                    "test_mae_mean", "test_mae_std", "test_nmae_mean", "test_nmae_std", "seeds"])
        for p in points:
            for t in targets:
                v, te = p["summary"]["val"][t], p["summary"]["test"][t]
                nm = te.get("nmae") or {"mean": float("nan"), "std": float("nan")}
                w.writerow([p["fraction"], p["train_materials"], p["train_samples"], p["model"], t,
                            *(f"{x:.6g}" for x in (v["mae"]["mean"], v["mae"]["std"], te["mae"]["mean"],
                                                   te["mae"]["std"], nm["mean"], nm["std"])), len(seeds)])
    report.plot_learning_curves(out / "learning_curve.png", curves, targets, TARGET_UNITS, fits, pub, n_10k)
    (out / "learning_curve.md").write_text(report.learning_curve_markdown(result, n_materials, TARGET_UNITS))
    log(f"learning curve finished in {report.duration(elapsed)}; table: {out / 'learning_curve.md'}")
    return result


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
    p.add_argument("--ablation", action="store_true",
                   help="baselines, DOSnet fusions and structure families off one at a time, over --seeds seeds "
                        "(default run folder <out_dir>/ablation-<time>; an existing one resumes)")
    p.add_argument("--learning-curve", action="store_true",
                   help="best DOSnet model and best baseline on 5-100 %% of the training materials")
    p.add_argument("--from-ablation", metavar="ABLATION_JSON",
                   help="with --learning-curve: take the models chosen in this ablation.json")
    p.add_argument("--importance", metavar="RUN_DIR",
                   help="feature importance of the model saved in RUN_DIR on its test split (RUN_DIR/importance/)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per model for --ablation / --learning-curve (default 3)")
    p.add_argument("--full", action="store_true",
                   help=f"--ablation / --learning-curve with params' epochs and patience (default: at most "
                        f"{QUICK_EPOCHS} epochs, patience {QUICK_PATIENCE})")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.predict:
            if not args.data:
                raise TrainError("--predict RUN_DIR needs --data FILE")
            predict_run(args.predict, args.data, args.out)
            return 0
        if args.importance:
            if args.cv is not None or args.ablation or args.learning_curve:
                raise TrainError("--importance RUN_DIR runs alone (no --cv, --ablation, --learning-curve)")
            run_importance(args.importance, load_params(args.params), args.data, args.out)
            return 0
        if args.cv is not None and (args.cv < 0 or args.cv == 1):
            raise TrainError(f"--cv K needs K >= 2, got {args.cv}")
        study = "ablation" if args.ablation else "learning-curve" if args.learning_curve else None
        if args.ablation and args.learning_curve:
            raise TrainError("--ablation and --learning-curve: run one at a time (--learning-curve --from-ablation "
                             "RUN/ablation.json uses the ablation's choices)")
        if study and args.cv is not None:
            raise TrainError(f"--{study} cannot be combined with --cv")
        if args.from_ablation and not args.learning_curve:
            raise TrainError("--from-ablation needs --learning-curve")
        if (args.full or args.seeds != 3) and not study:
            raise TrainError("--full and --seeds go with --ablation or --learning-curve")
        if args.seeds < 1:
            raise TrainError(f"--seeds needs at least 1, got {args.seeds}")
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
        name = study or f"{params['fusion']}-{'+'.join(params['targets'])}" + (f"-cv{cv}" if cv else "")
        out = Path(args.out) if args.out else Path(params["out_dir"]) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if args.ablation:
            run_ablation(params, data, out, args.seeds, args.full)
        elif args.learning_curve:
            run_learning_curve(params, data, out, args.seeds, args.full, args.from_ablation)
        elif cv:
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
