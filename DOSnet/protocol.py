"""The upstream DOSnet training protocol: ``python -m DOSnet`` (train/test split or 5-fold CV).

Data file (upstream format): one pickle stream holding, in order,
  1. the surface DOS, (N, >= length, 1 + sites * channels) float; column 0 is the energy (unused);
  2. the targets, (N,) float, eV;
  3. for ``--multi_adsorbate 1`` only: the gas-phase adsorbate DOS, (N, >= length, >= 1 + channels).
Only the first ``length`` energy points are used; points ``zero_tail`` of the surface DOS are set
to zero; every channel is standardised with statistics from the training part only.

Outputs go to a run folder (never the current directory): ``predict_train.txt`` and
``predict_test.txt`` (run mode 0) or ``CV_predict.txt`` (run mode 1), two columns: true,
predicted; ``metrics.json``; the params used; ``model.keras`` + ``scalers.npz`` when saved.
Deviations from the upstream script are listed in ``patches/README.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PARAMS_PATH = Path(__file__).with_name("params.json")
#: Upstream's train/test split is fixed (``train_test_split(..., random_state=88)``): ``--seed``
#: does not move it; it seeds the 5-fold CV shuffle (``KFold(shuffle=True, random_state=seed)``)
#: and, here, the network's initialisation.
SPLIT_SEED = 88


class DOSnetError(Exception):
    """A user-facing problem (bad data file, bad flag): reported on one line, no traceback."""


# --------------------------------------------------------------------------- parameters
def load_params(path: str | os.PathLike = PARAMS_PATH) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise DOSnetError(f"params file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise DOSnetError(f"params file {path} is not valid JSON: {exc}") from None


# --------------------------------------------------------------------------- data
def load_upstream_data(path, multi_adsorbate: bool, channels: int = 9, sites: int = 3,
                       length: int = 2000, zero_tail=(1800, 2000)):
    """Read the upstream pickle stream.

    Returns ``surface`` (N, length, sites*channels) float32 with the tail zeroed, ``targets`` (N,)
    float32 and ``adsorbate`` (N, length, channels) float32 or None.
    """
    path = Path(path)
    if not path.is_file():
        raise DOSnetError(f"data file not found: {path}")
    n_arrays = 3 if multi_adsorbate else 2
    arrays = []
    try:
        with open(path, "rb") as fh:
            for _ in range(n_arrays):
                arrays.append(np.asarray(pickle.load(fh)))
    except EOFError:
        raise DOSnetError(
            f"data file {path} is truncated: expected {n_arrays} pickled arrays "
            f"({'surface DOS, targets, adsorbate DOS' if multi_adsorbate else 'surface DOS, targets'}), "
            f"found {len(arrays)}") from None
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, ImportError, IndexError) as exc:
        raise DOSnetError(f"data file {path} is not an upstream DOSnet pickle stream: {exc}") from None

    surface, targets = arrays[0], arrays[1]
    need = 1 + sites * channels
    if surface.ndim != 3 or surface.shape[1] < length or surface.shape[2] < need:
        raise DOSnetError(f"surface DOS must have shape (N, >={length}, >={need}) "
                          f"(energy column + {sites} atoms x {channels} channels), got {surface.shape}")
    try:
        targets = np.asarray(targets, dtype=np.float32)
        surface = np.asarray(surface, dtype=np.float32)
    except (TypeError, ValueError):
        raise DOSnetError(f"data file {path} holds non-numeric arrays") from None
    if targets.ndim == 2 and targets.shape[1] == 1:
        targets = targets[:, 0]
    if targets.ndim != 1 or targets.shape[0] != surface.shape[0]:
        raise DOSnetError(f"targets must have shape ({surface.shape[0]},) to match the surface DOS, "
                          f"got {np.shape(arrays[1])}")
    surface = np.array(surface[:, :length, 1:need], dtype=np.float32)
    lo, hi = zero_tail
    surface[:, lo:hi, :] = 0.0
    adsorbate = None
    if multi_adsorbate:
        ads = arrays[2]
        if ads.ndim != 3 or ads.shape[0] != surface.shape[0] or ads.shape[1] < length or ads.shape[2] < 1 + channels:
            raise DOSnetError(f"adsorbate DOS must have shape ({surface.shape[0]}, >={length}, >={1 + channels}), "
                              f"got {ads.shape}")
        try:
            adsorbate = np.array(ads[:, :length, 1:1 + channels], dtype=np.float32)
        except (TypeError, ValueError):
            raise DOSnetError(f"data file {path}: adsorbate DOS is not numeric") from None
    for name, arr in (("surface DOS", surface), ("targets", targets), ("adsorbate DOS", adsorbate)):
        if arr is not None and not np.all(np.isfinite(arr)):
            raise DOSnetError(f"{name} in {path} contains NaN or infinite values")
    return surface, targets, adsorbate


def write_upstream_data(path, surface_with_energy, targets, adsorbate_with_energy=None) -> None:
    """Write arrays in the upstream pickle-stream format (used for synthetic data and exports)."""
    with open(path, "wb") as fh:
        pickle.dump(np.asarray(surface_with_energy), fh, protocol=4)
        pickle.dump(np.asarray(targets), fh, protocol=4)
        if adsorbate_with_energy is not None:
            pickle.dump(np.asarray(adsorbate_with_energy), fh, protocol=4)


@dataclass
class ChannelScaler:
    """Per-channel standardisation of (N, L, C) arrays, fitted on training rows only."""

    mean: np.ndarray | None = None
    scale: np.ndarray | None = None

    def fit(self, x: np.ndarray) -> "ChannelScaler":
        flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
        self.mean = flat.mean(axis=0)
        std = flat.std(axis=0)
        self.scale = np.where(std > 0, std, 1.0)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Return a NEW standardised float32 array; ``x`` is never modified."""
        return ((x - self.mean) / self.scale).astype(np.float32)


def scale_fold(surface, adsorbate, train_idx, test_idx):
    """Fit scalers on ``train_idx`` rows and return fresh scaled copies for one split/fold.

    Upstream rescaled the whole array in place on every CV fold (so later folds saw data scaled
    several times) and, in multi-adsorbate CV, used an adsorbate scaler that was never fitted.
    Here each fold scales the raw data exactly once, with its own surface and adsorbate scalers.
    """
    s_scaler = ChannelScaler().fit(surface[train_idx])
    out = {"surface_scaler": s_scaler,
           "x_train": s_scaler.transform(surface[train_idx]),
           "x_test": s_scaler.transform(surface[test_idx])}
    if adsorbate is not None:
        a_scaler = ChannelScaler().fit(adsorbate[train_idx])
        out.update(adsorbate_scaler=a_scaler, a_train=a_scaler.transform(adsorbate[train_idx]),
                   a_test=a_scaler.transform(adsorbate[test_idx]))
    return out


def model_inputs(x, a, sites: int, channels: int) -> list[np.ndarray]:
    """Split (N, L, sites*channels) into ``sites`` arrays (N, L, channels), plus the adsorbate."""
    parts = [x[:, :, i * channels:(i + 1) * channels] for i in range(sites)]
    return parts + ([a] if a is not None else [])


# --------------------------------------------------------------------------- model
def _tf_setup(seed: int) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def compile_model(model, params: dict):
    """Adam at ``learning_rate``, the loss, MAE as metric (upstream: log-cosh, ``Adam(0.001)``)."""
    import keras

    losses = {"log_cosh": keras.losses.LogCosh(), "mse": "mse", "mae": "mae"}
    if params["loss"] not in losses:
        raise DOSnetError(f"unknown loss {params['loss']!r}; expected one of {sorted(losses)}")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=params["learning_rate"]),
                  loss=losses[params["loss"]], metrics=["mae"])
    return model


def build_model(params: dict, multi_adsorbate: bool):
    from DOSnet.net import create_model, create_model_combined, dos_featurizer

    if params.get("sites", 3) != 3:
        raise DOSnetError("the upstream DOSnet model takes exactly 3 atoms (sites = 3)")
    shared = dos_featurizer(params["channels"], params["length"])
    maker = create_model_combined if multi_adsorbate else create_model
    return compile_model(maker(shared, params["channels"], params["length"]), params)


def load_saved(model_dir: Path, params: dict, multi_adsorbate: bool):
    """``--load_model 1``, upstream's transfer-learning mode: the saved model (``model.keras``),
    recompiled with a fresh optimiser as upstream does (``load_model(..., compile=False)`` then
    ``compile``), and the scalers of the saved run (``scalers.npz``).

    Upstream saved ``DOSnet_saved.h5`` (Keras 2 HDF5, a model built with ``Model(input=...,
    output=...)``); such a file is not read here: Keras 3 reads only Keras 3 ``.keras`` files and
    tf.keras 2 ``.h5`` files, and upstream's was never available to test. Retrain with
    ``--save_model 1`` to get a ``model.keras``.
    """
    import keras

    if not (model_dir / "model.keras").is_file() or not (model_dir / "scalers.npz").is_file():
        raise DOSnetError(f"--load_model 1: no saved run (model.keras + scalers.npz) in {model_dir} (use --model_dir; "
                          f"upstream's Keras 2 DOSnet_saved.h5 cannot be read)")
    model = compile_model(keras.models.load_model(model_dir / "model.keras", compile=False), params)
    want = 4 if multi_adsorbate else 3
    if len(model.inputs) != want:
        raise DOSnetError(f"--load_model 1: the model in {model_dir} has {len(model.inputs)} inputs, "
                          f"--multi_adsorbate {int(multi_adsorbate)} needs {want}")
    sc = np.load(model_dir / "scalers.npz")
    surface = ChannelScaler(sc["surface_mean"], sc["surface_scale"])
    adsorbate = ChannelScaler(sc["adsorbate_mean"], sc["adsorbate_scale"]) if multi_adsorbate else None
    return model, surface, adsorbate


def _fit(model, inputs, y, params, validation=None, tensorboard: Path | None = None):
    import keras

    from DOSnet.net import decay_schedule

    callbacks = [keras.callbacks.LearningRateScheduler(decay_schedule)]
    if tensorboard is not None:  # upstream: TensorBoard(log_dir="logs/<time>", histogram_freq=1)
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise DOSnetError("--tensorboard needs the tensorboard package (pip install tensorboard)")
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(tensorboard), histogram_freq=1))
    model.fit(inputs, y, epochs=params["epochs"], batch_size=params["batch_size"],
              validation_data=validation, shuffle=True, verbose=2, callbacks=callbacks)


def _predict(model, inputs, batch_size):
    return np.asarray(model.predict(inputs, batch_size=batch_size, verbose=0)).reshape(-1)


def metrics(y_true, y_pred) -> dict:
    err = np.asarray(y_pred, float) - np.asarray(y_true, float)
    return {"n": int(err.size), "mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err ** 2)))}


def _save_pairs(path: Path, y_true, y_pred) -> None:
    np.savetxt(path, np.column_stack([y_true, y_pred]), fmt="%.6f", header="true predicted")


# --------------------------------------------------------------------------- run modes
def run_train_test(surface, targets, adsorbate, params, out: Path, model_dir: Path | None = None,
                   tensorboard: bool = False) -> dict:
    """Upstream's run mode 0: the fixed 80/20 split (``SPLIT_SEED``), train (from scratch, or with
    ``load_model`` on from a saved run with its scalers), predict both parts."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(targets))
    train_idx, test_idx = train_test_split(idx, test_size=params["split_ratio"], random_state=SPLIT_SEED)
    _tf_setup(params["seed"])
    if params["load_model"]:
        model, s_scaler, a_scaler = load_saved(Path(model_dir or out), params, adsorbate is not None)
        d = {"surface_scaler": s_scaler, "x_train": s_scaler.transform(surface[train_idx]),
             "x_test": s_scaler.transform(surface[test_idx])}
        if a_scaler is not None:
            d.update(adsorbate_scaler=a_scaler, a_train=a_scaler.transform(adsorbate[train_idx]),
                     a_test=a_scaler.transform(adsorbate[test_idx]))
    else:
        d = scale_fold(surface, adsorbate, train_idx, test_idx)
        model = build_model(params, adsorbate is not None)
    tr = model_inputs(d["x_train"], d.get("a_train"), params["sites"], params["channels"])
    te = model_inputs(d["x_test"], d.get("a_test"), params["sites"], params["channels"])
    model.summary()
    _fit(model, tr, targets[train_idx], params, validation=(te, targets[test_idx]),
         tensorboard=out / "tensorboard" if tensorboard else None)
    p_train = _predict(model, tr, params["batch_size"])
    p_test = _predict(model, te, params["batch_size"])
    _save_pairs(out / "predict_train.txt", targets[train_idx], p_train)
    _save_pairs(out / "predict_test.txt", targets[test_idx], p_test)
    if params["save_model"]:
        model.save(out / "model.keras")
        arrays = {"surface_mean": d["surface_scaler"].mean, "surface_scale": d["surface_scaler"].scale}
        if adsorbate is not None and "adsorbate_scaler" in d:
            arrays.update(adsorbate_mean=d["adsorbate_scaler"].mean, adsorbate_scale=d["adsorbate_scaler"].scale)
        np.savez(out / "scalers.npz", **arrays)
    return {"train": metrics(targets[train_idx], p_train), "test": metrics(targets[test_idx], p_test)}


def run_cross_validation(surface, targets, adsorbate, params, out: Path) -> dict:
    from sklearn.model_selection import KFold

    folds = KFold(n_splits=params["cv_folds"], shuffle=True, random_state=params["seed"])
    pred = np.full(len(targets), np.nan, dtype=np.float64)
    fold_metrics = []
    for k, (train_idx, test_idx) in enumerate(folds.split(np.arange(len(targets)))):
        print(f"fold {k + 1}/{params['cv_folds']}: {len(train_idx)} train, {len(test_idx)} test", flush=True)
        d = scale_fold(surface, adsorbate, train_idx, test_idx)
        tr = model_inputs(d["x_train"], d.get("a_train"), params["sites"], params["channels"])
        te = model_inputs(d["x_test"], d.get("a_test"), params["sites"], params["channels"])
        _tf_setup(params["seed"] + k)
        model = build_model(params, adsorbate is not None)
        _fit(model, tr, targets[train_idx], params)
        pred[test_idx] = _predict(model, te, params["batch_size"])
        fold_metrics.append(metrics(targets[test_idx], pred[test_idx]))
    _save_pairs(out / "CV_predict.txt", targets, pred)
    return {"cv": metrics(targets, pred), "folds": fold_metrics}


# --------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _bool01(text: str) -> int:
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"expected 0 or 1, got {text!r}")
    return int(text)


def parse_args(argv=None):
    p = _Parser(prog="python -m DOSnet", description="Train and test DOSnet with the upstream protocol.")
    p.add_argument("--params", default=str(PARAMS_PATH), help="JSON of defaults (flags override)")
    p.add_argument("--multi_adsorbate", type=_bool01, help="1: combined model with the adsorbate DOS as 4th input")
    p.add_argument("--data_dir", help="path of the upstream-format data file (pickle stream)")
    p.add_argument("--run_mode", type=int, choices=(0, 1), help="0: train/test split, 1: 5-fold CV")
    p.add_argument("--split_ratio", type=float, help="test fraction for run mode 0")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch_size", type=int)
    p.add_argument("--channels", type=int, help="channels per atom (9 orbitals)")
    p.add_argument("--seed", type=int, help="CV shuffle and initialisation seed; 0: a random one, as upstream "
                                            "(the train/test split stays fixed at 88)")
    p.add_argument("--save_model", type=_bool01)
    p.add_argument("--load_model", type=_bool01)
    p.add_argument("--model_dir", help="run folder holding model.keras + scalers.npz for --load_model 1")
    p.add_argument("--tensorboard", action="store_true", help="TensorBoard logs in RUN/tensorboard (as upstream)")
    p.add_argument("--out", help="run folder (default: <out_dir>/dosnet-<mode>-<time>)")
    return p.parse_args(argv)


def _validate(params: dict) -> None:
    checks = {"epochs": lambda v: isinstance(v, int) and v >= 1,
              "batch_size": lambda v: isinstance(v, int) and v >= 1,
              "split_ratio": lambda v: isinstance(v, (int, float)) and 0 < v < 1,
              "channels": lambda v: isinstance(v, int) and v >= 1,
              "length": lambda v: isinstance(v, int) and v >= 8,
              "cv_folds": lambda v: isinstance(v, int) and v >= 2}
    for key, ok in checks.items():
        if not ok(params.get(key)):
            raise DOSnetError(f"invalid value for {key}: {params.get(key)!r}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        params = load_params(args.params)
        flag_map = {"multi_adsorbate": "multi_adsorbate", "data_dir": "data_file", "run_mode": "run_mode",
                    "split_ratio": "split_ratio", "epochs": "epochs", "batch_size": "batch_size",
                    "channels": "channels", "seed": "seed", "save_model": "save_model", "load_model": "load_model"}
        for flag, key in flag_map.items():
            value = getattr(args, flag)
            if value is not None:
                params[key] = value
        _validate(params)
        if params["seed"] == 0:  # upstream: --seed 0 draws a random seed
            params["seed"] = int(np.random.default_rng().integers(1, 1_000_000))
        if not params.get("data_file"):
            raise DOSnetError("no data file: pass --data_dir PATH (upstream pickle format) "
                              "or try the synthetic demo: python -m DOSnet.demo")
        multi = bool(params["multi_adsorbate"])
        surface, targets, adsorbate = load_upstream_data(
            params["data_file"], multi, params["channels"], params["sites"], params["length"],
            tuple(params["zero_tail"]))
        if params["run_mode"] == 0 and len(targets) < 2 or params["run_mode"] == 1 and len(targets) < params["cv_folds"]:
            raise DOSnetError(f"too few samples ({len(targets)}) for run mode {params['run_mode']}")
        mode = "cv" if params["run_mode"] == 1 else "traintest"
        out = Path(args.out or Path(params.get("out_dir", "runs")) / f"dosnet-{mode}-{time.strftime('%Y%m%d-%H%M%S')}")
        out.mkdir(parents=True, exist_ok=True)
        (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        print(f"DOSnet: {len(targets)} samples from {params['data_file']}, "
              f"{'combined (4 inputs)' if multi else '3 atoms'}, run mode {params['run_mode']}, run folder {out}",
              flush=True)
        t0 = time.time()
        if params["run_mode"] == 1:
            result = run_cross_validation(surface, targets, adsorbate, params, out)
        else:
            result = run_train_test(surface, targets, adsorbate, params, out, args.model_dir, args.tensorboard)
        result["seconds"] = round(time.time() - t0, 1)
        (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        for split in ("train", "test", "cv"):
            if split in result:
                m = result[split]
                print(f"{split:5s} MAE {m['mae']:.4f}  RMSE {m['rmse']:.4f}  (n = {m['n']})")
        print(f"outputs in {out}")
        return 0
    except DOSnetError as exc:
        print(f"DOSnet: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("DOSnet: interrupted", file=sys.stderr)
        return 130
