"""Selection by a budget the user states (docs/EXTRACTION.md, "Selection by a budget").

The paper returns the candidate of largest W. The budget rule returns instead the candidate of
lowest proxy error among those that meet a budget: at least K times faster than the teacher
(speed-up = i(teacher) / i(candidate), i the configured inference cost), a latency limit in
milliseconds (measured), a limit on the parameter size p. Whether a candidate meets the budget
depends on its costs only, never on its error, so the feasible set is known before anything is
trained, and a budget that nothing meets is refused before the search spends anything.

Pure arithmetic, no array library beyond NumPy:
- :func:`validate` checks ``config.select`` once, where it enters, into a :class:`Selection`;
- :func:`apply` turns a selection into a :class:`Budget` over one search space (who is
  feasible, each candidate's speed-up);
- :func:`choose` picks the budget's choice and runner-up among the trained rows of a search.

What the search trains for the budget is ``fptas._plan`` (the interval rules run over the
feasible candidates); the guarantee of the choice is ``guarantee.budget_bound``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

RULES = ("w", "budget")
"""Selection rules: "w" returns the largest W (the paper), "budget" the lowest proxy error among
the candidates that meet the budget."""

LIMITS = ("min_speedup", "max_latency_ms", "max_params")
"""The budget's fields in ``config.select``; 0 switches a limit off."""

_WHAT = {"min_speedup": "speed-up over the teacher", "max_latency_ms": "latency (ms)",
         "max_params": "parameter"}

# Costs are floats (FLOPs ratios, milliseconds): a candidate exactly at a limit must not fail it
# by a rounding error in the last digit.
_SLACK = 1e-9


@dataclasses.dataclass(frozen=True)
class Selection:
  """``config.select`` once checked by :func:`validate`.

  Attributes:
    rule: one of :data:`RULES`.
    min_speedup: K, the least speed-up over the teacher (0: no speed limit).
    max_latency_ms: the largest measured latency in ms (0: no latency limit).
    max_params: the largest p (0: no size limit).
  """

  rule: str = "w"
  min_speedup: float = 0.0
  max_latency_ms: float = 0.0
  max_params: float = 0.0

  @property
  def budget(self) -> bool:
    """Whether the budget rule is the configured one."""
    return self.rule == "budget"

  def limits(self) -> dict:
    """The budget's fields as a dict (the ones switched off included, as 0)."""
    return {field: getattr(self, field) for field in LIMITS}


def validate(block: Any, where: str = "config.select.") -> Selection:
  """Checks the selection block of a config; the one validation of the rule and its budget.

  Args:
    block: a mapping with ``rule`` and the fields of :data:`LIMITS` (missing fields take their
      defaults: rule "w", no limit), or None for the paper's rule.
    where: the prefix of the field names in messages.

  Returns:
    A :class:`Selection`. With rule "w" the limits are checked but play no part.

  Raises:
    ValueError: naming the field, its value and what is allowed; also for rule "budget" with
      every limit off (a budget that constrains nothing would just be the lowest error).
  """
  if block is None:
    return Selection()
  rule = block.get("rule", "w")
  if rule not in RULES:
    raise ValueError(f"{where}rule={rule!r}: must be 'w' (the largest W, the paper's rule) or "
                     "'budget' (the lowest proxy error among the candidates meeting the budget)")
  values = {}
  for field in LIMITS:
    value = block.get(field, 0)
    if isinstance(value, np.generic):
      value = value.item()
    if (isinstance(value, bool) or not isinstance(value, (int, float))
        or not math.isfinite(value) or value < 0):
      raise ValueError(f"{where}{field}={value!r}: must be a finite number >= 0 (0 = no "
                       f"{_WHAT[field]} limit)")
    values[field] = float(value)
  if rule == "budget" and not any(values.values()):
    raise ValueError(f"{where}rule='budget' needs a budget: set {where}min_speedup, "
                     f"{where}max_latency_ms or {where}max_params to a positive value (all "
                     "are 0, no limit)")
  return Selection(rule=rule, **values)


def describe(selection: Selection, i_label: str = "inference cost",
             size: str = "parameters") -> str:
  """The budget in words, e.g. "speed-up >= 4x over the teacher (forward FLOPs)"."""
  parts = []
  if selection.min_speedup:
    parts.append(f"speed-up >= {selection.min_speedup:g}x over the teacher (in {i_label})")
  if selection.max_latency_ms:
    parts.append(f"measured latency <= {selection.max_latency_ms:g} ms")
  if selection.max_params:
    parts.append(f"p <= {selection.max_params:,.0f} ({size})")
  return ", ".join(parts) if parts else "no limit"


@dataclasses.dataclass(frozen=True)
class Budget:
  """A budget applied to one search space (from :func:`apply`); the search trusts it.

  Attributes:
    selection: the checked config block.
    feasible: per candidate, whether it meets every limit (at least one does).
    speedup: per candidate, i(teacher) / i(candidate), or None without a teacher.
    i_ref: the teacher's inference cost i, or None.
    text: the budget in words (results.md).
    latency_ms: per candidate, the measured latency a latency limit read, or None.
  """

  selection: Selection
  feasible: tuple[bool, ...]
  speedup: tuple[float, ...] | None
  i_ref: float | None
  text: str
  latency_ms: tuple[float, ...] | None = None

  def __post_init__(self):
    if not any(self.feasible):
      raise ValueError(f"no candidate meets the budget ({self.text})")

  @property
  def count(self) -> int:
    """How many candidates meet the budget."""
    return int(sum(self.feasible))


def speed_words(ratio: float, spec: str = ".3g", than: str = "the teacher") -> str:
  """A speed ratio (the reference's time over the model's) in words.

  ``2.5`` reads "2.5x faster than the teacher" and ``0.8`` "1.25x slower than the teacher"
  (never "0.8x faster"); a ratio that prints as 1 reads "as fast as the teacher". ``spec``
  formats the number; ``than=""`` leaves out the comparison ("1.25x slower").
  """
  ratio = float(ratio)
  if not (math.isfinite(ratio) and ratio > 0):
    return f"at an unknown speed (ratio {ratio:g})" + (f" against {than}" if than else "")
  one = format(1.0, spec)
  if format(ratio, spec) == one or format(1 / ratio, spec) == one:
    return f"as fast as {than}" if than else "as fast"
  word, times = ("faster", ratio) if ratio > 1 else ("slower", 1 / ratio)
  return f"{times:{spec}}x {word}" + (f" than {than}" if than else "")


def _fail(names, p, i, speedup, latency, text) -> ValueError:
  """The error of a budget nothing meets: the figures that say how far to relax it."""
  fast, small = int(np.argmin(i)), int(np.argmin(p))
  fastest = f"the fastest candidate, {names[fast]}, has i = {i[fast]:.4g}"
  if speedup is not None:
    fastest += f" ({speed_words(speedup[fast], '.4g')})"
  if latency is not None:
    low = int(np.argmin(latency))
    fastest += f"; the lowest measured latency is {latency[low]:.4g} ms ({names[low]})"
  return ValueError(
      f"no candidate meets the budget of config.select ({text}): {fastest}; the smallest, "
      f"{names[small]}, has p = {p[small]:,.0f}. Relax config.select.min_speedup, "
      "config.select.max_latency_ms or config.select.max_params")


def apply(selection: Selection, names: Sequence[str], p: Sequence[float], i: Sequence[float],
          i_ref: float | None = None, latency_ms: Sequence[float] | None = None,
          i_label: str = "inference cost", size: str = "parameters") -> Budget:
  """Which candidates meet the budget; raises before any training when none does.

  Args:
    selection: from :func:`validate`, rule "budget".
    names: the candidates' names.
    p, i: size and inference cost per candidate, as the search uses them.
    i_ref: the teacher's inference cost in the same measure as i (needed by ``min_speedup``;
      given without it, the speed-ups are still recorded for the report).
    latency_ms: measured latency per candidate (needed by ``max_latency_ms``).
    i_label, size: what i and p are, for the budget's description.

  Returns:
    A :class:`Budget`.

  Raises:
    ValueError: a limit lacks what it needs, or no candidate meets the budget (naming the
      fastest and the smallest candidate's figures, so the user can relax it).
  """
  p = np.asarray(p, np.float64)
  i = np.asarray(i, np.float64)
  feasible = np.ones(len(names), bool)
  speedup = None
  if i_ref is not None:
    speedup = float(i_ref) / i
  if selection.min_speedup:
    if speedup is None:
      raise ValueError("config.select.min_speedup needs the teacher's inference cost (a "
                       "teacher in config.teacher)")
    feasible &= speedup >= selection.min_speedup * (1 - _SLACK)
  latency = None
  if selection.max_latency_ms:
    if latency_ms is None:
      raise ValueError("config.select.max_latency_ms needs the candidates' measured latency")
    latency = np.asarray(latency_ms, np.float64)
    feasible &= latency <= selection.max_latency_ms * (1 + _SLACK)
  if selection.max_params:
    feasible &= p <= selection.max_params * (1 + _SLACK)
  text = describe(selection, i_label, size)
  if not feasible.any():
    raise _fail(list(names), p, i, speedup, latency, text)
  return Budget(selection=selection, feasible=tuple(bool(f) for f in feasible),
                speedup=None if speedup is None else tuple(float(s) for s in speedup),
                i_ref=None if i_ref is None else float(i_ref), text=text,
                latency_ms=None if latency is None else tuple(float(v) for v in latency))


# ----------------------------------------------------------------------------- the choice


def best_error(errors: Sequence[float] | None) -> float:
  """The best-over-theta error: the smallest finite one (nan when none is finite).

  W's theta maximises g / e, which for g <= 0 is not the smallest error; the budget rule
  compares errors alone, so it takes the smallest.
  """
  finite = [float(e) for e in errors or () if math.isfinite(e)]
  return min(finite) if finite else math.nan


def order_by_error(errors: Sequence[float], keys: Sequence[Any]) -> list[int]:
  """Indices of the finite errors, lowest first; ties by ``keys`` (e.g. (i, p, name)).

  Args:
    errors: one per item (non-finite ones are left out: a diverged proxy ranks nowhere).
    keys: one sortable tie-break per item.

  Returns:
    The ranked indices.
  """
  finite = [k for k, e in enumerate(errors) if e is not None and math.isfinite(e)]
  return sorted(finite, key=lambda k: (errors[k], keys[k]))


def choose(rows: Sequence[Any], budget: Budget) -> tuple[int, int | None]:
  """The budget's choice and runner-up among the trained feasible rows.

  Lowest best-over-theta error; ties go to the smaller i, then the smaller p, then the name.

  Args:
    rows: the search's rows (``trained``, ``errors``, ``i``, ``p``, ``name``), in candidate order.
    budget: the :class:`Budget` the rows were searched under.

  Returns:
    (index of the choice, index of the runner-up or None).

  Raises:
    RuntimeError: every trained feasible candidate diverged.
  """
  pool = [k for k, r in enumerate(rows) if r.trained and budget.feasible[k]]
  ranked = order_by_error([best_error(rows[k].errors) for k in pool],
                          [(rows[k].i, rows[k].p, rows[k].name) for k in pool])
  if not ranked:
    raise RuntimeError("every trained candidate that meets the budget diverged under every "
                       "theta (non-finite proxy error); the budget rule has nothing to return")
  return pool[ranked[0]], (pool[ranked[1]] if len(ranked) > 1 else None)
