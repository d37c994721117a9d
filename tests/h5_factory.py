"""Write a minimal data_prep-layout h5 from arrays, for tests that need full control of the data."""
import json

import h5py
import numpy as np

from data_prep.layout import channel_labels


def write_minimal_h5(path, *, dos, structure, labels, families, bvs, valence, mids, elements, split, sites,
                     grid=None):
    """Only the datasets train.py reads: dos, structure (+labels, families), targets, meta, split.

    Shapes: dos (n, P, 27), structure (n, F), labels/families (F,), bvs/valence/mids/elements/split (n,);
    ``sites`` samples per material (site_index 0..sites-1); ``grid`` an EnergyGrid stored as attribute.
    """
    n = len(mids)
    s = h5py.string_dtype()
    strings = lambda x: np.asarray(x, dtype=object)  # noqa: E731
    with h5py.File(path, "w") as h:
        h["dos"] = dos
        h["dos"].attrs["channel_labels"] = channel_labels(2)
        if grid is not None:
            h.attrs["grid"] = json.dumps(grid.as_dict())
        h["structure"] = np.asarray(structure, dtype=np.float32)
        h.create_dataset("structure_labels", data=strings(labels), dtype=s)
        h.create_dataset("structure_families", data=strings(families), dtype=s)
        h["targets/bvs_vu"] = np.asarray(bvs, dtype=np.float32)
        h["targets/valence"] = np.asarray(valence, dtype=np.float32)
        h["targets/bvs_deviation_vu"] = (np.asarray(bvs) - np.asarray(valence)).astype(np.float32)
        h["targets/gii_vu"] = np.zeros(n, np.float32)
        h.create_dataset("meta/material_id", data=strings(mids), dtype=s)
        h.create_dataset("meta/element", data=strings(elements), dtype=s)
        h.create_dataset("meta/origin", data=strings(["synthetic"] * n), dtype=s)
        h["meta/site_index"] = np.tile(np.arange(sites), n // sites).astype(np.int32)
        h.create_dataset("split", data=strings(split), dtype=s)
        h.create_dataset("materials/material_id", data=strings(np.unique(mids)), dtype=s)
    return path
