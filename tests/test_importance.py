"""Feature importance (dosnet_bv/importance.py, train.py --importance): exact numbers on a linear model,
then planted signals that a trained network must be found to use.

The planted file: bvs_vu = the integral of the neighbour-1 pz DOS over [-3, -2) eV (a peak of
random height sits at -2.5 eV on a random background) plus noise; valence = a linear function of
the structure feature ``g1`` alone plus noise. One multi-task ``late`` network learns both; its
importances must point at that window and channel for bvs_vu, and at ``g1`` (and away from the
DOS) for valence.
"""
import ast
import csv
import json
import os

import numpy as np
import pytest
from h5_factory import random_bonds, write_minimal_h5

from conftest import ROOT

os.environ.setdefault("OMP_NUM_THREADS", "2")

import train  # noqa: E402
from dosnet_bv.data import load_data  # noqa: E402
from dosnet_bv.outputs import Log  # noqa: E402
from dosnet_bv.runs import run_experiment, run_importance  # noqa: E402
from dosnet_bv import importance  # noqa: E402

L = 400  # short grid: -14 .. 6 eV in 0.05 eV steps
WINDOW_EV = (-3.0, -2.0)
PEAK_EV = -2.5
FEATURE = "g1"


def write_planted_h5(path, n_materials=300, sites=2, seed=0, bonds=False):
    """An h5 in data_prep's layout (data_prep/h5schema.py) with the planted targets described above
    (``bonds``: with a random bond table, which plants nothing)."""
    from data_prep.build import grouped_split
    from data_prep.layout import EnergyGrid, channel_index

    rng = np.random.default_rng(seed)
    grid = EnergyGrid(n_points=L)
    e = grid.energies_ev
    n = n_materials * sites
    dos = np.zeros((n, L, 27), np.float32)
    for _ in range(3):  # background: three random bands per channel
        centre = rng.uniform(-14, 6, size=(n, 1, 27))
        width = rng.uniform(0.3, 1.0, size=(n, 1, 27))
        dos += (rng.uniform(0.05, 0.5, size=(n, 1, 27)) * np.exp(-0.5 * ((e[None, :, None] - centre) / width) ** 2))
    k = channel_index("nbr1", "pz")
    dos[:, :, k] += rng.uniform(0.2, 2.0, size=(n, 1)) * np.exp(-0.5 * ((e[None, :] - PEAK_EV) / 0.2) ** 2)
    inside = (e >= WINDOW_EV[0]) & (e < WINDOW_EV[1])
    integral = dos[:, inside, k].sum(axis=1) * grid.step_ev  # states in the window
    structure = rng.normal(size=(n, 6)).astype(np.float32)
    labels = ["s0", "s1", "g0", "g1", "g2", "g3"]
    bvs = 2.0 + integral + 0.01 * rng.normal(size=n)
    valence = 3.0 + 0.8 * structure[:, labels.index(FEATURE)] + 0.01 * rng.normal(size=n)
    mids = np.repeat([f"planted-{i:03d}" for i in range(n_materials)], sites)
    of = grouped_split(mids, (0.6, 0.2, 0.2), 88)
    write_minimal_h5(path, dos=dos, structure=structure, labels=labels, families=["site"] * 2 + ["global"] * 4,
                     bvs=bvs, valence=valence, mids=mids, elements=rng.choice(["Ti", "O", "Fe", "Mg"], size=n),
                     split=[of[m] for m in mids], sites=sites, grid=grid, bonds=random_bonds(n, k=8) if bonds else None)
    return path


def _params(h5, out_dir, **over):
    p = json.loads((ROOT / "params.json").read_text())
    p.update(data_file=str(h5), out_dir=str(out_dir), length=L, targets=["bvs_vu", "valence"], fusion="late",
             structure_families=["site", "global"], structure_units=[32, 32], epochs=25, batch_size=32,
             early_stopping_patience=25, lr_schedule="constant", seed=1,
             # half the default featurizer widths, 1 eV occlusion windows side by side (no overlap) and
             # fewer permutation repeats than the defaults: the planted signal stays clear
             dos_filters=[25, 38, 50, 63, 75], importance_step_ev=1.0, importance_repeats=3)
    p.update(over)
    return p


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The planted file, a late multi-task run trained on it in-process, and --importance on it."""
    d = tmp_path_factory.mktemp("importance")
    h5 = write_planted_h5(d / "planted.h5")
    p = _params(h5, d)
    (d / "params.json").write_text(json.dumps(p))
    metrics = run_experiment(p, load_data(h5, p), d / "run", Log(quiet=True))
    assert train.main(["--params", str(d / "params.json"), "--importance", str(d / "run")]) == 0
    out = d / "run" / "importance"
    return {"dir": out, "metrics": metrics, "summary": json.loads((out / "importance.json").read_text())}


def _per_target(entries, t):
    return next(x for x in entries if x["target"] == t)


def _contains(d, energy):
    return d["window_lo_ev"] <= energy < d["window_hi_ev"]


# ------------------------------------------------------------------ planted DOS signal
def test_the_network_learned_both_planted_targets(planted):
    test = planted["metrics"]["splits"]["test"]
    for t in ("bvs_vu", "valence"):  # well below the spread of the targets
        assert test[t]["mae"] < 0.5 * test[t]["mean_baseline_mae"], (t, test[t])


def test_occlusion_ranks_the_planted_window_and_channel_first(planted):
    oc = _per_target(planted["summary"]["occlusion"]["per_target"], "bvs_vu")
    top = oc["top_window_groups"][0]
    assert top["group"] == "nbr1:p" and _contains(top, PEAK_EV), top
    assert _contains(oc["top_windows_all_channels"][0], PEAK_EV)
    # the CSV holds the same numbers: 20 windows of 1 eV side by side, per target
    with open(planted["dir"] / "occlusion.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["target"] == "bvs_vu"]
    assert len(rows) == 20 and float(rows[0]["window_lo_ev"]) == -14.0 and float(rows[-1]["window_hi_ev"]) == 6.0
    best = max(rows, key=lambda r: float(r["delta_mae:nbr1:p"]))
    assert float(best["delta_mae:nbr1:p"]) == pytest.approx(top["delta_mae"], rel=1e-4)


def test_permutation_ranks_the_planted_channel_first(planted):
    pd = _per_target(planted["summary"]["permutation_dos"]["per_target"], "bvs_vu")
    assert pd["channel"][0]["label"] == "nbr1:pz"
    assert pd["atom"][0]["label"] == "nbr1" and pd["orbital group"][0]["label"] == "p"
    assert pd["atom x orbital group"][0]["label"] == "nbr1:p"
    # clearly first: its rise is more than 3 x the runner-up's and far outside its spread
    first, second = pd["channel"][0], pd["channel"][1]
    assert first["mean"] > 3 * max(second["mean"], 0) and first["mean"] > 3 * first["std"]
    assert planted["summary"]["permutation_dos"]["repeats"] == 3


def test_integrated_gradients_rank_the_planted_channel_and_window_first(planted):
    ig = _per_target(planted["summary"]["integrated_gradients"]["per_target"], "bvs_vu")
    assert ig["channels"][0]["label"] == "nbr1:pz"
    top = ig["top_window_groups"][0]
    assert top["group"] == "nbr1:p" and _contains(top, PEAK_EV), top
    per_label = planted["summary"]["integrated_gradients"]["per_label"]["bvs_vu"]
    assert {x["label"] for x in per_label} == {"Ti", "O", "Fe", "Mg"}
    assert all(x["top_group"] == "nbr1:p" for x in per_label)


# ------------------------------------------------------------------ planted structure signal
def test_structure_permutation_ranks_the_planted_feature_first_and_the_dos_stays_small(planted):
    s = planted["summary"]
    ps = _per_target(s["permutation_structure"]["per_target"], "valence")
    assert ps["feature"][0]["label"] == FEATURE and ps["family"][0]["label"] == "global"
    top = ps["feature"][0]["mean"]
    assert top > 5 * max(ps["feature"][1]["mean"], 0)
    pd = _per_target(s["permutation_dos"]["per_target"], "valence")
    assert max(x["mean"] for x in pd["channel"]) < 0.1 * top
    assert max(x["mean"] for x in pd["atom"]) < 0.2 * top
    oc = _per_target(s["occlusion"]["per_target"], "valence")
    assert oc["top_windows_all_channels"][0]["delta_mae"] < 0.1 * top
    # and the other way round: the DOS target does not lean on the structure vector
    ps_b = _per_target(s["permutation_structure"]["per_target"], "bvs_vu")
    pd_b = _per_target(s["permutation_dos"]["per_target"], "bvs_vu")
    assert ps_b["family"][0]["mean"] < 0.1 * pd_b["channel"][0]["mean"]
    sx = _per_target(s["integrated_gradients"]["structure"], "valence")
    assert sx["features"][0]["label"] == FEATURE


# ------------------------------------------------------------------ completeness and outputs
def test_integrated_gradients_completeness_on_the_trained_model(planted, tmp_path):
    """The attributions sum to F(x) - F(baseline): with the default 128 steps within the module's
    5 % tolerance on every target, and less closely with 8 steps (the error shrinks with steps)."""
    comp = planted["summary"]["integrated_gradients"]["completeness"]
    assert [c["target"] for c in comp] == ["bvs_vu", "valence"]
    for c in comp:
        assert c["ok"] and c["max_rel_error"] < 0.05 and c["tolerance"] == 0.05, c
    run = planted["dir"].parent
    params = json.loads((run / "params.json").read_text())
    coarse = dict(params, importance_window_ev=5.0, importance_step_ev=5.0, importance_repeats=2, importance_ig_steps=8)
    s = run_importance(run, coarse, out_dir=tmp_path / "ig8", log=Log(quiet=True))
    for c128, c8 in zip(comp, s["integrated_gradients"]["completeness"]):
        assert c8["max_abs_error"] > c128["max_abs_error"], (c128, c8)
    with open(planted["dir"] / "ig_completeness.csv") as fh:
        rows = list(csv.DictReader(fh))
    n_test = planted["summary"]["n_samples"]
    assert len(rows) == 2 * n_test
    err = np.array([float(r["error"]) for r in rows])
    change = np.array([float(r["f_x"]) - float(r["f_baseline"]) for r in rows])
    assert np.abs(err).max() == pytest.approx(max(c["max_abs_error"] for c in comp), rel=1e-3)
    assert np.abs(change).mean() > 0


def test_importance_writes_report_tables_and_figures(planted):
    out, s = planted["dir"], planted["summary"]
    for name in ("importance.md", "importance.json", "importance.log", "occlusion.csv", "occlusion.png",
                 "permutation_dos.csv", "permutation_dos.png", "permutation_structure.csv",
                 "permutation_structure.png", "ig_dos.csv", "ig_dos.png", "ig_by_label.csv", "ig_by_label.png",
                 "ig_structure.csv", "ig_structure.png", "ig_completeness.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    md = (out / "importance.md").read_text()
    for text in ("## bvs_vu", "## valence", "nbr1:pz", FEATURE, "Completeness", "trapezoid", "training mean",
                 "## Timing", "Took"):
        assert text in md, text
    assert s["settings"] == {"window_ev": 1.0, "step_ev": 1.0, "repeats": 3, "ig_steps": 128, "ig_rule": "trapezoid",
                             "top_labels": 10, "seed": 1}
    assert s["timing"]["total"]["seconds"] > 0 and s["seconds_in_all"] >= s["timing"]["total"]["seconds"]
    with open(out / "ig_dos.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * L and len(rows[0]) == 2 + 27


@pytest.mark.parametrize("fusion", ["none", "structure_only"])
def test_a_one_input_run_skips_the_other_with_a_note(planted, tmp_path, fusion):
    """fusion none / structure_only, one epoch, cheap settings: the methods of the missing input
    are skipped and said so; an old run folder whose params lack the importance keys takes them
    from --params."""
    h5 = planted["dir"].parent.parent / "planted.h5"
    p = _params(h5, tmp_path, fusion=fusion, targets=["bvs_vu"], epochs=1)
    run_experiment(p, load_data(h5, p), tmp_path / "run", Log(quiet=True))
    old = json.loads((tmp_path / "run" / "params.json").read_text())
    for k in [k for k in old if k.startswith("importance_")]:
        del old[k]
    (tmp_path / "run" / "params.json").write_text(json.dumps(old))
    cheap = dict(p, importance_window_ev=4.0, importance_step_ev=4.0, importance_repeats=2, importance_ig_steps=4)
    (tmp_path / "params.json").write_text(json.dumps(cheap))
    assert train.main(["--params", str(tmp_path / "params.json"), "--importance", str(tmp_path / "run"),
                       "--out", str(tmp_path / "imp")]) == 0
    s = json.loads((tmp_path / "imp" / "importance.json").read_text())
    md = (tmp_path / "imp" / "importance.md").read_text()
    assert s["settings"]["ig_steps"] == 4 and f"fusion `{fusion}`" in md
    comp = s["integrated_gradients"]["completeness"]
    assert len(comp) == 1 and comp[0]["max_abs_error"] >= 0
    if fusion == "none":
        assert "permutation_structure" not in s and any("structure" in n for n in s["notes"])
        assert s["occlusion"]["n_windows"] == 5  # 20 eV grid, 4 eV windows
        assert not (tmp_path / "imp" / "permutation_structure.csv").exists()
    else:
        assert "occlusion" not in s and "permutation_dos" not in s and any("no DOS" in n for n in s["notes"])
        features = s["permutation_structure"]["per_target"][0]["feature"]
        assert sorted(f["label"] for f in features) == ["g0", "g1", "g2", "g3", "s0", "s1"]
        assert (tmp_path / "imp" / "ig_structure.csv").is_file() and not (tmp_path / "imp" / "ig_dos.csv").exists()


def test_a_bond_table_run_keeps_each_samples_bonds_and_shuffles_them_as_one_block(tmp_path):
    """DOS + bonds (structure_input bonds), one epoch, cheap settings: the DOS methods run with the
    bond table held at each sample's own bonds, and the table is permuted as a whole."""
    h5 = write_planted_h5(tmp_path / "bonds.h5", n_materials=40, bonds=True)
    p = _params(h5, tmp_path, structure_input="bonds", bond_units=[16], bond_rbf=8, bond_embedding=4, epochs=1,
                importance_window_ev=4.0, importance_step_ev=4.0, importance_repeats=2, importance_ig_steps=4,
                importance_reference="element")
    (tmp_path / "params.json").write_text(json.dumps(p))
    run_experiment(p, load_data(h5, p), tmp_path / "run", Log(quiet=True))
    assert train.main(["--params", str(tmp_path / "params.json"), "--importance", str(tmp_path / "run")]) == 0
    out = tmp_path / "run" / "importance"
    s = json.loads((out / "importance.json").read_text())
    md = (out / "importance.md").read_text()
    assert "permutation_structure" not in s and s["occlusion"]["n_windows"] == 5
    fixed = s["permutation_fixed"]["per_target"]
    assert [x["inputs"][0]["label"] for x in fixed] == ["bond table (every bond of the site)"] * 2
    assert "Bond table (every bond of the site) (permutation)" in md and "keeps each sample's own bonds" in md
    assert "per centre element" in md and "(4 elements" in md
    assert s["permutation_dos"]["per_target"][0]["whole DOS"][0]["label"] == "all channels"
    assert (out / "permutation_fixed.csv").is_file() and (out / "ig_dos.csv").is_file()
    assert all(c["max_abs_error"] >= 0 for c in s["integrated_gradients"]["completeness"])


def test_importance_flags_give_one_line_errors(tmp_path, capsys):
    params = tmp_path / "params.json"
    params.write_text(json.dumps(_params(tmp_path / "none.h5", tmp_path)))
    for argv, expect in ((["--importance", str(tmp_path / "nowhere")], "not found"),
                         (["--importance", str(tmp_path), "--cv", "3"], "runs alone")):
        assert train.main(["--params", str(params), *argv]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("train.py: error:") and "\n" not in err and expect in err, err
    bad = json.loads(params.read_text())
    bad["importance_repeats"] = 1
    params.write_text(json.dumps(bad))
    assert train.main(["--params", str(params), "--importance", str(tmp_path)]) == 1
    assert "importance_repeats" in capsys.readouterr().err


# ------------------------------------------------------------------ exact numbers on a linear model
def _linear_problem(seed=0):
    """A linear Keras model on two atoms' DOS (12 points x 2 channels each) and 3 structure
    features, two outputs; physical = output * scale + mean."""
    import keras

    rng = np.random.default_rng(seed)
    Lx, C, F, n = 12, 2, 3, 7
    a1, a2 = keras.Input((Lx, C), name="atom1_dos"), keras.Input((Lx, C), name="atom2_dos")
    st = keras.Input((F,), name="structure")
    flat = keras.layers.Concatenate()([keras.layers.Flatten()(a1), keras.layers.Flatten()(a2), st])
    outs = {t: keras.layers.Dense(1, name=t)(flat) for t in ("bvs_vu", "valence")}
    model = keras.Model([a1, a2, st], outs)
    weights = {}
    for t in outs:
        w, b = rng.normal(size=(2 * Lx * C + F, 1)), rng.normal(size=1)
        model.get_layer(t).set_weights([w.astype("float32"), b.astype("float32")])
        weights[t] = (w[:, 0], b[0])
    dos = rng.normal(size=(n, Lx, 2 * C)).astype(np.float32)
    structure = rng.normal(size=(n, F)).astype(np.float32)
    fill = rng.normal(size=(Lx, 2 * C)).astype(np.float32)
    y_mean, y_scale = np.array([1.0, -2.0]), np.array([2.0, 0.5])
    p = importance.Problem(model=model, targets=["bvs_vu", "valence"], y_true=rng.normal(size=(n, 2)), y_mean=y_mean,
                           y_scale=y_scale, dos=dos, dos_inputs=["atom1_dos", "atom2_dos"], dos_fill=fill,
                           energies_ev=np.arange(Lx) * 0.5 - 3.0, channel_labels=["a:s", "a:p", "b:s", "b:p"],
                           occlusion_groups={"a": [0, 1], "b:p": [3]},
                           channel_blocks={"channel": {"a:s": [0], "b:p": [3]}, "atom": {"b": [2, 3]}},
                           structure=structure, structure_input="structure", structure_labels=["f0", "f1", "f2"],
                           structure_families=["x", "x", "y"], sample_labels=np.array(list("AABBBCA")))

    def f(d, s):  # the model in numpy, physical units: (m, T)
        flat = np.concatenate([d[..., :C].reshape(len(d), -1), d[..., C:].reshape(len(d), -1), s], axis=1)
        return np.stack([(flat @ weights[t][0] + weights[t][1]) for t in ("bvs_vu", "valence")], 1) * y_scale + y_mean

    return p, f, weights


def test_integrated_gradients_are_exact_on_a_linear_model():
    """For a linear model the gradient is constant: attribution = scale * w * (x - baseline), and
    the attributions sum to F(x) - F(baseline) to rounding, with any number of steps."""
    p, f, weights = _linear_problem()
    settings = importance.Settings(ig_steps=3, batch_rows=8, progress=False)  # 2 samples x 4 points per call
    ig = importance.integrated_gradients(p, settings, importance.Forward(p, settings.batch_rows))
    n, Lx, K = p.dos.shape
    C = K // 2
    for ti, t in enumerate(p.targets):
        w = weights[t][0]
        wd = np.concatenate([w[:Lx * C].reshape(Lx, C), w[Lx * C:2 * Lx * C].reshape(Lx, C)], axis=1)
        attr = p.y_scale[ti] * wd[None] * (p.dos - p.dos_fill[None])
        assert ig["dos_mean_abs"][ti] == pytest.approx(np.abs(attr).mean(axis=0), rel=1e-4, abs=1e-5)
        a_s = p.y_scale[ti] * w[2 * Lx * C:][None] * p.structure
        assert ig["structure_mean_abs"][ti] == pytest.approx(np.abs(a_s).mean(axis=0), rel=1e-4, abs=1e-5)
        sel = p.sample_labels == "B"
        assert ig["label_mean_abs"]["B"][ti] == pytest.approx(np.abs(attr[sel]).mean(axis=0), rel=1e-4, abs=1e-5)
        at_baseline = f(np.broadcast_to(p.dos_fill, p.dos.shape), np.zeros_like(p.structure))
        expect = f(p.dos, p.structure)[:, ti] - at_baseline[:, ti]
        assert ig["attribution_sum"][ti] == pytest.approx(expect, rel=1e-4, abs=1e-4)
    assert all(c["ok"] and c["max_rel_error"] < 1e-4 for c in importance.completeness(ig))
    assert ig["label_counts"] == {"A": 3, "B": 3, "C": 1}


def test_occlusion_and_permutation_match_numpy_on_a_linear_model():
    p, f, _ = _linear_problem(1)
    settings = importance.Settings(window_ev=1.0, step_ev=0.5, repeats=3, batch_rows=5, seed=4, progress=False)
    fwd = importance.Forward(p, settings.batch_rows)
    base = fwd(p.dos, p.structure)
    assert base == pytest.approx(f(p.dos, p.structure), rel=1e-5, abs=1e-5)
    occ = importance.occlusion(p, settings, fwd, base)
    base_mae = np.abs(base - p.y_true).mean(axis=0)
    assert occ["groups"] == ["a", "b:p", "all channels"] and len(occ["windows"]) == 11  # 6 eV grid, 1 eV windows
    for wi, (lo, hi, a, z) in enumerate(occ["windows"]):
        assert (z - a) == 2 and p.energies_ev[a] == pytest.approx(lo)
        for gi, ch in enumerate([[0, 1], [3], [0, 1, 2, 3]]):
            d = p.dos.copy()
            d[:, a:z][..., ch] = p.dos_fill[a:z][:, ch]
            expect = np.abs(f(d, p.structure) - p.y_true).mean(axis=0) - base_mae
            assert occ["delta_mae"][wi, gi] == pytest.approx(expect, abs=1e-4)
    perm = importance.permutation(p, settings, fwd, base, "dos", p.channel_blocks)
    rng = np.random.default_rng(4)
    perms = [rng.permutation(p.n) for _ in range(3)]
    assert perm["labels"] == ["a:s", "b:p", "b"] and perm["kinds"] == ["channel", "channel", "atom"]
    for r, pi in enumerate(perms):
        d = p.dos.copy()
        d[..., [2, 3]] = p.dos[pi][..., [2, 3]]
        expect = np.abs(f(d, p.structure) - p.y_true).mean(axis=0) - base_mae
        assert perm["delta"][r, 2] == pytest.approx(expect, abs=1e-4)
    assert perm["std"][2] == pytest.approx(perm["delta"][:, 2].std(axis=0, ddof=1))


def test_fixed_inputs_follow_their_samples_on_a_linear_model():
    """A linear model that also reads two fixed inputs (a float table and an integer one): every
    method must feed each row its own sample's fixed values (batches that tile and cut the samples),
    permute them as one block, and keep them out of the attributions."""
    import keras

    rng = np.random.default_rng(3)
    Lx, C, n = 6, 2, 7
    a1 = keras.Input((Lx, C), name="atom1_dos")
    bx, bz = keras.Input((4,), name="bond_x"), keras.Input((2,), name="bond_z", dtype="int32")
    flat = keras.layers.Concatenate()([keras.layers.Flatten()(a1), bx,
                                       keras.layers.Lambda(lambda z: keras.ops.cast(z, "float32"))(bz)])
    model = keras.Model([a1, bx, bz], {"bvs_vu": keras.layers.Dense(1, name="bvs_vu")(flat)})
    w, b = rng.normal(size=(Lx * C + 6, 1)), rng.normal(size=1)
    model.get_layer("bvs_vu").set_weights([w.astype("float32"), b.astype("float32")])
    dos = rng.normal(size=(n, Lx, C)).astype(np.float32)
    fixed = {"bond_x": rng.normal(size=(n, 4)).astype(np.float32), "bond_z": rng.integers(0, 5, (n, 2)).astype(np.int32)}
    fill = rng.normal(size=(Lx, C)).astype(np.float32)
    p = importance.Problem(model=model, targets=["bvs_vu"], y_true=rng.normal(size=(n, 1)), y_mean=np.array([0.5]),
                           y_scale=np.array([2.0]), dos=dos, dos_inputs=["atom1_dos"], dos_fill=fill,
                           energies_ev=np.arange(Lx) * 1.0, channel_labels=["s", "p"], occlusion_groups={"p": [1]},
                           channel_blocks={"channel": {"s": [0]}}, fixed_inputs=fixed, fixed_label="bonds")

    def f(d, fx):
        flat = np.concatenate([d.reshape(len(d), -1), fx["bond_x"], fx["bond_z"]], axis=1)
        return (flat @ w + b) * 2.0 + 0.5

    settings = importance.Settings(window_ev=2.0, step_ev=1.0, repeats=3, ig_steps=2, batch_rows=5, seed=2,
                                   progress=False)
    res = importance.analyse(p, settings, log=lambda *_: None)
    assert res["base_pred"] == pytest.approx(f(dos, fixed), abs=1e-4)
    base_mae = np.abs(f(dos, fixed) - p.y_true).mean(axis=0)
    occ = res["occlusion"]
    for wi, (_, _, a, z) in enumerate(occ["windows"]):
        d = dos.copy()
        d[:, a:z, 1] = fill[a:z, 1]
        assert occ["delta_mae"][wi, 0] == pytest.approx(np.abs(f(d, fixed) - p.y_true).mean(axis=0) - base_mae,
                                                         abs=1e-4)
    perm = res["permutation_fixed"]
    assert perm["labels"] == ["bonds"]
    r = np.random.default_rng(2)
    for k, pi in enumerate([r.permutation(n) for _ in range(3)]):
        shuffled = {name: v[pi] for name, v in fixed.items()}
        assert perm["delta"][k, 0] == pytest.approx(np.abs(f(dos, shuffled) - p.y_true).mean(axis=0) - base_mae,
                                                    abs=1e-4)
    ig = res["ig"]  # the baseline keeps the sample's own fixed inputs: only the DOS is attributed
    expect = f(dos, fixed)[:, 0] - f(np.broadcast_to(fill, dos.shape), fixed)[:, 0]
    assert ig["attribution_sum"][0] == pytest.approx(expect, abs=1e-4)


def test_a_reference_per_group_on_a_linear_model():
    """dos_fill (G, L, K) with dos_fill_index: occlusion fills and the integrated-gradients baseline
    take each sample's own reference (batches that cut the samples)."""
    p, f, _ = _linear_problem(2)
    rng = np.random.default_rng(5)
    fills = rng.normal(size=(3,) + p.dos_fill.shape).astype(np.float32)
    p.dos_fill, p.dos_fill_index = fills, np.array([0, 2, 1, 1, 0, 2, 2])
    own = fills[p.dos_fill_index]  # (n, L, K)
    settings = importance.Settings(window_ev=1.0, step_ev=1.0, ig_steps=2, batch_rows=3, progress=False)
    fwd = importance.Forward(p, settings.batch_rows)
    base = fwd(p.dos, p.structure)
    base_mae = np.abs(base - p.y_true).mean(axis=0)
    occ = importance.occlusion(p, settings, fwd, base)
    for wi, (_, _, a, z) in enumerate(occ["windows"]):
        d = p.dos.copy()
        d[:, a:z, :2] = own[:, a:z, :2]  # group "a": channels 0, 1
        assert occ["delta_mae"][wi, 0] == pytest.approx(np.abs(f(d, p.structure) - p.y_true).mean(axis=0) - base_mae,
                                                         abs=1e-4)
    ig = importance.integrated_gradients(p, settings, fwd)
    expect = f(p.dos, p.structure) - f(own, np.zeros_like(p.structure))
    assert ig["attribution_sum"].T == pytest.approx(expect, abs=1e-4)


def test_reference_dos_per_element_is_the_mean_of_that_elements_training_rows():
    from types import SimpleNamespace

    from dosnet_bv.runs import reference_dos

    rng = np.random.default_rng(0)
    dos = rng.normal(size=(9, 4, 2))
    data = SimpleNamespace(dos=dos, element=np.array(list("OOFOFTiOOF"[:9])))
    scalers = SimpleNamespace(dos=SimpleNamespace(mean=np.float64(1.0), scale=np.float64(2.0)))
    train, test = np.array([0, 1, 2, 3, 4, 5]), np.array([6, 7, 8])
    fill, index, text = reference_dos(data, scalers, train, test, by_element=False)
    assert index is None and fill == pytest.approx(((dos[train].mean(axis=0) - 1) / 2), abs=1e-6)
    fill, index, text = reference_dos(data, scalers, train, test, by_element=True)
    elements = sorted(set(data.element[train]))  # F, O, T
    assert fill.shape == (len(elements) + 1, 4, 2) and "1 test samples" in text
    for k, e in enumerate(elements):
        rows = train[data.element[train] == e]
        assert fill[k] == pytest.approx((dos[rows].mean(axis=0) - 1) / 2, abs=1e-6)
    # test rows 6 (i: no training row -> the overall mean), 7 (O), 8 (O)
    assert list(index) == [len(elements), elements.index("O"), elements.index("O")]
    assert fill[-1] == pytest.approx((dos[train].mean(axis=0) - 1) / 2, abs=1e-6)


def test_energy_windows_on_the_default_grid():
    from data_prep.layout import EnergyGrid

    w = importance.energy_windows(EnergyGrid().energies_ev, 1.0, 0.25)
    assert len(w) == 77 and all(z - a == 100 for _, _, a, z in w)
    assert w[0][:2] == pytest.approx((-14.0, -13.0)) and w[-1][:2] == pytest.approx((5.0, 6.0))
    with pytest.raises(ValueError):
        importance.energy_windows(EnergyGrid().energies_ev, 0.001, 0.25)  # narrower than the grid spacing


def test_importance_module_imports_nothing_of_the_project():
    """Only the one lazy matplotlib of the project (data_prep.plotting)."""
    tree = ast.parse((ROOT / "dosnet_bv" / "importance.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    allowed = ("__future__", "csv", "json", "time", "dataclasses", "pathlib", "numpy", "tensorflow", "keras",
               "matplotlib", "tqdm")
    assert names and all(name.split(".")[0] in allowed or name == "data_prep.plotting" for name in names), names
