"""DOSnet/: architecture, the upstream protocol on upstream-format data, the CV-scaling fix,
determinism, saved models, the published-baseline comparison and bad input."""
import json
import pickle

import numpy as np

from conftest import run_cli
from DOSnet import protocol
from DOSnet.protocol import write_upstream_data
from DOSnet.synthetic import make_synthetic


# ------------------------------------------------------------------ architecture
def test_featurizer_output_shape_and_layers():
    from DOSnet.net import dos_featurizer

    f = dos_featurizer(9, 2000)
    assert f.output_shape == (None, 4, 150)
    convs = [l for l in f.layers if l.__class__.__name__ == "Conv1D"]
    assert [c.filters for c in convs] == [50, 75, 100, 125, 150]
    assert [c.kernel_size[0] for c in convs] == [20, 3, 3, 3, 3]
    assert [c.strides[0] for c in convs] == [2, 2, 2, 2, 1]
    pools = [l for l in f.layers if l.name.startswith("pool_")]
    assert sorted(p.pool_size[0] for p in pools) == [4, 25, 200]
    assert all(p.strides[0] == 4 for p in pools)


def test_featurizer_is_shared_and_adsorbate_one_separate():
    from DOSnet.net import create_model, create_model_combined, dos_featurizer

    shared = dos_featurizer(9, 2000)
    model = create_model(shared, 9, 2000)
    n_feat = shared.count_params()
    head = model.count_params() - n_feat
    # one featurizer's weights, not three copies
    subs = [l for l in model.layers if l.name == "dos_featurizer"]
    assert len(subs) == 1 and subs[0] is shared
    assert head == (1800 * 200 + 200) + (200 * 1000 + 1000) + (1000 * 1000 + 1000) + (1000 + 1)
    shared2 = dos_featurizer(9, 2000)
    combined = create_model_combined(shared2, 9, 2000)
    feats = [l for l in combined.layers if l.__class__.__name__ == "Functional"]
    assert len(feats) == 2 and feats[0] is not feats[1]
    assert combined.count_params() == 2 * n_feat + head + 600 * 200  # 4 x 150 x 4 inputs to Dense(200)
    # a change to the shared featurizer changes every atom's features equally
    x = np.random.default_rng(0).normal(size=(2, 2000, 9)).astype("float32")
    out = model.predict([x, x, x], verbose=0)
    assert out.shape == (2, 1)


def test_decay_schedule():
    from DOSnet.net import decay_schedule

    got = [decay_schedule(e, 0.0) for e in (0, 14, 15, 34, 35, 44, 45, 54, 55, 59)]
    assert got == [1e-3, 1e-3, 5e-4, 5e-4, 1e-4, 1e-4, 5e-5, 5e-5, 1e-5, 1e-5]


def test_params_are_upstream_defaults():
    p = protocol.load_params()
    assert (p["epochs"], p["batch_size"], p["loss"], p["learning_rate"]) == (60, 32, "log_cosh", 1e-3)
    assert (p["split_ratio"], p["seed"], p["cv_folds"], p["channels"], p["length"], p["sites"]) == (0.2, 88, 5, 9, 2000, 3)
    assert p["zero_tail"] == [1800, 2000]


# ------------------------------------------------------------------ data and scaling
def _write(tmp_path, n=30, multi=False, name="data.pkl"):
    s, t, a = make_synthetic(n=n, multi_adsorbate=multi, seed=1)
    path = tmp_path / name
    write_upstream_data(path, s, t, a)
    return path, s, t, a


def test_loader_slices_and_zeroes_tail(tmp_path):
    path, s, t, a = _write(tmp_path, multi=True)
    surface, targets, ads = protocol.load_upstream_data(path, True)
    assert surface.shape == (30, 2000, 27) and surface.dtype == np.float32
    assert ads.shape == (30, 2000, 9)
    assert np.all(surface[:, 1800:] == 0) and np.any(surface[:, :1800] != 0)
    np.testing.assert_allclose(surface[:, :1800], s[:, :1800, 1:28])  # column 0 (energy) dropped
    np.testing.assert_allclose(ads, a[:, :, 1:10])
    np.testing.assert_allclose(targets, t)


def test_cv_scales_each_fold_once():
    """Each fold standardises the RAW data once with its own train statistics (upstream bug fixed)."""
    from sklearn.model_selection import KFold

    s, _, a = make_synthetic(n=25, multi_adsorbate=True, seed=2)
    surface = s[:, :, 1:28].copy()
    ads = a[:, :, 1:10].copy()
    raw_s, raw_a = surface.copy(), ads.copy()
    r64 = raw_s.astype(np.float64)
    for tr, te in KFold(5, shuffle=True, random_state=88).split(surface):
        d = protocol.scale_fold(surface, ads, tr, te)
        mean = r64[tr].reshape(-1, 27).mean(0)
        std = r64[tr].reshape(-1, 27).std(0)
        np.testing.assert_allclose(d["x_test"], (r64[te] - mean) / std, rtol=1e-5, atol=1e-5)
        flat = d["x_train"].reshape(-1, 27)
        np.testing.assert_allclose(flat.mean(0), 0, atol=1e-4)
        np.testing.assert_allclose(flat.std(0), 1, atol=1e-3)
        amean = raw_a[tr].reshape(-1, 9).mean(0)
        np.testing.assert_allclose(d["adsorbate_scaler"].mean, amean, rtol=1e-5)
        # the inputs were not modified, so the next fold starts again from raw data
        np.testing.assert_array_equal(surface, raw_s)
        np.testing.assert_array_equal(ads, raw_a)


# ------------------------------------------------------------------ the protocol end to end
def _check_protocol_outputs(out, mode, stdout):
    files = {"predict_train.txt": 24, "predict_test.txt": 6} if mode == 0 else {"CV_predict.txt": 30}
    for name, rows in files.items():
        data = np.loadtxt(out / name)
        assert data.shape == (rows, 2), name
        assert np.all(np.isfinite(data))
    metrics = json.loads((out / "metrics.json").read_text())
    assert ("cv" in metrics) == (mode == 1)
    assert "MAE" in stdout


def test_protocol_train_test_from_the_command_line(tmp_path):
    """``python -m DOSnet`` in run mode 0 with the single-adsorbate network (graph-mode steps)."""
    path, *_ = _write(tmp_path, n=30)
    out = tmp_path / "run0"
    r = run_cli("-m", "DOSnet", "--data_dir", path, "--multi_adsorbate", 0, "--run_mode", 0,
                "--epochs", 1, "--batch_size", 16, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    _check_protocol_outputs(out, 0, r.stdout)


def test_protocol_cross_validation_multi_adsorbate(tmp_path, capsys, eager_steps_one_test):
    """Run mode 1 (upstream's 5-fold CV) with the adsorbate branch: five 1-epoch fits, in process
    with eager steps (graph tracing was 2/3 of this test's time; the CLI and graph mode are the test
    above)."""
    path, *_ = _write(tmp_path, n=30, multi=True)
    out = tmp_path / "run1"
    assert protocol.main(["--data_dir", str(path), "--multi_adsorbate", "1", "--run_mode", "1",
                          "--epochs", "1", "--batch_size", "16", "--out", str(out)]) == 0
    _check_protocol_outputs(out, 1, capsys.readouterr().out)


def test_same_seed_same_predictions_and_a_fixed_split(tmp_path):
    """As upstream: the train/test split is fixed (random_state 88) whatever --seed says; the seed
    changes the initialisation (and the CV shuffle)."""
    path, *_ = _write(tmp_path, n=30)
    outs = []
    for k in range(2):
        out = tmp_path / f"r{k}"
        assert protocol.main(["--data_dir", str(path), "--epochs", "1", "--out", str(out)]) == 0
        outs.append(np.loadtxt(out / "predict_test.txt"))
    np.testing.assert_array_equal(outs[0], outs[1])
    out = tmp_path / "r_other_seed"
    assert protocol.main(["--data_dir", str(path), "--epochs", "1", "--seed", "7", "--out", str(out)]) == 0
    other = np.loadtxt(out / "predict_test.txt")
    np.testing.assert_array_equal(other[:, 0], outs[0][:, 0])  # same test rows
    assert not np.array_equal(other[:, 1], outs[0][:, 1])  # another initialisation


def test_save_and_load_model(tmp_path):
    path, *_ = _write(tmp_path, n=30, multi=True)
    a, b = tmp_path / "a", tmp_path / "b"
    assert protocol.main(["--data_dir", str(path), "--multi_adsorbate", "1", "--epochs", "1",
                          "--save_model", "1", "--out", str(a)]) == 0
    assert (a / "model.keras").is_file() and (a / "scalers.npz").is_file()
    # upstream's --load_model 1: load the saved model and go on training (its scalers reused)
    assert protocol.main(["--data_dir", str(path), "--multi_adsorbate", "1", "--load_model", "1", "--epochs", "1",
                          "--model_dir", str(a), "--save_model", "1", "--out", str(b)]) == 0
    for key, val in np.load(a / "scalers.npz").items():
        np.testing.assert_array_equal(np.load(b / "scalers.npz")[key], val)
    pa, pb = np.loadtxt(a / "predict_test.txt"), np.loadtxt(b / "predict_test.txt")
    np.testing.assert_array_equal(pa[:, 0], pb[:, 0])
    assert not np.allclose(pa[:, 1], pb[:, 1], atol=1e-6)  # trained one more epoch from a's weights
    assert protocol.main(["--data_dir", str(path), "--load_model", "1", "--model_dir", str(a),
                          "--out", str(tmp_path / "c")]) == 1  # a 4-input model for a 3-input run: one line


def test_in_place_cv_rescaling_is_a_no_op():
    """patches/README.md item 1, measured: upstream standardised the whole array in place on every
    fold; standardising is invariant to an earlier per-channel affine map of every row, so fold k's
    inputs equal those of scaling the raw data once (to float32 rounding), and so do the metrics."""
    from sklearn.model_selection import KFold

    s, _, _ = make_synthetic(n=40, multi_adsorbate=False, length=64, seed=3)
    raw = np.asarray(s[:, :, 1:28], dtype=np.float32)
    inplace = raw.copy()
    for tr, te in KFold(n_splits=5, shuffle=True, random_state=88).split(raw):
        sc = protocol.ChannelScaler().fit(inplace[tr])
        inplace[tr], inplace[te] = sc.transform(inplace[tr]), sc.transform(inplace[te])  # upstream, in place
        fresh = protocol.scale_fold(raw, None, tr, te)
        np.testing.assert_allclose(inplace[tr], fresh["x_train"], atol=2e-5)
        np.testing.assert_allclose(inplace[te], fresh["x_test"], atol=2e-5)


# ------------------------------------------------------------------ bad input
def _one_line_error(r, *words):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_input_one_line_errors(tmp_path):
    _one_line_error(run_cli("-m", "DOSnet", "--data_dir", tmp_path / "missing.pkl"), "not found")
    trunc = tmp_path / "trunc.pkl"
    s, t, _ = make_synthetic(n=5)
    with open(trunc, "wb") as fh:
        pickle.dump(s, fh)
    _one_line_error(run_cli("-m", "DOSnet", "--data_dir", trunc), "truncated")
    cut = tmp_path / "cut.pkl"
    full = tmp_path / "full.pkl"
    write_upstream_data(full, s, t)
    cut.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    _one_line_error(run_cli("-m", "DOSnet", "--data_dir", cut), "cut.pkl")
    bad = tmp_path / "shape.pkl"
    write_upstream_data(bad, s[:, :, :10], t)
    _one_line_error(run_cli("-m", "DOSnet", "--data_dir", bad), "shape")
    _one_line_error(run_cli("-m", "DOSnet", "--data_dir", full, "--epochs", "ten"), "--epochs", "ten")
    _one_line_error(run_cli("-m", "DOSnet", "--data_dir", full, "--multi_adsorbate", "2"), "--multi_adsorbate")
    _one_line_error(run_cli("-m", "DOSnet", "--data_dir", full, "--multi_adsorbate", "1"), "truncated")


# ------------------------------------------------------------------ published baseline
def test_published_figures_match_reference_and_comparison(tmp_path):
    from DOSnet.compare import comparison_table, published

    pub = published()
    assert pub["results"]["combined"] == {"n": 35938, "mae": 0.1164, "rmse": 0.1728}
    assert "Fung" in pub["source"]
    pred = tmp_path / "CV_predict.txt"
    np.savetxt(pred, np.array([[1.0, 1.5], [2.0, 1.0], [0.0, 0.0], [1.0, 1.0]]))
    table = comparison_table(pred, ["combined"])
    # MAE = (0.5 + 1.0) / 4, RMSE = sqrt((0.25 + 1.0) / 4)
    assert "| 4 | 0.3750 | 0.5590 |" in table
    assert "| published DOSnet, combined | 35938 | 0.1164 | 0.1728 |" in table
    r = run_cli("-m", "DOSnet.compare", pred, "--out", tmp_path / "cmp.md")
    assert r.returncode == 0 and (tmp_path / "cmp.md").read_text().count("published DOSnet") == 13
    _one_line_error(run_cli("-m", "DOSnet.compare", tmp_path / "nope.txt"), "not found")
