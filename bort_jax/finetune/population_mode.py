"""``bort-jax finetune ...,seeds=N[,lrs=A/B]``: one task's grid as a population, from a config.

The mode over the engine of ``finetune/population.py``: it reads the grid and the shared
settings from a ``configs/finetune.py`` config, prepares the task through ``loop.prepare`` (the
same checks and data as a single run), trains and scores the population, and writes
``population.json`` (per setting: mean, sample std, best and every seed's value, with the
majority-class floor on the same dev examples) and, when asked, the best member as a
fine-tuned model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from bort_jax.finetune import casts
from bort_jax.finetune import metrics as metrics_lib
from bort_jax.finetune import population as engine
from bort_jax.finetune import steps
from bort_jax.finetune import tasks as tasks_lib
from bort_jax.finetune.members import Member, Settings, format_table, grid, summarize
from bort_jax.runtime import fileio


def majority_scores(spec: tasks_lib.TaskSpec, train_examples: Sequence[casts.Example],
                    dev_examples: Sequence[casts.Example]) -> dict:
  """The dev metrics of always answering the train split's most frequent label.

  The floor a fine-tuned model must clear: the majority class of a classification task, the
  most frequent correct choice of a multiple-choice one, scored on the same dev examples as
  the model. Regression and candidate tasks have no such floor (``{}``).
  """
  if spec.kind not in ("classification", "multiple_choice") or not dev_examples:
    return {}
  labels = [int(e.label) for e in train_examples if int(e.label) >= 0]
  if not labels:
    return {}
  majority = int(np.bincount(labels).argmax())
  gold = [int(e.label) for e in dev_examples]
  return {k: float(v) for k, v in metrics_lib.compute_metrics(
      spec.name, [majority] * len(gold), gold).items()}



def members_from_config(config: Any) -> list[Member]:
  """``config.population``'s grid; an empty field takes the single value of ``config.optim``."""
  pop = config.population
  seeds = pop.seeds
  seeds = list(range(int(seeds))) if isinstance(seeds, int) else [int(s) for s in seeds]
  return grid(list(pop.lrs) or [config.optim.lr], seeds or [int(config.seed)],
              list(pop.weight_decays) or [config.optim.weight_decay],
              list(pop.warmups) or [config.optim.warmup])


def settings_from_config(config: Any, total_steps: int, mode: str = "auto") -> Settings:
  """The shared :class:`Settings` of a ``configs/finetune.py`` config."""
  return Settings(total_steps=int(total_steps), batch_size=int(config.batch_size),
                  optimizer=config.optim.name, b1=float(config.optim.b1),
                  b2=float(config.optim.b2), eps=float(config.optim.eps),
                  clip_norm=float(config.optim.clip_norm or 0.0),
                  eval_every=int(config.train.eval_every),
                  eval_batch_size=int(config.eval_batch_size), mode=mode)


def best_setting(population: Mapping[str, Any]) -> dict | None:
  """The setting of ``population.json`` with the best finite mean dev metric, or None."""
  metric = population.get("metric")
  rows = [r for r in population.get("settings", [])
          if isinstance((r.get(metric) or {}).get("mean"), (int, float))
          and math.isfinite(r[metric]["mean"])]
  return max(rows, key=lambda r: r[metric]["mean"]) if rows else None


def save_best(prep: Any, config: Any, result: engine.Result, path: str) -> None:
  """Writes the member of best dev score as a fine-tuned model (``loop.save_finetuned``).

  The member is the one whose first metric is highest after its last step (the first such
  in member order); ``finetune.json`` names it with its score, so Agora (or ``evaluate``)
  loads it with its head.
  """
  from bort_jax.finetune import loop  # pylint: disable=import-outside-toplevel  (loop calls us)
  metric = prep.spec.metrics[0]
  values = [m.get(metric, float("nan")) for m in result.metrics]
  finite = [i for i, v in enumerate(values) if math.isfinite(v)]
  if not finite:
    print(f"population: no member has a finite dev {metric}; {path} not written")
    return
  best = max(finite, key=lambda i: values[i])
  kind = "classification" if prep.spec.kind == "candidates" else prep.spec.kind
  head = steps.StepConfig(prep.loaded.config, kind, prep.spec.num_labels, prep.total_steps,
                          prep.layout).head
  meta = dict(loop.head_meta(prep.spec, int(config.seq_len), head), init=prep.loaded.path,
              init_kind=prep.loaded.kind, member=dataclasses.asdict(result.members[best]),
              step=prep.total_steps, metric=metric, value=values[best])
  loop.save_finetuned(path, jax.device_get(result.params(best)), prep.loaded.config, meta,
                      prep.tokenizer_path)


def run(config: Any, workdir: str) -> dict:
  """``bort-jax finetune ...,seeds=N[,lrs=A/B]``: the grid as one population on one task.

  Inputs are checked by ``loop.prepare`` (exit status 2 before compiling). Writes
  ``population.json`` (per-setting mean, std, best and every seed's value, plus the dev
  history) and checkpoints the population in ``workdir/population`` (resumable).

  Returns:
    ``{"task", "dev_split", "metric", "dev_records", "majority", "settings":
    summarize(...), "seconds"}``; ``population.json`` adds ``max_dev_examples``,
    ``total_steps`` and the dev history.
  """
  from bort_jax.finetune import loop  # pylint: disable=import-outside-toplevel  (loop calls us)
  prep = loop.prepare(config)
  spec, seq_len, dev_split = prep.spec, int(config.seq_len), prep.dev[0]
  members = members_from_config(config)
  settings = settings_from_config(config, prep.total_steps, config.population.mode)
  train = engine.encode_examples(spec, prep.train.examples, prep.tokenizer, seq_len)
  dev = engine.encode_examples(spec, dev_split.examples, prep.tokenizer, seq_len)
  result = engine.train_population(prep.loaded.config, spec.kind, spec.num_labels, members,
                                   settings, train, dev,
                                   engine.task_scorer(spec, dev_split.records, dev),
                                   init_params=prep.params, layout=prep.layout, workdir=workdir,
                                   report=print)
  if config.population.get("save_best"):
    save_best(prep, config, result, os.path.join(workdir, loop.BEST_DIR))
  rows = summarize(members, result.metrics)
  out = {"task": spec.name, "dev_split": dev_split.name, "metric": spec.metrics[0],
         "dev_records": len(dev_split.records),
         "max_dev_examples": int(config.get("max_dev_examples", 0) or 0),
         "majority": majority_scores(spec, prep.train.examples, dev_split.examples),
         "total_steps": prep.total_steps, "settings": rows, "history": result.history,
         "seconds": result.seconds}
  fileio.atomic_write_text(os.path.join(workdir, "population.json"),
                           json.dumps(fileio.to_jsonable(out), indent=2) + "\n")
  print(format_table(rows, spec.metrics[0]))
  return {k: out[k] for k in ("task", "dev_split", "metric", "dev_records", "majority",
                              "settings", "seconds")}
