"""Small synthetic records on real crystal structures, for data_prep tests (not physics)."""
import numpy as np
from pymatgen.core import Lattice, Structure

from data_prep.records import MaterialRecord, Spectrum


def structures():
    return {
        "NaCl": Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]).get_primitive_structure(),
        "MgO": Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.21), ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]).get_primitive_structure(),
        "TiO2": Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.594, 2.959), ["Ti", "O"], [[0, 0, 0], [0.305, 0.305, 0]]),
        "KBr": Structure.from_spacegroup("Fm-3m", Lattice.cubic(6.6), ["K", "Br"], [[0, 0, 0], [0.5, 0.5, 0.5]]).get_primitive_structure(),
        "CaO": Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.81), ["Ca", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]).get_primitive_structure(),
        "SrTiO3": Structure.from_spacegroup("Pm-3m", Lattice.cubic(3.905), ["Sr", "Ti", "O"], [[0.5, 0.5, 0.5], [0, 0, 0], [0.5, 0, 0]]),
        "ZnS": Structure.from_spacegroup("F-43m", Lattice.cubic(5.41), ["Zn", "S"], [[0, 0, 0], [0.25, 0.25, 0.25]]).get_primitive_structure(),
        "LiF": Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.03), ["Li", "F"], [[0, 0, 0], [0.5, 0.5, 0.5]]).get_primitive_structure(),
    }


def random_spectrum(n_atoms, seed=0, n_states=120):
    rng = np.random.default_rng(seed)
    e = np.sort(rng.uniform(-15, 8, n_states))
    w = rng.exponential(0.05, size=(n_states, n_atoms, 9))
    return Spectrum(energies_ev=e, weights=w, reference_ev=0.0, efermi_ev=0.5, band_gap_ev=1.0,
                    f_weight=np.zeros(n_atoms), n_electrons=8.0)


def make_record(name, structure, seed=0, origin="mineral"):
    return MaterialRecord(material_id=f"test-{name}", formula=structure.composition.reduced_formula,
                          origin=origin, method="synthetic", structure=structure,
                          spectrum=random_spectrum(len(structure), seed), provenance={"test": True})


def write_records(folder, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, (name, s) in enumerate(structures().items()):
        if names and name not in names:
            continue
        out.append(make_record(name, s, seed=k).save(folder / f"test-{name}.npz"))
    return out
