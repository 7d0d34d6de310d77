"""Fine-tuning: the pure steps, the loop on every task through TFDS mock data, resume, bad input.

Tiny random models (D1-A2-H32-I64) and a hashing tokenizer made here keep the whole file at
CPU-test speed; one compiled step is shared per (kind, num_labels, seq_len).
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from bort_jax.core import arch as arch_lib
from bort_jax.core import model, optim
from bort_jax.finetune import steps
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
  tx = steps.make_direction(ocfg)
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
  assert not np.allclose(jax.tree.leaves(state.params)[0], jax.tree.leaves(params)[0])


def test_schedule_factor_matches_make_schedule():
  for warmup in (0.0, 0.35, 0.5):
    ref = optim.make_schedule(1.0, 20, warmup_fraction=warmup)
    got = [float(steps.schedule_factor(s, 20, jnp.float32(warmup))) for s in range(22)]
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
  tx = steps.make_direction({"clip_norm": 1.0})
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
