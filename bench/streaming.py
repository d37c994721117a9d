"""Benchmark: training from an h5 larger than memory (streaming) against training in memory.

Usage::

    python bench/streaming.py [--size-gb 10] [--reference-gb 1] [--epochs 1] [--fusion late]
                              [--dos-compression lzf|none] [--repeat 1] [--tmp-dir DIR] [--json PATH]

1. Writes a synthetic file in data_prep's layout (``data_prep/synthetic_h5.py``: one sample per
   lzf chunk, 216 kB of float32 DOS per sample at 2000 x 27) whose DOS takes ``--size-gb`` GB
   (10^9 bytes, uncompressed), and a ``--reference-gb`` one (the same file when it is no larger),
   in a temporary folder that is removed afterwards.
2. In a fresh process each (``bench/speed.py``): trains ``--epochs`` epochs of the root model
   (params.json, ``--fusion``, batch 32) on the training split (80 %) of
   a. the big file, streaming (``data.in_memory: false``),
   b. the reference file, streaming (``--repeat`` N times, each in its own fresh process: the
      lzf runs of docs/scaling.md were about half as fast the second time), and
   c. the reference file, in memory (``data.in_memory: true``).
3. Reports for each: samples/s of the last epoch (with one epoch it includes the first steps'
   tracing, the same for all three), the first epoch's, the seconds of the scaling-statistics
   pass, and the process's peak resident memory (``resource.getrusage``: Python, TensorFlow,
   model and data together); and, to tell a run that did more work from one that waited, its CPU
   ms per sample (all threads, best epoch), the MB it fetched from storage during training
   (page-cache hits excluded) and its involuntary context switches (``bench/speed.py``). Goals:
   peak RSS <= 3 GB at 10 GB of data; streaming >= 0.9x the in-memory samples/s on the reference
   file (issue 18; 0.8x before), reported for every streaming run of it.

The file has just been written, so it is (partly) in the page cache: with a file much larger than
memory, reads come from the disk at its speed instead.
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
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import run_child  # noqa: E402


def _write(path, gb: float, length: int, compression: str | None = "lzf") -> dict:
    from tqdm import tqdm

    from data_prep.synthetic_h5 import samples_for_bytes, write_synthetic_h5

    n = samples_for_bytes(gb * 1e9, length)
    bar = tqdm(total=n, unit="sample", desc=f"writing {path.name}", disable=None)
    t0 = time.perf_counter()
    info = write_synthetic_h5(path, n, n_points=length, progress=lambda j: bar.update(j - bar.n),
                              compression=compression)
    bar.close()
    info["seconds"] = round(time.perf_counter() - t0, 1)
    info["file_gb"] = round(path.stat().st_size / 1e9, 3)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=10.0, help="DOS size of the big file, GB (default 10)")
    ap.add_argument("--reference-gb", type=float, default=1.0,
                    help="DOS size of the file trained both ways (default 1; must fit in memory)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--fusion", default="late", help="root model fusion (default late, params.json's)")
    ap.add_argument("--length", type=int, default=2000, help="grid points (default 2000)")
    ap.add_argument("--dos-compression", choices=("lzf", "none"), default="lzf",
                    help="DOS compression of both files, as build --dos-compression (default lzf)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="streaming runs of the reference file, each in a fresh process (default 1)")
    ap.add_argument("--tmp-dir", help="where the temporary folder goes (default: the system's)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dosnet-bench-", dir=args.tmp_dir))
    free = shutil.disk_usage(work).free / 1e9
    need = (args.size_gb + min(args.size_gb, args.reference_gb)) * 1.05
    if free < need:
        shutil.rmtree(work, ignore_errors=True)
        print(f"bench/streaming.py: error: {work.parent} has {free:.1f} GB free, the files need about {need:.1f} GB",
              file=sys.stderr)
        return 1
    try:
        comp = None if args.dos_compression == "none" else args.dos_compression
        big = _write(work / "big.h5", args.size_gb, args.length, comp)
        if args.reference_gb < args.size_gb:
            ref = _write(work / "reference.h5", args.reference_gb, args.length, comp)
        else:
            ref = big
        base = {"epochs": args.epochs, "params": {"fusion": args.fusion, "length": args.length}}
        runs = {}
        plan = [("big, streaming", big["path"], False)]
        plan += [("reference, streaming" + (f" #{k + 1}" if k else ""), ref["path"], False)
                 for k in range(max(1, args.repeat))]
        plan += [("reference, in memory", ref["path"], True)]
        for name, path, in_memory in plan:
            cfg = json.loads(json.dumps(base))
            cfg["params"]["data"] = {"in_memory": in_memory}
            print(f"training: {name} ...", file=sys.stderr, flush=True)
            runs[name] = run_child(path, cfg)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mem_sps = runs["reference, in memory"]["samples_per_s"]
    ratios = {name: round(r["samples_per_s"] / mem_sps, 3) for name, r in runs.items()
              if name.startswith("reference, streaming")}
    ratio = ratios["reference, streaming"]
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
              "dos_compression": args.dos_compression, "big_file": big, "reference_file": ref, "runs": runs,
              "streaming_over_in_memory": round(ratio, 3), "streaming_over_in_memory_each": ratios,
              "goals": {"peak_rss_gb_at_big": runs["big, streaming"]["peak_rss_gb"], "peak_rss_goal_gb": 3.0,
                        "throughput_ratio": round(ratio, 3), "throughput_ratio_goal": 0.9}}
    print(f"\nsynthetic files ({args.dos_compression}): {big['dos_bytes'] / 1e9:.2f} GB of DOS ({big['n_samples']} "
          f"samples, written in "
          f"{big['seconds']} s, {big['file_gb']} GB on disk)"
          + ("" if ref is big else f"; reference {ref['dos_bytes'] / 1e9:.2f} GB ({ref['n_samples']} samples)"))
    print(f"{'run':27s} {'DOS GB':>7s} {'train rows':>10s} {'samples/s':>10s} {'1st epoch':>10s} "
          f"{'stats pass s':>12s} {'peak RSS GB':>11s} {'CPU ms/sample':>13s} {'read MB':>8s} {'preempted':>9s}")
    for name, r in runs.items():
        print(f"{name:27s} {r['dos_gb']:7.2f} {r['train_rows']:10d} {r['samples_per_s']:10.1f} "
              f"{r['first_epoch_samples_per_s']:10.1f} {r['scaler_seconds']:12.1f} {r['peak_rss_gb']:11.2f} "
              f"{r['cpu_ms_per_sample']:13.2f} {r['fit_read_mb'] if r['fit_read_mb'] is not None else -1:8.1f} "
              f"{r['fit_involuntary_switches']:9d}")
    print("streaming / in memory on the reference file: " + ", ".join(f"{v:.2f}" for v in ratios.values())
          + f" (goal >= 0.9); peak RSS streaming "
          f"{args.size_gb:g} GB: {runs['big, streaming']['peak_rss_gb']:.2f} GB (goal <= 3)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
