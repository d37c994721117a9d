"""The train/val/test split stored in every data_prep h5 (``split`` dataset), grouped by family.

A family (``data_prep.families``) is a real structure, everything substituted from it, and every
real structure of the same prototype: related materials never sit on both sides of the split.
``grouped_split`` deals whole groups (families by default; materials for comparison) to train,
val and test so that each split gets close to its fraction of the *materials*.
"""
from __future__ import annotations

import numpy as np


def grouped_split(material_ids, fractions=(0.8, 0.1, 0.1), seed: int = 88, group_of: dict | None = None
                  ) -> dict[str, str]:
    """Assign each material (not each sample) to train/val/test: deterministic for a seed.

    ``group_of`` (material id -> group id, e.g. the family): whole groups go to one split; groups
    are shuffled with ``seed`` and each goes to the split furthest below its share of materials.
    Without it every material is its own group.
    """
    if group_of is not None:
        return _split_groups(sorted(set(material_ids)), group_of, fractions, seed)
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


def _split_groups(ids, group_of: dict, fractions, seed: int) -> dict[str, str]:
    members: dict[str, list[str]] = {}
    for m in ids:
        members.setdefault(str(group_of.get(m, m)), []).append(m)
    groups = sorted(members)
    order = np.random.default_rng(seed).permutation(len(groups))
    names = ("train", "val", "test")
    target = np.array(fractions, dtype=float) * len(ids)
    have = np.zeros(3)
    labels = {}
    first = [k for k in range(3) if fractions[k] > 0]
    for rank, i in enumerate(order):
        g = groups[i]
        if rank < len(first) and len(groups) >= len(first):
            k = first[rank]  # every split with a share gets at least one group
        else:
            k = int(np.argmax((target - have) / np.maximum(target, 1e-9)))
        for m in members[g]:
            labels[m] = names[k]
        have[k] += len(members[g])
    return labels
