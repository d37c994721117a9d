"""Benchmark: time of the default feature-importance analysis (``dosnet_bv/importance.py``) at full size.

Usage::

    python bench/importance.py [--fusion late|early|none] [--samples N] [--json PATH]

Builds the DOSnet-BV network of ``params.json`` for ``--fusion`` (untrained: the cost does not
depend on the weights), N random standardised test samples of the full size (``length`` points x
27 channels; with the default 83 structure features in the six families of
``data_prep.structure_features``) and ``params.json``'s targets, then runs ``analyse`` with the
``importance_*`` settings of ``params.json`` and writes the report to a temporary folder. Prints
seconds and rows per method and the time scaled to 400 test samples (every method is linear in
the number of samples).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

FAMILY_SIZES = {"site": 5, "neighbours": 20, "coordination": 2, "distances": 5, "gaussian": 41, "global": 10}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fusion", default="late", choices=["late", "early", "none"])
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--json", help="write the timings here")
    args = ap.parse_args(argv)

    import net
    from data_prep.layout import ORBITAL_GROUPS, EnergyGrid, atom_roles, channel_labels
    from dosnet_bv import importance

    p = json.loads((ROOT / "params.json").read_text())
    p["fusion"] = args.fusion
    fams = [f for f, k in FAMILY_SIZES.items() for _ in range(k)]
    n_struct = len(fams) if args.fusion != "none" else 0
    model = net.build_model(p, n_struct)
    rng = np.random.default_rng(0)
    n, length, c = args.samples, p["length"], p["channels"]
    roles = atom_roles(p["n_neighbours"])
    k = len(roles) * c
    groups = {f"{r}:{g}": [a * c + i for i in idx] for a, r in enumerate(roles) for g, idx in ORBITAL_GROUPS.items()}
    labels = channel_labels(p["n_neighbours"])
    blocks = {"channel": {lab: [j] for j, lab in enumerate(labels)},
              "atom": {r: list(range(a * c, (a + 1) * c)) for a, r in enumerate(roles)},
              "orbital group": {g: [a * c + i for a in range(len(roles)) for i in idx]
                                for g, idx in ORBITAL_GROUPS.items()},
              "atom x orbital group": groups}
    problem = importance.Problem(
        model=model, targets=p["targets"], y_true=rng.normal(size=(n, len(p["targets"]))),
        y_mean=np.zeros(len(p["targets"])), y_scale=np.ones(len(p["targets"])),
        dos=rng.normal(size=(n, length, k)).astype(np.float32),
        dos_inputs=[f"atom{i + 1}_dos" for i in range(len(roles))],
        dos_fill=np.zeros((length, k), np.float32), energies_ev=EnergyGrid(n_points=length).energies_ev,
        channel_labels=labels, occlusion_groups=groups, channel_blocks=blocks,
        structure=rng.normal(size=(n, n_struct)).astype(np.float32) if n_struct else None,
        structure_input="structure" if n_struct else None, structure_labels=[f"f{i}" for i in range(n_struct)],
        structure_families=fams[:n_struct], sample_labels=rng.choice(list("ABCDEFGHIJKL"), size=n))
    settings = importance.Settings(window_ev=p["importance_window_ev"], step_ev=p["importance_step_ev"],
                                   repeats=p["importance_repeats"], ig_steps=p["importance_ig_steps"])
    t0 = time.time()
    res = importance.analyse(problem, settings)
    analysis = time.time() - t0
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        importance.write_report(tmp, res)
    outputs = time.time() - t0
    per400 = analysis * 400 / n
    print(f"{args.fusion}: {n} samples x {length} points x {k} channels, targets {', '.join(p['targets'])}: analysis "
          f"{analysis:.0f} s, outputs {outputs:.0f} s; scaled to 400 test samples: {per400 / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps({"fusion": args.fusion, "samples": n, "analysis_seconds": analysis,
                                               "output_seconds": outputs, "minutes_at_400": per400 / 60,
                                               "timing": res["timing"]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
