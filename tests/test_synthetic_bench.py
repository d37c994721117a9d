"""The synthetic file of the benches (data_prep/synthetic_h5.py) with a bond table, and the streaming
reader's batches: fast checks (each a few seconds) behind bench/throughput.py and bench/streaming.py."""
import json

import numpy as np
import pytest

from conftest import ROOT

L = 200


def _params(**over):
    p = json.loads((ROOT / "params.json").read_text())
    p.update(length=L, epochs=1, batch_size=16, early_stopping_patience=0, lr_schedule="constant",
             targets=["bvs_vu", "valence"])
    p.update(over)
    return p


@pytest.fixture(scope="module")
def syn_bonds(tmp_path_factory):
    from data_prep.synthetic_h5 import write_synthetic_h5

    path = tmp_path_factory.mktemp("synb") / "b.h5"
    info = write_synthetic_h5(path, 64, n_points=L, bond_slots=12)
    return path, info


def test_synthetic_without_bonds_is_unchanged(tmp_path):
    """Default callers get the file as before: no bond table, no bonds attribute, same DOS bytes."""
    import h5py

    from data_prep.synthetic_h5 import write_synthetic_h5

    a = write_synthetic_h5(tmp_path / "a.h5", 20, n_points=L)
    b = write_synthetic_h5(tmp_path / "b.h5", 20, n_points=L, bond_slots=8)
    assert "bond_slots" not in a and b["bond_slots"] == 8
    with h5py.File(a["path"], "r") as ha, h5py.File(b["path"], "r") as hb:
        assert "bonds" not in ha and "bonds" not in ha.attrs
        assert np.array_equal(ha["dos"][...], hb["dos"][...])  # the bond table draws from its own generator
        assert np.array_equal(ha["targets/bvs_vu"][...], hb["targets/bvs_vu"][...])


def test_synthetic_bond_table_layout(syn_bonds):
    """The bond table reads back through h5schema with the layout of data_prep.bonds.bond_table:
    distances ascending within (1.6, cutoff] Å in the first n_within slots, zeros and mask 0 after."""
    from data_prep.h5schema import open_h5

    path, _ = syn_bonds
    with open_h5(path) as h:
        b = h.bonds()
        settings = h.bond_settings()
    assert settings == {"cutoff_ang": 6.0, "slots": 12}
    assert b.distance_ang.shape == (64, 12) and b.mask.dtype == np.uint8
    k = b.mask.sum(axis=1)
    assert np.array_equal(k, b.n_within) and k.min() >= 4 and k.max() <= 12
    for row in range(64):
        d = b.distance_ang[row, :k[row]]
        assert np.all(np.diff(d) >= 0) and d.min() >= 1.6 and d.max() <= 6.0
        assert not b.distance_ang[row, k[row]:].any() and not b.neighbour_z[row, k[row]:].any()
        assert set(b.neighbour_z[row, :k[row]]) <= {8, 22, 38}
    assert set(b.centre_z) <= {8, 22, 38}


def test_bond_model_trains_a_step_on_the_synthetic_file(syn_bonds):
    """A late-fusion model reading the bond table and the vector (``both``: the bench's bond
    configuration and then some) loads the synthetic file and trains one step, streamed, to a
    finite loss."""
    import keras

    import net
    from dosnet_bv.data import load_data, target_matrix
    from dosnet_bv.fit import build_network, stream_input
    from dosnet_bv.scalers import fit_scalers

    path, _ = syn_bonds
    p = _params(fusion="late", structure_input="both", bond_units=[8], bond_rbf=8, bond_embedding=4,
                data={"in_memory": False, "block_samples": 16, "shuffle_buffer": 0})
    data = load_data(path, p)
    rows = np.flatnonzero(data.split == "train")[:16]
    sc = fit_scalers(p, data, rows)
    y = target_matrix(data, p["targets"])
    y_scaled = ((y - sc.targets.mean) / sc.targets.scale).astype(np.float32)
    model = net.compile_model(build_network(p, len(sc.structure_columns)), p)
    hist = model.fit(stream_input(p, data, sc, rows, y_scaled, True), epochs=1, steps_per_epoch=1, verbose=0)
    assert np.isfinite(hist.history["loss"][0])
    assert any(layer.name == "bond_pool" for layer in model.layers)
    keras.backend.clear_session()


def test_paired_bench_alternates_and_pairs_rounds(monkeypatch):
    """bench/paired.py: a warm-up epoch each, then A,B / B,A / ... and one ratio per round from that
    round's two epochs (here epoch times are scripted, so the ratios are known)."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import paired

    order, clock = [], iter([2.0, 2.0] + [1.0, 2.0, 4.0, 2.0, 1.0, 1.0])  # warm-ups, then rounds
    monkeypatch.setattr(paired, "epoch_seconds", lambda run: order.append(run["name"]) or next(clock))
    a, b = {"name": "a", "n": 100}, {"name": "b", "n": 100}
    res = paired.paired(a, b, rounds=3, log=lambda line: None)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]
    # round 1: a 1 s, b 2 s -> 2.0; round 2 (b first): b 4 s, a 2 s -> 2.0; round 3: a 1 s, b 1 s -> 1.0
    assert res["ratios"] == [2.0, 2.0, 1.0] and res["median_ratio"] == 2.0 and res["min_ratio"] == 1.0
    assert res["best_over_best"] == 1.0  # a at best 100 samples/s (rounds 1, 3), b too (round 3)
