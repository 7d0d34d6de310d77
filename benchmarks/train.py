"""Throughput of the distillation train step, and its model FLOPs utilisation (MFU).

The measured unit is one call of the real compiled step (``distill.make_loss_fn`` +
``train.compile_step``, donation on): the teacher's forward pass, the student's forward and
backward passes and the optimizer update (Adam without bias correction, clipping, decay), on
random weights and random masked batches, float32, one device. Reported per shape set:

* ``tokens_per_second`` = batch x seq_len / median step time;
* ``model_flops_per_step`` = 3 x student forward + teacher forward (analytic matmul FLOPs
  from ``cost.forward_flops``, MLM head at the masked positions only; the backward pass
  counted as twice the forward), and XLA's own count of the compiled step for comparison;
* ``mfu`` = model FLOPs per second / the measured float32 matmul ceiling of this machine (a
  jitted 2048^3 matmul at the same precision, timed round-robin with the step so that both
  see the same load); ``common.matmul_ceiling`` before and after is reported too;
* ``parts``: the teacher's forward and the student's step without a teacher, timed alone in
  the same rounds, with their own GFLOP/s.

Shape sets:

* ``demo``: the demo's student D4-A4-H256-I1024 from the MiniLM teacher D6-A12-H384-I1536
  (BERT vocabulary 30,522), seq 128, batch 8, 20 predictions per row (configs/pretrain_demo.py);
* ``adapt`` (on request): the teacher-adapt step of the demo, an MLM head trained on the
  frozen MiniLM body (no teacher), at the demo's batch;
* ``bort``: Bort's student D4-A8-H1024-I768 (RoBERTa vocabulary 50,265) at seq 128, batch 8.
  Its real teacher, RoBERTa-large, would make one step take many seconds on a 2-core CPU, so
  the default uses RoBERTa-base (D12-A12-H768-I3072) as the teacher; ``--bort-teacher
  roberta-large`` measures the real pair.

Measured on the shared 2-core CPU of the development machine (load average ~5, results vary
by +-20% from run to run): demo 795 tokens/s, 1.29 s/step, MFU 48%; bort (RoBERTa-base
teacher) 152 tokens/s, 6.7 s/step, MFU 71%. The demo's teacher forward alone runs at ~66% of
the ceiling; its student step is the less efficient part (small H=256 matmuls, and an
optimizer update over 11M parameters of which 7.8M are the word embeddings).

    python benchmarks/train.py --out results/train.json
    python benchmarks/train.py --quick    # the demo shapes only, fewer rounds
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py; also puts the repo root on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from bort_jax.core import arch as arch_lib  # noqa: E402
from bort_jax.core import cost, model, optim
from bort_jax.pipelines import distill, setup
from bort_jax.runtime import train  # noqa: E402

SHAPES = {
    "demo": {"student": "D4-A4-H256-I1024", "teacher": "minilm-l6-h384", "batch": 8,
             "seq_len": 128, "predictions": 20},
    "bort": {"student": "bort", "teacher": "roberta-base", "batch": 8, "seq_len": 128,
             "predictions": 20},
}
LOSS = ml_collections.ConfigDict({"kind": "kl", "temperature": 2.0, "alpha_kd": 0.5,
                                  "alpha_mlm": 0.1})
OPTIM = {"name": "adam_nobc", "lr": 1e-4, "weight_decay": 0.01, "clip_norm": 1.0,
         "warmup": 0.0, "total_steps": 1000}


def random_batch(config: arch_lib.ModelConfig, batch: int, seq_len: int, predictions: int,
                 seed: int = 0) -> dict:
  """A full-length masked batch with distinct sorted positions per row."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, config.vocab_size, size=(batch, seq_len), dtype=np.int32)
  positions = np.sort(np.stack([rng.choice(np.arange(1, seq_len - 1), predictions, False)
                                for _ in range(batch)]), axis=1).astype(np.int32)
  out = {"input_ids": ids, "attention_mask": np.ones_like(ids),
         "masked_positions": positions,
         "masked_labels": np.take_along_axis(ids, positions, axis=1),
         "masked_weights": np.ones(positions.shape, np.float32)}
  if config.type_vocab_size > 0:
    out["token_type_ids"] = np.zeros_like(ids)
  return {k: jnp.asarray(v) for k, v in out.items()}


def measure(name: str, shape: dict, rounds: int, teacher_override: str | None = None) -> dict:
  """Compiles and times the distillation step of one shape set."""
  teacher_name = teacher_override or shape["teacher"]
  teacher = arch_lib.get_model_config(teacher_name)
  student = setup.student_config(
      ml_collections.ConfigDict({"arch": shape["student"], "family": "teacher",
                                 "overrides": {}}), teacher)
  b, t, p = shape["batch"], shape["seq_len"], shape["predictions"]
  common.log(f"{name}: student {student.arch}, teacher {teacher_name} ({teacher.arch}), "
             f"batch {b} x {t}")
  mlm = model.HeadSpec("mlm")
  teacher_params = jax.jit(lambda r: model.init(r, teacher, mlm))(jax.random.key(1))
  tx = optim.make_optimizer(OPTIM)
  state = jax.jit(lambda r: train.create_state(model.init(r, student, mlm), tx))(
      jax.random.key(0))
  loss_fn = distill.make_loss_fn(student, teacher, LOSS)
  step_fn = train.compile_step(loss_fn, tx)
  batch = random_batch(student, b, t, p)
  rng = jax.random.key(2)
  frozen = {"teacher": teacher_params}

  start = time.perf_counter()
  compiled = step_fn.lower(state, batch, rng, frozen).compile()
  compile_s = time.perf_counter() - start
  xla = compiled.cost_analysis()
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  xla_flops = float(xla.get("flops", float("nan"))) if xla else float("nan")

  holder = {"state": state}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], batch, rng, frozen)
    jax.block_until_ready(metrics["loss"])

  # The parts alone, timed beside the whole step: where does the step lose efficiency?
  teacher_fwd = jax.jit(lambda q, x: model.apply(q, teacher, x, head=mlm)["logits"])
  student_only = train.compile_step(distill.make_loss_fn(student, None, LOSS), tx,
                                    donate=False)
  # The matmul ceiling is timed in the same rounds, so load drift on a shared machine hits
  # the step and its ceiling alike.
  n = 2048
  ma = jax.random.normal(jax.random.key(3), (n, n), jnp.float32)
  mb = jax.random.normal(jax.random.key(4), (n, n), jnp.float32)
  matmul = jax.jit(lambda x, y: jnp.matmul(x, y, precision="highest"))
  fns = {name: one_step,
         "matmul_2048": lambda: jax.block_until_ready(matmul(ma, mb)),
         "teacher_forward": lambda: jax.block_until_ready(teacher_fwd(teacher_params, batch)),
         "student_step": lambda: jax.block_until_ready(
             student_only(holder["state"], batch, rng, None)[1]["loss"])}
  timings = common.interleaved_timing(fns, rounds=rounds, warmup=2)
  timing = timings[name]
  seconds = timing["median_ms"] / 1e3
  s_fwd = cost.forward_flops(student, b, t, head="mlm", masked_predictions=p)["total"]
  t_fwd = cost.forward_flops(teacher, b, t, head="mlm", masked_predictions=p)["total"]
  model_flops = 3 * s_fwd + t_fwd
  ceiling = 2.0 * n ** 3 / timings["matmul_2048"]["median_ms"] / 1e6
  parts = {
      "teacher_forward": {"median_ms": timings["teacher_forward"]["median_ms"],
                          "gflops_per_second":
                              t_fwd / timings["teacher_forward"]["median_ms"] / 1e6},
      "student_step_without_teacher": {
          "median_ms": timings["student_step"]["median_ms"],
          "gflops_per_second": 3 * s_fwd / timings["student_step"]["median_ms"] / 1e6},
  }
  return {
      "student": str(student.arch), "teacher": f"{teacher_name} ({teacher.arch})",
      "vocab_size": student.vocab_size, "batch": b, "seq_len": t, "masked_predictions": p,
      "student_params": cost.param_counts(student)["total"],
      "teacher_params": cost.param_counts(teacher)["total"],
      "compile_seconds": compile_s, "step": timing,
      "tokens_per_second": b * t / seconds,
      "model_flops_per_step": model_flops,
      "model_flops_split": {"student_forward": s_fwd, "student_backward": 2 * s_fwd,
                            "teacher_forward": t_fwd},
      "xla_flops_per_step": xla_flops,
      "model_gflops_per_second": model_flops / seconds / 1e9,
      "interleaved_matmul_ceiling_gflops": ceiling,
      "mfu": model_flops / seconds / 1e9 / ceiling,
      "parts": parts,
  }


def measure_adapt(rounds: int, b: int = 8, t: int = 128, p: int = 20) -> dict:
  """Times the teacher-adapt step: an MLM head trained on the frozen MiniLM body."""
  config = arch_lib.get_model_config("minilm-l6-h384")
  common.log(f"adapt: MLM head on the frozen {config.arch} body, batch {b} x {t}")
  mlm = model.HeadSpec("mlm")
  full = jax.jit(lambda r: model.init(r, config, mlm))(jax.random.key(0))
  body = {k: v for k, v in full.items() if k != "mlm_head"}
  tx = optim.make_optimizer(OPTIM)
  state = train.create_state({"mlm_head": full["mlm_head"]}, tx)
  step_fn = train.compile_step(distill.make_loss_fn(config, None, LOSS, "mlm_head"), tx)
  batch, rng, frozen = random_batch(config, b, t, p), jax.random.key(2), {"body": body}
  compiled = step_fn.lower(state, batch, rng, frozen).compile()
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], batch, rng, frozen)
    jax.block_until_ready(metrics["loss"])

  timing = common.interleaved_timing({"adapt": one_step}, rounds=rounds, warmup=2)["adapt"]
  body_fwd = cost.forward_flops(config, b, t, head="none")["total"]
  head_fwd = cost.forward_flops(config, b, t, head="mlm", masked_predictions=p)["total"] - body_fwd
  flops = body_fwd + 3 * head_fwd
  return {"model": str(config.arch), "batch": b, "seq_len": t, "masked_predictions": p,
          "step": timing, "tokens_per_second": b * t / (timing["median_ms"] / 1e3),
          "model_flops_per_step": flops,
          "model_gflops_per_second": flops / timing["median_ms"] / 1e6}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", default="demo,bort",
                      help="comma-separated: demo, bort, adapt (the teacher-adapt step)")
  parser.add_argument("--rounds", type=int, default=7, help="timed steps per shape set")
  parser.add_argument("--bort-teacher", default=None,
                      help="teacher preset for the bort set (default roberta-base)")
  parser.add_argument("--quick", action="store_true", help="demo shapes, 3 rounds")
  parser.add_argument("--out", default=None, help="also write the JSON here")
  args = parser.parse_args(argv)
  # The same precision as the matmul ceiling, so the ratio compares like with like.
  jax.config.update("jax_default_matmul_precision", "highest")
  names = ["demo"] if args.quick else [s for s in args.shapes.split(",") if s]
  rounds = 3 if args.quick else args.rounds
  unknown = set(names) - set(SHAPES) - {"adapt"}
  if unknown:
    parser.error(f"unknown shape sets {sorted(unknown)}; known: {sorted(SHAPES)}")
  result = {"machine": common.machine_info()}
  common.log("matmul ceiling")
  result["matmul_ceiling"] = common.matmul_ceiling(repeats=5 if args.quick else 7)
  ceiling = result["matmul_ceiling"]["jax_gflops"]
  result["results"] = {}
  for name in names:
    if name == "adapt":
      result["results"]["adapt"] = measure_adapt(rounds)
      continue
    row = measure(name, SHAPES[name], rounds,
                  args.bort_teacher if name == "bort" else None)
    row["mfu_vs_initial_ceiling"] = row["model_gflops_per_second"] / ceiling
    result["results"][name] = row
    common.log(f"{name}: {row['tokens_per_second']:.0f} tokens/s, "
               f"{row['model_gflops_per_second']:.1f} GFLOP/s, MFU {row['mfu']:.1%}")
  # The ceiling again at the end: a shared machine's load drifts during the run.
  result["matmul_ceiling_after"] = common.matmul_ceiling(repeats=3)
  result["target_mfu"] = 0.6
  common.write_json(result, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
