"""A demo model's learning curve on each demo task: dev score against fine-tuning steps.

The demo gives each model the fine-tuning budget at which its dev score levels off; this script
measures where that is. For every task of ``configs/demo.py`` and every step count of
``--steps``, the demo's fine-tuning job of ``--model`` (the teacher's block
``finetune_teacher`` or the student's ``finetune``: the same learning rate, seeds, batch,
sequence length and dev sample) runs with that many steps, each in its own folder under
``--workdir`` (a rerun skips finished jobs). The output JSON has one row per (task, steps) with
the dev score (the mean over the job's seeds, and their sample standard deviation), the
majority-class baseline, the dev sample size and the standard error of the score, and per task
the gain of each run over the one half as long.

    bort-jax demo --workdir runs/demo
    python benchmarks/learning_curve.py --model teacher --export runs/demo/teacher/export \
        --workdir runs/curve_teacher --out benchmarks/results/learning_curve_teacher.json
    python benchmarks/learning_curve.py --model student --export runs/demo/distill/export \
        --tasks word_sense --workdir runs/curve_student \
        --out benchmarks/results/learning_curve_student.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import common  # noqa: F401  (puts the repository on sys.path)

from bort_jax.data import demo as demo_data
from bort_jax.data import fetch
from bort_jax.finetune import population_mode
from bort_jax.runtime.fileio import atomic_write_text
from bort_jax.pipelines import demo as demo_pipeline
from configs import demo as demo_config
from configs import finetune as finetune_config


def job_config(config, model: str, task: str, steps: int, init: str, cache_dir: str):
  """The demo's job of ``model`` on ``task`` (``pipelines.demo.finetune_config``), ``steps``
  long.

  A demo task the demo config leaves out gets its sequence length from
  ``configs/finetune.DEMO_SEQ_LEN``, as the demo would give it.
  """
  config = copy.deepcopy(config)
  spec = {"seq_len": finetune_config.DEMO_SEQ_LEN[f"demo/{task}"]}
  if task in config.finetune_tasks:
    spec = config.finetune_tasks[task].to_dict()
  config.finetune_tasks[task] = dict(spec, steps=int(steps), student_steps=int(steps))
  cfg = demo_pipeline.finetune_config(config, model, task, init, cache_dir)
  cfg.population.save_best = False
  return cfg


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--model", choices=("teacher", "student"), default="teacher",
                      help="whose demo fine-tuning job to run (its config block)")
  parser.add_argument("--export", required=True,
                      help="the model's export folder (WORKDIR/teacher/export or "
                      "WORKDIR/distill/export of a demo)")
  parser.add_argument("--workdir", required=True, help="one folder per (task, steps) job")
  parser.add_argument("--cache-dir", default=fetch.default_cache_dir())
  parser.add_argument("--tasks", default=",".join(demo_data.CONFIGS))
  parser.add_argument("--steps", default="100,200,400,800")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  config = demo_config.get_config()
  demo_data.register_demo_tasks(args.cache_dir)
  step_list = [int(s) for s in args.steps.split(",")]
  rows = []
  for task in args.tasks.split(","):
    for steps in step_list:
      folder = os.path.join(args.workdir, f"{task}-{steps}")
      result_path = os.path.join(folder, "population.json")
      start = time.perf_counter()
      if not os.path.exists(result_path):
        cfg = job_config(config, args.model, task, steps, args.export, args.cache_dir)
        population_mode.run(cfg, folder)
      with open(result_path, encoding="utf-8") as f:
        result = json.load(f)
      metric = result["metric"]
      stats = result["settings"][0][metric]
      score, n = float(stats["mean"]), int(result["dev_records"])
      row = {"task": task, "steps": steps, "metric": metric, "score": score,
             "seed_std": stats.get("std"), "seed_values": stats.get("values"),
             "majority": (result.get("majority") or {}).get(metric), "dev_records": n,
             "standard_error": math.sqrt(max(score * (1 - score), 0.0) / n) if n else None,
             "seconds": round(time.perf_counter() - start, 1)}
      rows.append(row)
      print(json.dumps(row), flush=True)
  for row in rows:
    half = [r for r in rows if r["task"] == row["task"] and 2 * r["steps"] == row["steps"]]
    row["gain_over_half"] = row["score"] - half[0]["score"] if half else None
  print("\n| task | steps | dev score | gain over half as long | majority | SE |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    gain = "" if r["gain_over_half"] is None else f"{100 * r['gain_over_half']:+.1f}"
    print(f"| {r['task']} | {r['steps']} | {100 * r['score']:.1f} | {gain} | "
          f"{100 * (r['majority'] or 0):.1f} | {100 * (r['standard_error'] or 0):.1f} |")
  if args.out:
    atomic_write_text(args.out, json.dumps({"model": args.model, "export": args.export,
                                            "rows": rows,
                                            "sources": fetch.used_sources(args.cache_dir)},
                                           indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
