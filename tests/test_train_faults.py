"""Failure handling of train.py (issue 15): run folders (refused, overwritten, written atomically,
marked complete), divergence, plausible targets, per-sample lengths, seeds, damaged models, disk full."""
import errno
import json
import os
import shutil
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
from h5_factory import write_minimal_h5

from conftest import ROOT, run_cli

os.environ.setdefault("OMP_NUM_THREADS", "2")

from dosnet_bv.data import load_data  # noqa: E402
from dosnet_bv.outputs import Log, write_json  # noqa: E402
from dosnet_bv.params import TrainError, validate_params  # noqa: E402
from dosnet_bv.runs import check_run_folder, predict_run, run_experiment  # noqa: E402

L = 400
ONE_LINE = "train.py: error:"


def _params(**over):
    p = json.loads((ROOT / "params.json").read_text())
    p.update(length=L, epochs=1, batch_size=16, early_stopping_patience=0, targets=["bvs_vu"], fusion="late",
             structure_families=["site"], structure_units=[8], lr_schedule="constant")
    p.update(over)
    return p


def tiny_h5(path, n_materials=12, sites=2, bvs=None):
    rng = np.random.default_rng(0)
    n = n_materials * sites
    mids = np.repeat([f"m{i:02d}" for i in range(n_materials)], sites)
    split = np.repeat(["train"] * (n_materials - 4) + ["val"] * 2 + ["test"] * 2, sites)
    y = rng.uniform(1, 3, n) if bvs is None else np.asarray(bvs, dtype=float)
    return write_minimal_h5(path, dos=rng.uniform(0, 1, (n, L, 27)), structure=rng.normal(size=(n, 2)),
                            labels=["s0", "s1"], families=["site", "site"], bvs=y, valence=np.rint(y), mids=mids,
                            elements=["Ti", "O"] * n_materials, split=split, sites=sites)


def _one_line(r):
    err = r.stderr.strip()
    assert r.returncode not in (0, -11, 139) and "Traceback" not in err, (r.returncode, err[-3000:])
    assert err.splitlines()[-1].startswith(ONE_LINE), err[-3000:]
    return err.splitlines()[-1]


@pytest.fixture(scope="module")
def h5(tmp_path_factory):
    return tiny_h5(tmp_path_factory.mktemp("train_faults") / "tiny.h5")


@pytest.fixture(scope="module")
def run(h5, tmp_path_factory):
    """One finished run (1 epoch of a tiny model), in process."""
    out = tmp_path_factory.mktemp("train_faults_run") / "run"
    p = _params(data_file=str(h5))
    run_experiment(p, load_data(h5, p), out)
    return out


# ------------------------------------------------------------------ item 2: run folders
def test_existing_run_folder_is_refused_without_overwrite(h5, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.log").write_text("an earlier run\n")
    params = tmp_path / "params.json"
    params.write_text(json.dumps(_params(data_file=str(h5))))
    r = run_cli("train.py", "--params", params, "--out", out)
    assert "exists and is not empty; pass --overwrite" in _one_line(r)
    assert (out / "train.log").read_text() == "an earlier run\n"  # untouched (was: appended to)


def test_overwrite_first_unmarks_then_clears_the_old_run(tmp_path):
    from dosnet_bv.outputs import prepare_run_folder

    out = tmp_path / "run"
    out.mkdir()
    for name in ("metrics.json", "train.log", "model.keras", "notes.txt"):
        (out / name).write_text("old")
    prepare_run_folder(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # the run's files only
    prepare_run_folder(tmp_path / "new", overwrite=False)  # a new folder: fine
    (tmp_path / "file").write_text("")
    with pytest.raises(TrainError, match="is a file"):
        prepare_run_folder(tmp_path / "file", overwrite=True)


def test_run_folder_is_complete_and_has_no_temporary_files(run):
    names = {p.name for p in run.iterdir()}
    assert {"params.json", "model.keras", "scalers.json", "metrics.json", "predictions.csv", "history.csv",
            "parity.png", "learning_curve.png", "train.log"} <= names
    assert not [n for n in names if n.startswith(".")], names
    json.loads((run / "metrics.json").read_text())  # strict JSON
    check_run_folder(run, "--predict")


def test_predict_and_importance_refuse_an_incomplete_or_damaged_run(run, h5, tmp_path):
    part = tmp_path / "partial"
    shutil.copytree(run, part)
    (part / "metrics.json").unlink()  # as left by an interrupted or failed run
    for what in ("--predict", "--importance"):
        with pytest.raises(TrainError, match="incomplete run"):
            check_run_folder(part, what)
    with pytest.raises(TrainError, match="incomplete run"):
        predict_run(part, h5, tmp_path / "p1")
    bad = tmp_path / "damaged"
    shutil.copytree(run, bad)
    (bad / "model.keras").write_bytes((run / "model.keras").read_bytes()[:1000])  # a truncated save
    with pytest.raises(TrainError, match="cannot load .*model.keras"):
        predict_run(bad, h5, tmp_path / "p2")


def test_atomic_writes_keep_the_old_file_when_the_disk_is_full(tmp_path):
    """Simulated ENOSPC (raised inside the write): the old file stays whole, no temporary is left."""
    from dosnet_bv.outputs import atomic_path

    path = tmp_path / "metrics.json"
    write_json(path, {"old": 1})
    with pytest.raises(OSError, match="No space"):
        with atomic_path(path) as tmp:
            tmp.write_text('{"new": ')
            raise OSError(errno.ENOSPC, "No space left on device")
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    write_json(path, {"bad": float("nan"), "inf": [float("inf")]})  # strict JSON, never a bare NaN
    assert json.loads(path.read_text()) == {"bad": None, "inf": [None]}


def test_disk_full_during_training_is_one_line(h5, tmp_path):
    """A real full disk (tmpfs of 64 KiB, root only): one line, exit status 1, no metrics.json."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                                           capture_output=True).returncode:
        pytest.skip("needs root and tmpfs (test_atomic_writes_keep_the_old_file_when_the_disk_is_full simulates it)")
    try:
        params = tmp_path / "params.json"
        params.write_text(json.dumps(_params(data_file=str(h5))))
        r = run_cli("train.py", "--params", params, "--out", disk / "run")
        assert "No space left on device" in _one_line(r)
        assert not (disk / "run" / "metrics.json").exists()
        assert not [p for p in (disk / "run").iterdir() if p.name.startswith(".")]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ------------------------------------------------------------------ item 4: divergence and plausible targets
@pytest.mark.parametrize("lr", [float("inf"), 1e30, float("nan"), 0, -1e-3])
def test_learning_rate_must_be_finite_and_sane(lr):
    with pytest.raises(TrainError, match="learning_rate"):
        validate_params(_params(learning_rate=lr))


def test_divergence_stops_at_the_first_non_finite_loss(h5, tmp_path, monkeypatch):
    """The schedule is patched to 1e30 (params refuse it): the loss becomes non-finite after the
    first update; training stops with one line and leaves no model and no metrics.json."""
    from dosnet_bv.fit import net_module

    monkeypatch.setattr(net_module(), "learning_rate", lambda epoch, params: 1e30)
    p = _params(data_file=str(h5), epochs=5)
    out = tmp_path / "run"
    with pytest.raises(TrainError, match=r"training diverged: loss (nan|inf) at epoch [12]/5; try a smaller learning_rate"):
        run_experiment(p, load_data(h5, p), out, Log(quiet=True))
    assert not (out / "metrics.json").exists() and not (out / "model.keras").exists()


def test_implausible_target_is_refused_at_load_naming_the_sample(tmp_path):
    bvs = np.full(24, 2.0)
    bvs[5] = 1e30
    path = tiny_h5(tmp_path / "big.h5", bvs=bvs)
    with pytest.raises(TrainError, match=r"target 'bvs_vu' of sample 5 \(m02 site 1\) is 1e\+30, outside"):
        load_data(path, _params())


# ------------------------------------------------------------------ item 6: lengths and labels checked at load
def test_short_per_sample_dataset_and_wrong_channel_labels_are_refused(h5, tmp_path):
    short = tmp_path / "short.h5"
    shutil.copy(h5, short)
    with h5py.File(short, "r+") as h:
        origin = h["meta/origin"][...]
        del h["meta/origin"]
        h["meta/origin"] = origin[:-1]  # one row short
    with pytest.raises(TrainError, match="meta/origin has 23 rows but the DOS has 24 samples"):
        load_data(short, _params())
    labels = tmp_path / "labels.h5"
    shutil.copy(h5, labels)
    with h5py.File(labels, "r+") as h:
        h["dos"].attrs["channel_labels"] = list(h["dos"].attrs["channel_labels"])[:-1]
    with pytest.raises(TrainError, match="channel_labels has 26 names but the DOS has 27 channels"):
        load_data(labels, _params())


# ------------------------------------------------------------------ item 5: seeds
@pytest.mark.parametrize("key, value", [("seed", -1), ("seed", 2 ** 70), ("split_seed", -1), ("seed", 1.5)])
def test_seeds_outside_numpys_range_are_refused(key, value):
    with pytest.raises(TrainError, match=key):
        validate_params(_params(**{key: value}))


def test_bad_seed_on_the_command_line_leaves_no_run_folder(h5, tmp_path):
    params = tmp_path / "params.json"
    params.write_text(json.dumps(_params(data_file=str(h5))))
    r = run_cli("train.py", "--params", params, "--seed", str(2 ** 70), "--out", tmp_path / "run")
    assert "'seed' must be an integer in [0," in _one_line(r)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ item 3: interrupt and resume
def _train_cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    return subprocess.Popen([os.sys.executable, "train.py", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_sigint_then_resume_gives_the_uninterrupted_result(h5, tmp_path):
    """A real SIGINT to a real training process after its third epoch; ``--resume`` continues from
    the last checkpoint and ends with the metrics of an uninterrupted run of the same seed (CPU)."""
    params = tmp_path / "params.json"
    params.write_text(json.dumps(_params(data_file=str(h5), epochs=12, early_stopping_patience=3,
                                         lr_schedule="dosnet_step", dropout=0.2)))
    whole = _train_cli("--params", params, "--out", tmp_path / "whole")
    cut = _train_cli("--params", params, "--out", tmp_path / "cut")
    log = tmp_path / "cut" / "train.log"
    deadline = time.time() + 300
    while time.time() < deadline and cut.poll() is None:
        if log.is_file() and "epoch   3/12" in log.read_text():
            break
        time.sleep(0.05)
    cut.send_signal(signal.SIGINT)  # python's default handler: KeyboardInterrupt, exit status 130
    _, err = cut.communicate(timeout=120)
    assert cut.returncode == 130, err[-3000:]
    assert (tmp_path / "cut" / "checkpoint.npz").is_file() and not (tmp_path / "cut" / "metrics.json").exists()
    r = run_cli("train.py", "--resume", tmp_path / "cut")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in (tmp_path / "cut" / "train.log").read_text()
    _, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err[-3000:]
    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    b = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert (a["epochs_run"], a["best_epoch"]) == (b["epochs_run"], b["best_epoch"])
    for s in ("train", "val", "test"):
        assert b["splits"][s]["bvs_vu"]["mae"] == pytest.approx(a["splits"][s]["bvs_vu"]["mae"], rel=1e-5, abs=1e-6)
    assert not (tmp_path / "cut" / "checkpoint.npz").exists()  # removed once complete
    r = run_cli("train.py", "--resume", tmp_path / "cut")
    assert "is complete" in _one_line(r)


def test_interrupted_cv_resumes_after_its_finished_folds(h5, tmp_path, monkeypatch, capsys):
    """A finished 3-fold CV is cut back to what an interruption in fold 3 leaves, with fold 2's file
    damaged: the same command retrains folds 2 and 3 only (one line names the damaged file) and ends
    with the uninterrupted numbers; ``--resume`` continues too; other settings are refused. The
    training is a stand-in (a fixed offset per fold's seed): what is tested is which folds run."""
    import train
    from dosnet_bv import runs
    from dosnet_bv.fit import FitResult

    fits = []

    def fit(p, data, tr, va, predict, log, **kw):
        fits.append(p["seed"])
        pred = data.targets["bvs_vu"][predict["test"]][:, None] + 0.01 * p["seed"]
        return FitResult(None, None, {"loss": [1.0, 0.5], "val_loss": [1.2, 0.7]}, 2, {"test": pred}, 0.1)

    monkeypatch.setattr(runs, "fit_predict", fit)
    params = tmp_path / "params.json"
    params.write_text(json.dumps(_params(data_file=str(h5))))
    out = tmp_path / "cv"
    argv = ["--params", str(params), "--cv", "3", "--out", str(out)]
    assert train.main(argv) == 0 and fits == [88, 89, 90]  # fold f trains with seed + f
    whole = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").unlink()
    (out / "results" / "fold2.json").write_text((out / "results" / "fold2.json").read_text()[:40])  # truncated
    (out / "results" / "fold3.json").unlink()
    assert train.main(argv) == 0
    assert fits == [88, 89, 90, 89, 90]  # folds 2 and 3 again
    lines = (out / "train.log").read_text()
    assert "fold2.json is damaged" in lines and "recomputing it" in lines and "fold 1/3: from an earlier" in lines
    again = json.loads((out / "metrics.json").read_text())
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in whole.items() if k != "seconds"}
    assert again["splits"]["cv"]["bvs_vu"]["mae"] == pytest.approx(0.89, abs=0.02)  # 0.88..0.90 by fold
    (out / "metrics.json").unlink()
    (out / "results" / "fold3.json").write_text('{"fold": 3}')  # valid JSON, not a fold: damaged too
    assert train.main(["--resume", str(out)]) == 0 and fits[5:] == [90]
    (out / "metrics.json").unlink()
    capsys.readouterr()
    assert train.main([*argv, "--seed", "5"]) == 1  # another seed into the interrupted CV: refused
    assert "holds a run with other settings (params)" in capsys.readouterr().err
    assert train.main(argv) == 0 and len(fits) == 6  # every fold finished: nothing trained
    assert train.main([*argv, "--overwrite"]) == 0 and len(fits) == 9  # --overwrite starts afresh


# ------------------------------------------------------------------ item 7: same seed, same numbers
def test_same_seed_same_numbers_in_another_process_under_cpu_load(run, h5, tmp_path):
    """The in-process fixture run, repeated by train.py in a separate process while another
    process keeps a CPU busy (under ``make test`` the other xdist worker loads the second one):
    identical predictions and metrics (timings aside)."""
    params = tmp_path / "params.json"
    params.write_text(json.dumps(_params(data_file=str(h5))))
    burn = [subprocess.Popen([os.sys.executable, "-c", "while True: pass"])]
    try:
        r = run_cli("train.py", "--params", params, "--out", tmp_path / "again")
    finally:
        for b in burn:
            b.kill()
            b.wait()
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "again" / "predictions.csv").read_text() == (run / "predictions.csv").read_text()
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (run, tmp_path / "again"))
    for m in (a, b):
        for k in ("train_seconds", "train_samples_per_s", "data_file", "input"):  # timing, path, free memory
            m.pop(k)
    assert a == b
