"""Optimizers as optax transforms: Bort's Adam without bias correction, decay masks, schedules.

Bort's optimizer (docs/BORT.md section 4) is Adam *without* bias correction, with ``eps``
added after the square root, decoupled weight decay that skips LayerNorm parameters and biases,
global-norm clipping and a linear warmup followed by a linear decay to zero.
:func:`make_optimizer` builds

    chain(clip_by_global_norm(clip_norm),
          scale_by_adam_no_bias_correction(b1, b2, eps)   # or optax's bias-corrected Adam
          add_decayed_weights(weight_decay, mask=decay_mask),
          scale_by_learning_rate(schedule))

so one step is ``p <- p - lr_t * (m_t / (sqrt(v_t) + eps) + wd * p)``, computed from the
clipped gradient. The weight decay is decoupled (AdamW, Loshchilov & Hutter): it is added to the
Adam direction rather than to the gradient, so it never enters ``m`` or ``v``, and like AdamW and
BERT's ``AdamWeightDecay`` it is scaled by the scheduled learning rate (the effective per-step
shrink is ``lr_t * wd``).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

OPTIMIZER_NAMES = ("adam_nobc", "adamw")


class ScaleByAdamNoBiasCorrectionState(NamedTuple):
  """First and second moment estimates, one per parameter."""

  mu: optax.Updates
  nu: optax.Updates


def scale_by_adam_no_bias_correction(b1: float = 0.9, b2: float = 0.999,
                                     eps: float = 1e-6) -> optax.GradientTransformation:
  """Adam's direction without bias correction: ``m / (sqrt(v) + eps)``.

  ``m <- b1 m + (1 - b1) g`` and ``v <- b2 v + (1 - b2) g^2`` start at zero and are used as
  they are (no division by ``1 - b^t``), so the first updates are smaller than Adam's; this is
  the BERT / Bort optimizer.

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to ``sqrt(v)`` (after the square root).

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`ScaleByAdamNoBiasCorrectionState`.
  """
  for name, value in (("b1", b1), ("b2", b2)):
    if not 0.0 <= value < 1.0:
      raise ValueError(f"{name} must be in [0, 1), got {value}.")
  if eps < 0:
    raise ValueError(f"eps must be non-negative, got {eps}.")

  def init_fn(params):
    zeros = lambda p: jnp.zeros_like(p)
    return ScaleByAdamNoBiasCorrectionState(mu=jax.tree.map(zeros, params),
                                            nu=jax.tree.map(zeros, params))

  def update_fn(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda g, m: b1 * m + (1 - b1) * g, updates, state.mu)
    nu = jax.tree.map(lambda g, v: b2 * v + (1 - b2) * jnp.square(g), updates, state.nu)
    direction = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
    return direction, ScaleByAdamNoBiasCorrectionState(mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def _is_layer_norm(name: str) -> bool:
  lowered = name.lower()
  return "layernorm" in lowered or "layer_norm" in lowered


def decay_mask(params: Any) -> Any:
  """Which parameters receive weight decay.

  False for every LayerNorm parameter (any path component containing ``LayerNorm`` or
  ``layer_norm``, case-insensitive, which covers ``.../LayerNorm/scale`` and ``.../bias``) and
  for every bias (leaf named ``bias``, including ``mlm_head/bias``); True for everything else
  (kernels, embeddings).

  Args:
    params: a parameter pytree of nested dicts (the model's layout).

  Returns:
    A pytree of Python bools with the structure of ``params``.
  """

  def decays(path, _):
    if any(_is_layer_norm(str(name)) for name in path):
      return False
    return path[-1] != "bias"

  return traverse_util.path_aware_map(decays, params)


def make_schedule(peak_lr: float, total_steps: int, warmup_fraction: float | None = None,
                  warmup_steps: int | None = None) -> optax.Schedule:
  """Linear warmup to ``peak_lr`` then linear decay to 0 at ``total_steps``.

  The schedule is indexed by the number of updates already applied (optax's count: 0 for the
  first update). With ``W`` warmup steps and ``T`` total steps,

      lr(s) = peak * min((s + 1) / W, (T - s) / (T - W)),  clipped to [0, peak],

  so the first update already moves (``peak / W``), updates ``W - 1`` and ``W`` use the peak,
  the last update (``s = T - 1``) uses ``peak / (T - W)`` and every ``s >= T`` gets 0. With
  ``W = 0`` it is a pure linear decay ``peak * (T - s) / T``.

  Args:
    peak_lr: the learning rate at the end of the warmup.
    total_steps: number of updates of the run (``T >= 1``).
    warmup_fraction: ``W = round(fraction * T)``; one of this and ``warmup_steps``.
    warmup_steps: ``W`` directly.

  Returns:
    A function from the step count to the learning rate (float32).
  """
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
  if warmup_fraction is not None and warmup_steps is not None:
    raise ValueError("pass warmup_fraction or warmup_steps, not both.")
  if warmup_fraction is not None:
    if not 0.0 <= warmup_fraction <= 1.0:
      raise ValueError(f"warmup_fraction must be in [0, 1], got {warmup_fraction}.")
    warmup_steps = int(round(warmup_fraction * total_steps))
  warmup_steps = int(warmup_steps or 0)
  if not 0 <= warmup_steps <= total_steps:
    raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got "
                     f"{warmup_steps}.")
  peak = float(peak_lr)

  def schedule(count):
    return peak * schedule_factor(count, total_steps, warmup_steps)

  return schedule


def schedule_factor(count: Any, total_steps: int, warmup_steps: Any) -> jax.Array:
  """:func:`make_schedule`'s factor (peak 1) at update ``count``; ``warmup_steps`` may be a
  traced value (a population member's warmup): ``min((s + 1) / W, (T - s) / (T - W))``
  clipped to [0, 1], a pure linear decay ``(T - s) / T`` when ``W = 0``."""
  s = jnp.asarray(count, jnp.float32)
  total = jnp.float32(total_steps)
  w = jnp.asarray(warmup_steps, jnp.float32)
  decay = (total - s) / jnp.maximum(total - w, 1.0)
  rise = jnp.where(w > 0, (s + 1.0) / jnp.maximum(w, 1.0), jnp.inf)
  return jnp.clip(jnp.minimum(rise, decay), 0.0, 1.0)


def _get(cfg: Any, name: str, default: Any = None) -> Any:
  if isinstance(cfg, Mapping):
    return cfg.get(name, default)
  return getattr(cfg, name, default) if hasattr(cfg, name) else default


def schedule_from_config(cfg: Any, total_steps: int | None = None) -> optax.Schedule:
  """The learning-rate schedule of :func:`make_optimizer` (for logging the current lr).

  ``warmup`` is a fraction of ``total_steps`` when it is a float and a number of steps when it
  is an int; an explicit ``warmup_steps`` field wins over it.

  Args:
    cfg: the optimizer fields (see :func:`make_optimizer`).
    total_steps: the run's length; wins over ``cfg.total_steps``, so a config can keep its
      step count in one place (its train block).

  Returns:
    A function from the step count to the learning rate.
  """
  total = total_steps if total_steps is not None else _get(cfg, "total_steps")
  if total is None:
    raise ValueError("optimizer config needs total_steps for the learning-rate schedule.")
  lr = _get(cfg, "lr")
  if lr is None:
    raise ValueError("optimizer config needs lr (the peak learning rate).")
  warmup_steps = _get(cfg, "warmup_steps")
  if warmup_steps is not None:
    return make_schedule(lr, int(total), warmup_steps=int(warmup_steps))
  warmup = _get(cfg, "warmup", 0.0)
  if isinstance(warmup, bool):
    raise ValueError(f"warmup must be a float fraction or an int step count, got {warmup!r}.")
  if isinstance(warmup, int):
    return make_schedule(lr, int(total), warmup_steps=warmup)
  return make_schedule(lr, int(total), warmup_fraction=float(warmup))


def _direction_parts(cfg: Any) -> list[optax.GradientTransformation]:
  """Global-norm clipping (``clip_norm``; 0 or None: none), then Adam (``name``, ``b1``,
  ``b2``, ``eps``): the first links of :func:`make_optimizer`'s chain."""
  name = _get(cfg, "name", "adam_nobc")
  b1, b2 = float(_get(cfg, "b1", 0.9)), float(_get(cfg, "b2", 0.999))
  eps = float(_get(cfg, "eps", 1e-6))
  if name == "adam_nobc":
    adam = scale_by_adam_no_bias_correction(b1, b2, eps)
  elif name == "adamw":
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=0.0)
  else:
    raise ValueError(f"unknown optimizer name {name!r}; expected one of {OPTIMIZER_NAMES}.")
  clip_norm = _get(cfg, "clip_norm")
  return ([optax.clip_by_global_norm(float(clip_norm))] if clip_norm else []) + [adam]


def make_direction(cfg: Any) -> optax.GradientTransformation:
  """:func:`make_optimizer`'s chain without its weight decay and learning rate: the Adam
  direction of the clipped gradients.

  A population of fine-tuning runs applies the rest itself, with each member's learning rate,
  decay and warmup as traced values (``finetune/steps.train_step``: ``p - lr(s) * (d + wd *
  p)`` with :func:`schedule_factor`), which is what the full chain computes.
  """
  parts = _direction_parts(cfg)
  return optax.chain(*parts) if len(parts) > 1 else parts[0]


def make_optimizer(cfg: Any, *, total_steps: int | None = None, lr: Any = None,
                   weight_decay: Any = None) -> optax.GradientTransformation:
  """Builds the optimizer from a config (the one optimizer chain of the project).

  Args:
    cfg: an ``ml_collections.ConfigDict`` or a dict with ``name`` (``"adam_nobc"``: Bort's Adam
      without bias correction; ``"adamw"``: optax's bias-corrected Adam, eps also after the
      root), ``lr`` (peak), ``weight_decay`` (decoupled, masked by :func:`decay_mask`; default
      0), ``b1`` (0.9), ``b2`` (0.999), ``eps`` (1e-6), ``clip_norm`` (global-norm clip; 0 or
      None disables it), ``warmup`` (float fraction or int steps, default 0) or
      ``warmup_steps``, and ``total_steps``.
    total_steps: the run's length; wins over ``cfg.total_steps``.
    lr: a constant learning rate instead of the config's schedule (the schedule fields are
      then ignored). It may be a traced array: a population program builds one chain per
      member inside the compiled function, so members' learning rates are data.
    weight_decay: replaces the config's weight decay; may be traced like ``lr``, so it is not
      checked here (the caller checks it) and the decay transform is always included.

  Returns:
    ``chain(clip, adam, decayed weights, scale_by_learning_rate(lr or schedule))``.
  """
  parts = _direction_parts(cfg)
  if weight_decay is None:
    weight_decay = float(_get(cfg, "weight_decay", 0.0) or 0.0)
    if weight_decay < 0:
      raise ValueError(f"weight_decay must be non-negative, got {weight_decay}.")
  if not isinstance(weight_decay, float) or weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
  if lr is None:
    lr = schedule_from_config(cfg, total_steps)
  parts.append(optax.scale_by_learning_rate(lr))
  return optax.chain(*parts)
