"""The downstream study (bort_jax/pipelines/study.py): the rivals it picks, and the whole study
on tiny models (a tiny extraction with its audit, distillation, fine-tuning populations)."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_distill as helpers  # noqa: E402  (the tiny teacher, corpus and config helpers)

from bort_jax import cli  # noqa: E402
from bort_jax.finetune import casts, tasks  # noqa: E402
from bort_jax.pipelines import extract, study  # noqa: E402
from bort_jax.search import report as search_report  # noqa: E402


def _row(name, p, i):
  return {"name": name, "p": p, "i": i}


def test_pick_rivals_hand_case():
  results = {"best": "c", "maximum_point": "t",
             "rows": [_row("a", 1, 10), _row("b", 2, 30), _row("c", 3, 100), _row("d", 4, 110),
                      _row("e", 5, 120), _row("t", 9, 300)]}
  audit = {"rows": [{**_row("c", 3, 100), "long": 1.0}, {**_row("d", 4, 110), "long": 0.9},
                    {**_row("e", 5, 120), "long": 0.8}, {**_row("b", 2, 30), "long": 0.1}]}
  # Within 25% of c's i = 100: d (110) and e (120); e has the lower S-step error. b is better
  # still but far from c's cost: it is the lowest-error rival.
  assert study.pick_rivals(results, audit, 0.25) == [
      ("c", ["chosen"]), ("a", ["smallest"]), ("e", ["near_latency"]), ("b", ["lowest_error"]),
      ("t", ["teacher_shaped"])]
  # No audited candidate in a 5% band: the nearest in i (d).
  assert study.pick_rivals(results, audit, 0.05)[2] == ("d", ["near_latency"])
  # The chosen one is also the smallest: trained once with both roles.
  results["best"] = "a"
  audit["rows"][0] = {**_row("a", 1, 10), "long": 1.0}
  assert study.pick_rivals(results, audit, 0.25)[0] == ("a", ["chosen", "smallest"])
  # The study's front (latency down, metric up) is the search's Pareto front on (latency,
  # -metric): (3.0, 0.6) is beaten by (2.0, 0.7); equal points stay on it.
  points = [(1.0, 0.5), (2.0, 0.7), (3.0, 0.6), (2.0, 0.7)]
  assert search_report.pareto_front([(lat, -m) for lat, m in points]) == [0, 1, 3]


def _register_tasks(rng):
  """Three tiny classification tasks over the corpus' words: does the sentence hold a word?"""
  words = sorted({w for doc in helpers.DOCUMENTS for s in doc for w in helpers._words(s)
                  if w.isalpha()})
  names = []
  for k, marker in enumerate(("river", "bees", "bridge")):
    records = []
    for idx in range(32):
      chosen = list(rng.choice(words, size=6))
      label = int(rng.random() < 0.5)
      if label:
        chosen[int(rng.integers(6))] = marker
      records.append({"sentence": " ".join(chosen), "label": int(marker in chosen), "idx": idx})
    name = f"test/study_{k}"
    tasks.register_task(tasks.TaskSpec(
        name=name, builder=None, kind="classification", num_labels=2,
        cast=casts.pair_cast("sentence"),
        source=lambda split, data_dir, records=records: records), overwrite=True)
    names.append(name)
  return names


def test_study_table_words_a_model_slower_than_the_teacher_as_slower(tmp_path):
  from types import SimpleNamespace
  metrics = {"demo/t": {"metric": "accuracy", "mean": 0.7, "std": 0.01, "majority": 0.5,
                        "dev_records": 40, "lr": 1e-3}}
  rows = [{"arch": arch, "roles": roles, "params_total": 1000, "latency_ms": ms,
           "latency_iqr_ms": 0.1, "speedup_vs_teacher": 4.0 / ms, "metrics": metrics}
          for arch, roles, ms in (("D1-A2-H16-I32", ["chosen"], 2.0),
                                  ("D4-A2-H64-I128", ["teacher_shaped"], 6.0))]
  latency = SimpleNamespace(batch=1, seq_len=16, repeats=3)
  paths = study.write_study(rows, ["demo/t"], str(tmp_path), latency,
                            {"latency_ms": 4.0, "latency_iqr_ms": 0.1})
  table = [line.strip("|").split("|") for line in open(paths["md"]) if line.startswith("| ")]
  column = [cells[4].strip() for cells in table]
  assert column == ["speed vs the teacher", "2.0x faster", "1.5x slower"]  # not "0.7"


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path):
  assets = helpers.make_assets(str(tmp_path / "assets"))
  extract_cfg = cli.load_config("configs/extract_demo.py:tiny")
  extract_cfg.teacher.path = assets["teacher"]
  extract_cfg.cost.latency_table = str(tmp_path / "latency.json")
  extract_dir = str(tmp_path / "extract")
  chosen = extract.run(extract_cfg, extract_dir)["chosen"]

  config = cli.load_config("configs/study_demo.py:tiny")
  config.extract_dir = extract_dir
  for name, value in helpers.overrides(assets).items():
    node = config.distill
    *parents, leaf = name.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  names = _register_tasks(np.random.default_rng(0))
  for ft, name in zip(config.finetune.values(), names):
    ft.task, ft.tokenizer = name, assets["tokenizer"]
  workdir = str(tmp_path / "study")
  out = study.run(config, workdir)

  roles = [r for row in out["archs"] for r in row["roles"]]
  assert sorted(roles) == sorted(study.ROLES)
  assert out["archs"][0]["arch"] == chosen and "chosen" in out["archs"][0]["roles"]
  for row in out["archs"]:
    assert row["latency_ms"] > 0 and row["params_total"] > 0
    for name in names:
      m = row["metrics"][name]
      assert len(m["values"]) == 3 and all(0 <= v <= 1 for v in m["values"])
      assert m["mean"] == pytest.approx(np.mean(m["values"]))
  md = open(os.path.join(workdir, "study.md")).read()
  assert all(row["arch"] in md for row in out["archs"]) and "+-" in md
  assert "accuracy/latency front" in md
  assert os.path.getsize(os.path.join(workdir, "study.png")) > 10000
  back = json.load(open(os.path.join(workdir, "study.json")))
  assert [r["arch"] for r in back["archs"]] == [r["arch"] for r in out["archs"]]
  # The teacher is timed beside them: each row's speed-up is the ratio of the two medians.
  assert back["teacher"]["latency_ms"] > 0 and "speed vs the teacher" in md
  for row in back["archs"]:
    assert row["speedup_vs_teacher"] == pytest.approx(
        back["teacher"]["latency_ms"] / row["latency_ms"])


def test_a_preempted_distillation_stops_the_study(tmp_path, monkeypatch, capsys):
  """SIGTERM in a rival's distillation (no export): the study stops, nothing is fine-tuned."""
  from bort_jax.finetune import population_mode
  from bort_jax.pipelines import distill, setup
  extract_dir = tmp_path / "extract"
  extract_dir.mkdir()
  rows = [_row("D1-A2-H16-I32", 1, 10), _row("D1-A2-H32-I64", 2, 20),
          _row("D2-A2-H32-I64", 3, 30)]
  (extract_dir / "results.json").write_text(json.dumps(
      {"best": "D1-A2-H16-I32", "maximum_point": "D2-A2-H32-I64", "rows": rows}))
  (extract_dir / "audit.json").write_text(json.dumps({"rows": [{**r, "long": 1.0}
                                                               for r in rows]}))
  config = cli.load_config("configs/study_demo.py:tiny")
  config.extract_dir = str(extract_dir)
  calls = []
  monkeypatch.setattr(setup, "check_config", lambda cfg, **kw: None)
  monkeypatch.setattr(distill, "run", lambda cfg, wd: calls.append(wd) or {"preempted": True,
                                                                          "step": 3})
  monkeypatch.setattr(population_mode, "run", lambda *a: pytest.fail("fine-tuned a missing export"))
  out = study.run(config, str(tmp_path / "study"))
  assert out["preempted"] and "D1-A2-H16-I32 was preempted" in out["message"]
  assert len(calls) == 1 and "Stopped:" in capsys.readouterr().out
