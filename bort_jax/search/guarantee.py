"""The approximation guarantee of the interval rules (docs/EXTRACTION.md, "Guarantee").

Pure arithmetic on p, i and the measured errors: :func:`guarantee_bound` is the a priori ratio
rho of W's choice, :func:`certified_ratio` the a posteriori certificate of a finished search,
:func:`budget_bound` the a priori additive bound of the budget rule's choice
(docs/EXTRACTION.md, "Selection by a budget"). ``fptas`` re-exports all three.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from bort_jax.search.formula import check_positive, raw_gain


def guarantee_bound(p: Sequence[float], i: Sequence[float], p_T: float, i_T: float,
                    trained: Sequence[int], lipschitz: float, e_min: float) -> float:
  """A priori lower bound on W(returned) / W(exhaustive optimum).

  Assumptions (docs/EXTRACTION.md): the best-over-theta proxy error e satisfies
  (A1) e(b) >= e_min > 0 for every candidate, and
  (A2) |e(b) - e(b')| <= lipschitz * |p(b) - p(b')| / p_T (Lipschitz in the relative size);
  and the exhaustive optimum W* is positive. Then for every candidate b with gain g(b) > 0
  and every trained r with g(r) >= 0:
      W(r) / W(b) >= [g(r) / g(b)] * e_min / (e_min + lipschitz * |p(r) - p(b)| / p_T),
  and the returned candidate has W >= W(r). The bound is the minimum over b of the best
  such r. It does not use any measured error, so it can be computed before training.

  Args:
    p, i: size and inference cost of every candidate.
    p_T, i_T: the maximum point's size and cost.
    trained: indices of the trained candidates (the representatives).
    lipschitz: L of (A2), >= 0.
    e_min: the floor of (A1), > 0.

  Returns:
    A number in [0, 1]; 1 when every candidate with positive gain is trained.
  """
  if not math.isfinite(lipschitz) or lipschitz < 0:
    raise ValueError(f"lipschitz must be finite and >= 0, got {lipschitz!r}")
  e_min = check_positive("e_min", e_min)
  p_T = check_positive("p_T", p_T)
  i_T = check_positive("i_T", i_T)
  p = np.asarray(p, dtype=np.float64)
  i = np.asarray(i, dtype=np.float64)
  g = raw_gain(p_T, i_T, p, i)
  tr = np.asarray(sorted(set(int(k) for k in trained)), dtype=np.int64)
  tr = tr[g[tr] >= 0] if tr.size else tr
  targets = np.flatnonzero(g > 0)
  if targets.size == 0:
    return 1.0  # No candidate can have positive W: the guarantee is vacuous but true.
  if tr.size == 0:
    return 0.0
  dist = np.abs(p[targets][:, None] - p[tr][None, :]) / p_T
  ratio = (g[tr][None, :] / g[targets][:, None]) * (e_min / (e_min + lipschitz * dist))
  return float(np.clip(ratio.max(axis=1).min(), 0.0, 1.0))


def budget_bound(p: Sequence[float], p_T: float, feasible: Sequence[bool],
                 trained: Sequence[int], lipschitz: float) -> float:
  """A priori bound on e(budget's choice) - e(best feasible candidate), additive.

  Assumption (A2) of :func:`guarantee_bound` on the best-over-theta error e:
  |e(b) - e(b')| <= lipschitz * |p(b) - p(b')| / p_T. Let F be the feasible candidates, R the
  trained ones among them and delta = max over b in F of min over r in R of |p(b) - p(r)|.
  The budget's choice c has the lowest e in R; for the exhaustive optimum b* of F, its nearest
  trained r* gives e(c) <= e(r*) <= e(b*) + lipschitz * delta / p_T. The budget's plan trains
  a member of every feasible interval, so delta is at most the widest feasible interval's
  spread in p; it is 0 when every feasible candidate is trained. No error is used, so the bound
  is known before training.

  Args:
    p: size of every candidate.
    p_T: the maximum point's size (the scale of (A2)).
    feasible: per candidate, whether it meets the budget.
    trained: indices of the trained candidates (any plan; the infeasible ones are ignored).
    lipschitz: L of (A2), >= 0 (1 gives delta / p_T, the bound in units of L).

  Returns:
    lipschitz * delta / p_T (>= 0); inf when no feasible candidate is trained; 0 when no
    candidate is feasible (nothing to be near).
  """
  if not math.isfinite(lipschitz) or lipschitz < 0:
    raise ValueError(f"lipschitz must be finite and >= 0, got {lipschitz!r}")
  p_T = check_positive("p_T", p_T)
  p = np.asarray(p, dtype=np.float64)
  feasible = np.asarray(feasible, dtype=bool)
  if feasible.shape != p.shape:
    raise ValueError(f"feasible must hold one flag per candidate ({p.size}), got {feasible.shape}")
  targets = np.flatnonzero(feasible)
  tr = np.asarray(sorted({int(k) for k in trained if feasible[int(k)]}), dtype=np.int64)
  if targets.size == 0:
    return 0.0
  if tr.size == 0:
    return math.inf
  delta = np.abs(p[targets][:, None] - p[tr][None, :]).min(axis=1).max()
  return float(lipschitz * delta / p_T)


def certified_ratio(result, lipschitz: float, e_min: float) -> float:
  """A posteriori lower bound on W(returned) / W*, from the measured errors.

  Under (A1) and (A2) of :func:`guarantee_bound`, an untrained b has
  e(b) >= max(e_min, max over trained r of e(r) - L |p(r) - p(b)| / p_T), which bounds
  its W from above; trained candidates have their exact W. The ratio of the returned W to
  the largest of these upper bounds is certified.

  Args:
    result: a finished ``fptas.run_fptas`` result.
    lipschitz, e_min: the constants of the assumptions.

  Returns:
    A number in [0, 1] (1 when no untrained candidate can beat the returned one).
  """
  if not math.isfinite(lipschitz) or lipschitz < 0:
    raise ValueError(f"lipschitz must be finite and >= 0, got {lipschitz!r}")
  e_min = check_positive("e_min", e_min)
  best_w = result.best.w
  if best_w is None or best_w <= 0:
    return 0.0
  trained = [r for r in result.rows if r.trained and r.e is not None and math.isfinite(r.e)]
  upper = best_w
  for row in result.rows:
    if row.trained or row.gain <= 0:
      continue
    floor = e_min
    for r in trained:
      floor = max(floor, r.e - lipschitz * abs(r.p - row.p) / result.p_T)
    upper = max(upper, row.gain / floor)
  return float(min(1.0, best_w / upper))
