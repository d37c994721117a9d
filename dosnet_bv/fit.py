"""The training loop: compile the root ``net.py`` network, fit with the learning-rate schedule,
early stopping on the validation loss (best weights restored), one log line per epoch, optional
TensorBoard logs; in memory or streamed (``dosnet_bv.streaming``), on one device or several
(``dosnet_bv.distribute``); then predict. ``fit_predict`` -> ``FitResult``.
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np

from dosnet_bv.data import Dataset, target_matrix, uses_bonds, uses_vector
from dosnet_bv.outputs import Log
from dosnet_bv.params import ROOT, TrainError
from dosnet_bv.scalers import Scalers, fit_scalers, model_inputs


def cpu_threads() -> int:
    """TensorFlow's CPU thread count: ``DOSNET_THREADS`` if set, else the machine's core count (what
    TF takes by default, but fixed here, never derived from the current load)."""
    import os

    value = os.environ.get("DOSNET_THREADS", "")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise TrainError(f"DOSNET_THREADS must be a positive integer, got {value!r}")
        return int(value)
    return os.cpu_count() or 1


def tf_setup(seed: int) -> None:
    """Fresh Keras state, seeded Python/NumPy/TF generators, deterministic TF ops and a fixed CPU
    thread count (``cpu_threads``): the same seed gives the same numbers on the same machine and
    software, whatever else runs on it (tests/test_train_faults.py checks under load)."""
    import keras
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    n = cpu_threads()
    try:  # only before TF's runtime starts: the first run of a process sets it
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(n)
    except RuntimeError:
        pass
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


@contextmanager
def ctrl_c_guard():
    """Ctrl-C (SIGINT) stops training at once and for certain: the handler raises
    ``KeyboardInterrupt`` as Python's does, and also records it, because a KeyboardInterrupt that
    lands inside a finaliser (a weakref callback, ``__del__``) is printed and dropped; the
    ``StopOnCtrlC`` callback then raises it again at the end of the running batch. Off the main
    thread (no signals there) and where SIGINT is ignored (a background job) nothing changes."""
    import signal
    import threading

    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield flag
        return

    def handler(signum, frame):
        flag.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_on_ctrl_c(flag) -> "keras.callbacks.Callback":  # noqa: F821
    """Raises ``KeyboardInterrupt`` after the batch in which Ctrl-C was pressed (see ``ctrl_c_guard``)."""
    import keras

    class StopOnCtrlC(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if flag.is_set():
                raise KeyboardInterrupt

        on_test_batch_end = on_train_batch_end

    return StopOnCtrlC()


def augment_points(params: dict, data: Dataset, streaming: bool) -> int:
    """Grid points of params' ``augment_shift_ev`` (0: off); one line when it cannot apply."""
    shift = float(params.get("augment_shift_ev", 0.0))
    if shift <= 0 or params["fusion"] == "structure_only":
        return 0
    if streaming:
        raise TrainError("params: 'augment_shift_ev' needs the DOS in memory (data.in_memory true or auto with enough "
                         "memory, distribute none)")
    if data.energies_ev is None or len(data.energies_ev) < 2:
        raise TrainError(f"params: 'augment_shift_ev' needs the energy grid, which {data.path} does not store")
    return int(round(shift / float(data.energies_ev[1] - data.energies_ev[0])))


def shift_dos(x: dict, rng, points: int) -> None:
    """Shift every sample's DOS inputs (``atom*_dos``: (n, L, C)) along energy by one random
    whole number of grid points in [-points, points], the same for a sample's atoms (the reference
    level moves; the edge value fills in). In place."""
    keys = [k for k in x if k.endswith("_dos")]
    if not keys:
        return
    n, length = x[keys[0]].shape[:2]
    sh = rng.integers(-points, points + 1, size=n)
    idx = np.clip(np.arange(length)[None, :] - sh[:, None], 0, length - 1)[:, :, None]
    for k in keys:
        x[k] = np.take_along_axis(x[k], idx, axis=1)


def predict_outputs(model, inputs: dict, targets, batch_size: int) -> np.ndarray:
    """(n, T) network outputs (standardised units), columns in ``targets`` order."""
    out = model.predict(inputs, batch_size=batch_size, verbose=0)
    if not isinstance(out, dict):
        out = {targets[0]: out}
    return np.concatenate([np.asarray(out[t]).reshape(-1, 1) for t in targets], axis=1).astype(np.float64)


@dataclass
class FitResult:
    """One trained model: its scalers, ``history`` (Keras' per-epoch lists), ``best_epoch``
    (1-based; the weights kept), ``predictions`` (name -> (len(rows), T) float64 in physical units)
    and ``seconds`` of training."""

    model: object
    scalers: Scalers
    history: dict
    best_epoch: int
    predictions: dict
    seconds: float

    @property
    def epochs_run(self) -> int:
        return len(self.history.get("loss", []))


def net_module():
    """The root ``net.py`` (the design card, derived from ``DOSnet/net.py`` by ``patches/``). It is
    not installed: it is imported from the checkout root, which is put on ``sys.path`` if needed."""
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    import net

    return net


def fit_predict(params: dict, data: Dataset, train_rows, val_rows, predict_rows: dict, log: Log,
                tensorboard_dir=None, show_summary: bool = False, checkpoint=None, resume: bool = False,
                callbacks=()) -> FitResult:
    """Fit scalers on ``train_rows``, train with early stopping on ``val_rows``, then predict.

    ``predict_rows``: name -> row indices to predict after training (e.g. train/val/test).
    ``tensorboard_dir``: write TensorBoard logs there (as upstream does; ``--tensorboard``).
    ``show_summary``: write ``model.summary()`` to ``log`` (as upstream prints it).
    ``callbacks``: more Keras callbacks, called after the run's own each epoch (e.g. the pruning
    of ``dosnet_bv.tune``; an exception raised in one ends the fit and propagates).
    ``checkpoint``: a file (``.npz``) written atomically at the end of every epoch (``Checkpoint``);
    with ``resume`` training continues from it, to the same numbers as an uninterrupted run.

    Training runs one epoch per ``model.fit`` call: in memory, epoch e's batch order is a
    permutation drawn from (seed, e) alone, so an epoch does not depend on how the process got
    there; early stopping (patience on ``val_loss``, best weights restored at the end, as Keras'
    ``EarlyStopping``) is done here so that its state can be checkpointed.
    """
    import keras

    from dosnet_bv import distribute

    net = net_module()

    strategy = strategy_for(params)  # first: a multi-worker strategy must precede every TF operation
    targets = params["targets"]
    with stream_errors(data, data.streaming):
        scalers = fit_scalers(params, data, train_rows)
    y = target_matrix(data, targets)
    y_scaled = (y - scalers.targets.mean) / scalers.targets.scale
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    # tf.data input when streaming, and on several replicas (equal, non-empty per-replica batches)
    streaming = params["fusion"] != "structure_only" and (data.streaming or replicas > 1)
    log(f"input: {data.reading if data.streaming else 'in memory'}; {distribute.describe(strategy)}")

    def y_of(rows):
        return {t: y_scaled[rows, j:j + 1].astype(np.float32) for j, t in enumerate(targets)}

    shift_points = augment_points(params, data, streaming)
    if not streaming:
        x_tr, x_va = model_inputs(params, data, scalers, train_rows), model_inputs(params, data, scalers, val_rows)
        y_tr = y_of(train_rows)
    tf_setup(params["seed"])
    n_structure = len(scalers.structure_columns)
    with model_scope(strategy, params["precision"]):
        model = net.compile_model(build_network(params, n_structure), params)
    if streaming:
        x_tr = stream_input(params, data, scalers, train_rows, y_scaled, True, replicas)
        x_va = stream_input(params, data, scalers, val_rows, y_scaled, False, replicas)
        fit_data = {"x": x_tr, "validation_data": x_va, "shuffle": False}  # the stream shuffles
    else:
        fit_data = {"validation_data": (x_va, y_of(val_rows)), "batch_size": params["batch_size"], "shuffle": False}
    if show_summary:
        model.summary(print_fn=lambda line, *args, **kwargs: log(line.rstrip()))
    epochs, patience = params["epochs"], params["early_stopping_patience"]
    extra_callbacks = callbacks
    callbacks = [keras.callbacks.LearningRateScheduler(lambda epoch, lr: net.learning_rate(epoch, params)),
                 epoch_log_callback(log, epochs, targets, scalers.targets.scale)]
    if tensorboard_dir is not None:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise TrainError("--tensorboard needs the tensorboard package (pip install 'tensorboard>=2.16,<2.22')")
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(tensorboard_dir)))
    callbacks += list(extra_callbacks)
    ckpt = Checkpoint(checkpoint) if checkpoint is not None else None
    state = {"epoch": 0, "history": {}, "best": None, "best_epoch": 0, "wait": 0, "seconds": 0.0, "stopped": False}
    best_weights = None
    if resume:
        state, best_weights = ckpt.restore(model, params)
        log(f"resumed from {ckpt.path} after epoch {state['epoch']}/{epochs}"
            + ("; streamed input: its shuffle starts afresh, so the result is close to, not equal to, an "
               "uninterrupted run's" if streaming else ""))
    history = state["history"]
    t0 = time.time() - state["seconds"]
    with stream_errors(data, streaming), ctrl_c_guard() as ctrl_c:
        callbacks.append(stop_on_ctrl_c(ctrl_c))
        for epoch in range(state["epoch"], epochs):
            if state["stopped"]:
                break
            if not streaming:  # batch order of this epoch: from (seed, epoch) only
                order = np.random.default_rng([params["seed"], epoch]).permutation(len(train_rows))
                fit_data["x"] = {k: v[order] for k, v in x_tr.items()}
                if shift_points:
                    shift_dos(fit_data["x"], np.random.default_rng([params["seed"], epoch, 1]), shift_points)
                fit_data["y"] = {k: v[order] for k, v in y_tr.items()}
            hist = model.fit(**fit_data, epochs=epoch + 1, initial_epoch=epoch, verbose=0, callbacks=callbacks)
            for k, vals in hist.history.items():
                history.setdefault(k, []).extend(float(v) for v in vals)
            if patience > 0 and "val_loss" in hist.history:  # as keras.callbacks.EarlyStopping(restore_best_weights)
                current = history["val_loss"][-1]
                if best_weights is None:
                    best_weights = model.get_weights()
                state["wait"] += 1
                if state["best"] is None or current < state["best"]:
                    state.update(best=current, best_epoch=epoch + 1, wait=0)
                    best_weights = model.get_weights()
                elif state["wait"] >= patience and epoch > 0:
                    state["stopped"] = True
            state["epoch"] = epoch + 1
            state["seconds"] = time.time() - t0
            if ckpt is not None:
                ckpt.save(model, state, best_weights)
            if ctrl_c.is_set():  # pressed as the epoch ended: it is complete and saved, stop now
                raise KeyboardInterrupt
            if state["stopped"]:
                break
    if patience > 0 and best_weights is not None:
        model.set_weights(best_weights)
    seconds = time.time() - t0
    val = history.get("val_loss", [])
    best = state["best_epoch"] if val and patience > 0 else len(val)
    del x_tr, x_va, fit_data
    predictor, pred_replicas = model, replicas
    if distribute.worker_of(strategy)[1] > 1:  # each worker predicts every row alone: no collectives, row order kept
        pred_replicas = 1
        with model_scope(None, params["precision"]):
            predictor = build_network(params, n_structure)
        predictor.set_weights(model.get_weights())
    preds = {}
    for name, rows in predict_rows.items():
        if not len(rows):
            preds[name] = np.zeros((0, len(targets)))
        elif streaming:
            rows = np.asarray(rows)
            order = np.argsort(rows, kind="stable")  # the stream yields sorted rows
            with stream_errors(data, True):
                z = predict_outputs(predictor, stream_input(params, data, scalers, rows, None, False, pred_replicas), targets,
                             params["batch_size"])
            preds[name] = np.empty_like(z)
            preds[name][order] = scalers.targets.inverse(z)
        else:
            z = predict_outputs(predictor, model_inputs(params, data, scalers, rows), targets, params["batch_size"])
            preds[name] = scalers.targets.inverse(z)
    return FitResult(model, scalers, history, best, preds, seconds)


class Checkpoint:
    """The training state at the end of an epoch, in one ``.npz`` written atomically: the model's
    weights, the optimizer's variables (Adam's step count and moments), the state of every random
    seed generator of the model (dropout), the best weights so far and, as JSON, the epoch, history,
    early-stopping state and elapsed seconds. The batch order needs no state: it is drawn from
    (seed, epoch)."""

    def __init__(self, path):
        from pathlib import Path

        self.path = Path(path)

    @staticmethod
    def _seed_states(model) -> list:
        return [sg.state for layer in model._flatten_layers() for sg in getattr(layer, "_seed_generators", [])]

    def save(self, model, state: dict, best_weights) -> None:
        from dosnet_bv.outputs import atomic_path

        arrays = {f"w{i}": w for i, w in enumerate(model.get_weights())}
        arrays.update({f"o{i}": np.asarray(v) for i, v in enumerate(model.optimizer.variables)})
        arrays.update({f"s{i}": np.asarray(v) for i, v in enumerate(self._seed_states(model))})
        arrays.update({f"b{i}": w for i, w in enumerate(best_weights or [])})
        with atomic_path(self.path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, state=np.array(json.dumps({**state, "has_best": best_weights is not None})), **arrays)

    def restore(self, model, params: dict):
        """Load into ``model`` (built and compiled as when saved); returns (state, best weights)."""
        import zipfile

        try:
            with np.load(self.path) as z:
                state = json.loads(str(z["state"]))
                keys = set(z.files)
                take = lambda prefix: [z[f"{prefix}{i}"] for i in range(sum(k.startswith(prefix) and k[1:].isdigit()  # noqa: E731
                                                                            for k in keys))]
                weights, opt, seeds, best = take("w"), take("o"), take("s"), take("b")
        except FileNotFoundError:
            raise TrainError(f"--resume: no checkpoint {self.path} (the run stopped before its first epoch ended: "
                             f"start it again with --overwrite)") from None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
            raise TrainError(f"--resume: cannot read the checkpoint {self.path}: {exc}") from None
        try:
            model.set_weights(weights)
            model.optimizer.build(model.trainable_variables)
            if len(opt) != len(model.optimizer.variables):
                raise ValueError(f"{len(opt)} optimizer variables saved, {len(model.optimizer.variables)} expected")
            for v, a in zip(model.optimizer.variables, opt):
                v.assign(a)
            for v, a in zip(self._seed_states(model), seeds):
                v.assign(a)
        except ValueError as exc:
            raise TrainError(f"--resume: the checkpoint {self.path} does not fit the run's model: {exc}") from None
        return state, (best if state.pop("has_best") else None)


def strategy_for(params: dict):
    """The run's ``tf.distribute`` strategy (``dosnet_bv.distribute``; None for ``distribute`` none)."""
    from dosnet_bv import distribute

    try:
        return distribute.strategy_for(params["distribute"])
    except distribute.DistributeError as exc:
        raise TrainError(str(exc)) from None


@contextmanager
def model_scope(strategy, precision: str):
    """Build and compile inside: the strategy's scope and the ``precision`` dtype policy."""
    import keras

    old = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        with strategy.scope() if strategy is not None else nullcontext():
            yield
    finally:
        keras.mixed_precision.set_global_policy(old)


def build_network(params: dict, n_structure: int):
    """``net.build_model``; under a mixed precision policy its outputs are cast to float32 (a
    float16 regression output would round the predictions to 3 significant digits)."""
    import keras

    net = net_module()
    model = net.build_model(params, n_structure)
    if params["precision"] == "float32":
        return model
    outputs = {t: keras.layers.Activation("linear", dtype="float32", name=f"{t}_float32")(model.outputs[j])
               for j, t in enumerate(model.output_names)}
    return keras.Model(model.inputs, {t: outputs[t] for t in params["targets"]}, name=model.name)


def stream_input(params: dict, data: Dataset, scalers: Scalers, rows, y_scaled, shuffle: bool, replicas: int = 1):
    """``stream.input_dataset`` of ``rows`` (targets when ``y_scaled`` is given). Training
    (``shuffle``) on several replicas drops the last partial batch of each epoch; other passes use
    ``stream.safe_batch_size`` so that no replica gets an empty batch."""
    from dosnet_bv import streaming as stream

    cols = scalers.structure_columns
    structure = data.structure[:, cols] if uses_vector(params) else None
    bsz = params["batch_size"] if shuffle else stream.safe_batch_size(len(rows), params["batch_size"], replicas)
    return stream.input_dataset(params, data.dos, scalers, rows, structure, y_scaled, shuffle, params["seed"], bsz,
                                drop_remainder=shuffle and replicas > 1,
                                bonds=data.bonds if uses_bonds(params) else None)


@contextmanager
def stream_errors(data: Dataset, streaming: bool):
    """Bad data met while streaming (``stream.StreamError``, also when raised inside tf.data) ->
    one-line ``TrainError``."""
    if not streaming:
        yield
        return
    import tensorflow as tf

    from dosnet_bv import streaming as stream

    try:
        yield
    except stream.StreamError as exc:
        raise TrainError(str(exc)) from None
    except tf.errors.OpError as exc:
        line = next((ln.strip() for ln in str(exc).splitlines() if "StreamError:" in ln), None)
        if line is None:
            raise
        raise TrainError(f"while streaming {data.path}: {line.split('StreamError:')[-1].strip()}") from None


def epoch_log_callback(log: Log, epochs: int, targets, target_scale) -> "keras.callbacks.Callback":  # noqa: F821
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
            loss = float(logs.get("loss", 0.0))
            if not np.isfinite(loss):  # stop at once: a NaN model must not be saved as a finished run
                raise TrainError(f"training diverged: loss {loss} at epoch {epoch + 1}/{self.epochs}; try a smaller "
                                 f"learning_rate (now {float(np.asarray(self.model.optimizer.learning_rate)):.3g}), "
                                 f"target_scaling 'standard' or loss 'log_cosh', and check the data for extreme values")
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
