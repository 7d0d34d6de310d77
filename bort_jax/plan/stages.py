"""``bort-jax demo --dry-run``: the demo planned stage by stage with the stages' own configs.

A stage's inputs come from the stages before it (the adapted teacher, the extraction's choice,
the distilled student). A dry run runs none of them, so a missing input is planned with a
stand-in of the shape it will have, and the plan says so:

* the adapted teacher has the fetched teacher's shape (its ``config.json`` in the cache, or
  ``--shapes teacher=`` before a fetch; the demo's teacher is ``minilm-l6-h384``);
* the extraction's choice, before there is one, is the largest candidate of its search space
  (an upper bound on what the distillation and the student's fine-tuning need);
* the distilled student has the choice's shape.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import ml_collections

from bort_jax.core import arch as arch_lib
from bort_jax.plan import programs


def _teacher_shape(cache_dir: str, shapes: dict) -> arch_lib.ModelConfig:
  if "teacher" in shapes:
    return programs.model_shape("", "config.teacher.path", shapes["teacher"], "bert")
  path = os.path.join(cache_dir, "teacher")
  if not os.path.isdir(path):
    raise ValueError(f"the demo's teacher is not in the cache ({path}): fetch it first "
                     "(`bort-jax data fetch --items teacher`; a dry run reads only its "
                     "config.json) or give its shape with --shapes teacher=minilm-l6-h384")
  return programs.model_shape(path, "the cached teacher")


def stages(config: ml_collections.ConfigDict, workdir: str, shapes: dict
           ) -> list[tuple[str, str, Any, dict, str]]:
  """``(stage, mode, config, shapes, note)`` for every training stage of the demo, in order."""
  # pylint: disable-next=import-outside-toplevel
  from bort_jax.pipelines import demo, extract, setup
  from bort_jax.data import fetch  # pylint: disable=import-outside-toplevel
  from bort_jax.search import buckets  # pylint: disable=import-outside-toplevel
  workdir = os.path.abspath(workdir)
  tiny = bool(config.get("tiny"))  # the demo's own choice of cache (pipelines/demo.py)
  cache_dir = os.path.abspath(os.path.expanduser(
      config.cache_dir or (os.path.join(workdir, "tiny_suite") if tiny
                           else fetch.default_cache_dir())))
  cfg = demo.step_configs(config, workdir, cache_dir)
  teacher = _teacher_shape(cache_dir, shapes)
  out = [("teacher-adapt", "teacher-adapt", cfg["adapt"], {"student": teacher}, "")]
  adapted = os.path.join(workdir, "teacher", "export")
  stand_in = {} if os.path.isdir(adapted) else {"teacher": teacher}
  note = "" if not stand_in else "the adapted teacher: the fetched teacher's shape"
  out.append(("extract", "extract", cfg["extract"], stand_in, note))
  distill_cfg = copy.deepcopy(cfg["distill"])
  try:
    setup.resolve_student_arch(distill_cfg.student.arch)
    choice = ""
  except FileNotFoundError:
    largest = buckets.padded_arch(extract.search_space(cfg["extract"].space))
    distill_cfg.student.arch = str(largest)
    choice = f"the extraction's choice: its largest candidate {largest} (an upper bound)"
  out.append(("distill", "distill", distill_cfg, stand_in, "; ".join(
      n for n in (note, choice) if n)))
  from bort_jax.data import demo as demo_data  # pylint: disable=import-outside-toplevel
  demo_data.register_demo_tasks(cache_dir)
  models = {"teacher": (adapted, {"init": teacher}, "the adapted teacher's shape")}
  distilled = os.path.join(workdir, "distill", "export")
  student = setup.student_config(distill_cfg.student, teacher)
  models["student"] = (distilled, {"init": student}, f"the distilled student: {student.arch}")
  for name in ("teacher", "student"):  # the demo's order: the teacher's jobs first
    init, stand_in_shapes, stand_in_note = models[name]
    there = os.path.isdir(init)
    for task in config.finetune_tasks:
      job = demo.finetune_config(config, name, task, init, cache_dir)
      out.append((f"finetune {name} on {job.task}", "finetune", job,
                  {} if there else stand_in_shapes, "" if there else stand_in_note))
  return out
