"""The downstream test of the demo extraction's choice (``bort-jax study``).

Distils the chosen architecture and its rivals (the smallest candidate, the audited candidate of
lowest S-step error near the chosen one's inference cost, the audited candidate of lowest S-step
error overall, the teacher-shaped maximum point) under one step budget, fine-tunes each on the
three demo tasks with 3 seeds x 2 learning rates as one population, and writes study.md /
study.json / study.png (dev metric mean +- std per task against measured latency, the chosen one
marked). Needs the demo teacher and the demo extraction with its audit:

    bort-jax demo --workdir=runs/demo     # or teacher-adapt, then extract
    bort-jax study --config=configs/study_demo.py --workdir=runs/demo/study

The `tiny` arg shortens every step (tests point the paths at their own assets).
"""

import ml_collections

from configs import common
from configs import demo
from configs import finetune
from configs import pretrain_demo

# The demo suite's three tasks, keyed by the folder each one's population goes to.
TASKS = {name: f"demo/{name}" for name in demo.TASKS}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, {"tiny": common.FLAG}, "study_demo.py")
  tiny = ",tiny" if args.get("tiny") else ""
  config = ml_collections.ConfigDict()
  config.extract_dir = "runs/demo/extract"  # the extraction's workdir (results + audit.json)
  config.near_band = 0.25              # near_latency: within 25% of the chosen one's i

  # One distillation config for every architecture: the same teacher, data and step budget
  # (student.arch is set per architecture).
  config.distill = pretrain_demo.get_config("tiny" if tiny else None)

  # One fine-tuning config per task, 3 seeds x 2 learning rates as one population (the
  # demo's teacher is best at 3e-5, its students at 1e-4; each architecture is scored at the
  # rate of best mean); the demo's lengths (steps of batch 8, tokens) and dev sample; init.path
  # is set per architecture to its distilled export.
  config.finetune = ml_collections.ConfigDict()
  for key, task in TASKS.items():
    ft = finetune.get_config(f"task={task},seeds=3,lrs=3e-5/1e-4{tiny}")
    if not tiny:
      ft.train.total_steps, ft.seq_len = demo.TASKS[key]["steps"], finetune.DEMO_SEQ_LEN[task]
      ft.train.eval_every = 100
      ft.max_dev_examples = demo.TASKS[key].get("max_dev_examples", 500)
    config.finetune[key] = ft

  # Latency of each distilled model's forward pass on the running device: the models timed
  # round-robin, `repeats` rounds, the median kept.
  config.latency = ml_collections.ConfigDict({"batch": 1, "seq_len": 128, "repeats": 20})
  if tiny:
    config.latency.seq_len = 32
    config.latency.repeats = 2
  return config
