"""Ion-migration targets: bond-valence site energy (BVSE) percolation barriers of a mobile ion.

For every material that holds a mobile ion (``MOBILE_IONS``, first match in that order; Cu only
as Cu+), the ``bvlain`` package (softBV-style BVSE; A. Dembitskiy, MIT licence, see README)
computes the BVSE landscape of that ion over the framework of all other atoms on a grid of
``resolution_ang`` and the energies E_1D, E_2D, E_3D (eV) at which the low-energy region first
percolates in 1, 2 and 3 dimensions (bisection to 0.01 eV; ``inf`` above ``encut_ev`` is
stored as NaN with a reason).

Oxidation states are the project's (``bv_valences`` of the record, else ``BVAnalyzer`` via
``bond_valence.assign_valences``), not bvlain's own decoration, so barriers and BVS targets
use the same valences.

Cost: the BVSE grid has ``volume / resolution^3`` points, each with up to ``k`` neighbours
(LiFePO4, 28 atoms, 300 A^3: 2.5 s at 0.2 A on one core). Results are cached in one JSON file
(``EMBEDDED_CACHE`` for the embedded set) keyed by material id, with a fingerprint of the
structure and valences so a changed structure is recomputed; ``data_prep build`` reads the cache
and computes only missing entries, and only when bvlain is installed.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

#: (element, oxidation state) of the mobile ions, in the order of preference when several occur.
MOBILE_IONS: tuple[tuple[str, int], ...] = (("Li", 1), ("Na", 1), ("K", 1), ("Mg", 2), ("Ca", 2),
                                            ("Zn", 2), ("Ag", 1), ("Cu", 1))
#: h5 target names (per sample: on the sites of the mobile ion; per material in ``materials/``).
TARGETS = ("migration_e1d_ev", "migration_e2d_ev", "migration_e3d_ev")
_BVLAIN_KEYS = ("E_1D", "E_2D", "E_3D")
#: BVSE settings (bvlain's documented defaults except the resolution, see README).
DEFAULT_SETTINGS = {"resolution_ang": 0.2, "r_cut_ang": 10.0, "k": 100, "encut_ev": 5.0}
DEFAULT_TIME_LIMIT_S = 300.0
EMBEDDED_CACHE = Path(__file__).resolve().parent / "embedded" / "migration_barriers.json"
CITATION = ("bvlain (A. D. Dembitskiy, https://github.com/dembart/BVlain, MIT licence), BVSE in the softBV "
            "style: H. Chen, S. Adams, IUCrJ 4 (2017) 614-625; H. Chen, L. L. Wong, S. Adams, Acta Cryst. B75 "
            "(2019) 18-33")
NOT_INSTALLED = "not cached, bvlain not installed"


class MigrationError(ValueError):
    """The barriers of one material cannot be computed (the reason is stored in the manifest)."""


def bvlain_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("bvlain")
    except metadata.PackageNotFoundError:
        return None


def mobile_ion(structure, valences) -> tuple[str, int] | None:
    """The first ``MOBILE_IONS`` entry present in ``structure`` with that valence on some site."""
    present = {(site.specie.symbol, int(v)) for site, v in zip(structure, valences)}
    for ion in MOBILE_IONS:
        if ion in present:
            return ion
    return None


def ion_label(ion: tuple[str, int]) -> str:
    """bvlain's spelling: ('Li', 1) -> 'Li1+'."""
    return f"{ion[0]}{abs(ion[1])}{'+' if ion[1] > 0 else '-'}"


def fingerprint(structure, valences) -> str:
    """Short hash of lattice, species, positions (rounded) and valences: a changed input -> new hash."""
    parts = [np.round(structure.lattice.matrix, 4).tobytes()]
    for site, v in zip(structure, valences):
        parts.append(f"{site.specie.symbol}{int(v)}".encode())
        parts.append(np.round(np.mod(site.frac_coords, 1.0), 4).tobytes())
    return hashlib.sha1(b"".join(parts)).hexdigest()[:16]


def bvse_landscape(structure, valences, ion: tuple[str, int] | None = None, settings: dict | None = None):
    """bvlain's ``Lain`` holding the BVSE landscape of the mobile ion of ``structure``.

    ``calc.data``: (n_a, n_b, n_c) float, eV, the site energy on a grid along the lattice vectors
    a, b, c (``resolution_ang`` spacing); ``calc.ion``: the ``MOBILE_IONS`` entry used. Raises
    ``MigrationError`` (no mobile ion, no BVSE parameters, no framework).
    """
    import contextlib
    import io

    from bvlain import Lain

    st = {**DEFAULT_SETTINGS, **(settings or {})}
    ion = ion or mobile_ion(structure, valences)
    if ion is None:
        raise MigrationError("no mobile ion")
    s = structure.copy()
    s.remove_oxidation_states()
    s.add_oxidation_state_by_site([int(v) for v in valences])
    calc = Lain(verbose=False)
    with contextlib.redirect_stdout(io.StringIO()), np.errstate(all="ignore"):  # bvlain prints and divides by 0
        calc.read_structure(s, oxi_check=False)
        try:
            calc.bvse_distribution(mobile_ion=ion_label(ion), r_cut=st["r_cut_ang"], resolution=st["resolution_ang"],
                                   k=st["k"])
        except KeyError as exc:
            raise MigrationError(f"bvlain has no BVSE parameters for {ion_label(ion)} with a framework ion "
                                 f"(key {exc})") from None
    if len(calc.framework) == 0:
        raise MigrationError("no framework atoms besides the mobile ion")
    calc.ion = ion
    return calc


def compute_barriers(structure, valences, ion: tuple[str, int] | None = None, settings: dict | None = None) -> dict:
    """E_1D/E_2D/E_3D (eV, ``TARGETS`` order) of the mobile ion of ``structure``.

    Returns ``{"ion": "Li1+", "e1d_ev": .., "e2d_ev": .., "e3d_ev": .., "seconds": ..}`` with NaN and
    a ``note`` for a dimension that does not percolate below ``encut_ev``; raises ``MigrationError``.
    """
    import contextlib
    import io

    st = {**DEFAULT_SETTINGS, **(settings or {})}
    t0 = time.process_time()
    calc = bvse_landscape(structure, valences, ion, st)
    with contextlib.redirect_stdout(io.StringIO()), np.errstate(all="ignore"):
        e = calc.percolation_barriers(encut=st["encut_ev"])
    out = {"ion": ion_label(calc.ion)}
    notes = []
    for key, name in zip(_BVLAIN_KEYS, ("e1d_ev", "e2d_ev", "e3d_ev")):
        v = float(e[key])
        if not np.isfinite(v):
            notes.append(f"{key}: no percolation below {st['encut_ev']:g} eV")
            v = None
        out[name] = v
    if notes:
        out["note"] = "; ".join(notes)
    out["seconds"] = round(time.process_time() - t0, 2)
    return out


def percolating_axes(calc, energy_ev: float) -> set[str]:
    """Lattice directions ("a", "b", "c") along which the region of the landscape of ``calc``
    (``bvse_landscape``) less than ``energy_ev`` above its minimum connects a site to its image one
    cell further: the direction of the channels that open at that energy.

    The same test as bvlain's percolation search (2x2x2 grid supercell, 26-neighbour connectivity,
    periodic faces), asked per lattice vector instead of counting the connected images.
    """
    with np.errstate(all="ignore"):
        data = calc.data - calc.data.min()
        labels, features = calc._connected_components(data, energy_ev)
    shape = np.array(data.shape)
    axes = set()
    for f in features:
        if f == 0:
            continue
        probe = np.argwhere(labels == f)[0]
        for k, name in enumerate("abc"):
            image = probe.copy()
            image[k] = (image[k] + shape[k]) % (2 * shape[k])
            if labels[tuple(image)] == f:
                axes.add(name)
    return axes


# ----------------------------------------------------------------------------- cache
class BarrierCache:
    """One JSON file: ``{"bvlain_version", "settings", "entries": {material_id: entry}}``.

    An entry holds ``fingerprint``, ``ion`` and the barriers, or ``error`` (a failed or timed-out
    computation, also cached so a rerun does not repeat it; ``retry_failed`` to redo them).
    """

    def __init__(self, path, settings: dict | None = None):
        self.path = Path(path) if path else None
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.bvlain_version = None
        self.entries: dict = {}
        if self.path and self.path.is_file():
            d = json.loads(self.path.read_text())
            if d.get("settings") == self.settings:
                self.entries = d.get("entries", {})
                self.bvlain_version = d.get("bvlain_version")

    def get(self, material_id: str, fp: str) -> dict | None:
        e = self.entries.get(material_id)
        return e if e is not None and e.get("fingerprint") == fp else None

    def put(self, material_id: str, entry: dict) -> None:
        self.entries[material_id] = entry

    def save(self) -> None:
        if self.path is None:
            return
        from data_prep.records import atomic_write_bytes

        d = {"bvlain_version": self.bvlain_version or bvlain_version(), "settings": self.settings,
             "citation": CITATION, "entries": dict(sorted(self.entries.items()))}
        atomic_write_bytes(self.path, (json.dumps(d, indent=0, sort_keys=True) + "\n").encode())


def _child(conn, structure, valences, ion, settings):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        conn.send(("ok", compute_barriers(structure, valences, ion, settings)))
    except MigrationError as exc:
        conn.send(("error", str(exc)))
    except Exception as exc:  # noqa: BLE001 - any bvlain failure becomes a reason
        conn.send(("error", f"bvlain failed: {type(exc).__name__}: {exc}"[:300]))
    finally:
        conn.close()


def compute_missing(jobs, cache: BarrierCache, n_procs: int = 1, time_limit_s: float = DEFAULT_TIME_LIMIT_S,
                    progress: bool = True, retry_failed: bool = False, save_every_s: float = 20.0) -> dict:
    """Compute the barriers of ``jobs`` (``(material_id, structure, valences)``) not yet in ``cache``.

    Each material runs in its own forked process, killed after ``time_limit_s`` (reason stored);
    the cache is saved every ``save_every_s`` and at the end (a killed run resumes). Returns counts.
    """
    from tqdm import tqdm

    todo = []
    for mid, s, val in jobs:
        ion = mobile_ion(s, val)
        if ion is None:
            continue
        fp = fingerprint(s, val)
        hit = cache.get(mid, fp)
        if hit is not None and not (retry_failed and "error" in hit):
            continue
        todo.append((mid, s, val, ion, fp))
    counts = {"computed": 0, "failed": 0, "cached": len(jobs) - len(todo)}
    if not todo:
        return counts
    cache.bvlain_version = bvlain_version()
    import bvlain  # noqa: F401  (imported once here: the forked workers inherit it)

    ctx = mp.get_context("fork")
    running: dict = {}
    bar = tqdm(total=len(todo), desc="BVSE barriers", unit="material", disable=not progress)
    last_save = time.monotonic()
    queue = list(todo)
    try:
        while queue or running:
            while queue and len(running) < max(1, n_procs):
                mid, s, val, ion, fp = queue.pop(0)
                a, b = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_child, args=(b, s, val, ion, cache.settings), daemon=True)
                p.start()
                b.close()
                running[mid] = (p, a, time.monotonic(), fp, ion)
            time.sleep(0.05)
            for mid in list(running):
                p, a, started, fp, ion = running[mid]
                entry = None
                if a.poll():
                    try:
                        kind, val = a.recv()
                    except EOFError:
                        kind, val = "error", f"worker died (exit code {p.exitcode})"
                    entry = {**val} if kind == "ok" else {"ion": ion_label(ion), "error": val}
                elif not p.is_alive():
                    entry = {"ion": ion_label(ion), "error": f"worker died (exit code {p.exitcode}; out of memory?)"}
                elif time.monotonic() - started > time_limit_s:
                    p.kill()
                    entry = {"ion": ion_label(ion), "error": f"timeout: exceeded the time limit of {time_limit_s:g} s"}
                if entry is None:
                    continue
                p.join(timeout=5)
                a.close()
                del running[mid]
                entry["fingerprint"] = fp
                cache.put(mid, entry)
                counts["failed" if "error" in entry else "computed"] += 1
                bar.update()
            if time.monotonic() - last_save > save_every_s:
                cache.save()
                last_save = time.monotonic()
    finally:
        for p, a, *_ in running.values():
            p.kill()
        bar.close()
        cache.save()
    return counts


def material_targets(entry: dict | None) -> tuple[dict, str | None]:
    """(``TARGETS`` name -> value, reason or None) from a cache entry (None: not cached). A value
    outside ``h5schema.plausible_range`` becomes NaN and the reason names it."""
    from data_prep.h5schema import plausible_range

    nan = {t: float("nan") for t in TARGETS}
    if entry is None:
        return nan, "not computed"
    if "error" in entry:
        return nan, entry["error"]
    vals = {t: float(entry[k]) if entry.get(k) is not None else float("nan")
            for t, k in zip(TARGETS, ("e1d_ev", "e2d_ev", "e3d_ev"))}
    notes = [entry["note"]] if entry.get("note") else []
    for t in TARGETS:  # a value the method cannot give (damaged cache, wrong unit): dropped, with the reason
        rng = plausible_range(t)
        if not np.isnan(vals[t]) and not rng.holds(vals[t]):
            notes.append(f"implausible {t} {vals[t]:g} eV dropped (must be {rng.text})")
            vals[t] = float("nan")
    return vals, "; ".join(notes) or None


def structure_jobs(record_paths):
    """``(material_id, structure, valences)`` of record files with a mobile ion (valences as build uses them)."""
    from data_prep.bond_valence import BondValenceError, assign_valences
    from data_prep.records import MaterialRecord, RecordError

    for path in record_paths:
        try:
            rec = MaterialRecord.from_npz(path)
            val = rec.provenance.get("bv_valences")
            if val is None or len(val) != len(rec.structure):
                val = assign_valences(rec.structure)
        except (RecordError, BondValenceError):
            continue
        yield rec.material_id, rec.structure, [int(v) for v in val]


def build_targets(results, cache_path=None, n_procs: int = 1, time_limit_s: float | None = None,
                  progress: bool = True) -> dict:
    """The migration columns of a build from its featurised materials (``build.MaterialSamples``,
    in file order): reads ``cache_path``, computes what is missing when bvlain is installed.

    Returns ``per_sample`` / ``per_material`` (``TARGETS`` -> arrays), ``ion`` (per material),
    ``reasons`` (material id -> why its barriers are NaN, or a note) and ``info`` (root attribute).
    """
    from pymatgen.core import Structure

    cache = BarrierCache(cache_path)
    structures = [Structure.from_dict(json.loads(r.structure_json)) for r in results]
    jobs = [(r.material_id, s, r.valences) for r, s in zip(results, structures)]
    installed = bvlain_version() is not None
    counts = {"computed": 0, "failed": 0}
    if installed:
        counts.update(compute_missing(jobs, cache, n_procs, time_limit_s or DEFAULT_TIME_LIMIT_S, progress))
        counts.pop("cached", None)
    per_sample = {t: [] for t in TARGETS}
    per_material = {t: [] for t in TARGETS}
    ions, reasons = [], {}
    for r, (mid, s, val) in zip(results, jobs):
        ion = mobile_ion(s, val)
        if ion is None:
            vals, reason = {t: float("nan") for t in TARGETS}, "no mobile ion"
        else:
            entry = cache.get(mid, fingerprint(s, val))
            vals, reason = material_targets(entry)
            if entry is None and not installed:
                reason = NOT_INSTALLED
        if reason:
            reasons[mid] = reason
        ions.append(ion_label(ion) if ion else "")
        on_ion = np.array([ion is not None and s[i].specie.symbol == ion[0] and int(val[i]) == ion[1]
                           for i in r.site_index], dtype=bool)
        for t in TARGETS:
            per_material[t].append(vals[t])
            per_sample[t].append(np.where(on_ion, vals[t], np.nan))
    pm = {t: np.asarray(per_material[t], dtype=np.float64) for t in TARGETS}
    n_with = {t: int(np.sum(np.isfinite(pm[t]))) for t in TARGETS}
    info = {"bvlain_version": cache.bvlain_version or bvlain_version(), "settings": cache.settings,
            "citation": CITATION, "mobile_ions": [ion_label(i) for i in MOBILE_IONS],
            "counts": {"materials_with_mobile_ion": int(sum(1 for i in ions if i)),
                       **{f"materials_with_{t}": n_with[t] for t in TARGETS}, **counts}}
    return {"per_sample": {t: np.concatenate(per_sample[t]) if per_sample[t] else np.zeros(0) for t in TARGETS},
            "per_material": pm, "ion": ions, "reasons": reasons, "info": info}
