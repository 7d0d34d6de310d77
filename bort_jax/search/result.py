"""What a search returns (``fptas.run_fptas``): one :class:`Row` per candidate, the :class:`Result`.

Kept apart from the algorithm so that the tables' shape can grow (the budget rule's fields, for
one) without the search itself growing. ``fptas`` re-exports both classes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from bort_jax.search import select


@dataclasses.dataclass
class Row:
  """One candidate's line in the result table.

  Attributes:
    name: the candidate's string (e.g. ``D4-A8-H1024-I768``).
    candidate: the candidate object.
    p, i: its size and inference cost as used in W.
    gain: [(p_T - p) / p_T] * [(i_T - i) / i_T].
    interval: index of its interval (0 = smallest sizes).
    trained: whether it was a representative (and so has e and W).
    e: its error under the best theta (None if not trained; nan if every theta diverged).
    w: best W over theta (None if not trained; -inf if every theta diverged).
    theta: the theta that gave ``w`` (None if not trained).
    errors: e under every theta, in the order of ``thetas`` (None if not trained).
    extra: caller-supplied columns (e.g. params_total, params_effective, flops).
    tie: how many candidates (itself included) share its (p, i); 1 when it has no tie.
    feasible: whether it meets the budget (None when the search had no budget).
    plan: which plan trained it: "w" (W's interval plan), "budget" (the budget's only) or
      "w+budget"; "" when untrained. W's choice is made among the "w" plans only.
  """

  name: str
  candidate: Any
  p: float
  i: float
  gain: float
  interval: int
  trained: bool
  e: float | None = None
  w: float | None = None
  theta: Any = None
  errors: tuple[float, ...] | None = None
  extra: dict = dataclasses.field(default_factory=dict)
  tie: int = 1
  feasible: bool | None = None
  plan: str = ""

  @property
  def in_w_plan(self) -> bool:
    """Whether W's interval plan trained it (W's choice and its margin use these rows)."""
    return self.trained and self.plan != "budget"

  def to_dict(self) -> dict:
    """JSON-able form (the candidate as its name)."""
    out = dataclasses.asdict(self)
    out["candidate"] = self.name
    out["errors"] = list(self.errors) if self.errors is not None else None
    return out


@dataclasses.dataclass
class Result:
  """What :func:`~bort_jax.search.fptas.run_fptas` returns.

  Attributes:
    rows: one :class:`Row` per candidate, in input order.
    best_index: index into ``rows`` of W's choice (the largest W in W's plan).
    maximum_index: index of T, or None when T was given as a (p_T, i_T) point.
    p_T, i_T: T's size and cost.
    eps, rule: the interval size and rule used.
    thetas: the hyperparameter sets.
    num_pairs: (candidate, theta) pairs the plans ask for.
    num_computed: pairs computed by this call (the rest came from the journal).
    ties: the tie handling used (``fptas.TIES``).
    tie_extra: candidates W's plan trains only because they tie with a representative.
    budget: the :class:`~bort_jax.search.select.Budget` of the budget rule, or None (rule "w").
    budget_index, budget_second: the budget's choice and runner-up (None without a budget).
    budget_extra: candidates trained for the budget rule beyond W's plan.
  """

  rows: list[Row]
  best_index: int
  maximum_index: int | None
  p_T: float
  i_T: float
  eps: int
  rule: str
  thetas: list
  num_pairs: int
  num_computed: int
  ties: str = "all"
  tie_extra: int = 0
  budget: select.Budget | None = None
  budget_index: int | None = None
  budget_second: int | None = None
  budget_extra: int = 0

  @property
  def best(self) -> Row:
    """W's choice's row (the paper's rule)."""
    return self.rows[self.best_index]

  @property
  def chosen(self) -> Row:
    """The configured rule's choice: the budget's when there is a budget, else W's."""
    return self.rows[self.budget_index] if self.budget is not None else self.best

  def sorted_rows(self) -> list[Row]:
    """Rows by W, largest first, W's plan before the budget's extra trainings (so rank 1 is
    W's choice); untrained rows last, by size."""
    def key(r):
      w = r.w if r.w is not None else -math.inf
      return (not r.trained, not r.in_w_plan, -w if math.isfinite(w) else math.inf, r.p, r.name)
    return sorted(self.rows, key=key)

  def selection(self) -> dict:
    """The selection rule and, with a budget, its choice: results.json's ``select``."""
    if self.budget is None:
      return {"rule": "w", "choice": self.best.name}
    row = self.chosen
    second = self.rows[self.budget_second].name if self.budget_second is not None else None
    speedup = self.budget.speedup
    return {
        "rule": "budget", "budget": self.budget.text, "limits": self.budget.selection.limits(),
        "feasible": self.budget.count,
        "feasible_trained": sum(1 for r in self.rows if r.trained and r.feasible),
        "choice": row.name, "e": select.best_error(row.errors), "p": row.p, "i": row.i,
        "speedup": speedup[self.budget_index] if speedup is not None else None,
        "i_ref": self.budget.i_ref, "runner_up": second, "extra_trainings": self.budget_extra,
        "w_choice": self.best.name}

  def to_dict(self) -> dict:
    """JSON-able summary plus the table; ``best`` is W's choice, ``chosen`` the configured
    rule's (the one written to chosen_arch.txt)."""
    return {
        "best": self.best.name, "best_w": self.best.w, "chosen": self.chosen.name,
        "select": self.selection(),
        "maximum_point": (self.rows[self.maximum_index].name
                          if self.maximum_index is not None else None),
        "p_T": self.p_T, "i_T": self.i_T, "eps": self.eps, "rule": self.rule,
        "thetas": self.thetas, "num_pairs": self.num_pairs, "num_computed": self.num_computed,
        "ties": self.ties, "tie_extra": self.tie_extra,
        "rows": [r.to_dict() for r in self.rows],
    }
