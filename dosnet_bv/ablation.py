"""``--ablation``: the baselines, the four DOSnet fusions and the structure families switched off
one at a time, each over several seeds on the same grouped split (``run_ablation``). The generic
parts (DOS descriptors, baselines, seed statistics, tables, verdicts, plots) are
``dosnet_bv.descriptors``, ``dosnet_bv.baselines`` and ``dosnet_bv.report``; this module decides
which model runs on which rows. ``run_model`` and the quick budget are shared with
``dosnet_bv.learning_curve``.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np

from dosnet_bv import report
from dosnet_bv.data import Dataset, structure_columns, target_matrix
from dosnet_bv.fit import fit_predict
from dosnet_bv.metrics import data_counts
from dosnet_bv.outputs import Log, write_json, write_text
from dosnet_bv.params import FUSIONS, SPLITS, TARGET_UNITS, TrainError
from dosnet_bv.resume import ResultStore, check_resume


#: The default ("quick") budget of --ablation and --learning-curve: at most QUICK_EPOCHS epochs,
#: early stopping patience at most QUICK_PATIENCE; --full keeps params' ``epochs`` and patience.
#: Sized so that the default ablation of ~4000 samples x 2000 points x 27 channels (3 seeds, 4
#: fusions + 6 family ablations) finishes in under 2 h on 2 CPU cores: see the README. Upstream's
#: step schedule is laid out for 60 epochs (first decay at epoch 15), so within the quick budget
#: ``dosnet_step`` becomes ``cosine`` over the budget's epochs: the rate anneals to zero by the
#: last epoch instead of never decaying (10 epochs at a constant 1e-3 left the late model at a
#: test bvs_vu MAE of 0.30-0.36 v.u. against 0.21 after 60 epochs; 15 cosine epochs gave 0.27).
QUICK_EPOCHS = 25
QUICK_PATIENCE = 5
BASELINES = {
    "mean": "mean predictor (train mean)",
    "element_mean": "per-element mean",
    "element_cn_mean": "per element + CN mean",
    "gbt_dos": "GBT on DOS descriptors",
    "gbt_structure": "GBT on structure vector",
    "gbt_dos_structure": "GBT on DOS descriptors + structure",
    "bv_fitted": "bond valence form, fitted radii",
    "bv_gbt_dos": "bond valence form + GBT on DOS descriptors (residual)",
    "bv_gbt_structure": "bond valence form + GBT on structure (residual)",
}
#: targets the fitted bond valence form predicts (a sum of bond valences approximates both); the
#: others fall back to the per-element mean
BV_FORM_TARGETS = ("bvs_vu", "valence")
#: Relative cost of one run for the time-left estimate (epoch times measured on 2 busy CPU cores).
RUN_COST = {"none": 0.65, "late": 1.0, "early": 1.9, "structure_only": 0.2, "baseline": 0.1}


def ablation_budget(params: dict, full: bool = False) -> tuple[dict, str]:
    """(params with the ablation's epochs and patience, a sentence stating the budget)."""
    p = dict(params)
    patience = params["early_stopping_patience"]
    if full:
        text = f"full budget (--full): params' {p['epochs']} epochs, early stopping patience {patience}"
    else:
        p["epochs"] = min(params["epochs"], QUICK_EPOCHS)
        p["early_stopping_patience"] = min(patience, QUICK_PATIENCE) if patience > 0 else 0
        text = (f"quick budget (default): at most {p['epochs']} epoch{'s' * (p['epochs'] != 1)}, early stopping patience "
                f"{p['early_stopping_patience']} on the validation loss (params: {params['epochs']} epochs, "
                f"patience {patience}; --full uses those)")
        if p["lr_schedule"] == "dosnet_step" and p["epochs"] < params["epochs"]:
            p["lr_schedule"] = "cosine"
            text += "; upstream's step schedule (laid out for 60 epochs) replaced by a cosine over the budget"
    text += (f"; learning-rate schedule {p['lr_schedule']}; the targets {', '.join(p['targets'])} are trained "
             f"together as one {'multi-task ' if len(p['targets']) > 1 else ''}network per run; GBT: one model per "
             f"target, iterations chosen on the validation split")
    return p, text


def dosnet_key(fusion: str, dropped: str | None = None) -> str:
    """Model name of a DOSnet run: ``dosnet-<fusion>`` or ``dosnet-<fusion>-no-<family>``."""
    return f"dosnet-{fusion}" + (f"-no-{dropped}" if dropped else "")


def dos_descriptor_matrix(data: Dataset, params: dict) -> tuple[np.ndarray, list]:
    """(n, D) hand-crafted DOS descriptors and their names.

    ``dosnet_bv.descriptors`` of every DOS channel (atom x orbital) and, per atom, of the summed
    orbital groups with more than one orbital (p, d of ``data_prep.layout.ORBITAL_GROUPS``: the
    d-band centre of the classic d-band model is the ``<atom>:d_sum:centre_ev`` column). Energies
    from the file's grid (the default grid window with the file's length when it has none);
    ``dos_at_ref`` averages over +-sigma of the grid's smearing.
    """
    from data_prep.layout import N_ORBITALS, ORBITAL_GROUPS, EnergyGrid
    from dosnet_bv.descriptors import dos_descriptors, feature_names

    length = data.dos.shape[1]
    energies = data.energies_ev if data.energies_ev is not None else EnergyGrid(n_points=length).energies_ev
    window = data.sigma_ev if data.sigma_ev else EnergyGrid().sigma_ev
    blocks, names = [dos_descriptors(data.dos, energies, window)], feature_names(data.channel_labels)
    c = params["channels"]
    groups = [(g, idx) for g, idx in ORBITAL_GROUPS.items() if len(idx) > 1]
    if c == N_ORBITALS and groups:
        atoms = data.dos.shape[2] // c
        sums = np.empty((data.n, length, atoms * len(groups)), np.float32)
        labels = []
        for a in range(atoms):
            role = data.channel_labels[a * c].split(":")[0]
            for k, (g, idx) in enumerate(groups):
                sums[:, :, a * len(groups) + k] = data.dos[:, :, [a * c + i for i in idx]].sum(axis=2)
                labels.append(f"{role}:{g}_sum")
        blocks.append(dos_descriptors(sums, energies, window))
        names += feature_names(labels)
        del sums
    return np.concatenate(blocks, axis=1), names


class Features:
    """Feature matrices of the tree baselines, computed once on first use: ``"dos"`` (descriptors),
    ``"structure"`` (params' structure families, raw values) and ``"dos_structure"`` (both)."""

    def __init__(self, data: Dataset, params: dict, log: Log):
        self.data, self.params, self.log, self.cache = data, params, log, {}

    def __call__(self, which: str) -> np.ndarray:
        if which not in self.cache:
            if which == "dos":
                t0 = time.time()
                x, names = dos_descriptor_matrix(self.data, self.params)
                self.log(f"DOS descriptors: {x.shape[1]} per sample ({len(names) // 7} channels x 7) in "
                         f"{time.time() - t0:.0f} s")
                self.cache[which] = x
            elif which == "structure":
                cols = structure_columns(self.data, self.params["structure_families"])
                self.cache[which] = self.data.structure[:, cols].astype(np.float64)
            else:
                self.cache[which] = np.concatenate([self("dos"), self("structure")], axis=1)
        return self.cache[which]


def cn_column(data: Dataset) -> int | None:
    """Index of the coordination-number column (label ``cn``) of the structure vector, or None."""
    return data.structure_labels.index("cn") if "cn" in data.structure_labels else None


def baseline_predictions(name: str, data: Dataset, targets, train_rows, val_rows, predict_rows: dict,
                         seed: int, features: Features, groups=None) -> dict:
    """Fit baseline ``name`` (a key of ``BASELINES``) on ``train_rows`` (GBT: iterations chosen on
    ``val_rows``); returns ``{name: (len(rows), T) predictions}`` for ``predict_rows``. ``groups``
    (n,): what must stay together in the inner folds of ``bv_gbt_*`` (the material by default)."""
    from dosnet_bv.baselines import GBT, GroupMean, mean_predictor

    y = target_matrix(data, targets)
    if name == "mean":
        return {k: mean_predictor(y[train_rows], len(r)) for k, r in predict_rows.items()}
    if name in ("element_mean", "element_cn_mean"):
        keys = data.element.astype(object).reshape(-1, 1)
        if name == "element_cn_mean":
            j = cn_column(data)
            if j is None:
                raise TrainError(f"{data.path} has no 'cn' structure column: per element + CN mean impossible")
            keys = np.column_stack([keys, np.rint(data.structure[:, j]).astype(int).astype(object)])
        model = GroupMean().fit(keys[train_rows], y[train_rows])
        return {k: model.predict(keys[r]) for k, r in predict_rows.items()}
    if name == "bv_fitted":
        form = BondValenceForm(data, targets, train_rows, val_rows)
        return {k: form.predict(r) for k, r in predict_rows.items()}
    if name.startswith("bv_gbt_"):
        return bond_valence_residual_trees(name, data, targets, train_rows, val_rows, predict_rows, seed, features,
                                           groups)
    if name.startswith("gbt_"):
        x = features(name[len("gbt_"):])
        model = GBT(seed=seed).fit(x[train_rows], y[train_rows], x[val_rows], y[val_rows])
        return {k: model.predict(x[r]) for k, r in predict_rows.items()}
    raise TrainError(f"unknown baseline {name!r}; expected one of {', '.join(BASELINES)}")


@functools.lru_cache(maxsize=1)
def electronegativities() -> MappingProxyType:
    """{Z: Pauling electronegativity} (read-only, built once) of the elements pymatgen gives one
    for (not the noble gases He, Ne, Ar)."""
    import warnings

    from pymatgen.core import Element

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns for elements without a value
        for z in range(1, 104):
            x = Element.from_Z(z).X
            if np.isfinite(x):
                out[z] = float(x)
    return MappingProxyType(out)


class BondValenceForm:
    """``baselines.FittedBondValence`` on ``data``'s bond table, fitted to ``bvs_vu`` (else
    ``valence``) of ``fit_rows`` (the ridge penalty chosen on ``val_rows``). ``predict(rows)``:
    (len(rows), T) for ``targets``: the fitted sum for ``BV_FORM_TARGETS``, the per-element mean of
    ``fit_rows`` for the other targets and for sites whose polarity is unknown (an element without
    an electronegativity)."""

    def __init__(self, data: Dataset, targets, fit_rows, val_rows):
        from dosnet_bv.baselines import FittedBondValence, GroupMean

        if data.bonds is None:
            raise TrainError(f"{data.path} has no bond table (schema < 3): the bond valence baselines need one")
        fit_on = next((t for t in BV_FORM_TARGETS if t in data.targets), None)
        if fit_on is None:
            raise TrainError(f"the bond valence baselines fit bvs_vu or valence; {data.path} has neither")
        b = data.bonds
        self.table = (b.distance_ang, b.neighbour_z, b.mask, b.centre_z)
        self.targets = list(targets)
        y_fit = np.asarray(data.targets[fit_on], np.float64)
        self.model = FittedBondValence(chi=electronegativities()).fit(
            self._take(fit_rows), y_fit[fit_rows], self._take(val_rows), y_fit[val_rows])
        self.keys = data.element.astype(object).reshape(-1, 1)
        self.fallback = GroupMean().fit(self.keys[fit_rows], target_matrix(data, targets)[fit_rows])

    def _take(self, rows):
        return tuple(np.asarray(a)[rows] for a in self.table)

    def predict(self, rows) -> np.ndarray:
        pred = self.fallback.predict(self.keys[rows])
        form = self.model.predict(self._take(rows))
        for j, t in enumerate(self.targets):
            if t in BV_FORM_TARGETS:
                pred[:, j] = np.where(np.isnan(form), pred[:, j], form)
        return pred


#: inner folds of the cross-fitted bond valence form under the residual trees (``bv_gbt_*``)
BV_INNER_FOLDS = 5


def cross_fitted_form(data: Dataset, targets, train_rows, val_rows, groups=None) -> tuple:
    """The bond valence form for a model of what it leaves: ``(form_train, form)``. ``form_train``
    (len(train_rows), T) holds the form's values under the training rows cross-fitted
    (``BV_INNER_FOLDS`` folds of ``train_rows`` grouped by ``groups``, the material by default; the
    form fitted without the fold), so a residual model learns the residual as it is on unseen
    materials, not the smaller in-sample one; ``form`` is fitted on all ``train_rows`` and predicts
    every other row."""
    import hashlib
    import weakref

    from sklearn.model_selection import GroupKFold

    train_rows = np.asarray(train_rows)
    g = np.asarray(data.material_id if groups is None else groups)[train_rows]
    key = (id(data), tuple(targets), hashlib.sha1(train_rows.tobytes() + np.asarray(val_rows).tobytes()
                                                  + "|".join(map(str, g)).encode()).hexdigest())
    ref, hit = _FORMS.get(key, (None, None))
    if ref is not None and ref() is data:  # the seeds and models of one fold share it (10-60 s to fit)
        return hit
    k = min(BV_INNER_FOLDS, len(np.unique(g)))
    form_train = np.empty((len(train_rows), len(targets)))
    for inner_fit, inner_out in GroupKFold(k).split(train_rows, groups=g):
        inner = BondValenceForm(data, targets, train_rows[inner_fit], val_rows)
        form_train[inner_out] = inner.predict(train_rows[inner_out])
    if len(_FORMS) >= 16:
        _FORMS.pop(next(iter(_FORMS)))
    result = form_train, BondValenceForm(data, targets, train_rows, val_rows)
    _FORMS[key] = weakref.ref(data), result
    return result


#: ``cross_fitted_form``'s recent results by (dataset, targets, rows), each with a weak reference
#: to its dataset (an id can be reused once a dataset is gone)
_FORMS: dict = {}


def bond_valence_residual_trees(name: str, data: Dataset, targets, train_rows, val_rows, predict_rows: dict,
                                seed: int, features: Features, groups=None) -> dict:
    """``bv_gbt_<features>``: the bond valence form plus boosted trees on ``<features>`` fitted to
    what the form leaves (target minus form; the form cross-fitted under the training rows,
    ``cross_fitted_form``)."""
    from dosnet_bv.baselines import GBT

    train_rows, val_rows = np.asarray(train_rows), np.asarray(val_rows)
    y = target_matrix(data, targets)
    form_train, form = cross_fitted_form(data, targets, train_rows, val_rows, groups)
    x = features(name[len("bv_gbt_"):])
    trees = GBT(seed=seed).fit(x[train_rows], y[train_rows] - form_train, x[val_rows],
                               y[val_rows] - form.predict(val_rows))
    return {key: form.predict(r) + trees.predict(x[r]) for key, r in predict_rows.items()}


def on_form(data: Dataset, targets, train_rows, val_rows, predict_rows: dict, groups=None) -> tuple:
    """What a network stacked on the bond valence form trains on: ``(residual, offsets)``, where
    ``residual`` is ``data`` with each of ``targets`` minus the form (cross-fitted under
    ``train_rows``, ``cross_fitted_form``) and ``offsets[split]`` (len(rows), T) is the form to add
    back to the network's predictions of ``predict_rows[split]``."""
    import dataclasses

    train_rows = np.asarray(train_rows)
    form_train, form = cross_fitted_form(data, targets, train_rows, val_rows, groups)
    offset = np.zeros((data.n, len(targets)))
    rest = np.setdiff1d(np.arange(data.n), train_rows)
    offset[rest] = form.predict(rest)
    offset[train_rows] = form_train
    y = target_matrix(data, targets)
    residual = dataclasses.replace(data, targets={**data.targets,
                                                  **{t: y[:, j] - offset[:, j] for j, t in enumerate(targets)}})
    return residual, {key: offset[np.asarray(r)] for key, r in predict_rows.items()}


def score_splits(data: Dataset, targets, rows: dict, preds: dict) -> dict:
    """``{split: {target: dosnet_bv.report.scores}}`` of predictions ``{split: (len(rows), T)}``.
    Migration targets (one value per material on its mobile-ion sites) are scored per material:
    the mean prediction over a material's sites against its barrier (``n`` counts materials)."""
    from dosnet_bv.params import MIGRATION_TARGETS
    from dosnet_bv.report import scores

    y = target_matrix(data, targets)

    def per_material(r, yt, yp):
        _, inv = np.unique(data.material_id[r], return_inverse=True)
        c = np.bincount(inv)
        return np.bincount(inv, weights=yt) / c, np.bincount(inv, weights=yp) / c

    def one(s, j, t, p):
        yt, yp = y[rows[s], j], p[:, j]
        if t in MIGRATION_TARGETS and len(yt):
            yt, yp = per_material(rows[s], yt, yp)
        return scores(yt, yp, accuracy=(t == "valence"))

    return {s: {t: one(s, j, t, p) for j, t in enumerate(targets)} for s, p in preds.items()}


@dataclass
class Study:
    """What ``--ablation`` and ``--learning-curve`` start from: the run folder, the log (lines
    beside a progress bar) and the quiet per-epoch log in the same file, the rows of each split
    (all three must be non-empty) and the params with the study's budget (``ablation_budget``)."""

    out: Path
    log: Log
    epoch_log: Log
    rows: dict
    params: dict
    budget: str

    @classmethod
    def start(cls, params: dict, data: Dataset, out_dir, name: str, full: bool, log: Log | None) -> "Study":
        from tqdm import tqdm

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        log = log or Log(out / f"{name}.log", printer=tqdm.write)
        rows = {s: np.flatnonzero(data.split == s) for s in SPLITS}
        for s in SPLITS:
            if not len(rows[s]):
                raise TrainError(f"{data.path}: the {s} split is empty; the {name.replace('_', ' ')} needs train, "
                                 f"val and test")
        return cls(out, log, Log(log.path, quiet=True), rows, *ablation_budget(params, full))


@dataclass
class ModelSpec:
    """One model of a study: ``model`` (its name: a key of ``BASELINES`` or ``dosnet_key``), ``kind``
    (baseline, dosnet or families), and for DOSnet its ``fusion``, ``structure_families`` and
    ``structure_input`` (None: the params' own)."""

    model: str
    kind: str
    fusion: str | None = None
    structure_families: list = field(default_factory=list)
    structure_input: str | None = None
    overrides: dict = field(default_factory=dict)  # further params of this model (e.g. augment_shift_ev)
    on_form: bool = False  # the network learns what the fitted bond valence form leaves (``on_form``)


def run_model(spec: ModelSpec, seed: int, params: dict, data: Dataset, train_rows, rows: dict, features: Features,
              epoch_log: Log, keep: str | None = None) -> dict:
    """One model and seed: fit on ``train_rows``, choose (epochs or iterations) on ``rows["val"]``,
    score every other key of ``rows`` (val, test, subsets of test). Returns ``{"scores", "info", "seconds"}``."""
    t0 = time.time()
    targets = params["targets"]
    predict_rows = {s: r for s, r in rows.items() if s != "train"}
    if spec.kind == "baseline":
        preds = baseline_predictions(spec.model, data, targets, train_rows, rows["val"], predict_rows, seed,
                                     features, data.groups(params["split_by"]))
        info = {}
    else:
        p = {**params, "fusion": spec.fusion, "structure_families": spec.structure_families, "seed": seed}
        if spec.structure_input:
            p["structure_input"] = spec.structure_input
        p.update(spec.overrides)
        epoch_log(f"--- {spec.model} seed {seed}")
        fit_data, offsets = data, None
        if spec.on_form:
            fit_data, offsets = on_form(data, targets, train_rows, rows["val"], predict_rows,
                                        data.groups(params["split_by"]))
        res = fit_predict(p, fit_data, train_rows, rows["val"], predict_rows, epoch_log)
        preds = res.predictions if offsets is None else {k: v + offsets[k] for k, v in res.predictions.items()}
        info = {"epochs_run": res.epochs_run, "best_epoch": res.best_epoch, "train_seconds": round(res.seconds, 1)}
        del res
    out = {"scores": score_splits(data, targets, predict_rows, preds), "info": info,
           "seconds": round(time.time() - t0, 1)}
    if keep:  # the predictions of one split, e.g. for an ensemble over seeds
        out["predictions"] = np.round(np.asarray(preds[keep], dtype=float), 6).tolist()
    return out


def model_result(raw) -> dict:
    """``raw`` when it has the form of a ``run_model`` result, else a ``resume.PARSE_ERRORS``
    exception (a leftover file of another form is then recomputed)."""
    if not isinstance(raw, dict) or not isinstance(raw["scores"]["test"], dict) or not isinstance(raw["info"], dict):
        raise TypeError("not a run_model result")
    float(raw["seconds"])
    return raw


class Runner:
    """Runs (model, seed) jobs, caching each result as ``results/<model>__seed<k>.json`` so that an
    interrupted run resumes where it stopped; prints a line per job with elapsed and estimated
    remaining time, and drives a tqdm bar."""

    def __init__(self, out: Path, log: Log, n_jobs: int, total_cost: float, run):
        from tqdm import tqdm

        self.store = ResultStore(out / "results", log)
        self.log, self.run, self.total_cost = log, run, total_cost
        self.t0, self.i, self.n_jobs = time.time(), 0, n_jobs
        self.cost_done, self.cost_timed, self.time_spent = 0.0, 0.0, 0.0
        self.resumed_seconds = 0.0  # time the runs loaded from results/ had taken when they were made
        self.bar = tqdm(total=n_jobs, unit="run", desc="runs", disable=None, leave=False)

    def __call__(self, spec: ModelSpec, seed: int, cost: float, label: str) -> dict:
        self.i += 1
        t = time.time()
        job = self.store.get(f"{spec.model}__seed{seed}", lambda: self.run(spec, seed), model_result)
        res = job.value
        if job.resumed:
            note = "from an earlier, interrupted run"
            self.resumed_seconds += res["seconds"]
        else:
            self.time_spent += time.time() - t
            self.cost_timed += cost
            note = f"{res['seconds']:.0f} s"
        self.cost_done += cost
        self.bar.update()
        left = ""
        if self.cost_timed > 0 and self.cost_done < self.total_cost:
            left = f", about {report.duration(self.time_spent / self.cost_timed * (self.total_cost - self.cost_done))} left"
        sc = res["scores"]
        targets = list(sc["test"])
        vals = [sc["val"][t].get("nmae") for t in targets]
        val = f"{np.mean(vals):.3f}" if all(v is not None for v in vals) else "–"
        test = ", ".join(f"{t} {sc['test'][t]['mae']:.4f}" for t in targets)
        ep = f", {res['info']['epochs_run']} epochs" if res["info"].get("epochs_run") else ""
        self.log(f"[{self.i:2d}/{self.n_jobs}] {label} seed {seed}: val nMAE {val}, test MAE {test} ({note}{ep}; "
                 f"elapsed {report.duration(time.time() - self.t0)}{left})")
        return res

    def close(self):
        self.bar.close()


def run_ablation(params: dict, data: Dataset, out_dir, n_seeds: int = 3, full: bool = False,
                 log: Log | None = None) -> dict:
    """Every baseline and DOSnet variant over ``n_seeds`` seeds on the stored grouped split.

    Models: ``BASELINES``; DOSnet ``none``, ``late``, ``early``, ``structure_only``; then the
    structure families of params switched off one at a time in the best fused model (``late`` or
    ``early``, lowest validation normalised MAE averaged over targets; the test split is never
    used to choose). Seeds ``seed``, ``seed + 1``, ... vary the network's initialisation and batch
    order (the baselines are deterministic: their spread is 0); the split stays fixed. Writes ``ablation.md``,
    ``ablation.json``, ``ablation.png``, ``ablation.log`` and ``results/`` (one file per model and
    seed: rerunning with the same ``out_dir`` resumes). Returns the ablation.json content.
    """
    t_start = time.time()
    st = Study.start(params, data, out_dir, "ablation", full, log)
    out, log, epoch_log, rows, run_params, budget_text = st.out, st.log, st.epoch_log, st.rows, st.params, st.budget
    targets = params["targets"]
    seeds = [params["seed"] + k for k in range(n_seeds)]
    families = list(params["structure_families"])
    if not families:
        raise TrainError("params: 'structure_families' is empty; the ablation's fused models need the structure vector")
    structure_columns(data, families)
    check_resume(out / "ablation_config.json",
                  {"data_file": data.path, "n_samples": data.n, "seeds": seeds, "params": run_params}, log)
    write_json(out / "params.json", params)
    counts = data_counts(data, rows)
    log(f"ablation on {data.path}: {data.n} samples; " + ", ".join(
        f"{s} {c['materials']} materials / {c['samples']} samples" for s, c in counts.items()))
    log(f"seeds {', '.join(map(str, seeds))}; {budget_text}")
    log(f"run folder {out}; if interrupted, the same command with --out {out} resumes after the finished runs")
    specs = []
    for name in BASELINES:
        if name == "element_cn_mean" and cn_column(data) is None:
            log(f"no 'cn' column in the structure vector of {data.path}: per element + CN mean left out")
            continue
        if name.startswith("bv_") and data.bonds is None:
            log(f"no bond table in {data.path}: {BASELINES[name]} left out")
            continue
        specs.append(ModelSpec(name, "baseline", None, []))
    for fusion in FUSIONS:
        specs.append(ModelSpec(dosnet_key(fusion), "dosnet", fusion, families))
    n_family = len(families) if len(families) > 1 else 0
    cost = lambda s: RUN_COST[s.fusion] if s.fusion else RUN_COST["baseline"]  # noqa: E731
    total = len(seeds) * (sum(cost(s) for s in specs) + n_family * max(RUN_COST["late"], RUN_COST["early"]))
    features = Features(data, run_params, log)
    runner = Runner(out, log, len(seeds) * (len(specs) + n_family), total,
                     lambda spec, seed: run_model(spec, seed, run_params, data, rows["train"], rows, features,
                                                  epoch_log))
    labels = {**BASELINES, **{dosnet_key(f): f"DOSnet {f}" for f in FUSIONS}}
    results: dict = {}

    def run_specs(todo):
        for spec in todo:
            results[spec.model] = [runner(spec, seed, cost(spec), labels[spec.model]) for seed in seeds]

    try:
        run_specs(specs)
        summaries = {m: report.summarise([r["scores"] for r in rs]) for m, rs in results.items()}
        best_fused = report.select_best(summaries, [dosnet_key("late"), dosnet_key("early")], targets, "val")
        fused = best_fused.split("-", 1)[1]
        # the estimate assumed the costlier fusion for the family runs; now the fusion is known
        runner.total_cost = runner.cost_done + len(seeds) * n_family * RUN_COST[fused]
        log(f"best fused model on the validation split: {best_fused}; "
            f"switching its structure families off one at a time")
        if not n_family:
            log(f"only one structure family ({', '.join(families)}): no family to switch off")
        family_specs = []
        for fam in families[:len(families) if n_family else 0]:
            key = dosnet_key(fused, fam)
            labels[key] = f"DOSnet {fused} without {fam}"
            family_specs.append(ModelSpec(key, "families", fused, [f for f in families if f != fam]))
        specs += family_specs
        run_specs(family_specs)
    finally:
        runner.close()
    summaries = {m: report.summarise([r["scores"] for r in rs]) for m, rs in results.items()}
    order = [s.model for s in specs]
    kinds = {s.model: s.kind for s in specs}
    dosnet_models = [m for m in order if kinds[m] != "baseline"]
    baseline_models = [m for m in order if kinds[m] == "baseline"]
    best_dosnet = report.select_best(summaries, dosnet_models, targets, "val")
    best_baseline = report.select_best(summaries, baseline_models, targets, "val")
    verdicts = [report.verdict(t, best_fused, summaries[best_fused], dosnet_key("none"), summaries[dosnet_key("none")],
                               TARGET_UNITS.get(t, "")) for t in targets]
    versus = []
    for t in targets:
        mine = summaries[best_dosnet]["test"][t]["mae"]["mean"]
        better = [m for m in baseline_models if summaries[m]["test"][t]["mae"]["mean"] <= mine]
        versus.append({"target": t, "best_dosnet": best_dosnet, "test_mae": mine, "beats_every_baseline": not better,
                       "baselines_at_least_as_good": better})
    elapsed = time.time() - t_start
    spec_of = {s.model: s for s in specs}
    result = {
        "data_file": data.path, "split_grouping": data.split_grouping(), "counts": counts, "targets": targets,
        "seeds": seeds, "budget": budget_text,
        "full": full, "epochs": run_params["epochs"], "early_stopping_patience": run_params["early_stopping_patience"],
        "seconds": round(elapsed, 1), "seconds_of_resumed_runs": round(runner.resumed_seconds, 1),
        "split_used_for_choices": "val",
        "best_fused": best_fused,
        "best_dosnet": {"model": best_dosnet, "fusion": spec_of[best_dosnet].fusion,
                        "structure_families": spec_of[best_dosnet].structure_families},
        "best_baseline": {"model": best_baseline},
        "verdicts": verdicts, "dosnet_vs_baselines": versus,
        "models": {m: {"label": labels[m], "kind": kinds[m], "fusion": spec_of[m].fusion,
                       "structure_families": spec_of[m].structure_families, "summary": summaries[m],
                       "per_seed": [{"seed": s, **r} for s, r in zip(seeds, results[m])]} for m in order},
        "published": report.published()["results"],
    }
    write_json(out / "ablation.json", result)
    report.plot_ablation(out / "ablation.png", summaries, order, targets, kinds, TARGET_UNITS,
                         {m: m for m in order})
    write_text(out / "ablation.md", report.ablation_markdown(result, summaries, order, labels, kinds, SPLITS))
    log(report.markdown_table(summaries, order, targets, labels))
    for v in verdicts:
        log(v["text"].replace("**", "").replace("`", ""))
    resumed = f" (plus {report.duration(runner.resumed_seconds)} of runs resumed from {out / 'results'})" \
        if runner.resumed_seconds else ""
    log(f"ablation finished in {report.duration(elapsed)}{resumed}; table: {out / 'ablation.md'}")
    return result
