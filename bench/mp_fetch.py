"""Benchmark: records written per second by ``data_prep fetch --source mp``, concurrency 1 vs the default.

Usage::

    python bench/mp_fetch.py [--extra 25] [--latency-ms 20] [--points 2001] [--json PATH]

Runs against the local stand-in server of the tests (``tests/mp_server.py``: MP's REST endpoints
and the Delta Lake DOS tables behind a minimal S3), not against the Materials Project. The
stand-in holds the test materials (records_factory crystals, 2-6 atoms, plus one of each problem
case) and ``--extra`` rescaled copies; each DOS has ``--points`` energies (2001 = NEDOS of
pymatgen's ``MPNonSCFSet``, the input set of MP's uniform DOS runs) and m-resolved projections.
Every request (REST and object-store range read) waits ``--latency-ms`` on the server, a stand-in
for the network round trip; with 0 the run measures client CPU only.

Both runs use the real client (mp-api ``MPRester`` + Delta reads, BVAnalyzer, atomic record
writes) with a fresh output folder, in one process, same server. Reported per run: wall time of
the whole fetch (connection, selection, DOS store open, all materials), records written per
second, requests per material and mean record size; the rate includes the fixed start-up
(connection, selection, opening the DOS tables), so it grows with the number of materials.
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


def run_once(server, concurrency: int, latency_s: float, out: Path) -> dict:
    from data_prep.mp import FetchConfig, fetch_mp

    server.reset()
    server.config(latency_s=latency_s)
    t0 = time.perf_counter()
    m = fetch_mp(FetchConfig(concurrency=concurrency, backoff_s=0.05), out, progress=False, log=lambda line: None)
    wall = time.perf_counter() - t0
    stats = server.stats()
    n_req = sum(v for k, v in stats["requests"].items())
    recs = sorted(out.glob("*.npz"))
    sizes = [p.stat().st_size for p in recs]
    atoms = [e.get("n_atoms", 0) for e in json.loads((out / "index.json").read_text())["materials"].values()
             if e.get("status") == "complete"]
    return {"concurrency": concurrency, "wall_s": round(wall, 2), "fetched": m["counts"]["fetched"],
            "skipped": m["counts"]["skipped"], "failed": m["counts"]["failed"],
            "records_per_s": round(m["counts"]["fetched"] / wall, 3),
            "requests": n_req, "requests_per_material": round(n_req / max(1, m["counts"]["targets"]), 1),
            "mean_record_bytes": int(sum(sizes) / max(1, len(sizes))),
            "bytes_per_atom": int(sum(sizes) / max(1, sum(atoms)))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extra", type=int, default=25, help="rescaled copies added to the 15 test materials")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="server-side delay per request")
    ap.add_argument("--points", type=int, default=2001, help="DOS energies per material")
    ap.add_argument("--concurrency", type=int, help="the 'default' run's concurrency (default: FetchConfig's)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    from data_prep.mp import FetchConfig
    from mp_server import StandIn, build_standin, default_specs

    default_k = args.concurrency or FetchConfig().concurrency
    work = Path(tempfile.mkdtemp(prefix="mp_fetch_bench_"))
    try:
        t0 = time.perf_counter()
        specs = default_specs(n_extra=args.extra, n_points=args.points)
        build_standin(work / "standin", specs)
        print(f"stand-in: {len(specs)} materials, {args.points} DOS points, built in "
              f"{time.perf_counter() - t0:.1f} s; latency {args.latency_ms:g} ms per request", flush=True)
        results = []
        with StandIn(work / "standin") as server:
            os.environ.update(server.env())
            for k in (1, default_k):
                r = run_once(server, k, args.latency_ms / 1000.0, work / f"out-{k}")
                results.append(r)
                print(f"concurrency {k}: {r['fetched']} records in {r['wall_s']:.1f} s = "
                      f"{r['records_per_s']:.2f} records/s ({r['requests_per_material']} requests per material, "
                      f"{r['mean_record_bytes'] / 1024:.0f} kB per record, {r['bytes_per_atom'] / 1024:.0f} kB per atom)",
                      flush=True)
        speedup = results[1]["records_per_s"] / results[0]["records_per_s"]
        print(f"speed-up with concurrency {default_k}: {speedup:.2f}x")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "materials": len(specs), "points": args.points, "latency_ms": args.latency_ms,
                "results": results, "speedup": round(speedup, 2), "python": platform.python_version(),
                "cpus": os.cpu_count(), "machine": platform.machine()}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
