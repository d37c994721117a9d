"""Streaming input for train.py: a data_prep h5 read through ``tf.data`` for files larger than memory.

Shapes: n samples, L grid points, W = A * C DOS channels (A atoms x C orbitals), B samples per
block (params ``data.block_samples``), N batch size.

- ``decide_in_memory``: the ``data.in_memory`` rule. ``true``/``false`` force a path; ``auto``
  loads the DOS into memory when it takes less than ``AUTO_FRACTION`` (25 %) of the memory
  available now (``MemAvailable``), else streams. In-memory training holds the raw DOS plus the
  standardised copies of the training and validation rows, i.e. about twice the DOS, so 25 %
  keeps such a run at about half of what is free.
- ``H5DOS``: the (n, L, W) float32 DOS of a file as a lazy array: ``x[rows]`` reads only those
  samples, as runs of consecutive samples (chunk-aligned: the file stores one sample per chunk),
  applies ``zero_tail`` and refuses NaN/inf. ``dosnet_bv.scalers.Scaler.fit`` uses it unchanged, so the
  streaming scalers are computed by the same code (one pass over the training rows, running sums
  in float64, 256 samples at a time) and equal the in-memory ones.
- ``input_dataset``: a ``tf.data`` pipeline over given rows: the sorted rows are cut into blocks
  of B consecutive rows; each epoch the block order is shuffled, blocks are read (one
  ``numpy_function`` per block), split into samples, shuffled again in a buffer of
  ``data.shuffle_buffer`` samples, batched, standardised and split into the network's inputs in a
  parallel map (float32 arithmetic: ``dosnet_bv.scalers.model_inputs`` to within 2 units in the last place;
  float64 here cost 0.15 ms of CPU per sample, a quarter of the pipeline), and prefetched.
  Runs on several replicas use it for in-memory data too (``safe_batch_size``, drop_remainder).
  Under ``multi_worker`` each worker runs the same pipeline and keeps its part of every batch.

Memory while streaming: the shuffle buffer (``shuffle_buffer`` x L x W x 4 bytes: 221 MB at
1024 samples of 2000 x 27) plus a few blocks and batches in flight, whatever the file's size.
"""
from __future__ import annotations

import os

import numpy as np

#: ``data.in_memory: "auto"`` loads the DOS when it is smaller than this share of available memory.
AUTO_FRACTION = 0.25


class StreamError(ValueError):
    """Bad data met while streaming (NaN/inf in the DOS); train.py reports it on one line."""


# =========================================================================== the in-memory rule
def available_memory_bytes() -> int:
    """Memory available to a new allocation now: ``MemAvailable`` of /proc/meminfo (Linux), else
    the free physical pages, else 0 (unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def decide_in_memory(setting, dos_bytes: int, available_bytes: int | None = None) -> tuple[bool, str]:
    """``(in_memory, reason)`` for ``data.in_memory`` = ``setting`` and a DOS of ``dos_bytes``."""
    gb = dos_bytes / 1e9
    if setting is True:
        return True, f"in memory (data.in_memory true; DOS {gb:.2f} GB)"
    if setting is False:
        return False, f"streaming from the h5 (data.in_memory false; DOS {gb:.2f} GB)"
    avail = available_memory_bytes() if available_bytes is None else available_bytes
    if avail <= 0:
        return True, f"in memory (data.in_memory auto; available memory unknown; DOS {gb:.2f} GB)"
    fits = dos_bytes < AUTO_FRACTION * avail
    rule = f"DOS {gb:.2f} GB {'<' if fits else '>='} {AUTO_FRACTION:.0%} of {avail / 1e9:.1f} GB available"
    return (True, f"in memory (data.in_memory auto: {rule})") if fits else \
        (False, f"streaming from the h5 (data.in_memory auto: {rule})")


# =========================================================================== lazy DOS
def runs_of(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """Sorted distinct ``rows`` -> ``[(first row, stop row, position in rows), ...]`` of consecutive rows."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [rows.size]])
    return [(int(rows[a]), int(rows[b - 1]) + 1, int(a)) for a, b in zip(starts, stops)]


class H5DOS:
    """The DOS of a data_prep h5, ``dos`` (n, L, W) float32 states/eV, read on demand.

    ``x[rows]`` (an index array, a slice or an int; a tuple applies the rest to the result) returns
    a new float32 array of those samples, in the order asked, read as runs of consecutive samples,
    with grid points ``zero_tail`` = [start, stop] set to zero; NaN or inf raises ``StreamError``.
    ``np.asarray(x)`` reads everything (what the baselines of ``--ablation`` need: small files).
    The file stays open (read-only) until ``close()``; h5py serialises reads from several threads.
    """

    def __init__(self, path, zero_tail=None, width=None):
        from data_prep.h5schema import open_dos

        self.path = str(path)
        self._h5, self._dset = open_dos(self.path)
        n, length, file_width = self._dset.shape
        self.width = file_width if width is None else int(width)  # the first ``width`` channels (fewer neighbours)
        if not 0 < self.width <= file_width:
            raise ValueError(f"width {width} outside 1..{file_width}")
        self.shape = (n, length, self.width)
        self.dtype = np.dtype(np.float32)
        self.ndim = 3
        self.zero_tail = None if zero_tail is None else (int(zero_tail[0]), int(zero_tail[1]))

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 4

    def read(self, rows) -> np.ndarray:
        """(len(rows), L, W) float32 of ``rows`` (any order, repeats allowed)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"rows out of range 0..{self.shape[0] - 1}")
        uniq, inverse = np.unique(rows, return_inverse=True)
        out = np.empty((uniq.size,) + self.shape[1:], dtype=np.float32)
        for start, stop, pos in runs_of(uniq):
            self._dset.read_direct(out, np.s_[start:stop, :, :self.width], np.s_[pos:pos + stop - start])
        if not np.isfinite(out.sum(dtype=np.float64)):  # NaN and inf survive a sum; one pass, no copy
            bad = uniq[~np.isfinite(out).reshape(len(uniq), -1).all(axis=1)]
            raise StreamError(f"{self.path}: DOS of sample {int(bad[0])} contains NaN or infinite values")
        if self.zero_tail is not None:
            out[:, self.zero_tail[0]:self.zero_tail[1], :] = 0.0
        if uniq.size == rows.size and np.array_equal(uniq, rows):
            return out
        return out[inverse]

    def __getitem__(self, key):
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, slice):
            rows = np.arange(*key.indices(self.shape[0]))
        elif isinstance(key, (int, np.integer)):
            x = self.read([int(key) % self.shape[0]])[0]
            return x[rest] if rest else x
        else:
            rows = np.asarray(key)
            if rows.dtype == bool:
                rows = np.flatnonzero(rows)
        x = self.read(rows)
        return x[(slice(None),) + rest] if rest else x

    def __array__(self, dtype=None, copy=None):
        x = self.read(np.arange(self.shape[0]))
        return x if dtype is None else x.astype(dtype)

    def close(self) -> None:
        try:
            self._h5.close()
        except Exception:  # already closed or interpreter shutting down
            pass

    def __del__(self):
        self.close()


# =========================================================================== tf.data pipeline
def blocks_of(rows, block_samples: int) -> list[np.ndarray]:
    """The sorted ``rows`` cut into blocks of ``block_samples`` consecutive entries."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    return [rows[i:i + block_samples] for i in range(0, len(rows), block_samples)]


def safe_batch_size(n: int, batch_size: int, replicas: int = 1) -> int:
    """A batch size near ``batch_size`` whose last batch of ``n`` samples is empty or has at least
    ``replicas`` samples: tf.distribute splits a batch between replicas, and a replica left with
    an empty batch breaks TensorFlow's oneDNN convolution on CPU (wrong output shape)."""
    if replicas <= 1 or n <= 0:
        return batch_size
    for b in list(range(batch_size, replicas - 1, -1)) + list(range(batch_size + 1, 2 * batch_size + 1)):
        if n % b == 0 or n % b >= replicas:
            return b
    return n


def input_dataset(params: dict, dos, scalers: dict, rows, structure=None, y_scaled=None, shuffle: bool = False,
                  seed: int = 0, batch_size: int | None = None, drop_remainder: bool = False, bonds=None):
    """A ``tf.data.Dataset`` of batches for ``rows``.

    dos: an ``H5DOS`` (streaming) or an (n, L, W) float32 array (in memory; what a run on
    several replicas uses). params: the run's params (``batch_size``, ``channels``,
    ``n_neighbours``, ``fusion``, ``targets``, ``data.block_samples``, ``data.shuffle_buffer``).
    scalers: ``dosnet_bv.scalers.fit_scalers`` output (``dos`` Scaler with (W,) mean and scale). structure:
    (n, F) raw structure columns already selected (all file rows; None when the network reads no
    structure vector). bonds: the file's ``data_prep.bonds.BondTable`` (all rows; in memory: a few
    hundred bytes per sample) when the network reads the bond table, else None.
    y_scaled: (n, T) standardised targets (all file rows) or None for prediction. batch_size:
    default params' ``batch_size`` (the global batch under a strategy).

    Elements: ``{"atom1_dos": (N, L, C), ..., "structure": (N, F)}`` float32 standardised, the
    bond inputs (``dosnet_bv.data.bond_arrays``: distances, neighbour Z, mask, centre Z) as given, plus
    ``{target: (N, 1)}`` when ``y_scaled`` is given. Without ``shuffle`` the order is ``sorted(rows)``.
    Under ``MultiWorkerMirroredStrategy`` every worker builds the same (identically seeded)
    pipeline and TensorFlow's ``DATA`` auto-sharding hands each worker its part of every batch.
    """
    import tensorflow as tf

    data_p = params["data"]
    bsz = batch_size or params["batch_size"]
    c, atoms = params["channels"], 1 + params["n_neighbours"]
    targets = list(params["targets"])
    blocks = blocks_of(rows, data_p["block_samples"])
    if not blocks:
        raise ValueError("input_dataset: no rows")
    n_rows = sum(len(b) for b in blocks)
    read_rows = dos.read if hasattr(dos, "read") else (lambda r: np.asarray(dos[r], np.float32))
    with_struct = structure is not None
    with_bonds = bonds is not None
    with_y = y_scaled is not None
    z_struct = None
    if with_struct:  # small: standardised once, by the same code as in memory (clipping included)
        z_struct = scalers.structure.transform(np.asarray(structure, np.float32))
    y_all = np.asarray(y_scaled, np.float32) if with_y else None
    _, length, width = dos.shape
    n_struct = z_struct.shape[1] if with_struct else 0
    bond_names = ("bond_distance_ang", "bond_neighbour_z", "bond_mask", "centre_z")
    parts = ["dos"] + (["structure"] if with_struct else []) + (list(bond_names) if with_bonds else []) \
        + (["y"] if with_y else [])
    k = bonds.slots if with_bonds else 0
    shapes = {"dos": (None, length, width), "structure": (None, n_struct), "y": (None, len(targets)),
              "bond_distance_ang": (None, k), "bond_neighbour_z": (None, k), "bond_mask": (None, k), "centre_z": (None, 1)}
    dtypes = {name: tf.int32 if name in ("bond_neighbour_z", "centre_z") else tf.float32 for name in parts}

    def read_block(i):  # numpy: one block of consecutive rows (no zero-width arrays: they crash unbatch)
        r = blocks[int(i)]
        out = [read_rows(r)]
        if with_struct:
            out.append(z_struct[r])
        if with_bonds:
            out.extend([bonds.distance_ang[r].astype(np.float32), bonds.neighbour_z[r].astype(np.int32),
                        bonds.mask[r].astype(np.float32), bonds.centre_z[r].astype(np.int32).reshape(-1, 1)])
        if with_y:
            out.append(y_all[r])
        return tuple(out)

    def read(i):
        tensors = tf.numpy_function(read_block, [i], [dtypes[p] for p in parts], stateful=False)
        for t, name in zip(tensors, parts):
            t.set_shape(shapes[name])
        return dict(zip(parts, tensors))

    mean = tf.constant(scalers.dos.mean, tf.float32)
    inv_scale = tf.constant(1.0 / scalers.dos.scale, tf.float32)
    clip = getattr(scalers.dos, "clip", None)

    def standardise(batch):  # float32 (Scaler.transform works in float64: within 2 ulp of it)
        z = (batch["dos"] - mean) * inv_scale
        if clip is not None:
            z = tf.clip_by_value(z, -clip, clip)
        inputs = {f"atom{a + 1}_dos": z[:, :, a * c:(a + 1) * c] for a in range(atoms)}
        if with_struct:
            inputs["structure"] = batch["structure"]
        for name in bond_names if with_bonds else ():
            inputs[name] = batch[name]
        if not with_y:
            return inputs
        return inputs, {t: batch["y"][:, j:j + 1] for j, t in enumerate(targets)}

    ds = tf.data.Dataset.range(len(blocks))
    if shuffle:
        ds = ds.shuffle(len(blocks), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(read, num_parallel_calls=2)
    ds = ds.unbatch()
    if shuffle and data_p["shuffle_buffer"] > 1:
        ds = ds.shuffle(data_p["shuffle_buffer"], seed=seed + 1, reshuffle_each_iteration=True)
    drop = drop_remainder and n_rows >= bsz
    ds = ds.batch(bsz, drop_remainder=drop)
    ds = ds.apply(tf.data.experimental.assert_cardinality(n_rows // bsz if drop else -(-n_rows // bsz)))
    ds = ds.map(standardise, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    opts = tf.data.Options()
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(opts)
