"""The material-grouped train/val/test split stored in every data_prep h5 (``split`` dataset)."""
from __future__ import annotations

import numpy as np


def grouped_split(material_ids, fractions=(0.8, 0.1, 0.1), seed: int = 88) -> dict[str, str]:
    """Assign each material (not each sample) to train/val/test: deterministic for a seed."""
    ids = sorted(set(material_ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    n = len(ids)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    if n >= 3:  # keep every split non-empty where there are enough materials
        n_train = min(max(n_train, 1), n - 2) if fractions[2] > 0 and fractions[1] > 0 else n_train
        n_val = min(max(n_val, 1 if fractions[1] > 0 else 0), n - n_train - (1 if fractions[2] > 0 else 0))
    labels = {}
    for rank, i in enumerate(order):
        labels[ids[i]] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return labels
