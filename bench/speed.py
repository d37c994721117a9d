"""The measurement behind ``bench/streaming.py`` and ``bench/throughput.py``: train one configuration
on a data_prep h5 in a fresh process and report training samples/s and peak memory.

    python bench/speed.py H5 CONFIG_JSON        # prints one JSON line

CONFIG (all optional): ``model`` "root" (net.py through train.py's code: scalers, inputs or
stream, strategy scope, precision) or "dosnet" (the upstream architecture, ``DOSnet/net.py``,
compiled as ``python -m DOSnet`` does, inputs in memory); ``params``: overrides of the root
params.json (fusion, batch_size, learning_rate, data.in_memory, precision, ...); ``epochs``
(default 2); ``jit_compile`` (bool); ``threads``: [intra, inter] TensorFlow thread pools (set
before TensorFlow starts).

Reported: ``samples_per_s``: the best epoch after the first (the first one includes tracing; on
a shared machine other processes only ever slow an epoch down, so the best one is the closest to
the machine's own speed; with one epoch, that epoch), ``median_samples_per_s`` of those epochs,
``first_epoch_samples_per_s``, ``scaler_seconds`` (the
statistics pass over the training rows: one streaming pass when streaming), ``load_seconds``,
``peak_rss_gb`` (``resource.getrusage``: the process's maximum resident set, everything included:
Python, TensorFlow, data, model), the input path and the training rows. To tell a run that did
more work from one that waited (the slow second lzf streaming run of docs/scaling.md), also:
``epoch_cpu_seconds`` (the process's user + system CPU per epoch, all threads),
``cpu_ms_per_sample`` (of the best epoch), ``fit_read_mb`` (bytes the process fetched from storage
during ``fit``, ``/proc/self/io`` read_bytes: page-cache hits do not count, so > 0 means the
file was read from the disk) and ``fit_involuntary_switches`` (times the kernel preempted a
thread of the process: grows when other processes, or more threads than cores, compete). Only the training split
is trained on; no validation pass, no prediction.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def peak_rss_gb() -> float:
    """Maximum resident set size of this process so far, GB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def storage_read_bytes() -> int:
    """Bytes this process has fetched from storage (``/proc/self/io`` read_bytes; page-cache hits
    excluded), or -1 where the kernel does not report it."""
    try:
        with open("/proc/self/io") as fh:
            for line in fh:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def epoch_timer(times: list, cpu: list | None = None):
    """A Keras callback that appends each epoch's wall-clock seconds to ``times`` (and, when
    given, its process CPU seconds to ``cpu``)."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t, self.c = time.perf_counter(), cpu_seconds()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t)
            if cpu is not None:
                cpu.append(cpu_seconds() - self.c)

    return EpochTimer()


def prepare(h5, config: dict) -> dict:
    """Everything ``measure`` trains, built but not trained: ``{"model", "fit" (model.fit's data
    keywords), "n" (training rows), "streaming", "params", "data", "scaler_seconds",
    "load_seconds"}``. ``bench/paired.py`` builds several in one process this way."""
    if config.get("threads"):
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(int(config["threads"][0]))
        tf.config.threading.set_inter_op_parallelism_threads(int(config["threads"][1]))
    sys.path.insert(0, str(ROOT))
    import keras
    import numpy as np

    from dosnet_bv.data import load_data, target_matrix
    from dosnet_bv.fit import build_network, model_scope, strategy_for, stream_input, tf_setup
    from dosnet_bv.scalers import fit_scalers, model_inputs

    params = json.loads((ROOT / "params.json").read_text())
    over = dict(config.get("params", {}))
    if "data" in over:
        over["data"] = {**params["data"], **over["data"]}
    params.update(over)
    params["early_stopping_patience"] = 0
    kind = config.get("model", "root")
    t0 = time.perf_counter()
    data = load_data(h5, params)
    load_s = time.perf_counter() - t0
    rows = np.flatnonzero(data.split == "train")
    t0 = time.perf_counter()
    if kind == "dosnet":  # upstream: per-channel scaler on the training rows, 3 atom inputs, one target
        params = {**params, "fusion": "none", "targets": ["bvs_vu"]}
    scalers = fit_scalers(params, data, rows)
    scaler_s = time.perf_counter() - t0
    y = target_matrix(data, params["targets"])
    y_scaled = ((y - scalers.targets.mean) / scalers.targets.scale).astype(np.float32)
    tf_setup(params["seed"])
    streaming = data.streaming and params["fusion"] != "structure_only"
    if kind == "dosnet":
        from DOSnet.net import create_model, dos_featurizer

        model = create_model(dos_featurizer(params["channels"], params["length"]), params["channels"],
                             params["length"])
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=params["learning_rate"]),
                      loss=keras.losses.LogCosh(), metrics=["mae"])
        x = model_inputs(params, data, scalers, rows)
        fit = {"x": [x[f"atom{i}_dos"] for i in (1, 2, 3)], "y": y_scaled[rows, :1],
               "batch_size": params["batch_size"], "shuffle": True}
        streaming = False
    else:
        strategy = strategy_for(params)
        with model_scope(strategy, params["precision"]):
            import net

            model = net.compile_model(build_network(params, len(scalers.structure_columns)), params)
        if streaming:
            fit = {"x": stream_input(params, data, scalers, rows, y_scaled, True), "shuffle": False}
        else:
            x = model_inputs(params, data, scalers, rows)
            fit = {"x": x, "y": {t: y_scaled[rows, j:j + 1] for j, t in enumerate(params["targets"])},
                   "batch_size": params["batch_size"], "shuffle": True}
    if config.get("jit_compile"):
        model.jit_compile = True
    return {"model": model, "fit": fit, "n": len(rows), "streaming": streaming, "params": params, "data": data,
            "scaler_seconds": scaler_s, "load_seconds": load_s}


def measure(h5, config: dict) -> dict:
    """Train ``config`` (``prepare``) for its ``epochs`` (default 2); the figures of the docstring."""
    epochs = int(config.get("epochs", 2))
    kind = config.get("model", "root")
    run = prepare(h5, config)
    model, fit, params, data, streaming = run["model"], run["fit"], run["params"], run["data"], run["streaming"]
    n, scaler_s, load_s = run["n"], run["scaler_seconds"], run["load_seconds"]
    times, cpu = [], []
    io0, sw0 = storage_read_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
    hist = model.fit(**fit, epochs=epochs, verbose=0, callbacks=[epoch_timer(times, cpu)])
    io1, sw1 = storage_read_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
    best = min(range(1, len(times)) or range(len(times)), key=lambda i: times[i])
    return {"model": kind, "fusion": params["fusion"], "structure_input": params.get("structure_input", "vector"),
            "batch_size": params["batch_size"],
            "input": "streaming" if streaming else "in memory", "precision": params["precision"],
            "jit_compile": bool(config.get("jit_compile")), "threads": config.get("threads"),
            "train_rows": int(n), "epochs": epochs, "epoch_seconds": [round(t, 2) for t in times],
            "samples_per_s": round(n / min(times[1:] or times), 1),
            "median_samples_per_s": round(n / sorted(times[1:] or times)[(len(times[1:] or times) - 1) // 2], 1),
            "first_epoch_samples_per_s": round(n / times[0], 1),
            "epoch_cpu_seconds": [round(c, 2) for c in cpu], "cpu_ms_per_sample": round(cpu[best] / n * 1e3, 3),
            "fit_read_mb": round((io1 - io0) / 1e6, 1) if io0 >= 0 and io1 >= 0 else None,
            "fit_involuntary_switches": int(sw1 - sw0),
            "loss": [round(float(v), 4) for v in hist.history["loss"]],
            "scaler_seconds": round(scaler_s, 2), "load_seconds": round(load_s, 2),
            "peak_rss_gb": round(peak_rss_gb(), 3), "dos_gb": round(data.dos.shape[0] * data.dos.shape[1]
                                                                     * data.dos.shape[2] * 4 / 1e9, 3)}


def run_child(h5, config: dict, timeout: float = 1800) -> dict:
    """``measure`` in a fresh Python process (clean peak RSS, thread settings); the JSON result."""
    import subprocess

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(h5), json.dumps(config)], env=env,
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"measurement {config} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], json.loads(sys.argv[2]))), flush=True)
