"""Tests of the proxy audit's arithmetic (bort_jax/search/audit.py): rank statistics against
scipy, the stratified sample, the margin of W's choice and the size-alone warning."""

import math

import numpy as np
import pytest
from scipy import stats

from bort_jax.search import audit

HAND = [
    ("perfect order", [1, 2, 3, 4, 5], [10, 20, 30, 40, 50]),
    ("reversed order", [1, 2, 3, 4, 5], [5, 4, 3, 2, 1]),
    ("ties in x", [1, 1, 2, 2, 3], [1, 2, 3, 4, 5]),
    ("ties in both", [1, 1, 2, 3, 3, 3], [2, 2, 1, 5, 4, 4]),
    ("bands", [1.92, 1.92, 1.79, 1.79, 1.67], [1.5, 1.4, 1.3, 1.35, 1.1]),
    ("two values", [0.5, 0.7], [3.0, 2.0]),
]


@pytest.mark.parametrize("name, x, y", HAND)
def test_statistics_match_scipy_on_hand_cases(name, x, y):
  assert audit.kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
  assert audit.spearman_rho(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_statistics_hand_values():
  assert audit.kendall_tau_b([1, 2, 3], [1, 2, 3]) == 1.0
  assert audit.kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0
  assert audit.spearman_rho([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  # One discordant pair of three: (C - D) / 3 = 1/3; rho = 1 - 6 * 2 / (3 * 8) = 0.5.
  assert audit.kendall_tau_b([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
  assert audit.spearman_rho([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
  # Ties: x has the pair (0, 1) tied: C = 2, D = 0, n0 = 3, n1 = 1, n2 = 0 -> 2 / sqrt(6).
  assert audit.kendall_tau_b([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))
  np.testing.assert_array_equal(audit.average_ranks([3.0, 1.0, 3.0, 2.0]), [3.5, 1, 3.5, 2])
  # Constant input or a single value: no order, nan (as scipy).
  assert math.isnan(audit.kendall_tau_b([1, 1, 1], [1, 2, 3]))
  assert math.isnan(audit.spearman_rho([1, 2, 3], [2, 2, 2]))
  assert math.isnan(audit.kendall_tau_b([1], [2]))
  with pytest.raises(ValueError, match="same length"):
    audit.kendall_tau_b([1, 2], [1, 2, 3])
  with pytest.raises(ValueError, match="finite"):
    audit.spearman_rho([1, math.nan], [1, 2])


@pytest.mark.filterwarnings("ignore:An input array is constant")
def test_statistics_match_scipy_on_random_cases():
  rng = np.random.default_rng(0)
  for _ in range(200):
    n = int(rng.integers(2, 30))
    # Few distinct values, so ties are frequent; some pairs correlated, some not.
    x = rng.integers(0, int(rng.integers(2, 8)), n).astype(float)
    y = np.round(x * rng.uniform(-1, 1) + rng.normal(0, 1, n), int(rng.integers(0, 2)))
    want_tau = stats.kendalltau(x, y).statistic
    want_rho = stats.spearmanr(x, y).statistic
    got_tau, got_rho = audit.kendall_tau_b(x, y), audit.spearman_rho(x, y)
    if math.isnan(want_tau):
      assert math.isnan(got_tau)
    else:
      assert got_tau == pytest.approx(want_tau, abs=1e-10)
    if math.isnan(want_rho):
      assert math.isnan(got_rho)
    else:
      assert got_rho == pytest.approx(want_rho, abs=1e-10)


def test_stratified_sample_spreads_along_p_and_keeps_the_included():
  p = [float(k // 3) for k in range(30)]  # ten sizes, each a tie of three
  sample = audit.stratified_sample(p, 5, seed=0, include=[29, 0])
  assert 0 in sample and 29 in sample
  strata = [set(range(6 * s, 6 * s + 6)) for s in range(5)]
  assert all(any(k in stratum for k in sample) for stratum in strata)
  assert len(sample) <= 7 and sample == sorted(sample, key=lambda k: (p[k], k))
  assert audit.stratified_sample(p, 5, seed=0, include=[29, 0]) == sample  # seeded
  draws = {tuple(audit.stratified_sample(p, 5, seed=s)) for s in range(20)}
  assert len(draws) > 1  # the seed, not the sort order, picks inside a stratum
  assert audit.stratified_sample([3.0, 1.0], 8, seed=0) == [1, 0]
  with pytest.raises(ValueError, match="sample size"):
    audit.stratified_sample(p, 0, seed=0)


def test_choice_margin_hand_cases():
  # W1 = 0.5, W2 = 0.4: the winner's e must rise by 25%, or the runner-up's fall by 20%.
  m = audit.choice_margin(0.5, 0.4)
  assert m["winner_e_rise"] == pytest.approx(0.25) and m["runner_up_e_fall"] == pytest.approx(0.2)
  # Check against W itself: g1 = 1, e1 = 2 (W1 .5); g2 = .8, e2 = 2 (W2 .4).
  assert 1 / (2 * (1 + m["winner_e_rise"])) == pytest.approx(0.4)
  assert 0.8 / (2 * (1 - m["runner_up_e_fall"])) == pytest.approx(0.5)
  assert audit.choice_margin(0.3, 0.3) == {"winner_e_rise": 0.0, "runner_up_e_fall": 0.0}
  assert audit.choice_margin(0.3, None) == {"winner_e_rise": math.inf, "runner_up_e_fall": None}
  assert audit.choice_margin(0.3, -0.1)["runner_up_e_fall"] is None
  with pytest.raises(ValueError, match="winner"):
    audit.choice_margin(0.0, None)
  with pytest.raises(ValueError, match="exceeds"):
    audit.choice_margin(0.3, 0.4)
  assert audit.best_two([0.1, math.nan, 0.5, 0.3]) == (2, 3)
  assert audit.best_two([0.2]) == (0, None)


def test_size_decides_warns_on_flat_errors_only():
  gains = [0.8, 0.6, 0.4, 0.2, 0.0]  # spread 4 over the positive ones (T's 0 is left out)
  flat = audit.size_decides([1.92, 1.91, 1.79, 1.67, 1.6], gains)
  assert flat["warn"] and flat["gain_spread"] == pytest.approx(4.0)
  assert flat["error_spread"] == pytest.approx(1.92 / 1.67)
  separated = audit.size_decides([9.0, 4.0, 1.5, 1.0, 1.0], gains)
  assert not separated["warn"] and separated["error_spread"] == pytest.approx(9.0)
  assert audit.size_decides([1.0], [0.5]) == {"error_spread": None, "gain_spread": None,
                                              "warn": False}


def test_audit_summary_and_verdict():
  names = ["a", "b", "c", "d"]
  gains = [0.8, 0.6, 0.4, 0.2]
  short = [2.0, 1.9, 1.8, 1.7]
  same = audit.audit_summary(names, gains, short, [1.4, 1.3, 1.2, 1.1], "a", tau_min=0.6)
  assert same["kendall_tau_b"] == pytest.approx(1.0) and not same["choice_changed"]
  assert same["trusted"] and "can be trusted" in audit.verdict_line(same, 3, 30)
  # Long training separates them: d becomes far better, and W picks it.
  moved = audit.audit_summary(names, gains, short, [1.4, 1.5, 0.8, 0.05], "a", tau_min=0.6)
  assert moved["choice_long"] == "d" and moved["choice_changed"] and not moved["trusted"]
  line = audit.verdict_line(moved, 3, 30)
  assert "can NOT be trusted" in line and "picks d" in line and "tau-b >= 0.6" in line
  diverged = audit.audit_summary(names, gains, short, [1.4, math.nan, 1.2, 1.1], "a", 0.6)
  assert diverged["compared"] == 3 and diverged["diverged"] == 1
  with pytest.raises(ValueError, match="chosen"):
    audit.audit_summary(names, gains, short, short, "z", 0.6)
  # Every candidate diverged over the S steps: a verdict (not trusted), not an error.
  lost = audit.audit_summary(names, gains, short, [math.nan] * 4, "a", 0.6)
  assert lost["choice_long"] is None and lost["compared"] == 0 and not lost["trusted"]
  assert "every sampled candidate diverged" in audit.verdict_line(lost, 3, 30)


def test_audit_summary_of_the_budget_rule_compares_the_lowest_feasible_error():
  names = ["a", "b", "c", "d"]
  gains = [0.8, 0.6, 0.4, 0.2]
  short = [2.0, 1.9, 1.8, 1.7]
  feasible = [True, True, True, False]  # d is outside the budget: it can never be the choice
  # The search chose c (lowest feasible s-step error); after S steps c is still the lowest of
  # the feasible ones, although W would now pick a and d has the lowest error of all.
  kept = audit.audit_summary(names, gains, short, [1.0, 1.2, 0.9, 0.1], "c", 0.0,
                             feasible=feasible, keys=[(1, 1, n) for n in names])
  assert kept["rule"] == "budget" and kept["choice_long"] == "c"
  assert not kept["choice_changed"] and kept["trusted"]
  assert "the budget rule's choice is unchanged" in audit.verdict_line(kept, 3, 30)
  moved = audit.audit_summary(names, gains, short, [1.0, 0.8, 0.9, 0.1], "c", 0.0,
                              feasible=feasible)
  assert moved["choice_long"] == "b" and moved["choice_changed"] and not moved["trusted"]
  assert "the budget rule with the 30-step errors picks b" in audit.verdict_line(moved, 3, 30)
  # Equal S-step errors: the tie-break keys decide (smaller i first), as in the search.
  tied = audit.audit_summary(names, gains, short, [1.0, 1.0, 2.0, 0.1], "b", 0.0,
                             feasible=feasible, keys=[(5, 1, "a"), (4, 1, "b"), (1, 1, "c"),
                                                      (1, 1, "d")])
  assert tied["choice_long"] == "b" and not tied["choice_changed"]
  # W's verdict is as before (rule "w", no feasible flags).
  assert audit.audit_summary(names, gains, short, [1.4, 1.3, 1.2, 1.1], "a", 0.6)["rule"] == "w"
