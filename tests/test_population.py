"""Seeds x learning rates as one population: equal to separate runs, reports, resume."""

import jax
import numpy as np
import pytest

from bort_jax.core import model, optim
from bort_jax.core.arch import get_model_config
from bort_jax.finetune import population as pop_lib
from bort_jax.runtime import train

VOCAB, T, N = 40, 8, 48


def _config():
  return get_model_config("D1-A2-H16-I32", family="bert", vocab_size=VOCAB, max_positions=16)


def _data(n, seed):
  """Binary task: is token 7 in the sentence? Rows start with 2 ([CLS]); 0 is padding."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(8, VOCAB, size=(n, T)).astype(np.int32)
  ids[:, 0] = 2
  label = rng.integers(0, 2, size=n).astype(np.int32)
  where = rng.integers(1, T - 2, size=n)
  ids[label == 1, where[label == 1]] = 7
  lengths = rng.integers(T - 3, T + 1, size=n)
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask > 0, ids, 0)
  label = np.where(np.any(ids == 7, axis=1), 1, 0).astype(np.int32)
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
          "label": label, "weight": np.ones(n, np.float32)}


def _separate_run(config, head, member, settings, train_data, dev, init_params):
  """One member alone, with the project's optimizer and train step (the reference)."""
  tx = optim.make_optimizer(settings.optimizer_config(member))
  params = pop_lib.merge_params(model.init(pop_lib.init_key(member.seed), config, head),
                                init_params)
  state = train.create_state(params, tx)
  step = jax.jit(lambda s, b, r: train.train_step(
      s, b, r, None, loss_fn=pop_lib.make_loss_fn(config, head), tx=tx))
  rng = pop_lib.dropout_key(member.seed)
  losses = []
  for t in range(settings.total_steps):
    rows = pop_lib.batch_indices(member.seed, t, N, settings.batch_size)
    state, metrics = step(state, {k: v[rows] for k, v in train_data.items()}, rng)
    losses.append(float(metrics["loss"]))
  logits = jax.jit(lambda p: model.apply(p, config, dev, head=head)["logits"])(state.params)
  return state.params, np.asarray(logits), losses


def _setup():
  config = _config()
  head = model.HeadSpec("classification", 2)
  train_data, dev = _data(N, 0), _data(24, 1)
  init_params = model.init(jax.random.key(99), config, model.HeadSpec("mlm"))  # "pretrained"
  members = [pop_lib.Member(3e-3, 0.0, seed=0), pop_lib.Member(1e-3, 0.01, warmup=0.5, seed=1)]
  return config, head, train_data, dev, init_params, members


def test_population_equals_separate_runs():
  config, head, train_data, dev, init_params, members = _setup()
  # Chunks of 4 and 2 steps: the short last chunk runs in the same program, padded.
  settings = pop_lib.Settings(total_steps=6, batch_size=8, eval_every=4, mode="map")
  score = pop_lib.accuracy_scorer(dev)
  result = pop_lib.train_population(config, head, members, settings, train_data, dev, score,
                                    init_params=init_params)
  assert [h["step"] for h in result.history] == [4, 6]
  for i, member in enumerate(members):
    params, logits, losses = _separate_run(config, head, member, settings, train_data, dev,
                                           init_params)
    np.testing.assert_allclose(result.dev_logits[i], logits, atol=1e-5)
    assert result.metrics[i] == pytest.approx(score(logits), abs=1e-5)
    # The last chunk's mean training loss (steps 4 and 5).
    assert result.train_loss[i] == pytest.approx(np.mean(losses[4:]), abs=1e-5)
    for a, b in zip(jax.tree.leaves(result.params(i)), jax.tree.leaves(params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # Members differ: seeds and settings are not silently shared.
  assert not np.allclose(result.dev_logits[0], result.dev_logits[1])


def test_vmap_and_map_populations_agree():
  config, head, train_data, dev, init_params, members = _setup()
  score = pop_lib.accuracy_scorer(dev)
  out = {}
  for mode in ("vmap", "map"):
    settings = pop_lib.Settings(total_steps=3, batch_size=8, mode=mode)
    out[mode] = pop_lib.train_population(config, head, members, settings, train_data, dev,
                                         score, init_params=init_params)
  np.testing.assert_allclose(out["vmap"].dev_logits, out["map"].dev_logits, atol=1e-5)
  np.testing.assert_allclose(out["vmap"].train_loss, out["map"].train_loss, atol=1e-5)


def test_batch_indices_are_a_function_of_seed_and_step():
  a = pop_lib.batch_indices(3, 7, 50, 8)
  assert np.array_equal(a, pop_lib.batch_indices(3, 7, 50, 8))
  assert not np.array_equal(a, pop_lib.batch_indices(4, 7, 50, 8))
  # One epoch (6 batches of 8 out of 50) visits 48 distinct rows.
  epoch = np.concatenate([pop_lib.batch_indices(3, t, 50, 8) for t in range(6)])
  assert len(set(epoch.tolist())) == 48
  assert np.array_equal(epoch, np.random.default_rng([3, 0]).permutation(50)[:48])
  with pytest.raises(ValueError, match="fewer than one batch"):
    pop_lib.batch_indices(0, 0, 5, 8)


def test_summarize_reports_mean_std_best_per_setting():
  members = pop_lib.grid([1e-4, 1e-5], seeds=(0, 1, 2))
  values = [0.5, 0.7, 0.6, 0.9, 0.8, 1.0]
  rows = pop_lib.summarize(members, [{"accuracy": v} for v in values])
  assert [r["lr"] for r in rows] == [1e-4, 1e-5]
  assert rows[0]["seeds"] == [0, 1, 2]
  assert rows[0]["accuracy"]["mean"] == pytest.approx(0.6)
  assert rows[0]["accuracy"]["std"] == pytest.approx(0.1)
  assert rows[1]["accuracy"]["best"] == pytest.approx(1.0)
  assert rows[1]["accuracy"]["values"] == pytest.approx([0.9, 0.8, 1.0])
  table = pop_lib.format_table(rows, "accuracy")
  assert "0.6000 +- 0.1000" in table and "| 3 |" in table


def test_bad_inputs_are_refused_before_compiling():
  config = _config()
  head = model.HeadSpec("classification", 2)
  train_data, dev = _data(N, 0), _data(8, 1)
  settings = pop_lib.Settings(total_steps=2)
  bad = dict(train_data, label=np.where(train_data["label"] == 1, 2, 0).astype(np.int32))
  with pytest.raises(ValueError, match="label 2 is outside the label space 0..1"):
    pop_lib.train_population(config, head, pop_lib.grid([1e-3]), settings, bad, dev,
                             pop_lib.accuracy_scorer(dev))
  with pytest.raises(ValueError, match="same .setting, seed. twice"):
    pop_lib.train_population(config, head, pop_lib.grid([1e-3, 1e-3]), settings, train_data,
                             dev, pop_lib.accuracy_scorer(dev))
  with pytest.raises(ValueError, match="lr must be a finite positive"):
    pop_lib.Member(lr=0.0)
  other = model.init(jax.random.key(0), config, model.HeadSpec("classification", 3))
  with pytest.raises(ValueError, match=r"classifier/out_proj/\w+ of the checkpoint has shape \(.*3"):
    pop_lib.merge_params(model.init(jax.random.key(0), config, head), other)


class _Killed(Exception):
  pass


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
  config = _config()
  head = model.HeadSpec("classification", 2)
  train_data, dev = _data(N, 0), _data(16, 1)
  members = pop_lib.grid([2e-3], seeds=(0, 1))
  settings = pop_lib.Settings(total_steps=4, eval_every=2)
  score = pop_lib.accuracy_scorer(dev)
  full = pop_lib.train_population(config, head, members, settings, train_data, dev, score)

  def kill(line):
    if "step 2/4" in line:
      raise _Killed(line)  # after the first chunk's checkpoint

  with pytest.raises(_Killed):
    pop_lib.train_population(config, head, members, settings, train_data, dev, score,
                             workdir=str(tmp_path), report=kill)
  lines = []
  resumed = pop_lib.train_population(config, head, members, settings, train_data, dev, score,
                                     workdir=str(tmp_path), report=lines.append)
  assert len(lines) == 1 and "step 4/4" in lines[0]  # only the second chunk ran again
  assert resumed.history == full.history
  for a, b in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(full.state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  with pytest.raises(ValueError, match="other members"):
    pop_lib.train_population(config, head, pop_lib.grid([1e-3], seeds=(0, 1)), settings,
                             train_data, dev, score, workdir=str(tmp_path))
