"""K seeds fine-tuned as one population against K runs one after another, end to end.

What is timed, from cold (``jax.clear_caches()`` before each contender, so every compile is
paid as a fresh process would pay it):

* ``sequential``: K separate runs, each as ``bort-jax finetune`` runs one model: its own
  compiled ``steps.train_step`` and eval step, initial weights from ``setup.init_params``,
  one host batch per step in ``prepare.train_batch``'s order, dev logits at the end;
* ``population_map`` / ``population_vmap``: the same K members in one
  ``population.train_population`` call (one init, one train and one eval program for all of
  them; members under ``lax.map`` or ``vmap``).

Each contender reports its wall time, the dev accuracy of every member and the time spent
compiling (measured by lowering and compiling the same programs once more, cold). The
population's members compute what the separate runs compute (``tests/test_population.py``),
so only the time differs. The ratio is ``sequential / population``.

Model: the demo student's shape D1-A2-H128-I256 with the MiniLM teacher's vocabulary (30,522
ids, BERT family), random weights; a synthetic binary task (does token 1000 occur?), 512
train and 128 dev rows of 64 tokens; batch 8, K=4 seeds, 60 steps, Adam without bias
correction. Results: ``benchmarks/results/finetune.json``.

Measured on the shared 2-core CPU (load average 6-7): the 4 separate runs 154.9 s, the
population 35.8 s under ``lax.map`` (4.3x) and 46.3 s under ``vmap`` (3.3x), with the same dev
accuracy for every member in all three. A cold compile of one run's train step takes 12.2 s
and of the population's 60-step train program 15.1 s, so most of the gain is the three
compiles (and dispatches) that the population does not repeat; at this size vmap adds no
throughput over running the members one after another on the CPU.

    python benchmarks/finetune.py --out benchmarks/results/finetune.json
    python benchmarks/finetune.py --steps 10 --members 2     # a quick look
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import common  # noqa: F401  (puts the repository on sys.path)
import jax
import numpy as np

from bort_jax.core import model, optim
from bort_jax.core.arch import get_model_config
from bort_jax.finetune import population as pop_lib
from bort_jax.finetune import setup, steps

VOCAB, SEQ, ARCH = 30522, 64, "D1-A2-H128-I256"


def make_data(n: int, seed: int) -> dict:
  """A binary task over random token rows: label 1 when token 1000 occurs."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1010, VOCAB, size=(n, SEQ)).astype(np.int32)
  lengths = rng.integers(SEQ // 2, SEQ + 1, size=n)
  positive = rng.random(n) < 0.5
  where = rng.integers(1, SEQ // 2 - 1, size=n)
  ids[positive, where[positive]] = 1000
  ids[:, 0] = 101
  ids[np.arange(n), lengths - 1] = 102
  mask = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask > 0, ids, 0).astype(np.int32)
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
          "label": positive.astype(np.int32), "weight": np.ones(n, np.float32)}


def sequential(config, members, settings, train, dev, body) -> dict:
  """K runs one after another, each compiling its own steps (as separate processes would)."""
  t0 = time.perf_counter()
  accuracy = []
  n = len(train["label"])
  for member in members:
    jax.clear_caches()
    cfg = steps.StepConfig(config, "classification", 2, settings.total_steps)
    tx = optim.make_direction(settings.direction_config())
    state = steps.init_state(setup.init_params(config, cfg.head, member.seed, body), tx)
    step = jax.jit(functools.partial(steps.train_step, cfg=cfg, tx=tx))
    evaluate = jax.jit(functools.partial(steps.eval_step, cfg=cfg))
    hp = steps.hparams(member.lr, member.weight_decay, member.warmup)
    rng = pop_lib.dropout_key(member.seed)
    for t in range(settings.total_steps):
      rows = pop_lib.batch_indices(member.seed, t, n, settings.batch_size)
      batch = {k: v[np.maximum(rows, 0)] for k, v in train.items()}
      batch["weight"] = batch["weight"] * (rows >= 0)
      state, _ = step(state, batch, rng, hp)
    logits = []
    for start in range(0, len(dev["label"]), settings.eval_batch_size):
      batch = {k: v[start:start + settings.eval_batch_size] for k, v in dev.items()}
      logits.append(np.asarray(evaluate(state.params, batch)["logits"]))
    preds = np.argmax(np.concatenate(logits), axis=-1)
    accuracy.append(float(np.mean(preds == dev["label"])))
  return {"seconds": time.perf_counter() - t0, "dev_accuracy": accuracy}


def population(config, members, settings, train, dev, body) -> dict:
  """The same members as one population (one set of programs)."""
  jax.clear_caches()
  pop_lib.get_population.cache_clear()
  t0 = time.perf_counter()
  result = pop_lib.train_population(config, "classification", 2, members, settings, train, dev,
                                    pop_lib.accuracy_scorer(dev), init_params=body)
  return {"seconds": time.perf_counter() - t0,
          "dev_accuracy": [m["accuracy"] for m in result.metrics]}


def compile_seconds(config, members, settings, train, dev, body) -> dict:
  """Cold compile time of one separate run's programs and of the population's programs."""
  jax.clear_caches()
  cfg = steps.StepConfig(config, "classification", 2, settings.total_steps)
  tx = optim.make_direction(settings.direction_config())
  state = steps.init_state(setup.init_params(config, cfg.head, 0, body), tx)
  batch = {k: v[:settings.batch_size] for k, v in train.items()}
  t0 = time.perf_counter()
  jax.jit(functools.partial(steps.train_step, cfg=cfg, tx=tx)).lower(
      state, batch, jax.random.key(0), steps.hparams(1e-4, 0.0, 0.0)).compile()
  single = time.perf_counter() - t0
  jax.clear_caches()
  pop = pop_lib.Population(config, "classification", 2, settings)
  # pylint: disable=protected-access  (the population's own programs, lowered cold)
  arrays = pop_lib._member_arrays(members)
  abstract = jax.eval_shape(pop._init_program, arrays, body)
  k, s, b = len(members), settings.total_steps, settings.batch_size
  t0 = time.perf_counter()
  pop._train.lower(abstract, arrays, np.zeros((k, s, b), np.int32), np.ones(s, bool),
                   {key: jax.numpy.asarray(v) for key, v in train.items()}).compile()
  return {"one_run_train_step": single, "population_train_program": time.perf_counter() - t0}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--members", type=int, default=4)
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--modes", default="map")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  jax.config.update("jax_default_matmul_precision", "highest")
  config = get_model_config(ARCH, family="bert", vocab_size=VOCAB)
  body = model.init(jax.random.key(7), config, model.HeadSpec("mlm"))  # stands in for a student
  train, dev = make_data(512, 0), make_data(128, 1)
  members = pop_lib.grid([1e-3], seeds=range(args.members))
  result = {"machine": common.machine_info(), "model": ARCH, "vocab": VOCAB, "seq_len": SEQ,
            "members": args.members, "steps": args.steps, "batch_size": 8,
            "train_rows": 512, "dev_rows": 128}
  for mode in args.modes.split(","):
    settings = pop_lib.Settings(total_steps=args.steps, batch_size=8, mode=mode)
    common.log(f"population ({mode})")
    result[f"population_{mode}"] = population(config, members, settings, train, dev, body)
  settings = pop_lib.Settings(total_steps=args.steps, batch_size=8, mode="map")
  common.log("sequential runs")
  result["sequential"] = sequential(config, members, settings, train, dev, body)
  common.log("compile times")
  result["compile_seconds"] = compile_seconds(config, members, settings, train, dev, body)
  for mode in args.modes.split(","):
    result[f"ratio_sequential_over_population_{mode}"] = (
        result["sequential"]["seconds"] / result[f"population_{mode}"]["seconds"])
  result["load_average_1m_after"] = common.machine_info()["load_average_1m"]
  common.write_json(result, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
