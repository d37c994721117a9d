"""Structures of the embedded dataset (collected from packages the project already installs)."""
from __future__ import annotations

from dataclasses import dataclass, field

from pymatgen.core import Structure


@dataclass
class StructureEntry:
    """One structure to compute: id (file-name safe), formula, origin (see records.ORIGINS)."""

    material_id: str
    formula: str
    origin: str
    structure: Structure
    provenance: dict = field(default_factory=dict)
