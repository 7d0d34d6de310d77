"""A registered task and the same data as a user's CSV file give the same fine-tuned model.

The demo's movie_sentiment train and dev splits are written out as ``train.csv`` and
``dev.csv`` (columns ``sentence`` and ``label``, the records in split order), and the same
model is fine-tuned on ``task=demo/movie_sentiment`` and on ``task=file:train.csv`` with the
same seed and settings (the demo's: sequence length, decay, warmup, batch; the demo
teacher's learning rate; ``--steps``). Each run is its own process. The output JSON holds both dev accuracies; the file path
should give the very same number, since the examples and their order are the same; the majority
class's share is reported beside them, so a run that learnt nothing is seen as such.

    bort-jax data fetch --items teacher,movie_sentiment
    python benchmarks/file_task_parity.py --init ~/.cache/bort_jax/teacher --steps 200 \\
        --workdir runs/file_parity --out benchmarks/results/file_task_parity.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

import common  # noqa: F401  (puts the repository on sys.path)

from bort_jax.data import demo as demo_data
from bort_jax.finetune import tasks
from bort_jax.runtime import fileio, rundir
from configs import finetune as finetune_config

TASK = "demo/movie_sentiment"


def write_csv(split: str, path: str) -> int:
  """Writes one split of the demo task as a CSV file; returns the number of rows."""
  examples = tasks.cast_split(TASK, tasks.load_split(TASK, split))
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["sentence", "label"])
    for example in examples:
      writer.writerow([example.text_a, int(example.label)])
  return len(examples)


def fine_tune(task: str, workdir: str, args, extra: list[str]) -> dict:
  """One fine-tuning run in its own process; its results.json."""
  demo = finetune_config.get_config(f"task={TASK}")
  flags = [f"--config=configs/finetune.py:task={task},init={args.init},steps={args.steps},"
           f"seed={args.seed}", f"--workdir={workdir}", f"--config.tokenizer={args.init}",
           f"--config.seq_len={demo.seq_len}", f"--config.optim.lr={args.lr}",
           f"--config.optim.weight_decay={demo.optim.weight_decay}",
           f"--config.optim.warmup={demo.optim.warmup}", "--config.train.patience=0",
           f"--config.train.eval_every={args.steps}", "--config.predict_test=False", *extra]
  start = time.time()
  subprocess.run([sys.executable, "-m", "bort_jax.main", "finetune", *flags], check=True,
                 cwd=common.ROOT)
  with open(os.path.join(workdir, rundir.RESULTS)) as f:
    results = json.load(f)
  results["seconds"] = round(time.time() - start, 1)
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--init", required=True, help="the model to fine-tune (an export folder)")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--lr", type=float, default=3e-5,
                      help="the demo teacher's (finetune.py's demo default, 1e-4, leaves the "
                           "MiniLM teacher at the majority class: nothing to compare)")
  parser.add_argument("--workdir", default="runs/file_parity")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  demo_data.register_demo_tasks()
  os.makedirs(args.workdir, exist_ok=True)
  train, dev = (os.path.join(args.workdir, n) for n in ("train.csv", "dev.csv"))
  rows = {"train": write_csv("train", train), "validation": write_csv("validation", dev)}
  registered = fine_tune(TASK, os.path.join(args.workdir, "registered"), args, [])
  from_file = fine_tune(f"file:{train}", os.path.join(args.workdir, "file"), args,
                        [f"--config.files.validation={dev}"])
  labels = [int(e.label) for e in tasks.cast_split(TASK, tasks.load_split(TASK, "validation"))]
  majority = max(labels.count(v) for v in set(labels)) / len(labels)
  # No machine's folders in the output: the workdir is WORKDIR, the home folder ~.
  home = os.path.expanduser("~")
  for results in (registered, from_file):
    results["task"] = results["task"].replace(args.workdir, "WORKDIR")
  out = {"task": TASK, "lr": args.lr, "dev_majority_share": majority,
         "init": args.init.replace(home, "~"), "steps": args.steps, "seed": args.seed,
         "rows": rows, "registered": registered, "file": from_file}
  text = json.dumps(fileio.to_jsonable(out), indent=2)
  print(text)
  if args.out:
    fileio.atomic_write_text(args.out, text)


if __name__ == "__main__":
  main()
