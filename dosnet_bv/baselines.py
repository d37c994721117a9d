"""Baselines for any regression on DOS-derived data: the mean, group means, gradient-boosted trees.

Pure numpy + scikit-learn and generic (no project imports): the callers give arrays. Shapes: n
samples, k key columns, F features, T targets.

- ``mean_predictor``: the training mean of each target for every sample.
- ``GroupMean``: the training mean of each group of samples sharing a key (e.g. the element, or
  element and coordination number), backing off to coarser keys and finally to the training mean
  for groups never seen in training.
- ``GBT``: scikit-learn's ``HistGradientBoostingRegressor``, one per target, the number of
  boosting iterations chosen on a validation set (early stopping on validation MAE, as the
  network's training does on its validation loss).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Defaults of the boosted trees. With ``max_features`` = 1 the fit is deterministic (the seed does
#: not matter); ``max_features`` < 1 would sample features per split (seed-dependent) but makes
#: scikit-learn's fit about 10x slower on a few hundred features, so it is not the default.
GBT_DEFAULTS: dict = {"learning_rate": 0.05, "max_iter": 500, "max_leaf_nodes": 31, "min_samples_leaf": 20,
                      "l2_regularization": 1e-3, "max_features": 1.0}


def _as_2d(y) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    return y.reshape(-1, 1) if y.ndim == 1 else y


def mean_predictor(y_train, n: int) -> np.ndarray:
    """(n, T): the mean of ``y_train`` (n_train, T) or (n_train,) repeated for n samples."""
    y = _as_2d(y_train)
    return np.broadcast_to(y.mean(axis=0), (n, y.shape[1])).copy()


def _key_rows(keys) -> list:
    """Rows of a key matrix as tuples (each column converted to a Python value)."""
    k = np.asarray(keys, dtype=object)
    if k.ndim == 1:
        k = k.reshape(-1, 1)
    return [tuple(r) for r in k.tolist()]


@dataclass
class GroupMean:
    """Per-group training means with back-off.

    ``fit(keys, y)``: keys (n, k) (or (n,) for one column), e.g. ``[element, cn]``; y (n, T) or (n,).
    ``predict(keys)``: (n, T). A sample whose full key was seen in training gets that group's
    mean; otherwise the key loses its last column, then the next, ... (element + CN -> element);
    a sample matching nothing gets the overall training mean. ``min_count``: groups with fewer
    training samples are treated as unseen.
    """

    min_count: int = 1
    means: list = field(default_factory=list)  # level j (j trailing columns dropped): {key: (T,) mean}
    overall: np.ndarray | None = None

    def fit(self, keys, y) -> "GroupMean":
        y = _as_2d(y)
        rows = _key_rows(keys)
        if len(rows) != len(y):
            raise ValueError(f"keys have {len(rows)} rows, y has {len(y)}")
        depth = len(rows[0]) if rows else 0
        self.overall = y.mean(axis=0)
        self.means = []
        for drop in range(depth):
            sums, counts = {}, {}
            for r, v in zip(rows, y):
                key = r[:depth - drop]
                sums[key] = sums.get(key, 0.0) + v
                counts[key] = counts.get(key, 0) + 1
            self.means.append({k: sums[k] / counts[k] for k in sums if counts[k] >= self.min_count})
        return self

    def predict(self, keys) -> np.ndarray:
        if self.overall is None:
            raise ValueError("GroupMean.predict before fit")
        rows = _key_rows(keys)
        out = np.empty((len(rows), len(self.overall)))
        depth = len(self.means)
        for i, r in enumerate(rows):
            out[i] = self.overall
            for drop, table in enumerate(self.means):
                key = r[:depth - drop]
                if key in table:
                    out[i] = table[key]
                    break
        return out


@dataclass
class GBT:
    """Gradient-boosted trees, one ``HistGradientBoostingRegressor`` per target column.

    ``fit(x_train, y_train, x_val, y_val)``: x (n, F) float (NaN = missing), y (n, T) or (n,).
    Each target is boosted for up to ``max_iter`` iterations; the iteration count with the lowest
    validation MAE is kept (``best_iter``) and used by ``predict``. ``seed`` seeds the feature
    sampling when ``options`` set ``max_features`` < 1 (otherwise the fit is deterministic).
    """

    seed: int = 0
    options: dict = field(default_factory=dict)
    threads: int | None = 1
    models: list = field(default_factory=list)
    best_iter: list = field(default_factory=list)

    def _limits(self):
        """OpenMP threads of the fit and prediction: one by default. On cores shared with other
        work, scikit-learn's OpenMP threads spin-wait on each other: 2 threads on 2 busy cores ran
        10-20x slower than 1 here. ``threads=None`` leaves the library default."""
        from threadpoolctl import threadpool_limits

        return threadpool_limits(self.threads, user_api="openmp")

    def fit(self, x_train, y_train, x_val, y_val) -> "GBT":
        with self._limits():
            return self._fit(x_train, y_train, x_val, y_val)

    def _fit(self, x_train, y_train, x_val, y_val) -> "GBT":
        from sklearn.ensemble import HistGradientBoostingRegressor

        y_train, y_val = _as_2d(y_train), _as_2d(y_val)
        opts = {**GBT_DEFAULTS, **self.options}
        # a tiny training set cannot fill leaves of min_samples_leaf: shrink it, never below 2
        opts["min_samples_leaf"] = int(max(2, min(opts["min_samples_leaf"], len(y_train) // 10)))
        self.models, self.best_iter = [], []
        for j in range(y_train.shape[1]):
            m = HistGradientBoostingRegressor(early_stopping=False, random_state=self.seed, **opts)
            m.fit(x_train, y_train[:, j])
            maes = [np.mean(np.abs(p - y_val[:, j])) for p in m.staged_predict(x_val)]
            self.models.append(m)
            self.best_iter.append(int(np.argmin(maes)) + 1 if maes else m.n_iter_)
        return self

    def predict(self, x) -> np.ndarray:
        """(n, T) predictions at each target's ``best_iter``."""
        with self._limits():
            return self._predict(x)

    def _predict(self, x) -> np.ndarray:
        cols = []
        for m, k in zip(self.models, self.best_iter):
            p = None
            for i, p in enumerate(m.staged_predict(x), start=1):
                if i == k:
                    break
            cols.append(np.asarray(p, dtype=np.float64))
        return np.stack(cols, axis=1)
