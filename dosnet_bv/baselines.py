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


@dataclass
class FittedBondValence:
    """The bond valence form with parameters fitted to the training targets, not taken from a table.

    A site's sum is S = sign x sum over its counter-ions of exp((r_c + r_a + delta_ca - d) / b_c):
    one radius per element as a cation (r_c) and one as an anion (r_a: Cl- and Cl5+ differ), so
    R0 = r_c + r_a, an additive model that reaches pairs never seen together, plus a correction
    delta per (cation, anion) pair seen in training, pulled towards 0 by a ridge penalty ``lam``
    (chosen on the validation rows from ``lams``); the softness b = ``b_ang`` x exp(beta_c) per
    cation, beta pulled towards 0 by the same penalty (the table's H-O has b = 0.94 Å, nearly all
    other pairs 0.37). ``radius``: {Z: r_c, ANION_KEY + Z: r_a}; ``delta``: {(Z_c, ANION_KEY + Z_a):
    delta}; ``log_b``: {Z_c: beta_c}. Which neighbours
    count, and the sign, come from bond polarity, by the electronegativities ``chi``
    (Z -> Pauling chi): a site more electronegative than the mean of its first shell (the
    neighbours within ``shell`` x the shortest distance) is an anion (sign -1), any other site a
    cation (+1); an anion counts the neighbours whose chi lies below the midpoint between its own
    and its first shell's mean, a cation those above it. So P is a cation in a phosphate and an
    anion in a phosphide, and like pairs (O-O, O-F, Mg-Ca, S-S) count nothing. Fitted by
    ``scipy.optimize.least_squares`` (soft-L1 loss, scale 0.3) on the signed target given to
    ``fit`` (a bond valence sum or an oxidation state).

    ``fit(bonds, y, val_bonds, y_val)``/``predict(bonds)``: bonds = (distance (n, K) Å, neighbour Z
    (n, K) int, mask (n, K), centre Z (n,) int). A site whose element has no ``chi``, or with no
    neighbour that has one, gets NaN (the caller backs off); a neighbour without ``chi`` counts
    nothing; an element without a fitted radius in its role gets the median radius of that role.
    """

    ANION_KEY = 1000  # radius keys: Z as a cation, ANION_KEY + Z as an anion

    chi: dict = field(default_factory=dict)
    b_ang: float = 0.37
    shell: float = 1.2
    lams: tuple = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    max_nfev: int = 300
    radius: dict = field(default_factory=dict)
    delta: dict = field(default_factory=dict)
    log_b: dict = field(default_factory=dict)
    lam: float | None = None

    def polarity(self, bonds) -> tuple[np.ndarray, np.ndarray]:
        """(sign (n,) of each site: +1 cation, -1 anion, 0 unknown; counter (n, K) bool: the
        neighbours whose bonds count)."""
        d, z, mask, zc = (np.asarray(a) for a in bonds)
        lookup = np.vectorize(lambda v: float(self.chi.get(int(v), np.nan)), otypes=[float])
        chi_c = lookup(zc.reshape(-1)) if zc.size else np.zeros(0)
        chi_n = lookup(z) if z.size else np.zeros(z.shape)
        valid = (mask > 0) & np.isfinite(chi_n)
        d_min = np.where(valid, d, np.inf).min(axis=1, initial=np.inf)
        first = valid & (d <= self.shell * d_min[:, None])
        n_first = first.sum(axis=1)
        mean_first = np.where(first, chi_n, 0.0).sum(axis=1) / np.maximum(n_first, 1)
        sign = np.where(chi_c > mean_first, -1.0, 1.0)
        sign[(n_first == 0) | ~np.isfinite(chi_c)] = 0.0
        cut = 0.5 * (chi_c + mean_first)[:, None]  # halfway between the site and its first shell
        counter = valid & np.where(sign[:, None] < 0, chi_n < cut, chi_n > cut) & (sign[:, None] != 0)
        return sign, counter

    def _bonds(self, bonds):
        d, z, mask, zc = (np.asarray(a) for a in bonds)
        zc = zc.reshape(-1).astype(np.int64)
        sign, counter = self.polarity(bonds)
        site, slot = np.nonzero(counter)
        zn = z.astype(np.int64)[site, slot]
        cation = sign[site] > 0
        # parameter keys: an element as a cation is Z, as an anion ANION_KEY + Z (its own radius)
        cat = np.where(cation, zc[site], zn)
        an = self.ANION_KEY + np.where(cation, zn, zc[site])
        return zc, sign, site, cat, an, d[site, slot].astype(np.float64)

    def _fit_one(self, bonds, y, lam):
        """Radii, pair corrections and log-softness per cation fitted with ridge penalty ``lam``."""
        from scipy import sparse
        from scipy.optimize import least_squares

        _, s_c, site, zi, zj, dist = self._bonds(bonds)
        keys = np.unique(np.concatenate([zi, zj]))
        index = np.zeros(int(keys.max()) + 1, np.int64)
        index[keys] = np.arange(len(keys))
        pairs, pair_ids = np.unique(np.stack([zi, zj], 1), axis=0, return_inverse=True)
        cations, cat_ids = np.unique(zi, return_inverse=True)
        pair_ids, cat_ids = pair_ids.reshape(-1), cat_ids.reshape(-1)
        nz, npair, ncat, n = len(keys), len(pairs), len(cations), len(y)
        i, j = index[zi], index[zj]
        # x = [radii (nz), corrections (npair), log(b / b_ang) per cation (ncat)]
        p_col, c_col = nz + pair_ids, nz + npair + cat_ids

        def bond_valences(x):
            t = x[i] + x[j] + x[p_col] - dist  # R0 - d
            b = self.b_ang * np.exp(x[c_col])
            return np.exp(np.minimum(t / b, 5.0)), t / b

        def residuals(x):
            s, _ = bond_valences(x)
            return np.concatenate([s_c * np.bincount(site, s, n) - y, np.sqrt(lam) * x[nz:]])

        # the Jacobian's sparsity is fixed: sort its entries (site rows: d/dr_c, d/dr_a, d/ddelta,
        # d/dlog b per bond; then the ridge rows) into CSR order once, and per call only sum the
        # entries that share a cell (several bonds of a site to one element) into that layout
        n_par, n_ridge = nz + npair + ncat, npair + ncat
        rows = np.concatenate([np.tile(site, 4), n + np.arange(n_ridge)])
        cols = np.concatenate([i, j, p_col, c_col, nz + np.arange(n_ridge)])
        order = np.lexsort((cols, rows))
        cell = rows[order] * n_par + cols[order]
        starts = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1]])
        indices = cols[order][starts]
        indptr = np.searchsorted(rows[order][starts], np.arange(n + n_ridge + 1))
        ridge = np.full(n_ridge, np.sqrt(lam))

        def jacobian(x):
            s, tb = bond_valences(x)
            b = self.b_ang * np.exp(x[c_col])
            v = s * s_c[site] / b  # d s / d R0, signed like the site
            w = -s * s_c[site] * tb  # d s / d log b
            entries = np.concatenate([v, v, v, w, ridge])[order]
            return sparse.csr_matrix((np.add.reduceat(entries, starts), indices, indptr), shape=(n + n_ridge, n_par))

        x0 = np.concatenate([np.full(nz, 0.9), np.zeros(npair + ncat)])
        x = least_squares(residuals, x0, jac=jacobian, method="trf", loss="soft_l1", f_scale=0.3,
                          max_nfev=self.max_nfev).x
        return ({int(k): float(v) for k, v in zip(keys, x[:nz])},
                {(int(a), int(b)): float(v) for (a, b), v in zip(pairs, x[nz:nz + npair])},
                {int(c): float(v) for c, v in zip(cations, x[nz + npair:])})

    def fit(self, bonds, y, val_bonds, y_val) -> "FittedBondValence":
        y = np.asarray(y, np.float64).reshape(-1)
        known = self.polarity(bonds)[0] != 0
        bonds = tuple(np.asarray(a)[known] for a in bonds)
        y = y[known]
        best = None
        for lam in self.lams:
            self.radius, self.delta, self.log_b = self._fit_one(bonds, y, lam)
            err = np.nanmean(np.abs(self.predict(val_bonds) - np.asarray(y_val, np.float64).reshape(-1)))
            if best is None or err < best[0]:
                best = (err, lam, self.radius, self.delta, self.log_b)
        _, self.lam, self.radius, self.delta, self.log_b = best
        return self

    def predict(self, bonds) -> np.ndarray:
        """(n,) signed sums; NaN where the site's polarity is unknown."""
        zc, s_c, site, zi, zj, dist = self._bonds(bonds)
        r_cat = float(np.median([v for k, v in self.radius.items() if k < self.ANION_KEY]))
        r_an = float(np.median([v for k, v in self.radius.items() if k >= self.ANION_KEY]))
        r0 = (_lookup(self.radius, zi, r_cat) + _lookup(self.radius, zj, r_an)
              + _lookup(self.delta, np.stack([zi, zj], 1), 0.0))
        b = self.b_ang * np.exp(_lookup(self.log_b, zi, 0.0))
        total = np.bincount(site, np.exp(np.minimum((r0 - dist) / b, 5.0)), len(zc))
        out = s_c * total
        out[s_c == 0] = np.nan
        return out


def _lookup(table: dict, keys: np.ndarray, default: float) -> np.ndarray:
    """``table[k]`` (``default`` when absent) for each key: ints (n,) or int pairs (n, 2), one
    dictionary look-up per distinct key."""
    if not len(keys):
        return np.zeros(0)
    uniq, inv = np.unique(keys, axis=0, return_inverse=True)
    as_key = (lambda u: (int(u[0]), int(u[1]))) if uniq.ndim == 2 else int
    return np.array([table.get(as_key(u), default) for u in uniq], np.float64)[inv.reshape(-1)]
