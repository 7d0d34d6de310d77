"""Distillation and teacher-adapt end to end on tiny models: the real ``distill.run``.

A tiny random BERT teacher (D2-A2-H32-I64) is written with ``export.save``, a WordPiece
vocabulary is built from the words of a small corpus of real English sentences, and the corpus
is written as text files; everything lives in a module-scoped temporary folder.

Shown here: the smoke runs learn and write their files; the teacher never enters the
checkpoint; teacher-adapt trains only the head; (data 4 x model 2) and (fsdp 8) steps equal
the single-device step; a run killed with SIGKILL at a random step and resumed ends bitwise
equal to an uninterrupted run; SIGTERM saves and exits 0; a corrupted latest checkpoint is
skipped; bad input fails before anything is compiled.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from bort_jax.interop import export
from bort_jax.core import arch as arch_lib
from bort_jax.runtime import checkpoint, sharding
from bort_jax import cli
from bort_jax.pipelines import distill, setup
from bort_jax.core import model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER_ARCH = "D2-A2-H32-I64"
ARCH = "D1-A2-H32-I48"  # the student: unlike the teacher, so teacher arrays would stand out
REFERENCE = {"train.total_steps": 40, "train.checkpoint_every": 5}  # the shared reference run
VOCAB_SIZE = 160
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Real English prose (short encyclopaedic sentences), grouped into documents.
DOCUMENTS = [
    ["The river rises in the northern hills and flows south to the sea.",
     "Its valley was settled by farmers more than two thousand years ago.",
     "Today the river is used for shipping, fishing and the supply of water to the city."],
    ["A library is a collection of books and other materials kept for reading and study.",
     "Many libraries are open to the public and lend their books for a few weeks.",
     "The oldest known libraries held clay tablets rather than paper."],
    ["The bridge was built of stone in the twelfth century.",
     "It has seven arches and carries a narrow road over the river.",
     "After a flood damaged two of the arches, the town rebuilt them in the same style."],
    ["Bees collect nectar from flowers and turn it into honey.",
     "A colony can hold tens of thousands of workers but only one queen.",
     "Farmers keep bees because they also carry pollen from one plant to another."],
    ["The railway reached the town in the year that the new school opened.",
     "Trains carried coal, wool and passengers to the port on the coast.",
     "The old station is now a museum about the history of the line."],
    ["Mountains in the west of the country are covered with snow for most of the year.",
     "Small villages stand in the valleys, where the weather is milder.",
     "In summer many people walk along the paths between the villages."],
    ["The city council meets once a month in the old town hall.",
     "Its members are chosen by the people of the city every four years.",
     "The council decides how money is spent on roads, parks and schools."],
    ["A lighthouse stands on the rocks at the mouth of the harbour.",
     "Its light can be seen by ships from more than twenty miles away.",
     "The keeper and his family lived in the small house beside the tower."],
]


# ----------------------------------------------------------------------------- fixtures


def _words(text: str) -> list[str]:
  return re.findall(r"[a-z]+|[^\sa-z]", text.lower())


def write_vocab(path: str, size: int = VOCAB_SIZE) -> None:
  """A WordPiece vocab: specials, characters, ##characters, then the most frequent words."""
  counts = collections.Counter(w for doc in DOCUMENTS for line in doc for w in _words(line))
  chars = sorted({c for w in counts for c in w})
  tokens = SPECIALS + chars + ["##" + c for c in chars if c.isalpha()]
  for word, _ in counts.most_common():
    if len(tokens) >= size:
      break
    if word not in tokens:
      tokens.append(word)
  assert len(tokens) == size, len(tokens)
  with open(path, "w") as f:
    f.write("\n".join(tokens) + "\n")


def tiny_config(arch: str = ARCH, vocab_size: int = VOCAB_SIZE) -> arch_lib.ModelConfig:
  return arch_lib.get_model_config(arch, family="bert", vocab_size=vocab_size, max_positions=64)


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
  """A persistent compilation cache shared with the subprocesses of this module.

  The runs here compile the same few programs again and again (the reference run, the
  interrupted runs in subprocesses, the resumed run); on a loaded 2-core machine each compile
  takes ~10 s, a cache hit ~1 s. The cache returns the very executable that was compiled, so
  bitwise comparisons are unaffected.
  """
  from jax.experimental.compilation_cache import compilation_cache
  path = str(tmp_path_factory.mktemp("xla_cache"))
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  previous = {n: getattr(jax.config, n) for n in names}
  compilation_cache.reset_cache()
  for name, value in zip(names, (path, 0.0, 0)):
    jax.config.update(name, value)
  yield path
  compilation_cache.reset_cache()
  for name, value in previous.items():
    jax.config.update(name, value)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, xla_cache):
  """Teacher, headless body, tokenizer and corpus files on disk (built once per module)."""
  out = make_assets(str(tmp_path_factory.mktemp("distill_assets")))
  out["xla_cache"] = xla_cache
  return out


def make_assets(root: str) -> dict:
  """Writes the tiny teacher, a headless model, a vocabulary and the corpus under ``root``."""
  tok_dir = os.path.join(root, "tokenizer")
  os.makedirs(tok_dir, exist_ok=True)
  write_vocab(os.path.join(tok_dir, "vocab.txt"))
  corpus_dir = os.path.join(root, "corpus")
  os.makedirs(corpus_dir, exist_ok=True)
  for shard in range(2):
    with open(os.path.join(corpus_dir, f"part-{shard}.txt"), "w") as f:
      f.write("\n\n".join("\n".join(d) for d in DOCUMENTS[shard::2]) + "\n")
  cfg = tiny_config(TEACHER_ARCH)
  teacher = model.init(jax.random.key(11), cfg, model.HeadSpec("mlm"))
  # A random init predicts nearly uniform tokens; a spread-out output bias gives the teacher
  # a distinct distribution for the student to learn within a few steps.
  teacher["mlm_head"]["bias"] = 3.0 * jax.random.normal(jax.random.key(13), (VOCAB_SIZE,))
  export.save(os.path.join(root, "teacher"), teacher, cfg)
  body = model.init(jax.random.key(12), cfg, model.HeadSpec("none"))
  export.save(os.path.join(root, "body"), body, cfg)
  return {"root": root, "tokenizer": tok_dir, "corpus": os.path.join(corpus_dir, "*.txt"),
          "teacher": os.path.join(root, "teacher"), "body": os.path.join(root, "body"),
          "data_dir": os.path.join(root, "tfds")}


def load_demo_config(arg: str) -> ml_collections.ConfigDict:
  return cli.load_config(f"configs/pretrain_demo.py:{arg}")


def overrides(assets: dict, **extra) -> dict:
  """Config overrides (dotted names) pointing the tiny config at the test assets."""
  out = {"teacher.kind": "params", "teacher.path": assets["teacher"],
         "student.arch": ARCH, "data.corpus_files": (assets["corpus"],),
         "data.data_dir": assets["data_dir"], "data.tokenizer": assets["tokenizer"],
         "optim.lr": 1e-2}
  out.update(extra)
  return out


def make_config(assets: dict, arg: str = "tiny", **extra) -> ml_collections.ConfigDict:
  config = load_demo_config(arg)
  for name, value in overrides(assets, **extra).items():
    node = config
    *parents, leaf = name.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def flag_args(assets: dict, **extra) -> list[str]:
  return [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}"
          for k, v in overrides(assets, **extra).items()]


def subprocess_env(assets: dict, devices: int = 8, **extra) -> dict:
  """The environment of a child run: this process's JAX settings and compilation cache."""
  env = dict(os.environ)
  env.update({"JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
              "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
              "JAX_DEFAULT_MATMUL_PRECISION": "highest", "PYTHONUNBUFFERED": "1",
              "JAX_COMPILATION_CACHE_DIR": assets["xla_cache"],
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
  env.update(extra)
  return env


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def final_params(workdir: str) -> tuple[int, dict]:
  """(latest step, its parameters as flat numpy arrays) of a run's checkpoints."""
  mgr = checkpoint.CheckpointManager(os.path.join(workdir, "checkpoints"), read_only=True,
                                     async_save=False)
  try:
    step = mgr.latest_step()
    tree = mgr.stored_tree(step)
    abstract = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree["params"],
        is_leaf=lambda x: hasattr(x, "shape"))
    params = mgr.restore_subtree(step, {"params": abstract})["params"]
  finally:
    mgr.close()
  return step, {jax.tree_util.keystr(p): np.asarray(v)
                for p, v in jax.tree_util.tree_leaves_with_path(params)}


def assert_trees_equal(a: dict, b: dict, atol: float = 0.0) -> None:
  assert sorted(a) == sorted(b)
  for k in a:
    if atol == 0.0:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    else:
      np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)


# ----------------------------------------------------------------------------- smoke runs


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
  """One uninterrupted run of the real ``distill.run`` that several tests compare against."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  result = distill.run(make_config(assets, **REFERENCE), workdir)
  step, params = final_params(workdir)
  return {"workdir": workdir, "result": result, "step": step, "params": params}


def test_distill_smoke_learns_and_keeps_teacher_out(assets, reference):
  workdir, result = reference["workdir"], reference["result"]
  total = REFERENCE["train.total_steps"]
  assert result["step"] == total and result["started_from"] == "scratch"
  assert not result["preempted"]
  records = read_metrics(workdir)
  losses = [m["loss"] for m in records]
  assert len(losses) == total and {"kd_loss", "mlm_loss", "tokens_per_second"} <= set(records[0])
  first, last = np.mean(losses[:4]), np.mean(losses[-4:])
  assert last < 0.8 * first, (first, last)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["student"]["arch"] == ARCH
  # The checkpoint holds the student's parameters and optimizer state only.
  mgr = checkpoint.CheckpointManager(os.path.join(workdir, "checkpoints"), read_only=True)
  stored = mgr.stored_tree()
  mgr.close()
  assert set(stored) == {"step", "params", "opt_state"}
  is_leaf = lambda x: hasattr(x, "shape")
  student_params = model.init(jax.random.key(0), tiny_config(ARCH))
  assert (sorted(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(
      stored["params"], is_leaf=is_leaf)) ==
          sorted(jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_leaves_with_path(student_params)))
  student_shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves(student_params)}
  stored_shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves(stored, is_leaf=is_leaf)}
  assert stored_shapes - {()} <= student_shapes
  assert (32, 64) not in stored_shapes  # the teacher's FFN kernel
  # export/ holds the student, loadable as a teacher for the next stage.
  cfg, exported = export.load(result["export"])
  assert str(cfg.arch) == ARCH and cfg.vocab_size == VOCAB_SIZE
  assert reference["step"] == total
  flat = {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(exported)}
  assert_trees_equal(flat, reference["params"])


def test_teacher_adapt_trains_only_the_head(assets, tmp_path):
  workdir = str(tmp_path / "adapt")
  config = make_config(assets, arg="tiny,adapt", **{
      "teacher.kind": "none", "teacher.path": "", "student.kind": "params",
      "student.path": assets["body"], "train.total_steps": 20, "optim.lr": 3e-2,
      # A corpus with a held-out split (its own name: other settings, other dataset), so
      # the evaluation hook runs too.
      "data.corpus_name": "held_out", "data.validation_fraction": 0.3,
      "train.eval_every": 10, "train.eval_batches": 2})
  result = distill.run(config, workdir, trainable="mlm_head")
  records = read_metrics(workdir)
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in evals] == [10, 20] and "eval_loss" in result
  # A held-out split of a few documents says little about learning; it must be finite and
  # follow the trained head.
  assert all(np.isfinite(r["eval_loss"]) for r in evals)
  assert evals[0]["eval_loss"] != evals[1]["eval_loss"]
  losses = [m["loss"] for m in records if "loss" in m]
  assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.3, losses
  mgr = checkpoint.CheckpointManager(os.path.join(workdir, "checkpoints"), read_only=True)
  assert set(mgr.stored_tree()["params"]) == {"mlm_head"}  # the body is never checkpointed
  mgr.close()
  _, body = export.load(assets["body"])
  cfg, adapted = export.load(result["export"])
  assert "mlm_head" in adapted
  for group in body:
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(body[group]),
                                 jax.tree_util.tree_leaves_with_path(adapted[group])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{group}{path}")
  fresh = model.init(jax.random.split(jax.random.key(0))[0], cfg)["mlm_head"]
  moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
      jax.tree_util.tree_leaves(fresh), jax.tree_util.tree_leaves(adapted["mlm_head"]))]
  assert min(moved) > 0  # every head parameter was trained
  # The adapted model is usable as a teacher.
  teacher_cfg, _ = setup.load_teacher(ml_collections.ConfigDict(
      {"kind": "params", "path": result["export"]}))
  assert teacher_cfg.vocab_size == VOCAB_SIZE


def test_teacher_adapt_all_fine_tunes_the_loaded_body(assets, tmp_path):
  workdir = str(tmp_path / "adapt_all")
  config = make_config(assets, arg="tiny,adapt", **{
      "teacher.kind": "none", "teacher.path": "", "student.kind": "params",
      "student.path": assets["body"], "train.total_steps": 12, "optim.lr": 1e-4})
  assert distill.adapt_trainable(config) == "all"  # the demo's default
  result = distill.run(config, workdir, trainable=distill.adapt_trainable(config))
  assert all(np.isfinite(m["loss"]) for m in read_metrics(workdir) if "loss" in m)
  mgr = checkpoint.CheckpointManager(os.path.join(workdir, "checkpoints"), read_only=True)
  assert "encoder" in mgr.stored_tree()["params"] and "mlm_head" in mgr.stored_tree()["params"]
  mgr.close()
  _, body = export.load(assets["body"])
  _, adapted = export.load(result["export"])
  # It starts from the loaded body (not a fresh init) and trains it: 12 steps of lr 1e-4 move a
  # weight by at most ~4e-3 (Adam without bias correction steps up to ~3.2 lr at first), far
  # less than the weights themselves.
  start = np.asarray(body["encoder"]["layer_0"]["output"]["kernel"])
  end = np.asarray(adapted["encoder"]["layer_0"]["output"]["kernel"])
  assert 0 < np.max(np.abs(end - start)) < 5e-3 < 0.1 * np.max(np.abs(start))
  bad = ml_collections.ConfigDict({"adapt": {"trainable": "encoder"}})
  with pytest.raises(ValueError, match="adapt.trainable"):
    distill.adapt_trainable(bad)


# ----------------------------------------------------------------------------- sharding


def _one_step(config, devices, batch_np):
  built = distill.build(config, devices=devices)
  batch = sharding.global_batch(batch_np, built.mesh)
  state, metrics = built.step_fn(built.state, batch, built.rng, built.frozen)
  state, metrics2 = built.step_fn(state, sharding.global_batch(batch_np, built.mesh), built.rng,
                                  built.frozen)
  params = {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))}
  return params, float(metrics["loss"]), float(metrics2["loss"])


def test_sharded_steps_match_single_device(assets):
  config = make_config(assets, **{"student.arch": "D1-A2-H32-I64"})
  inputs, _ = setup.make_input(config.data, "bert", config.seed)
  batch_np = inputs.batch(0)
  ref, ref_loss, ref_loss2 = _one_step(config, jax.devices()[:1], batch_np)
  for mesh in ({"data": 4, "fsdp": 1, "model": 2}, {"data": 1, "fsdp": 8, "model": 1}):
    config.mesh = ml_collections.ConfigDict(mesh)
    got, loss, loss2 = _one_step(config, None, batch_np)
    assert abs(loss - ref_loss) < 1e-5 and abs(loss2 - ref_loss2) < 1e-5, (mesh, loss, ref_loss)
    assert_trees_equal(got, ref, atol=1e-5)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def no_compiling(monkeypatch):
  """Makes any jax.jit call fail, so an error raised instead proves it came first."""
  def refuse(*args, **kwargs):
    raise AssertionError("jax.jit was called before the input was checked")
  monkeypatch.setattr(jax, "jit", refuse)


def test_bad_input_fails_before_compiling(assets, tmp_path, no_compiling):
  workdir = str(tmp_path / "bad")
  # A student whose own vocabulary differs from the teacher's.
  config = make_config(assets, **{"student.family": "bert"})
  config.student.overrides.vocab_size = VOCAB_SIZE + 8
  with pytest.raises(ValueError, match=r"student vocabulary \(168.*teacher's \(160"):
    distill.run(config, workdir)
  # Three heads cannot be split over a model axis of 2.
  config = make_config(assets, **{"student.arch": "D2-A3-H48-I64",
                                  "mesh.data": 4, "mesh.model": 2})
  with pytest.raises(ValueError, match=r"student \(D2-A3-H48-I64\) parameter encoder/layer_0/"
                                       r"attention/\w+/\w+ has shape \(3, .* cannot be split "
                                       r"over mesh axes \('model',\)"):
    distill.run(config, workdir)
  # 6 rows do not divide over a data axis of 4.
  config = make_config(assets, **{"data.global_batch_size": 6, "mesh.data": 4,
                                  "mesh.model": 2})
  with pytest.raises(ValueError, match=r"global batch size 6 is not divisible by the 4"):
    distill.run(config, workdir)
  # A tokenizer with more ids than the models' vocabulary.
  big = tmp_path / "big_tokenizer"
  big.mkdir()
  write_vocab(str(big / "vocab.txt"), VOCAB_SIZE)
  with open(big / "vocab.txt", "a") as f:
    f.write("\n".join(f"extra{i}" for i in range(5)) + "\n")
  config = make_config(assets, **{"data.tokenizer": str(big)})
  with pytest.raises(ValueError, match=r"tokenizer has 165 ids but the student's vocabulary "
                                       r"has 160"):
    distill.run(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


# ----------------------------------------------------------------------------- preemption


def _start(assets, workdir, **extra):
  cmd = [sys.executable, "-m", "bort_jax.main", "distill",
         f"--config={os.path.join(REPO, 'configs', 'pretrain_demo.py')}:tiny",
         f"--workdir={workdir}"] + flag_args(assets, **extra)
  return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(assets), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _wait_for_step(proc, at_least: int, timeout: float = 120.0) -> tuple[int, list[str]]:
  """Reads the run's output until it reports a step >= at_least; returns that step."""
  lines, deadline = [], time.monotonic() + timeout
  while time.monotonic() < deadline:
    line = proc.stdout.readline()
    if not line:
      break
    lines.append(line)
    m = re.match(r"step (\d+)/\d+ ", line)
    if m and int(m.group(1)) >= at_least:
      return int(m.group(1)), lines
  proc.kill()
  proc.wait(10)
  raise AssertionError(f"no step >= {at_least} reported:\n{''.join(lines[-30:])}")


def test_sigterm_then_kill9_then_resume_is_bitwise_exact(assets, reference, tmp_path):
  total = REFERENCE["train.total_steps"]
  workdir = str(tmp_path / "interrupted")
  rnd = random.Random(os.getpid())
  # 1. SIGTERM: saves at the step reached and exits 0.
  proc = _start(assets, workdir, **REFERENCE)
  try:
    seen, _ = _wait_for_step(proc, rnd.randint(3, 12))
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait(10)
  assert proc.returncode == 0, out[-3000:]
  printed = json.loads(out[out.index("\n{") + 1:])
  assert printed["preempted"] and seen <= printed["step"] < total, printed
  mgr = checkpoint.CheckpointManager(os.path.join(workdir, "checkpoints"), read_only=True)
  assert mgr.latest_step() == printed["step"]
  mgr.close()

  # 2. Resume in a new process, then SIGKILL at a random later step (possibly mid-save).
  proc = _start(assets, workdir, **REFERENCE)
  try:
    killed_at, _ = _wait_for_step(proc, rnd.randint(printed["step"] + 3, total - 12))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait(10)
  assert proc.returncode == -signal.SIGKILL
  mgr = checkpoint.CheckpointManager(os.path.join(workdir, "checkpoints"), read_only=True)
  assert mgr.latest_step() < total, "the killed run had finished: nothing was interrupted"
  mgr.close()

  # 3. Resume to the end: the parameters equal the uninterrupted run's, bit for bit.
  result = distill.run(make_config(assets, **REFERENCE), workdir)
  assert result["started_from"] == "workdir" and result["step"] == total
  step, got = final_params(workdir)
  assert step == total and killed_at < total
  assert_trees_equal(got, reference["params"])


def test_corrupted_latest_checkpoint_is_skipped(assets, reference, tmp_path, caplog):
  total, every = REFERENCE["train.total_steps"], REFERENCE["train.checkpoint_every"]
  workdir = str(tmp_path / "run")
  shutil.copytree(reference["workdir"], workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  mgr = checkpoint.CheckpointManager(ckpt_dir, read_only=True)
  assert mgr.all_steps() == [total - every, total]
  mgr.close()
  # Damage every array file of the latest step's state (truncate them to nothing).
  damaged = 0
  for root, _, files in os.walk(os.path.join(ckpt_dir, str(total), "state")):
    for name in files:
      if not name.endswith(".json") and "manifest" not in name:
        open(os.path.join(root, name), "wb").close()
        damaged += 1
  assert damaged
  with caplog.at_level(logging.WARNING, logger="bort_jax.runtime.checkpoint"):
    result = distill.run(make_config(assets, **REFERENCE), workdir)
  assert result["started_from"] == "workdir" and result["step"] == total
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert any(f"step {total}" in w and "unreadable" in w for w in warnings), warnings
  assert any(n.startswith(f"{total}.corrupt-") for n in os.listdir(ckpt_dir))
  # The last `every` steps were trained again from the previous checkpoint, identically.
  records = read_metrics(workdir)
  assert [r["step"] for r in records[-every:]] == list(range(total - every + 1, total + 1))
  _, got = final_params(workdir)
  assert_trees_equal(got, reference["params"])


# ----------------------------------------------------------------------------- inheriting


def test_inherit_with_intermediate_losses_runs_and_resumes(assets, tmp_path, monkeypatch,
                                                           caplog):
  """A narrower student inherited from the teacher, with hidden and attention terms."""
  from bort_jax.core import inherit as inherit_lib  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / "inherit")
  extra = {"student.arch": "D1-A2-H24-I48-S8", "student.init": "inherit",
           "student.importance_batches": 2, "loss.alpha_hidden": 1.0, "loss.alpha_attn": 1.0,
           "loss.layer_map": "inherited", "train.total_steps": 2, "train.checkpoint_every": 1}
  calls = []
  real = inherit_lib.inherit
  monkeypatch.setattr(inherit_lib, "inherit",
                      lambda *a, **k: calls.append(a[3]) or real(*a, **k))
  with caplog.at_level(logging.INFO):
    result = distill.run(make_config(assets, **extra), workdir)
  assert result["step"] == 2 and result["started_from"] == "scratch" and len(calls) == 1
  assert "inherit: teacher layers" in caplog.text
  assert "share of the teacher's importance" in caplog.text
  records = read_metrics(workdir)
  assert all(np.isfinite(m["hidden_loss"]) and np.isfinite(m["attn_loss"]) for m in records)
  assert all(m["hidden_loss"] > 0 and m["attn_loss"] > 0 for m in records)
  step, params = final_params(workdir)
  projection = [v for k, v in params.items() if "hidden_projection" in k]
  assert step == 2 and len(projection) == 1 and projection[0].shape == (24, 32)
  # The export is the student alone: the projection belongs to the distillation.
  cfg, exported = export.load(result["export"])
  assert str(cfg.arch) == "D1-A2-H24-I48-S8" and distill.AUX not in exported
  # Resume: continues from the checkpoint, never inherits again.
  result = distill.run(make_config(assets, **dict(extra, **{"train.total_steps": 4})), workdir)
  assert result["started_from"] == "workdir" and result["step"] == 4 and len(calls) == 1


def test_inherit_config_errors(assets):
  with pytest.raises(ValueError, match="student.init"):
    setup.check_config(make_config(assets, **{"student.init": "copy"}), paths=False)
  with pytest.raises(ValueError, match="layer_map='inherited' needs"):
    setup.check_config(make_config(assets, **{"loss.layer_map": "inherited"}), paths=False)
  with pytest.raises(ValueError, match="alpha_attn"):
    setup.check_config(make_config(assets, **{"loss.alpha_attn": -1.0}), paths=False)
  setup.check_config(make_config(assets, **{"student.init": "inherit",
                                            "loss.layer_map": "inherited"}), paths=False)
