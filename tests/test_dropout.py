"""Tests of bort_jax.core.dropout: keep rates, independence, vmap and sharding invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from bort_jax.core import dropout as D

SHAPE = (16, 4, 64, 128)  # 524,288 draws: a keep share's standard error is 0.0004


def _mask(seed=0, shape=SHAPE, rate=0.1):
  return np.asarray(jax.jit(D.keep_mask, static_argnums=(1, 2))(jax.random.key(seed), shape,
                                                                 rate))


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_each_quarter_keeps_at_the_quantised_rate(rate):
  mask, keep = _mask(rate=rate), D.keep_threshold(rate) / 65536
  assert abs(keep - (1 - rate)) <= 1 / 65536
  se = np.sqrt(keep * (1 - keep) / (mask.size / 4))
  for quarter in np.split(mask, 4, axis=-1):  # each of a hash's four 16-bit fields
    assert abs(quarter.mean() - keep) < 5 * se


def test_a_hashs_fields_are_independent():
  mask = _mask(rate=0.5)
  q = np.split(mask, 4, axis=-1)  # q[f][..., j]: field f of the same hash
  se = np.sqrt(0.25 * 0.75 / q[0].size)
  for a, b in [(0, 1), (0, 2), (1, 3), (2, 3)]:
    assert abs((q[a] & q[b]).mean() - 0.25) < 5 * se
  neighbours = mask[..., 1:] & mask[..., :-1]  # neighbours within a quarter: other hashes
  assert abs(neighbours.mean() - 0.25) < 5 * se


def test_the_mask_is_a_function_of_the_key_only():
  a, b, c = _mask(1), _mask(1), _mask(2)
  assert (a == b).all() and (a != c).mean() > 0.1


def test_dropout_keeps_the_expectation_and_zeroes_the_rest():
  x = jnp.full(SHAPE, 3.0)
  out = np.asarray(jax.jit(D.dropout, static_argnums=2)(jax.random.key(3), x, 0.1))
  kept = out != 0
  assert np.allclose(out[kept], 3.0 * 65536 / D.keep_threshold(0.1), rtol=1e-6)
  assert abs(out.mean() - 3.0) < 5 * 3.0 * np.sqrt(0.1 / 0.9 / out.size)
  assert (np.asarray(D.dropout(jax.random.key(3), x, 0.0)) == 3.0).all()
  assert (np.asarray(D.dropout(jax.random.key(3), x, 1.0)) == 0.0).all()


def test_odd_widths_and_raw_keys():
  mask = np.asarray(D.keep_mask(jax.random.PRNGKey(4), (32, 7, 13), 0.3))
  assert mask.shape == (32, 7, 13) and 0.6 < mask.mean() < 0.8
  typed = np.asarray(D.keep_mask(jax.random.key(4), (32, 7, 13), 0.3))
  assert (mask == typed).all()  # a raw key is the default (Threefry) key of the same bits


def test_a_vmapped_member_draws_its_own_mask():
  keys = jax.random.split(jax.random.key(5), 3)
  batched = np.asarray(jax.vmap(lambda k: D.keep_mask(k, (8, 24, 40), 0.1))(keys))
  for i in range(3):
    assert (batched[i] == np.asarray(D.keep_mask(keys[i], (8, 24, 40), 0.1))).all()


def test_the_mask_does_not_depend_on_the_sharding():
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  key, shape = jax.random.key(6), (8, 4, 16, 32)
  whole = np.asarray(jax.jit(D.keep_mask, static_argnums=(1, 2))(key, shape, 0.1))
  for spec in (P("data"), P("data", "model"), P(None, None, "model")):
    sharded = jax.jit(D.keep_mask, static_argnums=(1, 2),
                      out_shardings=NamedSharding(mesh, spec))(key, shape, 0.1)
    assert (np.asarray(sharded) == whole).all(), spec


def test_other_prng_implementations_fall_back_to_bernoulli():
  key = jax.random.key(7, impl="rbg")
  mask = np.asarray(D.keep_mask(key, (64, 64), 0.25))
  assert (mask == np.asarray(jax.random.bernoulli(key, 0.75, (64, 64)))).all()
