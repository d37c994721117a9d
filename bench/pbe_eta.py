"""How long the PBE dataset still takes: a cost model fitted on the committed records, applied to the queue.

Usage::

    python bench/pbe_eta.py [--records data_prep/embedded/spectra_pbe] [--structures cache/embedded_structures.json]
                            [--target 1000] [--procs 2] [--time-limit 3600] [--draws 500] [--json PATH]

Fits log(seconds) = a + b log(sites) + c log(SCF k-points) + d [spin-polarised] + e [two spin starts]
by least squares over the current-recipe records (``seconds_total`` of their provenance: the
worker's wall clock, so records made on shared cores count slower than on free ones). The queue is
the one ``compute-embedded --method pbe`` would run now (``compute.select_todo`` and
``compute.pbe_order`` over the collected structures; failures skipped as without
``--retry-failed``). Each draw gives every queued material a time from the fit plus a residual
drawn from the fit's residuals' normal distribution; a time over ``--time-limit`` is a failure
that costs the limit. Prints CPU-hours and hours on ``--procs`` cores (CPU-hours / procs) until
``--target`` current records exist and until the queue is empty: median and 10-90 % range over
the draws. Reads records and structures only (needs the 'structures' extra, not GPAW).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FEATURES = ("1", "log sites", "log SCF k-points", "spin-polarised", "two spin starts")


@dataclass
class CostFit:
    coef: list[float]
    residual_sd: float
    n_records: int
    seconds_measured: float
    seconds_fitted: float


@dataclass
class Eta:
    n_current: int
    n_queued: int
    n_spin_queued: int
    target: int
    procs: int
    time_limit_s: float
    fit: CostFit
    cpu_h_to_target: list[float]  # median, 10 %, 90 %
    cpu_h_all: list[float]
    failures_expected: float
    reachable: float  # fraction of draws in which the queue reaches the target


def features(structure, valences) -> np.ndarray:
    """The fit's row for one structure (bond-valence oxidation states ``valences``)."""
    from pymatgen.io.ase import AseAtomsAdaptor

    from data_prep.embedded import pbe

    nk = int(np.prod(pbe._mesh(AseAtomsAdaptor.get_atoms(structure), pbe.SCF_KDENSITY)))
    spin = pbe.spin_polarised(structure, valences)
    two = spin and len(pbe.spin_starts(structure, valences)) > 1
    return np.array([1.0, np.log(len(structure)), np.log(nk), float(spin), float(two)])


def fit_cost(records_dir: Path, entries_by_id: dict) -> tuple[CostFit, set]:
    """Least-squares fit over the current-recipe records; also the ids of those records."""
    from data_prep.embedded import pbe
    from data_prep.records import MaterialRecord

    X, y, current = [], [], set()
    for path in sorted(records_dir.glob("*.npz")):
        rec = MaterialRecord.from_npz(path)
        if pbe.outdated_recipe(rec.provenance, rec.structure) is not None:
            continue
        current.add(rec.material_id)
        calc = rec.provenance.get("calculation") or {}
        seconds = calc.get("seconds_total", calc.get("seconds"))
        if not seconds:
            continue
        entry = entries_by_id.get(rec.material_id)  # the queue's structures are the unrelaxed ones
        structure = entry.structure if entry is not None else rec.structure
        X.append(features(structure, rec.provenance.get("bv_valences")))
        y.append(np.log(float(seconds)))
    if len(y) < 2 * len(FEATURES):
        raise SystemExit(f"{records_dir}: {len(y)} timed current records, too few to fit {len(FEATURES)} terms")
    X, y = np.array(X), np.array(y)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    sd = float(resid.std(ddof=len(FEATURES)))
    fitted = float(np.exp(X @ coef + sd ** 2 / 2).sum())
    return CostFit([float(c) for c in coef], sd, len(y), float(np.exp(y).sum()), fitted), current


def simulate(mu: np.ndarray, sd: float, need: int, limit_s: float, draws: int, seed: int = 0):
    """CPU-seconds until ``need`` successes (nan where the queue falls short), CPU-seconds for the
    whole queue and the number of failures, one row per draw."""
    rng = np.random.default_rng(seed)
    out = np.empty((draws, 3))
    for d in range(draws):
        t = np.exp(mu + rng.normal(0.0, sd, mu.size))
        ok = t <= limit_s
        cum = np.cumsum(np.minimum(t, limit_s))
        n_ok = np.cumsum(ok)
        i = int(np.searchsorted(n_ok, need)) if need > 0 else -1
        to_target = 0.0 if need <= 0 else (cum[i] if i < mu.size else np.nan)
        out[d] = (to_target, cum[-1] if mu.size else 0.0, (~ok).sum())
    return out


def estimate(records_dir: Path, structures: Path | None, target: int, procs: int, limit_s: float,
             draws: int) -> Eta:
    from data_prep.embedded.compute import pbe_order, read_failures, select_todo
    from data_prep.embedded.structures import collect_structures, read_structures_json

    entries = read_structures_json(structures) if structures and structures.exists() else collect_structures()
    by_id = {e.material_id: e for e in entries}
    fit, current = fit_cost(records_dir, by_id)
    todo, *_ = select_todo(entries, records_dir, read_failures(records_dir), False, "pbe")
    todo = pbe_order(entries, todo, records_dir)
    X = np.array([features(e.structure, e.provenance.get("bv_valences")) for e in todo]).reshape(-1, len(FEATURES))
    mu = X @ np.array(fit.coef)
    n_current = sum(1 for e in entries if e.material_id in current)
    sims = simulate(mu, fit.residual_sd, target - n_current, limit_s, draws)
    reach = ~np.isnan(sims[:, 0])

    def q(col, mask=None):
        v = sims[mask if mask is not None else slice(None), col] / 3600.0
        return [round(float(x), 1) for x in np.percentile(v, [50, 10, 90])] if v.size else [float("nan")] * 3

    return Eta(n_current, len(todo), int(X[:, 3].sum()) if len(todo) else 0, target, procs, limit_s, fit,
               q(0, reach), q(1), float(np.median(sims[:, 2])), float(reach.mean()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=Path, default=ROOT / "data_prep" / "embedded" / "spectra_pbe")
    ap.add_argument("--structures", type=Path, default=ROOT / "cache" / "embedded_structures.json",
                    help="collected structures (compute-embedded --structures); collected anew if missing")
    ap.add_argument("--target", type=int, default=1000, help="current records wanted (issue 13: 1,000)")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--time-limit", type=float, default=3600.0, help="CPU seconds per material, as compute-embedded's")
    ap.add_argument("--draws", type=int, default=500)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not args.records.is_dir():
        raise SystemExit(f"{args.records}: no such record folder")
    eta = estimate(args.records, args.structures, args.target, args.procs, args.time_limit, args.draws)
    f = eta.fit
    print(f"fit over {f.n_records} current records: " + ", ".join(f"{n} {c:+.3f}" for n, c in zip(FEATURES, f.coef))
          + f"; residual sd {f.residual_sd:.2f} in log (x{np.exp(f.residual_sd):.1f})")
    print(f"  their measured time {f.seconds_measured / 3600:.1f} CPU-h, the fit's {f.seconds_fitted / 3600:.1f}")
    print(f"current records {eta.n_current}; queued {eta.n_queued} ({eta.n_spin_queued} spin-polarised); "
          f"limit {eta.time_limit_s:.0f} s: {eta.failures_expected:.0f} expected to run out of time")
    for what, v in ((f"to {eta.target} current records", eta.cpu_h_to_target), ("the whole queue", eta.cpu_h_all)):
        print(f"{what:>30}: {v[0]:6.1f} CPU-h ({v[1]:.1f}-{v[2]:.1f}), {v[0] / eta.procs:5.1f} h on {eta.procs} cores")
    if eta.reachable < 1.0:
        print(f"the queue reaches {eta.target} in {100 * eta.reachable:.0f} % of draws")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(eta), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
