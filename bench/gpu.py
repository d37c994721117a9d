"""Benchmark: in-memory training samples/s of the upstream DOSnet architecture against the root
model (fusions none, late, early), on whatever device the Keras backend sees, at two batch sizes
and three precisions.

Usage::

    KERAS_BACKEND=jax python bench/gpu.py [--samples 8192] [--epochs 4] [--batch 32 256]
                                          [--precision float32 mixed_bfloat16 mixed_float16]
                                          [--only NAME ...] [--json PATH]

Why a second throughput bench: ``bench/throughput.py`` goes through ``train.py``, whose input
pipeline, seeding and distribution are TensorFlow's. This one uses only Keras and NumPy (the two
``net.py`` files and ``dosnet_bv.fit.build_network``, which casts a mixed-precision model's outputs to float32),
so it runs under any Keras 3 backend: the JAX or PyTorch builds that a GPU machine already holds,
where a GPU build of TensorFlow cannot be installed. The figures measure the same networks and
optimiser, not ``train.py``'s TensorFlow input path.

Data: random standard-normal arrays of the model's input shapes (params.json: 3 atoms x 2000 x 9;
``--n-structure`` structure features, 83 in the embedded data), float32, in host memory, passed
to ``model.fit`` with shuffling; throughput does not depend on the values. Each configuration
trains ``--epochs`` epochs on ``--samples`` samples in this process (fresh Keras session) and is
timed on its fastest epoch after the first (the first includes compilation). A larger batch
scales the learning rate linearly (only speed is measured here). Targets: ``bvs_vu`` for the
upstream model (one output, as upstream), params.json's targets for the root model.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import epoch_timer  # noqa: E402

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
_ARRAYS: dict = {}


def device_name() -> str:
    """The accelerator the backend trains on, in words (``cpu`` when there is none)."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            dev = jax.devices()[0]
            return f"{dev.platform}: {getattr(dev, 'device_kind', dev)}"
        if backend == "torch":
            import torch

            return f"cuda: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu"
        if backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            return f"gpu: {tf.config.experimental.get_device_details(gpus[0]).get('device_name', gpus[0].name)}" \
                if gpus else "cpu"
    except Exception as exc:  # report, never fail the bench on a naming question
        return f"unknown ({exc})"
    return "unknown"


def configurations(batches, precisions) -> dict:
    out = {}
    for prec in precisions:
        for bsz in batches:
            out[f"dosnet (upstream), batch {bsz}, {prec}"] = {"model": "dosnet", "batch": bsz, "precision": prec}
            for fusion in ("none", "late", "early"):
                out[f"{fusion}, batch {bsz}, {prec}"] = {"model": "root", "fusion": fusion, "batch": bsz,
                                                         "precision": prec}
    return out


def measure(config: dict, params: dict, n: int, epochs: int, n_structure: int, seed: int = 0) -> dict:
    import keras
    import numpy as np

    import net
    from dosnet_bv.fit import build_network
    from DOSnet.net import create_model, dos_featurizer

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    keras.mixed_precision.set_global_policy(config["precision"])
    bsz = config["batch"]
    p = {**params, "precision": config["precision"], "batch_size": bsz,
         "learning_rate": params["learning_rate"] * bsz / params["batch_size"]}
    rng = np.random.default_rng(seed)
    atoms = net.atoms_per_sample(p)
    key = (n, p["length"], p["channels"], atoms, seed)
    if key not in _ARRAYS:  # the same inputs for every configuration (drawing them takes seconds)
        _ARRAYS.clear()
        _ARRAYS[key] = [rng.standard_normal((n, p["length"], p["channels"]), dtype=np.float32) for _ in range(atoms)]
    dos = _ARRAYS[key]
    try:
        if config["model"] == "dosnet":
            model = create_model(dos_featurizer(p["channels"], p["length"]), p["channels"], p["length"])
            if config["precision"] != "float32":
                out = keras.layers.Activation("linear", dtype="float32")(model.outputs[0])
                model = keras.Model(model.inputs, out)
            model.compile(optimizer=keras.optimizers.Adam(learning_rate=p["learning_rate"]),
                          loss=keras.losses.LogCosh())
            x, y = dos, rng.standard_normal((n, 1), dtype=np.float32)
        else:
            p["fusion"] = config["fusion"]
            model = net.compile_model(build_network(p, n_structure), p)
            x = {f"atom{i + 1}_dos": d for i, d in enumerate(dos)}
            if p["fusion"] != "none":
                x["structure"] = rng.standard_normal((n, n_structure), dtype=np.float32)
            y = {t: rng.standard_normal((n, 1), dtype=np.float32) for t in p["targets"]}
        times = []
        hist = model.fit(x, y, batch_size=bsz, epochs=epochs, shuffle=True, verbose=0,
                         callbacks=[epoch_timer(times)])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    steady = times[1:] or times
    loss = [float(v) for v in hist.history["loss"]]
    return {**config, "samples": n, "epochs": epochs, "epoch_seconds": [round(t, 3) for t in times],
            "samples_per_s": round(n / min(steady), 1), "first_epoch_s": round(times[0], 2),
            "params_count": int(model.count_params()), "loss_finite": bool(np.all(np.isfinite(loss)))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=8192)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--precision", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    ap.add_argument("--n-structure", type=int, default=83, help="structure features (83 in the embedded data)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="configurations whose name starts with one of these")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.samples < 1 or args.epochs < 2:
        ap.error("--samples must be >= 1 and --epochs >= 2 (the first epoch includes compilation)")
    import keras

    params = json.loads((ROOT / "params.json").read_text())
    configs = configurations(args.batch, args.precision)
    if args.only:
        configs = {k: v for k, v in configs.items() if any(k.startswith(o) for o in args.only)}
    head = {"backend": keras.backend.backend(), "keras": keras.__version__, "device": device_name(),
            "host": platform.node(), "cpus": os.cpu_count(), "samples": args.samples, "epochs": args.epochs}
    print(json.dumps(head), flush=True)
    results = {}
    t0 = time.time()
    for name, cfg in configs.items():
        try:
            results[name] = measure(cfg, params, args.samples, args.epochs, args.n_structure)
            r = results[name]
            print(f"{name:42s} {r['samples_per_s']:9.1f} samples/s  (first epoch {r['first_epoch_s']} s)", flush=True)
        except Exception as exc:  # one configuration failing (e.g. float16 unsupported) must not lose the rest
            results[name] = {**cfg, "error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"{name:42s} failed: {results[name]['error']}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({**head, "results": results, "seconds": round(time.time() - t0)},
                                                  indent=1))
    ref = {b: results.get(f"dosnet (upstream), batch {b}, float32", {}).get("samples_per_s") for b in args.batch}
    print("\n| configuration | samples/s | vs upstream, same batch, float32 |\n|---|---:|---:|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed | |")
            continue
        base = ref.get(r["batch"])
        print(f"| {name} | {r['samples_per_s']:.0f} | {r['samples_per_s'] / base:.2f}x |" if base else
              f"| {name} | {r['samples_per_s']:.0f} | |")
    print(f"\n{head['backend']} backend, {head['device']}, {args.samples} samples, {time.time() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
