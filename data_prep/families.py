"""Structure families: which materials must stay on the same side of a train/test split.

A material's *parent* is the real structure it was derived from: a real structure is its own
parent, a substituted one names its parent (``provenance["parent_id"]``). Two real parents share a
*prototype group* when pymatgen's ``StructureMatcher.fit_anonymous`` matches them (same structure
type up to a relabelling of the elements and a volume change, e.g. two rock-salt oxides); groups
are closed under that relation (union-find). A *family* is a prototype group together with every
material whose parent is in it.

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


def _matcher():
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher()  # default tolerances; primitive cells, volumes scaled


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
                try:
                    same = matcher.fit_anonymous(parents[a], parents[b])
                except Exception:  # an odd cell the matcher cannot reduce: no merge
                    same = False
                if same:
                    uf.union(a, b)
    return {mid: PROTOTYPE_GROUP_PREFIX + uf.find(mid) for mid in ids}


def assign_families(items: Iterable[tuple[str, str, str | None, Structure]], matcher=None
                    ) -> dict[str, FamilyAssignment]:
    """Family of every item ``(material_id, origin, parent_id, structure)``.

    The parent of an item is ``parent_id`` when given and different from the item itself, else the
    item (a real structure is its own parent; ``origin`` is only used to insist that a
    ``"substituted"`` item names its parent). Real parents that match by prototype
    (``prototype_groups``) are merged into one family; a parent id that is not among the items is
    a family of its own (grouped with nothing: its structure is unknown). Deterministic and
    independent of the order of ``items``; material ids must be unique.
    """
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
    out = {}
    for mid in ids:
        parent = parent_of[mid]
        group = groups.get(parent, PROTOTYPE_GROUP_PREFIX + parent)
        family = FAMILY_PREFIX + group[len(PROTOTYPE_GROUP_PREFIX):]
        out[mid] = FamilyAssignment(mid, parent, group, family)
    return out


def family_statistics(assignments: dict[str, FamilyAssignment]) -> dict:
    """Number of families, largest family size, parents merged by prototype, groups of > 1 parent."""
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
    }
