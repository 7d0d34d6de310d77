"""The demo's Agora stage: Agora on the student, the fine-tuned teacher as its labeller.

``config.agora_tasks`` says which tasks (:func:`agora_plan`); each run lies beside the
student's fine-tuning run of the task, in ``<its folder>_agora`` (the report finds it there),
and a task Agora does not take is recorded with the reason (a refusal by Agora itself in
``refused.json``, so a rerun does not try again).
"""

from __future__ import annotations

import copy
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


def run_agora(config: ml_collections.ConfigDict, jobs: list) -> dict[str, dict]:
  """Agora on the student for each task of the plan; refusals are recorded, not fatal.

  Args:
    config: the demo config.
    jobs: the fine-tuning jobs (``demo_cache.Job``, from ``demo.finetune_jobs``), all done.

  Returns:
    The plan (:func:`agora_plan`), with the refusals met on the way.
  """
  from bort_jax.finetune import agora  # pylint: disable=import-outside-toplevel
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
    cfg = copy.deepcopy(students[task].config)
    cfg.agora.enabled, cfg.agora.labeller = True, entry["labeller"]
    cfg.agora.first_round = students[task].folder  # its round 0 is the student's fine-tuning
    print(f"[agora] {task}: the student with Theta = its {cfg.population.seeds} seeds, the "
          f"fine-tuned teacher as labeller -> {entry['folder']}", flush=True)
    try:
      agora.run(cfg, entry["folder"])
    except agora.AgoraError as error:
      entry.update(run=False, reason=f"refused by Agora: {error}")
      print(f"[agora] {task}: {entry['reason']}", flush=True)
      os.makedirs(entry["folder"], exist_ok=True)
      atomic_write_text(os.path.join(entry["folder"], REFUSED_FILE),
                        json.dumps({"reason": entry["reason"]}) + "\n")
  return plan
