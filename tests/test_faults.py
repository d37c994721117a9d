"""Failure handling of data_prep build (issue 15): dead workers, Ctrl-C, bad build parameters,
the output location, a lock against concurrent builds, file modes, disk full, implausible records."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import ROOT, run_cli
from data_prep.build import BuildConfig, BuildError, build_h5
from data_prep.layout import EnergyGrid
from data_prep.records import Spectrum
from records_factory import make_record, structures, write_records

L = 200  # a short grid: fast builds
CFG = BuildConfig(grid=EnergyGrid(n_points=L), split_fractions=(0.5, 0.25, 0.25))
ONE_LINE = "data_prep: error:"


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return write_records(tmp_path_factory.mktemp("fault_records") / "records")


def _one_line(r):
    err = r.stderr.strip()
    assert r.returncode not in (0, -11, 139) and "Traceback" not in err, (r.returncode, err[-2000:])
    last = err.splitlines()[-1]
    assert last.startswith(ONE_LINE), err[-2000:]
    return last


# ------------------------------------------------------------------ item 1: the featurising pool
def test_dead_worker_ends_the_build_naming_the_material(records, tmp_path):
    """A worker that segfaults ends the build with one line naming the record (was: a hang at
    0/N with multiprocessing.Pool.imap)."""
    from fault_workers import crash_on_tio2

    t0 = time.time()
    with pytest.raises(BuildError, match=r"worker died .* on test-TiO2;"):
        build_h5(records, tmp_path / "x.h5", CFG, n_procs=2, progress=False, work=crash_on_tio2)
    assert time.time() - t0 < 120
    assert not any(tmp_path.iterdir())  # no output, no lock, no temporary file


def test_ctrl_c_stops_featurising_at_once(records, tmp_path):
    """SIGINT to a real build process while its workers featurise: it stops within seconds with
    exit status 130 and its workers are gone (was: a hang in 2 of 16 tries)."""
    busy = tmp_path / "tmp"
    busy.mkdir()
    script = (
        "import signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)  # a background child inherits SIGINT ignored\n"
        f"sys.path[:0] = [{str(ROOT / 'tests')!r}, {str(ROOT)!r}]\n"
        "from data_prep.build import BuildConfig, build_h5\n"
        "from data_prep.cli import error_tail\n"
        "from data_prep.h5schema import BuildError\n"
        "from fault_workers import slow\n"
        f"paths = {[str(p) for p in records]!r}\n"
        f"sys.exit(error_tail('data_prep', lambda: build_h5(paths, {str(tmp_path / 'x.h5')!r}, n_procs=2, "
        "progress=False, work=slow) or 0, (BuildError,)))\n")
    env = dict(os.environ, TMPDIR=str(busy))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 90
        notes = []
        while time.time() < deadline and len(notes) < 2:  # each busy worker notes its record
            notes = list(busy.glob("data_prep-build-*/*"))
            time.sleep(0.2)
        assert len(notes) == 2, "the workers did not start within 90 s"
        workers = [int(n.name) for n in notes]
        proc.send_signal(signal.SIGINT)
        t0 = time.time()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "interrupted" in err, (proc.returncode, err)
    assert time.time() - t0 < 15
    time.sleep(0.5)
    for pid in workers:  # terminated, not left featurising
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (tmp_path / "x.h5").exists()


# ------------------------------------------------------------------ item 5: bad build parameters, output location
@pytest.mark.parametrize("data, key", [({"grid": {"sigma_ev": -0.1}}, "sigma_ev"), ({"split_seed": "x"}, "split_seed"),
                                       ({"grid": {"n_points": 2000.5}}, "n_points"), ({"bv_cutoff_ang": 0}, "bv_cutoff_ang"),
                                       ({"symprec": -1}, "symprec"), ({"n_neighbours": -2}, "n_neighbours"),
                                       ({"split_seed": -1}, "split_seed"), ({"grid": {"emin_ev": "low"}}, "emin_ev")])
def test_bad_build_parameters_are_one_error(data, key):
    """Checked in the main process before any worker starts (sigma -0.1 was a ValueError
    traceback; symprec -1 segfaulted spglib in a worker)."""
    with pytest.raises(BuildError, match=key):
        BuildConfig.from_params(data)


def test_bad_build_parameter_on_the_command_line(records, tmp_path):
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"data": {"symprec": -1}}))
    r = run_cli("-m", "data_prep", "build", "--source", "records", Path(records[0]).parent, "--out", tmp_path / "x.h5",
                "--params", params)
    assert "symprec" in _one_line(r)


def test_output_location_is_checked_before_featurising(records, tmp_path):
    calls = []

    def work(job):  # never reached
        calls.append(job)
        raise AssertionError("featurised before checking the output")

    with pytest.raises(BuildError, match="is a folder"):
        build_h5(records, tmp_path, CFG, n_procs=1, progress=False, work=work)
    (tmp_path / "file").write_text("")
    with pytest.raises(BuildError, match="cannot create the output folder"):
        build_h5(records, tmp_path / "file" / "x.h5", CFG, n_procs=1, progress=False, work=work)
    assert calls == []


def test_a_second_build_to_the_same_output_is_refused(records, tmp_path):
    """Two concurrent builds to one new --out: the one that comes second is refused (was: it
    silently replaced the first one's file)."""
    from data_prep.build import output_lock

    out = tmp_path / "x.h5"
    with output_lock(out):
        with pytest.raises(BuildError, match="another build is writing"):
            build_h5(records, out, CFG, n_procs=1, progress=False)
    assert not out.exists() and not list(tmp_path.iterdir())  # the lock file goes with the build


# ------------------------------------------------------------------ item 6: skipped records, file modes
def _outside_window_record(folder):
    s = structures()["MgO"]
    rng = np.random.default_rng(3)
    e = np.sort(rng.uniform(30, 40, 60))  # far above the window's 6 eV
    sp = Spectrum(energies_ev=e, weights=rng.exponential(0.05, size=(60, len(s), 9)), reference_ev=0.0,
                  efermi_ev=0.5, band_gap_ev=1.0, f_weight=np.zeros(len(s)), n_electrons=8.0)
    rec = make_record("MgO", s)
    rec.material_id, rec.spectrum = "test-outside", sp
    return rec.save(folder / "test-outside.npz")


def _implausible_record(folder):
    s = structures()["NaCl"]
    rec = make_record("NaCl", s, seed=5)
    rec.material_id = "test-implausible"
    rec.provenance = {"bv_valences": [1e30, -1e30]}  # a valence of 1e30 e
    return rec.save(folder / "test-implausible.npz")


def test_skips_outside_window_and_implausible_records_and_uses_the_umask(records, tmp_path):
    folder = tmp_path / "records"
    folder.mkdir()
    paths = [Path(records[0]), Path(records[1]), _outside_window_record(folder), _implausible_record(folder)]
    out = tmp_path / "x.h5"
    old = os.umask(0o022)
    try:
        s = build_h5(paths, out, BuildConfig(grid=EnergyGrid(n_points=L), split_fractions=(1.0, 0.0, 0.0)),
                     n_procs=1, progress=False)
    finally:
        os.umask(old)
    assert "entirely outside the energy window" in s["skipped"]["test-outside"]
    assert "implausible valence 1e+30" in s["skipped"]["test-implausible"]
    assert s["n_materials"] == 2
    manifest = json.loads(Path(s["manifest"]).read_text())
    assert set(manifest["skipped"]) == {"test-outside", "test-implausible"}
    assert out.stat().st_mode & 0o777 == 0o644  # was 0600 (mkstemp)
    assert Path(s["manifest"]).stat().st_mode & 0o777 == 0o644
    with h5py.File(out) as h:
        assert np.all(np.abs(h["targets/bvs_vu"][...]) <= 10)


# ------------------------------------------------------------------ item 5: disk full
def _tmpfs(path, size):
    """Mount a tmpfs of ``size`` at ``path``; False when this machine does not allow it (not root,
    no mount): the tests below then simulate ENOSPC instead."""
    path.mkdir()
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    d = tmp_path / "disk"
    if not _tmpfs(d, "96k"):
        pytest.skip("needs root and tmpfs to fill a disk (see test_disk_full_simulated)")
    yield d
    subprocess.run(["umount", str(d)], check=False)


def test_disk_full_during_the_build_is_one_line(records, small_disk):
    """A real full disk (96 KiB tmpfs): one line and exit status 1, no temporary file left (was:
    the error, then h5py's teardown segfaulted, exit status 139)."""
    r = run_cli("-m", "data_prep", "build", "--source", "records", Path(records[0]).parent,
                "--out", small_disk / "x.h5", "--procs", "1")
    assert "No space left on device" in _one_line(r)
    assert r.returncode == 1
    assert list(small_disk.iterdir()) == []


def test_disk_full_simulated(records, tmp_path, monkeypatch):
    """Without root: ENOSPC raised by the write of the DOS (h5py's dataset assignment patched)."""
    import errno

    from data_prep import h5schema

    real = h5schema.Writer.dos

    def dos(self, *args, **kwargs):
        real(self, *args, **kwargs)

        class Full:
            def __setitem__(self, key, value):
                raise OSError(errno.ENOSPC, "No space left on device")
        return Full()

    monkeypatch.setattr(h5schema.Writer, "dos", dos)
    with pytest.raises(h5schema.H5WriteError, match="No space left on device; nothing was written"):
        build_h5(records[:2], tmp_path / "x.h5", CFG, n_procs=1, progress=False)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ item 3: the ablation's resume
def test_ablation_resume_recomputes_a_truncated_result_file(tmp_path):
    """A results/*.json cut short (as a crash mid-write left it before writes were atomic): one log
    line names it and the run is recomputed, the intact one is reused; a truncated config is rewritten."""
    from dosnet_bv.ablation import ModelSpec, Runner, check_resume
    from dosnet_bv.outputs import Log

    res = {"scores": {"val": {"bvs_vu": {"nmae": 0.5, "mae": 0.2}}, "test": {"bvs_vu": {"mae": 0.25}}},
           "info": {}, "seconds": 1.0}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "mean__seed1.json").write_text(json.dumps(res)[:25])  # truncated
    (tmp_path / "results" / "mean__seed2.json").write_text(json.dumps(res))
    calls, lines = [], []
    log = Log(quiet=True)
    log.printer, log.quiet = lines.append, False

    def run(spec, seed):
        calls.append(seed)
        return res

    runner = Runner(tmp_path, log, 2, 2.0, run)
    spec = ModelSpec("mean", "baseline")
    assert runner(spec, 1, 1.0, "mean") == res and runner(spec, 2, 1.0, "mean") == res
    runner.close()
    assert calls == [1]
    assert any("mean__seed1.json is damaged" in line and "recomputing" in line for line in lines), lines
    assert json.loads((tmp_path / "results" / "mean__seed1.json").read_text()) == res
    cfg = tmp_path / "ablation_config.json"
    cfg.write_text('{"seeds": [1, ')
    check_resume(cfg, {"seeds": [1, 2]}, log)
    assert json.loads(cfg.read_text()) == {"seeds": [1, 2]}


def test_resume_accepts_a_study_made_before_a_params_key_was_added(tmp_path):
    """A study folder written before a params key existed resumes when the key has its default
    (the behaviour of the old runs), and is refused, naming the setting, when it does not."""
    from dosnet_bv.outputs import Log
    from dosnet_bv.params import ADDED_KEYS, TrainError
    from dosnet_bv.resume import check_resume

    key, default = "dos_scaling", ADDED_KEYS["dos_scaling"]
    params = {"seed": 88, "fusion": "late", key: default}
    cfg = tmp_path / "cv_ablation_config.json"
    old = {k: v for k, v in params.items() if k != key}
    cfg.write_text(json.dumps({"k": 5, "params": old}))
    check_resume(cfg, {"k": 5, "params": params}, Log(quiet=True))
    assert json.loads(cfg.read_text()) == {"k": 5, "params": old}  # the old file is kept as it was
    with pytest.raises(TrainError, match="other settings \\(params\\)"):
        check_resume(cfg, {"k": 5, "params": {**params, key: "point"}}, Log(quiet=True))
