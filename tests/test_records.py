"""Canonical records: CompleteDos -> spectral form, npz round trip, validation."""
import numpy as np
import pytest
from pymatgen.electronic_structure.core import Orbital, Spin
from pymatgen.electronic_structure.dos import CompleteDos, Dos

from data_prep.layout import ORBITALS
from data_prep.records import MaterialRecord, RecordError, Spectrum
from records_factory import make_record, structures


def test_from_complete_dos_keeps_every_orbital_and_f_weight():
    s = structures()["NaCl"]
    e = np.linspace(-10, 5, 1501)
    de = e[1] - e[0]
    pdos = {}
    for i, site in enumerate(s):
        pdos[site] = {}
        for orb in Orbital:
            dens = np.exp(-0.5 * ((e + 2 + orb.value * 0.3 + i) / 0.2) ** 2) / (0.2 * np.sqrt(2 * np.pi))
            pdos[site][orb] = {Spin.up: dens * (1 + orb.value), Spin.down: dens * (1 + orb.value)}
    tot = sum(d[Spin.up] for site in pdos.values() for d in site.values())
    total = Dos(0.0, e, {Spin.up: tot, Spin.down: tot})
    sp = Spectrum.from_complete_dos(CompleteDos(s, total, pdos))
    assert sp.weights.shape == (e.size, 2, 9)
    per_orbital = sp.weights.sum(axis=0)  # states, both spins
    for k, name in enumerate(ORBITALS):  # every channel, dx2 included
        np.testing.assert_allclose(per_orbital[:, k], 2 * (1 + k), rtol=1e-3, err_msg=name)
    np.testing.assert_allclose(sp.f_weight, 2 * sum(1 + v for v in range(9, 16)), rtol=1e-3)
    assert abs(np.sum(sp.weights[:, 0, 0]) - 2) < 1e-2 and de > 0


def test_npz_round_trip_float16(tmp_path):
    r = make_record("TiO2", structures()["TiO2"], seed=3)
    p = r.save(tmp_path / "a.npz", weight_dtype=np.float16)
    back = MaterialRecord.from_npz(p)
    assert back.material_id == r.material_id and back.structure == r.structure
    np.testing.assert_allclose(back.spectrum.weights, r.spectrum.weights, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(back.spectrum.energies_ev, r.spectrum.energies_ev)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporary file


def test_validation_errors():
    r = make_record("NaCl", structures()["NaCl"])
    r.origin = "moon"
    with pytest.raises(RecordError, match="origin"):
        r.validate()
    r = make_record("NaCl", structures()["NaCl"])
    r.spectrum.weights = r.spectrum.weights[:, :1]
    with pytest.raises(RecordError, match="atoms"):
        r.validate()
    with pytest.raises(RecordError, match="cannot read"):
        MaterialRecord.from_npz(__file__)
