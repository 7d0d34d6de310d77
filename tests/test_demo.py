"""``bort-jax demo`` end to end on tiny assets: every stage, resumed after a SIGKILL in each
stage (fine-tuning, teacher adaptation, extraction, distillation, Agora, report) to the same report
numbers, and a rerun that keeps the stage times.

The cache is built offline: the demo tasks of the synthetic suite (``data/tiny_suite.py``, in
the real source formats), a tiny headless teacher body and its vocabulary in ``cache/teacher``,
and the tiny corpus of test_distill in ``cache/corpus``; ``config.fetch=False`` keeps the demo
from checking the cache against the real pins.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from bort_jax import cli
from bort_jax.data import tiny_suite
from bort_jax.interop import export
from bort_jax.pipelines import demo, demo_agora, demo_cache
from bort_jax.runtime import checkpoint, rundir

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_distill as helpers  # noqa: E402  (the tiny teacher, corpus and subprocess env)
from test_distill import xla_cache  # noqa: E402,F401  (a compilation cache shared with children)

# The first two tests (a whole tiny demo, then a second one in a new workdir that copies every
# cached stage) run in the default suite: they guard the README's two promises about the demo.
# The kill-and-resume tests are slow.


@pytest.fixture(scope="module")
def cache(tmp_path_factory, xla_cache):  # pylint: disable=redefined-outer-name
  """A demo cache with tiny models: the synthetic suite (its tasks in the real source formats),
  with test_distill's tiny teacher body and corpus in place of the suite's own."""
  root = str(tmp_path_factory.mktemp("demo_cache"))
  cache_dir = os.path.join(root, "cache")
  tiny_suite.write_tiny_suite(cache_dir)
  assets = helpers.make_assets(os.path.join(root, "assets"))
  shutil.rmtree(os.path.join(cache_dir, "teacher"))
  shutil.rmtree(os.path.join(cache_dir, "corpus"))
  shutil.copytree(assets["body"], os.path.join(cache_dir, "teacher"))
  shutil.copy(os.path.join(assets["tokenizer"], "vocab.txt"), os.path.join(cache_dir, "teacher"))
  shutil.copytree(os.path.dirname(assets["corpus"]), os.path.join(cache_dir, "corpus"))
  return {"dir": cache_dir, "xla_cache": xla_cache}


def overrides(cache):  # pylint: disable=redefined-outer-name
  return {"cache_dir": cache["dir"], "fetch": False, "adapt.student.kind": "params",
          "adapt.train.total_steps": 4, "distill.train.total_steps": 4}


def make_config(cache):  # pylint: disable=redefined-outer-name
  config = cli.load_config("configs/demo.py:tiny")
  cli.apply_overrides(config, [(f"config.{k}", str(v)) for k, v in overrides(cache).items()])
  return config


def argv(cache, workdir):  # pylint: disable=redefined-outer-name
  return (["demo", "--config=configs/demo.py:tiny", f"--workdir={workdir}"]
          + [f"--config.{k}={v}" for k, v in overrides(cache).items()])


@pytest.fixture(scope="module")
def finished(cache, tmp_path_factory):  # pylint: disable=redefined-outer-name
  """One uninterrupted tiny demo run."""
  workdir = str(tmp_path_factory.mktemp("demo_run"))
  summary = demo.run(make_config(cache), workdir)
  return {"workdir": workdir, "summary": summary, "cache_dir": cache["dir"]}


# What a test removes from the shared cache so that its run computes it again: the cached
# result of a pretraining stage, or the finished run's fine-tunings of the student (and Agora's
# runs beside them).
_CACHED = {"teacher": "adapted", "extract": "extracted", "distill": "distilled"}


def _forget(cache, finished, target):  # pylint: disable=redefined-outer-name
  if target in _CACHED:
    shutil.rmtree(os.path.join(cache["dir"], _CACHED[target]), ignore_errors=True)
    return
  state = json.load(open(os.path.join(finished["workdir"], rundir.DEMO_STATE)))
  for folder in state["finetune_runs"]["student"]:
    shutil.rmtree(folder + demo_agora.AGORA_SUFFIX, ignore_errors=True)
    if target == "finetune":
      shutil.rmtree(folder, ignore_errors=True)


def _numbers(summary):
  """The report's fine-tuning numbers: every seed's dev score per task and model, and
  Agora's rounds."""
  numbers = {(r["task"], m): r[m]["values"] for r in summary["finetune"] for m in ("student",
                                                                                  "teacher")}
  numbers.update({(r["task"], "agora"): r.get("student_agora") for r in summary["finetune"]})
  return numbers


def test_demo_runs_every_stage_to_the_report(finished):
  work, summary = finished["workdir"], finished["summary"]
  state = json.load(open(os.path.join(work, rundir.DEMO_STATE)))
  assert all(state["stages"][s]["done"] for s in demo.STAGES)
  assert all(state["stages"][s]["seconds"] > 0 for s in demo.STAGES)
  assert len(summary["finetune"]) == 3  # the suite's three tasks
  for row in summary["finetune"]:
    assert len(row["student"]["values"]) == 2 and len(row["teacher"]["values"]) == 2
    assert row["majority"] is not None and row["dev_records"] <= 16
  text = open(summary["report"]).read()
  # Agora ran on the binary task (the tiny config lowers the labeller bar to 0), with the
  # teacher's best fine-tuned member as its labeller; the other is listed with the reason.
  plan = state["agora"]
  for task in ("movie_sentiment", "word_sense"):  # the binary ones
    assert plan[task]["run"] and os.path.exists(
        os.path.join(plan[task]["labeller"], "finetune.json"))
  assert not plan["bbc_news"]["run"]
  movie = next(r for r in summary["finetune"] if r["task"] == "demo/movie_sentiment")
  agora_run = movie["student_agora"]
  assert 1 <= agora_run["rounds"] <= 2 and agora_run["best"] >= agora_run["round0"]
  assert "| demo/movie_sentiment | student |" in text
  skipped = [line for line in text.splitlines() if ": not run: not binary" in line]
  assert sorted(line.split(":")[0] for line in skipped) == ["- demo/bbc_news"]
  assert "not run" not in text.replace("Audit of the proxy: not run", "").replace(
      ": not run: not binary", "")
  assert summary["headline"]["share"] > 0 and summary["headline"]["speedup"] > 0
  # Both models' runs are in the cache, keyed by their export and config; the students' best
  # seeds are copied into the workdir as the products a user runs.
  runs = state["finetune_runs"]["teacher"] + state["finetune_runs"]["student"]
  assert all(os.path.dirname(f) == os.path.join(finished["cache_dir"], "finetuned") for f in runs)
  for task in ("movie_sentiment", "word_sense", "bbc_news"):
    assert os.path.exists(os.path.join(work, "products", task, "model", "finetune.json"))
    # Its ONNX export: float32 and int8, the int8 graph scored on the task's dev records.
    record = json.load(open(os.path.join(work, "products", task, "onnx", "serve.json")))
    assert record["task"] == f"demo/{task}" and record["int8"]["dev"]["examples"] > 0
    assert record["int8"]["matmuls_quantized"] == record["int8"]["weight_matmuls"] > 0
  assert f"bort-jax predict --checkpoint {os.path.join(work, 'products')}" in text
  assert "--runtime onnxruntime-int8" in text and "points of accuracy on validation" in text
  # The speed table's teacher and student in each runtime, each timed in its own process.
  for runtime in ("jax", "onnxruntime", "onnxruntime-int8"):
    assert f"| {runtime} | " in text


@pytest.mark.slow
def test_rerun_skips_everything_and_keeps_the_stage_times(finished, cache, capsys):  # pylint: disable=redefined-outer-name
  work = finished["workdir"]
  before = json.load(open(os.path.join(work, rundir.DEMO_STATE)))["stages"]
  summary = demo.run(make_config(cache), work)
  after = json.load(open(os.path.join(work, rundir.DEMO_STATE)))["stages"]
  assert after == before
  out = capsys.readouterr().out
  assert out.count(": done, skipped (took") == 4 and "Headline:" in out
  assert "[agora] movie_sentiment: done, skipped" in out  # the stage looks, trains nothing
  assert _numbers(summary) == _numbers(finished["summary"])


def test_new_workdir_copies_the_adapted_teacher_from_the_cache(finished, cache, tmp_path,  # pylint: disable=redefined-outer-name
                                                               capsys):
  cached = demo_cache.adapted_cache(cache["dir"], demo.step_configs(
      make_config(cache), str(tmp_path), cache["dir"])["adapt"])
  assert os.path.exists(os.path.join(cached, "export", export.PARAMS_FILE))
  capsys.readouterr()
  summary = demo.run(make_config(cache), str(tmp_path / "again"))
  out = capsys.readouterr().out
  assert "the adapted teacher is in the cache" in out
  assert "this teacher's extraction with this config is in the cache" in out
  assert "distill: the distilled student is in the cache" in out
  # Same models: every fine-tuning and Agora run is the cached one; nothing trains again.
  assert "population step" not in out and "agora round" not in out
  assert "fine-tune the student and the teacher on the demo tasks: done, skipped" in out
  assert "[agora] movie_sentiment: done, skipped" in out
  for name in ("results.json", "audit.json", "journal.jsonl"):  # copied, not searched again
    assert (open(os.path.join(str(tmp_path / "again"), "extract", name)).read()
            == open(os.path.join(finished["workdir"], "extract", name)).read())
  for name in ("config.json", "metrics.jsonl"):  # the run's record, for the report and card
    assert os.path.exists(os.path.join(str(tmp_path / "again"), "teacher", name))
  first = os.path.join(finished["workdir"], "teacher", "export", export.PARAMS_FILE)
  again = os.path.join(str(tmp_path / "again"), "teacher", "export", export.PARAMS_FILE)
  assert open(first, "rb").read() == open(again, "rb").read()
  # Same teacher bytes: the teacher's fine-tunings are the cached ones, the numbers the same.
  state = json.load(open(os.path.join(str(tmp_path / "again"), rundir.DEMO_STATE)))
  assert state["finetune_runs"]["teacher"] == json.load(open(os.path.join(
      finished["workdir"], rundir.DEMO_STATE)))["finetune_runs"]["teacher"]
  assert _numbers(summary) == _numbers(finished["summary"])


def test_a_task_of_your_own_runs_through_the_demo(finished, cache, tmp_path,  # pylint: disable=redefined-outer-name
                                                  capsys):
  """``configs/demo.py:task=file:PATH``: the user's CSV file in place of the suite, fine-tuned,
  scored against its majority class, reported and shipped like a suite task."""
  del finished  # its run filled the cache: the pretraining stages are copied, not run
  rows = ["text,label"] + [f"{'good fine' if k % 3 else 'bad poor'} {k},"
                           f"{'pos' if k % 3 else 'neg'}" for k in range(48)]
  train = tmp_path / "mine" / "train.csv"
  train.parent.mkdir()
  train.write_text("\n".join(rows) + "\n")
  config = cli.load_config(f"configs/demo.py:tiny,task=file:{train}")
  cli.apply_overrides(config, [(f"config.{k}", str(v)) for k, v in overrides(cache).items()])
  work = str(tmp_path / "own")
  capsys.readouterr()
  summary = demo.run(config, work)
  out = capsys.readouterr().out
  assert "distill: the distilled student is in the cache" in out
  (row,) = summary["finetune"]
  assert row["task"] == f"file:{train}"
  assert len(row["student"]["values"]) == 2 and len(row["teacher"]["values"]) == 2
  # 10% of the rows held out by a hash of their text; the floor is the training majority.
  assert row["majority"] is not None and 0 < row["dev_records"] < 48
  state = json.load(open(os.path.join(work, rundir.DEMO_STATE)))
  assert state["agora"]["own"]["task"] == f"file:{train}" and state["agora"]["own"]["run"]
  folders = state["finetune_runs"]["student"] + state["finetune_runs"]["teacher"]
  assert all(os.path.basename(f).startswith("file_train.csv-") for f in folders)
  model = os.path.join(work, "products", "own", "model")
  assert json.load(open(os.path.join(model, "finetune.json")))["label_names"] == ["neg", "pos"]
  id2label = json.load(open(os.path.join(work, "products", "own", "hf", "config.json")))["id2label"]
  assert sorted(id2label.values()) == ["neg", "pos"]
  assert f"bort-jax predict --checkpoint {model}" in open(summary["report"]).read()
  # The cache key follows the file's bytes: an edited file is fine-tuned again.
  before = [job.folder for job in demo.finetune_jobs(config, work, cache["dir"])]
  train.write_text("\n".join(rows[:-1]) + "\n")
  after = [job.folder for job in demo.finetune_jobs(config, work, cache["dir"])]
  assert not set(before) & set(after)


def test_finetune_workers_compute_what_the_demo_process_computed(finished, tmp_path):  # pylint: disable=redefined-outer-name
  """config.finetune_workers > 1: the student's jobs, rerun two at a time in worker processes
  (one core each), give the scores the finished demo got in its own process; Agora joins the
  workers' queue when its task's fine-tunings are done and gives the rounds it gave there."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from bort_jax.pipelines import demo_workers  # pylint: disable=import-outside-toplevel
  cache_dir = finished["cache_dir"]
  config = make_config({"dir": cache_dir})
  every = demo.finetune_jobs(config, finished["workdir"], cache_dir)
  jobs = [j for j in every if j.model == "student"][:2]
  assert "movie_sentiment" in [j.task for j in jobs]  # a task Agora takes in tiny mode
  again = [dataclasses.replace(j, folder=str(tmp_path / j.task)) for j in jobs]
  moved = {j.folder: r for j, r in zip(jobs, again)}
  every = [moved.get(j.folder, j) for j in every]  # the teachers' jobs: the demo's, finished
  plan = demo_agora.agora_plan(config, every)
  assert plan["movie_sentiment"]["run"] and not plan["bbc_news"]["run"]
  student = next(j for j in jobs if j.task == "movie_sentiment")
  done = []
  demo_workers.run_jobs(again, 2, cache_dir, lambda job: 1, done.append,
                        lambda job: demo_agora.ready_jobs(config, every, job))
  assert sorted(j.task for j in done[:2]) == sorted(j.task for j in jobs)
  assert [(j.kind, j.task) for j in done[2:]] == [("agora", "movie_sentiment")]
  assert done[2].folder == plan["movie_sentiment"]["folder"]
  assert done[2].folder == moved[student.folder].folder + demo_agora.AGORA_SUFFIX
  for job, rerun in zip(jobs, again):
    first = json.load(open(os.path.join(job.folder, rundir.POPULATION)))["settings"]
    second = json.load(open(os.path.join(rerun.folder, rundir.POPULATION)))["settings"]
    values = lambda rows: [v for r in rows for v in r["accuracy"]["values"]]
    assert values(second) == pytest.approx(values(first), abs=1e-6)
  rounds = [json.load(open(os.path.join(folder, rundir.AGORA)))["rounds"]
            for folder in (student.folder + demo_agora.AGORA_SUFFIX, done[2].folder)]
  keys = ("round", "train_rows", "mistakes", "points_added", "removed", "left")
  assert [{k: r[k] for k in keys} for r in rounds[1]] == [{k: r[k] for k in keys}
                                                         for r in rounds[0]]
  assert [a for r in rounds[1] for a in r["dev_accuracy"]] == pytest.approx(
      [a for r in rounds[0] for a in r["dev_accuracy"]], abs=1e-6)
  # Finished: the task's Agora is not queued again.
  assert demo_agora.ready_jobs(config, every, moved[student.folder]) == []


# The six fine-tuning jobs of the fresh demo of 58ebe27 (two one-core workers): model, seeds,
# steps, tokens, dev records scored, and the seconds each took.
MEASURED_JOBS = [("D6-A12-H384-I1536", 1, 200, 128, 500, 234),
                 ("D6-A12-H384-I1536", 1, 800, 64, 500, 396),
                 ("D6-A12-H384-I1536", 1, 200, 48, 2000, 111),
                 ("D2-A8-H384-I256", 3, 200, 128, 500, 153),
                 ("D2-A8-H384-I256", 3, 800, 64, 500, 298),
                 ("D2-A8-H384-I256", 3, 800, 48, 2000, 267)]


def test_job_work_orders_the_jobs_as_they_ran():
  """The workers' queue order: job_work's shares of the stage within a quarter of the measured
  ones, and its largest-first order that of the measured times."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from bort_jax.core import arch  # pylint: disable=import-outside-toplevel
  from bort_jax.pipelines import demo_workers  # pylint: disable=import-outside-toplevel
  work, seconds = [], []
  for shape, seeds, steps, seq_len, dev, took in MEASURED_JOBS:
    cfg = ml_collections.ConfigDict({"population": {"seeds": seeds}, "seq_len": seq_len,
                                     "batch_size": 8, "max_dev_examples": dev,
                                     "train": {"total_steps": steps}})
    work.append(demo_workers.job_work(cfg, arch.get_model_config(shape, family="bert")))
    seconds.append(took)
  shares = [w / sum(work) for w in work]
  measured = [s / sum(seconds) for s in seconds]
  assert shares == pytest.approx(measured, rel=0.25)
  by_work = sorted(range(6), key=lambda i: -work[i])
  assert [seconds[i] for i in by_work] == sorted(seconds, reverse=True)


@pytest.mark.slow
def test_a_workdir_of_another_config_is_refused(finished, cache, capsys):  # pylint: disable=redefined-outer-name
  """A --quick run in the full run's workdir would reuse its stages: refused, nothing run."""
  from bort_jax import main  # pylint: disable=import-outside-toplevel
  work = finished["workdir"]
  before = open(os.path.join(work, rundir.DEMO_STATE)).read()
  code = main.main(argv(cache, work) + ["--config.adapt.train.total_steps=3"])
  err = capsys.readouterr().err
  assert code == 2 and "finished teacher-adapt stage made with another config" in err
  assert "Traceback" not in err and "use a fresh --workdir" in err
  assert open(os.path.join(work, rundir.DEMO_STATE)).read() == before


# Kills the demo right after the first chunk of the first fine-tuning job is checkpointed
# (the save waited for, so the kill cannot land inside the asynchronous write).
_DIE_IN_FINETUNE = """
import os, signal, sys
from bort_jax.finetune import population
from bort_jax.runtime import checkpoint, rundir
real_save = checkpoint.CheckpointManager.save
def save_and_wait(self, *args, **kwargs):
  out = real_save(self, *args, **kwargs)
  self.wait()
  return out
checkpoint.CheckpointManager.save = save_and_wait
real = population.progress_line
def line_then_die(*args, **kwargs):
  print(real(*args, **kwargs), flush=True)
  os.kill(os.getpid(), signal.SIGKILL)
population.progress_line = line_then_die
from bort_jax import main
sys.exit(main.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_killed_in_finetuning_resumes_to_the_same_report(finished, cache, tmp_path, capsys):  # pylint: disable=redefined-outer-name
  # The earlier stages as the uninterrupted run left them; fine-tuning, Agora and report to come.
  work = str(tmp_path / "work")
  shutil.copytree(finished["workdir"], work, ignore=shutil.ignore_patterns("finetune", "report"))
  state_path = os.path.join(work, rundir.DEMO_STATE)
  state = json.load(open(state_path))
  state.pop("finetune_runs")
  state.pop("agora")
  for stage in ("finetune", "agora", "report"):
    state["stages"][stage] = {"done": False, "seconds": 0.0}
  json.dump(state, open(state_path, "w"))
  _forget(cache, finished, "finetune")
  env = helpers.subprocess_env({"xla_cache": cache["xla_cache"]})
  proc = subprocess.run([sys.executable, "-c", _DIE_IN_FINETUNE] + argv(cache, work),
                        cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:] + proc.stderr[-3000:]
  # The teacher's jobs come first and were found in the cache (skipped); killed after the
  # first chunk of the student's first job: its checkpoint is there, no result yet.
  first = json.load(open(state_path))["finetune_runs"]["student"][0]
  with checkpoint.CheckpointManager(os.path.join(first, "population"), read_only=True) as m:
    assert m.latest_step() == 2
  assert not os.path.exists(os.path.join(first, "population.json"))
  killed = json.load(open(state_path))["stages"]["finetune"]
  assert not killed["done"] and killed["seconds"] < 30  # only the skipped teacher jobs
  capsys.readouterr()
  summary = demo.run(make_config(cache), work)
  out = capsys.readouterr().out
  # The first job continues at step 2 (one chunk left); the two others run both chunks.
  assert out.count("population step 2/4") == 2 and out.count("population step 4/4") == 3
  assert _numbers(summary) == _numbers(finished["summary"])
  assert summary["headline"]["share"] == pytest.approx(finished["summary"]["headline"]["share"])
  assert json.load(open(state_path))["stages"]["finetune"]["done"]
  # The export the student was fine-tuned from is the same one.
  assert export.load_config(os.path.join(work, "distill", "export")) == export.load_config(
      os.path.join(finished["workdir"], "distill", "export"))


# Kills the demo at a point inside one stage: ``teacher`` / ``distill`` right after the first
# checkpoint of that stage's training is written (waited for), ``extract`` right after the
# first line of a search journal, ``agora`` right after its first round's journal line,
# ``report`` right after its first plot.
_DIE_IN_STAGE = """
import os, signal, sys
target, _, how = sys.argv.pop(1).partition(":")
sent = []
def die():
  os.kill(os.getpid(), signal.SIGKILL)
from bort_jax.runtime import checkpoint, rundir
real_save = checkpoint.CheckpointManager.save
def save_then_die(self, *args, **kwargs):
  out = real_save(self, *args, **kwargs)
  if os.sep + target + os.sep in self.directory + os.sep and not sent:
    self.wait()
    if how == "term":  # a preemption: the run's own handler catches it, saves and returns
      sent.append(True)
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      die()
  return out
checkpoint.CheckpointManager.save = save_then_die
from bort_jax.search import journal
real_append = journal.Journal.append
def append_then_die(self, records):
  real_append(self, records)
  if target == "extract" and records:
    die()
journal.Journal.append = append_then_die
from bort_jax.pipelines import report_plots
real_pareto = report_plots.pareto
def pareto_then_die(*args, **kwargs):
  out = real_pareto(*args, **kwargs)
  if target == "report":
    die()
  return out
report_plots.pareto = pareto_then_die
from bort_jax.finetune import agora
real_journal = agora._append_journal
def journal_then_die(*args, **kwargs):
  real_journal(*args, **kwargs)
  if target == "agora":
    die()
agora._append_journal = journal_then_die
from bort_jax import main
sys.exit(main.main(sys.argv[1:]))
"""

# target of _DIE_IN_STAGE -> (the demo stage it lands in, the workdir folder that stage writes;
# Agora writes beside the student's fine-tuning runs, in the cache)
_KILLS = {"teacher": ("teacher-adapt", "teacher"), "extract": ("extract", "extract"),
          "distill": ("distill", "distill"), "agora": ("agora", None),
          "report": ("report", "report")}


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(_KILLS))
def test_killed_in_a_stage_resumes_to_the_same_report(finished, cache, tmp_path, capsys,  # pylint: disable=redefined-outer-name
                                                       target):
  stage, folder = _KILLS[target]
  later = demo.STAGES[demo.STAGES.index(stage):]
  # The stages before the killed one as the uninterrupted run left them.
  later_dirs = [_KILLS[t][1] for t in _KILLS if _KILLS[t][0] in later and _KILLS[t][1]]
  work = str(tmp_path / "work")
  shutil.copytree(finished["workdir"], work, ignore=shutil.ignore_patterns(*later_dirs))
  state_path = os.path.join(work, rundir.DEMO_STATE)
  state = json.load(open(state_path))
  state.pop("agora")
  if "finetune" in later:
    state.pop("finetune_runs")
  for name in later:
    state["stages"][name] = {"done": False, "seconds": 0.0}
  json.dump(state, open(state_path, "w"))
  if target != "report":  # run it again rather than copy the earlier run's
    _forget(cache, finished, target)
  env = helpers.subprocess_env({"xla_cache": cache["xla_cache"]})
  proc = subprocess.run([sys.executable, "-c", _DIE_IN_STAGE, target] + argv(cache, work),
                        cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:] + proc.stderr[-3000:]
  killed = json.load(open(state_path))["stages"]
  assert not killed[stage]["done"] and killed[stage]["seconds"] == 0.0
  if folder:  # it had started writing
    assert os.path.isdir(os.path.join(work, folder))
  else:
    assert os.path.isdir([f for f in json.load(open(state_path))["finetune_runs"]["student"]
                          if "movie_sentiment" in f][0] + demo_agora.AGORA_SUFFIX)
  capsys.readouterr()
  summary = demo.run(make_config(cache), work)
  stages = json.load(open(state_path))["stages"]
  assert all(stages[name]["done"] for name in demo.STAGES)
  assert _numbers(summary) == _numbers(finished["summary"])
  assert summary["headline"]["share"] == pytest.approx(finished["summary"]["headline"]["share"])
  assert (json.load(open(os.path.join(work, "extract", "results.json")))["best"]
          == json.load(open(os.path.join(finished["workdir"], "extract", "results.json")))["best"])


@pytest.mark.slow
@pytest.mark.parametrize("target", ["teacher", "distill"])
def test_sigterm_in_a_training_stage_stops_the_demo_and_a_rerun_resumes(finished, cache,  # pylint: disable=redefined-outer-name
                                                                        tmp_path, capsys,
                                                                        target):
  """A preemption saves the stage's checkpoint, exports nothing, caches nothing, and stops the
  demo (exit 0, how to resume printed); the rerun ends with the uninterrupted run's report."""
  stage = _KILLS[target][0]
  later = demo.STAGES[demo.STAGES.index(stage):]
  work = str(tmp_path / "work")
  shutil.copytree(finished["workdir"], work, ignore=shutil.ignore_patterns(
      *[_KILLS[t][1] for t in ("teacher", "distill") if _KILLS[t][0] in later], "report",
      "finetune"))
  state_path = os.path.join(work, rundir.DEMO_STATE)
  state = json.load(open(state_path))
  for key in ("finetune_runs", "agora"):
    state.pop(key)
  for name in later:
    state["stages"][name] = {"done": False, "seconds": 0.0}
  json.dump(state, open(state_path, "w"))
  adapted = os.path.join(cache["dir"], "adapted")
  _forget(cache, finished, "teacher")
  _forget(cache, finished, target)
  env = helpers.subprocess_env({"xla_cache": cache["xla_cache"]})
  proc = subprocess.run([sys.executable, "-c", _DIE_IN_STAGE, f"{target}:term"]
                        + argv(cache, work), cwd=helpers.REPO, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert f"Stopped: the {stage} stage was preempted (SIGTERM)" in proc.stdout
  assert "Headline" not in proc.stdout  # no later stage ran
  stages = json.load(open(state_path))["stages"]
  assert not stages[stage]["done"] and stages[stage]["seconds"] > 0
  assert not any(stages[name]["done"] for name in later)
  folder = os.path.join(work, _KILLS[target][1])
  assert os.path.isdir(os.path.join(folder, "checkpoints"))
  assert not os.path.exists(os.path.join(folder, "export"))  # no half-trained model
  if target == "teacher":
    assert not os.path.isdir(adapted) or not os.listdir(adapted)  # and none in the cache
  capsys.readouterr()
  summary = demo.run(make_config(cache), work)
  assert "resuming" in capsys.readouterr().out
  assert all(json.load(open(state_path))["stages"][name]["done"] for name in demo.STAGES)
  assert _numbers(summary) == _numbers(finished["summary"])
