"""Physics of the committed embedded dataset (GFN1-xTB spectra in data_prep/embedded/spectra)."""
import json

import numpy as np
import pytest

from data_prep.__main__ import EMBEDDED_SPECTRA
from data_prep.grid import grid_atoms
from data_prep.layout import GAP_THRESHOLD_EV, ORBITALS
from data_prep.records import MaterialRecord

PATHS = sorted(EMBEDDED_SPECTRA.glob("*.npz"))


def _sample(k, seed=0):
    rng = np.random.default_rng(seed)
    return [PATHS[i] for i in sorted(rng.choice(len(PATHS), size=min(k, len(PATHS)), replace=False))]


def test_embedded_spectra_are_committed():
    assert len(PATHS) >= 100, f"only {len(PATHS)} embedded spectra in {EMBEDDED_SPECTRA}"
    assert sum(p.stat().st_size for p in PATHS) < 60e6  # compact form stays within the git budget


def test_occupied_states_equal_valence_electrons():
    """In gapped materials the states up to the VBM hold exactly the xTB valence electrons."""
    checked = 0
    for p in _sample(40):
        r = MaterialRecord.from_npz(p)
        sp = r.spectrum
        if sp.band_gap_ev <= GAP_THRESHOLD_EV:
            continue
        below = np.sum(r.provenance["compaction"]["dropped_below"])
        occ = sp.weights[sp.energies_ev <= sp.reference_ev + 1e-6].sum() + below
        assert abs(occ - sp.n_electrons) < 2e-3 * sp.n_electrons + 0.02, (r.material_id, occ, sp.n_electrons)
        checked += 1
    assert checked >= 10


def test_oxide_oxygen_p_weight_lies_below_reference():
    p_channels = [ORBITALS.index(o) for o in ("py", "pz", "px")]
    fractions = []
    for p in PATHS:
        if len(fractions) >= 15:
            break
        r = MaterialRecord.from_npz(p)
        if r.spectrum.band_gap_ev <= GAP_THRESHOLD_EV or "O" not in {e.symbol for e in r.structure.composition}:
            continue
        o = [i for i, s in enumerate(r.structure) if s.specie.symbol == "O"]
        w = r.spectrum.weights[:, o][:, :, p_channels].sum(axis=(1, 2))
        fractions.append(w[r.spectrum.energies_ev <= r.spectrum.reference_ev + 1e-6].sum() / w.sum())
    assert len(fractions) >= 5
    assert np.median(fractions) > 0.7, fractions


@pytest.mark.parametrize("rank", [0, 1])
def test_recomputed_from_scratch_matches_committed(rank):
    from data_prep.embedded.compute import make_record
    from data_prep.embedded.structures import StructureEntry

    small = sorted(PATHS, key=lambda p: (p.stat().st_size, p.name))
    ref = MaterialRecord.from_npz(small[rank * 7])
    calc = ref.provenance["calculation"]
    entry = StructureEntry(ref.material_id, ref.formula, ref.origin, ref.structure, {})
    new = make_record(entry, calc["min_length_ang"], calc["etemp_k"], calc["max_supercell_atoms"], calc["max_supercell_ao"])
    a, _ = grid_atoms(ref.spectrum)
    b, _ = grid_atoms(new.spectrum)
    rel = np.abs(a - b).sum() / np.abs(b).sum()
    assert rel < 0.01, (ref.material_id, rel)
    assert json.dumps(calc["supercell"]) == json.dumps(new.provenance["calculation"]["supercell"])


def test_compute_run_says_how_to_stop_it_when_sigint_is_ignored(capsys):
    """A job started with `&` by a non-interactive shell ignores SIGINT (POSIX): the run says so
    and names the command that stops it; SIGTERM then raises KeyboardInterrupt like Ctrl-C."""
    import os
    import signal

    from data_prep.embedded import compute

    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    previous_term = compute._stop_on_sigterm()
    try:
        assert f"kill {os.getpid()}" in capsys.readouterr().out
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        previous_term = compute._stop_on_sigterm()
        signal.signal(signal.SIGTERM, previous_term)
        assert "kill" not in capsys.readouterr().out
    finally:
        signal.signal(signal.SIGINT, previous_int)
