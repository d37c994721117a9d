"""Run one small train.py experiment in a fresh process for the distribution tests (tests/test_scale.py).

    python tests/scale_worker.py H5 OUT PARAMS_JSON [--logical-cpus K]

PARAMS_JSON: a params object (JSON text). With ``--logical-cpus K`` the CPU is split into K logical
devices first (before TensorFlow initialises), so ``distribute: mirrored`` has K replicas.
Prints one JSON line: per-epoch losses, test MAE and count, replicas, worker index, run folder.
"""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv):
    h5, out, params = argv[0], argv[1], json.loads(argv[2])
    if "--logical-cpus" in argv:
        import tensorflow as tf

        k = int(argv[argv.index("--logical-cpus") + 1])
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * k)
    from dosnet_bv.data import load_data
    from dosnet_bv.fit import strategy_for
    from dosnet_bv.outputs import Log
    from dosnet_bv.runs import run_experiment

    data = load_data(h5, params)
    metrics = run_experiment(params, data, out, Log(quiet=True))
    import csv

    from dosnet_bv import distribute

    strategy = strategy_for(params)
    index = distribute.worker_of(strategy)[0]
    folder = Path(out) / f"worker{index}" if index else Path(out)
    with open(folder / "history.csv") as fh:
        history = list(csv.DictReader(fh))
    target = params["targets"][0]
    print(json.dumps({"epochs_run": metrics["epochs_run"], "input": metrics["input"], "worker": index,
                      "replicas": 1 if strategy is None else int(strategy.num_replicas_in_sync),
                      "loss": [float(r["loss"]) for r in history], "val_loss": [float(r["val_loss"]) for r in history],
                      "test_mae": metrics["splits"]["test"][target]["mae"],
                      "n_test": metrics["splits"]["test"][target]["n"], "folder": str(folder)}), flush=True)

if __name__ == "__main__":
    main(sys.argv[1:])
