"""Synthetic data in the upstream DOSnet format, for the demo and the tests.

Each sample has three atoms with 9 Gaussian-band channels on the 2000-point grid; the target
(eV) is a smooth function of band centres and fillings, so the network has something to learn.
"""
from __future__ import annotations

import numpy as np


def make_synthetic(n: int = 200, multi_adsorbate: bool = False, length: int = 2000, channels: int = 9,
                   sites: int = 3, seed: int = 0):
    """Return ``surface`` (n, length, 1 + sites*channels) with the energy in column 0, ``targets``
    (n,) and, for multi-adsorbate data, ``adsorbate`` (n, length, 1 + channels); else None."""
    rng = np.random.default_rng(seed)
    energy = np.linspace(-14.0, 6.0, length, endpoint=False)
    centres = rng.uniform(-8.0, 1.0, size=(n, sites, channels))
    widths = rng.uniform(0.5, 2.0, size=(n, sites, channels))
    heights = rng.uniform(0.0, 1.0, size=(n, sites, channels))
    bands = heights[..., None] * np.exp(-0.5 * ((energy - centres[..., None]) / widths[..., None]) ** 2)
    surface = np.empty((n, length, 1 + sites * channels), dtype=np.float32)
    surface[:, :, 0] = energy
    surface[:, :, 1:] = bands.reshape(n, sites * channels, length).transpose(0, 2, 1)
    targets = (0.3 * centres[:, :, 4:].mean(axis=(1, 2)) + heights[:, 0, 0] - 0.5 * widths[:, 1, 1]).astype(np.float32)
    adsorbate = None
    if multi_adsorbate:
        ac = rng.uniform(-10.0, -2.0, size=(n, channels))
        adsorbate = np.empty((n, length, 1 + channels), dtype=np.float32)
        adsorbate[:, :, 0] = energy
        adsorbate[:, :, 1:] = np.exp(-0.5 * ((energy[None, :, None] - ac[:, None, :]) / 0.5) ** 2)
        targets = targets + 0.1 * ac[:, 0].astype(np.float32)
    return surface, targets, adsorbate
