"""The PBE recipe of the embedded dataset: settings, projection algebra, the committed convergence
check, and (where GPAW / CHGNet are installed) a real calculation and relaxation."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from data_prep.embedded import pbe
from data_prep.embedded.compute import bv_scope_reason, family_balanced_order
from data_prep.embedded.structures import StructureEntry
from data_prep.records import MaterialRecord

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ROOT / "data_prep" / "embedded" / "pbe_checks.json"
SPECTRA_PBE = ROOT / "data_prep" / "embedded" / "spectra_pbe"
HAVE_GPAW = importlib.util.find_spec("gpaw") is not None and bool(pbe.available_elements())
HAVE_CHGNET = importlib.util.find_spec("chgnet") is not None


def rocksalt(a: float, cation="Mg", anion="O") -> Structure:
    """Primitive rock-salt cell, cation first."""
    h = a / 2
    return Structure(Lattice([[0, h, h], [h, 0, h], [h, h, 0]]), [cation, anion], [[0, 0, 0], [0.5, 0.5, 0.5]])


# ---------------------------------------------------------------------------------------------
# settings that follow the Materials Project
def test_hubbard_u_only_in_oxides_and_fluorides_for_mp_elements():
    assert pbe.hubbard_u(rocksalt(4.3, "Fe", "O")) == {"Fe": 5.3}
    assert pbe.hubbard_u(rocksalt(4.2, "Ni", "F")) == {"Ni": 6.2}
    assert pbe.hubbard_u(rocksalt(5.2, "Fe", "S")) == {}  # MP applies no U to sulfides
    assert pbe.hubbard_u(rocksalt(4.2, "Mg", "O")) == {}


@pytest.mark.parametrize("element,valence,nd,spin", [("Fe", 2, 6, True), ("Zn", 2, 10, False), ("Ti", 4, 0, False),
                                                     ("Ni", 2, 8, True), ("Cu", 1, 10, False), ("Mg", 2, None, False)])
def test_spin_polarised_only_for_open_d_shells(element, valence, nd, spin):
    assert pbe.n_d_electrons(element, valence) == nd
    assert pbe.spin_polarised(rocksalt(4.3, element, "O"), [valence, -valence]) is spin


def test_mulliken_weights_sum_to_one_per_band_and_split_a_shared_orbital():
    rng = np.random.default_rng(0)
    n = 6
    a = rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n))
    s = a @ a.conj().T + n * np.eye(n)  # Hermitian positive definite overlap
    evals, evecs = np.linalg.eigh(s)
    s_inv_sqrt = evecs @ np.diag(evals ** -0.5) @ evecs.conj().T
    c = (s_inv_sqrt @ np.linalg.qr(rng.normal(size=(n, n)))[0]).T  # rows: S-orthonormal states
    q = pbe.mulliken_weights(c, s)
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-12)
    # with an orthonormal basis (S = 1) the weights are |C|^2
    u = np.linalg.qr(rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n)))[0]
    np.testing.assert_allclose(pbe.mulliken_weights(u, np.eye(n)), np.abs(u) ** 2, atol=1e-12)


def test_per_site_l1_is_zero_for_equal_and_two_for_disjoint():
    a = np.zeros((10, 2, 9))
    b = np.zeros((10, 2, 9))
    a[2, :, 0] = 1.0
    b[2, 0, 0] = 3.0
    b[7, 1, 0] = 1.0
    l1 = pbe.per_site_l1(a, b)
    assert l1[0] == pytest.approx(0.0) and l1[1] == pytest.approx(2.0)


def test_anions_outside_bond_valence_theory_are_dropped_with_a_reason():
    nias = StructureEntry("x", "NiAs", "prototype", rocksalt(5.0, "Ni", "As"), {"bv_valences": [3, -3]})
    nio = StructureEntry("y", "NiO", "prototype", rocksalt(4.2, "Ni", "O"), {"bv_valences": [2, -2]})
    assert "As" in bv_scope_reason(nias)
    assert bv_scope_reason(nio) is None


def test_order_is_real_first_then_round_robin_over_parents():
    s = rocksalt(4.2)

    def sub(mid, parent, rank):
        return StructureEntry(mid, "X", "substituted", s, {"parent_id": parent, "rank_in_parent": rank})

    entries = [sub("a1", "A", 1), sub("a2", "A", 2), sub("a3", "A", 3), sub("b1", "B", 1),
               StructureEntry("A", "MgO", "mineral", s), StructureEntry("B", "MgO", "prototype", s)]
    costs = {e.material_id: 1.0 for e in entries}
    order = [e.material_id for e in family_balanced_order(entries, costs)]
    assert order[:2] == ["A", "B"]
    assert order[2:4] == ["a1", "b1"]  # every family once before any family twice
    assert order[4:] == ["a2", "a3"]


# ---------------------------------------------------------------------------------------------
# the committed convergence and accuracy check (bench/pbe_convergence.py)
def _checks() -> dict:
    assert CHECKS.exists(), "run python bench/pbe_convergence.py (needs the 'compute' extra)"
    data = json.loads(CHECKS.read_text())
    assert data["settings"] == pbe.PBESettings().as_dict(), "pbe.py settings changed: rerun bench/pbe_convergence.py"
    return data


@pytest.mark.parametrize("formula", [
    "MgO", "TiO2",
    # Known open (issue 13): at the recipe's density 5 the Sr (0.245) and Ti (0.131) sites of
    # SrTiO3 still move against density 10 (dispersive Sr 4d / Ti 3d conduction bands at
    # sigma 0.1 eV); strict, so this test fails as soon as the recipe converges it.
    pytest.param("SrTiO3", marks=pytest.mark.xfail(strict=True, reason="SrTiO3 not converged in k at density 5")),
])
def test_committed_kpoint_convergence(formula):
    conv = {row["formula"]: row for row in _checks()["convergence"]}
    row = conv[formula]
    assert row["dos_kdensity"] == [pbe.DOS_KDENSITY, 2 * pbe.DOS_KDENSITY]
    assert max(row["per_site_l1"]) == pytest.approx(row["max_l1"])
    assert row["max_l1"] <= pbe.L1_TOLERANCE, f"{formula}: DOS not converged in k ({row['max_l1']})"


def test_committed_reference_gaps_and_electron_counts():
    gaps = {row["formula"]: row for row in _checks()["gaps"]}
    assert set(gaps) == set(pbe.REFERENCE_GAPS_EV)
    for f, row in gaps.items():
        assert abs(row["band_gap_ev"] - pbe.REFERENCE_GAPS_EV[f]) <= pbe.GAP_TOLERANCE_EV, f
        assert row["occupied_weight"] == pytest.approx(row["n_electrons"], abs=1e-3), f
        assert row["max_band_weight_error"] < 0.01, f


def test_committed_pbe_records_are_valid_and_relaxed_where_hypothetical():
    paths = sorted(SPECTRA_PBE.glob("*.npz"))
    if not paths:
        pytest.skip("no PBE records committed yet")
    for p in paths[:: max(1, len(paths) // 40)]:  # a spread sample keeps this quick
        rec = MaterialRecord.from_npz(p)
        rec.validate()
        assert rec.method == pbe.METHOD
        calc = rec.provenance["calculation"]
        assert calc["xc"] == "PBE" and calc.get("max_band_weight_error", 0.0) < 0.01  # absent in the first records
        # insulators: exact; (semi)metals within 2 %: the DOS step keeps the SCF's Fermi level, and on
        # the denser mesh the smeared occupations of bands crossing it need not add up to N exactly
        tol = 1e-3 if rec.spectrum.band_gap_ev > 0.1 else 0.02 * rec.spectrum.n_electrons
        assert calc["occupied_weight"] == pytest.approx(rec.spectrum.n_electrons, abs=tol), rec.material_id
        if rec.origin == "substituted":
            relax = rec.provenance["relaxation"]
            assert relax["converged"] and abs(relax["volume_change"]) <= 0.30


# ---------------------------------------------------------------------------------------------
# real calculations, where the optional 'compute' extra is installed
@pytest.mark.skipif(not HAVE_GPAW, reason="GPAW (the 'compute' extra) is not installed")
def test_mgo_pbe_channels_electrons_and_cubic_symmetry():
    settings = pbe.PBESettings(scf_kdensity=1.5, dos_kdensity=2.0)
    r = pbe.run_pbe(rocksalt(4.25), [2, -2], settings, window_ev=(-200.0, 200.0))
    sp = r.spectrum
    assert r.info["max_band_weight_error"] < 1e-8  # the channels of every band sum to the total DOS
    assert r.info["occupied_weight"] == pytest.approx(sp.n_electrons, abs=1e-6)
    occ = sp.energies_ev <= sp.reference_ev + 1e-6
    assert sp.weights[occ].sum() == pytest.approx(sp.n_electrons, rel=1e-3)  # all states inside the window
    o_p = sp.weights[:, 1, 1:4].sum(axis=0)
    np.testing.assert_allclose(o_p, o_p.mean(), rtol=1e-6)  # py = pz = px in rock salt
    assert 3.5 < sp.band_gap_ev < 6.0  # PBE gap of MgO ~4.5 eV (the xTB Γ supercell gave 0.09)


@pytest.mark.skipif(not HAVE_CHGNET, reason="CHGNet (the 'compute' extra) is not installed")
def test_chgnet_relaxation_moves_a_strained_cell_back():
    from data_prep.embedded.relax import relax

    r = relax(rocksalt(4.6), "test-MgO")  # PBE-like MgO has a ~4.25 A
    assert r.info["converged"]
    assert r.info["volume_change"] < -0.1
    assert 4.0 < r.structure.lattice.abc[0] * 2 ** 0.5 < 4.4
