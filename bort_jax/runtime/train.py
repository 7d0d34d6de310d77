"""The one generic training loop: train state, a pure train step, metrics and checkpoints.

Every mode (proxy training, distillation, fine-tuning) supplies a loss function
``loss_fn(params, batch, rng, frozen) -> (loss, metrics)`` and reuses:

* :func:`train_step`, a pure module-level step; the step's rng is ``fold_in(rng, step)`` so a
  resumed run draws the same dropout masks as an uninterrupted one;
* :func:`compile_step`, which jits it with shardings and donates the old state;
* :func:`run_loop`, which feeds batches by step number (the input pipeline is random-access,
  so resuming needs no iterator state), logs ``metrics.jsonl`` and one-line progress reports
  (process 0 only; a resumed run's file reads as one uninterrupted run, each step once), saves
  checkpoints every N steps, on SIGTERM and at the end, and stops with a clear error on a
  non-finite loss without overwriting the last good checkpoint.
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

from bort_jax.runtime.fileio import atomic_write_text, clock, read_jsonl, to_jsonable

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
  """Appends one JSON object per report to ``workdir/metrics.jsonl`` (process 0 only).

  A run resumed from step ``k`` first drops the lines of steps after ``k`` (the interrupted run
  wrote them, and they are about to be trained again) and a line torn by a kill, in one atomic
  rewrite, so the file reads as one run: each step once.

  Args:
    workdir: where the file goes (None: write nothing).
    resume_step: the step the run starts from (0: a fresh run, which keeps no old line).
  """

  def __init__(self, workdir: str | None, resume_step: int = 0):
    self.path = None
    if workdir and jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      self.path = os.path.join(workdir, "metrics.jsonl")
      if os.path.exists(self.path):
        self._drop_after(resume_step)

  def _drop_after(self, step: int) -> None:
    """Keeps the records up to the resumed step (and none torn by the kill), rewritten whole."""
    kept = [r for r in read_jsonl(self.path)
            if isinstance(r, dict) and int(r.get("step", 0)) <= step]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    with open(self.path) as f:
      if f.read() == text:  # nothing dropped, nothing torn: leave the file as it is
        return
    atomic_write_text(self.path, text)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Appends ``{"step": step, **metrics}``."""
    if self.path is None:
      return
    record = {"step": int(step)}
    record.update({k: to_jsonable(v) for k, v in metrics.items()})
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


_CARRIED = "unreported_metrics"


class _Reports:
  """Metrics of the steps not yet reported, and one report per window of ``log_every`` steps.

  A window is the same steps whether or not the run was interrupted inside it: a checkpoint
  carries the window's unreported per-step metrics (host floats, metadata ``_CARRIED``) and
  the resumed run starts from them. Means are taken in float64 so carried and fresh values
  (float32 on the device) average to the same bits.
  """

  def __init__(self, writer: MetricsWriter, report: Callable[[str], None], loop: LoopConfig,
               start: int, carried: list):
    self.writer, self.report, self.loop = writer, report, loop
    self.pending = list(carried)
    self.t_start = self.t_last = time.perf_counter()
    self.step_last = start

  def flush(self, step: int) -> dict:
    """Checks, averages, writes and prints the window ending at ``step``."""
    fetched, self.pending = self._fetch_finite(step), []
    metrics = {k: float(np.mean(np.asarray([np.asarray(m[k], np.float64) for m in fetched])))
               for k in fetched[-1]}
    now = time.perf_counter()
    rate = (step - self.step_last) / max(now - self.t_last, 1e-9)
    metrics["steps_per_second"] = rate
    if self.loop.tokens_per_step:
      metrics["tokens_per_second"] = rate * self.loop.tokens_per_step
    self.writer.write(step, metrics)
    eta = (self.loop.total_steps - step) / rate if rate > 0 else float("inf")
    self.report(f"step {step}/{self.loop.total_steps}  loss {metrics['loss']:.4f}  "
                f"{rate:.2f} steps/s"
                + (f"  {metrics['tokens_per_second']:.0f} tok/s" if self.loop.tokens_per_step
                   else "")
                + f"  elapsed {clock(now - self.t_start, hours=True)}"
                + f"  eta {clock(eta, hours=True)}")
    self.t_last, self.step_last = now, step
    return metrics

  def evaluate(self, step: int, results: Mapping[str, Any]) -> dict:
    """Writes and prints an evaluation's results as ``eval_*`` metrics."""
    eval_metrics = {f"eval_{k}": v for k, v in results.items()}
    self.writer.write(step, eval_metrics)
    self.report(f"step {step}  " + "  ".join(f"{k} {float(np.asarray(v)):.4f}"
                                             for k, v in eval_metrics.items()))
    return eval_metrics

  def checkpoint_metadata(self, step: int) -> dict:
    """What a checkpoint at ``step`` carries; never a state whose window saw a bad loss."""
    self.pending = self._fetch_finite(step, saving=True)
    return {_CARRIED: [{k: to_jsonable(np.asarray(v)) for k, v in m.items()}
                       for m in self.pending]}

  def _fetch_finite(self, step: int, saving: bool = False) -> list:
    fetched = jax.device_get(self.pending)
    for offset, m in enumerate(fetched):
      loss = float(np.asarray(m["loss"]))
      if not math.isfinite(loss):
        bad_step = step - len(fetched) + offset + 1
        raise NonFiniteLossError(
            f"loss is {loss} at step {bad_step}; "
            + ("not saving this state. " if saving else "stopping. ")
            + "The last good checkpoint (if any) is kept; lower the learning rate or check "
            "the data.")
    return fetched


def _carried_metrics(checkpointer: Any, start: int) -> list:
  """The unreported metrics saved with the checkpoint the run resumes from (if any)."""
  if checkpointer is None or start == 0 or not hasattr(checkpointer, "metadata"):
    return []
  return list(checkpointer.metadata(start).get(_CARRIED) or [])


def run_loop(state: TrainState, step_fn: Callable, get_batch: Callable[[int], Any],
             rng: jax.Array, loop: LoopConfig, *, frozen: Any = None, workdir: str | None = None,
             checkpointer: Any = None, eval_fn: Callable[[TrainState], dict] | None = None,
             should_stop: Callable[[], bool] | None = None,
             report: Callable[[str], None] | None = None) -> tuple[TrainState, dict]:
  """Trains from ``state.step`` to ``loop.total_steps``.

  A resumed run's ``metrics.jsonl`` reads as one run: lines after the start step are dropped
  first, and a window of ``log_every`` steps cut by the interruption is completed with the
  metrics its checkpoint carried, so each reported value equals an uninterrupted run's.

  Args:
    state: the (possibly restored) state.
    step_fn: the compiled step, ``(state, batch, rng, frozen) -> (state, metrics)``.
    get_batch: step number -> global batch. Random access by step makes resumption exact.
    rng: the run's base key.
    loop: steps, intervals and the tokens per step.
    frozen: passed to every step (a teacher's parameters).
    workdir: where ``metrics.jsonl`` goes (process 0 only).
    checkpointer: a ``checkpoint.CheckpointManager`` (``save(step, state, metadata, force)``,
      ``wait()``, ``metadata(step)``) or None.
    eval_fn: called every ``loop.eval_every`` steps with the state; its dict is logged.
    should_stop: polled every step; True saves a checkpoint and returns (preemption).
    report: where progress lines go (default: print on process 0).

  Returns:
    The final state and the last reported metrics.

  Raises:
    NonFiniteLossError: the loss became NaN or infinite. The state of the bad step is not
      saved; the newest checkpoint on disk is the last good one.
  """
  report = report or _default_report
  step = start = int(jax.device_get(state.step))
  reports = _Reports(MetricsWriter(workdir, start), report, loop, start,
                     _carried_metrics(checkpointer, start))
  last_metrics: dict = {}
  while step < loop.total_steps:
    state, metrics = step_fn(state, get_batch(step), rng, frozen)
    step += 1
    reports.pending.append(metrics)
    at_end = step == loop.total_steps
    if step % loop.log_every == 0 or at_end:
      last_metrics = reports.flush(step)
    if eval_fn is not None and loop.eval_every and (step % loop.eval_every == 0 or at_end):
      last_metrics.update(reports.evaluate(step, eval_fn(state)))
    stop = bool(should_stop and should_stop())
    periodic = loop.checkpoint_every and step % loop.checkpoint_every == 0
    if checkpointer is not None and (periodic or at_end or stop):
      checkpointer.save(step, state, metadata=reports.checkpoint_metadata(step), force=True)
    if stop:
      report(f"stop requested at step {step}: checkpoint saved, exiting")
      break
  if checkpointer is not None:
    checkpointer.wait()
  return state, last_metrics


def _default_report(line: str) -> None:
  if jax.process_index() == 0:
    print(line, flush=True)
