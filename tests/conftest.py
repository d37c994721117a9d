"""Shared test setup: quiet TensorFlow, repository root on sys.path, helpers to run the CLIs."""
import contextlib
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@contextlib.contextmanager
def _keras_steps_eager():
    import tensorflow as tf
    before = tf.config.functions_run_eagerly()
    tf.config.run_functions_eagerly(True)
    try:
        yield
    finally:
        tf.config.run_functions_eagerly(before)


@pytest.fixture(scope="module")
def eager_steps():
    """Keras train, validation and predict steps run eagerly for one test module (no tf.function
    tracing). For the tiny files of the tests, tracing a step's graph costs more than all the steps
    it then runs (the ablation fixture: 220 s traced, 117 s eager); what these modules test is the
    protocol around the fits, not graph building. Graph mode stays covered by the modules that do not
    ask for this (tests/test_dosnet.py, test_scale.py, test_train_faults.py, test_synthetic_bench.py)
    and by every run a user starts. Use: ``pytestmark = pytest.mark.usefixtures("eager_steps")``.
    Not for longer fits: eager steps made the planted importance run 3x slower."""
    with _keras_steps_eager():
        yield


@pytest.fixture
def eager_steps_one_test():
    """``eager_steps`` for one test (a tiny fit in a module whose other fits are longer)."""
    with _keras_steps_eager():
        yield


@pytest.fixture
def quick_form(monkeypatch):
    """The fitted bond valence form (``baselines.FittedBondValence``) at 50 function evaluations per
    ridge penalty instead of 300. On the tests' random bond tables it has nothing to converge to and
    runs to the limit every time; those tests check which rows each fit sees, not the radii."""
    from dosnet_bv import baselines
    monkeypatch.setattr(baselines, "FittedBondValence", functools.partial(baselines.FittedBondValence, max_nfev=50))


def run_cli(*args, cwd=ROOT, timeout=600):
    """Run ``python *args`` in a subprocess; return CompletedProcess with text output."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
