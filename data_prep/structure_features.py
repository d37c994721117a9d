"""Structure-derived feature vector of a site, computed from the ``Structure`` alone.

Only the lattice, the element of each site and the atomic positions enter. No oxidation state,
no bond valence, nothing computed with bond valence parameters and no ``BVAnalyzer`` is used:
a structure decorated with oxidation states gives exactly the same features as the bare one
(species are reduced to their atomic numbers first; site properties such as magnetic moments
are dropped before the symmetry analysis). This keeps the vector independent of the
bond-valence targets that it is meant to help predict.

Families (switch them with ``StructureFeaturizer(families=...)``; columns keep this order):

- ``site`` (5): the centre site's element: ``Z``, ``group``, ``row``, Pauling electronegativity
  ``X``, empirical atomic radius ``radius_ang`` (pymatgen's periodic table data).
- ``neighbours`` (20): the same five properties over the site's coordination shell (below), as
  ``mean``, ``min``, ``max`` and population ``std``.
- ``coordination`` (2): ``cn``, the number of atoms in the coordination shell: every atom
  (periodic images included) at a distance ``d <= (1 + cn_tol) * d_min`` from the site, where
  ``d_min`` is the site's nearest-neighbour distance (default ``cn_tol = 0.2``; a fast geometric
  rule, rocksalt 6, rutile Ti 6); ``ecn``, Hoppe's effective coordination number
  ``sum_j exp(1 - (d_j / d_w)^6)`` over all atoms within ``shell_cutoff_ang``, with ``d_w`` the
  one-step weighted mean distance ``sum_j d_j w_j / sum_j w_j``, ``w_j = exp(1 - (d_j/d_min)^6)``.
- ``distances`` (5): over the coordination shell, ``d_min``, ``d_mean``, ``d_max``, ``d_std`` (Å)
  and Baur's distortion index ``mean |d - d_mean| / d_mean``.
- ``gaussian`` (41): CGCNN-style Gaussian expansion of the distances to all atoms within
  ``gauss_max_ang`` (8 Å): ``g_k = sum_j exp(-(d_j - mu_k)^2 / sigma^2)`` with centres
  ``mu_k = 0, 0.2, ..., 8.0`` Å and width ``sigma`` = the step (0.2 Å). It is a smoothed count of
  neighbours by distance: its first peak sits at the nearest-neighbour distance with a height
  close to the number of atoms at that distance.
- ``global`` (10): the material's ``density_g_cm3``, ``volume_per_atom_ang3``,
  ``spacegroup_number`` (spglib via pymatgen, ``symprec``), the lattice lengths ``a, b, c`` (Å)
  and angles ``alpha, beta, gamma`` (degrees) of the conventional standard cell (so that they do
  not depend on the cell choice of the input), and ``n_elements``.

Missing element data (no Pauling electronegativity for He, Ne, Ar; no tabulated empirical radius
for a few heavy elements, where pymatgen's calculated radius is used first) are filled with 0.0.

Cost: one neighbour list and one symmetry analysis per material; everything else is vectorised
over the sites asked for.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
from pymatgen.core import Element, Structure

FAMILIES: tuple[str, ...] = ("site", "neighbours", "coordination", "distances", "gaussian", "global")
ELEMENT_PROPERTIES: tuple[str, ...] = ("Z", "group", "row", "X", "radius_ang")
NEIGHBOUR_STATS: tuple[str, ...] = ("mean", "min", "max", "std")
GLOBAL_LABELS: tuple[str, ...] = ("density_g_cm3", "volume_per_atom_ang3", "spacegroup_number",
                                  "a_ang", "b_ang", "c_ang", "alpha_deg", "beta_deg", "gamma_deg",
                                  "n_elements")

CITATIONS: dict[str, str] = {
    "pymatgen": "S. P. Ong et al. (2013) Comput. Mater. Sci. 68, 314-319 (structures, neighbour "
                "lists, periodic table data: Pauling electronegativity, empirical atomic radii "
                "after J. C. Slater (1964) J. Chem. Phys. 41, 3199)",
    "spglib": "A. Togo, K. Shinohara & I. Tanaka (2024) Sci. Technol. Adv. Mater. Meth. 4, 2384822 "
              "(space group and conventional cell)",
    "cgcnn": "T. Xie & J. C. Grossman (2018) Phys. Rev. Lett. 120, 145301 (Gaussian expansion of "
             "neighbour distances)",
    "ecn": "R. Hoppe (1979) Z. Kristallogr. 150, 23-52 (effective coordination number)",
    "distortion": "W. H. Baur (1974) Acta Cryst. B30, 1195-1215 (distortion index)",
}


@functools.lru_cache(maxsize=1)
def _element_table() -> np.ndarray:
    """(119, 5) float64: ``ELEMENT_PROPERTIES`` by atomic number (row 0 unused)."""
    table = np.zeros((119, len(ELEMENT_PROPERTIES)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for z in range(1, 119):
            el = Element.from_Z(z)
            x = el.X
            radius = el.atomic_radius if el.atomic_radius is not None else el.atomic_radius_calculated
            vals = (z, el.group, el.row, x, radius)
            table[z] = [float(v) if v is not None and np.isfinite(float(v)) else 0.0 for v in vals]
    return table


def _group_stats(values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """(n, 4) mean, min, max, std of ``values`` grouped by ``owner`` (every group non-empty).

    ``owner`` must be sorted ascending.
    """
    counts = np.bincount(owner, minlength=n).astype(float)
    mean = np.bincount(owner, weights=values, minlength=n) / counts
    starts = np.searchsorted(owner, np.arange(n))
    vmin = np.minimum.reduceat(values, starts)
    vmax = np.maximum.reduceat(values, starts)
    var = np.bincount(owner, weights=(values - mean[owner]) ** 2, minlength=n) / counts
    return np.stack([mean, vmin, vmax, np.sqrt(np.maximum(var, 0.0))], axis=1)


class StructureFeaturizer:
    """Named per-site features from a ``Structure``, grouped in switchable families."""

    def __init__(self, families=FAMILIES, cn_tol: float = 0.2, shell_cutoff_ang: float = 6.0,
                 gauss_min_ang: float = 0.0, gauss_max_ang: float = 8.0, gauss_step_ang: float = 0.2,
                 symprec: float = 0.01):
        families = tuple(families)
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown feature families {unknown}; expected some of {list(FAMILIES)}")
        if not families:
            raise ValueError("at least one feature family is needed")
        if not (cn_tol >= 0 and shell_cutoff_ang > 0 and gauss_step_ang > 0
                and gauss_max_ang > gauss_min_ang and symprec > 0):
            raise ValueError("bad featurizer parameters")
        self.families = tuple(f for f in FAMILIES if f in families)  # canonical order
        self.cn_tol = float(cn_tol)
        self.shell_cutoff_ang = float(shell_cutoff_ang)
        self.gauss_centres_ang = np.round(
            np.arange(gauss_min_ang, gauss_max_ang + 0.5 * gauss_step_ang, gauss_step_ang), 6)
        self.gauss_sigma_ang = float(gauss_step_ang)
        self.gauss_max_ang = float(gauss_max_ang)
        self.symprec = float(symprec)

    # --- names -----------------------------------------------------------------------------
    def _labels_by_family(self) -> dict[str, list[str]]:
        return {
            "site": [f"site_{p}" for p in ELEMENT_PROPERTIES],
            "neighbours": [f"nbr_{p}_{s}" for p in ELEMENT_PROPERTIES for s in NEIGHBOUR_STATS],
            "coordination": ["cn", "ecn"],
            "distances": ["d_min_ang", "d_mean_ang", "d_max_ang", "d_std_ang", "distortion_index"],
            "gaussian": [f"gauss_{mu:.1f}" for mu in self.gauss_centres_ang],
            "global": list(GLOBAL_LABELS),
        }

    def feature_labels(self) -> list[str]:
        by = self._labels_by_family()
        return [label for f in self.families for label in by[f]]

    def families_of_labels(self) -> list[str]:
        by = self._labels_by_family()
        return [f for f in self.families for _ in by[f]]

    def n_features(self) -> int:
        return len(self.feature_labels())

    def citations(self) -> list[str]:
        keys = ["pymatgen"]
        if "global" in self.families:
            keys.append("spglib")
        if "gaussian" in self.families:
            keys.append("cgcnn")
        if "coordination" in self.families:
            keys.append("ecn")
        if "distances" in self.families:
            keys.append("distortion")
        return [CITATIONS[k] for k in keys]

    def as_dict(self) -> dict:
        return {"families": list(self.families), "cn_tol": self.cn_tol,
                "shell_cutoff_ang": self.shell_cutoff_ang,
                "gauss_centres_ang": [float(c) for c in self.gauss_centres_ang],
                "gauss_sigma_ang": self.gauss_sigma_ang, "symprec": self.symprec}

    # --- computing -------------------------------------------------------------------------
    def featurize(self, structure: Structure, site_indices=None) -> np.ndarray:
        """(n_sites, n_features) float32 for ``site_indices`` (default: every site)."""
        if not structure.is_ordered:
            raise ValueError("structure features need an ordered structure")
        z = np.asarray(structure.atomic_numbers, dtype=int)
        n_all = len(z)
        idx = np.arange(n_all) if site_indices is None else np.asarray(site_indices, dtype=int).ravel()
        if idx.size and (idx.min() < -n_all or idx.max() >= n_all):
            raise IndexError(f"site index out of range for a structure of {n_all} sites")
        idx = idx % n_all if idx.size else idx
        # elements only: nothing but lattice, atomic numbers and positions from here on
        bare = Structure(structure.lattice, z.tolist(), structure.frac_coords)
        n = idx.size
        if n == 0:
            return np.zeros((0, self.n_features()), dtype=np.float32)
        elem = _element_table()
        blocks: dict[str, np.ndarray] = {}

        if "site" in self.families:
            blocks["site"] = elem[z[idx]]

        need_nbrs = any(f in self.families for f in ("neighbours", "coordination", "distances", "gaussian"))
        if need_nbrs:
            radius = self.shell_cutoff_ang
            if "gaussian" in self.families:
                radius = max(radius, self.gauss_max_ang)
            sites = [bare[i] for i in idx]
            centre, other, _, dist = bare.get_neighbor_list(r=radius, sites=sites)
            # with an explicit site list pymatgen keeps each site itself (distance 0): drop it
            real = dist > 1e-6
            centre, other, dist = centre[real], other[real], dist[real]
            order = np.lexsort((dist, centre))
            centre, other, dist = centre[order], other[order], dist[order]
            if np.unique(centre).size != n:
                missing = sorted(set(range(n)) - set(np.unique(centre).tolist()))
                raise ValueError(f"sites {idx[missing].tolist()} have no neighbour within {radius} Å")
            first = np.searchsorted(centre, np.arange(n))
            d_min = dist[first]
            in_shell = dist <= (1.0 + self.cn_tol) * d_min[centre] + 1e-8
            s_owner, s_other, s_dist = centre[in_shell], other[in_shell], dist[in_shell]
            cn = np.bincount(s_owner, minlength=n).astype(float)

            if "neighbours" in self.families:
                props = elem[z[s_other]]
                blocks["neighbours"] = np.concatenate(
                    [_group_stats(props[:, k], s_owner, n) for k in range(props.shape[1])], axis=1)
            if "coordination" in self.families:
                within = dist <= self.shell_cutoff_ang
                c_owner, c_dist = centre[within], dist[within]
                w = np.exp(1.0 - (c_dist / d_min[c_owner]) ** 6)
                d_w = (np.bincount(c_owner, weights=c_dist * w, minlength=n)
                       / np.bincount(c_owner, weights=w, minlength=n))
                ecn = np.bincount(c_owner, weights=np.exp(1.0 - (c_dist / d_w[c_owner]) ** 6),
                                  minlength=n)
                blocks["coordination"] = np.stack([cn, ecn], axis=1)
            if "distances" in self.families:
                st = _group_stats(s_dist, s_owner, n)
                dev = np.bincount(s_owner, weights=np.abs(s_dist - st[s_owner, 0]), minlength=n) / cn
                blocks["distances"] = np.stack(
                    [st[:, 1], st[:, 0], st[:, 2], st[:, 3], dev / st[:, 0]], axis=1)
            if "gaussian" in self.families:
                g_sel = dist <= self.gauss_max_ang
                g_owner, g_dist = centre[g_sel], dist[g_sel]
                mu = self.gauss_centres_ang
                g = np.zeros((n, mu.size))
                # chunk the (pairs x centres) product to bound memory on big cells
                step = 200_000
                for s0 in range(0, g_dist.size, step):
                    e = np.exp(-((g_dist[s0:s0 + step, None] - mu[None, :]) / self.gauss_sigma_ang) ** 2)
                    np.add.at(g, g_owner[s0:s0 + step], e)
                blocks["gaussian"] = g

        if "global" in self.families:
            blocks["global"] = np.broadcast_to(self._global(bare), (n, len(GLOBAL_LABELS)))

        out = np.concatenate([blocks[f] for f in self.families], axis=1).astype(np.float32)
        if not np.all(np.isfinite(out)):
            raise ValueError("non-finite structure feature (degenerate structure?)")
        return out

    def _global(self, bare: Structure) -> np.ndarray:
        from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

        sga = SpacegroupAnalyzer(bare, symprec=self.symprec)
        number = sga.get_space_group_number()
        lat = sga.get_conventional_standard_structure().lattice
        return np.array([bare.density, bare.volume / len(bare), number, *lat.abc, *lat.angles,
                         len(bare.composition.elements)], dtype=float)
