"""The demo's Agora stage: Agora on the student, the fine-tuned teacher as its labeller.

``config.agora_tasks`` says which tasks (:func:`agora_plan`); each run lies beside the
student's fine-tuning run of the task, in ``<its folder>_agora`` (the report finds it there),
and a task Agora does not take is recorded with the reason (a refusal by Agora itself in
``refused.json``, so a rerun does not try again).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import ml_collections

from bort_jax.runtime import fileio, rundir
from bort_jax.runtime.fileio import atomic_write_text

AGORA_SUFFIX = "_agora"  # the report finds a population's Agora run beside it by this suffix
REFUSED_FILE = "refused.json"  # in an Agora folder: why Agora refused the task (kept for reruns)


def agora_plan(config: ml_collections.ConfigDict, jobs: list) -> dict[str, dict]:
  """``{key: {"task", "run": bool, "reason": str, "folder", "labeller"}}`` for every task of
  ``config.finetune_tasks`` (``task`` its full name, :func:`demo.task_name`).

  ``config.agora_tasks``: ``"auto"`` takes the binary classification tasks whose fine-tuned
  teacher scores a dev accuracy above ``config.finetune.agora.min_labeller_accuracy`` (Agora's
  own rule for its labeller, 2/3, checked again when it starts); a comma-separated list of
  task names takes those (Agora casts a multi-class or multiple-choice task to binary, and its
  labeller is then fine-tuned on the cast first); ``""`` takes none. Run after the
  fine-tuning stage: the teachers' ``best/`` models and scores must exist.
  """
  from bort_jax.finetune import tasks as tasks_lib  # pylint: disable=import-outside-toplevel
  folders = {(job.model, job.task): job.folder for job in jobs}
  names = {job.task: job.config.task for job in jobs}
  wanted = str(config.agora_tasks).strip()
  named = {t.strip() for t in wanted.split(",") if t.strip()} if wanted != "auto" else set()
  threshold = float(config.finetune.agora.min_labeller_accuracy)
  plan = {}
  for task in config.finetune_tasks:
    teacher = folders[("teacher", task)]
    entry = {"task": names[task], "folder": folders[("student", task)] + AGORA_SUFFIX,
             "labeller": rundir.best_dir(teacher)}
    spec = tasks_lib.get_task(names[task])
    accuracy = _teacher_accuracy(teacher)
    if wanted != "auto":
      entry.update(run=task in named, reason="" if task in named else
                   f"not in config.agora_tasks ({wanted or 'empty'})")
    elif spec.kind != "classification" or spec.num_labels != 2:
      entry.update(run=False, reason=f"not binary ({spec.kind}, {spec.num_labels} labels): "
                   "'auto' takes binary classification tasks")
    elif accuracy is None or accuracy <= threshold:
      shown = "no dev accuracy" if accuracy is None else f"dev accuracy {accuracy:.3f}"
      entry.update(run=False, reason=f"the fine-tuned teacher's {shown} is not above "
                   f"{threshold:.3f}, Agora's bar for its labeller")
    else:
      entry.update(run=True, reason="")
    plan[task] = entry
  return plan


def _teacher_accuracy(folder: str) -> float | None:
  """The fine-tuned teacher's best member's dev accuracy (``best/finetune.json``)."""
  from bort_jax.finetune import setup  # pylint: disable=import-outside-toplevel
  meta = setup.read_best(folder) or {}
  return float(meta["value"]) if meta.get("metric") == "accuracy" else None


def finished(folder: str) -> bool:
  """Whether Agora in ``folder`` finished or refused its task (either is kept for reruns)."""
  return any(fileio.read_json(os.path.join(folder, name)) is not None
             for name in (rundir.AGORA, REFUSED_FILE))


def agora_job(student, entry: dict):
  """The Agora job (a ``demo_cache.Job`` of kind "agora") for a planned task: the student's
  fine-tuning config with Agora on, the fine-tuned teacher as labeller, and the student's
  finished run as round 0."""
  cfg = copy.deepcopy(student.config)
  cfg.agora.enabled, cfg.agora.labeller = True, entry["labeller"]
  cfg.agora.first_round = student.folder  # its round 0 is the student's fine-tuning
  return dataclasses.replace(student, config=cfg, folder=entry["folder"], kind="agora")


def run_job(job) -> str:
  """Runs an Agora job; returns "" or, when Agora refuses the task, the reason (recorded in
  the job's folder, so that a rerun does not try again)."""
  from bort_jax.finetune import agora  # pylint: disable=import-outside-toplevel
  try:
    agora.run(job.config, job.folder)
  except agora.AgoraError as error:
    reason = f"refused by Agora: {error}"
    os.makedirs(job.folder, exist_ok=True)
    atomic_write_text(os.path.join(job.folder, REFUSED_FILE),
                      json.dumps({"reason": reason}) + "\n")
    return reason
  return ""


def ready_jobs(config: ml_collections.ConfigDict, jobs: list, done) -> list:
  """The Agora jobs that fine-tuning job ``done`` just made possible: its task's, when the
  other model's job of the task has finished too, the plan runs Agora on it, and it has not
  run. The demo's fine-tuning workers take them as they come (``demo_workers``)."""
  other = [j for j in jobs
           if j.task == done.task and j.kind == "finetune" and j.model != done.model]
  if done.kind != "finetune" or not all(j.done() for j in other):
    return []
  entry = agora_plan(config, jobs)[done.task]
  student = next(j for j in jobs if j.task == done.task and j.model == "student")
  if not entry["run"] or finished(entry["folder"]):
    return []
  return [agora_job(student, entry)]


def run_agora(config: ml_collections.ConfigDict, jobs: list) -> dict[str, dict]:
  """Agora on the student for each task of the plan; refusals are recorded, not fatal.

  A task whose Agora ran in a fine-tuning worker (:func:`ready_jobs`) is found finished.

  Args:
    config: the demo config.
    jobs: the fine-tuning jobs (``demo_cache.Job``, from ``demo.finetune_jobs``), all done.

  Returns:
    The plan (:func:`agora_plan`), with the refusals met on the way.
  """
  plan = agora_plan(config, jobs)
  students = {job.task: job for job in jobs if job.model == "student"}
  for task, entry in plan.items():
    if not entry["run"]:
      print(f"[agora] {task}: skipped: {entry['reason']}", flush=True)
      continue
    if fileio.read_json(os.path.join(entry["folder"], rundir.AGORA)) is not None:
      print(f"[agora] {task}: done, skipped ({entry['folder']})", flush=True)
      continue
    refused = fileio.read_json(os.path.join(entry["folder"], REFUSED_FILE))
    if refused is not None:  # an earlier run's refusal: the same labeller, the same verdict
      entry.update(run=False, reason=refused["reason"])
      print(f"[agora] {task}: {entry['reason']}", flush=True)
      continue
    job = agora_job(students[task], entry)
    print(f"[agora] {task}: the student with Theta = its {job.config.population.seeds} seeds, "
          f"the fine-tuned teacher as labeller -> {entry['folder']}", flush=True)
    reason = run_job(job)
    if reason:
      entry.update(run=False, reason=reason)
      print(f"[agora] {task}: {reason}", flush=True)
  return plan
