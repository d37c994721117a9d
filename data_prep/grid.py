"""Gaussian smearing of a spectral-form projected DOS onto the energy grid of ``layout``.

A :class:`~data_prep.records.Spectrum` holds discrete states (energies and per-atom, per-orbital
weights). Gridding places a normalised Gaussian of width ``grid.sigma_ev`` on every state, at its
energy relative to ``spectrum.reference_ev``, and samples it at the grid points:

    dos[k, i, o] = sum_s  w[s, atom_k, o] * exp(-(E_i - e_s)^2 / (2 sigma^2)) / (sigma sqrt(2 pi))

in states/eV per cell. The analytic normalisation makes one state of weight 1 integrate to 1
(``dos.sum() * grid.step_ev``) as long as the grid resolves the Gaussian; the sampled sum
agrees with the integral to far better than 1e-6 for ``step <= sigma`` (negligible at DOSnet's
step 0.01 eV and sigma 0.1 eV), so a grid coarser than the smearing width is refused.

Vectorisation: all atoms, orbitals and states of a material go through one pass. States are
sorted by energy and cut into chunks spanning a short energy range; each chunk builds the
Gaussian matrix only for the grid rows it can reach (the Gaussian is truncated at
``CUTOFF_SIGMAS`` standard deviations, where it is below 1.5e-8 of its peak) and adds
``G (rows, chunk) @ W (chunk, K*9)`` into the result. The matrix size is capped
(``MAX_GAUSSIAN_ELEMENTS``) whatever the number of states, so a CompleteDos converted to spectral
form (thousands of "states") needs no more memory than a few hundred eigenvalues.

States are never lost silently: ``outside`` holds, per atom and orbital, the weight of the
part of each state's Gaussian that lies beyond the grid window ``[emin - step/2,
emin + (n_points - 1/2) * step]`` (a state far outside counts fully, a state on the edge counts
about half). Hence ``dos.sum(axis=grid) * step + outside`` equals the total weight.

Threads: the chunk matmuls are small (a few hundred rows), where multi-threaded OpenBLAS only
adds synchronisation; on a machine whose cores are busy it was measured 10-40x slower than one
thread. The matmuls therefore run with BLAS limited to one thread (threadpoolctl, installed with
scikit-learn; skipped if unavailable). Parallelism belongs to the caller (one process per core).
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
from scipy.special import ndtr

from data_prep.layout import DEFAULT_GRID, N_ORBITALS, EnergyGrid
from data_prep.records import Spectrum

#: Gaussians are truncated beyond this many standard deviations (exp(-18) = 1.5e-8 of the peak).
CUTOFF_SIGMAS: float = 6.0
#: Upper bound on the number of elements of one chunk's Gaussian matrix (float32: 4 MiB).
MAX_GAUSSIAN_ELEMENTS: int = 1 << 20


#: A chunk takes at least this many states even beyond its energy span: for sparse spectra
#: fewer, taller Gaussian matrices beat many small ones (per-chunk overhead ~20 us).
MIN_CHUNK_STATES: int = 16
#: Run the chunk matmuls with a single BLAS thread (see the module docstring).
SINGLE_THREAD_BLAS: bool = True
_blas_controller = None


def _blas_one_thread():
    """Context limiting BLAS to one thread, or a no-op when threadpoolctl is unavailable."""
    global _blas_controller
    if not SINGLE_THREAD_BLAS:
        return contextlib.nullcontext()
    try:
        if _blas_controller is None:
            from threadpoolctl import ThreadpoolController

            _blas_controller = ThreadpoolController()  # inspects loaded libraries once (~0.5 ms)
        return _blas_controller.limit(limits=1, user_api="blas")
    except Exception:  # pragma: no cover - threadpoolctl missing or unable to inspect
        return contextlib.nullcontext()


def _check_grid(grid: EnergyGrid) -> None:
    if grid.step_ev > grid.sigma_ev:
        raise ValueError(
            f"energy grid step ({grid.step_ev:g} eV) is larger than the smearing width "
            f"({grid.sigma_ev:g} eV): sampled Gaussians would not conserve the number of states; "
            "use more grid points or a wider smearing")


def _outside_weight(e_rel: np.ndarray, w: np.ndarray, grid: EnergyGrid) -> np.ndarray:
    """(M,) weight of each column's Gaussians that falls beyond the grid window."""
    lo = grid.emin_ev - 0.5 * grid.step_ev
    hi = grid.emin_ev + (grid.n_points - 0.5) * grid.step_ev
    inside = ndtr((hi - e_rel) / grid.sigma_ev) - ndtr((lo - e_rel) / grid.sigma_ev)
    frac_out = np.clip(1.0 - inside, 0.0, 1.0)
    return frac_out @ w


def _smear(e_rel: np.ndarray, w: np.ndarray, grid: EnergyGrid, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Smear states ``e_rel`` (S,) with weight columns ``w`` (S, M) onto ``grid``.

    Returns ``(dos (n_points, M) dtype, outside (M,) float64)``.
    """
    _check_grid(grid)
    e_rel = np.asarray(e_rel, dtype=np.float64)
    n, h, sigma = grid.n_points, grid.step_ev, grid.sigma_ev
    m = w.shape[1]
    outside = _outside_weight(e_rel, np.asarray(w, dtype=np.float64), grid)
    dos = np.zeros((n, m), dtype=dtype)
    if m == 0 or e_rel.size == 0:
        return dos, outside

    energies = grid.energies_ev
    reach = CUTOFF_SIGMAS * sigma
    order = np.argsort(e_rel, kind="stable")
    e_sorted = e_rel[order]
    lo_i, hi_i = np.searchsorted(e_sorted, [energies[0] - reach, energies[-1] + reach])
    if hi_i <= lo_i:
        return dos, outside
    keep = order[lo_i:hi_i]
    es = e_sorted[lo_i:hi_i]
    ws = np.asarray(w[keep], dtype=dtype)

    # Chunk span: about the Gaussian's own reach, so at most half of each chunk's rows are spent
    # on the tails; the state count per chunk is capped so the matrix stays bounded.
    span = 2.0 * reach
    rows_max = int(math.ceil((span + 2.0 * reach) / h)) + 2
    max_states = max(1, MAX_GAUSSIAN_ELEMENTS // rows_max)
    inv_sigma = 1.0 / sigma
    start, n_states = 0, es.size
    with _blas_one_thread():
        while start < n_states:
            stop = int(np.searchsorted(es, es[start] + span, side="right"))
            stop = min(max(stop, start + MIN_CHUNK_STATES), start + max_states, n_states)
            i0 = max(0, int(math.floor((es[start] - reach - grid.emin_ev) / h)))
            i1 = min(n, int(math.ceil((es[stop - 1] + reach - grid.emin_ev) / h)) + 1)
            if i1 > i0:
                x = ((energies[i0:i1, None] - es[None, start:stop]) * inv_sigma).astype(dtype, copy=False)
                g = np.exp(-0.5 * x * x)
                dos[i0:i1] += g @ ws[start:stop]
            start = stop
    dos *= dtype(1.0 / (sigma * math.sqrt(2.0 * math.pi)))
    return dos, outside


def _atom_indices(spectrum: Spectrum, atom_indices) -> np.ndarray:
    n_atoms = np.shape(spectrum.weights)[1]
    if atom_indices is None:
        return np.arange(n_atoms)
    idx = np.asarray(atom_indices)
    if idx.ndim != 1:
        raise ValueError(f"atom_indices must be 1-D, got shape {idx.shape}")
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"atom_indices must be integers, got dtype {idx.dtype}")
    idx = idx.astype(np.intp)
    if idx.size and (idx.min() < 0 or idx.max() >= n_atoms):
        raise ValueError(f"atom_indices out of range for a spectrum of {n_atoms} atoms: {idx.tolist()}")
    return idx


def grid_atoms(spectrum: Spectrum, atom_indices=None,
               grid: EnergyGrid = DEFAULT_GRID) -> tuple[np.ndarray, np.ndarray]:
    """Smeared orbital-projected DOS of the atoms ``atom_indices`` on ``grid``.

    Args:
        spectrum: discrete states; energies are shifted by ``spectrum.reference_ev``.
        atom_indices: (K,) indices into the structure's atoms (duplicates allowed); ``None``
            means every atom.
        grid: energy grid and smearing width (``layout.DEFAULT_GRID``).

    Returns:
        ``dos``: (K, n_points, 9) float32, states/eV per cell, orbitals in ``layout.ORBITALS``
        order; ``outside``: (K, 9) float64, weight (states) of the Gaussians beyond the window.
    """
    idx = _atom_indices(spectrum, atom_indices)
    e_rel = np.asarray(spectrum.energies_ev, dtype=np.float64) - float(spectrum.reference_ev)
    w = np.asarray(spectrum.weights)[:, idx, :]
    s, k = w.shape[0], idx.size
    dos, outside = _smear(e_rel, w.reshape(s, k * N_ORBITALS), grid, np.float32)
    dos = dos.reshape(grid.n_points, k, N_ORBITALS).transpose(1, 0, 2)
    return np.ascontiguousarray(dos), outside.reshape(k, N_ORBITALS)


def grid_total(spectrum: Spectrum, grid: EnergyGrid = DEFAULT_GRID,
               return_outside: bool = False):
    """Total DOS (all atoms, all 9 orbitals; f excluded) on ``grid``, (n_points,) float64 states/eV.

    Computed independently of :func:`grid_atoms` (weights summed first, then one smearing), so it
    serves as a check of the projected channels. With ``return_outside`` also the weight beyond
    the window (float).
    """
    e_rel = np.asarray(spectrum.energies_ev, dtype=np.float64) - float(spectrum.reference_ev)
    w = np.asarray(spectrum.weights, dtype=np.float64).sum(axis=(1, 2))[:, None]
    dos, outside = _smear(e_rel, w, grid, np.float64)
    if return_outside:
        return dos[:, 0], float(outside[0])
    return dos[:, 0]
