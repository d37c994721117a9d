"""Issue 13's answer in one resumable command: from a folder of records (the PBE spectra) to every
study the results page reports, each in its own folder under ``--out``.

    python bench/answer.py [--records data_prep/embedded/spectra_pbe] [--out runs/answer]
                           [--params params.json] [--folds 5] [--seeds 3] [--draws 89,90] [--draw-seeds 1]
                           [--stages build,ablation,draws,material,curve,importance,xtb,side] [--full]
                           [--dry-run]

Not a benchmark: the long study (hours on 2 cores at 1,000 materials), kept beside them because it
only drives the two command lines (``python -m data_prep`` and ``train.py``) in order. Stages:

- ``build``: the records -> ``<out>/data.h5``, once. A rerun keeps the file, so the studies that
  resume after an interruption see the data they started on (delete the folder to start over
  with newer records); ``data.json`` holds its counts (``data_prep inspect --json``).
- ``ablation``: ``--ablation --cv K --seeds S`` on the family-grouped folds of ``split_seed`` from
  params (``<out>/ablation``): every baseline and the five inputs of issue 18 (``ANSWER_MODELS``).
- ``draws``: the models of ``--draw-models`` on other draws of the folds (``split_seed`` of
  ``--draws``; ``<out>/draw-<seed>``; ``--draw-seeds`` network seeds): how much a draw alone moves
  each figure.
- ``material``: the same models grouped by material (``split_by`` material; ``<out>/material``):
  how optimistic a split that lets families straddle it is.
- ``curve``: ``--learning-curve --cv K`` (``<out>/curve``).
- ``importance``: one DOS + bonds run (late fusion, ``structure_input`` bonds; ``<out>/dos-bonds``,
  resumed from its checkpoint if interrupted) and ``--importance`` on it with
  ``importance_reference`` ``element`` (the training mean of the site's own element as reference).
- ``xtb``: the committed GFN1-xTB spectra (``data_prep build --source embedded``) under the same
  ``--draw-models``, by family and by material (``<out>/xtb-family``, ``<out>/xtb-material``): the
  old figures beside the new ones.
- ``side``: ``train.py --side-by-side`` of the finished studies -> ``<out>/side_by_side.md``.

Every stage calls the command a user would type (printed, and logged to ``<out>/answer.log``);
those commands resume where they stopped, so rerunning this script continues the whole study.
``<out>/answer.json`` records each stage's state, command and wall time (written atomically);
``<out>/answer.md`` links the reports. ``--dry-run`` prints the commands only.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.cli import OneLineParser, error_tail
from dosnet_bv.outputs import write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("build", "ablation", "draws", "material", "curve", "importance", "xtb", "side")
# the main ablation: every baseline and the five inputs of issue 18 (the DOS-only variants,
# site_dos_bonds and form_* were side questions, answered on the interim set; --models adds them)
ANSWER_MODELS = ("element_mean", "element_cn_mean", "gbt_dos", "gbt_structure", "gbt_dos_structure", "bv_fitted",
                 "bv_gbt_dos", "bv_gbt_structure", "dos", "vector", "bonds", "dos_vector", "dos_bonds")
# the extra draws, the material-grouped and the xTB studies: the best of each kind in the interim
# ablations (table lookup, best tree, the fitted bond valence form, the networks), one seed each
# by default (the main ablation measures the seeds' spread)
DRAW_MODELS = ("element_cn_mean", "gbt_dos_structure", "bv_fitted", "dos", "bonds", "dos_bonds")


class AnswerError(Exception):
    """A user mistake or a failed stage: one line, no traceback."""


@dataclass
class Stage:
    """One stage: the commands it runs (argv lists, ``python`` for this interpreter) and the
    report it leaves (relative to ``--out``)."""

    name: str
    commands: list = field(default_factory=list)
    report: str = ""


def derived_params(base: dict, out: Path, name: str, **changes) -> Path:
    """``base`` with ``changes`` written to ``<out>/params-<name>.json`` (kept: the record of what ran)."""
    path = out / f"params-{name}.json"
    write_json(path, {**base, **changes})
    return path


def plan(name: str, args, base: dict) -> Stage:
    """Stage ``name`` with its commands, planned when it is its turn (what exists then decides:
    a built h5, a started run, the studies that finished before ``side``); params files are written
    here."""
    out, py = args.out, "python"
    data = out / "data.h5"
    k, seeds, draw_seeds = str(args.folds), str(args.seeds), str(args.draw_seeds)
    budget = ["--full"] if args.full else []
    draw_models = ",".join(args.draw_models)
    fam = derived_params(base, out, "family", data_file=str(data), split_by="family")

    def cv_ablation(params: Path, folder: str, n_seeds: str, models: str) -> list:
        return [py, "train.py", "--params", str(params), "--ablation", "--cv", k, "--seeds", n_seeds,
                "--models", models, "--out", str(out / folder), *budget]

    s = Stage(name)
    if name == "build":
        if not data.is_file():
            s.commands.append([py, "-m", "data_prep", "build", "--source", "records", str(args.records),
                               "--out", str(data)])
        s.report = "data.json"
    elif name == "ablation":
        s.commands.append(cv_ablation(fam, "ablation", seeds, ",".join(args.models)))
        s.report = "ablation/cv_ablation.md"
    elif name == "draws":
        for d in args.draws:
            p = derived_params(base, out, f"draw-{d}", data_file=str(data), split_by="family", split_seed=d)
            s.commands.append(cv_ablation(p, f"draw-{d}", draw_seeds, draw_models))
        s.report = "side_by_side.md"
    elif name == "material":
        p = derived_params(base, out, "material", data_file=str(data), split_by="material")
        s.commands.append(cv_ablation(p, "material", draw_seeds, draw_models))
        s.report = "material/cv_ablation.md"
    elif name == "curve":
        s.commands.append([py, "train.py", "--params", str(fam), "--learning-curve", "--cv", k, "--seeds", seeds,
                           "--out", str(out / "curve"), *budget]
                          + (["--models", ",".join(args.curve_models)] if args.curve_models else []))
        s.report = "curve/learning_curve.md"
    elif name == "importance":
        p = derived_params(base, out, "dos-bonds", data_file=str(data), split_by="family", fusion="late",
                           structure_input="bonds", importance_reference="element")
        run = out / "dos-bonds"
        if not (run / "metrics.json").is_file():
            s.commands.append([py, "train.py", "--resume", str(run)] if (run / "params.json").is_file() else
                              [py, "train.py", "--params", str(p), "--out", str(run)]
                              + (["--epochs", str(args.epochs)] if args.epochs else []))
        if not (run / "importance" / "importance.json").is_file():  # written once the analysis is done
            s.commands.append([py, "train.py", "--params", str(p), "--importance", str(run)])
        s.report = "dos-bonds/importance/importance.md"
    elif name == "xtb":
        xtb = out / "xtb.h5"
        if not xtb.is_file():
            s.commands.append([py, "-m", "data_prep", "build", "--source", "embedded", "--out", str(xtb)])
        for split_by in ("family", "material"):
            p = derived_params(base, out, f"xtb-{split_by}", data_file=str(xtb), split_by=split_by)
            s.commands.append(cv_ablation(p, f"xtb-{split_by}", draw_seeds, draw_models))
        s.report = "side_by_side.md"
    elif name == "side":
        studies = [(f"PBE, family, split_seed {base.get('split_seed')}", "ablation")]
        studies += [(f"PBE, family, split_seed {d}", f"draw-{d}") for d in args.draws]
        studies += [("PBE, material", "material"), ("xTB, family", "xtb-family"), ("xTB, material", "xtb-material")]
        found = [f"{label}={out / folder}" for label, folder in studies if (out / folder / "cv_ablation.json").is_file()]
        if found:
            s.commands.append([py, "train.py", "--side-by-side", *found, "--models", draw_models,
                               "--out", str(out / "side_by_side.md")])
        s.report = "side_by_side.md"
    return s


def load_state(out: Path) -> dict:
    path = out / "answer.json"
    if not path.is_file():
        return {"stages": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {"stages": {}}  # a damaged record of progress: the commands themselves resume


def save_state(out: Path, state: dict) -> None:
    write_json(out / "answer.json", state)


def default_call(argv: list, log_path: Path) -> int:
    """Run one command from the repository root with this interpreter, its output to the terminal
    and appended to the log."""
    argv = [sys.executable, *argv[1:]] if argv[0] == "python" else argv
    with open(log_path, "a") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        return proc.wait()


def run(args, call=default_call) -> dict:
    """Run the stages in order; a failed command stops the study with its stage named (its work is kept)."""
    args.out.mkdir(parents=True, exist_ok=True)
    base = json.loads(Path(args.params).read_text())
    state = load_state(args.out)
    log_path = args.out / "answer.log"
    for stage in (plan(name, args, base) for name in args.stages):
        if args.dry_run:
            for c in stage.commands:
                print(shlex.join(c))
            continue
        entry = state["stages"].setdefault(stage.name, {"seconds": 0.0})
        entry.update(state="running", commands=[shlex.join(c) for c in stage.commands], report=stage.report)
        save_state(args.out, state)
        t0 = time.time()
        for c in stage.commands:
            line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {stage.name}: {shlex.join(c)}\n"
            sys.stdout.write(line)
            with open(log_path, "a") as log:
                log.write(line)
            rc = call(c, log_path)
            if rc != 0:
                entry.update(state="failed", seconds=entry["seconds"] + time.time() - t0)
                save_state(args.out, state)
                raise AnswerError(f"stage {stage.name} failed (exit {rc}): {shlex.join(c)}; its finished work is "
                                  f"kept and the same command resumes it (log: {log_path})")
        if stage.name == "build":
            from data_prep.dataset import summary

            write_json(args.out / "data.json", summary(args.out / "data.h5"))
        entry.update(state="done", seconds=entry["seconds"] + time.time() - t0,
                     finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        save_state(args.out, state)
    if not args.dry_run:
        write_text(args.out / "answer.md", index(args.out, state))
    return state


def index(out: Path, state: dict) -> str:
    """``answer.md``: the data, then one line per stage with its report and wall time."""
    lines = ["# Issue 13's answer: the studies\n"]
    data = out / "data.json"
    if data.is_file():
        d = json.loads(data.read_text())
        lines.append(f"Data: `{d['file']}`, {d['n_materials']} materials "
                     f"({', '.join(f'{k} {v}' for k, v in d['materials_per_origin'].items())}), "
                     f"{d['n_samples']} samples, {d['n_families']} families.\n")
    for name in STAGES:
        e = state["stages"].get(name)
        if not e:
            continue
        report = out / e["report"]
        where = f"[{e['report']}]({e['report']})" if report.is_file() else f"{e['report']} (not written)"
        lines.append(f"- **{name}** ({e['state']}, {e['seconds'] / 60:.1f} min): {where}")
        lines.extend(f"  - `{c}`" for c in e.get("commands", []))
    return "\n".join(lines) + "\n"


def _list(text: str) -> list:
    return [t for t in text.split(",") if t]


def parse_args(argv=None):
    ap = OneLineParser(prog="answer.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=Path, default=ROOT / "data_prep" / "embedded" / "spectra_pbe")
    ap.add_argument("--out", type=Path, default=Path("runs") / "answer")
    ap.add_argument("--params", default=str(ROOT / "params.json"))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3, help="network seeds of the ablation and the curve (default 3)")
    ap.add_argument("--draw-seeds", type=int, default=1, help="network seeds of the draws, material and xtb stages "
                                                            "(default 1)")
    ap.add_argument("--draws", type=lambda t: [int(x) for x in _list(t)], default=[89, 90],
                    help="split_seed values of the extra draws (default 89,90)")
    ap.add_argument("--stages", type=_list, default=list(STAGES), help=f"some of {','.join(STAGES)} (default all)")
    ap.add_argument("--models", type=_list, default=list(ANSWER_MODELS),
                    help=f"the ablation stage's models (default {','.join(ANSWER_MODELS)})")
    ap.add_argument("--draw-models", type=_list, default=list(DRAW_MODELS),
                    help=f"models of the draws, material and xtb stages (default {','.join(DRAW_MODELS)})")
    ap.add_argument("--curve-models", type=_list, help="the learning curve's models (default train.py's)")
    ap.add_argument("--epochs", type=int, help="epochs of the importance stage's run (default params')")
    ap.add_argument("--full", action="store_true", help="params' epochs and patience in the studies (default quick)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    bad = [s for s in args.stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage {bad[0]!r}; choose from {', '.join(STAGES)}")
    if not args.records.is_dir() and "build" in args.stages and not (args.out / "data.h5").is_file():
        ap.error(f"records folder not found: {args.records}")
    try:
        if not isinstance(json.loads(Path(args.params).read_text()), dict):
            ap.error(f"params file {args.params} does not hold a JSON object")
    except (OSError, json.JSONDecodeError) as exc:
        ap.error(f"cannot read params file {args.params}: {exc}")
    args.stages = [s for s in STAGES if s in args.stages]  # always in the order of the study
    args.out, args.records = args.out.resolve(), args.records.resolve()  # the commands run from the root
    return args


def main(argv=None, call=default_call) -> int:
    args = parse_args(argv)

    def work() -> int:
        run(args, call)
        return 0

    return error_tail("answer", work, (AnswerError, OSError), "interrupted; finished work is kept, the same command resumes")


if __name__ == "__main__":
    sys.exit(main())
