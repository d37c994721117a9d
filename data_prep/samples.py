"""Samples of a material: one per symmetry-distinct site, with its nearest neighbours.

A sample is the centre site plus its ``n_neighbours`` nearest neighbours (``layout.atom_roles``);
its DOS input is those atoms' 9 orbital channels each, atom-major (``layout.channel_labels``).

Rules (deterministic for a given structure):

- **Sites.** Equivalence classes are pymatgen's ``SpacegroupAnalyzer(structure,
  symprec=symprec).get_symmetrized_structure().equivalent_indices``, read from the symmetry
  dataset's ``equivalent_atoms`` they are built from (half the spglib work); ``symprec``
  defaults to 0.01 Å (``DEFAULT_SYMPREC``). The representative of a class is its lowest structure index;
  samples are ordered by that index.
- **Neighbours.** All atoms around the centre, periodic images included, ordered by distance;
  the centre atom itself (image (0, 0, 0)) is excluded, but a periodic image of the centre is
  an ordinary candidate (in a small cell it can be among the nearest). Ties are broken by the
  distance rounded to 1e-4 Å, then the cell atom index, then the image vector
  lexicographically. A neighbour is reported as the index of its cell atom plus its image
  (lattice translation): its projected DOS is that cell atom's own projection, which is
  exact because a lattice translation leaves the m-resolved orbitals unchanged (a symmetry
  representative's projection would not be: p and d channels rotate under point operations).
- The search radius starts at ``INITIAL_RADIUS_ANG`` and grows up to ``max_radius_ang``
  (default 12 Å); a site with fewer than ``n_neighbours`` atoms within that is an error.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_prep.grid import grid_atoms
from data_prep.layout import DEFAULT_GRID, DEFAULT_N_NEIGHBOURS, N_ORBITALS, EnergyGrid, n_channels
from data_prep.records import Spectrum

#: Default symmetry tolerance (Å) for the site equivalence classes.
DEFAULT_SYMPREC: float = 0.01
#: First neighbour-search radius (Å); grown by ``RADIUS_GROWTH`` until enough atoms are found.
INITIAL_RADIUS_ANG: float = 4.0
RADIUS_GROWTH: float = 1.5
DEFAULT_MAX_RADIUS_ANG: float = 12.0
#: Distances are compared after rounding to this many decimals (1e-4 Å) when breaking ties.
DISTANCE_DECIMALS: int = 4


class SampleSelectionError(ValueError):
    """Samples cannot be selected for a structure (symmetry analysis failed, too few neighbours)."""


@dataclass(frozen=True)
class Sample:
    """One sample: a symmetry-distinct site and its nearest neighbours (indices into the structure).

    Neighbour ``k`` sits at fractional position ``structure[neighbour_indices[k]].frac_coords +
    neighbour_images[k]`` (the structure's stored coordinates, not wrapped into the cell), at
    ``neighbour_distances_ang[k]`` from the site. The same cell atom can appear more than once
    (different images), e.g. both neighbours of Na in a 2-atom rocksalt cell are images of the
    one Cl atom.
    """

    site_index: int
    neighbour_indices: tuple[int, ...]
    neighbour_distances_ang: tuple[float, ...]
    neighbour_images: tuple[tuple[int, int, int], ...]
    element: str = ""
    equivalent_indices: tuple[int, ...] = ()

    @property
    def n_neighbours(self) -> int:
        return len(self.neighbour_indices)

    @property
    def multiplicity(self) -> int:
        """Number of sites of the cell equivalent to this one."""
        return len(self.equivalent_indices)

    @property
    def atom_indices(self) -> tuple[int, ...]:
        """Structure indices in channel order: the site, then its neighbours by distance."""
        return (self.site_index, *self.neighbour_indices)


def equivalent_site_classes(structure, symprec: float = DEFAULT_SYMPREC) -> list[list[int]]:
    """Symmetry-equivalence classes of the structure's sites, each sorted, ordered by lowest index."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    if len(structure) == 0:
        raise SampleSelectionError("structure has no sites")
    if not structure.is_ordered:
        raise SampleSelectionError("structure is disordered; samples need an ordered structure")
    try:
        dataset = SpacegroupAnalyzer(structure, symprec=symprec).get_symmetry_dataset()
        labels = getattr(dataset, "equivalent_atoms", None)
        if labels is None:  # older pymatgen/spglib return a dict
            labels = dataset["equivalent_atoms"]
    except Exception as exc:  # spglib failures surface as various exception types
        raise SampleSelectionError(
            f"symmetry analysis failed (symprec={symprec}): {type(exc).__name__}: {exc}") from exc
    labels = np.asarray(labels)
    if labels.shape != (len(structure),):
        raise SampleSelectionError(
            f"symmetry analysis returned {labels.shape} equivalence labels for {len(structure)} sites")
    # The same grouping as get_symmetrized_structure().equivalent_indices (built from this very
    # array), without the second spglib call that building the symmetrized structure costs.
    classes = [np.flatnonzero(labels == lab).tolist() for lab in np.unique(labels)]
    classes = sorted((sorted(int(i) for i in c) for c in classes), key=lambda c: c[0])
    flat = sorted(i for c in classes for i in c)
    if flat != list(range(len(structure))):
        raise SampleSelectionError(
            "symmetry analysis returned equivalence classes that do not partition the sites")
    return classes


def _nearest(structure, centres: list[int], n: int, radius: float):
    """For each centre, its ``n`` nearest neighbours within ``radius`` (or None if too few)."""
    c_idx, p_idx, images, dist = structure.get_neighbor_list(
        radius, sites=[structure[i] for i in centres], exclude_self=False)
    images = np.rint(images).astype(int) if len(images) else np.zeros((0, 3), dtype=int)
    out = []
    for k, centre in enumerate(centres):
        sel = np.flatnonzero(c_idx == k)
        p, img, d = p_idx[sel], images[sel], dist[sel]
        not_self = ~((p == centre) & np.all(img == 0, axis=1))
        p, img, d = p[not_self], img[not_self], d[not_self]
        d_round = np.round(d, DISTANCE_DECIMALS)
        order = np.lexsort((img[:, 2], img[:, 1], img[:, 0], p, d_round))[:n]
        # Everything tied with the n-th candidate must lie safely inside the radius.
        if order.size < n or (n and d_round[order[-1]] > radius - 10.0 ** (1 - DISTANCE_DECIMALS)):
            out.append(None)
            continue
        out.append((tuple(int(i) for i in p[order]), tuple(float(x) for x in d[order]),
                    tuple(tuple(int(v) for v in row) for row in img[order])))
    return out


def select_samples(structure, n_neighbours: int = DEFAULT_N_NEIGHBOURS,
                   symprec: float = DEFAULT_SYMPREC,
                   max_radius_ang: float = DEFAULT_MAX_RADIUS_ANG) -> list[Sample]:
    """One :class:`Sample` per symmetry-distinct site of ``structure`` (see the module docstring).

    Raises :class:`SampleSelectionError` for a disordered structure, a failed symmetry
    analysis, or a site with fewer than ``n_neighbours`` atoms within ``max_radius_ang``.
    """
    if int(n_neighbours) != n_neighbours or n_neighbours < 0:
        raise ValueError(f"n_neighbours must be a non-negative integer, got {n_neighbours!r}")
    n_neighbours = int(n_neighbours)
    classes = equivalent_site_classes(structure, symprec)
    centres = [c[0] for c in classes]
    found: dict[int, tuple] = {}
    if n_neighbours == 0:
        found = {c: ((), (), ()) for c in centres}
    radius = min(INITIAL_RADIUS_ANG, max_radius_ang)
    pending = [c for c in centres if c not in found]
    while pending:
        for centre, res in zip(pending, _nearest(structure, pending, n_neighbours, radius)):
            if res is not None:
                found[centre] = res
        pending = [c for c in pending if c not in found]
        if pending and radius >= max_radius_ang:
            lacking = ", ".join(f"{structure[c].species_string}{c}" for c in pending)
            raise SampleSelectionError(
                f"fewer than {n_neighbours} neighbours within {max_radius_ang:g} Å of site(s) {lacking}")
        radius = min(radius * RADIUS_GROWTH, max_radius_ang)
    samples = []
    for cls in classes:
        nbrs, dists, imgs = found[cls[0]]
        samples.append(Sample(site_index=cls[0], neighbour_indices=nbrs, neighbour_distances_ang=dists,
                              neighbour_images=imgs, element=structure[cls[0]].species_string,
                              equivalent_indices=tuple(cls)))
    return samples


def sample_dos(spectrum: Spectrum, structure, samples: list[Sample], grid: EnergyGrid = DEFAULT_GRID,
               return_outside: bool = False):
    """DOS input of ``samples``: (n_samples, n_points, (1 + n) * 9) float32, states/eV.

    Channels follow ``layout.channel_labels(n)`` (atom-major: site, nbr1, ..., each with the 9
    orbitals). Every atom needed by any sample is gridded once (:func:`grid.grid_atoms`) and the
    samples index into that. With ``return_outside`` also returns (n_samples, (1 + n) * 9): the
    weight of each channel's states that falls beyond the grid window.
    """
    n_atoms = np.shape(spectrum.weights)[1]
    if structure is not None and len(structure) != n_atoms:
        raise ValueError(f"spectrum covers {n_atoms} atoms but the structure has {len(structure)}")
    counts = {s.n_neighbours for s in samples}
    if len(counts) > 1:
        raise ValueError(f"samples have different numbers of neighbours: {sorted(counts)}")
    n = counts.pop() if counts else DEFAULT_N_NEIGHBOURS
    n_ch = n_channels(n)
    if not samples:
        empty = np.zeros((0, grid.n_points, n_ch), dtype=np.float32)
        return (empty, np.zeros((0, n_ch))) if return_outside else empty
    atoms = np.array([s.atom_indices for s in samples], dtype=np.intp)  # (n_samples, 1 + n)
    unique, inverse = np.unique(atoms, return_inverse=True)
    dos, outside = grid_atoms(spectrum, unique, grid)  # (K, n_points, 9), (K, 9)
    inverse = inverse.reshape(atoms.shape)
    # (n_samples, 1+n, n_points, 9) -> (n_samples, n_points, 1+n, 9) -> atom-major channels
    x = dos[inverse].transpose(0, 2, 1, 3).reshape(len(samples), grid.n_points, n_ch)
    x = np.ascontiguousarray(x)
    if return_outside:
        return x, outside[inverse].reshape(len(samples), (1 + n) * N_ORBITALS)
    return x
