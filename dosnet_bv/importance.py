"""Feature importance of a trained Keras regressor whose inputs are projected DOS spectra and, optionally,
a structure vector and inputs held fixed (e.g. a table of bonds): energy-window occlusion, permutation
importance and integrated gradients, written out as CSV tables, figures and a short Markdown report.

Generic: numpy, TensorFlow / Keras, matplotlib and tqdm, nothing else of the project. The caller
passes the model, the standardised inputs of the samples to explain (e.g. a test split), their true
targets, the labels of every channel and feature and the channel groups to rank (``Problem``).

Shapes, used throughout: n samples, L energy points, K DOS channels of all atoms together
(atom-major: each atom is one model input of K / A channels), F structure features, T targets,
W energy windows, G channel groups, R permutation repeats, S = steps + 1 points on the integrated
gradients path. Errors are mean absolute errors (MAE) in the targets' physical units.

Methods (``analyse``; every one on the same n samples):

- occlusion: the DOS of one channel group inside one energy window [lo, lo + width) is replaced
  by the reference DOS ``dos_fill`` (the caller's choice, e.g. the training-set mean at each
  energy and channel); the rise of the MAE over the unperturbed MAE is recorded for every window
  x group (and for all channels at once). All windows and groups of a batch of samples are
  evaluated together in forward calls of ``batch_rows`` rows.
- permutation: the values of one block (a DOS channel's whole spectrum, a group of channels, a
  structure feature or family, all fixed inputs together) are shuffled across the samples,
  jointly within the block (the same permutation for all its columns, so correlations inside it
  stay); the rise of the MAE, mean and sample standard deviation over ``repeats`` permutations (the same R permutations for
  every block, so blocks are compared on equal draws).
- integrated gradients (Sundararajan, Taly & Yan, ICML 2017): attribution of input i =
  (x_i - x'_i) * integral over a in [0, 1] of dF/dx_i at x' + a (x - x'), by the trapezoid rule
  on ``steps`` equal intervals; baseline x' = (``dos_fill``, ``structure_fill``). Completeness:
  the attributions of one sample sum to F(x) - F(x') up to the quadrature error, which is
  reported. Attributions are in the target's physical units. Fixed inputs keep each sample's own
  values along the path (they are not attributed).
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.plotting import pyplot


# =========================================================================== inputs and settings
@dataclass
class Problem:
    """What is explained.

    model: a ``keras.Model`` taking a dict of named inputs; its output is a dict keyed by target
    name, or one (N, 1) tensor when it has a single target.
    targets: (T,) names of the outputs to explain. y_true: (n, T) float64, physical units.
    y_mean, y_scale: (T,) physical value = network output * y_scale + y_mean.
    dos: (n, L, K) float32 standardised DOS, or None (a model without DOS input).
    dos_inputs: names of the A model inputs that the K channels are split into, in order.
    dos_fill: (L, K) float32 standardised reference DOS: occlusion fill and integrated-gradients
    baseline; or (G, L, K), one reference per group, with ``dos_fill_index`` (n,) naming each
    sample's (e.g. the mean DOS of the sample's element). energies_ev: (L,) eV relative to the
    reference level. channel_labels: (K,).
    occlusion_groups: ``{label: channel indices}``, the rows of the occlusion heatmap (e.g. atom x
    orbital group); ``all channels`` is added. channel_blocks: ``{kind: {label: channel indices}}``
    permuted one block at a time (e.g. kinds channel, atom, orbital group).
    structure: (n, F) float32 standardised structure vector, or None; structure_input: its input
    name; structure_labels, structure_families: (F,); structure_fill: (F,) baseline (zeros when None).
    fixed_inputs: ``{input name: (n, ...) array}``, model inputs every method leaves at each sample's
    own values (e.g. a padded bond table, whose entries are not separable features); permuted across
    the samples as one block, named ``fixed_label``.
    sample_labels: (n,) str, e.g. the centre element: integrated gradients are also averaged per label.
    units: target -> unit text. reference_note: what E = 0 is (shown on the plots).
    """

    model: object
    targets: list
    y_true: np.ndarray
    y_mean: np.ndarray
    y_scale: np.ndarray
    dos: np.ndarray | None = None
    dos_inputs: list = field(default_factory=list)
    dos_fill: np.ndarray | None = None
    dos_fill_index: np.ndarray | None = None
    energies_ev: np.ndarray | None = None
    channel_labels: list = field(default_factory=list)
    occlusion_groups: dict = field(default_factory=dict)
    channel_blocks: dict = field(default_factory=dict)
    structure: np.ndarray | None = None
    structure_input: str | None = None
    structure_labels: list = field(default_factory=list)
    structure_families: list = field(default_factory=list)
    structure_fill: np.ndarray | None = None
    fixed_inputs: dict = field(default_factory=dict)
    fixed_label: str = "fixed inputs"
    sample_labels: np.ndarray | None = None
    units: dict = field(default_factory=dict)
    reference_note: str = "E = 0: reference level"

    @property
    def n(self) -> int:
        return len(self.y_true)

    def fill_for(self, rows: slice) -> np.ndarray:
        """The reference DOS of the samples ``rows``: (m, L, K), or (1, L, K) when all share one."""
        fill = np.asarray(self.dos_fill, dtype=np.float32)
        if self.dos_fill_index is None:
            return fill[None]
        return fill[np.asarray(self.dos_fill_index)[rows]]


@dataclass
class Settings:
    """window_ev, step_ev: occlusion window width and the step it slides by (eV). repeats:
    permutations per block. ig_steps: trapezoid intervals of the integrated-gradients path.
    top_labels: how many of the most frequent sample labels get their own integrated gradients.
    seed: the permutations' random generator. batch_rows: rows per forward call."""

    window_ev: float = 1.0
    step_ev: float = 0.25
    repeats: int = 5
    ig_steps: int = 128
    top_labels: int = 10
    seed: int = 0
    batch_rows: int = 256
    progress: bool = True


# =========================================================================== the model as a function of arrays
class Forward:
    """``Problem.model`` as a function of the (dos, structure) arrays, in chunks of ``batch_rows``.

    ``__call__(dos (m, L, K), structure (m, F), rows (m,))`` -> (m, T) physical predictions;
    ``gradients(...)`` -> predictions and their gradients per target. The argument ``rows`` names
    the sample each row stands for, whose fixed inputs it gets (needed only when the problem has
    fixed inputs). The attributes ``rows`` and ``gradient_rows`` count the rows evaluated (forward)
    and those differentiated.
    """

    def __init__(self, problem: Problem, batch_rows: int = 256):
        import tensorflow as tf

        self.p, self.batch_rows = problem, batch_rows
        self.rows, self.gradient_rows = 0, 0
        model, targets = problem.model, list(problem.targets)

        def outputs(x):
            out = model(x, training=False)
            if not isinstance(out, dict):
                out = {targets[0]: out}
            return tf.concat([tf.reshape(out[t], (-1, 1)) for t in targets], axis=1)

        def grads(x, fixed):
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(x)
                y = outputs({**x, **fixed})
                parts = [tf.reduce_sum(y[:, j]) for j in range(len(targets))]
            return y, [tape.gradient(s, x) for s in parts]

        self._out = tf.function(outputs, reduce_retracing=True)
        self._grads = tf.function(grads, reduce_retracing=True)
        self._tf = tf

    def fixed(self, rows) -> dict:
        """The fixed inputs of the samples ``rows``."""
        if not self.p.fixed_inputs:
            return {}
        if rows is None:
            raise ValueError("the problem has fixed inputs: say which sample each row stands for (rows)")
        rows = np.asarray(rows)
        return {k: self._tf.constant(np.asarray(v)[rows]) for k, v in self.p.fixed_inputs.items()}

    def feeds(self, dos, structure) -> dict:
        """Named model inputs of (dos (m, L, K), structure (m, F)) arrays."""
        x = {}
        if dos is not None and self.p.dos_inputs:
            c = dos.shape[-1] // len(self.p.dos_inputs)
            for i, name in enumerate(self.p.dos_inputs):
                x[name] = self._tf.constant(np.ascontiguousarray(dos[..., i * c:(i + 1) * c], dtype=np.float32))
        if structure is not None and self.p.structure_input:
            x[self.p.structure_input] = self._tf.constant(np.asarray(structure, dtype=np.float32))
        return x

    def __call__(self, dos, structure, rows=None) -> np.ndarray:
        m = len(dos) if dos is not None else len(structure) if structure is not None else len(rows)
        out = np.empty((m, len(self.p.targets)))
        for i in range(0, m, self.batch_rows):
            z = self._out({**self.feeds(None if dos is None else dos[i:i + self.batch_rows],
                                        None if structure is None else structure[i:i + self.batch_rows]),
                           **self.fixed(None if rows is None else rows[i:i + self.batch_rows])})
            out[i:i + self.batch_rows] = np.asarray(z, dtype=np.float64)
        self.rows += m
        return out * self.p.y_scale + self.p.y_mean

    def gradients(self, dos, structure, rows=None):
        """(m, T) physical predictions, (T, m, L, K) d prediction / d dos (or None), (T, m, F)
        d prediction / d structure (or None), all in physical target units per standardised unit."""
        x = self.feeds(dos, structure)
        z, g = self._grads(x, self.fixed(rows))
        self.gradient_rows += int(z.shape[0])
        scale = np.asarray(self.p.y_scale, dtype=np.float64)
        gd = gs = None
        if dos is not None and self.p.dos_inputs:
            gd = np.stack([np.concatenate([np.asarray(gt[name]) for name in self.p.dos_inputs], axis=-1)
                           * np.float32(scale[j]) for j, gt in enumerate(g)])  # float32: (T, m, L, K) is large
        if structure is not None and self.p.structure_input:
            gs = np.stack([np.asarray(gt[self.p.structure_input]) * scale[j] for j, gt in enumerate(g)])
        return np.asarray(z, dtype=np.float64) * scale + self.p.y_mean, gd, gs


def _bar(total: int, desc: str, on: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="row", unit_scale=True, disable=None if on else True, leave=False)


def mae(pred, y_true) -> np.ndarray:
    """(T,) mean absolute error of (n, T) predictions."""
    return np.mean(np.abs(np.asarray(pred) - np.asarray(y_true)), axis=0)


# =========================================================================== occlusion
def energy_windows(energies_ev, width_ev: float, step_ev: float) -> list:
    """Windows ``[lo, lo + width_ev)`` with ``lo = E_0 + k * step_ev`` while the window stays inside
    the grid (its cells reach to the last point + one grid spacing). Returns ``[(lo_ev, hi_ev,
    start, stop), ...]``: grid points ``start:stop`` lie in the window."""
    e = np.asarray(energies_ev, dtype=np.float64)
    if e.ndim != 1 or len(e) < 2 or not np.all(np.diff(e) > 0):
        raise ValueError("energies_ev must be a strictly increasing 1-D grid of at least 2 points")
    h = float(np.median(np.diff(e)))
    if not step_ev > 0 or width_ev < h * (1 - 1e-6):
        raise ValueError(f"window width {width_ev} eV must be at least the grid spacing ({h:g} eV) and the step "
                         f"({step_ev} eV) positive")
    end, tol = e[-1] + h, 1e-6 * h
    if width_ev > end - e[0] + tol:
        raise ValueError(f"window width {width_ev} eV exceeds the grid ({e[0]:g} to {end:g} eV)")
    out, k = [], 0
    while True:
        lo = e[0] + k * step_ev
        hi = lo + width_ev
        if hi > end + tol:
            break
        start, stop = int(np.searchsorted(e, lo - tol)), int(np.searchsorted(e, hi - tol))
        if stop > start:
            out.append((float(lo), float(hi), start, stop))
        k += 1
    return out


def occlusion(problem: Problem, settings: Settings, forward: Forward, base_pred: np.ndarray) -> dict:
    """Rise of the MAE when one group's DOS inside one window is replaced by ``dos_fill``.

    Returns ``windows`` [(lo_ev, hi_ev, start, stop)], ``groups`` (G + 1 labels, the last ``all
    channels``), ``delta_mae`` (W, G + 1, T), ``base_mae`` (T,).
    """
    p = problem
    windows = energy_windows(p.energies_ev, settings.window_ev, settings.step_ev)
    groups = dict(p.occlusion_groups)
    groups["all channels"] = list(range(p.dos.shape[-1]))
    chans = [np.asarray(v, dtype=int) for v in groups.values()]
    variants = [(w, g) for w in range(len(windows)) for g in range(len(chans))]
    n, L, K = p.dos.shape
    per_call = max(1, settings.batch_rows)
    b = min(n, per_call)  # samples per batch; variants per forward call so that rows ~ batch_rows
    vc = max(1, per_call // b)
    sum_abs = np.zeros((len(variants), len(p.targets)))
    with _bar(n * len(variants), "occlusion", settings.progress) as bar:
        for s0 in range(0, n, b):
            x = p.dos[s0:s0 + b]
            fill = p.fill_for(slice(s0, s0 + b))  # (m or 1, L, K)
            st = None if p.structure is None else p.structure[s0:s0 + b]
            y = p.y_true[s0:s0 + b]
            m = len(x)
            for v0 in range(0, len(variants), vc):
                vs = variants[v0:v0 + vc]
                batch = np.repeat(x[None], len(vs), axis=0)  # (v, m, L, K)
                for j, (w, g) in enumerate(vs):
                    _, _, a, z = windows[w]
                    batch[j][:, a:z, chans[g]] = fill[:, a:z][:, :, chans[g]]  # batch[j]: a view, one advanced index
                sb = None if st is None else np.tile(st, (len(vs), 1))
                rows = np.tile(np.arange(s0, s0 + m), len(vs))
                pred = forward(batch.reshape(-1, L, K), sb, rows).reshape(len(vs), m, -1)
                sum_abs[v0:v0 + len(vs)] += np.abs(pred - y[None]).sum(axis=1)
                bar.update(len(vs) * m)
    base = mae(base_pred, p.y_true)
    delta = (sum_abs / n).reshape(len(windows), len(chans), -1) - base[None, None, :]
    return {"windows": windows, "groups": list(groups), "delta_mae": delta, "base_mae": base}


# =========================================================================== permutation
def permutation(problem: Problem, settings: Settings, forward: Forward, base_pred: np.ndarray, part: str,
                blocks: dict) -> dict:
    """Rise of the MAE when each block of ``part`` ("dos": channel indices of the last axis;
    "structure": column indices; "fixed": every fixed input at once, indices unused) is shuffled
    across the samples.

    blocks: ``{kind: {label: indices}}``. Returns ``kinds`` (B,), ``labels`` (B,), ``delta``
    (R, B, T), ``mean`` and ``std`` (B, T; std with ddof = 1) and ``base_mae`` (T,).
    """
    p = problem
    rng = np.random.default_rng(settings.seed)
    perms = [rng.permutation(p.n) for _ in range(settings.repeats)]
    flat = [(kind, label, np.asarray(idx, dtype=int)) for kind, d in blocks.items() for label, idx in d.items()]
    base = mae(base_pred, p.y_true)
    delta = np.zeros((len(perms), len(flat), len(p.targets)))
    rows = settings.batch_rows
    with _bar(p.n * len(perms) * len(flat), f"permutation ({part})", settings.progress) as bar:
        for r, perm in enumerate(perms):
            for k, (_, _, idx) in enumerate(flat):
                sum_abs = np.zeros(len(p.targets))
                for i in range(0, p.n, rows):
                    sl, src = slice(i, i + rows), perm[i:i + rows]
                    dos = None if p.dos is None else p.dos[sl]
                    st = None if p.structure is None else p.structure[sl]
                    own = np.arange(i, i + len(src))
                    if part == "dos":
                        dos = dos.copy()
                        dos[..., idx] = p.dos[src][..., idx]
                    elif part == "structure":
                        st = st.copy()
                        st[:, idx] = p.structure[src][:, idx]
                    sum_abs += np.abs(forward(dos, st, src if part == "fixed" else own) - p.y_true[sl]).sum(axis=0)
                    bar.update(len(src))
                delta[r, k] = sum_abs / p.n - base
    std = delta.std(axis=0, ddof=1) if len(perms) > 1 else np.zeros(delta.shape[1:])
    return {"kinds": [f[0] for f in flat], "labels": [f[1] for f in flat], "delta": delta,
            "mean": delta.mean(axis=0), "std": std, "base_mae": base}


# =========================================================================== integrated gradients
def trapezoid_path(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(S,) path positions a_k = k / steps and trapezoid weights (1/(2 steps) at the ends, 1/steps inside)."""
    if steps < 1:
        raise ValueError(f"integrated gradients need at least 1 step, got {steps}")
    alphas = np.linspace(0.0, 1.0, steps + 1)
    w = np.full(steps + 1, 1.0 / steps)
    w[0] = w[-1] = 0.5 / steps
    return alphas, w


def integrated_gradients(problem: Problem, settings: Settings, forward: Forward) -> dict:
    """Integrated gradients of every target with respect to the DOS and structure inputs.

    Returns, per target (leading axis T): ``dos_mean_abs`` (T, L, K) mean over samples of
    |attribution|; ``label_mean_abs`` {label: (T, L, K)} the same over the samples of each of the
    ``top_labels`` most frequent sample labels (``label_counts``); ``structure_mean_abs`` (T, F);
    ``attribution_sum`` (T, n) the sum of one sample's attributions; ``f_x``, ``f_baseline`` (T, n)
    the predictions at the sample and at the baseline; ``steps``.
    """
    p = problem
    alphas, w = trapezoid_path(settings.ig_steps)
    S, T, n = len(alphas), len(p.targets), p.n
    has_dos, has_st = p.dos is not None, p.structure is not None
    sfill = None
    if has_st:
        sfill = np.zeros(p.structure.shape[1], np.float32) if p.structure_fill is None \
            else np.asarray(p.structure_fill, dtype=np.float32)
    labels = np.asarray(p.sample_labels if p.sample_labels is not None else ["all"] * n).astype(str)
    names, counts = np.unique(labels, return_counts=True)
    order = sorted(range(len(names)), key=lambda i: (-counts[i], names[i]))[:settings.top_labels]
    top = {str(names[i]): int(counts[i]) for i in order}
    dos_abs = np.zeros((T,) + p.dos.shape[1:]) if has_dos else None
    lab_abs = {k: np.zeros((T,) + p.dos.shape[1:]) for k in top} if has_dos else {}
    st_abs = np.zeros((T, p.structure.shape[1])) if has_st else None
    attr_sum, f_x, f_0 = np.zeros((T, n)), np.zeros((T, n)), np.zeros((T, n))
    b = max(1, settings.batch_rows // S)
    with _bar(n * S, "integrated gradients", settings.progress) as bar:
        for s0 in range(0, n, b):
            sl = slice(s0, s0 + b)
            m = len(p.y_true[sl])
            dd = ds = path_d = path_s = None
            if has_dos:
                fill = p.fill_for(sl)  # (m or 1, L, K)
                dd = p.dos[sl] - fill  # (m, L, K)
                path_d = (fill[:, None] + alphas[None, :, None, None].astype(np.float32) * dd[:, None])
                path_d = path_d.reshape((m * S,) + dd.shape[1:])
            if has_st:
                ds = p.structure[sl] - sfill[None]
                path_s = (sfill[None, None] + alphas[None, :, None].astype(np.float32) * ds[:, None]).reshape(m * S, -1)
            out, gd, gs = forward.gradients(path_d, path_s, np.repeat(np.arange(s0, s0 + m), S))
            out = out.reshape(m, S, T)
            f_x[:, sl], f_0[:, sl] = out[:, -1].T, out[:, 0].T
            if has_dos:
                avg = np.einsum("tmslk,s->tmlk", gd.reshape((T, m, S) + dd.shape[1:]), w)
                a = avg * dd[None]  # (T, m, L, K)
                attr_sum[:, sl] += a.sum(axis=(2, 3))
                dos_abs += np.abs(a).sum(axis=1)
                for k in top:
                    sel = labels[sl] == k
                    if sel.any():
                        lab_abs[k] += np.abs(a[:, sel]).sum(axis=1)
            if has_st:
                a_s = np.einsum("tmsf,s->tmf", gs.reshape(T, m, S, -1), w) * ds[None]
                attr_sum[:, sl] += a_s.sum(axis=2)
                st_abs += np.abs(a_s).sum(axis=1)
            bar.update(m * S)
    return {"steps": settings.ig_steps, "dos_mean_abs": None if dos_abs is None else dos_abs / n,
            "label_mean_abs": {k: v / top[k] for k, v in lab_abs.items()}, "label_counts": top,
            "structure_mean_abs": None if st_abs is None else st_abs / n,
            "attribution_sum": attr_sum, "f_x": f_x, "f_baseline": f_0}


def completeness(ig: dict, tolerance: float = 0.05) -> list:
    """Per target: how well the attributions of each sample sum to F(x) - F(x').

    ``max_rel_error``: max over samples of |sum - (F(x) - F(x'))| / mean over samples of
    |F(x) - F(x')| (the typical size of what is attributed: no blow-up where F(x) ~ F(x'));
    ``max_rel_error_per_sample``: max of |error| / |F(x) - F(x')| over the samples whose
    |F(x) - F(x')| is at least 10 % of that mean; ``max_abs_error``; ``ok``: max_rel_error <= tolerance.
    """
    out = []
    for t in range(len(ig["f_x"])):
        d = ig["f_x"][t] - ig["f_baseline"][t]
        err = np.abs(ig["attribution_sum"][t] - d)
        scale = float(np.mean(np.abs(d))) if len(d) else 0.0
        big = np.abs(d) >= 0.1 * scale
        rel = float(err.max() / scale) if scale > 0 else 0.0
        per = float(np.max(err[big] / np.abs(d[big]))) if scale > 0 and big.any() else 0.0
        out.append({"max_rel_error": rel, "max_rel_error_per_sample": per, "max_abs_error": float(err.max()),
                    "mean_abs_change": scale, "tolerance": tolerance, "ok": bool(rel <= tolerance)})
    return out


def window_sums(profile: np.ndarray, windows: list) -> np.ndarray:
    """(W, ...) sums of a (L, ...) profile over each window's grid points."""
    return np.stack([profile[a:z].sum(axis=0) for _, _, a, z in windows])


# =========================================================================== everything
def analyse(problem: Problem, settings: Settings | None = None, log=print) -> dict:
    """Run every method that applies (DOS methods need ``dos``; structure permutation needs
    ``structure``) and return their results with timing (seconds and rows per method)."""
    settings = settings or Settings()
    p = problem
    t_all = time.time()
    forward = Forward(p, settings.batch_rows)
    res: dict = {"settings": settings, "problem": p, "timing": {}, "notes": []}

    def timed(name, fn):
        t0, r0, g0 = time.time(), forward.rows, forward.gradient_rows
        out = fn()
        sec = time.time() - t0
        res["timing"][name] = {"seconds": round(sec, 1), "forward_rows": forward.rows - r0,
                               "gradient_rows": forward.gradient_rows - g0}
        log(f"  {name}: {sec:.0f} s ({forward.rows - r0} forward rows, {forward.gradient_rows - g0} gradient rows)")
        return out

    base = timed("predictions", lambda: forward(p.dos, p.structure, np.arange(p.n)))
    res["base_pred"], res["base_mae"] = base, mae(base, p.y_true)
    if p.dos is not None:
        res["occlusion"] = timed("occlusion", lambda: occlusion(p, settings, forward, base))
        res["permutation_dos"] = timed("DOS permutation",
                                       lambda: permutation(p, settings, forward, base, "dos", p.channel_blocks))
    else:
        res["notes"].append("The model has no DOS input: occlusion and DOS permutation are skipped.")
    if p.structure is not None:
        fams = {}
        for i, f in enumerate(p.structure_families):
            fams.setdefault(str(f), []).append(i)
        blocks = {"feature": {str(lab): [i] for i, lab in enumerate(p.structure_labels)}, "family": fams}
        res["permutation_structure"] = timed("structure permutation",
                                             lambda: permutation(p, settings, forward, base, "structure", blocks))
    elif not p.fixed_inputs:
        res["notes"].append("The model has no structure input (fusion `none`): structure permutation importance "
                            "and structure attributions are skipped.")
    if p.fixed_inputs:
        res["permutation_fixed"] = timed(f"{p.fixed_label} permutation",
                                         lambda: permutation(p, settings, forward, base, "fixed",
                                                             {"inputs": {p.fixed_label: []}}))
    if p.dos is not None or p.structure is not None:
        ig = timed("integrated gradients", lambda: integrated_gradients(p, settings, forward))
        ig["completeness"] = completeness(ig)
        res["ig"] = ig
    else:
        res["notes"].append("Every input is held fixed: integrated gradients are skipped.")
    res["timing"]["total"] = {"seconds": round(time.time() - t_all, 1), "forward_rows": forward.rows,
                              "gradient_rows": forward.gradient_rows}
    return res


# =========================================================================== outputs
def _fmt(v: float, d: int = 4) -> str:
    return f"{v:.1e}" if 0 < abs(v) < 10 ** -d else f"{v:.{d}f}"


def _write_csv(path, header, rows) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _profile_axes(ax, p, x_what: str, ylabel: str) -> None:
    """The lower panels of the occlusion and integrated-gradients figures: E = 0 marked, labels, legend."""
    ax.axvline(0, color="0.3", ls="--", lw=0.8, label=p.reference_note)
    ax.set_xlabel(f"{x_what} (eV, relative to the reference level)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=6, ncol=2)


def _save(plt, fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _g(v) -> str:
    return f"{v:.6g}"


def _unit(p: Problem, t: str) -> str:
    u = p.units.get(t, "")
    return f" {u}" if u else ""


def _paren(p: Problem, t: str) -> str:
    u = p.units.get(t, "")
    return f" ({u})" if u else ""


def _group_profile(dos_like: np.ndarray, groups: dict) -> np.ndarray:
    """(..., L, K) -> (..., L, G): channel values summed within each group."""
    return np.stack([dos_like[..., np.asarray(idx, dtype=int)].sum(axis=-1) for idx in groups.values()], axis=-1)


def write_report(out_dir, res: dict, title: str = "Feature importance", context: str = "") -> dict:
    """CSV tables, figures, ``importance.json`` and ``importance.md`` of ``analyse``'s result in
    ``out_dir``; returns the JSON summary. ``context``: lines (Markdown) put under the title."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p, s = res["problem"], res["settings"]
    targets = list(p.targets)
    summary: dict = {"targets": targets, "n_samples": p.n, "settings": {
        "window_ev": s.window_ev, "step_ev": s.step_ev, "repeats": s.repeats, "ig_steps": s.ig_steps,
        "ig_rule": "trapezoid", "top_labels": s.top_labels, "seed": s.seed},
        "base_mae": {t: float(v) for t, v in zip(targets, res["base_mae"])}, "timing": res["timing"],
        "notes": res["notes"], "files": []}
    files = summary["files"]
    if "occlusion" in res:
        files += _occlusion_outputs(out, p, res["occlusion"], summary)
    if "permutation_dos" in res:
        files += _permutation_outputs(out, p, res["permutation_dos"], "dos", summary)
    if "permutation_structure" in res:
        files += _permutation_outputs(out, p, res["permutation_structure"], "structure", summary)
    if "permutation_fixed" in res:
        files += _permutation_outputs(out, p, res["permutation_fixed"], "fixed", summary)
    if "ig" in res:
        files += _ig_outputs(out, p, s, res["ig"], res.get("occlusion"), summary)
    (out / "importance.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "importance.md").write_text(markdown(summary, p, title, context))
    return summary


def _occlusion_outputs(out: Path, p: Problem, occ: dict, summary: dict) -> list:
    targets, groups, d = list(p.targets), occ["groups"], occ["delta_mae"]
    rows = []
    for ti, t in enumerate(targets):
        for wi, (lo, hi, _, _) in enumerate(occ["windows"]):
            rows.append([t, _g(lo), _g(hi), _g((lo + hi) / 2)] + [_g(v) for v in d[wi, :, ti]])
    _write_csv(out / "occlusion.csv", ["target", "window_lo_ev", "window_hi_ev", "window_centre_ev"]
               + [f"delta_mae:{g}" for g in groups], rows)
    centres = np.array([(lo + hi) / 2 for lo, hi, _, _ in occ["windows"]])
    plt = pyplot()
    fig, axes = plt.subplots(2, len(targets), figsize=(7.5 * len(targets), 7.5), squeeze=False)
    for ti, t in enumerate(targets):
        ax = axes[0, ti]
        g = len(groups) - 1
        vmax = max(float(np.abs(d[:, :g, ti]).max()), 1e-12)
        im = ax.imshow(d[:, :g, ti].T, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, origin="lower",
                       extent=[centres[0] - (centres[1] - centres[0]) / 2 if len(centres) > 1 else centres[0] - 0.5,
                               centres[-1] + (centres[1] - centres[0]) / 2 if len(centres) > 1 else centres[0] + 0.5,
                               -0.5, g - 0.5])
        ax.set_yticks(range(g))
        ax.set_yticklabels(groups[:g], fontsize=7)
        ax.axvline(0, color="k", ls="--", lw=0.8)
        ax.set_title(f"{t}: rise in test MAE when a {occ['windows'][0][1] - occ['windows'][0][0]:g} eV window is "
                     f"replaced by the reference DOS", fontsize=8)
        fig.colorbar(im, ax=ax, label=f"ΔMAE{_paren(p, t)}")
        ax = axes[1, ti]
        for gi, lab in enumerate(groups):
            last = gi == len(groups) - 1
            ax.plot(centres, d[:, gi, ti], color="k" if last else f"C{gi % 10}", lw=1.6 if last else 0.9,
                    ls="-" if last or gi < 10 else "--", label=lab)
        ax.axhline(0, color="0.6", lw=0.5)
        _profile_axes(ax, p, "window centre", f"ΔMAE{_paren(p, t)}")
    _save(plt, fig, out / "occlusion.png")
    top = []
    for ti, t in enumerate(targets):
        flat = [(float(d[wi, gi, ti]), wi, gi) for wi in range(d.shape[0]) for gi in range(d.shape[1] - 1)]
        flat.sort(key=lambda x: -x[0])
        allc = sorted(((float(d[wi, -1, ti]), wi) for wi in range(d.shape[0])), key=lambda x: -x[0])
        top.append({"target": t, "top_window_groups": [
            {"group": groups[gi], "window_lo_ev": occ["windows"][wi][0], "window_hi_ev": occ["windows"][wi][1],
             "delta_mae": v} for v, wi, gi in flat[:10]],
            "top_windows_all_channels": [{"window_lo_ev": occ["windows"][wi][0], "window_hi_ev": occ["windows"][wi][1],
                                          "delta_mae": v} for v, wi in allc[:5]],
            "group_max": {groups[gi]: float(d[:, gi, ti].max()) for gi in range(d.shape[1])}})
    summary["occlusion"] = {"n_windows": len(occ["windows"]), "groups": groups, "per_target": top}
    return ["occlusion.csv", "occlusion.png"]


def _permutation_outputs(out: Path, p: Problem, perm: dict, part: str, summary: dict) -> list:
    targets = list(p.targets)
    name = f"permutation_{part}"
    rows = []
    for ti, t in enumerate(targets):
        for k, (kind, lab) in enumerate(zip(perm["kinds"], perm["labels"])):
            rows.append([t, kind, lab, _g(perm["mean"][k, ti]), _g(perm["std"][k, ti]), perm["delta"].shape[0]]
                        + [_g(v) for v in perm["delta"][:, k, ti]])
    _write_csv(out / f"{name}.csv", ["target", "kind", "label", "delta_mae_mean", "delta_mae_std", "repeats"]
               + [f"delta_mae_repeat{r + 1}" for r in range(perm["delta"].shape[0])], rows)
    kinds = list(dict.fromkeys(perm["kinds"]))
    per_target = []
    for ti, t in enumerate(targets):
        entry = {"target": t}
        for kind in kinds:
            idx = [k for k, kk in enumerate(perm["kinds"]) if kk == kind]
            ranked = sorted(idx, key=lambda k: -perm["mean"][k, ti])
            entry[kind] = [{"label": perm["labels"][k], "mean": float(perm["mean"][k, ti]),
                            "std": float(perm["std"][k, ti])} for k in ranked]
        per_target.append(entry)
    summary[name] = {"repeats": int(perm["delta"].shape[0]), "kinds": kinds, "per_target": per_target}
    if len(perm["labels"]) == 1:  # one block (the fixed inputs): its number is in the report, a bar says no more
        return [f"{name}.csv"]
    plt = pyplot()
    widths = []
    for kind in kinds:
        widths.append(min(30, perm["kinds"].count(kind)) + 2)
    fig, axes = plt.subplots(len(targets), len(kinds), figsize=(0.25 * sum(widths) + 2.5 * len(kinds),
                                                                 4.2 * len(targets)),
                             squeeze=False, gridspec_kw={"width_ratios": widths})
    for ti, t in enumerate(targets):
        for ki, kind in enumerate(kinds):
            idx = [k for k, kk in enumerate(perm["kinds"]) if kk == kind]
            ranked = sorted(idx, key=lambda k: -perm["mean"][k, ti])
            shown = ranked[:30] if len(idx) > 30 else idx  # many features: the 30 largest
            ax = axes[ti, ki]
            ax.bar(range(len(shown)), perm["mean"][shown, ti], yerr=perm["std"][shown, ti], capsize=1.5,
                   color=f"C{ki}")
            ax.set_xticks(range(len(shown)))
            ax.set_xticklabels([perm["labels"][k] for k in shown], rotation=75, ha="right", fontsize=6)
            ax.axhline(0, color="0.5", lw=0.5)
            ax.set_title(f"{t}: {kind}" + (" (30 largest)" if len(idx) > 30 else ""), fontsize=8)
            ax.set_ylabel(f"ΔMAE{_paren(p, t)}, mean ± std")
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    plt.close(fig)
    return [f"{name}.csv", f"{name}.png"]


def _ig_outputs(out: Path, p: Problem, s: Settings, ig: dict, occ: dict | None, summary: dict) -> list:
    targets = list(p.targets)
    files = []
    info: dict = {"steps": ig["steps"], "rule": "trapezoid", "completeness": [
        {"target": t, **c} for t, c in zip(targets, ig["completeness"])], "per_target": []}
    _write_csv(out / "ig_completeness.csv", ["target", "sample", "f_x", "f_baseline", "attribution_sum", "error"],
               [[t, i, _g(ig["f_x"][ti, i]), _g(ig["f_baseline"][ti, i]), _g(ig["attribution_sum"][ti, i]),
                 _g(ig["attribution_sum"][ti, i] - ig["f_x"][ti, i] + ig["f_baseline"][ti, i])]
                for ti, t in enumerate(targets) for i in range(p.n)])
    files.append("ig_completeness.csv")
    plt = pyplot()
    if ig["dos_mean_abs"] is not None:
        e, labels, groups = np.asarray(p.energies_ev), list(p.channel_labels), dict(p.occlusion_groups)
        dm = ig["dos_mean_abs"]  # (T, L, K)
        _write_csv(out / "ig_dos.csv", ["target", "energy_ev"] + [f"mean_abs_attr:{c}" for c in labels],
                   [[t, _g(e[i])] + [_g(v) for v in dm[ti, i]] for ti, t in enumerate(targets)
                    for i in range(len(e))])
        fig, axes = plt.subplots(2, len(targets), figsize=(7.5 * len(targets), 8), squeeze=False)
        for ti, t in enumerate(targets):
            ax = axes[0, ti]
            im = ax.imshow(dm[ti].T, aspect="auto", cmap="viridis", origin="lower",
                           extent=[e[0], e[-1], -0.5, len(labels) - 0.5])
            ax.set_yticks(range(len(labels)))
            ax.set_yticklabels(labels, fontsize=5)
            ax.axvline(0, color="w", ls="--", lw=0.8)
            ax.set_title(f"{t}: integrated gradients, mean |attribution| per energy point and channel", fontsize=8)
            fig.colorbar(im, ax=ax, label=f"mean |attribution|{_paren(p, t)}")
            ax = axes[1, ti]
            prof = _group_profile(dm[ti], groups)
            for gi, lab in enumerate(groups):
                ax.plot(e, prof[:, gi], lw=0.9, color=f"C{gi % 10}", ls="-" if gi < 10 else "--", label=lab)
            _profile_axes(ax, p, "energy", f"mean |attribution| summed over the group{_paren(p, t)}")
        _save(plt, fig, out / "ig_dos.png")
        files += ["ig_dos.csv", "ig_dos.png"]
        windows = occ["windows"] if occ else energy_windows(e, s.window_ev, s.step_ev)
        for ti, t in enumerate(targets):
            per_channel = dm[ti].sum(axis=0)  # (K,) summed over energies
            total = float(per_channel.sum())
            ranked = np.argsort(-per_channel)
            ws = window_sums(_group_profile(dm[ti], groups), windows)  # (W, G)
            flat = sorted(((float(ws[wi, gi]), wi, gi) for wi in range(ws.shape[0]) for gi in range(ws.shape[1])),
                          key=lambda x: -x[0])
            wall = ws.sum(axis=1)
            info["per_target"].append({
                "target": t, "total_mean_abs": total,
                "channels": [{"label": labels[k], "sum_mean_abs": float(per_channel[k]),
                              "share": float(per_channel[k] / total) if total > 0 else 0.0} for k in ranked],
                "groups": sorted([{"label": g, "sum_mean_abs": float(prof_sum)} for g, prof_sum in
                                  zip(groups, _group_profile(dm[ti], groups).sum(axis=0))],
                                 key=lambda x: -x["sum_mean_abs"]),
                "top_window_groups": [{"group": list(groups)[gi], "window_lo_ev": windows[wi][0],
                                       "window_hi_ev": windows[wi][1], "sum_mean_abs": v} for v, wi, gi in flat[:10]],
                "top_windows_all_channels": [{"window_lo_ev": windows[wi][0], "window_hi_ev": windows[wi][1],
                                              "sum_mean_abs": float(wall[wi])} for wi in np.argsort(-wall)[:5]]})
        if ig["label_mean_abs"]:
            labs = list(ig["label_mean_abs"])
            rows = []
            per_label = {}
            for ti, t in enumerate(targets):
                for lab in labs:
                    prof = _group_profile(ig["label_mean_abs"][lab][ti], groups)  # (L, G)
                    rows += [[t, lab, ig["label_counts"][lab], _g(e[i])] + [_g(v) for v in prof[i]]
                             for i in range(len(e))]
                    ws = window_sums(prof, windows)
                    wi, gi = np.unravel_index(int(np.argmax(ws)), ws.shape)
                    tot = prof.sum(axis=0)
                    per_label.setdefault(t, []).append({
                        "label": lab, "n": ig["label_counts"][lab], "top_group": list(groups)[int(np.argmax(tot))],
                        "top_group_share": float(tot.max() / tot.sum()) if tot.sum() > 0 else 0.0,
                        "top_window_group": {"group": list(groups)[gi], "window_lo_ev": windows[wi][0],
                                             "window_hi_ev": windows[wi][1]}})
            _write_csv(out / "ig_by_label.csv", ["target", "label", "n_samples", "energy_ev"]
                       + [f"mean_abs_attr:{g}" for g in groups], rows)
            cols = min(5, len(labs))
            nrow = int(np.ceil(len(labs) / cols))
            fig, axes = plt.subplots(nrow * len(targets), cols, figsize=(3.6 * cols, 2.6 * nrow * len(targets)),
                                     squeeze=False)
            for ti, t in enumerate(targets):
                for li, lab in enumerate(labs):
                    ax = axes[ti * nrow + li // cols, li % cols]
                    prof = _group_profile(ig["label_mean_abs"][lab][ti], groups)
                    ax.imshow(prof.T, aspect="auto", cmap="viridis", origin="lower",
                              extent=[e[0], e[-1], -0.5, len(groups) - 0.5])
                    ax.set_yticks(range(len(groups)))
                    ax.set_yticklabels(list(groups), fontsize=5)
                    ax.axvline(0, color="w", ls="--", lw=0.6)
                    ax.set_title(f"{t}: {lab} (n = {ig['label_counts'][lab]})", fontsize=7)
                    ax.tick_params(axis="x", labelsize=6)
                for li in range(len(labs), nrow * cols):
                    axes[ti * nrow + li // cols, li % cols].axis("off")
            fig.suptitle("integrated gradients, mean |attribution| per energy and channel group, per sample label "
                         "(colour scale per panel)", fontsize=8)
            fig.tight_layout()
            fig.savefig(out / "ig_by_label.png", dpi=100)
            plt.close(fig)
            files += ["ig_by_label.csv", "ig_by_label.png"]
            info["per_label"] = per_label
    if ig["structure_mean_abs"] is not None:
        sm = ig["structure_mean_abs"]  # (T, F)
        fam = [str(f) for f in p.structure_families]
        _write_csv(out / "ig_structure.csv", ["target", "feature", "family", "mean_abs_attr"],
                   [[t, lab, fam[i], _g(sm[ti, i])] for ti, t in enumerate(targets)
                    for i, lab in enumerate(p.structure_labels)])
        fig, axes = plt.subplots(len(targets), 1, figsize=(10, 3.6 * len(targets)), squeeze=False)
        info["structure"] = []
        for ti, t in enumerate(targets):
            ranked = np.argsort(-sm[ti])
            shown = ranked[:30]
            ax = axes[ti, 0]
            ax.bar(range(len(shown)), sm[ti, shown], color="C2")
            ax.set_xticks(range(len(shown)))
            ax.set_xticklabels([p.structure_labels[k] for k in shown], rotation=75, ha="right", fontsize=6)
            ax.set_ylabel(f"mean |attribution|{_paren(p, t)}")
            ax.set_title(f"{t}: integrated gradients on the structure input (largest {len(shown)})", fontsize=8)
            fams = {}
            for i, f in enumerate(fam):
                fams[f] = fams.get(f, 0.0) + float(sm[ti, i])
            info["structure"].append({"target": t, "features": [{"label": p.structure_labels[k],
                                                                  "mean_abs": float(sm[ti, k])} for k in ranked],
                                      "families": sorted([{"label": f, "sum_mean_abs": v} for f, v in fams.items()],
                                                         key=lambda x: -x["sum_mean_abs"])})
        fig.tight_layout()
        fig.savefig(out / "ig_structure.png", dpi=110)
        plt.close(fig)
        files += ["ig_structure.csv", "ig_structure.png"]
    summary["integrated_gradients"] = info
    return files


# =========================================================================== words
def _win(d: dict) -> str:
    return f"{d['window_lo_ev']:+.2f}…{d['window_hi_ev']:+.2f} eV"


def markdown(summary: dict, p: Problem, title: str = "Feature importance", context: str = "") -> str:
    """``importance.md``: the settings, then per target the top windows, channels and structure
    features in words and numbers, the completeness check, notes and timing."""
    st = summary["settings"]
    tm = summary["timing"]
    lines = [f"# {title}", ""]
    if context:
        lines += [context, ""]
    lines += [f"{summary['n_samples']} samples; targets {', '.join(summary['targets'])}. Every number is a rise of "
              "the mean absolute error (ΔMAE, the target's units) over the unperturbed MAE, except integrated "
              "gradients (mean |attribution|, the target's units).", "",
              "Settings: occlusion windows of "
              f"{st['window_ev']:g} eV sliding by {st['step_ev']:g} eV; {st['repeats']} permutations per block "
              f"(mean ± sample std); integrated gradients with {st['ig_steps']} trapezoid steps; seed {st['seed']}.",
              ""]
    for note in summary["notes"]:
        lines += [f"Note: {note}", ""]
    for ti, t in enumerate(summary["targets"]):
        u = _unit(p, t)
        base = summary["base_mae"][t]
        lines += [f"## {t}", "", f"Unperturbed MAE: {_fmt(base)}{u}.", ""]
        if "occlusion" in summary:
            oc = summary["occlusion"]["per_target"][ti]
            top = oc["top_window_groups"]
            lines += ["**Energy windows (occlusion).**"]
            if top:
                b = top[0]
                lines += [f"Replacing the {b['group']} DOS in the window {_win(b)} by the reference DOS raises the "
                          f"MAE most: by {_fmt(b['delta_mae'])}{u} "
                          f"({100 * b['delta_mae'] / base if base else 0:+.0f} % of the MAE). The ten largest "
                          "window × group rises:", "",
                          "| group | window | ΔMAE |", "|---|---|---:|"]
                lines += [f"| {x['group']} | {_win(x)} | {_fmt(x['delta_mae'])} |" for x in top]
                a = oc["top_windows_all_channels"][0]
                lines += ["", f"All channels at once: the largest rise is {_fmt(a['delta_mae'])}{u} for {_win(a)}.", ""]
        if "permutation_dos" in summary:
            pd = summary["permutation_dos"]["per_target"][ti]
            lines += ["**DOS channels (permutation).**"]
            for kind in summary["permutation_dos"]["kinds"]:
                ranked = pd[kind][:5] if kind == "channel" else pd[kind]
                head = "Largest five channels" if kind == "channel" else f"By {kind}"
                lines += [f"{head}: " + "; ".join(f"{x['label']} {_fmt(x['mean'])} ± {_fmt(x['std'])}"
                                                  for x in ranked) + f"{u}."]
            lines += [""]
        if "permutation_structure" in summary:
            ps = summary["permutation_structure"]["per_target"][ti]
            lines += ["**Structure features (permutation).** Ten largest features: "
                      + "; ".join(f"{x['label']} {_fmt(x['mean'])} ± {_fmt(x['std'])}" for x in ps["feature"][:10])
                      + f"{u}. Families (each shuffled as a whole): "
                      + "; ".join(f"{x['label']} {_fmt(x['mean'])} ± {_fmt(x['std'])}" for x in ps["family"])
                      + f"{u}.",
                      ""]
        if "permutation_fixed" in summary:
            (x,) = summary["permutation_fixed"]["per_target"][ti]["inputs"]
            lines += [f"**{x['label'][:1].upper()}{x['label'][1:]} (permutation).** Shuffled across the samples as "
                      f"one block: ΔMAE {_fmt(x['mean'])} ± {_fmt(x['std'])}{u}.", ""]
        if "integrated_gradients" not in summary:
            continue
        ig = summary["integrated_gradients"]
        lines += ["**Integrated gradients.**"]
        per = [x for x in ig["per_target"] if x["target"] == t]
        if per:
            x = per[0]
            ch = x["channels"][:5]
            lines += ["Channels by mean |attribution| summed over energies (share of the total): "
                      + "; ".join(f"{c['label']} {_fmt(c['sum_mean_abs'])} ({100 * c['share']:.0f} %)" for c in ch)
                      + f"{u}. Largest window × group: " + "; ".join(
                          f"{w['group']} {_win(w)} ({_fmt(w['sum_mean_abs'])})" for w in x["top_window_groups"][:3])
                      + "."]
        for sx in ig.get("structure", []):
            if sx["target"] == t:
                lines += ["Structure features by mean |attribution|: " + "; ".join(
                    f"{f['label']} {_fmt(f['mean_abs'])}" for f in sx["features"][:5])
                    + f"{u}; families: "
                    + "; ".join(f"{f['label']} {_fmt(f['sum_mean_abs'])}" for f in sx["families"]) + "."]
        c = [c for c in ig["completeness"] if c["target"] == t][0]
        lines += [f"Completeness: the attributions of a sample sum to F(x) − F(baseline) within "
                  f"{100 * c['max_rel_error']:.2f} % of the mean |F(x) − F(baseline)| "
                  f"({_fmt(c['mean_abs_change'])}{u}) at worst (max abs error {_fmt(c['max_abs_error'])}{u}; "
                  f"worst per-sample relative error "
                  f"{100 * c['max_rel_error_per_sample']:.2f} %); tolerance {100 * c['tolerance']:.0f} %: "
                  f"{'passed' if c['ok'] else 'NOT passed: more integration steps are needed'}.", ""]
        if ig.get("per_label", {}).get(t):
            lines += ["Per sample label (the most frequent ones):", "",
                      "| label | n | group with the largest attribution (share) | largest window × group |",
                      "|---|---:|---|---|"]
            lines += [f"| {x['label']} | {x['n']} | {x['top_group']} ({100 * x['top_group_share']:.0f} %) | "
                      f"{x['top_window_group']['group']} {_win(x['top_window_group'])} |" for x in ig["per_label"][t]]
            lines += [""]
    lines += ["## Timing", "", "| step | seconds | forward rows | gradient rows |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v['seconds']:.1f} | {v['forward_rows']} | {v['gradient_rows']} |" for k, v in tm.items()]
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in summary["files"]) + ", `importance.json`.", ""]
    return "\n".join(lines)
