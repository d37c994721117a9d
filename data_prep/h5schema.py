"""The one owner of the h5 layout written by ``python -m data_prep build`` and read by training.

Every dataset and attribute name lives here; ``data_prep.build``, ``data_prep.shards`` (merge),
``data_prep.export``, ``data_prep.dataset``, ``data_prep.synthetic_h5``, the trainer
(``dosnet_bv.data``, ``dosnet_bv.streaming``), ``bench/`` and the tests' factory write with
``Writer`` and read with ``open_h5`` / ``Reader``.

Layout (``n`` samples, ``P`` grid points, ``C = (1 + n_neighbours) * 9`` channels, ``F``
structure features, ``M`` materials):

- ``dos`` (n, P, C) float32, states/eV, chunked one sample per chunk; attrs ``channel_labels``, ``units``.
- ``structure`` (n, F) float32; ``structure_labels`` (F,) and ``structure_families`` (F,) strings.
- ``targets/bvs_vu``, ``targets/valence``, ``targets/bvs_deviation_vu``, ``targets/gii_vu`` (n,)
  float32 (gii is the material's value repeated on its samples).
- optional migration targets (``data_prep.migration``): ``targets/migration_e1d_ev``,
  ``targets/migration_e2d_ev``, ``targets/migration_e3d_ev`` (n,) float32 BVSE percolation barriers
  (eV) of the material's mobile ion on the samples of that ion, NaN on other samples and where the
  material has none or the computation failed; the same per material as ``materials/migration_*``
  with ``materials/migration_ion`` (e.g. ``Li1+``, empty when none); root attr ``migration``
  (JSON: bvlain version, settings incl. resolution, citation, counts).
- ``meta/material_id``, ``meta/element``, ``meta/origin`` (n,) strings; ``meta/site_index`` (n,),
  ``meta/neighbour_indices`` (n, n_neighbours), ``meta/multiplicity`` (n,) int32;
  ``meta/neighbour_distances_ang`` (n, n_neighbours); ``meta/outside_weight`` (n, C) states
  beyond the grid window.
- ``bonds/*`` (schema version 3; ``data_prep.bonds``): each sample's neighbours within a cutoff,
  nearest first, padded to K slots: ``bonds/distance_ang`` (n, K) float32 (Å, 0 in empty slots),
  ``bonds/neighbour_z`` (n, K) int16 (atomic number, 0 in empty slots), ``bonds/mask`` (n, K)
  uint8 (1 = a neighbour), ``bonds/centre_z`` (n,) int16, ``bonds/n_within`` (n,) int32
  (neighbours within the cutoff before truncation to K); root attr ``bonds`` (JSON: cutoff_ang,
  slots). Optional for readers: files of version 2 and hand-made files have none (``Reader.bonds``
  returns None).
- ``meta/family_id`` (n,) strings: the substitution/prototype family of the sample's material
  (``data_prep.families``).
- ``split`` (n,) strings ``train``/``val``/``test``, grouped by family (or by material, see the
  ``config`` attribute's ``split_by``): no family has samples in two splits.
- ``materials/*`` (M,): ``material_id``, ``formula``, ``origin``, ``method``, ``split``,
  ``family_id``, ``parent_id``, ``prototype_group``,
  ``structure_json`` (pymatgen ``Structure.as_dict``), ``gii_vu``, ``band_gap_ev``,
  ``reference_ev``, ``f_weight_fraction``, ``n_samples``, ``bv_params_json``.
- root attrs: ``schema_version`` (``SCHEMA_VERSION``), ``grid``, ``config``, ``reference_rule``,
  ``citations``, ``skipped`` (materials with reasons), ``versions``, ``source``,
  ``data_prep_version``, ``shard`` (sharded builds only).

A file without ``schema_version``, older than ``MIN_READ_VERSION`` or newer than ``SCHEMA_VERSION``,
is refused with a one-line ``BuildError`` that says how to rebuild it.
"""
from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Version of this layout, stored as the root attribute ``schema_version`` of every file written.
SCHEMA_VERSION = 3  # 2: meta/family_id, materials/family_id, materials/parent_id; 3: bonds/*
#: The oldest version still read: version 2 lacks only the bond table, which only bond models need.
MIN_READ_VERSION = 2
VERSION_ATTR = "schema_version"

TARGETS = ("bvs_vu", "valence", "bvs_deviation_vu", "gii_vu")
SPLITS = ("train", "val", "test")
#: The plausible range of every bond valence target, |value| <= TARGET_LIMIT (valence units;
#: electrons for the valence): build skips a material beyond it and train.py refuses such a file.
TARGET_LIMIT = 10.0
#: Optional per-sample targets (present in builds since the migration targets were added).
MIGRATION_TARGETS = ("migration_e1d_ev", "migration_e2d_ev", "migration_e3d_ev")
#: The plausible range of the BVSE migration barriers, 0 <= E <= MIGRATION_LIMIT_EV (eV). A BVSE
#: percolation energy is measured from the minimum of the mobile ion's site-energy landscape, so
#: it cannot be negative; bvlain bisects it below ``encut`` (5 eV in ``data_prep.migration``) and
#: stores no value above; ion migration barriers measured in solids lie below about 3 eV. 20 eV,
#: four times the search ceiling, lets any encut a user may choose through and catches only values
#: the method cannot give (a damaged cache, a wrong unit). NaN is no barrier (not the mobile ion's
#: site, no percolation below encut, no mobile ion): allowed. Build drops a barrier outside the
#: range (NaN, the reason in the manifest) and train.py refuses a file holding one.
MIGRATION_LIMIT_EV = 20.0


@dataclass(frozen=True)
class PlausibleRange:
    """Where a target's values may lie: ``low <= value <= high``; ``text`` says it in words."""

    low: float
    high: float
    text: str

    def holds(self, values) -> np.ndarray:
        """Elementwise: inside the range (NaN and infinities are not)."""
        v = np.asarray(values, dtype=float)
        return (v >= self.low) & (v <= self.high)


def plausible_range(target: str) -> PlausibleRange:
    """The plausible range of target ``target`` (``TARGETS``, ``MIGRATION_TARGETS``, or a trainer
    target such as ``bvs_vu``): ``MIGRATION_LIMIT_EV`` for a barrier, ``TARGET_LIMIT`` otherwise."""
    if target in MIGRATION_TARGETS:
        return PlausibleRange(0.0, MIGRATION_LIMIT_EV, f"0 <= {target} <= {MIGRATION_LIMIT_EV:g} eV")
    return PlausibleRange(-TARGET_LIMIT, TARGET_LIMIT, f"|{target}| <= {TARGET_LIMIT:g}")
MIGRATION_ATTR = "migration"

DOS = "dos"
STRUCTURE = "structure"
STRUCTURE_LABELS = "structure_labels"
STRUCTURE_FAMILIES = "structure_families"
SPLIT = "split"
BOND_GROUP = "bonds/"
#: The bond table's per-sample datasets (``data_prep.bonds.BondTable`` fields).
BOND_FIELDS = ("distance_ang", "neighbour_z", "mask", "centre_z", "n_within")
BOND_DTYPES = {"distance_ang": "float32", "neighbour_z": "int16", "mask": "uint8", "centre_z": "int16",
               "n_within": "int32"}
BONDS_ATTR = "bonds"
CHANNEL_LABELS_ATTR = "channel_labels"
UNITS_ATTR = "units"
TARGET_GROUP = "targets/"
META_GROUP = "meta/"
MATERIALS_GROUP = "materials/"
MATERIAL_STRINGS = ("material_id", "formula", "origin", "method", "structure_json", "family_id", "parent_id",
                    "prototype_group")
MATERIAL_FLOATS = ("gii_vu", "band_gap_ev", "reference_ev", "f_weight_fraction")
GRID_ATTR = "grid"
CONFIG_ATTR = "config"
SKIPPED_ATTR = "skipped"
SHARD_ATTR = "shard"
REFERENCE_RULE_ATTR = "reference_rule"
#: Datasets with one row per sample (merge reorders them), by group prefix or root name.
PER_SAMPLE_GROUPS = (TARGET_GROUP, META_GROUP, BOND_GROUP)
PER_SAMPLE_ROOT = (DOS, STRUCTURE, SPLIT)
#: What every data_prep file holds (``open_h5`` checks).
REQUIRED = (DOS, STRUCTURE, STRUCTURE_LABELS, SPLIT, META_GROUP + "material_id", META_GROUP + "family_id",
            MATERIALS_GROUP + "material_id") \
    + tuple(TARGET_GROUP + t for t in TARGETS)
REBUILD_HINT = "rebuild it with: python -m data_prep build ... (or make data for data/embedded.h5)"


class BuildError(Exception):
    """A problem with a build or a data file as a whole (bad option, duplicate ids, existing
    output, unreadable or outdated file): reported on one line."""


class H5WriteError(BuildError):
    """Writing an h5 failed in HDF5 (disk full, I/O error). The half-written temporary file is
    removed, but HDF5 may still hold the file open in a state that crashes the interpreter at exit
    (h5py 3 closing a file whose last flush failed: exit status 139), so a command line reports
    this error and ends with ``os._exit`` (``data_prep.cli.error_tail``)."""

    exit_now = True  # error_tail: skip the interpreter's teardown

    @classmethod
    def of(cls, path, exc: OSError) -> "H5WriteError":
        why = os.strerror(exc.errno) if exc.errno else " ".join(str(exc).split())[:200]
        return cls(f"cannot write {path}: {why}; nothing was written (free some space and build again)"
                   if exc.errno == errno.ENOSPC else f"cannot write {path}: {why}")


def target(name: str) -> str:
    return TARGET_GROUP + name


def meta(name: str) -> str:
    return META_GROUP + name


def material(name: str) -> str:
    return MATERIALS_GROUP + name


def bond(name: str) -> str:
    return BOND_GROUP + name


def per_sample(name: str) -> bool:
    """True for a dataset with one row per sample."""
    return name in PER_SAMPLE_ROOT or name.startswith(PER_SAMPLE_GROUPS)


def _strings(values) -> np.ndarray:
    return np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=object)


# ----------------------------------------------------------------------------- writing
class Writer:
    """Writes the layout into an open, writable ``h5py.File`` (the caller owns the file and
    its atomic rename); stamps ``schema_version`` on creation."""

    def __init__(self, h5):
        import h5py

        self.h = h5
        self.str_dt = h5py.string_dtype()
        h5.attrs[VERSION_ATTR] = SCHEMA_VERSION

    def strings(self, name: str, values) -> None:
        self.h.create_dataset(name, data=_strings(values), dtype=self.str_dt)

    def dos(self, n: int, n_points: int, width: int, labels, units: str, compression="lzf", data=None):
        """The ``dos`` dataset, one sample per chunk; filled from ``data`` when given, else returned empty."""
        d = self.h.create_dataset(DOS, (n, n_points, width), dtype="float32", chunks=(1, n_points, width),
                                  compression=compression)
        d.attrs[CHANNEL_LABELS_ATTR] = labels
        d.attrs[UNITS_ATTR] = units
        if data is not None:
            d[...] = data
        return d

    def structure(self, values, labels, families) -> None:
        self.h[STRUCTURE] = np.asarray(values, dtype=np.float32)
        self.strings(STRUCTURE_LABELS, labels)
        self.strings(STRUCTURE_FAMILIES, families)

    def targets(self, values: dict) -> None:
        """``values``: every name of ``TARGETS`` -> (n,) values (stored as float32)."""
        for name in TARGETS:
            self.h[target(name)] = np.asarray(values[name], dtype=np.float32)

    def migration(self, per_sample: dict, per_material: dict, ion, info: dict) -> None:
        """The optional migration targets: ``MIGRATION_TARGETS`` -> (n,) per sample and (M,) per
        material, the mobile ion per material ('' if none) and the ``migration`` root attribute."""
        for name in MIGRATION_TARGETS:
            self.h[target(name)] = np.asarray(per_sample[name], dtype=np.float32)
            self.h[material(name)] = np.asarray(per_material[name], dtype=np.float64)
        self.strings(material("migration_ion"), ion)
        self.h.attrs[MIGRATION_ATTR] = json.dumps(info, sort_keys=True)

    def bonds(self, table, cutoff_ang: float) -> None:
        """The bond table (``data_prep.bonds.BondTable``: one row per sample) and the ``bonds``
        root attribute (cutoff and slots)."""
        for name in BOND_FIELDS:
            self.h[bond(name)] = np.asarray(getattr(table, name), dtype=BOND_DTYPES[name])
        self.h.attrs[BONDS_ATTR] = json.dumps({"cutoff_ang": float(cutoff_ang), "slots": int(table.slots)},
                                              sort_keys=True)

    def sample_meta(self, material_id, element, origin, site_index, family_id=None, **more) -> None:
        """Per-sample metadata: the string columns, ``site_index`` and any numeric ``more`` columns.
        ``family_id`` defaults to the material id (every material its own family)."""
        self.strings(meta("material_id"), material_id)
        self.strings(meta("family_id"), material_id if family_id is None else family_id)
        self.strings(meta("origin"), origin)
        self.strings(meta("element"), element)
        self.h[meta("site_index")] = np.asarray(site_index)
        for key, val in more.items():
            self.h[meta(key)] = val

    def split(self, labels) -> None:
        self.strings(SPLIT, labels)

    def materials(self, **columns) -> None:
        """Per-material columns; string columns (``MATERIAL_STRINGS``, ``split``,
        ``bv_params_json``) as strings, the rest as given."""
        for key, val in columns.items():
            if key in MATERIAL_STRINGS or key in ("split", "bv_params_json"):
                self.strings(material(key), val)
            else:
                self.h[material(key)] = val

    def attrs(self, **values) -> None:
        """Root attributes; dicts and lists are stored as JSON text."""
        for key, val in values.items():
            self.h.attrs[key] = json.dumps(val, sort_keys=True) if isinstance(val, (dict, list)) else val


# ----------------------------------------------------------------------------- reading
def check_version(attrs, path) -> None:
    """``BuildError`` unless ``attrs`` carry a version from ``MIN_READ_VERSION`` to ``SCHEMA_VERSION``."""
    version = attrs.get(VERSION_ATTR)
    if version is None or int(version) < MIN_READ_VERSION:
        found = "no schema version" if version is None else f"schema version {int(version)}"
        raise BuildError(f"{path} was written by an older data_prep ({found}; this code reads versions "
                         f"{MIN_READ_VERSION}-{SCHEMA_VERSION}): {REBUILD_HINT}")
    if int(version) > SCHEMA_VERSION:
        raise BuildError(f"{path} has h5 schema version {int(version)}, newer than this code reads "
                         f"({SCHEMA_VERSION}): update the code or {REBUILD_HINT}")


def open_raw(path, required=()):
    """The file as an ``h5py.File`` (read-only) after checking that it holds ``required`` and has
    this code's schema version; ``BuildError`` when missing, unreadable, foreign or outdated."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise BuildError(f"data file not found: {path}")
    try:
        h = h5py.File(path, "r")
    except OSError as exc:
        raise BuildError(f"{path} is not a readable HDF5 file (truncated or corrupt?): {exc}") from None
    try:
        missing = [k for k in required if k not in h]
        if missing:
            raise BuildError(f"{path} is not a data_prep file: missing {missing}")
        check_version(h.attrs, path)
    except BuildError:
        h.close()
        raise
    return h


class Reader:
    """Named access to an open data_prep h5 (a context manager; ``h`` is the raw ``h5py.File``)."""

    def __init__(self, h, path):
        self.h, self.path = h, str(path)

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.h.close()

    def __contains__(self, name: str) -> bool:
        return name in self.h

    @property
    def dos(self):
        """The ``dos`` h5py dataset (n, P, C): slice it to read."""
        return self.h[DOS]

    @property
    def n(self) -> int:
        return int(self.h[DOS].shape[0])

    def channel_labels(self) -> list:
        width = self.h[DOS].shape[2]
        return [str(x) for x in self.h[DOS].attrs.get(CHANNEL_LABELS_ATTR, [f"ch{j}" for j in range(width)])]

    def structure(self) -> np.ndarray:
        return np.asarray(self.h[STRUCTURE][...], dtype=np.float32)

    def structure_labels(self) -> list:
        return list(self.h[STRUCTURE_LABELS].asstr()[...])

    def structure_families(self) -> list:
        return list(self.h[STRUCTURE_FAMILIES].asstr()[...])

    def target(self, name: str) -> np.ndarray:
        return self.h[target(name)][...]

    def bonds(self):
        """The bond table as a ``data_prep.bonds.BondTable``, or None when the file has none
        (schema version 2, or written without one)."""
        from data_prep.bonds import BondTable

        if any(bond(name) not in self.h for name in BOND_FIELDS):
            return None
        return BondTable(**{name: np.asarray(self.h[bond(name)][...], dtype=BOND_DTYPES[name])
                            for name in BOND_FIELDS})

    def bond_settings(self) -> dict | None:
        """The ``bonds`` attribute (cutoff_ang, slots), or None."""
        return self.attr_json(BONDS_ATTR)

    def meta_strings(self, name: str) -> np.ndarray:
        return self.h[meta(name)].asstr()[...]

    def meta(self, name: str) -> np.ndarray:
        return np.asarray(self.h[meta(name)][...])

    def split(self) -> np.ndarray:
        return self.h[SPLIT].asstr()[...]

    def material_strings(self, name: str) -> np.ndarray:
        return self.h[material(name)].asstr()[...]

    def material(self, name: str) -> np.ndarray:
        return np.asarray(self.h[material(name)][...])

    def attr(self, name: str, default=None):
        return self.h.attrs.get(name, default)

    def attr_json(self, name: str, default=None):
        return json.loads(self.h.attrs[name]) if name in self.h.attrs else default

    def grid(self):
        """The file's ``EnergyGrid`` (``grid`` attribute), or None when it has none."""
        from data_prep.layout import EnergyGrid

        d = self.attr_json(GRID_ATTR)
        return EnergyGrid.from_dict(d) if d is not None else None


def open_h5(path, required=REQUIRED) -> Reader:
    """Open a data_prep h5 read-only as a ``Reader``; a missing, truncated, foreign or outdated file
    raises ``BuildError``."""
    return Reader(open_raw(path, required), path)


def open_dos(path):
    """(``h5py.File``, its ``dos`` dataset) for reading samples on demand (streaming)."""
    h = open_raw(path, (DOS,))
    return h, h[DOS]
