"""params.json: the rules of every key and the ONE check of a whole params file.

``PARAM_RULES`` maps each key to (check, what the value must be); ``validate_params`` applies them
(the first problem raises ``TrainError`` naming the key) and ``load_params`` reads and checks a
file. The ``data`` section's rules are ``data_prep.build.data_section_problem`` (``python -m
data_prep build --params`` reads the same section; data_prep imports nothing of dosnet_bv).
Also: the names shared by the training modules (targets, fusions, splits) and ``TrainError``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from data_prep.build import DATA_SECTION_RULE, TRAIN_READ_KEYS, data_section_problem

#: The checkout root: the folder of train.py, net.py and params.json.
ROOT = Path(__file__).resolve().parent.parent
SPLITS = ("train", "val", "test")
# Names net.py accepts. Repeated here so that params are checked before TensorFlow is imported
# (its import prints to stderr); tests/test_bv_model.py checks they equal net.py's.
BV_TARGETS = ("bvs_vu", "bvs_deviation_vu", "valence", "migration_e1d_ev", "migration_e2d_ev", "migration_e3d_ev")
#: Per-material targets carried on the sites of a material's mobile ion (NaN elsewhere): samples
#: without a value are dropped when they are trained on, and evaluation averages the predictions
#: of one material's sites (``metrics.material_metrics``). data_prep.h5schema.MIGRATION_TARGETS.
MIGRATION_TARGETS = ("migration_e1d_ev", "migration_e2d_ev", "migration_e3d_ev")
FUSIONS = ("none", "late", "early", "structure_only")
#: What the structure branch reads (every fusion but none): the structure vector, the bond table
#: (data_prep.bonds, the bond branch of net.py) or both. Equal to net.STRUCTURE_INPUTS.
STRUCTURE_INPUTS = ("vector", "bonds", "both")
LR_SCHEDULES = ("dosnet_step", "constant", "cosine")
LOSSES = ("log_cosh", "mse", "mae")


class TrainError(Exception):
    """A user-facing problem (bad params, bad data file): reported on one line, no traceback."""


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


#: Seeds go to numpy, Python and TensorFlow: 0 <= seed < 2**31 leaves room for the per-fold and
#: per-job offsets added to them (numpy refuses negatives, TF's seed is 32 bits).
SEED_LIMIT = 2 ** 31
#: Adam diverges long before this; above it a learning rate is a typo.
MAX_LEARNING_RATE = 1.0


def _seed(v) -> bool:
    return _int(v) and 0 <= v < SEED_LIMIT - 100_000


def _split_ok(v) -> bool:
    if v == "stored":
        return True
    return (isinstance(v, list) and len(v) == 3 and all(_num(x) and x >= 0 for x in v)
            and abs(sum(v) - 1) < 1e-6 and v[0] > 0 and v[1] > 0)


def _zero_tail_ok(v) -> bool:
    return v is None or (isinstance(v, list) and len(v) == 2 and all(_int(x) and x >= 0 for x in v) and v[0] <= v[1])


#: Keys of the ``data`` section that say how train.py reads the file (``dosnet_bv.streaming``). The
#: section may also hold ``python -m data_prep build`` keys (grid, n_neighbours, ...): build reads
#: those and ignores these. Its rules live with build's (``data_prep.build.data_section_problem``):
#: one check for both readers of the section.
DATA_READ_KEYS = TRAIN_READ_KEYS
DISTRIBUTE = ("none", "mirrored", "multi_worker")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


#: Keys the ``tune`` section's search space may vary (``dosnet_bv.tune``) and how: "float" and
#: "int" keys take a range ``{"low", "high"[, "log"]}`` or ``{"choices": [...]}``, the others
#: choices only. Keys that change what the loss measures (targets, loss, weights, scaling) are not
#: tunable: the objective compares validation losses across trials.
TUNABLE = {"learning_rate": "float", "dropout": "float", "batch_size": "int", "early_channels": "int",
           "fusion": None, "structure_units": None, "structure_families": None, "lr_schedule": None,
           "structure_input": None, "bond_rbf": "int", "bond_embedding": "int", "bond_units": None,
           "augment_shift_ev": "float", "dos_scaling": None, "dos_filters": None}
TUNE_PRUNERS = ("median", "halving", "none")
#: How the DOS input is standardised (``dosnet_bv.scalers``; training rows only): ``channel`` one
#: mean and scale per channel over all energies (upstream's StandardScaler on the channel axis),
#: ``point`` one per energy point and channel, ``none`` raw states/eV.
DOS_SCALINGS = ("channel", "point", "none")
#: the largest energy-shift augmentation (eV): beyond it a shifted band edge is another material
MAX_AUGMENT_SHIFT_EV = 2.0
TUNE_SECTION_RULE = ('an object {"trials", "folds", "epochs", "patience", "pruner", "space"} '
                     '(docs/training.md#hyperparameter-search)')


def tune_section_problem(v) -> str | None:
    """What is wrong with a ``tune`` section (None when it is fine): the search settings and the
    space, each range non-empty and each bound or choice a valid value of its params key."""
    if not isinstance(v, dict):
        return f"must be {TUNE_SECTION_RULE}"
    rules = {"trials": (lambda x: _int(x) and x >= 1, "a positive integer (trials when --trials is not given)"),
             "folds": (lambda x: _int(x) and x >= 2, "an integer >= 2 (family-grouped folds of the training data)"),
             "epochs": (lambda x: _int(x) and x >= 1, "a positive integer (maximum epochs per fold)"),
             "patience": (lambda x: _int(x) and x >= 0, "a non-negative integer (early stopping; 0: none)"),
             "pruner": (lambda x: x in TUNE_PRUNERS, "one of " + ", ".join(TUNE_PRUNERS)),
             "space": (lambda x: isinstance(x, dict) and len(x) > 0, "a non-empty object {params key: range or choices}")}
    unknown = sorted(set(v) - set(rules))
    if unknown:
        return f"unknown key {unknown[0]!r} (known: {', '.join(rules)})"
    for key, (ok, what) in rules.items():
        if key not in v:
            return f"missing key {key!r} ({what})"
        if not ok(v[key]):
            return f"{key!r} must be {what}, got {json.dumps(v[key])}"
    for name, spec in v["space"].items():
        problem = _space_problem(name, spec)
        if problem:
            return f"space {name!r}: {problem}"
    return None


def _space_problem(name: str, spec) -> str | None:
    if name not in TUNABLE:
        return f"unknown parameter (tunable: {', '.join(TUNABLE)})"
    ok, what = PARAM_RULES[name]
    if isinstance(spec, dict) and set(spec) == {"choices"}:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            return "'choices' must be a non-empty list"
        bad = next((c for c in choices if not ok(c)), _NONE)
        if bad is not _NONE:
            return f"choice {json.dumps(bad)} is not {what}"
        if len({json.dumps(c) for c in choices}) != len(choices):
            return "'choices' has duplicates"
        return None
    kind = TUNABLE[name]
    if kind is None:
        return 'takes {"choices": [...]} only'
    if not isinstance(spec, dict) or not {"low", "high"} <= set(spec) <= {"low", "high", "log"}:
        return 'must be {"low": ..., "high": ..., "log": false} or {"choices": [...]}'
    lo, hi, log = spec["low"], spec["high"], spec.get("log", False)
    num = _int if kind == "int" else _num
    if not (num(lo) and num(hi)):
        return f"'low' and 'high' must be {'integers' if kind == 'int' else 'numbers'}"
    if lo >= hi:
        return f"empty or inverted range [{lo}, {hi}] (low must be below high)"
    if not isinstance(log, bool):
        return "'log' must be true or false"
    if log and lo <= 0:
        return f"a log range needs low > 0, got {lo}"
    for b in (lo, hi):
        if not ok(b):
            return f"bound {b} is not {what}"
    return None


_NONE = object()


#: key -> (check, what the value must be). params.json must hold exactly these keys.
PARAM_RULES: dict = {
    "data_file": (lambda v: isinstance(v, str) and v != "", "a path (string)"),
    "targets": (lambda v: isinstance(v, list) and v and all(isinstance(t, str) for t in v) and len(set(v)) == len(v),
                "a non-empty list of distinct target names"),
    "loss_weights": (lambda v: isinstance(v, dict) and all(_num(w) and w >= 0 for w in v.values()),
                     "an object {target: non-negative number}"),
    "target_scaling": (lambda v: v in ("standard", "none"), "'standard' or 'none'"),
    "fusion": (lambda v: v in FUSIONS, "one of " + ", ".join(FUSIONS)),
    "structure_families": (lambda v: isinstance(v, list) and all(isinstance(f, str) for f in v) and len(set(v)) == len(v),
                           "a list of distinct structure feature family names"),
    "structure_units": (lambda v: isinstance(v, list) and v and all(_int(u) and u > 0 for u in v),
                        "a non-empty list of positive integers"),
    "early_channels": (lambda v: _int(v) and v > 0, "a positive integer"),
    "structure_input": (lambda v: v in STRUCTURE_INPUTS,
                        "one of " + ", ".join(STRUCTURE_INPUTS) + " (what the structure branch reads)"),
    "bond_rbf": (lambda v: _int(v) and v >= 2, "an integer >= 2 (Gaussian centres of the bond distances)"),
    "bond_cutoff_ang": (lambda v: _num(v) and math.isfinite(v) and v > 0,
                        "a positive number (Angstrom; at most the data file's bond cutoff)"),
    "bond_embedding": (lambda v: _int(v) and v > 0, "a positive integer (width of the element embedding)"),
    "bond_units": (lambda v: isinstance(v, list) and v and all(_int(u) and u > 0 for u in v),
                   "a non-empty list of positive integers (the per-bond layers' widths)"),
    "dos_scaling": (lambda v: v in DOS_SCALINGS, "one of " + ", ".join(DOS_SCALINGS) + " (standardise the DOS per "
                    "channel, per energy point and channel, or not at all)"),
    "dos_filters": (lambda v: isinstance(v, list) and len(v) == 5 and all(_int(u) and 0 < u <= 1024 for u in v),
                    "5 positive integers (at most 1024): the widths of the DOS featurizer's five convolutions"),
    "augment_shift_ev": (lambda v: _num(v) and math.isfinite(v) and 0 <= v <= MAX_AUGMENT_SHIFT_EV,
                         f"a number of eV in [0, {MAX_AUGMENT_SHIFT_EV:g}] (each training sample's DOS shifted "
                         f"by a random amount within +-this every epoch; 0: off)"),
    "dropout": (lambda v: _num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "epochs": (lambda v: _int(v) and v > 0, "a positive integer"),
    "batch_size": (lambda v: _int(v) and v > 0, "a positive integer"),
    "data": (lambda v: data_section_problem(v) is None, DATA_SECTION_RULE),
    "distribute": (lambda v: v in DISTRIBUTE, "one of " + ", ".join(DISTRIBUTE)),
    "precision": (lambda v: v in PRECISIONS, "one of " + ", ".join(PRECISIONS)),
    "loss": (lambda v: v in LOSSES, "one of " + ", ".join(LOSSES)),
    "optimizer": (lambda v: v == "adam", "'adam'"),
    "learning_rate": (lambda v: _num(v) and math.isfinite(v) and 0 < v <= MAX_LEARNING_RATE,
                      f"a positive number at most {MAX_LEARNING_RATE:g}"),
    "lr_schedule": (lambda v: v in LR_SCHEDULES, "one of " + ", ".join(LR_SCHEDULES)),
    "early_stopping_patience": (lambda v: _int(v) and v >= 0, "a non-negative integer (0: no early stopping)"),
    "split": (_split_ok, "'stored' or three fractions [train, val, test] summing to 1"),
    "split_seed": (_seed, f"an integer in [0, {SEED_LIMIT - 100_000}]"),
    "split_by": (lambda v: v in SPLIT_BY, "'family' (no substitution/prototype family on two sides) or 'material'"),
    "seed": (_seed, f"an integer in [0, {SEED_LIMIT - 100_000}]"),
    "cv_folds": (lambda v: _int(v) and v >= 2, "an integer >= 2"),
    "cv_val_fraction": (lambda v: _num(v) and 0 < v < 1, "a number in (0, 1)"),
    "channels": (lambda v: _int(v) and v > 0, "a positive integer"),
    "length": (lambda v: _int(v) and v > 0, "a positive integer"),
    "n_neighbours": (lambda v: _int(v) and v >= 0, "a non-negative integer"),
    "zero_tail": (_zero_tail_ok, "null or [start, stop] grid indices"),
    "importance_window_ev": (lambda v: _num(v) and v > 0, "a positive number (eV)"),
    "importance_step_ev": (lambda v: _num(v) and v > 0, "a positive number (eV)"),
    "importance_repeats": (lambda v: _int(v) and v >= 2, "an integer >= 2"),
    "importance_ig_steps": (lambda v: _int(v) and v >= 1, "a positive integer"),
    "importance_reference": (lambda v: v in ("mean", "element"), "'mean' (the training rows' mean DOS) or 'element' "
                             "(the mean DOS of the training rows with the sample's centre element)"),
    "out_dir": (lambda v: isinstance(v, str) and v != "", "a folder (string)"),
    "tune": (lambda v: tune_section_problem(v) is None, TUNE_SECTION_RULE),
}


def load_params(path) -> dict:
    """Read and check a params.json (``validate_params``)."""
    path = Path(path)
    try:
        params = json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainError(f"params file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainError(f"cannot read params file {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise TrainError(f"params file {path} is not valid JSON: {exc}") from None
    if not isinstance(params, dict):
        raise TrainError(f"params file {path} must hold a JSON object")
    return validate_params({**ADDED_KEYS, **params})


def validate_params(params: dict) -> dict:
    """Check every key against ``PARAM_RULES``; the first problem raises ``TrainError`` naming the key."""
    unknown = sorted(set(params) - set(PARAM_RULES))
    if unknown:
        raise TrainError(f"params: unknown key {unknown[0]!r} (known keys: {', '.join(PARAM_RULES)})")
    for key, (ok, what) in PARAM_RULES.items():
        if key not in params:
            raise TrainError(f"params: missing key {key!r} ({what})")
        if key == "tune" and tune_section_problem(params[key]):
            raise TrainError(f"params: 'tune': {tune_section_problem(params[key])}")
        if not ok(params[key]):
            raise TrainError(f"params: {key!r} must be {what}, got {json.dumps(params[key])}")
    for key in ("targets", "loss_weights"):
        bad = [t for t in params[key] if t not in BV_TARGETS]
        if bad:
            raise TrainError(f"params: {key!r} has unknown target {bad[0]!r}; expected some of {', '.join(BV_TARGETS)}")
    if params["fusion"] != "none" and params["structure_input"] != "bonds" and not params["structure_families"]:
        raise TrainError(f"params: 'structure_families' is empty but fusion {params['fusion']!r} with structure_input "
                         f"{params['structure_input']!r} needs the structure vector")
    return params


#: Keys added after run folders were first written, with the value that gives the behaviour of
#: the runs made before them: ``load_params`` fills them into a params file that lacks them, so
#: an older run folder still predicts (``--predict``, ``python -m dosnet_bv predict``).
ADDED_KEYS = {"structure_input": "vector", "bond_rbf": 32, "bond_cutoff_ang": 6.0, "bond_embedding": 16,
              "bond_units": [64, 64], "augment_shift_ev": 0.0, "dos_scaling": "channel",
              "dos_filters": [50, 75, 100, 125, 150], "importance_reference": "mean"}


#: How the split and every cross-validation group samples: by family (data_prep.families) or material.
SPLIT_BY = ("family", "material")

#: Units of each target in tables and plots.
TARGET_UNITS = {"bvs_vu": "vu", "bvs_deviation_vu": "vu", "valence": "", **{t: "eV" for t in MIGRATION_TARGETS}}


def resolve_data_file(path, what: str = "params key 'data_file' or --data") -> Path:
    """``path`` as given, or relative to the checkout root when only that exists; a missing file
    raises ``TrainError`` (with the ``make data`` hint for the default file)."""
    p = Path(path)
    if not p.is_absolute() and not p.exists() and (ROOT / p).exists():
        p = ROOT / p
    if not p.is_file():
        hint = "; build it with: make data" if str(path) == "data/embedded.h5" else ""
        raise TrainError(f"data file not found: {path} ({what}){hint}")
    return p
