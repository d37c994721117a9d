"""Gridding of spectral-form DOS: normalisation, peak position, channel sums, outside weight."""
from __future__ import annotations

import math

import numpy as np
import pytest

from data_prep import grid as grid_mod
from data_prep.grid import grid_atoms, grid_total
from data_prep.layout import DEFAULT_GRID, N_ORBITALS, ORBITALS, EnergyGrid
from data_prep.records import Spectrum


def _spectrum(energies, weights, reference=0.0):
    return Spectrum(energies_ev=np.asarray(energies, dtype=float), weights=np.asarray(weights, dtype=float),
                    reference_ev=reference, efermi_ev=reference, band_gap_ev=0.0)


def _random_spectrum(rng, n_states=300, n_atoms=4, reference=1.7, lo=-25.0, hi=12.0):
    e = rng.uniform(lo, hi, n_states) + reference
    w = rng.random((n_states, n_atoms, N_ORBITALS)) ** 3
    w *= 2.0 / w.sum(axis=(1, 2), keepdims=True)
    return _spectrum(e, w, reference)


def _single_state(energy_rel, reference=1.3, atom=0, orbital="pz", n_atoms=2, weight=1.0):
    w = np.zeros((1, n_atoms, N_ORBITALS))
    w[0, atom, ORBITALS.index(orbital)] = weight
    return _spectrum([energy_rel + reference], w, reference)


@pytest.mark.parametrize("grid", [DEFAULT_GRID, EnergyGrid(-5.0, 5.0, 1000, 0.05)])
def test_single_state_integrates_to_one_and_peaks_at_its_energy(grid):
    e_rel = -3.217
    dos, outside = grid_atoms(_single_state(e_rel), [0, 1], grid)
    assert dos.shape == (2, grid.n_points, N_ORBITALS) and dos.dtype == np.float32
    k = ORBITALS.index("pz")
    assert abs(dos[0, :, k].sum() * grid.step_ev - 1.0) < 1e-3
    peak = grid.energies_ev[np.argmax(dos[0, :, k])]
    assert abs(peak - e_rel) <= grid.step_ev / 2 + 1e-9
    # peak height of a normalised Gaussian (the nearest grid point is at most step/2 away)
    assert dos[0, :, k].max() == pytest.approx(1 / (grid.sigma_ev * math.sqrt(2 * math.pi)), rel=2e-3)
    others = np.ones((2, N_ORBITALS), bool)
    others[0, k] = False
    assert np.all(dos[others.nonzero()[0], :, others.nonzero()[1]] == 0)
    assert np.all(outside < 1e-9)


def test_reference_shift_moves_the_peak():
    a, _ = grid_atoms(_single_state(-2.0, reference=0.0), [0])
    b, _ = grid_atoms(_single_state(-2.0, reference=4.5), [0])
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_orbital_channels_sum_to_total_dos():
    rng = np.random.default_rng(3)
    spec = _random_spectrum(rng)
    dos, outside = grid_atoms(spec)
    total, total_out = grid_total(spec, return_outside=True)
    summed = dos.astype(np.float64).sum(axis=(0, 2))
    np.testing.assert_allclose(summed, total, rtol=1e-5, atol=1e-5 * total.max())
    assert outside.sum() == pytest.approx(total_out, rel=1e-9)


def test_states_outside_the_window_are_counted():
    grid = DEFAULT_GRID
    w = np.zeros((3, 2, N_ORBITALS))
    w[0, 1, ORBITALS.index("dxy")] = 0.7  # far above the window
    w[1, 0, ORBITALS.index("s")] = 0.4    # far below
    w[2, 0, ORBITALS.index("px")] = 1.0   # centred on the lowest grid point: about half outside
    spec = _spectrum([25.0, -40.0, grid.emin_ev], w)
    dos, outside = grid_atoms(spec, [0, 1])
    assert outside[1, ORBITALS.index("dxy")] == pytest.approx(0.7, abs=1e-9)
    assert outside[0, ORBITALS.index("s")] == pytest.approx(0.4, abs=1e-9)
    assert np.all(dos[1] == 0) and np.all(dos[0, :, ORBITALS.index("s")] == 0)
    px = ORBITALS.index("px")
    assert outside[0, px] == pytest.approx(0.5, abs=0.05)
    assert dos[0, :, px].sum() * grid.step_ev + outside[0, px] == pytest.approx(1.0, abs=1e-3)


def test_weight_is_conserved_on_grid_plus_outside():
    rng = np.random.default_rng(5)
    spec = _random_spectrum(rng, n_states=400, n_atoms=3)
    dos, outside = grid_atoms(spec)
    on_grid = dos.astype(np.float64).sum(axis=1) * DEFAULT_GRID.step_ev
    np.testing.assert_allclose(on_grid + outside, spec.weights.sum(axis=0), atol=1e-3)
    assert outside.sum() > 1.0  # the spectrum does reach beyond the window


def _loop_reference(spec, atoms, grid):
    """Straightforward loop: one untruncated Gaussian per state, atom and orbital."""
    e = grid.energies_ev
    norm = 1.0 / (grid.sigma_ev * math.sqrt(2 * math.pi))
    out = np.zeros((len(atoms), grid.n_points, N_ORBITALS))
    for k, a in enumerate(atoms):
        for o in range(N_ORBITALS):
            for s, es in enumerate(np.asarray(spec.energies_ev) - spec.reference_ev):
                out[k, :, o] += spec.weights[s, a, o] * norm * np.exp(-0.5 * ((e - es) / grid.sigma_ev) ** 2)
    return out


@pytest.mark.parametrize("max_elements", [None, 3000])
def test_vectorised_equals_loop(monkeypatch, max_elements):
    if max_elements is not None:  # force many small chunks
        monkeypatch.setattr(grid_mod, "MAX_GAUSSIAN_ELEMENTS", max_elements)
    rng = np.random.default_rng(11)
    spec = _random_spectrum(rng, n_states=120, n_atoms=4, lo=-16.0, hi=8.0)
    atoms = [2, 0, 2, 3]  # any order, duplicates allowed
    dos, _ = grid_atoms(spec, atoms)
    ref = _loop_reference(spec, atoms, DEFAULT_GRID)
    np.testing.assert_allclose(dos, ref, rtol=1e-5, atol=1e-5 * ref.max())


def test_coarse_grid_and_bad_indices_are_refused():
    spec = _single_state(0.0)
    with pytest.raises(ValueError, match="step"):
        grid_atoms(spec, [0], EnergyGrid(-14.0, 6.0, 100, 0.1))
    with pytest.raises(ValueError, match="out of range"):
        grid_atoms(spec, [2])
    with pytest.raises(ValueError, match="out of range"):
        grid_atoms(spec, [-1])
