"""The bond table (data_prep/bonds.py), its place in the h5 and the bond branch of the network
(net.py ``bond_block``, params ``structure_input``): neighbour shells of known crystals, schema
round trip, a build, order invariance, blindness to empty slots, training and prediction, errors."""
import csv
import json
import os

import h5py
import numpy as np
import pytest
from h5_factory import random_bonds, write_minimal_h5
from pymatgen.core import Lattice, Structure

from conftest import ROOT

os.environ.setdefault("OMP_NUM_THREADS", "1")

from data_prep import h5schema  # noqa: E402
from data_prep.bonds import BondTable, bond_table  # noqa: E402
from data_prep.layout import EnergyGrid  # noqa: E402
from dosnet_bv.params import STRUCTURE_INPUTS, TrainError, load_params, validate_params  # noqa: E402

L = 64  # a short grid: the DOS half of these networks is not what is tested


def rocksalt(a=5.64):
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def _params(**over):
    p = json.loads((ROOT / "params.json").read_text())
    p.update(length=L, epochs=2, batch_size=8, early_stopping_patience=0, structure_input="bonds",
             bond_units=[16], bond_rbf=8, bond_embedding=4, structure_units=[8], lr_schedule="constant")
    p.update(over)
    return validate_params(p)


# ------------------------------------------------------------------ the table (data_prep)
def test_rocksalt_shells_nearest_first():
    """Na in NaCl (a = 5.64 A): 6 Cl at a/2, 12 Na at a/sqrt2, 8 Cl at a*sqrt3/2, 6 Na at a:
    32 neighbours within 6 A (the next shell, 24 Cl at a*sqrt5/2 = 6.31 A, is outside)."""
    a = 5.64
    t = bond_table(rocksalt(a), [0], cutoff_ang=6.0, slots=40)
    shells = [(6, a / 2, 17), (12, a / 2 ** 0.5, 11), (8, a * 3 ** 0.5 / 2, 17), (6, a, 11)]
    assert t.n_within[0] == 32 and t.mask[0].sum() == 32 and not t.mask[0, 32:].any()
    start = 0
    for count, d, z in shells:
        np.testing.assert_allclose(t.distance_ang[0, start:start + count], d, atol=1e-5)
        assert np.all(t.neighbour_z[0, start:start + count] == z)
        start += count
    assert t.centre_z[0] == 11 and np.all(t.distance_ang[0, 32:] == 0) and np.all(t.neighbour_z[0, 32:] == 0)
    # fewer slots: the nearest are kept, the truncation is recorded
    short = bond_table(rocksalt(a), [0, 4], cutoff_ang=6.0, slots=10)
    assert list(short.n_within) == [32, 32] and short.truncated.all() and short.mask.all()
    np.testing.assert_allclose(short.distance_ang[0], t.distance_ang[0, :10])
    assert short.centre_z.tolist() == [11, 17]


def test_table_ignores_oxidation_states():
    st = rocksalt()
    bare = bond_table(st, [0, 4])
    dec = st.copy()
    dec.add_oxidation_state_by_element({"Na": 1, "Cl": -1})
    for a, b in zip(vars(bare).values(), vars(bond_table(dec, [0, 4])).values()):
        assert np.array_equal(a, b)


def test_schema_round_trip_and_version_2_files(tmp_path):
    rng = np.random.default_rng(0)
    n, k = 6, 5
    table = BondTable(rng.uniform(1, 6, (n, k)).astype(np.float32), rng.integers(1, 90, (n, k)).astype(np.int16),
                      (rng.uniform(size=(n, k)) < 0.7).astype(np.uint8), rng.integers(1, 90, n).astype(np.int16),
                      rng.integers(0, 9, n).astype(np.int32))
    path = _tiny_h5(tmp_path / "b.h5", n, bonds=table)
    with h5schema.open_h5(path) as h:
        back = h.bonds()
        assert h.attr(h5schema.VERSION_ATTR) == h5schema.SCHEMA_VERSION == 3
        assert h.bond_settings() == {"cutoff_ang": 6.0, "slots": k}
    for name in h5schema.BOND_FIELDS:
        got, want = getattr(back, name), getattr(table, name)
        assert got.dtype == np.dtype(h5schema.BOND_DTYPES[name]) and np.array_equal(got, want), name
    # a version-2 file (no bonds) still opens; it has no bond table
    old = _tiny_h5(tmp_path / "old.h5", n)
    with h5py.File(old, "r+") as h:
        h.attrs[h5schema.VERSION_ATTR] = 2
    with h5schema.open_h5(old) as h:
        assert h.bonds() is None and h.bond_settings() is None


def _tiny_h5(path, n, bonds=None, seed=0):
    """``n`` samples (2 per material), L grid points, a learnable bvs_vu when ``bonds`` is given
    (2 + 0.5 x the number of neighbours closer than 3 A, standardised)."""
    rng = np.random.default_rng(seed)
    mids = np.repeat([f"m{i}" for i in range(n // 2)], 2)
    split = np.array(["train", "train", "train", "val", "test"])[np.arange(n // 2) % 5]
    bvs = np.full(n, 2.0)
    if bonds is not None:
        close = ((bonds.distance_ang < 3) & (bonds.mask > 0)).sum(axis=1)
        bvs = 2 + 0.5 * (close - close.mean()) / (close.std() + 1e-9)
    return write_minimal_h5(path, dos=rng.uniform(0, 1, (n, L, 27)), structure=rng.normal(size=(n, 3)),
                            labels=["a", "b", "c"], families=["site"] * 3, bvs=bvs, valence=np.rint(bvs), mids=mids,
                            elements=["O"] * n, split=np.repeat(split, 2), sites=2,
                            grid=EnergyGrid(n_points=L), bonds=bonds)


def test_build_writes_the_bond_table(tmp_path):
    from data_prep.build import BuildConfig, build_h5
    from records_factory import structures, write_records

    out = tmp_path / "b.h5"
    build_h5(write_records(tmp_path / "rec", names=["NaCl", "SrTiO3"]), out,
             BuildConfig(grid=EnergyGrid(n_points=L, sigma_ev=0.5), bond_slots=24), n_procs=1, progress=False)
    with h5schema.open_h5(out) as h:
        t, mids, sites = h.bonds(), h.meta_strings("material_id"), h.meta("site_index")
        assert h.bond_settings() == {"cutoff_ang": 6.0, "slots": 24}
    assert t.slots == 24 and len(t.centre_z) == len(mids)
    st = structures()["SrTiO3"]
    rows = np.flatnonzero(mids == "test-SrTiO3")
    direct = bond_table(st, sites[rows], 6.0, 24)
    np.testing.assert_array_equal(t.distance_ang[rows], direct.distance_ang)
    np.testing.assert_array_equal(t.neighbour_z[rows], direct.neighbour_z)
    ti = rows[[st[int(s)].specie.symbol == "Ti" for s in sites[rows]]][0]
    np.testing.assert_allclose(t.distance_ang[ti, :6], 3.905 / 2, atol=1e-5)  # TiO6 octahedron
    assert np.all(t.neighbour_z[ti, :6] == 8)
    manifest = json.loads(out.with_suffix(".manifest.json").read_text())["bonds"]
    assert manifest["slots"] == 24 and manifest["samples_truncated"] == int(t.truncated.sum()) > 0
    assert manifest["neighbours_within_cutoff"]["max"] == int(t.n_within.max())
    assert set(manifest["truncated_by_material"]) <= {"test-NaCl", "test-SrTiO3"}


# ------------------------------------------------------------------ the network
def _bond_model(**over):
    from dosnet_bv.fit import net_module

    net = net_module()
    p = _params(fusion="structure_only", **over)
    return net.build_model(p, 3), p


def _inputs(n, k=12, seed=2):
    t = random_bonds(n, k, seed)
    return {"bond_distance_ang": t.distance_ang.astype(np.float32), "bond_neighbour_z": t.neighbour_z.astype(np.int32),
            "bond_mask": t.mask.astype(np.float32), "centre_z": t.centre_z.astype(np.int32).reshape(-1, 1),
            "structure": np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)}


def test_names_agree_with_net():
    from dosnet_bv.fit import net_module

    assert STRUCTURE_INPUTS == net_module().STRUCTURE_INPUTS


@pytest.mark.parametrize("structure_input", ["bonds", "both"])
def test_bond_branch_ignores_neighbour_order_and_empty_slots(structure_input):
    model, _ = _bond_model(structure_input=structure_input)
    x = _inputs(16)
    names = [i.name for i in model.inputs]
    x = {k: v for k, v in x.items() if k in names}
    ref = np.asarray(model.predict(x, verbose=0)["bvs_vu"])
    rng = np.random.default_rng(5)
    perm = {k: v.copy() for k, v in x.items()}  # shuffle every sample's slots (empty ones included)
    for i in range(16):
        order = rng.permutation(x["bond_mask"].shape[1])
        for k in ("bond_distance_ang", "bond_neighbour_z", "bond_mask"):
            perm[k][i] = x[k][i, order]
    np.testing.assert_allclose(np.asarray(model.predict(perm, verbose=0)["bvs_vu"]), ref, atol=1e-5)
    junk = {k: v.copy() for k, v in x.items()}  # garbage in the empty slots, and more empty slots
    empty = junk["bond_mask"] == 0
    junk["bond_distance_ang"][empty] = rng.uniform(0.5, 9.0, empty.sum())
    junk["bond_neighbour_z"][empty] = rng.integers(1, 118, empty.sum())
    for k, fill in (("bond_distance_ang", 3.3), ("bond_neighbour_z", 7), ("bond_mask", 0)):
        junk[k] = np.concatenate([junk[k], np.full((16, 5), fill, junk[k].dtype)], axis=1)
    np.testing.assert_allclose(np.asarray(model.predict(junk, verbose=0)["bvs_vu"]), ref, atol=1e-5)
    # ... but a real neighbour does count
    more = {k: v.copy() for k, v in x.items()}
    more["bond_mask"][:, -1], more["bond_distance_ang"][:, -1], more["bond_neighbour_z"][:, -1] = 1, 2.0, 8
    assert np.abs(np.asarray(model.predict(more, verbose=0)["bvs_vu"]) - ref).max() > 1e-6


def test_bond_model_trains_saves_and_predicts(tmp_path):
    """fusion late + structure_input bonds from params on a tiny file: trains (the loss falls),
    is saved, and ``--predict`` reloads it (the registered layers) to the same predictions."""
    from dosnet_bv.data import load_data
    from dosnet_bv.outputs import Log
    from dosnet_bv.runs import predict_run, run_experiment

    n = 60
    path = _tiny_h5(tmp_path / "b.h5", n, bonds=random_bonds(n))
    p = _params(fusion="late", epochs=4, learning_rate=0.003, data_file=str(path), targets=["bvs_vu"])
    (tmp_path / "p.json").write_text(json.dumps(p))
    out = tmp_path / "run"
    metrics = run_experiment(p, load_data(path, p), out, Log(quiet=True))
    with open(out / "history.csv") as fh:
        hist = [float(r["loss"]) for r in csv.DictReader(fh)]
    assert metrics["epochs_run"] == 4 and hist[-1] < hist[0]
    pred = predict_run(out, path, tmp_path / "pred", Log(quiet=True))
    a = {(r.split(",")[0], r.split(",")[1]): r for r in (out / "predictions.csv").read_text().splitlines()[1:]}
    b = (pred / "predictions.csv").read_text().splitlines()[1:]
    header = (out / "predictions.csv").read_text().splitlines()[0].split(",")
    col = header.index("bvs_vu_pred")
    for row in b:
        f = row.split(",")
        assert abs(float(f[col]) - float(a[(f[0], f[1])].split(",")[col])) < 1e-4


def test_bond_model_on_a_file_without_bonds_is_one_line(tmp_path):
    path = _tiny_h5(tmp_path / "nobonds.h5", 12)
    from dosnet_bv.data import load_data

    for si in ("bonds", "both"):
        with pytest.raises(TrainError) as exc:
            load_data(path, _params(fusion="late", structure_input=si))
        assert "no bond table" in str(exc.value) and "\n" not in str(exc.value)
    data = load_data(path, _params(fusion="late", structure_input="vector"))  # the vector model reads it
    assert data.bonds is None
    load_data(path, _params(fusion="none", structure_input="bonds"))  # no structure branch: bonds unused
    wide = _tiny_h5(tmp_path / "b.h5", 12, bonds=random_bonds(12))
    with pytest.raises(TrainError, match="bond_cutoff_ang"):
        load_data(wide, _params(fusion="late", bond_cutoff_ang=8.0))


def test_params_rules():
    with pytest.raises(TrainError, match="structure_input") as exc:
        _params(structure_input="graph")
    assert "\n" not in str(exc.value)
    for key, bad in (("bond_rbf", 1), ("bond_units", []), ("bond_embedding", 0), ("bond_cutoff_ang", -1)):
        with pytest.raises(TrainError, match=key):
            _params(**{key: bad})
    _params(fusion="late", structure_input="bonds", structure_families=[])  # bonds need no vector families
    with pytest.raises(TrainError, match="structure_families"):
        _params(fusion="late", structure_input="both", structure_families=[])
    assert json.loads((ROOT / "params.json").read_text())["structure_input"] == "vector"  # the default: as before


def test_older_run_params_read_as_vector(tmp_path):
    p = json.loads((ROOT / "params.json").read_text())
    for key in ("structure_input", "bond_rbf", "bond_cutoff_ang", "bond_embedding", "bond_units"):
        del p[key]
    (tmp_path / "old.json").write_text(json.dumps(p))
    assert load_params(tmp_path / "old.json")["structure_input"] == "vector"


def test_bond_inputs_stream_like_in_memory(tmp_path):
    """The streamed pipeline (data.in_memory false) feeds the bond inputs that the in-memory path
    does (``scalers.model_inputs``), row for row."""
    from dosnet_bv.data import load_data
    from dosnet_bv.fit import stream_input
    from dosnet_bv.scalers import fit_scalers, model_inputs

    path = _tiny_h5(tmp_path / "b.h5", 40, bonds=random_bonds(40))
    p = _params(fusion="early", structure_input="both", structure_families=["site"], targets=["bvs_vu"],
                data={"in_memory": False, "block_samples": 8, "shuffle_buffer": 0}, data_file=str(path))
    data = load_data(path, p)
    assert data.streaming
    rows = np.arange(3, 29)
    scalers = fit_scalers(p, data, np.arange(20))
    want = model_inputs(p, data, scalers, rows)
    got = {}
    for batch in stream_input(p, data, scalers, rows, None, False):
        for k, v in batch.items():
            got.setdefault(k, []).append(np.asarray(v))
    assert set(got) == set(want)
    for k in ("bond_distance_ang", "bond_neighbour_z", "bond_mask", "centre_z", "structure"):
        a = np.concatenate(got[k])
        assert a.dtype == want[k].dtype and np.array_equal(a, want[k]), k


def test_bond_valence_baselines_back_off_and_cross_fit_the_form_under_the_trees(tmp_path, monkeypatch, quick_form):
    """bv_fitted predicts every row of every target (sites of unknown polarity fall back to their
    element's mean); bv_gbt_* fit the trees on the form's out-of-fold values: no inner fit sees the rows it
    predicts, and a material's rows are never split between an inner fit and its prediction."""
    from dosnet_bv import ablation
    from dosnet_bv.data import load_data
    from dosnet_bv.outputs import Log

    n = 60
    path = _tiny_h5(tmp_path / "b.h5", n, bonds=random_bonds(n))
    p = _params(data_file=str(path), structure_input="bonds", targets=["bvs_vu", "valence"], structure_families=["site"])
    data = load_data(path, p)
    train, val, test = (np.flatnonzero(data.split == s) for s in ("train", "val", "test"))
    feats = ablation.Features(data, p, Log(quiet=True))
    out = ablation.baseline_predictions("bv_fitted", data, p["targets"], train, val, {"test": test}, 0, feats)
    assert out["test"].shape == (len(test), 2) and np.isfinite(out["test"]).all()
    calls = []

    class Recording(ablation.BondValenceForm):
        def __init__(self, data, targets, fit_rows, val_rows):
            super().__init__(data, targets, fit_rows, val_rows)
            self.fit_rows = set(np.asarray(fit_rows).tolist())

        def predict(self, rows):
            calls.append((self.fit_rows, set(np.asarray(rows).tolist())))
            return super().predict(rows)

    monkeypatch.setattr(ablation, "BondValenceForm", Recording)
    for name in ("bv_gbt_dos", "bv_gbt_structure"):
        calls.clear()
        monkeypatch.setattr(ablation, "_FORMS", {})  # fit afresh, not from the first model's cache
        out = ablation.baseline_predictions(name, data, p["targets"], train, val, {"test": test}, 0, feats,
                                            data.material_id)
        assert out["test"].shape == (len(test), 2) and np.isfinite(out["test"]).all()
        inner = [(f, r) for f, r in calls if f != set(train.tolist())]
        assert len(inner) == ablation.BV_INNER_FOLDS
        assert set().union(*(r for _, r in inner)) == set(train.tolist())  # every training row, out of fold
        for fit_rows, rows in inner:
            assert not fit_rows & rows
            assert not set(data.material_id[list(fit_rows)]) & set(data.material_id[list(rows)])


def test_network_on_the_form_trains_on_the_cross_fitted_residual_and_adds_the_form_back(tmp_path, monkeypatch, quick_form):
    """form_* models: the network's training targets are the target minus the form fitted without
    the row's inner fold (not the in-sample form), its validation and test targets the target minus
    the form fitted on all training rows, and the form is added back to what it predicts."""
    from dosnet_bv import ablation
    from dosnet_bv.cv_ablation import CV_MODELS
    from dosnet_bv.data import load_data, target_matrix
    from dosnet_bv.outputs import Log

    n = 60
    path = _tiny_h5(tmp_path / "b.h5", n, bonds=random_bonds(n))
    p = _params(data_file=str(path), targets=["bvs_vu", "valence"], structure_families=["site"])
    data = load_data(path, p)
    train, val, test = (np.flatnonzero(data.split == s) for s in ("train", "val", "test"))
    y = target_matrix(data, p["targets"])
    full = ablation.BondValenceForm(data, p["targets"], train, val)
    seen = {}

    class Result:
        predictions = {"val": np.full((len(val), 2), 0.25), "test": np.full((len(test), 2), 0.25)}
        epochs_run = best_epoch = 1
        seconds = 0.0

    def fake_fit(params, fit_data, train_rows, val_rows, predict_rows, log):
        seen["y"] = target_matrix(fit_data, params["targets"])
        return Result()

    monkeypatch.setattr(ablation, "fit_predict", fake_fit)
    spec = CV_MODELS["form_dos_bonds"].spec(["site"])
    assert spec.on_form
    out = ablation.run_model(spec, 0, p, data, train, {"train": train, "val": val, "test": test},
                             ablation.Features(data, p, Log(quiet=True)), Log(quiet=True), keep="test")
    assert np.allclose(out["predictions"], full.predict(test) + 0.25, atol=1e-5)
    assert np.allclose(seen["y"][test], y[test] - full.predict(test))
    assert np.allclose(seen["y"][val], y[val] - full.predict(val))
    resid_train = y[train] - seen["y"][train]  # the form under the training rows as the network saw it
    assert not np.allclose(resid_train, full.predict(train))  # out of fold, not the in-sample form
    form_train, _ = ablation.cross_fitted_form(data, p["targets"], train, val, data.groups(p["split_by"]))
    assert np.allclose(resid_train, form_train)
    assert np.array_equal(target_matrix(data, p["targets"]), y)  # the caller's dataset is untouched


def test_cross_fitted_form_is_shared_by_one_fold_and_never_by_another_dataset(tmp_path, quick_form):
    from dosnet_bv import ablation
    from dosnet_bv.data import load_data

    n = 40
    path = _tiny_h5(tmp_path / "b.h5", n, bonds=random_bonds(n))
    p = _params(data_file=str(path), targets=["bvs_vu"], structure_families=["site"])
    data = load_data(path, p)
    train, val = (np.flatnonzero(data.split == s) for s in ("train", "val"))
    first = ablation.cross_fitted_form(data, ["bvs_vu"], train, val)
    assert ablation.cross_fitted_form(data, ["bvs_vu"], train, val) is first
    assert ablation.cross_fitted_form(data, ["bvs_vu"], train[:-2], val) is not first
    other = load_data(path, p)
    assert ablation.cross_fitted_form(other, ["bvs_vu"], train, val) is not first
