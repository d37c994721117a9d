"""Bond valence targets: the table, the parameter rule, hand-checked sums, GII and failures."""
from __future__ import annotations

import math

import numpy as np
import pytest
from pymatgen.core import Element, Lattice, Structure

from data_prep import bond_valence as bv


# --- structures ------------------------------------------------------------------------------
def rocksalt(a: float, cation: str, anion: str) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), [cation, anion],
                                     [[0, 0, 0], [0.5, 0.5, 0.5]])


RUTILE_A, RUTILE_C, RUTILE_U = 4.594, 2.959, 0.305


def rutile() -> Structure:
    return Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(RUTILE_A, RUTILE_C), ["Ti", "O"],
                                     [[0, 0, 0], [RUTILE_U, RUTILE_U, 0]])


def s(r0: float, b: float, r: float) -> float:
    """One bond valence, written out."""
    return math.exp((r0 - r) / b)


# --- the table -------------------------------------------------------------------------------
def test_table_is_bvparm2020_with_its_references():
    t = bv.BVParams.default()
    assert t.version == "2020-11-25"
    assert len(t) == 1934
    assert t.references["a"].startswith("Brown and Altermatt, (1985)")
    assert t.references["b"].startswith("Brese and O'Keeffe, (1991)")
    assert "bvparm2020" in bv.CITATIONS and "Salinas-Sanchez" in bv.CITATIONS
    assert bv.BVParams.default() is t  # parsed once


def test_lookup_takes_first_checked_entry_for_the_exact_oxidation_states():
    assert bv.lookup("Na", 1, "Cl", -1) == (2.15, 0.37, "b")
    assert bv.lookup("Mg", 2, "O", -2) == (1.693, 0.37, "a")
    assert bv.lookup("Ti", 4, "O", -2) == (1.815, 0.37, "a")
    # Ti3+-O: the table lists Gagne & Hawthorne first (most reliable), not Brown & Altermatt
    assert bv.lookup("Ti", 3, "O", -2) == (1.654, 0.545, "bs")
    # Pb2+-S: the first listed entry is 'unchecked' (2.42, 0.50); the first checked one is used
    c = bv.BVParams.default().choose("Pb", 2, "S", -2)
    assert (c.r0_ang, c.b_ang, c.entry.ref_id, c.tier) == (2.541, 0.37, "a", "exact")


def test_lookup_tiers_unspecified_valence_and_unchecked():
    t = bv.BVParams.default()
    # Ti4+-S has only an 'unchecked' exact entry; the valence-9 (unspecified) entry wins
    c = t.choose("Ti", 4, "S", -2)
    assert (c.r0_ang, c.entry.cation_valence, c.tier) == (2.24, 9, "unspecified-valence")
    # Ag+-Br exists only as valence 9
    assert t.lookup("Ag", 1, "Br", -1) == (2.22, 0.37, "b")
    # Zr2+-O exists only as an 'unchecked' exact entry
    c = t.choose("Zr", 2, "O", -2)
    assert (c.r0_ang, c.tier) == (2.34, "exact-unchecked")
    strict = bv.BVParams(allow_unchecked=False)
    with pytest.raises(bv.MissingBVParameter, match="unchecked"):
        strict.choose("Zr", 2, "O", -2)


def test_missing_parameter_raises():
    with pytest.raises(bv.MissingBVParameter) as info:
        bv.lookup("Na", 1, "O", -1)  # peroxide-like O-: not in the table
    assert (info.value.cation, info.value.anion_valence) == ("Na", -1)
    with pytest.raises(bv.MissingBVParameter):
        bv.lookup("Na", 1, "At", -1)
    with pytest.raises(bv.MissingBVParameter):
        bv.lookup("Cl", -1, "Na", 1)  # wrong orientation is not silently flipped
    # a structure with a pair that has no parameter is rejected, not given a default
    with pytest.raises(bv.MissingBVParameter, match="At"):
        bv.compute_targets(rocksalt(6.0, "Na", "At"), valences=[1] * 4 + [-1] * 4)


# --- hand-checked sums -----------------------------------------------------------------------
def test_nacl_bvs_by_hand():
    a = 5.64
    r0, b = 2.15, 0.37  # bvparm2020, Na(1)-Cl(-1), ref b
    # Cl around Na at (a/2)*sqrt(n), n = i^2+j^2+k^2 with i+j+k odd: n=1 (6), n=3 (8);
    # n=5 is at 6.31 A, beyond the 6 A cutoff
    hand = 6 * s(r0, b, a / 2) + 8 * s(r0, b, a / 2 * math.sqrt(3))
    assert hand == pytest.approx(0.9861, abs=1e-4)
    out = bv.compute_targets(rocksalt(a, "Na", "Cl"))
    v = out["valence"]
    assert np.array_equal(v, [1, 1, 1, 1, -1, -1, -1, -1])
    assert np.allclose(out["bvs_vu"][v > 0], hand, atol=0.01)
    assert np.allclose(out["bvs_vu"][v < 0], -hand, atol=0.01)  # anions: signed like the valence
    assert np.allclose(out["bvs_vu"], [hand] * 4 + [-hand] * 4, atol=1e-9)
    assert np.allclose(out["bvs_deviation_vu"], out["bvs_vu"] - v)
    assert out["params"][0]["ref_id"] == "b" and out["params"][0]["tier"] == "exact"


def test_mgo_bvs_by_hand():
    a = 4.21
    r0, b = 1.693, 0.37  # bvparm2020, Mg(2)-O(-2), ref a
    h = a / 2
    # shells n=1 (6 O), n=3 (8 O), n=5 (24 O); n=9 is at 6.32 A > 6 A
    hand = 6 * s(r0, b, h) + 8 * s(r0, b, h * math.sqrt(3)) + 24 * s(r0, b, h * math.sqrt(5))
    assert hand == pytest.approx(2.018, abs=2e-3)
    out = bv.compute_targets(rocksalt(a, "Mg", "O"))
    assert np.allclose(out["bvs_vu"], [hand] * 4 + [-hand] * 4, atol=1e-9)
    assert out["gii_vu"] == pytest.approx(abs(hand - 2), abs=1e-9)


def test_rutile_bvs_by_hand():
    a, c, u = RUTILE_A, RUTILE_C, RUTILE_U
    r0, b = 1.815, 0.37  # bvparm2020, Ti(4)-O(-2), ref a
    apical = math.sqrt(2) * u * a  # Ti(0,0,0)-O(u,u,0): 1.982 A, 2 of them
    equatorial = math.sqrt(2 * ((0.5 - u) * a) ** 2 + (c / 2) ** 2)  # O(1/2-u,1/2+u,1/2)-(0,1,0): 1.948 A, 4
    first_shell = 2 * s(r0, b, apical) + 4 * s(r0, b, equatorial)
    # the rest of the 6 A sphere: every O image around Ti(0,0,0), enumerated explicitly
    o_frac = np.array([[u, u, 0], [-u, -u, 0], [0.5 + u, 0.5 - u, 0.5], [0.5 - u, 0.5 + u, 0.5]])
    shifts = np.array([[i, j, k] for i in range(-3, 4) for j in range(-3, 4) for k in range(-4, 5)])
    cart = ((o_frac[:, None, :] + shifts[None, :, :]).reshape(-1, 3)) * [a, a, c]
    d = np.linalg.norm(cart, axis=1)
    d = d[d <= 6.0]
    assert np.sum(d < 2.0) == 6 and np.allclose(np.sort(d)[:6], sorted([apical] * 2 + [equatorial] * 4))
    hand = first_shell + sum(s(r0, b, x) for x in d[d >= 2.0])
    assert first_shell == pytest.approx(4.068, abs=2e-3)
    assert hand == pytest.approx(4.174, abs=2e-3)  # farther O add ~0.1 v.u. within 6 A
    out = bv.compute_targets(rutile())
    v = out["valence"]
    assert np.array_equal(v[v > 0], [4, 4]) and np.array_equal(v[v < 0], [-2] * 4)
    assert np.allclose(out["bvs_vu"][v > 0], hand, atol=0.01)
    # charge balance of the sums: 2 Ti bond valences are shared by 4 O
    assert out["bvs_vu"].sum() == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("structure", [rocksalt(5.64, "Na", "Cl"), rocksalt(4.21, "Mg", "O"), rutile()],
                         ids=["NaCl", "MgO", "TiO2"])
def test_matches_pymatgen_calculate_bv_sum_given_our_parameters(structure, monkeypatch):
    """pymatgen's ``calculate_bv_sum`` uses O'Keeffe & Brese element parameters with b = 0.31:
    R = r1 + r2 - r1 r2 (sqrt c1 - sqrt c2)^2 / (c1 r1 + c2 r2),  s = exp((R - d*scale) / 0.31).
    With r_cation = R0 * 0.31 / b, r_anion = 0 (so R = r_cation) and scale = 0.31 / b this is
    exactly exp((R0 - d) / b), i.e. pymatgen's formula evaluated with our parameters."""
    import pymatgen.core.bond_valence as pmg_bv

    out = bv.compute_targets(structure)
    (par,) = out["params"]
    r0, b = par["r0_ang"], par["b_ang"]
    monkeypatch.setitem(pmg_bv.BV_PARAMS, Element(par["cation"]), {"r": r0 * 0.31 / b, "c": 1.0})
    monkeypatch.setitem(pmg_bv.BV_PARAMS, Element(par["anion"]), {"r": 0.0, "c": 1.0})
    theirs = np.array([pmg_bv.calculate_bv_sum(site, structure.get_neighbors(site, 6.0),
                                               scale_factor=0.31 / b) for site in structure])
    assert np.allclose(out["bvs_vu"], theirs, atol=1e-9)


# --- GII -------------------------------------------------------------------------------------
def test_gii_definition_on_a_constructed_case():
    bvs = [2.2, -1.9, -2.0, 1.7]
    val = [2, -2, -2, 2]
    expected = math.sqrt((0.2 ** 2 + 0.1 ** 2 + 0.0 + 0.3 ** 2) / 4)
    assert bv.global_instability_index(bvs, val) == pytest.approx(expected)
    assert bv.global_instability_index([1, -1], [1, -1]) == 0.0


def test_gii_small_for_ideal_structures_and_consistent():
    for st in (rocksalt(5.64, "Na", "Cl"), rocksalt(4.21, "Mg", "O"), rutile()):
        out = bv.compute_targets(st)
        assert out["gii_vu"] < 0.2
        assert out["gii_vu"] == pytest.approx(np.sqrt(np.mean(out["bvs_deviation_vu"] ** 2)))
    # strained rocksalt (a 10 % too small) is far from ideal
    assert bv.compute_targets(rocksalt(5.64 * 0.9, "Na", "Cl"))["gii_vu"] > 0.5


# --- valences --------------------------------------------------------------------------------
def test_assign_valences_signed_and_oxidation_decoration_ignored():
    st = rutile()
    assert bv.assign_valences(st) == [4, 4, -2, -2, -2, -2]
    dec = st.copy()
    dec.add_oxidation_state_by_element({"Ti": 3, "O": -2})  # wrong on purpose: ignored
    assert bv.assign_valences(dec) == [4, 4, -2, -2, -2, -2]
    assert np.allclose(bv.compute_targets(dec)["bvs_vu"], bv.compute_targets(st)["bvs_vu"])


@pytest.mark.filterwarnings("ignore:No Pauling electronegativity")
def test_bvanalyzer_failure_raises_valence_assignment_error():
    # a fluorite-type 'NaCl2' cannot be made charge neutral
    bad = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.5), ["Na", "Cl"],
                                    [[0, 0, 0], [0.25, 0.25, 0.25]])
    with pytest.raises(bv.ValenceAssignmentError, match="BVAnalyzer"):
        bv.compute_targets(bad)
    with pytest.raises(bv.ValenceAssignmentError):
        bv.assign_valences(rocksalt(5.26, "Ar", "Ar"))
    disordered = rocksalt(5.64, "Na", "Cl")
    disordered.replace(0, {"Na": 0.5, "K": 0.5})
    with pytest.raises(bv.ValenceAssignmentError, match="disordered"):
        bv.assign_valences(disordered)
    with pytest.raises(bv.ValenceAssignmentError, match="valence 0"):
        bv.bond_valence_sums(rocksalt(5.64, "Na", "Cl"), [0] * 4 + [-1] * 4)


def test_cutoff_and_shape_checks():
    st = rocksalt(5.64, "Na", "Cl")
    nn_only = bv.bond_valence_sums(st, [1] * 4 + [-1] * 4, cutoff_ang=3.0)
    assert np.allclose(nn_only[:4], 6 * s(2.15, 0.37, 2.82))
    with pytest.raises(ValueError):
        bv.bond_valence_sums(st, [1, -1])


# --- entry per pair, alternative entry and sensitivity (issue 13) ----------------------------
def nickeline_nis() -> Structure:
    """NiS in the NiAs type (P6_3/mmc), a = 3.44, c = 5.35 A."""
    return Structure.from_spacegroup("P6_3/mmc", Lattice.hexagonal(3.44, 5.35), ["Ni", "S"],
                                     [[0, 0, 0], [1 / 3, 2 / 3, 0.25]])


def test_candidates_start_with_the_chosen_entry():
    t = bv.BVParams.default()
    for pair in [("Ni", 2, "S", -2), ("Ni", 2, "O", -2), ("Ti", 4, "O", -2), ("Na", 1, "Cl", -1)]:
        cands = t.candidates(*pair)
        assert cands and cands[0] == t.choose(*pair)
        tiers = [bv.TIERS.index(c.tier) for c in cands]
        assert tiers == sorted(tiers)  # tier order, file order within a tier
    assert t.candidates("Ni", 2, "S", 2) == []


def test_nis_entry_used_and_alternative_move_the_sum():
    """Ni2+-S: Liu & Thorp's value from complexes (j) is used, Brese & O'Keeffe's (b) is next."""
    nis = nickeline_nis()
    v = [2, 2, -2, -2]
    (p,) = bv.pair_parameters(nis, v)
    assert p["pair"] == "Ni+2-S-2"
    assert (p["used"]["ref_id"], p["used"]["r0_ang"], p["used"]["b_ang"], p["used"]["tier"]) == ("j", 1.937, 0.37, "exact")
    alt = p["alternative"]
    assert (alt["ref_id"], alt["r0_ang"], alt["b_ang"], alt["tier"]) == ("b", 2.04, 0.37, "unspecified-valence")
    assert "Brese" in alt["reference"]
    base = bv.bond_valence_sums(nis, v)
    other = bv.bond_valence_sums_alternative(nis, v)
    d = other - base
    # every bond scales by exp((2.04 - 1.937) / 0.37): the sums grow by that factor
    np.testing.assert_allclose(other, base * math.exp((2.04 - 1.937) / 0.37), rtol=1e-12)
    assert 0.5 < d[0] < 0.7 and np.allclose(d[:2], d[0]) and np.allclose(d[2:], -d[0])
    # switching no pair changes nothing
    np.testing.assert_array_equal(bv.bond_valence_sums_alternative(nis, v, pairs=[]), base)


def test_nio_alternative_is_gagne_hawthorne():
    nio = rocksalt(4.177, "Ni", "O")
    v = [2] * 4 + [-2] * 4
    (p,) = bv.pair_parameters(nio, v)
    assert (p["used"]["ref_id"], p["used"]["r0_ang"]) == ("e", 1.675)
    assert (p["alternative"]["ref_id"], p["alternative"]["r0_ang"], p["alternative"]["b_ang"]) == ("bs", 1.689, 0.347)
    base, other = bv.bond_valence_sums(nio, v), bv.bond_valence_sums_alternative(nio, v)
    h = 4.177 / 2

    def hand(r0, b):  # O shells n = 1 (6), 3 (8), 5 (24) within the 6 A cutoff
        return 6 * s(r0, b, h) + 8 * s(r0, b, h * math.sqrt(3)) + 24 * s(r0, b, h * math.sqrt(5))

    assert base[0] == pytest.approx(hand(1.675, 0.37), abs=1e-9)
    assert other[0] == pytest.approx(hand(1.689, 0.347), abs=1e-9)
    assert abs(other[0] - base[0]) > 0.05


def test_alternative_skips_repeated_values_and_may_be_none():
    t = bv.BVParams.default()
    for key in list(t._by_key)[:400]:
        cat, vc, an, va = key
        if vc <= 0 or va >= 0 or vc == bv.UNSPECIFIED_VALENCE:
            continue
        cands = t.candidates(*key)
        alt = t.alternative(*key)
        values = {(c.entry.r0_ang, c.entry.b_ang) for c in cands}
        if len(values) == 1:
            assert alt is None
        else:
            assert alt is not None and (alt.r0_ang, alt.b_ang) != (cands[0].r0_ang, cands[0].b_ang)
            assert alt == next(c for c in cands if (c.r0_ang, c.b_ang) != (cands[0].r0_ang, cands[0].b_ang))


def test_sensitivity_table(tmp_path):
    from data_prep.bv_sensitivity import COLUMNS, sensitivity_rows, write_table

    nis = nickeline_nis()
    nio = rocksalt(4.177, "Ni", "O")
    records = [("NiS", nis, [2, 2, -2, -2]), ("NiO", nio, [2] * 4 + [-2] * 4), ("NiO-2", nio)]
    rows, summary = sensitivity_rows(records)
    by_pair = {r["pair"]: r for r in rows}
    assert set(by_pair) == {"Ni+2-S-2", "Ni+2-O-2"}
    r = by_pair["Ni+2-S-2"]
    assert (r["used_ref"], r["alt_ref"], r["n_materials"], r["n_sites"]) == ("j", "b", 1, 2)
    assert 0.5 < r["max_abs_dbvs_vu"] < 0.7 and r["mean_abs_dbvs_vu"] == pytest.approx(r["max_abs_dbvs_vu"])
    assert r["max_abs_dbvs_anion_vu"] == pytest.approx(r["max_abs_dbvs_vu"], abs=1e-3)
    assert r["max_material"] == "NiS"
    assert by_pair["Ni+2-O-2"]["n_materials"] == 2 and by_pair["Ni+2-O-2"]["n_sites"] == 8
    assert summary["n_materials"] == 3 and summary["n_skipped"] == 0
    assert summary["max_abs_dbvs_vu"] == r["max_abs_dbvs_vu"]
    out = write_table(rows, tmp_path / "t.csv")
    lines = out.read_text().splitlines()
    assert lines[0].split(",") == list(COLUMNS)
    assert lines[1].startswith("Ni+2-S-2,")  # largest change first


# --- anions bonded to anions -------------------------------------------------------------------
def pyrite() -> Structure:
    """FeS2 (Pa-3, a = 5.417 A, S at x = 0.385): S2 dimers of 2.16 A."""
    return Structure.from_spacegroup("Pa-3", Lattice.cubic(5.417), ["Fe", "S"], [[0, 0, 0], [0.385] * 3])


def calcite() -> Structure:
    """CaCO3 (R-3c, a = 4.99, c = 17.06 A, O at x = 0.257): the O-O edge of a CO3 group, 2.22 A."""
    return Structure.from_spacegroup("R-3c", Lattice.hexagonal(4.99, 17.06), ["Ca", "C", "O"],
                                     [[0, 0, 0], [0, 0, 0.25], [0.257, 0, 0.25]])


def test_anion_dimers_are_found_and_legitimate_short_edges_are_not():
    s_ = pyrite()
    v = bv.assign_valences(s_)
    assert sorted(set(v)) == [-2, 4]  # BVAnalyzer's all-ionic answer: Fe4+ and S2-, not Fe2+ and (S2)2-
    c = bv.closest_anion_contact(s_, v)
    assert c is not None and c.distance_ang == pytest.approx(2.158, abs=0.005)
    r_s = 1.70  # pymatgen's ionic radius of S2-
    assert c.ratio == pytest.approx(c.distance_ang / (2 * r_s), rel=0.01) and "S2- at site" in c.text
    assert {s_[c.site_i].specie.symbol, s_[c.site_j].specie.symbol} == {"S"}
    # valences that admit the bond (S- of a disulfide) are not contradicted by it
    assert bv.closest_anion_contact(s_, [2 if x > 0 else -1 for x in v]) is None
    # the closest legitimate contacts: the O-O edge of a carbonate group (ratio 0.88), rock salt
    cal = calcite()
    assert bv.closest_anion_contact(cal, bv.assign_valences(cal)) is None
    assert bv.closest_anion_contact(cal, bv.assign_valences(cal), below_ratio=0.9).distance_ang == pytest.approx(
        2.22, abs=0.01)
    nacl = rocksalt(5.64, "Na", "Cl")
    assert bv.closest_anion_contact(nacl, bv.assign_valences(nacl)) is None
    # a crushed cell: Cl- against Cl- at 2.67 A (0.80 of 2 x 1.67 A) is caught just below the rule
    crushed = nacl.copy()
    crushed.scale_lattice(nacl.volume * 0.299)
    assert bv.closest_anion_contact(crushed, bv.assign_valences(nacl)) is not None
    assert bv.closest_anion_contact(s_, v, below_ratio=0) is None  # 0: no check
