"""The one generic training loop: train state, a pure train step, metrics and checkpoints.

Every mode (proxy training, distillation, fine-tuning) supplies a loss function
``loss_fn(params, batch, rng, frozen) -> (loss, metrics)`` and reuses:

* :func:`train_step`, a pure module-level step; the step's rng is ``fold_in(rng, step)`` so a
  resumed run draws the same dropout masks as an uninterrupted one;
* :func:`compile_step`, which jits it with shardings and donates the old state;
* :func:`run_loop`, which feeds batches by step number (the input pipeline is random-access,
  so resuming needs no iterator state), logs ``metrics.jsonl`` and one-line progress reports
  (process 0 only), saves checkpoints every N steps, on SIGTERM and at the end, and stops with
  a clear error on a non-finite loss without overwriting the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bort_jax.runtime.fileio import atomic_write_text

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array, Any], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
  """What a checkpoint holds: the step, the trainable parameters and the optimizer state."""

  step: jax.Array
  params: Any
  opt_state: Any


def create_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  """A fresh state at step 0."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array,
               frozen: Any = None, *, loss_fn: LossFn,
               tx: optax.GradientTransformation) -> tuple[TrainState, dict]:
  """One optimizer step. Pure: the same inputs give the same outputs.

  Args:
    state: parameters and optimizer state.
    batch: a global batch.
    rng: the run's base key; the step's key is ``fold_in(rng, state.step)``.
    frozen: anything the loss needs but must not train (a teacher's parameters).
    loss_fn: ``(params, batch, rng, frozen) -> (scalar loss, metrics dict)``.
    tx: the optimizer.

  Returns:
    The new state and the step's metrics (loss, gradient norm, the loss's own metrics).
  """
  step_rng = jax.random.fold_in(rng, state.step)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, metrics), grads = grad_fn(state.params, batch, step_rng, frozen)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def compile_step(loss_fn: LossFn, tx: optax.GradientTransformation, state_shardings: Any = None,
                 batch_shardings: Any = None, frozen_shardings: Any = None,
                 donate: bool = True) -> Callable:
  """Jits :func:`train_step` with the statics bound, explicit shardings and donation.

  Shardings of ``None`` let JAX infer them (single device or already-placed inputs).
  """
  step = functools.partial(train_step, loss_fn=loss_fn, tx=tx)
  kwargs = {}
  if state_shardings is not None:
    replicated = jax.tree_util.tree_leaves(state_shardings)[0]
    replicated = jax.sharding.NamedSharding(replicated.mesh, jax.sharding.PartitionSpec())
    kwargs["in_shardings"] = (state_shardings, batch_shardings, replicated, frozen_shardings)
    kwargs["out_shardings"] = (state_shardings, replicated)
  return jax.jit(step, donate_argnums=(0,) if donate else (), **kwargs)


class NonFiniteLossError(FloatingPointError):
  """Raised when the loss becomes NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass
class LoopConfig:
  """What :func:`run_loop` needs besides the step and the data.

  Attributes:
    total_steps: train until the state's step reaches this.
    log_every: steps between metric reports (and NaN checks).
    checkpoint_every: steps between checkpoints (0: only on preemption and at the end).
    eval_every: steps between evaluation hooks (0: never).
    tokens_per_step: tokens in one global batch, for the tokens/s report.
  """

  total_steps: int
  log_every: int = 10
  checkpoint_every: int = 0
  eval_every: int = 0
  tokens_per_step: int = 0


class MetricsWriter:
  """Appends one JSON object per report to ``workdir/metrics.jsonl`` (process 0 only)."""

  def __init__(self, workdir: str | None):
    self.path = None
    if workdir and jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      self.path = os.path.join(workdir, "metrics.jsonl")

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if self.path is None:
      return
    record = {"step": int(step)}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")


def write_config(workdir: str, config: Any) -> None:
  """Writes the resolved config as ``workdir/config.json`` (process 0 only)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  atomic_write_text(os.path.join(workdir, "config.json"),
                    json.dumps(data, indent=2, sort_keys=True, default=str))


def _to_python(value: Any) -> Any:
  value = np.asarray(value)
  return value.item() if value.size == 1 else value.tolist()


def _format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run_loop(state: TrainState, step_fn: Callable, get_batch: Callable[[int], Any],
             rng: jax.Array, loop: LoopConfig, *, frozen: Any = None, workdir: str | None = None,
             checkpointer: Any = None, eval_fn: Callable[[TrainState], dict] | None = None,
             should_stop: Callable[[], bool] | None = None,
             report: Callable[[str], None] | None = None) -> tuple[TrainState, dict]:
  """Trains from ``state.step`` to ``loop.total_steps``.

  Args:
    state: the (possibly restored) state.
    step_fn: the compiled step, ``(state, batch, rng, frozen) -> (state, metrics)``.
    get_batch: step number -> global batch. Random access by step makes resumption exact.
    rng: the run's base key.
    loop: steps, intervals and the tokens per step.
    frozen: passed to every step (a teacher's parameters).
    workdir: where ``metrics.jsonl`` goes (process 0 only).
    checkpointer: a ``checkpoint.CheckpointManager`` or None.
    eval_fn: called every ``loop.eval_every`` steps with the state; its dict is logged.
    should_stop: polled every step; True saves a checkpoint and returns (preemption).
    report: where progress lines go (default: print on process 0).

  Returns:
    The final state and the last reported metrics.

  Raises:
    NonFiniteLossError: the loss became NaN or infinite. The state of the bad step is not
      saved; the newest checkpoint on disk is the last good one.
  """
  if report is None:
    report = _default_report
  writer = MetricsWriter(workdir)
  start = int(jax.device_get(state.step))
  last_metrics: dict = {}
  pending: list[dict] = []
  t_last, step_last = time.perf_counter(), start
  t_start = t_last
  step = start
  while step < loop.total_steps:
    batch = get_batch(step)
    state, metrics = step_fn(state, batch, rng, frozen)
    step += 1
    pending.append(metrics)
    at_end = step == loop.total_steps
    if step % loop.log_every == 0 or at_end:
      fetched = jax.device_get(pending)
      pending = []
      for offset, m in enumerate(fetched):
        loss = float(np.asarray(m["loss"]))
        if not math.isfinite(loss):
          bad_step = step - len(fetched) + offset + 1
          raise NonFiniteLossError(
              f"loss is {loss} at step {bad_step}; stopping. The last good checkpoint "
              "(if any) is kept; lower the learning rate or check the data.")
      last_metrics = {k: float(np.mean([np.asarray(m[k]) for m in fetched]))
                      for k in fetched[-1]}
      now = time.perf_counter()
      rate = (step - step_last) / max(now - t_last, 1e-9)
      last_metrics["steps_per_second"] = rate
      if loop.tokens_per_step:
        last_metrics["tokens_per_second"] = rate * loop.tokens_per_step
      writer.write(step, last_metrics)
      eta = (loop.total_steps - step) / rate if rate > 0 else float("inf")
      report(f"step {step}/{loop.total_steps}  loss {last_metrics['loss']:.4f}  "
             f"{rate:.2f} steps/s"
             + (f"  {last_metrics['tokens_per_second']:.0f} tok/s" if loop.tokens_per_step else "")
             + f"  elapsed {_format_seconds(now - t_start)}  eta {_format_seconds(eta)}")
      t_last, step_last = now, step
    if eval_fn is not None and loop.eval_every and (step % loop.eval_every == 0 or at_end):
      eval_metrics = {f"eval_{k}": v for k, v in eval_fn(state).items()}
      writer.write(step, eval_metrics)
      report(f"step {step}  " + "  ".join(f"{k} {float(np.asarray(v)):.4f}"
                                           for k, v in eval_metrics.items()))
      last_metrics.update(eval_metrics)
    stop = bool(should_stop and should_stop())
    if checkpointer is not None:
      periodic = loop.checkpoint_every and step % loop.checkpoint_every == 0
      if periodic or at_end or stop:
        _check_finite_before_save(pending)
        checkpointer.save(step, state, force=True)
    if stop:
      report(f"stop requested at step {step}: checkpoint saved, exiting")
      break
  if checkpointer is not None:
    checkpointer.wait()
  return state, last_metrics


def _check_finite_before_save(pending: list[dict]) -> None:
  """Never checkpoint a state whose unreported steps had a non-finite loss."""
  for m in jax.device_get(pending):
    loss = float(np.asarray(m["loss"]))
    if not math.isfinite(loss):
      raise NonFiniteLossError(f"loss is {loss}; not saving this state. The last good "
                               "checkpoint is kept.")


def _default_report(line: str) -> None:
  if jax.process_index() == 0:
    print(line, flush=True)
