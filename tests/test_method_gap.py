"""bench/method_gap.py: joining an xTB and a PBE file and matching their sites (issue 16)."""
import json
import sys

import numpy as np
import pytest
from h5_factory import write_minimal_h5

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import method_gap  # noqa: E402

from dosnet_bv.data import load_data  # noqa: E402
from dosnet_bv.params import TrainError  # noqa: E402

L, SITES = 200, 2
LABELS, FAMILIES = ["s0", "s1", "g0"], ["site", "site", "global"]


def _params(tmp_path):
    p = json.loads((ROOT / "params.json").read_text())
    p.update(length=L, structure_families=["site", "global"])
    path = tmp_path / "params.json"
    path.write_text(json.dumps(p))
    return p, path


def _write(path, ids, seed, bvs_shift=0.0):
    """Materials ``ids`` (2 sites each): structure and targets depend on the id only, the DOS on ``seed``."""
    n = len(ids) * SITES
    mids = np.repeat([f"m{i:02d}" for i in ids], SITES)
    idx = np.repeat(np.asarray(ids, float), SITES)
    structure = np.stack([idx, np.tile([0.0, 1.0], len(ids)), idx ** 2], axis=1).astype(np.float32)
    bvs = np.where(np.arange(n) % 2 == 0, 2.0 + 0.1 * idx, -2.0 - 0.1 * idx) + bvs_shift
    dos = np.random.default_rng(seed).uniform(0, 1, size=(n, L, 27)).astype(np.float32)
    return write_minimal_h5(path, dos=dos, structure=structure, labels=LABELS, families=FAMILIES, bvs=bvs,
                            valence=np.rint(bvs), mids=mids, elements=["Ti", "O"] * len(ids),
                            split=np.array(["train"] * n), sites=SITES)


def test_matched_sites_and_joined_dataset(tmp_path):
    p, _ = _params(tmp_path)
    a = load_data(_write(tmp_path / "x.h5", range(12), 0), p)
    b = load_data(_write(tmp_path / "p.h5", [3, 5, 20], 1), p)  # m20 has no xTB record
    ia, ib = method_gap.matched(a, b)
    assert [(a.material_id[i], int(a.site_index[i])) for i in ia] == \
        [(b.material_id[j], int(b.site_index[j])) for j in ib] == [("m03", 0), ("m03", 1), ("m05", 0), ("m05", 1)]
    j = method_gap.joined(a, b)
    assert j.n == a.n + b.n
    np.testing.assert_array_equal(j.dos[a.n + ib], b.dos[ib])
    np.testing.assert_array_equal(j.targets["bvs_vu"][ia], j.targets["bvs_vu"][a.n + ib])
    rows = method_gap.fold_rows(j, a.n, ia, ib, test=np.array([ia[0], ia[1]]))
    assert list(rows["xtb"]) == list(ia[:2]) and list(rows["pbe"]) == list(a.n + ib[:2])
    assert list(rows["xtb_cation"]) == [ia[0]]  # site 0 is the cation


def test_different_targets_are_refused(tmp_path):
    p, _ = _params(tmp_path)
    a = load_data(_write(tmp_path / "x.h5", range(12), 0), p)
    b = load_data(_write(tmp_path / "p.h5", [3], 1, bvs_shift=0.5), p)
    with pytest.raises(TrainError, match="bvs_vu of m03 site 0 differs"):
        method_gap.matched(a, b)


def test_a_target_missing_in_one_file_is_not_a_mismatch(tmp_path):
    """A barrier cached for the xTB build but not computed for the PBE one is NaN there: the sites
    still match; two finite values that differ still do not."""
    p, _ = _params(tmp_path)
    a = load_data(_write(tmp_path / "x.h5", range(12), 0), p)
    b = load_data(_write(tmp_path / "p.h5", [3, 5], 1), p)
    a.targets["migration_e1d_ev"] = np.full(a.n, 0.3)
    b.targets["migration_e1d_ev"] = np.full(b.n, np.nan)
    assert len(method_gap.matched(a, b)[0]) == 4
    b.targets["migration_e1d_ev"] = np.full(b.n, 0.4)
    with pytest.raises(TrainError, match="migration_e1d_ev of m03 site 0 differs"):
        method_gap.matched(a, b)


def test_structure_only_baseline_has_no_gap(tmp_path, capsys):
    """The per-element mean never reads the DOS: scored on either file's DOS it must agree exactly,
    which holds only if the PBE rows carry the matched sites' own targets and elements."""
    _, params = _params(tmp_path)
    x, pb = _write(tmp_path / "x.h5", range(12), 0), _write(tmp_path / "p.h5", [1, 3, 5, 7, 9], 1)
    out = tmp_path / "gap"
    assert method_gap.main(["--xtb", str(x), "--pbe", str(pb), "--params", str(params), "--models", "element_mean",
                            "--out", str(out)]) == 0
    res = json.loads((out / "method_gap.json").read_text())
    row = res["models"]["element_mean"]
    assert res["matched_sites"] == 10 and row["xtb"]["bvs_vu"]["n"] == 10
    assert row["xtb"]["bvs_vu"]["mae"] == pytest.approx(row["pbe"]["bvs_vu"]["mae"], abs=1e-12)
    assert "per-element mean" in (out / "method_gap.md").read_text()
    # resumed: the same command reads results/ and gives the same table
    assert method_gap.main(["--xtb", str(x), "--pbe", str(pb), "--params", str(params), "--models", "element_mean",
                            "--out", str(out)]) == 0
    assert json.loads((out / "method_gap.json").read_text())["models"] == res["models"]


def test_bad_input_is_one_line(tmp_path, capsys):
    _, params = _params(tmp_path)
    x = _write(tmp_path / "x.h5", range(12), 0)
    assert method_gap.main(["--xtb", str(x), "--pbe", str(tmp_path / "missing.h5"), "--params", str(params)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("method_gap: error:")
