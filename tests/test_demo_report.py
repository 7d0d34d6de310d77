"""``bort-jax report``: the page and its figures from a small hand-made workdir, and from a
partial one (missing stages listed as "not run"); the fine-tuning additions it reads
(majority baseline, dev cap)."""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import pytest

from bort_jax import main as cli_main
from bort_jax.core import arch as arch_lib
from bort_jax.core import cost
from bort_jax.core import model
from bort_jax.finetune import casts, population, population_mode, tasks
from bort_jax.interop import export
from bort_jax.pipelines import report
from bort_jax.runtime import rundir
from bort_jax.search import report as search_report

STUDENT, TEACHER = "D1-A2-H16-I32", "D2-A2-H32-I64"


def _export(path, arch, seed):
  """An export of the right shapes without compiling an init (only the shapes are read)."""
  cfg = arch_lib.get_model_config(arch, family="bert", vocab_size=64, max_positions=32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(seed), cfg, model.HeadSpec("mlm")))
  export.save(path, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes), cfg)


def _fake_latency(configs, batch, seq_len, rounds, warmup, log=None):
  """Timings proportional to the FLOPs, so the test needs no compile."""
  del rounds, warmup, log
  out = {}
  for name, c in configs.items():
    ms = cost.forward_flops(c, batch, seq_len)["total"] / 1e6
    out[name] = {"median_ms": ms, "iqr_ms": 0.1 * ms, "arch": str(c.arch), "device": "cpu"}
  return out


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    if isinstance(data, list):
      f.write("".join(json.dumps(r) + "\n" for r in data))
    else:
      json.dump(data, f)


def _population(task, metric, values, majority, dev_records=40):
  return {"task": task, "dev_split": "validation", "metric": metric, "dev_records": dev_records,
          "max_dev_examples": 40, "majority": {metric: majority}, "total_steps": 6,
          "settings": [{"lr": 1e-4, "weight_decay": 0.01, "warmup": 0.1, "seeds": [0, 1, 2],
                        metric: {"mean": float(np.mean(values)),
                                 "std": float(np.std(values, ddof=1)),
                                 "best": max(values), "values": values}}]}


def make_workdir(root: str, stages=("extract", "distill", "finetune")) -> str:
  """A workdir with the files each stage leaves (small numbers, tiny exports)."""
  work = os.path.join(root, "work")
  os.makedirs(work, exist_ok=True)
  if "extract" in stages:
    rows = []
    for k, arch in enumerate(["D1-A2-H16-I32", "D2-A2-H16-I32", "D1-A2-H32-I64",
                              "D2-A2-H32-I64"]):
      p, i = cost.param_counts(arch)["total"], cost.forward_flops(arch, 1, 16)["total"]
      rows.append({"name": arch, "p": float(p), "i": float(i), "e": 2.0 - 0.1 * k,
                   "w": 0.5 - 0.05 * k, "trained": True, "extra": {"params_effective": p // 2}})
    _write(os.path.join(work, "extract", "results.json"),
           {"best": rows[0]["name"], "best_w": rows[0]["w"], "eps": 2, "rule": "max_gain",
            "i_T": 1e9, "rows": rows})
    _write(os.path.join(work, "extract", "audit.json"), {"spearman": 0.8, "pairs": 6})
  if "distill" in stages:
    _write(os.path.join(work, "distill", "metrics.jsonl"),
           [{"step": s, "mlm_loss": 6.0 - s / 10, "loss": 1.0} for s in (2, 4, 6)]
           + [{"step": 6, "eval_mlm_loss": 5.5}])
    _write(os.path.join(work, "teacher", "metrics.jsonl"), [{"step": 4, "eval_mlm_loss": 4.0}])
    _export(os.path.join(work, "distill", "export"), STUDENT, 0)
    _export(os.path.join(work, "teacher", "export"), TEACHER, 1)
  if "finetune" in stages:
    for model_name, shift in (("student", 0.0), ("teacher", 0.1)):
      for task, metric, majority in (("demo/vitaminc", "accuracy", 0.4),
                                     ("demo/social_iqa", "accuracy", 0.34)):
        values = [0.5 + shift, 0.55 + shift, 0.6 + shift]
        _write(os.path.join(work, "finetune", model_name, task.replace("/", "_"),
                            "population.json"), _population(task, metric, values, majority))
  return work


def _config(**extra):
  config = cli_main.cli.load_config("configs/report.py:tiny")
  config.update(extra)
  return config


def test_report_page_tables_and_figures(tmp_path, monkeypatch):
  monkeypatch.setattr(cost, "interleaved_latency", _fake_latency)
  work = make_workdir(str(tmp_path))
  summary = report.run(_config(), work)
  out = os.path.join(work, "report")
  text = open(summary["report"]).read()
  assert summary["report"] == os.path.join(out, "report.md")
  for name in ("pareto.png", "distill.png", "finetune.png"):
    assert f"]({name})" in text
    assert os.path.getsize(os.path.join(out, name)) > 10_000  # a real figure, not a blank
  # The extraction table ranks by W, sizes in M parameters; the audit's numbers are listed.
  assert "| 1 | D1-A2-H16-I32 |" in text and "spearman: 0.8000" in text
  assert "p (M)" in text and "GFLOPs" in text
  # Fine-tuning: mean +- std in %, majority on the same 40 records, the dev cap stated.
  assert "on 40 records spread evenly" in text
  assert "| demo/vitaminc | accuracy | 40 | 40.0 | 55.0 +- 5.0 (n=3, 6 steps) | 65.0 +- 5.0" in text
  head = summary["headline"]
  flops = {a: cost.forward_flops(export.load_config(os.path.join(work, sub, "export")), 1,
                                 16)["total"] for a, sub in ((STUDENT, "distill"),
                                                             (TEACHER, "teacher"))}
  assert head["share"] == pytest.approx(0.55 / 0.65)
  # The margin share is the mean over tasks of each task's own share.
  shares = {"demo/vitaminc": (0.55 - 0.4) / (0.65 - 0.4),
            "demo/social_iqa": (0.55 - 0.34) / (0.65 - 0.34)}
  assert head["task_margin_shares"] == pytest.approx(shares)
  assert head["margin_share"] == pytest.approx(sum(shares.values()) / 2)
  assert "vitaminc 60%" in text and "| 0.600 |" in text
  assert head["speedup"] == pytest.approx(flops[TEACHER] / flops[STUDENT])
  assert f"runs {flops[TEACHER] / flops[STUDENT]:.1f}x faster" in text
  assert "| student | D1-A2-H16-I32 |" in text and "IQR (ms)" in text
  assert "not run" not in text.split("## Fine-tuning")[0].replace("Audit of the proxy", "")
  # A second report reuses the timings (same models and settings).
  before = os.path.getmtime(os.path.join(out, "speed.json"))
  report.run(_config(), work)
  assert os.path.getmtime(os.path.join(out, "speed.json")) == before


def test_pareto_axes_are_plain_and_in_millions(tmp_path, monkeypatch):
  rows = [{"name": f"c{k}", "p": 1e6 * (k + 1), "i": 1e9 * (k + 2), "e": 3.0 - k, "w": 1.0,
           "trained": True} for k in range(3)]
  path = str(tmp_path / "p.png")
  figs = []
  real = search_report._save  # the one drawing of the front (search.report.front_plot)
  monkeypatch.setattr(search_report, "_save", lambda fig, p: figs.append(fig) or real(fig, p))
  report.report_plots.pareto(rows, "c0", "p (M)", "GFLOPs", 1e-9, path)
  (fig,) = figs
  size_ax, cost_ax = fig.axes
  assert size_ax.get_xlim()[1] < 10 and cost_ax.get_xlim()[1] < 10  # M and GFLOPs, not raw
  for ax in (size_ax, cost_ax):
    assert ax.xaxis.get_major_formatter().get_offset() == ""


@pytest.mark.parametrize("speedup, words", [(2.5, "runs 2.5x faster than the teacher"),
                                            (0.4, "runs 2.5x slower than the teacher")])
def test_headline_words_a_slower_student_as_slower(speedup, words):
  text = report.headline_text({"speedup": speedup, "busy": False})
  assert text == f"Headline: the student {words} (measured median latency)."


def test_pareto_legend_covers_no_candidate(tmp_path, monkeypatch):
  # The largest candidate has the highest error: the upper right corner, under the old legend.
  rows = [{"name": f"c{k}", "p": 1e6 * (k + 1), "i": 1e9 * (k + 2), "e": e, "w": 1.0,
           "trained": True} for k, e in enumerate([1.0, 0.6, 0.7, 0.9, 1.1])]
  figs = []
  real = search_report._save
  monkeypatch.setattr(search_report, "_save",
                      lambda fig, path: figs.append(fig) or real(fig, path))
  report.report_plots.pareto(rows, "c1", "p (M)", "GFLOPs", 1e-9, str(tmp_path / "p.png"))
  (fig,) = figs
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  for ax in fig.axes:
    box = ax.get_legend().get_window_extent(renderer)
    points = np.concatenate([c.get_offsets() for c in ax.collections]
                            + [np.column_stack(line.get_data()) for line in ax.lines])
    assert len(points) >= len(rows)
    covered = [xy for xy in ax.transData.transform(points) if box.contains(*xy)]
    assert covered == [], f"the legend covers points at {covered}"


def test_partial_workdir_lists_missing_stages(tmp_path):
  work = make_workdir(str(tmp_path), stages=("extract",))
  summary = report.run(_config(), work)
  text = open(summary["report"]).read()
  for section in ("Distillation: not run", "Fine-tuning: not run", "Speed: not run"):
    assert section in text
  assert "Headline: not available yet." in text and "pareto.png" in text


def test_report_mode_through_the_cli(tmp_path, capsys):
  work = make_workdir(str(tmp_path), stages=("extract",))
  assert cli_main.main(["report", f"--workdir={work}", "--config=configs/report.py:tiny"]) == 0
  assert os.path.exists(os.path.join(work, "report", "report.md"))
  out = capsys.readouterr().out
  assert f"Report: {os.path.join(work, 'report', 'report.md')}" in out
  assert "Headline: not available yet." in out
  assert cli_main.main(["report", f"--workdir={tmp_path / 'nowhere'}"]) == 2
  assert "is not a directory" in capsys.readouterr().err
  assert cli_main.main(["report", f"--workdir={work}", "--config.rounds=0"]) == 2


def test_the_floor_is_the_train_majority_on_the_dev_examples():
  spec = tasks.get_task("glue/sst2")
  ex = lambda label: casts.Example("text", None, label=label)
  train = [ex(1), ex(1), ex(0)]
  dev = [ex(1), ex(0), ex(0), ex(0)]
  assert population_mode.baseline_of(spec, train, dev) == {
      "answer": "majority class", "value": 1, "scores": {"accuracy": 0.25}}
  assert population_mode.baseline_of(spec, train, []) == {}
  assert population.progress_line(50, 200, 0.5, 10.0, 50).endswith("elapsed 0:10, eta 0:30")
  assert "(25%)" in population.progress_line(50, 200, 0.5, 10.0, 50)


def test_interleaved_timing_runs_round_robin_with_rotating_start():
  calls = []
  fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
  out = cost.time_interleaved(fns, rounds=3, warmup=1)
  assert calls == list("abc") + list("abc") + list("bca") + list("cab")
  assert set(out) == set("abc") and out["a"]["repeats"] == 3 and len(out["a"]["times_ms"]) == 3
  assert out["a"]["iqr_ms"] >= 0
  with pytest.raises(ValueError):
    cost.time_interleaved(fns, rounds=0)


def test_read_split_keeps_records_spread_over_the_split_up_to_the_cap():
  from bort_jax.finetune import prepare  # pylint: disable=import-outside-toplevel
  records = [{"sentence": f"w{i}", "label": i % 2, "idx": i} for i in range(10)]
  spec = tasks.register_task(tasks.TaskSpec(
      name="test/capped", builder=None, kind="classification", num_labels=2,
      cast=casts.pair_cast("sentence"), source=lambda split, data_dir: records),
      overwrite=True)
  capped = prepare.read_split(spec, "validation", None, False, limit=4)
  assert [r["idx"] for r in capped.records] == [0, 3, 6, 9] and len(capped.examples) == 4
  assert len(prepare.read_split(spec, "validation", None, False).records) == 10
  assert len(prepare.read_split(spec, "validation", None, False, limit=50).records) == 10


def test_headline_has_no_margin_share_when_the_teacher_is_below_the_majority():
  stats = lambda mean: {"mean": mean, "std": 0.0, "values": [mean]}
  rows = [{"task": "t", "majority": 0.6, "student": stats(0.5), "teacher": stats(0.55)}]
  head = report.headline(rows, {})
  assert head["share"] == pytest.approx(0.5 / 0.55) and head["margin_share"] is None
  assert "not above the majority class (60.0)" in report.headline_text(head)


def test_headline_names_the_tasks_the_teacher_does_not_learn():
  stats = lambda mean: {"mean": mean, "std": 0.0, "values": [mean]}
  rows = [{"task": "learnt", "majority": 0.5, "dev_records": 500, "student": stats(0.6),
           "teacher": stats(0.75)},
          {"task": "one_class", "majority": 0.46, "dev_records": 500, "student": stats(0.46),
           "teacher": stats(0.46)},
          {"task": "near", "majority": 0.36, "dev_records": 201, "student": stats(0.34),
           "teacher": stats(0.378)}]  # 1.8 points above, SE 3.4 points
  head = report.headline(rows, {})
  assert head["unlearnt"] == ["one_class", "near"]
  assert "within one standard error of the majority class on one_class, near" in (
      report.headline_text(head))
  assert not report.headline(rows[:1], {})["unlearnt"]


def _agora_json(round_bests, labeller=0.8, points=(10, 6)):
  rounds = [{"round": k, "best": {"accuracy": acc}, "points_added": p}
            for k, (acc, p) in enumerate(zip(round_bests, list(points) + [0] * 9))]
  best = max(range(len(round_bests)), key=lambda k: (round_bests[k], -k))
  return {"task": "demo/vitaminc", "rounds": rounds, "labeller_accuracy": labeller,
          "best": {"accuracy": round_bests[best], "round": best}}


def test_report_shows_agora_beside_round_0_and_the_tasks_it_skipped(tmp_path, monkeypatch):
  monkeypatch.setattr(cost, "interleaved_latency", _fake_latency)
  work = make_workdir(str(tmp_path))
  folder = os.path.join(work, "finetune", "student", "demo_vitaminc")
  _write(folder + "_agora/agora.json", _agora_json([0.6, 0.65, 0.62]))
  _write(os.path.join(work, rundir.DEMO_STATE),
         {"agora": {"social_iqa": {"run": False, "reason": "not binary (multiple_choice)"},
                    "vitaminc": {"run": True, "reason": ""}}})
  summary = report.run(_config(), work)
  text = open(summary["report"]).read()
  # Three rounds; the points that entered training are those of rounds 0 and 1 (16).
  assert "| demo/vitaminc | student | 0.800 | 3 | 16 | 60.0 | 65.0 (round 1) | +5.0 |" in text
  assert "- demo/social_iqa: not run: not binary (multiple_choice)" in text
  row = next(r for r in summary["finetune"] if r["task"] == "demo/vitaminc")
  assert row["student_agora"]["best_round"] == 1 and "teacher_agora" not in row


def test_agora_plan_takes_binary_tasks_whose_teacher_beats_the_bar(tmp_path):
  from bort_jax.data import demo as demo_data
  from bort_jax.pipelines import demo_agora, demo_cache
  demo_data.register_demo_tasks(str(tmp_path / "cache"))
  config = cli_main.cli.load_config("configs/demo.py")
  jobs = []
  for model_name in ("teacher", "student"):
    for task in config.finetune_tasks:
      cfg = config.finetune.copy_and_resolve_references()
      cfg.task = f"demo/{task}"
      jobs.append(demo_cache.Job(model_name, task, cfg, str(tmp_path / model_name / task)))

  def teacher_scores(accuracy):
    for task in config.finetune_tasks:
      _write(str(tmp_path / "teacher" / task / "best" / "finetune.json"),
             {"metric": "accuracy", "value": accuracy})

  teacher_scores(0.75)
  plan = demo_agora.agora_plan(config, jobs)
  assert plan["movie_sentiment"]["run"]
  assert plan["movie_sentiment"]["labeller"] == str(tmp_path / "teacher" / "movie_sentiment"
                                                    / "best")
  assert plan["movie_sentiment"]["folder"] == str(tmp_path / "student" / "movie_sentiment"
                                                  ) + "_agora"
  assert "not binary (classification, 5 labels)" in plan["bbc_news"]["reason"]
  teacher_scores(2 / 3)  # at the bar: refused, as Agora itself would
  plan = demo_agora.agora_plan(config, jobs)
  assert not plan["movie_sentiment"]["run"]
  assert "dev accuracy 0.667 is not above 0.667" in plan["movie_sentiment"]["reason"]
  config.agora_tasks = "bbc_news"  # named: taken whatever the teacher scores
  plan = demo_agora.agora_plan(config, jobs)
  assert sorted(t for t, e in plan.items() if e["run"]) == ["bbc_news"]
  config.agora_tasks = ""
  assert not any(e["run"] for e in demo_agora.agora_plan(config, jobs).values())


@pytest.mark.parametrize("field,value,message", [
    ("agora_tasks", "movie,bbc_news", "config.agora_tasks='movie,bbc_news': movie not among"),
    ("finetune.agora.min_labeller_accuracy", 1.0, "must be a number in [0, 1)"),
    ("finetune_tasks.word_sense.student_steps", -1, "student_steps=-1 >= 0 (0: steps)")])
def test_demo_refuses_bad_agora_settings(field, value, message, tmp_path):
  from bort_jax.pipelines import demo
  config = cli_main.cli.load_config("configs/demo.py")
  cli_main.cli.apply_overrides(config, [(f"config.{field}", str(value))])
  with pytest.raises(ValueError, match=re.escape(message)):
    demo.check_finetune(config, str(tmp_path))


def test_the_student_gets_its_own_length_where_the_task_gives_one(tmp_path):
  from bort_jax.pipelines import demo
  config = cli_main.cli.load_config("configs/demo.py")
  steps = lambda model, task: int(demo.finetune_config(
      config, model, task, str(tmp_path), str(tmp_path)).train.total_steps)
  assert (steps("teacher", "word_sense"), steps("student", "word_sense")) == (200, 800)
  assert steps("teacher", "bbc_news") == steps("student", "bbc_news") == 200  # 0: steps
  config.finetune.train.total_steps = 50  # a model's own override still wins
  assert (steps("teacher", "word_sense"), steps("student", "word_sense")) == (200, 50)


def test_busy_share_reads_the_kernel_counters_and_the_report_flags_a_busy_machine(tmp_path,
                                                                                  monkeypatch):
  stat = tmp_path / "stat"
  # user nice system idle iowait irq softirq steal (guest fields after them are not added)
  stat.write_text("cpu  60 0 40 280 20 0 0 0 7 0\ncpu0 30 0 20 140 10 0 0 0 0 0\n")
  assert cost._cpu_times(str(stat)) == (100, 400)  # pylint: disable=protected-access
  assert cost._cpu_times(str(tmp_path / "missing")) is None  # pylint: disable=protected-access
  readings = iter([(100, 400), (250, 600)])  # +150 busy of +200 jiffies
  monkeypatch.setattr(cost, "_cpu_times", lambda path: next(readings))
  assert cost.busy_share(0.0) == pytest.approx(0.75)
  monkeypatch.setattr(cost, "interleaved_latency", _fake_latency)
  work = make_workdir(str(tmp_path))
  for share, flagged in ((0.6, True), (0.05, False)):
    monkeypatch.setattr(cost, "busy_share", lambda seconds=1.0, s=share: s)
    summary = report.run(_config(remeasure=True), work)
    text = open(summary["report"]).read()
    assert ("**Busy machine**: other processes kept 60% of the CPUs busy" in text) == flagged
    assert ("timed on a busy machine, so overstated" in text) == flagged
    assert summary["headline"]["busy"] == flagged
  assert "Other processes took 5% of the CPUs just before the timing." in text


@pytest.mark.parametrize("arg,quick", [("", False), ("", True), ("tiny", False),
                                       ("tiny", True)])
def test_every_demo_variant_passes_its_own_validation(arg, quick, tmp_path):
  """The full demo, --quick, tiny and tiny --quick: each config the demo builds validates.

  A cheap guard of README command 1 and the notebook: --quick once shortened the audit to
  fewer steps than the proxy, which the extraction's own validation refuses.
  """
  from bort_jax.pipelines import demo
  config = cli_main.cli.load_config("configs/demo.py" + (f":{arg}" if arg else ""))
  config.quick = quick
  cfg = demo.step_configs(config, str(tmp_path / "work"), str(tmp_path / "cache"))
  demo.check_configs(config, cfg, str(tmp_path / "cache"))
  extract = cfg["extract"]
  assert extract.audit.steps > extract.proxy.steps
  if quick:
    assert cfg["distill"].train.total_steps <= 20 and extract.proxy.steps <= 3
  assert not os.path.exists(tmp_path / "work")  # validation writes nothing
