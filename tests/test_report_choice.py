"""The demo report's side-by-side of W's choice and the budget's choice
(bort_jax/pipelines/report_choice.py through ``report.run``), from a hand-made workdir."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from bort_jax import main as cli_main
from bort_jax.core import arch as arch_lib
from bort_jax.core import cost, model
from bort_jax.interop import export
from bort_jax.pipelines import report, report_choice

W_CHOICE, BUDGET_CHOICE, TEACHER = "D1-A2-H16-I32", "D1-A2-H32-I32", "D2-A2-H32-I64"


def _export(path, arch):
  """An export of the right shapes without compiling an init (only the shapes are read)."""
  cfg = arch_lib.get_model_config(arch, family="bert", vocab_size=64, max_positions=32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), cfg, model.HeadSpec("mlm")))
  export.save(str(path), jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes), cfg)


def _fake_latency(configs, batch, seq_len, rounds, warmup, log=None):
  """Latency proportional to the FLOPs (no compile), so measured = predicted speed-up."""
  del rounds, warmup, log
  return {name: {"median_ms": cost.forward_flops(c, batch, seq_len)["total"] / 1e6,
                 "iqr_ms": 0.01, "arch": str(c.arch), "device": "cpu"}
          for name, c in configs.items()}


def _results(select_block):
  rows = [{"name": name, "p": float(cost.param_counts(name)["total"]),
           "i": float(cost.forward_flops(name, 1, 16)["total"]), "e": e, "w": w,
           "trained": True, "feasible": True} for name, e, w in
          ((W_CHOICE, 2.0, 0.5), (BUDGET_CHOICE, 1.5, 0.4))]
  chosen = select_block.get("choice", W_CHOICE)
  return {"best": W_CHOICE, "best_w": 0.5, "chosen": chosen, "select": select_block,
          "eps": 1, "rule": "max_gain", "i_T": 1e9, "rows": rows}


def _workdir(root, select_block, student):
  work = root / "work"
  (work / "extract").mkdir(parents=True)
  (work / "extract" / "results.json").write_text(json.dumps(_results(select_block)))
  _export(work / "distill" / "export", student)
  _export(work / "teacher" / "export", TEACHER)
  return str(work)


def test_report_sets_both_choices_side_by_side_and_times_ws_shape(tmp_path, monkeypatch):
  monkeypatch.setattr(cost, "interleaved_latency", _fake_latency)
  budget = {"rule": "budget", "budget": "speed-up >= 2x over the teacher (in forward FLOPs)",
            "choice": BUDGET_CHOICE, "e": 1.5, "feasible": 2, "feasible_trained": 2,
            "speedup": 2.5, "w_choice": W_CHOICE}
  work = _workdir(tmp_path, budget, BUDGET_CHOICE)  # the demo distilled the budget's choice
  config = cli_main.cli.load_config("configs/report.py:tiny")
  summary = report.run(config, work)
  text = open(summary["report"]).read()
  assert "Selection rule `budget` (speed-up >= 2x over the teacher (in forward FLOPs)): " \
         f"**{BUDGET_CHOICE}**" in text
  assert f"W's choice: **{W_CHOICE}** (W = 0.5000)" in text
  assert summary["extraction"]["chosen"] == BUDGET_CHOICE
  assert summary["extraction"]["w_choice"] == W_CHOICE
  # W's shape is not the student's: a random model of it is timed beside them.
  speed = json.load(open(os.path.join(work, "report", "speed.json")))
  assert speed["timings"]["w_choice"]["arch"] == W_CHOICE
  assert "budget_choice" not in speed["timings"]  # the student has its shape
  table = text.split("### W's choice and the budget's choice")[1]
  student = export.load_config(os.path.join(work, "distill", "export"))
  flops = lambda arch: cost.forward_flops(student.replace(arch=arch_lib.Arch.parse(arch)), 1,
                                          16)["total"]
  teacher = cost.forward_flops(export.load_config(os.path.join(work, "teacher", "export")), 1,
                               16)["total"]
  for label, arch, e, distilled in (("W (the paper's rule)", W_CHOICE, "2", "no"),
                                    ("budget: speed-up >= 2x", BUDGET_CHOICE, "1.5", "yes")):
    line = next(row for row in table.splitlines() if row.startswith(f"| {label}"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == arch and cells[3] == e and cells[-1] == distilled
    # Timings proportional to FLOPs: measured and predicted speed-ups agree.
    assert cells[4] == cells[5] == f"{teacher / flops(arch):.3g}x"
  # A rerun reuses the timings and still shows the table.
  again = open(report.run(config, work)["report"]).read()
  assert "### W's choice and the budget's choice" in again


def test_report_with_rule_w_times_no_extra_model(tmp_path, monkeypatch):
  monkeypatch.setattr(cost, "interleaved_latency", _fake_latency)
  work = _workdir(tmp_path, {"rule": "w", "choice": W_CHOICE}, W_CHOICE)
  summary = report.run(cli_main.cli.load_config("configs/report.py:tiny"), work)
  text = open(summary["report"]).read()
  assert f"Selection rule `w` (the paper's): W's choice **{W_CHOICE}**" in text
  assert f"Chosen: **{W_CHOICE}**" in text
  speed = json.load(open(os.path.join(work, "report", "speed.json")))
  assert set(speed["timings"]) == {"student", "teacher"}
  assert "| W (the paper's rule) | D1-A2-H16-I32 |" in text and "budget:" not in text


def test_picks_read_older_results_without_a_selection():
  assert report_choice.picks(None) == [] and report_choice.extraction_lines({}) == []
  old = {"best": W_CHOICE, "rows": [{"name": W_CHOICE, "e": 1.25}]}
  assert report_choice.picks(old) == [{"rule": "w", "label": "W (the paper's rule)",
                                       "name": W_CHOICE, "e": 1.25, "distilled": True}]
  assert report_choice.choice_table({"choices": [], "timings": {}}) == []


@pytest.mark.parametrize("speedup, words", [(2.5, "2.5x faster than the teacher"),
                                            (0.8, "1.25x slower than the teacher")])
def test_extraction_line_words_the_budget_choices_speed_both_ways(speedup, words):
  budget = {"rule": "budget", "budget": "p <= 2M", "choice": BUDGET_CHOICE, "e": 1.5,
            "feasible": 2, "feasible_trained": 2, "speedup": speedup}
  line = report_choice.extraction_lines(_results(budget))[0]
  assert f"(2 of them trained), {words} in the search's cost, is the one distilled" in line
  assert "0.8x faster" not in line
