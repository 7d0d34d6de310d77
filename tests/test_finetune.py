"""Fine-tuning: the pure steps, the loop on every task through TFDS mock data, resume, bad input.

Tiny random models (D1-A2-H32-I64) and a hashing tokenizer made here keep the whole file at
CPU-test speed; one compiled step is shared per (kind, num_labels, seq_len).
"""

import importlib.util
import json
import os
import signal
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bort_jax import main as cli_main
from bort_jax.core import arch as arch_lib
from bort_jax.core import model, optim
from bort_jax.finetune import casts, loop, setup, steps, submission, tasks
from bort_jax.finetune import compiled as compiled_lib
from bort_jax.interop import export
from bort_jax.runtime import train

TINY = arch_lib.get_model_config("D1-A2-H32-I64", family="bert", vocab_size=100,
                                 max_positions=64)


def _batch(kind, n, rows=4, seq=8, seed=0):
  rng = np.random.default_rng(seed)
  shape = (rows, n, seq) if kind == "multiple_choice" else (rows, seq)
  label = (rng.uniform(0, 5, rows).astype(np.float32) if kind == "regression"
           else rng.integers(0, n, rows).astype(np.int32))
  return {"input_ids": rng.integers(5, 100, shape).astype(np.int32),
          "attention_mask": np.ones(shape, np.int32),
          "token_type_ids": np.zeros(shape, np.int32), "label": label,
          "weight": np.array([1, 1, 1, 0], np.float32)[:rows]}


@pytest.mark.parametrize("kind,n", [("regression", 1), ("multiple_choice", 3)])
def test_train_step_is_make_optimizers_update(kind, n):
  """Traced lr / decay / warmup give exactly the update of core.optim.make_optimizer."""
  cfg = steps.StepConfig(TINY, kind, n, total_steps=10)
  ocfg = {"name": "adam_nobc", "lr": 3e-3, "weight_decay": 0.1, "warmup": 0.3,
          "total_steps": 10, "clip_norm": 1.0}
  params = model.init(jax.random.key(0), TINY, cfg.head)
  batch = _batch(kind, n)
  rng = jax.random.key(7)
  tx = optim.make_direction(ocfg)
  state = steps.init_state(params, tx)
  ref_tx = optim.make_optimizer(ocfg)
  ref = train.create_state(params, ref_tx)

  def ref_loss(p, b, r, frozen):
    del frozen
    return steps.task_loss(steps.forward(p, b, cfg, r), b, kind)

  hp = steps.hparams(3e-3, 0.1, 0.3)
  ours = jax.jit(lambda s, b, r, h: steps.train_step(s, b, r, h, cfg=cfg, tx=tx))
  theirs = jax.jit(lambda s, b, r: train.train_step(s, b, r, None, loss_fn=ref_loss, tx=ref_tx))
  for _ in range(3):
    state, m = ours(state, batch, rng, hp)
    ref, rm = theirs(ref, batch, rng)
    np.testing.assert_allclose(m["loss"], rm["loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # Training moved the weights. Not "the first leaf moved": for multiple choice that leaf is
  # the classifier bias, whose gradient is exactly zero (a softmax over choices ignores a shift
  # shared by all of them), and whether it stays bit-exact at zero depends on the CPU.
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(state.params),
                                                 jax.tree.leaves(params))]
  assert sum(moved) >= len(moved) // 2, moved


def test_schedule_factor_matches_make_schedule():
  for warmup in (0.0, 0.35, 0.5):
    ref = optim.make_schedule(1.0, 20, warmup_fraction=warmup)
    got = [float(optim.schedule_factor(s, 20, round(warmup * 20))) for s in range(22)]
    np.testing.assert_allclose(got, [float(ref(s)) for s in range(22)], rtol=1e-6)


def test_loss_ignores_padding_and_unlabeled_rows():
  logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]])
  batch = {"label": jnp.array([0, 0, -1]), "weight": jnp.array([1.0, 1.0, 1.0])}
  loss, m = steps.task_loss(logits, batch, "classification")
  want = np.mean([np.log1p(np.exp(-2.0)), np.log1p(np.exp(2.0))])
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert float(m["examples"]) == 2 and float(m["accuracy"]) == 0.5
  reg, _ = steps.task_loss(jnp.array([1.0, 3.0]), {"label": jnp.array([2.0, 0.0]),
                                                   "weight": jnp.array([1.0, 0.0])},
                           "regression")
  assert float(reg) == 1.0


def test_population_vmap_equals_members():
  """Two members (seeds x learning rates) vmapped give each member's own run."""
  cfg = steps.StepConfig(TINY, "classification", 3, total_steps=5)
  tx = optim.make_direction({"clip_norm": 1.0})
  batch = _batch("classification", 3)
  keys = [jax.random.key(s) for s in (0, 1)]
  hps = [steps.hparams(1e-3, 0.0, 0.4), steps.hparams(5e-3, 0.01, 0.4)]
  members = [steps.init_state(model.init(k, TINY, cfg.head), tx) for k in keys]
  step = lambda s, r, h: steps.train_step(s, batch, r, h, cfg=cfg, tx=tx)
  stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)
  pop, rngs, hp = stack(members), jnp.stack(keys), stack(hps)
  pop_step, one_step = jax.jit(jax.vmap(step)), jax.jit(step)
  for _ in range(3):
    pop, _ = pop_step(pop, rngs, hp)
    members = [one_step(s, r, h)[0] for s, r, h in zip(members, keys, hps)]
  for i, member in enumerate(members):
    for a, b in zip(jax.tree.leaves(pop.params), jax.tree.leaves(member.params)):
      np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the loop

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FT_VOCAB = 100


def _config_module():
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "finetune.py")
  spec = importlib.util.spec_from_file_location("finetune_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny pretrained-looking model (our export, MLM head) and a WordPiece vocabulary."""
  root = str(tmp_path_factory.mktemp("finetune_assets"))
  letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
  tokens = SPECIALS + letters + ["##" + c for c in letters]
  tokens += [f"w{i}" for i in range(FT_VOCAB - len(tokens))]
  tok_dir = os.path.join(root, "tok")
  os.makedirs(tok_dir)
  with open(os.path.join(tok_dir, "vocab.txt"), "w") as f:
    f.write("\n".join(tokens) + "\n")
  cfg = arch_lib.get_model_config("D1-A2-H32-I64", family="bert", vocab_size=FT_VOCAB,
                                  max_positions=64, pad_id=0)
  params = model.init(jax.random.key(3), cfg, model.HeadSpec("mlm"))
  export.save(os.path.join(root, "pretrained"), params, cfg)
  return {"root": root, "tokenizer": tok_dir, "init": os.path.join(root, "pretrained")}


def tiny_config(tiny, task, **overrides):
  config = _config_module().get_config(f"task={task},tiny")
  config.init.path = tiny["init"]
  config.tokenizer = tiny["tokenizer"]
  config.seq_len = 16
  config.train.total_steps = 2
  config.train.eval_every = 2
  config.train.checkpoint_every = 2
  config.train.log_every = 1
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _race_records(self, split, **kwargs):
  del self, kwargs
  rng = np.random.default_rng(zlib.crc32(split.encode()))
  words = np.array(["the", "cat", "sat", "on", "a", "mat"])
  out = []
  for i in range(5):
    n = int(rng.integers(1, 3))
    out.append({
        "article": " ".join(rng.choice(words, 12)).encode(),
        "questions": np.array([" ".join(rng.choice(words, 4)).encode() for _ in range(n)],
                              dtype=object),
        "answers": np.array([b"ABCD"[int(k):int(k) + 1] for k in rng.integers(0, 4, n)],
                            dtype=object),
        "options": np.array([[" ".join(rng.choice(words, 2)).encode() for _ in range(4)]
                             for _ in range(n)], dtype=object),
        "example_id": f"{split}/{i}.txt".encode(),
    })
  return out


def _mock(task):
  if task.startswith("race/"):
    return tfds.testing.mock_data(num_examples=5, as_data_source_fn=_race_records)
  return tfds.testing.mock_data(num_examples=5)


TRAINABLE = [n for n in tasks.task_names()
             if tasks.get_task(n).source is None and tasks.get_task(n).train_split]


@pytest.mark.parametrize("task", TRAINABLE)
def test_every_task_finetunes_evaluates_and_writes_its_submission(tiny, tmp_path, task):
  spec = tasks.get_task(task)
  workdir = str(tmp_path / "run")
  with _mock(task):
    results = loop.run(tiny_config(tiny, task), workdir)
  assert results["step"] == 2 and not results["preempted"]
  for split in spec.validation_splits:
    assert set(results["dev"][split]) == set(spec.metrics)
    assert all(np.isfinite(v) for v in results["dev"][split].values())
  steps_logged = [json.loads(line)["step"] for line in open(os.path.join(workdir,
                                                                          "metrics.jsonl"))]
  assert 1 in steps_logged and 2 in steps_logged
  best = json.load(open(os.path.join(workdir, "best", "finetune.json")))
  assert best["task"] == task and best["step"] == 2
  # Every test split (and the diagnostic sets this task's model scores) is predicted, one line
  # per scored unit, and written in the leaderboard's format where it has one.
  expected = [(task, s) for s in spec.test_splits]
  expected += [(d.name, s) for d in compiled_lib.diagnostics_of(spec) for s in d.test_splits]
  for name, split in expected:
    path = os.path.join(workdir, "predictions", name.replace("/", "_"), f"{split}.jsonl")
    rows = [json.loads(line) for line in open(path)]
    assert rows and all("prediction" in r for r in rows)
    try:
      file_name = submission.submission_file_name(name, split)
    except ValueError:
      assert name.startswith("race/")
      continue
    lines = open(os.path.join(workdir, "submission", file_name)).read().splitlines()
    assert len(lines) >= (5 if file_name.endswith(".jsonl") else 6)


def test_preempted_run_resumes_to_the_uninterrupted_result(tiny, tmp_path, monkeypatch):
  """SIGTERM during step 1 saves and returns; the rerun ends where an uninterrupted run does."""
  task = "glue/rte"
  with _mock(task):
    whole = loop.run(tiny_config(tiny, task), str(tmp_path / "whole"))
    real_batch = loop.train_batch

    def batch_then_sigterm(*args, **kwargs):
      out = real_batch(*args, **kwargs)
      if kwargs.get("step", args[6] if len(args) > 6 else None) == 0:
        os.kill(os.getpid(), signal.SIGTERM)  # the handler the run installed catches it
      return out

    monkeypatch.setattr(loop, "train_batch", batch_then_sigterm)
    cut = loop.run(tiny_config(tiny, task), str(tmp_path / "cut"))
    assert cut["preempted"] and cut["step"] == 1
    monkeypatch.setattr(loop, "train_batch", real_batch)
    resumed = loop.run(tiny_config(tiny, task), str(tmp_path / "cut"))
  assert resumed["started_from"] == "workdir" and resumed["step"] == 2
  assert resumed["dev"] == whole["dev"] and resumed["test"] == whole["test"]
  _, a = export.load(str(tmp_path / "whole" / "best"))
  _, b = export.load(str(tmp_path / "cut" / "best"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  losses = lambda d: [json.loads(l).get("loss") for l in open(tmp_path / d / "metrics.jsonl")]
  assert [x for x in losses("whole") if x] == [x for x in losses("cut") if x]


def test_tracker_keeps_the_best_and_stops_on_patience(tmp_path):
  spec = tasks.get_task("glue/cola")
  saved = []
  tracker = loop.Tracker(str(tmp_path), spec, patience=2, eval_every=10)
  for step, value in ((10, 0.1), (20, 0.3), (30, 0.2)):
    tracker.update(step, {"mcc": value}, saved.append)
    assert not tracker.stopped
  tracker.update(40, {"mcc": 0.3}, saved.append)  # a tie is no improvement: 2 evals without
  assert [s["step"] for s in saved] == [10, 20]
  assert tracker.stopped and tracker.best["step"] == 20 and tracker.best["value"] == 0.3
  resumed = loop.Tracker(str(tmp_path), spec, patience=2, eval_every=10)
  assert resumed.best is None  # nothing was written: the save callback here only records
  assert loop.Tracker(str(tmp_path), spec, patience=0, eval_every=10).stale(10 ** 6) is False


# ----------------------------------------------------------------------------- bad input


def _source_task(name, labels, validation=("validation",)):
  records = [{"sentence": f"w{i} a b", "label": label, "idx": i} for i, label in
             enumerate(labels)]
  return tasks.register_task(tasks.TaskSpec(
      name=name, builder=None, kind="classification", num_labels=2,
      cast=casts.pair_cast("sentence"), validation_splits=validation,
      source=lambda split, data_dir: records), overwrite=True)


def _no_compile(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("compiled before checking the input")
  monkeypatch.setattr(loop, "compile_steps", fail)


def _finetuned_3_labels(tiny, root):
  cfg = export.load_config(tiny["init"])
  head = steps.task_head("classification", 3)
  params = model.init(jax.random.key(0), cfg, head)
  path = os.path.join(root, "mnli_model")
  setup.save_finetuned(path, params, cfg, setup.head_meta(tasks.get_task("glue/mnli"), 16,
                                                        head.resolve(cfg.family)),
                      tiny["tokenizer"])
  return path


@pytest.mark.parametrize("case", ["head", "no_dev", "label", "unknown", "diagnostic"])
def test_bad_input_exits_2_with_one_paragraph_before_compiling(tiny, tmp_path, monkeypatch,
                                                               capsys, case):
  _no_compile(monkeypatch)
  init, task = tiny["init"], "test/ok"
  if case == "head":
    init, task, want = _finetuned_3_labels(tiny, str(tmp_path)), "test/ok", "3 output"
    _source_task(task, [0, 1, 0, 1])
  elif case == "no_dev":
    task, want = "test/no_dev", "no dev split"
    _source_task(task, [0, 1], validation=())
  elif case == "label":
    task, want = "test/bad_label", "label 5 is outside the label space"
    _source_task(task, [0, 1, 5, 1])
  elif case == "unknown":
    task, want = "glue/rtee", "Did you mean 'glue/rte'"
  else:
    task, want = "glue/ax", "fine-tuned on 'glue/mnli'"
  workdir = tmp_path / "wd"
  code = cli_main.main(["finetune", f"--config=configs/finetune.py:task={task},tiny",
                        f"--workdir={workdir}", f"--config.init.path={init}",
                        f"--config.tokenizer={tiny['tokenizer']}"])
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert want in err and "\n" not in err and "Traceback" not in err
  assert not workdir.exists()
