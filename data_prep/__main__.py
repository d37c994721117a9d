"""``python -m data_prep``: build, export and inspect DOSnet-BV datasets; compute the embedded one.

    python -m data_prep build --source embedded --out data/embedded.h5
    python -m data_prep build --source records DIR --out data/mine.h5 [--shard I/N]
    python -m data_prep export data/embedded.h5 --format npy|upstream [--out PATH]
    python -m data_prep inspect data/embedded.h5 [--plot]
    python -m data_prep compute-embedded [--out DIR] [--procs 2] [--time-limit 600] [--shard I/N]
    python -m data_prep fetch --source mp --out DIR [--limit N] [--elements ...] [--shard I/N] ...
    python -m data_prep import vasp RUN_DIR_OR_VASPRUN... --out DIR   # your DFT -> records
    python -m data_prep import pymatgen COMPLETE_DOS.json... --out DIR
    python -m data_prep migration --source embedded [--procs 1] [--time-limit 300]   # BVSE barrier cache
    python -m data_prep merge OUT IN1 IN2 ...          # record folders
    python -m data_prep merge OUT.h5 A.h5 B.h5 ...     # shard builds -> the unsharded build

``--shard I/N`` (1 <= I <= N) keeps the materials whose stable id hash falls in part I
(``data_prep/shards.py``): N runs of a job array cover every material exactly once.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

# spglib (2.x) prints "spglib: ... failed." to stderr when one of its internal refinements needs a
# retry, then returns a result anyway (e.g. a relaxed structure a hair away from higher symmetry at
# symprec 0.01); the build handles real failures itself. Set SPGLIB_WARNING=ON to see them.
os.environ.setdefault("SPGLIB_WARNING", "OFF")

from data_prep.cli import OneLineParser, error_tail

EMBEDDED_SPECTRA = Path(__file__).resolve().parent / "embedded" / "spectra"
EMBEDDED_SPECTRA_PBE = Path(__file__).resolve().parent / "embedded" / "spectra_pbe"


def _parser():
    p = OneLineParser(prog="python -m data_prep", description="DOSnet-BV data preparation")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=OneLineParser)
    b = sub.add_parser("build", help="records -> one h5")
    b.add_argument("--source", nargs="+", required=True, metavar="SOURCE",
                   help="'embedded' or 'records DIR'")
    b.add_argument("--out", required=True)
    b.add_argument("--params", help="params.json whose 'data' section sets grid, neighbours, split, ...")
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--procs", type=int, default=2)
    b.add_argument("--shard", metavar="I/N", help="build part I of N (stable hash of the material id); "
                                                  "merge the N h5 files with: python -m data_prep merge")
    b.add_argument("--dos-compression", choices=("lzf", "none"), default="lzf",
                   help="lzf (default: smaller file) or none (reads ~13x faster: for streaming training)")
    b.add_argument("--migration-time-limit", type=float, default=300.0,
                   help="seconds per material for BVSE barriers not in the cache (needs bvlain)")
    e = sub.add_parser("export", help="h5 -> npy files or the upstream DOSnet pickle")
    e.add_argument("h5")
    e.add_argument("--format", choices=("npy", "upstream"), required=True)
    e.add_argument("--out", help="folder (npy) or file (upstream); default beside the h5")
    e.add_argument("--target", default="bvs_vu", help="target for --format upstream")
    e.add_argument("--overwrite", action="store_true")
    i = sub.add_parser("inspect", help="summary of an h5")
    i.add_argument("h5")
    i.add_argument("--plot", action="store_true", help="also save <h5>.png (one sample's DOS, target histograms)")
    i.add_argument("--sample", type=int, default=0)
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    c = sub.add_parser("compute-embedded", help="recompute the embedded spectra (PBE: a day on 2 cores)")
    c.add_argument("--method", choices=("pbe", "xtb"), default="pbe",
                   help="pbe: GPAW PBE + CHGNet relaxation (needs the 'compute' extra); xtb: GFN1-xTB")
    c.add_argument("--out", help=f"record folder (default {EMBEDDED_SPECTRA_PBE} for pbe, {EMBEDDED_SPECTRA} for xtb)")
    c.add_argument("--procs", type=int, default=2)
    c.add_argument("--time-limit", type=float, default=600.0, help="CPU seconds per material (the worker's own: other work on the cores does not count; wall clock at most 4x)")
    c.add_argument("--limit", type=int, help="compute at most this many materials")
    c.add_argument("--n-substituted", type=int, default=1000)
    c.add_argument("--structures", metavar="JSON",
                   help="read the collected structures from this file if it exists, else collect them and write it "
                        "there (a resumed run then skips the minutes of collection)")
    c.add_argument("--retry-failed", action="store_true")
    c.add_argument("--shard", metavar="I/N", help="compute part I of N (stable hash of the material id; applied "
                                                  "after --limit); give each shard its own --out")
    f = sub.add_parser("fetch", help="Materials Project -> one record per material (resumable, shardable)")
    f.add_argument("--source", required=True, choices=("mp",), help="data source (mp: the Materials Project)")
    f.add_argument("--out", required=True, help="records folder (created; a rerun resumes)")
    f.add_argument("--params", help="JSON file whose 'mp' section sets any of the options below (flags win)")
    f.add_argument("--limit", type=int, help="first N materials of the selection (by id), before sharding")
    f.add_argument("--elements", nargs="+", metavar="EL", help="materials containing all of these elements")
    f.add_argument("--exclude-elements", nargs="+", metavar="EL", help="materials containing none of these")
    f.add_argument("--nelements-max", type=int, help="at most this many elements")
    f.add_argument("--nelements-min", type=int, help="at least this many elements")
    f.add_argument("--energy-above-hull-max", type=float, metavar="EV", help="eV/atom above the convex hull")
    f.add_argument("--stable-only", action="store_true", default=None, help="only materials on the hull")
    f.add_argument("--no-theoretical", action="store_true", default=None,
                   help="only materials matched to an experimental (ICSD) structure")
    f.add_argument("--shard", metavar="I/N", help="fetch part I of N (stable hash of the material id)")
    f.add_argument("--concurrency", type=int, help="worker threads (default 4)")
    f.add_argument("--batch-size", type=int, help="material ids per API request (default 50)")
    f.add_argument("--endpoint", help="API endpoint (default: mp-api's, i.e. MP_API_ENDPOINT or the public API)")
    f.add_argument("--retries", type=int, help="attempts per request on timeouts, 429 and 5xx (default 6)")
    f.add_argument("--backoff", type=float, dest="backoff_s", metavar="S",
                   help="first retry delay in seconds, doubled each attempt, with jitter (default 1)")
    f.add_argument("--weights", choices=("float32", "float16"),
                   help="precision of the stored projections (float16: half the disk; default float32)")
    f.add_argument("--abort-after", type=int, metavar="N",
                   help="stop when the first N materials all fail for one reason a retry cannot fix (default 20)")
    f.add_argument("--retry-skipped", action="store_true", default=None,
                   help="try again the materials an earlier run skipped")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    u = sub.add_parser("import", help="your DFT (vasprun.xml with LORBIT = 11, or a pymatgen CompleteDos JSON) "
                                      "-> records for build --source records")
    u.add_argument("format", choices=("vasp", "pymatgen"), help="vasp: run folders or vasprun.xml files; "
                                                                 "pymatgen: CompleteDos JSON files")
    u.add_argument("paths", nargs="+", metavar="PATH")
    u.add_argument("--out", required=True, help="records folder (created)")
    g = sub.add_parser("migration", help="compute the BVSE migration barriers of records into a cache "
                                         "(needs bvlain; resumable; build reads the cache)")
    g.add_argument("--source", nargs="+", required=True, metavar="SOURCE", help="'embedded' or 'records DIR'")
    g.add_argument("--cache", help="cache JSON (default: the embedded cache for --source embedded, "
                                   "else DIR/migration_barriers.json)")
    g.add_argument("--procs", type=int, default=1)
    g.add_argument("--time-limit", type=float, default=300.0, help="seconds per material")
    g.add_argument("--resolution", type=float, default=0.2, help="BVSE grid spacing in Angstrom (default 0.2)")
    g.add_argument("--retry-failed", action="store_true")
    m = sub.add_parser("merge", help="combine record folders (refuses duplicates that differ), or shard h5 "
                                     "builds into one h5 equal to the unsharded build")
    m.add_argument("out", help="output folder, or output .h5 file")
    m.add_argument("inputs", nargs="+", help="record folders, or h5 files")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output h5")
    return p


_FETCH_FLAGS = ("limit", "elements", "exclude_elements", "nelements_max", "nelements_min",
                "energy_above_hull_max", "stable_only", "no_theoretical", "shard", "concurrency",
                "batch_size", "endpoint", "retries", "backoff_s", "retry_skipped", "weights", "abort_after")


def _fetch_config(args):
    from data_prep.mp import FetchConfig, FetchError, parse_shard

    d = {}
    if args.params:
        try:
            d = json.loads(Path(args.params).read_text()).get("mp", {})
        except (OSError, json.JSONDecodeError, AttributeError) as exc:
            raise FetchError(f"cannot read params {args.params}: {exc}") from None
        if not isinstance(d, dict):
            raise FetchError(f"params {args.params}: 'mp' must be an object")
    for name in _FETCH_FLAGS:
        v = getattr(args, name)
        if v is not None:
            d[name] = v
    if isinstance(d.get("shard"), str):
        d["shard"] = parse_shard(d["shard"])
    return FetchConfig.from_dict(d)


def _record_paths(source: list[str]):
    kind = source[0]
    if kind == "embedded":
        paths = sorted(EMBEDDED_SPECTRA.glob("*.npz"))
        if not paths:
            raise SystemExit(f"data_prep: error: no embedded spectra in {EMBEDDED_SPECTRA}")
        return paths, "embedded"
    if kind == "records":
        if len(source) != 2:
            raise SystemExit("data_prep: error: --source records needs a folder: --source records DIR")
        folder = Path(source[1])
        if not folder.is_dir():
            raise SystemExit(f"data_prep: error: records folder not found: {folder}")
        paths = sorted(folder.glob("*.npz"))
        if not paths:
            raise SystemExit(f"data_prep: error: no *.npz records in {folder}")
        return paths, f"records:{folder}"
    raise SystemExit(f"data_prep: error: unknown source {kind!r}; use 'embedded' or 'records DIR'")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from data_prep.build import BuildConfig, BuildError

    def run() -> int:
        if args.cmd == "build":
            from data_prep.build import build_h5

            paths, source = _record_paths(args.source)
            cfg = BuildConfig()
            if args.params:
                try:
                    params = json.loads(Path(args.params).read_text())
                except (OSError, json.JSONDecodeError) as exc:
                    raise BuildError(f"cannot read params {args.params}: {exc}") from None
                cfg = BuildConfig.from_params(params.get("data", {}))
            shard = None
            if args.shard:
                from data_prep.shards import parse_shard

                shard = parse_shard(args.shard)
            t0 = time.time()
            s = build_h5(paths, args.out, cfg, overwrite=args.overwrite, n_procs=args.procs, source=source, shard=shard,
                         dos_compression=None if args.dos_compression == "none" else "lzf",
                         migration_cache=migration_cache_path(args.source), migration_time_limit_s=args.migration_time_limit)
            part = f" (shard {args.shard})" if shard else ""
            fam = s["families"]
            print(f"wrote {s['out']}{part}: {s['n_materials']} materials, {s['n_samples']} samples "
                  f"in {fam['n_families']} families ({len(s['skipped'])} skipped, {fam['n_displaced']} derived "
                  f"materials placed by their own structure; both listed in {s['manifest']}) "
                  f"in {time.time() - t0:.0f} s")
        elif args.cmd == "merge" and _is_h5_merge(args):
            from data_prep.shards import merge_h5

            t0 = time.time()
            s = merge_h5(args.out, args.inputs, overwrite=args.overwrite)
            print(f"merged {len(args.inputs)} h5 files into {s['out']}: {s['n_materials']} materials, "
                  f"{s['n_samples']} samples, split recomputed over all of them ({time.time() - t0:.0f} s)")
        elif args.cmd == "export":
            from data_prep.export import export_npy, export_upstream

            h5 = Path(args.h5)
            if args.format == "npy":
                out = Path(args.out) if args.out else h5.with_name(h5.stem + "_npy")
                files = export_npy(h5, out, args.overwrite)
                print(f"wrote {', '.join(f.name for f in files)} to {out}")
            else:
                out = Path(args.out) if args.out else h5.with_name(f"{h5.stem}_{args.target}_upstream.pkl")
                export_upstream(h5, out, args.target, args.overwrite)
                print(f"wrote {out} (upstream DOSnet pickle: DOS with energy column, then {args.target}); "
                      f"train with: python -m DOSnet --data_dir {out}")
        elif args.cmd == "inspect":
            from data_prep.dataset import format_summary, plot_summary, summary

            s = summary(args.h5)
            print(json.dumps(s, indent=1) if args.json else format_summary(s))
            if args.plot:
                png = plot_summary(args.h5, Path(args.h5).with_suffix(".png"), args.sample)
                print(f"figure: {png}")
        elif args.cmd == "import":
            from data_prep.user_dft import import_runs

            r = import_runs(args.format, args.paths, args.out)
            for path, reason in r["failed"].items():
                print(f"data_prep: error: {reason}", file=sys.stderr)
            if r["written"]:
                print(f"wrote {len(r['written'])} record(s) to {args.out}; next: python -m data_prep build "
                      f"--source records {args.out} --out {Path(args.out).with_suffix('.h5')}")
            return 1 if r["failed"] else 0
        elif args.cmd == "migration":
            from data_prep import migration as mig

            if mig.bvlain_version() is None:
                raise BuildError("bvlain is not installed: pip install -e '.[migration]'")
            paths, _ = _record_paths(args.source)
            cache_path = migration_cache_path(args.source, args.cache)
            cache = mig.BarrierCache(cache_path, {"resolution_ang": args.resolution})
            t0 = time.time()
            c = mig.compute_missing(list(mig.structure_jobs(paths)), cache, n_procs=args.procs,
                                    time_limit_s=args.time_limit, retry_failed=args.retry_failed)
            print(f"{cache_path}: {c['computed']} computed, {c['failed']} failed, {c['cached']} already cached "
                  f"or without a mobile ion ({time.time() - t0:.0f} s)")
        elif args.cmd in ("fetch", "merge"):
            return _mp_command(args)
        elif args.cmd == "compute-embedded":
            from data_prep.embedded.compute import compute_embedded
            from data_prep.embedded.structures import (collect_structures, drop_bad_sources, read_structures_json,
                                                       write_structures_json)

            if args.structures and Path(args.structures).is_file():
                entries = read_structures_json(args.structures)
                kept = drop_bad_sources(entries)
                print(f"{len(entries)} structures read from {args.structures}"
                      + (f", {len(entries) - len(kept)} of them dropped (BAD_SOURCE_ENTRIES)" if len(kept) < len(entries) else ""),
                      file=sys.stderr)
                entries = kept
            else:
                entries = collect_structures(n_substituted=args.n_substituted)
                if args.structures:
                    write_structures_json(entries, args.structures)
            if args.limit:
                entries = entries[: args.limit]
            if args.shard:
                from data_prep.shards import in_shard, parse_shard

                shard = parse_shard(args.shard)
                entries = [e for e in entries if in_shard(e.material_id, shard)]
                print(f"shard {args.shard}: {len(entries)} materials", file=sys.stderr)
            out = args.out or str(EMBEDDED_SPECTRA_PBE if args.method == "pbe" else EMBEDDED_SPECTRA)
            summary_ = compute_embedded(entries, out, n_procs=args.procs, time_limit_s=args.time_limit,
                                        retry_failed=args.retry_failed, method=args.method)
            print(json.dumps(summary_, indent=1, default=str))
        return 0

    # OSError: disk full, permission, read-only file system: one line too
    return error_tail("data_prep", run, (BuildError, OSError), "interrupted; finished work is kept")


def migration_cache_path(source: list[str], explicit: str | None = None) -> Path:
    """The barrier cache of a source: the committed embedded one, or DIR/migration_barriers.json."""
    from data_prep.migration import EMBEDDED_CACHE

    if explicit:
        return Path(explicit)
    return EMBEDDED_CACHE if source[0] == "embedded" else Path(source[-1]) / "migration_barriers.json"


def _is_h5_merge(args) -> bool:
    """``merge OUT.h5 A.h5 ...``: the output or the inputs are HDF5 files, not record folders."""
    suffixes = (".h5", ".hdf5")
    return Path(args.out).suffix.lower() in suffixes or any(
        Path(p).is_file() and Path(p).suffix.lower() in suffixes for p in args.inputs)


def _mp_command(args) -> int:
    """fetch / merge: one line on stderr for every error, never a traceback, never the API key."""
    from data_prep.mp import FetchError, MergeError

    def run() -> int:
        if args.cmd == "merge":
            from data_prep.mp import merge_folders

            s = merge_folders(args.out, args.inputs)
            print(f"merged {s['records']} records into {s['out']} ({s['copied']} copied, "
                  f"{s['identical_duplicates']} identical duplicates, {s['skipped_entries']} skipped entries kept)")
            return 0
        from data_prep.mp import fetch_mp, format_summary

        cfg = _fetch_config(args)
        summary = fetch_mp(cfg, args.out, progress=not args.no_progress)
        print(format_summary(summary, args.out))
        return 1 if summary["counts"]["failed"] else 0

    def guarded() -> int:
        try:
            return run()
        except (FetchError, MergeError, OSError) as exc:  # OSError: an output folder that cannot be written
            print(f"data_prep: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 1
        except Exception as exc:  # a bug or an mp-api change: still one line, never the key
            from data_prep.mp.api import redact, resolve_api_key, short_reason

            try:
                key = resolve_api_key()[0]
            except Exception:  # noqa: BLE001 - no key configured: nothing to redact
                key = None
            print(f"data_prep: error: {args.cmd} failed unexpectedly: {type(exc).__name__}: "
                  f"{redact(short_reason(exc), key)}", file=sys.stderr)
            return 1

    return error_tail("data_prep", guarded, ())


if __name__ == "__main__":
    sys.exit(main())
