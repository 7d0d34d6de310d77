"""The demo's fine-tuning stage: its jobs in turn, or in worker processes, one CPU core each.

On a small CPU, one training process does not keep two cores busy: XLA splits a step's small
matrix products over both cores at about 1.7x the speed of one core (measured: a teacher step,
batch 8 x 64, 307 ms on two cores, 518 ms on one), so two processes with one core each train
about 1.2x more steps per second than one process with both, and they also overlap the
single-threaded compiles. ``config.finetune_workers`` > 1 runs the jobs that way: at most that
many at a time, the largest first, each in a fresh process (``spawn``: nothing of this
process's JAX is shared) that fine-tunes one job into its folder with
``finetune.population_mode.run``, exactly as :func:`pipelines.demo.run_finetune` does in
process. A job's result depends only on its config and seeds, not on the process it ran in.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import time
from typing import Callable, Sequence

from bort_jax.runtime import fileio


def _work(job, cache_dir: str, core: int | None) -> None:
  """One job in a worker: pin the core before JAX starts, register the demo's tasks (their
  sources read ``cache_dir``), fine-tune (or run Agora, for a job of that kind)."""
  if core is not None:
    os.sched_setaffinity(0, {core})
  from bort_jax.data import demo as demo_data  # pylint: disable=import-outside-toplevel
  from bort_jax.finetune import population_mode  # pylint: disable=import-outside-toplevel
  from bort_jax.pipelines import demo_agora  # pylint: disable=import-outside-toplevel
  demo_data.register_demo_tasks(cache_dir)
  if job.kind == "agora":
    demo_agora.run_job(job)
  else:
    population_mode.run(job.config, job.folder)


def cores(workers: int) -> list[int | None]:
  """A core for each worker when there are enough to give each its own; else no pinning."""
  have = sorted(os.sched_getaffinity(0))
  return list(have[:workers]) if len(have) >= workers else [None] * workers


def run_jobs(jobs: Sequence, workers: int, cache_dir: str, size: Callable,
             on_done: Callable[[object], None],
             follow_ups: Callable[[object], Sequence] | None = None) -> None:
  """Runs ``jobs`` (``demo_cache.Job``, unfinished ones) ``workers`` at a time, largest first.

  Args:
    jobs: the jobs to run.
    workers: how many run at once.
    cache_dir: the demo's cache (the demo tasks' data).
    size: a job's work (orders the queue: the largest first balances the workers).
    on_done: called in this process with each job as it finishes.
    follow_ups: called after ``on_done`` with each finished job; the jobs it returns (Agora's,
      once a task's two fine-tunings are done) join the queue, so they fill a worker that
      would otherwise wait for the stage's last job.

  Raises:
    RuntimeError: a worker failed; its own error is above, on stderr. The other running jobs
      are stopped (a rerun resumes them from their checkpoints).
  """
  context = multiprocessing.get_context("spawn")
  queue = sorted(jobs, key=size, reverse=True)
  free = cores(workers)
  running: dict = {}
  try:
    while queue or running:
      while queue and free:
        job, core = queue.pop(0), free.pop(0)
        print(f"[finetune] {job.label} -> {job.folder} (worker on "
              f"{'core ' + str(core) if core is not None else 'any core'})", flush=True)
        process = context.Process(target=_work, args=(job, cache_dir, core),
                                  name=f"{job.kind} {job.model} {job.task}")
        process.start()
        running[process.sentinel] = (process, job, core)
      ready = multiprocessing.connection.wait(list(running))
      for sentinel in ready:
        process, job, core = running.pop(sentinel)
        process.join()
        if process.exitcode != 0:
          raise RuntimeError(f"{job.label} failed in its worker (exit status "
                             f"{process.exitcode}; its error is above). Rerun the demo: "
                             "finished jobs are kept, the others resume.")
        free.append(core)
        on_done(job)
        if follow_ups is not None:
          queue = sorted(queue + list(follow_ups(job)), key=size, reverse=True)
  finally:
    for process, _, _ in running.values():
      if process.is_alive():
        process.terminate()
      process.join(timeout=30)


# What a job costs besides its matmuls, in FLOPs of the same pace (fitted to the six jobs of a
# fresh demo, 58ebe27, two one-core workers: 1:51 to 6:36 a job, each predicted within 23 s):
PARAM_FLOPS = 330      # per parameter and member-step: AdamW and the dense word-table gradient,
                       # memory-bound work that costs a small model more than its matmuls
JOB_FLOPS = 4e12       # per job: the worker's start, the data, the compiles (about 40 s)


def job_work(cfg, model_cfg, members: int | None = None) -> float:
  """A fine-tuning job's work in FLOPs: what orders the workers' queue and paces the ETA.

  Args:
    cfg: the job's fine-tuning config (steps, seeds, batch, sequence length, dev records).
    model_cfg: the model it fine-tunes (an export's ``ModelConfig``).
    members: how many members it trains (default: the config's seeds). An Agora job counts
      as one round after its round 0 (read from the student's run): seeds - 1 members.

  Returns:
    Member-steps x (3 x the forward FLOPs of a batch + ``PARAM_FLOPS`` x the parameters), plus
    a forward pass over the ``max_dev_examples`` dev records per seed (none counted when it is
    0, all), plus ``JOB_FLOPS``. Matmul FLOPs alone underrated the student's jobs (word_sense:
    12% of the stage's work, 18% of its time), and the order they gave the queue left one core
    idle for the stage's last 1.5 minutes.
  """
  from bort_jax.core import cost  # pylint: disable=import-outside-toplevel
  seeds, seq_len = int(members or cfg.population.seeds), int(cfg.seq_len)
  step = (3 * cost.forward_flops(model_cfg, int(cfg.batch_size), seq_len)["total"]
          + PARAM_FLOPS * cost.param_counts(model_cfg, "none")["total"])
  dev = seeds * int(cfg.max_dev_examples) * cost.forward_flops(model_cfg, 1, seq_len)["total"]
  return seeds * int(cfg.train.total_steps) * step + dev + JOB_FLOPS


def run_finetune(jobs: Sequence, state, workers: int = 1, cache_dir: str = "",
                 follow_ups: Callable[[object], Sequence] | None = None) -> None:
  """Every fine-tuning job (finished ones skipped), with the stage's ETA after each.

  ``workers`` > 1 runs the jobs in that many worker processes, one core each
  (:func:`run_jobs`), with the ``follow_ups`` of each finished job (the demo's Agora jobs);
  1 runs them in turn in this process, and the follow-ups are left to their own stage.
  ``state`` is the demo's ``pipelines.demo.State``: the stage's seconds are saved after each
  job. The stage's work is :func:`job_work`'s; the ETA is the remaining work at the rate
  measured so far.
  """
  from bort_jax.finetune import population_mode  # pylint: disable=import-outside-toplevel
  from bort_jax.interop import export  # pylint: disable=import-outside-toplevel

  def size(job):
    seeds = int(job.config.population.seeds)
    members = max(seeds - 1, 1) if job.kind == "agora" else seeds
    return job_work(job.config, export.load_config(job.config.init.path), members)

  sizes = {job.folder: size(job) for job in jobs}  # each export's config read once
  entry = state.stage("finetune")
  tally = {"done": 0.0, "run": 0.0, "jobs": 0, "count": len(jobs), "total": sum(sizes.values())}
  start, before = time.perf_counter(), float(entry.get("seconds") or 0.0)

  def added(job) -> list:
    new = list(follow_ups(job)) if follow_ups is not None else []
    for extra in new:
      sizes[extra.folder] = size(extra)
      tally["count"] += 1
      tally["total"] += sizes[extra.folder]
      print(f"[finetune] queued: {extra.label}", flush=True)
    return new

  def finished(job, ran: bool = True) -> None:
    tally["jobs"] += 1
    tally["done"] += sizes[job.folder]
    tally["run"] += sizes[job.folder] if ran else 0.0
    elapsed = time.perf_counter() - start
    entry["seconds"] = before + elapsed
    state.save()
    rate = tally["run"] / elapsed if tally["run"] and elapsed > 0 else 0.0
    eta = (f"eta {fileio.clock((tally['total'] - tally['done']) / rate)}" if rate
           else "eta after the first job")
    share = 100 * tally["done"] / tally["total"]
    print(f"[finetune] {tally['jobs']}/{tally['count']} jobs, {share:.0f}% "
          f"of the stage's work, elapsed {fileio.clock(elapsed)}, {eta}", flush=True)

  todo = []
  for k, job in enumerate(jobs):
    label = (f"[finetune {k + 1}/{len(jobs)}] {job.model} on {job.config.task}: "
             f"{job.config.population.seeds} seeds x {job.config.train.total_steps} steps")
    if job.done():
      print(f"{label}: done, skipped ({job.folder})", flush=True)
      finished(job, ran=False)
    else:
      print(label + (" (queued)" if workers > 1 else ""), flush=True)
      todo.append(job)
  if workers > 1 and len(todo) > 1:
    run_jobs(todo, workers, cache_dir, lambda job: sizes[job.folder], finished, added)
    return
  for job in todo:
    print(f"[finetune] {job.model} on {job.config.task} -> {job.folder}", flush=True)
    population_mode.run(job.config, job.folder)
    finished(job)
