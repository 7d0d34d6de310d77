"""The dry run against the real run, on the same simulated 8-device CPU mesh.

For the demo's distillation step and one bucket program of the demo's extraction, at the
demo's batch and at twice it, this script:

* plans the program with ``plan/`` (compiled memory analysis per device, compiled FLOPs);
* runs the same program for real on the same mesh (random tokens of the same shapes) and
  measures the process's peak resident memory above its level before the program's state
  existed (``/proc/self/status`` VmHWM, reset through ``clear_refs``) and the median step time.

The CPU's MFU per kind of step (FLOPs over step time x the host's float32 matmul peak) is taken
at the demo's batch; the estimate at twice the batch uses that MFU, so the check at the doubled
batch is a prediction, not a fit. Results: ``benchmarks/results/plan.json``.

    python benchmarks/plan.py --workdir runs/demo --cache-dir ~/.cache/bort_jax
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import common  # noqa: E402  (puts the repository on sys.path)
import jax  # noqa: E402
import numpy as np  # noqa: E402

from bort_jax.plan import dry_run, programs, targets  # noqa: E402

GIB = 1024 ** 3


def _status(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise KeyError(field)


def reset_peak() -> int:
  """Resets VmHWM to the current RSS; returns it."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  return _status("VmRSS")


def planned(mode, config, target, index=0) -> dict:
  plan = programs.build(mode, config, targets.devices_of(target), {})
  result = dry_run.compile_program(plan.programs[index], target, lambda line: None)
  return {"per_device_gib": result.total / GIB, "devices": target.devices,
          "all_devices_gib": result.total * target.devices / GIB,
          "flops_per_device": result.flops, "name": result.name}


def distill_real(config, steps: int) -> dict:
  from bort_jax.pipelines import distill  # pylint: disable=import-outside-toplevel
  from bort_jax.runtime import sharding  # pylint: disable=import-outside-toplevel
  models = distill.load_models(config)
  b, t = int(config.data.global_batch_size), int(config.data.seq_len)
  k = int(config.data.max_predictions)
  rng = np.random.default_rng(0)
  local = {"input_ids": rng.integers(1000, models.student.vocab_size - 1, (b, t), np.int32),
           "attention_mask": np.ones((b, t), np.int32),
           "token_type_ids": np.zeros((b, t), np.int32),
           "masked_positions": np.tile(np.arange(k, dtype=np.int32), (b, 1)),
           "masked_labels": rng.integers(1000, 2000, (b, k), np.int32),
           "masked_weights": np.ones((b, k), np.float32)}
  base = reset_peak()
  built = distill.build(config, models=models, batches=lambda n: [local] * n)
  batch = sharding.global_batch(local, built.mesh)
  state, times = built.state, []
  for i in range(steps + 2):
    t0 = time.perf_counter()
    state, metrics = built.step_fn(state, batch, built.rng, built.frozen)
    jax.block_until_ready(metrics)
    if i >= 2:
      times.append(time.perf_counter() - t0)
  return {"peak_above_start_gib": (_status("VmHWM") - base) / GIB,
          "step_s": float(np.median(times))}


def bucket_real(config, repeats: int) -> dict:
  """The demo extraction's last (largest) bucket, run for real: its program alone."""
  # pylint: disable=import-outside-toplevel,protected-access
  from bort_jax.pipelines import extract
  from bort_jax.search import buckets, proxy
  from bort_jax.pipelines import setup
  candidates = extract.search_space(config.space)
  teacher, _ = setup.load_teacher(config.teacher)
  base = extract.base_student(config, candidates, teacher)
  b, t, k = (int(config.data.global_batch_size), int(config.data.seq_len),
             int(config.data.max_predictions))
  trainer = proxy.PopulationTrainer(
      base, buckets.padded_arch(candidates), dict(config.loss), dict(config.proxy.optim),
      error=config.proxy.error, mode=config.proxy.mode, max_overhead=config.proxy.max_overhead,
      max_members=config.proxy.max_members, seed=0, batch_size=b, seq_len=t,
      max_predictions=k)
  pairs = [(a, dict(th)) for th in config.fptas.thetas for a in candidates]
  bucket = trainer.plan(pairs)[-1]
  s, v = int(config.proxy.steps), teacher.vocab_size
  rng = np.random.default_rng(0)

  def one(lead):
    return {"input_ids": rng.integers(1000, v - 1, lead + (t,)).astype(np.int32),
            "attention_mask": np.ones(lead + (t,), np.int32),
            "token_type_ids": np.zeros(lead + (t,), np.int32),
            "masked_positions": np.broadcast_to(np.arange(k, dtype=np.int32),
                                                lead + (k,)).copy(),
            "masked_labels": rng.integers(1000, 2000, lead + (k,)).astype(np.int32),
            "masked_weights": np.ones(lead + (k,), np.float32)}

  data = proxy.ProxyData(one((s, b)), one((b,)),
                         rng.standard_normal((s, b, k, v), np.float32),
                         rng.standard_normal((b, k, v), np.float32))
  trainer.master  # pylint: disable=pointless-statement  (host weights before the baseline)
  checked = trainer._check_pairs(pairs)
  base_rss = reset_peak()
  job = trainer._prepare(bucket, checked, data, False)
  compiled, _ = trainer._compile(job)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*job["args"]))
    times.append(time.perf_counter() - t0)
  return {"peak_above_start_gib": (_status("VmHWM") - base_rss) / GIB,
          "run_s": float(np.median(times)), "bucket": f"{bucket.padded} x {len(bucket.members)}"}


def measure_row(kind: str, scale: int, workdir: str, cache_dir: str, steps: int) -> dict:
  """One (kind, batch) row, planned and run in this process."""
  from bort_jax import cli  # pylint: disable=import-outside-toplevel
  from bort_jax.pipelines import demo  # pylint: disable=import-outside-toplevel
  configs = demo.step_configs(cli.load_config("configs/demo.py"), workdir, cache_dir)
  target = targets.cpu_target(8)
  cfg = configs["distill" if kind == "distill" else "extract"]
  cfg.data.global_batch_size = int(cfg.data.global_batch_size) * scale
  if kind == "distill":
    plan = planned("distill", cfg, target)
    real = distill_real(cfg, steps)
    seconds, flops = real["step_s"], plan["flops_per_device"] * 8
  else:
    full = programs.build("extract", cfg, targets.devices_of(target), {})
    plan = planned("extract", cfg, target, index=len(full.programs) - 1)
    real = bucket_real(cfg, 3)
    seconds, flops = real["run_s"], full.programs[-1].flops
  peak = target.peak_flops_per_device * 8
  return {"kind": kind, "batch": int(cfg.data.global_batch_size), "plan": plan, "real": real,
          "host_peak_flops": peak, "flops": flops, "seconds": seconds,
          # A distillation step runs on all 8 devices; a bucket program (lax.map, not sharded
          # on a CPU) on one.
          "memory_ratio": plan["all_devices_gib" if kind == "distill" else "per_device_gib"]
                          / real["peak_above_start_gib"],
          "measured_mfu": flops / (seconds * peak)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a finished demo workdir")
  parser.add_argument("--cache-dir", required=True, help="the demo's cache")
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--row", default="", help="internal: KIND:SCALE, one row in this process")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if args.row:
    kind, scale = args.row.split(":")
    print(json.dumps(measure_row(kind, int(scale), args.workdir, args.cache_dir, args.steps)))
    return 0
  out = {"machine": common.machine_info(), "rows": [], "mfu": {}}
  for kind in ("distill", "proxy"):
    for scale in (1, 2):  # each row in a fresh process: no allocator state carried over
      done = subprocess.run([sys.executable, __file__, "--row", f"{kind}:{scale}",
                             "--workdir", args.workdir, "--cache-dir", args.cache_dir,
                             "--steps", str(args.steps)], check=True, capture_output=True,
                            text=True)
      row = json.loads(done.stdout.strip().splitlines()[-1])
      if scale == 1:
        out["mfu"][kind] = row["measured_mfu"]
      else:  # a prediction with the MFU measured at the other batch
        row["estimated_s"] = row["flops"] / (row["host_peak_flops"] * out["mfu"][kind])
        row["time_ratio"] = row["estimated_s"] / row["seconds"]
      out["rows"].append(row)
      print(row, file=sys.stderr, flush=True)
  common.write_json(out, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
