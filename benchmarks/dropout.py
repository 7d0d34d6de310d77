"""What dropout costs in a fine-tuning step: Flax's ``nn.Dropout`` against ``core/dropout.py``.

The measured unit is one jitted fine-tuning step (forward with dropout, backward, AdamW) of a
classification model on a fixed batch, in three variants compiled side by side in one
process and timed round-robin:

* ``flax``: the model with ``flax.linen.Dropout`` (one Threefry hash per element);
* ``ours``: the model as shipped (``core/dropout.py``: four 16-bit draws per hash);
* ``none``: dropout rates 0, the floor.

Shapes: the demo's teacher (D6-A12-H384-I1536) and its student (D2-A8-H384-I256), BERT
vocabulary, batch 8, at 64 and 128 tokens.

    python benchmarks/dropout.py --out benchmarks/results/dropout.json [--rounds 15]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py; also puts the repo root on sys.path)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from bort_jax.core import arch, dropout, model  # noqa: E402

MODELS = {"teacher": "D6-A12-H384-I1536", "student": "D2-A8-H384-I256"}
HEAD = model.HeadSpec("classification", 2)


def make_step(config, variant: str, seq_len: int):
  """A thunk running one compiled step of ``variant`` (state kept between calls)."""
  if variant == "none":
    config = config.replace(dropout=0.0, attention_dropout=0.0)
  params = model.init(jax.random.key(0), config, HEAD)
  tx = optax.adamw(3e-5)
  batch = {"input_ids": jnp.full((8, seq_len), 5, jnp.int32),
           "attention_mask": jnp.ones((8, seq_len), jnp.int32),
           "token_type_ids": jnp.zeros((8, seq_len), jnp.int32)}
  labels = jnp.zeros((8,), jnp.int32)

  def loss(p, rng):
    logits = model.apply(p, config, batch, head=HEAD, train=True, rng=rng)["logits"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def step(state, i):
    p, opt = state
    value, grads = jax.value_and_grad(loss)(p, jax.random.fold_in(jax.random.key(1), i))
    updates, opt = tx.update(grads, opt, p)
    return (optax.apply_updates(p, updates), opt), value

  model.Dropout = nn.Dropout if variant == "flax" else dropout.Dropout  # as model.py names it
  try:
    compiled = jax.jit(step).lower((params, tx.init(params)), 0).compile()
  finally:
    model.Dropout = dropout.Dropout
  state = {"value": (params, tx.init(params)), "i": 0}

  def run():
    state["value"], value = compiled(state["value"], state["i"])
    state["i"] += 1
    value.block_until_ready()
  return run


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  result = {"machine": common.machine_info(), "batch_size": 8, "rounds": args.rounds,
            "unit": "one jitted fine-tuning step (forward, backward, AdamW)"}
  for name, shape in MODELS.items():
    config = arch.get_model_config(shape, family="bert")
    for seq_len in (64, 128):
      common.log(f"{name} at {seq_len} tokens")
      fns = {v: make_step(config, v, seq_len) for v in ("flax", "ours", "none")}
      times = common.interleaved_timing(fns, args.rounds, warmup=2)
      med = {v: times[v]["median_ms"] for v in fns}
      result[f"{name}_seq{seq_len}"] = {
          "model": shape, "times": times,
          "flax_over_ours": med["flax"] / med["ours"],
          "dropout_share_removed": (med["flax"] - med["ours"]) / (med["flax"] - med["none"])}
  result["load_average_1m_after"] = common.machine_info()["load_average_1m"]
  common.write_json(result, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
