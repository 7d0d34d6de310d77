"""Dropout with a quarter of the random hashing: four 16-bit draws from each Threefry hash.

Flax's ``nn.Dropout`` draws a uniform float per element through ``jax.random.bernoulli``; with
JAX's partitionable Threefry that is one 2x32 hash (64 bits) per element, of which 32 are kept.
On a CPU that hashing is most of what dropout costs: a fine-tuning step of the demo's teacher
(D6-A12-H384-I1536, batch 8 x 64) took 366 ms with Flax's dropout, 319 ms with this one and
299 ms with none; the student's (D2-A8-H384-I256, 8 x 128) 140, 129 and 124 ms
(``benchmarks/dropout.py``, medians of 30 rounds timed side by side).

Here each hash gives 64 bits, cut into four 16-bit fields, each field one keep decision (the
row's last axis in four quarters, quarter ``f`` from field ``f`` of the row's hashes): an
element keeps its value when its field is below ``round(keep * 65536)``, so the keep
probability is exact to 1/65536 (0.9 becomes 0.899994) and kept values are scaled by the
quantised probability's inverse, which keeps the expectation exact. The hash's counters are
the element's position in the global array (axis 0 and the flat index of the rest), so a mask
does not depend on how the array is sharded, and under ``jax.vmap`` each key draws the mask it
draws unbatched: a population's members get their own masks, as they would one by one.
Keys of another PRNG implementation fall back to ``jax.random.bernoulli``.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import random as jex_random

FIELDS = 4          # 16-bit keep decisions per 64-bit hash
_FIELD_VALUES = 1 << 16


def keep_threshold(rate: float) -> int:
  """The 16-bit threshold below which an element is kept (keep probability x 65536)."""
  return int(round((1.0 - rate) * _FIELD_VALUES))


def _positions(shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Per hash: the index along axis 0 and the flat index over the other axes (uint32)."""
  lead = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
  flat = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in range(len(shape) - 1, 0, -1):
    flat = flat + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
    stride *= shape[axis]
  return lead, flat


def _typed(key: jax.Array) -> jax.Array:
  """A typed key (a raw uint32 key, as ``jax.random.PRNGKey`` gives, is the default PRNG's)."""
  return key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)


def _hashed(key: jax.Array, shape: tuple[int, ...]) -> bool:
  """Whether the mask comes from the 16-bit fields (else from ``jax.random.bernoulli``)."""
  return jax.random.key_impl(key) == "threefry2x32" and len(shape) >= 2


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
  """A boolean mask of ``shape``, True where dropout at ``rate`` keeps the element.

  Args:
    key: a (scalar) PRNG key, typed or raw.
    shape: the array's shape.
    rate: the probability of dropping an element, in [0, 1).

  Returns:
    bool[shape]; for a Threefry key, each element kept with probability
    ``keep_threshold(rate) / 65536``.
  """
  key, shape = _typed(key), tuple(int(d) for d in shape)
  if not _hashed(key, shape):
    return jax.random.bernoulli(key, 1.0 - rate, shape)
  hashes = (-(-shape[-1] // FIELDS),)
  hash_shape = shape[:-1] + hashes
  if math.prod(hash_shape[1:]) >= 2 ** 32 or shape[0] >= 2 ** 32:
    raise ValueError(f"dropout over {shape} needs more than 2^32 counters per row")
  lead, flat = _positions(hash_shape)
  data = jax.random.key_data(key)
  high, low = jex_random.threefry2x32_p.bind(data[0], data[1], lead, flat)
  threshold, low16 = np.uint32(keep_threshold(rate)), np.uint32(_FIELD_VALUES - 1)
  keep = [high & low16, high >> 16, low & low16, low >> 16]
  # Field f of every hash in a row covers the row's f-th quarter: [..., 4, q] is [..., 4q].
  keep = jnp.stack([field < threshold for field in keep], axis=-2)
  return keep.reshape(shape[:-1] + (hashes[0] * FIELDS,))[..., :shape[-1]]


def dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
  """``x`` with each element zeroed at ``rate`` and the rest scaled to keep the expectation."""
  if rate <= 0.0:
    return x
  if rate >= 1.0:
    return jnp.zeros_like(x)
  key = _typed(key)
  if _hashed(key, x.shape):
    if keep_threshold(rate) == 0:
      return jnp.zeros_like(x)
    scale = _FIELD_VALUES / keep_threshold(rate)
  else:
    scale = 1.0 / (1.0 - rate)
  keep = keep_mask(key, x.shape, rate)
  return jnp.where(keep, x * jnp.asarray(scale, x.dtype), jnp.zeros((), x.dtype))


class Dropout(nn.Module):
  """Drop-in for ``nn.Dropout(rate)(x, deterministic=...)``, drawing from the ``dropout`` rng."""

  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate <= 0.0:
      return x
    return dropout(self.make_rng("dropout"), x, self.rate)
