"""DOSnet (Fung et al., Nat. Commun. 12, 88 (2021)) reimplemented from its published specification
on TensorFlow / Keras 3.

Shapes: L = grid length (2000 points by default), C = channels per atom (9 orbitals: s, py, pz,
px, dxy, dyz, dz2, dxz, dx2), A = atoms per sample (3 by default), N = batch size.

- ``dos_featurizer``: one atom's DOS (N, L, C) -> learned features (N, 4, 150) at L = 2000.
- ``create_model``: three atoms (site + 2 neighbours, in the adsorption work: the surface atoms
  bound to the adsorbate) through ONE shared featurizer -> dense head -> one energy (eV).
- ``create_model_combined``: as above plus the gas-phase adsorbate DOS through a separate
  featurizer of the same architecture.
- ``decay_schedule``: the step learning-rate schedule used for training.
- ``atoms_per_sample``: A = 1 + ``n_neighbours`` from params; C = ``channels`` and L = ``length``
  come from params too.
- ``build_model``: the network with every size taken from params: A = 1 + ``n_neighbours``,
  C = ``channels``, L = ``length``; the structure vector (F features per sample) joins the DOS
  as chosen by ``fusion``: ``none``, ``late``, ``early`` or ``structure_only``; one output per
  bond-valence target (``bvs_vu``, ``bvs_deviation_vu``, ``valence``); ``structure_input`` says
  whether the structure branch reads that vector, the bond table (``bond_block``) or both.
- ``bond_block``: the bond-aware structure branch, a deep-sets network over a site's neighbours:
  ``GaussianExpansion`` of the distances, a learned embedding of the centre's and each
  neighbour's element, one MLP per bond, ``MaskedBondPool`` (masked sum and mean), a readout.
- ``compile_model``: Adam and one log-cosh loss per target, weighted by ``loss_weights``.
- ``learning_rate``: the learning rate of an epoch under ``lr_schedule`` (upstream's step decay
  by default).

This module imports nothing from the rest of the project so it can be read beside the paper.
"""
from __future__ import annotations

import math

import keras
import numpy as np
from keras import layers, ops


def dos_featurizer(channels: int = 9, length: int = 2000, name: str = "dos_featurizer",
                   filters=(50, 75, 100, 125, 150)) -> keras.Model:
    """Convolutional featurizer for ONE atom's projected DOS.

    Input (N, length, channels) float32, standardised DOS. Three average-pooling views of the
    spectrum (windows of 4, 25 and 200 points, all stride 4) are stacked on the channel axis and
    passed through four strided convolutions with average pooling in between.
    ``filters``: the widths of the five convolutions (params' ``dos_filters``; upstream's
    50, 75, 100, 125, 150 by default).
    Output (N, ceil(length / 500), filters[-1]); (N, 4, 150) for length 2000.
    """
    inp = keras.Input(shape=(length, channels), name="atom_dos")
    views = [layers.AveragePooling1D(pool_size=w, strides=4, padding="same", name=f"pool_{w}")(inp)
             for w in (4, 25, 200)]
    x = layers.Concatenate(axis=-1, name="multiscale")(views)
    x = layers.Conv1D(filters[0], 20, strides=2, padding="same", activation="relu", name="conv1")(x)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.Conv1D(filters[1], 3, strides=2, padding="same", activation="relu", name="conv2")(x)
    x = layers.AveragePooling1D(3, strides=2, padding="same", name="pool2")(x)
    x = layers.Conv1D(filters[2], 3, strides=2, padding="same", activation="relu", name="conv3")(x)
    x = layers.AveragePooling1D(3, strides=2, padding="same", name="pool3")(x)
    x = layers.Conv1D(filters[3], 3, strides=2, padding="same", activation="relu", name="conv4")(x)
    x = layers.AveragePooling1D(3, strides=2, padding="same", name="pool4")(x)
    x = layers.Conv1D(filters[4], 3, strides=1, padding="same", activation="relu", name="conv5")(x)
    return keras.Model(inp, x, name=name)


def _head(features, dropout: float = 0.2, targets=None):
    """Flatten -> Dropout -> Dense(200, linear) -> Dense(1000, relu) x2 -> Dense(1, linear).

    With ``targets`` (names): one Dense(1, linear) per target on the shared layers, returned as a
    dict keyed by target (a multi-task head); without: the single ``energy`` output."""
    x = layers.Flatten(name="flatten")(features)
    x = layers.Dropout(dropout, name="dropout")(x)
    x = layers.Dense(200, activation="linear", name="dense_200")(x)
    x = layers.Dense(1000, activation="relu", name="dense_1000a")(x)
    x = layers.Dense(1000, activation="relu", name="dense_1000b")(x)
    if targets is None:
        return layers.Dense(1, activation="linear", name="energy")(x)
    return {t: layers.Dense(1, activation="linear", name=t)(x) for t in targets}


def create_model(shared_conv: keras.Model, channels: int = 9, length: int = 2000) -> keras.Model:
    """Three atoms' DOS, each (N, length, channels), through the SAME featurizer -> (N, 1).

    ``shared_conv`` is one ``dos_featurizer`` instance, so the three atoms share its weights.
    """
    inputs = [keras.Input(shape=(length, channels), name=f"atom{i + 1}_dos") for i in range(3)]
    feats = [shared_conv(x) for x in inputs]
    merged = layers.Concatenate(axis=-1, name="atoms")(feats)
    return keras.Model(inputs, _head(merged), name="dosnet")


def create_model_combined(shared_conv: keras.Model, channels: int = 9, length: int = 2000) -> keras.Model:
    """Three surface atoms through the shared featurizer plus the gas-phase adsorbate DOS
    (N, length, channels) through a SEPARATE featurizer of the same architecture -> (N, 1)."""
    inputs = [keras.Input(shape=(length, channels), name=f"atom{i + 1}_dos") for i in range(3)]
    ads_input = keras.Input(shape=(length, channels), name="adsorbate_dos")
    ads_conv = dos_featurizer(channels, length, name="adsorbate_featurizer")
    feats = [shared_conv(x) for x in inputs] + [ads_conv(ads_input)]
    merged = layers.Concatenate(axis=-1, name="atoms")(feats)
    return keras.Model(inputs + [ads_input], _head(merged), name="dosnet_combined")


def decay_schedule(epoch: int, lr: float) -> float:
    """Learning rate for ``epoch`` (0-based): 1e-3, then 5e-4 from 15, 1e-4 from 35,
    5e-5 from 45 and 1e-5 from 55."""
    for start, rate in ((55, 1e-5), (45, 5e-5), (35, 1e-4), (15, 5e-4)):
        if epoch >= start:
            return rate
    return 1e-3


# --------------------------------------------------------------------------- DOSnet-BV
def atoms_per_sample(params: dict) -> int:
    """Atoms per sample A: the centre site and its ``n_neighbours`` nearest neighbours."""
    return 1 + params["n_neighbours"]


FUSIONS = ("none", "late", "early", "structure_only")
BV_TARGETS = ("bvs_vu", "bvs_deviation_vu", "valence", "migration_e1d_ev", "migration_e2d_ev", "migration_e3d_ev")
LOSSES = {"log_cosh": keras.losses.LogCosh, "mse": keras.losses.MeanSquaredError,
          "mae": keras.losses.MeanAbsoluteError}


STRUCTURE_INPUTS = ("vector", "bonds", "both")
#: Elements 1..118; row 0 of the embedding is the padding of empty neighbour slots.
N_ELEMENTS = 119
#: The bond inputs: K neighbour slots per sample (any K: the bond branch does not depend on it).
BOND_INPUTS = ("bond_distance_ang", "bond_neighbour_z", "bond_mask", "centre_z")


def structure_block(x, units):
    """The structure vector (N, F) through Dense(u, relu) for each u in ``units`` -> (N, units[-1])."""
    for i, u in enumerate(units):
        x = layers.Dense(u, activation="relu", name=f"structure_dense{i + 1}")(x)
    return x


@keras.saving.register_keras_serializable(package="dosnet_bv")
class GaussianExpansion(layers.Layer):
    """Distances (N, K) in Å -> (N, K, R): exp(-((d - mu_r) / step)^2) with R = ``centres`` centres
    mu_r evenly spaced from 0 to ``cutoff_ang`` and width = their step (CGCNN's expansion)."""

    def __init__(self, centres: int = 32, cutoff_ang: float = 6.0, **kwargs):
        super().__init__(**kwargs)
        self.centres, self.cutoff_ang = int(centres), float(cutoff_ang)
        self.mu = np.linspace(0.0, self.cutoff_ang, self.centres).astype("float32")
        self.step = self.cutoff_ang / (self.centres - 1)

    def call(self, d):
        d = ops.expand_dims(ops.cast(d, self.compute_dtype), -1)
        return ops.exp(-ops.square((d - ops.cast(self.mu, self.compute_dtype)) / self.step))

    def compute_output_shape(self, shape):
        return tuple(shape) + (self.centres,)

    def get_config(self):
        return {**super().get_config(), "centres": self.centres, "cutoff_ang": self.cutoff_ang}


@keras.saving.register_keras_serializable(package="dosnet_bv")
class BondPairs(layers.Layer):
    """[rbf (N, K, R), centre embedding (N, 1, E), neighbour embedding (N, K, E)] -> (N, K, R + 2E):
    one row per bond, the centre's embedding repeated on each of its bonds."""

    def call(self, inputs):
        rbf, centre, nbr = inputs
        return ops.concatenate([rbf, centre + ops.zeros_like(nbr), nbr], axis=-1)

    def compute_output_shape(self, shapes):
        rbf, centre, nbr = shapes
        return tuple(rbf[:-1]) + (rbf[-1] + centre[-1] + nbr[-1],)


@keras.saving.register_keras_serializable(package="dosnet_bv")
class MaskedBondPool(layers.Layer):
    """[messages (N, K, U), distances (N, K) Å, mask (N, K)] -> (N, 2U): the sum and the mean over a
    sample's bonds of the messages, each weighted by mask * 0.5 (1 + cos(pi d / cutoff_ang)) (1 at
    0 Å, falling smoothly to 0 at the cutoff, so a neighbour crossing it does not jump). Empty
    slots (mask 0) contribute exactly nothing and the slot order does not matter (deep sets); the
    mean divides by the number of neighbours (at least 1), the sum keeps the count."""

    def __init__(self, cutoff_ang: float = 6.0, **kwargs):
        super().__init__(**kwargs)
        self.cutoff_ang = float(cutoff_ang)

    def call(self, inputs):
        m, d, mask = inputs
        d, mask = ops.cast(d, m.dtype), ops.cast(mask, m.dtype)
        envelope = 0.5 * (ops.cos(math.pi * ops.minimum(d / self.cutoff_ang, 1.0)) + 1.0)
        total = ops.sum(m * ops.expand_dims(mask * envelope, -1), axis=1)
        count = ops.maximum(ops.sum(mask, axis=1, keepdims=True), 1.0)
        return ops.concatenate([total, total / count], axis=-1)

    def compute_output_shape(self, shapes):
        return (shapes[0][0], 2 * shapes[0][-1])

    def get_config(self):
        return {**super().get_config(), "cutoff_ang": self.cutoff_ang}


def bond_inputs() -> list:
    """The bond table's inputs, K slots per sample (any K): ``bond_distance_ang`` (N, K) float32 Å,
    ``bond_neighbour_z`` (N, K) int32 atomic numbers (0 in empty slots), ``bond_mask`` (N, K)
    float32 (1 = a neighbour), ``centre_z`` (N, 1) int32."""
    return [keras.Input(shape=(None,), name="bond_distance_ang"),
            keras.Input(shape=(None,), name="bond_neighbour_z", dtype="int32"),
            keras.Input(shape=(None,), name="bond_mask"),
            keras.Input(shape=(1,), name="centre_z", dtype="int32")]


def bond_block(inputs, params: dict):
    """The bond-aware structure branch (``bond_inputs``) -> (N, bond_units[-1]).

    Per bond: ``GaussianExpansion`` of d (``bond_rbf`` centres over 0..``bond_cutoff_ang``) joined
    with a learned ``bond_embedding``-wide embedding of the centre's and the neighbour's element
    (one table for both), through Dense(u, relu) for each u in ``bond_units``; then
    ``MaskedBondPool`` (sum and mean over the bonds) and Dense(bond_units[-1], relu). Invariant
    to the order of the neighbour slots and blind to empty ones.
    """
    d, z_nbr, mask, z_centre = inputs
    cutoff = params["bond_cutoff_ang"]
    embed = layers.Embedding(N_ELEMENTS, params["bond_embedding"], name="element_embedding")
    x = BondPairs(name="bond_pairs")([GaussianExpansion(params["bond_rbf"], cutoff, name="bond_rbf")(d),
                                      embed(z_centre), embed(z_nbr)])
    for i, u in enumerate(params["bond_units"]):
        x = layers.Dense(u, activation="relu", name=f"bond_dense{i + 1}")(x)
    x = MaskedBondPool(cutoff, name="bond_pool")([x, d, mask])
    return layers.Dense(params["bond_units"][-1], activation="relu", name="bond_readout")(x)


def build_model(params: dict, n_structure: int = 0) -> keras.Model:
    """The DOSnet-BV network described by ``params``.

    Inputs, by name: ``atom{i}_dos`` (N, L, C) for i = 1..A, the standardised DOS of the centre
    site and then its neighbours (all but ``structure_only``); with a structure branch (all
    ``fusion`` but ``none``) and ``structure_input`` ``vector`` or ``both``: ``structure``
    (N, F = n_structure), the standardised structure vector; with ``bonds`` or ``both``: the bond
    table (``bond_inputs``). ``fusion``:

    - ``none``: the unmodified DOSnet body (A atoms, one shared featurizer, dense head);
    - ``late``: the structure vector through ``structure_block`` (``structure_units``) and/or
      the bond table through ``bond_block``, concatenated with the flattened DOS features before
      the head;
    - ``early``: the structure vector and/or ``bond_block``'s output projected to
      k = ``early_channels`` values and repeated along the energy axis as k extra channels of
      every atom's DOS, so the shared featurizer (C + k input channels) sees it in every
      convolution window;
    - ``structure_only``: the structure branch (as in ``late``) and the head alone (the control
      without DOS).

    Outputs: one (N, 1) regression output per name in ``targets``, keyed by name (``valence``
    too: predicted oxidation states are rounded to the nearest integer for accuracy).
    """
    fusion, channels, length = params["fusion"], params["channels"], params["length"]
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
    if params["structure_input"] not in STRUCTURE_INPUTS:
        raise ValueError(f"unknown structure_input {params['structure_input']!r}; expected one of {STRUCTURE_INPUTS}")
    with_vector = fusion != "none" and params["structure_input"] in ("vector", "both")
    with_bonds = fusion != "none" and params["structure_input"] in ("bonds", "both")
    unknown = [t for t in params["targets"] if t not in BV_TARGETS]
    if unknown or not params["targets"]:
        raise ValueError(f"targets must be some of {BV_TARGETS}, got {params['targets']!r}")
    atoms = [keras.Input(shape=(length, channels), name=f"atom{i + 1}_dos")
             for i in range(atoms_per_sample(params) if fusion != "structure_only" else 0)]
    structure = keras.Input(shape=(n_structure,), name="structure") if with_vector else None
    bonds = bond_inputs() if with_bonds else []
    if fusion == "early":
        k = params["early_channels"]
        parts = ([structure] if with_vector else []) + ([bond_block(bonds, params)] if with_bonds else [])
        context = parts[0] if len(parts) == 1 else layers.Concatenate(name="structure_parts")(parts)
        context = layers.Dense(k, name="structure_projection")(context)
        context = layers.RepeatVector(length, name="structure_broadcast")(context)  # (N, L, k)
        views = [layers.Concatenate(axis=-1, name=f"atom{i + 1}_dos_structure")([a, context])
                 for i, a in enumerate(atoms)]
        shared = dos_featurizer(channels + k, length, filters=params["dos_filters"])
    else:
        views = atoms
        shared = dos_featurizer(channels, length, filters=params["dos_filters"]) if atoms else None

    def branch():  # late and structure_only: the structure vector's block and/or the bond block
        return (([structure_block(structure, params["structure_units"])] if with_vector else [])
                + ([bond_block(bonds, params)] if with_bonds else []))

    if fusion == "structure_only":
        parts = branch()
        features = parts[0] if len(parts) == 1 else layers.Concatenate(name="structure_parts")(parts)
    else:
        features = layers.Concatenate(axis=-1, name="atoms")([shared(v) for v in views])
        if fusion == "late":
            dos_flat = layers.Flatten(name="dos_flatten")(features)
            features = layers.Concatenate(name="dos_structure")([dos_flat] + branch())
    inputs = atoms + ([structure] if structure is not None else []) + bonds
    outputs = _head(features, params["dropout"], params["targets"])
    return keras.Model(inputs, outputs, name=f"dosnet_bv_{fusion}")


def compile_model(model: keras.Model, params: dict) -> keras.Model:
    """Adam(``learning_rate``); one ``loss`` per target (log-cosh as upstream) weighted by
    ``loss_weights`` (1 for a target not listed); MAE reported per target."""
    weights = params["loss_weights"]
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=params["learning_rate"]),
                  loss={t: LOSSES[params["loss"]]() for t in params["targets"]},
                  loss_weights={t: float(weights.get(t, 1.0)) for t in params["targets"]},
                  metrics={t: ["mae"] for t in params["targets"]})
    return model


LR_SCHEDULES = ("dosnet_step", "constant", "cosine")


def learning_rate(epoch: int, params: dict) -> float:
    """Learning rate for ``epoch`` (0-based) under ``params["lr_schedule"]``, from ``learning_rate``:

    - ``dosnet_step``: upstream's ``decay_schedule`` scaled by ``learning_rate`` / 1e-3 (the same
      numbers at the default 1e-3);
    - ``constant``: ``learning_rate`` throughout;
    - ``cosine``: ``learning_rate`` * (1 + cos(pi * epoch / epochs)) / 2.
    """
    lr0, name = params["learning_rate"], params["lr_schedule"]
    if name == "dosnet_step":
        return decay_schedule(epoch, lr0) * lr0 / 1e-3
    if name == "constant":
        return lr0
    if name == "cosine":
        return lr0 * 0.5 * (1.0 + math.cos(math.pi * min(epoch, params["epochs"]) / params["epochs"]))
    raise ValueError(f"unknown lr_schedule {name!r}; expected one of {LR_SCHEDULES}")
