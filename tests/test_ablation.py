"""Ablation and learning curve: DOS descriptors on analytic bands, exact group-mean baselines,
choices made on validation only, and both studies end to end on a tiny h5."""
import ast
import csv
import json
import os
from math import erf, sqrt

import h5py
import numpy as np
import pytest
from h5_factory import write_minimal_h5

from conftest import ROOT

os.environ.setdefault("OMP_NUM_THREADS", "2")

import train  # noqa: E402
from dosnet_bv import ablation  # noqa: E402
from dosnet_bv.ablation import BASELINES, QUICK_EPOCHS, QUICK_PATIENCE, ablation_budget, run_ablation  # noqa: E402
from dosnet_bv.data import load_data  # noqa: E402
from dosnet_bv.learning_curve import training_subsets  # noqa: E402
from dosnet_bv.outputs import Log  # noqa: E402
from dosnet_bv.params import FUSIONS  # noqa: E402
from dosnet_bv import report  # noqa: E402
from dosnet_bv.baselines import GBT, GroupMean, mean_predictor  # noqa: E402
from dosnet_bv.descriptors import FEATURES, dos_descriptors, feature_names  # noqa: E402

pytestmark = pytest.mark.usefixtures("eager_steps")  # tiny fits: see conftest.eager_steps

L = 400  # short grid: -14 .. 6 eV in 0.05 eV steps


def _gaussian(e, centre, width, states=1.0):
    return states * np.exp(-0.5 * ((e - centre) / width) ** 2) / (width * sqrt(2 * np.pi))


# ------------------------------------------------------------------ descriptors
def test_descriptors_of_a_gaussian_band():
    """A Gaussian band of known centre c, width w and N states: centre c, width w (the square root
    of the second central moment), filling N * Phi(-c / w), skewness 0 and Pearson kurtosis 3
    (``kurtosis`` is NOT the excess kurtosis), DOS at E = 0 the band's value there."""
    e = -14.0 + 0.01 * np.arange(2000)
    bands = [(-5.0, 1.0, 2.0), (0.0, 0.5, 1.0), (-1.2, 0.7, 3.0)]
    dos = np.stack([_gaussian(e, c, w, n) for c, w, n in bands], axis=1)[None]
    x = dos_descriptors(dos.astype(np.float32), e, window_ev=0.1).reshape(len(bands), len(FEATURES))
    for (c, w, n), row in zip(bands, x):
        got = dict(zip(FEATURES, row))
        assert got["total"] == pytest.approx(n, rel=1e-4)
        assert got["centre_ev"] == pytest.approx(c, abs=1e-4)
        assert got["width_ev"] == pytest.approx(w, rel=1e-4)
        assert got["filling"] == pytest.approx(n * 0.5 * (1 + erf((0 - c) / (w * sqrt(2)))), rel=1e-3)
        assert got["skewness"] == pytest.approx(0.0, abs=1e-3)
        assert got["kurtosis"] == pytest.approx(3.0, abs=1e-3)
        near = np.abs(e) <= 0.1
        assert got["dos_at_ref"] == pytest.approx(_gaussian(e[near], c, w, n).mean(), rel=1e-5)
    # the band centred at E = 0 is half filled and its DOS at E = 0 is close to the peak height
    assert x[1, FEATURES.index("filling")] == pytest.approx(0.5, abs=1e-3)
    assert x[1, FEATURES.index("dos_at_ref")] == pytest.approx(1 / (0.5 * sqrt(2 * np.pi)), rel=0.01)


def test_descriptors_of_a_skewed_band_an_empty_channel_and_a_non_uniform_grid():
    # Gamma-shaped band rho ~ (E - E0)^3 exp(-(E - E0)/theta): shape k = 4 -> skewness 2/sqrt(k) = 1,
    # Pearson kurtosis 3 + 6/k = 4.5, centre E0 + k theta, width sqrt(k) theta
    e = np.concatenate([np.linspace(-14, -6, 300, endpoint=False), np.linspace(-6, 6, 3000)])  # non-uniform
    e0, theta = -5.0, 0.5
    rho = np.where(e > e0, np.clip(e - e0, 0, None) ** 3 * np.exp(-(e - e0) / theta), 0.0)
    dos = np.stack([rho, np.zeros_like(e)], axis=1)[None]
    got = dict(zip(feature_names(["band", "empty"]), dos_descriptors(dos, e)[0]))
    assert got["band:centre_ev"] == pytest.approx(e0 + 4 * theta, abs=1e-3)
    assert got["band:width_ev"] == pytest.approx(2 * theta, rel=1e-3)
    assert got["band:skewness"] == pytest.approx(1.0, abs=5e-3)
    assert got["band:kurtosis"] == pytest.approx(4.5, abs=2e-2)
    # no states: zero totals, undefined moments (NaN: "missing" for the trees)
    assert got["empty:total"] == 0 and got["empty:filling"] == 0 and got["empty:dos_at_ref"] == 0
    assert all(np.isnan(got[f"empty:{f}"]) for f in ("centre_ev", "width_ev", "skewness", "kurtosis"))
    with pytest.raises(ValueError):
        dos_descriptors(dos, e[::-1])


# ------------------------------------------------------------------ baselines
def test_group_means_are_exact_and_back_off():
    elements = np.array(["Ti", "Ti", "O", "O", "O", "Ti"])
    cn = np.array([6, 6, 3, 3, 2, 4])
    y = np.array([[4.0, 1.0], [4.2, 1.0], [-2.0, 0.0], [-1.8, 0.0], [-2.3, 2.0], [3.0, 4.0]])
    m = GroupMean().fit(elements, y)
    assert m.predict(["Ti", "O"]) == pytest.approx(np.array([[(4.0 + 4.2 + 3.0) / 3, 2.0], [(-2.0 - 1.8 - 2.3) / 3, 2 / 3]]))
    assert m.predict(["Zr"])[0] == pytest.approx(y.mean(axis=0))  # unseen element: the overall mean
    keys = np.column_stack([elements.astype(object), cn.astype(object)])
    ecn = GroupMean().fit(keys, y[:, 0])
    query = np.array([["Ti", 6], ["O", 3], ["O", 2], ["Ti", 5], ["Na", 6]], dtype=object)
    # element + CN seen; seen; seen; unseen CN -> the element's mean; unseen element -> overall mean
    assert ecn.predict(query)[:, 0] == pytest.approx([4.1, -1.9, -2.3, (4.0 + 4.2 + 3.0) / 3, y[:, 0].mean()])
    assert mean_predictor(y, 3) == pytest.approx(np.tile(y.mean(axis=0), (3, 1)))


def test_gbt_learns_a_threshold_and_picks_iterations_on_validation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4))
    x[::7, 1] = np.nan  # missing values are allowed
    y = np.where(x[:, 0] > 0, 1.0, -1.0) + 0.05 * rng.normal(size=300)
    m = GBT(seed=0, options={"max_iter": 60}).fit(x[:200], y[:200], x[200:250], y[200:250])
    assert 1 <= m.best_iter[0] <= 60
    assert np.mean(np.abs(m.predict(x[250:])[:, 0] - y[250:])) < 0.3 * np.mean(np.abs(y[250:] - y[:200].mean()))


def _bond_sites(rng, n, radii, b=0.37):
    """n random sites of cations (Z 12, 20, 22) and anions (8, 9): 3-8 counter-ion bonds at 1.7-2.6 A
    and 2-6 like-charged neighbours at 2.8-3.8 A; targets = the bond valence form with ``radii``."""
    cations, anions = [12, 20, 22], [8, 9]
    k = 16
    d, z, mask, zc, y = np.zeros((n, k)), np.zeros((n, k), int), np.zeros((n, k)), np.zeros(n, int), np.zeros(n)
    for i in range(n):
        cat = rng.random() < 0.5
        zc[i] = rng.choice(cations if cat else anions)
        nb, nl = rng.integers(3, 9), rng.integers(2, 7)
        zs = list(rng.choice(anions if cat else cations, nb)) + list(rng.choice(cations if cat else anions, nl))
        ds = list(rng.uniform(1.7, 2.6, nb)) + list(rng.uniform(2.8, 3.8, nl))
        d[i, :nb + nl], z[i, :nb + nl], mask[i, :nb + nl] = ds, zs, 1
        cation_z = [zc[i]] * nb if cat else zs[:nb]
        soft = np.array([b.get(c, 0.37) for c in cation_z]) if isinstance(b, dict) else b
        y[i] = (1 if cat else -1) * np.exp((radii[zc[i]] + np.array([radii[t] for t in zs[:nb]]) - ds[:nb]) / soft).sum()
    return (d, z, mask, zc), y


def test_fitted_bond_valence_form_recovers_sums_of_unseen_sites_and_leaves_unknown_elements_out():
    from dosnet_bv.baselines import FittedBondValence

    rng = np.random.default_rng(1)
    radii = {12: 0.75, 20: 1.05, 22: 0.95, 8: 1.0, 9: 0.85}
    (d, z, mask, zc), y = _bond_sites(rng, 400, radii)
    tr, va, te = slice(0, 250), slice(250, 300), slice(300, 400)
    take = lambda s: (d[s], z[s], mask[s], zc[s])  # noqa: E731
    chi = {12: 1.31, 20: 1.00, 22: 1.54, 8: 3.44, 9: 3.98}  # Pauling
    m = FittedBondValence(chi=chi).fit(take(tr), y[tr], take(va), y[va])
    sign, counter = m.polarity(take(te))
    assert np.array_equal(sign, np.sign(y[te]))  # by bond polarity: the first shell is the counter-ions
    assert m.lam in m.lams
    pred = m.predict(take(te))
    assert np.max(np.abs(pred - y[te])) < 0.05 * np.mean(np.abs(y[te]))  # the form fits the form
    # R0 of each (cation, anion) pair (r_c + r_a + delta_ca) is identified, not the radii one by one
    an = m.ANION_KEY
    r0 = lambda c, a: m.radius[c] + m.radius[an + a] + m.delta.get((c, an + a), 0.0)  # noqa: E731
    assert abs(r0(12, 8) - 1.75) < 0.02 and abs(r0(20, 9) - 1.90) < 0.02
    # a like-charged neighbour contributes nothing: moving it closer (outside the first shell) changes nothing
    moved = d[te].copy()
    like = (mask[te] > 0) & (np.isin(z[te], [8, 9]) == np.isin(zc[te], [8, 9])[:, None])
    shortest = np.where(mask[te] > 0, moved, np.inf).min(axis=1)
    moved = np.where(like, 1.25 * shortest[:, None], moved)
    assert np.allclose(m.predict((moved, z[te], mask[te], zc[te])), pred)
    # a centre without an electronegativity: NaN (the caller backs off); neighbours without one: nothing
    zc2, z2 = zc[te].copy(), z[te].copy()
    zc2[0] = 2
    z2[1][mask[te][1] > 0] = 2
    p2 = m.predict((d[te], z2, mask[te], zc2))
    assert np.isnan(p2[0]) and np.isnan(p2[1]) and np.allclose(p2[2:], pred[2:])


def test_fitted_bond_valence_form_learns_a_softer_cation():
    """One cation with b = 0.74 A (as the table's H-O has 0.94): its softness is fitted, the others stay near 0.37."""
    from dosnet_bv.baselines import FittedBondValence

    rng = np.random.default_rng(2)
    radii = {12: 0.75, 20: 1.05, 22: 0.95, 8: 1.0, 9: 0.85}
    (d, z, mask, zc), y = _bond_sites(rng, 500, radii, b={22: 0.74})
    take = lambda s: (d[s], z[s], mask[s], zc[s])  # noqa: E731
    m = FittedBondValence(chi={12: 1.31, 20: 1.00, 22: 1.54, 8: 3.44, 9: 3.98}, lams=(0.01,))
    m.fit(take(slice(0, 400)), y[:400], take(slice(400, 450)), y[400:450])
    assert abs(m.log_b[22] - np.log(2.0)) < 0.1 and abs(m.log_b[12]) < 0.1 and abs(m.log_b[20]) < 0.1
    assert np.max(np.abs(m.predict(take(slice(450, 500))) - y[450:])) < 0.05 * np.mean(np.abs(y[450:]))


def test_bond_polarity_makes_p_a_cation_in_a_phosphate_and_an_anion_in_a_phosphide():
    from dosnet_bv.baselines import FittedBondValence

    chi = {15: 2.19, 8: 3.44, 26: 1.83}
    m = FittedBondValence(chi=chi)
    d = np.array([[1.54, 1.54, 1.54, 1.54, 2.9, 0], [2.30, 2.30, 2.35, 2.9, 3.1, 0]])
    z = np.array([[8, 8, 8, 8, 15, 0], [26, 26, 26, 15, 15, 0]])
    mask = (z > 0).astype(float)
    sign, counter = m.polarity((d, z, mask, np.array([15, 15])))
    assert sign.tolist() == [1.0, -1.0]
    assert counter.tolist() == [[True] * 4 + [False, False], [True] * 3 + [False] * 3]


def test_scores_and_seed_summary():
    s = report.scores([1.0, 2.0, 3.0, 6.0], [1.0, 3.0, 3.0, 5.0], accuracy=True)
    assert s["mae"] == pytest.approx(0.5) and s["mad"] == pytest.approx(1.5) and s["nmae"] == pytest.approx(1 / 3)
    assert s["rmse"] == pytest.approx(np.sqrt(0.5)) and s["accuracy"] == pytest.approx(0.5)
    per_seed = [{"test": {"t": {"n": 4, "mae": v, "r2": None}}} for v in (1.0, 2.0, 3.0)]
    summ = report.summarise(per_seed)["test"]["t"]
    assert summ["mae"] == {"mean": 2.0, "std": 1.0} and summ["r2"] is None and summ["n_seeds"] == 3
    a, b = report.fit_power_law([10, 100, 1000], [1.0, 0.5, 0.25])
    assert b == pytest.approx(np.log10(2)) and a == pytest.approx(2.0)


# ------------------------------------------------------------------ tiny data file
ELEMENTS = {"Ti": (22, 1.54, 4.0), "Fe": (26, 1.83, 3.0), "Mg": (12, 1.31, 2.0), "O": (8, 3.44, -2.0)}


def write_tiny_h5(path, n_materials=40, sites=3, seed=0):
    """An h5 in data_prep's layout (see data_prep/h5schema.py) with a grid attribute and named
    structure columns in three families (site, coordination, global, with ``cn``); bvs_vu depends
    on the site's element, its coordination number and the centre of its d band."""
    from data_prep.build import grouped_split
    from data_prep.layout import EnergyGrid

    rng = np.random.default_rng(seed)
    grid = EnergyGrid(n_points=L)
    e = grid.energies_ev
    n = n_materials * sites
    element = rng.choice(list(ELEMENTS), size=n)
    cn = rng.choice([4, 6, 8], size=n)
    d_centre = rng.uniform(-6, 0, size=n)
    dos = np.zeros((n, L, 27), np.float32)
    for c in range(27):
        centre = rng.uniform(-10, 3, size=(n, 1))
        dos[:, :, c] = _gaussian(e[None, :], centre, rng.uniform(0.5, 1.5, size=(n, 1)), 0.3)
    for c in range(4, 9):  # the site's d channels: one band at d_centre
        dos[:, :, c] += _gaussian(e[None, :], d_centre[:, None], 0.8, 1.0).astype(np.float32)
    z = np.array([ELEMENTS[x][0] for x in element], float)
    chi = np.array([ELEMENTS[x][1] for x in element], float)
    valence = np.array([ELEMENTS[x][2] for x in element], float)
    bvs = valence + 0.05 * (cn - 6) + 0.1 * d_centre / 6 + 0.02 * rng.normal(size=n)
    structure = np.column_stack([z, chi, cn, cn + rng.normal(0, 0.2, n), rng.uniform(2, 6, n), rng.uniform(10, 20, n)])
    mids = np.repeat([f"tiny-{i:03d}" for i in range(n_materials)], sites)
    of = grouped_split(mids, (0.6, 0.2, 0.2), 88)
    write_minimal_h5(path, dos=dos, structure=structure,
                     labels=["site_Z", "site_X", "cn", "ecn", "density_g_cm3", "volume_per_atom_ang3"],
                     families=["site", "site", "coordination", "coordination", "global", "global"],
                     bvs=bvs, valence=valence, mids=mids, elements=element, split=[of[m] for m in mids],
                     sites=sites, grid=grid)
    return path


def _params(h5, out_dir, **over):
    p = json.loads((ROOT / "params.json").read_text())
    p.update(data_file=str(h5), out_dir=str(out_dir), length=L, epochs=1, batch_size=16, early_stopping_patience=2,
             structure_families=["site", "coordination"], structure_units=[16])
    p.update(over)
    return p


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("ablation")
    h5 = write_tiny_h5(d / "tiny.h5")
    params = d / "params.json"
    params.write_text(json.dumps(_params(h5, d / "runs")))
    return h5, params, d


@pytest.fixture(scope="module")
def ablation_run(tiny):
    h5, params, d = tiny
    code = train.main(["--params", str(params), "--ablation", "--seeds", "2", "--out", str(d / "ablation")])
    assert code == 0
    return d / "ablation"


# ------------------------------------------------------------------ choices on validation only
def test_the_best_fused_model_is_chosen_on_validation(tiny, tmp_path, monkeypatch):
    """late is better on test but early on validation: the ablation must pick early (and switch
    early's families off), and say so; no network is trained here."""
    h5, _, _ = tiny
    p = _params(h5, tmp_path)
    data = load_data(h5, p)
    val_mae = {"dosnet-late": 0.30, "dosnet-early": 0.20}
    test_mae = {"dosnet-late": 0.10, "dosnet-early": 0.40}
    seen = []

    def fake_run_model(spec, seed, params, data, train_rows, rows, features, epoch_log):
        seen.append((spec.model, spec.fusion, tuple(spec.structure_families)))
        m = spec.model
        other = 0.25 if m.startswith("dosnet") else 0.5
        v, t = val_mae.get(m, other), test_mae.get(m, other)

        def sc(x):
            return {"n": 10, "mae": x + 0.001 * seed, "rmse": x, "r2": 0.5, "mad": 1.0, "nmae": x + 0.001 * seed}

        return {"scores": {split: {tt: sc(x) for tt in params["targets"]} for split, x in (("val", v), ("test", t))},
                "info": {}, "seconds": 0.0}

    monkeypatch.setattr(ablation, "run_model", fake_run_model)
    res = run_ablation(p, data, tmp_path / "abl", n_seeds=3, log=Log(quiet=True))
    assert res["best_fused"] == "dosnet-early"
    drops = [s for s in seen if "-no-" in s[0]]
    assert {s[0] for s in drops} == {"dosnet-early-no-site", "dosnet-early-no-coordination"}
    assert all(s[1] == "early" for s in drops) and ("dosnet-early-no-site", "early", ("coordination",)) in drops
    md = (tmp_path / "abl" / "ablation.md").read_text()
    assert "best fused model `dosnet-early`" in md
    # the selection rule on its own
    summ = {m: report.summarise([{"val": {"t": {"mae": val_mae[m], "nmae": val_mae[m]}},
                                  "test": {"t": {"mae": test_mae[m], "nmae": test_mae[m]}}}]) for m in val_mae}
    assert report.select_best(summ, list(val_mae), ["t"]) == "dosnet-early"
    assert report.select_best(summ, list(val_mae), ["t"], split="test") == "dosnet-late"


# ------------------------------------------------------------------ end to end
def test_ablation_on_a_tiny_file_writes_table_json_and_plot(ablation_run):
    out = ablation_run
    for name in ("ablation.md", "ablation.json", "ablation.png", "ablation.log", "params.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    res = json.loads((out / "ablation.json").read_text())
    fused = res["best_fused"]
    assert fused in ("dosnet-late", "dosnet-early") and res["seeds"] == [88, 89] and res["epochs"] == 1
    expected = [b for b in BASELINES if not b.startswith("bv_")] + [f"dosnet-{f}" for f in FUSIONS] + [f"{fused}-no-site",
                                                                                 f"{fused}-no-coordination"]
    assert list(res["models"]) == expected
    md = (out / "ablation.md").read_text()
    for m in expected:
        for t in ("bvs_vu", "valence"):
            assert f"| `{m}` " in md and md.count(f"| `{m}` ") >= 2, m  # a row per target (+ validation table)
    for m, entry in res["models"].items():
        assert len(entry["per_seed"]) == 2
        for t in ("bvs_vu", "valence"):
            s = entry["summary"]["test"][t]
            assert s["n_seeds"] == 2 and s["mae"]["mean"] >= 0 and s["nmae"]["mean"] >= 0
            assert {"mae", "rmse", "r2", "nmae"} <= set(s)
    # normalised MAE = MAE / mean absolute deviation of the test targets
    with h5py.File(out.parent / "tiny.h5") as h:
        split = h["split"].asstr()[...]
        y = h["targets/bvs_vu"][...][split == "test"].astype(float)
    mad = np.mean(np.abs(y - y.mean()))
    one = res["models"]["mean"]["per_seed"][0]["scores"]["test"]["bvs_vu"]
    assert one["nmae"] == pytest.approx(one["mae"] / mad, rel=1e-6)
    # the per-element mean is exact: the tiny file's valence is a function of the element
    assert res["models"]["element_mean"]["summary"]["test"]["valence"]["mae"]["mean"] == pytest.approx(0, abs=1e-6)
    assert len(res["verdicts"]) == 2 and all("seed-to-seed std" in v["text"] for v in res["verdicts"])
    assert md.count("structure helps") + md.count("no clear effect") + md.count("structure hurts") >= 2
    assert "0.1164" in md and "Fung" in md and "Took" in md and "quick budget" in md
    # progress lines: the estimate of the time left reaches zero with the last run (whichever fusion won)
    progress = [ln for ln in (out / "ablation.log").read_text().splitlines() if ln.startswith("[")]
    n = len(expected) * 2
    assert len(progress) == n and progress[-1].startswith(f"[{n}/{n}]") and "left" not in progress[-1]


def test_ablation_resumes_from_finished_runs(tiny, ablation_run):
    """Rerunning into the same folder reuses every finished (model, seed) instead of training again."""
    _, params, _ = tiny
    before = json.loads((ablation_run / "ablation.json").read_text())
    assert train.main(["--params", str(params), "--ablation", "--seeds", "2", "--out", str(ablation_run)]) == 0
    after = json.loads((ablation_run / "ablation.json").read_text())
    assert after["models"] == before["models"]
    assert after["seconds"] < 60
    assert "earlier, interrupted run" in (ablation_run / "ablation.log").read_text()
    assert after["seconds_of_resumed_runs"] > 0 and "resumed" in (ablation_run / "ablation.md").read_text()
    # other settings into the same folder: one line, no silent mixing
    assert train.main(["--params", str(params), "--ablation", "--seeds", "3", "--out", str(ablation_run)]) == 1


def test_learning_curve_on_a_tiny_file(tiny, ablation_run, tmp_path):
    _, params, _ = tiny
    out = tmp_path / "lc"
    code = train.main(["--params", str(params), "--learning-curve", "--seeds", "1", "--from-ablation",
                       str(ablation_run / "ablation.json"), "--out", str(out)])
    assert code == 0
    for name in ("learning_curve.md", "learning_curve.csv", "learning_curve.json", "learning_curve.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    res = json.loads((out / "learning_curve.json").read_text())
    ab = json.loads((ablation_run / "ablation.json").read_text())
    assert res["dosnet"]["model"] == ab["best_dosnet"]["model"]
    assert res["baseline"] == ab["best_baseline"]["model"]
    with open(out / "learning_curve.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 5 * 2 * 2  # fractions x models x targets
    samples = sorted({int(r["train_samples"]) for r in rows})
    assert len(samples) == 5 and samples[-1] == 24 * 3  # 24 training materials x 3 sites
    md = (out / "learning_curve.md").read_text()
    assert "10^4 materials" in md and "0.273" in md and "samples per material" in md


def test_learning_curve_resumes_after_finished_points(tiny, tmp_path, monkeypatch):
    """A learning curve cut back to what an interruption at the 50 % point leaves, with one 25 % file
    truncated: the rerun trains only that run and the 50 and 100 % points (no baseline selection
    again), names the damaged file on one line and writes the same curve; other settings are
    refused. The models are a stand-in (MAE = 1/sqrt(N) + offsets): what is tested is which run."""
    from dosnet_bv import learning_curve
    from dosnet_bv.learning_curve import run_learning_curve
    from dosnet_bv.params import TrainError

    h5, _, _ = tiny
    p = _params(h5, tmp_path)
    data = load_data(h5, p)
    calls = []

    def fake_run_model(spec, seed, params, data, train_rows, rows, features, epoch_log):
        calls.append((spec.model, len(train_rows), seed))
        x = 1 / np.sqrt(len(train_rows)) + (0.1 if spec.kind == "baseline" else 0) + 0.001 * seed
        sc = {"n": 10, "mae": x, "rmse": x, "r2": 0.5, "mad": 1.0, "nmae": x}
        return {"scores": {s: {t: dict(sc) for t in params["targets"]} for s in ("val", "test")}, "info": {},
                "seconds": 0.0}

    monkeypatch.setattr(learning_curve, "run_model", fake_run_model)
    out = tmp_path / "lc"
    first = run_learning_curve(p, data, out, n_seeds=2, log=Log(quiet=True))
    n_select = len(calls) - 5 * 2 * 2  # the baseline candidates, once each
    assert n_select >= 2 and first["runs_resumed"] == 0
    assert not any(m.startswith("bv_") for m, *_ in calls)  # the tiny file has no bond table
    dosnet = first["dosnet"]["model"]
    for f in out.glob("results/lc50__*"):
        f.unlink()
    for f in out.glob("results/lc100__*"):
        f.unlink()
    cut = out / "results" / f"lc25__{dosnet}__seed88.json"
    cut.write_text(cut.read_text()[:30])
    lines = []
    log = Log(quiet=True)
    log.printer, log.quiet = lines.append, False
    del calls[:]
    again = run_learning_curve(p, data, out, n_seeds=2, log=log)
    n = {pt["fraction"]: pt["train_samples"] for pt in first["points"]}
    assert sorted(calls) == sorted([(dosnet, n[0.25], 88)] + [(m, n[f], s) for m in (dosnet, first["baseline"])
                                                              for f in (0.5, 1.0) for s in (88, 89)])
    assert [ln for ln in lines if "is damaged" in ln] == [ln for ln in lines if f"{cut} is damaged" in ln] != []
    assert again["runs_resumed"] == n_select + 5 * 2 * 2 - 9
    assert again["points"] == first["points"] and again["power_laws"] == first["power_laws"]
    with pytest.raises(TrainError, match="other settings"):
        run_learning_curve(p, data, out, n_seeds=3, log=Log(quiet=True))


def test_quick_budget_caps_epochs_and_anneals_within_them():
    params = json.loads((ROOT / "params.json").read_text())
    p, text = ablation_budget(params)
    assert p["epochs"] == min(params["epochs"], QUICK_EPOCHS) < params["epochs"]
    assert 0 < p["early_stopping_patience"] <= QUICK_PATIENCE
    # upstream's step schedule would not decay before epoch 15: within the budget it becomes a cosine
    assert params["lr_schedule"] == "dosnet_step" and p["lr_schedule"] == "cosine" and "cosine" in text
    import net

    rates = [net.learning_rate(e, p) for e in range(p["epochs"])]
    assert rates[0] == params["learning_rate"] and rates[-1] < 0.01 * params["learning_rate"]
    full, text = ablation_budget(params, full=True)
    assert full == params and "full budget" in text
    constant = {**params, "lr_schedule": "constant"}  # a schedule the user chose is kept
    assert ablation_budget(constant)[0]["lr_schedule"] == "constant"


def test_training_subsets_are_nested_and_grouped():
    mids = np.repeat([f"m{i:02d}" for i in range(40)], 2)
    train_rows = np.arange(0, 60)
    subs = training_subsets(mids, train_rows, seed=3)
    assert [k for _, k, _ in subs] == [2, 3, 8, 15, 30]
    sets = [set(mids[r]) for _, _, r in subs]
    assert all(a < b for a, b in zip(sets, sets[1:])) and sets[-1] == set(mids[train_rows])
    assert all(len(r) == 2 * k for _, k, r in subs)  # whole materials only
    again = training_subsets(mids, train_rows, seed=3)
    assert all(np.array_equal(a[2], b[2]) for a, b in zip(subs, again))


def test_study_flags_give_one_line_errors(tiny, capsys):
    _, params, _ = tiny
    for argv, expect in ((["--from-ablation", "x.json"], "--learning-curve"),
                         (["--ablation", "--seeds", "0"], "--seeds"),
                         (["--ablation", "--learning-curve"], "one at a time"),
                         (["--learning-curve", "--cv", "3", "--from-ablation", "x.json"], "not --from-ablation"),
                         (["--models", "dos"], "--models"),
                         (["--learning-curve", "--models", "dos"], "--models goes with"),
                         (["--learning-curve", "--cv", "3", "--models", "nope"], "unknown nope"),
                         (["--ablation", "--cv", "3", "--models", "dos,nonsense"], "nonsense"),
                         (["--learning-curve", "--from-ablation", "nowhere.json"], "not found")):
        assert train.main(["--params", str(params), *argv]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("train.py: error:") and "\n" not in err and expect in err, err


# ------------------------------------------------------------------ the study helpers stay generic
@pytest.mark.parametrize("module", ["descriptors.py", "baselines.py", "report.py"])
def test_generic_modules_import_nothing_of_the_project(module):
    """Only the published figures (DOSnet.compare) and the one lazy matplotlib (data_prep.plotting)."""
    tree = ast.parse((ROOT / "dosnet_bv" / module).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    allowed = ("__future__", "json", "math", "pathlib", "dataclasses", "numpy", "scipy", "sklearn", "threadpoolctl", "matplotlib",
               "DOSnet")
    assert all(name.split(".")[0] in allowed or name == "data_prep.plotting" for name in names), names
