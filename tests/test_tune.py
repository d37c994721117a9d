"""``train.py --tune`` (dosnet_bv/tune.py): the tune section's rules, family-grouped folds without
the test split, failed trials recorded, one-line errors, a search whose best params.json trains,
two workers on one SQLite study, resuming after SIGKILL, and PostgreSQL when a server can be
started (``pg_ctl`` of the Debian ``postgresql`` package and ``pip install -e .[postgres]``).

Tiny data (16 materials x 2 sites, 64-point DOS), 1-2 epochs: the whole file takes about a minute
or two on 2 cores, mostly the TensorFlow imports of the worker subprocesses.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from h5_factory import write_minimal_h5

from conftest import ROOT

os.environ.setdefault("OMP_NUM_THREADS", "1")

import train  # noqa: E402
from dosnet_bv.data import load_data  # noqa: E402
from dosnet_bv.fit import FitResult  # noqa: E402
from dosnet_bv.params import TrainError, validate_params  # noqa: E402
from dosnet_bv import tune  # noqa: E402

pytestmark = pytest.mark.usefixtures("eager_steps")  # tiny fits: see conftest.eager_steps

optuna = pytest.importorskip("optuna")
L = 64
ONE_LINE = "train.py: error:"
SPACE = {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}, "dropout": {"low": 0.0, "high": 0.4},
         "batch_size": {"choices": [8, 16]}, "structure_units": {"choices": [[8], [16, 8]]}}


def write_tiny_h5(path, n_materials=16, sites=2, families=None):
    rng = np.random.default_rng(0)
    n = n_materials * sites
    dos = rng.uniform(0, 0.3, size=(n, L, 27)).astype(np.float32)
    structure = rng.normal(size=(n, 4)).astype(np.float32)
    bvs = 2 + dos[:, 20:30, 0].mean(axis=1) + 0.3 * structure[:, 0]
    mids = np.repeat([f"syn-{i:03d}" for i in range(n_materials)], sites)
    split = np.where(np.isin(mids, mids[-4:]), "test", np.where(np.isin(mids, mids[-8:-4]), "val", "train"))
    write_minimal_h5(path, dos=dos, structure=structure, labels=["s0", "s1", "g0", "g1"],
                     families=["site"] * 2 + ["global"] * 2, bvs=bvs, valence=np.rint(bvs), mids=mids,
                     elements=["Ti", "O"] * n_materials, split=split, sites=sites)
    return path


def tiny_params(h5, out_dir, **tune_over):
    p = json.loads((ROOT / "params.json").read_text())
    p.update(data_file=str(h5), out_dir=str(out_dir), length=L, epochs=1, batch_size=16, early_stopping_patience=1,
             structure_families=["site", "global"], structure_units=[8], lr_schedule="constant")
    p["tune"] = {"trials": 3, "folds": 2, "epochs": 2, "patience": 1, "pruner": "median", "space": SPACE, **tune_over}
    return validate_params(p)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tune")
    h5 = write_tiny_h5(d / "tiny.h5")
    params = d / "params.json"
    params.write_text(json.dumps(tiny_params(h5, d / "runs")))
    return d, h5, params


def _error_line(capsys, argv):
    code = train.main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.count("\n") == 0 and err.startswith(ONE_LINE), err
    return err


# ----------------------------------------------------------------- rules (no TensorFlow)
@pytest.mark.parametrize("space, expect", [
    ({"learning_rate": {"low": 0.01, "high": 0.001}}, "empty or inverted range"),
    ({"dropout": {"low": 0.2, "high": 0.2}}, "empty or inverted range"),
    ({"widths": {"choices": [1, 2]}}, "unknown parameter"),
    ({"fusion": {"choices": []}}, "non-empty list"),
    ({"fusion": {"choices": ["late", "sideways"]}}, "choice \"sideways\""),
    ({"fusion": {"low": 0, "high": 1}}, "choices"),
    ({"learning_rate": {"low": 0.0, "high": 0.1, "log": True}}, "log range"),
    ({"dropout": {"low": 0.0, "high": 1.5}}, "bound 1.5"),
    ({"batch_size": {"low": 8.5, "high": 64}}, "integers"),
    ({}, "'space' must be"),
])
def test_tune_section_rules_name_the_problem(tiny, space, expect):
    _, h5, _ = tiny
    p = tiny_params(h5, "runs")
    p["tune"]["space"] = space
    with pytest.raises(TrainError) as err:
        validate_params(p)
    assert "'tune'" in str(err.value) and expect in str(err.value), str(err.value)
    del p["tune"]["pruner"]
    p["tune"]["space"] = SPACE
    with pytest.raises(TrainError, match="missing key 'pruner'"):
        validate_params(p)


def test_folds_group_families_and_never_hold_test_rows(tiny):
    _, h5, _ = tiny
    params = tiny_params(h5, "runs", folds=3)
    data = load_data(h5, params)
    data.family_id = np.array([f"fam{int(m[-3:]) // 2}" for m in data.material_id])  # families of 2 materials
    folds = tune.tuning_folds(data, params)
    assert len(folds) == 3
    test = set(np.flatnonzero(data.split == "test"))
    seen = np.concatenate([va for _, va in folds])
    assert sorted(seen) == sorted(set(range(data.n)) - test)  # every non-test row validated once
    for tr, va in folds:
        assert not (set(tr) | set(va)) & test
        assert not set(data.family_id[tr]) & set(data.family_id[va])
    with pytest.raises(TrainError, match="'tune' folds 20 needs more than 20 families"):
        tune.tuning_folds(data, {**params, "tune": {**params["tune"], "folds": 20}})
    assert np.array_equal(tune.group_ids(data, "material"), data.material_id)
    data.family_id = None  # a hand-made Dataset without families groups by material
    assert np.array_equal(tune.group_ids(data), data.material_id)


def _fake_fit(outcomes):
    """A stand-in for fit_predict: pops an outcome per call (an exception to raise, or a val_loss list)."""
    def fit(params, data, tr, va, predict_rows, log, callbacks=()):
        what = outcomes.pop(0) if outcomes else [1.0, 0.5]
        if isinstance(what, BaseException):
            raise what
        for cb in callbacks:
            for e, v in enumerate(what):
                cb.on_epoch_end(e, {"loss": 1.0, "val_loss": v})
        return FitResult(None, None, {"loss": [1.0] * len(what), "val_loss": what}, int(np.argmin(what)) + 1, {}, 0.0)
    return fit


def test_failed_trials_are_recorded_and_the_search_goes_on(tiny, tmp_path, monkeypatch):
    _, h5, _ = tiny
    import dosnet_bv.fit

    monkeypatch.setattr(dosnet_bv.fit, "fit_predict", _fake_fit([MemoryError("no room"), [float("nan")]]))
    params = tiny_params(h5, tmp_path, pruner="none")
    summary = tune.run_tune(params, load_data(h5, params), tmp_path / "t", trials=4, progress=False)
    assert summary["trials"]["fail"] == 2 and summary["trials"]["complete"] == 2, summary
    study = optuna.load_study(study_name="dosnet-bv", storage=f"sqlite:///{tmp_path / 't' / 'study.db'}")
    reasons = [t.user_attrs.get("fail_reason", "") for t in study.trials if t.state.name == "FAIL"]
    assert "out of memory" in reasons[0] and "non-finite" in reasons[1], reasons
    rows = (tmp_path / "t" / "trials.csv").read_text().splitlines()
    assert len(rows) == 5 and "out of memory" in rows[1]
    best = json.loads((tmp_path / "t" / "best_params.json").read_text())
    validate_params(best)
    assert best["learning_rate"] == summary["best"]["params"]["learning_rate"]
    assert isinstance(best["structure_units"], list)
    assert (tmp_path / "t" / "optimization_history.png").is_file()


def test_bad_input_one_line_and_nothing_lost(tiny, tmp_path, capsys):
    d, h5, params = tiny
    err = _error_line(capsys, ["--params", str(params), "--tune", "--storage", "nosuchdb://x/y"])
    assert "--storage" in err
    err = _error_line(capsys, ["--params", str(params), "--tune", "--storage", f"journal:{tmp_path}/no/dir/j.log"])
    assert "--storage" in err
    err = _error_line(capsys, ["--params", str(params), "--tune", "--storage", f"sqlite:///{tmp_path}/no/dir/s.db"])
    assert "does not exist" in err
    assert "--tune" in _error_line(capsys, ["--params", str(params), "--trials", "3"])
    bad = json.loads(params.read_text())
    bad["tune"]["space"]["featurizer_width"] = {"choices": [1]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert "unknown parameter" in _error_line(capsys, ["--params", str(tmp_path / "bad.json"), "--tune"])
    url = f"sqlite:///{tmp_path / 'other.db'}"
    study = optuna.create_study(study_name="s", storage=url)
    study.set_user_attr("search_config", {"space": {"dropout": {"low": 0, "high": 0.1}}})
    study.enqueue_trial({"dropout": 0.05})
    err = _error_line(capsys, ["--params", str(params), "--tune", "--study", "s", "--storage", url])
    assert "different search space" in err
    again = optuna.load_study(study_name="s", storage=url)
    assert len(again.trials) == 1 and again.user_attrs["search_config"]["space"] == {"dropout": {"low": 0, "high": 0.1}}


# ----------------------------------------------------------------- real training
def test_tune_writes_best_params_that_train(tiny, tmp_path):
    d, h5, params = tiny
    out = tmp_path / "tuned"
    assert train.main(["--params", str(params), "--tune", "--trials", "2", "--out", str(out)]) == 0
    for name in ("best_params.json", "trials.csv", "tune.json", "tune.log", "study.db", "optimization_history.png",
                 "param_importances.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "tune.json").read_text())
    assert summary["trials"]["complete"] == 2 and np.isfinite(summary["best"]["value"])
    assert train.main(["--params", str(out / "best_params.json"), "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "metrics.json").is_file()


def _cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finished(url, name="dosnet-bv"):
    try:
        study = optuna.load_study(study_name=name, storage=url)
    except Exception:  # noqa: BLE001 -- not created yet
        return []
    return [t for t in study.trials if t.state.is_finished()]


@pytest.mark.slow  # two worker processes: ~30-55 s (make test-all runs it)
def test_two_workers_share_one_sqlite_study(tiny, tmp_path):
    d, h5, params = tiny
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    workers = [_cli("--params", params, "--tune", "--trials", "3", "--storage", url, "--out", tmp_path / f"w{i}")
               for i in range(2)]
    for w in workers:
        out, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-2000:]
    trials = optuna.load_study(study_name="dosnet-bv", storage=url).trials
    finished = [t for t in trials if t.state.is_finished()]
    assert 3 <= len(finished) <= 4  # both may start their last trial before either records the 3rd
    assert len({t.number for t in trials}) == len(trials)
    assert len({json.dumps(t.params, sort_keys=True) for t in finished}) == len(finished)
    ran = [json.loads((tmp_path / f"w{i}" / "tune.json").read_text())["this_worker"]["trials"] for i in range(2)]
    assert sum(ran) == len(finished) and min(ran) >= 1, ran


@pytest.mark.slow  # a killed and a resumed study: ~25-50 s (make test-all runs it)
def test_resume_after_kill_keeps_trials_and_continues(tiny, tmp_path):
    d, h5, params = tiny
    out = tmp_path / "resume"
    url = f"sqlite:///{out / 'study.db'}"
    cmd = ("--params", params, "--tune", "--trials", "2", "--out", out)
    first = _cli(*cmd)
    t0 = time.time()
    while not ((out / "study.db").exists() and _finished(url)) and first.poll() is None and time.time() - t0 < 300:
        time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    before = {t.number: t.value for t in _finished(url)}
    assert before, "no trial finished before the kill"
    second = _cli(*cmd)
    _, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-2000:]
    after = {t.number: t for t in optuna.load_study(study_name="dosnet-bv", storage=url).trials}
    assert all(after[n].value == v for n, v in before.items())  # earlier trials kept
    assert max(after) > max(before)  # numbering continues
    assert sum(t.state.is_finished() for t in after.values()) >= 2


# ----------------------------------------------------------------- PostgreSQL
def _pg_bin():
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    cands = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return cands[-1].parent if cands else None


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL cluster on 127.0.0.1 (a free port) in a temporary folder, stopped and
    removed afterwards. As root, initdb and the server run as ``nobody`` (initdb refuses root)."""
    import tempfile

    pytest.importorskip("psycopg2", reason="pip install -e .[postgres]")
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server (apt-get install postgresql)")
    base = Path(tempfile.mkdtemp(prefix="dosnet-pg-"))
    runas = []
    if os.geteuid() == 0:
        import pwd

        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv")
        nobody = pwd.getpwnam("nobody")
        os.chown(base, nobody.pw_uid, nobody.pw_gid)
        runas = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data, pg_ctl = base / "data", [*runas, str(bindir / "pg_ctl"), "-D", str(base / "data")]
    try:
        r = subprocess.run([*runas, str(bindir / "initdb"), "-D", str(data), "-U", "tune", "--auth=trust"],
                           capture_output=True, text=True, cwd=base)
        if r.returncode != 0:
            pytest.skip(f"initdb failed: {r.stderr.strip()[:200]}")
        r = subprocess.run([*pg_ctl, "-w", "-l", str(base / "pg.log"), "-o", f"-h 127.0.0.1 -p {port} -k {base}",
                            "start"], capture_output=True, text=True, cwd=base)
        if r.returncode != 0:
            pytest.skip(f"pg_ctl start failed: {r.stderr.strip()[:200]}")
        yield f"postgresql+psycopg2://tune@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True, cwd=base)
        shutil.rmtree(base, ignore_errors=True)


def test_postgresql_storage(tiny, tmp_path, postgres_url, monkeypatch):
    _, h5, _ = tiny
    import dosnet_bv.fit

    monkeypatch.setattr(dosnet_bv.fit, "fit_predict", _fake_fit([]))
    params = tiny_params(h5, tmp_path)
    tune.run_tune(params, load_data(h5, params), tmp_path / "a", trials=2, storage=postgres_url, progress=False)
    summary = tune.run_tune(params, load_data(h5, params), tmp_path / "b", trials=3, storage=postgres_url,
                            progress=False)
    assert summary["trials"]["complete"] == 3 and summary["this_worker"]["trials"] == 1
