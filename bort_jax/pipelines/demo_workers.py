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

The workers are a :class:`Pool`, fed by a thread of the demo's process, so they can start
before the stage: the teacher's jobs need only teacher-adapt, and :func:`start_early` runs them
in one worker while the demo extracts and distils on the other cores (:func:`split_cores`,
:func:`pinned`). The fine-tuning stage adds the student's jobs and the other cores to the same
pool.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import threading
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
  if not hasattr(os, "sched_getaffinity"):
    return [None] * workers
  have = sorted(os.sched_getaffinity(0))
  return list(have[:workers]) if len(have) >= workers else [None] * workers


def _pin_threads(allowed: set[int]) -> None:
  """Every thread of this process on ``allowed`` (``os.sched_setaffinity(0)`` moves only the
  calling thread; XLA's compute threads were started before and keep their cores)."""
  for tid in os.listdir("/proc/self/task"):
    try:
      os.sched_setaffinity(int(tid), allowed)
    except OSError:  # a thread that ended since the listing
      pass


@contextlib.contextmanager
def pinned(allowed: set[int]):
  """Runs the body with every thread of this process on ``allowed``, and gives them their cores
  back after. Nothing is pinned where the system has no per-thread affinity or ``allowed`` is
  empty.

  The cores stay the same for the whole body: the cores a process may use change how XLA
  splits some of its work, so a change in the middle would make the numbers depend on when it
  happened. (Measured: distillation pinned to one core of two gives a student that differs
  from the unpinned one in the last bits, its losses equal to four decimals; pinned runs give
  the same bits every time.)
  """
  if not allowed or not os.path.isdir("/proc/self/task"):
    yield
    return
  before = os.sched_getaffinity(0)
  _pin_threads(allowed)
  try:
    yield
  finally:
    _pin_threads(before)


class Pool:
  """Jobs in worker processes, one core each, the largest first.

  A thread of this process starts and reaps the workers, so they run while this process does
  other work (the demo's extraction while the teacher's jobs run). What to do with a finished
  job runs in the caller's thread, in :meth:`wait`. Jobs and cores can be added at any time.
  After a job fails, no new job starts.
  """

  def __init__(self, cache_dir: str, size: Callable, start_cores: Sequence[int | None],
               target: Callable = _work):
    """``size``: a job's work (orders the queue). ``target(job, cache_dir, core)`` runs a job
    in its worker (:func:`_work`; tests give their own)."""
    self._cache_dir, self._size, self._target = cache_dir, size, target
    self._cond = threading.Condition()
    self._queue: list = []
    self._sizes: dict[str, float] = {}  # folder: size(job), computed once per job
    self._free: list = list(start_cores)
    self.cores: list = list(start_cores)  # every core given to the pool
    self._running: dict = {}
    self._finished: collections.deque = collections.deque()
    self._failed = self._closed = False
    self.submitted: set[str] = set()   # folders of the jobs given to the pool
    self.times: dict[str, tuple[float, float]] = {}  # folder: (start, end), perf_counter
    self._thread = threading.Thread(target=self._loop, name="demo workers", daemon=True)
    self._thread.start()

  def add(self, jobs: Sequence = (), more_cores: Sequence[int | None] = ()) -> None:
    """Queues ``jobs`` and gives the workers ``more_cores``."""
    with self._cond:
      self._sizes.update((job.folder, self._size(job)) for job in jobs)
      self._queue = sorted(self._queue + list(jobs), key=lambda job: self._sizes[job.folder],
                           reverse=True)
      self.submitted.update(job.folder for job in jobs)
      self._free.extend(more_cores)
      self.cores.extend(more_cores)
      self._cond.notify_all()

  def _start(self, context) -> None:
    """Starts queued jobs on free cores (the lock held)."""
    while self._queue and self._free and not self._failed:
      job, core = self._queue.pop(0), self._free.pop(0)
      print(f"[finetune] {job.label} -> {job.folder} (worker on "
            f"{'core ' + str(core) if core is not None else 'any core'})", flush=True)
      process = context.Process(target=self._target, args=(job, self._cache_dir, core),
                                name=f"{job.kind} {job.model} {job.task}")
      process.start()
      self._running[process.sentinel] = (process, job, core, time.perf_counter())

  def _loop(self) -> None:
    context = multiprocessing.get_context("spawn")
    while True:
      with self._cond:
        if self._closed:
          return
        self._start(context)
        sentinels = list(self._running)
        if not sentinels:
          self._cond.wait(0.5)
          continue
      ready = multiprocessing.connection.wait(sentinels, timeout=0.5)
      with self._cond:
        for sentinel in ready:
          if sentinel not in self._running:  # closed meanwhile
            continue
          process, job, core, began = self._running.pop(sentinel)
          process.join()
          self.times[job.folder] = (began, time.perf_counter())
          self._free.append(core)
          if process.exitcode != 0 and not self._failed:
            self._failed = True
            print(f"[finetune] {job.label} failed in its worker (exit status "
                  f"{process.exitcode}); no further job starts", flush=True)
          self._finished.append((job, process.exitcode))
        self._cond.notify_all()

  def wait(self, on_done: Callable[[object], None],
           follow_ups: Callable[[object], Sequence] | None = None) -> None:
    """Until every job given to the pool finished: ``on_done(job)`` for each as it finishes,
    then the jobs ``follow_ups(job)`` returns join the queue.

    Raises:
      RuntimeError: a worker failed; its own error is above, on stderr. :meth:`close` stops
        the others (a rerun resumes them).
    """
    while True:
      with self._cond:
        while not self._finished and (self._running or (self._queue and not self._failed)):
          if self._queue and not self._free and not self._running:
            raise RuntimeError("demo workers: jobs are queued but the pool has no core")
          self._cond.wait(1.0)
        if not self._finished:
          return
        job, status = self._finished.popleft()
      if status != 0:
        raise RuntimeError(f"{job.label} failed in its worker (exit status {status}; its "
                           "error is above). Rerun the demo: finished jobs are kept, the "
                           "others resume.")
      on_done(job)
      if follow_ups is not None:
        self.add(follow_ups(job))

  def close(self) -> None:
    """Stops the running workers (a rerun resumes their jobs) and the pool's thread."""
    with self._cond:
      self._closed = True
      running = [entry[0] for entry in self._running.values()]
      self._running.clear()
      self._cond.notify_all()
    for process in running:
      if process.is_alive():
        process.terminate()
      process.join(timeout=30)
    self._thread.join(timeout=30)


def run_jobs(jobs: Sequence, workers: int, cache_dir: str, size: Callable,
             on_done: Callable[[object], None],
             follow_ups: Callable[[object], Sequence] | None = None) -> None:
  """Runs ``jobs`` (``demo_cache.Job``, unfinished ones) ``workers`` at a time, largest first
  (a :class:`Pool` on :func:`cores`).

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
  pool = Pool(cache_dir, size, cores(workers))
  try:
    pool.add(jobs)
    pool.wait(on_done, follow_ups)
  finally:
    pool.close()


def split_cores(workers: int) -> tuple[list[int], set[int]] | None:
  """For the demo's early start of the teacher's fine-tuning (``config.finetune_teacher_early``):
  ``([the workers' core], the cores the demo's process keeps)``, or ``None`` with fewer than two
  workers or cores to pin them to.

  The teacher's jobs need only teacher-adapt, so they can run in a worker on one core while
  the demo extracts and distils on the others (:func:`pinned`). One-core processes do more
  work per core than one process spread over two, and the extraction's single-threaded
  compiles leave a core idle. The demo pins itself whenever the split exists, whether or not
  the teacher's jobs still run (a rerun with them done): the pinning changes the last bits of
  the distilled student, and a resumed demo must compute what an uninterrupted one does.
  """
  have = cores(workers)
  if workers < 2 or None in have:
    return None
  return [have[0]], set(os.sched_getaffinity(0)) - {have[0]}


def start_early(jobs: Sequence, pool_cores: list[int], cache_dir: str) -> Pool | None:
  """A pool on ``pool_cores`` running the unfinished ``jobs`` (the teacher's fine-tunings;
  :func:`split_cores`), or ``None`` when every job is done. The fine-tuning stage adds the
  student's jobs and the other cores to it (:func:`run_finetune`)."""
  todo = [job for job in jobs if not job.done()]
  if not todo:
    return None
  print(f"[finetune] the teacher's {len(todo)} fine-tuning job(s) start now on core "
        f"{', '.join(map(str, pool_cores))}, beside extraction and distillation", flush=True)
  pool = Pool(cache_dir, job_size, pool_cores)
  pool.add(todo)
  return pool


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


def job_size(job) -> float:
  """A demo job's :func:`job_work` (its model's config read from the export it starts from).
  An Agora job counts as one round after its round 0 (read from the student's run): seeds - 1
  members."""
  from bort_jax.interop import export  # pylint: disable=import-outside-toplevel
  seeds = int(job.config.population.seeds)
  members = max(seeds - 1, 1) if job.kind == "agora" else seeds
  return job_work(job.config, export.load_config(job.config.init.path), members)


def run_finetune(jobs: Sequence, state, workers: int = 1, cache_dir: str = "",
                 follow_ups: Callable[[object], Sequence] | None = None,
                 pool: Pool | None = None) -> None:
  """Every fine-tuning job (finished ones skipped), with the stage's ETA after each.

  ``workers`` > 1 runs the jobs in that many worker processes, one core each (a :class:`Pool`:
  ``pool``, already running some of the jobs, when the demo started the teacher's early; else
  one of its own), with the ``follow_ups`` of each finished job (the demo's Agora jobs); 1
  runs them in turn in this process, and the follow-ups are left to their own stage.
  ``state`` is the demo's ``pipelines.demo.State``: the stage's seconds are saved after each
  job. The stage's work is :func:`job_work`'s; the ETA is the remaining work at the rate
  measured so far (a job that started before the stage counts with its share run in it).
  """
  from bort_jax.finetune import population_mode  # pylint: disable=import-outside-toplevel

  given = pool.submitted if pool is not None else set()
  sizes = {job.folder: job_size(job) for job in jobs}  # each export's config read once
  entry = state.stage("finetune")
  tally = {"done": 0.0, "run": 0.0, "jobs": 0, "count": len(jobs), "total": sum(sizes.values())}
  start, before = time.perf_counter(), float(entry.get("seconds") or 0.0)

  def added(job) -> list:
    new = list(follow_ups(job)) if follow_ups is not None else []
    for extra in new:
      sizes[extra.folder] = job_size(extra)
      tally["count"] += 1
      tally["total"] += sizes[extra.folder]
      print(f"[finetune] queued: {extra.label}", flush=True)
    return new

  def in_stage(job) -> float:
    """The share of a job's run that fell in this stage (part of one started before it)."""
    began, ended = (pool.times if pool is not None else {}).get(job.folder, (start, start))
    return 1.0 if began >= start else max(ended - start, 0.0) / max(ended - began, 1e-9)

  def finished(job, ran: bool = True) -> None:
    tally["jobs"] += 1
    tally["done"] += sizes[job.folder]
    tally["run"] += sizes[job.folder] * in_stage(job) if ran else 0.0
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
    if job.folder in given:
      print(f"{label} (started before this stage)", flush=True)
    elif job.done():
      print(f"{label}: done, skipped ({job.folder})", flush=True)
      finished(job, ran=False)
    else:
      print(label + (" (queued)" if workers > 1 else ""), flush=True)
      todo.append(job)
  if pool is not None:
    pool.add(todo, [core for core in cores(workers) if core not in pool.cores])
    pool.wait(finished, added)
  elif workers > 1 and len(todo) > 1:
    run_jobs(todo, workers, cache_dir, lambda job: sizes[job.folder], finished, added)
  else:
    for job in todo:
      print(f"[finetune] {job.model} on {job.config.task} -> {job.folder}", flush=True)
      population_mode.run(job.config, job.folder)
      finished(job)
