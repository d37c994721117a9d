"""Sharded data preparation: ``build --shard I/N`` parts merged by ``merge OUT.h5 ...`` equal the
unsharded build (same samples, same order, same split, same layout); shard selection is a
disjoint cover by a stable hash of the material id."""
import json

import h5py
import numpy as np
import pytest

from conftest import run_cli
from data_prep.build import BuildConfig, BuildError, build_h5
from data_prep.layout import EnergyGrid
from data_prep.shards import in_shard, merge_h5, parse_shard, record_ids
from records_factory import write_records

P = 200  # a short grid keeps the builds quick
CFG = {"grid": {"n_points": P}, "split_fractions": [0.5, 0.25, 0.25]}


def _n_shards(ids):
    """The largest N <= 3 for which every shard holds a material (so no part is empty)."""
    for n in (3, 2):
        if all(any(in_shard(m, (i, n)) for m in ids) for i in range(1, n + 1)):
            return n
    pytest.skip("the test records all hash to one shard")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    records = write_records(d / "records")
    cfg = BuildConfig(grid=EnergyGrid(n_points=P), split_fractions=(0.5, 0.25, 0.25))
    build_h5(records, d / "all.h5", cfg, n_procs=1, progress=False)
    n = _n_shards(record_ids(records))
    # shard 1 through the command line (with a params file whose data section also holds train.py's
    # read keys, which build ignores), the others in-process
    params = d / "params.json"
    params.write_text(json.dumps({"data": {**CFG, "in_memory": "auto", "block_samples": 64, "shuffle_buffer": 8}}))
    r = run_cli("-m", "data_prep", "build", "--source", "records", d / "records", "--out", d / "s1.h5",
                "--params", params, "--procs", "1", "--shard", f"1/{n}")
    assert r.returncode == 0, r.stderr
    assert f"(shard 1/{n})" in r.stdout
    for i in range(2, n + 1):
        build_h5(records, d / f"s{i}.h5", cfg, n_procs=1, progress=False, shard=(i, n))
    return d, n


def _same_file(a, b):
    with h5py.File(a) as x, h5py.File(b) as y:
        names = []
        x.visititems(lambda k, v: names.append(k) if isinstance(v, h5py.Dataset) else None)
        other = []
        y.visititems(lambda k, v: other.append(k) if isinstance(v, h5py.Dataset) else None)
        assert sorted(names) == sorted(other)
        for k in names:
            dx, dy = x[k], y[k]
            assert dx.shape == dy.shape and dx.dtype == dy.dtype, k
            assert (dx.chunks, dx.compression) == (dy.chunks, dy.compression), k
            vx, vy = dx[...], dy[...]
            if vx.dtype.kind == "O":
                assert list(vx.ravel()) == list(vy.ravel()), k
            else:
                assert np.array_equal(vx, vy, equal_nan=vx.dtype.kind == "f"), k  # migration targets: NaN where none
            assert {a: str(v) for a, v in dx.attrs.items()} == {a: str(v) for a, v in dy.attrs.items()}, k
        assert {k: str(v) for k, v in x.attrs.items()} == {k: str(v) for k, v in y.attrs.items()}


def test_shards_are_a_disjoint_cover():
    ids = [f"mp-{i}" for i in range(500)]
    for n in (1, 2, 7):
        owners = [[i for i in range(1, n + 1) if in_shard(m, (i, n))] for m in ids]
        assert all(len(o) == 1 for o in owners)
        sizes = np.bincount([o[0] for o in owners], minlength=n + 1)[1:]
        assert sizes.min() > 0.5 * len(ids) / n  # a hash, not a block of the list
    assert parse_shard("2/8") == (2, 8)
    for bad in ("0/3", "4/3", "a/b", "3"):
        with pytest.raises(BuildError):
            parse_shard(bad)


def test_shard_builds_hold_disjoint_parts(parts):
    d, n = parts
    seen = []
    for i in range(1, n + 1):
        with h5py.File(d / f"s{i}.h5") as h:
            assert h.attrs["shard"] == f"{i}/{n}"
            mids = list(h["materials/material_id"].asstr()[...])
            assert all(in_shard(m, (i, n)) for m in mids)
            seen += mids
    with h5py.File(d / "all.h5") as h:
        assert sorted(seen) == sorted(h["materials/material_id"].asstr()[...])


def test_merged_shards_equal_the_unsharded_build(parts, tmp_path):
    d, n = parts
    inputs = [d / f"s{i}.h5" for i in range(n, 0, -1)]  # any input order
    r = run_cli("-m", "data_prep", "merge", tmp_path / "merged.h5", *inputs)
    assert r.returncode == 0, r.stderr
    _same_file(tmp_path / "merged.h5", d / "all.h5")
    manifest = json.loads((tmp_path / "merged.manifest.json").read_text())
    with h5py.File(d / "all.h5") as h:
        assert manifest["n_samples"] == h["dos"].shape[0] and manifest["n_records"] == 8


def test_merge_refuses_incomplete_or_overlapping_sets(parts, tmp_path):
    d, n = parts
    with pytest.raises(BuildError, match="every shard"):
        merge_h5(tmp_path / "x.h5", [d / "s1.h5"], progress=False)
    with pytest.raises(BuildError, match="every shard"):
        merge_h5(tmp_path / "x.h5", [d / "s1.h5", d / "s1.h5"] + [d / f"s{i}.h5" for i in range(2, n + 1)],
                 progress=False)
    with pytest.raises(BuildError, match="more than one input"):  # unsharded files that overlap
        merge_h5(tmp_path / "x.h5", [d / "all.h5", d / "all.h5"], progress=False)
    r = run_cli("-m", "data_prep", "merge", tmp_path / "y.h5", d / "s1.h5")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "every shard" in r.stderr
    r = run_cli("-m", "data_prep", "build", "--source", "records", d / "records", "--out", tmp_path / "z.h5",
                "--shard", "4/3")
    assert r.returncode == 1 and "--shard" in r.stderr and len(r.stderr.strip().splitlines()) == 1
