"""``bort-jax finetune`` on one model: one loop for every task kind, from any checkpoint, resumable.

    bort-jax finetune --config=configs/finetune.py:task=demo/movie_sentiment --workdir=runs/ft

The run reads the task's train and dev splits (GLUE / SuperGLUE / RACE through TFDS, the demo
tasks from the offline demo suite), checks task, model, head, tokenizer and labels before
anything compiles (``setup.py``), then trains with the pure step of ``steps.py`` inside
``runtime.train.run_loop``: data-parallel batches over the mesh, dropout from
``fold_in(key(seed), step)``, batches by step number (epoch ``e`` is the permutation
``default_rng([seed, e])`` of the train examples, the last batch of an epoch padded with
weight-0 rows), checkpoints every N steps, on SIGTERM and at the end.

Every ``config.train.eval_every`` steps the dev split is scored with the task's official
metrics; a better first metric (``spec.metrics[0]``) replaces ``WORKDIR/best`` (our export
format, ``finetune.json`` with the task, head and metrics, and the tokenizer files, so
``bort-jax evaluate`` / ``predict`` need nothing else). ``config.train.patience`` evaluations
without improvement stop the run early. A rerun resumes from the workdir's checkpoint and
reaches the same parameters and metrics as an uninterrupted run; the early-stopping state is
derived from ``best/finetune.json`` and the step, so it resumes too.

At the end the best model scores every dev split (``results.json``) and predicts every test
split of the task and of the diagnostic sets scored by its model (``glue/mnli`` -> AX,
``super_glue/rte`` -> AX-b, AX-g): ``predictions/<task>/<split>.jsonl`` always, and the
leaderboard file (``submission/``: GLUE ``.tsv``, SuperGLUE ``.jsonl``) where one exists.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

import jax
import ml_collections

from bort_jax.core import model
from bort_jax.finetune import metrics as metrics_lib
from bort_jax.finetune import setup as setup_lib
from bort_jax.finetune import steps
from bort_jax.finetune import submission
from bort_jax.finetune import tasks as tasks_lib
from bort_jax.finetune.compiled import (Compiled, compile_steps, diagnostics_of, direction_key,
                                        place, predict_split, score, write_predictions)
from bort_jax.finetune.members import best_index
from bort_jax.finetune.prepare import Prepared, prepare, read_split, train_batch
from bort_jax.interop import export as export_lib
from bort_jax.runtime import checkpoint, fileio, preemption, rundir, sharding, train

log = logging.getLogger(__name__)


class Tracker:
  """Keeps the best dev score, saves ``WORKDIR/best`` and decides early stopping.

  The state is ``best/finetune.json`` plus the step, so a resumed run continues exactly.
  """

  def __init__(self, workdir: str, spec: tasks_lib.TaskSpec, patience: int, eval_every: int):
    self.workdir, self.spec = workdir, spec
    self.metric = spec.metrics[0]
    self.patience, self.eval_every = int(patience), int(eval_every)
    self.best = setup_lib.read_best(workdir)
    self.stopped = False

  def stale(self, step: int) -> bool:
    """Whether ``patience`` evaluations since the best one brought no improvement."""
    if not self.patience or self.best is None:
      return False
    return step - int(self.best["step"]) >= self.patience * self.eval_every

  def update(self, step: int, scores: dict, save: Callable[[dict], None]) -> bool:
    """Records one evaluation; saves through ``save(meta)`` when it is the best so far.

    Returns:
      Whether it was the best so far.
    """
    value = float(scores[self.metric])
    better = self.best is None or best_index([self.best["value"], value]) == 1
    if better:
      self.best = {"step": int(step), "metric": self.metric, "value": value,
                   "dev": dict(scores)}
      save(self.best)
    self.stopped = self.stale(step)
    return better


def _abstract_state(cfg: steps.StepConfig, compiled: Compiled) -> Any:
  abstract = jax.eval_shape(lambda: steps.init_state(
      model.init(jax.random.key(0), cfg.model, cfg.head), compiled.tx))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, compiled.state_shardings)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Fine-tunes per ``config`` in ``workdir`` (resuming there), then predicts the test sets.

  Args:
    config: see ``configs/finetune.py``.
    workdir: ``checkpoints/``, ``metrics.jsonl``, ``config.json``, ``best/``,
      ``results.json``, ``predictions/`` and ``submission/``.

  Returns:
    The results: best step and dev scores per split, test files written, preemption.

  Raises:
    setup.InputError: bad input, before anything is compiled.
  """
  prep = prepare(config)
  spec, seed = prep.spec, int(config.seed)
  # Candidates train a binary classifier: one compiled step with binary classification.
  kind = "classification" if spec.kind == "candidates" else spec.kind
  cfg = steps.StepConfig(prep.loaded.config, kind, spec.num_labels, prep.total_steps,
                         prep.layout)
  compiled = compile_steps(cfg, direction_key(config.optim), prep.mesh, prep.rules)
  os.makedirs(workdir, exist_ok=True)
  train.write_config(workdir, config)
  manager = checkpoint.CheckpointManager(
      os.path.join(workdir, "checkpoints"), save_interval_steps=1,
      max_to_keep=int(config.train.get("keep_checkpoints", 2)))
  stop_flag = preemption.install_preemption_handler()
  try:
    def fresh():
      params = setup_lib.init_params(cfg.model, cfg.head, seed, prep.params)
      return compiled.init_state(place(params, compiled.param_shardings))

    initial = checkpoint.resolve_initial_state(
        manager, config.get("init_from") or None, _abstract_state(cfg, compiled), fresh)
    eval_every = int(config.train.eval_every)
    tracker = Tracker(workdir, spec, int(config.train.get("patience", 0)), eval_every)
    meta = dict(setup_lib.head_meta(spec, int(config.seq_len), cfg.head), init=prep.loaded.path,
                init_kind=prep.loaded.kind, seed=seed)
    eval_fn = _make_eval_fn(prep, compiled, tracker, config, workdir, meta)
    hp = jax.device_put(steps.hparams(config.optim.lr, config.optim.weight_decay,
                                      config.optim.warmup), sharding.replicated(prep.mesh))
    get_batch = lambda step: sharding.global_batch(train_batch(
        spec, prep.train.examples, prep.tokenizer, int(config.seq_len),
        int(config.batch_size), seed, step, jax.process_index(), jax.process_count()),
        prep.mesh)
    loop = train.LoopConfig(
        total_steps=prep.total_steps, log_every=int(config.train.log_every),
        checkpoint_every=int(config.train.checkpoint_every), eval_every=eval_every,
        tokens_per_step=int(config.batch_size) * int(config.seq_len))
    start = int(sharding.host_get(initial.state.step))
    state = initial.state
    done = eval_every and start % eval_every == 0 and tracker.stale(start)
    log.info("%s: %s from %s (%s), %d steps, starting from %s at step %d", workdir, spec.name,
             prep.loaded.path, prep.loaded.kind, prep.total_steps, initial.source, start)
    if not done:
      state, _ = train.run_loop(
          state, compiled.train_step, get_batch, jax.random.key(seed), loop, frozen=hp,
          workdir=workdir, checkpointer=manager, eval_fn=eval_fn if eval_every else None,
          should_stop=lambda: stop_flag.should_stop() or tracker.stopped)
    step = int(sharding.host_get(state.step))
    if step < prep.total_steps and not tracker.stopped and not done:
      return {"task": spec.name, "step": step, "preempted": True}
    if tracker.best is None:  # no evaluation on the way (eval_every = 0): the final model
      eval_fn(state)
    results = finish(prep, compiled, config, workdir, tracker.best)
    results.update(step=step, preempted=False, early_stopped=bool(step < prep.total_steps),
                   started_from=initial.source)
    if jax.process_index() == 0:
      fileio.atomic_write_text(os.path.join(workdir, rundir.RESULTS),
                               json.dumps(fileio.to_jsonable(results), indent=2))
    return results
  finally:
    stop_flag.uninstall()
    manager.close()


def _make_eval_fn(prep: Prepared, compiled: Compiled, tracker: Tracker, config: Any,
                  workdir: str, meta: dict) -> Callable:
  """``eval_fn(state) -> dev scores`` that also keeps the best model."""

  def eval_fn(state):
    preds, _ = predict_split(state.params, compiled, prep.dev[0], prep.tokenizer,
                             int(config.seq_len), int(config.eval_batch_size), prep.mesh)
    scores = score(prep.spec, preds)
    step = int(sharding.host_get(state.step))
    save = lambda best: setup_lib.save_finetuned(
        rundir.best_dir(workdir), sharding.host_get(state.params), prep.loaded.config,
        dict(meta, **best), prep.tokenizer_path)
    tracker.update(step, scores, save)
    sharding.barrier("bort_jax.finetune.best")
    return scores

  return eval_fn


def finish(prep: Prepared, compiled: Compiled, config: Any, workdir: str, best: dict) -> dict:
  """Scores the best model on every dev split and predicts every test split.

  Returns:
    ``{"task", "best_step", "metric", "dev": {split: scores}, "baseline": {split:
    metrics.baseline (the majority class or the training mean on the same records)}, "test":
    {task:split: scores or {}}, "files": [...], "skipped": {task:split: why}}``.
  """
  _, params = export_lib.load(rundir.best_dir(workdir))
  params = place(params, compiled.param_shardings)
  seq_len, batch = int(config.seq_len), int(config.eval_batch_size)
  run = lambda split: predict_split(params, compiled, split, prep.tokenizer, seq_len, batch,
                                    prep.mesh)[0]
  dev = {s.name: run(s) for s in prep.dev}
  train_labels = [e.label for e in prep.train.examples]
  out = {"task": prep.spec.name, "best_step": best["step"], "metric": best["metric"],
         "dev": {name: score(prep.spec, preds) for name, preds in dev.items()},
         "baseline": {name: metrics_lib.baseline(prep.spec.name, train_labels, preds.labels,
                                                 preds.groups)
                      for name, preds in dev.items()},
         "test": {}, "files": [], "skipped": {}}
  for name, floor in out["baseline"].items():
    if floor and jax.process_index() == 0:
      shown = ", ".join(f"{k} {out['dev'][name][k]:.4f} ({floor['answer']} {v:.4f})"
                        for k, v in floor["scores"].items())
      print(f"dev {name}: {shown}", flush=True)
  if not config.get("predict_test", True):
    return out
  data_dir = os.path.expanduser(config.get("data_dir", "") or "") or None
  for spec in [prep.spec] + diagnostics_of(prep.spec):
    for name in spec.test_splits:
      key = f"{spec.name}:{name}"
      try:
        split = read_split(spec, name, data_dir, bool(config.get("download", False)),
                           labelled=False)
      except (setup_lib.InputError, OSError) as error:  # a diagnostic set not downloaded
        out["skipped"][key] = str(error).splitlines()[0]
        continue
      preds = run(split)
      labelled = all(not isinstance(x, (int, float)) or x != -1 for x in preds.labels)
      out["test"][key] = {}
      if labelled and preds.labels:  # RACE and the diagnostic sets carry test labels
        try:
          out["test"][key] = score(spec, preds)
        except ValueError as error:  # e.g. AX-g records that do not form pairs
          out["skipped"][key] = f"metrics: {error}"
      if jax.process_index() != 0:
        continue
      path = os.path.join(workdir, "predictions", spec.name.replace("/", "_"), f"{name}.jsonl")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      write_predictions(path, split, preds)
      out["files"].append(path)
      try:
        file_name = submission.submission_file_name(spec.name, name)
      except ValueError:
        continue  # RACE and the demo tasks have no leaderboard file
      if file_name not in {os.path.basename(f) for f in out["files"]}:
        out["files"].append(submission.write_submission(
            spec.name, split.records, preds.predictions, os.path.join(workdir, "submission"),
            name))
  return out
