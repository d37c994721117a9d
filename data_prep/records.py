"""Canonical material records: the interchange format between every data source and the h5 builder.

A source (the embedded GFN1-xTB set, the Materials Project, a user's VASP runs) produces
``MaterialRecord`` objects; everything downstream reads only records. A record keeps pymatgen
objects (``Structure``) and a compact *spectral* form of the projected DOS: discrete states with
per-atom, per-orbital weights. A gridded pymatgen ``CompleteDos`` converts to the same form (each
grid point is a "state" of weight pdos * dE), so one gridding routine serves both.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

from data_prep.layout import GAP_THRESHOLD_EV, N_ORBITALS

ORIGINS = ("mineral", "prototype", "pymatgen-example", "substituted", "mp", "user",
           "ase-cod", "dans-diffraction", "crystals", "xrayutilities", "pyxtal", "cif2cell", "ncrystal")
RECORD_FORMAT_VERSION = 1


class RecordError(ValueError):
    """A record is malformed (bad shapes, NaN, missing projections)."""


@dataclass
class Spectrum:
    """Projected DOS as discrete states.

    Shapes (S states, A atoms of ``structure``, 9 orbitals in ``layout.ORBITALS`` order):

    - ``energies_ev``: (S,) float, absolute state energies in eV (not shifted).
    - ``weights``: (S, A, 9) float, states per cell, spin summed (a spin-restricted orbital that is
      fully inside the cell contributes 2); ``weights.sum()`` over all states of a complete basis is
      2 x number of basis functions (f excluded).
    - ``f_weight``: (A,) float, weight carried by f orbitals per atom, summed over the same states
      (not a channel; recorded so a user sees how much is dropped).
    - ``reference_ev``: the reference level (VBM if gapped, else Fermi level), eV absolute.
    - ``efermi_ev``, ``band_gap_ev``: as computed by the source.
    - ``n_electrons``: valence electrons per cell in the method's basis (for checks), or None.
    """

    energies_ev: np.ndarray
    weights: np.ndarray
    reference_ev: float
    efermi_ev: float
    band_gap_ev: float
    f_weight: np.ndarray | None = None
    n_electrons: float | None = None

    def validate(self, n_atoms: int) -> None:
        e = np.asarray(self.energies_ev)
        w = np.asarray(self.weights)
        if e.ndim != 1:
            raise RecordError(f"energies_ev must be 1-D, got shape {e.shape}")
        if w.ndim != 3 or w.shape[0] != e.shape[0] or w.shape[2] != N_ORBITALS:
            raise RecordError(
                f"weights must have shape (n_states={e.shape[0]}, n_atoms={n_atoms}, {N_ORBITALS}), got {w.shape}")
        if w.shape[1] != n_atoms:
            raise RecordError(f"weights cover {w.shape[1]} atoms but the structure has {n_atoms}")
        if w.shape[0] == 0:
            raise RecordError("spectrum has no states (no projected DOS)")
        if not (np.all(np.isfinite(e)) and np.all(np.isfinite(w))):
            raise RecordError("spectrum contains NaN or infinite values")
        for name in ("reference_ev", "efermi_ev", "band_gap_ev"):
            if not np.isfinite(getattr(self, name)):
                raise RecordError(f"{name} is not finite")

    @staticmethod
    def reference_from(vbm_ev: float, efermi_ev: float, band_gap_ev: float) -> float:
        """The reference-level rule of ``layout.REFERENCE_RULE``."""
        return float(vbm_ev if band_gap_ev > GAP_THRESHOLD_EV else efermi_ev)

    @classmethod
    def from_complete_dos(cls, cdos, structure: Structure | None = None) -> "Spectrum":
        """Spectral form of a pymatgen ``CompleteDos`` (each grid point is a state of weight pdos*dE).

        Spins are summed. Orbitals follow ``layout.ORBITALS``; f orbitals go to ``f_weight``.
        """
        from pymatgen.electronic_structure.core import Orbital, OrbitalType

        structure = structure if structure is not None else cdos.structure
        energies = np.asarray(cdos.energies, dtype=float)
        if energies.size < 2:
            raise RecordError("CompleteDos has fewer than 2 energy points")
        de = np.gradient(energies)
        if not cdos.pdos:
            raise RecordError("CompleteDos has no projected DOS")
        weights = np.zeros((energies.size, len(structure), N_ORBITALS))
        f_weight = np.zeros(len(structure))
        site_index = {_site_key(s): i for i, s in enumerate(structure)}
        for site, orb_dict in cdos.pdos.items():
            i = site_index.get(_site_key(site))
            if i is None:
                raise RecordError(f"CompleteDos projects on a site not in the structure: {site}")
            for orb, by_spin in orb_dict.items():
                dens = sum(np.asarray(v, dtype=float) for v in by_spin.values()) * de
                # match by the enum's value (0..8 = layout.ORBITALS order), not its name: pymatgen
                # renamed dx2 to dx2_y2 in 2026 releases
                if isinstance(orb, Orbital) and 0 <= orb.value < N_ORBITALS:
                    weights[:, i, orb.value] += dens
                elif getattr(orb, "orbital_type", None) == OrbitalType.f or str(orb).startswith("f"):
                    f_weight[i] += dens.sum()
                elif isinstance(orb, OrbitalType):
                    raise RecordError(
                        "CompleteDos is only l-resolved (s/p/d); m-resolved projections are needed "
                        "for the 9 channels")
        efermi = float(cdos.efermi)
        try:
            gap = float(cdos.get_gap())
            cbm, vbm = cdos.get_cbm_vbm()
        except (ValueError, IndexError):  # pymatgen cannot find band edges: treat as a metal
            gap, vbm = 0.0, efermi
        return cls(energies, weights, cls.reference_from(vbm, efermi, gap), efermi, gap, f_weight)


def _site_key(site) -> tuple:
    return (site.species_string, *np.round(site.frac_coords % 1.0, 4))


@dataclass
class MaterialRecord:
    """One material: identity, structure, projected DOS and provenance."""

    material_id: str
    formula: str
    origin: str
    method: str
    structure: Structure
    spectrum: Spectrum
    provenance: dict = field(default_factory=dict)

    def validate(self) -> None:
        if not self.material_id or "/" in self.material_id:
            raise RecordError(f"bad material id {self.material_id!r}")
        if self.origin not in ORIGINS:
            raise RecordError(f"{self.material_id}: unknown origin {self.origin!r}; expected one of {ORIGINS}")
        if not self.structure.is_ordered:
            raise RecordError(f"{self.material_id}: structure is disordered")
        self.spectrum.validate(len(self.structure))

    # --- serialisation: one compressed .npz per material ------------------------------------
    def to_npz_bytes(self, weight_dtype=np.float32) -> bytes:
        meta = {
            "format_version": RECORD_FORMAT_VERSION,
            "material_id": self.material_id, "formula": self.formula, "origin": self.origin,
            "method": self.method, "provenance": self.provenance,
            "structure": self.structure.as_dict(),
            "reference_ev": float(self.spectrum.reference_ev), "efermi_ev": float(self.spectrum.efermi_ev),
            "band_gap_ev": float(self.spectrum.band_gap_ev),
            "n_electrons": None if self.spectrum.n_electrons is None else float(self.spectrum.n_electrons),
        }
        arrays = {
            "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            "energies_ev": np.asarray(self.spectrum.energies_ev, dtype=np.float64),
            "weights": np.asarray(self.spectrum.weights, dtype=weight_dtype),
        }
        if self.spectrum.f_weight is not None:
            arrays["f_weight"] = np.asarray(self.spectrum.f_weight, dtype=np.float32)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_npz(cls, source) -> "MaterialRecord":
        """Read a record from a path or file object written by ``save``/``to_npz_bytes``."""
        try:
            with np.load(source, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                spectrum = Spectrum(
                    energies_ev=z["energies_ev"].astype(np.float64),
                    weights=z["weights"].astype(np.float32),
                    reference_ev=meta["reference_ev"], efermi_ev=meta["efermi_ev"],
                    band_gap_ev=meta["band_gap_ev"],
                    f_weight=z["f_weight"].astype(np.float64) if "f_weight" in z.files else None,
                    n_electrons=meta.get("n_electrons"))
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise RecordError(f"cannot read record {source}: {exc}") from exc
        except Exception as exc:  # zipfile.BadZipFile and friends
            raise RecordError(f"cannot read record {source}: {type(exc).__name__}: {exc}") from exc
        return cls(meta["material_id"], meta["formula"], meta["origin"], meta["method"],
                   Structure.from_dict(meta["structure"]), spectrum, meta.get("provenance", {}))

    def save(self, path: str | os.PathLike, weight_dtype=np.float32) -> Path:
        """Write atomically (temporary file in the same folder, then rename)."""
        return atomic_write_bytes(path, self.to_npz_bytes(weight_dtype))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace`` (no half-written files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # on disk before the rename: a power cut leaves the old file or the new one
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_records(folder: str | os.PathLike) -> list[MaterialRecord]:
    """All ``*.npz`` records of a folder, sorted by material id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RecordError(f"records folder not found: {folder}")
    recs = [MaterialRecord.from_npz(p) for p in sorted(folder.glob("*.npz"))]
    return sorted(recs, key=lambda r: r.material_id)
