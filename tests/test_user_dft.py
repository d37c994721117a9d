"""Importing a user's DFT: vasprun.xml (written by tests/vasprun_factory.py) and pymatgen CompleteDos
JSON (from an embedded record) -> records; one-line errors; the gridded round trip."""
import json

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from conftest import run_cli
from data_prep.layout import DEFAULT_GRID
from data_prep.records import MaterialRecord
from data_prep.samples import sample_dos, select_samples
from data_prep.user_dft import (DFTImportError, complete_dos_from_record, record_from_complete_dos_json,
                                record_from_vasprun)
from records_factory import structures
from vasprun_factory import write_vasprun

EMBEDDED = "data_prep/embedded/spectra"
E = np.linspace(-25, 15, 801)


def _pdos(s, n_orb=9, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-12, 5, (1, len(s), n_orb))
    return np.exp(-((E[:, None, None] - centres) ** 2) / 0.5)


def _run(tmp_path, s=None, name="run", **kw):
    s = s or structures()["MgO"]
    d = tmp_path / name
    d.mkdir()
    pd = kw.pop("pdos", None)
    pd = _pdos(s) if pd is None else pd
    write_vasprun(d / "vasprun.xml", s, kw.pop("energies", E), kw.pop("spins", [0.6 * pd, 0.4 * pd]), efermi=0.0,
                  eigen=np.array([-5.0, -1.0, 4.0, 6.0]), **kw)
    return d


def test_vasprun_import_sums_spins_and_reads_method(tmp_path):
    s = structures()["MgO"]
    pd = _pdos(s)
    rec = record_from_vasprun(_run(tmp_path, s, pdos=pd))
    assert rec.material_id == "user-run" and rec.origin == "user" and rec.method == "VASP PBE"
    de = E[1] - E[0]
    assert np.isclose(rec.spectrum.weights.sum(), pd.sum() * de, rtol=1e-6)     # up + down = 0.6 + 0.4
    assert rec.spectrum.reference_ev == -1.0 and rec.spectrum.band_gap_ev == 5.0  # VBM from eigenvalues
    assert rec.provenance["bv_valences"] == [2, -2]
    hse = record_from_vasprun(_run(tmp_path, s, "hse", params_extra={"LHFCALC": ("logical", "T"),
                                                                    "HFSCREEN": ("", 0.2),
                                                                    "LDAU": ("logical", "T")}))
    assert hse.method == "VASP HSE06+U"
    scan = record_from_vasprun(_run(tmp_path, s, "scan", params_extra={"METAGGA": ("string", "R2SCAN")}))
    assert scan.method == "VASP r2SCAN"


@pytest.mark.parametrize("case,message", [
    ("no_projections", "no projected DOS (set LORBIT = 11"),
    ("lorbit10", "only l-resolved projections (LORBIT = 10)"),
    ("truncated", "truncated or malformed vasprun.xml"),
    ("metal", "an ionic compound .oxide, halide"),
    ("window", "the layout's window is -14..6 eV"),
])
def test_vasprun_one_line_errors(tmp_path, case, message):
    s = structures()["MgO"]
    if case == "no_projections":
        d = _run(tmp_path, s, lorbit=None)
    elif case == "lorbit10":
        pd = _pdos(s, 3)
        d = _run(tmp_path, s, lorbit=10, pdos=pd, spins=[pd])
    elif case == "truncated":
        d = _run(tmp_path, s)
        text = (d / "vasprun.xml").read_text()
        (d / "vasprun.xml").write_text(text[: len(text) // 2])
    elif case == "metal":
        cu = Structure(Lattice.cubic(3.6), ["Cu"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
        d = _run(tmp_path, cu, pdos=_pdos(cu))
    else:
        e = np.linspace(-6, 6, 401)
        pd = np.exp(-((e[:, None, None] - np.zeros((1, 2, 9))) ** 2))
        d = _run(tmp_path, s, energies=e, pdos=pd, spins=[pd])
    with pytest.raises(DFTImportError, match=message.replace("(set", r"\(set").replace("(LORBIT = 10)", r"\(LORBIT = 10\)")) as info:
        record_from_vasprun(d)
    assert "\n" not in str(info.value)


def test_disordered_complete_dos_is_refused(tmp_path):
    rec = MaterialRecord.from_npz(f"{EMBEDDED}/min-NaCl-halite-rock-salt.npz")
    d = complete_dos_from_record(rec).as_dict()
    d["structure"]["sites"][0]["species"] = [{"element": "Na", "occu": 0.5}, {"element": "K", "occu": 0.5}]
    (tmp_path / "dis.json").write_text(json.dumps(d))
    with pytest.raises(DFTImportError, match="disordered"):
        record_from_complete_dos_json(tmp_path / "dis.json")


@pytest.mark.parametrize("mid", ["ex-TiO2", "min-NaCl-halite-rock-salt"])
def test_complete_dos_json_round_trip_grids_identically(tmp_path, mid):
    """An embedded record -> CompleteDos JSON (pymatgen's as_dict) -> import -> the same gridded
    sample arrays within 1e-5 states/eV. (Records whose stored reference is not exactly one of their
    states, after compaction, e.g. ex-LiFePO4 with 9e-6 eV, differ by up to 2.4e-4 states/eV.)"""
    rec = MaterialRecord.from_npz(f"{EMBEDDED}/{mid}.npz")
    (tmp_path / "dos.json").write_text(json.dumps(complete_dos_from_record(rec).as_dict()))
    back = record_from_complete_dos_json(tmp_path / "dos.json")
    assert back.provenance["bv_valences"] == [int(v) for v in rec.provenance["bv_valences"]]
    assert abs(back.spectrum.reference_ev - rec.spectrum.reference_ev) < 1e-6
    samples = select_samples(rec.structure, 2)
    a = sample_dos(rec.spectrum, rec.structure, samples, DEFAULT_GRID)
    b = sample_dos(back.spectrum, back.structure, samples, DEFAULT_GRID)
    assert np.max(np.abs(a - b)) < 1e-5


def test_import_cli_then_build(tmp_path):
    d = _run(tmp_path)
    bad = _run(tmp_path, name="bad", lorbit=None)
    r = run_cli("-m", "data_prep", "import", "vasp", d, bad, "--out", tmp_path / "mine")
    assert r.returncode == 1 and "wrote 1 record(s)" in r.stdout
    assert r.stderr.strip().count("\n") == 0 and "LORBIT = 11" in r.stderr
    r = run_cli("-m", "data_prep", "build", "--source", "records", tmp_path / "mine", "--out", tmp_path / "mine.h5",
                "--procs", "1")
    assert r.returncode == 0, r.stderr[-500:]


def test_predict_one_command_prints_a_table(tmp_path):
    """python -m dosnet_bv predict RUN vasprun...: import, build, predict; true BVS beside predictions."""
    import h5py  # noqa: F401

    from data_prep.build import BuildConfig, build_h5
    from data_prep.layout import EnergyGrid
    from dosnet_bv.data import load_data
    from dosnet_bv.outputs import Log
    from dosnet_bv.runs import run_experiment
    from records_factory import write_records
    from test_bv_model import _params

    grid = EnergyGrid(n_points=400)
    h5 = tmp_path / "train.h5"
    build_h5(write_records(tmp_path / "records"), h5, BuildConfig(grid=grid, split_fractions=(0.5, 0.25, 0.25)),
             n_procs=1, progress=False, migration_cache=tmp_path / "none.json")
    p = _params(data_file=str(h5), targets=["bvs_vu"], loss_weights={"bvs_vu": 1.0}, epochs=1, split="stored")
    p["data"] = {**p["data"], "grid": grid.as_dict()}
    run_experiment(p, load_data(h5, p), tmp_path / "model", Log(quiet=True))
    r = run_cli("-m", "dosnet_bv", "predict", tmp_path / "model", _run(tmp_path), "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-800:]
    lines = [x for x in r.stdout.splitlines() if x.startswith("user-run")]
    assert len(lines) == 2                                      # rocksalt MgO: one Mg and one O sample
    assert "bvs_vu true" in r.stdout and "method gap" in r.stdout
    r = run_cli("-m", "dosnet_bv", "predict", tmp_path / "model", tmp_path / "missing")
    assert r.returncode == 1 and r.stderr.count("\n") <= 2 and "not found" in r.stdout + r.stderr
