"""tf.distribute strategies for train.py: params ``distribute`` = ``none`` | ``mirrored`` | ``multi_worker``.

- ``none``: TensorFlow's default (one device), exactly the single-device code path.
- ``mirrored``: ``tf.distribute.MirroredStrategy`` over every GPU of this machine, or, without a
  GPU, over every logical CPU device (one unless configured with
  ``tf.config.set_logical_device_configuration``: what the tests use). Variables are copied to each
  device; each batch of ``batch_size`` samples is split between them and the gradients summed.
- ``multi_worker``: ``tf.distribute.MultiWorkerMirroredStrategy`` across processes, usually one
  per machine. The cluster comes from ``TF_CONFIG`` when it is set (``{"cluster": {"worker":
  ["host1:port", ...]}, "task": {"type": "worker", "index": i}}``, the same list on every
  worker), else from ``SlurmClusterResolver`` inside a SLURM job step (``srun``: one worker per
  task, hosts from ``SLURM_STEP_NODELIST``, port ``SLURM_DIST_PORT_BASE`` (default 8888) plus the
  task's rank on its node; GPUs split between a node's tasks, none on a CPU-only node). Worker 0 (or the
  task of type ``chief``) is the chief: it writes the run folder; other workers write theirs
  under ``<run>/worker<i>/``. Every worker runs the same tf.data pipeline (``dosnet_bv/streaming.py``, reading
  the whole file: a shared file system, or a copy per machine) and TensorFlow's ``DATA``
  auto-sharding gives it its part of every global batch; after training each worker predicts alone.

``batch_size`` stays the global batch (all replicas together), so results are comparable with a
single device; to use more devices raise ``batch_size`` and ``learning_rate`` together (the
throughput bench measures what that does on one CPU).

A ``MultiWorkerMirroredStrategy`` must be created before TensorFlow runs its first operation and
only once per process: ``strategy_for`` caches it.
"""
from __future__ import annotations

import json
import os
import shutil

DISTRIBUTE = ("none", "mirrored", "multi_worker")
_CACHE: dict = {}


class DistributeError(RuntimeError):
    """A strategy that cannot be set up here (no cluster description for multi_worker)."""


def cluster_source() -> str | None:
    """Where a ``multi_worker`` cluster would come from: ``"TF_CONFIG"``, ``"SLURM"`` or None."""
    if os.environ.get("TF_CONFIG"):
        return "TF_CONFIG"
    if os.environ.get("SLURM_STEP_ID") is not None and os.environ.get("SLURM_PROCID") is not None:
        return "SLURM"
    return None


def _resolver():
    import tensorflow as tf

    source = cluster_source()
    if source == "TF_CONFIG":
        try:
            json.loads(os.environ["TF_CONFIG"])
        except json.JSONDecodeError as exc:
            raise DistributeError(f"TF_CONFIG is not valid JSON: {exc}") from None
        return tf.distribute.cluster_resolver.TFConfigClusterResolver(), source
    if source == "SLURM":
        port = int(os.environ.get("SLURM_DIST_PORT_BASE", "8888"))
        slurm = tf.distribute.cluster_resolver.SlurmClusterResolver
        if os.environ.get("CUDA_VISIBLE_DEVICES") or shutil.which("nvidia-smi"):
            return slurm(port_base=port), source
        # A CPU-only node: the resolver would call nvidia-smi, and with 0 GPUs it lists no task
        # at all (it pairs tasks with GPU slots). Give it one dummy slot per task, set nothing.
        slots = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
        return slurm(port_base=port, gpus_per_node=slots, gpus_per_task=1, auto_set_gpu=False), source
    raise DistributeError("distribute 'multi_worker' needs a cluster: set TF_CONFIG on every worker, or start "
                          "the workers with srun inside a SLURM job (see README, section Scaling)")


def strategy_for(name: str):
    """The ``tf.distribute.Strategy`` for params ``distribute`` = ``name``; None for ``none``."""
    if name == "none":
        return None
    if name not in DISTRIBUTE:
        raise DistributeError(f"unknown distribute {name!r}; expected one of {', '.join(DISTRIBUTE)}")
    if name in _CACHE:
        return _CACHE[name]
    import tensorflow as tf

    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or \
                  [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    else:
        resolver, _ = _resolver()
        strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
        _reduce_nested(strategy)
    _CACHE[name] = strategy
    return strategy


def _reduce_nested(strategy) -> None:
    """Make ``strategy.reduce`` accept what Keras 3 ``fit`` gives it under ``MultiWorkerMirroredStrategy``.

    Keras 3 reduces (1) the first input batch, a dict here, across replicas before building
    (``_maybe_symbolic_build``): ``MultiWorkerMirroredStrategy`` reduces single values only
    (keras-team/keras issue 20329, open); and (2) every scalar log value with ``axis=0``, which
    fails on a 0-d tensor (tensorflow/tensorflow issue 72388; the metrics are already synchronised
    across workers, so the mean over replicas, ``axis=None``, is the same number). This wraps
    ``reduce`` on this instance only: a structure is reduced leaf by leaf and a scalar over
    replicas. Every worker makes the same calls, so the collectives still match.
    """
    import tensorflow as tf

    single = strategy.reduce

    def rank(v):
        local = strategy.experimental_local_results(v) if isinstance(v, tf.distribute.DistributedValues) else (v,)
        shape = getattr(local[0], "shape", None)
        return None if shape is None else shape.rank

    def reduce(reduce_op, value, axis=None):
        if tf.nest.is_nested(value):
            return tf.nest.map_structure(lambda v: reduce(reduce_op, v, axis), value)
        if axis is not None and rank(value) == 0:
            axis = None
        return single(reduce_op, value, axis=axis)

    strategy.reduce = reduce


def worker_of(strategy) -> tuple[int, int]:
    """``(index, count)`` of this process among the workers (``(0, 1)`` on one machine)."""
    resolver = getattr(strategy, "cluster_resolver", None) if strategy is not None else None
    if resolver is None or not getattr(resolver, "task_type", None):
        return 0, 1
    spec = resolver.cluster_spec().as_dict()
    tasks = [("chief", i) for i in range(len(spec.get("chief", [])))] + \
            [("worker", i) for i in range(len(spec.get("worker", [])))]
    key = (resolver.task_type, int(resolver.task_id))
    return (tasks.index(key) if key in tasks else 0), max(1, len(tasks))


def is_chief(strategy) -> bool:
    """True unless this process is a non-chief worker of a multi-worker cluster."""
    return worker_of(strategy)[0] == 0


def describe(strategy) -> str:
    """One line for the log: strategy, replicas, worker index."""
    if strategy is None:
        return "one device (distribute none)"
    index, count = worker_of(strategy)
    kind = type(strategy).__name__
    where = f"; worker {index + 1} of {count} ({cluster_source()})" if count > 1 else ""
    return f"{kind}, {strategy.num_replicas_in_sync} replica(s) in sync{where}"
