"""``--tune``: hyperparameter search with Optuna over the ``tune`` section of params.json.

Objective: the mean, over ``tune.folds`` family-grouped folds of the rows outside the test split,
of the best validation loss of a model trained on the other folds (at most ``tune.epochs`` epochs,
early stopping with ``tune.patience`` on that loss). No family is on both sides of a fold
(``runs.cv_splits`` on ``group_ids``), and the test split is never read by the search.

Pruning: each epoch's validation loss is reported at step ``fold * epochs + epoch``, so trials
are compared fold by fold at the same epoch. ``median`` (the default) stops a trial whose best
loss so far is worse than the median of earlier trials at that step, after 5 finished trials and
a warm-up of a few epochs: on noisy small data it compares with the typical trial, not the best
one, and needs no resource schedule. ``halving`` is Optuna's successive halving (more aggressive:
keeps the best third at each rung).

Storage: an SQLite file ``study.db`` in the run folder by default (an interrupted search resumes
with the same command: the recorded trials are kept; trials in flight at the kill are marked
failed by the heartbeat check of SQLite and PostgreSQL storages), or ``--storage``: any database URL Optuna accepts (``postgresql+psycopg2://...`` for
many machines) or ``journal:PATH``, Optuna's journal file (a shared file system, e.g. a SLURM job
array). ``--trials N`` counts the finished trials of the whole study, over every worker.

Outputs in the run folder: ``best_params.json`` (params.json with the best trial's values, ready
for ``train.py --params``), ``trials.csv``, ``optimization_history.png``,
``param_importances.png``, ``tune.json`` (summary) and ``tune.log``.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np

from dosnet_bv.data import Dataset, check_bonds, structure_columns, uses_bonds, uses_vector
from dosnet_bv.outputs import Log, pyplot
from dosnet_bv.params import TrainError, validate_params
from dosnet_bv.runs import cv_splits

DEFAULT_STUDY = "dosnet-bv"
#: Seconds between a running trial's heartbeats; a trial silent for twice as long (its worker was
#: killed) is marked failed when any worker next starts a trial (RDB storages: SQLite, PostgreSQL).
HEARTBEAT_S = 30
#: Median pruner: trials that always finish (no pruning before), epochs of each fold before pruning.
PRUNE_STARTUP_TRIALS = 5
PRUNE_WARMUP_EPOCHS = 3


class TrialFailure(Exception):
    """A trial that could not be scored (out of memory, non-finite loss): recorded as failed with
    the reason (user attribute ``fail_reason``), and the search goes on."""


def group_ids(data: Dataset, split_by: str = "family") -> np.ndarray:
    """The ids the tuning folds are grouped by: the substitution family of each sample's material
    (``Dataset.groups``; the material with ``split_by: material``)."""
    return np.asarray(data.groups(split_by))


def tuning_folds(data: Dataset, params: dict, pool=None) -> list:
    """``[(train_rows, val_rows), ...]``: ``tune.folds`` grouped folds of the rows outside the test
    split, or of ``pool`` (the rows of an outer CV fold's training families, ``tune_cv``)
    (``cv_splits`` with ``split_seed``; its early-stopping part goes back into training, as
    the fold itself is the validation set)."""
    where = "outside the test split" if pool is None else "in the outer fold's training rows"
    pool = np.flatnonzero(data.split != "test") if pool is None else np.sort(np.asarray(pool))
    k, groups = params["tune"]["folds"], len(set(group_ids(data, params["split_by"])[pool]))
    if groups <= k:
        raise TrainError(f"params: 'tune' folds {k} needs more than {k} families (materials when the file has none) "
                         f"{where}; {data.path} has {groups}")
    folds = cv_splits(group_ids(data, params["split_by"])[pool], k, params["cv_val_fraction"], params["split_seed"])
    return [(pool[np.sort(np.concatenate([tr, va]))], pool[te]) for tr, va, te in folds]


def _plain(choices) -> bool:
    return all(c is None or isinstance(c, (bool, int, float, str)) for c in choices)


def suggest(trial, space: dict) -> dict:
    """The params values of one trial. Choices that are lists (structure_units, structure_families)
    are offered to Optuna as their JSON text (its categorical choices must be scalars)."""
    out = {}
    for name, spec in space.items():
        if "choices" in spec:
            ch = spec["choices"]
            out[name] = (trial.suggest_categorical(name, ch) if _plain(ch)
                         else json.loads(trial.suggest_categorical(name, [json.dumps(c) for c in ch])))
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int) and not isinstance(spec["low"], bool) \
                and name in ("batch_size", "early_channels"):
            out[name] = trial.suggest_int(name, spec["low"], spec["high"], log=spec.get("log", False))
        else:
            out[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=spec.get("log", False))
    return out


def decode(space: dict, values: dict) -> dict:
    """A trial's stored ``params`` back to params values (inverse of ``suggest``)."""
    out = {}
    for name, v in values.items():
        spec = space.get(name, {})
        out[name] = json.loads(v) if "choices" in spec and not _plain(spec["choices"]) else v
    return out


def trial_params(params: dict, values: dict) -> dict:
    """The params one trial trains with: ``values`` over params, the tune section's budget."""
    t = params["tune"]
    return {**params, **values, "epochs": t["epochs"], "early_stopping_patience": t["patience"]}


def check_space(params: dict, data: Dataset) -> None:
    """Every choice on its own gives valid params for ``data`` (``TrainError`` before any trial)."""
    for name, spec in params["tune"]["space"].items():
        for v in spec.get("choices", [spec.get("low"), spec.get("high")]):
            p = validate_params(trial_params(params, {name: v}))
            if uses_vector(p):
                structure_columns(data, p["structure_families"])
            if uses_bonds(p):
                check_bonds(data)


def search_config(params: dict) -> dict:
    """What a study is bound to: its search space and budget (stored in the study; a second run on
    the same study must agree)."""
    t = params["tune"]
    return json.loads(json.dumps({k: t[k] for k in ("space", "folds", "epochs", "patience", "pruner")}))


def open_storage(url: str | None, out: Path):
    """The Optuna storage of ``url`` (default: SQLite ``out/study.db``); ``TrainError`` when it
    cannot be opened."""
    import optuna

    if url is None:
        url = f"sqlite:///{(out / 'study.db').resolve()}"
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            path = Path(url[len("journal:"):])
            if not path.parent.is_dir():
                raise OSError(f"folder {path.parent} does not exist")
            return JournalStorage(JournalFileBackend(str(path))), url
        if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).parent.is_dir():
            raise OSError(f"folder {Path(url[len('sqlite:///'):]).parent} does not exist")
        kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        return _retry(lambda: optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S)), url
    except Exception as exc:  # noqa: BLE001 -- SQLAlchemy, driver and OS errors alike: one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ("; PostgreSQL: pip install -e .[postgres] and write postgresql+psycopg2://..."
                if isinstance(exc, ImportError) and url.startswith("postgres") else "")
        raise TrainError(f"--storage {url}: cannot open it ({type(exc).__name__}: {first[:300]}){hint}") from None


def _retry(make, attempts: int = 6):
    """``make()``, retried on a database integrity or operational error: workers started together on
    a new database race to create its tables (one wins, the others see its half-made schema)."""
    import random

    import sqlalchemy.exc

    for attempt in range(attempts):
        try:
            return make()
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 + random.random() * (attempt + 1))


def make_pruner(name: str, epochs: int):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=PRUNE_STARTUP_TRIALS,
                                           n_warmup_steps=min(PRUNE_WARMUP_EPOCHS, epochs - 1), interval_steps=1)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, min(PRUNE_WARMUP_EPOCHS, epochs // 3)),
                                                      reduction_factor=3)
    return optuna.pruners.NopPruner()


def pruning_callback(trial, step0: int):
    """A Keras callback reporting each epoch's ``val_loss`` to ``trial`` at ``step0 + epoch`` and
    stopping the trial when the pruner says so (``optuna.TrialPruned``) or the loss is not finite
    (``TrialFailure``)."""
    import keras
    import optuna

    class Pruning(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            loss = float((logs or {}).get("val_loss", float("nan")))
            if not math.isfinite(loss) or not math.isfinite(float((logs or {}).get("loss", 0.0))):
                raise TrialFailure(f"non-finite loss at step {step0 + epoch} (fold epoch {epoch + 1})")
            trial.report(loss, step0 + epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step0 + epoch} (val_loss {loss:.4g})")

    return Pruning()


def make_objective(params: dict, data: Dataset, folds: list, log: Log):
    """The Optuna objective: mean over ``folds`` of the best validation loss (``TrialFailure`` for
    a trial that cannot be scored; ``optuna.TrialPruned`` from the pruning callback)."""
    import optuna

    from dosnet_bv.fit import fit_predict  # here, not at module level: tests replace it

    t = params["tune"]

    def objective(trial) -> float:
        values = suggest(trial, t["space"])
        try:  # each choice was checked alone (check_space); a combination may still be invalid
            p = validate_params(trial_params(params, values))
        except TrainError as exc:
            trial.set_user_attr("fail_reason", f"invalid combination: {exc}")
            raise TrialFailure(str(exc)) from None
        quiet = Log(log.path, quiet=True)
        quiet(f"trial {trial.number}: {json.dumps(values)}")
        losses = []
        try:
            for f, (tr, va) in enumerate(folds):
                res = fit_predict({**p, "seed": p["seed"] + f}, data, tr, va, {}, quiet,
                                  callbacks=[pruning_callback(trial, f * t["epochs"])])
                val = res.history.get("val_loss", [])
                best = min(val) if val and t["patience"] > 0 else (val[-1] if val else float("nan"))
                if not math.isfinite(best):
                    raise TrialFailure(f"non-finite validation loss in fold {f + 1}")
                losses.append(best)
                trial.set_user_attr(f"fold{f + 1}_val_loss", best)
                trial.set_user_attr(f"fold{f + 1}_best_epoch", res.best_epoch)
                del res
        except optuna.TrialPruned:
            raise
        except TrialFailure as exc:
            trial.set_user_attr("fail_reason", str(exc))
            raise
        except Exception as exc:  # out of memory: TF's ResourceExhaustedError or MemoryError
            if not _out_of_memory(exc):
                raise
            reason = f"out of memory: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__}"
            trial.set_user_attr("fail_reason", reason)
            raise TrialFailure(reason) from None
        return float(np.mean(losses))

    return objective


def _out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import tensorflow as tf
    except ImportError:
        return False
    return isinstance(exc, tf.errors.ResourceExhaustedError)


def _finished(study) -> list:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return study.get_trials(deepcopy=False, states=states)


def run_tune(params: dict, data: Dataset, out_dir=None, trials: int | None = None, study_name: str | None = None,
             storage: str | None = None, progress: bool = True, pool=None) -> dict:
    """Run (or resume, or join) the search; write the outputs; return the summary (``tune.json``).
    ``pool``: search on these rows only (default: every row outside the test split)."""
    import optuna
    from tqdm import tqdm

    study_name = study_name or DEFAULT_STUDY
    out = Path(out_dir) if out_dir else Path(params["out_dir"]) / f"tune-{study_name}"
    out.mkdir(parents=True, exist_ok=True)
    t = params["tune"]
    n_total = trials if trials is not None else t["trials"]
    check_space(params, data)
    folds = tuning_folds(data, params, pool)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    store, url = open_storage(storage, out)
    config = search_config(params)
    try:
        study = _retry(lambda: optuna.create_study(
            study_name=study_name, storage=store, direction="minimize", load_if_exists=True,
            sampler=optuna.samplers.TPESampler(constant_liar=True), pruner=make_pruner(t["pruner"], t["epochs"])))
    except Exception as exc:  # noqa: BLE001 -- the storage answers only now (e.g. a server that is down)
        raise TrainError(f"--storage {url}: cannot open study {study_name!r} ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''})") from None
    stored = study.user_attrs.get("search_config")
    if stored is None:
        study.set_user_attr("search_config", config)
    elif stored != config:
        diff = sorted(k for k in config if stored.get(k) != config[k])
        raise TrainError(f"study {study_name!r} in {url} exists with a different search space ({', '.join(diff)} "
                         f"differ from params' tune section); use another --study, or the tune section it was made "
                         f"with")
    log = Log(out / "tune.log", printer=tqdm.write)
    done = len(_finished(study))
    log(f"study {study_name!r} in {url}: {done} finished trials, target {n_total}; objective: mean best val_loss over "
        f"{len(folds)} groups-disjoint folds of {sum(len(v) for _, v in folds)} {'non-test' if pool is None else 'outer-train'} samples; pruner {t['pruner']}; "
        f"worker pid {os.getpid()}")
    t0, ran = time.time(), 0
    if done < n_total:
        bar = tqdm(total=n_total, initial=done, unit="trial", desc="tune", disable=None if progress else True)

        def after_trial(study_, trial) -> None:
            nonlocal ran
            ran += 1
            bar.update(1)
            try:
                best = f"{study_.best_value:.4g} (trial {study_.best_trial.number})"
            except ValueError:
                best = "none yet"
            bar.set_postfix_str(f"best {best}")
            what = (f"value {trial.value:.4g}" if trial.state == optuna.trial.TrialState.COMPLETE
                    else trial.user_attrs.get("fail_reason", "") if trial.state == optuna.trial.TrialState.FAIL
                    else "")
            log(f"trial {trial.number} {trial.state.name.lower()} {what} {json.dumps(decode(t['space'], trial.params))}; "
                f"best so far {best}")

        stop = optuna.study.MaxTrialsCallback(n_total, states=(optuna.trial.TrialState.COMPLETE,
                                                               optuna.trial.TrialState.PRUNED,
                                                               optuna.trial.TrialState.FAIL))
        try:
            study.optimize(make_objective(params, data, folds, log), n_trials=n_total - done, catch=(TrialFailure,),
                           callbacks=[stop, after_trial], gc_after_trial=True)
        finally:
            bar.close()
    seconds = time.time() - t0
    summary = write_outputs(study, params, out, log, url)
    summary["this_worker"] = {"trials": ran, "seconds": round(seconds, 1),
                              "trials_per_hour": round(ran / seconds * 3600, 2) if ran and seconds > 0 else None}
    _write_text(out / "tune.json", json.dumps(summary, indent=1) + "\n")
    log(f"run folder: {out}")
    return summary


def _write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename: several workers may write the same outputs."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_outputs(study, params: dict, out: Path, log: Log, url: str) -> dict:
    """``trials.csv``, ``best_params.json``, the two plots; returns the summary."""
    import optuna

    space = params["tune"]["space"]
    trials = study.get_trials(deepcopy=False)
    names = list(space)
    folds = params["tune"]["folds"]
    rows = [["number", "state", "value", "duration_s", *names, *[f"fold{f + 1}_val_loss" for f in range(folds)],
             "last_step", "fail_reason"]]
    for tr in trials:
        vals = decode(space, tr.params)
        dur = tr.duration.total_seconds() if tr.duration is not None else ""
        rows.append([tr.number, tr.state.name, "" if tr.value is None else f"{tr.value:.6g}",
                     f"{dur:.1f}" if dur != "" else "", *[json.dumps(vals[n]) if n in vals else "" for n in names],
                     *[tr.user_attrs.get(f"fold{f + 1}_val_loss", "") for f in range(folds)],
                     "" if tr.last_step is None else tr.last_step, tr.user_attrs.get("fail_reason", "")])
    import io

    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    _write_text(out / "trials.csv", buf.getvalue())
    counts = {s.name.lower(): sum(tr.state == s for tr in trials) for s in optuna.trial.TrialState}
    summary = {"study": study.study_name, "storage": url, "trials": counts, "best": None}
    complete = [tr for tr in trials if tr.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        log(f"no trial completed yet ({counts}); best_params.json not written")
        return summary
    best = study.best_trial
    best_params = validate_params({**params, **decode(space, best.params)})
    _write_text(out / "best_params.json", json.dumps(best_params, indent=1) + "\n")
    summary["best"] = {"trial": best.number, "value": best.value, "params": decode(space, best.params)}
    log(f"best trial {best.number}: mean val_loss {best.value:.4g} with {json.dumps(decode(space, best.params))}; "
        f"params for train.py --params: {out / 'best_params.json'}")
    plots(study, out, log)
    return summary


def plots(study, out: Path, log: Log) -> None:
    """Optuna's matplotlib optimisation history and hyperparameter importances (the latter needs
    two completed trials whose parameters differ)."""
    plt = pyplot()  # the project's lazy matplotlib (non-interactive backend) before Optuna's
    from optuna.visualization import matplotlib as ovm

    for name, draw in (("optimization_history.png", ovm.plot_optimization_history),
                       ("param_importances.png", ovm.plot_param_importances)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.tight_layout()
            tmp = out / f".{name}.{os.getpid()}.png"
            fig.savefig(tmp, dpi=110)
            os.replace(tmp, out / name)
            plt.close(fig)
        except Exception as exc:  # noqa: BLE001 -- e.g. importances of fewer than two completed trials
            log(f"{name} not drawn: {type(exc).__name__}: {str(exc).strip()[:200]}")
