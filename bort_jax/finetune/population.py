"""Seeds x learning rates of one task, fine-tuned as one population in one compiled program.

Fine-tuning small BERTs is noisy (docs/BORT.md section 5: the authors ran seeds 0-4 over a grid of
learning rates and weight decays), so one number per setting is not a result. Here K seeds x L
hyperparameter settings are *members* of one population: every member carries its own
``lr``, ``weight_decay``, ``warmup`` (fraction of the run) and ``seed`` as data, so the whole
grid shares one compiled program per phase (initialise, train a chunk of steps, evaluate).
Members run under ``jax.vmap`` on accelerators and under ``jax.lax.map`` on a CPU (one member
after another inside the same program: vmap adds no throughput on a small CPU, see
``benchmarks/results/finetune.json``); ``mode`` chooses.

What a member is, exactly: what ``loop.py`` does for one model with that seed and those
hyperparameters, through the same functions, so K separate ``bort-jax finetune`` runs and one
population of K members reach the same parameters (``tests/test_population.py`` checks it to
1e-5 against ``steps.train_step`` run alone on ``prepare.train_batch``'s batches):

* initial weights: ``setup.init_params`` (the checkpoint's body, a task head from
  ``fold_in(key(seed), 2)``), traced inside the program;
* updates: ``steps.train_step`` with the member's ``steps.hparams`` as arrays; dropout from
  ``fold_in(key(seed), step)``;
* data order: ``prepare.train_batch``'s (:func:`members.batch_indices`).

Every random choice is therefore a function of (seed, step); the population runs the whole
grid on each process, so the process index does not enter. The training split is tokenised
once and lives on the device; each step gathers its members' rows by index.

Results are reported per setting as mean, standard deviation (sample, ddof=1) and best over
the seeds, with every seed's value kept (:func:`summarize`), never best-of-N alone. With a
``workdir`` the stacked population state is checkpointed after every chunk and a killed run
resumes from the last one, evaluation history included.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bort_jax.core import optim
from bort_jax.core.arch import ModelConfig
from bort_jax.core.members import over_members
from bort_jax.finetune import casts
from bort_jax.finetune import metrics as metrics_lib
from bort_jax.finetune import setup as setup_lib
from bort_jax.finetune import steps
from bort_jax.finetune import tasks as tasks_lib
from bort_jax.finetune.members import (Member, Settings, batch_indices, dropout_key,
                                       format_table, grid, init_key, summarize)
from bort_jax.runtime import train
from bort_jax.runtime.fileio import clock

__all__ = ["Member", "Settings", "batch_indices", "dropout_key", "format_table", "grid",
           "init_key", "summarize", "progress_line", "Population", "Result",
           "train_population", "check_data", "encode_examples", "task_scorer",
           "accuracy_scorer", "get_population", "job_fingerprint", "restore_finished"]

DATA_KEYS = ("input_ids", "attention_mask", "token_type_ids", "label", "weight")
Scorer = Callable[[np.ndarray], dict]


# ----------------------------------------------------------------------------- data


def check_data(data: Mapping[str, np.ndarray], kind: str, num_labels: int, name: str) -> int:
  """Checks a tokenised split; returns its number of rows.

  Raises:
    ValueError: a key is missing, the rows disagree, or a label is outside the label space.
  """
  missing = [k for k in DATA_KEYS if k not in data]
  if missing:
    raise ValueError(f"{name} split lacks {missing} (has {sorted(data)})")
  n = len(data["input_ids"])
  for key in DATA_KEYS:
    if len(data[key]) != n:
      raise ValueError(f"{name} split: {key} has {len(data[key])} rows, input_ids {n}")
  if kind != "regression":
    labels = np.asarray(data["label"])[np.asarray(data["weight"]) > 0]
    bad = labels[(labels < 0) | (labels >= num_labels)]
    if bad.size:
      raise ValueError(f"{name} split: label {int(bad[0])} is outside the label space "
                       f"0..{num_labels - 1} of this {kind} task")
  return n


def encode_examples(spec: tasks_lib.TaskSpec, examples: Sequence[casts.Example],
                    tokenizer: tasks_lib.Tokenizer, seq_len: int) -> dict[str, np.ndarray]:
  """Tokenises a whole cast split into one Task batch (docs/INTERFACES.md) of N rows."""
  if not examples:
    raise ValueError(f"task {spec.name!r}: no examples to encode")
  return next(tasks_lib.batch_examples(spec, list(examples), tokenizer, seq_len, len(examples)))


def task_scorer(spec: tasks_lib.TaskSpec, records: Sequence[Mapping], data: Mapping) -> Scorer:
  """Scores dev logits with the task's official metrics (grouped back per record).

  Args:
    spec: the task.
    records: the dev split's records.
    data: the dev split as encoded by :func:`encode_examples`.

  Returns:
    ``score(logits [N, ...]) -> {metric: value}``.
  """

  def score(logits):
    preds = tasks_lib.gather_predictions(spec, records, data["example_id"], data["candidate"],
                                         logits, data["weight"])
    return metrics_lib.compute_metrics(spec.name, preds.predictions, preds.labels, preds.groups)

  return score


def accuracy_scorer(data: Mapping) -> Scorer:
  """Plain accuracy over the weighted rows (binary tasks cast for Agora, tests)."""
  labels = np.asarray(data["label"])
  keep = np.asarray(data["weight"]) > 0

  def score(logits):
    preds = np.argmax(np.asarray(logits), axis=-1)
    return {"accuracy": float(np.mean(preds[keep] == labels[keep]))}

  return score


# ----------------------------------------------------------------------------- programs


def _member_arrays(members: Sequence[Member]) -> dict[str, Any]:
  hp = [steps.hparams(m.lr, m.weight_decay, m.warmup) for m in members]
  return {"seed": np.asarray([m.seed for m in members], np.uint32),
          "hp": {k: np.stack([np.asarray(h[k]) for h in hp]) for k in hp[0]}}


def _eval_rows(data: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """The split padded with weight-0 rows to whole batches, as ``[num_batches, B, ...]``."""
  n = len(data["input_ids"])
  nb = -(-n // batch_size)
  out = {}
  for key in ("input_ids", "attention_mask", "token_type_ids"):
    value = np.asarray(data[key])
    pad = np.repeat(value[:1], nb * batch_size - n, axis=0)
    out[key] = np.concatenate([value, pad]).reshape((nb, batch_size) + value.shape[1:])
  return out


class Population:
  """Compiled programs of one population (one model config, task head and Settings).

  Args:
    config: the model config (its arch fixes every shape).
    kind: the task kind (``tasks.KINDS``).
    num_labels: the task's ``num_labels``.
    settings: what the members share.
    layout: the task head's layout (None: the family's default).
  """

  def __init__(self, config: ModelConfig, kind: str, num_labels: int, settings: Settings,
               layout: str | None = None):
    if not settings.dropout:
      config = config.replace(dropout=0.0, attention_dropout=0.0)
    self.cfg = steps.StepConfig(config, kind, num_labels, settings.total_steps, layout)
    self.settings = settings
    self.mode = settings.resolved_mode()
    self.tx = optim.make_direction(settings.direction_config())
    self._init = jax.jit(self._init_program)
    self._train = jax.jit(self._train_program, donate_argnums=(0,))
    self._eval = jax.jit(self._eval_program)

  def _init_program(self, members, init_params):
    def one(seed, loaded):
      params = setup_lib.init_params(self.cfg.model, self.cfg.head, seed, loaded)
      return steps.init_state(params, self.tx)

    return over_members(one, self.mode, (members["seed"],), (init_params,))

  def _train_program(self, state, members, indices, active, data):
    step_fn = functools.partial(steps.train_step, cfg=self.cfg, tx=self.tx)

    def one(state, seed, hp, idx, data):
      rng = dropout_key(seed)

      def step(state, xs):
        rows, on = xs

        def run(state):
          batch = {k: jnp.take(v, jnp.maximum(rows, 0), axis=0) for k, v in data.items()}
          batch["weight"] = batch["weight"] * (rows >= 0)  # padding rows of a last batch
          state, metrics = step_fn(state, batch, rng, hp)
          return state, metrics["loss"]

        # Steps past the end of a short last chunk are skipped, so every chunk of a run
        # has the same length and shares one compiled program.
        return jax.lax.cond(on, run, lambda s: (s, jnp.zeros((), jnp.float32)), state)

      return jax.lax.scan(step, state, (idx, active))

    per = (state, members["seed"], members["hp"], indices)
    return over_members(one, self.mode, per, (data,))

  def _eval_program(self, params, rows):
    def one(params, rows):
      def batch_logits(batch):
        return steps.forward(params, batch, self.cfg)
      logits = jax.lax.map(batch_logits, rows)
      return logits.reshape((-1,) + logits.shape[2:])

    return over_members(one, self.mode, (params,), (rows,))

  def init(self, members: Sequence[Member], init_params: Any = None) -> Any:
    """The stacked state of every member at step 0."""
    return self._init(_member_arrays(members), init_params)

  def train_steps(self, state: Any, members: Sequence[Member], start: int, count: int,
                  data: Mapping[str, Any], num_rows: int, length: int = 0
                  ) -> tuple[Any, np.ndarray]:
    """Runs ``count`` steps of every member from step ``start`` (the state's step).

    Args:
      state: the stacked state.
      members: the population.
      start: the state's step.
      count: steps to run.
      data: the training split on the device.
      num_rows: its number of rows.
      length: the program's chunk length (>= count; the extra steps are skipped).

    Returns:
      The new state and the training losses ``[M, count]``.
    """
    b, length = self.settings.batch_size, max(length, count)
    idx = np.stack([np.stack([batch_indices(m.seed, start + min(t, count - 1), num_rows, b)
                              for t in range(length)]) for m in members])
    active = np.arange(length) < count
    state, step_losses = self._train(state, _member_arrays(members), idx, active, data)
    return state, np.asarray(jax.device_get(step_losses))[:, :count]

  def logits(self, params: Any, data: Mapping[str, np.ndarray]) -> np.ndarray:
    """Every member's logits on a split, ``[M, N, ...]`` (numpy)."""
    n = len(data["input_ids"])
    out = self._eval(params, _eval_rows(data, self.settings.eval_batch_size))
    return np.asarray(jax.device_get(out))[:, :n]


@functools.lru_cache(maxsize=8)
def get_population(config: ModelConfig, kind: str, num_labels: int, settings: Settings,
                   layout: str | None = None) -> Population:
  """A cached :class:`Population`, so runs of the same shape reuse its compiled programs."""
  return Population(config, kind, num_labels, settings, layout)


# ----------------------------------------------------------------------------- the driver


@dataclasses.dataclass
class Result:
  """What :func:`train_population` returns.

  Attributes:
    members: the members, in order.
    metrics: each member's dev metrics after its last step.
    history: ``{"step", "metrics": [per member]}`` for every evaluation, in order.
    train_loss: ``[M]`` mean training loss over each member's last chunk.
    state: the stacked final state (leading axis M).
    dev_logits: ``[M, N, ...]`` every member's dev logits after its last step.
    seconds: wall time of this call (compiles included).
  """

  members: list[Member]
  metrics: list[dict]
  history: list[dict]
  train_loss: np.ndarray
  state: Any
  dev_logits: np.ndarray | None
  seconds: float

  def params(self, index: int) -> Any:
    """The final parameters of member ``index`` (device arrays)."""
    return jax.tree.map(lambda x: x[index], self.state.params)


def _check_members(members: Sequence[Member]) -> list[Member]:
  members = list(members)
  if not members:
    raise ValueError("a population needs at least one member")
  for m in members:
    if not isinstance(m, Member):
      raise ValueError(f"population members must be Member objects, got {m!r}")
  if len(set(members)) != len(members):
    raise ValueError("a population lists the same (setting, seed) twice")
  return members


def _chunks(total: int, every: int, start: int) -> list[int]:
  """Step counts at which to stop (evaluate, checkpoint), after ``start``."""
  stops = list(range(every, total, every)) if every else []
  return [s for s in stops + [total] if s > start]


def _score_all(pop: Population, state, dev: Mapping, score: Scorer
               ) -> tuple[list[dict], np.ndarray]:
  logits = pop.logits(state.params, dev)
  return [{k: float(v) for k, v in score(logits[m]).items()} for m in range(len(logits))], logits


def train_population(config: ModelConfig, kind: str, num_labels: int,
                     members: Sequence[Member], settings: Settings,
                     train_data: Mapping[str, np.ndarray], dev_data: Mapping[str, np.ndarray],
                     score: Scorer, init_params: Any = None, layout: str | None = None,
                     workdir: str | None = None,
                     report: Callable[[str], None] | None = None) -> Result:
  """Fine-tunes every member on ``train_data`` and scores it on ``dev_data``.

  Args:
    config: the model config.
    kind: the task kind.
    num_labels: the task's ``num_labels``.
    members: the population (:func:`grid`).
    settings: what the members share.
    train_data: the tokenised training split (:func:`encode_examples`): ``input_ids``,
      ``attention_mask``, ``token_type_ids``, ``label``, ``weight``.
    dev_data: the tokenised dev split.
    score: ``score(logits of one member on dev_data) -> {metric: value}``.
    init_params: a checkpoint's parameters (body, and head when it fits); None: scratch.
    layout: the task head's layout (None: the family's default).
    workdir: checkpoint the population here after every chunk and resume from it.
    report: progress lines (default: none).

  Returns:
    A :class:`Result`.
  """
  t0 = time.perf_counter()
  members = _check_members(members)
  n = check_data(train_data, kind, num_labels, "training")
  check_data(dev_data, kind, num_labels, "dev")
  pop = get_population(config, kind, num_labels, settings, layout)
  data = {k: jnp.asarray(train_data[k]) for k in DATA_KEYS}
  state = pop.init(members, init_params)
  manager, history, job = None, [], None
  if workdir:
    job = job_fingerprint(config, kind, num_labels, settings, layout, data, init_params)
    state, history, manager = _resume(workdir, state, members, job)
  start = first = int(np.asarray(state.step)[0])
  losses_, dev_logits = np.full(len(members), np.nan), None
  chunk = settings.eval_every or settings.total_steps
  try:
    for stop in _chunks(settings.total_steps, settings.eval_every, start):
      state, step_losses = pop.train_steps(state, members, start, stop - start, data, n,
                                           length=chunk)
      losses_ = step_losses.mean(axis=1)
      if not np.all(np.isfinite(losses_)):
        bad = [i for i, v in enumerate(losses_) if not np.isfinite(v)]
        raise train.NonFiniteLossError(f"non-finite training loss for members {bad} "
                                       f"({[members[i] for i in bad]}) by step {stop}")
      scores, dev_logits = _score_all(pop, state, dev_data, score)
      history.append({"step": stop, "metrics": scores})
      if manager is not None:
        manager.save(stop, state, {"history": history, "members": _members_json(members),
                                   "job": job}, force=True)
      if report:
        report(progress_line(stop, settings.total_steps, float(np.mean(losses_)),
                             time.perf_counter() - t0, stop - first))
      start = stop
  finally:
    if manager is not None:
      manager.close()
  if not history:  # resumed after the last step: the journal has the final scores
    raise ValueError(f"nothing to do: {workdir} already holds a finished population run")
  return Result(members, history[-1]["metrics"], history, losses_, state, dev_logits,
                time.perf_counter() - t0)


def progress_line(step: int, total: int, loss: float, elapsed: float, steps_done: int) -> str:
  """One progress line: step, share done, loss, elapsed and the ETA at this call's step rate."""
  rate = steps_done / elapsed if elapsed > 0 else 0.0
  eta = (total - step) / rate if rate > 0 else float("nan")
  return (f"population step {step}/{total} ({100.0 * step / max(total, 1):.0f}%): mean train "
          f"loss {loss:.4f}, elapsed {clock(elapsed)}, eta {clock(eta)}")


def _members_json(members: Sequence[Member]) -> list[dict]:
  return [dataclasses.asdict(m) for m in members]


def job_fingerprint(config: ModelConfig, kind: str, num_labels: int, settings: Settings,
                    layout: str | None, data: Mapping[str, Any], init_params: Any) -> str:
  """A digest of what a population's training depends on besides its members.

  The model config, task head, settings, the training rows (every array of ``DATA_KEYS``, its
  dtype and shape) and the initial parameters. Two runs with the same fingerprint and members
  reach the same state (every random choice is a function of seed and step), so a finished
  run's checkpoint can stand in for training again (:func:`restore_finished`), and a resume
  into a folder of another job is refused.
  """
  sha = hashlib.sha256(repr((config, kind, num_labels, settings, layout)).encode())
  for key in DATA_KEYS:
    array = np.ascontiguousarray(np.asarray(data[key]))
    sha.update(f"{key}:{array.dtype}:{array.shape}".encode())
    sha.update(array.tobytes())
  leaves = [] if init_params is None else jax.tree_util.tree_leaves_with_path(init_params)
  for path, leaf in leaves:
    array = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    sha.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}".encode())
    sha.update(array.tobytes())
  return sha.hexdigest()


def _resume(workdir: str, state, members, job: str):
  """The latest saved population in ``workdir`` (same members and job), or the fresh state."""
  from bort_jax.runtime import checkpoint  # pylint: disable=import-outside-toplevel
  manager = checkpoint.CheckpointManager(os.path.join(workdir, "population"), max_to_keep=1)
  restored = manager.restore_latest(checkpoint.abstract_like(state))
  if restored is None:
    return state, [], manager
  if restored.metadata.get("members") != _members_json(members):
    manager.close()
    raise ValueError(f"{workdir} holds a population of other members; use a fresh workdir")
  if restored.metadata.get("job", job) != job:  # checkpoints from before the fingerprint: no check
    manager.close()
    raise ValueError(f"{workdir} holds a population trained on other data, settings or initial "
                     "weights; use a fresh workdir")
  return restored.state, list(restored.metadata.get("history", [])), manager


def restore_finished(config: ModelConfig, kind: str, num_labels: int,
                     members: Sequence[Member], settings: Settings,
                     train_data: Mapping[str, np.ndarray], dev_data: Mapping[str, np.ndarray],
                     score: Scorer, workdir: str, init_params: Any = None,
                     layout: str | None = None) -> Result | None:
  """What :func:`train_population` would return, read from a finished run in ``workdir``.

  The run must be of these members with the same :func:`job_fingerprint` (same model, head,
  settings, training rows and initial weights) and have reached ``settings.total_steps``;
  its final state is then the state training again would reach, and it is scored on
  ``dev_data`` here. Anything else (no checkpoint, another job, an unfinished run, a
  checkpoint from before the fingerprint was kept) returns None: train instead.
  """
  from bort_jax.runtime import checkpoint  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  members = _check_members(members)
  if not os.path.isdir(os.path.join(workdir, "population")):
    return None
  check_data(dev_data, kind, num_labels, "dev")
  pop = get_population(config, kind, num_labels, settings, layout)
  data = {k: jnp.asarray(train_data[k]) for k in DATA_KEYS}
  job = job_fingerprint(config, kind, num_labels, settings, layout, data, init_params)
  manager = checkpoint.CheckpointManager(os.path.join(workdir, "population"), max_to_keep=1)
  try:
    step = manager.latest_step()
    meta = manager.metadata(step) if step is not None else {}
    if (step != settings.total_steps or meta.get("members") != _members_json(members)
        or meta.get("job") != job):
      return None
    abstract = jax.eval_shape(pop._init,  # pylint: disable=protected-access
                              _member_arrays(members), init_params)
    state, meta = manager.restore(step, abstract)
  finally:
    manager.close()
  scores, logits = _score_all(pop, state, dev_data, score)
  return Result(members, scores, list(meta.get("history", [])), np.full(len(members), np.nan),
                state, logits, time.perf_counter() - t0)
