"""The demo's fine-tuning jobs in worker processes, each pinned to a CPU core of its own.

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
from typing import Callable, Sequence


def _work(config, folder: str, cache_dir: str, core: int | None) -> None:
  """One job in a worker: pin the core before JAX starts, register the demo's tasks (their
  sources read ``cache_dir``), fine-tune."""
  if core is not None:
    os.sched_setaffinity(0, {core})
  from bort_jax.data import demo as demo_data  # pylint: disable=import-outside-toplevel
  from bort_jax.finetune import population_mode  # pylint: disable=import-outside-toplevel
  demo_data.register_demo_tasks(cache_dir)
  population_mode.run(config, folder)


def cores(workers: int) -> list[int | None]:
  """A core for each worker when there are enough to give each its own; else no pinning."""
  have = sorted(os.sched_getaffinity(0))
  return list(have[:workers]) if len(have) >= workers else [None] * workers


def run_jobs(jobs: Sequence, workers: int, cache_dir: str, size: Callable,
             on_done: Callable[[object], None]) -> None:
  """Runs ``jobs`` (``demo_cache.Job``, unfinished ones) ``workers`` at a time, largest first.

  Args:
    jobs: the jobs to run.
    workers: how many run at once.
    cache_dir: the demo's cache (the demo tasks' data).
    size: a job's work (orders the queue: the largest first balances the workers).
    on_done: called in this process with each job as it finishes.

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
        print(f"[finetune] {job.model} on {job.config.task} -> {job.folder} (worker on "
              f"{'core ' + str(core) if core is not None else 'any core'})", flush=True)
        process = context.Process(target=_work, args=(job.config, job.folder, cache_dir, core),
                                  name=f"finetune {job.model} {job.task}")
        process.start()
        running[process.sentinel] = (process, job, core)
      ready = multiprocessing.connection.wait(list(running))
      for sentinel in ready:
        process, job, core = running.pop(sentinel)
        process.join()
        if process.exitcode != 0:
          raise RuntimeError(f"fine-tuning the {job.model} on {job.config.task} failed in its "
                             f"worker (exit status {process.exitcode}; its error is above). "
                             "Rerun the demo: finished jobs are kept, the others resume.")
        free.append(core)
        on_done(job)
  finally:
    for process, _, _ in running.values():
      if process.is_alive():
        process.terminate()
      process.join(timeout=30)
