"""``python -m data_prep fetch --source mp``: Materials Project materials -> canonical records, resumably.

Per material one ``<material_id>.npz`` record (``data_prep.records.MaterialRecord``, origin ``mp``,
method from the DOS task's run type: PBE, PBE+U, r2SCAN) in the output folder, written atomically;
an index (``index.json``, or ``index.shard-I-of-N.json`` per shard) lists what is complete and what
was skipped and why; a manifest (``manifest*.json``) holds the run's summary, per-material skips
and failures and the bond-valence cross-check.

Request pattern (see ``data_prep.mp.api``): the selection is one paginated summary search
(1000 ids per page); then per batch of up to ``batch_size`` materials one electronic-structure,
one oxidation-state and one core-materials request (ids comma-joined), and per material two
object-store queries (total DOS, projections), each naming the DOS task's identifier and its run
type (the tables' partition column; the run type is read from the core document's calculation
type of the task the electronic-structure document names). Batches run on ``concurrency`` threads.

Failures: transient ones (network, 429, 5xx) are retried with backoff; others are not. A material
that still fails is listed in the manifest and retried by the next run. Anything that stops the
whole run (no key, key rejected, endpoint or object store unreachable or refusing, selection
failed, a record that cannot be written, the first ``abort_after`` materials all failing for one
permanent reason) raises ``FetchError`` with one line; what was written stays.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_prep.mp.api import (DEFAULT_ENDPOINT, AuthError, FetchError, MPClient, PermanentError, RetryPolicy, classify,
                              failure_category, redact, resolve_api_key, run_type_value, short_reason, signature,
                              sort_ids)
from data_prep.records import MaterialRecord, RecordError, Spectrum, atomic_write_bytes

#: Run type of the DOS task -> the record's ``method``.
RUN_TYPE_METHOD = {"GGA": "PBE", "GGA+U": "PBE+U", "PBE": "PBE", "PBE+U": "PBE+U",
                   "R2SCAN": "r2SCAN", "r2SCAN": "r2SCAN", "R2SCAN+U": "r2SCAN+U", "r2SCAN+U": "r2SCAN+U"}

#: Skip categories (permanent: a rerun does not retry them unless --retry-skipped).
SKIP_LABELS = {
    "no-es-doc": "no electronic-structure document",
    "no-dos": "no DOS in the electronic-structure document",
    "dos-missing": "DOS missing in the object store",
    "no-projections": "DOS without site/orbital projections",
    "l-resolved": "DOS projections only l-resolved (s/p/d)",
    "malformed-dos": "malformed DOS",
    "disordered": "disordered structure",
}


@dataclass
class FetchConfig:
    """Selection filters and run settings of one fetch (stored in the manifest)."""

    elements: list[str] | None = None
    exclude_elements: list[str] | None = None
    nelements_max: int | None = None
    nelements_min: int | None = None
    energy_above_hull_max: float | None = None
    stable_only: bool = False
    no_theoretical: bool = False
    limit: int | None = None
    shard: tuple[int, int] | None = None   # (I, N), 1-based
    concurrency: int = 4
    batch_size: int = 50
    endpoint: str | None = None
    retries: int = 6
    backoff_s: float = 1.0
    retry_skipped: bool = False
    weights: str = "float32"               # record weight precision: float32 or float16 (half the disk)
    index_flush_s: float = 2.0
    abort_after: int = 20                  # stop when the first N materials all fail for one permanent reason

    def __post_init__(self):
        if self.shard is not None:
            i, n = (int(x) for x in self.shard)
            if n < 1 or not 1 <= i <= n:
                raise FetchError(f"--shard must be I/N with 1 <= I <= N, got {i}/{n}")
            self.shard = (i, n)
        for name in ("concurrency", "batch_size", "retries", "abort_after"):
            if int(getattr(self, name)) < 1:
                raise FetchError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.weights not in ("float32", "float16"):
            raise FetchError(f"weights must be float32 or float16, got {self.weights!r}")
        if self.limit is not None and int(self.limit) < 0:
            raise FetchError(f"--limit must be >= 0, got {self.limit}")
        if self.energy_above_hull_max is not None and float(self.energy_above_hull_max) < 0:
            raise FetchError(f"--energy-above-hull-max must be >= 0 eV/atom, got {self.energy_above_hull_max}")

    @classmethod
    def from_dict(cls, d: dict) -> "FetchConfig":
        """From the ``mp`` section of a JSON file (keys as the dataclass fields; all optional)."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FetchError(f"unknown mp fetch parameter(s) {unknown}; known: {sorted(known)}")
        d = dict(d)
        if isinstance(d.get("shard"), str):
            d["shard"] = parse_shard(d["shard"])
        return cls(**d)

    def summary_filters(self) -> dict:
        """Keyword arguments for ``MPRester.materials.summary.search``."""
        f: dict = {"deprecated": False}
        if self.elements:
            f["elements"] = list(self.elements)
        if self.exclude_elements:
            f["exclude_elements"] = list(self.exclude_elements)
        if self.nelements_max is not None or self.nelements_min is not None:
            f["num_elements"] = (int(self.nelements_min or 1), int(self.nelements_max or 118))
        if self.energy_above_hull_max is not None:
            f["energy_above_hull"] = (0.0, float(self.energy_above_hull_max))
        if self.stable_only:
            f["is_stable"] = True
        if self.no_theoretical:
            f["theoretical"] = False
        return f

    @property
    def tag(self) -> str:
        """File-name tag of this run's index and manifest ('' unsharded, '.shard-I-of-N')."""
        return "" if self.shard is None else f".shard-{self.shard[0]}-of-{self.shard[1]}"


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise FetchError(f"--shard must look like I/N (e.g. 2/8), got {text!r}") from None
    if n < 1 or not 1 <= i <= n:
        raise FetchError(f"--shard must be I/N with 1 <= I <= N, got {text}")
    return i, n


def shard_index(material_id: str, n_shards: int) -> int:
    """0-based shard of a material: a stable hash of its id (independent of order and selection)."""
    h = hashlib.sha256(str(material_id).encode()).digest()
    return int.from_bytes(h[:8], "big") % n_shards


def plan(ids, limit: int | None, shard: tuple[int, int] | None) -> list[str]:
    """Selection -> this run's materials: natural id order, then ``limit``, then the shard's part.

    ``limit`` applies before sharding, so the N shards of a limited run together cover exactly
    the unsharded run's materials.
    """
    ordered = sort_ids(ids)
    if limit is not None:
        ordered = ordered[: int(limit)]
    if shard is not None:
        i, n = shard
        ordered = [m for m in ordered if shard_index(m, n) == i - 1]
    return ordered


# ----------------------------------------------------------------------------- record building
class SkipMaterial(Exception):
    def __init__(self, category: str, detail: str = ""):
        self.category = category
        self.detail = detail
        super().__init__(f"{SKIP_LABELS.get(category, category)}{': ' + detail if detail else ''}")


def method_from(run_type: str | None, calc_type: str | None) -> str:
    rt = run_type or (calc_type.split()[0] if calc_type else None)
    if not rt:
        return "DFT (functional unknown)"
    return RUN_TYPE_METHOD.get(rt, RUN_TYPE_METHOD.get(rt.upper(), rt))


def dos_task_id(es_doc: dict) -> str | None:
    dos = es_doc.get("dos") or {}
    tid = dos.get("task_id")
    if not tid:  # older documents kept it per spin channel
        for spin_doc in (dos.get("total") or {}).values():
            if isinstance(spin_doc, dict) and spin_doc.get("task_id"):
                tid = spin_doc["task_id"]
                break
    return str(tid) if tid else None


def run_type_of(calc_type: str | None) -> str | None:
    """The run type in an emmet calculation type (``"GGA+U NSCF Uniform"`` -> ``"GGA+U"``): emmet
    spells a ``CalcType`` as ``f"{RunType.value} {TaskType.value}"`` (``emmet.core.vasp.calc_types``)."""
    if not calc_type:
        return None
    from emmet.core.vasp.calc_types.enums import TaskType

    text = str(calc_type).strip()
    for tt in sorted((t.value for t in TaskType), key=len, reverse=True):
        if text.endswith(" " + tt):
            return run_type_value(text[: -len(tt) - 1].strip())
    return run_type_value(text.split()[0]) if text.split() else None


def calc_type_of(calc_types: dict, task_id: str) -> str | None:
    """The calculation type of ``task_id`` in a core document's ``calc_types`` (either id spelling)."""
    from data_prep.mp.api import dos_identifier

    if task_id in calc_types:
        return str(calc_types[task_id])
    try:
        want = dos_identifier(task_id)
        for k, v in calc_types.items():
            if dos_identifier(k) == want:
                return str(v)
    except Exception:
        pass
    return None


def dos_edges(es_doc: dict) -> tuple[float | None, float | None, float | None]:
    """``(vbm_ev, cbm_ev, efermi_ev)`` of the DOS task from the document's DOS summary (any spin)."""
    total = ((es_doc.get("dos") or {}).get("total")) or {}
    vbms = [d.get("vbm") for d in total.values() if isinstance(d, dict) and d.get("vbm") is not None]
    cbms = [d.get("cbm") for d in total.values() if isinstance(d, dict) and d.get("cbm") is not None]
    efs = [d.get("efermi") for d in total.values() if isinstance(d, dict) and d.get("efermi") is not None]
    return (max(vbms) if vbms else None, min(cbms) if cbms else None, efs[0] if efs else None)


_L_NAMES = {"p", "d", "f"}


#: Orbital names as they may appear in the projections table -> pymatgen ``Orbital`` member names.
#: Older tables (and pymatgen < 2026) wrote ``dx2`` for d(x^2-y^2); pymatgen-core renamed it
#: ``dx2_y2`` and keeps ``Orbital["dx2"]`` only as a deprecated alias, to be removed (2027-08-17).
ORBITAL_ALIASES = {"dx2": "dx2_y2", "dx2-y2": "dx2_y2", "dx2y2": "dx2_y2", "d_x2-y2": "dx2_y2"}


def orbital_name(name: str) -> str:
    """The pymatgen ``Orbital`` member name for a projections-table orbital name, without relying on
    pymatgen's deprecated aliases; ``KeyError`` when it names no orbital."""
    from pymatgen.electronic_structure.core import Orbital

    members = Orbital.__members__
    n = str(name).strip()
    n = ORBITAL_ALIASES.get(n, n)
    if n not in members:
        raise KeyError(name)
    return n


def complete_dos_from_rows(total_row: dict, proj_row: dict):
    """mp-api 0.46's conversion of the two table rows to a pymatgen ``CompleteDos`` (orbital names
    mapped to pymatgen's current ones first)."""
    from emmet.core.band_theory import ElectronicDos
    from pymatgen.electronic_structure.dos import CompleteDos

    orbitals = [o for o in (proj_row.get("orbital") or []) if o is not None]
    if not orbitals:
        raise SkipMaterial("no-projections", "the projections table has no orbitals")
    if _L_NAMES & set(orbitals):
        raise SkipMaterial("l-resolved", f"orbitals {sorted(set(orbitals))}; m-resolved projections "
                                         "(s, py, pz, px, dxy, ...) are needed for the 9 channels")
    try:
        names = [None if o is None else orbital_name(o) for o in proj_row.get("orbital") or []]
    except KeyError as exc:
        raise SkipMaterial("malformed-dos", f"unknown orbital name {exc.args[0]!r}") from None
    row = dict(total_row)
    row["projected_densities"] = {**proj_row, "orbital": names}
    try:
        cdos = ElectronicDos(**row).to_pmg()
    except Exception as exc:
        raise SkipMaterial("malformed-dos", short_reason(exc)) from None
    if not isinstance(cdos, CompleteDos):
        raise SkipMaterial("no-projections", "no structure or projections with the DOS")
    return cdos


def bv_crosscheck(structure, bv_valences, oxi_doc: dict | None) -> dict:
    """Compare BVAnalyzer valences with MP's oxidation-state document, per element.

    Returns ``{"status": "agree" | "disagree" | "no-mp-doc" | "bv-failed" | "mp-doc-unusable", ...}``;
    for a comparison also ``bv`` and ``mp`` (element -> sorted valences) and ``mp_method``.
    Site lists are compared when both structures have the same number of each element, else the
    sets of distinct valences per element.
    """
    from pymatgen.core import Structure

    if oxi_doc is None:
        return {"status": "no-mp-doc"}
    if bv_valences is None:
        return {"status": "bv-failed"}
    vals, sdict = oxi_doc.get("possible_valences"), oxi_doc.get("structure")
    try:
        mp_struct = sdict if isinstance(sdict, Structure) else Structure.from_dict(sdict)
        mp_elems = [site.specie.symbol for site in mp_struct]
    except Exception:
        return {"status": "mp-doc-unusable"}
    if not vals or len(vals) != len(mp_elems):
        return {"status": "mp-doc-unusable"}

    def per_element(elems, values):
        out: dict[str, list] = {}
        for el, v in zip(elems, values):
            v = float(v)
            out.setdefault(el, []).append(int(round(v)) if abs(v - round(v)) < 0.01 else round(v, 2))
        return {el: sorted(v) for el, v in sorted(out.items())}

    bv = per_element([s.specie.symbol for s in structure], bv_valences)
    mp = per_element(mp_elems, vals)
    if {k: len(v) for k, v in bv.items()} == {k: len(v) for k, v in mp.items()}:
        agree = bv == mp
    else:
        agree = {k: set(v) for k, v in bv.items()} == {k: set(v) for k, v in mp.items()}
    return {"status": "agree" if agree else "disagree", "bv": bv, "mp": mp,
            "mp_method": str(oxi_doc.get("method")) if oxi_doc.get("method") is not None else None}


def build_mp_record(material_id: str, cdos, es_doc: dict, oxi_doc: dict | None, task_id: str,
                    run_type: str | None, calc_type: str | None, extra: dict | None = None):
    """One MP material -> ``(MaterialRecord, crosscheck)``; ``SkipMaterial`` when it cannot be used."""
    from data_prep.bond_valence import BondValenceError, assign_valences

    structure = cdos.structure
    if not structure.is_ordered:
        raise SkipMaterial("disordered")
    try:
        spectrum = Spectrum.from_complete_dos(cdos, structure)
    except RecordError as exc:
        cat = "l-resolved" if "l-resolved" in str(exc) else "malformed-dos"
        raise SkipMaterial(cat, str(exc)) from None
    except Exception as exc:  # shapes that do not broadcast, bad energies, ...
        raise SkipMaterial("malformed-dos", short_reason(exc)) from None
    vbm, cbm, efermi = dos_edges(es_doc)
    if efermi is not None and np.isfinite(efermi):
        spectrum.efermi_ev = float(efermi)
    if vbm is not None and cbm is not None:
        spectrum.band_gap_ev = float(max(0.0, cbm - vbm))
        spectrum.reference_ev = Spectrum.reference_from(vbm, spectrum.efermi_ev, spectrum.band_gap_ev)
    else:  # no summary: keep what pymatgen finds in the DOS itself
        spectrum.reference_ev = float(spectrum.reference_ev)
    try:
        valences, bv_error = assign_valences(structure), None
    except BondValenceError as exc:
        valences, bv_error = None, str(exc)
    check = bv_crosscheck(structure, valences, oxi_doc)
    spin_polarized = any(len(by_spin) > 1 for orbs in cdos.pdos.values() for by_spin in orbs.values())
    oxi = None
    if oxi_doc is not None:
        oxi = {k: oxi_doc.get(k) for k in ("possible_species", "possible_valences", "average_oxidation_states")}
        oxi["method"] = str(oxi_doc["method"]) if oxi_doc.get("method") is not None else None
    provenance = {
        "source": "Materials Project", "material_id": material_id, "dos_task_id": task_id,
        "run_type": run_type, "calc_type": calc_type, "band_gap_ev": es_doc.get("band_gap"),
        "dos_band_gap_ev": spectrum.band_gap_ev, "efermi_ev": spectrum.efermi_ev,
        "is_metal": es_doc.get("is_metal"), "spin_polarized": bool(spin_polarized),
        "n_dos_points": int(len(cdos.energies)), "mp_oxidation_states": oxi,
        "bv_valences": valences, "bv_error": bv_error, **(extra or {}),
    }
    record = MaterialRecord(material_id=material_id, formula=structure.composition.reduced_formula,
                            origin="mp", method=method_from(run_type, calc_type), structure=structure,
                            spectrum=spectrum, provenance=json.loads(json.dumps(provenance, default=str)))
    try:
        record.validate()
    except RecordError as exc:
        raise SkipMaterial("malformed-dos", str(exc)) from None
    return record, check


# ----------------------------------------------------------------------------- state on disk
class FetchState:
    """The output folder's index: complete and skipped materials, rewritten atomically."""

    def __init__(self, folder: Path, tag: str, flush_s: float = 2.0):
        self.folder = Path(folder)
        self.index_path = self.folder / f"index{tag}.json"
        self.manifest_path = self.folder / f"manifest{tag}.json"
        self.entries: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.flush_s = flush_s
        self._last_flush = 0.0
        self._dirty = False

    def load(self) -> None:
        """Union of every index in the folder, then any record file the indexes do not know."""
        for p in sorted(self.folder.glob("index*.json")):
            try:
                data = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # a damaged index is rebuilt from the record files
            for mid, e in (data.get("materials") or {}).items():
                if isinstance(e, dict) and (mid not in self.entries or e.get("status") == "complete"):
                    self.entries[mid] = e
        for mid, e in list(self.entries.items()):
            if e.get("status") == "complete" and not (self.folder / e.get("file", f"{mid}.npz")).is_file():
                del self.entries[mid]
        for p in self.folder.glob("*.npz"):
            mid = p.stem
            if self.entries.get(mid, {}).get("status") != "complete":
                try:
                    rec_id = peek_id(p)
                except RecordError:
                    continue  # not readable: fetched again
                self.entries[rec_id] = {"status": "complete", "file": p.name, "bytes": p.stat().st_size}

    def status(self, mid: str) -> str | None:
        return self.entries.get(mid, {}).get("status")

    def set(self, mid: str, entry: dict) -> None:
        with self.lock:
            self.entries[mid] = entry
            self._dirty = True
        self.flush()

    def flush(self, force: bool = False) -> None:
        with self.lock:
            if not (self._dirty or force):
                return
            if not force and time.monotonic() - self._last_flush < self.flush_s:
                return
            data = {"format": 1, "source": "mp", "materials": dict(sorted(self.entries.items()))}
            atomic_write_bytes(self.index_path, json.dumps(data, indent=1).encode())
            self._last_flush = time.monotonic()
            self._dirty = False


def peek_id(path: Path) -> str:
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(bytes(z["meta"]).decode())["material_id"]
    except Exception as exc:
        raise RecordError(f"cannot read record {path}: {exc}") from None


# ----------------------------------------------------------------------------- the run
@dataclass
class Outcome:
    fetched: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)      # mid -> {category, reason}
    failed: dict = field(default_factory=dict)       # mid -> {category, reason}


class Fetcher:
    def __init__(self, cfg: FetchConfig, out_dir, progress: bool = True, log=None, client: MPClient | None = None):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.progress = progress
        self._log = log
        self.client = client
        self.stop = threading.Event()
        self.outcome = Outcome()
        self._lock = threading.Lock()
        self._bar = None
        self._key = None
        self._first: list = []      # (material, failure signature or None, reason) of the first to finish
        self.fatal: str | None = None

    def log(self, line: str) -> None:
        line = redact(line, self._key)
        if self._log is not None:
            self._log(line)
        elif self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    # -- per material --------------------------------------------------------------------
    def _done(self, mid: str, kind: str, entry: dict | None = None, detail: str = "") -> None:
        with self._lock:
            if kind == "fetched":
                self.outcome.fetched.append(mid)
            elif kind == "skipped":
                self.outcome.skipped[mid] = entry
            else:
                self.outcome.failed[mid] = entry
        if kind in ("fetched", "skipped"):
            self.state.set(mid, entry)
        if kind != "fetched":
            self.log(f"{mid}: {kind}: {detail}")
        if self._bar is not None:
            with self._lock:
                self._bar.update(1)

    def _skip(self, mid: str, exc: SkipMaterial) -> None:
        self._done(mid, "skipped", {"status": "skipped", "category": exc.category,
                                    "reason": redact(str(exc), self._key)}, str(exc))

    def _fail(self, mid: str, exc: BaseException, what: str) -> None:
        reason = f"{what}: {short_reason(exc, self._key)}"
        permanent = classify(exc) == "permanent"
        self._done(mid, "failed", {"category": failure_category(exc), "reason": reason,
                                   "permanent": permanent}, reason)
        self._watch(mid, signature(reason) if permanent else None, reason)

    def _watch(self, mid: str, sig: str | None, reason: str = "") -> None:
        """Stop the run when the first ``abort_after`` materials to finish all failed for one
        permanent reason (a layout or schema the queries do not fit, access refused, ...)."""
        n = int(self.cfg.abort_after)
        with self._lock:
            if len(self._first) >= n:
                return
            self._first.append((mid, sig, reason))
            if len(self._first) < n:
                return
            sigs = {s for _, s, _ in self._first}
        if len(sigs) == 1 and None not in sigs:
            first_mid, _, first_reason = self._first[0]
            self.fatal = (f"stopped: the first {n} materials all failed for the same reason, which a "
                          f"retry cannot fix (first: {first_mid}: {first_reason})")
            self.stop.set()

    def _one(self, mid: str, es_doc, oxi_doc, calc_types: dict, store) -> None:
        try:
            if es_doc is None:
                raise SkipMaterial("no-es-doc")
            task_id = dos_task_id(es_doc)
            if task_id is None:
                raise SkipMaterial("no-dos")
            calc_type = calc_type_of(calc_types, task_id)
            want_rt = run_type_of(calc_type)
            total = store.total(task_id, want_rt)
            if not total:
                raise SkipMaterial("dos-missing", f"no total-DOS row for task {task_id}"
                                   + (f" (run type {want_rt})" if want_rt else ""))
            if self.stop.is_set():
                return
            run_type = total[0].get("run_type") or want_rt
            proj = store.projections(task_id, run_type)
            if not proj:
                raise SkipMaterial("no-projections", f"no projected-DOS row for task {task_id}")
            proj_row = next((r for r in proj if r.get("run_type") == run_type), proj[0])
            cdos = complete_dos_from_rows(total[0], proj_row)
            record, check = build_mp_record(
                mid, cdos, es_doc, oxi_doc, task_id, run_type, calc_type,
                extra={"db_version": self.client.db_version, "mp_api_version": self.client.mp_api_version,
                       "fetched_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            try:  # a full disk or a folder that cannot be written stops the run (the next would fail too)
                path = record.save(self.out / f"{mid}.npz", weight_dtype=np.dtype(self.cfg.weights))
                entry = {"status": "complete", "file": path.name, "formula": record.formula,
                         "method": record.method, "n_atoms": len(record.structure),
                         "bytes": path.stat().st_size, "crosscheck": check}
                self._done(mid, "fetched", entry)
            except OSError as exc:
                raise FetchError(f"{mid}: cannot write its record into {self.out}: "
                                 f"{exc.strerror or short_reason(exc)}") from None
            self._watch(mid, None)
        except SkipMaterial as exc:
            self._skip(mid, exc)
            self._watch(mid, None)
        except FetchError:
            raise
        except PermanentError as exc:
            self._fail(mid, exc, "DOS")
        except Exception as exc:
            if classify(exc) == "auth":
                raise
            self._fail(mid, exc, "DOS")

    def _batch(self, ids: list[str], store) -> None:
        if self.stop.is_set():
            return
        try:
            es = self.client.electronic_structure(ids)
            oxi = self.client.oxidation_states(ids)
            ct = self.client.calc_types(ids)
        except AuthError:
            raise
        except Exception as exc:
            for mid in ids:
                self._fail(mid, exc, "metadata request")
            return
        for mid in ids:
            if self.stop.is_set():
                return
            self._one(mid, es.get(mid), oxi.get(mid), ct.get(mid, {}), store)

    # -- whole run -------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.time()
        cfg = self.cfg
        key, key_source = resolve_api_key()
        self._key = key
        self.out.mkdir(parents=True, exist_ok=True)
        self.state = FetchState(self.out, cfg.tag, cfg.index_flush_s)
        self.state.load()
        if self.client is None:
            self.client = MPClient(key, cfg.endpoint, RetryPolicy(attempts=cfg.retries, base_s=cfg.backoff_s),
                                   self.stop)
        self.client.connect()
        try:
            selection = self.client.select(cfg.summary_filters())
        except FetchError:
            raise
        except Exception as exc:  # after the retries: one line, naming the request
            raise FetchError(f"selecting materials failed (summary search): {short_reason(exc, key)}") from None
        targets = plan([d["material_id"] for d in selection], cfg.limit, cfg.shard)
        cached = [m for m in targets if self.state.status(m) == "complete"]
        skipped_before = [m for m in targets if self.state.status(m) == "skipped" and not cfg.retry_skipped]
        done = set(cached) | set(skipped_before)
        todo = [m for m in targets if m not in done]
        todo_set = set(todo)
        for p in self.out.glob(".*.npz.*.tmp"):  # left by a killed run; shards never share a material
            if p.name[1:].split(".npz.")[0] in todo_set:
                p.unlink(missing_ok=True)
        for own in (self.state.index_path, self.state.manifest_path):  # this shard's, half-written when killed
            for p in self.out.glob(f".{own.name}.*.tmp"):
                p.unlink(missing_ok=True)
        interrupted = False
        try:
            if todo:
                store = self.client.dos_store()
                k = max(1, int(cfg.concurrency))
                size = max(1, min(int(cfg.batch_size), math.ceil(len(todo) / k)))
                batches = [todo[i:i + size] for i in range(0, len(todo), size)]
                if self.progress:
                    from tqdm import tqdm

                    self._bar = tqdm(total=len(todo), unit="material", desc="mp fetch", file=sys.stderr,
                                     dynamic_ncols=True)
                with ThreadPoolExecutor(max_workers=k, thread_name_prefix="mp-fetch") as pool:
                    futures = [pool.submit(self._batch, b, store) for b in batches]
                    try:
                        pending = set(futures)
                        while pending:  # short waits: Ctrl-C is handled even if a worker thread got the signal
                            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                            for f in finished:
                                f.result()
                    except BaseException as exc:
                        self.stop.set()
                        for f in futures:
                            f.cancel()
                        if isinstance(exc, (KeyboardInterrupt, FetchError)) or not isinstance(exc, Exception):
                            raise
                        raise FetchError(f"fetch stopped by an unexpected error: {type(exc).__name__}: "
                                         f"{short_reason(exc, key)}") from None
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self.state.flush(force=True)
            summary = self._summary(t0, selection, targets, cached, skipped_before, interrupted, key_source)
            atomic_write_bytes(self.state.manifest_path,
                               redact(json.dumps(summary, indent=1, default=str), key).encode())
        if self.fatal:
            n = len(self.state.entries)
            raise FetchError(f"{redact(self.fatal, key)}; the {n} records and skips already written are kept "
                             f"(manifest {self.state.manifest_path})")
        return summary

    def _summary(self, t0, selection, targets, cached, skipped_before, interrupted, key_source) -> dict:
        o = self.outcome
        skipped = {m: self.state.entries[m] for m in skipped_before}
        skipped.update(o.skipped)
        checks = {m: self.state.entries[m].get("crosscheck") for m in targets
                  if self.state.status(m) == "complete"}
        compared = {m: c for m, c in checks.items() if c and c.get("status") in ("agree", "disagree")}
        agree = sum(1 for c in compared.values() if c["status"] == "agree")
        not_compared = Counter((c or {}).get("status", "unknown") for m, c in checks.items() if m not in compared)
        complete_bytes = sum(int(self.state.entries[m].get("bytes") or 0) for m in checks)
        elapsed = time.time() - t0
        cfg = asdict(self.cfg)
        cfg["shard"] = None if self.cfg.shard is None else f"{self.cfg.shard[0]}/{self.cfg.shard[1]}"
        from data_prep import __version__

        return {
            "source": "mp", "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": cfg, "api_key_from": key_source,
            "endpoint": (self.client.endpoint if self.client else None) or DEFAULT_ENDPOINT,
            "mp_api_version": self.client.mp_api_version if self.client else "",
            "db_version": self.client.db_version if self.client else "", "data_prep_version": __version__,
            "counts": {"selected": len(selection), "targets": len(targets), "fetched": len(o.fetched),
                       "cached": len(cached), "skipped": len(skipped), "failed": len(o.failed),
                       "complete": len(checks)},
            "skipped_by_reason": dict(Counter(e.get("category", "?") for e in skipped.values())),
            "failed_by_reason": dict(Counter(e["category"] for e in o.failed.values())),
            "skipped": dict(sorted(skipped.items())), "failed": dict(sorted(o.failed.items())),
            "crosscheck": {
                "compared": len(compared), "agree": agree,
                "agreement_rate": (agree / len(compared)) if compared else None,
                "not_compared": dict(not_compared),
                "disagreements": {m: c for m, c in sorted(compared.items()) if c["status"] == "disagree"},
            },
            "retries": self.client.policy.retries if self.client else 0,
            "record_bytes": complete_bytes, "elapsed_s": round(elapsed, 2),
            "records_per_s": round(len(o.fetched) / elapsed, 3) if elapsed > 0 else None,
            "interrupted": interrupted, "stopped": self.fatal, "index": self.state.index_path.name,
        }


def fetch_mp(cfg: FetchConfig, out_dir, progress: bool = True, log=None) -> dict:
    """Run one fetch; returns the manifest dict (also written to ``<out>/manifest*.json``)."""
    return Fetcher(cfg, out_dir, progress=progress, log=log).run()


def format_summary(s: dict, out_dir) -> str:
    c = s["counts"]

    def reasons(d):
        return ", ".join(f"{SKIP_LABELS.get(k, k)}: {v}" for k, v in sorted(d.items()))

    shard = s["config"].get("shard")
    lines = [
        f"mp fetch: {c['selected']} selected, {c['targets']} targeted"
        + (f" (shard {shard})" if shard else "")
        + f": {c['fetched']} fetched, {c['cached']} cached, {c['skipped']} skipped"
        + (f" ({reasons(s['skipped_by_reason'])})" if s["skipped_by_reason"] else "")
        + f", {c['failed']} failed"
        + (f" ({reasons(s['failed_by_reason'])})" if s["failed_by_reason"] else "")
        + f" in {s['elapsed_s']:.1f} s"
        + (f" ({s['records_per_s']:.2f} records/s)" if s.get("records_per_s") else ""),
    ]
    x = s["crosscheck"]
    if x["compared"]:
        lines.append(f"bond-valence cross-check: BVAnalyzer agrees with MP's oxidation states for "
                     f"{x['agree']}/{x['compared']} materials ({100 * x['agreement_rate']:.0f} %)"
                     + (f"; {n_dis} disagreement{'s' if n_dis != 1 else ''} listed in the manifest"
                        if (n_dis := x["compared"] - x["agree"]) else ""))
    elif c["complete"]:
        lines.append("bond-valence cross-check: nothing to compare (" + ", ".join(
            f"{k}: {v}" for k, v in x["not_compared"].items()) + ")")
    lines.append(f"records in {out_dir}; manifest {Path(out_dir) / ('manifest' + _tag(shard) + '.json')}")
    if c["failed"]:
        lines.append(f"{c['failed']} material{'s' if c['failed'] != 1 else ''} failed (listed in the "
                     "manifest); rerun the same command to retry them")
    return "\n".join(lines)


def _tag(shard: str | None) -> str:
    if not shard:
        return ""
    i, n = shard.split("/")
    return f".shard-{i}-of-{n}"
