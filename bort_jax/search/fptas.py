"""The W-coefficient FPTAS of Bort (docs/EXTRACTION.md), as a pure algorithm.

Nothing here knows about models or JAX: candidates are any objects whose ``str`` is a unique
name (``Arch`` prints ``D4-A8-H1024-I768``), their parameter size ``p`` and inference cost
``i`` are given as numbers, and the proxy error ``e`` comes from a callable
``train_and_eval(pairs) -> errors`` that the population trainer (``proxy.py``) provides, so
that many (candidate, theta) pairs can be trained in one call.

The steps:
1. find the maximum point T (:func:`maximum_point`);
2. sort the candidates by p and cut the sorted list into consecutive intervals of ``eps``
   candidates (:func:`sort_by_size`, :func:`intervals`);
3. train the representatives of every interval (:func:`representatives`), and with
   ``ties="all"`` every candidate of equal (p, i) (:func:`with_ties`), under every theta; keep
   the best W over theta;
4. return the trained candidate of largest W with the whole table (:func:`run_fptas`).
With a budget (``select.py``), the feasible candidates' own interval plan is trained too and the
result also holds the trained feasible candidate of lowest error (the budget rule's choice).
The settings (eps, rule, ties, thetas) are checked once, by :func:`validate`, where they enter.

``docs/EXTRACTION.md`` states the interval rules and proves the guarantee that
:func:`guarantee_bound` computes (``guarantee.py``; the formula is ``formula.py``). A
:class:`~bort_jax.search.journal.Journal` makes a killed run resumable.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from bort_jax.search.formula import check_positive as _check_positive, raw_gain as _gain
from bort_jax.search.formula import gain, w_coefficient
from bort_jax.search.journal import Journal, theta_key
from bort_jax.search.result import Result, Row
from bort_jax.search.select import Budget, choose as _budget_choice

RULES = ("max_gain", "endpoints", "all")
"""Interval rules: which members of an interval are trained (see :func:`representatives`)."""

TIES = ("all", "first")
"""What to do with candidates of equal (p, i) (see :func:`with_ties`)."""



# ----------------------------------------------------------------------- input validation


def _names(candidates: Sequence[Any]) -> list[str]:
  if len(candidates) == 0:
    raise ValueError("the candidate list is empty: nothing to search (did a constraint remove "
                     "every member of the search space?)")
  names = [str(c) for c in candidates]
  seen = {}
  for k, name in enumerate(names):
    if name in seen:
      raise ValueError(f"candidates {seen[name]} and {k} have the same name {name!r}; names "
                       "key the journal and the tables, so they must be unique")
    seen[name] = k
  return names


def _as_costs(name: str, values: Sequence[float], n: int) -> np.ndarray:
  arr = np.asarray(values, dtype=np.float64)
  if arr.shape != (n,):
    raise ValueError(f"{name} must hold one number per candidate ({n}), got shape {arr.shape}")
  bad = np.flatnonzero(~np.isfinite(arr) | (arr <= 0))
  if bad.size:
    raise ValueError(f"{name} must be finite and positive; candidate {int(bad[0])} has "
                     f"{name}={arr[bad[0]]!r} ({bad.size} bad value(s) in all)")
  return arr


def _check_eps(eps: int, n: int, where: str = "") -> int:
  if isinstance(eps, bool) or not isinstance(eps, (int, np.integer)) or not 1 <= eps <= n:
    raise ValueError(f"{where}eps must be an int in [1, {n}] (the interval size, at most the "
                     f"number of candidates), got {eps!r}")
  return int(eps)


@dataclasses.dataclass(frozen=True)
class Settings:
  """The search's settings, checked once by :func:`validate`; the search trusts them.

  Attributes:
    eps: interval size, 1 <= eps <= num_candidates.
    rule: interval rule, one of :data:`RULES`.
    thetas: the hyperparameter sets (JSON-serialisable, distinct), at least one.
    num_candidates: the size of the search space the settings were checked against.
    ties: one of :data:`TIES`: train every member of a (p, i) tie ("all") or only the one the
      sort order puts first ("first").
  """

  eps: int
  rule: str
  thetas: tuple
  num_candidates: int
  ties: str = "all"


def validate(eps: int, rule: str, thetas: Sequence[Any], num_candidates: int,
             check_theta: Callable[[Any], Any] | None = None, where: str = "",
             ties: str = "all") -> Settings:
  """Checks the search settings: the one validation of eps, the rule and the thetas.

  Call it where the settings enter (a config's validation, before anything is built); the
  search and the trainer then trust the typed values.

  Args:
    eps: interval size.
    rule: interval rule.
    thetas: hyperparameter sets.
    num_candidates: how many candidates the search space has (eps is at most that).
    check_theta: the trainer's own check of one theta (it raises ``ValueError``); what it
      returns is stored (e.g. ``theta.check_theta``'s typed sets).
    where: prefix of the field names in messages (``"fptas."`` names the config fields).
    ties: tie handling, one of :data:`TIES`.

  Returns:
    A :class:`Settings`.

  Raises:
    ValueError: naming the field, its value and what is allowed.
  """
  if num_candidates < 1:
    raise ValueError("the candidate list is empty: nothing to search (did a constraint remove "
                     "every member of the search space?)")
  eps = _check_eps(eps, num_candidates, where)
  if rule not in RULES:
    raise ValueError(f"unknown interval rule {where}rule={rule!r}; expected one of {RULES}")
  if ties not in TIES:
    raise ValueError(f"unknown tie handling {where}ties={ties!r}; expected one of {TIES}")
  thetas = list(thetas)
  if not thetas:
    raise ValueError(f"{where}thetas is empty: at least one hyperparameter set is needed")
  keys = [theta_key(t) for t in thetas]
  if len(set(keys)) != len(keys):
    raise ValueError(f"{where}thetas contain duplicates: {keys}")
  if check_theta is not None:
    thetas = [check_theta(t) for t in thetas]
  return Settings(eps=eps, rule=rule, thetas=tuple(thetas), num_candidates=num_candidates,
                  ties=ties)


# ------------------------------------------------------------------------------ the steps


def maximum_point(candidates: Sequence[Any], p: Sequence[float], i: Sequence[float],
                  name: str | None = None) -> int:
  """Index of the maximum point T: the candidate with the largest p and i.

  When no single candidate has both the largest p and the largest i, T is the candidate with
  the largest product p * i (the corner of the cost box with the largest area); remaining
  ties go to the larger p, then to the earlier candidate. Either way W(T, T) = 0, and a
  candidate that exceeds T in exactly one cost gets a negative W, so it can never be chosen
  over a candidate with positive W.

  Args:
    candidates: the candidates (their ``str`` is their name).
    p, i: size and inference cost, one per candidate.
    name: if given, the candidate of that name is T.

  Returns:
    The index of T in ``candidates``.
  """
  names = _names(candidates)
  p = _as_costs("p", p, len(names))
  i = _as_costs("i", i, len(names))
  if name is not None:
    if str(name) not in names:
      raise ValueError(f"maximum point {name!r} is not a candidate; candidates are "
                       f"{names[:5]}{'...' if len(names) > 5 else ''}")
    return names.index(str(name))
  both = np.flatnonzero((p == p.max()) & (i == i.max()))
  if both.size:
    return int(both[0])
  # lexsort sorts by the last key first; negate to get the largest at position 0.
  order = np.lexsort((np.arange(len(p)), -p, -(p * i)))
  return int(order[0])


def sort_by_size(p: Sequence[float], i: Sequence[float]) -> list[int]:
  """Candidate indices sorted by p, ties by i, then by input position (stable).

  Args:
    p, i: size and inference cost, one per candidate.

  Returns:
    The permutation, smallest first.
  """
  p = np.asarray(p, dtype=np.float64)
  i = np.asarray(i, dtype=np.float64)
  return [int(k) for k in np.lexsort((np.arange(len(p)), i, p))]


def intervals(order: Sequence[int], eps: int) -> list[list[int]]:
  """Cuts a size-sorted list of candidate indices into consecutive intervals of ``eps``.

  Every interval has ``eps`` members except the last, which holds the remaining
  ``len(order) % eps`` when that is not zero.

  Args:
    order: candidate indices sorted by p (:func:`sort_by_size`).
    eps: interval size, 1 <= eps <= len(order); 1 trains everything (exact search).

  Returns:
    The intervals, in order of size.
  """
  order = [int(k) for k in order]
  if not order:
    raise ValueError("cannot partition an empty candidate list")
  return _cut(order, _check_eps(eps, len(order)))


def _cut(order: list[int], eps: int) -> list[list[int]]:
  return [order[s:s + eps] for s in range(0, len(order), eps)]


def representatives(interval: Sequence[int], rule: str,
                    gains: Mapping[int, float] | Sequence[float] | None = None) -> list[int]:
  """The members of one interval that are trained.

  Rules:
    * ``"max_gain"``: the one member with the largest cost gain
      [(p_T - p) / p_T] * [(i_T - i) / i_T] (ties: the smaller p, i.e. earlier in the
      interval). One training per interval, and it carries the guarantee of
      docs/EXTRACTION.md without any assumption on i.
    * ``"endpoints"``: the first and the last member (smallest and largest p). Carries the
      same guarantee when i does not decrease with p inside the interval.
    * ``"all"``: every member (exhaustive; exact for any eps).

  Args:
    interval: candidate indices, sorted by p.
    rule: one of :data:`RULES`.
    gains: indexable by candidate index; needed by ``"max_gain"`` only.

  Returns:
    The trained members, in interval order, without duplicates.
  """
  interval = [int(k) for k in interval]
  if not interval:
    raise ValueError("an interval must have at least one member")
  if rule == "all":
    return list(interval)
  if rule == "endpoints":
    return [interval[0]] if len(interval) == 1 else [interval[0], interval[-1]]
  if rule == "max_gain":
    if gains is None:
      raise ValueError("rule 'max_gain' needs the cost gains of the members")
    best = max(range(len(interval)), key=lambda j: (gains[interval[j]], -j))
    return [interval[best]]
  raise ValueError(f"unknown interval rule {rule!r}; expected one of {RULES}")


def tie_sizes(p: Sequence[float], i: Sequence[float]) -> list[int]:
  """For every candidate, how many candidates (itself included) share its exact (p, i)."""
  keys = list(zip(np.asarray(p, np.float64).tolist(), np.asarray(i, np.float64).tolist()))
  counts: dict = {}
  for key in keys:
    counts[key] = counts.get(key, 0) + 1
  return [counts[key] for key in keys]


def with_ties(trained: Sequence[int], order: Sequence[int], p: Sequence[float],
              i: Sequence[float], ties: str) -> list[int]:
  """The trained candidates once the tie handling has been applied.

  Candidates of equal (p, i) (in the demo space the A2, A4 and A8 variants of one shape have
  the same size and FLOPs) get the same cost gain, so an interval rule cannot tell them apart;
  their proxy errors can differ. ``"all"`` trains every member of a tie any representative
  belongs to, so W decides between them; ``"first"`` trains only the member the sort order
  (p, then i, then input position) puts first, which is the rule the search used before ties
  were handled.

  Args:
    trained: the interval rule's representatives, in size order.
    order: every candidate index in size order (:func:`sort_by_size`).
    p, i: size and inference cost per candidate.
    ties: one of :data:`TIES`.

  Returns:
    The trained candidates in size order, without duplicates.
  """
  if ties == "first":
    return list(trained)
  if ties != "all":
    raise ValueError(f"unknown tie handling {ties!r}; expected one of {TIES}")
  keys = list(zip(np.asarray(p, np.float64).tolist(), np.asarray(i, np.float64).tolist()))
  wanted = {keys[k] for k in trained}
  return [int(k) for k in order if keys[k] in wanted]


# ----------------------------------------------------------------------------- the search


TrainAndEval = Callable[[list[tuple[Any, Any]]], Sequence[float]]


def _columns(columns: Mapping[str, Sequence[Any]] | None, n: int) -> dict:
  out = {}
  for col, values in (columns or {}).items():
    values = list(values)
    if len(values) != n:
      raise ValueError(f"column {col!r} has {len(values)} values for {n} candidates")
    out[col] = values
  return out


def _maximum(candidates, p, i, maximum) -> tuple[int | None, float, float]:
  """Step 1: T as (index or None, p_T, i_T)."""
  if isinstance(maximum, (tuple, list)):
    if len(maximum) != 2:
      raise ValueError(f"maximum must be a name or a (p_T, i_T) pair, got {maximum!r}")
    return (None, _check_positive("p_T of the given maximum point", maximum[0]),
            _check_positive("i_T of the given maximum point", maximum[1]))
  t_index = maximum_point(candidates, p, i, name=maximum)
  return t_index, float(p[t_index]), float(i[t_index])


def _train_pending(candidates, names, settings: Settings, pending: list, train_and_eval,
                   journal: Journal | None, group) -> dict:
  """Trains the pending (candidate, theta) index pairs, journalling each call's results."""
  thetas = settings.thetas
  if group is not None:
    calls = [[pending[j] for j in indices]
             for indices in group([(candidates[k], thetas[t]) for k, t in pending])]
    if sorted(x for call in calls for x in call) != sorted(pending):
      raise ValueError("group() must split the pending pairs into disjoint lists covering all")
  else:
    calls = [pending] if pending else []
  errors = {}
  for chunk in calls:
    out = list(train_and_eval([(candidates[k], thetas[t]) for k, t in chunk]))
    if len(out) != len(chunk):
      raise ValueError(f"train_and_eval returned {len(out)} errors for {len(chunk)} pairs")
    records = []
    for (k, t), e in zip(chunk, out):
      e = float(e)
      if math.isfinite(e) and e <= 0:
        raise ValueError(f"train_and_eval gave error {e} <= 0 for {names[k]} under theta "
                         f"{theta_key(thetas[t])}; W needs a positive error")
      errors[(k, t)] = e
      records.append((names[k], thetas[t], e))
    if journal is not None:
      journal.append(records)
  return errors


def _errors(candidates, names, settings: Settings, trained_order: list, train_and_eval,
            journal: Journal | None, group) -> tuple[dict, list]:
  """{(k, theta index): e} of every trained pair, from the journal or trained now; and the
  pairs trained now."""
  errors, pending = {}, []
  for k in trained_order:
    for t_idx, theta in enumerate(settings.thetas):
      known = journal.get(names[k], theta) if journal is not None else None
      if known is not None:
        errors[(k, t_idx)] = known
      else:
        pending.append((k, t_idx))
  errors.update(_train_pending(candidates, names, settings, pending, train_and_eval, journal,
                               group))
  return errors, pending


def _row(k: int, names, candidates, p, i, p_T: float, i_T: float, interval: int,
         errors: tuple | None, thetas, extra: dict) -> Row:
  """One candidate's row: W per theta (a diverged theta gets -inf), the best theta kept."""
  row = Row(name=names[k], candidate=candidates[k], p=float(p[k]), i=float(i[k]),
            gain=gain(p_T, i_T, p[k], i[k]), interval=interval, trained=errors is not None,
            extra=extra)
  if errors is not None:
    ws = [w_coefficient(p_T, i_T, p[k], i[k], e) if math.isfinite(e) else -math.inf
          for e in errors]
    best_t = int(np.argmax(ws))
    row.errors, row.w, row.e, row.theta = errors, float(ws[best_t]), errors[best_t], thetas[best_t]
  return row


def _plan(p: np.ndarray, i: np.ndarray, gains: np.ndarray, settings: Settings,
          feasible: Sequence[bool] | None = None) -> tuple:
  """Steps 2 and 3: (interval of each candidate, W's representatives, W's trained, the
  budget's trained), the trained lists in size order.

  The budget's plan is W's run over the feasible candidates alone: they are sorted by p, cut
  into intervals of eps and each interval's members chosen by the same rule and tie handling,
  so every feasible interval holds a trained member (the guarantee of ``budget_bound``).
  """
  order = sort_by_size(p, i)
  interval_of = np.empty(len(p), dtype=np.int64)
  chosen = []
  for g_idx, members in enumerate(_cut(order, settings.eps)):
    interval_of[members] = g_idx
    chosen.extend(representatives(members, settings.rule, gains))
  w_trained = with_ties(chosen, order, p, i, settings.ties)
  if feasible is None:
    return interval_of, chosen, w_trained, []
  sub = [k for k in order if feasible[k]]
  picked = [k for members in _cut(sub, settings.eps)
            for k in representatives(members, settings.rule, gains)]
  # Ties are looked for among the feasible candidates only (``sub`` is the order they see):
  # tie members of equal (p, i) can still differ in measured latency.
  return interval_of, chosen, w_trained, with_ties(picked, sub, p, i, settings.ties)


def run_fptas(candidates: Sequence[Any], p: Sequence[float], i: Sequence[float],
              train_and_eval: TrainAndEval, settings: Settings,
              journal: Journal | None = None,
              maximum: str | tuple[float, float] | None = None,
              columns: Mapping[str, Sequence[Any]] | None = None,
              group: Callable[[list], list[list[int]]] | None = None,
              budget: Budget | None = None) -> Result:
  """Steps 1 to 4 of the search (docs/EXTRACTION.md), and the budget rule's choice.

  All input checks run before the first training. The pairs are trained in size order
  (interval by interval, theta innermost); each ``train_and_eval`` call's results are
  journalled before the next call, so a kill loses at most one call's work. Untrained
  candidates get no e and no W.

  Args:
    candidates: the search space (``str`` of each is its unique name).
    p, i: size and inference cost per candidate (finite, > 0).
    train_and_eval: maps a list of (candidate, theta) pairs to their proxy errors, in order.
      An error must be > 0; a non-finite error marks a diverged proxy (W = -inf for that theta).
    settings: eps, the interval rule and the thetas, from :func:`validate`.
    journal: optional :class:`Journal`; pairs already in it are not retrained.
    maximum: T as a candidate name, or as a (p_T, i_T) reference point outside the space;
      None picks :func:`maximum_point`.
    columns: extra per-candidate values copied into each row's ``extra`` (for the report).
    group: optional planner that splits the pending (candidate, theta) pairs into the lists of
      indices sent together to ``train_and_eval`` (the population trainer's buckets), so each
      group is journalled as soon as it finishes; None sends every pending pair at once.
    budget: the budget rule's :class:`~bort_jax.search.select.Budget` (``select.apply``), or
      None for W's rule alone. With it, the feasible candidates' own interval plan is trained
      too, and the result holds the lowest-error feasible candidate; W's choice is still made
      among W's plan only, so it is the same as without a budget.

  Returns:
    A :class:`Result`.
  """
  names = _names(candidates)
  n = len(names)
  p = _as_costs("p (parameter size)", p, n)
  i = _as_costs("i (inference cost)", i, n)
  if not isinstance(settings, Settings) or settings.num_candidates != n:
    raise ValueError(f"settings must come from fptas.validate(..., num_candidates={n})")
  if not callable(train_and_eval):
    raise ValueError("train_and_eval must be callable")
  if budget is not None and len(budget.feasible) != n:
    raise ValueError(f"the budget covers {len(budget.feasible)} candidates, not {n}")
  extra_cols = _columns(columns, n)
  t_index, p_T, i_T = _maximum(candidates, p, i, maximum)

  # Step 2: sort and partition. Step 3: choose who is trained.
  interval_of, chosen, w_order, b_order = _plan(p, i, _gain(p_T, i_T, p, i), settings,
                                                budget.feasible if budget else None)
  in_w, in_b = set(w_order), set(b_order)
  trained = in_w | in_b
  trained_order = [k for k in sort_by_size(p, i) if k in trained]
  thetas = list(settings.thetas)
  errors, pending = _errors(candidates, names, settings, trained_order, train_and_eval,
                            journal, group)

  # Step 3 (end): W per theta, best over theta. Step 4: the best trained candidate.
  rows = [_row(k, names, candidates, p, i, p_T, i_T, int(interval_of[k]),
               tuple(errors[(k, t)] for t in range(len(thetas))) if k in trained else None,
               thetas, {col: vals[k] for col, vals in extra_cols.items()}) for k in range(n)]
  for k, (row, size) in enumerate(zip(rows, tie_sizes(p, i))):
    row.tie = size
    row.plan = "+".join(name for name, plan in (("w", in_w), ("budget", in_b)) if k in plan)
    row.feasible = bool(budget.feasible[k]) if budget is not None else None
  finite = [k for k in w_order if math.isfinite(rows[k].w)]
  if not finite:
    raise RuntimeError("every trained candidate diverged under every theta (non-finite proxy "
                       "error); no candidate can be returned")
  # Ties go to the smaller candidate (earlier in size order).
  position = {k: pos for pos, k in enumerate(w_order)}
  best_index = max(finite, key=lambda k: (rows[k].w, -position[k]))
  first, second = _budget_choice(rows, budget) if budget is not None else (None, None)
  return Result(rows=rows, best_index=best_index, maximum_index=t_index, p_T=p_T, i_T=i_T,
                eps=settings.eps, rule=settings.rule, thetas=thetas,
                num_pairs=len(trained_order) * len(thetas), num_computed=len(pending),
                ties=settings.ties, tie_extra=len(w_order) - len(set(chosen)), budget=budget,
                budget_index=first, budget_second=second,
                budget_extra=len(trained_order) - len(w_order))
