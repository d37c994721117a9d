"""data_prep build/export/inspect: h5 content, grouped split, round trips, bad input."""
import json
import pickle

import h5py
import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from conftest import run_cli
from data_prep.build import BuildConfig, BuildError, build_h5, grouped_split
from data_prep.export import export_npy, export_upstream
from data_prep.layout import DEFAULT_GRID, channel_labels
from records_factory import make_record, structures, write_records


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("build")
    paths = write_records(d / "records")
    out = d / "data.h5"
    summary = build_h5(paths, out, BuildConfig(split_fractions=(0.5, 0.25, 0.25)), n_procs=1, progress=False)
    return out, summary, d


def test_h5_layout_and_content(built):
    out, summary, _ = built
    with h5py.File(out) as h:
        n = h["dos"].shape[0]
        assert h["dos"].shape == (n, DEFAULT_GRID.n_points, 27) and h["dos"].dtype == np.float32
        assert h["dos"].chunks == (1, DEFAULT_GRID.n_points, 27)
        assert list(h["dos"].attrs["channel_labels"]) == channel_labels(2)
        assert h["structure"].shape[0] == n and h["structure"].shape[1] == len(h["structure_labels"])
        ids = h["meta/material_id"].asstr()[...]
        # one sample per symmetry-distinct site: rocksalt 2, rutile 2, perovskite 3
        counts = dict(zip(*np.unique(ids, return_counts=True)))
        assert counts["test-NaCl"] == 2 and counts["test-TiO2"] == 2 and counts["test-SrTiO3"] == 3
        # targets: NaCl Na site BVS by the table (hand value 0.986 v.u., see test_bond_valence)
        na = np.flatnonzero((ids == "test-NaCl") & (h["meta/element"].asstr()[...] == "Na"))[0]
        assert h["targets/valence"][na] == 1
        assert abs(h["targets/bvs_vu"][na] - 0.986) < 0.01
        assert np.allclose(h["targets/bvs_deviation_vu"][...], h["targets/bvs_vu"][...] - h["targets/valence"][...], atol=1e-5)
        # materials table traces every sample back to its structure
        mids = list(h["materials/material_id"].asstr()[...])
        s = Structure.from_dict(json.loads(h["materials/structure_json"].asstr()[mids.index("test-NaCl")]))
        assert s.composition.reduced_formula == "NaCl"
        assert json.loads(h.attrs["grid"])["n_points"] == DEFAULT_GRID.n_points
        assert "Brown" in h.attrs["citations"]
    assert summary["n_materials"] == 8 and summary["skipped"] == {}


def test_split_grouped_by_material_and_deterministic(built):
    out, _, _ = built
    with h5py.File(out) as h:
        ids = h["meta/material_id"].asstr()[...]
        split = h["split"].asstr()[...]
    for mid in set(ids):
        assert len(set(split[ids == mid])) == 1, mid
    assert set(split) == {"train", "val", "test"}
    ids = [f"m{i}" for i in range(100)]
    a, b = grouped_split(ids, (0.8, 0.1, 0.1), 88), grouped_split(ids, (0.8, 0.1, 0.1), 88)
    assert a == b and list(a.values()).count("train") == 80
    assert grouped_split(ids, (0.8, 0.1, 0.1), 89) != a


def test_split_keeps_every_family_on_one_side(tmp_path):
    """Issue 13: a substituted structure sits with its parent, real structures of one prototype
    (the five rock salts here) form one family, and no family has samples in two splits."""
    from pymatgen.core import Lattice, Structure

    d = tmp_path / "records"
    paths = write_records(d)
    subs = {"SnO2": Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.74, 3.19), ["Sn", "O"],
                                              [[0, 0, 0], [0.307, 0.307, 0]]),
            "CdS": Structure.from_spacegroup("F-43m", Lattice.cubic(5.82), ["Cd", "S"],
                                             [[0, 0, 0], [0.25, 0.25, 0.25]]).get_primitive_structure()}
    parents = {"SnO2": "test-TiO2", "CdS": "test-ZnS"}
    for k, (name, st) in enumerate(subs.items()):
        rec = make_record(name, st, seed=20 + k, origin="substituted")
        rec.provenance["parent_id"] = parents[name]
        paths.append(rec.save(d / f"test-{name}.npz"))
    for split_by in ("family", "material"):
        out = tmp_path / f"{split_by}.h5"
        build_h5(paths, out, BuildConfig(split_fractions=(0.5, 0.25, 0.25), split_by=split_by), n_procs=1,
                 progress=False)
        with h5py.File(out) as h:
            fam = h["meta/family_id"].asstr()[...]
            mid = h["meta/material_id"].asstr()[...]
            split = h["split"].asstr()[...]
            mfam = dict(zip(h["materials/material_id"].asstr()[...], h["materials/family_id"].asstr()[...]))
        rocksalt = {mfam[f"test-{n}"] for n in ("NaCl", "MgO", "KBr", "CaO", "LiF")}
        assert len(rocksalt) == 1
        assert mfam["test-SnO2"] == mfam["test-TiO2"] and mfam["test-CdS"] == mfam["test-ZnS"]
        assert len(set(fam)) == 4 and all(fam[mid == m][0] == f for m, f in mfam.items())
        if split_by == "family":
            for f in set(fam):
                assert len(set(split[fam == f])) == 1, f
            assert set(split) == {"train", "val", "test"}
    # with material grouping, some family straddles two splits (the leak the family split removes)
    assert any(len(set(split[fam == f])) > 1 for f in set(fam))


def test_substituted_record_that_relaxed_into_another_prototype_joins_its_family(tmp_path):
    """A record derived from zinc-blende ZnS whose (relaxed) structure is a rock salt is kept on the
    rock salts' side of every split: its family and ZnS's merge with the rock salts', and the
    manifest names it."""
    d = tmp_path / "records"
    paths = write_records(d)
    bao = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.52), ["Ba", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    rec = make_record("BaO", bao.get_primitive_structure(), seed=31, origin="substituted")
    rec.provenance["parent_id"] = "test-ZnS"
    paths.append(rec.save(d / "test-BaO.npz"))
    out = tmp_path / "family.h5"
    summary = build_h5(paths, out, BuildConfig(split_fractions=(0.5, 0.25, 0.25)), n_procs=1, progress=False)
    with h5py.File(out) as h:
        mfam = dict(zip(h["materials/material_id"].asstr()[...], h["materials/family_id"].asstr()[...]))
        msplit = dict(zip(h["materials/material_id"].asstr()[...], h["materials/split"].asstr()[...]))
    rocksalt = {f"test-{n}" for n in ("NaCl", "MgO", "KBr", "CaO", "LiF", "BaO", "ZnS")}
    assert len({mfam[m] for m in rocksalt}) == 1 and len({msplit[m] for m in rocksalt}) == 1
    assert mfam["test-TiO2"] not in {mfam[m] for m in rocksalt}
    assert summary["families"]["displaced"] == {"test-BaO": mfam["test-NaCl"]}
    assert summary["families"]["n_families"] == len(set(mfam.values())) == 3


def test_family_split_balances_materials_and_is_deterministic():
    ids = [f"m{i:03d}" for i in range(300)]
    group_of = {m: f"fam{i % 40}" for i, m in enumerate(ids)}  # 40 families of 7-8 materials
    a = grouped_split(ids, (0.8, 0.1, 0.1), 88, group_of=group_of)
    assert a == grouped_split(ids, (0.8, 0.1, 0.1), 88, group_of=group_of)
    assert a != grouped_split(ids, (0.8, 0.1, 0.1), 89, group_of=group_of)
    for f in set(group_of.values()):
        assert len({a[m] for m in ids if group_of[m] == f}) == 1
    counts = {s: list(a.values()).count(s) for s in ("train", "val", "test")}
    assert abs(counts["train"] - 240) <= 8 and abs(counts["val"] - 30) <= 8 and abs(counts["test"] - 30) <= 8


def test_sample_dos_matches_record_gridding(built):
    from data_prep.grid import grid_atoms
    from data_prep.records import MaterialRecord

    out, _, d = built
    rec = MaterialRecord.from_npz(d / "records" / "test-TiO2.npz")
    with h5py.File(out) as h:
        ids = h["meta/material_id"].asstr()[...]
        i = np.flatnonzero(ids == "test-TiO2")[0]
        site, nbrs = h["meta/site_index"][i], h["meta/neighbour_indices"][i]
        x = h["dos"][i]
    dos, _ = grid_atoms(rec.spectrum, [site, *nbrs])
    np.testing.assert_allclose(x, np.concatenate(list(dos), axis=1), rtol=1e-5, atol=1e-6)


def test_round_trips_npy_and_upstream(built):
    from DOSnet.protocol import load_upstream_data

    out, _, d = built
    files = export_npy(out, d / "npy")
    dos = np.load(d / "npy" / "dos.npy")
    meta = json.loads((d / "npy" / "meta.json").read_text())
    with h5py.File(out) as h:
        np.testing.assert_array_equal(dos, h["dos"][...])
        np.testing.assert_array_equal(np.load(d / "npy" / "targets.npy")[:, 0], h["targets/bvs_vu"][...])
        assert list(np.load(d / "npy" / "split.npy")) == list(h["split"].asstr()[...])
    assert meta["targets"][0] == "bvs_vu" and len(meta["structure_labels"]) == np.load(d / "npy" / "structure.npy").shape[1]
    assert len(files) == 5
    pkl = export_upstream(out, d / "up.pkl", "bvs_vu")
    surface, y, _ = load_upstream_data(pkl, False, zero_tail=(2000, 2000))
    np.testing.assert_array_equal(surface, dos)
    np.testing.assert_allclose(y, np.load(d / "npy" / "targets.npy")[:, 0])
    with open(pkl, "rb") as fh:
        full = pickle.load(fh)
    np.testing.assert_allclose(full[0, :, 0], DEFAULT_GRID.energies_ev, atol=1e-5)


def test_bad_records_go_to_manifest(tmp_path):
    folder = tmp_path / "recs"
    good = write_records(folder, names=["NaCl", "MgO"])
    s = structures()["NaCl"].copy()
    dis = s.copy()
    dis.replace_species({"Na": {"Na": 0.5, "K": 0.5}})
    make_record("disordered", dis).save(folder / "test-disordered.npz")
    r = make_record("nan", s)
    r.spectrum.weights[0, 0, 0] = np.nan
    r.save(folder / "test-nan.npz")
    r = make_record("empty", s)
    r.spectrum.energies_ev, r.spectrum.weights = np.zeros(0), np.zeros((0, 2, 9))
    r.save(folder / "test-empty.npz")
    metal = Structure(Lattice.cubic(3.61), ["Cu"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    m = make_record("metal", metal)
    m.save(folder / "test-metal.npz")
    (folder / "test-garbage.npz").write_bytes(b"not a zip")
    summary = build_h5(sorted(folder.glob("*.npz")), tmp_path / "x.h5", n_procs=1, progress=False)
    sk = summary["skipped"]
    assert summary["n_materials"] == 2
    assert "disordered" in sk["test-disordered"]
    assert "NaN" in sk["test-nan"]
    assert "no states" in sk["test-empty"]
    assert sk["test-metal"].startswith("bond valence")
    assert "test-garbage" in sk
    manifest = json.loads((tmp_path / "x.manifest.json").read_text())
    assert manifest["skipped"] == sk
    with pytest.raises(BuildError, match="exists"):
        build_h5(good, tmp_path / "x.h5", n_procs=1, progress=False)
    # duplicate ids (same material saved under two file names)
    make_record("NaCl", s).save(folder / "copy.npz")
    with pytest.raises(BuildError, match="duplicate"):
        build_h5(sorted(folder.glob("*.npz")), tmp_path / "y.h5", n_procs=1, progress=False)


def test_bonded_anions_skip_the_material_unless_the_rule_is_off(tmp_path):
    """Pyrite under BVAnalyzer's all-ionic valences (S2- beside S2- at 2.16 A, Fe4+) is skipped with
    the contact named; min_anion_contact_ratio 0 keeps it (the h5 of earlier figures)."""
    folder = tmp_path / "recs"
    write_records(folder, names=["NaCl", "MgO"])
    pyrite = Structure.from_spacegroup("Pa-3", Lattice.cubic(5.417), ["Fe", "S"], [[0, 0, 0], [0.385] * 3])
    make_record("pyrite", pyrite).save(folder / "test-pyrite.npz")
    paths = sorted(folder.glob("*.npz"))
    s = build_h5(paths, tmp_path / "a.h5", n_procs=1, progress=False)
    assert s["n_materials"] == 2 and list(s["skipped"]) == ["test-pyrite"]
    assert "anion-anion contact S2- at site" in s["skipped"]["test-pyrite"] and "2.16 A" in s["skipped"]["test-pyrite"]
    off = build_h5(paths, tmp_path / "b.h5", BuildConfig(min_anion_contact_ratio=0), n_procs=1, progress=False)
    assert off["n_materials"] == 3 and off["skipped"] == {}
    with pytest.raises(BuildError, match="min_anion_contact_ratio"):
        BuildConfig.from_params({"min_anion_contact_ratio": -0.1})


def test_cli_errors_one_line(tmp_path, built):
    out, _, d = built
    trunc = tmp_path / "trunc.h5"
    trunc.write_bytes(out.read_bytes()[:5000])
    for args, word in ((["inspect", trunc], "truncated"), (["inspect", tmp_path / "none.h5"], "not found"),
                       (["build", "--source", "records", tmp_path / "nodir", "--out", tmp_path / "a.h5"], "not found"),
                       (["build", "--source", "records", d / "records", "--out", out], "exists"),
                       (["export", out, "--format", "upstream", "--target", "nope", "--out", tmp_path / "u.pkl"], "unknown target")):
        r = run_cli("-m", "data_prep", *args)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "%|" not in ln]
        assert len(lines) == 1 and word in lines[0], r.stderr


def test_inspect_cli_and_plot(built, tmp_path):
    out, _, _ = built
    r = run_cli("-m", "data_prep", "inspect", out, "--plot")
    assert r.returncode == 0, r.stderr
    assert "8 materials" in r.stdout and "bvs_vu" in r.stdout and "skipped materials: 0" in r.stdout
    assert "families of 4" in r.stdout  # the five rock salts are one family
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_build_cli_says_how_many_families(built, tmp_path):
    _, _, d = built
    r = run_cli("-m", "data_prep", "build", "--source", "records", d / "records", "--out", tmp_path / "cli.h5",
                "--procs", "1")
    assert r.returncode == 0, r.stderr
    assert "8 materials" in r.stdout and "in 4 families" in r.stdout and "0 derived materials placed" in r.stdout
