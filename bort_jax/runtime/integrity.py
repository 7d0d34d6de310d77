"""Integrity data of checkpoints: one checksum per array shard, written at save, checked at restore.

A same-size overwrite inside a data file of a checkpoint can restore without any error from
tensorstore (the bytes are simply different), so every saved step carries its own checksums.

The checksum of a shard is computed on the device that holds it, by the process that owns it
(``addressable_shards`` with ``replica_id == 0``), in one fused pass: each 32-bit word ``w`` of
the array at global flat position ``i`` contributes ``fmix32(w ^ fmix32(i ^ seed))`` (the
MurmurHash3 finaliser, a bijection on 32-bit words), summed modulo 2**32, in two lanes with
different seeds (64 bits in all). Why this and not crc32 or sha256 of the bytes:

* it runs where the shard lives (no extra host copy, negligible on an accelerator, one
  vectorised pass on a CPU), while a byte hash would be a single-threaded host pass;
* a changed word always changes both lanes (the finaliser is a bijection), and a change of
  several words cancels out with probability about 2**-64;
* it is keyed by *global* position and additive, so the sum over the shards of a leaf does not
  depend on how the array is sharded: a restore into another mesh (another run's
  ``init_from``, a resumed run on a different slice) checks the same totals.

Each process writes ``integrity/process_<i>.json`` inside the step folder (an orbax item, so it
is committed atomically with the step). At restore every process hashes the shards it restored,
the per-leaf sums are added up across processes in one small all-gather, together with each
process's "my restore failed" flag, so all processes reach the same verdict and never diverge.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

FORMAT = 1
ALGORITHM = "fmix32-positional-sum-2x32"
_SEEDS = (0x9E3779B9, 0x7F4A7C15)
_MASK = 2**32 - 1


class IntegrityError(ValueError):
  """A restored step does not match the checksums written when it was saved."""


def leaf_name(path: Any) -> str:
  """``params/encoder/layer_0/...``: the same name for a dict key and a dataclass field."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _fmix32(h: jax.Array) -> jax.Array:
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 words (8-byte types gain a trailing axis of 2)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    return _words(jax.random.key_data(x))
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
  return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _hash_block(block: jax.Array, offsets: jax.Array, strides: jax.Array) -> jax.Array:
  """uint32[2] checksum of one shard; ``offsets``/``strides`` place its words globally."""
  words = _words(block)
  index = jnp.zeros(words.shape, jnp.uint32)
  for d in range(words.ndim):
    index = index + (lax.broadcasted_iota(jnp.uint32, words.shape, d) + offsets[d]) * strides[d]
  return jnp.stack([jnp.sum(_fmix32(words ^ _fmix32(index ^ jnp.uint32(seed))),
                            dtype=jnp.uint32) for seed in _SEEDS])


def _placement(shape: tuple[int, ...], dtype: Any, index: tuple[slice, ...]):
  """Offsets and strides (uint32) of a shard's words within the leaf's global word array."""
  extra = jax.eval_shape(_words, jax.ShapeDtypeStruct((), dtype)).shape
  full = tuple(shape) + tuple(extra)
  strides, acc = [], 1
  for n in reversed(full):
    strides.append(acc & _MASK)
    acc *= n
  starts = [s.start or 0 for s in index] + [0] * len(extra)
  return (np.asarray(starts, np.uint64).astype(np.uint32),
          np.asarray(strides[::-1], np.uint64).astype(np.uint32))


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[list[int]]:
  return [[s.start or 0, n if s.stop is None else s.stop] for s, n in zip(index, shape)]


def _own_shards(leaf: Any):
  """(shard, device hash) for this process's replica-0 shards of one array leaf."""
  if isinstance(leaf, (np.ndarray, np.generic)):
    leaf = jnp.asarray(leaf)
  if not isinstance(leaf, jax.Array):
    return []
  out = []
  for shard in leaf.addressable_shards:
    if shard.replica_id == 0:
      offsets, strides = _placement(leaf.shape, leaf.dtype, shard.index)
      out.append((shard, leaf.shape, _hash_block(shard.data, offsets, strides)))
  return out


def shard_records(tree: Any) -> dict:
  """This process's integrity record of ``tree``: one checksum per owned shard.

  Args:
    tree: the pytree being saved (``jax.Array`` leaves, sharded or not; numpy leaves count
      as one unsharded shard; other leaves are not covered).

  Returns:
    A JSON-plain dict ``{"format", "algorithm", "process", "shards": [{"leaf", "index",
    "hash"}]}`` (``index``: ``[start, stop]`` per axis).
  """
  pending = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    for shard, shape, digest in _own_shards(leaf):
      pending.append((leaf_name(path), _bounds(shard.index, shape), digest))
  digests = jax.device_get([d for _, _, d in pending])
  return {"format": FORMAT, "algorithm": ALGORITHM, "process": jax.process_index(),
          "shards": [{"leaf": name, "index": index, "hash": [int(v) for v in np.asarray(d)]}
                     for (name, index, _), d in zip(pending, digests)]}


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


def _saved_totals(records: list[dict]) -> dict[str, np.ndarray]:
  totals: dict[str, np.ndarray] = {}
  for record in records:
    for shard in record["shards"]:
      prev = totals.get(shard["leaf"], np.zeros(2, np.uint64))
      totals[shard["leaf"]] = (prev + np.asarray(shard["hash"], np.uint64)) & _MASK
  return totals


def _local_sums(restored: Any, names: list[str]) -> np.ndarray:
  by_name = {leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}
  pending = [[digest for _, _, digest in _own_shards(by_name[name])] for name in names]
  sums = np.zeros((len(names), 2), np.uint64)
  for i, digests in enumerate(jax.device_get(pending)):
    for d in digests:
      sums[i] = (sums[i] + np.asarray(d, np.uint64)) & _MASK
  return sums


def agreed_check(abstract: Any, restored: Any | None, records: list[dict] | None,
                 failed: bool) -> tuple[bool, list[str]]:
  """Collective verdict on one restore attempt (every process calls it, once per attempt).

  Args:
    abstract: the restore target (the same on every process; fixes the leaf list).
    restored: what this process restored, or None when its restore failed.
    records: the step's integrity records, or None to skip the comparison (old format).
    failed: whether this process's restore raised.

  Returns:
    ``(any_process_failed, mismatched leaf names)``, identical on all processes.
  """
  names = [leaf_name(p) for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]
           if hasattr(x, "shape")]
  local = np.zeros((len(names) + 1, 2), np.uint64)
  local[-1, 0] = int(failed)
  if not failed and records is not None:
    local[:-1] = _local_sums(restored, names)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    gathered = np.asarray(multihost_utils.process_allgather(local.astype(np.uint32)))
    local = gathered.astype(np.uint64).sum(axis=0) & _MASK
  any_failed = bool(local[-1, 0])
  if any_failed or records is None:
    return any_failed, []
  saved = _saved_totals(records)
  bad = [name for name, got in zip(names, local[:-1])
         if name not in saved or not np.array_equal(saved[name], got)]
  return False, bad
