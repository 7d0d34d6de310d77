"""Population members: a hyperparameter setting and a seed; shared settings; reports.

A :class:`Member` is what varies inside one fine-tuning population (``population.py``): its
learning rate, weight decay, warmup fraction and seed, all passed to the compiled program as
data. :class:`Settings` is what the members share (one program). This module also fixes the
member's random streams (:func:`init_key`, :func:`dropout_key`, :func:`batch_indices`: functions
of the seed and the step only) and how a population is reported: per setting, mean, standard
deviation and best over the seeds, every seed's value kept (:func:`summarize`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from bort_jax.core import members as members_lib
from bort_jax.core import optim



# ----------------------------------------------------------------------------- members


@dataclasses.dataclass(frozen=True)
class Member:
  """One member of a population: a hyperparameter setting and a seed.

  Attributes:
    lr: peak learning rate.
    weight_decay: decoupled weight decay (0 switches it off).
    warmup: warmup as a fraction of ``total_steps``, in [0, 1].
    seed: seeds the task head's init, the dropout masks and the data order.
  """

  lr: float
  weight_decay: float = 0.0
  warmup: float = 0.0
  seed: int = 0

  def __post_init__(self):
    if not (math.isfinite(self.lr) and self.lr > 0):
      raise ValueError(f"member lr must be a finite positive number, got {self.lr!r}")
    if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
      raise ValueError(f"member weight_decay must be finite and >= 0, got {self.weight_decay!r}")
    if not 0.0 <= self.warmup <= 1.0:
      raise ValueError(f"member warmup is a fraction of the run in [0, 1], got {self.warmup!r}")
    if isinstance(self.seed, bool) or int(self.seed) != self.seed or self.seed < 0:
      raise ValueError(f"member seed must be a non-negative int, got {self.seed!r}")

  @property
  def setting(self) -> dict:
    """The hyperparameters without the seed (what a report groups by)."""
    return {"lr": self.lr, "weight_decay": self.weight_decay, "warmup": self.warmup}


def grid(lrs: Sequence[float], seeds: Sequence[int] = (0,),
         weight_decays: Sequence[float] = (0.0,), warmups: Sequence[float] = (0.0,)
         ) -> list[Member]:
  """Every (lr, weight decay, warmup) setting crossed with every seed, settings outermost.

  Args:
    lrs: peak learning rates.
    seeds: seeds run for each setting.
    weight_decays: decoupled weight decays.
    warmups: warmup fractions.

  Returns:
    ``len(lrs) * len(weight_decays) * len(warmups) * len(seeds)`` members.
  """
  return [Member(float(lr), float(wd), float(w), int(s))
          for lr in lrs for wd in weight_decays for w in warmups for s in seeds]


@dataclasses.dataclass(frozen=True)
class Settings:
  """What every member of one population shares (one compiled program).

  Attributes:
    total_steps: optimizer steps of each member.
    batch_size: training batch (rows; multiple-choice rows hold every choice).
    optimizer: ``"adam_nobc"`` (Bort's Adam without bias correction) or ``"adamw"``.
    b1, b2, eps: Adam's constants.
    clip_norm: global-norm clipping (0: off).
    dropout: train with the model config's dropout (False switches it off).
    eval_every: steps between dev evaluations (0: only after the last step).
    eval_batch_size: rows per forward pass when evaluating.
    mode: ``"vmap"``, ``"map"`` or ``"auto"`` (map on CPU, vmap elsewhere).
  """

  total_steps: int
  batch_size: int = 8
  optimizer: str = "adam_nobc"
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-6
  clip_norm: float = 0.0
  dropout: bool = True
  eval_every: int = 0
  eval_batch_size: int = 32
  mode: str = "auto"

  def __post_init__(self):
    if self.total_steps < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
      raise ValueError(f"total_steps, batch_size and eval_batch_size must be >= 1, got "
                       f"{self.total_steps}, {self.batch_size}, {self.eval_batch_size}")
    if self.eval_every < 0:
      raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
    members_lib.check_mode(self.mode)
    if self.optimizer not in optim.OPTIMIZER_NAMES:
      raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of "
                       f"{optim.OPTIMIZER_NAMES}")

  def resolved_mode(self) -> str:
    """``mode`` with ``"auto"`` resolved for the default backend."""
    return members_lib.resolve_mode(self.mode)

  def direction_config(self) -> dict:
    """The optimizer fields of ``core.optim.make_direction`` (lr, decay and schedule are data)."""
    return {"name": self.optimizer, "b1": self.b1, "b2": self.b2, "eps": self.eps,
            "clip_norm": self.clip_norm}


def init_key(seed) -> jax.Array:
  """The key of a member's fresh parts (its task head): ``setup.init_params``' rule."""
  return jax.random.fold_in(jax.random.key(seed), 2)


def dropout_key(seed) -> jax.Array:
  """The base dropout key of a member (``loop.py``'s); step ``t`` uses ``fold_in(key, t)``."""
  return jax.random.key(seed)


def batch_indices(seed: int, step: int, num_examples: int, batch_size: int) -> np.ndarray:
  """Rows of the training split that step ``step`` of a member seeded ``seed`` trains on.

  ``prepare.train_batch``'s order: epoch ``e = step // ceil(N / B)`` visits the rows in the order
  ``default_rng([seed, e]).permutation(N)``; a final partial batch is padded with -1 (rows of
  weight 0), so every row is seen once per epoch.

  Args:
    seed: the member's seed.
    step: the step number (0-based).
    num_examples: rows in the training split.
    batch_size: rows per step.

  Returns:
    ``[batch_size]`` int32 row indices, -1 on padding.
  """
  if num_examples < 1:
    raise ValueError("the training split is empty")
  per_epoch = -(-num_examples // batch_size)
  epoch, slot = divmod(int(step), per_epoch)
  order = np.random.default_rng([int(seed), epoch]).permutation(num_examples)
  rows = order[slot * batch_size:(slot + 1) * batch_size]
  return np.concatenate([rows, np.full(batch_size - len(rows), -1)]).astype(np.int32)


# ----------------------------------------------------------------------------- reports


def _stats(values: Sequence[float]) -> dict:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
          "best": float(v.max()), "values": [float(x) for x in v]}


def summarize(members: Sequence[Member], member_metrics: Sequence[Mapping[str, float]]
              ) -> list[dict]:
  """Groups members by setting: mean, standard deviation and best over seeds, per metric.

  Args:
    members: the population.
    member_metrics: each member's metrics, aligned with ``members``.

  Returns:
    One dict per setting, in first-seen order: the setting, ``seeds`` and for every metric
    ``{"mean", "std" (ddof=1; 0 for one seed), "best", "values"}``.
  """
  groups: dict[tuple, list[int]] = {}
  for i, m in enumerate(members):
    groups.setdefault(tuple(m.setting.items()), []).append(i)
  rows = []
  for key, idx in groups.items():
    row = dict(key)
    row["seeds"] = [members[i].seed for i in idx]
    for name in member_metrics[idx[0]]:
      row[name] = _stats([member_metrics[i][name] for i in idx])
    rows.append(row)
  return rows


def format_table(rows: Sequence[Mapping], metric: str) -> str:
  """A Markdown table of :func:`summarize` rows for one metric (mean +- std, best, n)."""
  lines = [f"| lr | weight decay | warmup | {metric} mean +- std | best | seeds |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    s = r[metric]
    lines.append(f"| {r['lr']:g} | {r['weight_decay']:g} | {r['warmup']:g} | "
                 f"{s['mean']:.4f} +- {s['std']:.4f} | {s['best']:.4f} | {len(r['seeds'])} |")
  return "\n".join(lines)


def members_from_config(config: Any) -> list[Member]:
  """``config.population``'s grid; an empty field takes the single value of ``config.optim``."""
  pop = config.population
  seeds = pop.seeds
  seeds = list(range(int(seeds))) if isinstance(seeds, int) else [int(s) for s in seeds]
  return grid(list(pop.lrs) or [config.optim.lr], seeds or [int(config.seed)],
              list(pop.weight_decays) or [config.optim.weight_decay],
              list(pop.warmups) or [config.optim.warmup])


def settings_from_config(config: Any, total_steps: int, mode: str = "auto") -> Settings:
  """The shared :class:`Settings` of a ``configs/finetune.py`` config."""
  return Settings(total_steps=int(total_steps), batch_size=int(config.batch_size),
                  optimizer=config.optim.name, b1=float(config.optim.b1),
                  b2=float(config.optim.b2), eps=float(config.optim.eps),
                  clip_norm=float(config.optim.clip_norm or 0.0),
                  eval_every=int(config.train.eval_every),
                  eval_batch_size=int(config.eval_batch_size), mode=mode)


def best_index(values: Sequence[float]) -> int | None:
  """The one "best" rule of fine-tuning: the index of the highest finite value, the first of
  equal ones; None when no value is finite.

  "First" is the earliest evaluation (a run's best step), the first member in member order
  (a population's best seed, the model ``save_best`` writes), the first setting (the
  report's best setting by mean over seeds) and the earliest round (Agora's best): a later
  one has to be strictly better to replace it, so a tie never moves the choice and a
  resumed run picks what an uninterrupted one did.
  """
  best = None
  for k, value in enumerate(values):
    value = float(value)
    if math.isfinite(value) and (best is None or value > float(values[best])):
      best = k
  return best
