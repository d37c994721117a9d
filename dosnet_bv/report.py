"""Scoring, seed statistics, tables, verdicts, power laws and plots for ablations and learning curves.

Generic (numpy + matplotlib, project imports: ``DOSnet.compare`` (the published figures) and the lazy matplotlib of ``data_prep.plotting``): models are names, targets
are names, results are nested dicts. Terms used throughout:

- a *score* of one model, seed, split and target: ``n``, ``mae``, ``rmse``, ``r2``, ``mad`` (the
  mean absolute deviation of the true values of that split from their mean) and ``nmae`` =
  ``mae / mad`` (1 for a predictor that is as good as the split's own mean; scale-free, so targets
  in different units can be averaged), plus ``accuracy`` of rounded predictions when asked;
- a *summary*: per split and target, each metric's ``mean`` and ``std`` over seeds (sample
  standard deviation, ddof = 1; 0 for a single seed) and ``n_seeds``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from data_prep.plotting import pyplot
from DOSnet.compare import published

METRICS: tuple[str, ...] = ("mae", "rmse", "r2", "nmae", "accuracy")


# --------------------------------------------------------------------------- scoring
def scores(y_true, y_pred, accuracy: bool = False) -> dict:
    """Score of one prediction: y_true, y_pred (n,). R² and nMAE are None when y_true is constant."""
    y, p = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D of the same length, got {y.shape} and {p.shape}")
    if y.size == 0:
        return {"n": 0}
    err = p - y
    mae = float(np.mean(np.abs(err)))
    mad = float(np.mean(np.abs(y - y.mean())))
    sst = float(np.sum((y - y.mean()) ** 2))
    out = {"n": int(y.size), "mae": mae, "rmse": float(np.sqrt(np.mean(err ** 2))),
           "r2": float(1 - np.sum(err ** 2) / sst) if sst > 1e-12 else None,
           "mad": mad, "nmae": mae / mad if mad > 1e-12 else None}
    if accuracy:
        out["accuracy"] = float(np.mean(np.rint(p) == np.rint(y)))
    return out


def summarise(per_seed: list) -> dict:
    """Seed statistics. per_seed: list over seeds of ``{split: {target: score}}`` -> ``{split:
    {target: {metric: {"mean", "std"}, "n": samples, "n_seeds": k}}}``. None values (undefined R²)
    are left out of a metric's statistics; a metric with no value at all is None. A split some runs
    lack (a test fold without substituted materials) is summarised over the runs that have it."""
    out: dict = {}
    splits = list(dict.fromkeys(split for s in per_seed for split in s))  # a fold may lack a subset
    for split in splits:
        out[split] = {}
        have = [s[split] for s in per_seed if split in s]
        for target in have[0]:
            runs = [s[target] for s in have]
            entry: dict = {"n": runs[0].get("n", 0), "n_seeds": len(runs)}
            for m in METRICS:
                vals = [r[m] for r in runs if r.get(m) is not None]
                if vals:
                    entry[m] = {"mean": float(np.mean(vals)),
                                "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
                elif any(m in r for r in runs):
                    entry[m] = None
            out[split][target] = entry
    return out


def _mean_of(summary: dict, split: str, targets, metric: str) -> float:
    vals = []
    for t in targets:
        m = summary.get(split, {}).get(t, {}).get(metric)
        vals.append(m["mean"] if m else math.inf)
    return float(np.mean(vals)) if vals else math.inf


def select_best(summaries: dict, candidates, targets, split: str = "val", metric: str = "nmae") -> str:
    """The candidate model with the lowest ``metric`` on ``split`` (mean over seeds, then over
    targets; nMAE by default, so targets in different units weigh alike). Never looks at any
    other split. summaries: ``{model: summary}``. Ties go to the first candidate."""
    candidates = [c for c in candidates if c in summaries]
    if not candidates:
        raise ValueError("no candidate model has results")
    return min(candidates, key=lambda c: (_mean_of(summaries[c], split, targets, metric), candidates.index(c)))


# --------------------------------------------------------------------------- words and tables
def fmt(v, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def pm(entry, digits: int = 4) -> str:
    """``mean ± std`` of a summary metric (``–`` when undefined)."""
    if not entry:
        return "–"
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def verdict(target: str, fused: str, fused_summary: dict, reference: str, reference_summary: dict,
            unit: str = "", k: float = 2.0, split: str = "test") -> dict:
    """Does structure help for ``target``? Compares the test MAE of the fused model with the
    DOS-only ``reference``: difference, relative change and whether ``|difference| > k *
    pooled std`` (pooled std = sqrt((s_fused² + s_ref²) / 2), seed-to-seed). Returns the numbers
    and a one-sentence ``text``."""
    f = fused_summary[split][target]["mae"]
    r = reference_summary[split][target]["mae"]
    n_seeds = min(fused_summary[split][target]["n_seeds"], reference_summary[split][target]["n_seeds"])
    diff = r["mean"] - f["mean"]  # > 0: the fused model's error is lower
    rel = diff / r["mean"] if r["mean"] > 0 else float("nan")
    pooled = math.sqrt((f["std"] ** 2 + r["std"] ** 2) / 2)
    exceeds = n_seeds > 1 and abs(diff) > k * pooled
    u = f" {unit}" if unit else ""
    numbers = (f"`{fused}` test MAE {pm(f)}{u} vs `{reference}` {pm(r)}{u} "
               f"({abs(rel) * 100:.1f} % {'lower' if diff > 0 else 'higher'})")
    if n_seeds < 2:
        spread = "with one seed the seed-to-seed spread is unknown"
    else:
        spread = (f"the difference ({abs(diff):.4f}{u}) {'exceeds' if exceeds else 'is within'} {k:g} × the pooled "
                  f"seed-to-seed std ({k * pooled:.4f}{u}, {n_seeds} seeds)")
    if exceeds:
        head = "structure helps" if diff > 0 else "structure hurts"
    else:
        head = ("no clear effect of structure" if n_seeds > 1
                else "structure may help" if diff > 0 else "structure may hurt")
    return {"target": target, "fused": fused, "reference": reference, "mae_difference": diff,
            "relative_change": -rel, "pooled_std": pooled, "k": k, "exceeds_spread": bool(exceeds),
            "n_seeds": n_seeds, "text": f"**{target}**: {head}: {numbers}; {spread}."}


def markdown_table(summaries: dict, order, targets, labels: dict | None = None, split: str = "test",
                   digits: int = 4) -> str:
    """One row per model and target: MAE, RMSE, R², normalised MAE (each mean ± std over seeds),
    accuracy of rounded predictions where scored. ``labels``: model -> text of its first column."""
    labels = labels or {}
    lines = ["| model | target | MAE | RMSE | R² | normalised MAE | accuracy | seeds |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for m in order:
        if m not in summaries:
            continue
        for t in targets:
            e = summaries[m][split][t]
            lines.append(f"| {labels.get(m, m)} | {t} | {pm(e.get('mae'), digits)} | {pm(e.get('rmse'), digits)} | "
                         f"{pm(e.get('r2'), 3)} | {pm(e.get('nmae'), 3)} | {pm(e.get('accuracy'), 3)} | {e['n_seeds']} |")
    return "\n".join(lines)


def published_table() -> str:
    """The published DOSnet adsorption figures (MAE, RMSE in eV) as Markdown, with their source
    and why they cannot be normalised here."""
    pub = published()
    rows = pub["results"]
    per = {k: v for k, v in rows.items() if not k.startswith("combined")}
    lo = min(per, key=lambda k: per[k]["mae"])
    hi = max(per, key=lambda k: per[k]["mae"])
    lines = ["| published DOSnet (adsorption energies, eV) | n | MAE | RMSE | normalised MAE |",
             "|---|---:|---:|---:|---:|"]
    for name in ("combined", "combined_unrelaxed"):
        if name in rows:
            r = rows[name]
            lines.append(f"| {name.replace('_', ' ')} | {r['n']} | {r['mae']:.4f} | {r['rmse']:.4f} | n/a |")
    lines.append(f"| one model per adsorbate ({len(per)}) | {min(r['n'] for r in per.values())}–"
                 f"{max(r['n'] for r in per.values())} | {per[lo]['mae']:.4f} ({lo})–{per[hi]['mae']:.4f} ({hi}) | "
                 f"{per[lo]['rmse']:.4f}–{max(r['rmse'] for r in per.values()):.4f} | n/a |")
    source = pub["source"].replace("Figures below were computed", "MAE and RMSE were computed")
    lines += ["", f"Source: {source} Protocol: {pub.get('protocol', '')}.",
              "Normalised MAE needs the mean absolute deviation of the published adsorption energies; the "
              "CV_predict files it would come from are not in this repository, so only MAE and RMSE (eV) are given. "
              "They are a different target in different units: compare the normalised MAE of our rows with each "
              "other, and the published rows for the level a DOSnet reaches on its home task."]
    return "\n".join(lines)


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def ablation_markdown(res: dict, summaries: dict, order, labels: dict, kinds: dict,
                      splits=("train", "val", "test")) -> str:
    """``ablation.md`` from the ablation result ``res`` (as in ``ablation.json``): data and seeds,
    budget, choices, the test table, verdicts, DOSnet against the baselines, the validation numbers
    and the published figures."""
    targets = res["targets"]
    c = res["counts"]
    rows_md = {m: f"`{m}`" + (f" ({labels[m]})" if labels.get(m) else "") for m in order}
    val_lines = ["| model | validation nMAE, mean over targets | " + " | ".join(f"val MAE {t}" for t in targets) + " |",
                 "|---|---:|" + "---:|" * len(targets)]
    for m in order:
        s = summaries[m]["val"]
        nm = [s[t]["nmae"]["mean"] for t in targets if s[t].get("nmae")]
        val_lines.append(f"| `{m}` | {np.mean(nm):.3f} | " + " | ".join(pm(s[t]["mae"]) for t in targets) + " |"
                         if nm else f"| `{m}` | – | " + " | ".join(pm(s[t]["mae"]) for t in targets) + " |")
    versus = []
    for v in res["dosnet_vs_baselines"]:
        if v["beats_every_baseline"]:
            versus.append(f"- **{v['target']}**: the best DOSnet model (`{v['best_dosnet']}`, chosen on validation) has "
                          f"a lower test MAE than every baseline.")
        else:
            better = v["baselines_at_least_as_good"]
            versus.append(f"- **{v['target']}**: the best DOSnet model (`{v['best_dosnet']}`, chosen on validation) "
                          f"does **not** beat every baseline: " + ", ".join(f"`{b}`" for b in better)
                          + (" reaches" if len(better) == 1 else " reach") + " a test MAE at least as low.")
    fam = [m for m in order if kinds[m] == "families"]
    lines = [
        "# Ablation: baselines, DOSnet fusions and structure families",
        "",
        f"Data: `{res['data_file']}`, split stored in the file (grouped by {res.get('split_grouping', 'material')}): "
        + ", ".join(f"{s} {c[s]['materials']} materials / {c[s]['samples']} samples" for s in splits)
        + ". Every model is fitted on the same training rows and scored on the same test rows.",
        "",
        f"Seeds: {', '.join(map(str, res['seeds']))} (each cell: mean ± sample standard deviation over seeds; "
        "the seed changes the network's initialisation and batch order, not the split; the baselines are "
        "deterministic, so their spread is 0). Budget: " + res["budget"] + ".",
        "",
        f"Choices use the validation split only: best fused model `{res['best_fused']}` (of `dosnet-late`, "
        f"`dosnet-early`: lowest validation normalised MAE averaged over targets); best DOSnet model "
        f"`{res['best_dosnet']['model']}`; best baseline `{res['best_baseline']['model']}`.",
        "",
        f"Took {duration(res['seconds'])}" + (f" (plus {duration(res['seconds_of_resumed_runs'])} of runs made by an "
                                              f"earlier, interrupted invocation and resumed)"
                                              if res.get("seconds_of_resumed_runs") else "") + ".",
        "",
        "## Test split",
        "",
        markdown_table(summaries, order, targets, rows_md),
        "",
        "Normalised MAE = MAE / mean absolute deviation of the target over the test split (1: no better than "
        "the test split's own mean). Accuracy: rounded prediction equals the rounded true value (valence)."
        + (" Rows " + ", ".join(f"`{m}`" for m in fam) + ": the best fused model with that structure family "
           "switched off." if fam else ""),
        "",
        "![test MAE per model](ablation.png)",
        "",
        "## Does structure help?",
        "",
        *[f"- {v['text']}" for v in res["verdicts"]],
        "",
        "## Best DOSnet model against the baselines",
        "",
        *versus,
        "",
        "## Validation split (what the choices were made on)",
        "",
        *val_lines,
        "",
        "## Published DOSnet, for scale",
        "",
        published_table(),
        "",
    ]
    return "\n".join(lines)


def learning_curve_markdown(res: dict, n_materials: int, units: dict | None = None) -> str:
    """``learning_curve.md`` from the learning-curve result ``res`` (as in ``learning_curve.json``)."""
    units = units or {}
    targets = res["targets"]
    table = ["| training materials | fraction | training samples | model | target | val MAE | test MAE | test nMAE |",
             "|---:|---:|---:|---|---|---:|---:|---:|"]
    for p in res["points"]:
        for t in targets:
            s = p["summary"]
            table.append(f"| {p['train_materials']} | {p['fraction'] * 100:g} % | {p['train_samples']} | `{p['model']}` | "
                         f"{t} | {pm(s['val'][t]['mae'])} | {pm(s['test'][t]['mae'])} | "
                         f"{pm(s['test'][t].get('nmae'), 3)} |")
    intro = (f"Data: `{res['data_file']}`. Models: `{res['dosnet']['model']}` (structure families "
             f"{', '.join(res['dosnet']['structure_families']) or '-'}) and the baseline `{res['baseline']}`, chosen "
             f"by {res['chosen_by']}. Training on nested subsets of the training materials (fixed seed); the validation "
             f"and test rows are the same for every point. Seeds {', '.join(map(str, res['seeds']))} (mean ± std). "
             f"Budget: {res['budget']}.")
    return _curve_page("Learning curve", intro, table, res, n_materials, units)


def _curve_page(title: str, intro: str, table: list, res: dict, n_materials: int, units: dict) -> str:
    """A learning curve's markdown page: the table, the plot, the power laws and their assumptions."""
    return "\n".join([f"# {title}", "", intro, "", *table, "", "![test MAE against training samples](learning_curve.png)",
                      "", "## Power laws and extrapolation", "", *_power_law_lines(res, units), "",
                      *_curve_notes(res, n_materials), f"Took {duration(res['seconds'])}.", ""])


def _power_law_lines(res: dict, units: dict) -> list[str]:
    """One markdown line per (model, target) power law of a learning-curve result."""
    fits = []
    n_10k = f"{res['samples_at_1e4_materials']:,.0f}"
    for e in res["power_laws"]:
        u = units.get(e["target"], "")
        u = f" {u}" if u else ""
        if e["b"] is None:
            fits.append(f"- `{e['model']}`, {e['target']}: no power law (fewer than two points with MAE > 0)")
            continue
        trend = ("" if e["b"] > 0 else " (the error does not fall with more data here: the extrapolation is "
                 "meaningless)")
        line = (f"- `{e['model']}`, {e['target']}: MAE ≈ {e['a']:.4g} · N^{-e['b']:.3f}{trend}; at 10^4 materials "
                f"(N ≈ {n_10k} samples) ≈ {e['mae_at_1e4_materials']:.4f}{u}")
        if "b_largest3" in e:
            line += (f" (from the three largest subsets only: N^{-e['b_largest3']:.3f}, "
                     f"≈ {e['mae_at_1e4_materials_largest3']:.4f}{u})")
        fits.append(line)
    return fits


def _curve_notes(res: dict, n_materials: int) -> list[str]:
    """The assumptions behind a learning curve's extrapolation and the published curve for shape."""
    pub = res["published"]
    pts = ", ".join(f"{m:.3f} eV at {f * 100:g} %" for f, m in zip(pub["fraction"], pub["mae"]))
    return [
        f"Assumptions: MAE = a · N^-b fitted by least squares in log-log space to the mean test MAE of the "
        f"{len(res['fractions'])} points; 10^4 materials taken as 10^4 × {res['samples_per_material']:.2f} samples "
        f"(the samples per material of this data set, {n_materials} materials); new materials drawn like these; "
        f"the power law holding beyond the measured range. Every point trains for at most the same number of "
        f"epochs, so the smaller subsets also get fewer optimisation steps (as in a plain learning curve); the fit "
        f"to the three largest subsets shows how much that steepens the slope. Treat the number as an order of "
        f"magnitude.",
        "",
        f"Published DOSnet adsorption learning curve, for shape (combined model, {pub['n_total']} energies in total, "
        f"x = fraction × {pub['n_total']}): {pts}; power law b = {pub['power_law']['b']:.3f} "
        f"(right axis of the plot, eV). Source: {pub['source']}.",
        "",
    ]


def cv_learning_curve_markdown(res: dict, n_materials: int, units: dict | None = None) -> str:
    """``learning_curve.md`` of ``--learning-curve --cv K`` (``learning_curve.run_cv_learning_curve``)."""
    units = units or {}
    targets = res["targets"]
    table = ["| training materials | fraction | model | target | test MAE, all | cation | anion | runs |",
             "|---:|---:|---|---|---:|---:|---:|---:|"]
    for p in res["points"]:
        s = p["summary"]
        for t in targets:
            sub = [pm(s.get(k, {}).get(t, {}).get("mae"), 3) for k in ("test", "test_cation", "test_anion")]
            table.append(f"| {p['train_materials']:.0f} | {p['fraction'] * 100:g} % | {p['label']} | {t} | "
                         + " | ".join(sub) + f" | {p['runs']} |")
    intro = (f"Data: `{res['data_file']}`. {res['k']} folds grouped by {res['split_by']} (split_seed "
             f"{res['split_seed']}: the folds of `--ablation --cv {res['k']}` with the same params). On each fold "
             f"every model trains on nested subsets of the fold's training materials (fixed seed) and is scored on "
             f"the fold's whole test part; the validation rows stay whole. Each point: mean ± std over its runs "
             f"(folds × seeds; baselines one run per fold), training materials averaged over folds. Network seeds "
             f"{', '.join(map(str, res['seeds']))}. Budget: {res['budget']}.")
    groups = {"family": "families", "material": "materials"}.get(res["split_by"], f"{res['split_by']} groups")
    return _curve_page(f"Learning curve on unseen {groups}", intro, table, res, n_materials, units)


def published_learning_curve() -> dict:
    """The published learning curve (``fraction``, ``mae``, ``n_total``, ``units``, ``source``)."""
    return published()["learning_curve"]


# --------------------------------------------------------------------------- power law
def fit_power_law(n, mae) -> tuple[float, float]:
    """Least-squares fit of ``mae = a * n ** (-b)`` in log-log space; returns (a, b)."""
    n, mae = np.asarray(n, np.float64), np.asarray(mae, np.float64)
    ok = (n > 0) & (mae > 0) & np.isfinite(n) & np.isfinite(mae)  # log-log: positive points only
    x, y = np.log(np.where(ok, n, 1.0)), np.log(np.where(ok, mae, 1.0))
    if ok.sum() < 2:
        raise ValueError("a power law needs at least two positive points")
    slope, intercept = np.polyfit(x[ok], y[ok], 1)
    return float(np.exp(intercept)), float(-slope)


# --------------------------------------------------------------------------- plots
KIND_COLOURS = {"baseline": "0.6", "dosnet": "tab:blue", "families": "tab:orange"}


def plot_ablation(path, summaries: dict, order, targets, kinds: dict, units: dict | None = None,
                  labels: dict | None = None, split: str = "test") -> None:
    """Bar plot: one panel per target, one bar per model (test MAE, mean over seeds, error bar =
    seed-to-seed std), coloured by ``kinds`` (model -> baseline / dosnet / families)."""
    plt = pyplot()
    units, labels = units or {}, labels or {}
    order = [m for m in order if m in summaries]
    panel = max(4.5, 0.32 * len(order) + 1.5)  # inches per target panel
    fig, axes = plt.subplots(1, len(targets), figsize=(panel * len(targets), 5.0), squeeze=False)
    for j, t in enumerate(targets):
        ax = axes[0, j]
        means = [summaries[m][split][t]["mae"]["mean"] for m in order]
        stds = [summaries[m][split][t]["mae"]["std"] for m in order]
        colours = [KIND_COLOURS.get(kinds.get(m), "0.3") for m in order]
        ax.bar(range(len(order)), means, yerr=stds, color=colours, capsize=2)
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels([labels.get(m, m) for m in order], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(f"{split} MAE" + (f" ({units[t]})" if units.get(t) else ""))
        ax.set_title(t)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in KIND_COLOURS.values()]
    axes[0, -1].legend(handles, ["baseline", "DOSnet", "structure family off"], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_learning_curves(path, curves: dict, targets, units: dict | None = None, fits: dict | None = None,
                         published_curve: dict | None = None, extrapolate_to: float | None = None) -> None:
    """Log-log test MAE vs training samples, one panel per target.

    curves: ``{model: {"n": [...], target: {"mean": [...], "std": [...]}}}``; fits: ``{(model,
    target): (a, b)}`` drawn dashed, out to ``extrapolate_to`` samples (marked with an x) when given;
    published_curve (``published_learning_curve()``) on a second y axis in its own units at x =
    fraction * n_total, its axis spanning as many decades as the first so slopes compare by eye."""
    plt = pyplot()
    from matplotlib.ticker import FixedLocator, NullLocator

    units, fits = units or {}, fits or {}
    fig, axes = plt.subplots(1, len(targets), figsize=(5.6 * len(targets), 4.6), squeeze=False)
    for j, t in enumerate(targets):
        ax = axes[0, j]
        for k, (model, c) in enumerate(curves.items()):
            colour = f"C{k}"
            n = np.asarray(c["n"], float)
            ax.errorbar(n, c[t]["mean"], yerr=c[t]["std"], fmt="o-", color=colour, capsize=2, label=model)
            if (model, t) in fits:
                a, b = fits[(model, t)]
                xs = np.geomspace(n.min(), max(n.max(), extrapolate_to or 0), 60)
                ax.plot(xs, a * xs ** (-b), "--", color=colour, lw=0.8, label=f"fit {a:.3g}·N^{-b:.2f}")
                if extrapolate_to:
                    ax.plot([extrapolate_to], [a * extrapolate_to ** (-b)], "x", color=colour, ms=8)
        if extrapolate_to:
            ax.axvline(extrapolate_to, color="0.6", ls=":", lw=0.8, label="10^4 materials")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training samples N")
        ax.set_ylabel("test MAE" + (f" ({units[t]})" if units.get(t) else ""))
        ax.set_title(t)
        lines, names = ax.get_legend_handles_labels()
        if published_curve:
            ax2 = ax.twinx()
            x = np.asarray(published_curve["fraction"]) * published_curve["n_total"]
            y = np.asarray(published_curve["mae"], float)
            ax2.plot(x, y, "s:", color="k", label="published DOSnet, adsorption (right axis)")
            ax2.set_yscale("log")
            lo, hi = ax.get_ylim()
            half = 0.5 * max(np.log10(hi / lo), np.log10(y.max() / y.min()) * 1.2)
            mid = np.sqrt(y.min() * y.max())
            ax2.set_ylim(mid / 10 ** half, mid * 10 ** half)
            ax2.yaxis.set_major_locator(FixedLocator(y))
            ax2.yaxis.set_minor_locator(NullLocator())
            ax2.set_yticklabels([f"{v:g}" for v in y])
            ax2.set_ylabel(f"published test MAE ({published_curve['units']})")
            l2, n2 = ax2.get_legend_handles_labels()
            lines, names = lines + l2, names + n2
        ax.legend(lines, names, fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=1) + "\n")
