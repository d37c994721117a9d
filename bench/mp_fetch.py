"""Benchmark: what ``data_prep fetch --source mp`` costs per material on the partitioned stand-in.

Usage::

    python bench/mp_fetch.py [--materials 1000] [--points 301] [--rows-per-group 1] [--rows-per-file 250]
                             [--latency-ms 5] [--concurrency 4] [--without-run-type] [--json PATH]

Runs against the local stand-in server of the tests (``tests/mp_server.py``: MP's REST endpoints
and the two DOS Delta tables, partitioned by run type, many materials per data file, behind a
minimal S3 on 127.0.0.1), not against the Materials Project. The stand-in holds the test materials
(records_factory crystals of 2-6 atoms, two uniform DOS tasks of different run types per material,
plus one of each problem case) and rescaled copies up to ``--materials``; each DOS has ``--points``
energies, projected on every site and m orbital. Every request waits ``--latency-ms`` on the
server.

Reported, from the server's own accounting: object-store bytes and GETs per material (data files
and Delta log separately), REST requests per material, the bound on data bytes per material that
the table layout implies (per table: the largest parquet footer + page index of a data file, plus
the largest row group), the sizes of the tables, wall time and records per second.
``--without-run-type`` makes the DOS queries name the identifier only (what the fetcher did before
it filtered by the run-type partition), for comparison; it is a separate invocation because the
Delta reader keeps state (parquet metadata) within a process.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def layout_bound(folder: Path) -> dict:
    """Per table: data files, total bytes, largest footer (+ page index) and largest row group."""
    files = json.loads((folder / "s3_files.json").read_text())
    out: dict = {}
    for info in files.values():
        t = out.setdefault(info["kind"], {"files": 0, "bytes": 0, "max_footer": 0, "max_group": 0,
                                          "groups": 0, "max_materials_per_file": 0})
        t["files"] += 1
        t["bytes"] += info["size"]
        t["groups"] += len(info["groups"])
        t["max_footer"] = max(t["max_footer"], info["size"] - max(g[1] for g in info["groups"]))
        t["max_group"] = max(t["max_group"], max(g[1] - g[0] for g in info["groups"]))
        t["max_materials_per_file"] = max(t["max_materials_per_file"],
                                          len({m for g in info["groups"] for m in g[2]}))
    for t in out.values():
        t["bound_per_material"] = t["max_footer"] + t["max_group"]
    return out


def run_once(server, concurrency: int, latency_s: float, out: Path, run_type_filter: bool = True) -> dict:
    import data_prep.mp.api as api
    from data_prep.mp import FetchConfig, fetch_mp

    server.reset()
    server.config(latency_s=latency_s)
    saved = api.run_type_value
    if not run_type_filter:
        api.run_type_value = lambda run_type: None
    try:
        t0 = time.perf_counter()
        m = fetch_mp(FetchConfig(concurrency=concurrency, backoff_s=0.05), out, progress=False,
                     log=lambda line: None)
        wall = time.perf_counter() - t0
    finally:
        api.run_type_value = saved
    stats = server.stats()
    n = max(1, m["counts"]["targets"])
    rest = sum(v for k, v in stats["requests"].items()
               if k in ("heartbeat", "summary", "electronic_structure", "oxidation_states", "materials"))
    data_bytes = stats["bytes"].get("total_dos", 0) + stats["bytes"].get("projected_dos", 0)
    log_bytes = stats["bytes"].get("delta_log", 0)
    gets = sum(v for k, v in stats["gets"].items())
    dups = {k: sum(1 for v in stats["tasks"].get(k, {}).values() if v > 1) for k in ("total_dos", "projected_dos")}
    recs = sorted(out.glob("*.npz"))
    sizes = [p.stat().st_size for p in recs]
    atoms = sum(e.get("n_atoms", 0) for e in json.loads((out / "index.json").read_text())["materials"].values()
                if e.get("status") == "complete")
    return {"concurrency": concurrency, "run_type_filter": run_type_filter, "wall_s": round(wall, 1),
            "targets": m["counts"]["targets"], "fetched": m["counts"]["fetched"],
            "skipped": m["counts"]["skipped"], "failed": m["counts"]["failed"],
            "records_per_s": round(m["counts"]["fetched"] / wall, 2),
            "rest_requests_per_material": round(rest / n, 3),
            "store_gets_per_material": round(gets / n, 2),
            "store_data_bytes_per_material": int(data_bytes / n),
            "store_total_dos_bytes_per_material": int(stats["bytes"].get("total_dos", 0) / n),
            "store_projected_dos_bytes_per_material": int(stats["bytes"].get("projected_dos", 0) / n),
            "delta_log_bytes": log_bytes, "tasks_downloaded_more_than_once": dups,
            "mean_record_bytes": int(sum(sizes) / max(1, len(sizes))),
            "record_bytes_per_atom": int(sum(sizes) / max(1, atoms)),
            "store_data_bytes_per_fetched_atom": int(data_bytes / max(1, atoms))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--materials", type=int, default=1000, help="materials in the stand-in (>= 15)")
    ap.add_argument("--points", type=int, default=301, help="DOS energies per material (MP: 2001)")
    ap.add_argument("--rows-per-group", type=int, default=1, help="DOS tasks per parquet row group")
    ap.add_argument("--rows-per-file", type=int, default=250, help="DOS tasks per data file")
    ap.add_argument("--latency-ms", type=float, default=5.0, help="server-side delay per request")
    ap.add_argument("--concurrency", type=int, help="worker threads (default: FetchConfig's)")
    ap.add_argument("--without-run-type", action="store_true", help="query without the run-type filter")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    from data_prep.mp import FetchConfig
    from mp_server import StandIn, build_standin, default_specs

    k = args.concurrency or FetchConfig().concurrency
    work = Path(tempfile.mkdtemp(prefix="mp_fetch_bench_"))
    try:
        t0 = time.perf_counter()
        specs = default_specs(n_extra=max(0, args.materials - 15), n_points=args.points)
        build_standin(work / "standin", specs, rows_per_group=args.rows_per_group,
                      rows_per_file=args.rows_per_file)
        layout = layout_bound(work / "standin")
        print(f"stand-in: {len(specs)} materials, {args.points} DOS points, {args.rows_per_group} task(s) per "
              f"row group, built in {time.perf_counter() - t0:.0f} s; latency {args.latency_ms:g} ms per request",
              flush=True)
        for kind, t in layout.items():
            print(f"  {kind}: {t['files']} data files, {t['bytes'] / 2**20:.1f} MiB, up to "
                  f"{t['max_materials_per_file']} materials per file; largest footer {t['max_footer'] / 1024:.0f} kB, "
                  f"largest row group {t['max_group'] / 1024:.0f} kB -> bound {t['bound_per_material'] / 1024:.0f} kB "
                  "per material", flush=True)
        results = []
        with StandIn(work / "standin") as server:
            os.environ.update(server.env())
            runs = [not args.without_run_type]
            for i, rt in enumerate(runs):
                r = run_once(server, k, args.latency_ms / 1000.0, work / f"out-{i}", run_type_filter=rt)
                results.append(r)
                print(f"concurrency {k}{'' if rt else ', WITHOUT the run-type filter'}: {r['fetched']} records "
                      f"({r['skipped']} skipped, {r['failed']} failed) of {r['targets']} in {r['wall_s']:.0f} s = "
                      f"{r['records_per_s']:.2f} records/s; per material: "
                      f"{r['store_data_bytes_per_material'] / 1024:.0f} kB from the DOS tables "
                      f"(total {r['store_total_dos_bytes_per_material'] / 1024:.0f} kB, projections "
                      f"{r['store_projected_dos_bytes_per_material'] / 1024:.0f} kB), "
                      f"{r['store_gets_per_material']} object-store GETs, {r['rest_requests_per_material']} REST "
                      f"requests; Delta log {r['delta_log_bytes'] / 1024:.0f} kB in all; "
                      "DOS tasks whose row group was downloaded more than once: "
                      f"{r['tasks_downloaded_more_than_once']}; records "
                      f"{r['mean_record_bytes'] / 1024:.0f} kB each, {r['record_bytes_per_atom'] / 1024:.1f} kB per atom",
                      flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({
                "materials": len(specs), "points": args.points, "rows_per_group": args.rows_per_group,
                "rows_per_file": args.rows_per_file, "latency_ms": args.latency_ms, "layout": layout,
                "results": results,
                "python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()},
                indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
