"""The data file as training reads it: ``load_data`` -> ``Dataset`` (arrays of one data_prep h5).

The file's layout belongs to ``data_prep.h5schema`` (every name is read through it); this module
checks the file against params (input width, finite values), applies ``zero_tail`` and the split,
and decides whether the DOS is held in memory or streamed (``dosnet_bv.streaming``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_prep.h5schema import plausible_range  # |BV target| <= 10, 0 <= barrier <= 20 eV: at build and here
from dosnet_bv.params import BV_TARGETS, MIGRATION_TARGETS, SPLITS, TrainError


@dataclass
class Dataset:
    """Samples of one data_prep h5, in memory. n samples, L grid points, A atoms, C channels per
    atom, F structure features (all of the file's columns; a run selects families).

    dos: (n, L, A*C) float32, states/eV, atom-major channels (site, nbr1, ...; 9 orbitals each);
    a ``streaming.H5DOS`` (read on demand, same indexing) when the run streams (``data.in_memory``).
    structure: (n, F) float32; structure_labels, structure_families: (F,) names.
    targets: name -> (n,) float64 (bvs_vu and bvs_deviation_vu in valence units, valence in e).
    material_id, element, origin, split: (n,) str; site_index: (n,) int.
    family_id: (n,) str, the material's substitution/prototype family (``data_prep.families``).
    bonds: the file's bond table (``data_prep.bonds.BondTable``: K neighbour slots per sample,
    ``distance_ang`` (n, K) Å, ``neighbour_z`` (n, K), ``mask`` (n, K), ``centre_z`` (n,)), or None
    when the file has none (schema version 2); only ``structure_input`` bonds/both reads it.
    energies_ev: (L,) energies of the grid points relative to the reference level (the file's
    ``grid`` attribute; None if absent), sigma_ev: its smearing width.
    """

    path: str
    dos: np.ndarray
    structure: np.ndarray
    structure_labels: list
    structure_families: list
    targets: dict
    material_id: np.ndarray
    element: np.ndarray
    origin: np.ndarray
    site_index: np.ndarray
    split: np.ndarray
    channel_labels: list
    family_id: np.ndarray | None = None  # (n,) str; None only for hand-made Datasets (then material_id)
    energies_ev: np.ndarray | None = None  # (L,) eV from the file's grid; None when it has none
    sigma_ev: float | None = None  # the grid's smearing width
    reading: str = "in memory"  # how the DOS is read (``streaming.decide_in_memory``'s reason)
    bonds: object | None = None  # data_prep.bonds.BondTable, or None when the file has no bond table

    @property
    def n(self) -> int:
        return len(self.material_id)

    def split_grouping(self) -> str:
        """What the split keeps together: ``family`` when no family has samples in two splits,
        else ``material`` when no material has, else ``none`` (for reports)."""
        for name, ids in (("family", self.family_id), ("material", self.material_id)):
            if ids is None:
                continue
            ids, split = np.asarray(ids), np.asarray(self.split)
            pairs = np.unique(np.stack([ids.astype(str), split.astype(str)]), axis=1)
            if len(np.unique(pairs[0])) == pairs.shape[1]:
                return name
        return "none"

    def groups(self, split_by: str = "family") -> np.ndarray:
        """(n,) ids that must not be split apart: the family (default) or the material."""
        if split_by == "family" and self.family_id is not None:
            return self.family_id
        return self.material_id

    @property
    def streaming(self) -> bool:
        """True when ``dos`` is read from the file on demand (``streaming.H5DOS``)."""
        return not isinstance(self.dos, np.ndarray)


def load_data(path, params: dict, resplit: bool = True, labelled: bool = True) -> Dataset:
    """Read a data_prep h5 into numpy arrays and check it against ``params``.

    The one place that reads the data file. Checks the input width (``length``, ``channels``,
    ``n_neighbours``: a file with more neighbours than params ask for gives the site's and its first
    neighbours' channels) and that every sample is finite; applies ``zero_tail``; with ``resplit`` and
    ``split`` = [fractions], re-splits grouped by ``split_by`` (``split_seed``), else keeps the stored
    split (grouped as the file was built: by family unless built with ``split_by: material``).
    The DOS is loaded unless ``data.in_memory`` (``streaming.decide_in_memory``) says to stream it:
    then ``dos`` is a ``streaming.H5DOS`` that reads samples on demand (zero_tail and the finiteness
    check applied per read) and everything else is loaded (a few hundred bytes per sample).
    """
    from data_prep import h5schema as sch
    from data_prep.split import grouped_split
    from dosnet_bv import streaming as stream

    need = sch.REQUIRED + (sch.STRUCTURE_FAMILIES, sch.meta("element"), sch.meta("origin"), sch.meta("site_index"))
    try:
        h = sch.open_h5(path, need)
    except sch.BuildError as exc:
        raise TrainError(f"{exc} (params key 'data_file' or --data)") from None
    try:
        with h:
            n, length, file_width = h.dos.shape
            atoms, c = 1 + params["n_neighbours"], params["channels"]
            if length != params["length"]:
                raise TrainError(f"params: 'length' is {params['length']} but {path} has {length} grid points per DOS")
            if file_width % c or file_width < atoms * c:
                key = "n_neighbours" if file_width % c == 0 else "channels"
                raise TrainError(f"params: {key!r} does not match {path}: its DOS has {file_width} channels, params "
                                 f"give {atoms} atoms (1 + n_neighbours) x {c} channels")
            # a file with more neighbours serves a run with fewer: the site's and its first n_neighbours' channels
            width = atoms * c
            in_memory, reading = stream.decide_in_memory(params["data"]["in_memory"], n * length * width * 4)
            dos = np.empty((n, length, width), dtype=np.float32) if in_memory else None
            step = 256
            for i in range(0, n if in_memory else 0, step):  # chunk by chunk: bounded memory beyond the result
                dos[i:i + step] = h.dos[i:i + step, :, :width]
                if not np.all(np.isfinite(dos[i:i + step])):
                    raise TrainError(f"{path}: DOS of samples {i}..{min(i + step, n) - 1} contains NaN or infinite values")
            bond_settings = h.bond_settings() or {}
            energies, sigma = None, None
            grid = h.grid()
            if grid is not None and grid.n_points == length:
                energies, sigma = grid.energies_ev, grid.sigma_ev
            data = Dataset(
                path=str(path), dos=dos, structure=h.structure(), structure_labels=h.structure_labels(),
                structure_families=h.structure_families(),
                targets={t: np.asarray(h.target(t), dtype=np.float64) for t in BV_TARGETS if sch.target(t) in h},
                material_id=h.meta_strings("material_id"), element=h.meta_strings("element"),
                origin=h.meta_strings("origin"), site_index=h.meta("site_index"), split=h.split(),
                family_id=h.meta_strings("family_id"),
                channel_labels=h.channel_labels(), energies_ev=energies, sigma_ev=sigma, reading=reading,
                bonds=h.bonds())
    except TrainError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise TrainError(f"cannot read {path}: {exc}") from None
    per_sample = {"structure": data.structure, "meta/material_id": data.material_id, "meta/element": data.element,
                  "meta/origin": data.origin,
                  "meta/family_id": data.family_id, "meta/site_index": data.site_index, "split": data.split,
                  **{f"targets/{t}": y for t, y in data.targets.items()}}
    if data.bonds is not None:
        per_sample["bonds/distance_ang"] = data.bonds.distance_ang
    short = next((k for k, v in per_sample.items() if len(v) != n), None)
    if short:
        raise TrainError(f"{path}: {short} has {len(per_sample[short])} rows but the DOS has {n} samples")
    f = data.structure.shape[1]
    if len(data.structure_labels) != f or len(data.structure_families) != f:
        raise TrainError(f"{path}: the structure vector has {f} columns but {len(data.structure_labels)} labels and "
                         f"{len(data.structure_families)} families")
    if len(data.channel_labels) != file_width:
        raise TrainError(f"{path}: channel_labels has {len(data.channel_labels)} names but the DOS has {file_width} "
                         f"channels")
    data.channel_labels = list(data.channel_labels)[:width]
    if not np.all(np.isfinite(data.structure)):
        raise TrainError(f"{path}: the structure vector contains NaN or infinite values")
    if uses_bonds(params):
        check_bonds(data)
        cutoff = bond_settings.get("cutoff_ang")
        if cutoff is not None and params["bond_cutoff_ang"] > cutoff + 1e-9:
            raise TrainError(f"params: 'bond_cutoff_ang' is {params['bond_cutoff_ang']:g} but {path} lists neighbours "
                             f"within {cutoff:g} A only (build key bond_cutoff_ang)")
    absent = [t for t in params["targets"] if t not in data.targets]
    if absent:
        raise TrainError(f"{path} has no target {absent[0]!r} (built before the migration targets): "
                         "rebuild it with python -m data_prep build")
    migration = [t for t in params["targets"] if t in MIGRATION_TARGETS]
    if migration and labelled:  # labelled=False (predictions): keep every sample, NaN truths
        data = labelled_only(data, migration)
    for t in params["targets"]:
        v = data.targets[t]
        if t not in MIGRATION_TARGETS and not np.all(np.isfinite(v)):
            raise TrainError(f"{path}: target {t!r} contains NaN or infinite values")
        rng = plausible_range(t)
        bad = np.flatnonzero(~rng.holds(v) & ~np.isnan(v))  # NaN barrier: none (left out above when training)
        if len(bad):
            i = bad[0]
            raise TrainError(f"{path}: target {t!r} of sample {i} ({data.material_id[i]} site {data.site_index[i]}) is "
                             f"{v[i]:g}, outside the plausible range {rng.text}"
                             + (f" ({len(bad)} samples in all)" if len(bad) > 1 else ""))
    if params["zero_tail"] is not None:
        lo, hi = params["zero_tail"]
        if hi > length:
            raise TrainError(f"params: 'zero_tail' {params['zero_tail']} reaches past the {length} grid points")
        if not data.streaming:
            data.dos[:, lo:hi, :] = 0.0
    if data.streaming:
        data.dos = stream.H5DOS(path, params["zero_tail"], width)
    if resplit and params["split"] != "stored":
        group_of = dict(zip(data.material_id, data.groups(params["split_by"])))
        of = grouped_split(data.material_id, tuple(params["split"]), params["split_seed"], group_of=group_of)
        data.split = np.array([of[m] for m in data.material_id])
    bad = sorted(set(data.split) - set(SPLITS))
    if bad:
        raise TrainError(f"{path}: unknown split label {bad[0]!r} (expected train, val, test)")
    return data


def labelled_only(data: Dataset, targets) -> Dataset:
    """The samples where every one of ``targets`` is finite (migration targets: the sites of a
    material's mobile ion). In-memory only: a streamed file is refused with a one-line error."""
    keep = np.flatnonzero(np.all([np.isfinite(data.targets[t]) for t in targets], axis=0))
    if not len(keep):
        raise TrainError(f"{data.path}: no sample carries {', '.join(targets)} (no mobile-ion materials, or the "
                         "barriers are not in the file: see its manifest)")
    if len(keep) == data.n:
        return data
    if data.streaming:
        raise TrainError("migration targets are trained in memory: set params data.in_memory to true or 'auto'")
    fields = dict(vars(data))
    for k, v in fields.items():  # every per-sample array (energies_ev is per grid point)
        if k != "energies_ev" and isinstance(v, np.ndarray) and v.ndim >= 1 and len(v) == data.n:
            fields[k] = v[keep]
    fields["targets"] = {t: y[keep] for t, y in data.targets.items()}
    fields["bonds"] = data.bonds.take(keep) if data.bonds is not None else None
    return Dataset(**fields)


def uses_bonds(params: dict) -> bool:
    """True when the run's network reads the bond table (``structure_input`` bonds or both, with a
    structure branch: every ``fusion`` but none)."""
    return params["fusion"] != "none" and params.get("structure_input", "vector") in ("bonds", "both")


def uses_vector(params: dict) -> bool:
    """True when the run's network reads the structure vector (``structure_input`` vector or both,
    with a structure branch)."""
    return params["fusion"] != "none" and params.get("structure_input", "vector") in ("vector", "both")


def bond_arrays(data: Dataset, rows) -> dict:
    """The bond inputs of ``rows`` keyed by the network's input names (``net.bond_inputs``):
    ``bond_distance_ang`` (len(rows), K) float32 Å, ``bond_neighbour_z`` (len(rows), K) int32,
    ``bond_mask`` (len(rows), K) float32, ``centre_z`` (len(rows), 1) int32. Not standardised:
    the network expands the distances itself and embeds the atomic numbers."""
    b = data.bonds
    return {"bond_distance_ang": np.asarray(b.distance_ang[rows], np.float32),
            "bond_neighbour_z": np.asarray(b.neighbour_z[rows], np.int32),
            "bond_mask": np.asarray(b.mask[rows], np.float32),
            "centre_z": np.asarray(b.centre_z[rows], np.int32).reshape(-1, 1)}


def check_bonds(data: Dataset) -> None:
    """One-line ``TrainError`` unless ``data`` carries a usable bond table."""
    b = data.bonds
    if b is None:
        raise TrainError(f"{data.path} has no bond table (written before h5 schema version 3), which params "
                         f"'structure_input' bonds/both needs: rebuild it with python -m data_prep build, or use "
                         f"structure_input 'vector'")
    if not np.all(np.isfinite(b.distance_ang)) or np.any(b.distance_ang < 0):
        raise TrainError(f"{data.path}: bonds/distance_ang holds negative, NaN or infinite distances")
    if np.any(b.neighbour_z < 0) or np.any(b.neighbour_z > 118) or np.any(b.centre_z < 1) or np.any(b.centre_z > 118):
        raise TrainError(f"{data.path}: the bond table holds atomic numbers outside 1..118")


def structure_columns(data: Dataset, families) -> np.ndarray:
    """Column indices of ``data.structure`` whose family is in ``families`` (file order)."""
    present = set(data.structure_families)
    missing = [f for f in families if f not in present]
    if missing:
        raise TrainError(f"params: 'structure_families' has {missing[0]!r}, which {data.path} does not hold "
                         f"(it has {', '.join(dict.fromkeys(data.structure_families))})")
    return np.array([i for i, f in enumerate(data.structure_families) if f in set(families)], dtype=int)



def target_matrix(data: Dataset, targets) -> np.ndarray:
    """(n, T) float64 physical target values, columns in ``targets`` order."""
    return np.stack([data.targets[t] for t in targets], axis=1)
