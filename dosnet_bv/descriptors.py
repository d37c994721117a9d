"""Hand-crafted DOS descriptors: the classic d-band-model features of every channel of a projected DOS.

Pure numpy and generic (no project imports): give it any ``(n, P, C)`` array of DOS values on an
energy grid and it returns ``(n, C * 7)`` named features, for tree models and other baselines.

Shapes: n samples, P energy points, C channels (orbitals or orbital groups of one or more atoms).
Per channel, with ``rho(E)`` the channel's DOS (states/eV) and every integral over the grid
window (trapezoid rule on the given energies):

- ``total``: ``N = int rho dE``, states in the window;
- ``filling``: ``int_{E < 0} rho dE``, states below the reference level (E = 0), in states;
- ``centre_ev``: band centre ``c = int E rho dE / N`` (eV; the d-band centre for a d channel);
- ``width_ev``: ``w = sqrt(int (E - c)^2 rho dE / N)``, the square root of the second central
  moment (eV);
- ``skewness``: ``int (E - c)^3 rho dE / (N w^3)`` (0 for a symmetric band);
- ``kurtosis``: ``int (E - c)^4 rho dE / (N w^4)``, Pearson's (not the excess) kurtosis: 3 for a
  Gaussian band;
- ``dos_at_ref``: the DOS at the reference level, averaged over the grid points with
  ``|E| <= window_ev`` (interpolated at E = 0 when the window holds no grid point).

The moments are taken over the whole band in the window (occupied and empty states), as in
Hammer and Nørskov's d-band model. A channel without states (``N`` below ``min_states``) has no
centre: its centre, width, skewness and kurtosis are NaN (as are skewness and kurtosis of a band
of zero width); tree models such as scikit-learn's ``HistGradientBoostingRegressor`` take NaN as
"missing" natively.

Reference: B. Hammer & J. K. Nørskov, Surf. Sci. 343, 211 (1995); Adv. Catal. 45, 71 (2000)
(d-band centre, width and filling as descriptors of bonding).
"""
from __future__ import annotations

import numpy as np

FEATURES: tuple[str, ...] = ("total", "filling", "centre_ev", "width_ev", "skewness", "kurtosis", "dos_at_ref")


def feature_names(channel_labels) -> list[str]:
    """``<channel label>:<feature>`` for every channel and feature, channel-major: the column
    order of ``dos_descriptors``."""
    return [f"{c}:{f}" for c in channel_labels for f in FEATURES]


def trapezoid_weights(energies_ev) -> np.ndarray:
    """(P,) quadrature weights w such that ``sum(w * f) = trapezoid integral of f`` on the grid."""
    e = np.asarray(energies_ev, dtype=np.float64)
    if e.ndim != 1 or e.size < 2 or not np.all(np.diff(e) > 0):
        raise ValueError("energies_ev must be a strictly increasing 1-D grid of at least 2 points")
    d = np.diff(e)
    w = np.zeros_like(e)
    w[:-1] += d / 2
    w[1:] += d / 2
    return w


def _below_zero_weights(e: np.ndarray) -> np.ndarray:
    """(P,) weights of the trapezoid integral from the first grid point up to E = 0, with the
    integrand linear between grid points (exact for piecewise-linear DOS)."""
    w = np.zeros_like(e)
    if e[0] >= 0:
        return w
    if e[-1] <= 0:
        return trapezoid_weights(e)
    k = int(np.searchsorted(e, 0.0, side="right")) - 1  # e[k] <= 0 < e[k+1]
    if k > 0:
        w[:k + 1] = trapezoid_weights(e[:k + 1])
    # the partial interval [e[k], 0]: f(x) = f_k (1 - t) + f_{k+1} t, t = (x - e_k) / h
    h, x = e[k + 1] - e[k], -e[k]
    t = x / h
    w[k] += x * (1 - t / 2)
    w[k + 1] += x * t / 2
    return w


def dos_descriptors(dos, energies_ev, window_ev: float = 0.1, min_states: float = 1e-8,
                    chunk: int = 128) -> np.ndarray:
    """Descriptors of every channel of ``dos``.

    dos: (n, P, C) DOS values, states/eV, on ``energies_ev`` (P,) eV relative to the reference
    level (strictly increasing; need not be uniform). window_ev: half width of the window around
    E = 0 for ``dos_at_ref`` (eV). min_states: channels with fewer states in the window have NaN
    moments. Returns (n, C * len(FEATURES)) float64, columns as ``feature_names`` (channel-major).
    Works in chunks of ``chunk`` samples (float64 copies of one chunk only).
    """
    dos = np.asarray(dos)
    if dos.ndim != 3:
        raise ValueError(f"dos must be (n, P, C), got shape {dos.shape}")
    e = np.asarray(energies_ev, dtype=np.float64)
    if e.shape != (dos.shape[1],):
        raise ValueError(f"energies_ev has shape {e.shape}, the DOS has {dos.shape[1]} energy points")
    w = trapezoid_weights(e)
    below = _below_zero_weights(e)
    near = np.abs(e) <= window_ev
    n, _, c = dos.shape
    out = np.empty((n, c, len(FEATURES)))
    for i in range(0, n, chunk):
        x = np.asarray(dos[i:i + chunk], dtype=np.float64)  # (m, P, C)
        total = np.einsum("mpc,p->mc", x, w)
        filling = np.einsum("mpc,p->mc", x, below)
        has = total > min_states
        safe = np.where(has, total, 1.0)
        centre = np.einsum("mpc,p->mc", x, w * e) / safe
        # central moments about each channel's centre (no cancellation from raw moments)
        d = e[None, :, None] - centre[:, None, :]  # (m, P, C)
        wx = x * w[None, :, None]
        m2 = np.sum(wx * d ** 2, axis=1) / safe
        m3 = np.sum(wx * d ** 3, axis=1) / safe
        m4 = np.sum(wx * d ** 4, axis=1) / safe
        width = np.sqrt(np.maximum(m2, 0.0))
        spread = has & (width > 1e-12)
        ws = np.where(spread, width, 1.0)
        skew = np.where(spread, m3 / ws ** 3, np.nan)
        kurt = np.where(spread, m4 / ws ** 4, np.nan)
        if near.any():
            at_ref = x[:, near, :].mean(axis=1)
        else:  # coarse grid: linear interpolation at E = 0 (edge value outside the grid)
            k = int(np.clip(np.searchsorted(e, 0.0) - 1, 0, len(e) - 2))
            t = float(np.clip(-e[k] / (e[k + 1] - e[k]), 0.0, 1.0))
            at_ref = x[:, k, :] * (1 - t) + x[:, k + 1, :] * t
        out[i:i + chunk] = np.stack([total, filling, np.where(has, centre, np.nan), np.where(has, width, np.nan),
                                     skew, kurt, at_ref], axis=-1)
    return out.reshape(n, c * len(FEATURES))
