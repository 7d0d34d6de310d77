"""Proxy hyperparameter sets (Theta): the one check of a set, and its typed form.

A theta enters the search once, through ``fptas.validate(check_theta=...)``; the population
trainer (``proxy.py``, which re-exports these names) then trusts a :class:`Theta`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

THETA_KEYS = ("lr", "weight_decay")
"""The hyperparameters a proxy training understands."""


class Theta(dict):
  """A checked proxy hyperparameter set, made by :func:`check_theta`.

  It keeps the mapping as the user wrote it (so its journal key and its column in the result
  table do not change) and adds the typed values the trainer uses.
  """

  @property
  def lr(self) -> float:
    return float(self["lr"])

  @property
  def weight_decay(self) -> float:
    return float(self.get("weight_decay", 0.0))


def check_theta(theta: Mapping[str, Any]) -> Theta:
  """Validates a hyperparameter set: ``lr`` (required, > 0), ``weight_decay`` (default 0).

  Args:
    theta: a mapping with keys from ``THETA_KEYS``; a :class:`Theta` is returned as it is.

  Returns:
    The set as a :class:`Theta`.
  """
  if isinstance(theta, Theta):
    return theta
  if not isinstance(theta, Mapping):
    raise ValueError(f"theta must be a mapping like {{'lr': 1e-4}}, got {theta!r}")
  unknown = set(theta) - set(THETA_KEYS)
  if unknown:
    raise ValueError(f"unknown hyperparameters {sorted(unknown)} in theta {dict(theta)}; "
                     f"proxy training understands {THETA_KEYS}")
  if "lr" not in theta:
    raise ValueError(f"theta {dict(theta)} needs a learning rate 'lr'")
  checked = Theta(theta)
  if not (math.isfinite(checked.lr) and checked.lr > 0):
    raise ValueError(f"theta {dict(theta)}: 'lr' must be a finite positive number")
  if not (math.isfinite(checked.weight_decay) and checked.weight_decay >= 0):
    raise ValueError(f"theta {dict(theta)}: 'weight_decay' must be finite and >= 0")
  return checked
