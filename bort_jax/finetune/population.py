"""Seeds x learning rates of one task, fine-tuned as one population in one compiled program.

Fine-tuning small BERTs is noisy (PAPER.md section 5: the authors ran seeds 0-4 over a grid of
learning rates and weight decays), so one number per setting is not a result. Here K seeds x L
hyperparameter settings are *members* of one population: every member carries its own
``lr``, ``weight_decay``, ``warmup`` (fraction of the run) and ``seed`` as data, so the whole
grid shares one compiled program per phase (initialise, train a chunk of steps, evaluate).
Members run under ``jax.vmap`` on accelerators and under ``jax.lax.map`` on a CPU (one member
after another inside the same program: vmap adds no throughput on a small CPU, see
``benchmarks/results/finetune.json``); ``mode`` chooses.

What a member is, exactly (so a single run with the project's ordinary optimizer and train
step reproduces it; ``tests/test_population.py`` checks that to 1e-5):

* initial weights: ``model.init(fold_in(key(seed), 0))``, then every parameter found in
  ``init_params`` (a distilled, extracted or teacher checkpoint) replaces the fresh one, so
  the body comes from the checkpoint and only the task head depends on the seed;
* dropout: ``train.train_step``'s rule, ``fold_in(fold_in(key(seed), 1), step)``;
* data order: epoch ``e`` is ``np.random.default_rng([seed, e]).permutation(N)`` cut into
  ``N // B`` batches (the last partial batch is dropped), step ``t`` takes batch
  ``t mod (N // B)`` of epoch ``t // (N // B)`` (:func:`batch_indices`); the same order as
  ``tasks.batch_examples(shuffle_seed=seed, epoch=e, drop_remainder=True)``;
* optimizer: ``optim.make_optimizer`` with the member's lr, weight decay and warmup: the chain
  (clip, Adam, decoupled weight decay off LayerNorm and biases, linear warmup then linear
  decay to 0 at ``total_steps``), rebuilt inside the program from traced values.

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
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from bort_jax.core import losses, model, optim
from bort_jax.core.arch import ModelConfig
from bort_jax.finetune import metrics as metrics_lib
from bort_jax.finetune import tasks as tasks_lib
from bort_jax.finetune.members import (MODES, Member, Settings, batch_indices, dropout_key,
                                       format_table, grid, init_key, summarize)
from bort_jax.runtime import train

__all__ = ["MODES", "Member", "Settings", "batch_indices", "dropout_key", "format_table", "grid",
           "init_key", "summarize", "Population", "Result", "train_population", "head_for",
           "make_loss_fn", "make_tx", "merge_params", "initial_state", "check_data",
           "encode_examples", "task_scorer", "accuracy_scorer", "get_population"]

DATA_KEYS = ("input_ids", "attention_mask", "token_type_ids", "label", "weight")
Scorer = Callable[[np.ndarray], dict]


# ----------------------------------------------------------------------------- pure pieces


def head_for(spec: tasks_lib.TaskSpec) -> model.HeadSpec:
  """The model head a task trains (candidates tasks score each candidate with 2 classes)."""
  if spec.kind == "regression":
    return model.HeadSpec("regression")
  if spec.kind == "multiple_choice":
    return model.HeadSpec("multiple_choice", spec.num_labels)
  return model.HeadSpec("classification", spec.num_labels)


def make_loss_fn(config: ModelConfig, head: model.HeadSpec, train_mode: bool = True
                 ) -> train.LossFn:
  """The task loss in ``train.train_step``'s signature ``(params, batch, rng, frozen)``.

  Cross-entropy over classes or choices, squared error for regression, averaged over rows
  with weight > 0 (padding rows carry label -1 and weight 0).

  Args:
    config: the model config.
    head: the task head.
    train_mode: apply dropout (needs the step's rng).

  Returns:
    ``loss_fn(params, batch, rng, frozen) -> (loss, {"accuracy": ...})``.
  """

  def loss_fn(params, batch, rng, frozen):
    del frozen  # fine-tuning trains every parameter
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")
              if k in batch}
    out = model.apply(params, config, inputs, head=head, train=train_mode, rng=rng)
    logits, weight = out["logits"], batch["weight"]
    if head.kind == "regression":
      total, count = losses.mse(logits, batch["label"].astype(jnp.float32), weight)
      return losses.safe_divide(total, count), {}
    labels = jnp.maximum(batch["label"], 0)  # padding rows: any valid index, weight 0
    total, count = losses.softmax_cross_entropy(logits, labels, weight)
    hits, _ = losses.correct_predictions(logits, labels, weight)
    return losses.safe_divide(total, count), {"accuracy": losses.safe_divide(hits, count)}

  return loss_fn


def make_tx(settings: Settings) -> Callable[..., optax.GradientTransformation]:
  """``optim.make_optimizer`` as a function of a member's traced (lr, weight decay, warmup).

  The schedule is ``optim.make_schedule``'s: ``lr * clip(min((s + 1) / W, (T - s) / (T - W)),
  0, 1)`` with ``W = round(warmup * T)`` (pure decay ``(T - s) / T`` when ``W = 0``).

  Args:
    settings: the shared optimizer constants and ``total_steps``.

  Returns:
    ``factory(lr, weight_decay, warmup) -> optax.GradientTransformation``.
  """
  total = float(settings.total_steps)

  def factory(lr, weight_decay, warmup):
    warm = jnp.round(jnp.asarray(warmup, jnp.float32) * total)

    def schedule(count):
      s = jnp.asarray(count, jnp.float32)
      decay = (total - s) / jnp.maximum(total - warm, 1.0)
      factor = jnp.where(warm > 0, jnp.minimum((s + 1.0) / jnp.maximum(warm, 1.0), decay),
                         decay)
      return lr * jnp.clip(factor, 0.0, 1.0)

    if settings.optimizer == "adam_nobc":
      adam = optim.scale_by_adam_no_bias_correction(settings.b1, settings.b2, settings.eps)
    else:
      adam = optax.scale_by_adam(b1=settings.b1, b2=settings.b2, eps=settings.eps,
                                 eps_root=0.0)
    parts = [optax.clip_by_global_norm(settings.clip_norm)] if settings.clip_norm else []
    parts += [adam, optax.add_decayed_weights(weight_decay, mask=optim.decay_mask),
              optax.scale_by_learning_rate(schedule)]
    return optax.chain(*parts)

  return factory


def merge_params(fresh: Any, loaded: Any | None) -> Any:
  """``fresh`` with every parameter that ``loaded`` also has replaced by the loaded one.

  Raises:
    ValueError: a shared parameter has another shape (a head for another label count, or a
      checkpoint of another architecture).
  """
  if loaded is None:
    return fresh
  flat = traverse_util.flatten_dict(fresh)
  for path, value in traverse_util.flatten_dict(loaded).items():
    if path not in flat:
      continue  # an MLM head or a pooler the task model does not use
    if tuple(np.shape(value)) != tuple(np.shape(flat[path])):
      raise ValueError(f"parameter {'/'.join(path)} of the checkpoint has shape "
                       f"{tuple(np.shape(value))}; this task's model needs "
                       f"{tuple(np.shape(flat[path]))}")
    flat[path] = jnp.asarray(value, flat[path].dtype)
  return traverse_util.unflatten_dict(flat)


def initial_state(seed, config: ModelConfig, head: model.HeadSpec, init_params: Any,
                  tx: optax.GradientTransformation) -> train.TrainState:
  """A member's state at step 0 (traceable in ``seed``)."""
  params = merge_params(model.init(init_key(seed), config, head), init_params)
  return train.create_state(params, tx)


def check_data(data: Mapping[str, np.ndarray], head: model.HeadSpec, name: str) -> int:
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
  if head.kind != "regression":
    labels = np.asarray(data["label"])[np.asarray(data["weight"]) > 0]
    limit = head.num_labels
    bad = labels[(labels < 0) | (labels >= limit)]
    if bad.size:
      raise ValueError(f"{name} split: label {int(bad[0])} is outside the label space "
                       f"0..{limit - 1} of this {head.kind} head")
  return n


def encode_examples(spec: tasks_lib.TaskSpec, examples: Sequence[tasks_lib.Example],
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


def _member_arrays(members: Sequence[Member]) -> dict[str, np.ndarray]:
  return {"seed": np.asarray([m.seed for m in members], np.uint32),
          "lr": np.asarray([m.lr for m in members], np.float32),
          "weight_decay": np.asarray([m.weight_decay for m in members], np.float32),
          "warmup": np.asarray([m.warmup for m in members], np.float32)}


def _over_members(fn, mode: str, per_member: tuple, shared: tuple):
  """``fn(*per_member_slices, *shared)`` for every member: vmapped, or one at a time."""
  if mode == "vmap":
    axes = (0,) * len(per_member) + (None,) * len(shared)
    return jax.vmap(fn, in_axes=axes)(*per_member, *shared)
  return jax.lax.map(lambda xs: fn(*xs, *shared), per_member)


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
  """Compiled programs of one population (one task head, one model config, one Settings).

  Args:
    config: the model config (its arch fixes every shape).
    head: the task head (:func:`head_for`).
    settings: what the members share.
  """

  def __init__(self, config: ModelConfig, head: model.HeadSpec, settings: Settings):
    if not settings.dropout:
      config = config.replace(dropout=0.0, attention_dropout=0.0)
    self.config, self.head, self.settings = config, head, settings
    self.mode = settings.resolved_mode()
    self.tx_factory = make_tx(settings)
    self.loss_fn = make_loss_fn(config, head, train_mode=settings.dropout)
    self._init = jax.jit(self._init_program)
    self._train = jax.jit(self._train_program, donate_argnums=(0,))
    self._eval = jax.jit(self._eval_program)

  def tx(self, member: Member) -> optax.GradientTransformation:
    """The optimizer of one member (concrete values)."""
    return self.tx_factory(member.lr, member.weight_decay, member.warmup)

  def _init_program(self, members, init_params):
    def one(seed, lr, wd, warmup, loaded):
      return initial_state(seed, self.config, self.head, loaded,
                           self.tx_factory(lr, wd, warmup))

    per = (members["seed"], members["lr"], members["weight_decay"], members["warmup"])
    return _over_members(one, self.mode, per, (init_params,))

  def _train_program(self, state, members, indices, active, data):
    def one(state, seed, lr, wd, warmup, idx, data):
      tx = self.tx_factory(lr, wd, warmup)
      rng = dropout_key(seed)

      def step(state, xs):
        rows, on = xs

        def run(state):
          batch = {k: jnp.take(v, rows, axis=0) for k, v in data.items()}
          state, metrics = train.train_step(state, batch, rng, None, loss_fn=self.loss_fn,
                                            tx=tx)
          return state, metrics["loss"]

        # Steps past the end of a short last chunk are skipped, so every chunk of a run
        # has the same length and shares one compiled program.
        return jax.lax.cond(on, run, lambda s: (s, jnp.zeros((), jnp.float32)), state)

      return jax.lax.scan(step, state, (idx, active))

    per = (state, members["seed"], members["lr"], members["weight_decay"], members["warmup"],
           indices)
    return _over_members(one, self.mode, per, (data,))

  def _eval_program(self, params, rows):
    def one(params, rows):
      def batch_logits(batch):
        return model.apply(params, self.config, batch, head=self.head)["logits"]
      logits = jax.lax.map(batch_logits, rows)
      return logits.reshape((-1,) + logits.shape[2:])

    return _over_members(one, self.mode, (params,), (rows,))

  def init(self, members: Sequence[Member], init_params: Any = None) -> train.TrainState:
    """The stacked state of every member at step 0."""
    return self._init(_member_arrays(members), init_params)

  def train_steps(self, state: train.TrainState, members: Sequence[Member], start: int,
                  steps: int, data: Mapping[str, Any], num_rows: int, length: int = 0
                  ) -> tuple[train.TrainState, np.ndarray]:
    """Runs ``steps`` steps of every member from step ``start`` (the state's step).

    Args:
      state: the stacked state.
      members: the population.
      start: the state's step.
      steps: steps to run.
      data: the training split on the device.
      num_rows: its number of rows.
      length: the program's chunk length (>= steps; the extra steps are skipped).

    Returns:
      The new state and the training losses ``[M, steps]``.
    """
    b, length = self.settings.batch_size, max(length, steps)
    idx = np.stack([np.stack([batch_indices(m.seed, start + min(t, steps - 1), num_rows, b)
                              for t in range(length)]) for m in members])
    active = np.arange(length) < steps
    state, step_losses = self._train(state, _member_arrays(members), idx, active, data)
    return state, np.asarray(jax.device_get(step_losses))[:, :steps]

  def logits(self, params: Any, data: Mapping[str, np.ndarray]) -> np.ndarray:
    """Every member's logits on a split, ``[M, N, ...]`` (numpy)."""
    n = len(data["input_ids"])
    out = self._eval(params, _eval_rows(data, self.settings.eval_batch_size))
    return np.asarray(jax.device_get(out))[:, :n]


@functools.lru_cache(maxsize=8)
def get_population(config: ModelConfig, head: model.HeadSpec, settings: Settings) -> Population:
  """A cached :class:`Population`, so runs of the same shape reuse its compiled programs."""
  return Population(config, head, settings)


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


def train_population(config: ModelConfig, head: model.HeadSpec, members: Sequence[Member],
                     settings: Settings, train_data: Mapping[str, np.ndarray],
                     dev_data: Mapping[str, np.ndarray], score: Scorer,
                     init_params: Any = None, workdir: str | None = None,
                     report: Callable[[str], None] | None = None) -> Result:
  """Fine-tunes every member on ``train_data`` and scores it on ``dev_data``.

  Args:
    config: the model config.
    head: the task head.
    members: the population (:func:`grid`).
    settings: what the members share.
    train_data: the tokenised training split (:func:`encode_examples`): ``input_ids``,
      ``attention_mask``, ``token_type_ids``, ``label``, ``weight``.
    dev_data: the tokenised dev split.
    score: ``score(logits of one member on dev_data) -> {metric: value}``.
    init_params: a checkpoint's parameters (body, and head when it fits); None: scratch.
    workdir: checkpoint the population here after every chunk and resume from it.
    report: progress lines (default: none).

  Returns:
    A :class:`Result`.
  """
  t0 = time.perf_counter()
  members = _check_members(members)
  n = check_data(train_data, head, "training")
  check_data(dev_data, head, "dev")
  batch_indices(0, 0, n, settings.batch_size)  # fails early when the split is too small
  pop = get_population(config, head, settings)
  data = {k: jnp.asarray(train_data[k]) for k in DATA_KEYS}
  state = pop.init(members, init_params)
  manager, history = None, []
  if workdir:
    state, history, manager = _resume(workdir, state, members)
  start = int(np.asarray(state.step)[0])
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
        manager.save(stop, state, {"history": history, "members": _members_json(members)},
                     force=True)
      if report:
        report(f"population step {stop}/{settings.total_steps}: mean train loss "
               f"{float(np.mean(losses_)):.4f}")
      start = stop
  finally:
    if manager is not None:
      manager.close()
  if not history:  # resumed after the last step: the journal has the final scores
    raise ValueError(f"nothing to do: {workdir} already holds a finished population run")
  return Result(members, history[-1]["metrics"], history, losses_, state, dev_logits,
                time.perf_counter() - t0)


def _members_json(members: Sequence[Member]) -> list[dict]:
  return [dataclasses.asdict(m) for m in members]


def _resume(workdir: str, state, members):
  """The latest saved population in ``workdir`` (same members), or the fresh state."""
  from bort_jax.runtime import checkpoint  # pylint: disable=import-outside-toplevel
  manager = checkpoint.CheckpointManager(os.path.join(workdir, "population"), max_to_keep=1)
  restored = manager.restore_latest(checkpoint.abstract_like(state))
  if restored is None:
    return state, [], manager
  if restored.metadata.get("members") != _members_json(members):
    raise ValueError(f"{workdir} holds a population of other members; use a fresh workdir")
  return restored.state, list(restored.metadata.get("history", [])), manager
