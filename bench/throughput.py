"""Benchmark: training samples/s of the upstream DOSnet architecture against the root model
(fusions none, late, early; the bond-aware structure branch; in memory and streaming), and what
helps on a CPU.

Usage::

    python bench/throughput.py [--samples 1500] [--rounds 2] [--epochs 4] [--only NAME ...] [--json PATH]
                               [--add-to PATH] [--bond-slots 128]

One synthetic file in data_prep's layout (``data_prep/synthetic_h5.py``; 2000 x 27 per sample,
``--samples`` samples, 80 % of them trained on) in a temporary folder, removed afterwards. Every
configuration trains ``--epochs`` epochs in a fresh process (``bench/speed.py``) and is timed on
its best epoch after the first (the first includes tracing); ``--rounds`` rounds run all
configurations in turn. Other processes on a shared machine move single epochs by tens of
percent and only ever slow them down, so the table shows the best over rounds (the machine's
own speed, as near as we can see it) and the median of the per-round figures. ``--add-to PATH``
adds this invocation's rounds to an earlier ``--json`` file (same ``--samples`` and
``--epochs``): rounds can run as separate, shorter commands.

Configurations (batch 32 unless named; learning rate as params.json):

- ``dosnet``: ``DOSnet/net.py`` (upstream architecture: 3 atoms, one target), in memory;
- ``none|late|early, memory|stream``: the root model (params.json's targets bvs_vu and valence)
  through train.py's code path, ``data.in_memory`` true or false;
- ``late, bonds|both, memory|stream``: the root model with the bond-aware structure branch
  (``structure_input`` bonds: the bond table instead of the structure vector; both: the two),
  late fusion, params.json's bond keys, on the file's synthetic bond table (``--bond-slots`` K
  neighbour slots per sample, default 128 as ``data_prep build``; 4..K filled);
- CPU variants of ``none, stream``: ``jit_compile`` (XLA), ``threads 2/1`` (intra/inter-op
  pools; TensorFlow's default is one per core for both), ``batch 128`` with the learning rate
  scaled by 4 (linear scaling rule; only throughput is measured here, not its effect on
  accuracy), ``bf16`` (``precision: mixed_bfloat16``).
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

from speed import run_child  # noqa: E402


#: The rows of the issue's goal (root model >= 1.0x upstream's samples/s), summed up after the table.
GOAL_ROWS = ("late, memory", "late, bonds, memory", "late, both, memory", "late, stream", "late, bonds, stream")


def configurations() -> dict:
    mem, stream = {"in_memory": True}, {"in_memory": False}
    out = {"dosnet (upstream), memory": {"model": "dosnet", "params": {"data": mem}}}
    for fusion in ("none", "late", "early"):
        for label, d in (("memory", mem), ("stream", stream)):
            out[f"{fusion}, {label}"] = {"params": {"fusion": fusion, "data": d}}
    for struct in ("bonds", "both"):
        for label, d in (("memory", mem), ("stream", stream)):
            out[f"late, {struct}, {label}"] = {"params": {"fusion": "late", "structure_input": struct, "data": d}}
    base = {"fusion": "none", "data": stream}
    out["none, stream, jit_compile"] = {"params": base, "jit_compile": True}
    out["none, stream, threads 2/1"] = {"params": base, "threads": [2, 1]}
    out["none, stream, batch 128, lr x4"] = {"params": {**base, "batch_size": 128, "learning_rate": 0.004}}
    out["none, stream, bf16"] = {"params": {**base, "precision": "mixed_bfloat16"}}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=1500, help="samples in the synthetic file (default 1500)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="configurations whose name starts with one of these")
    ap.add_argument("--tmp-dir")
    ap.add_argument("--json")
    ap.add_argument("--add-to", metavar="PATH", help="add to the rounds of an earlier --json file, write it back")
    ap.add_argument("--bond-slots", type=int, default=128,
                    help="neighbour slots per sample of the synthetic bond table (default 128, as data_prep build)")
    args = ap.parse_args(argv)
    configs = configurations()
    if args.only:
        configs = {k: v for k, v in configs.items() if any(k.startswith(o) for o in args.only)}
    work = Path(tempfile.mkdtemp(prefix="dosnet-throughput-", dir=args.tmp_dir))
    results: dict = {k: [] for k in configs}
    if args.add_to and Path(args.add_to).exists():
        old = json.loads(Path(args.add_to).read_text())
        if (old["file"]["n_samples"], old["epochs"], old.get("bond_slots", args.bond_slots)) != \
                (args.samples, args.epochs, args.bond_slots):
            print("bench/throughput.py: error: --add-to file has other --samples/--epochs/--bond-slots", file=sys.stderr)
            return 1
        for k, v in old["summary"].items():
            results.setdefault(k, []).extend(v["runs"])
    t_start = time.time()
    try:
        from data_prep.synthetic_h5 import write_synthetic_h5

        info = write_synthetic_h5(work / "bench.h5", args.samples, bond_slots=args.bond_slots)
        for r in range(args.rounds):
            for name, cfg in configs.items():
                print(f"round {r + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
                results[name].append(run_child(info["path"], {**cfg, "epochs": args.epochs}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ref_name = "dosnet (upstream), memory"
    summary = {}
    for name, runs in results.items():
        if not runs:
            continue
        sps = [x["samples_per_s"] for x in runs]
        summary[name] = {"best": max(sps), "median": statistics.median(sps), "min": min(sps), "max": max(sps),
                         "peak_rss_gb": max(x["peak_rss_gb"] for x in runs), "runs": runs}
    ref = summary.get(ref_name, {}).get("best")
    none_stream = summary.get("none, stream", {}).get("best")
    for s in summary.values():  # the ratios of the table, best against best
        s["x_upstream"] = round(s["best"] / ref, 3) if ref else None
        s["x_none_stream"] = round(s["best"] / none_stream, 3) if none_stream else None
    n_rounds = max(len(s["runs"]) for s in summary.values())
    print(f"\n{args.samples} samples x 2000 x 27 ({info['dos_bytes'] / 1e9:.2f} GB DOS), "
          f"{summary[next(iter(summary))]['runs'][0]['train_rows']} trained per epoch, {args.epochs} epochs; "
          f"best epoch after the first, best and median over {n_rounds} round(s); {os.cpu_count()} CPUs; "
          f"{time.time() - t_start:.0f} s this invocation")
    print("| configuration | samples/s best | median (range) | x DOSnet | x none, stream | peak RSS GB |")
    print("|---|---|---|---|---|---|")
    for name, s in summary.items():
        rel = f"{s['best'] / ref:.2f}" if ref else "-"
        rel2 = f"{s['best'] / none_stream:.2f}" if none_stream else "-"
        print(f"| {name} | {s['best']:.0f} | {s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f}) | {rel} | {rel2} | "
              f"{s['peak_rss_gb']:.2f} |")
    goal = {name: summary[name]["x_upstream"] for name in GOAL_ROWS if name in summary}
    if ref and goal:
        print("\nagainst upstream (goal >= 1.0x, best epochs): "
              + "; ".join(f"{name} {summary[name]['best']:.0f} samples/s = {x:.2f}x" for name, x in goal.items()))
    if args.add_to and not args.json:
        args.json = args.add_to
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                                                          f"{platform.platform()}", "file": info,
                                               "epochs": args.epochs, "rounds": args.rounds,
                                               "bond_slots": args.bond_slots, "reference": ref_name,
                                               "goal_x_upstream": {"goal": 1.0, **goal},
                                               "summary": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
