"""Scaling: streaming input from the h5 (dosnet_bv/streaming.py), tf.distribute strategies (dosnet_bv/distribute.py).

The streamed path must give the same scalers and the same standardised inputs as the in-memory
path, train and predict with the same model API; MirroredStrategy on 2 logical CPUs and
MultiWorkerMirroredStrategy with 2 local processes must train and finish (subprocesses, with
timeouts so that a hang fails instead of blocking)."""
import csv
import json
import os
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import ROOT

os.environ.setdefault("OMP_NUM_THREADS", "2")

from dosnet_bv import streaming as stream  # noqa: E402
from dosnet_bv.data import load_data, target_matrix  # noqa: E402
from dosnet_bv.fit import strategy_for  # noqa: E402
from dosnet_bv.outputs import Log  # noqa: E402
from dosnet_bv.params import DATA_READ_KEYS, TrainError, validate_params  # noqa: E402
from dosnet_bv.runs import predict_run, run_experiment  # noqa: E402
from dosnet_bv.scalers import fit_scalers, model_inputs  # noqa: E402

L = 400
WORKER = ROOT / "tests" / "scale_worker.py"


def _params(**over):
    p = json.loads((ROOT / "params.json").read_text())
    p.update(length=L, epochs=2, batch_size=16, early_stopping_patience=0, lr_schedule="constant",
             targets=["bvs_vu", "valence"], dos_filters=[25, 38, 50, 63, 75])  # half the widths: what
    # these tests check (streaming, precision, distribution) does not depend on the network's size
    p.update(over)
    return p


def _with_data(p, **data):
    return {**p, "data": {**p["data"], **data}}


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """A synthetic file in the real layout (lzf, one sample per chunk): 60 materials x 4 sites."""
    from data_prep.synthetic_h5 import write_synthetic_h5

    d = tmp_path_factory.mktemp("scale")
    write_synthetic_h5(d / "syn.h5", 240, n_points=L)
    return d / "syn.h5"


# ------------------------------------------------------------------ the in-memory rule and params
def test_in_memory_rule():
    gb = 10 ** 9
    assert stream.decide_in_memory("auto", 2 * gb, 10 * gb)[0] is True     # 20 % < 25 %
    assert stream.decide_in_memory("auto", 3 * gb, 10 * gb)[0] is False    # 30 % >= 25 %
    assert "25%" in stream.decide_in_memory("auto", 3 * gb, 10 * gb)[1]
    assert stream.decide_in_memory(True, 100 * gb, 1 * gb)[0] is True
    assert stream.decide_in_memory(False, 1, 100 * gb)[0] is False
    assert stream.available_memory_bytes() > 0


def test_params_data_section_and_build_share_it():
    from data_prep.build import TRAIN_READ_KEYS, BuildConfig

    assert tuple(DATA_READ_KEYS) == TRAIN_READ_KEYS
    p = _params()
    validate_params(dict(p))
    both = _with_data(p, grid={"n_points": L}, n_neighbours=2)  # build keys may sit beside the read keys
    validate_params(both)
    assert BuildConfig.from_params(both["data"]).grid.n_points == L
    for bad in ({"in_memory": "yes"}, {"in_memory": 1}, {"block_samples": 0}, {"shuffle_buffer": -1},
                {"bogus": 1}):
        with pytest.raises(TrainError, match="'data'"):
            validate_params(_with_data(p, **bad))
    with pytest.raises(TrainError, match="'distribute'"):
        validate_params({**p, "distribute": "horovod"})
    with pytest.raises(TrainError, match="TF_CONFIG"):  # no cluster described: one line, no hang
        env = {k: os.environ.pop(k) for k in ("TF_CONFIG", "SLURM_STEP_ID") if k in os.environ}
        try:
            strategy_for({**p, "distribute": "multi_worker"})
        finally:
            os.environ.update(env)


def test_slurm_job_step_gives_the_cluster(monkeypatch):
    """Inside ``srun`` (2 nodes, one task each; this is rank 1) the resolver names both workers."""
    from dosnet_bv import distribute

    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for k, v in {"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2",
                 "SLURM_STEP_NODELIST": "node[07-08]", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
                 "SLURM_DIST_PORT_BASE": "23456"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(distribute.shutil, "which", lambda name: None)  # a CPU-only node
    assert distribute.cluster_source() == "SLURM"
    resolver, _ = distribute._resolver()
    assert resolver.cluster_spec().as_dict() == {"worker": ["node07:23456", "node08:23456"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", 1)


# ------------------------------------------------------------------ reading
def test_h5dos_reads_like_numpy(syn):
    with h5py.File(syn) as h:
        full = h["dos"][...]
    x = stream.H5DOS(syn)
    assert x.shape == full.shape and len(x) == len(full)
    rows = np.array([7, 3, 4, 5, 100, 3, 239])  # unsorted, repeated, runs and singles
    assert np.array_equal(x[rows], full[rows])
    assert np.array_equal(x[10:20], full[10:20]) and np.array_equal(x[5], full[5])
    mask = np.zeros(len(full), bool)
    mask[[1, 2, 50]] = True
    assert np.array_equal(x[mask], full[mask])
    assert np.array_equal(x[:, :, [0, 3]], full[:, :, [0, 3]])
    assert stream.runs_of(np.array([1, 2, 3, 7, 9, 10])) == [(1, 4, 0), (7, 8, 3), (9, 11, 4)]
    z = stream.H5DOS(syn, zero_tail=(300, L))
    assert np.all(z[rows][:, 300:] == 0) and np.array_equal(z[rows][:, :300], full[rows][:, :300])


@pytest.mark.parametrize("zero_tail", [None, [350, L]])
def test_streamed_scalers_equal_in_memory(syn, zero_tail):
    """One streaming pass over the training rows (running float64 sums) gives the in-memory scalers."""
    fitted = {}
    for mem in (True, False):
        p = _with_data(_params(zero_tail=zero_tail), in_memory=mem)
        data = load_data(syn, p)
        assert data.streaming is (not mem)
        fitted[mem] = fit_scalers(p, data, np.flatnonzero(data.split == "train"))
    for key in ("dos", "structure", "targets"):
        np.testing.assert_allclose(getattr(fitted[False], key).mean, getattr(fitted[True], key).mean, rtol=1e-12, atol=0)
        np.testing.assert_allclose(getattr(fitted[False], key).scale, getattr(fitted[True], key).scale, rtol=1e-12, atol=0)
    assert fitted[False].json == fitted[True].json


def _batches(ds):
    xs, ys = [], []
    for x, y in ds:
        xs.append({k: v.numpy() for k, v in x.items()})
        ys.append({k: v.numpy() for k, v in y.items()})
    cat = lambda parts: {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}  # noqa: E731
    return cat(xs), cat(ys), [len(next(iter(b.values()))) for b in xs]


def test_stream_gives_the_in_memory_inputs(syn):
    p = _params(fusion="late", data={"in_memory": True, "block_samples": 8, "shuffle_buffer": 32})
    mem = load_data(syn, p)
    streamed = load_data(syn, _with_data(p, in_memory=False))
    tr, va = np.flatnonzero(mem.split == "train"), np.flatnonzero(mem.split == "val")
    sc = fit_scalers(p, mem, tr)
    y = target_matrix(mem, p["targets"])
    y_scaled = (y - sc.targets.mean) / sc.targets.scale
    cols = sc.structure_columns
    # in order: the arrays model_inputs gives (the stream standardises the DOS in float32)
    x, yy, sizes = _batches(stream.input_dataset(p, streamed.dos, sc, va, mem.structure[:, cols], y_scaled))
    ref = model_inputs(p, mem, sc, va)
    assert set(x) == set(ref) == {"atom1_dos", "atom2_dos", "atom3_dos", "structure"}
    for k in ref:
        np.testing.assert_allclose(x[k], ref[k], rtol=3e-7, atol=3e-7 * np.abs(ref[k]).max(), err_msg=k)
    assert np.array_equal(x["structure"], ref["structure"])
    assert np.array_equal(yy["bvs_vu"][:, 0], y_scaled[va, 0].astype(np.float32))
    assert sizes[:-1] == [16] * (len(sizes) - 1)
    # shuffled: every training row once per epoch, in a new order each epoch
    ds = stream.input_dataset(p, streamed.dos, sc, tr, mem.structure[:, cols], y_scaled, shuffle=True, seed=3)
    key = lambda b: b["structure"][:, 0]  # noqa: E731  (a per-sample fingerprint)
    e1, e2 = key(_batches(ds)[0]), key(_batches(ds)[0])
    want = np.sort(model_inputs(p, mem, sc, tr)["structure"][:, 0])
    assert np.array_equal(np.sort(e1), want) and np.array_equal(np.sort(e2), want)
    assert not np.array_equal(e1, e2) and not np.array_equal(e1, np.sort(e1))
    # several replicas: training drops the last partial batch; other passes pick a batch size
    # whose last batch leaves no replica empty
    _, _, sizes = _batches(stream.input_dataset(p, streamed.dos, sc, tr, mem.structure[:, cols], y_scaled,
                                                shuffle=True, drop_remainder=True))
    assert set(sizes) == {16} and sum(sizes) == len(tr) // 16 * 16
    for n in range(2, 80):  # (one sample cannot be split between two replicas)
        b = stream.safe_batch_size(n, 16, 2)
        assert b >= 2 and (n % b == 0 or n % b >= 2)


# ------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def both_runs(syn, tmp_path_factory):
    d = tmp_path_factory.mktemp("scale_runs")
    out = {}
    for mem in (True, False):
        p = _with_data(_params(fusion="late"), in_memory=mem, block_samples=16, shuffle_buffer=64)
        out[mem] = (run_experiment(p, load_data(syn, p), d / str(mem), Log(quiet=True)), d / str(mem))
    return out


def _losses(folder):
    with open(folder / "history.csv") as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh)]


def test_streaming_trains_and_predicts_like_in_memory(both_runs):
    (m_mem, d_mem), (m_str, d_str) = both_runs[True], both_runs[False]
    assert m_str["input"].startswith("streaming") and m_mem["input"].startswith("in memory")
    with open(d_mem / "predictions.csv") as a, open(d_str / "predictions.csv") as b:
        ra, rb = list(csv.DictReader(a)), list(csv.DictReader(b))
    key = ("material_id", "site_index", "split", "bvs_vu_true")
    assert [[r[k] for k in key] for r in ra] == [[r[k] for k in key] for r in rb]  # same rows, same order
    assert all(np.isfinite(float(r["bvs_vu_pred"])) for r in rb)
    la, lb = _losses(d_mem), _losses(d_str)
    assert len(la) == len(lb) == 2 and lb[1] < lb[0]  # it learns
    assert 0.5 < lb[-1] / la[-1] < 2.0, (la, lb)  # comparable (batches differ: other shuffling)
    for s in ("train", "val", "test"):
        assert m_str["splits"][s]["bvs_vu"]["n"] == m_mem["splits"][s]["bvs_vu"]["n"]


def test_predict_run_streams(both_runs, syn, tmp_path):
    _, run = both_runs[False]
    p = json.loads((run / "params.json").read_text())
    assert p["data"]["in_memory"] is False
    out = predict_run(run, syn, tmp_path / "pred", Log(quiet=True))
    with open(out / "predictions.csv") as a, open(run / "predictions.csv") as b:
        pa, pb = list(csv.DictReader(a)), list(csv.DictReader(b))
    by_key = {(r["material_id"], r["site_index"]): float(r["bvs_vu_pred"]) for r in pb}
    assert len(pa) == len(pb)
    assert max(abs(float(r["bvs_vu_pred"]) - by_key[(r["material_id"], r["site_index"])]) for r in pa) < 1e-4


def test_nan_in_a_streamed_dos_is_one_error(syn, tmp_path):
    bad = tmp_path / "nan.h5"
    bad.write_bytes(syn.read_bytes())
    with h5py.File(bad, "r+") as h:
        split = h["split"].asstr()[...]
        v = int(np.flatnonzero(split == "val")[0])
        x = h["dos"][v]
        x[5, 2] = np.nan
        h["dos"][v] = x
    p = _with_data(_params(fusion="none", epochs=1), in_memory=False)
    data = load_data(bad, p)  # streaming: nothing read yet
    with pytest.raises(TrainError, match=f"sample {v} contains NaN"):
        run_experiment(p, data, tmp_path / "run", Log(quiet=True))


def test_mixed_precision_trains(syn, tmp_path):
    import keras

    p = _params(fusion="late", epochs=1, precision="mixed_bfloat16")
    m = run_experiment(p, load_data(syn, p), tmp_path / "bf16", Log(quiet=True))
    assert np.isfinite(m["splits"]["test"]["bvs_vu"]["mae"])
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after building
    model = keras.models.load_model(tmp_path / "bf16" / "model.keras", compile=False)
    assert all(o.dtype == "float32" for o in model.outputs)


# ------------------------------------------------------------------ distribution (subprocesses)
def _worker(h5, out, params, extra=(), env=None, timeout=240):
    return subprocess.Popen([sys.executable, str(WORKER), str(h5), str(out), json.dumps(params), *extra],
                            cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT),
                                           **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc, timeout):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"worker did not finish within {timeout} s (hang?)")
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_mirrored_on_two_logical_cpus(syn, both_runs, tmp_path):
    """Same params as the in-memory run of ``both_runs`` but ``distribute: mirrored`` on 2 logical CPUs."""
    p = _with_data(_params(fusion="late", distribute="mirrored"), in_memory=True, block_samples=16, shuffle_buffer=64)
    r = _result(_worker(syn, tmp_path / "mirrored", p, ["--logical-cpus", "2"]), 240)
    assert r["replicas"] == 2 and r["epochs_run"] == 2
    m_one, d_one = both_runs[True]
    assert r["n_test"] == m_one["splits"]["test"]["bvs_vu"]["n"]
    one = _losses(d_one)
    assert 0.5 < r["loss"][-1] / one[-1] < 2.0, (r["loss"], one)
    assert r["loss"][1] < r["loss"][0]
    with open(tmp_path / "mirrored" / "predictions.csv") as a, open(d_one / "predictions.csv") as b:
        assert len(list(csv.reader(a))) == len(list(csv.reader(b)))


def _free_ports(k):
    socks = [socket.socket() for _ in range(k)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_two_workers_on_localhost_train_one_epoch_together(syn, tmp_path):
    p = _with_data(_params(fusion="none", epochs=1, distribute="multi_worker"), in_memory=False,
                   block_samples=16, shuffle_buffer=64)
    hosts = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    procs = [_worker(syn, tmp_path / "mw", p, env={"TF_CONFIG": json.dumps(
        {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}})}) for i in range(2)]
    try:
        results = [_result(proc, 240) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [r["worker"] for r in results] == [0, 1]
    assert all(r["replicas"] == 2 and r["epochs_run"] == 1 for r in results)
    assert results[0]["loss"] == results[1]["loss"]  # one synchronous training, one loss
    chief, other = tmp_path / "mw", tmp_path / "mw" / "worker1"
    for folder in (chief, other):
        assert (folder / "model.keras").is_file() and (folder / "predictions.csv").is_file()
