"""``python -m DOSnet.demo``: write a small synthetic upstream-format data file and run the protocol on it.

A smoke run for a fresh install (no real data needed); its numbers say nothing about physics.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from DOSnet.protocol import main as protocol_main, write_upstream_data  # noqa: E402
from DOSnet.synthetic import make_synthetic  # noqa: E402


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    data = Path("runs/demo/synthetic_dosnet.pkl")
    data.parent.mkdir(parents=True, exist_ok=True)
    surface, targets, _ = make_synthetic(n=400, seed=0)
    write_upstream_data(data, surface, targets)
    print(f"DOSnet demo: synthetic upstream-format data ({len(targets)} samples) written to {data}")
    return protocol_main(["--data_dir", str(data), "--epochs", "10", "--out", "runs/demo/traintest", *argv])


if __name__ == "__main__":
    sys.exit(main())
