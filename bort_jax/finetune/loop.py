"""``bort-jax finetune``: one loop for every task kind, from any checkpoint, resumable.

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

import dataclasses
import functools
import json
import logging
import math
import os
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from bort_jax.core import model, optim
from bort_jax.core.arch import ModelConfig
from bort_jax.finetune import casts
from bort_jax.finetune import metrics as metrics_lib
from bort_jax.finetune import setup as setup_lib
from bort_jax.finetune import steps
from bort_jax.finetune import submission
from bort_jax.finetune import tasks as tasks_lib
from bort_jax.interop import export as export_lib
from bort_jax.runtime import checkpoint, fileio, preemption, sharding, train

log = logging.getLogger(__name__)

BEST_DIR = "best"
RESULTS_FILE = "results.json"


# ----------------------------------------------------------------------------- data


def train_batch(spec: tasks_lib.TaskSpec, examples: Sequence[casts.Example], tokenizer: Any,
                seq_len: int, batch_size: int, seed: int, step: int,
                process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
  """This process's rows of the global train batch of ``step`` (random access by step).

  Epoch ``e = step // ceil(n / batch_size)`` visits the examples in the order
  ``default_rng([seed, e]).permutation(n)``; a final partial batch is padded with weight-0
  rows, so every example is seen once per epoch.
  """
  n = len(examples)
  per_epoch = max(1, math.ceil(n / batch_size))
  epoch, index = divmod(int(step), per_epoch)
  order = np.random.default_rng([int(seed), epoch]).permutation(n)
  chunk = [examples[k] for k in order[index * batch_size:(index + 1) * batch_size]]
  return next(tasks_lib.batch_examples(spec, chunk, tokenizer, seq_len, batch_size,
                                       process_index=process_index,
                                       process_count=process_count))


@dataclasses.dataclass
class Split:
  """One split, read and cast: ``records`` (for decoding and submissions) and ``examples``."""

  task: tasks_lib.TaskSpec
  name: str
  records: Sequence[Any]
  examples: list


def read_split(spec: tasks_lib.TaskSpec, split: str, data_dir: str | None, download: bool,
               labelled: bool = True, limit: int = 0) -> Split:
  """Loads and casts one split, checking its labels (``labelled=False``: -1 allowed).

  ``limit`` > 0 keeps ``limit`` records spread evenly over the split (positions
  ``round(linspace(0, n - 1, limit))``): a cheaper dev score on a small machine, the same
  records every time, and not the first ones, since a split kept in file order can be sorted
  (the demo's movie_sentiment dev split starts with 88% positive reviews in its first 500).
  """
  try:
    records = tasks_lib.load_split(spec, split, data_dir or None, download=download)
  except ValueError as error:
    raise setup_lib.InputError(str(error)) from None
  if limit and limit < len(records):
    records = [records[int(i)] for i in np.linspace(0, len(records) - 1, int(limit)).round()]
  examples = tasks_lib.cast_split(spec, records)
  setup_lib.check_labels(spec, examples, split, allow_unlabeled=not labelled)
  return Split(spec, split, records, examples)


# ----------------------------------------------------------------------------- compiled steps


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
  rows = {"example_id": [], "candidate": [], "weight": [], "logits": []}
  for local in tasks_lib.batch_examples(split.task, split.examples, tokenizer, seq_len,
                                        batch_size, process_index=jax.process_index(),
                                        process_count=jax.process_count()):
    batch = sharding.global_batch(local, mesh)
    out = compiled.eval_step(params, batch)
    got = sharding.host_get({"logits": out["logits"],
                             **{k: batch[k] for k in rows if k != "logits"}})
    for key in rows:
      rows[key].append(np.asarray(got[key]))
  cat = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in rows.items()}
  preds = tasks_lib.gather_predictions(split.task, split.records, cat["example_id"],
                                       cat["candidate"], cat["logits"], cat["weight"])
  return preds, cat["logits"][cat["weight"] > 0]


def score(spec: tasks_lib.TaskSpec, preds: tasks_lib.Predictions) -> dict[str, float]:
  """The task's official metrics of labelled predictions."""
  return metrics_lib.compute_metrics(spec.name, preds.predictions, preds.labels, preds.groups)


# ----------------------------------------------------------------------------- best model


def save_finetuned(path: str, params: Any, config: ModelConfig, meta: dict,
                   tokenizer_path: str) -> None:
  """Writes a fine-tuned model: our export, ``finetune.json`` and the tokenizer, atomically."""
  if jax.process_index() != 0:
    return
  with fileio.atomic_dir(path) as tmp:
    export_lib.save_with_head(tmp, params, config, meta)
    setup_lib.copy_tokenizer(tokenizer_path, os.path.join(tmp, setup_lib.TOKENIZER_DIR))


def read_best(workdir: str) -> dict | None:
  """``finetune.json`` of ``WORKDIR/best`` (``step``, ``metric``, ``value``, ...) or None."""
  return export_lib.read_head(os.path.join(workdir, BEST_DIR))


def head_meta(spec: tasks_lib.TaskSpec, seq_len: int, head: model.HeadSpec) -> dict:
  """What ``evaluate`` / ``predict`` need to know about a fine-tuned head."""
  return {"task": spec.name, "kind": spec.kind, "num_labels": spec.num_labels,
          "label_names": list(spec.label_names), "seq_len": seq_len, "layout": head.layout}


class Tracker:
  """Keeps the best dev score, saves ``WORKDIR/best`` and decides early stopping.

  The state is ``best/finetune.json`` plus the step, so a resumed run continues exactly.
  """

  def __init__(self, workdir: str, spec: tasks_lib.TaskSpec, patience: int, eval_every: int):
    self.workdir, self.spec = workdir, spec
    self.metric = spec.metrics[0]
    self.patience, self.eval_every = int(patience), int(eval_every)
    self.best = read_best(workdir)
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
    better = self.best is None or (math.isfinite(value) and
                                   not value <= float(self.best["value"]))
    if better:
      self.best = {"step": int(step), "metric": self.metric, "value": value,
                   "dev": dict(scores)}
      save(self.best)
    self.stopped = self.stale(step)
    return better


def place(tree: Any, shardings: Any) -> Any:
  """Puts a host pytree onto global shardings, each process writing only its own shards."""
  host = jax.tree.map(np.asarray, tree)
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]),
                      host, shardings)


@dataclasses.dataclass
class Prepared:
  """Everything checked and read before compiling (returned for tests and notebooks)."""

  spec: tasks_lib.TaskSpec
  loaded: setup_lib.Loaded
  params: Any
  layout: str | None
  tokenizer: Any
  tokenizer_path: str
  train: Split
  dev: list
  mesh: Any
  rules: tuple
  total_steps: int


def prepare(config: ml_collections.ConfigDict) -> Prepared:
  """Every input check of a fine-tuning run (task, splits, labels, checkpoint, head,
  tokenizer, batch over the mesh); nothing is compiled.

  Raises:
    setup.InputError: bad input, with a one-paragraph message.
  """
  spec = setup_lib.resolve_task(config.task)
  setup_lib.check_trainable(spec)
  loaded = setup_lib.load_model(config.init.path, config.init.get("kind", "auto"),
                                int(config.seed))
  params, layout = setup_lib.fit_head(loaded, spec, bool(config.init.get("reset_head", False)))
  tok_path = setup_lib.tokenizer_dir(loaded.path, config.get("tokenizer", ""))
  tokenizer = setup_lib.load_tokenizer(tok_path, loaded.config)
  if not 2 <= int(config.seq_len) <= loaded.config.max_length:
    raise setup_lib.InputError(f"config.seq_len={config.seq_len} must be in 2.."
                               f"{loaded.config.max_length} (the model's positions).")
  data_dir = os.path.expanduser(config.get("data_dir", "") or "") or None
  download = bool(config.get("download", False))
  train_split = read_split(spec, spec.train_split, data_dir, download)
  if not train_split.examples:
    raise setup_lib.InputError(f"task {spec.name!r}: the train split is empty.")
  limit = int(config.get("max_dev_examples", 0) or 0)
  if limit < 0:
    raise setup_lib.InputError(f"config.max_dev_examples={limit} must be >= 0 (0 = all).")
  dev = [read_split(spec, s, data_dir, download, limit=limit) for s in spec.validation_splits]
  mesh = sharding.make_mesh(dict(config.mesh))
  for field in ("batch_size", "eval_batch_size"):
    try:
      sharding.check_batch_size(int(config[field]), mesh)
    except ValueError as error:
      raise setup_lib.InputError(f"config.{field}: {error}") from None
  rules = tuple(sharding.rules_from_config(config.get("rules")))
  total = int(config.train.total_steps) or int(config.train.epochs) * max(
      1, math.ceil(len(train_split.examples) / int(config.batch_size)))
  return Prepared(spec, loaded, params, layout, tokenizer, tok_path, train_split, dev, mesh,
                  rules, total)


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
  if "agora" in config and config.agora.enabled:  # Agora: rounds of populations
    from bort_jax.finetune import agora  # pylint: disable=import-outside-toplevel
    return agora.run(config, workdir)
  if "population" in config and config.population.seeds:  # seeds x settings at once
    from bort_jax.finetune import population_mode  # pylint: disable=import-outside-toplevel
    return population_mode.run(config, workdir)
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
    meta = dict(head_meta(spec, int(config.seq_len), cfg.head), init=prep.loaded.path,
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
      fileio.atomic_write_text(os.path.join(workdir, RESULTS_FILE),
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
    save = lambda best: save_finetuned(
        os.path.join(workdir, BEST_DIR), sharding.host_get(state.params), prep.loaded.config,
        dict(meta, **best), prep.tokenizer_path)
    tracker.update(step, scores, save)
    sharding.barrier("bort_jax.finetune.best")
    return scores

  return eval_fn


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


def finish(prep: Prepared, compiled: Compiled, config: Any, workdir: str, best: dict) -> dict:
  """Scores the best model on every dev split and predicts every test split.

  Returns:
    ``{"task", "best_step", "metric", "dev": {split: scores}, "test": {task:split: scores or
    {}}, "files": [...], "skipped": {task:split: why}}``.
  """
  _, params = export_lib.load(os.path.join(workdir, BEST_DIR))
  params = place(params, compiled.param_shardings)
  seq_len, batch = int(config.seq_len), int(config.eval_batch_size)
  run = lambda split: predict_split(params, compiled, split, prep.tokenizer, seq_len, batch,
                                    prep.mesh)[0]
  out = {"task": prep.spec.name, "best_step": best["step"], "metric": best["metric"],
         "dev": {s.name: score(prep.spec, run(s)) for s in prep.dev}, "test": {},
         "files": [], "skipped": {}}
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
