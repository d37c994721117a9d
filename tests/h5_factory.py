"""Write a minimal data_prep-layout h5 from arrays, for tests that need full control of the data."""
import json

import h5py
import numpy as np

from data_prep.h5schema import Writer
from data_prep.layout import channel_labels


def write_minimal_h5(path, *, dos, structure, labels, families, bvs, valence, mids, elements, split, sites,
                     grid=None, bonds=None, bond_cutoff_ang=6.0):
    """Only the datasets train.py reads: dos, structure (+labels, families), targets, meta, split.

    Shapes: dos (n, P, 27), structure (n, F), labels/families (F,), bvs/valence/mids/elements/split (n,);
    ``sites`` samples per material (site_index 0..sites-1); ``grid`` an EnergyGrid stored as attribute;
    ``bonds`` a ``data_prep.bonds.BondTable`` of the n samples (none when omitted).
    Written through ``data_prep.h5schema.Writer`` (so with the current schema version).
    """
    n = len(mids)
    dos = np.asarray(dos, dtype=np.float32)
    with h5py.File(path, "w") as h:
        w = Writer(h)
        w.dos(n, dos.shape[1], dos.shape[2], channel_labels(2), "states/eV", compression=None, data=dos)
        if grid is not None:
            w.attrs(grid=json.dumps(grid.as_dict()))
        w.structure(structure, labels, families)
        w.targets({"bvs_vu": bvs, "valence": valence, "bvs_deviation_vu": np.asarray(bvs) - np.asarray(valence),
                   "gii_vu": np.zeros(n)})
        w.sample_meta(mids, elements, ["synthetic"] * n, np.tile(np.arange(sites), n // sites).astype(np.int32))
        w.split(split)
        if bonds is not None:
            w.bonds(bonds, bond_cutoff_ang)
        w.materials(material_id=np.unique(mids))
    return path


def random_bonds(n, k=12, seed=1):
    """A random padded bond table of ``n`` sites, 3 to ``k`` neighbours each, 1.8-6 Å (sorted)."""
    from data_prep.bonds import BondTable

    rng = np.random.default_rng(seed)
    count = rng.integers(3, k + 1, n)
    mask = (np.arange(k)[None, :] < count[:, None]).astype(np.uint8)
    d = np.sort(rng.uniform(1.8, 6.0, (n, k)), axis=1).astype(np.float32) * mask
    z = (rng.integers(1, 84, (n, k)) * mask).astype(np.int16)
    return BondTable(d, z, mask, rng.integers(1, 84, n).astype(np.int16), count.astype(np.int32))
