"""``bort-jax finetune ...,seeds=N[,lrs=A/B]``: one task's grid as a population, from a config.

The mode over the engine of ``finetune/population.py``: it reads the grid and the shared
settings from a ``configs/finetune.py`` config, prepares the task through ``prepare.prepare``
(the same checks and data as a single run), trains and scores the population, and writes
``population.json`` (per setting: mean, sample std, best and every seed's value, with the
majority-class floor on the same dev examples) and, when asked, the best member as a
fine-tuned model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import jax

from bort_jax.finetune import casts
from bort_jax.finetune import metrics as metrics_lib
from bort_jax.finetune import population as engine
from bort_jax.finetune import setup as setup_lib
from bort_jax.finetune import steps
from bort_jax.finetune import tasks as tasks_lib
from bort_jax.finetune.members import (best_index, format_table, members_from_config,
                                       settings_from_config, summarize)
from bort_jax.finetune.prepare import prepare
from bort_jax.runtime import fileio, rundir


def baseline_of(spec: tasks_lib.TaskSpec, train_examples: Sequence[casts.Example],
                dev_examples: Sequence[casts.Example]) -> dict:
  """``metrics.baseline`` of the train split's labels on the dev examples the members are
  scored on (``{}`` for a task without such a floor)."""
  if not dev_examples:
    return {}
  return metrics_lib.baseline(spec.name, [e.label for e in train_examples],
                              [e.label for e in dev_examples])


def best_setting(population: Mapping[str, Any]) -> dict | None:
  """The setting of ``population.json`` with the best finite mean dev metric, or None."""
  metric = population.get("metric")
  rows = [r for r in population.get("settings", [])
          if isinstance((r.get(metric) or {}).get("mean"), (int, float))]
  best = best_index([r[metric]["mean"] for r in rows])
  return None if best is None else rows[best]


def save_best(prep: Any, config: Any, result: engine.Result, path: str) -> None:
  """Writes the member of best dev score as a fine-tuned model (``setup.save_finetuned``).

  The member is the one whose first metric is highest after its last step (the first such
  in member order); ``finetune.json`` names it with its score, so Agora (or ``evaluate``)
  loads it with its head.
  """
  metric = prep.spec.metrics[0]
  values = [m.get(metric, float("nan")) for m in result.metrics]
  best = best_index(values)
  if best is None:
    print(f"population: no member has a finite dev {metric}; {path} not written")
    return
  kind = "classification" if prep.spec.kind == "candidates" else prep.spec.kind
  head = steps.StepConfig(prep.loaded.config, kind, prep.spec.num_labels, prep.total_steps,
                          prep.layout).head
  meta = dict(setup_lib.head_meta(prep.spec, int(config.seq_len), head), init=prep.loaded.path,
              init_kind=prep.loaded.kind, member=dataclasses.asdict(result.members[best]),
              step=prep.total_steps, metric=metric, value=values[best])
  setup_lib.save_finetuned(path, jax.device_get(result.params(best)), prep.loaded.config, meta,
                      prep.tokenizer_path)


def run(config: Any, workdir: str) -> dict:
  """``bort-jax finetune ...,seeds=N[,lrs=A/B]``: the grid as one population on one task.

  Inputs are checked by ``prepare.prepare`` (exit status 2 before compiling). Writes
  ``population.json`` (per-setting mean, std, best and every seed's value, plus the dev
  history) and checkpoints the population in ``workdir/population`` (resumable).

  Returns:
    ``{"task", "dev_split", "metric", "dev_records", "majority", "baseline", "settings":
    summarize(...), "seconds"}``: ``baseline`` is ``metrics.baseline`` on the dev records
    (the majority class or the training mean), ``majority`` its scores when it is the
    majority class; ``population.json`` adds ``max_dev_examples``, ``total_steps`` and the dev
    history.
  """
  prep = prepare(config)
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
    save_best(prep, config, result, rundir.best_dir(workdir))
  rows = summarize(members, result.metrics)
  floor = baseline_of(spec, prep.train.examples, dev_split.examples)
  out = {"task": spec.name, "dev_split": dev_split.name, "metric": spec.metrics[0],
         "dev_records": len(dev_split.records),
         "max_dev_examples": int(config.get("max_dev_examples", 0) or 0),
         "majority": floor.get("scores", {}) if floor.get("answer") == "majority class" else {},
         "baseline": floor,
         "total_steps": prep.total_steps, "settings": rows, "history": result.history,
         "seconds": result.seconds}
  fileio.atomic_write_text(os.path.join(workdir, rundir.POPULATION),
                           json.dumps(fileio.to_jsonable(out), indent=2) + "\n")
  print(format_table(rows, spec.metrics[0]))
  return {k: out[k] for k in ("task", "dev_split", "metric", "dev_records", "majority",
                              "baseline", "settings", "seconds")}
