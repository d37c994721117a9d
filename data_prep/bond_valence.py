"""Bond valence targets: oxidation states, bond valence sums (BVS) and the global instability index.

Definitions (all distances in Angstrom, valences in valence units, v.u.)

- Bond valence of a cation-anion pair at distance R: ``s = exp((R0 - R) / b)`` with ``R0`` and ``b``
  from I. D. Brown's IUCr table ``bvparm2020.cif`` (shipped in ``data_prep/data``).
- ``bvs_vu`` of a site: the sum of ``s`` over every counter-ion (a site whose valence has the
  opposite sign) within ``cutoff_ang`` of it, periodic images included. **Sign convention:** the
  sum is given the sign of the site's valence, so cations have positive and anions negative BVS,
  and ``bvs_deviation_vu = bvs_vu - valence`` is the signed deviation in the same convention: a
  positive deviation means an over-bonded cation or an under-bonded anion (the anion's bond
  valences add up to less than its |valence|); ``|bvs| - |valence| = sign(valence) * deviation``.
  Like-charged pairs (cation-cation, anion-anion) contribute nothing.
- ``valence``: oxidation state from pymatgen's ``BVAnalyzer`` (signed, anions negative).
- ``gii_vu``: global instability index, ``sqrt(mean_i (bvs_i - valence_i)^2)`` over all sites of
  the cell (Salinas-Sanchez et al. 1992).

Parameter choice when the table has several entries (``BVParams.lookup``)
----------------------------------------------------------------------------
The table lists, for one pair of oxidation states, its entries "in decreasing order of
reliability" and flags some entries as 'unchecked' ("unreliable"); an oxidation state of 9 means
"not specified in the original paper (may apply to all oxidation states)". For a cation of
valence ``vc`` and an anion of valence ``va`` we take, in this order of tiers:

1. ``exact``: the first entry in file order for exactly (cation, vc, anion, va) that is *not*
   marked 'unchecked' (the table's most reliable value; 28 pairs list an 'unchecked' value first
   and a checked one after it, e.g. Pb2+-S, Cu+-O);
2. ``unspecified-valence``: the first not-'unchecked' entry for (cation, 9, anion, va) — e.g.
   Brese & O'Keeffe's element-pair values;
3. ``exact-unchecked``: the first 'unchecked' entry for (cation, vc, anion, va);
4. ``unspecified-valence-unchecked``: the first 'unchecked' entry for (cation, 9, anion, va).

Tiers 3-4 can be switched off (``allow_unchecked=False``). Every parameter used is returned with
its tier, reference id and the reference text, so nothing is chosen silently. When no tier
matches, ``MissingBVParameter`` is raised: the material is skipped and listed in the manifest
(there is no default ``R0``/``b``). The anion valence must always match exactly. Entries whose
second atom has a positive valence (cation-cation, carbonyl carbon) are never used, and the
table's ammonium pseudo-element ``NH`` is never matched by a real element.
"""
from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

TABLE_PATH: Path = Path(__file__).resolve().parent / "data" / "bvparm2020.cif"
TABLE_NAME: str = "bvparm2020"
UNSPECIFIED_VALENCE: int = 9  # the table's code for "oxidation state not specified"
DEFAULT_CUTOFF_ANG: float = 6.0

TIERS: tuple[str, ...] = ("exact", "unspecified-valence", "exact-unchecked",
                          "unspecified-valence-unchecked")

CITATIONS: str = (
    "Bond valence parameters: I. D. Brown, 'Accumulated table of bond valence parameters' "
    "(bvparm2020.cif, version 2020-11-25), International Union of Crystallography, "
    "https://www.iucr.org/resources/data/datasets/bond-valence-parameters; "
    "each parameter is cited by the table's reference id (e.g. a = Brown & Altermatt (1985) "
    "Acta Cryst. B41, 244-247; b = Brese & O'Keeffe (1991) Acta Cryst. B47, 192-197; "
    "bs = Gagne & Hawthorne (2015) Acta Cryst. B71, 561-578).\n"
    "Oxidation states: pymatgen BVAnalyzer (S. P. Ong et al. (2013) Comput. Mater. Sci. 68, "
    "314-319), using the bond valence parameters of M. O'Keeffe & N. E. Brese (1991) J. Am. Chem. "
    "Soc. 113, 3226-3229 and ICSD-derived oxidation-state statistics.\n"
    "Global instability index: A. Salinas-Sanchez, J. L. Garcia-Munoz, J. Rodriguez-Carvajal, "
    "R. Saez-Puche & J. L. Martinez (1992) J. Solid State Chem. 100, 201-211."
)


class BondValenceError(ValueError):
    """Base class of the bond valence pipeline's errors (each means: skip the material)."""


class MissingBVParameter(BondValenceError):
    """No bond valence parameter in the table for a cation-anion pair of oxidation states."""

    def __init__(self, cation: str, cation_valence: int, anion: str, anion_valence: int,
                 detail: str = ""):
        self.cation, self.cation_valence = cation, int(cation_valence)
        self.anion, self.anion_valence = anion, int(anion_valence)
        msg = (f"no bond valence parameter in {TABLE_NAME} for "
               f"{cation}{int(cation_valence):+d}-{anion}{int(anion_valence):+d}")
        super().__init__(msg + (f" ({detail})" if detail else ""))


class ValenceAssignmentError(BondValenceError):
    """Oxidation states could not be assigned (BVAnalyzer failed, disordered or non-ionic)."""


@dataclass(frozen=True)
class BVEntry:
    """One row of the table (``line`` is its 1-based line number in the CIF)."""

    cation: str
    cation_valence: int
    anion: str
    anion_valence: int
    r0_ang: float
    b_ang: float
    ref_id: str
    details: str
    line: int

    @property
    def unchecked(self) -> bool:
        return "unchecked" in self.details.lower()


@dataclass(frozen=True)
class BVChoice:
    """The parameter chosen for a pair of oxidation states, with how it was chosen."""

    cation: str
    cation_valence: int
    anion: str
    anion_valence: int
    entry: BVEntry
    tier: str
    reference: str

    @property
    def r0_ang(self) -> float:
        return self.entry.r0_ang

    @property
    def b_ang(self) -> float:
        return self.entry.b_ang

    def as_dict(self) -> dict:
        return {"cation": self.cation, "cation_valence": self.cation_valence,
                "anion": self.anion, "anion_valence": self.anion_valence,
                "r0_ang": self.entry.r0_ang, "b_ang": self.entry.b_ang,
                "ref_id": self.entry.ref_id, "reference": self.reference, "tier": self.tier,
                "table_valence": self.entry.cation_valence, "details": self.entry.details,
                "table_line": self.entry.line}


_REF_LINE = re.compile(r"^\s*([a-z]{1,3})\s+'(.*)'\s*$")


class BVParams:
    """Brown's bond valence parameter table, parsed from the CIF shipped with the package.

    Use ``BVParams.default()`` (parsed once per process) rather than the constructor.
    """

    def __init__(self, path: str | Path = TABLE_PATH, allow_unchecked: bool = True):
        self.path = Path(path)
        self.allow_unchecked = allow_unchecked
        raw = self.path.read_bytes()
        self.sha256 = hashlib.sha256(raw).hexdigest()
        text = raw.decode("ascii", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
        self.version, self.references, self.entries = self._parse(text)
        self._by_key: dict[tuple[str, int, str, int], list[BVEntry]] = {}
        for e in self.entries:
            self._by_key.setdefault((e.cation, e.cation_valence, e.anion, e.anion_valence), []).append(e)
        self._cache: dict[tuple, BVChoice] = {}

    @classmethod
    @functools.lru_cache(maxsize=4)
    def default(cls, allow_unchecked: bool = True) -> "BVParams":
        return cls(TABLE_PATH, allow_unchecked=allow_unchecked)

    # --- parsing ---------------------------------------------------------------------------
    @staticmethod
    def _parse(text: str):
        lines = text.split("\n")
        version = ""
        for line in lines:
            if line.startswith("data_"):
                version = line[len("data_"):].strip().rsplit("_", 1)[-1]
                break
        try:
            ref_start = next(i for i, l in enumerate(lines) if l.strip() == "_valence_ref_reference")
            par_start = next(i for i, l in enumerate(lines) if l.strip() == "_valence_param_details")
        except StopIteration as exc:
            raise ValueError("not a bond valence parameter table (loop headers missing)") from exc
        references: dict[str, str] = {}
        for line in lines[ref_start + 1:par_start]:
            m = _REF_LINE.match(line)
            if m:
                references[m.group(1)] = m.group(2).strip()
        entries: list[BVEntry] = []
        for i in range(par_start + 1, len(lines)):
            s = lines[i].strip()
            if not s or s.startswith("#"):
                continue
            tok = s.split(None, 7)
            if len(tok) < 7:
                raise ValueError(f"{TABLE_NAME} line {i + 1}: cannot parse {s!r}")
            details = tok[7].strip() if len(tok) > 7 else "?"
            if len(details) >= 2 and details[0] == details[-1] == "'":
                details = details[1:-1]
            entries.append(BVEntry(tok[0], int(tok[1]), tok[2], int(tok[3]), float(tok[4]),
                                   float(tok[5]), tok[6], details, i + 1))
        if not entries:
            raise ValueError(f"{TABLE_NAME}: no parameter rows found")
        return version, references, entries

    # --- look-up ---------------------------------------------------------------------------
    def choose(self, cation: str, cation_valence: int, anion: str, anion_valence: int) -> BVChoice:
        """The parameter for a cation-anion pair by the tier rule of the module docstring."""
        key = (cation, int(cation_valence), anion, int(anion_valence))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if key[1] <= 0 or key[3] >= 0:
            raise MissingBVParameter(*key, detail="the cation needs a positive and the anion a "
                                                  "negative valence")
        exact, generic = self._entries(key)
        for tier, found in self._tiers(key):
            if found:
                e = found[0]
                choice = BVChoice(*key, entry=e, tier=tier,
                                  reference=self.references.get(e.ref_id, e.ref_id))
                self._cache[key] = choice
                return choice
        detail = ""
        if not self.allow_unchecked and any(e.unchecked for e in exact + generic):
            detail = "only 'unchecked' entries exist and allow_unchecked is False"
        raise MissingBVParameter(*key, detail=detail)

    def candidates(self, cation: str, cation_valence: int, anion: str, anion_valence: int
                   ) -> list[BVChoice]:
        """Every entry usable for the pair, most preferred first: the tiers of the module
        docstring in order, file order within a tier (so ``candidates(...)[0]`` is ``choose``'s
        entry). Empty when there is none."""
        key = (cation, int(cation_valence), anion, int(anion_valence))
        if key[1] <= 0 or key[3] >= 0:
            return []
        return [BVChoice(*key, entry=e, tier=tier, reference=self.references.get(e.ref_id, e.ref_id))
                for tier, found in self._tiers(key) for e in found]

    def _entries(self, key) -> tuple[list, list]:
        """(entries for the exact valences, entries with an unspecified cation valence) of ``key``."""
        cation, _, anion, anion_valence = key
        return self._by_key.get(key, []), self._by_key.get((cation, UNSPECIFIED_VALENCE, anion, anion_valence), [])

    def _tiers(self, key) -> list[tuple[str, list]]:
        """[(tier, entries), ...] in order of preference (the module docstring's tiers)."""
        exact, generic = self._entries(key)
        tiers = [("exact", [e for e in exact if not e.unchecked]),
                 ("unspecified-valence", [e for e in generic if not e.unchecked])]
        if self.allow_unchecked:
            tiers += [("exact-unchecked", [e for e in exact if e.unchecked]),
                      ("unspecified-valence-unchecked", [e for e in generic if e.unchecked])]
        return tiers

    def alternative(self, cation: str, cation_valence: int, anion: str, anion_valence: int
                    ) -> BVChoice | None:
        """The next-preferred entry after ``choose``'s with different ``(R0, b)``, or None.

        Entries repeating the chosen values (the same numbers from another reference) are passed
        over: they would move no bond valence sum. Raises ``MissingBVParameter`` like ``choose``.
        """
        chosen = self.choose(cation, cation_valence, anion, anion_valence)
        for c in self.candidates(cation, cation_valence, anion, anion_valence):
            if (c.entry.r0_ang, c.entry.b_ang) != (chosen.entry.r0_ang, chosen.entry.b_ang):
                return c
        return None

    def lookup(self, cation: str, cation_valence: int, anion: str, anion_valence: int
               ) -> tuple[float, float, str]:
        """``(r0_ang, b_ang, ref_id)`` for a cation-anion pair; raises ``MissingBVParameter``."""
        c = self.choose(cation, cation_valence, anion, anion_valence)
        return c.r0_ang, c.b_ang, c.entry.ref_id

    def __len__(self) -> int:
        return len(self.entries)

    def describe(self) -> dict:
        """Provenance for file attributes."""
        return {"table": TABLE_NAME, "version": self.version, "file": self.path.name,
                "sha256": self.sha256, "n_entries": len(self.entries),
                "allow_unchecked": self.allow_unchecked, "tiers": list(TIERS)}


def lookup(cation: str, cation_valence: int, anion: str, anion_valence: int
           ) -> tuple[float, float, str]:
    """``(r0_ang, b_ang, ref_id)`` from the default table (see ``BVParams.choose`` for the rule)."""
    return BVParams.default().lookup(cation, cation_valence, anion, anion_valence)


# --- oxidation states -----------------------------------------------------------------------
def _bare(structure: Structure) -> Structure:
    """Same lattice and sites, elements only (no oxidation states, no site properties)."""
    return Structure(structure.lattice, [site.specie.symbol for site in structure],
                     structure.frac_coords, coords_are_cartesian=False)


def assign_valences(structure: Structure) -> list[int]:
    """Signed oxidation state of each site from pymatgen's ``BVAnalyzer`` (anions negative)."""
    from pymatgen.analysis.bond_valence import BVAnalyzer

    if not structure.is_ordered:
        raise ValenceAssignmentError("structure is disordered: BVAnalyzer needs an ordered structure")
    try:
        valences = BVAnalyzer().get_valences(_bare(structure))
    except Exception as exc:  # ValueError as a rule, other errors on odd cells
        raise ValenceAssignmentError(
            f"BVAnalyzer could not assign oxidation states to {structure.composition.reduced_formula}: "
            f"{type(exc).__name__}: {exc}") from exc
    out = [int(v) for v in valences]
    if len(out) != len(structure) or any(o != v for o, v in zip(out, valences)):
        raise ValenceAssignmentError(
            f"BVAnalyzer returned non-integer valences for {structure.composition.reduced_formula}")
    return out


# --- bond valence sums ----------------------------------------------------------------------
def _bvs(structure: Structure, valences, cutoff_ang: float, table: BVParams | None, chooser=None
         ) -> tuple[np.ndarray, list[BVChoice]]:
    """BVS and the parameters used; ``chooser(cation, vc, anion, va) -> BVChoice`` replaces
    ``table.choose`` (e.g. to use alternative entries)."""
    table = table if table is not None else BVParams.default()
    chooser = chooser if chooser is not None else table.choose
    v = np.asarray(valences, dtype=int)
    n = len(structure)
    if v.shape != (n,):
        raise ValueError(f"need one valence per site ({n}), got shape {v.shape}")
    if np.any(v == 0):
        bad = sorted({structure[i].specie.symbol for i in np.flatnonzero(v == 0)})
        raise ValenceAssignmentError(
            f"valence 0 assigned to {bad}: a bond valence sum needs cations and anions")
    if not cutoff_ang > 0:
        raise ValueError(f"cutoff_ang must be positive, got {cutoff_ang}")
    symbols = np.array([site.specie.symbol for site in structure])
    centre, other, _, dist = structure.get_neighbor_list(r=float(cutoff_ang))
    keep = v[centre] * v[other] < 0
    centre, other, dist = centre[keep], other[keep], dist[keep]
    # orient every pair as (cation, anion) to look the parameters up
    cat = np.where(v[centre] > 0, centre, other)
    an = np.where(v[centre] > 0, other, centre)
    r0 = np.empty(dist.shape)
    b = np.empty(dist.shape)
    # sites sharing (element, valence) share parameters: look up per kind, not per pair
    kinds = {}
    kind_id = np.empty(n, dtype=int)
    for i in range(n):
        kind_id[i] = kinds.setdefault((symbols[i], int(v[i])), len(kinds))
    pair_code = kind_id[cat] * len(kinds) + kind_id[an]
    inverse_kind = {k_id: k for k, k_id in kinds.items()}
    choices = []
    for code in np.unique(pair_code):
        (cs, cv), (as_, av) = inverse_kind[code // len(kinds)], inverse_kind[code % len(kinds)]
        choice = chooser(cs, cv, as_, av)
        choices.append(choice)
        sel = pair_code == code
        r0[sel], b[sel] = choice.r0_ang, choice.b_ang
    s = np.exp((r0 - dist) / b)
    bvs = np.bincount(centre, weights=s, minlength=n) * np.sign(v)
    return bvs, choices


def bond_valence_sums(structure: Structure, valences, cutoff_ang: float = DEFAULT_CUTOFF_ANG,
                      table: BVParams | None = None) -> np.ndarray:
    """(n_sites,) signed BVS in v.u. (sign of the site's valence; see the module docstring).

    Raises ``MissingBVParameter`` when a cation-anion pair within the cutoff has no parameter.
    """
    return _bvs(structure, valences, cutoff_ang, table)[0]


def global_instability_index(bvs, valences) -> float:
    """``sqrt(mean((bvs - valence)^2))`` over the given sites (v.u.)."""
    d = np.asarray(bvs, dtype=float) - np.asarray(valences, dtype=float)
    if d.size == 0:
        raise ValueError("no sites")
    return float(np.sqrt(np.mean(d * d)))


# Two anions that both carry their full valence closer than this fraction of the sum of their
# ionic radii are bonded to each other (an S2 dimer, a Te chain) or sit in a wrong structure: the
# all-ionic valences misdescribe the material (pyrite: S2- everywhere and Fe4+, where the
# chemistry is Fe2+ and (S2)2-). Measured on the embedded real structures (2026-12-07): S-S dimers
# 0.63-0.65, Te chains 0.68-0.76, coesite's entry with an O-O contact of 1.97 A 0.78 (unrelaxed
# substitutions up to 0.80); the closest legitimate contacts are the O-O edges of nitrite and
# carbonate groups (0.85-0.90).
MIN_ANION_CONTACT_RATIO: float = 0.8


@dataclass(frozen=True)
class AnionContact:
    """The closest contact between two full-valence anions, relative to their ionic radii."""

    ratio: float  # distance / (r_i + r_j)
    distance_ang: float
    site_i: int
    site_j: int
    text: str  # e.g. "S2- at site 4 and S2- at site 7, 2.16 A"


def closest_anion_contact(structure: Structure, valences, below_ratio: float = MIN_ANION_CONTACT_RATIO
                          ) -> AnionContact | None:
    """The closest pair of anions that both carry their element's most negative common oxidation
    state (O2-, S2-, N3-, F-, ...; an S- of a disulfide already admits the bond and is not
    counted) at less than ``below_ratio`` times the sum of their ionic radii (pymatgen's
    ``Species.ionic_radius``: O2- 1.26 A, S2- 1.70 A), periodic images included; None if there is
    none (or a radius is unknown)."""
    import warnings

    from pymatgen.core import Element, Species

    v = [int(round(x)) for x in valences]
    radius = {}
    for i, site in enumerate(structure):
        el = site.specie.symbol
        if v[i] < 0 and v[i] == min(Element(el).common_oxidation_states, default=0):
            with warnings.catch_warnings():  # pymatgen warns where it falls back on another radius table
                warnings.simplefilter("ignore")
                r = Species(el, v[i]).ionic_radius
            if r:
                radius[i] = float(r)
    if len(radius) < 1 or below_ratio <= 0:
        return None
    best = None
    reach = below_ratio * 2 * max(radius.values())
    for i in radius:
        for n in structure.get_neighbors(structure[i], reach):
            j = n.index
            if j not in radius:
                continue
            ratio = n.nn_distance / (radius[i] + radius[j])
            if ratio < below_ratio and (best is None or ratio < best.ratio):
                ion = [f"{structure[k].specie.symbol}{'' if v[k] == -1 else -v[k]}- at site {k}" for k in (i, j)]
                other = "its periodic image" if i == j else ion[1]  # a chain along a short lattice vector
                best = AnionContact(float(ratio), float(n.nn_distance), i, int(j),
                                    f"{ion[0]} and {other}, {n.nn_distance:.2f} A")
    return best


def compute_targets(structure: Structure, cutoff_ang: float = DEFAULT_CUTOFF_ANG,
                    valences=None, table: BVParams | None = None) -> dict:
    """All bond valence targets of one material.

    Returns ``bvs_vu``, ``valence``, ``bvs_deviation_vu`` (each (n_sites,) float64, over all
    sites of the cell), ``gii_vu`` (float), ``params`` (one dict per cation-anion pair kind used:
    R0, b, reference id and text, tier), ``cutoff_ang`` and ``table`` (provenance).
    ``valences`` defaults to ``assign_valences(structure)``.
    Raises ``ValenceAssignmentError`` or ``MissingBVParameter`` (skip the material).
    """
    table = table if table is not None else BVParams.default()
    if valences is None:
        valences = assign_valences(structure)
    v = np.asarray(valences, dtype=float)
    bvs, choices = _bvs(structure, valences, cutoff_ang, table)
    return {
        "bvs_vu": bvs,
        "valence": v,
        "bvs_deviation_vu": bvs - v,
        "gii_vu": global_instability_index(bvs, v),
        "params": [c.as_dict() for c in choices],
        "cutoff_ang": float(cutoff_ang),
        "table": table.describe(),
    }


# --- parameter choice: which entry, and how much the next one would move the sums -----------
def pair_kinds(structure: Structure, valences) -> list[tuple[str, int, str, int]]:
    """Sorted (cation, vc, anion, va) kinds of the structure (every cation kind with every anion kind)."""
    ions = {(site.specie.symbol, int(v)) for site, v in zip(structure, valences)}
    cats = sorted(i for i in ions if i[1] > 0)
    ans = sorted(i for i in ions if i[1] < 0)
    return [(c, cv, a, av) for c, cv in cats for a, av in ans]


def _choice_dict(c: BVChoice | None) -> dict | None:
    if c is None:
        return None
    return {"r0_ang": c.entry.r0_ang, "b_ang": c.entry.b_ang, "ref_id": c.entry.ref_id,
            "reference": c.reference, "tier": c.tier, "table_valence": c.entry.cation_valence,
            "details": c.entry.details, "table_line": c.entry.line}


def pair_parameters(structure: Structure, valences, table: BVParams | None = None) -> list[dict]:
    """For every cation-anion pair kind of the structure (with oxidation states): the entry used
    (``used``: R0, b, reference id and text, tier, table line) and the ``alternative`` entry
    (``BVParams.alternative``; None when the table has no other values for the pair).

    Raises ``MissingBVParameter`` when a pair has no entry at all.
    """
    table = table if table is not None else BVParams.default()
    out = []
    for cat, vc, an, va in pair_kinds(structure, valences):
        used = table.choose(cat, vc, an, va)
        out.append({"pair": f"{cat}{vc:+d}-{an}{va:+d}", "cation": cat, "cation_valence": vc,
                    "anion": an, "anion_valence": va, "used": _choice_dict(used),
                    "alternative": _choice_dict(table.alternative(cat, vc, an, va))})
    return out


def bond_valence_sums_alternative(structure: Structure, valences, cutoff_ang: float = DEFAULT_CUTOFF_ANG,
                                  table: BVParams | None = None, pairs=None) -> np.ndarray:
    """(n_sites,) signed BVS with the alternative entry (``BVParams.alternative``) of every pair
    kind in ``pairs`` (``(cation, vc, anion, va)`` tuples; None: all pairs); other pairs, and
    pairs without an alternative, keep the entry ``bond_valence_sums`` uses.
    ``bond_valence_sums_alternative(...) - bond_valence_sums(...)`` is the sensitivity of the sums
    to the choice among bvparm2020's entries.
    """
    table = table if table is not None else BVParams.default()
    switch = None if pairs is None else {(c, int(vc), a, int(va)) for c, vc, a, va in pairs}

    def chooser(cat, vc, an, va):
        if switch is None or (cat, int(vc), an, int(va)) in switch:
            alt = table.alternative(cat, vc, an, va)
            if alt is not None:
                return alt
        return table.choose(cat, vc, an, va)

    return _bvs(structure, valences, cutoff_ang, table, chooser)[0]
