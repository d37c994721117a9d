"""``train.py --tune --cv K`` (dosnet_bv/tune_cv.py): nested tuning. The search of each outer fold
never sees that fold's test rows nor any family of it; default and tuned are trained on the same
rows with the same seeds; an interrupted study resumes without rerunning finished work; the
paired per-fold differences are computed from the runs. A stand-in for the network's fit keeps
these fast; one test runs the real network end to end through the command line.
"""
import json
import os

import numpy as np
import pytest
from test_tune import tiny_params, write_tiny_h5

os.environ.setdefault("OMP_NUM_THREADS", "1")

import train  # noqa: E402
from dosnet_bv import tune_cv  # noqa: E402
from dosnet_bv.data import load_data  # noqa: E402
from dosnet_bv.fit import FitResult  # noqa: E402
from dosnet_bv.runs import cv_splits  # noqa: E402

pytestmark = pytest.mark.usefixtures("eager_steps")  # tiny fits: see conftest.eager_steps

pytest.importorskip("optuna")


def _families(data):
    return np.array([f"fam{int(m[-3:]) // 2}" for m in data.material_id])  # families of 2 materials


class Recorder:
    """Stands in for fit_predict: records the rows each call trains and validates on and the
    learning rate it got; predicts the targets plus an error that depends on the learning rate."""

    def __init__(self, data):
        self.calls, self.data = [], data

    def __call__(self, params, data, tr, va, predict_rows, log, callbacks=(), **kw):
        self.calls.append({"train": set(map(int, tr)), "val": set(map(int, va)), "lr": params["learning_rate"],
                           "predict": {k: set(map(int, v)) for k, v in predict_rows.items()}})
        val = [1.0, abs(np.log10(params["learning_rate"]) + 3) + 0.1]
        for cb in callbacks:
            for e, v in enumerate(val):
                cb.on_epoch_end(e, {"loss": 1.0, "val_loss": v})
        y = np.stack([data.targets[t] for t in params["targets"]], axis=1)
        err = 0.1 + abs(np.log10(params["learning_rate"]) + 3)
        preds = {k: y[np.asarray(v)] + err for k, v in predict_rows.items()}
        return FitResult(None, None, {"loss": [1.0, 1.0], "val_loss": val}, 2, preds, 0.0)


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    h5 = write_tiny_h5(tmp_path / "tiny.h5", n_materials=24)
    params = tiny_params(h5, tmp_path / "runs", pruner="none",
                         space={"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}})
    data = load_data(h5, params)
    data.family_id = _families(data)
    rec = Recorder(data)
    import dosnet_bv.ablation
    import dosnet_bv.fit

    monkeypatch.setattr(dosnet_bv.fit, "fit_predict", rec)
    monkeypatch.setattr(dosnet_bv.ablation, "fit_predict", rec)
    return params, data, rec


def test_search_never_sees_the_outer_test_fold(setup, tmp_path):
    params, data, rec = setup
    res = tune_cv.run_tune_cv(params, data, tmp_path / "n", k=3, n_seeds=2, trials=3)
    folds = cv_splits(data.groups("family"), 3, params["cv_val_fraction"], params["split_seed"])
    # per outer fold: 3 trials x 2 inner folds of the search, then 2 models x 2 seeds
    assert len(rec.calls) == 3 * (3 * 2 + 2 * 2)
    i = 0
    for train_rows, val_rows, test_rows in folds:
        test, test_fams = set(map(int, test_rows)), set(data.family_id[test_rows])
        for call in rec.calls[i:i + 6]:  # the search
            seen = call["train"] | call["val"] | set().union(*call["predict"].values())
            assert not seen & test
            assert not set(data.family_id[sorted(seen)]) & test_fams
            assert not set(data.family_id[sorted(call["train"])]) & set(data.family_id[sorted(call["val"])])
        for call in rec.calls[i + 6:i + 10]:  # default and tuned: the outer fold's rows
            assert call["train"] == set(map(int, train_rows)) and call["val"] == set(map(int, val_rows))
            assert call["predict"]["test"] == test
        i += 10
    assert [c.fold for c in res.choices] == [0, 1, 2] and all(c.trials == 3 for c in res.choices)
    assert res.summaries["tuned"]["test"]["bvs_vu"]["n_seeds"] == 6
    # the recorder's error is 0.1 + |log10(lr) + 3|: default lr 1e-3 gives 0.1 exactly, any tuned lr more
    assert res.summaries["default"]["test"]["bvs_vu"]["mae"]["mean"] == pytest.approx(0.1)
    tuned = [abs(np.log10(c.values["learning_rate"]) + 3) + 0.1 for c in res.choices]
    assert res.summaries["tuned"]["test"]["bvs_vu"]["mae"]["mean"] == pytest.approx(np.mean(tuned))
    p = next(p for p in res.paired if p.target == "bvs_vu" and p.subset == "test")
    assert p.differences == pytest.approx([round(t - 0.1, 4) for t in tuned], abs=1e-4) and p.tuned_better == 0
    md = (tmp_path / "n" / "tune_cv.md").read_text()
    assert "| default | 6 |" in md and "tuned better in 0 of 3 folds" in md
    assert json.loads((tmp_path / "n" / "tune_cv.json").read_text())["k"] == 3
    for f in range(3):
        assert (tmp_path / "n" / f"fold{f}" / "best_params.json").is_file()


def test_resume_reruns_nothing_finished(setup, tmp_path):
    params, data, rec = setup
    first = tune_cv.run_tune_cv(params, data, tmp_path / "n", k=3, n_seeds=1, trials=2)
    n = len(rec.calls)
    (tmp_path / "n" / "results" / "tuned__fold2__seed88.json").unlink()  # as if killed before the last run
    again = tune_cv.run_tune_cv(params, data, tmp_path / "n", k=3, n_seeds=1, trials=2)
    assert len(rec.calls) == n + 1  # only the missing run; the three studies were finished
    assert again.summaries == first.summaries


def test_flags_one_line(tmp_path, capsys):
    h5 = write_tiny_h5(tmp_path / "tiny.h5")
    (tmp_path / "p.json").write_text(json.dumps(tiny_params(h5, tmp_path / "runs")))
    for extra, expect in ((["--storage", "sqlite:///x.db"], "no --storage"), (["--study", "s"], "no --storage"),
                          (["--ablation"], "--tune runs alone or with --cv K")):
        code = train.main(["--params", str(tmp_path / "p.json"), "--tune", "--cv", "3", *extra])
        err = capsys.readouterr().err.strip()
        assert code != 0 and "\n" not in err and expect in err, err


@pytest.mark.slow  # the real network, 2 outer folds x (2 trials x 2 inner folds + 2 runs): about a minute
def test_nested_tuning_end_to_end(tmp_path):
    h5 = write_tiny_h5(tmp_path / "tiny.h5", n_materials=24)
    (tmp_path / "p.json").write_text(json.dumps(tiny_params(h5, tmp_path / "runs")))
    out = tmp_path / "nested"
    assert train.main(["--params", str(tmp_path / "p.json"), "--tune", "--cv", "2", "--trials", "2", "--seeds", "1",
                       "--out", str(out)]) == 0
    res = json.loads((out / "tune_cv.json").read_text())
    assert len(res["choices"]) == 2
    for m in ("default", "tuned"):
        assert np.isfinite(res["summaries"][m]["test"]["bvs_vu"]["mae"]["mean"])
