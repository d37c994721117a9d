"""``python -m data_prep``: build, export and inspect DOSnet-BV datasets; compute the embedded one.

    python -m data_prep build --source embedded --out data/embedded.h5
    python -m data_prep build --source records DIR --out data/mine.h5
    python -m data_prep export data/embedded.h5 --format npy|upstream [--out PATH]
    python -m data_prep inspect data/embedded.h5 [--plot]
    python -m data_prep compute-embedded [--out DIR] [--procs 2] [--time-limit 600]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EMBEDDED_SPECTRA = Path(__file__).resolve().parent / "embedded" / "spectra"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser():
    p = _Parser(prog="python -m data_prep", description="DOSnet-BV data preparation")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    b = sub.add_parser("build", help="records -> one h5")
    b.add_argument("--source", nargs="+", required=True, metavar="SOURCE",
                   help="'embedded' or 'records DIR'")
    b.add_argument("--out", required=True)
    b.add_argument("--params", help="params.json whose 'data' section sets grid, neighbours, split, ...")
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--procs", type=int, default=2)
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
    c = sub.add_parser("compute-embedded", help="recompute the embedded GFN1-xTB spectra (hours)")
    c.add_argument("--out", default=str(EMBEDDED_SPECTRA))
    c.add_argument("--procs", type=int, default=2)
    c.add_argument("--time-limit", type=float, default=600.0, help="seconds per material")
    c.add_argument("--limit", type=int, help="compute at most this many materials")
    c.add_argument("--n-substituted", type=int, default=1000)
    c.add_argument("--retry-failed", action="store_true")
    return p


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

    try:
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
            t0 = time.time()
            s = build_h5(paths, args.out, cfg, overwrite=args.overwrite, n_procs=args.procs, source=source)
            print(f"wrote {s['out']}: {s['n_materials']} materials, {s['n_samples']} samples "
                  f"({len(s['skipped'])} skipped, listed in {s['manifest']}) in {time.time() - t0:.0f} s")
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
        elif args.cmd == "compute-embedded":
            from data_prep.embedded.compute import compute_embedded
            from data_prep.embedded.structures import collect_structures

            entries = collect_structures(n_substituted=args.n_substituted)
            if args.limit:
                entries = entries[: args.limit]
            summary_ = compute_embedded(entries, args.out, n_procs=args.procs, time_limit_s=args.time_limit,
                                        retry_failed=args.retry_failed)
            print(json.dumps(summary_, indent=1, default=str))
        return 0
    except BuildError as exc:
        print(f"data_prep: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("data_prep: interrupted; finished work is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
