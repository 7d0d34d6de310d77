"""Save-time cost of checkpoint integrity data, as a share of the Bort distillation step.

Built from the distillation benchmark (``benchmarks/train.py``): its ``bort`` shape set, the
Bort student D4-A8-H1024-I768 (76.2M parameters) with its Adam state (the train state a
checkpoint holds, about 229M float32 values), distilled from RoBERTa-base at batch 8 x 128.
Timed side by side, round-robin in the same rounds (``common.interleaved_timing``):

* ``train_step``: one call of the compiled distillation step (as ``benchmarks/train.py``);
* ``integrity_checksums``: ``integrity.shard_records(state)``, all that a save adds for its
  integrity data (CRC-32 of every owned shard's bytes on a thread pool, then a small JSON
  record); a restore runs the same pass to verify;
* ``save``: a whole synchronous ``CheckpointManager.save`` (orbax writes the state to local
  disk, checksums included), for scale.

Reported: ``checksum_share_of_step`` = checksum median / step median, the share of one save
(``checksum_share_of_save``), the first call's time, and the per-step cost when saving every
``--every`` steps.

Measured on the shared 2-core CPU of the development machine (load average ~11, so every time
is several times its idle value; the ratios are side by side): CRC-32 of the 915 MB state
(224 shards) 1.05 s = 7.3% of one 14.4 s Bort step, 18% of a whole 5.5 s save; 0.007% of the
step time when saving every 1,000 steps. The device-side positional hash tried first (an XLA
integer reduction) took 4.2 s = 23% of a step: integer reductions are slow on XLA's CPU backend.

    python benchmarks/checkpoint.py --out benchmarks/results/checkpoint.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py; also puts the repo root on sys.path)

import jax  # noqa: E402
import ml_collections  # noqa: E402

from bort_jax.core import arch as arch_lib  # noqa: E402
from bort_jax.core import model, optim  # noqa: E402
from bort_jax.pipelines import distill  # noqa: E402
from bort_jax.runtime import checkpoint, integrity, train  # noqa: E402

bench_train = common.load_script("benchmarks/train.py")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=5, help="timed rounds")
  parser.add_argument("--save-rounds", type=int, default=2,
                      help="rounds that also time a whole save (each writes ~0.9 GB)")
  parser.add_argument("--every", type=int, default=1000,
                      help="checkpoint interval for the amortised per-step share")
  parser.add_argument("--out", default=None, help="also write the JSON here")
  args = parser.parse_args(argv)
  jax.config.update("jax_default_matmul_precision", "highest")  # as benchmarks/train.py
  shape = bench_train.SHAPES["bort"]
  teacher = arch_lib.get_model_config(shape["teacher"])
  student = distill.student_config(ml_collections.ConfigDict(
      {"arch": shape["student"], "family": "teacher", "overrides": {}}), teacher)
  mlm = model.HeadSpec("mlm")
  tx = optim.make_optimizer(bench_train.OPTIM)
  common.log(f"building {student.arch} state and {teacher.arch} teacher")
  state = jax.jit(lambda r: train.create_state(model.init(r, student, mlm), tx))(
      jax.random.key(0))
  frozen = {"teacher": jax.jit(lambda r: model.init(r, teacher, mlm))(jax.random.key(1))}
  batch = bench_train.random_batch(student, shape["batch"], shape["seq_len"],
                                   shape["predictions"])
  rng = jax.random.key(2)
  step = train.compile_step(distill.make_loss_fn(student, teacher, bench_train.LOSS), tx,
                            donate=False)
  n_values = sum(x.size for x in jax.tree.leaves(state))
  n_bytes = sum(x.nbytes for x in jax.tree.leaves(state))

  start = time.perf_counter()
  record = integrity.shard_records(state)
  first_call = time.perf_counter() - start

  def one_step():
    jax.block_until_ready(step(state, batch, rng, frozen)[1]["loss"])

  fns = {"train_step": one_step, "integrity_checksums": lambda: integrity.shard_records(state)}
  common.log(f"timing step and checksums, {args.rounds} rounds")
  timings = common.interleaved_timing(fns, rounds=args.rounds, warmup=1, log=common.log)

  folder = tempfile.mkdtemp(prefix="bort_jax_ckpt_bench_")
  saves = {}
  try:
    mgr = checkpoint.CheckpointManager(folder, max_to_keep=1, async_save=False)
    counter = iter(range(1, 10**6))
    save_fns = {"save": lambda: mgr.save(next(counter), state),
                "integrity_checksums": lambda: integrity.shard_records(state),
                "train_step": one_step}
    if args.save_rounds:
      common.log(f"timing whole saves, {args.save_rounds} rounds")
      saves = common.interleaved_timing(save_fns, rounds=args.save_rounds, warmup=0,
                                        log=common.log)
    mgr.close()
  finally:
    shutil.rmtree(folder, ignore_errors=True)

  step_ms = timings["train_step"]["median_ms"]
  checksum_ms = timings["integrity_checksums"]["median_ms"]
  result = {
      "machine": common.machine_info(),
      "student": str(student.arch), "teacher": f"{shape['teacher']} ({teacher.arch})",
      "batch": shape["batch"], "seq_len": shape["seq_len"],
      "state_values": int(n_values), "state_bytes": int(n_bytes),
      "state_leaves": len(jax.tree.leaves(state)), "shard_records": len(record["shards"]),
      "checksum_algorithm": integrity.ALGORITHM,
      "timings": timings,
      "first_checksum_call_ms": first_call * 1e3,
      "checksum_gbytes_per_second": n_bytes / (checksum_ms / 1e3) / 1e9,
      "checksum_share_of_step": checksum_ms / step_ms,
      "checksum_share_per_step_when_saving_every": {
          "every": args.every, "share": checksum_ms / (args.every * step_ms)},
      "save_timings": saves,
  }
  if saves:
    result["checksum_share_of_save"] = (saves["integrity_checksums"]["median_ms"]
                                        / saves["save"]["median_ms"])
  common.log(f"checksums {checksum_ms:.0f} ms = {result['checksum_share_of_step']:.1%} of a "
             f"{step_ms:.0f} ms step")
  common.write_json(result, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
