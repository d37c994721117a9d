"""Structure families: which materials must stay on the same side of a train/test split.

A material's *parent* is the real structure it was derived from: a real structure is its own
parent, a substituted one names its parent (``provenance["parent_id"]``). Two real parents share a
*prototype group* when pymatgen's ``StructureMatcher.fit_anonymous`` matches them (same structure
type up to a relabelling of the elements and a volume change, e.g. two rock-salt oxides); groups
are closed under that relation (union-find). A *family* is a prototype group together with every
material whose parent is in it, merged with every other family whose prototype a member's own
structure matches.

That last rule matters for relaxed substituted structures: a relaxation can carry a substituted
cell out of its parent's framework into another real family's (on the PBE records: BaO made from
massicot PbO and RbF from TlF-II relaxed into rock salt, the family of the real BaO; TiO2 made from
baddeleyite-type VO2 into rutile, the family of real rutile), and a partial substitution can turn a
binary parent into a ternary of another family's type (Sc2CoO4 from the Co3O4 spinel: the
MgAl2O4 spinel family). Such a material is *displaced*: its own structure does not match its
parent's (``fit_anonymous``, which needs the same anonymised formula), or its parent is not among
the items (a parent whose record failed: nothing says where its derived structures belong). It is
compared with every real parent and every earlier displaced material of its anonymised formula,
and each match merges the two families. A substituted material given without a structure keeps
its parent's family.

``assign_families`` is a pure function of its input: it sorts what it gets, so the result does not
depend on the order of the items, and the ids are names of members (``fam-<smallest parent id of
the family>``, ``proto-group`` likewise ``pg-<smallest parent id>``).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

from pymatgen.core import Structure

FAMILY_PREFIX = "fam-"
PROTOTYPE_GROUP_PREFIX = "pg-"


@dataclass(frozen=True)
class FamilyAssignment:
    """Family of one material: its parent, the parent's prototype group and the family id."""

    material_id: str
    parent_id: str
    prototype_group: str
    family_id: str
    displaced: bool = False  # its structure does not match its parent's, or the parent is unknown (above)


class _UnionFind:
    def __init__(self, keys: Iterable[str]):
        self.up = {k: k for k in keys}

    def find(self, k: str) -> str:
        root = k
        while self.up[root] != root:
            root = self.up[root]
        while self.up[k] != root:  # path compression
            self.up[k], k = root, self.up[k]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # the smaller id becomes the root: roots are then the smallest member of their set
            lo, hi = sorted((ra, rb))
            self.up[hi] = lo


class ReducingMatcher:
    """pymatgen's ``StructureMatcher`` (default tolerances: primitive cells, volumes scaled) that
    reduces every structure once (Niggli, then primitive: what ``fit``/``fit_anonymous`` do before
    each comparison) and compares the reduced cells with ``skip_structure_reduction=True``.

    The same answers as the matcher itself: pymatgen caches its reductions too, but a cache hit
    confirms equality site by site with tolerances (O(sites^2)), which was 40 % of the family
    assignment of a build (a structure meets every other member of its bucket). Keyed by object
    identity, so the structures must not be modified while the matcher is in use.
    """

    def __init__(self):
        from pymatgen.analysis.structure_matcher import StructureMatcher

        self.matcher = StructureMatcher()
        self._reduced: dict[int, tuple[Structure, Structure]] = {}

    def reduced(self, structure: Structure) -> Structure:
        hit = self._reduced.get(id(structure))
        if hit is None or hit[0] is not structure:  # the pair keeps the object alive: ids stay unique
            red = structure.get_reduced_structure(reduction_algo="niggli").get_primitive_structure()
            hit = self._reduced[id(structure)] = (structure, red)
        return hit[1]

    def fit(self, a: Structure, b: Structure) -> bool:
        return bool(self.matcher.fit(self.reduced(a), self.reduced(b), skip_structure_reduction=True))

    def fit_anonymous(self, a: Structure, b: Structure) -> bool:
        return bool(self.matcher.fit_anonymous(self.reduced(a), self.reduced(b), skip_structure_reduction=True))


def _matcher():
    return ReducingMatcher()


def _bucket_key(structure: Structure) -> tuple:
    """Invariant of ``fit_anonymous``: the anonymised reduced formula (a match needs the same one)."""
    return (structure.composition.anonymized_formula,)


def prototype_groups(parents: dict[str, Structure], matcher=None) -> dict[str, str]:
    """Prototype group id of every parent (``pg-<smallest id of the group>``).

    Parents are compared pairwise within buckets of equal anonymised formula, in sorted order, and
    merged when ``matcher.fit_anonymous`` matches them (union-find, so the groups are the connected
    components of the match relation).
    """
    matcher = matcher or _matcher()
    ids = sorted(parents)
    uf = _UnionFind(ids)
    buckets: dict[tuple, list[str]] = defaultdict(list)
    for mid in ids:
        buckets[_bucket_key(parents[mid])].append(mid)
    for key in sorted(buckets):
        members = buckets[key]
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                if uf.find(a) == uf.find(b):
                    continue
                if _matches(matcher, parents[a], parents[b]):
                    uf.union(a, b)
    return {mid: PROTOTYPE_GROUP_PREFIX + uf.find(mid) for mid in ids}


def assign_families(items: Iterable[tuple[str, str, str | None, Structure | None]], matcher=None
                    ) -> dict[str, FamilyAssignment]:
    """Family of every item ``(material_id, origin, parent_id, structure)``.

    The parent of an item is ``parent_id`` when given and different from the item itself, else the
    item (a real structure is its own parent; ``origin`` is only used to insist that a
    ``"substituted"`` item names its parent). Real parents that match by prototype
    (``prototype_groups``) are merged into one family; a derived item whose own ``structure`` does
    not match its parent's is compared with the real parents and earlier displaced items of its
    anonymised formula and merges the families it matches (module docstring); a parent id that is
    not among the items is a family of its own unless such a match merges it. Deterministic and
    independent of the order of ``items``; material ids must be unique.
    """
    matcher = matcher or _matcher()
    items = sorted(items, key=lambda t: t[0])
    ids = [t[0] for t in items]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"duplicate material ids: {dup[:5]}")
    parent_of: dict[str, str] = {}
    roots: dict[str, Structure] = {}
    for mid, origin, parent_id, structure in items:
        if origin == "substituted" and not parent_id:
            raise ValueError(f"{mid}: a substituted item needs its parent_id")
        parent = parent_id if parent_id else mid
        parent_of[mid] = parent
        if parent == mid:
            roots[mid] = structure
    groups = prototype_groups(roots, matcher)
    group_of = {mid: groups.get(parent_of[mid], PROTOTYPE_GROUP_PREFIX + parent_of[mid]) for mid in ids}
    families = _UnionFind(sorted(set(group_of.values())))
    displaced = _merge_displaced(items, parent_of, roots, group_of, families, matcher)
    out = {}
    for mid in ids:
        family = FAMILY_PREFIX + families.find(group_of[mid])[len(PROTOTYPE_GROUP_PREFIX):]
        out[mid] = FamilyAssignment(mid, parent_of[mid], group_of[mid], family, mid in displaced)
    return out


def _matches(matcher, a: Structure, b: Structure) -> bool:
    if _bucket_key(a) != _bucket_key(b):
        return False
    try:
        return bool(matcher.fit_anonymous(a, b))
    except Exception:  # an odd cell the matcher cannot reduce: no match
        return False


def _merge_displaced(items, parent_of, roots, group_of, families: _UnionFind, matcher) -> set[str]:
    """Merge the family of every displaced derived item with the families it matches; returns the
    displaced ids. Items are visited in sorted order, so the result is order-independent."""
    roots_by_bucket: dict[tuple, list[str]] = defaultdict(list)
    for mid in sorted(roots):
        if roots[mid] is not None:
            roots_by_bucket[_bucket_key(roots[mid])].append(mid)
    displaced_by_bucket: dict[tuple, list[tuple[str, Structure]]] = defaultdict(list)
    displaced: set[str] = set()
    for mid, _, _, structure in items:
        parent = parent_of[mid]
        if parent == mid or structure is None:
            continue
        parent_structure = roots.get(parent)
        if parent_structure is not None and _matches(matcher, structure, parent_structure):
            continue
        displaced.add(mid)
        key = _bucket_key(structure)
        for other in roots_by_bucket[key]:
            if families.find(group_of[other]) != families.find(group_of[mid]) \
                    and _matches(matcher, structure, roots[other]):
                families.union(group_of[mid], group_of[other])
        for other, other_structure in displaced_by_bucket[key]:
            if families.find(group_of[other]) != families.find(group_of[mid]) \
                    and _matches(matcher, structure, other_structure):
                families.union(group_of[mid], group_of[other])
        displaced_by_bucket[key].append((mid, structure))
    return displaced


def family_statistics(assignments: dict[str, FamilyAssignment]) -> dict:
    """Number of families, largest family size, parents merged by prototype, groups of > 1 parent,
    displaced materials and the families they merged (more than one prototype group)."""
    fam_size: dict[str, int] = defaultdict(int)
    group_parents: dict[str, set] = defaultdict(set)
    for a in assignments.values():
        fam_size[a.family_id] += 1
        group_parents[a.prototype_group].add(a.parent_id)
    multi = {g: p for g, p in group_parents.items() if len(p) > 1}
    largest = max(fam_size.items(), key=lambda kv: (kv[1], kv[0])) if fam_size else (None, 0)
    return {
        "n_materials": len(assignments),
        "n_parents": len({a.parent_id for a in assignments.values()}),
        "n_families": len(fam_size),
        "largest_family": largest[0],
        "largest_family_size": int(largest[1]),
        "n_prototype_groups_merged": len(multi),
        "n_parents_merged_by_prototype": int(sum(len(p) for p in multi.values())),
        "largest_prototype_group_parents": max((len(p) for p in group_parents.values()), default=0),
        "n_displaced": sum(a.displaced for a in assignments.values()),
        "n_families_holding_several_prototype_groups": sum(
            len({a.prototype_group for a in assignments.values() if a.family_id == f}) > 1 for f in fam_size),
    }
