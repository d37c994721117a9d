"""Standardisation: ``Scaler`` (one array's statistics), ``Scalers`` (a model's set, saved as
``scalers.json``), fitted on the training rows only; ``model_inputs`` standardises rows into the
network's named inputs."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dosnet_bv.data import Dataset, bond_arrays, structure_columns, target_matrix, uses_bonds, uses_vector
from dosnet_bv.params import TrainError


@dataclass
class Scaler:
    """Standardisation over the last axis, ``(x - mean) / scale``, fitted on training rows only."""

    mean: np.ndarray
    scale: np.ndarray
    clip: float | None = None  # standardised values are clipped to [-clip, clip] when set

    @classmethod
    def fit(cls, x: np.ndarray, rows, chunk: int = 256, clip: float | None = None,
            per_point: bool = False) -> "Scaler":
        """Statistics of ``x[rows]`` over every axis but the last (float64, chunked: no big copy);
        with ``per_point`` over the sample axis only (mean and scale of shape ``x.shape[1:]``)."""
        rows = np.asarray(rows)
        if rows.size == 0:
            raise TrainError("cannot fit a scaler: no training rows")
        shape = x.shape[1:] if per_point else x.shape[-1:]
        s = np.zeros(shape)
        s2 = np.zeros(shape)
        count = 0
        for i in range(0, len(rows), chunk):
            part = x[rows[i:i + chunk]].astype(np.float64)
            part = part if per_point else part.reshape(-1, x.shape[-1])
            s += part.sum(axis=0)
            s2 += (part ** 2).sum(axis=0)
            count += part.shape[0]
        mean = s / count
        var = np.maximum(s2 / count - mean ** 2, 0.0)
        std = np.sqrt(var)
        ok = std > 1e-8 * np.maximum(np.abs(mean), 1.0)
        return cls(mean, np.where(ok, std, 1.0), clip)

    @classmethod
    def identity(cls, width: int) -> "Scaler":
        return cls(np.zeros(width), np.ones(width))

    def transform(self, x: np.ndarray, rows=None, chunk: int = 256) -> np.ndarray:
        """A NEW float32 array of the standardised ``x[rows]`` (all rows when None)."""
        rows = np.arange(len(x)) if rows is None else np.asarray(rows)
        out = np.empty((len(rows),) + x.shape[1:], dtype=np.float32)
        for i in range(0, len(rows), chunk):
            out[i:i + chunk] = (x[rows[i:i + chunk]] - self.mean) / self.scale
        if self.clip is not None:
            np.clip(out, -self.clip, self.clip, out=out)
        return out

    def inverse(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, dtype=np.float64) * self.scale + self.mean

    def as_dict(self, labels) -> dict:
        return {"labels": list(labels), "mean": self.mean.tolist(), "scale": self.scale.tolist(), "clip": self.clip}

    @classmethod
    def from_dict(cls, d: dict) -> "Scaler":
        return cls(np.asarray(d["mean"], dtype=np.float64), np.asarray(d["scale"], dtype=np.float64), d.get("clip"))


#: Standardised structure features are clipped to +-this many training standard deviations. Some
#: columns are almost constant in training (e.g. the Gaussian-expansion bins below 1 A, non-zero
#: only for the few N-H / O-H crystals): ammonia's N-H bonds put 4,000 sigma into ``gauss_0.4``
#: and, unclipped, drove its test predictions to -300 v.u.
STRUCTURE_CLIP: float = 10.0


@dataclass
class Scalers:
    """The scalers of one model: DOS (per channel; None for ``structure_only``), structure (per
    selected column; None for fusion ``none``), targets; the structure columns they apply to;
    ``json``: what ``scalers.json`` stores (labels next to each statistic)."""

    dos: Scaler | None
    structure: Scaler | None
    targets: Scaler
    structure_columns: np.ndarray
    json: dict


def fit_scalers(params: dict, data: Dataset, train_rows) -> Scalers:
    """DOS (params' ``dos_scaling``: per channel, per energy point and channel, or none), structure
    (per selected column) and target scalers from ``train_rows``.
    The bond table needs none (the network expands the distances and embeds the elements)."""
    fusion, targets = params["fusion"], params["targets"]
    vector = uses_vector(params)
    cols = structure_columns(data, params["structure_families"]) if vector else np.zeros(0, int)
    dos = None
    if fusion != "structure_only":
        how = params.get("dos_scaling", "channel")
        dos = Scaler.identity(data.dos.shape[-1]) if how == "none" else \
            Scaler.fit(data.dos, train_rows, per_point=(how == "point"))
    struct = Scaler.fit(data.structure[:, cols], train_rows, clip=STRUCTURE_CLIP) if vector else None
    y = target_matrix(data, targets)
    ys = Scaler.fit(y, train_rows) if params["target_scaling"] == "standard" else Scaler.identity(len(targets))
    js = {"dos": dos.as_dict(data.channel_labels) if dos else None,
          "structure": struct.as_dict([data.structure_labels[i] for i in cols]) if struct else None,
          "targets": ys.as_dict(targets), "target_scaling": params["target_scaling"],
          "target_train_mean": y[np.asarray(train_rows)].mean(axis=0).tolist(),
          "n_train_rows": int(len(train_rows))}
    return Scalers(dos, struct, ys, cols, js)


def scalers_from_json(js: dict, data: Dataset) -> Scalers:
    """Saved scalers (``scalers.json``) for ``data``: structure columns found by label."""
    cols = np.zeros(0, int)
    if js["structure"] is not None:
        where = {lab: i for i, lab in enumerate(data.structure_labels)}
        missing = [lab for lab in js["structure"]["labels"] if lab not in where]
        if missing:
            raise TrainError(f"{data.path} lacks the structure feature {missing[0]!r} that the model was trained on")
        cols = np.array([where[lab] for lab in js["structure"]["labels"]], dtype=int)
    return Scalers(Scaler.from_dict(js["dos"]) if js["dos"] else None,
                   Scaler.from_dict(js["structure"]) if js["structure"] else None,
                   Scaler.from_dict(js["targets"]), cols, js)


def model_inputs(params: dict, data: Dataset, scalers: Scalers, rows) -> dict:
    """Standardised inputs of ``rows`` keyed by the network's input names: ``atom{i}_dos``
    (len(rows), L, C) float32 for each atom, ``structure`` (len(rows), F) float32, and the bond
    table's inputs (``data.bond_arrays``) for ``structure_input`` bonds or both."""
    out = {}
    if params["fusion"] != "structure_only":
        x = scalers.dos.transform(data.dos, rows)
        c = params["channels"]
        for i in range(1 + params["n_neighbours"]):
            out[f"atom{i + 1}_dos"] = np.ascontiguousarray(x[:, :, i * c:(i + 1) * c])
        del x
    if uses_vector(params):
        out["structure"] = scalers.structure.transform(data.structure[:, scalers.structure_columns], rows)
    if uses_bonds(params):
        out.update(bond_arrays(data, np.asarray(rows)))
    return out
