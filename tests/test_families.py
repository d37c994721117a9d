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
