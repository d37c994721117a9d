"""``--ablation --cv K``: the comparison on unseen families (issue 18).

Every model of ``CV_MODELS`` is trained and scored on each fold of the family-grouped K-fold
split (``runs.cv_splits``: no family on both sides) and, for the networks, over several seeds;
the table gives mean ± std over all (fold, seed) runs, on every test site and on cation and
anion sites separately (the sign of the stored bond-valence oxidation state says which; it
selects rows for scoring only). Baselines are deterministic: one run per fold, their spread is
the spread over folds. Each (model, fold, seed) result is kept in ``results/`` so that an
interrupted study resumes; ``--models`` runs a subset (add the rest later in the same folder).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dosnet_bv import report
from dosnet_bv.ablation import BASELINES, Features, ModelSpec, ablation_budget, cn_column, model_result, run_model
from dosnet_bv.data import Dataset
from dosnet_bv.outputs import Log, write_json, write_text
from dosnet_bv.params import TARGET_UNITS, TrainError
from dosnet_bv.resume import ResultStore, check_resume
from dosnet_bv.runs import content_fingerprint, cv_splits


#: the energy-shift augmentation tried on the DOS-only model (eV; the grid's smearing is 0.1)
AUGMENT_EV = 0.1


@dataclass(frozen=True)
class CVModel:
    """One row of the table: ``kind`` baseline (a key of ``ablation.BASELINES``) or dosnet with its
    ``fusion`` and ``structure_input`` (the structure vector's families come from params)."""

    name: str
    label: str
    kind: str
    fusion: str | None = None
    structure_input: str = "vector"
    overrides: tuple = ()  # (params key, value) pairs of this model
    on_form: bool = False  # the network learns what the fitted bond valence form leaves

    def spec(self, families: list) -> ModelSpec:
        if self.kind == "baseline":
            return ModelSpec(self.name, "baseline")
        fams = list(families) if self.structure_input != "bonds" and self.fusion != "none" else []
        return ModelSpec(self.name, "dosnet", self.fusion, fams, self.structure_input, dict(self.overrides),
                         self.on_form)

    @property
    def needs_bonds(self) -> bool:
        return self.on_form or self.structure_input in ("bonds", "both") or self.name.startswith("bv_")


CV_MODELS = {m.name: m for m in (
    CVModel("element_mean", BASELINES["element_mean"], "baseline"),
    CVModel("element_cn_mean", BASELINES["element_cn_mean"], "baseline"),
    CVModel("gbt_dos", BASELINES["gbt_dos"], "baseline"),
    CVModel("gbt_structure", BASELINES["gbt_structure"], "baseline"),
    CVModel("gbt_dos_structure", BASELINES["gbt_dos_structure"], "baseline"),
    CVModel("bv_fitted", BASELINES["bv_fitted"], "baseline"),
    CVModel("bv_gbt_dos", BASELINES["bv_gbt_dos"], "baseline"),
    CVModel("bv_gbt_structure", BASELINES["bv_gbt_structure"], "baseline"),
    CVModel("dos", "DOSnet, DOS only", "dosnet", "none"),
    CVModel("dos_shift", f"DOS only, shifted ±{AUGMENT_EV:g} eV in training", "dosnet", "none",
            overrides=(("augment_shift_ev", AUGMENT_EV),)),
    CVModel("dos_point", "DOS only, standardised per energy point", "dosnet", "none",
            overrides=(("dos_scaling", "point"),)),
    CVModel("dos_raw", "DOS only, not standardised", "dosnet", "none", overrides=(("dos_scaling", "none"),)),
    CVModel("vector", "structure vector only", "dosnet", "structure_only", "vector"),
    CVModel("bonds", "bonds only", "dosnet", "structure_only", "bonds"),
    CVModel("dos_vector", "DOS + structure vector (late)", "dosnet", "late", "vector"),
    CVModel("dos_bonds", "DOS + bonds (late)", "dosnet", "late", "bonds"),
    # the site's DOS alone (no neighbour DOS; the bond table names the neighbours): one featurizer
    # pass per sample instead of three
    CVModel("site_dos_bonds", "site DOS + bonds (late)", "dosnet", "late", "bonds", overrides=(("n_neighbours", 0),)),
    # stacked on the bond valence form: the network learns target minus form (ablation.on_form)
    CVModel("form_dos", "bond valence form + DOS only network (residual)", "dosnet", "none", on_form=True),
    CVModel("form_bonds", "bond valence form + bonds only network (residual)", "dosnet", "structure_only", "bonds",
            on_form=True),
    CVModel("form_dos_bonds", "bond valence form + DOS + bonds network (residual)", "dosnet", "late", "bonds",
            on_form=True),
)}
#: the subsets every test fold is also scored on: by site
SUBSETS = ("test", "test_cation", "test_anion")
#: ... and by material: real (experimental) structures and substituted ones (``meta/origin``)
ORIGIN_SUBSETS = ("test_real", "test_substituted")


def parse_models(text: str | None, default=None) -> list[str]:
    """``--models a,b``: the names, checked; None means ``default`` (every model when None)."""
    if not text:
        return list(default or CV_MODELS)
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in CV_MODELS]
    if bad or not names:
        raise TrainError(f"--models: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(CV_MODELS)}")
    return names


def site_subsets(data: Dataset, test_rows: np.ndarray) -> dict:
    """``{subset: rows}`` of one test fold: all, cation and anion sites (by the stored valence sign),
    and the sites of real and of substituted materials (``origin`` ``substituted`` or not) when the
    file holds both kinds; a subset without rows is left out (a migration barrier is carried by
    mobile cations only)."""
    out = {"test": test_rows}
    v = data.targets.get("valence")
    if v is not None:
        for name, rows in (("test_cation", test_rows[v[test_rows] > 0]), ("test_anion", test_rows[v[test_rows] < 0])):
            if len(rows):
                out[name] = rows
    origin = getattr(data, "origin", None)
    if origin is not None:
        substituted = np.asarray(origin) == "substituted"
        if substituted.any() and not substituted.all():
            for name, rows in (("test_real", test_rows[~substituted[test_rows]]),
                               ("test_substituted", test_rows[substituted[test_rows]])):
                if len(rows):
                    out[name] = rows
    return out


@dataclass
class CVStudy:
    """What every study on the folds of a grouped K-fold split starts with (``run_cv_ablation``,
    ``learning_curve.run_cv_learning_curve``): the run folder and its log, the study budget, the
    network seeds, the folds, the store of finished runs and the baselines' features."""

    out: Path
    log: Log
    epoch_log: Log
    models: list
    params: dict  # params with the study budget
    budget: str
    seeds: list
    folds: list
    store: ResultStore
    features: Features
    families: list  # the structure vector's families (params)

    @classmethod
    def start(cls, params: dict, data: Dataset, out_dir, k: int, n_seeds: int, models: list, full: bool,
              log: Log | None, name: str, config: dict, what: str = "") -> "CVStudy":
        """Checks the models against the file, deals the folds, checks or writes
        ``<name>_config.json`` (``config`` adds keys) and logs what runs; ``what`` adds to that line."""
        from tqdm import tqdm

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        log = log or Log(out / f"{name}.log", printer=tqdm.write)
        models = list(models)
        if "element_cn_mean" in models and cn_column(data) is None:
            models = [m for m in models if m != "element_cn_mean"]
            log(f"no 'cn' column in the structure vector of {data.path}: per element + CN mean left out")
        if any(CV_MODELS[m].needs_bonds for m in models) and data.bonds is None:
            raise TrainError(f"{data.path} has no bond table (schema < 3): rebuild it (make data) or leave out the "
                             f"bond models (--models)")
        run_params, budget = ablation_budget(params, full)
        by = params["split_by"]
        seeds = [params["seed"] + i for i in range(n_seeds)]
        folds = cv_splits(data.groups(by), k, params["cv_val_fraction"], params["split_seed"])
        check_resume(out / f"{name}_config.json",
                     {"data_file": data.path, "n_samples": data.n, "k": k, "split_by": by,
                      "split_seed": params["split_seed"], **config, "params": run_params}, log)
        write_json(out / "params.json", params)
        log(f"{by}-grouped {name.replace('cv_', '').replace('_', ' ')} on {data.path}: {data.n} samples, {k} folds "
            f"grouped by {by} ({len(np.unique(data.groups(by)))} groups); models {', '.join(models)}; {what}"
            f"network seeds {', '.join(map(str, seeds))}; {budget}")
        log(f"run folder {out}; if interrupted, the same command with --out {out} resumes after the finished runs")
        return cls(out, log, Log(log.path, quiet=True), models, run_params, budget, seeds, folds,
                   ResultStore(out / "results", log), Features(data, run_params, log), list(params["structure_families"]))


def run_cv_ablation(params: dict, data: Dataset, out_dir, k: int, n_seeds: int = 3, models: list | None = None,
                    full: bool = False, log: Log | None = None) -> dict:
    """Every model of ``models`` (default ``CV_MODELS``) on every fold of a family-grouped K-fold CV.

    Writes ``cv_ablation.json``, ``cv_ablation.md``, ``cv_ablation.log`` and ``results/``; returns
    the JSON content. Params' ``split_by`` groups the folds (``family`` by default), ``split_seed``
    deals them, ``seed``, ``seed + 1``, ... seed the networks.
    """
    from tqdm import tqdm

    t0 = time.time()
    st = CVStudy.start(params, data, out_dir, k, n_seeds, models or list(CV_MODELS), full, log, "cv_ablation", {})
    out, log, epoch_log, models, run_params, budget = st.out, st.log, st.epoch_log, st.models, st.params, st.budget
    seeds, folds, store, features, families = st.seeds, st.folds, st.store, st.features, st.families
    jobs = [(m, f, s) for m in models for f in range(k)
            for s in (seeds[:1] if CV_MODELS[m].kind == "baseline" else seeds)]
    results: dict = {m: [] for m in models}
    bar = tqdm(total=len(jobs), unit="run", desc="runs", disable=None, leave=False)
    try:
        for i, (m, f, s) in enumerate(jobs, 1):
            train, val, test = folds[f]
            rows = {"train": train, "val": val, **site_subsets(data, test)}
            spec = CV_MODELS[m].spec(families)
            job = store.get(f"{m}__fold{f}__seed{s}",
                            lambda: run_model(spec, s, run_params, data, train, rows, features, epoch_log,
                                              keep="test"), model_result)
            res = job.value
            results[m].append({"fold": f, "seed": s, **res})
            bar.update()
            sc = res["scores"]["test"]
            log(f"[{i}/{len(jobs)}] {CV_MODELS[m].label}, fold {f + 1}, seed {s}: test MAE "
                + ", ".join(f"{t} {sc[t]['mae']:.4f}" for t in sc)
                + (" (resumed)" if job.resumed else f" ({res['seconds']:.0f} s)") + f"; elapsed {report.duration(time.time() - t0)}")
    finally:
        bar.close()
    summaries = {m: report.summarise([r["scores"] for r in rs]) for m, rs in results.items()}
    targets = params["targets"]
    for m in models:  # the mean prediction of a network's seeds, scored per fold
        if CV_MODELS[m].kind == "dosnet" and n_seeds > 1 and all("predictions" in r for r in results[m]):
            summaries[f"{m}_ensemble"] = ensemble_summary(data, targets, folds, results[m])
    config = {"data": content_fingerprint(data), "n_samples": data.n, "k": k, "split_by": params["split_by"],
              "split_seed": params["split_seed"],
              "params": {key: v for key, v in run_params.items() if key not in UNCOMPARED_PARAMS}}
    head = {"data_file": data.path, "k": k, "split_by": params["split_by"], "seeds": seeds, "budget": budget,
            "config": config, "seconds": round(time.time() - t0, 1)}
    return write_report(out, head, summaries, results, models, targets, log)


#: params that may differ between the parts of one study (``combine``): where the file and the runs lie
UNCOMPARED_PARAMS = ("data_file", "out_dir")


def write_report(out: Path, head: dict, summaries: dict, results: dict, models: list, targets: list,
                 log: Log | None = None) -> dict:
    """``cv_ablation.json`` (``head``, then per model its summary and runs without predictions, the
    comparisons with the baselines and the paired-by-fold differences) and ``cv_ablation.md``;
    returns the JSON content. ``results``: ``{model: [run, ...]}``, each run with its fold, seed
    and scores; ``summaries`` also holds the ``<model>_ensemble`` entries."""
    models_out = [x for m in models for x in (m, f"{m}_ensemble") if x in summaries]
    versus = compare(summaries, models_out, targets)
    by_fold = paired_by_fold(results, summaries, models, targets)
    result = {**head,
              "models": {m: {"label": label(m), "kind": kind(m), "summary": summaries[m],
                             "runs": [{k: v for k, v in r.items() if k != "predictions"} for r in results.get(m, [])]}
                         for m in models_out},
              "comparisons": versus, "paired_by_fold": by_fold}
    write_json(out / "cv_ablation.json", result)
    table = markdown(summaries, models_out, targets)
    k, split_by = head["k"], head["split_by"]
    parts = "".join(f"- {p}\n" for p in head.get("parts", []))
    title = "unseen families" if split_by == "family" else f"unseen {split_by}s (related materials may sit in train)"
    write_text(out / "cv_ablation.md", f"# Ablation on {title} ({k}-fold CV by {split_by})\n\n"
                                       f"{head['budget']}\n\n"
                                       + (f"Combined from these parts (one data file, folds and budget):\n\n{parts}\n"
                                          if parts else "")
                                       + f"{table}\n\n" + "\n".join(f"- {c['text']}" for c in versus) + "\n"
                                       + ("\n## Paired by fold\n\nThe fold-to-fold spread (one hard fold "
                                          "raises every model's error) is shared by two models on the same "
                                          "fold; their difference per fold is not. A network's MAE is the mean "
                                          "over its seeds on that fold.\n\n"
                                          + "\n".join(f"- {c['text']}" for c in by_fold) + "\n" if by_fold else ""))
    if log is not None:
        log(table)
        for c in versus + by_fold:
            log(c["text"])
    return result


def _read_part(path: Path) -> dict:
    """One part's ``cv_ablation.json`` (or the run folder holding it), checked."""
    if path.is_dir():
        path = path / "cv_ablation.json"
    if not path.is_file():
        raise TrainError(f"{path}: no such file (give the cv_ablation.json of a train.py --ablation --cv K run, "
                         f"or its run folder)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TrainError(f"{path} is not a JSON file ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict):
        raise TrainError(f"{path} is not the cv_ablation.json of a train.py --ablation --cv K run")
    if not isinstance(raw.get("config"), dict):
        raise TrainError(f"{path} was written before parts could be combined (it has no 'config'); run its "
                         f"models again")
    for name, entry in raw["models"].items():
        if name.removesuffix("_ensemble") not in CV_MODELS:
            raise TrainError(f"{path}: unknown model {name!r}")
        if not isinstance(entry, dict) or "summary" not in entry or not isinstance(entry.get("runs"), list):
            raise TrainError(f"{path}: model {name!r} has no summary or runs")
    return raw


def combine(parts: list, out_dir, log: Log | None = None) -> dict:
    """One report from several ``--ablation --cv K`` runs of different models (``--models``) on the
    same data, folds and budget, e.g. run in different sittings: their tables side by side, the
    comparisons with the baselines and the paired-by-fold differences recomputed over all of them.
    Parts of other data (``content_fingerprint``), folds or settings, and a model in two parts,
    are refused. Writes ``cv_ablation.json`` and ``cv_ablation.md`` into ``out_dir``."""
    if not parts:
        raise TrainError("--combine needs at least one cv_ablation.json")
    loaded = [(Path(p), _read_part(Path(p))) for p in parts]
    first_path, first = loaded[0]
    for path, raw in loaded[1:]:
        a, b = first["config"], raw["config"]
        diff = sorted(key for key in set(a) | set(b) if a.get(key) != b.get(key))
        if diff:
            what = ", ".join("the data (another build or other records)" if d == "data" else d for d in diff)
            raise TrainError(f"{path} and {first_path} differ in {what}: only parts of one study can be combined")
    summaries, results, owner = {}, {}, {}
    for path, raw in loaded:
        for name, entry in raw["models"].items():
            if name in owner:
                raise TrainError(f"{name} is in both {owner[name]} and {path}: combine parts with different models")
            owner[name] = path
            summaries[name] = entry["summary"]
            if not name.endswith("_ensemble"):
                results[name] = entry["runs"]
    models = [m for m in CV_MODELS if m in results]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    head = {"data_file": first["data_file"], "k": first["k"], "split_by": first["split_by"],
            "seeds": sorted({int(s) for _, raw in loaded for s in raw.get("seeds", [])}), "budget": first["budget"],
            "config": first["config"], "seconds": round(sum(float(raw.get("seconds", 0)) for _, raw in loaded), 1),
            "parts": [str(p) for p, _ in loaded]}
    return write_report(out, head, summaries, results, models, first["config"]["params"]["targets"], log)


def label(name: str) -> str:
    base = name.removesuffix("_ensemble")
    return CV_MODELS[base].label + (", mean of the seeds" if name != base else "")


def kind(name: str) -> str:
    return CV_MODELS[name.removesuffix("_ensemble")].kind


def ensemble_summary(data: Dataset, targets: list, folds: list, runs: list) -> dict:
    """Scores of the mean prediction over a network's seeds, one per fold (its spread: over folds)."""
    from dosnet_bv.ablation import score_splits

    per_fold = []
    for f, (_, _, test) in enumerate(folds):
        preds = [np.asarray(r["predictions"]) for r in runs if r["fold"] == f]
        if not preds:
            continue
        mean = np.mean(preds, axis=0)
        subsets = site_subsets(data, test)
        pos = {s: np.searchsorted(test, r) for s, r in subsets.items()}  # test rows are sorted
        per_fold.append(score_splits(data, targets, subsets, {s: mean[p] for s, p in pos.items()}))
    return report.summarise(per_fold)


def _stat(summary: dict, subset: str, target: str, metric: str):
    e = summary.get(subset, {}).get(target, {}).get(metric)
    return (e["mean"], e["std"]) if e else None


def compare(summaries: dict, models: list, targets: list) -> list[dict]:
    """For each network and target: does its test MAE (mean ± std over folds and seeds) lie below
    every baseline's with intervals that do not overlap?"""
    baselines = [m for m in models if kind(m) == "baseline"]
    out = []
    if not baselines:
        return out
    for m in (m for m in models if kind(m) == "dosnet"):
        for t in targets:
            for subset in ("test", "test_cation"):
                mine = _stat(summaries[m], subset, t, "mae")
                if mine is None:
                    continue
                lo_mine = mine[0] + mine[1]
                theirs = {b: _stat(summaries[b], subset, t, "mae") for b in baselines}
                beaten = [b for b, v in theirs.items() if v and lo_mine < v[0] - v[1]]
                best_b = min((b for b in theirs if theirs[b]), key=lambda b: theirs[b][0])
                where = "cation sites" if subset == "test_cation" else "all sites"
                text = (f"{label(m)}, {t} on {where}: {mine[0]:.3f} ± {mine[1]:.3f} "
                        f"{TARGET_UNITS.get(t, '')} vs best baseline {label(best_b)} "
                        f"{theirs[best_b][0]:.3f} ± {theirs[best_b][1]:.3f}; "
                        + ("below every baseline with intervals apart" if len(beaten) == len(baselines) else
                           f"below {len(beaten)} of {len(baselines)} baselines with intervals apart"))
                out.append({"model": m, "target": t, "subset": subset, "mae": mine, "best_baseline": best_b,
                            "beats_every_baseline": len(beaten) == len(baselines), "text": text})
    return out


#: network pairs compared fold by fold when both ran: what the DOS adds to a structure input, and
#: what a structure input adds to the DOS; on the bond valence form, what the DOS adds to it
PAIRED_NETWORKS = (("dos_bonds", "bonds"), ("dos_vector", "vector"), ("dos_bonds", "dos"), ("dos_vector", "dos"),
                   ("site_dos_bonds", "dos_bonds"), ("site_dos_bonds", "bonds"),
                   ("form_dos_bonds", "form_bonds"), ("form_dos_bonds", "dos_bonds"))


def fold_maes(runs: list, subset: str, target: str) -> dict:
    """``{fold: MAE}`` of one model's runs on ``subset``: the mean over its seeds on each fold."""
    per: dict = {}
    for r in runs:
        e = r["scores"].get(subset, {}).get(target)
        if e and e.get("mae") is not None:
            per.setdefault(r["fold"], []).append(e["mae"])
    return {f: float(np.mean(v)) for f, v in sorted(per.items())}


def paired_by_fold(results: dict, summaries: dict, models: list, targets: list) -> list[dict]:
    """Each network against the best baseline (lowest mean test MAE, per target and subset) and the
    ``PAIRED_NETWORKS`` pairs, on the folds both ran: the difference of their MAEs per fold (first
    minus second; negative: the first is better), and in how many folds the first is lower."""
    baselines = [m for m in models if kind(m) == "baseline"]
    networks = [m for m in models if kind(m) == "dosnet"]
    out = []
    for t in targets:
        for subset in ("test", "test_cation"):
            pairs = []
            have = [b for b in baselines if _stat(summaries[b], subset, t, "mae")]
            if have:
                best = min(have, key=lambda b: _stat(summaries[b], subset, t, "mae")[0])
                pairs += [(m, best) for m in networks]
            pairs += [(a, b) for a, b in PAIRED_NETWORKS if a in networks and b in networks]
            for a, b in pairs:
                fa, fb = fold_maes(results[a], subset, t), fold_maes(results[b], subset, t)
                folds = [f for f in fa if f in fb]
                if not folds:
                    continue
                d = np.array([fa[f] - fb[f] for f in folds])
                where = "cation sites" if subset == "test_cation" else "all sites"
                text = (f"{label(a)} against {label(b)}, {t} MAE on {where}: lower in {int((d < 0).sum())} of "
                        f"{len(d)} folds; difference per fold " + ", ".join(f"{x:+.3f}" for x in d)
                        + (f" {TARGET_UNITS[t]}" if TARGET_UNITS.get(t) else "") + f" (mean {d.mean():+.3f})")
                out.append({"model": a, "against": b, "target": t, "subset": subset, "folds": folds,
                            "differences": [round(float(x), 4) for x in d], "lower_in": int((d < 0).sum()),
                            "text": text})
    return out


def markdown(summaries: dict, models: list, targets: list) -> str:
    """One row per model: MAE (and valence accuracy) on all, cation and anion test sites, mean ± std;
    then, when the folds scored them, the same on the sites of real and of substituted materials."""
    def table(subsets, names):
        head = ["model", "runs"]
        for t in targets:
            head += [f"{t} MAE {n}" for n in names]
            if t == "valence":
                head += [f"valence right, {n}" for n in names[:2]]
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for m in models:
            s = summaries[m]
            row = [label(m), str(s["test"][targets[0]]["n_seeds"])]
            for t in targets:
                row += [report.pm(s.get(sub, {}).get(t, {}).get("mae"), 3) for sub in subsets]
                if t == "valence":
                    row += [report.pm(s.get(sub, {}).get(t, {}).get("accuracy"), 3) for sub in subsets[:2]]
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)

    out = table(SUBSETS, ["all", "cation", "anion"])
    if any(sub in summaries[m] for m in models for sub in ORIGIN_SUBSETS):
        out += ("\n\nThe same test sites by material: real (experimental) structures and substituted ones.\n\n"
                + table(ORIGIN_SUBSETS, ["real", "substituted"]))
    return out


#: what ``side_by_side`` shows of each study: (target, subset, metric, heading)
SIDE_BY_SIDE_COLUMNS = (("bvs_vu", "test", "mae", "bvs_vu MAE"), ("bvs_vu", "test_cation", "mae", "cation"),
                        ("valence", "test", "accuracy", "valence right"),
                        ("valence", "test_cation", "accuracy", "cation"))


@dataclass(frozen=True)
class FinishedStudy:
    """One finished ``--ablation --cv K`` study for ``side_by_side``: its label and JSON."""

    label: str
    path: Path
    raw: dict

    @classmethod
    def read(cls, spec: str) -> "FinishedStudy":
        """``LABEL=RUN`` (RUN: a run folder or its cv_ablation.json); without ``LABEL=`` the folder name."""
        label, sep, where = spec.partition("=")
        if not sep:
            label, where = "", spec
        raw = _read_part(Path(where))
        path = Path(where)
        return cls(label or (path.name if path.is_dir() else path.parent.name), path, raw)

    def describe(self) -> str:
        r = self.raw
        return (f"{self.label}: {r['data_file']} ({r['config']['n_samples']} samples), {r['k']} folds by "
                f"{r['split_by']}, split_seed {r['config']['split_seed']}, network seeds "
                f"{', '.join(map(str, r['seeds']))}")


def side_by_side(specs: list, out_file, models: list | None = None) -> str:
    """One markdown table of several finished studies (``LABEL=RUN``, e.g. material- against
    family-grouped, xTB against PBE spectra): a row per model that any of them ran, per study its
    test ``bvs_vu`` MAE and share of valences right, on all and on cation sites, mean ± std over
    its (fold, seed) runs as in its own report ("–" where a study did not run the model or the
    target). ``models``: only these rows (and their ``_ensemble`` rows), in this order. Written to
    ``out_file`` and returned."""
    studies = [FinishedStudy.read(s) for s in specs]
    if not studies:
        raise TrainError("--side-by-side needs at least one LABEL=RUN")
    ran = list(dict.fromkeys(m for s in studies for m in s.raw["models"]))
    if models:
        ran = [m for want in models for m in ran if m.removesuffix("_ensemble") == want]
        if not ran:
            raise TrainError(f"--models: none of {', '.join(models)} is in these studies")
    models = ran
    head = ["model"] + [f"{s.label}: {h}" for s in studies for *_, h in SIDE_BY_SIDE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for m in models:
        row = [label(m)]
        for s in studies:
            summary = s.raw["models"].get(m, {}).get("summary", {})
            for target, subset, metric, _ in SIDE_BY_SIDE_COLUMNS:
                entry = summary.get(subset, {}).get(target, {}).get(metric)
                row.append(report.pm(entry, 3) if metric == "mae" else
                           (f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f} %" if entry else "–"))
        lines.append("| " + " | ".join(row) + " |")
    text = ("# Studies side by side\n\nTest-site figures, mean ± std over each study's (fold, seed) runs "
            "(bvs_vu in v.u.; valence right: rounded oxidation state equal to the stored one).\n\n"
            + "".join(f"- {s.describe()}\n" for s in studies) + "\n" + "\n".join(lines) + "\n")
    write_text(Path(out_file), text)
    return text
