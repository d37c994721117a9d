"""Benchmark: the two speed ratios of issue 18 from one run each, measured as paired, interleaved epochs.

Usage::

    python bench/paired.py [--data H5 | --samples 1500] [--rounds 6] [--pairs bonds stream bonds_site]
                           [--dos-compression lzf|none] [--bond-slots 128] [--json PATH]

Why paired: on a shared machine, identical fresh processes differ by +-25 % (docs/scaling.md),
as much as the effects the goals ask to resolve, so comparing runs made minutes apart in separate
processes (``throughput.py``, ``streaming.py``) cannot settle a ratio near 0.9 or 1.0. Here every
configuration of a pair is built once, in one process, and trained one epoch at a time in turn:
round r trains A then B (B then A in odd rounds, so that a slow drift of the machine cancels), and
each round gives one ratio of A's samples/s to B's from two epochs a few seconds apart. The
report is the median of the per-round ratios with their range, and the ratio of the best epochs.
One warm-up epoch per configuration (tracing, first allocations) is not counted.

Pairs (``--pairs``; bonds and stream by default):

- ``bonds``: the root model with the bond-aware structure branch (``late``, ``structure_input``
  bonds, params.json's targets) against the upstream DOSnet architecture (``DOSnet/net.py``, one
  target), both in memory, batch 32 (goal >= 1.0x);
- ``bonds_site``: the same bond-aware model reading the DOS of the site alone (``n_neighbours``
  0: one featurizer pass per sample instead of three; the bond table describes the neighbours)
  against the upstream architecture (goal >= 1.0x);
- ``stream``: the root model (``late``, the structure vector) streaming the DOS from the h5
  (``data.in_memory`` false) against the same model in memory (goal >= 0.9x).

Data: ``--data H5`` (e.g. ``data/embedded.h5``; it needs a bond table for ``bonds``), else a
synthetic file in data_prep's layout (``data_prep/synthetic_h5.py``: ``--samples`` samples of 2000
x 27, a random bond table of ``--bond-slots`` slots, ``--dos-compression``) in a temporary
folder, removed afterwards. Models are built as ``bench/speed.py`` builds them (train.py's code
path for the root model).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

#: name -> (A, B, goal for A/B): A and B are ``bench/speed.py`` configurations
PAIRS = {
    "bonds": ({"params": {"fusion": "late", "structure_input": "bonds", "data": {"in_memory": True}}},
              {"model": "dosnet", "params": {"data": {"in_memory": True}}}, 1.0),
    "bonds_site": ({"params": {"fusion": "late", "structure_input": "bonds", "n_neighbours": 0,
                               "data": {"in_memory": True}}},
                   {"model": "dosnet", "params": {"data": {"in_memory": True}}}, 1.0),
    "stream": ({"params": {"fusion": "late", "data": {"in_memory": False}}},
               {"params": {"fusion": "late", "data": {"in_memory": True}}}, 0.9),
}
LABELS = {"bonds": ("bond-aware model (late, bonds), in memory", "upstream DOSnet architecture, in memory"),
          "bonds_site": ("bond-aware model on the site's DOS alone (n_neighbours 0), in memory",
                         "upstream DOSnet architecture, in memory"),
          "stream": ("root model (late), streaming", "root model (late), in memory")}


def epoch_seconds(run: dict) -> float:
    """Wall-clock seconds of one training epoch of a ``speed.prepare`` result, from the epoch's
    start to its end (``speed.epoch_timer``, as ``throughput.py`` times them): what ``fit`` does
    before the epoch starts (Keras turning in-memory arrays into a dataset, once per call here but
    once per run in a multi-epoch ``fit``) is left out."""
    from speed import epoch_timer

    times: list = []
    run["model"].fit(**run["fit"], epochs=1, verbose=0, callbacks=[epoch_timer(times)])
    return times[0]


def paired(a: dict, b: dict, rounds: int, log=print) -> dict:
    """Train ``a`` and ``b`` (``speed.prepare`` results) one epoch each per round, in alternating
    order after one warm-up epoch each; samples/s of every epoch and the per-round ratios a/b."""
    for run in (a, b):
        epoch_seconds(run)
    sps_a, sps_b = [], []
    for r in range(rounds):
        for run, out in ((a, sps_a), (b, sps_b)) if r % 2 == 0 else ((b, sps_b), (a, sps_a)):
            out.append(run["n"] / epoch_seconds(run))
        log(f"round {r + 1}/{rounds}: {sps_a[-1]:.0f} / {sps_b[-1]:.0f} samples/s = {sps_a[-1] / sps_b[-1]:.3f}")
    ratios = [x / y for x, y in zip(sps_a, sps_b)]
    return {"samples_per_s_a": [round(x, 1) for x in sps_a], "samples_per_s_b": [round(x, 1) for x in sps_b],
            "ratios": [round(x, 3) for x in ratios], "median_ratio": round(statistics.median(ratios), 3),
            "min_ratio": round(min(ratios), 3), "max_ratio": round(max(ratios), 3),
            "best_over_best": round(max(sps_a) / max(sps_b), 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="a data_prep h5 (default: a synthetic file)")
    ap.add_argument("--samples", type=int, default=1500, help="samples of the synthetic file (default 1500)")
    ap.add_argument("--rounds", type=int, default=6, help="paired rounds per pair (default 6)")
    ap.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=["bonds", "stream"])
    ap.add_argument("--dos-compression", choices=("lzf", "none"), default="lzf",
                    help="DOS compression of the synthetic file (default lzf, as data_prep build)")
    ap.add_argument("--bond-slots", type=int, default=128, help="bond slots of the synthetic file (default 128)")
    ap.add_argument("--tmp-dir")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.data and not Path(args.data).is_file():
        ap.error(f"--data {args.data}: no such file")
    from speed import peak_rss_gb, prepare

    work = None
    t_start = time.time()
    try:
        if args.data:
            h5, about = args.data, {"path": args.data}
        else:
            from data_prep.synthetic_h5 import write_synthetic_h5

            work = Path(tempfile.mkdtemp(prefix="dosnet-paired-", dir=args.tmp_dir))
            about = write_synthetic_h5(work / "bench.h5", args.samples, bond_slots=args.bond_slots,
                                       compression=None if args.dos_compression == "none" else "lzf")
            about["dos_compression"] = args.dos_compression
            h5 = about["path"]
        results = {}
        for name in args.pairs:
            cfg_a, cfg_b, goal = PAIRS[name]
            print(f"{name}: {LABELS[name][0]} against {LABELS[name][1]}", file=sys.stderr, flush=True)
            a, b = prepare(h5, cfg_a), prepare(h5, cfg_b)
            res = paired(a, b, args.rounds, log=lambda line: print("  " + line, file=sys.stderr, flush=True))
            results[name] = {"a": LABELS[name][0], "b": LABELS[name][1], "goal": goal, "train_rows": a["n"], **res}
            del a, b
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{about['path'] if args.data else 'synthetic file'}; {args.rounds} paired rounds of one epoch per model "
          f"after a warm-up epoch; {os.cpu_count()} CPUs; {time.time() - t_start:.0f} s; peak RSS {peak_rss_gb():.2f} GB")
    print("| A against B | training rows | A samples/s, median | B samples/s, median | A/B per round: median "
          "(range) | best over best | goal |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {r['a']} / {r['b']} | {r['train_rows']} | {statistics.median(r['samples_per_s_a']):.0f} | "
              f"{statistics.median(r['samples_per_s_b']):.0f} | {r['median_ratio']:.3f} ({r['min_ratio']:.3f}-"
              f"{r['max_ratio']:.3f}) | {r['best_over_best']:.3f} | >= {r['goal']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                                                          f"{platform.platform()}", "file": about,
                                               "rounds": args.rounds, "pairs": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
