"""Structures of the embedded dataset (collected offline from installed registry packages).

Sources, in order of preference when two of them hold the same structure (raw entries -> kept
real structures with the defaults, ``max_sites=64``; before issue 13 only the first three were
read and they kept 70 + 23 + 10 = 103):

1. ``mineral``: emmet-core's robocrys mineral database (``condense/mineral_db.json.gz``): 180 -> 62
   (63 less anatase, whose geometry is wrong: ``BAD_SOURCE_ENTRIES``);
2. ``prototype``: pymatgen's AFLOW prototype library (``pymatgen.analysis.prototypes``): 288 -> 18;
3. ``pymatgen-example``: the example structures pymatgen ships in ``pymatgen/util/structures``: 21 -> 10;
4. ``ase-cod``: the Crystallography Open Database minerals in ase's test data: 8 -> 2;
5. ``dans-diffraction``: Dans_Diffraction's example structures: 32 -> 7;
6. ``crystals``: the built-in CIF database of ``crystals`` (plus its test CIFs): 90 -> 3;
7. ``xrayutilities``: xrayutilities' predefined materials (built from their space-group lattices): 80 -> 19;
8. ``pyxtal``: the CIFs of pyxtal's database (inorganic, JARVIS-DFT and molecular crystals): 77 -> 26;
9. ``cif2cell``: cif2cell's sample CIFs: 101 -> 1 (sources 1-9 keep 148);
10. ``ncrystal``: the crystals of NCrystal's standard data library (``ncrystal-core``, Apache-2.0;
    110 of its 134 materials have a unit cell, the rest are amorphous, liquid or gas): 110 -> 35
    (18 duplicates of earlier sources, e.g. NaCl, MgO, corundum; 10 of the 35 are rock salts such
    as LiF, KBr and PbS). Each NCMAT file cites what its structure was converted from (the first
    address is kept as ``structure_reference``): a published structure (COD or AMCSD entry, or the
    paper's DOI), except KOH and Y2SiO5, converted from Materials Project entries (DFT cells) of
    compounds with COD entries;

in all 183 real structures; then

11. ``substituted``: hypothetical, unrelaxed analogues of the kept real structures, made with
    pymatgen's data-mined ionic substitution probabilities (Hautier et al., Inorg. Chem. 50, 656
    (2011)), restricted to substitutions that keep every ion's oxidation state (so the result is
    charge neutral), and rescaled with pymatgen's ``DLSVolumePredictor``; at most
    ``MAX_SUBSTITUTIONS_PER_PARENT`` per real parent.

Sources 4-10 come from their installed packages (the ``structures`` extra, pinned;
``PACKAGE_SOURCES``): CIF files are read from the package's files without importing it,
xrayutilities' materials by importing its ``predefined_materials``, NCrystal's NCMAT texts through
its API (its data library is compiled into ``libNCrystal``; ``ncmat_structure`` parses them);
nothing is downloaded. Sources are appended in order: adding one never changes the ids of the
earlier ones (records already computed are keyed by id; the ids of sources 1-3 are checked against
main's list in the tests). It does change the substituted set: the 1000 are shared among more
parents (adding NCrystal's 35 replaced 186 of the 1000 by analogues of the new parents, 164, or
of old parents, 22; 11 of the replaced ones had become duplicates of new real structures, e.g.
NaI from NaCl) and it can merge families (CsCl joined TlBr's, LiNbO3 calcite's).

Every kept structure

- is ordered and has at most ``max_sites`` sites in its primitive standard cell
  (``SpacegroupAnalyzer``; real structures are stored in that cell, substituted ones keep their
  parent's);
- contains only elements GPAW has a PAW setup for (Z <= 83, Bi, except Tc: no Po, At, Fr, Ra, Ac
  and beyond) and no lanthanoid or actinoid (f states are not a channel); substitutions also
  never introduce H or noble gases;
- is a compound of at least two elements and not a molecular organic crystal (no C-H bond);
- is assigned oxidation states by pymatgen's ``BVAnalyzer``, its anions are among those bond
  valence theory is made for (``ANION_ELEMENTS``: O, F, Cl, Br, I, S, Se, Te, N; carbides,
  pnictides such as NiAs or TiAs, silicides and hydrides are dropped: their formal valences,
  e.g. Si4+/C4- in SiC, have no bond valence meaning), and every cation-anion pair has a bond
  valence parameter in bvparm2020 (so its bond valence sums are computable later); for a
  substituted structure the valences must equal the substituted ions' states;
- has a geometry pymatgen's DLS volume predictor accepts: the volume change it asks for lies in its
  own guard range [0.5, 1.5] (this drops a few defective source entries, e.g. a GeS2 with an S-S
  contact of 1.28 A, and substituted cells DLS would have to clamp);
- duplicates no structure kept before it (``StructureMatcher``, grouped by reduced formula).

Why candidates are dropped (``collect_structures(stats=...)["skipped"]``, defaults): most real
candidates are elements (35 minerals, 39 prototypes, 200 package entries: dropped before
``BVAnalyzer``, see ``not_ionic_reason``), intermetallics (``BVAnalyzer`` assigns no valences: 39
minerals, 94 prototypes), duplicates of an earlier source (68 prototypes), f-block elements, or
anions outside ``ANION_ELEMENTS`` (15 minerals, 28 prototypes); 10 are molecular organic crystals.

Substituted structures are picked deterministically: every parent's substitutions are ranked by
probability; the parents (order shuffled once with ``seed``) take turns, each contributing its next
acceptable candidate, until ``n_substituted`` are kept or every parent has given its maximum. Ids:
``min-<formula>-<mineral>``, ``proto-<formula>-<aflow label>``, ``ex-<file stem>``,
``<package prefix>-<formula>-<file stem or name>`` (``PackageSource.prefix``: ase, dans, crystals,
xu, pyxtal, cif2cell, ncrystal), ``sub-<parent id>-<formula>`` (a numeric suffix resolves the rare clash).

Every entry's provenance has ``parent_id`` (a real structure is its own parent),
``prototype_group`` and ``family_id`` (``data_prep.families``: real parents that match by
prototype, ``StructureMatcher.fit_anonymous``, share a family with all their substituted analogues).
With the defaults (183 real + 993 substituted: the 7 of anatase dropped): 122 families; 84 real parents fall into 23
prototype groups of more than one parent; the largest family is the rock-salt group (22 real
parents, 82 materials), then rutile (7 real parents, 48 materials) and perovskite (40). (With
sources 1-9 only: 111 families, 54 parents in 16 groups, rock salt 12 parents and 71 materials.)

Stored structures carry plain elements (no oxidation states); the ``BVAnalyzer`` valences of the
sites are kept in ``provenance["bv_valences"]``.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import random
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from pymatgen.core import Element, Species, Structure

from data_prep.records import atomic_write_bytes


@dataclass
class StructureEntry:
    """One structure to compute: id (file-name safe), formula, origin (see records.ORIGINS)."""

    material_id: str
    formula: str
    origin: str
    structure: Structure
    provenance: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# constants and small helpers
# --------------------------------------------------------------------------------------------

#: Highest atomic number with a GPAW PAW setup (Bi); the PBE engine (``pbe``) needs one per element.
MAX_Z = 83
#: Elements up to ``MAX_Z`` for which GPAW has no PAW setup.
NO_GPAW_SETUP = frozenset({"Tc"})
#: Anions bond valence theory is made for (bvparm2020's bulk of parameters, Brown's "ionic"
#: compounds): a structure whose ``BVAnalyzer`` anions include any other element (C, Si, B, P, As,
#: Sb, H, ...) is a carbide, pnictide, hydride or intermetallic-like compound in which the formal
#: valences (e.g. Ni3+/As3- in NiAs, Si4+/C4- in SiC) have no bond valence meaning.
ANION_ELEMENTS = frozenset({"O", "F", "Cl", "Br", "I", "S", "Se", "Te", "N"})
#: Probability threshold of the substitution model (pymatgen's default for its predictors).
SUBSTITUTION_THRESHOLD = 1e-3
#: At most this many substituted analogues per real parent (families stay small; see
#: ``_collect_substituted``): the smallest cap that still reached the default 1000 from sources
#: 1-9 (146 parents had candidates; a cap of 8 left 961). With NCrystal's parents (181 with
#: candidates) the 1000 are reached in the eighth round (a cap of 7 would leave 995); kept at 9 so
#: that the substituted set does not change for that alone.
MAX_SUBSTITUTIONS_PER_PARENT = 9

#: real source entries whose geometry is wrong, with the evidence; they and their substitutions are
#: dropped (``drop_bad_sources``) after the collection is drawn, so no other entry changes
BAD_SOURCE_ENTRIES = {
    "min-TiO2-anatase": "source geometry wrong: O at z = 0.333 instead of anatase's 0.291 (cif2cell's "
                        "anatase.cif; the same setting), which leaves Ti four-coordinated at 2.05 Å "
                        "(GII 1.12 v.u.) and the PBE gap at 0.0 eV (anatase: 2.0)",
}
#: pymatgen's guard range for a DLS volume change (its ``DLSVolumePredictor`` defaults).
DLS_MIN_SCALE, DLS_MAX_SCALE = 0.5, 1.5
HALOGENS = frozenset({"F", "Cl", "Br", "I"})
CHALCOGENS = frozenset({"S", "Se", "Te"})
STRUCTURES_JSON_FORMAT_VERSION = 1

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


#: Largest primitive cell kept (bounds the cost of the PBE calculations).
MAX_SITES = 64


def is_safe_id(material_id: str) -> bool:
    """True when ``material_id`` can be used as a file name on every common file system."""
    return bool(_SAFE_ID.match(material_id)) and len(material_id) <= 200


def _slug(text: str) -> str:
    """File-name safe form of a name or formula (letters, digits and single dashes)."""
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-")


def element_allowed(el: Element) -> bool:
    """An element the embedded set may contain: one GPAW has a PAW setup for (Z <= 83 except Tc),
    no lanthanoid or actinoid (f states are not a DOS channel)."""
    return el.Z <= MAX_Z and el.symbol not in NO_GPAW_SETUP and not el.is_lanthanoid and not el.is_actinoid


def element_reason(el: Element) -> str | None:
    """Why ``el`` is not allowed (see ``element_allowed``), or None."""
    if el.is_lanthanoid or el.is_actinoid:
        return "f-block element"
    if el.Z > MAX_Z or el.symbol in NO_GPAW_SETUP:
        return "no GPAW PAW setup"
    return None


def bv_anion_reason(structure: Structure, valences: list[int]) -> str | None:
    """Why bond valence theory does not fit a structure with these valences (an anion outside
    ``ANION_ELEMENTS``), or None."""
    anions = sorted({site.specie.symbol for site, v in zip(structure, valences) if v < 0})
    bad = [a for a in anions if a not in ANION_ELEMENTS]
    if bad:
        return (f"anion {', '.join(bad)} is outside the ones bond valence theory is made for "
                f"({', '.join(sorted(ANION_ELEMENTS))})")
    return None


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:  # pragma: no cover - both packages are installed
        return "unknown"


def _plain(structure: Structure) -> Structure:
    """Copy with plain elements: no oxidation states, no site properties."""
    return Structure(structure.lattice, [site.specie.symbol for site in structure],
                     structure.frac_coords, coords_are_cartesian=False)


#: A carbon and a hydrogen closer than this (A) are a C-H bond (1.09 A in molecules, shorter in
#: X-ray structures): the structure is a molecular organic crystal.
CH_BOND_MAX_A = 1.2


def not_ionic_reason(structure: Structure) -> str | None:
    """Why a structure has no cation-anion bonds for bond valence theory to describe, or None.

    Checked before ``BVAnalyzer``, which spends most of the collection's time searching
    oxidation states for such cells and then assigns none (elements) or meaningless ones
    (molecular organic crystals): an element (one species) or a crystal with C-H bonds
    (``CH_BOND_MAX_A``).
    """
    symbols = [site.specie.symbol for site in structure]
    if len(set(symbols)) == 1:
        return "element: no cation-anion bonds"
    carbons = [i for i, el in enumerate(symbols) if el == "C"]
    hydrogens = [i for i, el in enumerate(symbols) if el == "H"]
    if carbons and hydrogens:
        frac = structure.frac_coords
        d = structure.lattice.get_all_distances(frac[carbons], frac[hydrogens])  # minimum image
        if (d < CH_BOND_MAX_A).any():
            return "molecular organic crystal (C-H bonds)"
    return None


def _bv_valences(structure: Structure) -> list[int] | None:
    """``BVAnalyzer`` valences per site, or None when it cannot assign them."""
    from pymatgen.analysis.bond_valence import BVAnalyzer

    try:
        return [int(round(v)) for v in BVAnalyzer().get_valences(structure)]
    except Exception:  # BVAnalyzer raises ValueError, but also other errors on odd cells
        return None


def _missing_bv_parameter(structure: Structure, valences: list[int]) -> str | None:
    """The first cation-anion pair of the structure with no bond valence parameter, or None.

    Checked on the composition (every cation with every anion), so a material kept here always
    gets its bond valence sums in ``data_prep build``; a pair that never meets within the cutoff
    is checked too, which only errs on the side of dropping.
    """
    from data_prep.bond_valence import BVParams, MissingBVParameter

    table = BVParams.default()
    ions = {(site.specie.symbol, int(v)) for site, v in zip(structure, valences)}
    for cat, vc in sorted(i for i in ions if i[1] > 0):
        for an, va in sorted(i for i in ions if i[1] < 0):
            try:
                table.choose(cat, vc, an, va)
            except MissingBVParameter:
                return f"{cat}{vc:+d}-{an}{va:+d}"
    return None


def _decorated(structure: Structure, valences: list[int]) -> Structure:
    s = structure.copy()
    s.add_oxidation_state_by_site(valences)
    return s


def _check_basic(structure: Structure, max_sites: int):
    """(primitive structure, spacegroup info) or (None, reason)."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    if not structure.is_ordered:
        return None, "disordered"
    bad = {}
    for el in structure.composition.elements:
        reason = element_reason(el)
        if reason:
            bad.setdefault(reason, []).append(el.symbol)
    if bad:
        return None, "; ".join(f"{r}: {','.join(sorted(els))}" for r, els in sorted(bad.items()))
    try:
        sga = SpacegroupAnalyzer(_plain(structure))
        prim = _plain(sga.get_primitive_standard_structure())
        info = {"spacegroup": sga.get_space_group_symbol(), "spacegroup_number": int(sga.get_space_group_number())}
    except Exception as exc:
        return None, f"symmetry analysis failed: {type(exc).__name__}"
    if len(prim) > max_sites:
        return None, f"more than {max_sites} sites in the primitive cell"
    return (prim, info), None


# --------------------------------------------------------------------------------------------
# raw sources
# --------------------------------------------------------------------------------------------

def _package_dir(module: str) -> Path:
    """Folder of an installed (sub)package, found without importing it."""
    from importlib.util import find_spec

    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - installed packages
        raise FileNotFoundError(f"package {module} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _mineral_db_path() -> Path:
    # located from emmet.core: importing the robocrys package itself takes several seconds
    path = _package_dir("emmet.core") / "featurization" / "robocrys" / "condense" / "mineral_db.json.gz"
    if not path.is_file():  # pragma: no cover - depends on the installed emmet-core
        raise FileNotFoundError(f"emmet-core's robocrys mineral database not found at {path}")
    return path


def _load_json(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def _structure_from(d: dict) -> Structure:
    """A ``Structure`` from a serialised Structure, StructureNL or TransformedStructure dict (all
    three keep the (final) structure's lattice and sites at the top level)."""
    return Structure.from_dict({"lattice": d["lattice"], "sites": d["sites"], "charge": None})


def _raw_minerals():
    """(mineral name, aflow label, structure, provenance) of every entry of the robocrys mineral
    database (a pandas table in "split" orientation; read as plain JSON, without pandas)."""
    path = _mineral_db_path()
    table = _load_json(path)
    cols = table["columns"]
    version = _package_version("emmet-core")
    out = []
    for i, (label, row) in enumerate(zip(table["index"], table["data"])):
        rec = dict(zip(cols, row))
        mineral = str(rec.get("mineral") or "")
        prov = {"source": "emmet-core robocrys mineral database", "package": "emmet-core",
                "package_version": version, "file": "emmet/core/featurization/robocrys/condense/mineral_db.json.gz",
                "row": i, "aflow_label": str(label), "mineral": mineral,
                "pearson": str(rec.get("pearson") or ""), "strukturbericht": str(rec.get("strukturbericht") or "")}
        out.append((mineral, str(label), _structure_from(rec["structure"]), prov))
    return out


def _raw_prototypes():
    """(mineral name, aflow label, structure, provenance) of every AFLOW prototype pymatgen ships.

    Read as plain JSON: importing ``pymatgen.analysis.prototypes`` would build 288 StructureNL
    objects and parse their BibTeX (about 5 s).
    """
    path = _package_dir("pymatgen.analysis.prototypes") / "aflow_prototypes.json.gz"
    version = _package_version("pymatgen")
    out = []
    for i, entry in enumerate(_load_json(path)):
        tags = entry.get("tags") or {}
        prov = {"source": "pymatgen AFLOW prototype library (Mehl et al., Comput. Mater. Sci. 136, S1 (2017))",
                "package": "pymatgen", "package_version": version,
                "file": "pymatgen/analysis/prototypes/aflow_prototypes.json.gz", "row": i,
                "aflow_label": str(tags.get("aflow") or ""), "mineral": str(tags.get("mineral") or ""),
                "pearson": str(tags.get("pearson") or ""), "strukturbericht": str(tags.get("strukturbericht") or "")}
        out.append((prov["mineral"], prov["aflow_label"], _structure_from(entry["snl"]), prov))
    return out


def _raw_examples():
    """(file stem, structure, provenance) of the example structures in ``pymatgen/util/structures``
    (Structure or TransformedStructure JSON files; the final structure is used)."""
    folder = _package_dir("pymatgen.util") / "structures"
    version = _package_version("pymatgen")
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            d = _load_json(path)
            structure = _structure_from(d)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        prov = {"source": "pymatgen example structures", "package": "pymatgen", "package_version": version,
                "file": f"pymatgen/util/structures/{path.name}"}
        for h in d.get("history") or []:
            if isinstance(h, dict) and h.get("materialsid"):
                prov["materials_project_id"] = str(h["materialsid"])
        out.append((path.stem, structure, prov))
    return out


@dataclass(frozen=True)
class PackageSource:
    """A structure collection shipped inside an installed registry package.

    ``origin`` is the records origin, ``prefix`` the id prefix (``<prefix>-<formula>-<name>``),
    ``distribution`` the package (its version goes into the provenance). For ``kind="cif"`` the
    ``*.cif``/``*.mcif`` files under the package-relative ``folders`` are read from the installed
    files (the package is not imported); ``kind="xrayutilities"`` reads the crystals that
    ``xrayutilities.materials.predefined_materials`` defines; ``kind="ncrystal"`` reads the NCMAT
    files of NCrystal's standard library (compiled into its core library, so read through
    ``NCrystal``'s API, the module named in ``folders``).
    """

    origin: str
    distribution: str
    prefix: str
    kind: str
    folders: tuple[str, ...]
    description: str


#: Structure collections shipped inside registry packages, read after the three original sources
#: in this order of preference (experimental CIFs first, pyxtal's mixed set last). Installed with
#: the ``structures`` extra (``pip install -e ".[structures]"``; ``make`` installs it).
PACKAGE_SOURCES: tuple[PackageSource, ...] = (
    PackageSource("ase-cod", "ase", "ase", "cif", ("ase/test/testdata/minerals",),
                  "Crystallography Open Database minerals shipped with ase's test data"),
    PackageSource("dans-diffraction", "Dans_Diffraction", "dans", "cif", ("Dans_Diffraction/Structures",),
                  "example structures of Dans_Diffraction"),
    PackageSource("crystals", "crystals", "crystals", "cif", ("crystals/cifs", "crystals/tests/data"),
                  "built-in CIF database of the crystals package"),
    PackageSource("xrayutilities", "xrayutilities", "xu", "xrayutilities",
                  ("xrayutilities/materials/predefined_materials.py",),
                  "predefined materials of xrayutilities (experimental lattice parameters and sites)"),
    PackageSource("pyxtal", "pyxtal", "pyxtal", "cif", ("pyxtal/database/cifs",),
                  "CIF examples of pyxtal's database (inorganic, JARVIS-DFT and molecular crystals)"),
    PackageSource("cif2cell", "cif2cell", "cif2cell", "cif", ("../../cif2cell/sample_cifs",),
                  "sample CIFs of cif2cell (installed beside site-packages)"),
    PackageSource("ncrystal", "ncrystal-core", "ncrystal", "ncrystal", ("NCrystal",),
                  "NCrystal's standard data library (NCMAT files; structures converted from COD, AMCSD "
                  "or Materials Project entries, cited in each file)"),
)
#: Order of preference of the real sources when deduplicating.
REAL_ORIGINS = ("mineral", "prototype", "pymatgen-example") + tuple(src.origin for src in PACKAGE_SOURCES)


def _cif_files(source: PackageSource) -> list[tuple[str, Path]] | None:
    """(package-relative path, absolute path) of a source's CIF files, sorted; None when the
    package is not installed."""
    try:
        dist = metadata.distribution(source.distribution)
    except metadata.PackageNotFoundError:
        return None
    out = []
    for f in dist.files or ():
        rel = str(f).replace("\\", "/")
        if rel.lower().endswith((".cif", ".mcif")) and any(rel.startswith(d + "/") for d in source.folders):
            out.append((rel, Path(dist.locate_file(f))))
    return sorted(out)


def _raw_cif_source(source: PackageSource):
    """(file stem, structure, provenance) of every CIF of ``source`` (first block, symmetry-expanded
    conventional cell; structure None when pymatgen cannot parse it), or None when the package is
    not installed."""
    from pymatgen.io.cif import CifParser

    files = _cif_files(source)
    if files is None:
        return None
    version = _package_version(source.distribution)
    out = []
    for rel, path in files:
        prov = {"source": source.description, "package": source.distribution, "package_version": version,
                "file": rel}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                structure = CifParser(path).parse_structures(primitive=False)[0]
        except Exception as exc:  # a CIF pymatgen cannot read counts as unparsable
            out.append((Path(rel).stem, None, {**prov, "error": type(exc).__name__}))
            continue
        out.append((Path(rel).stem, structure, prov))
    return out


def _element_symbol(name: str) -> str:
    """Element symbol of an xrayutilities atom name (``"Fe"``, ``"Fe2+"``, ``"O2-"``)."""
    m = re.match(r"[A-Z][a-z]?", name)
    if not m:
        raise ValueError(f"no element in atom name {name!r}")
    return m.group(0)


def _leading_element(name: str) -> str | None:
    """The element a material name starts with (``"CdSe_ZB"`` -> ``"Cd"``), or None."""
    m = re.match(r"[A-Z][a-z]?", str(name))
    if not m:
        return None
    try:
        return Element(m.group(0)).symbol
    except ValueError:
        return None


def _raw_xrayutilities(source: PackageSource):
    """(name, structure, provenance) of every ``Crystal`` of xrayutilities' predefined materials
    (conventional cell from its space-group lattice; a site with occupancy < 1 makes the structure
    disordered), sorted by name; None when xrayutilities is not installed."""
    from importlib.util import find_spec

    from pymatgen.core import Lattice

    if find_spec("xrayutilities") is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from xrayutilities.materials import predefined_materials as pm
        from xrayutilities.materials.material import Crystal
    version = _package_version(source.distribution)
    out = []
    for name in sorted(n for n in dir(pm) if isinstance(getattr(pm, n), Crystal)):
        crystal = getattr(pm, name)
        prov = {"source": source.description, "package": source.distribution, "package_version": version,
                "file": source.folders[0], "name": name,
                "space_group": str(crystal.lattice.space_group)}
        try:
            lat = crystal.lattice
            species, coords = [], []
            for atom, pos, occ, _b in lat.base():
                sym = _element_symbol(atom.basename)
                species.append({sym: float(occ)} if float(occ) < 1.0 else sym)
                coords.append([float(x) for x in pos])
            lattice = Lattice.from_parameters(float(lat.a), float(lat.b), float(lat.c),
                                              float(lat.alpha), float(lat.beta), float(lat.gamma))
            structure = Structure(lattice, species, coords, coords_are_cartesian=False)
        except Exception as exc:
            out.append((name, None, {**prov, "error": type(exc).__name__}))
            continue
        lead = _leading_element(name)
        if lead is not None and lead not in {el.symbol for el in structure.composition.elements}:
            # e.g. xrayutilities 1.8.0 defines CdSe with the atoms of wurtzite InSb
            out.append((name, None, {**prov, "error": f"atoms do not match the name {name!r}"}))
            continue
        out.append((name, structure, prov))
    return out


def _ncmat_number(text: str) -> float:
    """A number of an NCMAT file: a decimal (``.25``) or a fraction (``1/3``, ``-1/4``)."""
    if "/" in text:
        num, den = text.split("/")
        return float(num) / float(den)
    return float(text)


def _ncmat_sections(text: str) -> dict[str, list[list[str]]]:
    """The ``@SECTION`` blocks of an NCMAT file: rows of words, comments (``#``) removed."""
    out: dict[str, list[list[str]]] = {}
    current = None
    for line in text.splitlines()[1:]:  # the first line is the format line, "NCMAT v<n>"
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("@"):
            current = line.split()[0][1:]
            out.setdefault(current, [])
        elif current is not None:
            out[current].append(line.split())
    return out


def ncmat_structure(text: str) -> Structure | None:
    """The crystal of an NCMAT file (``@CELL`` and ``@ATOMPOSITIONS``: every atom of the cell, in
    fractional coordinates), or None for a material without a unit cell (amorphous, liquid, gas).

    ``@CELL`` holds ``lengths a b c`` and ``angles alpha beta gamma`` (``!!`` repeats the value
    before it) or ``cubic a``.
    """
    from pymatgen.core import Lattice

    sec = _ncmat_sections(text)
    if "CELL" not in sec:
        return None
    cell: dict[str, list[float]] = {}
    for row in sec["CELL"]:
        values: list[float] = []
        for word in row[1:]:
            values.append(values[-1] if word == "!!" else _ncmat_number(word))
        cell[row[0]] = values
    if "cubic" in cell:
        lattice = Lattice.cubic(cell["cubic"][0])
    else:
        lattice = Lattice.from_parameters(*cell["lengths"], *cell["angles"])
    rows = sec.get("ATOMPOSITIONS") or []
    if not rows:
        raise ValueError("@CELL without @ATOMPOSITIONS")
    return Structure(lattice, [row[0] for row in rows], [[_ncmat_number(w) for w in row[1:4]] for row in rows])


def _ncmat_reference(text: str) -> str:
    """The first address cited in an NCMAT file's header comments (usually the paper or COD entry
    its structure was converted from; a Materials Project entry for KOH and Y2SiO5), or ``""``."""
    for line in text.splitlines():
        if line.startswith("@"):
            break
        m = re.search(r"https?://\S+", line)
        if m:
            return m.group(0).rstrip(".,;)")
    return ""


def _raw_ncrystal(source: PackageSource):
    """(file stem, structure, provenance) of every crystalline material of NCrystal's standard
    library, sorted by file name (amorphous, liquid and gas materials, which have no unit cell, are
    not listed); None when NCrystal is not installed."""
    from importlib.util import find_spec

    if find_spec(source.folders[0]) is None:
        return None
    import NCrystal

    version = _package_version(source.distribution)
    out = []
    for name in sorted(f.name for f in NCrystal.browseFiles(factory="stdlib")):
        if not name.endswith(".ncmat"):
            continue
        text = NCrystal.createTextData(f"stdlib::{name}").rawData
        prov = {"source": source.description, "package": source.distribution, "package_version": version,
                "file": f"stdlib::{name}", "structure_reference": _ncmat_reference(text)}
        try:
            structure = ncmat_structure(text)
        except Exception as exc:
            out.append((name[:-len(".ncmat")], None, {**prov, "error": type(exc).__name__}))
            continue
        if structure is not None:
            out.append((name[:-len(".ncmat")], structure, prov))
    return out


def _raw_package_source(source: PackageSource):
    if source.kind == "cif":
        return _raw_cif_source(source)
    if source.kind == "xrayutilities":
        return _raw_xrayutilities(source)
    if source.kind == "ncrystal":
        return _raw_ncrystal(source)
    raise ValueError(f"unknown source kind {source.kind!r}")


# --------------------------------------------------------------------------------------------
# deduplication
# --------------------------------------------------------------------------------------------

class _Deduplicator:
    """Structures kept so far, grouped by reduced formula, compared with ``StructureMatcher``."""

    def __init__(self):
        from data_prep.families import ReducingMatcher

        self.matcher = ReducingMatcher()  # StructureMatcher's defaults, each structure reduced once
        self.groups: dict[str, list[tuple[str, Structure]]] = defaultdict(list)

    def find(self, structure: Structure) -> str | None:
        """Id of a kept structure that ``structure`` duplicates, else None."""
        for kept_id, kept in self.groups.get(structure.composition.reduced_formula, ()):
            if self.matcher.fit(structure, kept):
                return kept_id
        return None

    def add(self, material_id: str, structure: Structure) -> None:
        self.groups[structure.composition.reduced_formula].append((material_id, structure))


class _IdMaker:
    def __init__(self):
        self.used: set[str] = set()

    def make(self, *candidates: str) -> str:
        """The first candidate not yet used, else the last one with a numeric suffix."""
        for cand in candidates:
            if cand not in self.used:
                self.used.add(cand)
                return cand
        k = 2
        while f"{candidates[-1]}-{k}" in self.used:
            k += 1
        mid = f"{candidates[-1]}-{k}"
        self.used.add(mid)
        return mid


# --------------------------------------------------------------------------------------------
# real structures
# --------------------------------------------------------------------------------------------

def _real_candidates(missing: list[str] | None = None):
    """All raw real structures in order of preference: (origin, id candidates, structure, prov).

    ``structure`` is None for a file that could not be parsed. Sources whose package is not
    installed are skipped and their origins appended to ``missing``.
    """
    out = []
    for mineral, label, s, prov in _raw_minerals():
        f = _slug(s.composition.reduced_formula)
        m = _slug(mineral).lower()
        cands = [f"min-{f}-{m}" if m else f"min-{f}-{_slug(label)}", f"min-{f}-{m}-{_slug(label)}".replace("--", "-")]
        out.append(("mineral", cands, s, prov))
    for mineral, label, s, prov in _raw_prototypes():
        f = _slug(s.composition.reduced_formula)
        out.append(("prototype", [f"proto-{f}-{_slug(label)}"], s, prov))
    for stem, s, prov in _raw_examples():
        out.append(("pymatgen-example", [f"ex-{_slug(stem)}"], s, prov))
    for source in PACKAGE_SOURCES:
        cands = package_candidates(source)
        if cands is None:
            if missing is not None:
                missing.append(source.origin)
            continue
        out.extend(cands)
    return out


def package_candidates(source: PackageSource):
    """Raw real structures of one package source, as ``_real_candidates`` lists them; None when its
    package is not installed."""
    raw = _raw_package_source(source)
    if raw is None:
        return None
    out = []
    for stem, s, prov in raw:
        f = _slug(s.composition.reduced_formula) if s is not None else "unknown"
        out.append((source.origin, [f"{source.prefix}-{f}-{_slug(stem)}"], s, prov))
    return out


class _Collection:
    """Entries kept so far, with the deduplicator, the ids in use and counts of skipped candidates."""

    def __init__(self):
        self.dedup = _Deduplicator()
        self.ids = _IdMaker()
        self.entries: dict[str, StructureEntry] = {}
        self.skipped: Counter = Counter()
        self.raw: Counter = Counter()
        self.n_parents = 0
        self.n_tried = 0
        self.missing_sources: list[str] = []

    def keep(self, entry: StructureEntry) -> None:
        self.dedup.add(entry.material_id, entry.structure)
        self.entries[entry.material_id] = entry


def _collect_real(col: _Collection, max_sites: int, progress: bool, candidates: list | None = None
                  ) -> list[StructureEntry]:
    """Real structures of every source (or of ``candidates``), filtered and deduplicated, in order
    of preference."""
    from tqdm.auto import tqdm

    kept: list[StructureEntry] = []
    if candidates is None:
        candidates = _real_candidates(col.missing_sources)
    col.raw.update(c[0] for c in candidates)
    for origin, id_cands, raw, prov in tqdm(candidates, desc="real structures", disable=not progress):
        if raw is None:
            col.skipped[f"{origin}: unreadable source entry"] += 1
            continue
        checked, reason = _check_basic(raw, max_sites)
        if checked is None:
            col.skipped[f"{origin}: {reason}"] += 1
            continue
        prim, info = checked
        reason = not_ionic_reason(prim)
        if reason:
            col.skipped[f"{origin}: {reason}"] += 1
            continue
        valences = _bv_valences(prim)
        if valences is None:
            col.skipped[f"{origin}: BVAnalyzer cannot assign"] += 1
            continue
        if bv_anion_reason(prim, valences):
            col.skipped[f"{origin}: anion outside those of bond valence theory (O, F, Cl, Br, I, S, Se, Te, N)"] += 1
            continue
        if _missing_bv_parameter(prim, valences):
            col.skipped[f"{origin}: no bond valence parameter for a cation-anion pair"] += 1
            continue
        scale = dls_volume_scale(prim)
        if scale is not None and not DLS_MIN_SCALE <= scale <= DLS_MAX_SCALE:
            col.skipped[f"{origin}: geometry far from data-mined bond lengths (DLS volume change "
                        f"outside [{DLS_MIN_SCALE}, {DLS_MAX_SCALE}])"] += 1
            continue
        dup = col.dedup.find(prim)
        if dup is not None:
            col.skipped[f"{origin}: duplicate structure"] += 1
            # the kept entry records where else the structure was found
            col.entries[dup].provenance.setdefault("also_in", []).append(
                {k: prov[k] for k in ("package", "file", "row", "aflow_label", "mineral") if k in prov})
            continue
        mid = col.ids.make(*id_cands)
        p = dict(prov)
        p.update(info)
        p.update({"n_sites_original": len(raw), "n_sites": len(prim), "cell": "primitive standard (SpacegroupAnalyzer)",
                  "bv_valences": valences, "hypothetical": False, "parent_id": mid,
                  "dls_volume_scale": None if scale is None else round(scale, 5)})
        entry = StructureEntry(mid, prim.composition.reduced_formula, origin, prim, p)
        col.keep(entry)
        kept.append(entry)
    return kept


# --------------------------------------------------------------------------------------------
# substitutions
# --------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _probability_model():
    from pymatgen.analysis.structure_prediction.substitution_probability import SubstitutionProbability

    return SubstitutionProbability()


def _target_allowed(sp: Species) -> bool:
    el = sp.element
    return element_allowed(el) and not el.is_noble_gas and el.symbol != "H"


@lru_cache(maxsize=None)
def _px(species: Species) -> float:
    """The model's normalisation ``px`` of a species, summed exactly (``math.fsum``).

    pymatgen accumulates it over a ``set`` of species, whose order changes with the interpreter's
    hash seed, so its last bits (and hence near-tied rankings) would differ between runs.
    """
    model = _probability_model()
    return math.fsum(math.exp(model.get_lambda(species, t)) for t in model.species)


def cond_prob(new: Species, old: Species) -> float:
    """pymatgen's ``SubstitutionProbability.cond_prob(new, old)``: probability that ``new``
    takes the place of ``old``, computed order-independently (see ``_px``)."""
    return math.exp(_probability_model().get_lambda(new, old)) / _px(old)


@lru_cache(maxsize=None)
def _same_oxi_options(species: Species) -> tuple[tuple[Species, float], ...]:
    """Species the model may put on ``species``' sites with the same oxidation state, with the
    conditional probability ``p(new | old)``; highest first (ties by name). Includes ``species``."""
    model = _probability_model()
    opts = []
    for new in model.species:
        if new.oxi_state != species.oxi_state:
            continue
        if new != species and not _target_allowed(new):
            continue
        opts.append((new, cond_prob(new, species)))
    opts.sort(key=lambda t: (-t[1], str(t[0])))
    return tuple(opts)


def same_oxidation_state_substitutions(species: list[Species], threshold: float = SUBSTITUTION_THRESHOLD) -> list[dict]:
    """Data-mined substitutions of ``species`` that keep every oxidation state.

    The probability of a substitution is pymatgen's (``Substitutor.pred_from_list``): the product
    over the species of ``SubstitutionProbability.cond_prob(new, old)``; all substitutions above
    ``threshold`` whose new species have the old species' oxidation states, map distinct species to
    distinct species and change at least one species. Returned highest probability first, each as
    ``{"substitutions": {old: new}, "probability": p}``. Such a substitution is charge neutral
    whenever the parent is. A species the model does not know is never replaced and contributes a
    factor 1 (its own substitution statistics are unknown).
    """
    model = _probability_model()
    species = sorted(species, key=str)
    # a species the model does not know (e.g. C4-, As3-, Te2-) stays in place with factor 1
    options = [_same_oxi_options(sp) if sp in model.species else ((sp, 1.0),) for sp in species]
    best = [opts[0][1] if opts else 0.0 for opts in options]
    # best possible product of the species after position i
    tail = [1.0] * (len(species) + 1)
    for i in range(len(species) - 1, -1, -1):
        tail[i] = tail[i + 1] * best[i]
    out: list[dict] = []

    def _recurse(i: int, prob: float, chosen: list[Species]):
        if i == len(species):
            if any(new != old for new, old in zip(chosen, species)) and len(set(chosen)) == len(chosen):
                out.append({"substitutions": dict(zip(species, chosen)), "probability": prob})
            return
        for new, p in options[i]:
            if prob * p * tail[i + 1] <= threshold:
                break  # options are sorted: the rest are smaller
            _recurse(i + 1, prob * p, [*chosen, new])

    _recurse(0, 1.0, [])
    out.sort(key=lambda d: (-d["probability"], _subs_key(d["substitutions"])))
    return out


def _subs_key(subs: dict) -> str:
    return ",".join(f"{k}>{v}" for k, v in sorted(subs.items(), key=lambda kv: str(kv[0])) if k != v)


def dls_volume_scale(structure: Structure) -> float | None:
    """Volume change pymatgen's ``DLSVolumePredictor`` asks for (unguarded), or None if it raises.

    DLS scales a cell until its shortest bond, relative to the data-mined bond length of the pair,
    has the data-mined length; a change far from 1 means some contact is far from any data-mined
    bond length.
    """
    from pymatgen.analysis.structure_prediction.volume_predictor import DLSVolumePredictor

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(DLSVolumePredictor(min_scaling=None, max_scaling=None).predict(structure)) / structure.volume
    except Exception:
        return None


def _substituted_structure(parent_dec: Structure, subs: dict):
    """Substituted structure of a decorated parent, rescaled with pymatgen's DLS volume predictor.

    Returns ``(plain structure or None, volume info, total charge)``. DLS scales the cell so that
    the shortest bond relative to its data-mined length becomes 1; pymatgen guards its prediction
    to a volume change within [``DLS_MIN_SCALE``, ``DLS_MAX_SCALE``]. A candidate whose raw
    prediction falls outside that range is rejected (``None``): clamping would leave bonds far from
    their data-mined lengths (such cells have a global instability index about twice that of the
    others). When DLS raises, the parent's volume is kept and the provenance says so.
    """
    from pymatgen.analysis.structure_prediction.volume_predictor import DLSVolumePredictor

    mapping = {old: new for old, new in subs.items() if old != new}
    s = parent_dec.copy()
    s.replace_species(mapping)
    charge = float(sum(site.specie.oxi_state for site in s))
    vol0 = float(s.volume)
    info = {"volume_parent_A3": round(vol0, 4)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vol = float(DLSVolumePredictor(min_scaling=None, max_scaling=None).predict(s))
    except Exception as exc:
        info.update({"volume_rescaling": f"none: DLSVolumePredictor failed ({type(exc).__name__}: {exc}); "
                                         "parent volume kept",
                     "volume_A3": round(vol0, 4), "volume_scale": 1.0})
        return _plain(s), info, charge
    scale = vol / vol0
    info.update({"volume_rescaling": "DLSVolumePredictor", "volume_A3": round(vol, 4),
                 "volume_scale": round(scale, 5)})
    if not DLS_MIN_SCALE <= scale <= DLS_MAX_SCALE:
        return None, info, charge
    s.scale_lattice(vol)
    return _plain(s), info, charge


def _collect_substituted(col: _Collection, real: list[StructureEntry], n_substituted: int, seed: int,
                         progress: bool, max_per_parent: int = MAX_SUBSTITUTIONS_PER_PARENT
                         ) -> list[StructureEntry]:
    """Substituted analogues of ``real``, at most ``n_substituted``, spread over the parents.

    Every parent gets its list of same-oxidation-state substitutions, most probable first. The
    parents are visited round-robin (their order shuffled once with ``seed``); in each round a
    parent contributes its next candidate that BVAnalyzer assigns, that is charge neutral, keeps
    its anions among ``ANION_ELEMENTS`` and duplicates no structure kept so far, until it has
    contributed ``max_per_parent`` (``None``: no cap).
    """
    from tqdm.auto import tqdm

    skipped = Counter()
    pmg_version = _package_version("pymatgen")

    parents = []
    for e in sorted(real, key=lambda e: e.material_id):
        valences = e.provenance.get("bv_valences") or _bv_valences(e.structure)
        if valences is None:
            continue
        dec = _decorated(e.structure, valences)
        preds = same_oxidation_state_substitutions(list(dec.composition.elements))
        if preds:
            parents.append((e, dec, preds))
    random.Random(seed).shuffle(parents)

    kept: list[StructureEntry] = []
    cursor = [0] * len(parents)
    n_kept = [0] * len(parents)
    bar = tqdm(total=n_substituted, desc="substituted structures", disable=not progress)
    active = True
    while len(kept) < n_substituted and active:
        active = False
        for k, (parent, dec, preds) in enumerate(parents):
            if len(kept) >= n_substituted:
                break
            if max_per_parent is not None and n_kept[k] >= max_per_parent:
                continue
            while cursor[k] < len(preds):
                pred = preds[cursor[k]]
                cursor[k] += 1
                active = True
                subs = pred["substitutions"]
                struct, vinfo, charge = _substituted_structure(dec, subs)
                if abs(charge) > 1e-8:  # cannot happen for same-oxidation-state substitutions
                    skipped["not charge neutral"] += 1
                    continue
                if struct is None:
                    skipped["DLS volume change outside its guard range"] += 1
                    continue
                formula = struct.composition.reduced_formula
                valences = _bv_valences(struct)
                if valences is None:
                    skipped["BVAnalyzer cannot assign"] += 1
                    continue
                intended = [int(round(sp.oxi_state)) for sp in _decorated_sub(dec, subs)]
                if valences != intended:
                    skipped["BVAnalyzer valences differ from the substituted oxidation states"] += 1
                    continue
                if bv_anion_reason(struct, valences):
                    skipped["anion outside those of bond valence theory"] += 1
                    continue
                if _missing_bv_parameter(struct, valences):
                    skipped["no bond valence parameter for a cation-anion pair"] += 1
                    continue
                if col.dedup.find(struct) is not None:
                    skipped["duplicate structure"] += 1
                    continue
                mid = col.ids.make(f"sub-{parent.material_id}-{_slug(formula)}")
                prov = {"source": "data-mined ionic substitution (pymatgen SubstitutionProbability, "
                                  "Hautier et al., Inorg. Chem. 50, 656 (2011))",
                        "package": "pymatgen", "package_version": pmg_version,
                        "parent_id": parent.material_id, "parent_origin": parent.origin,
                        "parent_formula": parent.formula,
                        "substitution": {str(o): str(n) for o, n in sorted(subs.items(), key=lambda kv: str(kv[0]))
                                         if o != n},
                        "probability": float(pred["probability"]),
                        "rank_in_parent": cursor[k], "threshold": SUBSTITUTION_THRESHOLD,
                        "same_oxidation_states": True, "charge": charge,
                        "species_outside_model": sorted(str(sp) for sp in dec.composition.elements
                                                        if sp not in _probability_model().species),
                        **vinfo, "n_sites": len(struct), "bv_valences": valences,
                        "hypothetical": True, "relaxed": False, "note": "hypothetical, unrelaxed"}
                entry = StructureEntry(mid, formula, "substituted", struct, prov)
                col.keep(entry)
                kept.append(entry)
                n_kept[k] += 1
                bar.update(1)
                break
    bar.close()
    col.skipped.update({f"substituted: {k}": v for k, v in skipped.items()})
    col.n_parents, col.n_tried = len(parents), int(sum(cursor))
    return kept


def _decorated_sub(parent_dec: Structure, subs: dict) -> list[Species]:
    return [subs.get(site.specie, site.specie) for site in parent_dec]


# --------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------

def collect_structures(n_substituted: int = 1000, max_sites: int = MAX_SITES, seed: int = 88, progress: bool = True,
                       stats: dict | None = None, max_per_parent: int | None = MAX_SUBSTITUTIONS_PER_PARENT,
                       require_sources: bool = True) -> list[StructureEntry]:
    """All structures of the embedded dataset, sorted by material id (deterministic).

    Real structures (``REAL_ORIGINS``, in that order of preference) come first, then up to
    ``n_substituted`` substituted analogues of them, at most ``max_per_parent`` per parent (see
    ``_collect_substituted``; ``seed`` fixes the order in which their parents take turns). Every
    entry gets ``parent_id`` (a real structure is its own parent), ``prototype_group`` and
    ``family_id`` in its provenance (``data_prep.families.assign_families``).

    The sources of ``CIF_SOURCES`` need their packages (the ``structures`` extra): a missing one
    raises ``RuntimeError`` unless ``require_sources=False``, which collects without it (and lists
    it in ``stats["missing_sources"]``); ids of the other sources do not depend on it.

    ``stats``, when given, is filled with the number of raw structures per source, the kept ones
    per origin, the skipped candidates by reason, the number of substitution parents and of
    substitution candidates tried, and the family statistics.
    """
    from data_prep.families import assign_families, family_statistics

    col = _Collection()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = _collect_real(col, max_sites, progress)
        if col.missing_sources and require_sources:
            raise RuntimeError(f"structure sources not installed: {', '.join(col.missing_sources)} "
                               "(pip install -e '.[structures]', or pass require_sources=False)")
        subst = (_collect_substituted(col, real, n_substituted, seed, progress, max_per_parent)
                 if n_substituted > 0 else [])
        entries = drop_bad_sources(sorted(real + subst, key=lambda e: e.material_id), col.skipped)
        families = assign_families((e.material_id, e.origin, e.provenance.get("parent_id"), e.structure)
                                   for e in entries)
    for e in entries:
        fam = families[e.material_id]
        e.provenance["parent_id"] = fam.parent_id
        e.provenance["prototype_group"] = fam.prototype_group
        e.provenance["family_id"] = fam.family_id
    if stats is not None:
        stats["raw"] = dict(col.raw)
        stats["kept"] = dict(Counter(e.origin for e in entries))
        stats["skipped"] = dict(sorted(col.skipped.items()))
        stats["missing_sources"] = list(col.missing_sources)
        stats["substitution_parents"] = col.n_parents
        stats["substitution_candidates_tried"] = col.n_tried
        stats["max_substitutions_per_parent"] = max_per_parent
        stats["families"] = family_statistics(families)
    return entries


def drop_bad_sources(entries: list[StructureEntry], skipped: Counter | None = None) -> list[StructureEntry]:
    """``entries`` without those of :data:`BAD_SOURCE_ENTRIES` and their substitutions (counted in
    ``skipped`` by reason). Also applied to a structures file read back, so an older cache agrees."""
    kept = []
    for e in entries:
        bad = next((b for b in (e.material_id, str(e.provenance.get("parent_id", ""))) if b in BAD_SOURCE_ENTRIES), None)
        if bad is None:
            kept.append(e)
        elif skipped is not None:
            skipped[f"{e.origin}: {bad} {BAD_SOURCE_ENTRIES[bad]}"] += 1
    return kept


def _entry_valences(e: StructureEntry) -> list[int] | None:
    v = e.provenance.get("bv_valences")
    if v is not None and len(v) == len(e.structure):
        return list(v)
    return _bv_valences(e.structure)


def summary(entries: list[StructureEntry]) -> dict:
    """Counts per origin, distinct cation elements and chemical families (oxide, halide, chalcogenide).

    Families follow the anions ``BVAnalyzer`` assigns (negative valence): a material with O2- and
    F- counts as an oxide and a halide.
    """
    by_origin = Counter(e.origin for e in entries)
    cations: set[str] = set()
    anions: set[str] = set()
    families = Counter()
    for e in entries:
        val = _entry_valences(e)
        if val is None:
            families["unassigned"] += 1
            continue
        neg = {site.specie.symbol for site, v in zip(e.structure, val) if v < 0}
        cations.update(site.specie.symbol for site, v in zip(e.structure, val) if v > 0)
        anions.update(neg)
        families["oxide"] += "O" in neg
        families["halide"] += bool(neg & HALOGENS)
        families["chalcogenide"] += bool(neg & CHALCOGENS)
        families["other"] += not (("O" in neg) or (neg & HALOGENS) or (neg & CHALCOGENS))
    return {
        "n_materials": len(entries),
        "by_origin": dict(sorted(by_origin.items())),
        "n_real": sum(v for k, v in by_origin.items() if k != "substituted"),
        "n_distinct_formulas": len({e.formula for e in entries}),
        "n_sites_total": int(sum(len(e.structure) for e in entries)),
        "n_cation_elements": len(cations),
        "cation_elements": sorted(cations, key=lambda s: Element(s).Z),
        "anion_elements": sorted(anions, key=lambda s: Element(s).Z),
        "oxides": int(families["oxide"]),
        "halides": int(families["halide"]),
        "chalcogenides": int(families["chalcogenide"]),
        "other_anions": int(families["other"]),
    }


# --------------------------------------------------------------------------------------------
# serialisation
# --------------------------------------------------------------------------------------------

def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_structures_json(entries: list[StructureEntry], path: str | os.PathLike) -> Path:
    """Write entries as gzipped JSON, atomically (temporary file, then ``os.replace``).

    The gzip header carries no time stamp, so the same entries give the same bytes.
    """
    ids = [e.material_id for e in entries]
    dup = sorted(k for k, n in Counter(ids).items() if n > 1)
    if dup:
        raise ValueError(f"duplicate material ids: {dup[:5]}")
    doc = {"format_version": STRUCTURES_JSON_FORMAT_VERSION,
           "entries": [{"material_id": e.material_id, "formula": e.formula, "origin": e.origin,
                        "structure": e.structure.as_dict(), "provenance": e.provenance} for e in entries]}
    raw = json.dumps(doc, default=_json_default, separators=(",", ":")).encode()
    return atomic_write_bytes(path, gzip.compress(raw, compresslevel=9, mtime=0))


def read_structures_json(path: str | os.PathLike) -> list[StructureEntry]:
    """Entries written by ``write_structures_json``, in the stored order."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as fh:
            doc = json.loads(fh.read().decode())
    except (OSError, EOFError, ValueError) as exc:
        raise ValueError(f"cannot read structures file {path}: {exc}") from exc
    if not isinstance(doc, dict) or "entries" not in doc:
        raise ValueError(f"{path}: not a structures file (no 'entries')")
    return [StructureEntry(d["material_id"], d["formula"], d["origin"], Structure.from_dict(d["structure"]),
                           d.get("provenance", {})) for d in doc["entries"]]


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - thin command line wrapper
    import argparse
    import time

    ap = argparse.ArgumentParser(description="Collect the structures of the embedded dataset.")
    ap.add_argument("--out", default=None, help="write the entries as gzipped JSON here")
    ap.add_argument("--n-substituted", type=int, default=1000)
    ap.add_argument("--max-sites", type=int, default=MAX_SITES)
    ap.add_argument("--seed", type=int, default=88)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    stats: dict = {}
    entries = collect_structures(args.n_substituted, args.max_sites, args.seed, progress=True, stats=stats)
    elapsed = time.perf_counter() - t0
    print(json.dumps({"summary": summary(entries), "stats": stats, "seconds": round(elapsed, 1)}, indent=1,
                     default=str))
    if args.out:
        write_structures_json(entries, args.out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
