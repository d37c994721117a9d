"""Resuming long work (``--ablation``, ``--learning-curve``, ``--cv``): every finished job leaves
its result as one JSON file in the run folder's ``results/`` (``ResultStore``), a rerun into the
same folder loads it instead of computing it again, a damaged leftover is reported on one line
and recomputed, and a config file refuses a rerun with other settings (``check_resume``)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dosnet_bv.outputs import Log, write_json
from dosnet_bv.params import TrainError

#: What ``ResultStore.get``'s ``parse`` may raise on a leftover that is valid JSON but not a
#: result of the expected form (a missing key, a wrong length): it is then damaged, not fatal.
PARSE_ERRORS = (KeyError, IndexError, TypeError, ValueError)


def read_leftover(path: Path, log: Log):
    """A JSON file an earlier run left, or None when it is damaged (e.g. truncated by a crash
    before writes were atomic): then one log line says so and the caller recomputes it."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        log(f"{path} is damaged ({exc.__class__.__name__}: {exc}); recomputing it")
        return None


def check_resume(path: Path, config: dict, log: Log) -> None:
    """Write the run's config, or check that an existing run folder was made with the same one
    (a damaged config file is reported and written anew). A params key added since that run
    (``params.ADDED_KEYS``) counts as its default there, so an upgrade does not strand a study."""
    old = read_leftover(path, log) if path.is_file() else None
    if old is not None and not isinstance(old, dict):
        log(f"{path} is damaged (not a JSON object); writing it anew")
        old = None
    new = json.loads(json.dumps(config))
    if old is not None and isinstance(old.get("params"), dict) and isinstance(new.get("params"), dict):
        from dosnet_bv.params import ADDED_KEYS  # a key added since: the old runs had its default

        added = {k: v for k, v in json.loads(json.dumps(ADDED_KEYS)).items() if k in new["params"]}
        old["params"] = {**added, **old["params"]}
    if old is None:
        write_json(path, config)
    elif old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise TrainError(f"{path.parent} holds a run with other settings ({', '.join(diff)}); "
                         f"choose a new --out to start afresh")


@dataclass(frozen=True)
class Job:
    """One job's result (``value``, as ``ResultStore.get``'s ``parse`` made it) and whether it
    was loaded from an earlier run's file (``resumed``) rather than computed now."""

    value: Any
    resumed: bool


class ResultStore:
    """One JSON file per finished job, ``<folder>/<name>.json``, written atomically when the job
    ends: a job found there is not run again."""

    def __init__(self, folder: Path, log: Log):
        self.folder, self.log = Path(folder), log
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def get(self, name: str, compute: Callable[[], dict], parse: Callable[[Any], Any] = lambda raw: raw) -> Job:
        """The result of job ``name``: its file's content when a usable one is there, else
        ``compute()``, saved first. ``parse`` turns the JSON content into the value returned (and
        checks it: a ``PARSE_ERRORS`` exception marks the file damaged: one log line, recomputed)."""
        path = self.path(name)
        raw = read_leftover(path, self.log) if path.is_file() else None
        if raw is not None:
            try:
                return Job(parse(raw), True)
            except PARSE_ERRORS as exc:
                self.log(f"{path} is damaged (not a result of this run: {exc.__class__.__name__}: {exc}); "
                         f"recomputing it")
        raw = compute()
        write_json(path, raw)
        return Job(parse(raw), False)
