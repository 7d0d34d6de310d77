"""Tests of the extraction outputs (bort_jax/report.py): tables, Pareto front, plot, ledger."""

import csv
import json
import math

import numpy as np
import pytest

from bort_jax.search import fptas, report
from bort_jax.core.arch import Arch


def _result(rule="max_gain", eps=2):
  space = [Arch(d, 2, h, 2 * h) for d in (1, 2, 3) for h in (32, 64, 128)]
  p_total = [d.depth * 12 * d.hidden ** 2 + 100 * d.hidden for d in space]
  p_eff = [d.depth * 12 * d.hidden ** 2 for d in space]
  flops = [2.0 * d.depth * d.hidden ** 2 * 128 for d in space]
  latency = [0.1 + 1e-6 * f for f in flops]

  def train(pairs):
    return [1.0 / (a.depth * a.hidden) ** 0.3 * (1 + th["lr"]) for a, th in pairs]

  settings = fptas.validate(eps, rule, [{"lr": 0.5}, {"lr": 0.1}], len(space))
  return fptas.run_fptas(space, p_eff, latency, train, settings,
                         columns={"params_total": p_total, "params_effective": p_eff,
                                  "flops": flops})


def test_pareto_front_hand_cases():
  pts = [[1, 5], [2, 3], [3, 4], [4, 1], [2, 3], [5, 5]]
  # [3,4] is dominated by [2,3]; [5,5] by everything; the duplicate [2,3]s are both kept.
  assert report.pareto_front(pts) == [0, 1, 4, 3]
  assert report.pareto_front([[1, 1], [1, 2], [2, 1]]) == [0]
  assert report.pareto_front([[1, 2, 3]]) == [0]
  assert report.pareto_front(np.zeros((0, 2))) == []
  with pytest.raises(ValueError, match="point 1"):
    report.pareto_front([[1, 2], [math.nan, 1]])
  with pytest.raises(ValueError, match="2-D"):
    report.pareto_front([1, 2, 3])


def test_pareto_front_against_brute_force():
  rng = np.random.default_rng(1)
  for _ in range(30):
    pts = rng.integers(0, 6, size=(int(rng.integers(1, 25)), int(rng.integers(2, 4))))
    brute = [a for a in range(len(pts))
             if not any((pts[b] <= pts[a]).all() and (pts[b] < pts[a]).any()
                        for b in range(len(pts)))]
    assert sorted(report.pareto_front(pts)) == brute


def test_write_tables(tmp_path):
  res = _result()
  paths = report.write_tables(res, tmp_path / "run")
  with open(paths["csv"], newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(res.rows)
  assert list(rows[0]) == ["rank", "arch", "p", "flops", "params_effective", "params_total",
                           "i", "gain_p", "gain_i", "e", "1/e", "W", "theta", "trained", "tie",
                           "interval"]
  for r in rows:  # W is the product of the three factors the table shows
    if r["W"]:
      assert float(r["W"]) == pytest.approx(
          float(r["gain_p"]) * float(r["gain_i"]) * float(r["1/e"]), rel=1e-9)
      assert float(r["1/e"]) == pytest.approx(1 / float(r["e"]))
  trained = [r for r in rows if r["trained"] == "True"]
  untrained = [r for r in rows if r["trained"] == "False"]
  assert len(trained) == sum(r.trained for r in res.rows) and untrained
  w = [float(r["W"]) for r in trained]
  assert w == sorted(w, reverse=True) and rows.index(trained[-1]) < rows.index(untrained[0])
  assert all(r["W"] == "" and r["e"] == "" for r in untrained)
  assert rows[0]["arch"] == res.best.name and float(rows[0]["W"]) == pytest.approx(res.best.w)
  assert json.loads(rows[0]["theta"]) == res.best.theta

  md = open(paths["md"]).read().splitlines()
  header = next(k for k, line in enumerate(md) if line.startswith("| rank"))
  body = md[header + 2:]
  assert len(body) == len(res.rows)
  assert all(line.count("|") == md[header].count("|") for line in body)
  assert [line.split("|")[2].strip() for line in body] == [r["arch"] for r in rows]
  assert f"**{res.best.name}**" in "\n".join(md)

  data = json.load(open(paths["json"]))
  assert data["best"] == res.best.name and len(data["rows"]) == len(res.rows)
  assert open(paths["chosen"]).read().strip() == res.best.name
  assert Arch.parse(open(paths["chosen"]).read()) in [r.candidate for r in res.rows]


def test_pareto_plot(tmp_path):
  res = _result(rule="endpoints")
  out = report.pareto_plot(res, tmp_path / "pareto.png", i_label="latency (ms)")
  data = open(out, "rb").read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20000
  from matplotlib.image import imread
  img = imread(out)
  assert img.shape[0] > 400 and img.shape[1] > 1000
  # No figure leaks into pyplot's global state.
  import matplotlib.pyplot as plt
  assert plt.get_fignums() == []


def test_write_ledger(tmp_path):
  ledger = {"wall_time_s": 12.5, "compile_time_s": 3.25, "compile_count": np.int64(4),
            "flops": 1.5e12, "device": "cpu"}
  path = report.write_ledger(tmp_path, ledger)
  back = json.load(open(path))
  assert back == {"wall_time_s": 12.5, "compile_time_s": 3.25, "compile_count": 4,
                  "flops": 1.5e12, "device": "cpu"}
  with pytest.raises(ValueError, match="lacks \\['flops'\\]"):
    report.write_ledger(tmp_path, {k: 1 for k in report.LEDGER_KEYS if k != "flops"})
  with pytest.raises(ValueError, match="'compile_time_s'"):
    report.write_ledger(tmp_path, dict(ledger, compile_time_s=-1.0))
  with pytest.raises(ValueError, match="'flops'"):
    report.write_ledger(tmp_path, dict(ledger, flops=math.nan))
  with pytest.raises(ValueError, match="JSON"):
    report.write_ledger(tmp_path, dict(ledger, device=object()))


def _flat_or_separated(errors):
  """Four candidates and T with gains .8*.8, .6*.6, .4*.4, .2*.2, 0 and the given errors."""
  names = ["a", "b", "c", "d", "t"]
  p = [2.0, 4.0, 6.0, 8.0, 10.0]
  err = dict(zip(names, errors))
  settings = fptas.validate(1, "max_gain", [{"lr": 1}], len(names))
  return fptas.run_fptas(names, p, p, lambda pairs: [err[c] for c, _ in pairs], settings)


def test_flat_errors_give_the_size_alone_warning_and_separated_ones_do_not(tmp_path, caplog):
  flat = _flat_or_separated([1.92, 1.85, 1.79, 1.72, 1.67])
  why = report.explain(flat)
  assert why["size"]["warn"] and why["max_gain"] == "a" and flat.best.name == "a"
  report.write_tables(flat, tmp_path / "flat")
  text = open(tmp_path / "flat" / "results.md").read()
  assert "WARNING: the choice is made by size alone" in text
  # The margin: W(a) = .64/1.92, runner-up W(b) = .36/1.85.
  w_a, w_b = 0.64 / 1.92, 0.36 / 1.85
  assert why["runner_up"] == "b"
  assert why["margin"]["winner_e_rise"] == pytest.approx(w_a / w_b - 1)
  assert f"rises by {100 * (w_a / w_b - 1):.3g}%" in text
  assert f"b's e falls by {100 * (1 - w_b / w_a):.3g}%" in text
  # Errors that spread more than the gains (.64/.04 = 16x) separate the candidates.
  separated = _flat_or_separated([40.0, 9.0, 2.0, 0.2, 1.0])
  why = report.explain(separated)
  assert not why["size"]["warn"] and separated.best.name == "d"
  report.write_tables(separated, tmp_path / "sep")
  assert "WARNING" not in open(tmp_path / "sep" / "results.md").read()


def test_ties_show_in_the_report(tmp_path):
  names = ["a2", "a4", "b", "t"]
  p = [1.0, 1.0, 2.0, 4.0]
  err = {"a2": 2.0, "a4": 1.0, "b": 2.0, "t": 1.0}
  train = lambda pairs: [err[c] for c, _ in pairs]
  for ties, want in (("all", "1 extra trainings"), ("first", "`ties=first`")):
    settings = fptas.validate(2, "max_gain", [{"lr": 1}], len(names), ties=ties)
    res = fptas.run_fptas(names, p, p, train, settings)
    paths = report.write_tables(res, tmp_path / ties, notes=["an extra note"])
    text = open(paths["md"]).read()
    assert "ties in (p, i): 2 candidates" in text and want in text
    assert "- an extra note" in text
    with open(paths["csv"], newline="") as f:
      assert [r["tie"] for r in csv.DictReader(f) if r["arch"] in ("a2", "a4")] == ["2", "2"]
  assert res.best.name == "a2"  # "first" never trains a4, the better of the tie


def test_audit_plot(tmp_path):
  from bort_jax.search import audit
  rows = [{"name": n, "short": s, "long": l} for n, s, l in (
      ("a", 1.92, 1.4), ("b", 1.85, 1.3), ("c", 1.79, 1.35), ("d", 1.67, 0.9))]
  summary = audit.audit_summary([r["name"] for r in rows], [0.8, 0.6, 0.4, 0.2],
                                [r["short"] for r in rows], [r["long"] for r in rows], "a", 0.6)
  out = report.audit_plot(rows, summary, tmp_path / "audit.png", 3, 30)
  from matplotlib.image import imread
  img = imread(out)
  assert img.shape[0] > 500 and img.shape[1] > 600
  import matplotlib.pyplot as plt
  assert plt.get_fignums() == []
