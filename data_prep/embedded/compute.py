"""Compute the embedded dataset: GFN1-xTB spectra of many structures, resumable, time-limited.

``compute_embedded(entries, out_dir)`` runs :func:`data_prep.embedded.xtb.run_xtb` on every
entry in a pool of worker processes (``spawn`` context, one BLAS/OpenMP thread each: the
variables are set in the environment the workers start with, so they hold before numpy or tblite
load). Each worker is a long-lived process fed one task at a time through a pipe; the parent
keeps the clock, and a task that runs past ``time_limit_s`` of its worker's CPU time (or
``WALL_LIMIT_FACTOR`` times that on the wall clock) gets its worker killed (tblite
cannot be interrupted from inside) and replaced, and the material is recorded as failed with
reason ``timeout``. A worker that dies (segfault, out of memory) is replaced the same way.

Cache and resume: a finished material is written by its worker as ``out_dir/<material_id>.npz``
(``MaterialRecord.save(weight_dtype=np.float16)``: temporary file + rename, so a killed or
interrupted run never leaves a half-written record). Materials with a record are skipped;
failures go to ``out_dir/failures.json`` (rewritten atomically after each one) and are not
retried unless ``retry_failed=True``. Ctrl-C stops the workers and re-raises
``KeyboardInterrupt``; everything finished is already on disk.

Order: cheapest first (estimated cost = (AOs of the supercell)³, the scaling of the SCF's
diagonalisations). An interrupted or time-boxed run then has finished as many materials as
possible, the quick ones surface setup problems early, and the expensive tail (which a time
limit bounds) comes last. The progress bar counts estimated cost, not materials, so its rate
and ETA stay honest despite the ordering; the postfix shows materials done and failed.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections import Counter
from contextlib import contextmanager
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np

from data_prep.embedded.structures import ANION_ELEMENTS, StructureEntry, bv_anion_reason  # noqa: F401
from data_prep.embedded.xtb import (DEFAULT_ETEMP_K, MAX_SUPERCELL_AO, MAX_SUPERCELL_ATOMS, METHOD,
                                    MIN_LENGTH_ANG, single_thread_env)
from data_prep.records import MaterialRecord, atomic_write_bytes

FAILURES_FILE = "failures.json"


# --------------------------------------------------------------------------------------------
# one material (runs in a worker)
def make_record(entry: StructureEntry, min_length_ang: float = MIN_LENGTH_ANG,
                etemp_k: float = DEFAULT_ETEMP_K, max_atoms: int | None = MAX_SUPERCELL_ATOMS,
                max_ao: int | None = MAX_SUPERCELL_AO, compact_kwargs: dict | None = None) -> MaterialRecord:
    """GFN1-xTB record of one entry, compacted (see ``xtb.compact``), with provenance."""
    from data_prep.embedded.xtb import compact, run_xtb

    result = run_xtb(entry.structure, min_length_ang, etemp_k, max_atoms, max_ao)
    spectrum, summary = compact(result.spectrum, **(compact_kwargs or {}))
    provenance = dict(entry.provenance or {})
    provenance["calculation"] = result.info
    provenance["compaction"] = summary
    record = MaterialRecord(material_id=entry.material_id, formula=entry.formula, origin=entry.origin,
                            method=METHOD, structure=entry.structure, spectrum=spectrum, provenance=provenance)
    record.validate()
    return record




def bv_scope_reason(entry: StructureEntry) -> str | None:
    """Why bond valence theory does not fit ``entry`` (an anion outside ``ANION_ELEMENTS``: O, F, Cl,
    Br, I, S, Se, Te, N), or None. The collection already drops such structures
    (``structures.bv_anion_reason``); this guards entries from older structure files."""
    valences = entry.provenance.get("bv_valences")
    if not valences:
        return None
    return bv_anion_reason(entry.structure, valences)


def make_record_pbe(entry: StructureEntry, compact_kwargs: dict | None = None) -> MaterialRecord:
    """PBE record of one entry: CHGNet relaxation first when it is hypothetical, then GPAW (see pbe.py)."""
    from data_prep.embedded import pbe
    from data_prep.embedded.xtb import compact

    reason = bv_scope_reason(entry)
    if reason:
        raise pbe.PBEError(reason)
    provenance = dict(entry.provenance or {})
    structure = entry.structure
    if entry.origin == "substituted":
        from data_prep.embedded.relax import relax

        relaxed = relax(structure, entry.material_id, valences=provenance.get("bv_valences"))
        structure = relaxed.structure
        if relaxed.valences is not None:  # symmetrising may reorder (or reduce) the sites
            provenance["bv_valences"] = relaxed.valences
        provenance["n_sites"] = len(structure)
        provenance["relaxation"] = relaxed.info
        provenance["relaxed"] = True
        provenance["note"] = "hypothetical, relaxed with CHGNet"
    structure, snapped = pbe.gpaw_ready(structure)
    if snapped:
        provenance["cell_snapped"] = snapped
    result = pbe.run_pbe(structure, provenance.get("bv_valences"))
    spectrum, summary = compact(result.spectrum, **(compact_kwargs or pbe.COMPACT))
    provenance["calculation"] = result.info
    provenance["compaction"] = summary
    record = MaterialRecord(material_id=entry.material_id, formula=entry.formula, origin=entry.origin,
                            method=pbe.METHOD, structure=structure, spectrum=spectrum, provenance=provenance)
    record.validate()
    return record


def _worker_main(conn, settings: dict) -> None:
    """Worker loop: receive (entry, path), write the record, answer ('ok'|'fail', id, info)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    from data_prep.records import RecordError

    method = settings.get("method", "xtb")
    if method == "pbe":
        from data_prep.embedded.pbe import PBEError as MethodError
        from data_prep.embedded.relax import RelaxError
        known = (MethodError, RelaxError, RecordError)
    else:
        from data_prep.embedded.xtb import XTBError  # loads tblite, with the one-thread environment
        known = (XTBError, RecordError)

    conn.send(("ready", None, None))
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        entry, path = task
        t0 = time.perf_counter()
        try:
            if method == "pbe":
                record = make_record_pbe(entry, settings.get("compact_kwargs"))
            else:
                record = make_record(entry, settings["min_length_ang"], settings["etemp_k"], settings["max_atoms"],
                                     settings["max_ao"], settings.get("compact_kwargs"))
            record.provenance["calculation"]["seconds_total"] = round(time.perf_counter() - t0, 3)
            record.save(path, weight_dtype=np.float16)
            info = {"seconds": round(time.perf_counter() - t0, 3), "bytes": os.path.getsize(path),
                    "n_sites": len(record.structure)}
            conn.send(("ok", entry.material_id, info))
        except known as exc:
            conn.send(("fail", entry.material_id, {"reason": f"{type(exc).__name__}: {exc}",
                                                   "seconds": round(time.perf_counter() - t0, 3)}))
        except Exception as exc:  # anything else is a bug or a bad structure; keep going
            tb = traceback.format_exc(limit=3).strip().splitlines()[-1]
            conn.send(("fail", entry.material_id, {"reason": f"{type(exc).__name__}: {exc}", "where": tb,
                                                   "seconds": round(time.perf_counter() - t0, 3)}))


# --------------------------------------------------------------------------------------------
# process management
@contextmanager
def _environment(extra: dict):
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


#: a task's wall-clock limit, in multiples of its CPU-time limit: a worker that stops using the CPU
#: (blocked, swapping) is still stopped
WALL_LIMIT_FACTOR = 4.0


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (``/proc/<pid>/stat``, Linux); None
    where that cannot be read (then the limit falls back to the wall clock)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()  # the name may hold spaces; fields 3.. follow it
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class _Worker:
    def __init__(self, ctx, settings: dict):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, settings), daemon=True)
        with _environment(single_thread_env()):
            self.proc.start()
        child.close()
        self.ready = False
        self.task: StructureEntry | None = None
        self.started = 0.0
        self.started_wall = 0.0  # time.time() at assignment: tells a record this task wrote from an older one

    def assign(self, entry: StructureEntry, path: Path) -> None:
        self.conn.send((entry, str(path)))
        self.task, self.started, self.started_wall = entry, time.monotonic(), time.time()
        self.cpu0 = _cpu_seconds(self.proc.pid)

    def used(self) -> float:
        """Seconds the task has used against its limit: the worker's CPU time since the task was
        assigned (one thread per worker: as fast as the wall clock on a free core, slower when
        other work shares the cores, so a busy machine does not turn into timeouts), or the wall
        clock where the CPU time cannot be read."""
        now = _cpu_seconds(self.proc.pid)
        if now is None or self.cpu0 is None:
            return time.monotonic() - self.started
        return now - self.cpu0

    def over(self, limit_s: float) -> bool:
        return self.used() > limit_s or time.monotonic() - self.started > WALL_LIMIT_FACTOR * limit_s

    def stop(self, kill: bool = False) -> None:
        if self.proc.is_alive():
            if kill:
                self.proc.terminate()
            else:
                try:
                    self.conn.send(None)
                except (OSError, BrokenPipeError):
                    pass
            self.proc.join(2.0 if kill else 10.0)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(2.0)
        self.conn.close()


# --------------------------------------------------------------------------------------------
# cache
def read_failures(out_dir) -> dict:
    """``failures.json`` of ``out_dir`` as {material_id: {"reason": ..., ...}} (empty if absent)."""
    path = Path(out_dir) / FAILURES_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    return dict(data.get("failures", data) if isinstance(data, dict) else {})


#: written beside the records while ``compute_embedded`` runs (git-ignored): what is in flight, what is done
PROGRESS_FILE = ".compute.progress.json"


def _write_progress(out_dir: Path, summary: dict, workers: list, queue: list, recent: list, t_wall0: float,
                    state: str = "running") -> None:
    """``PROGRESS_FILE``: the run's counts, the materials being computed (with their elapsed
    seconds) and the last ones finished, rewritten atomically at every start and finish, so that
    ``cat`` (or ``watch``) tells what a background run is doing without its log."""
    now = time.time()
    body = {"state": state, "method": summary["method"], "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_wall0)),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)),
            "todo": summary["n_todo"], "computed": summary["n_computed"], "failed": summary["n_failed"],
            "queued": len(queue),
            "in_flight": [{"material_id": w.task.material_id, "formula": w.task.formula,
                           "n_sites": len(w.task.structure), "elapsed_s": round(now - w.started_wall, 1)}
                          for w in workers if w.task is not None],
            "last_finished": recent[-10:]}
    atomic_write_bytes(out_dir / PROGRESS_FILE, (json.dumps(body, indent=1) + "\n").encode())


def _write_failures(out_dir: Path, failures: dict) -> None:
    body = {"failures": {k: failures[k] for k in sorted(failures)}}
    atomic_write_bytes(out_dir / FAILURES_FILE, (json.dumps(body, indent=1) + "\n").encode())


def estimated_cost(entry: StructureEntry, min_length_ang: float, max_atoms: int | None,
                   max_ao: int | None = None) -> float:
    """(AOs of the GFN1-xTB supercell)³, a proxy for the SCF time; inf if it cannot run."""
    from data_prep.embedded.xtb import XTBError, n_ao_of_element, supercell_multiplicity

    s = entry.structure
    try:
        n_ao_cell = sum(n_ao_of_element(int(z)) for z in s.atomic_numbers)
        n_ao = math.prod(supercell_multiplicity(s.lattice.matrix, len(s), min_length_ang, max_atoms, n_ao_cell,
                                                max_ao)) * n_ao_cell
    except (XTBError, ValueError, AttributeError):
        return math.inf
    return float(n_ao) ** 3


def estimated_cost_pbe(entry: StructureEntry) -> float:
    """(sites)³ × SCF k-points: a proxy for the LCAO time (diagonalisations dominate)."""
    from data_prep.embedded.pbe import SCF_KDENSITY

    s = entry.structure
    try:
        from ase.calculators.calculator import kptdensity2monkhorstpack
        from pymatgen.io.ase import AseAtomsAdaptor

        nk = math.prod(int(x) for x in kptdensity2monkhorstpack(AseAtomsAdaptor.get_atoms(s), SCF_KDENSITY,
                                                                 even=False))
    except Exception:  # noqa: BLE001 - ASE missing or odd cell: sites alone
        nk = 1
    return float(len(s)) ** 3 * nk


def family_balanced_order(entries: list[StructureEntry], costs: dict,
                          done_per_parent: dict | None = None) -> list[StructureEntry]:
    """Real structures first (cheapest first), then substituted ones round-robin over their parents.

    In round r every parent contributes its r-th substitution (in the collection's rank order),
    cheapest first within the round: a partial set then has every family represented as evenly
    as possible, which is what a family-grouped evaluation needs. ``done_per_parent``: substituted
    records each parent already has (a resumed run), so that a parent ahead after an interrupted
    round does not move ahead again.
    """
    done_per_parent = done_per_parent or {}
    real = sorted((e for e in entries if e.origin != "substituted"), key=lambda e: (costs[e.material_id],
                                                                                      e.material_id))
    by_parent: dict[str, list[StructureEntry]] = {}
    for e in entries:
        if e.origin == "substituted":
            by_parent.setdefault(str(e.provenance.get("parent_id", e.material_id)), []).append(e)
    rounds: dict[int, list[StructureEntry]] = {}
    for subs in by_parent.values():
        subs.sort(key=lambda e: (e.provenance.get("rank_in_parent", 0), e.material_id))
        start = int(done_per_parent.get(str(subs[0].provenance.get("parent_id", subs[0].material_id)), 0))
        for r, e in enumerate(subs, start=start):
            rounds.setdefault(r, []).append(e)
    ordered = list(real)
    for r in sorted(rounds):
        ordered += sorted(rounds[r], key=lambda e: (costs[e.material_id], e.material_id))
    return ordered


def _stop_on_sigterm():
    """SIGTERM (``kill PID``) stops a run like Ctrl-C: the workers are killed with it (left alone,
    a spawned worker outlives its parent and computes on). Returns the previous handler, or None
    off the main thread (signals cannot be set there)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # POSIX: a job put in the background (`cmd &`) by a shell without job control, e.g. inside
        # a script or `bash -c`, starts with SIGINT ignored, and Python then installs no handler
        print(f"note: this run ignores Ctrl-C/SIGINT (started in the background by a non-interactive shell);"
              f" stop it with `kill {os.getpid()}`", flush=True)
    return signal.signal(signal.SIGTERM, handler)


# --------------------------------------------------------------------------------------------
def pbe_record_outdated(path) -> bool:
    """A PBE record of an outdated recipe (``pbe.outdated_recipe``: another projection or setting,
    or a skewed cell not Niggli-reduced), or one that cannot be read: ``compute_embedded``
    computes it again."""
    from data_prep.embedded import pbe

    try:
        record = MaterialRecord.from_npz(path)
    except Exception:  # noqa: BLE001 - an unreadable record is recomputed, whatever the reason
        return True
    return pbe.outdated_recipe(record.provenance, record.structure) is not None


def pbe_order(entries: list[StructureEntry], todo: list[StructureEntry], out_dir: Path,
              costs: dict | None = None) -> list[StructureEntry]:
    """``todo`` in the order a PBE run computes it (``family_balanced_order``, counting the
    substituted records each parent already has in ``out_dir``)."""
    costs = costs if costs is not None else {e.material_id: estimated_cost_pbe(e) for e in todo}
    queued = {e.material_id for e in todo}
    done_per_parent = Counter(str(e.provenance.get("parent_id", e.material_id)) for e in entries
                              if e.origin == "substituted" and e.material_id not in queued
                              and (out_dir / f"{e.material_id}.npz").exists())
    return family_balanced_order(todo, costs, done_per_parent)


def select_todo(entries: list[StructureEntry], out_dir: Path, failures: dict, retry_failed: bool = False,
                method: str = "xtb") -> tuple[list[StructureEntry], int, int, int]:
    """(entries to compute, n cached, n skipped as failed before, n outdated PBE records among the
    entries to compute); an outdated record stays on disk until its new one replaces it."""
    todo, n_cached, n_skip_failed, n_outdated = [], 0, 0, 0
    for e in entries:
        path = out_dir / f"{e.material_id}.npz"
        if path.exists() and method == "pbe" and pbe_record_outdated(path):
            if e.material_id in failures and not retry_failed:  # its recompute failed before
                n_skip_failed += 1
                continue
            n_outdated += 1
            todo.append(e)
        elif path.exists():
            n_cached += 1
        elif e.material_id in failures and not retry_failed:
            n_skip_failed += 1
        else:
            todo.append(e)
    return todo, n_cached, n_skip_failed, n_outdated


def compute_embedded(entries: list[StructureEntry], out_dir, n_procs: int = 2, time_limit_s: float = 600,
                     progress: bool = True, retry_failed: bool = False, min_length_ang: float = MIN_LENGTH_ANG,
                     etemp_k: float = DEFAULT_ETEMP_K, max_atoms: int | None = MAX_SUPERCELL_ATOMS,
                     max_ao: int | None = MAX_SUPERCELL_AO, compact_kwargs: dict | None = None,
                     method: str = "xtb") -> dict:
    """Compute (or resume computing) records for ``entries`` into ``out_dir``.

    ``method``: ``"pbe"`` (GPAW PBE, CHGNet-relaxed substituted structures; the embedded dataset's
    method) or ``"xtb"`` (GFN1-xTB, the earlier one). PBE runs go real structures first, then
    substituted ones balanced over families (``family_balanced_order``); xTB runs cheapest first.

    PBE records made with an outdated recipe (``pbe_record_outdated``) are computed again.
    Returns a summary: counts (``n_entries``, ``n_cached``, ``n_skipped_failed``, ``n_outdated``,
    ``n_computed``, ``n_failed``), ``failed`` ({id: reason} of this run), ``seconds``,
    ``seconds_per_material`` and ``bytes_per_material`` (this run's records).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(out_dir):
        return _compute_embedded(entries, out_dir, n_procs, time_limit_s, progress, retry_failed, min_length_ang,
                                 etemp_k, max_atoms, max_ao, compact_kwargs, method)


LOCK_FILE = ".compute.lock"


@contextmanager
def folder_lock(out_dir: Path):
    """One ``compute-embedded`` run per output folder: a second one would delete the first's
    unfinished temporary files and overwrite its ``failures.json``. OSError (one line from the CLI)
    when another run holds the folder; the lock goes with the process, so a killed run leaves none."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    fh = open(out_dir / LOCK_FILE, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise OSError(f"another compute-embedded run (pid {holder}) is writing into {out_dir}; wait for it, "
                          "or give each --shard its own --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        fh.close()


def _compute_embedded(entries, out_dir: Path, n_procs, time_limit_s, progress, retry_failed, min_length_ang,
                      etemp_k, max_atoms, max_ao, compact_kwargs, method) -> dict:
    t_start = time.perf_counter()
    for stale in out_dir.glob(".*.tmp"):  # left by a killed writer; never a record
        stale.unlink(missing_ok=True)
    ids = [e.material_id for e in entries]
    dup = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dup:
        raise ValueError(f"duplicate material ids: {dup[:10]}")
    for i in ids:
        if not i or "/" in i or i.startswith("."):
            raise ValueError(f"material id {i!r} is not a safe file name")

    failures = read_failures(out_dir)
    # a current record exists after all (e.g. written just as its clock ran out); the failure of an
    # outdated record's recompute stays, so that it is not retried on every run
    stale_failures = [i for i in ids if i in failures and (out_dir / f"{i}.npz").exists()
                      and not (method == "pbe" and pbe_record_outdated(out_dir / f"{i}.npz"))]
    if stale_failures:
        for i in stale_failures:
            failures.pop(i)
        _write_failures(out_dir, failures)
    todo, n_cached, n_skip_failed, n_outdated = select_todo(entries, out_dir, failures, retry_failed, method)
    if method not in ("pbe", "xtb"):
        raise ValueError(f"unknown method {method!r}; expected 'pbe' or 'xtb'")
    if method == "pbe":
        costs = {e.material_id: estimated_cost_pbe(e) for e in todo}
        todo = pbe_order(entries, todo, out_dir, costs)
    else:
        costs = {e.material_id: estimated_cost(e, min_length_ang, max_atoms, max_ao) for e in todo}
        todo.sort(key=lambda e: (costs[e.material_id], e.material_id))
    finite = [c for c in costs.values() if math.isfinite(c)]
    unit = (sum(finite) / len(finite)) if finite else 1.0
    work = {k: (c / unit if math.isfinite(c) else 1.0) for k, c in costs.items()}  # in "average materials"

    summary = {"out_dir": str(out_dir), "n_entries": len(entries), "n_cached": n_cached,
               "n_skipped_failed": n_skip_failed, "n_outdated": n_outdated, "n_todo": len(todo),
               "n_computed": 0, "n_failed": 0,
               "failed": {}, "method": method,
               "order": ("real first, then substituted round-robin over parents" if method == "pbe"
                         else "cheapest first (estimated (supercell AOs)^3)")}
    timings, sizes = [], []
    settings = {"method": method, "min_length_ang": min_length_ang, "etemp_k": etemp_k, "max_atoms": max_atoms, "max_ao": max_ao,
                "compact_kwargs": compact_kwargs}

    recent: list = []  # the last materials finished, for PROGRESS_FILE
    t_wall0 = time.time()
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=round(sum(work.values()), 3), unit="mat", desc="PBE" if method == "pbe" else "GFN1-xTB", dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} cost-weighted [{elapsed}<{remaining}]{postfix}")

    def finish(mid: str, ok: bool, info: dict) -> None:
        if ok:
            summary["n_computed"] += 1
            timings.append(info.get("seconds", 0.0))
            sizes.append(info.get("bytes", 0))
            if mid in failures:
                failures.pop(mid)
                _write_failures(out_dir, failures)
        else:
            summary["n_failed"] += 1
            summary["failed"][mid] = info["reason"]
            failures[mid] = {**info, "method": "PBE" if method == "pbe" else METHOD, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            _write_failures(out_dir, failures)
        recent.append({"material_id": mid, "ok": ok, "seconds": info.get("seconds"),
                       **({} if ok else {"reason": str(info.get("reason", ""))[:200]})})
        _write_progress(out_dir, summary, workers, queue, recent, t_wall0)
        if bar is not None:
            bar.update(work[mid])
            bar.set_postfix(done=summary["n_computed"], failed=summary["n_failed"], refresh=False)

    ctx = mp.get_context("spawn")
    workers: list[_Worker] = []
    queue = list(todo)
    startup_failures = 0
    previous_term = _stop_on_sigterm()
    try:
        if queue:
            workers = [_Worker(ctx, settings) for _ in range(max(1, min(int(n_procs), len(queue))))]
        while queue or any(w.task is not None for w in workers):
            assigned = False
            for w in workers:
                if w.ready and w.task is None and queue:
                    e = queue.pop(0)
                    w.assign(e, out_dir / f"{e.material_id}.npz")
                    assigned = True
            if assigned:
                _write_progress(out_dir, summary, workers, queue, recent, t_wall0)
            deadlines = [time_limit_s - w.used() for w in workers if w.task is not None]
            timeout = max(0.0, min(deadlines)) + 0.01 if deadlines else 1.0
            handles = [w.conn for w in workers] + [w.proc.sentinel for w in workers]
            ready = set(wait(handles, timeout=min(timeout, 1.0)))
            alive: list[_Worker] = []
            for w in workers:
                dead = False
                if w.conn in ready:
                    try:
                        kind, mid, info = w.conn.recv()
                    except (EOFError, OSError):
                        dead = True
                    else:
                        if kind == "ready":
                            w.ready = True
                        elif w.task is not None and mid == w.task.material_id:
                            w.task = None
                            finish(mid, kind == "ok", info)
                if not dead and w.proc.sentinel in ready and not w.proc.is_alive():
                    dead = True
                if dead:
                    if w.task is not None:  # died mid-task (crash, out of memory)
                        mid, w.task = w.task.material_id, None
                        finish(mid, False, {"reason": f"worker died (exit code {w.proc.exitcode})"})
                elif w.task is not None and w.over(time_limit_s):
                    mid, elapsed, cpu = w.task.material_id, time.monotonic() - w.started, w.used()
                    w.task = None
                    w.stop(kill=True)
                    path = out_dir / f"{mid}.npz"
                    # finished just as the clock ran out: a record this task wrote (an outdated
                    # record being recomputed exists all along and does not count)
                    if path.exists() and path.stat().st_mtime >= w.started_wall - 1.0:
                        finish(mid, True, {"seconds": round(elapsed, 3), "bytes": path.stat().st_size})
                    else:
                        finish(mid, False, {"reason": f"timeout: exceeded the time limit of {time_limit_s:g} s "
                                                      f"(CPU {cpu:.0f} s, wall clock {elapsed:.0f} s)",
                                            "seconds": round(elapsed, 3), "cpu_seconds": round(cpu, 3)})
                    dead = True
                if dead:
                    if not w.ready:
                        startup_failures += 1
                        if startup_failures > 2 * max(1, int(n_procs)):
                            raise RuntimeError(f"{method} workers die while starting (exit code {w.proc.exitcode});"
                                               " run one entry with data_prep.embedded.compute.make_record to see why")
                    w.stop(kill=True)
                    if queue:
                        alive.append(_Worker(ctx, settings))
                else:
                    alive.append(w)
            workers = alive
    except KeyboardInterrupt:
        summary["interrupted"] = True
        raise
    finally:
        for w in workers:
            w.stop(kill=bool(summary.get("interrupted")) or w.task is not None)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        if bar is not None:
            bar.close()
        if todo:
            _write_progress(out_dir, summary, [], queue, recent, t_wall0,
                            "interrupted" if summary.get("interrupted") else "finished")
        summary["seconds"] = round(time.perf_counter() - t_start, 2)
        summary["seconds_per_material"] = round(float(np.mean(timings)), 3) if timings else None
        summary["bytes_per_material"] = int(np.mean(sizes)) if sizes else None
        if summary.get("interrupted"):
            print(f"interrupted: {summary['n_computed']} new records kept in {out_dir}; rerun to resume",
                  flush=True)
    return summary
