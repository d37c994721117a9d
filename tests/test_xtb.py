"""GFN1-xTB spectra of the embedded dataset: basis layout, electron counts, m-resolution,
compaction and the resumable, time-limited pool (tiny cells; the whole file runs in ~1 min)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

pytest.importorskip("tblite")

from data_prep.embedded.compute import compute_embedded, read_failures  # noqa: E402
from data_prep.embedded.structures import StructureEntry  # noqa: E402
from data_prep.embedded.xtb import (BOHR_ANG, XTBError, compact, n_ao_of_element,  # noqa: E402
                                    perpendicular_widths, run_xtb, supercell_multiplicity)
from data_prep.layout import DEFAULT_GRID, ORBITALS  # noqa: E402
from data_prep.records import MaterialRecord  # noqa: E402

P = [ORBITALS.index(o) for o in ("px", "py", "pz")]
CH = {o: i for i, o in enumerate(ORBITALS)}


def rocksalt(a, cation, anion):
    s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), [cation, anion], [[0, 0, 0], [0.5, 0.5, 0.5]])
    return s.get_primitive_structure()


def rutile():
    return Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.594, 2.959), ["Ti", "O"],
                                     [[0, 0, 0], [0.3048, 0.3048, 0]])


def grid_dos(energies, weights, reference, grid=DEFAULT_GRID):
    """Own small Gaussian gridder for the checks: (n_points, atoms, 9), exact sum over states."""
    x = grid.energies_ev[:, None] - (np.asarray(energies, float) - reference)[None, :]
    g = np.exp(-0.5 * (x / grid.sigma_ev) ** 2) / (grid.sigma_ev * math.sqrt(2 * math.pi))
    w = np.asarray(weights, float)
    return (g @ w.reshape(len(w), -1)).reshape(grid.n_points, *w.shape[1:])


@pytest.fixture(scope="module")
def nacl():
    return run_xtb(rocksalt(5.64, "Na", "Cl"), 6.0)  # 2 x 2 x 2 primitive cells, 16 atoms


@pytest.fixture(scope="module")
def mgo():
    return run_xtb(rocksalt(4.21, "Mg", "O"), 7.0)  # 3 x 3 x 3, 54 atoms


# --- supercell --------------------------------------------------------------------------------
def test_multiplicity_uses_perpendicular_widths_and_cap():
    s = rocksalt(5.64, "Na", "Cl")  # |a| = 3.99 A but the face distance is a_cubic / sqrt(3) = 3.26 A
    w = perpendicular_widths(s.lattice.matrix)
    assert np.allclose(w, 5.64 / math.sqrt(3), atol=1e-3)
    assert supercell_multiplicity(s.lattice.matrix, 2, 7.0, None) == (3, 3, 3)  # |a| alone would give 2
    assert supercell_multiplicity(s.lattice.matrix, 2, 7.0, 20) == (2, 2, 2)
    t = rutile()  # widths 4.594, 4.594, 2.959
    assert supercell_multiplicity(t.lattice.matrix, 6, 10.0, None) == (3, 3, 4)
    assert supercell_multiplicity(t.lattice.matrix, 6, 10.0, 100) == (2, 2, 4)  # best smallest width <= 100 atoms
    assert supercell_multiplicity(t.lattice.matrix, 6, 10.0, None, n_ao_cell=34, max_ao=400) == (2, 2, 2)


# --- tblite basis facts -----------------------------------------------------------------------
def test_tblite_component_order_is_pymatgens():
    """Overlap of Ti p/d AOs with an H s AO along r is proportional to the real harmonic of r."""
    from tblite.interface import Calculator

    rng = np.random.default_rng(3)
    for _ in range(2):
        v = rng.normal(size=3)
        v /= np.linalg.norm(v)
        x, y, z = v
        calc = Calculator("GFN1-xTB", np.array([22, 1]), np.array([[0, 0, 0], 1.9 * v]) / BOHR_ANG, uhf=1,
                          color=False, logger=lambda *a: None)
        calc.set("verbosity", 0)
        calc.set("save-integrals", 1)
        s = calc.singlepoint().get("overlap-matrix")
        shell_atom, shell_l = calc.get("shell-map"), calc.get("angular-momenta")
        ao_shell = calc.get("orbital-map")
        h = [i for i, sh in enumerate(ao_shell) if shell_atom[sh] == 1][0]
        for l, harm in ((1, [y, z, x]),
                        (2, [math.sqrt(3) * x * y, math.sqrt(3) * y * z, (3 * z * z - 1) / 2,
                             math.sqrt(3) * x * z, math.sqrt(3) / 2 * (x * x - y * y)])):
            idx = [i for i, sh in enumerate(ao_shell) if shell_atom[sh] == 0 and shell_l[sh] == l]
            ratio = s[idx, h] / np.array(harm)
            assert ratio[0] > 0 and np.allclose(ratio, ratio[0], rtol=1e-6), (l, ratio)


# --- electron counts and normalisation --------------------------------------------------------
def test_weights_count_basis_functions_and_electrons(nacl):
    sp = nacl.spectrum
    n_ao_cell = n_ao_of_element(11) + n_ao_of_element(17)
    assert sp.weights.sum() == pytest.approx(2 * n_ao_cell, abs=1e-8)
    assert sp.n_electrons == pytest.approx(8.0, abs=1e-8)  # Na 3s1 + Cl 3s2 3p5
    occupied = sp.weights[sp.energies_ev <= sp.reference_ev + 1e-9].sum()
    assert abs(occupied - sp.n_electrons) <= 1e-3 * sp.n_electrons
    assert sp.band_gap_ev > 3.0 and sp.reference_ev == pytest.approx(nacl.info["homo_ev"])
    assert np.all(sp.f_weight == 0)
    assert nacl.info["supercell"] == [2, 2, 2] and nacl.info["supercell_atoms"] == 16
    # Na has no d shell in GFN1-xTB, Cl a polarisation d shell: Na d channels carry nothing
    na = [i for i, site in enumerate(rocksalt(5.64, "Na", "Cl")) if site.specie.symbol == "Na"][0]
    assert np.abs(sp.weights[:, na, 4:]).max() == 0


def test_oxide_o_p_below_reference(mgo):
    sp = mgo.spectrum
    o = 1 if str(rocksalt(4.21, "Mg", "O")[1].specie) == "O" else 0
    wp = sp.weights[:, o, 1:4].sum(axis=1)
    below = wp[sp.energies_ev <= sp.reference_ev + 1e-6].sum()
    assert below / wp.sum() > 0.7
    occupied = sp.weights[sp.energies_ev <= sp.reference_ev + 1e-6].sum()
    assert occupied == pytest.approx(sp.n_electrons, rel=1e-3) or sp.band_gap_ev <= 0.1


def test_scf_failure_is_xtb_error():
    with pytest.raises(XTBError, match="not converged"):
        run_xtb(rocksalt(5.64, "Na", "Cl"), 3.0, max_iter=2)
    uo2 = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.47), ["U", "O"], [[0, 0, 0], [0.25, 0.25, 0.25]])
    with pytest.raises(XTBError, match="no parameters for U"):
        run_xtb(uo2, 3.0)


# --- m-resolved channels ----------------------------------------------------------------------
def test_p_and_d_channels_rotate_with_the_cell():
    """Relabelling the Cartesian axes (x, y, z) -> (y, z, x) permutes the channels the same way."""
    s = Structure(Lattice.tetragonal(3.3, 3.7), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])  # CsCl type, stretched
    perm = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]])  # new = perm @ old: x->y, y->z, z->x
    rot = Structure(s.lattice.matrix @ perm.T, s.species, s.frac_coords)
    a = run_xtb(s, 5.0).spectrum
    b = run_xtb(rot, 5.0).spectrum
    assert np.allclose(a.energies_ev, b.energies_ev, atol=1e-5)
    wa = a.weights[a.energies_ev <= a.reference_ev + 1e-6].sum(axis=0)  # occupied, per atom/channel
    wb = b.weights[b.energies_ev <= b.reference_ev + 1e-6].sum(axis=0)
    ea = a.weights.reshape(len(a.energies_ev), -1).T @ a.energies_ev  # first moments: all states
    eb = b.weights.reshape(len(b.energies_ev), -1).T @ b.energies_ev
    ea, eb = ea.reshape(wa.shape), eb.reshape(wb.shape)
    for qa, qb in ((wa, wb), (ea, eb)):
        # the z-stretch makes pz differ from px = py, so the check cannot pass by symmetry alone
        assert abs(qa[1, CH["pz"]] - qa[1, CH["px"]]) > 1e-3 * max(1.0, abs(qa[1, CH["px"]]))
        for old, new in (("px", "py"), ("py", "pz"), ("pz", "px"), ("dxy", "dyz"), ("dyz", "dxz"),
                         ("dxz", "dxy")):
            assert np.allclose(qa[:, CH[old]], qb[:, CH[new]], atol=1e-5), (old, new)
        eg = [CH["dz2"], CH["dx2"]]
        assert np.allclose(qa[:, eg].sum(axis=1), qb[:, eg].sum(axis=1), atol=1e-5)


def test_symmetry_equivalent_atoms_keep_their_own_projection():
    """Cubic perovskite KMgF3: the three F are related by the 3-fold axis along [111], which
    permutes x -> y -> z. Each F has its two Mg neighbours along one axis, so its p channel along
    that axis (sigma) differs from the other two (pi), and the channels of the three F permute
    with the axis instead of being copies of one representative."""
    s = Structure(Lattice.cubic(3.99), ["K", "Mg", "F", "F", "F"],
                  [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    sp = run_xtb(s, 5.0).spectrum  # 2 x 2 x 2, 40 atoms
    occ = sp.weights[sp.energies_ev <= sp.reference_ev + 1e-6].sum(axis=0)
    mom = (sp.weights * sp.energies_ev[:, None, None]).sum(axis=0)  # first moments, all states
    for q in (occ, mom):
        f_z, f_y, f_x = q[2], q[3], q[4]  # Mg neighbours along z, y, x respectively
        sigma = [f_x[CH["px"]], f_y[CH["py"]], f_z[CH["pz"]]]
        pi = [f_x[CH["py"]], f_x[CH["pz"]], f_y[CH["px"]], f_y[CH["pz"]], f_z[CH["px"]], f_z[CH["py"]]]
        assert np.allclose(sigma, sigma[0], atol=1e-5) and np.allclose(pi, pi[0], atol=1e-5)
        assert abs(sigma[0] - pi[0]) > 1e-3 * max(1.0, abs(pi[0]))  # the channels really differ
        # x -> y -> z maps F(x) -> F(y) -> F(z); dyz, dxz, dxy follow as the pairs of axes do
        for a, b in ((f_x, f_y), (f_y, f_z)):
            for old, new in (("px", "py"), ("py", "pz"), ("pz", "px"), ("dxy", "dyz"), ("dyz", "dxz"),
                             ("dxz", "dxy")):
                assert np.isclose(a[CH[old]], b[CH[new]], atol=1e-5), (old, new)
        assert np.allclose(q[1, 1:4], q[1, 1], atol=1e-5)  # Mg (cubic site): px = py = pz


# --- compaction -------------------------------------------------------------------------------
def test_compact_reports_the_weight_its_threshold_cuts_per_atom():
    from data_prep.records import Spectrum

    w = np.zeros((3, 2, 9))
    w[0, 0, 0], w[1, 0, 1], w[2, 1, 4] = 1.0, 4e-5, -3e-5  # two weights under 1e-4, one per atom
    sp = Spectrum(energies_ev=np.array([-3.0, -2.0, -1.0]), weights=w, reference_ev=0.0, efermi_ev=0.0,
                  band_gap_ev=1.0, f_weight=np.zeros(2), n_electrons=1.0)
    small, summary = compact(sp, merge_tol_ev=0.0, weight_threshold=1e-4)
    assert summary["cut_by_threshold"] == pytest.approx([4e-5, -3e-5])
    assert small.weights.sum() == pytest.approx(1.0)


def test_compact_float16_record_grids_within_one_percent(mgo, tmp_path):
    sp = mgo.spectrum
    small, summary = compact(sp)
    assert summary["n_states_out"] < summary["n_states_in"]
    rec = MaterialRecord("mgo-test", "MgO", "prototype", "GFN1-xTB", rocksalt(4.21, "Mg", "O"), small,
                         {"compaction": summary})
    path = rec.save(tmp_path / "mgo-test.npz", weight_dtype=np.float16)
    back = MaterialRecord.from_npz(path).spectrum
    exact = grid_dos(sp.energies_ev, sp.weights, sp.reference_ev)
    approx = grid_dos(back.energies_ev, back.weights, back.reference_ev)
    rel = np.abs(approx - exact).sum() / np.abs(exact).sum()
    assert rel < 0.01, rel
    # nothing is lost from the electron count: kept states below the reference + dropped ones
    kept = back.weights[back.energies_ev <= back.reference_ev + 1e-6].sum()
    assert kept + sum(summary["dropped_below"]) == pytest.approx(sp.n_electrons, rel=2e-3)
    assert back.n_electrons == pytest.approx(sp.n_electrons)


# --- the pool: resume, failures, timeout ------------------------------------------------------
def _entry(mid, s, origin="prototype"):
    return StructureEntry(mid, s.composition.reduced_formula, origin, s, {"source": "test"})


def test_compute_embedded_resume_and_failures(tmp_path):
    uo2 = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.47), ["U", "O"], [[0, 0, 0], [0.25, 0.25, 0.25]])
    entries = [_entry("nacl", rocksalt(5.64, "Na", "Cl")), _entry("mgo", rocksalt(4.21, "Mg", "O")),
               _entry("uo2", uo2.get_primitive_structure())]
    out = tmp_path / "records"
    s1 = compute_embedded(entries, out, n_procs=2, time_limit_s=120, progress=False, min_length_ang=5.0)
    assert s1["n_computed"] == 2 and s1["n_failed"] == 1, s1
    assert sorted(p.name for p in out.glob("*.npz")) == ["mgo.npz", "nacl.npz"]
    fails = read_failures(out)
    assert list(fails) == ["uo2"] and "U" in fails["uo2"]["reason"]
    json.loads((out / "failures.json").read_text())  # valid JSON on disk
    rec = MaterialRecord.from_npz(out / "nacl.npz")
    calc = rec.provenance["calculation"]
    assert rec.method == "GFN1-xTB" and calc["tblite_version"] and calc["supercell"] == [2, 2, 2]
    assert calc["min_length_ang"] == 5.0 and calc["etemp_k"] == 300.0 and calc["seconds"] > 0
    assert rec.provenance["source"] == "test"
    prog = json.loads((out / ".compute.progress.json").read_text())  # what a background run shows
    assert (prog["state"], prog["todo"], prog["computed"], prog["failed"], prog["in_flight"]) == \
        ("finished", 3, 2, 1, [])
    assert sorted(f["material_id"] for f in prog["last_finished"]) == ["mgo", "nacl", "uo2"]
    assert [f["ok"] for f in prog["last_finished"] if f["material_id"] == "uo2"] == [False]
    stamp = (out / "nacl.npz").stat().st_mtime_ns

    s2 = compute_embedded(entries, out, n_procs=2, progress=False, min_length_ang=5.0)  # resume: nothing to do
    assert (s2["n_cached"], s2["n_skipped_failed"], s2["n_computed"], s2["n_failed"]) == (2, 1, 0, 0)
    assert (out / "nacl.npz").stat().st_mtime_ns == stamp


def test_compute_embedded_timeout_kills_and_records(tmp_path):
    big = rocksalt(4.21, "Mg", "O")  # 4 x 4 x 4 = 128 atoms at 9 A: several seconds
    entries = [_entry("mgo-big", big)]
    s = compute_embedded(entries, tmp_path, n_procs=1, time_limit_s=0.5, progress=False, min_length_ang=9.0)
    assert s["n_failed"] == 1 and s["failed"]["mgo-big"].startswith("timeout")
    assert not list(tmp_path.glob("*.npz"))
    assert read_failures(tmp_path)["mgo-big"]["reason"].startswith("timeout")


def test_the_time_limit_counts_the_workers_cpu_time_not_a_busy_machines_clock():
    """A worker waiting for the CPU (other work on the cores) is not timed out by the wall clock;
    CPU time counts, and the wall clock only at WALL_LIMIT_FACTOR times the limit."""
    import os
    import time
    from types import SimpleNamespace

    from data_prep.embedded import compute

    me = compute._Worker.__new__(compute._Worker)  # this process stands in for a worker
    me.proc = SimpleNamespace(pid=os.getpid())
    me.started, me.cpu0 = time.monotonic(), compute._cpu_seconds(os.getpid())
    assert me.cpu0 is not None and me.cpu0 > 0
    c = time.process_time()
    while time.process_time() - c < 0.3:  # busy for 0.3 s of CPU (more on the clock when the cores are shared)
        pass
    busy = me.used()
    time.sleep(0.4)  # idle: the clock advances, the CPU time does not
    idle = me.used()
    assert 0.25 < busy < 0.5 and idle - busy < 0.1, (busy, idle)
    me.started = time.monotonic() - 0.7  # as if 0.7 s had passed on the clock (a loaded machine takes longer)
    assert me.over(0.1) and not me.over(0.6)  # 0.3 s of CPU, 0.7 s on the clock < 4 x 0.6
    me.started -= 10.0  # 10 s on the clock: past 4 x 0.6 whatever the CPU time
    assert me.over(0.6)
    assert compute._cpu_seconds(2 ** 30) is None  # no such process: the caller falls back to the clock


def test_progress_file_names_what_is_in_flight(tmp_path):
    import time
    from types import SimpleNamespace

    from data_prep.embedded import compute

    busy = SimpleNamespace(task=_entry("mgo", rocksalt(4.21, "Mg", "O")), started_wall=time.time() - 90)
    idle = SimpleNamespace(task=None, started_wall=0.0)
    summary = {"method": "pbe", "n_todo": 5, "n_computed": 1, "n_failed": 0}
    compute._write_progress(tmp_path, summary, [busy, idle], ["a", "b", "c"],
                            [{"material_id": "nacl", "ok": True, "seconds": 12.0}], time.time() - 100)
    prog = json.loads((tmp_path / compute.PROGRESS_FILE).read_text())
    assert prog["state"] == "running" and prog["queued"] == 3 and prog["computed"] == 1
    (flight,) = prog["in_flight"]
    assert flight["material_id"] == "mgo" and flight["formula"] == "MgO" and flight["n_sites"] == 2
    assert 89 <= flight["elapsed_s"] <= 120
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically
