"""Integrity data of checkpoints: one checksum per array shard, written at save, checked at restore.

A same-size overwrite inside a data file of a checkpoint can restore without any error from
tensorstore (the bytes are simply different), so every saved step carries its own checksums.

The checksum is CRC-32 (``zlib.crc32``) of a shard's bytes in C order, computed by the process
that owns the shard (``addressable_shards`` with ``replica_id == 0``). Why CRC-32: it is in the
standard library (no new dependency), it is one of the fastest byte checksums there (about
1 GB/s a core here, hardware-assisted in zlib-ng builds), ``zlib`` releases the GIL so shards
are hashed on a thread pool, and it detects every burst error up to 32 bits and any other
damage with probability 1 - 2**-32 per shard, which is what a checksum against disk and copy
damage needs (it is not meant to resist tampering). Measured against the Bort train step in
``benchmarks/checkpoint.py``.

Each process writes ``integrity/process_<i>.json`` inside the step folder (an orbax item, so it
is committed atomically with the step): ``{"leaf", "index" ([start, stop] per axis), "crc32"}``
per shard. At restore each process checks every saved shard that lies inside the data it
restored (with the saved sharding, exactly its own shards; with another sharding, the saved
blocks are cut out of, or put together from, its local shards). The verdicts of all processes,
together with each process's "my restore failed" flag, are summed in one small all-gather, so
every process reaches the same decision and they never diverge.
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import zlib
from typing import Any

import jax
import numpy as np

FORMAT = 1
ALGORITHM = "crc32-c-order"
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)),
                                              thread_name_prefix="bort_jax_crc32")


class IntegrityError(ValueError):
  """A restored step does not match the checksums written when it was saved."""


def leaf_name(path: Any) -> str:
  """``params/encoder/layer_0/...``: the same name for a dict key and a dataclass field."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _crc32(block: np.ndarray) -> int:
  return zlib.crc32(np.ascontiguousarray(block).reshape(-1).view(np.uint8))


def _host(data: Any) -> np.ndarray:
  if jax.dtypes.issubdtype(data.dtype, jax.dtypes.prng_key):
    data = jax.random.key_data(data)
  return np.asarray(data)


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  return tuple((s.start or 0, n if s.stop is None else s.stop) for s, n in zip(index, shape))


def _own_shards(leaf: Any) -> list[tuple[tuple, Any]]:
  """(bounds, data) of this process's replica-0 shards of one leaf (numpy: one shard)."""
  if isinstance(leaf, (np.ndarray, np.generic)):
    return [(tuple((0, n) for n in np.shape(leaf)), np.asarray(leaf))]
  if not isinstance(leaf, jax.Array):
    return []
  return [(_bounds(s.index, leaf.shape), s.data) for s in leaf.addressable_shards
          if s.replica_id == 0]


def shard_records(tree: Any) -> dict:
  """This process's integrity record of ``tree``: one CRC-32 per owned shard.

  Args:
    tree: the pytree being saved (``jax.Array`` leaves, sharded or not; numpy leaves count as
      one shard; other leaves are not covered).

  Returns:
    A JSON-plain dict ``{"format", "algorithm", "process", "shards": [{"leaf", "index",
    "crc32"}]}`` (``index``: ``[start, stop]`` per axis).
  """
  pending = [(leaf_name(path), bounds, data)
             for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
             for bounds, data in _own_shards(leaf)]
  crcs = _POOL.map(lambda item: _crc32(_host(item[2])), pending)
  return {"format": FORMAT, "algorithm": ALGORITHM, "process": jax.process_index(),
          "shards": [{"leaf": name, "index": [list(b) for b in bounds], "crc32": crc}
                     for (name, bounds, _), crc in zip(pending, crcs)]}


def read_records(item_dir: str) -> list[dict]:
  """All processes' records in a step's integrity folder (raises on a damaged file)."""
  records = []
  for path in sorted(glob.glob(os.path.join(item_dir, "process_*.json"))):
    with open(path) as f:
      record = json.load(f)
    if record.get("algorithm") != ALGORITHM:
      raise IntegrityError(f"{path} uses checksum {record.get('algorithm')!r}, this version "
                           f"reads {ALGORITHM!r}")
    records.append(record)
  if not records:
    raise IntegrityError(f"no integrity records in {item_dir}")
  return records


def _cut(region: tuple, shards: list[tuple[tuple, np.ndarray]], dtype: Any) -> np.ndarray | None:
  """The saved block ``region`` from local shards (None when they do not cover all of it)."""
  shape = tuple(hi - lo for lo, hi in region)
  out, covered = None, 0
  for bounds, data in shards:
    inter = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(region, bounds)]
    if any(lo >= hi for lo, hi in inter):
      continue
    src = tuple(slice(lo - c, hi - c) for (lo, hi), (c, _) in zip(inter, bounds))
    if all(lo == a and hi == b for (lo, hi), (a, b) in zip(inter, region)):
      return data[src]  # one shard holds the whole block: no copy needed
    if out is None:
      out = np.empty(shape, dtype)
    out[tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(inter, region))] = data[src]
    covered += int(np.prod([hi - lo for lo, hi in inter]))
  return out if covered == int(np.prod(shape)) else None


def _check_leaf(leaf: Any, saved: list[dict]) -> tuple[int, int]:
  """(mismatches, checked) of one restored leaf's saved shards that lie in local data."""
  shards = [(b, _host(d)) for b, d in _own_shards(leaf)]
  if not shards:
    return 0, 0
  dtype = shards[0][1].dtype
  blocks = [_cut(tuple(tuple(r) for r in rec["index"]), shards, dtype) for rec in saved]
  todo = [(rec, block) for rec, block in zip(saved, blocks) if block is not None]
  crcs = _POOL.map(lambda item: _crc32(item[1]), todo)
  bad = sum(int(crc != rec["crc32"]) for (rec, _), crc in zip(todo, crcs))
  return bad, len(todo)


def agreed_check(abstract: Any, restored: Any | None, records: list[dict] | None,
                 failed: bool) -> tuple[bool, list[str], int]:
  """Collective verdict on one restore attempt (every process calls it, once per attempt).

  Args:
    abstract: the restore target (the same on every process; fixes the leaf list).
    restored: what this process restored, or None when its restore failed.
    records: the step's integrity records, or None to skip the comparison (old format).
    failed: whether this process's restore raised.

  Returns:
    ``(any_process_failed, names of leaves with a mismatch or without records, saved shards
    no process could check)``, identical on all processes.
  """
  names = [leaf_name(p) for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]
           if hasattr(x, "shape")]
  by_leaf: dict[str, list[dict]] = {}
  for record in records or []:
    for shard in record["shards"]:
      by_leaf.setdefault(shard["leaf"], []).append(shard)
  local = np.zeros((len(names) + 1, 2), np.int64)  # per leaf: mismatches, checked
  local[-1, 0] = int(failed)
  if not failed and records is not None:
    leaves = {leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}
    for i, name in enumerate(names):
      local[i] = _check_leaf(leaves[name], by_leaf.get(name, []))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    local = np.asarray(multihost_utils.process_allgather(local)).sum(axis=0)
  if local[-1, 0] or records is None:
    return bool(local[-1, 0]), [], 0
  bad = [name for i, name in enumerate(names) if local[i, 0] or name not in by_leaf]
  unchecked = sum(len(by_leaf.get(name, [])) for name in names) - int(local[:-1, 1].sum())
  return False, bad, unchecked
