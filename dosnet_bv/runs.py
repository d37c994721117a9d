"""Run modes on one data file: a single train/val/test run (``run_experiment``), grouped K-fold
cross-validation (``run_cv``), predictions of a saved run on a file (``predict_run``) and the
feature importance of a saved run (``run_importance``). Each writes a run folder.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dosnet_bv import report
from dosnet_bv.data import Dataset, load_data, target_matrix, uses_bonds
from dosnet_bv.fit import fit_predict, predict_outputs, strategy_for, stream_errors, stream_input
from dosnet_bv.metrics import data_counts, metrics_for, summary_table
from dosnet_bv.outputs import Log, atomic_path, plot_learning_curve, plot_parity, write_history, write_json, write_predictions
from dosnet_bv.params import (ADDED_KEYS, PARAM_RULES, SPLITS, TARGET_UNITS, TrainError, load_params, resolve_data_file,
                              validate_params)
from dosnet_bv.resume import ResultStore, check_resume
from dosnet_bv.scalers import model_inputs, scalers_from_json


#: The training state of an unfinished single run (``fit.Checkpoint``), for ``--resume``.
CHECKPOINT = "checkpoint.npz"
#: The settings of a ``--cv`` run, written when it starts: it marks the folder as a CV run that a
#: rerun (same ``--out``, or ``--resume``) continues after its finished folds (``results/fold<f>.json``).
CV_CONFIG = "cv_config.json"


def cv_resumable(run_dir: Path) -> bool:
    """True when ``run_dir`` holds an interrupted ``--cv`` run (its config, no ``metrics.json``)."""
    return (Path(run_dir) / CV_CONFIG).is_file() and not (Path(run_dir) / "metrics.json").is_file()


def check_resumable(run_dir: Path) -> bool:
    """``TrainError`` unless ``run_dir`` holds an interrupted run that ``--resume`` can continue;
    True for a ``--cv`` run (its params.json holds its ``cv_folds``), False for a single run."""
    if not (run_dir / "params.json").is_file():
        raise TrainError(f"--resume: {run_dir / 'params.json'} not found (is {run_dir} a train.py run folder?)")
    if (run_dir / "metrics.json").is_file():
        raise TrainError(f"--resume: {run_dir} is complete (it has metrics.json); nothing to resume")
    if (run_dir / CV_CONFIG).is_file():
        return True
    if not (run_dir / CHECKPOINT).is_file():
        raise TrainError(f"--resume: {run_dir} has no {CHECKPOINT} (interrupted before its first epoch ended): "
                         f"start it again with --overwrite")
    return False


def check_run_folder(run_dir: Path, what: str) -> None:
    """``TrainError`` unless ``run_dir`` holds a finished run: params, scalers, model and, written
    last, ``metrics.json`` (without it the run was interrupted or failed)."""
    for name in ("params.json", "scalers.json", "model.keras"):
        if not (run_dir / name).is_file():
            raise TrainError(f"{what}: {run_dir / name} not found (is {run_dir} a train.py run folder?)")
    if not (run_dir / "metrics.json").is_file():
        raise TrainError(f"{what}: {run_dir} is an incomplete run (no metrics.json: training was interrupted or "
                         f"failed); rerun it with --overwrite")


def load_saved_model(run_dir: Path, what: str):
    """``run_dir/model.keras``; a file Keras cannot read -> one-line ``TrainError``. The root
    ``net.py`` is imported first: it registers the bond branch's layers with Keras."""
    import keras

    from dosnet_bv.fit import net_module

    net_module()
    path = run_dir / "model.keras"
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001 (Keras raises many kinds, e.g. ValueError "File not found" for a bad zip)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TrainError(f"{what}: cannot load {path} (damaged or not a Keras model file): {first}") from None


def read_json(path: Path, what: str) -> dict:
    """A JSON file of a run folder; ``TrainError`` (prefixed ``what``) when it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TrainError(f"{what}: cannot read {path}: {exc}") from None


def run_experiment(params: dict, data: Dataset, out_dir, log: Log | None = None, tensorboard: bool = False,
                   resume: bool = False) -> dict:
    """Train on the train split, stop early on val, predict train/val/test; write the run folder.

    Returns the metrics written to ``metrics.json``: ``splits`` -> split -> target -> MAE, RMSE,
    R², per-element MAE, mean-baseline MAE (and valence accuracy), plus counts and timing.
    Under ``distribute`` multi_worker the chief writes ``out_dir``, worker i ``out_dir/worker<i>``.
    ``tensorboard``: TensorBoard logs in ``out_dir/tensorboard`` (upstream writes them always; off
    by default here since they cost time). ``out_dir/checkpoint.npz`` is written at the end of
    every epoch and removed when the run is complete; ``resume`` continues from it.
    """
    from dosnet_bv import distribute

    out = Path(out_dir)
    worker = distribute.worker_of(strategy_for(params))
    if worker[0] > 0:
        out = out / f"worker{worker[0]}"
    out.mkdir(parents=True, exist_ok=True)
    log = log or Log(out / "train.log")
    targets = params["targets"]
    if not resume:
        write_json(out / "params.json", params)
    rows = {s: np.flatnonzero(data.split == s) for s in SPLITS}
    for s in ("train", "val"):
        if not len(rows[s]):
            raise TrainError(f"{data.path}: the {s} split is empty (params key 'split')")
    counts = data_counts(data, rows)
    log(f"DOSnet-BV: {data.n} samples from {data.path}; fusion {params['fusion']}, targets {', '.join(targets)}; "
        + ", ".join(f"{s} {c['materials']} materials / {c['samples']} samples" for s, c in counts.items()))
    res = fit_predict(params, data, rows["train"], rows["val"], rows, log,
                      tensorboard_dir=out / "tensorboard" if tensorboard else None, show_summary=not resume,
                      checkpoint=out / CHECKPOINT, resume=resume)
    with atomic_path(out / "model.keras") as tmp:
        res.model.save(tmp)
    write_json(out / "scalers.json", res.scalers.json)
    write_history(out / "history.csv", res.history)
    train_mean = target_matrix(data, targets)[rows["train"]].mean(axis=0)
    metrics = {"data_file": data.path, "fusion": params["fusion"], "targets": targets, "counts": counts,
               "epochs_run": res.epochs_run, "best_epoch": res.best_epoch, "train_seconds": round(res.seconds, 1),
               "train_samples_per_s": round(len(rows["train"]) * res.epochs_run / max(res.seconds, 1e-9), 1),
               "input": data.reading, "distribute": params["distribute"],
               "splits": {s: metrics_for(targets, data, rows[s], res.predictions[s], train_mean) for s in SPLITS}}
    write_predictions(out / "predictions.csv", data, targets,
                      [(s, rows[s], res.predictions[s], None) for s in SPLITS])
    y = target_matrix(data, targets)
    plot_parity(out / "parity.png", targets, [(s, y[rows[s]], res.predictions[s]) for s in SPLITS])
    plot_learning_curve(out / "learning_curve.png", [res.history], [res.best_epoch])
    write_json(out / "metrics.json", metrics)  # last: marks the run folder complete
    (out / CHECKPOINT).unlink(missing_ok=True)
    log(f"trained {metrics['epochs_run']} epochs in {res.seconds:.0f} s (best epoch {res.best_epoch}, "
        f"{metrics['train_samples_per_s']:.0f} samples/s)")
    log(summary_table(metrics["splits"], targets))
    log(f"run folder: {out}")
    return metrics


def cv_splits(group_ids, k: int, val_fraction: float, seed: int) -> list:
    """Grouped K-fold: ``[(train_rows, val_rows, test_rows), ...]``, one per fold.

    ``group_ids`` (n,): one id per sample; samples of one group (a family, or a material) always
    stay together. Groups are shuffled with ``seed`` and dealt, largest first, to the fold with the
    fewest samples so far; inside each fold's training part a ``val_fraction`` of the groups (at
    least one) is held out for early stopping. Every group is in exactly one test fold.
    """
    material_ids = np.asarray(group_ids)
    ids, counts = np.unique(material_ids, return_counts=True)
    if len(ids) < k + 1:
        raise TrainError(f"--cv {k}: needs more than {k} groups (families or materials, params key 'split_by'), "
                         f"the data have {len(ids)} (params key 'cv_folds')")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    order = order[np.argsort(-counts[order], kind="stable")]
    load, fold_of = np.zeros(k, int), {}
    for i in order:
        f = int(np.argmin(load))
        fold_of[ids[i]] = f
        load[f] += counts[i]
    fold = np.array([fold_of[m] for m in material_ids])
    out = []
    for f in range(k):
        test = np.flatnonzero(fold == f)
        rest_ids = np.array(sorted(set(material_ids[fold != f])))
        if len(rest_ids) < 2:  # one large group alone outside this test part: nothing left to train on
            raise TrainError(f"--cv {k}: fold {f + 1} leaves {len(rest_ids)} group outside its test part, no room "
                             f"for both training and validation groups (the largest group holds "
                             f"{counts.max()} of {len(material_ids)} samples); use fewer folds or more data")
        n_val = min(len(rest_ids) - 1, max(1, int(round(val_fraction * len(rest_ids)))))
        val_ids = set(rest_ids[np.random.default_rng(seed + 1000 + f).permutation(len(rest_ids))[:n_val]])
        is_val = np.array([m in val_ids for m in material_ids])
        out.append((np.flatnonzero((fold != f) & ~is_val), np.flatnonzero((fold != f) & is_val), test))
    return out


@dataclass(frozen=True)
class FoldResult:
    """One finished CV fold, as ``results/fold<f>.json`` keeps it: ``predictions`` (n_test, T)
    of its test rows in physical units, ``train_mean`` (T,) of its training rows (the mean
    predictor), the per-epoch loss ``history`` and the ``best_epoch`` (1-based)."""

    predictions: np.ndarray
    train_mean: np.ndarray
    history: dict
    best_epoch: int

    @classmethod
    def parse(cls, raw: dict, n_test: int, n_targets: int) -> "FoldResult":
        """From the JSON of a fold file; ``ValueError`` (or ``KeyError``, ``TypeError``) when it
        does not fit a fold of ``n_test`` test rows and ``n_targets`` targets."""
        pred = np.asarray(raw["predictions"], dtype=float).reshape(-1, n_targets) if n_test else np.zeros((0, n_targets))
        mean = np.asarray(raw["train_mean"], dtype=float)
        if pred.shape != (n_test, n_targets) or mean.shape != (n_targets,):
            raise ValueError(f"{pred.shape[0]} test predictions of {mean.size} targets, expected {n_test} of {n_targets}")
        history = {str(k): [float(x) for x in v] for k, v in raw["history"].items()}
        return cls(pred, mean, history, int(raw["best_epoch"]))


def data_fingerprint(data: Dataset) -> str:
    """Short hash of the samples (material ids and site indices, in order): the same data under
    another path (``--resume --data MOVED.h5``) has the same fingerprint."""
    h = hashlib.sha1()
    for mid, site in zip(data.material_id, data.site_index):
        h.update(f"{mid}:{int(site)};".encode())
    return h.hexdigest()[:16]


def content_fingerprint(data: Dataset) -> str:
    """Short hash of what a model sees and is scored on: the samples (``data_fingerprint``), their
    families, targets, structure vector, bond table and DOS. Two builds of the same records agree;
    a recomputed record, another grid or another target changes it."""
    h = hashlib.sha1(data_fingerprint(data).encode())
    for ids in (data.family_id, data.origin):
        if ids is not None:
            h.update("|".join(map(str, ids)).encode())
    for name in sorted(data.targets):
        h.update(name.encode())
        h.update(np.ascontiguousarray(data.targets[name], dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(data.structure, dtype=np.float32).tobytes())
    if data.bonds is not None:
        for a in (data.bonds.distance_ang, data.bonds.neighbour_z, data.bonds.mask, data.bonds.centre_z):
            h.update(np.ascontiguousarray(a).tobytes())
    step = 1024  # the DOS in blocks: a streamed one is never read whole
    for start in range(0, data.n, step):
        rows = np.arange(start, min(start + step, data.n))
        block = data.dos.read(rows) if hasattr(data.dos, "read") else data.dos[rows]
        h.update(np.ascontiguousarray(block, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def run_cv(params: dict, data: Dataset, k: int, out_dir, log: Log | None = None, tensorboard: bool = False) -> dict:
    """Grouped K-fold cross-validation: every sample predicted once, by the model of the fold
    that held its family (or material, ``split_by``) out. Writes params, metrics (overall and per fold), predictions
    (with the fold), parity plot, learning curves and log; no model is kept.

    The folds are dealt with ``split_seed`` (fixed, like the train/val/test split: ``--seed`` does
    not move them); fold f trains with seed ``seed + f``. ``tensorboard``: logs per fold in
    ``out_dir/tensorboard/fold<f>``. Each finished fold is kept in ``out_dir/results/fold<f>.json``
    and ``out_dir/cv_config.json`` holds the settings: run again into a folder holding an
    interrupted CV of the same settings and data, it continues after the finished folds (a damaged
    fold file is reported on one line and that fold trained again); other settings are refused.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = log or Log(out / "train.log")
    targets = params["targets"]
    resuming = cv_resumable(out)
    check_resume(out / CV_CONFIG, {"data": data_fingerprint(data), "n_samples": data.n, "cv_folds": k,
                                   "params": {p: v for p, v in params.items() if p not in ("data_file", "out_dir")}},
                 log)
    write_json(out / "params.json", params)
    groups = data.groups(params["split_by"])
    folds = cv_splits(groups, k, params["cv_val_fraction"], params["split_seed"])
    log(f"DOSnet-BV {k}-fold CV (grouped by {params['split_by']}: {len(set(groups))} groups): {data.n} samples, "
        f"{len(set(data.material_id))} materials "
        f"from {data.path}; fusion {params['fusion']}, targets {', '.join(targets)}")
    if resuming:
        log(f"resuming the interrupted CV in {out}: finished folds are read from {out / 'results'}")
    store = ResultStore(out / "results", log)
    pred = np.full((data.n, len(targets)), np.nan)
    base = np.full((data.n, len(targets)), np.nan)  # the mean predictor of each sample's fold
    fold_metrics, histories, bests, parts = [], [], [], []
    y = target_matrix(data, targets)
    t0 = time.time()
    for f, (tr, va, te) in enumerate(folds):
        def train_fold():
            log(f"fold {f + 1}/{k}: train {len(tr)}, val {len(va)}, test {len(te)} samples")
            res = fit_predict({**params, "seed": params["seed"] + f}, data, tr, va, {"test": te}, log,
                              tensorboard_dir=out / "tensorboard" / f"fold{f + 1}" if tensorboard else None,
                              show_summary=f == 0)
            return {"fold": f + 1, "best_epoch": res.best_epoch, "history": res.history,
                    "predictions": res.predictions["test"].tolist(), "train_mean": y[tr].mean(axis=0).tolist(),
                    "train_seconds": round(res.seconds, 1)}

        job = store.get(f"fold{f + 1}", train_fold, lambda raw: FoldResult.parse(raw, len(te), len(targets)))
        if job.resumed:
            log(f"fold {f + 1}/{k}: from an earlier, interrupted run ({store.path(f'fold{f + 1}')})")
        fold = job.value
        pred[te] = fold.predictions
        base[te] = fold.train_mean
        fold_metrics.append({"fold": f + 1, "counts": data_counts(data, {"train": tr, "val": va, "test": te}),
                             "best_epoch": fold.best_epoch,
                             **metrics_for(targets, data, te, pred[te], fold.train_mean)})
        histories.append(fold.history)
        bests.append(fold.best_epoch)
        parts.append(("test", te, pred[te], f + 1))
    all_rows = np.arange(data.n)
    metrics = {"data_file": data.path, "fusion": params["fusion"], "targets": targets, "cv_folds": k,
               "seconds": round(time.time() - t0, 1),
               "splits": {"cv": metrics_for(targets, data, all_rows, pred, base)}, "folds": fold_metrics}
    write_predictions(out / "predictions.csv", data, targets, parts)
    plot_parity(out / "parity.png", targets, [("test", y, pred)])
    plot_learning_curve(out / "learning_curve.png", histories, bests)
    write_json(out / "metrics.json", metrics)  # last: marks the run folder complete
    log(summary_table(metrics["splits"], targets))
    log(f"run folder: {out}")
    return metrics


def predict_run(run_dir, data_path, out_dir=None, log: Log | None = None) -> Path:
    """Predictions for every sample of ``data_path`` with the model and scalers saved in ``run_dir``.

    Writes ``predictions.csv`` (split = the file's stored split) and ``metrics.json`` into
    ``out_dir`` (default ``<run_dir>/predict-<data file stem>``); returns that folder.
    """
    run_dir = Path(run_dir)
    check_run_folder(run_dir, "--predict")
    params = load_params(run_dir / "params.json")
    js = read_json(run_dir / "scalers.json", "--predict")
    data = load_data(data_path, params, resplit=False, labelled=False)
    scalers = scalers_from_json(js, data)
    out = Path(out_dir) if out_dir else run_dir / f"predict-{Path(data_path).stem}"
    out.mkdir(parents=True, exist_ok=True)
    log = log or Log(out / "predict.log")
    model = load_saved_model(run_dir, "--predict")
    targets = params["targets"]
    rows = np.arange(data.n)
    streaming = data.streaming and params["fusion"] != "structure_only"
    with stream_errors(data, streaming):
        inputs = stream_input(params, data, scalers, rows, None, False) if streaming else \
            model_inputs(params, data, scalers, rows)
        pred = scalers.targets.inverse(predict_outputs(model, inputs, targets, params["batch_size"]))
    labels = [s for s in SPLITS if np.any(data.split == s)]
    write_predictions(out / "predictions.csv", data, targets,
                      [(s, np.flatnonzero(data.split == s), pred[data.split == s], None) for s in labels])
    train_mean = np.asarray(js["target_train_mean"])
    metrics = {"model": str(run_dir), "data_file": str(data_path), "targets": targets,
               "splits": {"all": metrics_for(targets, data, rows, pred, train_mean),
                          **{s: metrics_for(targets, data, np.flatnonzero(data.split == s), pred[data.split == s],
                                            train_mean) for s in labels}}}
    write_json(out / "metrics.json", metrics)
    log(f"predicted {data.n} samples of {data_path} with {run_dir / 'model.keras'}")
    log(summary_table(metrics["splits"], targets))
    log(f"predictions: {out / 'predictions.csv'}")
    return out


def reference_dos(data: Dataset, scalers, train_rows, test_rows, by_element: bool) -> tuple:
    """The importance methods' reference DOS, standardised: the training rows' mean DOS at each
    energy and channel, (L, K) (``by_element`` False), or one such mean per centre element of the
    training rows plus the overall mean, (G + 1, L, K), with each test row's index into it (its
    element's, the overall mean for an element without training rows); and a sentence saying which.
    Summed in chunks (no copy of the training rows)."""
    elements = np.asarray(data.element)
    keys = sorted(set(elements[train_rows])) if by_element else []
    totals, counts = np.zeros((len(keys) + 1,) + data.dos.shape[1:]), np.zeros(len(keys) + 1)
    slot = {e: i for i, e in enumerate(keys)}
    for i in range(0, len(train_rows), 256):
        chunk = np.sort(train_rows[i:i + 256])
        block = data.dos[chunk].astype(np.float64)
        totals[-1] += block.sum(axis=0)
        counts[-1] += len(chunk)
        for e in set(elements[chunk]) & set(slot):
            sel = elements[chunk] == e
            totals[slot[e]] += block[sel].sum(axis=0)
            counts[slot[e]] += sel.sum()
    fill = ((totals / counts[:, None, None] - scalers.dos.mean) / scalers.dos.scale).astype(np.float32)
    n = len(train_rows)
    if not by_element:
        return fill[-1], None, f"the mean over the {n} training rows of the DOS at each energy and channel"
    index = np.array([slot.get(e, len(keys)) for e in elements[test_rows]])
    unseen = int((index == len(keys)).sum())
    return fill, index, (f"per centre element, the mean DOS at each energy and channel of the training rows with "
                         f"the test sample's centre element ({len(keys)} elements, {n} training rows; "
                         f"{unseen} test samples whose element has no training row take the mean of all of them), "
                         f"so a method asks what sets a site apart from others of its element")


def run_importance(run_dir, params: dict, data_path=None, out_dir=None, log: Log | None = None) -> dict:
    """``--importance RUN_DIR``: feature importance of the model saved in ``run_dir`` on its test
    split (the methods are ``dosnet_bv.importance``; this decides what they see).

    The run folder gives the model, its scalers and its params (data file, split, targets);
    ``params`` (``--params``) gives the ``importance_*`` settings and any key the run's params lack
    (added after the run was made); ``data_path`` (``--data``) replaces the run's data file. The
    test rows are the run's: the file's split, re-split as in training when the run's ``split`` is
    fractions. Every target of the run is explained. Reference
    DOS (occlusion fill and integrated-gradients baseline): the mean over the training rows of the
    DOS at each energy and channel, standardised; structure baseline: each column's training mean
    (0 after standardisation). Writes ``importance.md``, ``importance.json``, ``importance.log``,
    CSVs and figures into ``out_dir`` (default ``<run_dir>/importance``).
    """
    from data_prep.layout import GAP_THRESHOLD_EV, N_ORBITALS, ORBITAL_GROUPS, EnergyGrid, atom_roles
    from dosnet_bv import importance

    t_start = time.time()
    run_dir = Path(run_dir)
    check_run_folder(run_dir, "--importance")
    raw = {**ADDED_KEYS, **read_json(run_dir / "params.json", "--importance")}  # older runs: their behaviour
    js = read_json(run_dir / "scalers.json", "--importance")
    keys = [k for k in PARAM_RULES if k.startswith("importance_")]  # --params' settings
    missing = {k: v for k, v in params.items() if k not in raw}  # keys added after the run was made
    run_params = validate_params({**missing, **raw, **{k: params[k] for k in keys}})
    path = resolve_data_file(data_path or run_params["data_file"], "--importance: the run's data_file, or --data FILE")
    data = load_data(path, run_params)
    scalers = scalers_from_json(js, data)
    rows = {s: np.flatnonzero(data.split == s) for s in SPLITS}
    fusion, targets, c = run_params["fusion"], run_params["targets"], run_params["channels"]
    if not len(rows["test"]) or (fusion != "structure_only" and not len(rows["train"])):
        raise TrainError(f"--importance: {path} needs test rows (to explain) and training rows (the reference DOS)")
    out = Path(out_dir) if out_dir else run_dir / "importance"
    out.mkdir(parents=True, exist_ok=True)
    log = log or Log(out / "importance.log")
    model = load_saved_model(run_dir, "--importance")
    x = model_inputs(run_params, data, scalers, rows["test"])
    roles = atom_roles(run_params["n_neighbours"])
    dos_names = [f"atom{i + 1}_dos" for i in range(len(roles))] if fusion != "structure_only" else []
    dos = np.concatenate([x.pop(k) for k in dos_names], axis=-1) if dos_names else None
    fill = fill_index = None
    reference_text = "-"
    by_element = run_params["importance_reference"] == "element"
    if dos is not None:
        fill, fill_index, reference_text = reference_dos(data, scalers, rows["train"], rows["test"], by_element)
    orbitals = ORBITAL_GROUPS if c == N_ORBITALS else {str(j): (j,) for j in range(c)}
    atom_group = {f"{r}:{g}": [a * c + i for i in idx] for a, r in enumerate(roles) for g, idx in orbitals.items()}
    blocks = {"whole DOS": {"all channels": list(range(len(roles) * c))},
              "channel": {lab: [k] for k, lab in enumerate(data.channel_labels)},
              "atom": {r: list(range(a * c, (a + 1) * c)) for a, r in enumerate(roles)},
              "orbital group": {g: [a * c + i for a in range(len(roles)) for i in idx] for g, idx in orbitals.items()},
              "atom x orbital group": atom_group}
    cols = scalers.structure_columns
    problem = importance.Problem(
        model=model, targets=targets, y_true=target_matrix(data, targets)[rows["test"]],
        y_mean=scalers.targets.mean, y_scale=scalers.targets.scale, dos=dos, dos_inputs=dos_names,
        dos_fill=fill, dos_fill_index=fill_index, energies_ev=data.energies_ev if data.energies_ev is not None
        else EnergyGrid(n_points=data.dos.shape[1]).energies_ev, channel_labels=list(data.channel_labels),
        occlusion_groups=atom_group, channel_blocks=blocks, structure=x.get("structure"),
        structure_input="structure" if "structure" in x else None,
        structure_labels=[data.structure_labels[i] for i in cols],
        structure_families=[data.structure_families[i] for i in cols],
        fixed_inputs={k: v for k, v in x.items() if k != "structure"},  # the bond table, if the model reads it
        fixed_label="bond table (every bond of the site)", sample_labels=data.element[rows["test"]],
        units=TARGET_UNITS, reference_note=f"E = 0: VBM (gap > {GAP_THRESHOLD_EV:g} eV) or Fermi level")
    settings = importance.Settings(window_ev=run_params["importance_window_ev"],
                                   step_ev=run_params["importance_step_ev"],
                                   repeats=run_params["importance_repeats"], ig_steps=run_params["importance_ig_steps"],
                                   seed=run_params["seed"])
    log(f"feature importance of {run_dir / 'model.keras'} (fusion {fusion}, targets {', '.join(targets)}) on the "
        f"test split of {path}: {len(rows['test'])} samples; loaded in {time.time() - t_start:.0f} s")
    res = importance.analyse(problem, settings, log=log)
    context = "\n".join([
        f"Model `{run_dir / 'model.keras'}` (fusion `{fusion}`), explained on the test split of `{path}` "
        f"({len(rows['test'])} samples, {len(set(data.material_id[rows['test']]))} materials); every target of the "
        f"run ({', '.join(targets)}); sample labels = the centre site's element.",
        "",
        f"Reference DOS (occlusion fill and integrated-gradients baseline): {reference_text}, "
        "in standardised units. It is not the all-zero standardised input: the DOS scaler standardises each "
        "channel over all energies together, so zero would be a flat spectrum at the channel's mean level. The "
        "structure baseline is the training mean of each column, which is exactly 0 after standardisation."
        + (" The bond table (structure_input bonds or both) keeps each sample's own bonds in every method; "
           "it is shuffled across the samples as one block." if uses_bonds(run_params) else ""),
        "",
        "Caveats: these numbers describe what this model uses, not physics. Neighbouring energies and the "
        "channels of one atom are correlated, so importance is shared between them (occlusion and block "
        "permutation of whole groups show the joint effect); permutation creates spectra and feature combinations "
        "that do not occur, and attributions depend on the baseline."])
    summary = importance.write_report(out, res, title=f"Feature importance: {run_dir.name}", context=context)
    elapsed = time.time() - t_start
    with open(out / "importance.md", "a") as fh:
        fh.write(f"Took {report.duration(elapsed)} in all (loading the run and the data, the analysis, the "
                 f"outputs).\n")
    summary["seconds_in_all"] = round(elapsed, 1)
    write_json(out / "importance.json", summary)
    log(f"feature importance finished in {report.duration(elapsed)} (analysis "
        f"{report.duration(res['timing']['total']['seconds'])}); report: {out / 'importance.md'}")
    return summary
