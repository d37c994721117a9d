"""The family-grouped ablation (``--ablation --cv K``): every model on every fold, baselines once per
fold, networks per seed; cation and anion sites scored apart; resumable; the comparison rule."""
import json

import numpy as np
import pytest
from test_ablation import _params, tiny  # noqa: F401 - the module's tiny h5 fixture

import train
from dosnet_bv import cv_ablation
from dosnet_bv.data import load_data
from dosnet_bv.outputs import Log
from dosnet_bv.report import summarise


def _fake(seen):
    def run_model(spec, seed, params, data, train_rows, rows, features, epoch_log, keep=None):
        seen.append((spec.model, seed, tuple(sorted(rows)), len(rows["test"])))
        # the tests' folds must never share a material with the training rows
        assert not set(data.material_id[rows["test"]]) & set(data.material_id[train_rows])
        assert set(rows["test_cation"]) | set(rows["test_anion"]) == set(rows["test"])
        base = {"element_mean": 0.5, "gbt_structure": 0.4}.get(spec.model, 0.1)
        sc = lambda x: {"n": 5, "mae": x + 0.01 * seed, "nmae": x, "rmse": x, "r2": 0.5, "mad": 1.0}  # noqa: E731
        y = np.column_stack([data.targets[t][rows["test"]] for t in params["targets"]])
        return {"scores": {s: {t: sc(base) for t in params["targets"]} for s in rows if s != "train"},
                "info": {}, "seconds": 0.0, "predictions": (y + (-1) ** seed * 0.2).tolist()}
    return run_model


def test_every_model_on_every_fold_baselines_once_and_resume(tiny, tmp_path, monkeypatch):  # noqa: F811
    h5, _, _ = tiny
    p = _params(h5, tmp_path)
    data = load_data(h5, p)
    seen = []
    monkeypatch.setattr(cv_ablation, "run_model", _fake(seen))
    models = ["element_mean", "gbt_structure", "vector"]
    res = cv_ablation.run_cv_ablation(p, data, tmp_path / "cv", k=3, n_seeds=2, models=models, log=Log(quiet=True))
    assert sorted((m, s) for m, s, *_ in seen if m != "vector") == sorted(
        [("element_mean", p["seed"])] * 3 + [("gbt_structure", p["seed"])] * 3)
    assert len([x for x in seen if x[0] == "vector"]) == 3 * 2
    assert all(x[2] == ("test", "test_anion", "test_cation", "train", "val") for x in seen)
    assert sum(x[3] for x in seen if x[0] == "element_mean") == data.n  # each sample in exactly one test fold
    net = res["models"]["vector"]["summary"]["test"]["bvs_vu"]
    assert net["n_seeds"] == 6 and net["mae"]["mean"] == pytest.approx(0.1 + 0.01 * (p["seed"] + 0.5))
    beats = {(c["model"], c["target"], c["subset"]): c["beats_every_baseline"] for c in res["comparisons"]}
    assert beats[("vector", "bvs_vu", "test")] and beats[("vector", "valence", "test_cation")]
    # the seeds' errors (+0.2, -0.2) cancel in their mean prediction: the ensemble is exact
    ens = res["models"]["vector_ensemble"]["summary"]["test"]["bvs_vu"]
    assert ens["n_seeds"] == 3 and ens["mae"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert "element_mean_ensemble" not in res["models"]
    md = (tmp_path / "cv" / "cv_ablation.md").read_text()
    assert "bonds only" not in md and "structure vector only" in md and "valence right, cation" in md
    # resume: nothing is recomputed, a damaged result is
    seen.clear()
    victim = tmp_path / "cv" / "results" / f"vector__fold1__seed{p['seed'] + 1}.json"
    victim.write_text(victim.read_text()[:20])
    cv_ablation.run_cv_ablation(p, data, tmp_path / "cv", k=3, n_seeds=2, models=models, log=Log(quiet=True))
    assert [(m, s) for m, s, *_ in seen] == [("vector", p["seed"] + 1)]


def test_intervals_must_lie_apart_to_count_as_beating_a_baseline():
    def summ(maes):
        return summarise([{"test": {"bvs_vu": {"mae": x}}} for x in maes])

    s = {"gbt_structure": summ([0.40, 0.50]), "element_mean": summ([0.9, 1.0]), "bonds": summ([0.30, 0.42])}
    c = cv_ablation.compare(s, ["gbt_structure", "element_mean", "bonds"], ["bvs_vu"])
    assert len(c) == 1 and not c[0]["beats_every_baseline"] and "below 1 of 2" in c[0]["text"]
    s["bonds"] = summ([0.30, 0.31])
    assert cv_ablation.compare(s, ["gbt_structure", "element_mean", "bonds"], ["bvs_vu"])[0]["beats_every_baseline"]


def test_end_to_end_from_the_command_line(tiny, tmp_path):  # noqa: F811
    _, params, _ = tiny
    out = tmp_path / "cvabl"
    assert train.main(["--params", str(params), "--ablation", "--cv", "2", "--seeds", "1",
                       "--models", "element_mean,dos_shift", "--out", str(out)]) == 0
    res = json.loads((out / "cv_ablation.json").read_text())
    assert set(res["models"]) == {"element_mean", "dos_shift"} and res["k"] == 2
    runs = res["models"]["dos_shift"]["runs"]
    assert sorted(r["fold"] for r in runs) == [0, 1]
    assert np.isfinite(res["models"]["dos_shift"]["summary"]["test_cation"]["bvs_vu"]["mae"]["mean"])


def test_energy_shift_moves_a_samples_atoms_together_and_fills_from_the_edge():
    from dosnet_bv.fit import shift_dos

    base = np.arange(10, dtype=np.float32)[None, :, None].repeat(3, axis=0)
    x = {"atom1_dos": base.copy(), "atom2_dos": base.copy() * 10, "structure": np.zeros((3, 2))}
    shift_dos(x, np.random.default_rng(0), 2)
    for i in range(3):
        d = x["atom1_dos"][i, :, 0]
        s = int(d[5] - 5) * -1  # value at point 5 came from point 5 - s
        assert abs(s) <= 2 and np.array_equal(d, np.clip(np.arange(10) - s, 0, 9))
        assert np.array_equal(x["atom2_dos"][i, :, 0], d * 10)  # the neighbour moved with the site
    assert x["structure"].shape == (3, 2)


def test_augmentation_needs_the_grid_and_in_memory_input(tiny):  # noqa: F811
    from dosnet_bv.fit import augment_points
    from dosnet_bv.params import TrainError

    h5, _, _ = tiny
    p = _params(h5, "runs", augment_shift_ev=0.1)
    data = load_data(h5, p)
    step = float(data.energies_ev[1] - data.energies_ev[0])
    assert augment_points(p, data, streaming=False) == round(0.1 / step)
    assert augment_points({**p, "fusion": "structure_only"}, data, streaming=False) == 0
    with pytest.raises(TrainError, match="in memory"):
        augment_points(p, data, streaming=True)


def test_element_cn_baseline_left_out_without_a_cn_column(tiny, tmp_path, monkeypatch):  # noqa: F811
    h5, _, _ = tiny
    p = _params(h5, tmp_path)
    data = load_data(h5, p)
    seen = []
    monkeypatch.setattr(cv_ablation, "run_model", _fake(seen))
    monkeypatch.setattr(cv_ablation, "cn_column", lambda data: None)
    res = cv_ablation.run_cv_ablation(p, data, tmp_path / "cv", k=3, n_seeds=1,
                                      models=["element_cn_mean", "element_mean"], log=Log(quiet=True))
    assert {m for m, *_ in seen} == {"element_mean"} and "element_cn_mean" not in res["models"]


def test_site_subsets_leave_out_empty_ones():
    from types import SimpleNamespace

    data = SimpleNamespace(targets={"valence": np.array([1.0, 2.0, -2.0, 1.0])})
    subsets = cv_ablation.site_subsets(data, np.array([0, 1, 3]))  # cations only, as a migration target's rows
    assert set(subsets) == {"test", "test_cation"} and list(subsets["test_cation"]) == [0, 1, 3]
    assert set(cv_ablation.site_subsets(data, np.array([1, 2]))) == {"test", "test_cation", "test_anion"}


def test_real_and_substituted_materials_are_scored_apart():
    from types import SimpleNamespace

    origin = np.array(["mineral", "substituted", "substituted", "prototype", "substituted"])
    data = SimpleNamespace(targets={"valence": np.array([2.0, 3.0, -2.0, -1.0, 1.0])}, origin=origin)
    sub = cv_ablation.site_subsets(data, np.array([0, 1, 2, 3]))
    assert list(sub["test_real"]) == [0, 3] and list(sub["test_substituted"]) == [1, 2]
    only_real = cv_ablation.site_subsets(data, np.array([0, 3]))
    assert "test_substituted" not in only_real and list(only_real["test_real"]) == [0, 3]
    # a file of one kind only (MP records, a user's DFT runs) gets no origin subsets
    same = SimpleNamespace(targets=data.targets, origin=np.array(["mp"] * 5))
    assert set(cv_ablation.site_subsets(same, np.arange(5))) == {"test", "test_cation", "test_anion"}


def test_summaries_and_table_hold_origin_subsets_a_fold_may_lack():
    sc = lambda x: {"n": 3, "mae": x, "nmae": x, "rmse": x, "r2": 0.5, "mad": 1.0}  # noqa: E731
    fold1 = {s: {"bvs_vu": sc(0.2)} for s in ("test", "test_cation", "test_anion", "test_real", "test_substituted")}
    fold2 = {s: {"bvs_vu": sc(0.4)} for s in ("test", "test_cation", "test_anion", "test_real")}
    fold2["test_real"]["bvs_vu"] = sc(0.6)
    s = summarise([fold1, fold2])
    assert s["test_substituted"]["bvs_vu"]["n_seeds"] == 1 and s["test_substituted"]["bvs_vu"]["mae"]["mean"] == 0.2
    assert s["test_real"]["bvs_vu"]["mae"]["mean"] == pytest.approx(0.4)
    md = cv_ablation.markdown({"element_mean": s}, ["element_mean"], ["bvs_vu"])
    assert "bvs_vu MAE real | bvs_vu MAE substituted" in md and "0.400 ± 0.283 | 0.200 ± 0.000" in md
    plain = summarise([{k: v for k, v in fold1.items() if k not in cv_ablation.ORIGIN_SUBSETS}])
    assert "by material" not in cv_ablation.markdown({"element_mean": plain}, ["element_mean"], ["bvs_vu"])


def test_paired_by_fold_differences_and_counts():
    def runs(maes_by_fold_seed):
        return [{"fold": f, "seed": s, "scores": {"test": {"bvs_vu": {"mae": v}}}}
                for (f, s), v in maes_by_fold_seed.items()]

    results = {"element_mean": runs({(0, 1): 0.5, (1, 1): 0.9, (2, 1): 0.4}),
               "gbt_structure": runs({(0, 1): 0.6, (1, 1): 0.8, (2, 1): 0.5}),
               # two seeds per fold: the fold's MAE is their mean (0.4, 1.0, 0.3)
               "bonds": runs({(0, 1): 0.3, (0, 2): 0.5, (1, 1): 1.0, (1, 2): 1.0, (2, 1): 0.2, (2, 2): 0.4}),
               "dos_bonds": runs({(0, 1): 0.35, (1, 1): 0.95, (2, 1): 0.45})}
    summaries = {m: summarise([{"test": {"bvs_vu": {"n": 1, "mae": np.mean(list(cv_ablation.fold_maes(
        r, "test", "bvs_vu").values()))}}}]) for m, r in results.items()}
    out = cv_ablation.paired_by_fold(results, summaries, list(results), ["bvs_vu"])
    got = {(c["model"], c["against"]): c for c in out}
    # the best baseline is the per-element mean (0.600 against 0.633)
    assert set(got) == {("bonds", "element_mean"), ("dos_bonds", "element_mean"), ("dos_bonds", "bonds")}
    assert got[("bonds", "element_mean")]["differences"] == pytest.approx([-0.1, 0.1, -0.1])
    assert got[("bonds", "element_mean")]["lower_in"] == 2
    assert got[("dos_bonds", "bonds")]["differences"] == pytest.approx([-0.05, -0.05, 0.15])
    assert "lower in 2 of 3 folds" in got[("dos_bonds", "bonds")]["text"]


def test_parts_run_apart_combine_into_the_report_of_one_run(tiny, tmp_path, monkeypatch):  # noqa: F811
    """A study too long for one sitting runs as --models parts; --combine gives the same tables,
    comparisons and paired differences as one run of all the models, and refuses mismatched parts."""
    h5, _, _ = tiny
    p = _params(h5, tmp_path)
    data = load_data(h5, p)
    monkeypatch.setattr(cv_ablation, "run_model", _fake([]))
    run = lambda models, out, **kw: cv_ablation.run_cv_ablation(  # noqa: E731
        kw.get("params", p), data, tmp_path / out, k=3, n_seeds=2, models=models, log=Log(quiet=True))
    whole = run(["element_mean", "gbt_structure", "vector", "dos_vector"], "whole")
    run(["element_mean", "gbt_structure"], "a")
    run(["vector", "dos_vector"], "b")
    assert train.main(["--combine", str(tmp_path / "a"), str(tmp_path / "b" / "cv_ablation.json"),
                       "--out", str(tmp_path / "both")]) == 0
    both = json.loads((tmp_path / "both" / "cv_ablation.json").read_text())
    assert list(both["models"]) == list(whole["models"])  # the table's order, ensembles after their model
    for key in ("comparisons", "paired_by_fold"):
        assert both[key] == json.loads(json.dumps(whole[key]))
    for m in whole["models"]:
        assert both["models"][m]["summary"] == json.loads(json.dumps(whole["models"][m]["summary"]))
    md = (tmp_path / "both" / "cv_ablation.md").read_text()
    assert "Combined from these parts" in md and "DOS + structure vector (late), mean of the seeds" in md
    assert md.split("| model")[1] == (tmp_path / "whole" / "cv_ablation.md").read_text().split("| model")[1]
    # refused: a model in two parts, another budget, other data, a file that is not a part
    with pytest.raises(cv_ablation.TrainError, match="in both"):
        cv_ablation.combine([tmp_path / "a", tmp_path / "whole"], tmp_path / "x")
    run(["dos"], "c", params={**p, "epochs": p["epochs"] + 1, "patience": 2})
    with pytest.raises(cv_ablation.TrainError, match="differ in params"):
        cv_ablation.combine([tmp_path / "a", tmp_path / "c"], tmp_path / "x")
    other = json.loads((tmp_path / "b" / "cv_ablation.json").read_text())
    other["config"]["data"] = "0" * 16
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "cv_ablation.json").write_text(json.dumps(other))
    with pytest.raises(cv_ablation.TrainError, match="the data"):
        cv_ablation.combine([tmp_path / "a", tmp_path / "d"], tmp_path / "x")
    (tmp_path / "e.json").write_text("{not json")
    for bad, match in ((tmp_path / "e.json", "not a JSON file"), (tmp_path / "nowhere", "no such file")):
        with pytest.raises(cv_ablation.TrainError, match=match):
            cv_ablation.combine([tmp_path / "a", bad], tmp_path / "x")
    assert train.main(["--combine", str(tmp_path / "a"), "--cv", "3", "--out", str(tmp_path / "x")]) == 1


def test_the_content_fingerprint_sees_a_changed_target_or_spectrum(tiny):  # noqa: F811
    from dosnet_bv.runs import content_fingerprint, data_fingerprint

    h5, _, _ = tiny
    data = load_data(h5, _params(h5, "runs"))
    fp = content_fingerprint(data)
    assert content_fingerprint(load_data(h5, _params(h5, "runs"))) == fp  # reproducible
    data.targets["bvs_vu"][3] += 0.01
    assert content_fingerprint(data) != fp
    data.targets["bvs_vu"][3] -= 0.01
    data.dos[2, 10, 0] += 1.0
    assert content_fingerprint(data) != fp and data_fingerprint(data) == data_fingerprint(load_data(h5, _params(h5, "runs")))


def test_side_by_side_puts_finished_studies_in_one_table(tiny, tmp_path, monkeypatch):  # noqa: F811
    """--side-by-side: a row per model any study ran, each study's own mean ± std (the fake scores:
    MAE 0.5 + 0.01 x seed for the per-element mean), '–' where a study lacks the model; --models
    picks rows; mistakes are one line."""
    h5, _, _ = tiny
    p = _params(h5, tmp_path)
    data = load_data(h5, p)
    monkeypatch.setattr(cv_ablation, "run_model", _fake([]))
    fam = cv_ablation.run_cv_ablation(p, data, tmp_path / "fam", k=3, n_seeds=2, models=["element_mean", "vector"],
                                      log=Log(quiet=True))
    cv_ablation.run_cv_ablation({**p, "split_by": "material"}, data, tmp_path / "mat", k=3, n_seeds=1,
                                models=["element_mean"], log=Log(quiet=True))
    out = tmp_path / "sbs.md"
    assert train.main(["--side-by-side", f"family={tmp_path / 'fam'}", f"material={tmp_path / 'mat'}",
                       "--out", str(out)]) == 0
    text = out.read_text()
    rows = {r.split(" | ")[0].lstrip("| "): r for r in text.splitlines() if r.startswith("| ") and "---" not in r}
    assert "family: bvs_vu MAE" in rows["model"] and "material: cation" in rows["model"]
    mae = fam["models"]["element_mean"]["summary"]["test"]["bvs_vu"]["mae"]
    assert f"{mae['mean']:.3f} ± {mae['std']:.3f}" in rows["per-element mean"]
    cells = rows["structure vector only"].strip(" |").split(" | ")
    assert cells[1] != "–" and cells[-4:] == ["–"] * 4  # the material study did not run it
    assert "5 folds" not in text and "3 folds by material" in text and "3 folds by family" in text
    cv_ablation.side_by_side([f"a={tmp_path / 'fam'}"], out, models=["vector"])
    assert "per-element mean" not in out.read_text() and "structure vector only, mean of the seeds" in out.read_text()
    with pytest.raises(cv_ablation.TrainError, match="none of"):
        cv_ablation.side_by_side([str(tmp_path / "mat")], out, models=["vector"])
    assert train.main(["--side-by-side", str(tmp_path / "nowhere"), "--out", str(out)]) == 1
    assert train.main(["--side-by-side", str(tmp_path / "fam")]) == 1
    assert train.main(["--side-by-side", str(tmp_path / "fam"), "--ablation", "--out", str(out)]) == 1


# ------------------------------------------------------------------ --learning-curve --cv K
def test_cv_learning_curve_nested_subsets_inside_each_folds_training_part(tiny, tmp_path, monkeypatch):  # noqa: F811
    """Every point trains on a nested subset of its fold's training materials, never on a family of
    the fold's test part; baselines once per fold, networks per seed; the power law is the one the
    (fake) errors follow; a rerun resumes without training."""
    from dosnet_bv import learning_curve

    h5, _, _ = tiny
    p = _params(h5, tmp_path)
    data = load_data(h5, p)
    family = data.groups("family")
    calls = []

    def fake(spec, seed, params, data, train_rows, rows, features, epoch_log, keep=None):
        calls.append((spec.model, seed, np.asarray(train_rows), np.asarray(rows["test"])))
        assert not set(family[train_rows]) & set(family[rows["test"]])
        assert set(rows["test_cation"]) | set(rows["test_anion"]) == set(rows["test"])
        mae = (3.0 if spec.model == "element_mean" else 2.0) * len(train_rows) ** -0.5  # a known power law
        sc = {"n": 5, "mae": mae, "nmae": mae, "rmse": mae, "r2": 0.5, "mad": 1.0}
        return {"scores": {s: {t: dict(sc) for t in params["targets"]} for s in rows if s != "train"},
                "info": {}, "seconds": 0.0}

    monkeypatch.setattr(learning_curve, "run_model", fake)
    k, fracs = 3, learning_curve.LC_FRACTIONS
    res = learning_curve.run_cv_learning_curve(p, data, tmp_path / "lc", k=k, n_seeds=2,
                                               models=["element_mean", "vector"], log=Log(quiet=True))
    assert len(calls) == len(fracs) * k * (1 + 2)
    assert len(res["points"]) == len(fracs) * 2
    by_test = {}
    for model, seed, tr, te in calls:
        by_test.setdefault(te.tobytes(), []).append((model, seed, tr))
    assert len(by_test) == k  # three test folds, the same test rows at every fraction
    for runs in by_test.values():
        nets = sorted((len(tr), tuple(tr)) for model, seed, tr in runs if model == "vector" and seed == p["seed"])
        assert len(nets) == len(fracs)
        for (_, small), (_, big) in zip(nets, nets[1:]):  # nested: every subset holds the smaller ones
            assert set(small) < set(big)
        # a subset keeps whole materials
        small = np.asarray(nets[0][1])
        assert set(np.flatnonzero(np.isin(data.material_id, data.material_id[small]))) - set(nets[-1][1]) == set()
    pts = {(q["model"], q["fraction"]): q for q in res["points"]}
    assert pts[("vector", 1.0)]["runs"] == k * 2 and pts[("element_mean", 1.0)]["runs"] == k
    assert "test_cation" in pts[("vector", 0.5)]["summary"]
    laws = {(e["model"], e["target"]): e for e in res["power_laws"]}
    # per fold MAE = c N^-0.5; averaged over folds of different N the law holds to a few per cent
    assert laws[("vector", "bvs_vu")]["b"] == pytest.approx(0.5, abs=0.05)
    md = (tmp_path / "lc" / "learning_curve.md").read_text()
    assert "cation" in md and "structure vector only" in md and "grouped by family" in md
    assert (tmp_path / "lc" / "learning_curve.png").is_file() and (tmp_path / "lc" / "learning_curve.csv").is_file()
    calls.clear()
    learning_curve.run_cv_learning_curve(p, data, tmp_path / "lc", k=k, n_seeds=2, models=["element_mean", "vector"],
                                         log=Log(quiet=True))
    assert calls == []

