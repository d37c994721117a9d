"""The one place that defines the energy grid, the orbital order and the channel layout.

Everything that grids a DOS, lays out channels or names them imports from here; nothing else
hard-codes 2000, 9 or 27.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Orbital order of one atom's channels: pymatgen's ``Orbital`` enum order (= VASP's lm order,
#: = upstream DOSnet's per-atom order). f states are not a channel.
ORBITALS: tuple[str, ...] = ("s", "py", "pz", "px", "dxy", "dyz", "dz2", "dxz", "dx2")
N_ORBITALS: int = len(ORBITALS)
#: Orbital groups used by importance analysis and summaries.
ORBITAL_GROUPS: dict[str, tuple[int, ...]] = {"s": (0,), "p": (1, 2, 3), "d": (4, 5, 6, 7, 8)}

#: Band gap (eV) above which the reference level is the valence-band maximum; below it the
#: material is treated as a metal and the Fermi level is the reference.
GAP_THRESHOLD_EV: float = 0.1
REFERENCE_RULE: str = (
    f"energies relative to the valence-band maximum when the band gap > {GAP_THRESHOLD_EV} eV, "
    "else relative to the Fermi level"
)

DEFAULT_N_NEIGHBOURS: int = 2


@dataclass(frozen=True)
class EnergyGrid:
    """Uniform energy grid relative to the reference level.

    ``energies_ev[i] = emin_ev + i * step_ev`` for ``i = 0 .. n_points - 1``; the default is
    DOSnet's 2000 points from -14 eV in 0.01 eV steps (last point 5.99 eV).
    """

    emin_ev: float = -14.0
    emax_ev: float = 6.0
    n_points: int = 2000
    sigma_ev: float = 0.1  # Gaussian smearing width (standard deviation)

    def __post_init__(self):
        if self.n_points < 2:
            raise ValueError(f"energy grid needs at least 2 points, got {self.n_points}")
        if not self.emax_ev > self.emin_ev:
            raise ValueError(f"energy grid: emax_ev ({self.emax_ev}) must exceed emin_ev ({self.emin_ev})")
        if not self.sigma_ev > 0:
            raise ValueError(f"smearing width sigma_ev must be positive, got {self.sigma_ev}")

    @property
    def step_ev(self) -> float:
        return (self.emax_ev - self.emin_ev) / self.n_points

    @property
    def energies_ev(self) -> np.ndarray:
        """(n_points,) float64, eV relative to the reference level."""
        return self.emin_ev + self.step_ev * np.arange(self.n_points)

    def as_dict(self) -> dict:
        return {"emin_ev": self.emin_ev, "emax_ev": self.emax_ev, "n_points": self.n_points,
                "sigma_ev": self.sigma_ev}

    @classmethod
    def from_dict(cls, d: dict) -> "EnergyGrid":
        return cls(**{k: d[k] for k in ("emin_ev", "emax_ev", "n_points", "sigma_ev") if k in d})


DEFAULT_GRID = EnergyGrid()


def atom_roles(n_neighbours: int = DEFAULT_N_NEIGHBOURS) -> list[str]:
    """Names of the atoms of one sample: the centre site, then its neighbours by distance."""
    return ["site"] + [f"nbr{i + 1}" for i in range(n_neighbours)]


def n_channels(n_neighbours: int = DEFAULT_N_NEIGHBOURS) -> int:
    """Channels of one sample: (1 + n_neighbours) atoms x 9 orbitals (27 by default)."""
    return (1 + n_neighbours) * N_ORBITALS


def channel_labels(n_neighbours: int = DEFAULT_N_NEIGHBOURS) -> list[str]:
    """Label of each of the sample's channels, atom-major: ``site:s, site:py, ..., nbr2:dx2``."""
    return [f"{role}:{orb}" for role in atom_roles(n_neighbours) for orb in ORBITALS]


def channel_index(role: str, orbital: str, n_neighbours: int = DEFAULT_N_NEIGHBOURS) -> int:
    """Index of one channel in the sample layout, e.g. ``channel_index('nbr1', 'px')``."""
    roles = atom_roles(n_neighbours)
    if role not in roles:
        raise ValueError(f"unknown atom role {role!r}; expected one of {roles}")
    if orbital not in ORBITALS:
        raise ValueError(f"unknown orbital {orbital!r}; expected one of {list(ORBITALS)}")
    return roles.index(role) * N_ORBITALS + ORBITALS.index(orbital)
