"""Structure-derived feature vector: layout, families, physics checks and independence from the targets."""
from __future__ import annotations

import ast
import inspect
from collections import Counter

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from data_prep import bonds as bond_module
from data_prep import structure_features as sf
from data_prep.bonds import bond_table
from data_prep.structure_features import FAMILIES, StructureFeaturizer


def rocksalt(a=5.64, cation="Na", anion="Cl") -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), [cation, anion],
                                     [[0, 0, 0], [0.5, 0.5, 0.5]])


def rutile() -> Structure:
    return Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.594, 2.959), ["Ti", "O"],
                                     [[0, 0, 0], [0.305, 0.305, 0]])


def perovskite() -> Structure:
    return Structure(Lattice.cubic(3.905), ["Sr", "Ti", "O", "O", "O"],
                     [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


FULL = StructureFeaturizer()
LABELS = FULL.feature_labels()


def col(name):
    return LABELS.index(name)


def test_labels_match_columns_and_families():
    x = FULL.featurize(rutile())
    assert x.dtype == np.float32 and x.shape == (6, len(LABELS)) and np.all(np.isfinite(x))
    assert len(set(LABELS)) == len(LABELS)
    fams = FULL.families_of_labels()
    assert len(fams) == len(LABELS)
    assert Counter(fams) == {"site": 5, "neighbours": 20, "coordination": 2, "distances": 5,
                             "gaussian": 41, "global": 10}
    assert FULL.citations() and all(isinstance(c, str) for c in FULL.citations())


def test_families_switch_columns_off():
    st = perovskite()
    full = FULL.featurize(st)
    fams = np.array(FULL.families_of_labels())
    for keep in [("site",), ("gaussian", "global"), ("neighbours", "coordination", "distances")]:
        f = StructureFeaturizer(families=keep)
        x = f.featurize(st)
        assert x.shape[1] == len(f.feature_labels()) == int(np.isin(fams, keep).sum())
        assert set(f.families_of_labels()) == set(keep)
        assert np.array_equal(x, full[:, np.isin(fams, keep)])
    with pytest.raises(ValueError):
        StructureFeaturizer(families=("site", "bond_valence"))


def test_site_indices_select_rows():
    st = perovskite()
    full = FULL.featurize(st)
    assert np.array_equal(FULL.featurize(st, [4, 1]), full[[4, 1]])
    assert FULL.featurize(st, []).shape == (0, len(LABELS))


def test_coordination_numbers():
    x = FULL.featurize(rocksalt())
    assert np.all(x[:, col("cn")] == 6)
    assert np.allclose(x[:, col("d_min_ang")], 2.82, atol=1e-5)
    assert np.allclose(x[:, col("distortion_index")], 0.0, atol=1e-6)
    r = rutile()
    x = FULL.featurize(r)
    ti = [i for i, site in enumerate(r) if site.specie.symbol == "Ti"]
    o = [i for i, site in enumerate(r) if site.specie.symbol == "O"]
    assert np.all(x[ti, col("cn")] == 6) and np.all(x[o, col("cn")] == 3)
    assert np.allclose(x[ti, col("d_min_ang")], 1.948, atol=1e-3)
    assert np.allclose(x[ti, col("d_max_ang")], 1.982, atol=1e-3)
    assert np.all(x[:, col("ecn")] > 2.5)
    p = FULL.featurize(perovskite())
    assert p[1, col("cn")] == 6 and p[0, col("cn")] == 12  # Ti octahedral, Sr cuboctahedral
    # the neighbour statistics are over that shell: Ti's neighbours are all O
    assert p[1, col("nbr_Z_mean")] == 8 and p[1, col("nbr_Z_std")] == 0
    # O's shell in perovskite: 2 Ti at 1.95 A only (Sr at 2.76 A is beyond 1.2 x 1.95 A)
    assert p[2, col("cn")] == 2 and p[2, col("nbr_Z_max")] == 22


def test_gaussian_expansion_peaks_at_the_nearest_neighbour_distance():
    x = FULL.featurize(rocksalt())[0]
    fams = np.array(FULL.families_of_labels())
    g = x[fams == "gaussian"]
    centres = FULL.gauss_centres_ang
    assert centres[0] == 0.0 and centres[-1] == pytest.approx(8.0) and len(centres) == 41
    assert np.allclose(np.diff(centres), 0.2)
    assert np.all(g[centres < 2.2] < 1e-3)  # nothing closer than the nearest neighbours
    peaks = [k for k in range(1, len(g) - 1) if g[k] > g[k - 1] and g[k] >= g[k + 1]]
    assert centres[peaks[0]] == pytest.approx(2.8)  # 2.82 A is the Na-Cl distance
    assert g[peaks[0]] == pytest.approx(6 * np.exp(-(0.02 / 0.2) ** 2), rel=1e-3)  # ~ the 6 Cl
    assert centres[peaks[1]] == pytest.approx(4.0)  # 12 Na at 3.99 A


def test_global_descriptors_do_not_depend_on_the_cell_choice():
    prim = rutile()
    sup = prim * (2, 1, 2)
    fams = np.array(FULL.families_of_labels())
    xp, xs = FULL.featurize(prim), FULL.featurize(sup)
    # site 0 of the supercell is the image of site 0 of the cell
    assert np.allclose(xp[0], xs[0], atol=1e-4)
    g = xp[0, fams == "global"]
    assert g[GL("spacegroup_number")] == 136 and g[GL("n_elements")] == 2
    assert g[GL("density_g_cm3")] == pytest.approx(prim.density, rel=1e-5)
    assert g[GL("volume_per_atom_ang3")] == pytest.approx(prim.volume / 6, rel=1e-5)
    assert np.allclose(g[[GL("a_ang"), GL("b_ang"), GL("c_ang")]], [4.594, 4.594, 2.959], atol=1e-4)
    # a primitive fcc cell reports the conventional cubic lattice
    nacl_prim = rocksalt().get_primitive_structure()
    assert len(nacl_prim) == 2
    gp = FULL.featurize(nacl_prim)[0, fams == "global"]
    assert np.allclose(gp[[GL("a_ang"), GL("alpha_deg")]], [5.64, 90.0], atol=1e-4)


def GL(name):
    return sf.GLOBAL_LABELS.index(name)


# --- independence from the bond-valence pipeline ----------------------------------------------
def _imported_names(module) -> set[str]:
    tree = ast.parse(inspect.getsource(module))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
            names |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
    return names


@pytest.mark.parametrize("module", [sf, bond_module], ids=["structure_vector", "bond_table"])
def test_features_module_uses_nothing_from_the_bond_valence_pipeline(module):
    """Neither structure input of the network (the vector, the bond table) reads the bond-valence
    pipeline: no oxidation states, bond valence parameters or BVAnalyzer."""
    names = _imported_names(module)
    for forbidden in ("bond_valence", "BVAnalyzer", "BVParams", "calculate_bv_sum",
                      "oxi_state", "oxi_states", "add_oxidation_state_by_element",
                      "get_oxi_state_decorated_structure", "ionic_radius", "average_ionic_radius"):
        assert not any(forbidden in n for n in names), forbidden


def test_features_unchanged_when_the_bond_valence_pipeline_is_broken(monkeypatch):
    st = perovskite()
    before = FULL.featurize(st)
    bonds_before = bond_table(st, range(len(st)))
    from pymatgen.analysis.bond_valence import BVAnalyzer

    from data_prep import bond_valence as bv

    def boom(*args, **kwargs):
        raise AssertionError("the structure features touched the bond-valence pipeline")

    for name in ("assign_valences", "bond_valence_sums", "compute_targets", "lookup",
                 "global_instability_index"):
        monkeypatch.setattr(bv, name, boom)
    monkeypatch.setattr(bv.BVParams, "default", boom)
    monkeypatch.setattr(bv.BVParams, "choose", boom)
    monkeypatch.setattr(BVAnalyzer, "get_valences", boom)
    after = StructureFeaturizer().featurize(st)
    assert np.array_equal(before, after)
    bonds_after = bond_table(st, range(len(st)))
    for name, a in vars(bonds_before).items():
        assert np.array_equal(a, getattr(bonds_after, name)), name


def test_features_unchanged_by_oxidation_states_and_site_properties():
    for st, states in [(perovskite(), [{"Sr": 2, "Ti": 4, "O": -2}, {"Sr": 3, "Ti": 3, "O": -2}]),
                       (rutile(), [{"Ti": 4, "O": -2}, {"Ti": 2, "O": -1}])]:
        bare = FULL.featurize(st)
        for oxi in states:
            dec = st.copy()
            dec.add_oxidation_state_by_element(oxi)
            assert np.array_equal(FULL.featurize(dec), bare)
        # site-resolved oxidation states that break the symmetry, and magnetic moments
        dec = st.copy()
        dec.add_oxidation_state_by_site([i % 3 - 1 for i in range(len(st))])
        dec.add_site_property("magmom", [float(i) for i in range(len(st))])
        assert np.array_equal(FULL.featurize(dec), bare)
        bare_bonds, dec_bonds = bond_table(st, range(len(st))), bond_table(dec, range(len(st)))
        for name, a in vars(bare_bonds).items():  # the bond table too
            assert np.array_equal(a, getattr(dec_bonds, name)), name


def test_features_do_not_correlate_with_a_scrambled_target_source():
    """Changing only the valences fed to the target pipeline changes the targets, never the features."""
    from data_prep import bond_valence as bv

    st = rocksalt()
    x = FULL.featurize(st)
    t1 = bv.bond_valence_sums(st, [1] * 4 + [-1] * 4)
    t2 = bv.bond_valence_sums(st.copy(), [1] * 4 + [-1] * 4, cutoff_ang=3.0)
    assert not np.allclose(t1, t2)
    assert np.array_equal(FULL.featurize(st), x)


def test_disordered_structure_rejected():
    st = rocksalt()
    st.replace(0, {"Na": 0.5, "K": 0.5})
    with pytest.raises(ValueError, match="ordered"):
        FULL.featurize(st)


def test_all_families_listed():
    assert set(FULL.families) == set(FAMILIES)
