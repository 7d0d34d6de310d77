"""The checkpoint layer: bitwise round trips, sharded targets, corruption and checksums, kills,
SIGTERM, quiet recovery."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from bort_jax.core import optim
from bort_jax.runtime import checkpoint, integrity, preemption, restore_noise

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@flax.struct.dataclass
class State:
  """Shaped like ``train.TrainState``: step, params, optimizer state."""

  step: jax.Array
  params: dict
  opt_state: object


def _params(seed, with_head=False):
  rng = np.random.default_rng(seed)
  p = {"embeddings": {"word_embeddings": {"embedding": rng.normal(size=(10, 4))},
                      "LayerNorm": {"scale": rng.normal(size=4), "bias": rng.normal(size=4)}},
       "encoder": {"layer_0": {"intermediate": {"kernel": rng.normal(size=(4, 8)),
                                                "bias": rng.normal(size=8)}}}}
  if with_head:
    p["classifier"] = {"out_proj": {"kernel": rng.normal(size=(4, 3))}}
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p)


_TX = optim.make_optimizer(dict(name="adam_nobc", lr=1e-3, weight_decay=0.01, clip_norm=1.0,
                                warmup=0.1, total_steps=10))


def _state(seed=0, with_head=False, steps=2):
  """A state after a few real optimizer steps (non-trivial moments)."""
  params = _params(seed, with_head)
  opt_state = _TX.init(params)
  for i in range(steps):
    grads = jax.tree.map(lambda x: jnp.sin(x * (i + 1)), params)
    updates, opt_state = _TX.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  return State(step=jnp.asarray(steps, jnp.int32), params=params, opt_state=opt_state)


def _assert_bitwise(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


@pytest.mark.parametrize("async_save", [True, False])
def test_roundtrip_bitwise_with_metadata(tmp_path, async_save):
  state = _state()
  mgr = checkpoint.CheckpointManager(tmp_path / "ckpt", max_to_keep=2, async_save=async_save)
  assert mgr.latest_step() is None
  assert mgr.restore_latest(checkpoint.abstract_like(state)) is None
  meta = {"data_step": np.int64(7), "config": {"lr": 1e-4, "arch": "D2-A2-H32-I64"}}
  expected = jax.device_get(state)
  assert mgr.save(7, state, meta)
  # save() returns once the arrays are on the host: the train step may donate (delete) them.
  for leaf in jax.tree.leaves(state):
    leaf.delete()
  mgr.wait()
  restored = mgr.restore_latest(checkpoint.abstract_like(state))
  step, got, got_meta = restored  # a 3-tuple
  assert step == 7 and isinstance(got, State)
  assert got_meta == {"data_step": 7, "config": {"lr": 1e-4, "arch": "D2-A2-H32-I64"}}
  _assert_bitwise(expected, got)
  # The optimizer state keeps its optax NamedTuple types.
  assert type(got.opt_state) is type(expected.opt_state)
  # Saving the same step again is a no-op, not an error.
  assert not mgr.save(7, got)
  mgr.close()


def test_save_interval_and_max_to_keep(tmp_path):
  state = _state()
  mgr = checkpoint.CheckpointManager(tmp_path, save_interval_steps=2, max_to_keep=2,
                                     async_save=False)
  assert not mgr.save(3, state)
  assert mgr.save(3, state, force=True)
  for s in (4, 6):
    assert mgr.save(s, state)
  assert mgr.all_steps() == [4, 6]
  mgr.close()


def test_restore_into_sharded_targets_on_two_devices(tmp_path):
  devices = jax.devices()[:2]
  assert len(devices) == 2
  mesh = jax.sharding.Mesh(np.array(devices), ("x",))
  x = jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6)
  saved = {"a": jax.device_put(x, NamedSharding(mesh, P("x", None))),
           "b": jax.device_put(x[:, :2].astype(jnp.bfloat16), NamedSharding(mesh, P()))}
  mgr = checkpoint.CheckpointManager(tmp_path, async_save=False)
  mgr.save(1, saved)
  # Restore with different shardings than the ones it was saved with.
  target = {"a": jax.ShapeDtypeStruct((8, 6), jnp.float32,
                                      sharding=NamedSharding(mesh, P(None, "x"))),
            "b": jax.ShapeDtypeStruct((8, 2), jnp.bfloat16,
                                      sharding=NamedSharding(mesh, P("x")))}
  step, got, _ = mgr.restore_latest(target)
  assert step == 1
  assert got["a"].sharding == target["a"].sharding
  assert got["b"].sharding == target["b"].sharding
  assert got["a"].addressable_shards[0].data.shape == (8, 3)
  _assert_bitwise(jax.device_get(saved), jax.device_get(got))
  mgr.close()


def _corrupt(step_dir):
  """Truncates every data file of the state item (what a bad disk or copy leaves)."""
  hit = 0
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      path = os.path.join(root, name)
      if os.sep + "d" + os.sep in path + os.sep or name == "manifest.ocdbt":
        with open(path, "r+b") as f:
          f.truncate(3)
        hit += 1
  assert hit > 0


def test_corrupted_latest_is_skipped_with_a_warning(tmp_path, caplog):
  mgr = checkpoint.CheckpointManager(tmp_path, max_to_keep=5, async_save=False)
  states = {s: _state(seed=s) for s in (1, 2, 3)}
  for s, st in states.items():
    mgr.save(s, st, {"step": s})
  _corrupt(str(tmp_path / "3"))
  with caplog.at_level(logging.WARNING, logger="bort_jax.runtime.checkpoint"):
    step, got, meta = mgr.restore_latest(checkpoint.abstract_like(states[2]))
  assert step == 2 and meta == {"step": 2}
  _assert_bitwise(states[2], got)
  assert any("step 3" in r.getMessage() and "unreadable" in r.getMessage()
             for r in caplog.records)
  # The bad step was moved aside (kept for inspection) and can be written again.
  assert mgr.all_steps() == [1, 2]
  assert any(n.startswith("3.corrupt-") for n in os.listdir(tmp_path))
  assert mgr.save(3, states[3])
  assert mgr.restore_latest(checkpoint.abstract_like(states[3])).step == 3
  mgr.close()


def test_wrong_target_raises_instead_of_restarting(tmp_path):
  mgr = checkpoint.CheckpointManager(tmp_path, async_save=False)
  mgr.save(1, {"w": jnp.ones((3,))})
  with pytest.raises(RuntimeError, match="could be restored"):
    mgr.restore_latest({"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
  mgr.close()


def test_stale_tmp_folders_are_cleaned(tmp_path):
  mgr = checkpoint.CheckpointManager(tmp_path, async_save=False)
  mgr.save(1, {"w": jnp.ones((3,))})
  stale = tmp_path / "2.orbax-checkpoint-tmp-1234567"
  (stale / "state").mkdir(parents=True)
  (stale / "state" / "junk").write_bytes(b"x" * 100)
  assert mgr.latest_step() == 1  # never listed
  removed = mgr.clean_stale_tmp()
  assert removed == [str(stale)] and not stale.exists()
  assert (tmp_path / "1").exists()
  mgr.close()
  # A fresh manager cleans on start-up as well.
  stale.mkdir()
  checkpoint.CheckpointManager(tmp_path, async_save=False).close()
  assert not stale.exists()


def test_resume_order_workdir_then_init_from_then_scratch(tmp_path):
  pre = _state(seed=5, steps=3)
  with checkpoint.CheckpointManager(tmp_path / "pretrain", async_save=False) as m:
    m.save(3, pre)
  fresh = _state(seed=9, with_head=True, steps=0)
  abstract = checkpoint.abstract_like(fresh)
  init_fn = lambda: _state(seed=9, with_head=True, steps=0)
  work = checkpoint.CheckpointManager(tmp_path / "work", async_save=False)

  got = checkpoint.resolve_initial_state(work, None, abstract, init_fn)
  assert got.source == "scratch" and got.step == 0
  _assert_bitwise(got.state, fresh)

  got = checkpoint.resolve_initial_state(work, str(tmp_path / "pretrain"), abstract, init_fn)
  assert got.source == "init_from" and got.step == 0
  # Shared parameters come from the checkpoint, the new head and the optimizer state are fresh.
  _assert_bitwise(got.state.params["encoder"], pre.params["encoder"])
  _assert_bitwise(got.state.params["embeddings"], pre.params["embeddings"])
  _assert_bitwise(got.state.params["classifier"], fresh.params["classifier"])
  _assert_bitwise(got.state.opt_state, fresh.opt_state)
  # A step folder works too.
  got2 = checkpoint.resolve_initial_state(None, str(tmp_path / "pretrain" / "3"), abstract,
                                          init_fn)
  _assert_bitwise(got2.state, got.state)

  work.save(11, got.state, {"data_step": 11})
  got = checkpoint.resolve_initial_state(work, str(tmp_path / "pretrain"), abstract, init_fn)
  assert got.source == "workdir" and got.step == 11 and got.metadata == {"data_step": 11}
  work.close()

  bad = checkpoint.abstract_like(_state(seed=0, steps=0))
  bad = bad.replace(params=dict(bad.params, encoder={"layer_0": {"intermediate": {
      "kernel": jax.ShapeDtypeStruct((4, 16), jnp.float32), "bias": jax.ShapeDtypeStruct(
          (16,), jnp.float32)}}}))
  with pytest.raises(ValueError,
                     match=r"parameter encoder/layer_0/intermediate/(kernel|bias) has shape"):
    checkpoint.resolve_initial_state(None, str(tmp_path / "pretrain"), bad, init_fn)
  with pytest.raises(FileNotFoundError):
    checkpoint.resolve_initial_state(None, str(tmp_path / "nowhere"), abstract, init_fn)


def test_preemption_flag_in_process():
  flag = preemption.install_preemption_handler(signals=(signal.SIGUSR1,))
  try:
    assert not flag.should_stop()
    os.kill(os.getpid(), signal.SIGUSR1)
    deadline = time.time() + 5
    while not flag.signalled and time.time() < deadline:
      time.sleep(0.01)
    assert flag.should_stop() and flag() and flag.signal_number == signal.SIGUSR1
  finally:
    flag.uninstall()
  assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


_CHILD = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp
    from bort_jax.runtime import checkpoint, preemption
    directory, mode = sys.argv[1], sys.argv[2]
    mgr = checkpoint.CheckpointManager(directory, max_to_keep=2, async_save=True)
    flag = preemption.install_preemption_handler()
    n = 4_000_000 if mode == "kill" else 1000
    step = 0
    while True:
      step += 1
      state = {"step": jnp.asarray(step, jnp.int32),
               "params": {"w": jnp.full((n,), step, jnp.float32),
                          "b": jnp.full((n // 2,), -step, jnp.float32)}}
      if flag.should_stop():
        mgr.save(step, state, {"reason": "preempted"}, force=True)
        mgr.close()
        print("STOPPED", step, flush=True)
        sys.exit(0)
      mgr.save(step, state, {"step": step}, force=True)
      if mode == "term":
        time.sleep(0.05)
    """)


def _spawn(tmp_path, mode):
  script = tmp_path / "child.py"
  script.write_text(_CHILD)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  log_file = open(tmp_path / f"{mode}.log", "w")
  proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ckpt"), mode], cwd=REPO,
                          env=env, stdout=log_file, stderr=subprocess.STDOUT)
  return proc, log_file


def _finalised(directory):
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _wait_for(cond, proc, timeout, what):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if cond():
      return
    if proc.poll() is not None:
      raise AssertionError(f"child exited early with {proc.returncode} while waiting for {what}")
    time.sleep(0.002)
  proc.kill()
  raise AssertionError(f"timed out waiting for {what}")


def _abstract_child():
  n = 4_000_000
  return {"step": jax.ShapeDtypeStruct((), jnp.int32),
          "params": {"w": jax.ShapeDtypeStruct((n,), jnp.float32),
                     "b": jax.ShapeDtypeStruct((n // 2,), jnp.float32)}}


def test_sigkill_during_save_leaves_previous_step_restorable(tmp_path):
  proc, log_file = _spawn(tmp_path, "kill")
  ckpt = str(tmp_path / "ckpt")
  try:
    _wait_for(lambda: len(_finalised(ckpt)) >= 2, proc, 90, "two finished saves")
    in_flight = lambda: any(".orbax-checkpoint-tmp" in n for n in os.listdir(ckpt))
    _wait_for(in_flight, proc, 30, "a save in flight")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
    log_file.close()
  assert proc.returncode == -signal.SIGKILL
  leftovers = [n for n in os.listdir(ckpt) if ".orbax-checkpoint-tmp" in n]
  assert leftovers, "the kill did not land during a save"
  mgr = checkpoint.CheckpointManager(ckpt, async_save=False)  # cleans the leftovers
  assert not any(".orbax-checkpoint-tmp" in n for n in os.listdir(ckpt))
  step, state, meta = mgr.restore_latest(_abstract_child())
  assert step >= 2 and meta == {"step": step} and int(state["step"]) == step
  assert np.all(np.asarray(state["params"]["w"]) == step)
  assert np.all(np.asarray(state["params"]["b"]) == -step)
  mgr.close()


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  proc, log_file = _spawn(tmp_path, "term")
  ckpt = str(tmp_path / "ckpt")
  try:
    _wait_for(lambda: len(_finalised(ckpt)) >= 2, proc, 90, "two finished saves")
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
    log_file.close()
  output = (tmp_path / "term.log").read_text()
  assert proc.returncode == 0, output[-2000:]
  stopped = [line for line in output.splitlines() if line.startswith("STOPPED")]
  assert len(stopped) == 1
  final = int(stopped[0].split()[1])
  mgr = checkpoint.CheckpointManager(ckpt, async_save=False)
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32),
              "params": {"w": jax.ShapeDtypeStruct((1000,), jnp.float32),
                         "b": jax.ShapeDtypeStruct((500,), jnp.float32)}}
  step, state, meta = mgr.restore_latest(abstract)
  assert step == final and meta == {"reason": "preempted"}
  assert np.all(np.asarray(state["params"]["w"]) == final)
  mgr.close()


_TWO_PROCESS_CHILD = textwrap.dedent("""
    import os, sys
    pid, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from bort_jax.runtime import checkpoint, preemption
    mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    full = np.arange(16, dtype=np.float32).reshape(4, 4)
    w = jax.make_array_from_callback((4, 4), NamedSharding(mesh, P("x")), lambda i: full[i])
    step = jax.device_put(jnp.asarray(3, jnp.int32), NamedSharding(mesh, P()))
    mgr = checkpoint.CheckpointManager(directory, async_save=True)
    flag = preemption.PreemptionFlag()
    if pid == 1:
      flag.set()  # only one process is signalled; both must agree to stop
    stop = flag.should_stop()
    mgr.save(3, {"w": w, "step": step}, {"writer": pid})
    mgr.wait()
    target = {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32,
                                        sharding=NamedSharding(mesh, P(None, "x"))),
              "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))}
    got_step, state, meta = mgr.restore_latest(target)
    ok = all(np.array_equal(s.data, full[s.index]) for s in state["w"].addressable_shards)
    mgr.close()
    print("RESULT", pid, stop, got_step, meta["writer"], ok, flush=True)
    """)


def test_two_processes_save_restore_and_agree_to_stop(tmp_path):
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = tmp_path / "two.py"
  script.write_text(_TWO_PROCESS_CHILD)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs, logs = [], []
  for pid in (0, 1):
    logs.append(open(tmp_path / f"p{pid}.log", "w"))
    procs.append(subprocess.Popen(
        [sys.executable, str(script), str(pid), str(port), str(tmp_path / "ckpt")], cwd=REPO,
        env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
  try:
    for p in procs:
      p.wait(timeout=120)
  finally:
    for p, f in zip(procs, logs):
      if p.poll() is None:
        p.kill()
      f.close()
  for pid, p in enumerate(procs):
    out = (tmp_path / f"p{pid}.log").read_text()
    assert p.returncode == 0, out[-3000:]
    result = [line for line in out.splitlines() if line.startswith("RESULT")]
    # Both processes stop, restore step 3 into a new sharding, and only process 0 wrote JSON.
    assert result == [f"RESULT {pid} True 3 0 True"], out[-3000:]
  # Each process wrote the checksums of the shards it owns, inside the committed step.
  folder = tmp_path / "ckpt" / "3" / "integrity"
  records = [json.loads((folder / f"process_{pid}.json").read_text()) for pid in (0, 1)]
  assert [r["process"] for r in records] == [0, 1]
  assert all({s["leaf"] for s in r["shards"]} == {"w"} or {s["leaf"] for s in r["shards"]} ==
             {"w", "step"} for r in records)
  rows = sorted(tuple(s["index"][0]) for r in records for s in r["shards"] if s["leaf"] == "w")
  assert rows == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_noise_filter_passes_other_unraisable_errors():
  seen = []
  previous = sys.unraisablehook
  sys.unraisablehook = seen.append
  try:
    quiet = restore_noise.RestoreNoiseFilter("/ckpt")
    quiet.install()
    unraisable = lambda e: type("U", (), {"exc_value": e})()
    sys.unraisablehook(unraisable(RuntimeError("Event loop is closed")))
    sys.unraisablehook(unraisable(RuntimeError("something else")))
    quiet.uninstall()
    assert sys.unraisablehook == seen.append
  finally:
    sys.unraisablehook = previous
  assert quiet.dropped == 1 and [str(u.exc_value) for u in seen] == ["something else"]
  record = logging.LogRecord("asyncio", logging.ERROR, "", 0, "Future exception was never "
                             "retrieved\nfuture: <Future exception=ValueError('/ckpt/4/state')>",
                             None, None)
  other = logging.LogRecord("asyncio", logging.ERROR, "", 0, "Future exception was never "
                            "retrieved\nfuture: <Future exception=ValueError('/elsewhere')>",
                            None, None)
  quiet.attempt_failed()
  try:
    assert not logging.getLogger("asyncio").filter(record)
    assert logging.getLogger("asyncio").filter(other)
  finally:
    logging.getLogger("asyncio").removeFilter(quiet._log_filter)  # pylint: disable=protected-access


# ------------------------------------------------------------------------------ integrity
def _overwrite_middle(step_dir, n=64):
  """Flips ``n`` bytes in the middle of the step's largest array data file, keeping its size."""
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, "state"))
           for name in names if os.sep + "d" in root]
  path = max(files, key=os.path.getsize)
  size = os.path.getsize(path)
  assert size > 4 * n
  with open(path, "r+b") as f:
    f.seek(size // 2)
    old = f.read(n)
    f.seek(size // 2)
    f.write(bytes(255 - b for b in old))
  assert os.path.getsize(path) == size


def _big_state(seed):
  """Large enough that the array data sits in one file of several KB."""
  return {"w": jnp.asarray(np.random.default_rng(seed).normal(size=(64, 64)), jnp.float32),
          "b": jnp.full((100,), seed, jnp.float32)}


@pytest.mark.parametrize("where", ["latest", "middle"])
def test_same_size_overwrite_is_detected_and_skipped(tmp_path, caplog, where):
  mgr = checkpoint.CheckpointManager(tmp_path, max_to_keep=5, async_save=False)
  states = {s: _big_state(s) for s in (1, 2, 3)}
  for s, st in states.items():
    mgr.save(s, st, {"step": s})
  damaged = [3] if where == "latest" else [2, 3]
  for s in damaged:
    _overwrite_middle(str(tmp_path / str(s)))
  abstract = checkpoint.abstract_like(states[1])
  # orbax alone reads the damaged bytes without complaint; the checksums catch them.
  with pytest.raises(integrity.IntegrityError, match="checksum mismatch in 1 arr"):
    mgr.restore(damaged[0], abstract)
  with caplog.at_level(logging.WARNING, logger="bort_jax.runtime.checkpoint"):
    step, got, meta = mgr.restore_latest(abstract)
  good = min(damaged) - 1
  assert step == good and meta == {"step": good}
  _assert_bitwise(states[good], got)
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  # One line per skipped step, naming it, the reason and where it went.
  assert len(warnings) == len(damaged)
  for s, line in zip(sorted(damaged, reverse=True), warnings):
    assert f"step {s} " in line and "checksum mismatch" in line and ".corrupt-" in line
    assert "\n" not in line
  assert mgr.all_steps() == list(range(1, good + 1))
  mgr.close()


def test_checkpoint_without_integrity_data_restores_with_a_notice(tmp_path, caplog):
  # Written the way this project wrote checkpoints before checksums: two items only.
  state = _state()
  old = ocp.CheckpointManager(tmp_path, item_handlers={
      "state": ocp.PyTreeCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler()})
  old.save(4, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                      metadata=ocp.args.JsonSave({"step": 4})))
  old.wait_until_finished()
  old.close()
  mgr = checkpoint.CheckpointManager(tmp_path, async_save=False)
  with caplog.at_level(logging.WARNING, logger="bort_jax.runtime.checkpoint"):
    step, got, meta = mgr.restore_latest(checkpoint.abstract_like(state))
  assert step == 4 and meta == {"step": 4}
  _assert_bitwise(state, got)
  notices = [r.getMessage() for r in caplog.records]
  assert len(notices) == 1 and "predates integrity checksums" in notices[0]
  mgr.close()


def test_a_step_whose_checksums_were_deleted_is_unreadable(tmp_path, caplog):
  mgr = checkpoint.CheckpointManager(tmp_path, max_to_keep=5, async_save=False)
  for s in (1, 2):
    mgr.save(s, _big_state(s))
  shutil.rmtree(tmp_path / "2" / "integrity")
  with caplog.at_level(logging.WARNING, logger="bort_jax.runtime.checkpoint"):
    assert mgr.restore_latest(checkpoint.abstract_like(_big_state(0))).step == 1
  assert "integrity folder" in caplog.records[0].getMessage()
  mgr.close()


def test_checksums_are_checked_in_any_restore_sharding():
  mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  x = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
  y = x.copy()
  y.view(np.uint32)[3, 4] ^= 1  # one flipped bit
  specs = (P(), P("a"), P(None, "b"), P("a", "b"), P("b", "a"))
  for saved_spec in specs:
    record = integrity.shard_records({"x": jax.device_put(x, NamedSharding(mesh, saved_spec))})
    # One record per distinct shard (replicas are counted once), covering the array.
    assert sum(np.prod([hi - lo for lo, hi in s["index"]]) for s in record["shards"]) == x.size
    for spec in specs:
      target = {"x": jax.ShapeDtypeStruct((8, 8), jnp.float32,
                                          sharding=NamedSharding(mesh, spec))}
      good = {"x": jax.device_put(x, target["x"].sharding)}
      bad = {"x": jax.device_put(y, target["x"].sharding)}
      assert integrity.agreed_check(target, good, [record], False) == (False, [], 0)
      assert integrity.agreed_check(target, bad, [record], False) == (False, ["x"], 0)
  # A leaf without records is a mismatch too; a failed restore is reported as such.
  assert integrity.agreed_check(target, good, [dict(record, shards=[])], False)[1] == ["x"]
  assert integrity.agreed_check(target, None, [record], True) == (True, [], 0)


_NOISE_CHILD = textwrap.dedent("""
    import logging, os, sys, time
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from bort_jax.runtime import checkpoint
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # as the CLI does
    directory, scenario = sys.argv[1], sys.argv[2]
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    sh = NamedSharding(mesh, P("x"))
    tree = lambda s: {f"w{i}": jax.device_put(jnp.full((8000,), s, jnp.float32), sh)
                      for i in range(100)}
    mgr = checkpoint.CheckpointManager(directory, max_to_keep=5)
    for s in (1, 2, 3, 4):
      mgr.save(s, tree(s))
    mgr.wait()
    def truncate_all(step):
      for root, _, files in os.walk(os.path.join(directory, str(step), "state")):
        for name in files:
          if os.sep + "d" in root:
            open(os.path.join(root, name), "r+b").truncate(3)
    os.remove(os.path.join(directory, "4", "state", "manifest.ocdbt"))
    if scenario in ("two", "none"):
      truncate_all(3)
    if scenario == "none":
      truncate_all(2)
      truncate_all(1)
    print("RESTORE", flush=True)
    try:
      got = mgr.restore_latest(checkpoint.abstract_like(tree(0)))
      print("RESTORED", got.step, int(got.state["w7"][0]), flush=True)
    except checkpoint.CheckpointRestoreError as e:
      print("ERROR", e, flush=True)
    time.sleep(1.0)  # late callbacks of the failed reads would arrive now
    mgr.close()
    print("DONE", flush=True)
    """)


@pytest.mark.parametrize("scenario,want", [("one", "RESTORED 3 3"), ("two", "RESTORED 2 2"),
                                           ("none", "ERROR none of the checkpoints")])
def test_recovery_is_one_warning_per_skipped_step(tmp_path, scenario, want):
  script = tmp_path / "noise.py"
  script.write_text(_NOISE_CHILD)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt"), scenario],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = (out.stdout + out.stderr).splitlines()
  assert any(line.startswith(want) for line in lines), lines[-20:]
  assert not any("Traceback" in line or "Event loop" in line for line in lines), lines[:20]
  skipped = [line for line in out.stderr.splitlines() if "skipped checkpoint step" in line]
  warnings = [line for line in out.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
  if scenario == "none":
    assert skipped == [] and warnings == []
    error = [line for line in lines if line.startswith("ERROR none")]
    assert len(error) == 1 and "[1, 2, 3, 4]" in error[0] and "step 4:" in error[0]
  else:
    assert len(skipped) == {"one": 1, "two": 2}[scenario] == len(warnings), warnings
