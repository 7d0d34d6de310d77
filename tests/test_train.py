"""The generic loop: pure step, metrics file (one run after a resume, kill -9 included), NaN stop,
resumption by step, sharded steps."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bort_jax.runtime import sharding, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  """Keeps saved states and metadata in memory, as the orbax layer would on disk."""

  def __init__(self):
    self.saved = {}
    self.meta = {}

  def save(self, step, state, metadata=None, force=False):
    self.saved[step] = jax.device_get(state)
    self.meta[step] = json.loads(json.dumps(metadata or {}))  # what a JSON item holds

  def metadata(self, step):
    return self.meta.get(step, {})

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


_TIMING = ("steps_per_second", "tokens_per_second")


def _read_metrics(path):
  """metrics.jsonl without the timing fields (the only ones that depend on the clock)."""
  with open(path) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in _TIMING} for line in f]


class _Killed(Exception):
  pass


def test_metrics_after_resume_read_as_one_run(tmp_path):
  tx = optax.adam(0.05)
  step_fn = train.compile_step(_loss_fn, tx, donate=False)
  rng = jax.random.key(2)
  # Windows of 4 steps, checkpoints every 5: a resume lands inside a window.
  loop = train.LoopConfig(total_steps=20, log_every=4, checkpoint_every=5)
  quiet = lambda line: None
  train.run_loop(_state(tx), step_fn, _batch, rng, loop, workdir=str(tmp_path / "full"),
                 report=quiet)
  expected = _read_metrics(tmp_path / "full" / "metrics.jsonl")
  assert [m["step"] for m in expected] == [4, 8, 12, 16, 20]

  ckpt, work = _MemoryCheckpointer(), tmp_path / "resumed"

  def dies_at_14(step):
    if step == 14:
      raise _Killed
    return _batch(step)

  with pytest.raises(_Killed):
    train.run_loop(_state(tx), step_fn, dies_at_14, rng, loop, workdir=str(work),
                   checkpointer=ckpt, report=quiet)
  with open(work / "metrics.jsonl", "a") as f:
    f.write('{"step": 16, "loss": 0.')  # a line torn by the kill
  assert max(ckpt.saved) == 10
  assert len(ckpt.meta[10]["unreported_metrics"]) == 2  # steps 9 and 10 of the 9-12 window
  train.run_loop(ckpt.saved[10], step_fn, _batch, rng, loop, workdir=str(work),
                 checkpointer=ckpt, report=quiet)
  got = _read_metrics(work / "metrics.jsonl")
  assert [m["step"] for m in got] == [4, 8, 12, 16, 20]
  assert got == expected  # bitwise: the same floats, the 9-12 window included


def test_a_resume_that_drops_nothing_leaves_the_metrics_file_alone(tmp_path, monkeypatch):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 4, "loss": 1.0}\n{"step": 8, "loss": 0.5}\n')
  writes = []
  monkeypatch.setattr(train, "atomic_write_text", lambda *a: writes.append(a))
  train.MetricsWriter(str(tmp_path), resume_step=8)
  assert writes == []  # nothing after step 8, nothing torn: not rewritten
  train.MetricsWriter(str(tmp_path), resume_step=4)
  assert writes == [(str(path), '{"step": 4, "loss": 1.0}\n')]


_KILL_CHILD = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp, numpy as np, optax
    from bort_jax.runtime import checkpoint, train
    workdir, pause = sys.argv[1], float(sys.argv[2])

    def loss_fn(params, batch, rng, frozen):
      pred = batch["x"] @ params["w"] + params["b"] + 0.01 * jax.random.normal(rng, ())
      return jnp.mean((pred - batch["y"]) ** 2), {}

    def get_batch(step):
      time.sleep(pause)  # slow enough to be killed mid-run
      rng = np.random.default_rng([0, step])
      x = rng.normal(size=(8, 4)).astype(np.float32)
      return {"x": x, "y": x @ np.arange(1, 5, dtype=np.float32)}

    tx = optax.adam(0.05)
    fresh = train.create_state({"w": jnp.zeros((4,)), "b": jnp.zeros(())}, tx)
    mgr = checkpoint.CheckpointManager(workdir + "/checkpoints", max_to_keep=2)
    found = mgr.restore_latest(checkpoint.abstract_like(fresh))
    state = fresh if found is None else found.state
    print("START", 0 if found is None else found.step, flush=True)
    train.run_loop(state, train.compile_step(loss_fn, tx), get_batch, jax.random.key(0),
                   train.LoopConfig(total_steps=60, log_every=3, checkpoint_every=7),
                   workdir=workdir, checkpointer=mgr, report=lambda line: None)
    mgr.close()
    """)


def test_kill_9_and_resume_gives_each_step_once_with_uninterrupted_values(tmp_path):
  script = tmp_path / "child.py"
  script.write_text(_KILL_CHILD)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  run = lambda workdir, pause: subprocess.Popen(
      [sys.executable, str(script), str(workdir), str(pause)], cwd=REPO, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  work = tmp_path / "killed"
  proc = run(work, 0.05)
  metrics = work / "metrics.jsonl"
  deadline = time.time() + 120
  try:
    # Kill once the run has logged past its newest checkpoint (steps 7, 14, ...).
    while time.time() < deadline and proc.poll() is None:
      steps = [json.loads(line)["step"] for line in open(metrics)] if metrics.exists() else []
      if steps and steps[-1] >= 24 and steps[-1] % 7:
        break
      time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL, proc.stdout.read()[-2000:]
  logged = [json.loads(line)["step"] for line in open(metrics)]
  saved = max(int(n) for n in os.listdir(work / "checkpoints") if n.isdigit())
  assert logged[-1] > saved  # lines the resumed run must not repeat

  for workdir, start in ((work, saved), (tmp_path / "uninterrupted", 0)):
    proc = run(workdir, 0.0)
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, out[-3000:]
    assert f"START {start}\n" in out, out[-3000:]
  got = _read_metrics(work / "metrics.jsonl")
  expected = _read_metrics(tmp_path / "uninterrupted" / "metrics.jsonl")
  assert [m["step"] for m in expected] == list(range(3, 61, 3))
  assert got == expected
