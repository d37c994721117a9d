"""Sharded data preparation: run ``compute-embedded`` and ``build`` as N independent parts (e.g. a
SLURM job array), then ``merge`` the parts' h5 files into one equal to an unsharded build.

- A material belongs to shard ``shard_index(material_id, N) + 1`` (a stable hash of its id: the
  same in every run, independent of order and selection; the Materials Project fetcher uses the
  same function), so the N shards are disjoint and together hold every material.
- ``build --shard I/N`` featurises shard I's records only and stores ``shard`` = "I/N" in the h5.
- ``merge_h5(out, inputs)`` combines h5 files of the same build configuration: materials in id
  order (as ``build`` sorts them), every per-sample and per-material array reordered to match, and
  the train/val/test split recomputed over the union of material ids (it depends only on that set
  and the seed, so it equals the unsharded build's; a shard's own split, computed over its part,
  is discarded). Inputs that carry ``shard`` must be the complete set 1..N of one N. Skipped
  materials are united. The result's datasets, dtypes, chunking, compression and attributes are
  those of an unsharded build (tests/test_shards.py checks this field by field).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from data_prep import h5schema as sch
from data_prep.h5schema import BuildError
from data_prep.split import grouped_split


def _families_of_union(files, entries) -> dict:
    """Families over every input's materials (``data_prep.families.assign_families``)."""
    from pymatgen.core import Structure

    from data_prep.families import assign_families

    items = []
    for _, k, j, _, _ in entries:
        h = files[k]
        mid = h[sch.material("material_id")].asstr()[j]
        parent = h[sch.material("parent_id")].asstr()[j]
        origin = h[sch.material("origin")].asstr()[j]
        real = parent == mid
        s = Structure.from_dict(json.loads(h[sch.material("structure_json")].asstr()[j]))
        items.append((str(mid), str(origin), None if real else str(parent), s))
    return assign_families(items)


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 1 <= I <= N; ``BuildError`` otherwise."""
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise BuildError(f"--shard must look like I/N (e.g. 2/8), got {text!r}") from None
    if n < 1 or not 1 <= i <= n:
        raise BuildError(f"--shard must be I/N with 1 <= I <= N, got {text}")
    return i, n


def in_shard(material_id: str, shard: tuple[int, int]) -> bool:
    from data_prep.mp.fetch import shard_index

    return shard_index(material_id, shard[1]) == shard[0] - 1


def record_ids(paths) -> list[str]:
    """Material id of each record file (read from the record, not its name)."""
    from data_prep.mp.fetch import peek_id
    from data_prep.records import RecordError

    out = []
    for p in paths:
        try:
            out.append(peek_id(Path(p)))
        except RecordError:
            out.append(Path(p).stem)  # unreadable: build reports it as skipped, in the shard of its name
    return out


def select_records(paths, shard: tuple[int, int]) -> list:
    """The record files of ``paths`` whose material is in ``shard``."""
    paths = list(paths)
    return [p for p, mid in zip(paths, record_ids(paths)) if in_shard(mid, shard)]


# ----------------------------------------------------------------------------- merge
def _datasets(h) -> list[str]:
    import h5py

    names = []
    h.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def merge_h5(out_path, inputs, overwrite: bool = False, progress: bool = True) -> dict:
    """Merge data_prep h5 files (e.g. the shards of one build) into ``out_path``, atomically."""
    import h5py
    from tqdm import tqdm

    from data_prep.records import atomic_write_bytes

    out_path = Path(out_path)
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise BuildError("merge needs at least one input h5")
    if out_path.exists() and not overwrite:
        raise BuildError(f"{out_path} exists; pass --overwrite to replace it")
    for p in inputs:
        if not p.is_file():
            raise BuildError(f"input not found: {p}")
        if p.resolve() == out_path.resolve():
            raise BuildError(f"input {p} is the output file")
    files = []
    try:
        for p in inputs:
            files.append(sch.open_raw(p))  # readable, current schema version
        first = files[0]
        names = _datasets(first)
        for p, h in zip(inputs, files):
            if sch.material("n_samples") not in h or sch.CONFIG_ATTR not in h.attrs:
                raise BuildError(f"{p} is not a data_prep build (no {sch.material('n_samples')} or "
                                 f"{sch.CONFIG_ATTR})")
            if sorted(_datasets(h)) != sorted(names):
                raise BuildError(f"{p} holds other datasets than {inputs[0]}")
            if json.loads(h.attrs[sch.CONFIG_ATTR]) != json.loads(first.attrs[sch.CONFIG_ATTR]):
                raise BuildError(f"{p} was built with another configuration than {inputs[0]} (attribute config)")
            for name in names:
                if not sch.per_sample(name) and not name.startswith(sch.MATERIALS_GROUP) and \
                        not np.array_equal(h[name][...], first[name][...]):
                    raise BuildError(f"{p}: {name} differs from {inputs[0]}")
            if h[sch.DOS].shape[1:] != first[sch.DOS].shape[1:]:
                raise BuildError(f"{p}: DOS shape {h[sch.DOS].shape[1:]} differs from {first[sch.DOS].shape[1:]}")
        shards = [h.attrs.get(sch.SHARD_ATTR) for h in files]
        if any(s is not None for s in shards):
            parsed = [parse_shard(s) if s is not None else None for s in shards]
            ns = {s[1] for s in parsed if s}
            got = sorted(s[0] for s in parsed if s)
            if None in parsed or len(ns) != 1 or got != list(range(1, next(iter(ns)) + 1)):
                raise BuildError(f"merge needs every shard of one build exactly once; got {', '.join(map(str, shards))}")
        # materials in id order; each with (input, material row, first sample, samples)
        entries = []
        for k, h in enumerate(files):
            mids = h[sch.material("material_id")].asstr()[...]
            counts = np.asarray(h[sch.material("n_samples")][...], dtype=np.int64)
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            if counts.sum() != h[sch.DOS].shape[0]:
                raise BuildError(f"{inputs[k]}: materials/n_samples does not add up to the samples")
            sample_mids = h[sch.meta("material_id")].asstr()[...]
            for j, (m, s, c) in enumerate(zip(mids, starts, counts)):
                if c and not np.all(sample_mids[s:s + c] == m):
                    raise BuildError(f"{inputs[k]}: samples of {m} are not where materials/n_samples puts them")
                entries.append((str(m), k, j, int(s), int(c)))
        entries.sort(key=lambda e: e[0])
        dup = sorted({e[0] for a, e in zip(entries, entries[1:]) if a[0] == e[0]})
        if dup:
            raise BuildError(f"material(s) in more than one input: {dup[:10]}")
        cfg = json.loads(first.attrs[sch.CONFIG_ATTR])
        fams = _families_of_union(files, entries)  # a shard only saw its own real parents
        group_of = {m: a.family_id for m, a in fams.items()} if cfg.get("split_by", "family") == "family" else None
        split_of = grouped_split([e[0] for e in entries], tuple(cfg["split_fractions"]), cfg["split_seed"],
                                 group_of=group_of)
        n = sum(e[4] for e in entries)
        # per input: the output positions of its samples / materials, as index arrays
        sample_src = {k: [] for k in range(len(files))}
        material_src = {k: [] for k in range(len(files))}
        pos = 0
        for i, (_, k, j, s, c) in enumerate(entries):
            sample_src[k].append((np.arange(s, s + c), np.arange(pos, pos + c)))
            material_src[k].append((j, i))
            pos += c
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            with h5py.File(tmp, "w") as o:
                for name in names:
                    src = first[name]
                    if name == sch.DOS:
                        continue
                    if sch.per_sample(name):
                        shape = (n,) + src.shape[1:]
                    elif name.startswith(sch.MATERIALS_GROUP):
                        shape = (len(entries),) + src.shape[1:]
                    else:
                        shape = src.shape
                    d = o.create_dataset(name, shape=shape, dtype=src.dtype, chunks=src.chunks,
                                         compression=src.compression, compression_opts=src.compression_opts)
                    for key, val in src.attrs.items():
                        d.attrs[key] = val
                    if name == sch.SPLIT:
                        d[...] = np.array([split_of[e[0]] for e in entries for _ in range(e[4])], dtype=object)
                    elif name == sch.meta("family_id"):
                        d[...] = np.array([fams[e[0]].family_id for e in entries for _ in range(e[4])], dtype=object)
                    elif name in (sch.material("family_id"), sch.material("prototype_group")):
                        key = name[len(sch.MATERIALS_GROUP):]
                        d[...] = np.array([getattr(fams[e[0]], key) for e in entries], dtype=object)
                    elif name == sch.material("split"):
                        d[...] = np.array([split_of[e[0]] for e in entries], dtype=object)
                    elif sch.per_sample(name) or name.startswith(sch.MATERIALS_GROUP):
                        buf = np.empty(shape, dtype=src.dtype)
                        for k, h in enumerate(files):
                            a = h[name][...]
                            if sch.per_sample(name):
                                for rows_in, rows_out in sample_src[k]:
                                    buf[rows_out] = a[rows_in]
                            else:
                                for j, i in material_src[k]:
                                    buf[i] = a[j]
                        d[...] = buf
                    else:
                        d[...] = src[...]
                src = first[sch.DOS]
                dos = o.create_dataset(sch.DOS, shape=(n,) + src.shape[1:], dtype=src.dtype, chunks=src.chunks,
                                       compression=src.compression, compression_opts=src.compression_opts)
                for key, val in src.attrs.items():
                    dos.attrs[key] = val
                bar = tqdm(total=n, desc="merging DOS", unit="sample", disable=not progress)
                pos = 0
                run_start, run_k, run_s, run_c = 0, None, 0, 0
                for _, k, _, s, c in entries + [("", None, 0, 0, 0)]:  # copy runs of consecutive samples
                    if k == run_k and s == run_s + run_c:
                        run_c += c
                    else:
                        for a in range(0, run_c, 256):
                            b = min(run_c, a + 256)
                            dos[run_start + a:run_start + b] = files[run_k][sch.DOS][run_s + a:run_s + b]
                            bar.update(b - a)
                        run_start, run_k, run_s, run_c = pos, k, s, c
                    pos += c
                bar.close()
                for key, val in first.attrs.items():
                    if key not in (sch.SHARD_ATTR, sch.SKIPPED_ATTR):
                        o.attrs[key] = val
                if sch.MIGRATION_ATTR in first.attrs:  # counts over all shards
                    info = json.loads(first.attrs[sch.MIGRATION_ATTR])
                    parts = [json.loads(h.attrs.get(sch.MIGRATION_ATTR, "{}")).get("counts", {}) for h in files]
                    info["counts"] = {k: sum(int(c.get(k, 0)) for c in parts) for k in info.get("counts", {})}
                    o.attrs[sch.MIGRATION_ATTR] = json.dumps(info, sort_keys=True)
                skipped = {}
                for h in files:
                    skipped.update(json.loads(h.attrs.get(sch.SKIPPED_ATTR, "{}")))
                o.attrs[sch.SKIPPED_ATTR] = json.dumps(skipped, sort_keys=True)
            os.replace(tmp, out_path)
        except OSError as exc:  # disk full, I/O error: one line (sch.H5WriteError)
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise sch.H5WriteError.of(out_path, exc) from None
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    finally:
        for h in files:
            h.close()
    n_records = 0
    for p in inputs:
        try:
            n_records += json.loads(p.with_suffix(".manifest.json").read_text())["n_records"]
        except (OSError, ValueError, KeyError):
            n_records = None
            break
    manifest = {"n_records": n_records if n_records is not None else len(entries) + len(skipped),
                "n_materials": len(entries), "n_samples": n, "skipped": skipped,
                "merged_from": [str(p) for p in inputs]}
    manifest_path = out_path.with_suffix(".manifest.json")
    atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return {**manifest, "out": str(out_path), "manifest": str(manifest_path)}
