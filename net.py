"""DOSnet (Fung et al., Nat. Commun. 12, 88 (2021)) reimplemented from its published specification
on TensorFlow / Keras 3.

Shapes: L = grid length (2000 points by default), C = channels per atom (9 orbitals: s, py, pz,
px, dxy, dyz, dz2, dxz, dx2), N = batch size.

- ``dos_featurizer``: one atom's DOS (N, L, C) -> learned features (N, 4, 150) at L = 2000.
- ``create_model``: three atoms (site + 2 neighbours, in the adsorption work: the surface atoms
  bound to the adsorbate) through ONE shared featurizer -> dense head -> one energy (eV).
- ``create_model_combined``: as above plus the gas-phase adsorbate DOS through a separate
  featurizer of the same architecture.
- ``decay_schedule``: the step learning-rate schedule used for training.

This module imports nothing from the rest of the project so it can be read beside the paper.
"""
from __future__ import annotations

import keras
from keras import layers


def dos_featurizer(channels: int = 9, length: int = 2000, name: str = "dos_featurizer") -> keras.Model:
    """Convolutional featurizer for ONE atom's projected DOS.

    Input (N, length, channels) float32, standardised DOS. Three average-pooling views of the
    spectrum (windows of 4, 25 and 200 points, all stride 4) are stacked on the channel axis and
    passed through four strided convolutions with average pooling in between.
    Output (N, ceil(length / 500), 150); (N, 4, 150) for length 2000.
    """
    inp = keras.Input(shape=(length, channels), name="atom_dos")
    views = [layers.AveragePooling1D(pool_size=w, strides=4, padding="same", name=f"pool_{w}")(inp)
             for w in (4, 25, 200)]
    x = layers.Concatenate(axis=-1, name="multiscale")(views)
    x = layers.Conv1D(50, 20, strides=2, padding="same", activation="relu", name="conv1")(x)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.Conv1D(75, 3, strides=2, padding="same", activation="relu", name="conv2")(x)
    x = layers.AveragePooling1D(3, strides=2, padding="same", name="pool2")(x)
    x = layers.Conv1D(100, 3, strides=2, padding="same", activation="relu", name="conv3")(x)
    x = layers.AveragePooling1D(3, strides=2, padding="same", name="pool3")(x)
    x = layers.Conv1D(125, 3, strides=2, padding="same", activation="relu", name="conv4")(x)
    x = layers.AveragePooling1D(3, strides=2, padding="same", name="pool4")(x)
    x = layers.Conv1D(150, 3, strides=1, padding="same", activation="relu", name="conv5")(x)
    return keras.Model(inp, x, name=name)


def _head(features, dropout: float = 0.2):
    """Flatten -> Dropout -> Dense(200, linear) -> Dense(1000, relu) x2 -> Dense(1, linear)."""
    x = layers.Flatten(name="flatten")(features)
    x = layers.Dropout(dropout, name="dropout")(x)
    x = layers.Dense(200, activation="linear", name="dense_200")(x)
    x = layers.Dense(1000, activation="relu", name="dense_1000a")(x)
    x = layers.Dense(1000, activation="relu", name="dense_1000b")(x)
    return layers.Dense(1, activation="linear", name="energy")(x)


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
