"""Pure fine-tuning steps for one model: the head per task kind, the loss, train and eval steps.

These are the pieces every fine-tuning driver shares: ``loop.py`` (one model, sharded over
the mesh, through ``runtime.train.run_loop``), and population training (K seeds x L learning
rates vmapped over the same functions). Everything a population member may vary is an array
argument, never a Python constant baked into the compiled step:

* ``rng``: the member's base key; the step's dropout key is ``fold_in(rng, state.step)``, so a
  resumed run draws the same masks as an uninterrupted one;
* ``hparams``: :func:`hparams` -> ``{"lr", "weight_decay", "warmup"}`` float32 scalars (peak
  learning rate, decoupled weight decay, warmup as a fraction of the run).

The update is the one ``core.optim.make_optimizer`` builds (clip, Adam without bias
correction, decoupled weight decay off LayerNorm parameters and biases, linear warmup then
linear decay), written out so that lr, weight decay and warmup can be traced values: ``tx``
(``core.optim.make_direction``) gives the Adam direction and ``train_step`` scales it with
``core.optim.schedule_factor``.

Signatures match ``runtime.train.run_loop``'s ``step_fn(state, batch, rng, frozen)`` with the
hyperparameters in the ``frozen`` slot (they are inputs, never trained or checkpointed).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from bort_jax.core import model, optim
from bort_jax.core.arch import ModelConfig
from bort_jax.runtime.train import TrainState

HParams = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """What a compiled step is specialised on (hashable, so it can be a static argument).

  Attributes:
    model: the model config.
    kind: the task kind (``tasks.KINDS``).
    num_labels: the task's ``num_labels``.
    total_steps: length of the run (the learning-rate schedule's end).
    layout: the task head's layout (``"bert"``, ``"roberta"``; None: the family's default).
  """

  model: ModelConfig
  kind: str
  num_labels: int
  total_steps: int
  layout: str | None = None

  @property
  def head(self) -> model.HeadSpec:
    return task_head(self.kind, self.num_labels, self.layout).resolve(self.model.family)


def task_head(kind: str, num_labels: int, layout: str | None = None) -> model.HeadSpec:
  """The model head a task kind trains.

  Args:
    kind: ``classification``, ``regression``, ``multiple_choice`` or ``candidates``.
    num_labels: the task's ``num_labels`` (classes, 1, choices, 2).
    layout: ``"bert"`` / ``"roberta"`` (``model.HeadSpec``), None for the family's default.

  Returns:
    ``HeadSpec("classification", n)`` for classification and candidates (a binary
    classifier scored per candidate), ``HeadSpec("regression")`` and
    ``HeadSpec("multiple_choice")`` (one score per choice).
  """
  if kind in ("classification", "candidates"):
    return model.HeadSpec("classification", num_labels, layout)
  if kind == "regression":
    return model.HeadSpec("regression", 1, layout)
  if kind == "multiple_choice":
    return model.HeadSpec("multiple_choice", num_labels, layout)
  raise ValueError(f"unknown task kind {kind!r}")


def hparams(lr: float, weight_decay: float, warmup: float) -> dict[str, jax.Array]:
  """One member's hyperparameters as float32 scalars (stack them to vmap a population).

  Args:
    lr: peak learning rate.
    weight_decay: decoupled weight decay (scaled by the scheduled learning rate, as AdamW).
    warmup: warmup length as a fraction of ``total_steps``, in [0, 1].
  """
  if not 0.0 <= float(warmup) <= 1.0:
    raise ValueError(f"warmup must be a fraction in [0, 1], got {warmup}")
  return {"lr": jnp.float32(lr), "weight_decay": jnp.float32(weight_decay),
          "warmup": jnp.float32(warmup)}


def task_loss(logits: jax.Array, batch: Mapping[str, jax.Array], kind: str
              ) -> tuple[jax.Array, dict]:
  """Weighted mean loss of a Task batch: cross-entropy, or squared error for regression.

  Rows with ``weight`` 0 (padding) or label -1 (unlabeled) do not count.

  Args:
    logits: ``[B, n]`` (classification, candidates), ``[B, C]`` (multiple choice) or ``[B]``.
    batch: the Task batch (``label``, ``weight``).
    kind: the task kind.

  Returns:
    ``(loss, {"examples": counted rows, "accuracy": batch accuracy (not for regression)})``.
  """
  label = batch["label"]
  weight = batch["weight"].astype(jnp.float32)
  logits = logits.astype(jnp.float32)
  if kind == "regression":
    per_row = jnp.square(logits.reshape(label.shape) - label.astype(jnp.float32))
    count = jnp.sum(weight)
    metrics = {}
  else:
    weight = weight * (label >= 0)
    safe = jnp.maximum(label, 0).astype(jnp.int32)
    per_row = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    count = jnp.sum(weight)
    hits = (jnp.argmax(logits, axis=-1) == safe) * weight
    metrics = {"accuracy": jnp.sum(hits) / jnp.maximum(count, 1.0)}
  loss = jnp.sum(per_row * weight) / jnp.maximum(count, 1.0)
  return loss, dict(metrics, examples=count)


def forward(params: Any, batch: Mapping[str, jax.Array], cfg: StepConfig,
            rng: jax.Array | None = None) -> jax.Array:
  """The task head's logits; dropout on when ``rng`` is given."""
  out = model.apply(params, cfg.model, batch, head=cfg.head, train=rng is not None, rng=rng)
  return out["logits"]


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array,
               hp: HParams, *, cfg: StepConfig, tx: optax.GradientTransformation
               ) -> tuple[TrainState, dict]:
  """One fine-tuning update of one model. Pure; vmap it over (state, rng, hp) for a population.

  Args:
    state: ``runtime.train.TrainState`` (step, params, ``tx`` state).
    batch: a Task batch (docs/INTERFACES.md).
    rng: the member's base key; dropout uses ``fold_in(rng, state.step)``.
    hp: :func:`hparams` (arrays).
    cfg: the static :class:`StepConfig`.
    tx: ``core.optim.make_direction``.

  Returns:
    The new state and ``{"loss", "accuracy", "examples", "grad_norm", "lr"}``.
  """
  step_rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    return task_loss(forward(params, batch, cfg, step_rng), batch, cfg.kind)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  direction, opt_state = tx.update(grads, state.opt_state, state.params)
  warmup = jnp.round(jnp.asarray(hp["warmup"], jnp.float32) * jnp.float32(cfg.total_steps))
  lr = hp["lr"] * optim.schedule_factor(state.step, cfg.total_steps, warmup)
  decays = optim.decay_mask(state.params)
  params = jax.tree.map(
      lambda p, d, m: p - lr * (d + hp["weight_decay"] * p) if m else p - lr * d,
      state.params, direction, decays)
  metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads), lr=lr)
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: Mapping[str, jax.Array], *, cfg: StepConfig) -> dict:
  """Dropout-free logits and the loss of one batch (pure; vmap it over params).

  Returns:
    ``{"logits": [B, n] / [B, C] / [B], "loss": weighted mean, "examples": counted rows}``.
  """
  logits = forward(params, batch, cfg)
  loss, metrics = task_loss(logits, batch, cfg.kind)
  return {"logits": logits, "loss": loss, "examples": metrics["examples"]}


def init_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  """A fresh state at step 0 for ``params`` (the direction's moments at zero)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
