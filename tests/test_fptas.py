"""Tests of the W-coefficient FPTAS (bort_jax/search/fptas.py, journal.py): formula, intervals,
guarantee, settings, journal."""

import json
import math

import numpy as np
import pytest

from bort_jax.search import formula, fptas, guarantee
from bort_jax.search import journal as journal_lib
from bort_jax.core.arch import Arch


def _run(candidates, p, i, train_and_eval, thetas, eps, rule="max_gain", **kwargs):
  """run_fptas with its settings validated first (as the extraction config does)."""
  settings = fptas.validate(eps, rule, thetas, len(candidates))
  return fptas.run_fptas(candidates, p, i, train_and_eval, settings, **kwargs)


# ------------------------------------------------------------------------ hand-computed W


def test_w_coefficient_hand_cases():
  # (100-40)/100 * (10-5)/10 / 2 = 0.6 * 0.5 / 2 = 0.15
  assert formula.w_coefficient(100, 10, 40, 5, 2.0) == pytest.approx(0.15)
  # (8-2)/8 * (4-1)/4 / 0.5 = 0.75 * 0.75 * 2 = 1.125
  assert formula.w_coefficient(8, 4, 2, 1, 0.5) == pytest.approx(1.125)
  # W(T, T) = 0 whatever the error.
  assert formula.w_coefficient(8, 4, 8, 4, 0.3) == 0.0
  # Larger than T in one cost: negative.
  assert formula.w_coefficient(8, 4, 10, 2, 1.0) == pytest.approx(-0.125)


@pytest.mark.parametrize("args, word", [
    ((100, 10, 40, 5, 0.0), "e_b"),
    ((100, 10, 40, 5, -1.0), "e_b"),
    ((100, 10, 40, 5, math.nan), "e_b"),
    ((0, 10, 40, 5, 1.0), "p_T"),
    ((-5, 10, 40, 5, 1.0), "p_T"),
    ((100, 0, 40, 5, 1.0), "i_T"),
    ((100, 10, math.inf, 5, 1.0), "p_b"),
    ((100, 10, 40, math.nan, 1.0), "i_b"),
])
def test_w_coefficient_errors(args, word):
  with pytest.raises(ValueError, match=word):
    formula.w_coefficient(*args)


def test_maximum_point():
  names = ["a", "b", "c"]
  # "c" has both maxima.
  assert fptas.maximum_point(names, [1, 2, 3], [1, 2, 3]) == 2
  # No single maximiser: largest p*i (b: 3*2=6 against c: 2*4=8 -> c).
  assert fptas.maximum_point(names, [1, 3, 2], [1, 2, 4]) == 2
  # Tie in p*i (6 and 6): the larger p wins.
  assert fptas.maximum_point(names, [1, 3, 2], [1, 2, 3]) == 1
  assert fptas.maximum_point(names, [1, 2, 3], [1, 2, 3], name="a") == 0
  with pytest.raises(ValueError, match="'z' is not a candidate"):
    fptas.maximum_point(names, [1, 2, 3], [1, 2, 3], name="z")


# ----------------------------------------------------------- intervals and representatives


def test_sort_and_intervals():
  p = [5, 1, 3, 3, 9, 7, 2]
  i = [1, 1, 2, 1, 1, 1, 1]
  order = fptas.sort_by_size(p, i)
  assert order == [1, 6, 3, 2, 0, 5, 4]  # p ties (3, 3) broken by i.
  assert fptas.intervals(order, 3) == [[1, 6, 3], [2, 0, 5], [4]]
  assert fptas.intervals(order, 1) == [[k] for k in order]
  assert fptas.intervals(order, 7) == [order]
  for bad in (0, 8, -1, 2.5, True):
    with pytest.raises(ValueError, match="eps"):
      fptas.intervals(order, bad)


def test_representatives():
  interval = [1, 6, 3]
  gains = {1: 0.2, 6: 0.5, 3: 0.5}
  assert fptas.representatives(interval, "all") == [1, 6, 3]
  assert fptas.representatives(interval, "endpoints") == [1, 3]
  assert fptas.representatives([4], "endpoints") == [4]
  # The tie between 6 and 3 goes to the earlier (smaller) member.
  assert fptas.representatives(interval, "max_gain", gains) == [6]
  with pytest.raises(ValueError, match="unknown interval rule"):
    fptas.representatives(interval, "middle")
  with pytest.raises(ValueError, match="needs the cost gains"):
    fptas.representatives(interval, "max_gain")


def test_run_hand_case():
  # T = "t" (p=10, i=10). Gains: a 0.9*0.9=.81, b .8*.5=.4, c .5*.8=.4, d .3*.3=.09, t 0.
  names = ["a", "b", "c", "d", "t"]
  p = [1, 2, 5, 7, 10]
  i = [1, 5, 2, 7, 10]
  err = {"a": 4.0, "b": 1.0, "c": 0.5, "d": 0.1, "t": 0.1}
  calls = []

  def train(pairs):
    calls.extend(pairs)
    return [err[c] * th["m"] for c, th in pairs]

  res = _run(names, p, i, train, [{"m": 1.0}, {"m": 2.0}], eps=2, rule="max_gain")
  # Intervals by p: [a, b], [c, d], [t]; max gain: a, c, t.
  assert [r.interval for r in res.rows] == [0, 0, 1, 1, 2]
  assert [r.trained for r in res.rows] == [True, False, True, False, True]
  assert sorted({c for c, _ in calls}) == ["a", "c", "t"]
  assert len(calls) == 6 and res.num_pairs == 6 and res.num_computed == 6
  # W(a) = .81/4 = .2025, W(c) = .4/.5 = .8, W(t) = 0; best theta is m=1 (smaller e).
  assert res.best.name == "c" and res.best.w == pytest.approx(0.8)
  assert res.best.theta == {"m": 1.0} and res.best.errors == (0.5, 1.0)
  assert res.rows[1].e is None and res.rows[1].w is None  # untrained: nothing invented
  assert res.rows[4].w == 0.0
  assert [r.name for r in res.sorted_rows()] == ["c", "a", "t", "b", "d"]
  # Exhaustive search would pick d (.09/.1 = .9): the a priori bound must admit that gap.
  exact = _run(names, p, i, train, [{"m": 1.0}], eps=1)
  assert exact.best.name == "d" and exact.best.w == pytest.approx(0.9)


def test_group_decides_the_calls_and_must_cover_every_pair():
  names, p, i = ["a", "b", "c", "t"], [1, 2, 5, 10], [1, 5, 2, 10]
  calls = []

  def train(pairs):
    calls.append(sorted(c for c, _ in pairs))
    return [1.0 for _ in pairs]

  # One call per "bucket": the planner pairs up consecutive pending pairs.
  res = _run(names, p, i, train, [{"m": 1}], eps=1,
                        group=lambda pairs: [[0, 1], [2, 3]])
  assert calls == [["a", "b"], ["c", "t"]] and res.num_computed == 4
  with pytest.raises(ValueError, match="disjoint lists covering all"):
    _run(names, p, i, train, [{"m": 1}], eps=1, group=lambda pairs: [[0, 1], [1]])


def test_diverged_theta_is_skipped_and_all_diverged_is_an_error():
  names, p, i = ["a", "b", "t"], [1, 2, 10], [1, 2, 10]

  def train(pairs):
    return [math.nan if th == 0 else 1.0 for _, th in pairs]

  res = _run(names, p, i, train, [0, 1], eps=1)
  assert res.best.name == "a" and res.best.theta == 1 and math.isnan(res.best.errors[0])
  with pytest.raises(RuntimeError, match="diverged"):
    _run(names, p, i, lambda pairs: [math.inf] * len(pairs), [0], eps=1)


# ----------------------------------------------------------------------- the guarantee


def _instance(rng, n, n_theta):
  """Random costs and errors that satisfy (A1) e >= e_min and (A2) L-Lipschitz in p / p_T."""
  p = rng.uniform(1e6, 1e8, size=n)
  i = p * rng.uniform(0.5, 1.5, size=n) * 1e-6  # correlated with p but not monotone in it
  lip = rng.uniform(0.1, 5.0)
  e_min = rng.uniform(0.2, 2.0)
  # u_theta(x) = L/2 |x - x0| + L/(2w) (1 + sin(w x + phi)) has slope <= L and u >= 0; the min
  # over theta of L-Lipschitz functions is L-Lipschitz, so e* meets (A2).
  params = [(rng.uniform(0, 1), rng.uniform(1, 40), rng.uniform(0, 6)) for _ in range(n_theta)]

  def error(x, theta):
    x0, w, phi = params[theta]
    return e_min + lip / 2 * abs(x - x0) + lip / (2 * w) * (1 + math.sin(w * x + phi))

  return p, i, lip, e_min, error


def test_guarantee_holds_against_exhaustive_search():
  rng = np.random.default_rng(0)
  checked = 0
  for trial in range(150):
    n = int(rng.integers(2, 60))
    n_theta = int(rng.integers(1, 4))
    p, i, lip, e_min, error = _instance(rng, n, n_theta)
    names = [f"c{k}" for k in range(n)]
    index = {name: k for k, name in enumerate(names)}
    p_T = p[fptas.maximum_point(names, p, i)]

    def train(pairs):
      return [error(p[index[c]] / p_T, th) for c, th in pairs]

    thetas = list(range(n_theta))
    exact = _run(names, p, i, train, thetas, eps=1)
    # Exhaustive optimum by brute force, independently of run_fptas.
    t = fptas.maximum_point(names, p, i)
    w_star = max(max(formula.w_coefficient(p[t], i[t], p[k], i[k], error(p[k] / p_T, th))
                     for th in thetas) for k in range(n))
    assert exact.best.w == pytest.approx(w_star, rel=1e-12)
    if w_star <= 0:
      continue
    eps = int(rng.integers(1, n + 1))
    for rule in fptas.RULES:
      res = _run(names, p, i, train, thetas, eps=eps, rule=rule)
      trained = [k for k, r in enumerate(res.rows) if r.trained]
      bound = guarantee.guarantee_bound(p, i, res.p_T, res.i_T, trained, lip, e_min)
      assert 0.0 <= bound <= 1.0
      assert res.best.w >= bound * w_star - 1e-12, (trial, rule, eps, bound)
      cert = guarantee.certified_ratio(res, lip, e_min)
      assert res.best.w >= cert * w_star - 1e-12, (trial, rule, eps, cert)
      if rule == "all" or eps == 1:
        assert res.best.w == pytest.approx(w_star, rel=1e-12) and bound == 1.0
      if rule == "max_gain":
        # The corollary of docs/EXTRACTION.md: 1 / (1 + L * widest interval / e_min).
        groups = fptas.intervals(fptas.sort_by_size(p, i), eps)
        width = max((p[g].max() - p[g].min()) / res.p_T for g in map(np.array, groups))
        assert bound >= 1.0 / (1.0 + lip * width / e_min) - 1e-12
      checked += 1
  assert checked > 300


def test_bound_is_violated_when_the_assumption_is():
  # Same hand case as above with a tiny L: the assumption is false (e jumps from .5 to .1
  # between c and d), and the claimed bound then exceeds the achieved ratio. This shows the
  # test above can fail.
  names, p, i = ["a", "b", "c", "d", "t"], [1, 2, 5, 7, 10], [1, 5, 2, 7, 10]
  err = {"a": 4.0, "b": 1.0, "c": 0.5, "d": 0.1, "t": 0.1}
  res = _run(names, p, i, lambda ps: [err[c] for c, _ in ps], [0], eps=2)
  trained = [k for k, r in enumerate(res.rows) if r.trained]
  bound = guarantee.guarantee_bound(p, i, 10, 10, trained, lipschitz=1e-3, e_min=0.1)
  assert res.best.w / 0.9 < bound


def test_guarantee_bound_with_real_archs():
  space = [Arch(d, 4, h, 4 * h) for d in (2, 4, 6) for h in (64, 128, 256)]
  p = [a.depth * 12 * a.hidden ** 2 for a in space]
  i = [a.depth * a.hidden ** 2 * 1.0 for a in space]
  res = _run(space, p, i, lambda ps: [1.0 + str(a).count("2") for a, _ in ps], [0],
                        eps=3)
  assert res.rows[res.maximum_index].name == "D6-A4-H256-I1024"
  assert res.best.name in {str(a) for a in space}


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_fail_before_training():
  calls = []

  def train(pairs):
    calls.append(pairs)
    return [1.0] * len(pairs)

  names, p, i = ["a", "b"], [1.0, 2.0], [1.0, 2.0]
  cases = [
      (dict(candidates=[], p=[], i=[]), "empty"),
      (dict(eps=0), r"eps .* \[1, 2\]"),
      (dict(eps=3), r"eps .* \[1, 2\]"),
      (dict(thetas=[]), "thetas"),
      (dict(thetas=[{"lr": 1}, {"lr": 1}]), "duplicates"),
      (dict(thetas=[object()]), "JSON"),
      (dict(p=[1.0, math.nan]), r"p \(parameter size\).*candidate 1"),
      (dict(i=[math.inf, 1.0]), r"i \(inference cost\).*candidate 0"),
      (dict(p=[1.0]), "one number per candidate"),
      (dict(candidates=["a", "a"]), "same name"),
      (dict(rule="middle"), "unknown interval rule"),
      (dict(maximum="zz"), "not a candidate"),
      (dict(maximum=(0.0, 1.0)), "p_T"),
      (dict(columns={"flops": [1]}), "column 'flops'"),
  ]
  for overrides, pattern in cases:
    kwargs = dict(candidates=names, p=p, i=i, train_and_eval=train, thetas=[0], eps=1)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=pattern):
      _run(**kwargs)
  assert calls == []
  with pytest.raises(ValueError, match="returned 1 errors for 2 pairs"):
    _run(names, p, i, lambda ps: [1.0], [0], eps=1)
  with pytest.raises(ValueError, match="<= 0 for b"):
    _run(names, p, i, lambda ps: [1.0 if c == "a" else 0.0 for c, _ in ps], [0],
                    eps=1)



def test_validate_names_the_config_field_and_applies_the_theta_check():
  with pytest.raises(ValueError, match=r"fptas\.eps must be an int in \[1, 4\].*got 5"):
    fptas.validate(5, "max_gain", [0], 4, where="fptas.")
  with pytest.raises(ValueError, match=r"fptas\.rule='middle'"):
    fptas.validate(1, "middle", [0], 4, where="fptas.")
  with pytest.raises(ValueError, match="fptas.thetas is empty"):
    fptas.validate(1, "all", [], 4, where="fptas.")

  def check(theta):
    if theta < 0:
      raise ValueError("negative theta")
    return theta * 10

  with pytest.raises(ValueError, match="negative theta"):
    fptas.validate(1, "all", [1, -1], 4, check_theta=check)
  settings = fptas.validate(2, "endpoints", [1, 2], 4, check_theta=check)
  assert settings == fptas.Settings(eps=2, rule="endpoints", thetas=(10, 20), num_candidates=4)
  # Settings checked against another search space are refused rather than trusted.
  with pytest.raises(ValueError, match="num_candidates=3"):
    fptas.run_fptas(["a", "b", "c"], [1, 2, 3], [1, 2, 3], lambda ps: [1.0] * len(ps), settings)

# ---------------------------------------------------------------------- journal / resume


def _problem(n=13):
  names = [f"D{k + 1}-A2-H32-I64" for k in range(n)]
  p = [100.0 * (k + 1) + (k % 3) for k in range(n)]
  i = [10.0 * (k + 1) * (1.2 if k % 2 else 0.9) for k in range(n)]
  thetas = [{"lr": 1e-4}, {"lr": 3e-4}]

  def error(name, theta):
    k = names.index(name)
    return 1.0 + 0.1 * ((7 * k) % 5) + 1000 * theta["lr"]

  return names, p, i, thetas, error


class _Killed(Exception):
  pass


def test_resume_after_kill_matches_uninterrupted(tmp_path):
  names, p, i, thetas, error = _problem()
  # Two pairs per train_and_eval call, so a kill can land between calls.
  in_twos = lambda pairs: [list(range(j, min(j + 2, len(pairs))))
                           for j in range(0, len(pairs), 2)]
  common = dict(candidates=names, p=p, i=i, thetas=thetas, eps=3, rule="endpoints",
                group=in_twos)

  def counting(log, kill_after=None):
    def train(pairs):
      if kill_after is not None and len(log) >= kill_after:
        raise _Killed()
      log.append(list(pairs))
      return [error(c, th) for c, th in pairs]
    return train

  full_log = []
  full = _run(train_and_eval=counting(full_log), **common)

  path = tmp_path / "journal.jsonl"
  first_log = []
  with pytest.raises(_Killed):
    _run(train_and_eval=counting(first_log, kill_after=3),
                    journal=journal_lib.Journal(path, "cfg-1"), **common)
  done = {(c, journal_lib.theta_key(t)) for batch in first_log for c, t in batch}
  assert len(done) == 6
  assert len(path.read_text().splitlines()) == 1 + 6

  second_log = []
  resumed = _run(train_and_eval=counting(second_log),
                            journal=journal_lib.Journal(path, "cfg-1"), **common)
  redo = [(c, journal_lib.theta_key(t)) for batch in second_log for c, t in batch]
  assert not done & set(redo), "finished pairs were trained again"
  assert len(redo) + len(done) == full.num_pairs
  assert resumed.num_computed == len(redo)
  assert [r.to_dict() for r in resumed.rows] == [r.to_dict() for r in full.rows]
  assert resumed.best.name == full.best.name

  # A third start trains nothing at all.
  third_log = []
  again = _run(train_and_eval=counting(third_log),
                          journal=journal_lib.Journal(path, "cfg-1"), **common)
  assert third_log == [] and again.num_computed == 0
  assert [r.to_dict() for r in again.rows] == [r.to_dict() for r in full.rows]


def test_torn_last_line_is_ignored_and_cut(tmp_path):
  names, p, i, thetas, error = _problem(6)
  path = tmp_path / "journal.jsonl"
  train = lambda ps: [error(c, th) for c, th in ps]  # noqa: E731
  full = _run(names, p, i, train, thetas, eps=1, journal=journal_lib.Journal(path, "h"))
  good = path.read_bytes()
  path.write_bytes(good + b'{"candidate": "D1-A2-H32-I64", "the')
  with pytest.warns(UserWarning, match="torn last line"):
    journal = journal_lib.Journal(path, "h")
  assert path.read_bytes() == good
  assert len(journal.entries) == len(names) * len(thetas)
  journal.append([("extra", {"lr": 1.0}, 2.5)])
  lines = [json.loads(line) for line in path.read_text().splitlines()]
  assert lines[-1] == {"candidate": "extra", "theta": {"lr": 1.0}, "e": 2.5}
  calls = []
  res = _run(names, p, i, lambda ps: calls.append(ps) or train(ps), thetas, eps=1,
                        journal=journal_lib.Journal(path, "h"))
  assert calls == [] and res.best.name == full.best.name

  # A complete but unreadable last line (e.g. zero-filled after a crash) counts as torn too.
  path.write_bytes(good + b"\x00\x00\x00\n")
  with pytest.warns(UserWarning, match="torn"):
    journal_lib.Journal(path, "h")
  assert path.read_bytes() == good


def test_journal_errors(tmp_path):
  path = tmp_path / "j.jsonl"
  journal = journal_lib.Journal(path, journal_lib.config_hash({"steps": 3}))
  journal.append([("a", 0, 1.0)])
  with pytest.raises(ValueError, match="config hash"):
    journal_lib.Journal(path, journal_lib.config_hash({"steps": 30}))
  assert journal_lib.Journal(path, journal_lib.config_hash({"steps": 3})).get("a", 0) == 1.0
  # Corruption in the middle is not a torn write: refuse.
  lines = path.read_text().splitlines()
  path.write_text(lines[0] + "\n{broken\n" + lines[1] + "\n")
  with pytest.raises(ValueError, match="line 2 is corrupt"):
    journal_lib.Journal(path, journal_lib.config_hash({"steps": 3}))
  other = tmp_path / "other.jsonl"
  other.write_text('{"hello": 1}\n')
  with pytest.raises(ValueError, match="not an FPTAS journal"):
    journal_lib.Journal(other, "x")
  # A torn header alone: start afresh.
  torn = tmp_path / "torn.jsonl"
  torn.write_text('{"kind": "bort_ja')
  with pytest.warns(UserWarning):
    fresh = journal_lib.Journal(torn, "x")
  assert fresh.entries == {} and json.loads(torn.read_text())["config_hash"] == "x"
  assert journal_lib.config_hash({"a": 1, "b": 2}) == journal_lib.config_hash({"b": 2, "a": 1})


# ------------------------------------------------------------------------------------ ties


def test_ties_all_trains_every_member_of_a_tie_and_first_keeps_the_sort_order():
  # b1, b2, b3 share (p, i) = (2, 2), as the A2/A4/A8 variants of one shape do; their errors
  # differ, and the last one in sort order is the best.
  names = ["a", "b1", "b2", "b3", "c", "t"]
  p = [1, 2, 2, 2, 5, 10]
  i = [1, 2, 2, 2, 5, 10]
  err = {"a": 10.0, "b1": 1.0, "b2": 0.8, "b3": 0.5, "c": 1.0, "t": 1.0}
  calls = []

  def train(pairs):
    calls.extend(c for c, _ in pairs)
    return [err[c] for c, _ in pairs]

  assert fptas.tie_sizes(p, i) == [1, 3, 3, 3, 1, 1]
  # Intervals [a, b1], [b2, b3], [c, t]. "first" is the old behaviour: max gain trains a,
  # then b2 (the first of a tie in sort order), then c.
  settings = fptas.validate(2, "max_gain", [{"lr": 1}], len(names), ties="first")
  first = fptas.run_fptas(names, p, i, train, settings)
  assert sorted(calls) == ["a", "b2", "c"] and first.tie_extra == 0 and first.ties == "first"
  assert first.best.name == "b2"
  calls.clear()
  every = fptas.run_fptas(names, p, i, train,
                          fptas.validate(2, "max_gain", [{"lr": 1}], len(names), ties="all"))
  assert sorted(calls) == ["a", "b1", "b2", "b3", "c"]
  assert every.tie_extra == 2 and every.ties == "all" and every.best.name == "b3"
  assert [r.tie for r in every.rows] == [1, 3, 3, 3, 1, 1]
  assert every.to_dict()["tie_extra"] == 2 and every.to_dict()["rows"][1]["tie"] == 3
  # The default is "all".
  assert fptas.validate(2, "max_gain", [{"lr": 1}], len(names)).ties == "all"
  with pytest.raises(ValueError, match="config.fptas.ties='some'"):
    fptas.validate(2, "max_gain", [{"lr": 1}], len(names), where="config.fptas.", ties="some")


def test_with_ties_keeps_size_order_across_interval_boundaries():
  p = [3, 1, 3, 2, 3]
  i = [1, 1, 1, 1, 1]
  order = fptas.sort_by_size(p, i)
  assert order == [1, 3, 0, 2, 4]
  # The tie {0, 2, 4} straddles intervals [1, 3], [0, 2], [4]; one representative pulls all.
  assert fptas.with_ties([1, 0], order, p, i, "all") == [1, 0, 2, 4]
  assert fptas.with_ties([1, 0], order, p, i, "first") == [1, 0]
  with pytest.raises(ValueError, match="tie handling"):
    fptas.with_ties([1], order, p, i, "none")
