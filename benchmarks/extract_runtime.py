"""Does the extraction choose another student when latency is timed in another runtime?

Runs the demo's extraction (its config, teacher and corpus, from a finished demo workdir and
its cache) again with ``config.cost.inference = "latency"`` in each runtime asked for, every
candidate's latency measured in that runtime (``config.cost.runtime``, a fresh latency table
in the output folder), and writes each run's choices (W's and the budget's) beside the demo's
own, which costs candidates in analytic FLOPs:

    python benchmarks/extract_runtime.py --workdir runs/demo --cache-dir ~/.cache/bort_jax \\
        --runtimes jax onnxruntime-int8 --out benchmarks/results/extract_runtime.json

Each runtime's extraction runs in a process of its own (``--worker``), so no runtime's
threads share the cores with another's while the candidates are timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py; also puts the repo root on sys.path)


def _choices(results: dict) -> dict:
  sel = results.get("select") or {}
  return {"w_choice": results.get("best"), "budget_choice": results.get("chosen"),
          "budget": sel.get("budget"), "speedup_of_budget_choice": sel.get("speedup"),
          "runner_up": sel.get("runner_up")}


def _worker(args) -> int:
  from bort_jax.pipelines import demo, extract
  from configs import demo as demo_config
  config = demo_config.get_config()
  cfg = demo.step_configs(config, args.workdir, args.cache_dir)["extract"]
  out = os.path.join(args.out_dir, args.worker)
  cfg.cost.inference = "latency"
  cfg.cost.runtime = args.worker
  cfg.cost.latency_table = os.path.join(out, "latency_table.json")
  cfg.audit.enabled = False  # the proxy errors are the same whatever the cost; only i changes
  start = time.perf_counter()
  extract.run(cfg, out)
  with open(os.path.join(out, "results.json")) as f:
    results = json.load(f)
  print(json.dumps(dict(_choices(results), runtime=args.worker,
                        seconds=time.perf_counter() - start)))
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a finished demo workdir")
  parser.add_argument("--cache-dir", required=True, help="its data cache")
  parser.add_argument("--runtimes", nargs="+", default=["jax", "onnxruntime-int8"])
  parser.add_argument("--out-dir", default=None, help="extraction workdirs (default: a temp)")
  parser.add_argument("--out", help="also write the JSON here")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    return _worker(args)
  import tempfile
  args.out_dir = args.out_dir or tempfile.mkdtemp(prefix="extract_runtime_")
  with open(os.path.join(args.workdir, "extract", "results.json")) as f:
    result = {"benchmark": "extract_runtime", "machine": common.machine_info(),
              "demo": dict(_choices(json.load(f)), cost="analytic FLOPs"), "runs": []}
  for runtime in args.runtimes:
    common.log(f"extraction with latency timed in {runtime} (a process of its own)")
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", runtime,
                           "--workdir", args.workdir, "--cache-dir", args.cache_dir,
                           "--out-dir", args.out_dir], check=True, stdout=subprocess.PIPE,
                          text=True)
    result["runs"].append(json.loads(done.stdout.strip().splitlines()[-1]))
  common.write_json(result, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
