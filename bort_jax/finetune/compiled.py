"""One model's jitted steps (train, eval, init) with their shardings, and their use on a split.

Shared by the single-model loop (``loop.py``) and ``bort-jax evaluate``: the compiled steps are
cached per (model config, task head, run length, optimizer, mesh), and :func:`predict_split`
turns a split into scored units with the task's official metrics (:func:`score`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable

import jax
import numpy as np

from bort_jax.core import model, optim
from bort_jax.finetune import metrics as metrics_lib
from bort_jax.finetune import steps
from bort_jax.finetune import tasks as tasks_lib
from bort_jax.finetune.prepare import Split
from bort_jax.runtime import fileio, sharding, train


@dataclasses.dataclass(frozen=True)
class Compiled:
  """The jitted steps of one (model, task head, run length, mesh)."""

  train_step: Callable
  eval_step: Callable
  init_state: Callable
  tx: Any
  state_shardings: Any
  param_shardings: Any


def direction_key(optim_cfg: Any) -> tuple:
  """The optimizer fields a compiled step depends on, hashable (for :func:`compile_steps`)."""
  return tuple((k, optim_cfg.get(k, d)) for k, d in (
      ("name", "adam_nobc"), ("b1", 0.9), ("b2", 0.999), ("eps", 1e-6), ("clip_norm", 1.0)))


@functools.lru_cache(maxsize=16)
def compile_steps(cfg: steps.StepConfig, direction: tuple, mesh: Any, rules: tuple) -> Compiled:
  """Jits :func:`steps.train_step` and :func:`steps.eval_step` with shardings (cached).

  Runs sharing (model config, task kind, labels, run length, optimizer, mesh) share one
  compilation; the hyperparameters are inputs, not constants.
  """
  tx = optim.make_direction(dict(direction))
  specs = model.logical_axes(cfg.model, cfg.head)
  param_sh = sharding.logical_to_shardings(specs, mesh, rules)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), cfg.model, cfg.head))
  sharding.check_divisible(abstract, param_sh, what=f"model ({cfg.model.arch}) parameter")
  abstract_state = jax.eval_shape(lambda p: steps.init_state(p, tx), abstract)
  treedef = jax.tree_util.tree_structure(abstract)
  rep = sharding.replicated(mesh)
  state_sh = train.TrainState(step=rep, params=param_sh, opt_state=sharding.tree_shardings_like(
      abstract_state.opt_state, treedef, param_sh, mesh))
  train_fn = jax.jit(functools.partial(steps.train_step, cfg=cfg, tx=tx),
                     in_shardings=(state_sh, None, rep, rep), out_shardings=(state_sh, rep),
                     donate_argnums=(0,))
  eval_fn = jax.jit(functools.partial(steps.eval_step, cfg=cfg),
                    in_shardings=(param_sh, None))
  init_fn = jax.jit(lambda p: steps.init_state(p, tx), out_shardings=state_sh)
  return Compiled(train_fn, eval_fn, init_fn, tx, state_sh, param_sh)


def predict_split(params: Any, compiled: Compiled, split: Split, tokenizer: Any, seq_len: int,
                  batch_size: int, mesh: Any) -> tuple[tasks_lib.Predictions, np.ndarray]:
  """Dropout-free model outputs on a split, grouped back into scored units.

  Returns:
    ``(tasks.Predictions, logits of every real row in example order)``.
  """

  def run_batch(local):
    batch = sharding.global_batch(local, mesh)
    out = compiled.eval_step(params, batch)
    return sharding.host_get({"logits": out["logits"],
                              **{k: batch[k] for k in ("example_id", "candidate", "weight")}})

  return split_outputs(split, run_batch, tokenizer, seq_len, batch_size)


def split_outputs(split: Split, run_batch: Callable[[dict], dict], tokenizer: Any, seq_len: int,
                  batch_size: int) -> tuple[tasks_lib.Predictions, np.ndarray]:
  """A split scored by any forward: ``run_batch(this process's batch)`` returns host arrays
  ``logits``, ``example_id``, ``candidate`` and ``weight`` of the whole (global) batch.

  Returns:
    ``(tasks.Predictions, logits of every real row in example order)``.
  """
  rows = {"example_id": [], "candidate": [], "weight": [], "logits": []}
  for local in tasks_lib.batch_examples(split.task, split.examples, tokenizer, seq_len,
                                        batch_size, process_index=jax.process_index(),
                                        process_count=jax.process_count()):
    got = run_batch(local)
    for key in rows:
      rows[key].append(np.asarray(got[key]))
  cat = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in rows.items()}
  preds = tasks_lib.gather_predictions(split.task, split.records, cat["example_id"],
                                       cat["candidate"], cat["logits"], cat["weight"])
  return preds, cat["logits"][cat["weight"] > 0]


def score(spec: tasks_lib.TaskSpec, preds: tasks_lib.Predictions) -> dict[str, float]:
  """The task's official metrics of labelled predictions."""
  return metrics_lib.compute_metrics(spec.name, preds.predictions, preds.labels, preds.groups)


def place(tree: Any, shardings: Any) -> Any:
  """Puts a host pytree onto global shardings, each process writing only its own shards."""
  host = jax.tree.map(np.asarray, tree)
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]),
                      host, shardings)


def diagnostics_of(spec: tasks_lib.TaskSpec) -> list[tasks_lib.TaskSpec]:
  """The diagnostic / evaluation-only tasks scored by a model fine-tuned on ``spec``."""
  return [tasks_lib.get_task(n) for n in tasks_lib.task_names()
          if tasks_lib.get_task(n).train_task == spec.name]


def write_predictions(path: str, split: Split, preds: tasks_lib.Predictions) -> None:
  """One JSON line per scored unit: record index, prediction, label name where there is one."""
  names = split.task.label_names
  lines = []
  for i, pred in zip(preds.record_index, preds.predictions):
    row = {"record": int(i), "prediction": pred}
    if split.task.kind in ("classification", "multiple_choice") and names:
      row["label"] = names[int(pred)]
    lines.append(json.dumps(fileio.to_jsonable(row)))
  fileio.atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
