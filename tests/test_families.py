"""Families: parents, prototype groups (fit_anonymous, union-find) and deterministic family ids."""
from __future__ import annotations

import random

import pytest
from pymatgen.core import Lattice, Structure

from data_prep.families import assign_families, family_statistics, prototype_groups


def rock_salt(a: str, b: str, lat: float) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(lat), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]])


def wurtzite(a: str, b: str, lat: float, c: float) -> Structure:
    return Structure.from_spacegroup("P6_3mc", Lattice.hexagonal(lat, c), [a, b],
                                     [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.382]])


def cscl(a: str, b: str, lat: float) -> Structure:
    return Structure.from_spacegroup("Pm-3m", Lattice.cubic(lat), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]])


@pytest.fixture(scope="module")
def items():
    kcl = rock_salt("Na", "Cl", 5.64)
    kcl.replace_species({"Na": "K"})
    return [
        ("min-NaCl", "mineral", None, rock_salt("Na", "Cl", 5.64)),
        ("xu-MgO", "xrayutilities", "xu-MgO", rock_salt("Mg", "O", 4.21)),  # own parent, given explicitly
        ("proto-ZnO", "prototype", None, wurtzite("Zn", "O", 3.25, 5.21)),
        ("ex-CsCl", "pymatgen-example", None, cscl("Cs", "Cl", 4.12)),
        ("sub-min-NaCl-KCl", "substituted", "min-NaCl", kcl),
        ("sub-proto-ZnO-CdS", "substituted", "proto-ZnO", wurtzite("Cd", "S", 4.14, 6.71)),
    ]


def test_rock_salts_share_a_family(items):
    fam = assign_families(items)
    assert fam["min-NaCl"].family_id == fam["xu-MgO"].family_id == "fam-min-NaCl"
    assert fam["min-NaCl"].prototype_group == fam["xu-MgO"].prototype_group == "pg-min-NaCl"
    assert fam["proto-ZnO"].family_id == "fam-proto-ZnO"
    assert fam["ex-CsCl"].family_id == "fam-ex-CsCl"  # CsCl type: not rock salt
    assert len({a.family_id for a in fam.values()}) == 3


def test_substituted_in_parent_family(items):
    fam = assign_families(items)
    assert fam["sub-min-NaCl-KCl"].parent_id == "min-NaCl"
    assert fam["sub-min-NaCl-KCl"].family_id == fam["min-NaCl"].family_id
    assert fam["sub-proto-ZnO-CdS"].family_id == fam["proto-ZnO"].family_id
    for mid in ("min-NaCl", "xu-MgO", "proto-ZnO", "ex-CsCl"):
        assert fam[mid].parent_id == mid  # a real structure is its own parent


def test_deterministic_and_order_independent(items):
    ref = assign_families(items)
    for seed in range(3):
        shuffled = list(items)
        random.Random(seed).shuffle(shuffled)
        assert assign_families(shuffled) == ref


def test_unknown_parent_and_errors(items):
    s = rock_salt("Na", "Cl", 5.64)
    fam = assign_families([("sub-x-NaBr", "substituted", "x", s)])
    assert fam["sub-x-NaBr"].family_id == "fam-x" and fam["sub-x-NaBr"].prototype_group == "pg-x"
    with pytest.raises(ValueError, match="parent_id"):
        assign_families([("sub-y", "substituted", None, s)])
    with pytest.raises(ValueError, match="duplicate"):
        assign_families([("a", "mineral", None, s), ("a", "mineral", None, s)])


def test_union_find_merges_transitively():
    """Groups are connected components: the smallest id names the group whatever the order."""
    parents = {f"p{i}": rock_salt(el, "O", 4.0 + 0.1 * i) for i, el in enumerate(["Mg", "Ca", "Sr", "Ni"])}
    parents["q"] = wurtzite("Zn", "O", 3.25, 5.21)
    groups = prototype_groups(parents)
    assert {groups[f"p{i}"] for i in range(4)} == {"pg-p0"}
    assert groups["q"] == "pg-q"


def test_family_statistics(items):
    stats = family_statistics(assign_families(items))
    assert stats["n_materials"] == 6 and stats["n_parents"] == 4 and stats["n_families"] == 3
    assert stats["largest_family_size"] == 3 and stats["largest_family"] == "fam-min-NaCl"
    assert stats["n_prototype_groups_merged"] == 1 and stats["n_parents_merged_by_prototype"] == 2


def spinel(a: str, b: str, x: str, lat: float) -> Structure:
    """Normal spinel AB2X4 (Fd-3m, origin choice 2 positions)."""
    return Structure.from_spacegroup("Fd-3m", Lattice.cubic(lat), [a, b, x],
                                     [[0.125, 0.125, 0.125], [0.5, 0.5, 0.5], [0.263, 0.263, 0.263]])


def test_relaxed_out_of_its_parent_framework_joins_the_family_it_now_matches(items):
    """A substituted cell that relaxed from its CsCl-type parent into rock salt is a rock salt:
    it may not sit on the other side of a split from the rock salts (the PBE records have such
    cases: BaO from massicot PbO, RbF from TlF-II, TiO2 from baddeleyite-type VO2 into rutile)."""
    moved = ("sub-ex-CsCl-RbCl", "substituted", "ex-CsCl", rock_salt("Rb", "Cl", 6.58))
    stayed = ("sub-ex-CsCl-TlBr", "substituted", "ex-CsCl", cscl("Tl", "Br", 3.98))
    fam = assign_families(items + [moved, stayed])
    assert fam["sub-ex-CsCl-RbCl"].displaced and not fam["sub-ex-CsCl-TlBr"].displaced
    assert fam["sub-ex-CsCl-RbCl"].parent_id == "ex-CsCl"
    assert fam["sub-ex-CsCl-RbCl"].prototype_group == "pg-ex-CsCl"  # its parent's, as before
    # the CsCl family and the rock-salt family are now one, and nothing else moved
    assert {fam[m].family_id for m in ("ex-CsCl", "sub-ex-CsCl-TlBr", "sub-ex-CsCl-RbCl", "min-NaCl",
                                       "xu-MgO", "sub-min-NaCl-KCl")} == {"fam-ex-CsCl"}
    assert fam["proto-ZnO"].family_id == fam["sub-proto-ZnO-CdS"].family_id == "fam-proto-ZnO"
    stats = family_statistics(fam)
    assert stats["n_families"] == 2 and stats["n_displaced"] == 1
    assert stats["n_families_holding_several_prototype_groups"] == 1
    # order-independent with displaced members too
    shuffled = items + [stayed, moved]
    random.Random(7).shuffle(shuffled)
    assert assign_families(shuffled) == fam


def test_partial_substitution_into_another_formula_type_joins_that_prototype():
    """Co3O4 (a spinel written as a binary, A3B4) -> Sc2CoO4 (AB2C4): no longer comparable with its
    parent, it matches the real ternary spinel MgAl2O4 of another family, which it then joins."""
    co3o4 = spinel("Co", "Co", "O", 8.08)
    items = [
        ("xu-Co3O4", "xrayutilities", None, co3o4),
        ("min-MgAl2O4", "mineral", None, spinel("Mg", "Al", "O", 8.08)),
        ("min-ZnO", "mineral", None, wurtzite("Zn", "O", 3.25, 5.21)),
        ("sub-xu-Co3O4-Sc2CoO4", "substituted", "xu-Co3O4", spinel("Co", "Sc", "O", 8.4)),
        ("sub-xu-Co3O4-NoStructure", "substituted", "xu-Co3O4", None),
    ]
    fam = assign_families(items)
    assert fam["xu-Co3O4"].family_id == fam["min-MgAl2O4"].family_id == "fam-min-MgAl2O4"
    assert fam["sub-xu-Co3O4-Sc2CoO4"].displaced and fam["sub-xu-Co3O4-Sc2CoO4"].family_id == "fam-min-MgAl2O4"
    # a derived item given without its structure keeps its parent's family and is not displaced
    assert not fam["sub-xu-Co3O4-NoStructure"].displaced
    assert fam["sub-xu-Co3O4-NoStructure"].family_id == fam["xu-Co3O4"].family_id
    assert fam["min-ZnO"].family_id == "fam-min-ZnO"
    # without the substituted spinel the two spinel parents stay apart (A3B4 vs AB2C4)
    alone = assign_families(items[:3])
    assert alone["xu-Co3O4"].family_id != alone["min-MgAl2O4"].family_id


def test_two_displaced_members_of_different_families_that_meet_are_merged():
    """Both relaxed into a prototype no real parent has (CsCl type here): compared with each other."""
    items = [
        ("p-a", "mineral", None, rock_salt("Na", "Cl", 5.64)),
        ("p-b", "mineral", None, wurtzite("Zn", "O", 3.25, 5.21)),
        ("sub-p-a-x", "substituted", "p-a", cscl("Cs", "Br", 4.3)),
        ("sub-p-b-y", "substituted", "p-b", cscl("Tl", "I", 4.2)),
    ]
    fam = assign_families(items)
    assert fam["sub-p-a-x"].displaced and fam["sub-p-b-y"].displaced
    assert len({a.family_id for a in fam.values()}) == 1


def test_unknown_parent_is_placed_by_the_structure_itself(items):
    """A parent whose record is missing (failed) says nothing: the derived rock salt is compared
    with the real parents and lands in the rock salts' family; with no match it stays alone."""
    orphan = ("sub-gone-NaBr", "substituted", "gone", rock_salt("Na", "Br", 5.97))
    fam = assign_families(items + [orphan])
    assert fam["sub-gone-NaBr"].displaced and fam["sub-gone-NaBr"].family_id == fam["min-NaCl"].family_id
    assert fam["sub-gone-NaBr"].prototype_group == "pg-gone"
    lonely = ("sub-gone-Cs", "substituted", "gone", Structure(Lattice.cubic(3.0), ["Cs"], [[0, 0, 0]]))
    assert assign_families(items + [lonely])["sub-gone-Cs"].family_id == "fam-gone"


def test_reducing_matcher_answers_as_structure_matcher_and_reduces_each_structure_once(monkeypatch):
    """The matcher of the families (and of the collection's deduplication) reduces each structure
    once and gives StructureMatcher's answers, also for a supercell with shuffled sites and a copy
    strained along one axis."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    from data_prep.families import ReducingMatcher

    nacl, mgo = rock_salt("Na", "Cl", 5.64), rock_salt("Mg", "O", 4.21)
    big = mgo.copy()
    big.make_supercell([2, 1, 1])
    big = Structure.from_sites([big[i] for i in random.Random(3).sample(range(len(big)), len(big))])
    strained = nacl.copy()
    strained.apply_strain([0.3, 0.0, 0.0])  # 30 % along a: StructureMatcher still matches it
    structures = [nacl, mgo, big, strained, wurtzite("Zn", "O", 3.25, 5.21), cscl("Cs", "Cl", 4.12)]
    plain, reducing = StructureMatcher(), ReducingMatcher()
    calls = []
    real = Structure.get_reduced_structure
    monkeypatch.setattr(Structure, "get_reduced_structure", lambda s, *a, **k: calls.append(1) or real(s, *a, **k))
    fits = set()
    for a in structures:
        for b in structures:
            assert reducing.fit(a, b) == plain.fit(a, b)
            assert reducing.fit_anonymous(a, b) == plain.fit_anonymous(a, b)
            fits.add((reducing.fit(a, b), reducing.fit_anonymous(a, b)))
    assert fits == {(True, True), (False, True), (False, False)}  # every kind of answer came up
    assert reducing.fit(mgo, big) and reducing.fit_anonymous(nacl, mgo) and not reducing.fit(nacl, mgo)
    # a fresh one over 36 pairs, each fitted twice, reduces as often as reducing each structure once
    calls.clear()
    for a in structures:
        a.get_reduced_structure(reduction_algo="niggli").get_primitive_structure()
    once = len(calls)
    calls.clear()
    fresh = ReducingMatcher()
    for a in structures:
        for b in structures:
            fresh.fit(a, b), fresh.fit_anonymous(a, b)
    assert len(calls) == once
