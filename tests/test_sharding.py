"""Mesh construction, divisibility errors, batch assembly and parameter shardings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bort_jax.runtime import sharding


def test_resolve_mesh_shape_fills_and_checks():
  assert sharding.resolve_mesh_shape({"data": -1, "model": 2}, 8) == {
      "data": 4, "fsdp": 1, "model": 2}
  assert sharding.resolve_mesh_shape({"fsdp": -1}, 8)["fsdp"] == 8
  with pytest.raises(ValueError, match="needs 6 devices"):
    sharding.resolve_mesh_shape({"data": 3, "model": 2}, 8)
  with pytest.raises(ValueError, match="at most one"):
    sharding.resolve_mesh_shape({"data": -1, "model": -1}, 8)
  with pytest.raises(ValueError, match="do not divide"):
    sharding.resolve_mesh_shape({"data": -1, "model": 3}, 8)
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.resolve_mesh_shape({"tensor": 2}, 8)


def test_make_mesh_uses_auto_axes():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
  assert mesh.axis_names == ("data", "fsdp", "model")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_batch_size_must_divide_batch_axes():
  mesh = sharding.make_mesh({"data": 4, "model": 2})
  assert sharding.check_batch_size(8, mesh) == 8
  with pytest.raises(ValueError, match="not divisible by the 4 devices"):
    sharding.check_batch_size(6, mesh)


def test_parameters_born_sharded_by_the_rules_and_indivisible_shapes_refused():
  # What a mode does to create its parameters: logical specs -> shardings -> a jitted init
  # with those out_shardings, after the divisibility check.
  mesh = sharding.make_mesh({"fsdp": 2, "model": 4})

  def init(rng):
    return {"kernel": jax.random.normal(rng, (6, 8)), "bias": jnp.zeros((8,))}

  specs = {"kernel": P("embed", "mlp"), "bias": P("mlp")}
  shardings = sharding.logical_to_shardings(specs, mesh, sharding.DEFAULT_RULES)
  sharding.check_divisible(jax.eval_shape(init, jax.random.key(0)), shardings)
  params = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
  assert params["kernel"].sharding.spec == P("fsdp", "model")
  np.testing.assert_array_equal(np.asarray(params["kernel"]),
                                np.asarray(init(jax.random.key(0))["kernel"]))
  assert shardings["bias"].spec == P("model")

  def bad_init(rng):
    return {"kernel": jnp.zeros((6, 10)), "bias": jnp.zeros((10,))}

  with pytest.raises(ValueError, match="has shape \\(10,\\).*cannot be split over mesh axes"):
    sharding.check_divisible(jax.eval_shape(bad_init, jax.random.key(0)), shardings)


def test_global_batch_from_local_rows():
  mesh = sharding.make_mesh({"data": 8})
  local = {"input_ids": np.arange(32, dtype=np.int32).reshape(16, 2)}
  out = sharding.global_batch(local, mesh)
  assert out["input_ids"].shape == (16, 2)
  assert out["input_ids"].sharding.spec == P(("data", "fsdp"), None)
  np.testing.assert_array_equal(np.asarray(out["input_ids"]), local["input_ids"])


def test_tree_shardings_like_mirrors_params_in_optimizer_state():
  import optax
  mesh = sharding.make_mesh({"model": 8})
  params = {"a": jnp.zeros((8, 2)), "b": jnp.zeros(())}
  param_sh = {"a": jax.sharding.NamedSharding(mesh, P("model")), "b": sharding.replicated(mesh)}
  opt_state = optax.adam(1e-3).init(params)
  out = sharding.tree_shardings_like(opt_state, jax.tree_util.tree_structure(params),
                                     param_sh, mesh)
  adam_state = out[0]
  assert adam_state.mu["a"].spec == P("model")
  assert adam_state.nu["a"].spec == P("model")
  assert adam_state.count.spec == P()
