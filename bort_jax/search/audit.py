"""The proxy audit and the explanation of W, as pure arithmetic (docs/EXTRACTION.md, "Proxy audit").

The search ranks candidates by the error e after s proxy steps. Whether that ranking means
anything is a measurable question: train a sample of the candidates for S >> s steps and ask
whether the two errors order them alike (:func:`kendall_tau_b`, :func:`spearman_rho`) and
whether the search's choice (W's, or the budget rule's lowest feasible error) survives the
longer errors (:func:`audit_summary`). :func:`choice_margin` says how close W's choice was,
:func:`size_decides` whether the errors could have changed it at all. Nothing here trains
anything: ``pipelines/extract_audit.py`` trains the sample with the search's own population
trainer and hands the errors to these functions.

The statistics are written here rather than taken from scipy so that the search's pure layer
needs no scientific stack; the tests check them against ``scipy.stats`` on hand and random
cases.
"""

from __future__ import annotations

import math
import random
from typing import Any, Sequence

import numpy as np

from bort_jax.search import select


# ----------------------------------------------------------------------------- statistics


def _pairs(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.ndim != 1 or x.shape != y.shape:
    raise ValueError(f"x and y must be 1-D of the same length, got shapes {x.shape}, {y.shape}")
  if not (np.isfinite(x).all() and np.isfinite(y).all()):
    raise ValueError("x and y must be finite (drop diverged candidates first)")
  return x, y


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
  """Kendall's tau-b: (C - D) / sqrt((n0 - n1) (n0 - n2)).

  C and D count the concordant and discordant pairs, n0 = n (n - 1) / 2 all pairs, n1 the
  pairs tied in x and n2 those tied in y (a pair tied in both counts in n1 and n2). tau-b is 1
  for the same order, -1 for the reversed one, and stays in [-1, 1] with ties.

  Args:
    x, y: paired finite values.

  Returns:
    tau-b; nan when fewer than two values or when x or y is constant (no order to compare).
  """
  x, y = _pairs(x, y)
  n = len(x)
  if n < 2:
    return math.nan
  upper = np.triu_indices(n, k=1)
  dx = np.sign(x[:, None] - x[None, :])[upper]
  dy = np.sign(y[:, None] - y[None, :])[upper]
  n0 = n * (n - 1) / 2
  n1 = float(np.sum(dx == 0))
  n2 = float(np.sum(dy == 0))
  denominator = math.sqrt((n0 - n1) * (n0 - n2))
  if denominator == 0:
    return math.nan
  return float(np.sum(dx * dy)) / denominator


def average_ranks(x: Sequence[float]) -> np.ndarray:
  """Ranks 1..n of x, tied values sharing the mean of the ranks they span."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x), np.float64)
  start = 0
  while start < len(x):
    stop = start
    while stop + 1 < len(x) and x[order[stop + 1]] == x[order[start]]:
      stop += 1
    ranks[order[start:stop + 1]] = (start + stop) / 2 + 1
    start = stop + 1
  return ranks


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman's rho: Pearson's correlation of the average ranks (ties share their ranks).

  Args:
    x, y: paired finite values.

  Returns:
    rho in [-1, 1]; nan when fewer than two values or when x or y is constant.
  """
  x, y = _pairs(x, y)
  if len(x) < 2:
    return math.nan
  rx = average_ranks(x) - (len(x) + 1) / 2
  ry = average_ranks(y) - (len(y) + 1) / 2
  denominator = math.sqrt(float(np.sum(rx * rx)) * float(np.sum(ry * ry)))
  if denominator == 0:
    return math.nan
  return float(np.sum(rx * ry)) / denominator


# ----------------------------------------------------------------------------- the sample


def stratified_sample(p: Sequence[float], size: int, seed: int,
                      include: Sequence[int] = ()) -> list[int]:
  """About ``size`` indices spread along p, plus the ``include`` ones (chosen, runner-up).

  The indices sorted by p (ties by index) are cut into ``size`` strata of nearly equal count,
  and one member of each is drawn with ``random.Random(seed)``: every part of the size range
  is represented, and which member of a stratum (for instance which of a tie in p) is left to
  the seed rather than to the sort order.

  Args:
    p: the size of each candidate that may be sampled.
    size: the number of strata (>= 1); all indices when it is at least len(p).
    seed: the draw's seed.
    include: indices always in the sample.

  Returns:
    Distinct indices into ``p``, sorted by p (ties by index).
  """
  n = len(p)
  if isinstance(size, bool) or not isinstance(size, int) or size < 1:
    raise ValueError(f"the audit sample size must be an int >= 1, got {size!r}")
  order = sorted(range(n), key=lambda k: (float(p[k]), k))
  rng = random.Random(seed)
  picked = set(int(k) for k in include)
  if size >= n:
    picked.update(order)
  else:
    for stratum in range(size):
      members = order[stratum * n // size:(stratum + 1) * n // size]
      picked.add(members[rng.randrange(len(members))])
  return [k for k in order if k in picked]


# ------------------------------------------------------------------------- W, explained


def best_two(ws: Sequence[float]) -> tuple[int, int | None]:
  """Indices of the largest and the second largest finite W (ties: the earlier index)."""
  finite = [k for k, w in enumerate(ws) if w is not None and math.isfinite(w)]
  if not finite:
    raise ValueError("no finite W to rank")
  ranked = sorted(finite, key=lambda k: (-ws[k], k))
  return ranked[0], (ranked[1] if len(ranked) > 1 else None)


def choice_margin(w_best: float, w_second: float | None) -> dict:
  """How far the errors must move for the runner-up to overtake the winner.

  W = g / e, so the winner (W1 = g1 / e1) and the runner-up (W2 = g2 / e2) swap when
  e1 rises to g1 / W2, i.e. by the relative amount W1 / W2 - 1, or when e2 falls to g2 / W1,
  i.e. by 1 - W2 / W1. Both are 0 for a tie in W. A runner-up with W2 <= 0 (no gain) cannot
  overtake by any positive error: the rise is infinite and no fall suffices (None).

  Args:
    w_best: the winner's W (> 0).
    w_second: the runner-up's W, or None when only one candidate was trained.

  Returns:
    {"winner_e_rise": relative rise (>= 0, inf if none suffices),
     "runner_up_e_fall": relative fall in [0, 1) or None if none suffices}.
  """
  if not (w_best is not None and math.isfinite(w_best) and w_best > 0):
    raise ValueError(f"the winner's W must be finite and > 0 for a margin, got {w_best!r}")
  if w_second is None or not math.isfinite(w_second) or w_second <= 0:
    return {"winner_e_rise": math.inf, "runner_up_e_fall": None}
  if w_second > w_best:
    raise ValueError(f"the runner-up's W {w_second} exceeds the winner's {w_best}")
  return {"winner_e_rise": w_best / w_second - 1.0, "runner_up_e_fall": 1.0 - w_second / w_best}


def size_decides(errors: Sequence[float], gains: Sequence[float]) -> dict:
  """Whether the errors vary less than the cost gains over the trained candidates.

  The spread of the errors is max(e) / min(e) and the spread of the gains max(g) / min(g),
  both over the trained candidates with a finite error and a positive gain (g <= 0 can never
  be chosen). W = g / e, so when e spreads less than g, W's order is mostly the order of g,
  that is of size and inference cost: the proxy then hardly takes part in the choice.

  Args:
    errors, gains: per trained candidate.

  Returns:
    {"error_spread", "gain_spread", "warn"}; the spreads are None (and warn False) when fewer
    than two candidates qualify.
  """
  pairs = [(float(e), float(g)) for e, g in zip(errors, gains)
           if e is not None and math.isfinite(e) and e > 0 and g is not None and g > 0]
  if len(pairs) < 2:
    return {"error_spread": None, "gain_spread": None, "warn": False}
  es = [e for e, _ in pairs]
  gs = [g for _, g in pairs]
  error_spread, gain_spread = max(es) / min(es), max(gs) / min(gs)
  return {"error_spread": error_spread, "gain_spread": gain_spread,
          "warn": error_spread < gain_spread}


# ----------------------------------------------------------------------------- the verdict


def audit_summary(names: Sequence[str], gains: Sequence[float], short: Sequence[float],
                  long: Sequence[float], chosen: str, tau_min: float,
                  feasible: Sequence[bool] | None = None,
                  keys: Sequence[Any] | None = None) -> dict:
  """Compares the s-step and the S-step errors of the audited sample.

  The proxy is trusted on this run when Kendall's tau-b between the two errors is at least
  ``tau_min`` and the search's rule, applied to the S-step errors, picks within the sample the
  candidate the search chose. For W (``feasible`` None) that is the largest g / e (the sample
  always holds W's choice and its runner-up); for the budget rule it is the lowest S-step error
  among the sampled candidates that meet the budget (the sample holds the budget's choice and
  its runner-up), ties broken by ``keys`` as the search breaks them.

  Args:
    names: the sampled candidates.
    gains: their cost gains g.
    short, long: their best-over-theta errors after s and after S steps (a diverged candidate
      has a non-finite error and is left out of the statistics).
    chosen: the search's choice (one of ``names``).
    tau_min: the threshold on tau-b.
    feasible: per sampled candidate, whether it meets the budget; None for W's rule.
    keys: per sampled candidate, the budget rule's tie-break (i, p, name); default the order.

  Returns:
    A JSON-able dict: tau, rho, the rule, the choice under each error, whether it changed, the
    verdict.
  """
  if chosen not in names:
    raise ValueError(f"the audit sample must hold the chosen candidate {chosen!r}")
  keep = [k for k in range(len(names)) if math.isfinite(short[k]) and math.isfinite(long[k])
          and long[k] > 0]
  tau = kendall_tau_b([short[k] for k in keep], [long[k] for k in keep])
  rho = spearman_rho([short[k] for k in keep], [long[k] for k in keep])
  choice_long = None  # stays None when every candidate the rule looks at diverged
  if feasible is not None:
    pool = [k for k in keep if feasible[k]]
    keys = list(range(len(names))) if keys is None else keys
    ranked = select.order_by_error([long[k] for k in pool], [keys[k] for k in pool])
    if ranked:
      choice_long = names[pool[ranked[0]]]
  else:
    w_long = [gains[k] / long[k] for k in keep]
    if w_long and any(math.isfinite(w) for w in w_long):
      best_long, _ = best_two(w_long)
      choice_long = names[keep[best_long]]
  changed = choice_long != chosen
  trusted = math.isfinite(tau) and tau >= tau_min and not changed
  return {"kendall_tau_b": tau, "spearman_rho": rho, "compared": len(keep),
          "diverged": len(names) - len(keep), "rule": "w" if feasible is None else "budget",
          "chosen": chosen, "choice_long": choice_long, "choice_changed": changed,
          "tau_min": tau_min, "trusted": trusted}


def verdict_line(summary: dict, short_steps: int, long_steps: int) -> str:
  """The one line results.md gives the audit."""
  tau, rho = summary["kendall_tau_b"], summary["spearman_rho"]
  # The budget rule's choice is the lowest error among the sampled candidates meeting it.
  rule = "the budget rule" if summary.get("rule") == "budget" else "W"
  if summary["choice_long"] is None:
    change = f"every sampled candidate diverged over the {long_steps} steps"
  elif summary["choice_changed"]:
    change = f"{rule} with the {long_steps}-step errors picks {summary['choice_long']} instead"
  else:
    change = f"{rule}'s choice is unchanged with them"
  word = "can be trusted" if summary["trusted"] else "can NOT be trusted"
  return (f"proxy audit: the {short_steps}-step proxy {word} on this run (threshold: "
          f"Kendall tau-b >= {summary['tau_min']:g} and an unchanged choice): over "
          f"{summary['compared']} candidates trained for {long_steps} steps, tau-b = {tau:.3f}, "
          f"Spearman rho = {rho:.3f}; {change}.")
