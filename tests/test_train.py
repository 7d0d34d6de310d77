"""The generic loop: pure step, metrics file, NaN stop, resumption by step, sharded steps."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bort_jax.runtime import sharding, train


def _loss_fn(params, batch, rng, frozen):
  noise = 0.0 if frozen is None else frozen["scale"] * jax.random.normal(rng, ())
  pred = batch["x"] @ params["w"] + params["b"]
  loss = jnp.mean((pred - batch["y"]) ** 2) + noise
  return loss, {"mse": jnp.mean((pred - batch["y"]) ** 2)}


def _batch(step, bad_step=None):
  rng = np.random.default_rng([0, step])
  x = rng.normal(size=(8, 4)).astype(np.float32)
  y = (x @ np.arange(1, 5, dtype=np.float32)).astype(np.float32)
  if step == bad_step:
    x = x * np.float32(np.nan)
  return {"x": x, "y": y}


def _state(tx):
  return train.create_state({"w": jnp.zeros((4,)), "b": jnp.zeros(())}, tx)


class _MemoryCheckpointer:
  """Keeps saved states in memory, as the orbax layer would on disk."""

  def __init__(self):
    self.saved = {}

  def save(self, step, state, force=False):
    self.saved[step] = jax.device_get(state)

  def wait(self):
    pass


def test_step_is_pure_and_learns(tmp_path):
  tx = optax.sgd(0.05)
  step_fn = train.compile_step(_loss_fn, tx, donate=False)
  rng = jax.random.key(0)
  state = _state(tx)
  s1, m1 = step_fn(state, _batch(0), rng, None)
  s1b, m1b = step_fn(state, _batch(0), rng, None)
  np.testing.assert_array_equal(s1.params["w"], s1b.params["w"])
  assert float(m1["loss"]) == float(m1b["loss"])
  final, metrics = train.run_loop(state, step_fn, _batch, rng,
                                  train.LoopConfig(total_steps=60, log_every=20,
                                                   tokens_per_step=32),
                                  workdir=str(tmp_path), report=lambda line: None)
  assert int(final.step) == 60
  assert metrics["loss"] < 0.05 * float(m1["loss"])
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [line["step"] for line in lines] == [20, 40, 60]
  assert {"loss", "grad_norm", "mse", "steps_per_second", "tokens_per_second"} <= set(lines[0])


def test_rng_depends_on_step_only():
  tx = optax.sgd(0.01)
  step_fn = train.compile_step(_loss_fn, tx, donate=False)
  frozen = {"scale": jnp.float32(1.0)}
  state = _state(tx)
  _, a = step_fn(state, _batch(0), jax.random.key(3), frozen)
  _, b = step_fn(state, _batch(0), jax.random.key(3), frozen)
  later = state.replace(step=jnp.int32(5))
  _, c = step_fn(later, _batch(0), jax.random.key(3), frozen)
  assert float(a["loss"]) == float(b["loss"])
  assert float(a["loss"]) != float(c["loss"])


def test_nan_stops_and_keeps_last_good_checkpoint():
  tx = optax.sgd(0.05)
  step_fn = train.compile_step(_loss_fn, tx, donate=False)
  ckpt = _MemoryCheckpointer()
  loop = train.LoopConfig(total_steps=30, log_every=1, checkpoint_every=5)
  with pytest.raises(train.NonFiniteLossError, match="step 13"):
    train.run_loop(_state(tx), step_fn, lambda s: _batch(s, bad_step=12), jax.random.key(0),
                   loop, checkpointer=ckpt, report=lambda line: None)
  assert sorted(ckpt.saved) == [5, 10]
  assert all(np.isfinite(s.params["w"]).all() for s in ckpt.saved.values())


def test_resume_by_step_reproduces_uninterrupted_run():
  tx = optax.adam(0.05)
  step_fn = train.compile_step(_loss_fn, tx, donate=False)
  rng = jax.random.key(1)
  frozen = {"scale": jnp.float32(0.1)}
  loop = train.LoopConfig(total_steps=20, log_every=5, checkpoint_every=7)
  full, _ = train.run_loop(_state(tx), step_fn, _batch, rng, loop, frozen=frozen,
                           report=lambda line: None)
  ckpt = _MemoryCheckpointer()
  stops = iter([False] * 6 + [True])
  train.run_loop(_state(tx), step_fn, _batch, rng, loop, frozen=frozen, checkpointer=ckpt,
                 should_stop=lambda: next(stops), report=lambda line: None)
  assert max(ckpt.saved) == 7
  resumed, _ = train.run_loop(ckpt.saved[7], step_fn, _batch, rng, loop, frozen=frozen,
                              report=lambda line: None)
  np.testing.assert_array_equal(np.asarray(resumed.params["w"]), np.asarray(full.params["w"]))


def test_sharded_step_matches_single_device():
  mesh = sharding.make_mesh({"data": 4, "model": 2})
  tx = optax.adamw(0.05, weight_decay=0.01)
  params = {"w": jnp.arange(4, dtype=jnp.float32) / 10, "b": jnp.zeros(())}
  state = train.create_state(params, tx)
  rng = jax.random.key(0)
  single = train.compile_step(_loss_fn, tx, donate=False)
  s_ref = state
  for step in range(3):
    s_ref, _ = single(s_ref, _batch(step), rng, None)

  param_sh = {"w": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("model")),
              "b": sharding.replicated(mesh)}
  treedef = jax.tree_util.tree_structure(params)
  state_sh = train.TrainState(
      step=sharding.replicated(mesh), params=param_sh,
      opt_state=sharding.tree_shardings_like(state.opt_state, treedef, param_sh, mesh))
  batch_sh = {"x": sharding.batch_sharding(mesh, 2), "y": sharding.batch_sharding(mesh, 1)}
  sharded = train.compile_step(_loss_fn, tx, state_sh, batch_sh, None)
  s = jax.device_put(state, state_sh)
  for step in range(3):
    s, _ = sharded(s, sharding.global_batch(_batch(step), mesh), rng, None)
  assert s.params["w"].sharding.spec == jax.sharding.PartitionSpec("model")
  np.testing.assert_allclose(np.asarray(s.params["w"]), np.asarray(s_ref.params["w"]),
                             rtol=1e-5, atol=1e-6)
