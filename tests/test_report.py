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
                           "i", "e", "W", "theta", "trained", "interval"]
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
