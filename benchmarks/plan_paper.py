"""The paper-scale plans of docs/PLANNING.md, each a `bort-jax ... --dry-run --json` run.

Needs the plan extra (libtpu). Each plan runs in its own process; its JSON summary (or, for a
plan that does not fit, its verdict) goes into ``benchmarks/results/plan_paper.json``.

    python benchmarks/plan_paper.py --out benchmarks/results/plan_paper.json
    python benchmarks/plan_paper.py --only distill-v5e-64     # one row
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import common

import bort_jax  # noqa: F401  (before JAX starts: libtpu's settings off a TPU VM)

DISTILL = ["distill", "--config=configs/pretrain_bort.py", "--shapes", "teacher=roberta-large"]
FINETUNE = ["finetune", "--shapes", "init=bort"]
# GLUE tasks at the paper's batch sizes; steps are 3 epochs of the train split (RTE 2,490
# examples at batch 8; MNLI 392,702 at batch 32).
PLANS = {
    "distill-v4-32": DISTILL + ["--target=v4-32", "--max-batch"],
    "distill-v5e-64": DISTILL + ["--target=v5e-64"],
    "distill-h100-x8": DISTILL + ["--target=h100-x8"],
    "finetune-rte-v5e-8": FINETUNE + ["--config=configs/finetune.py:task=glue/rte",
                                      "--config.train.total_steps=934", "--target=v5e-8"],
    "finetune-mnli-v5e-8": FINETUNE + ["--config=configs/finetune.py:task=glue/mnli",
                                       "--config.batch_size=32",
                                       "--config.train.total_steps=36816", "--target=v5e-8"],
    "extract-paper-v4-32": ["extract", "--config=configs/extract_paper.py", "--shapes",
                            "teacher=roberta-large", "--target=v4-32", "--largest-only"],
}


def run_plan(name: str) -> dict:
  t0 = time.perf_counter()
  done = subprocess.run([sys.executable, "-m", "bort_jax.main", *PLANS[name], "--dry-run",
                         "--json"], cwd=common.ROOT, capture_output=True, text=True)
  row = {"name": name, "argv": PLANS[name], "status": done.returncode,
         "wall_s": time.perf_counter() - t0}
  start = done.stdout.find("{")
  if start >= 0:
    row["plan"] = json.loads(done.stdout[start:])
  lines = [l for l in done.stderr.splitlines() if not l.startswith("[dry-run]")]
  row["verdict"] = lines[-1] if done.returncode else ""
  return row


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default="", help="comma list of plan names")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  names = [n for n in args.only.split(",") if n] or list(PLANS)
  out = {"machine": common.machine_info(), "rows": []}
  if args.out and os.path.exists(args.out):
    out["rows"] = [r for r in json.load(open(args.out))["rows"] if r["name"] not in names]
  for name in names:
    row = run_plan(name)
    out["rows"].append(row)
    print(f"{name}: status {row['status']} in {row['wall_s']:.0f} s {row['verdict']}",
          file=sys.stderr, flush=True)
    common.write_json(out, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
