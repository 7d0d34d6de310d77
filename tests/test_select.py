"""Tests of the budget rule (bort_jax/search/select.py, fptas.run_fptas(budget=...),
guarantee.budget_bound): config checks, the feasible set, what is trained, the choice and its
ties, the additive guarantee against exhaustive search, the journal and the tables."""

import csv
import json
import math

import numpy as np
import pytest

from bort_jax.search import fptas, guarantee, report, select
from bort_jax.search import journal as journal_lib


def _budget(names, p, i, i_ref=None, latency=None, **limits):
  sel = select.validate({"rule": "budget", **limits})
  return select.apply(sel, names, p, i, i_ref=i_ref, latency_ms=latency)


def _run(names, p, i, train, thetas, eps, rule="max_gain", ties="all", **kwargs):
  settings = fptas.validate(eps, rule, thetas, len(names), ties=ties)
  return fptas.run_fptas(names, p, i, train, settings, **kwargs)


# ----------------------------------------------------------------------------- the config


@pytest.mark.parametrize("block, message", [
    ({"rule": "lowest"}, "config.select.rule='lowest': must be 'w'"),
    ({"rule": "budget", "min_speedup": -1.0}, "config.select.min_speedup=-1.0: must be a finite"),
    ({"rule": "budget", "min_speedup": True}, "config.select.min_speedup=True"),
    ({"rule": "budget", "max_latency_ms": math.inf}, "config.select.max_latency_ms=inf"),
    ({"rule": "budget", "max_latency_ms": "5ms"}, "config.select.max_latency_ms='5ms'"),
    ({"rule": "budget", "max_params": -10}, "config.select.max_params=-10"),
    ({"rule": "budget"}, "config.select.rule='budget' needs a budget"),
    ({"rule": "w", "max_params": math.nan}, "config.select.max_params=nan"),
])
def test_validate_names_the_bad_field_and_what_is_allowed(block, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
    select.validate(block)


def test_validate_defaults_and_typed_values():
  assert select.validate(None) == select.Selection(rule="w")
  sel = select.validate({"rule": "budget", "min_speedup": 4, "max_params": np.int64(10)})
  assert sel == select.Selection("budget", 4.0, 0.0, 10.0) and sel.budget
  assert sel.limits() == {"min_speedup": 4.0, "max_latency_ms": 0.0, "max_params": 10.0}
  # Rule "w" ignores the limits (checked, not applied): no budget needed.
  assert not select.validate({"rule": "w", "min_speedup": 4.0}).budget


# ------------------------------------------------------------------------ the feasible set


def test_apply_keeps_the_candidates_meeting_every_limit():
  names = ["a", "b", "c", "d"]
  p, i = [1.0, 2.0, 3.0, 4.0], [10.0, 5.0, 2.5, 1.0]
  # Speed-up 20 / i = 2, 4, 8, 20; latency from a table; size limit 3.
  b = _budget(names, p, i, i_ref=20.0, latency=[1.0, 1.0, 3.0, 1.0], min_speedup=4.0,
              max_latency_ms=2.0, max_params=3)
  assert b.feasible == (False, True, False, False) and b.count == 1
  assert b.speedup == (2.0, 4.0, 8.0, 20.0) and b.i_ref == 20.0
  assert "speed-up >= 4x" in b.text and "latency <= 2 ms" in b.text and "p <= 3" in b.text
  # A candidate exactly at a limit meets it (i_ref / i == K to the last digit or not).
  assert _budget(names, p, i, i_ref=20.0 * (1 - 1e-15), min_speedup=8.0).feasible[2]
  # A budget that asks for what is missing is refused.
  with pytest.raises(ValueError, match="min_speedup needs the teacher"):
    _budget(names, p, i, min_speedup=2.0)
  with pytest.raises(ValueError, match="max_latency_ms needs"):
    _budget(names, p, i, max_latency_ms=2.0)


def test_a_budget_nothing_meets_names_the_fastest_and_smallest_figures():
  names = ["big", "fast", "small"]
  with pytest.raises(ValueError) as err:
    _budget(names, [5.0, 4.0, 1.0], [10.0, 2.0, 3.0], i_ref=10.0, latency=[9.0, 4.0, 3.5],
            min_speedup=6.0, max_latency_ms=1.0)
  text = str(err.value)
  assert "no candidate meets the budget of config.select" in text
  assert "the fastest candidate, fast, has i = 2 (5x faster than the teacher)" in text
  assert "lowest measured latency is 3.5 ms (small)" in text
  assert "the smallest, small, has p = 1" in text and "config.select.min_speedup" in text


# ---------------------------------------------------------------------- trained set, choice


def _hand():
  # T = t. Sorted by p: a b c d e t. Errors fall with size; the feasible set is p <= 5.
  names = ["a", "b", "c", "d", "e", "t"]
  p = [1.0, 2.0, 3.0, 4.0, 5.0, 10.0]
  i = [1.0, 2.0, 3.0, 4.0, 5.0, 10.0]
  err = {"a": 3.0, "b": 2.0, "c": 1.8, "d": 1.2, "e": 1.0, "t": 0.5}
  return names, p, i, err


def test_budget_trains_its_own_intervals_and_leaves_w_as_it_is():
  names, p, i, err = _hand()
  calls = []

  def train(pairs):
    calls.extend(c for c, _ in pairs)
    return [err[c] for c, _ in pairs]

  plain = _run(names, p, i, train, [0], eps=3)
  w_trained = sorted(calls)
  calls.clear()
  budget = _budget(names, p, i, max_params=4)  # a b c d
  both = _run(names, p, i, train, [0], eps=3, budget=budget)
  # W's plan: intervals [a b c], [d e t], max gain a and d. The budget's: [a b c], [d] of the
  # feasible a b c d: a and d again, so nothing extra and the choice is d (lowest e, 1.2).
  assert w_trained == ["a", "d"] and sorted(calls) == ["a", "d"] and both.budget_extra == 0
  assert both.best.name == plain.best.name and both.chosen.name == "d"
  budget = _budget(names, p, i, max_params=2)  # a b: one interval of eps 3 -> a only
  res = _run(names, p, i, train, [0], eps=3, budget=budget)
  assert res.chosen.name == "a" and res.budget_extra == 0
  # Rule "all" trains every feasible candidate; eps = 1 too.
  budget = _budget(names, p, i, max_params=4)
  for eps, rule in ((3, "all"), (1, "max_gain")):
    res = _run(names, p, i, train, [0], eps=eps, rule=rule, budget=budget)
    assert all(r.trained for r in res.rows if r.feasible)
    assert res.chosen.name == "d" and res.selection()["feasible_trained"] == 4


def test_budget_extra_trainings_are_marked_and_do_not_enter_w():
  # Feasible: c and e. W's plan on [a b c] [d e t] trains a and d (max gain); the budget's
  # over the feasible [c e] (one interval) trains c. c has the largest W of all
  # (it would win W), yet W's choice stays with W's plan, as with rule "w".
  names = ["a", "b", "c", "d", "e", "t"]
  p = [1.0, 2.0, 3.0, 4.0, 5.0, 10.0]
  i = [1.0, 2.0, 3.0, 4.0, 5.0, 10.0]
  err = {"a": 3.0, "b": 2.0, "c": 0.2, "d": 1.2, "e": 1.0, "t": 0.5}
  train = lambda pairs: [err[c] for c, _ in pairs]  # noqa: E731
  budget = select.Budget(select.Selection("budget", max_params=5.0),
                         (False, False, True, False, True, False), None, None, "by hand")
  res = _run(names, p, i, train, [0], eps=3, budget=budget)
  plain = _run(names, p, i, train, [0], eps=3)
  assert [r.plan for r in res.rows] == ["w", "", "budget", "w", "", ""]
  assert res.budget_extra == 1 and res.num_pairs == 3
  assert res.best.name == plain.best.name == "d" and res.chosen.name == "c"
  assert res.rows[2].w > res.best.w  # c has the larger W, but it is not W's plan's
  assert [r.name for r in res.sorted_rows()][:3] == ["d", "a", "c"]  # rank 1 is W's choice
  why = report.explain(res)
  assert why["runner_up"] == "a"  # from W's plan only
  assert res.selection()["runner_up"] is None  # e is not trained: c is the only feasible one


def test_budget_choice_ties_go_to_smaller_i_then_p_then_name():
  names = ["z", "y", "x", "w2", "t"]
  p = [2.0, 3.0, 2.0, 2.0, 10.0]
  i = [3.0, 1.0, 1.0, 1.0, 10.0]
  err = {"z": 1.0, "y": 1.0, "x": 1.0, "w2": 1.0, "t": 0.1}
  budget = _budget(names, p, i, max_params=3)
  res = _run(names, p, i, lambda ps: [err[c] for c, _ in ps], [0], eps=1, budget=budget)
  # All four feasible have e = 1: i = 1 for y, x, w2; p = 2 for x, w2; then the name.
  assert res.chosen.name == "w2" and res.rows[res.budget_second].name == "x"


def test_budget_choice_takes_the_smallest_error_over_theta_and_skips_diverged():
  # u is above T in i (g < 0): W's theta for it is the one of LARGER error; the budget rule
  # compares errors alone and takes the smallest.
  names = ["u", "v", "t"]
  p, i = [1.0, 2.0, 10.0], [12.0, 2.0, 10.0]
  err = {("u", 0): 0.5, ("u", 1): 2.0, ("v", 0): math.nan, ("v", 1): 0.9, ("t", 0): 1.0,
         ("t", 1): 1.0}
  train = lambda ps: [err[(c, th)] for c, th in ps]  # noqa: E731
  res = _run(names, p, i, train, [0, 1], eps=1, budget=_budget(names, p, i, max_params=2))
  assert res.rows[0].e == 2.0 and res.chosen.name == "u"
  assert res.selection()["e"] == 0.5 and res.selection()["runner_up"] == "v"
  dead = lambda ps: [math.nan if c != "t" else 1.0 for c, _ in ps]  # noqa: E731
  with pytest.raises(RuntimeError, match="meets the budget diverged"):
    _run(names, p, i, dead, [0], eps=1, budget=_budget(names, p, i, max_params=2))


def test_a_budget_of_another_space_is_refused():
  names, p, i, err = _hand()
  budget = _budget(names[:3], p[:3], i[:3], max_params=2)
  with pytest.raises(ValueError, match="covers 3 candidates, not 6"):
    _run(names, p, i, lambda ps: [1.0] * len(ps), [0], eps=1, budget=budget)


# ------------------------------------------------------------------------------ guarantee


def _instance(rng, n, n_theta):
  """Costs and errors meeting (A1)-(A2): e_theta(x) Lipschitz with L in x = p / p_T."""
  p = rng.uniform(1e6, 1e8, size=n)
  i = p * rng.uniform(0.5, 1.5, size=n) * 1e-6
  lip = rng.uniform(0.1, 5.0)
  e_min = rng.uniform(0.2, 2.0)
  params = [(rng.uniform(0, 1), rng.uniform(1, 40), rng.uniform(0, 6)) for _ in range(n_theta)]

  def error(x, theta):
    x0, w, phi = params[theta]
    return e_min + lip / 2 * abs(x - x0) + lip / (2 * w) * (1 + math.sin(w * x + phi))

  return p, i, lip, error


def test_budget_bound_holds_against_exhaustive_search():
  rng = np.random.default_rng(0)
  checked = exact_cases = 0
  for trial in range(150):
    n = int(rng.integers(2, 60))
    n_theta = int(rng.integers(1, 4))
    p, i, lip, error = _instance(rng, n, n_theta)
    names = [f"c{k}" for k in range(n)]
    index = {name: k for k, name in enumerate(names)}
    p_T = p[fptas.maximum_point(names, p, i)]
    thetas = list(range(n_theta))
    train = lambda ps: [error(p[index[c]] / p_T, th) for c, th in ps]  # noqa: E731
    # A speed limit against a random reference, sometimes a size limit on top.
    i_ref = float(np.quantile(i, rng.uniform(0.5, 1.0)))
    k = float(i_ref / np.quantile(i, rng.uniform(0.05, 1.0)))
    limits = {"min_speedup": k}
    if rng.uniform() < 0.5:
      limits["max_params"] = float(np.quantile(p, rng.uniform(0.3, 1.0)))
    try:
      budget = _budget(names, p, i, i_ref=i_ref, **limits)
    except ValueError:
      continue  # nothing feasible: refused before training, nothing to check
    feasible = np.array(budget.feasible)
    # Exhaustive feasible optimum by brute force, independently of run_fptas.
    e_star = min(min(error(p[j] / p_T, th) for th in thetas) for j in np.flatnonzero(feasible))
    eps = int(rng.integers(1, n + 1))
    for rule in fptas.RULES:
      for ties in fptas.TIES:
        res = _run(names, p, i, train, thetas, eps=eps, rule=rule, ties=ties, budget=budget)
        trained = [j for j, r in enumerate(res.rows) if r.trained]
        bound = guarantee.budget_bound(p, res.p_T, feasible, trained, lip)
        e_chosen = select.best_error(res.chosen.errors)
        assert res.chosen.feasible and bound >= 0.0
        assert e_chosen <= e_star + bound + 1e-12, (trial, rule, eps, ties, bound)
        # Corollary: delta is at most the widest feasible interval of the budget's plan.
        groups = fptas.intervals([j for j in fptas.sort_by_size(p, i) if feasible[j]],
                                 min(eps, int(feasible.sum())))
        width = max(p[g].max() - p[g].min() for g in map(np.array, groups)) / res.p_T
        assert bound <= lip * width + 1e-12
        if rule == "all" or eps == 1:
          assert bound == 0.0 and e_chosen == pytest.approx(e_star, rel=1e-12)
          exact_cases += 1
        # W's choice is the one it makes without a budget.
        assert res.best.name == _run(names, p, i, train, thetas, eps=eps, rule=rule,
                                     ties=ties).best.name
        checked += 1
  assert checked > 500 and exact_cases > 100


def test_budget_bound_hand_values_and_violation_without_the_assumption():
  p = [1.0, 2.0, 4.0, 8.0, 10.0]
  feasible = [True, True, True, False, False]
  # Trained a and c: b is at distance 1 from a, so delta = 1; with L = 2, 2 * 1 / 10.
  assert guarantee.budget_bound(p, 10.0, feasible, [0, 2, 4], 2.0) == pytest.approx(0.2)
  assert guarantee.budget_bound(p, 10.0, feasible, [0, 1, 2], 5.0) == 0.0
  assert guarantee.budget_bound(p, 10.0, feasible, [3, 4], 1.0) == math.inf  # none feasible trained
  with pytest.raises(ValueError, match="lipschitz"):
    guarantee.budget_bound(p, 10.0, feasible, [0], -1.0)
  with pytest.raises(ValueError, match="one flag per candidate"):
    guarantee.budget_bound(p, 10.0, feasible[:2], [0], 1.0)
  # (A2) false: e drops from 3 (a, the trained one) to 0.1 (b, untrained) over a size step of
  # 0.1 p_T; an assumed L of 0.1 then claims a gap of at most 0.03 where it is 2.9, so the
  # check against exhaustive search above can fail.
  names = ["a", "b", "c", "d", "t"]
  err = {"a": 3.0, "b": 0.1, "c": 2.0, "d": 1.0, "t": 1.0}
  budget = _budget(names, p, p, max_params=4)
  res = _run(names, p, p, lambda ps: [err[c] for c, _ in ps], [0], eps=3, budget=budget)
  trained = [j for j, r in enumerate(res.rows) if r.trained]
  assert not res.rows[1].trained and res.chosen.name == "a"
  bound = guarantee.budget_bound(p, res.p_T, budget.feasible, trained, 0.1)
  assert bound == pytest.approx(0.03) and 3.0 > 0.1 + bound


# ---------------------------------------------------------------------- journal and tables


def test_a_rerun_with_the_budget_trains_only_its_extra_candidates(tmp_path):
  names = [f"D{k + 1}-A2-H32-I64" for k in range(12)]
  p = [100.0 * (k + 1) for k in range(12)]
  i = [10.0 * (k + 1) * (1.3 if k % 2 else 0.8) for k in range(12)]
  err = lambda c: 1.0 + 0.1 * ((7 * names.index(c)) % 5)  # noqa: E731
  log = []

  def train(pairs):
    log.extend(c for c, _ in pairs)
    return [err(c) for c, _ in pairs]

  path = tmp_path / "journal.jsonl"
  w_only = _run(names, p, i, train, [{"lr": 1}], eps=4, journal=journal_lib.Journal(path, "h"))
  first = list(log)
  log.clear()
  # Feasible by latency: the 3rd, 4th and 6th to 8th; W's plan trains the 1st, 5th and 9th.
  latency = [9.0, 9.0, 1.0, 1.0, 9.0, 1.0, 1.0, 1.0, 9.0, 9.0, 9.0, 9.0]
  budget = _budget(names, p, i, latency=latency, max_latency_ms=2.0)
  both = _run(names, p, i, train, [{"lr": 1}], eps=4, journal=journal_lib.Journal(path, "h"),
              budget=budget)
  assert not set(log) & set(first) and len(log) == both.budget_extra > 0
  assert both.num_computed == len(log) and both.best.name == w_only.best.name
  log.clear()
  again = _run(names, p, i, train, [{"lr": 1}], eps=4, journal=journal_lib.Journal(path, "h"),
               budget=budget)
  assert log == [] and again.chosen.name == both.chosen.name


def test_tables_carry_both_choices_and_the_feasible_column(tmp_path):
  names, p, i, err = _hand()
  # Feasible a b c d (i <= 4); trained a and d, so c and b are 1 from them: delta / p_T = 0.1.
  budget = _budget(names, p, i, i_ref=10.0, min_speedup=2.5)
  res = _run(names, p, i, lambda ps: [err[c] for c, _ in ps], [0], eps=3, budget=budget)
  paths = report.write_tables(res, tmp_path)
  assert open(paths["chosen"]).read().strip() == res.chosen.name == "d"
  data = json.load(open(paths["json"]))
  assert data["chosen"] == "d" and data["best"] == res.best.name
  sel = data["select"]
  assert sel["rule"] == "budget" and sel["choice"] == "d" and sel["feasible"] == 4
  assert sel["speedup"] == pytest.approx(2.5) and sel["w_choice"] == res.best.name
  assert [r["feasible"] for r in data["rows"]] == [True, True, True, True, False, False]
  rows = list(csv.DictReader(open(paths["csv"])))
  assert {"feasible", "plan"} <= set(rows[0]) and rows[0]["arch"] == res.best.name
  md = open(paths["md"]).read()
  assert "- chosen (rule `budget`, written to chosen_arch.txt): **d**" in md
  assert f"- W's choice (rule `w`, the paper's): **{res.best.name}**" in md
  assert "4 of 6 candidates meet it" in md
  assert "e(chosen) <= e(best feasible) + L x 0.1 (delta" in md
  # Without a budget the tables keep their shape: no budget columns, one choice line.
  plain = _run(names, p, i, lambda ps: [err[c] for c, _ in ps], [0], eps=3)
  paths = report.write_tables(plain, tmp_path / "plain")
  assert "feasible" not in open(paths["csv"]).readline()
  assert json.load(open(paths["json"]))["select"] == {"rule": "w", "choice": plain.best.name}
  assert f"- chosen: **{plain.best.name}**" in open(paths["md"]).read()
  report.pareto_plot(res, tmp_path / "pareto.png")  # marks both choices without error


def test_a_budget_nothing_meets_words_a_slower_fastest_candidate_as_slower():
  with pytest.raises(ValueError) as err:
    _budget(["big", "fast"], [5.0, 4.0], [10.0, 2.0], i_ref=1.0, min_speedup=2.0)
  assert "the fastest candidate, fast, has i = 2 (2x slower than the teacher)" in str(err.value)
