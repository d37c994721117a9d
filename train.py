"""``python train.py --params params.json``: train, validate and test a DOSnet-BV model.

Interim version (foundation issue): with no ``data_file`` in params it runs the DOSnet synthetic
demo and says so; with an upstream-format ``data_file`` it runs the upstream protocol.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.json", help="experiment parameters (JSON)")
    args, rest = ap.parse_known_args(argv)
    try:
        with open(args.params) as fh:
            params = json.load(fh)
    except FileNotFoundError:
        print(f"train.py: error: params file not found: {args.params}", file=sys.stderr)
        return 1
    except json.JSONDecodeError as exc:
        print(f"train.py: error: {args.params} is not valid JSON: {exc}", file=sys.stderr)
        return 1
    if not params.get("data_file"):
        print("train.py: params has no data_file yet; running the DOSnet synthetic demo instead "
              "(synthetic data, numbers carry no physics).")
        from DOSnet.demo import main as demo_main

        return demo_main(rest)
    from DOSnet.protocol import main as protocol_main

    return protocol_main(["--params", args.params, *rest])


if __name__ == "__main__":
    sys.exit(main())
