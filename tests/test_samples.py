"""Sample selection (symmetry-distinct sites + nearest neighbours) and the per-sample DOS layout."""
from __future__ import annotations

import functools

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from data_prep.grid import grid_atoms
from data_prep.layout import DEFAULT_GRID, N_ORBITALS, ORBITALS, channel_index, channel_labels
from data_prep.records import Spectrum
from data_prep.samples import Sample, SampleSelectionError, sample_dos, select_samples

A_NACL = 5.64
A_STO = 3.905


@functools.lru_cache(maxsize=None)
def _nacl(primitive):
    s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(A_NACL), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    return s.get_primitive_structure() if primitive else s


@functools.lru_cache(maxsize=None)
def _srtio3():
    return Structure.from_spacegroup("Pm-3m", Lattice.cubic(A_STO), ["Sr", "Ti", "O"],
                                     [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]])


def nacl(primitive=False):  # from_spacegroup is slow for Fm-3m: build once, hand out copies
    return _nacl(primitive).copy()


def srtio3():
    return _srtio3().copy()


@pytest.mark.parametrize("primitive", [False, True])
def test_rocksalt_gives_two_samples_with_neighbours_at_half_a(primitive):
    s = nacl(primitive)
    samples = select_samples(s)
    assert sorted(x.element for x in samples) == ["Cl", "Na"]
    assert [x.site_index for x in samples] == sorted(x.site_index for x in samples)
    assert sum(x.multiplicity for x in samples) == len(s)
    for x in samples:
        assert x.n_neighbours == 2
        np.testing.assert_allclose(x.neighbour_distances_ang, [A_NACL / 2] * 2, atol=1e-6)
        other = "Cl" if x.element == "Na" else "Na"
        assert all(s[i].species_string == other for i in x.neighbour_indices)
        assert x.site_index == min(x.equivalent_indices)


def test_neighbour_images_reproduce_the_distances():
    s = nacl(primitive=True)
    for x in select_samples(s, n_neighbours=6):
        for i, img, d in zip(x.neighbour_indices, x.neighbour_images, x.neighbour_distances_ang):
            cart = s.lattice.get_cartesian_coords(s[i].frac_coords + np.array(img) - s[x.site_index].frac_coords)
            assert np.linalg.norm(cart) == pytest.approx(d, abs=1e-8)
        # in the 2-atom cell all six neighbours are images of the one counter-ion
        assert len(set(x.neighbour_indices)) == 1 and len(set(x.neighbour_images)) == 6


def test_perovskite_gives_three_samples():
    s = srtio3()
    samples = select_samples(s)
    assert [x.element for x in samples] == ["Sr", "Ti", "O"]
    assert [x.multiplicity for x in samples] == [1, 1, 3]
    by_el = {x.element: x for x in samples}
    np.testing.assert_allclose(by_el["Ti"].neighbour_distances_ang, [A_STO / 2] * 2, atol=1e-6)
    np.testing.assert_allclose(by_el["O"].neighbour_distances_ang, [A_STO / 2] * 2, atol=1e-6)
    np.testing.assert_allclose(by_el["Sr"].neighbour_distances_ang, [A_STO / np.sqrt(2)] * 2, atol=1e-6)
    assert {s[i].species_string for i in by_el["O"].neighbour_indices} == {"Ti"}
    assert {s[i].species_string for i in by_el["Sr"].neighbour_indices} == {"O"}


def _all_candidates(structure, centre, radius=8.0):
    """Independent enumeration of every neighbour with the documented sort key."""
    out = []
    for nb in structure.get_neighbors(structure[centre], radius):
        img = tuple(int(v) for v in np.rint(nb.image))
        if nb.index == centre and img == (0, 0, 0):
            continue
        out.append((round(nb.nn_distance, 4), nb.index, img))
    return sorted(out)


@pytest.mark.parametrize("make", [nacl, srtio3, lambda: nacl(primitive=True)])
def test_ties_are_broken_deterministically(make):
    s = make()
    first = select_samples(s, n_neighbours=4)
    assert select_samples(s.copy(), n_neighbours=4) == first
    for x in first:
        expected = _all_candidates(s, x.site_index)[:4]
        assert list(x.neighbour_indices) == [k[1] for k in expected]
        assert list(x.neighbour_images) == [k[2] for k in expected]


def test_tie_rounding_prefers_lower_index_then_distance():
    lat = Lattice.cubic(20.0)

    def make(d1):
        # centre Na; Cl (index 1) at d1 along x; Br (index 2) at exactly 2.0 along y
        return Structure(lat, ["Na", "Cl", "Br"], [[0, 0, 0], [d1, 0, 0], [0, 2.0, 0]],
                         coords_are_cartesian=True)

    tied = select_samples(make(2.00003), n_neighbours=2)[0]
    assert tied.site_index == 0 and tied.neighbour_indices == (1, 2)  # equal to 1e-4 Å: index decides
    apart = select_samples(make(2.0002), n_neighbours=2)[0]
    assert apart.neighbour_indices == (2, 1)  # 2e-4 Å apart: distance decides


def _boundary_structure():
    """Na near x=0 whose nearest neighbour (Cl) is an image across the x boundary."""
    lat = Lattice.cubic(10.0)
    species = ["Na", "Cl", "K", "Br"]
    coords = [[0.05, 0.5, 0.5], [0.80, 0.5, 0.5], [0.05, 0.5, 0.82], [0.05, 0.2, 0.5]]
    return Structure(lat, species, coords)


def _patterned_spectrum(n_atoms):
    """Each atom carries weight in its own orbital at its own energy, plus a fingerprint elsewhere."""
    n_states = 2 * n_atoms
    e = np.zeros(n_states)
    w = np.zeros((n_states, n_atoms, N_ORBITALS))
    for a in range(n_atoms):
        e[2 * a] = -2.0 - a
        w[2 * a, a, (2 * a + 1) % N_ORBITALS] = a + 1.0
        e[2 * a + 1] = 1.0 + 0.5 * a
        w[2 * a + 1, a, :] = np.linspace(0.1, 0.9, N_ORBITALS) * (a + 1)
    return Spectrum(energies_ev=e, weights=w, reference_ev=0.0, efermi_ev=0.0, band_gap_ev=0.0)


def test_neighbour_channels_are_the_neighbour_atoms_own_projection():
    s = _boundary_structure()
    spec = _patterned_spectrum(len(s))
    samples = select_samples(s)
    na = samples[0]
    assert na.element == "Na"
    assert na.neighbour_indices == (1, 3)  # Cl across the boundary (2.5 Å), then Br (3.0 Å)
    assert na.neighbour_images[0] == (-1, 0, 0)
    np.testing.assert_allclose(na.neighbour_distances_ang, [2.5, 3.0], atol=1e-8)

    x = sample_dos(spec, s, samples)
    assert x.shape == (len(samples), DEFAULT_GRID.n_points, len(channel_labels())) and x.dtype == np.float32
    for i, smp in enumerate(samples):
        own, _ = grid_atoms(spec, list(smp.atom_indices))
        for r, atom in enumerate(smp.atom_indices):
            block = x[i, :, r * N_ORBITALS:(r + 1) * N_ORBITALS]
            np.testing.assert_array_equal(block, own[r])
            # the block's signature: strongest orbital and its energy identify the atom
            k = (2 * atom + 1) % N_ORBITALS
            low = DEFAULT_GRID.energies_ev < -1.0
            assert np.argmax(block[low].max(axis=0)) == k
            peak = DEFAULT_GRID.energies_ev[low][np.argmax(block[low, k])]
            assert abs(peak - (-2.0 - atom)) < 0.011
    # channel labels: nbr1's px of the Na sample is the Cl atom's px
    j = channel_index("nbr1", "px")
    cl, _ = grid_atoms(spec, [1])
    np.testing.assert_array_equal(x[0, :, j], cl[0, :, ORBITALS.index("px")])


def test_sample_dos_outside_and_neighbour_count():
    s = srtio3()
    rng = np.random.default_rng(2)
    spec = Spectrum(energies_ev=rng.uniform(-30, 15, 200), weights=rng.random((200, len(s), N_ORBITALS)),
                    reference_ev=0.0, efermi_ev=0.0, band_gap_ev=2.0)
    samples = select_samples(s, n_neighbours=4)
    x, out = sample_dos(spec, s, samples, return_outside=True)
    assert x.shape == (3, DEFAULT_GRID.n_points, 5 * N_ORBITALS)
    assert out.shape == (3, 5 * N_ORBITALS) and np.all(out > 0)
    assert sample_dos(spec, s, []).shape == (0, DEFAULT_GRID.n_points, 27)
    with pytest.raises(ValueError, match="atoms"):
        sample_dos(spec, nacl(), samples)
    mixed = [samples[0], Sample(1, (2,), (1.9,), ((0, 0, 0),))]
    with pytest.raises(ValueError, match="neighbours"):
        sample_dos(spec, s, mixed)


def test_selection_errors():
    s = nacl(primitive=True)
    with pytest.raises(SampleSelectionError, match="fewer than 2 neighbours"):
        select_samples(s, max_radius_ang=2.0)
    dis = nacl(primitive=True)
    dis.replace(0, {"Na": 0.5, "K": 0.5})
    with pytest.raises(SampleSelectionError, match="disordered"):
        select_samples(dis)
    with pytest.raises(ValueError):
        select_samples(s, n_neighbours=-1)
    zero = select_samples(s, n_neighbours=0)
    assert [x.n_neighbours for x in zero] == [0, 0]


def test_equivalence_classes_match_symmetrized_structure():
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    from data_prep.samples import equivalent_site_classes

    rutile = Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.594, 2.959), ["Ti", "O"],
                                       [[0, 0, 0], [0.305, 0.305, 0]])
    for s in (nacl(), srtio3(), rutile, _boundary_structure()):
        ref = SpacegroupAnalyzer(s, symprec=0.01).get_symmetrized_structure().equivalent_indices
        assert equivalent_site_classes(s) == sorted(sorted(c) for c in ref)
