"""Proxy phase of extraction: bucketed population training vs one program per candidate.

The same population (a search space scaled for a small CPU: by default depth {1,2,3,4}, heads
{2,4}, hidden {64,128,256}, FFN {128,256,512}, 72 candidates with A | H) is trained for s proxy
steps of distillation against fixed random teacher logits, by

* ``bucketed``: ``buckets.plan_buckets`` with ``max_overhead`` 1.5, one masked program per bucket
  (in ``map`` and ``vmap`` mode), and
* ``per_candidate``: ``max_overhead`` 1.0, so every distinct shape is its own unmasked program,
  compiled and run one after another.

``bucketed_<mode>_w<n>`` additionally compiles the bucket programs ahead in ``n`` threads
(``PopulationTrainer(compile_workers=n)``).

Each contender runs in a fresh subprocess (no JAX compilation cache is shared) and is timed end
to end: master initialisation, planning, host preparation, compiles and runs. The benchmark
also checks that the contenders agree on every candidate's proxy error (bucketing is exact).

    python benchmarks/extract.py --out runs/bench/extract.json

JSON goes to stdout (progress to stderr) and to ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

import common  # noqa: F401  (puts the repository root on sys.path)


def _space(args) -> list:
  from bort_jax.core.arch import Arch

  archs = [Arch(d, a, h, i) for d, a, h, i in itertools.product(
      args.depth, args.heads, args.hidden, args.intermediate) if h % a == 0]
  return sorted(set(archs))


def _data(args, steps: int):
  import numpy as np

  from bort_jax.search import proxy

  rng = np.random.default_rng(args.seed)
  b, t, p, v = args.batch, args.seq_len, args.predictions, args.vocab

  def batch(lead):
    ids = rng.integers(0, v, lead + (b, t)).astype(np.int32)
    positions = np.argsort(rng.random(lead + (b, t)), axis=-1)[..., :p].astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids), "masked_positions": positions,
            "masked_labels": rng.integers(0, v, lead + (b, p)).astype(np.int32),
            "masked_weights": np.ones(lead + (b, p), np.float32)}

  return proxy.ProxyData(
      batches=batch((steps,)), heldout=batch(()),
      teacher=(2 * rng.standard_normal((steps, b, p, v))).astype(np.float32),
      heldout_teacher=(2 * rng.standard_normal((b, p, v))).astype(np.float32))


def _worker(args) -> dict:
  """One contender in this (fresh) process."""
  import jax

  from bort_jax.core.arch import ModelConfig
  from bort_jax.search import buckets as buckets_lib
  from bort_jax.search import proxy

  spec = json.loads(args.worker)
  archs = _space(args)
  data = _data(args, spec["steps"])
  base = ModelConfig(archs[0], family="bort", vocab_size=args.vocab, max_positions=512,
                     type_vocab_size=0, pooler=False, layer_norm_eps=1e-5)
  master = buckets_lib.padded_arch(archs)
  pairs = [(a, {"lr": args.lr}) for a in archs]
  extra = {}
  if spec.get("compile_workers", 1) > 1:
    extra["compile_workers"] = spec["compile_workers"]
  start = time.perf_counter()
  trainer = proxy.PopulationTrainer(
      base, master, {"kind": "kl", "temperature": 2.0, "alpha_kd": 0.5, "alpha_mlm": 0.1},
      {"name": "adam_nobc", "clip_norm": 1.0}, error="distill", mode=spec["mode"],
      max_overhead=spec["max_overhead"], max_members=args.max_members, seed=args.seed,
      batch_size=args.batch, seq_len=args.seq_len, max_predictions=args.predictions, **extra)
  _ = trainer.master
  master_seconds = time.perf_counter() - start
  buckets = trainer.plan(pairs)
  errors = trainer.train_and_eval(pairs, data, buckets=buckets)
  wall = time.perf_counter() - start
  ledger = trainer.ledger()
  per_bucket = [{k: (round(v, 3) if isinstance(v, float) and k.endswith("seconds") else v)
                 for k, v in b.items() if k not in ("padded_flops", "real_flops")}
                for b in ledger.pop("buckets")]
  return {"name": spec["name"], "steps": spec["steps"], "mode": trainer.mode,
          "compile_workers": spec.get("compile_workers", 1),
          "max_overhead": spec["max_overhead"], "candidates": len(archs),
          "wall_seconds": wall, "master_init_seconds": master_seconds,
          "num_buckets": len(buckets), **ledger,
          "padded_flops_planned": buckets_lib.padding_overhead(buckets, archs, trainer.flops),
          "jax_device": jax.devices()[0].device_kind,
          "errors": {str(a): e for a, e in zip(archs, errors)}, "per_bucket": per_bucket}


def _run_contender(args, spec: dict) -> dict:
  argv = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
  for name in ("vocab", "seq_len", "batch", "predictions", "lr", "seed", "max_members"):
    argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
  for name in ("depth", "heads", "hidden", "intermediate"):
    argv += [f"--{name}"] + [str(x) for x in getattr(args, name)]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device, as a plain run has
  load = os.getloadavg()[0]
  common.log(f"start {spec} (load {load:.1f})")
  started = time.perf_counter()
  out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True)
  result = json.loads(out.stdout)
  result["process_seconds"] = time.perf_counter() - started
  result["load_average_1m_before"] = load
  common.log(f"done {spec['name']} s={spec['steps']}: {result['wall_seconds']:.1f}s wall, "
             f"{result['compiles']} compiles {result['compile_seconds']:.1f}s, "
             f"overhead {result['padding_overhead']:.3f}")
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=None)
  parser.add_argument("--steps", type=int, nargs="+", default=[3, 30])
  parser.add_argument("--depth", type=int, nargs="+", default=[1, 2, 3, 4])
  parser.add_argument("--heads", type=int, nargs="+", default=[2, 4])
  parser.add_argument("--hidden", type=int, nargs="+", default=[64, 128, 256])
  parser.add_argument("--intermediate", type=int, nargs="+", default=[128, 256, 512])
  parser.add_argument("--vocab", type=int, default=8000)
  parser.add_argument("--seq-len", type=int, default=64)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--predictions", type=int, default=10)
  parser.add_argument("--lr", type=float, default=5e-4)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max-overhead", type=float, default=1.5)
  parser.add_argument("--max-members", type=int, default=64)
  parser.add_argument("--modes", nargs="+", default=["map", "vmap"],
                      help="bucketed modes to time at the first s (later s use the first)")
  parser.add_argument("--compile-workers", type=int, nargs="+", default=[1, 2],
                      help="compile threads of the bucketed runs (each value is a contender "
                      "in the first mode); the per-candidate baseline always compiles "
                      "one program after another")
  parser.add_argument("--reuse-baseline", default=None,
                      help="a previous JSON of this benchmark (same setup) whose per_candidate "
                      "runs are reused instead of re-running the slow baseline")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    print(json.dumps(_worker(args)))
    return 0

  reused = {}
  if args.reuse_baseline:
    with open(args.reuse_baseline) as f:
      previous = json.load(f)
    reused = {r["steps"]: dict(r, reused_from=args.reuse_baseline)
              for r in previous["runs"] if r["name"] == "per_candidate"}
  runs = []
  for k, steps in enumerate(args.steps):
    modes = args.modes if k == 0 else args.modes[:1]
    specs = [{"name": f"bucketed_{m}", "mode": m, "max_overhead": args.max_overhead,
              "steps": steps} for m in modes]
    specs += [{"name": f"bucketed_{modes[0]}_w{w}", "mode": modes[0], "compile_workers": w,
               "max_overhead": args.max_overhead, "steps": steps}
              for w in args.compile_workers if w > 1]
    runs += [_run_contender(args, spec) for spec in specs]
    if steps in reused:
      runs.append(reused[steps])
    else:
      runs.append(_run_contender(args, {"name": "per_candidate", "mode": "map",
                                        "max_overhead": 1.0, "steps": steps}))

  summary = []
  for steps in args.steps:
    at = {r["name"]: r for r in runs if r["steps"] == steps}
    base = at["per_candidate"]
    for name, r in at.items():
      if name == "per_candidate":
        continue
      diff = max(abs(r["errors"][c] - base["errors"][c]) for c in base["errors"])
      summary.append({
          "steps": steps, "contender": name,
          "speedup_end_to_end": base["wall_seconds"] / r["wall_seconds"],
          "bucketed_wall_seconds": r["wall_seconds"],
          "per_candidate_wall_seconds": base["wall_seconds"],
          "bucketed_compiles": r["compiles"], "per_candidate_compiles": base["compiles"],
          "bucketed_compile_seconds": r["compile_seconds"],
          "per_candidate_compile_seconds": base["compile_seconds"],
          "bucketed_run_seconds": r["run_seconds"],
          "per_candidate_run_seconds": base["run_seconds"],
          "padded_flop_overhead": r["padding_overhead"],
          "max_abs_error_difference": diff})
  result = {
      "benchmark": "extract_proxy_phase",
      "machine": common.machine_info(),
      "setup": {"candidates": runs[0]["candidates"], "depth": args.depth, "heads": args.heads,
                "hidden": args.hidden, "intermediate": args.intermediate,
                "vocab": args.vocab, "seq_len": args.seq_len, "batch": args.batch,
                "predictions": args.predictions, "max_overhead": args.max_overhead,
                "max_members": args.max_members, "loss": "distill (kl, T=2)",
                "optimizer": "adam_nobc, clip 1.0", "lr": args.lr},
      "summary": summary,
      "runs": runs,
  }
  common.write_json(result, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
