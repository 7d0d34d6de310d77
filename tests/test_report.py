"""Tests of the extraction outputs (bort_jax/report.py): tables, Pareto front, plot, ledger."""

import csv
import json
import math

import numpy as np
import pytest

from bort_jax.search import fptas, report, select
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


def test_speed_words_word_a_slower_model_as_slower():
  assert select.speed_words(2.5) == "2.5x faster than the teacher"
  assert select.speed_words(0.8) == "1.25x slower than the teacher"  # not "0.8x faster"
  assert select.speed_words(0.4, ".1f", than="") == "2.5x slower"
  assert select.speed_words(4.0, ".1f", than="") == "4.0x faster"
  assert select.speed_words(1.0004) == "as fast as the teacher"
  assert select.speed_words(0.9996, than="BERT-base") == "as fast as BERT-base"


def _budget_result(speedup):
  """A stand-in for fptas.Result with a budget whose choice has the given speed-up."""
  from types import SimpleNamespace as NS
  best = NS(name="D2-A2-H64-I128", w=2.0, e=0.3, theta={"lr": 0.1})
  rows = [NS(p=1e5, trained=True), NS(p=2e5, trained=True)]
  sel = {"choice": "D1-A2-H32-I64", "budget": "p <= 150000", "e": 0.4, "p": 1e5,
         "speedup": speedup, "runner_up": None, "feasible": 1, "feasible_trained": 1}
  return NS(best=best, rows=rows, p_T=3e5, budget=NS(feasible=[True, False]), budget_extra=0,
            selection=lambda: sel)


@pytest.mark.parametrize("speedup, words", [(2.0, "2x faster than the teacher"),
                                            (0.5, "2x slower than the teacher")])
def test_budget_choice_line_words_the_speed_both_ways(speedup, words):
  chosen = report.choice_lines(_budget_result(speedup))[0]
  assert f"p = 100,000, {words}; runner-up none" in chosen
  assert "0.5x faster" not in chosen


def _legend_covers(fig) -> list:
  """Per axes, the plotted points (display coordinates) that its legend box covers."""
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  covered = []
  for ax in fig.axes:
    box = ax.get_legend().get_window_extent(renderer)
    points = np.concatenate([c.get_offsets() for c in ax.collections]
                            + [np.column_stack(line.get_data()) for line in ax.lines])
    covered += [tuple(xy) for xy in ax.transData.transform(points) if box.contains(*xy)]
  return covered


def test_pareto_plot_legend_covers_no_point(tmp_path, monkeypatch):
  figs = []
  real = report._save
  monkeypatch.setattr(report, "_save", lambda fig, path: figs.append(fig) or real(fig, path))
  res = _result(rule="endpoints")
  # A trained candidate in the upper right corner, where the legend used to sit.
  far = max(res.rows, key=lambda r: r.i)
  far.e = max(r.e for r in res.rows if r.trained)
  far.extra["params_effective"] = max(r.extra["params_effective"] for r in res.rows)
  report.pareto_plot(res, tmp_path / "pareto.png", i_label="latency (ms)")
  assert _legend_covers(figs[0]) == []
