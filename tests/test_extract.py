"""Extraction end to end on a tiny space: outputs, resumption, bad input before training."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bort_jax.interop import export
from bort_jax.core import arch as arch_lib
from bort_jax.core import cost
from bort_jax.pipelines import extract, extract_costs
from bort_jax.core import model
from bort_jax.search import proxy
from bort_jax.cli import load_config

VOCAB = 64


def _config(tmp_path, **changes):
  config = load_config("configs/extract_demo.py:tiny")
  teacher_dir = tmp_path / "teacher"
  if not teacher_dir.exists():
    teacher = arch_lib.get_model_config("D1-A2-H32-I64", family="bert", vocab_size=VOCAB,
                                        max_positions=32, pooler=False)
    params = model.init(jax.random.key(1), teacher, model.HeadSpec("mlm"))
    export.save(str(teacher_dir), jax.device_get(params), teacher)
  config.teacher.path = str(teacher_dir)
  config.cost.latency_table = str(tmp_path / "latency.json")
  for key, value in changes.items():
    node = config
    *parents, leaf = key.split(".")
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config


def test_tiny_extraction_writes_every_output(tmp_path, monkeypatch):
  config = _config(tmp_path)
  workdir = str(tmp_path / "run")
  summary = extract.run(config, workdir)
  candidates = extract.search_space(config.space)
  assert summary["candidates"] == len(candidates) == 16
  # eps=2 makes each interval one (p, i) tie of an A2 and an A4 variant: ties="all" trains both.
  assert summary["trained"] == 16 and summary["tie_extra"] == 8
  for name in ("results.md", "results.csv", "results.json", "pareto.png", "chosen_arch.txt",
               "ledger.json", "journal.jsonl", "audit.json", "audit.png", "audit_journal.jsonl"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  chosen = open(os.path.join(workdir, "chosen_arch.txt")).read().strip()
  assert chosen == summary["chosen"]
  assert arch_lib.Arch.parse(chosen) in candidates
  table = json.load(open(os.path.join(workdir, "results.json")))
  rows = [r for r in table["rows"] if r["trained"]]
  assert len(rows) == 16 and all(r["e"] > 0 for r in rows)
  ws = [r["w"] for r in rows]
  assert max(ws) == pytest.approx(summary["w"])
  ledger = json.load(open(os.path.join(workdir, "ledger.json")))
  assert 1 <= ledger["compile_count"] <= 16
  assert 1.0 <= ledger["padding_overhead"] <= config.proxy.max_overhead + 1e-9
  assert ledger["ties"] == "all" and ledger["tie_extra_trainings"] == 8
  # The audit: S=6 steps on >= 3 strata plus the chosen one, its cost in the ledger.
  report_ = json.load(open(os.path.join(workdir, "audit.json")))
  names = [r["name"] for r in report_["rows"]]
  assert summary["chosen"] in names and 3 <= len(names) <= 5
  # The tiny config's rule is the budget's: its audit holds the budget's choice and runner-up
  # and judges the lowest feasible error.
  assert summary["select"]["rule"] == "budget" and report_["summary"]["rule"] == "budget"
  assert report_["budget_runner_up"] == summary["select"]["runner_up"] in names
  assert report_["long_steps"] == 6 and report_["short_steps"] == 3
  short = {r["name"]: r["e"] for r in table["rows"] if r["trained"]}
  assert all(r["short"] == pytest.approx(short[r["name"]]) for r in report_["rows"])
  assert all(r["long"] != pytest.approx(r["short"]) for r in report_["rows"])
  assert -1 <= report_["summary"]["kendall_tau_b"] <= 1
  assert ledger["audit"]["wall_time_s"] > 0 and ledger["audit"]["pairs"] == len(names)
  assert ledger["audit"]["trained_now"] == len(names)
  assert ledger["wall_time_s"] >= ledger["search_wall_time_s"] + ledger["audit"]["wall_time_s"] - 1e-6
  md = open(os.path.join(workdir, "results.md")).read()
  assert "proxy audit: the 3-step proxy" in md and "tau-b >= 0.6" in md
  assert "- margin:" in md and "ties in (p, i): 16 candidates" in md
  assert "config.cost.size='total'" in md and "config.proxy.init='random'" in md

  # A rerun in the same workdir trains nothing: search and audit come from their journals.
  trained = []
  original = proxy.PopulationTrainer.train_and_eval
  monkeypatch.setattr(proxy.PopulationTrainer, "train_and_eval",
                      lambda self, pairs, data, **k: trained.extend(pairs) or original(
                          self, pairs, data, **k))
  again = extract.run(config, workdir)
  assert trained == [] and again["audit"] == summary["audit"]


# The kill tests' space: depth 1 only, one candidate per (p, i) tie (ties="first"), one bucket
# per shape (max_overhead 1.0) and no audit: 4 trainings, each its own compile, so the journal
# grows a line at a time and a kill lands between two of them.
KILL_CHANGES = {"space.depth": (1,), "proxy.max_overhead": 1.0, "fptas.ties": "first",
                "audit.enabled": False}
KILL_TRAININGS = 4


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The kill tests' extraction run without a kill: its config and its results' rows."""
  tmp_path = tmp_path_factory.mktemp("uninterrupted")
  config = _config(tmp_path, **KILL_CHANGES)
  full = extract.run(config, str(tmp_path / "full"))
  assert full["trained"] == KILL_TRAININGS
  rows = json.load(open(tmp_path / "full" / "results.json"))["rows"]
  return {"config": config, "chosen": full["chosen"], "rows": rows}


def _resume_counting(config, workdir, monkeypatch) -> tuple[dict, list[str]]:
  """Runs the extraction in ``workdir`` again, recording which candidates it trains."""
  trained = []
  original = proxy.PopulationTrainer.train_and_eval

  def counting(self, pairs, data, **kwargs):
    trained.extend(str(a) for a, _ in pairs)
    return original(self, pairs, data, **kwargs)

  monkeypatch.setattr(proxy.PopulationTrainer, "train_and_eval", counting)
  return extract.run(config, str(workdir)), trained


def test_killed_extraction_resumes_without_recomputing(uninterrupted, tmp_path, monkeypatch):  # pylint: disable=redefined-outer-name
  config = uninterrupted["config"]
  calls = {"n": 0}
  original = proxy.PopulationTrainer.train_and_eval

  def dying(self, pairs, data, **kwargs):
    calls["n"] += 1
    if calls["n"] == 2:
      raise KeyboardInterrupt("simulated kill")
    return original(self, pairs, data, **kwargs)

  monkeypatch.setattr(proxy.PopulationTrainer, "train_and_eval", dying)
  workdir = tmp_path / "resumed"
  with pytest.raises(KeyboardInterrupt):
    extract.run(config, str(workdir))
  journalled = len((workdir / "journal.jsonl").read_text().splitlines()) - 1
  assert 0 < journalled < KILL_TRAININGS

  resumed, trained = _resume_counting(config, workdir, monkeypatch)
  assert len(trained) == KILL_TRAININGS - journalled
  assert resumed["computed_now"] == KILL_TRAININGS - journalled
  assert resumed["chosen"] == uninterrupted["chosen"]
  a = json.load(open(workdir / "results.json"))["rows"]
  assert ([(r["name"], r["e"], r["w"]) for r in a]
          == [(r["name"], r["e"], r["w"]) for r in uninterrupted["rows"]])


def test_sigkilled_extraction_resumes_and_matches_an_uninterrupted_run(uninterrupted, tmp_path,  # pylint: disable=redefined-outer-name
                                                                       monkeypatch):
  config = uninterrupted["config"]
  workdir = tmp_path / "killed"
  journal = workdir / "journal.jsonl"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "-m", "bort_jax.main", "extract",
         f"--config={os.path.join(repo, 'configs', 'extract_demo.py')}:tiny",
         f"--workdir={workdir}", f"--config.teacher.path={config.teacher.path}",
         f"--config.cost.latency_table={config.cost.latency_table}",
         "--config.space.depth=(1,)", "--config.proxy.max_overhead=1.0",
         "--config.fptas.ties=first", "--config.audit.enabled=False"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo,
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_DEFAULT_MATMUL_PRECISION="highest")
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
      if journal.exists() and len(journal.read_text().splitlines()) - 1 >= 2:
        break
      time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait(timeout=60)
  journalled = len(journal.read_text().splitlines()) - 1
  assert 2 <= journalled < KILL_TRAININGS

  resumed, trained = _resume_counting(config, workdir, monkeypatch)
  assert len(trained) == KILL_TRAININGS - journalled
  assert resumed["computed_now"] == KILL_TRAININGS - journalled
  assert resumed["chosen"] == uninterrupted["chosen"]
  a = json.load(open(workdir / "results.json"))["rows"]
  b = uninterrupted["rows"]
  assert [r["name"] for r in a] == [r["name"] for r in b]
  for ra, rb in zip(a, b):
    assert (ra["e"] is None) == (rb["e"] is None)
    if ra["e"] is not None:
      assert ra["e"] == pytest.approx(rb["e"], rel=1e-6)
      assert ra["w"] == pytest.approx(rb["w"], rel=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"space.hidden": (30,), "space.heads": (4, 8)}, "no candidate"),
    ({"fptas.eps": 0}, "fptas.eps must be an int"),
    ({"fptas.eps": 17}, "fptas.eps must be an int"),
    ({"fptas.thetas": ()}, "thetas is empty"),
    ({"fptas.thetas": ({"lr": 1e-3, "momentum": 0.9},)}, "unknown hyperparameters"),
    ({"fptas.ties": "random"}, "config.fptas.ties='random'"),
    ({"audit.steps": 3}, "config.audit.steps=3: must be an integer larger than"),
    ({"audit.sample": 0}, "config.audit.sample=0"),
    ({"audit.tau_min": 1.5}, "config.audit.tau_min=1.5"),
    ({"proxy.init": "teacher"}, "config.proxy.init='teacher'"),
    ({"select.rule": "smallest"}, "config.select.rule='smallest'"),
    ({"select.min_speedup": -1.0}, "config.select.min_speedup=-1.0"),
    ({"select.max_latency_ms": -5.0}, "config.select.max_latency_ms=-5.0"),
    ({"select.max_params": -3}, "config.select.max_params=-3"),
    ({"select.min_speedup": 0.0}, "config.select.rule='budget' needs a budget"),
    ({"teacher.kind": "none"}, "config.select.min_speedup=1.5 needs a teacher"),
    # Known from p and i alone: refused before any training, with the figures to relax it.
    ({"select.min_speedup": 50.0}, r"no candidate meets the budget .* the fastest candidate, "
                                   r"D1-A2-H16-I32, has i = .* \(3.578x faster than the teacher\)"),
    ({"select.min_speedup": 0.0, "select.max_params": 100},
     "no candidate meets the budget .* the smallest, D1-A2-H16-I32, has p = 4,464"),
])
def test_bad_input_fails_before_training(tmp_path, monkeypatch, change, message):
  monkeypatch.setattr(proxy.PopulationTrainer, "train_and_eval",
                      lambda *a, **k: pytest.fail("trained despite bad input"))
  with pytest.raises(ValueError, match=message):
    extract.run(_config(tmp_path, **change), str(tmp_path / "run"))


def test_budget_rule_end_to_end_and_w_choice_unchanged(tmp_path, monkeypatch):
  # Intervals of 4, their two end members (ties="first"), no audit: W trains 8 candidates; the
  # budget's own intervals over the 6 feasible ones ([4], [2]) add the last of the second.
  # One padded bucket for all (max_overhead): one compile, so the test takes seconds.
  config = _config(tmp_path, **{"fptas.eps": 4, "fptas.rule": "endpoints",
                                "fptas.ties": "first", "audit.enabled": False,
                                "proxy.max_overhead": 100.0})
  workdir = str(tmp_path / "run")
  summary = extract.run(config, workdir)
  table = json.load(open(os.path.join(workdir, "results.json")))
  sel = table["select"]
  assert summary["chosen"] == sel["choice"] == table["chosen"]
  assert open(os.path.join(workdir, "chosen_arch.txt")).read().strip() == sel["choice"]
  # The budget, recomputed here from the teacher's and the candidates' FLOPs (the candidates
  # share the student's base config, as in the search).
  teacher = export.load_config(config.teacher.path)
  base = extract.base_student(config, extract.search_space(config.space), teacher)
  flops = lambda arch: cost.forward_flops(base.replace(arch=arch_lib.Arch.parse(arch)),
                                          config.cost.batch, config.cost.seq_len)["total"]
  i_teacher = cost.forward_flops(teacher, config.cost.batch, config.cost.seq_len)["total"]
  assert i_teacher / flops(sel["choice"]) >= config.select.min_speedup
  assert sel["speedup"] == pytest.approx(i_teacher / flops(sel["choice"]))
  rows = table["rows"]
  feasible = [r for r in rows if i_teacher / flops(r["name"]) >= config.select.min_speedup]
  assert [r["name"] for r in rows if r["feasible"]] == [r["name"] for r in feasible]
  assert sel["feasible"] == len(feasible) == 6 and summary["trained"] == 9
  assert [r["name"] for r in rows if r["plan"] == "budget"] == ["D2-A4-H16-I32"]
  trained = [r for r in feasible if r["trained"]]
  assert min(min(r["errors"]) for r in trained) == pytest.approx(sel["e"])
  assert sel["e"] == min(r["errors"][0] for r in rows if r["name"] == sel["choice"])
  md = open(os.path.join(workdir, "results.md")).read()
  assert f"**{sel['choice']}**" in md and "W's choice (rule `w`, the paper's): **" in md
  assert "feasible" in open(os.path.join(workdir, "results.csv")).readline()

  # Rule "w" in the same workdir: nothing to train (W's plan is a part of what ran), and the
  # same W's choice, now the chosen one.
  calls = []
  original = proxy.PopulationTrainer.train_and_eval
  monkeypatch.setattr(proxy.PopulationTrainer, "train_and_eval",
                      lambda self, pairs, data, **k: calls.extend(pairs) or original(
                          self, pairs, data, **k))
  config.select.rule = "w"
  w_run = extract.run(config, workdir)
  assert calls == [] and w_run["chosen"] == summary["w_choice"] == table["best"]
  assert open(os.path.join(workdir, "chosen_arch.txt")).read().strip() == w_run["chosen"]
  assert json.load(open(os.path.join(workdir, "results.json")))["select"]["rule"] == "w"


def test_latency_budget_reads_the_latency_table(tmp_path, monkeypatch):
  # i is FLOPs; the latency limit measures each candidate once (here a fake timing, no compile)
  # into the per-device table and keeps those at most 1.8 ms: the D1-H16 shapes (1.5 ms).
  config = _config(tmp_path, **{"select.min_speedup": 0.0, "select.max_latency_ms": 1.8})
  timed = []
  monkeypatch.setattr(cost, "measure_latency", lambda c, b, t, repeats, **_: timed.append(
      str(c.arch)) or {"median_ms": c.arch.depth + c.arch.hidden / 32})
  candidates = extract.search_space(config.space)
  teacher = export.load_config(config.teacher.path)
  base = extract.base_student(config, candidates, teacher)
  configs = [base.replace(arch=a) for a in candidates]
  counts = [cost.param_counts(c) for c in configs]
  p = [float(c["total"]) for c in counts]
  i, label = extract_costs.inference_costs(configs, config.cost)
  budget = extract_costs.budget_of(config, base, teacher, configs, p, i, label)
  assert [str(a) for a, f in zip(candidates, budget.feasible) if f] == [
      str(a) for a in candidates if a.depth == 1 and a.hidden == 16]
  assert sorted(timed) == sorted(str(a) for a in candidates)  # each measured once, kept
  assert "measured latency <= 1.8 ms" in budget.text and budget.speedup is not None
  columns = extract_costs.report_columns(config, configs, counts, budget)
  assert columns["latency_ms"] == list(budget.latency_ms) and "speedup" in columns
  assert json.load(open(config.cost.latency_table))  # the table holds them for the next run
  timed.clear()
  extract_costs.budget_of(config, base, teacher, configs, p, i, label)
  assert timed == []
  config.select.rule = "w"
  assert extract_costs.budget_of(config, base, teacher, configs, p, i, label) is None


def test_teacher_vocabulary_must_match_student(tmp_path, monkeypatch):
  monkeypatch.setattr(proxy.PopulationTrainer, "train_and_eval",
                      lambda *a, **k: pytest.fail("trained despite bad input"))
  config = _config(tmp_path)
  config.student.family = "bert"  # BERT's 30,522 ids against the teacher's 64
  with pytest.raises(ValueError, match="vocabulary"):
    extract.run(config, str(tmp_path / "run"))


def test_synthetic_batches_are_deterministic():
  a = extract.synthetic_batch(np.random.default_rng([0, 7]), 50, 2, 12, 3)
  b = extract.synthetic_batch(np.random.default_rng([0, 7]), 50, 2, 12, 3)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  rows = np.arange(2)[:, None]
  assert (a["input_ids"][rows, a["masked_positions"]] == 1).all()
  assert (a["masked_labels"] >= 5).all()


@pytest.mark.slow
def test_inherited_proxy_starts_from_the_teacher(tmp_path):
  # Depth 1 keeps the space inside the D1 teacher; no audit, one representative per interval.
  changes = {"space.depth": (1,), "audit.enabled": False, "fptas.ties": "first"}
  random_run = extract.run(_config(tmp_path, **changes), str(tmp_path / "random"))
  inherited = extract.run(_config(tmp_path, **changes, **{"proxy.init": "inherit"}),
                          str(tmp_path / "inherit"))
  rows = {r["name"]: r["e"] for r in json.load(open(tmp_path / "random" / "results.json"))[
      "rows"] if r["trained"]}
  other = {r["name"]: r["e"] for r in json.load(open(tmp_path / "inherit" / "results.json"))[
      "rows"] if r["trained"]}
  assert rows.keys() == other.keys() and random_run["trained"] == inherited["trained"] == 4
  assert all(abs(rows[k] - other[k]) > 1e-6 for k in rows)  # another start, other errors
  assert "config.proxy.init='inherit'" in open(tmp_path / "inherit" / "results.md").read()
  # The journals are not interchangeable.
  with pytest.raises(ValueError, match="config hash"):
    extract.run(_config(tmp_path, **changes, **{"proxy.init": "inherit"}),
                str(tmp_path / "random"))


def test_reference_point_outside_the_space():
  """fptas.maximum: the space's own T, a candidate, the teacher's shape or a named shape."""
  config = load_config("configs/extract_demo.py:tiny")
  base = arch_lib.get_model_config("minilm-l6-h384").replace(arch="D1-A2-H32-I64")
  teacher = arch_lib.get_model_config("minilm-l6-h384")
  candidates = ["D1-A2-H32-I64", "D2-A2-H32-I64"]
  config.fptas.maximum = ""
  assert extract_costs.reference_point(config, base, teacher, candidates) is None
  config.fptas.maximum = "D2-A2-H32-I64"
  assert extract_costs.reference_point(config, base, teacher, candidates) == "D2-A2-H32-I64"
  config.cost.inference, config.cost.size = "flops", "effective"
  config.fptas.maximum = "teacher"
  p_t, i_t = extract_costs.reference_point(config, base, teacher, candidates)
  assert p_t == cost.param_counts(teacher)["effective"]
  assert i_t == cost.forward_flops(teacher, config.cost.batch, config.cost.seq_len)["total"]
  # A named shape is costed with the candidates' family (vocabulary, embeddings).
  config.fptas.maximum, config.cost.size = "D6-A12-H384-I1536", "total"
  p_named, _ = extract_costs.reference_point(config, base, teacher, candidates)
  assert p_named == cost.param_counts(base.replace(arch="D6-A12-H384-I1536"))["total"]
  config.fptas.maximum = "teacher"
  with pytest.raises(ValueError, match="needs a teacher"):
    extract_costs.reference_point(config, base, None, candidates)
  config.fptas.maximum = "biggest"
  with pytest.raises(ValueError, match="config.fptas.maximum='biggest'"):
    extract_costs.reference_point(config, base, teacher, candidates)
