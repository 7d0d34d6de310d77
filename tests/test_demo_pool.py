"""The demo's worker pool (``pipelines/demo_workers.py``): jobs in one-core processes started by
a thread while this process works, cores and jobs added later, follow-ups, failures, and the
pinning of this process's own threads. Fake jobs (a sleep and a file) keep it to seconds."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time

import pytest

from bort_jax.pipelines import demo_workers

needs_two_cores = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="pins workers to cores: needs per-process affinity and two cores")


@dataclasses.dataclass
class FakeJob:
  folder: str
  seconds: float = 0.0
  status: int = 0
  size: float = 1.0
  kind: str = "finetune"
  model: str = "fake"
  task: str = "t"

  @property
  def label(self) -> str:
    return f"fake job {os.path.basename(self.folder)}"


def fake_work(job: FakeJob, cache_dir: str, core: int | None) -> None:
  """A worker's job: pin as ``_work`` does, record where and when it ran, sleep, exit."""
  if core is not None:
    os.sched_setaffinity(0, {core})
  began = time.time()
  time.sleep(job.seconds)
  os.makedirs(job.folder, exist_ok=True)
  with open(os.path.join(job.folder, "ran.json"), "w", encoding="utf-8") as f:
    json.dump({"core": core, "cores": sorted(os.sched_getaffinity(0)), "cache": cache_dir,
               "began": began, "ended": time.time()}, f)
  os._exit(job.status)  # pylint: disable=protected-access


def ran(job: FakeJob) -> dict:
  with open(os.path.join(job.folder, "ran.json"), encoding="utf-8") as f:
    return json.load(f)


@needs_two_cores
def test_jobs_run_beside_this_process_then_on_more_cores(tmp_path):
  """The demo's early start: jobs run on the one core given while the caller goes on; cores
  and jobs added later are used; ``wait`` delivers every job once, and follow-ups join."""
  first, second = sorted(os.sched_getaffinity(0))[:2]
  early = [FakeJob(str(tmp_path / f"early{k}"), seconds=0.5, size=k) for k in range(2)]
  pool = demo_workers.Pool("CACHE", lambda job: job.size, [first], target=fake_work)
  try:
    pool.add(early)
    time.sleep(0.2)  # the caller's own work; the pool goes on without it
    late = [FakeJob(str(tmp_path / f"late{k}"), seconds=0.5, size=10 + k) for k in range(2)]
    pool.add(late, [second])
    follow = FakeJob(str(tmp_path / "follow"))
    done = []
    pool.wait(done.append, lambda job: [follow] if job.folder == late[0].folder else [])
  finally:
    pool.close()
  names = [os.path.basename(job.folder) for job in done]
  assert sorted(names) == ["early0", "early1", "follow", "late0", "late1"]
  assert names.index("follow") > names.index("late0")
  records = {name: ran(FakeJob(str(tmp_path / name))) for name in names}
  assert all(r["cores"] == [r["core"]] and r["cache"] == "CACHE" for r in records.values())
  # The larger early job went first, alone on the first core; the second core served once
  # added, and the queue stayed largest first.
  assert records["early1"]["core"] == first
  assert records["early1"]["began"] < records["late1"]["began"] < records["early0"]["began"]
  assert records["late1"]["core"] == second
  assert records["late0"]["began"] < records["early0"]["began"]
  assert set(pool.times) == {job.folder for job in done}
  assert all(began <= ended for began, ended in pool.times.values())


def test_a_failed_job_stops_the_queue_and_raises(tmp_path, capsys):
  """A worker's non-zero exit: no other job starts, ``wait`` names the job, nothing hangs."""
  bad = FakeJob(str(tmp_path / "bad"), status=3, size=2)
  after = FakeJob(str(tmp_path / "after"), size=1)
  pool = demo_workers.Pool("CACHE", lambda job: job.size, [None], target=fake_work)
  try:
    pool.add([bad, after])
    with pytest.raises(RuntimeError, match="fake job bad failed in its worker.*exit status 3"):
      pool.wait(lambda job: None)
    pool.wait(lambda job: None)  # nothing left to deliver: returns
  finally:
    pool.close()
  assert "no further job starts" in capsys.readouterr().out
  assert not os.path.exists(after.folder)


def test_close_stops_a_running_worker(tmp_path):
  """The demo's ``finally`` (a crash or a preemption during extraction): a running job is
  stopped, and the pool's thread ends."""
  slow = FakeJob(str(tmp_path / "slow"), seconds=60)
  pool = demo_workers.Pool("CACHE", lambda job: job.size, [None], target=fake_work)
  pool.add([slow])
  deadline = time.time() + 30
  while not pool._running and time.time() < deadline:  # pylint: disable=protected-access
    time.sleep(0.05)
  began = time.time()
  pool.close()
  assert time.time() - began < 30 and not os.path.exists(slow.folder)
  assert not any(t.name == "demo workers" and t.is_alive() for t in threading.enumerate())


@needs_two_cores
def test_pinned_moves_every_thread_and_gives_the_cores_back():
  """``os.sched_setaffinity(0)`` moves the calling thread only; ``pinned`` moves all of them
  (XLA's compute threads included), threads started inside inherit the pin, and every
  thread gets its cores back after."""
  before = os.sched_getaffinity(0)
  one = {min(before)}
  stop = threading.Event()
  thread = threading.Thread(target=stop.wait, daemon=True)
  thread.start()
  try:
    with demo_workers.pinned(one):
      assert os.sched_getaffinity(thread.native_id) == one
      assert os.sched_getaffinity(0) == one
      seen = []
      inner = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
      inner.start()
      inner.join()
      assert seen == [one]
    for tid in os.listdir("/proc/self/task"):
      assert os.sched_getaffinity(int(tid)) == before
  finally:
    stop.set()
    thread.join()


@needs_two_cores
def test_split_cores_gives_the_pool_one_core_and_keeps_the_rest():
  """The early start's split: the workers' first core for the pool, every other core of this
  process for the demo; none with one worker or more workers than cores."""
  have = sorted(os.sched_getaffinity(0))
  assert demo_workers.split_cores(2) == ([have[0]], set(have[1:]))
  assert demo_workers.split_cores(1) is None
  assert demo_workers.split_cores(len(have) + 1) is None


class FakeState:
  """The demo's ``State`` as ``run_finetune`` uses it."""

  def __init__(self):
    self.data, self.saves = {"stages": {}}, 0

  def stage(self, name: str) -> dict:
    return self.data["stages"].setdefault(name, {})

  def save(self) -> None:
    self.saves += 1


@dataclasses.dataclass
class FakeFinetuneJob(FakeJob):
  """A fake job with what ``run_finetune`` reads of a ``demo_cache.Job``."""

  @property
  def config(self):
    import ml_collections  # pylint: disable=import-outside-toplevel
    return ml_collections.ConfigDict({"task": self.task, "population": {"seeds": 1},
                                      "train": {"total_steps": 1}})

  def done(self) -> bool:
    return os.path.exists(os.path.join(self.folder, "ran.json"))


@needs_two_cores
def test_the_stage_takes_over_a_pool_started_early(tmp_path, monkeypatch, capsys):
  """The demo's early start as the fine-tuning stage sees it: the job already given to the
  pool is not queued again, the stage's jobs and the second core join the same pool, a job
  finished before is skipped, and each is counted once."""
  monkeypatch.setattr(demo_workers, "job_size", lambda job: job.size)
  early = FakeFinetuneJob(str(tmp_path / "early"), seconds=1.0, size=5, task="a")
  late = [FakeFinetuneJob(str(tmp_path / f"late{k}"), seconds=0.2, size=k, task=f"b{k}")
          for k in range(2)]
  finished = FakeFinetuneJob(str(tmp_path / "finished"), task="c")
  os.makedirs(finished.folder)
  open(os.path.join(finished.folder, "ran.json"), "w", encoding="utf-8").write("{}")
  first = sorted(os.sched_getaffinity(0))[0]
  pool = demo_workers.Pool("CACHE", demo_workers.job_size, [first], target=fake_work)
  try:
    pool.add([early])
    state = FakeState()
    demo_workers.run_finetune([early, finished] + late, state, workers=2, pool=pool)
  finally:
    pool.close()
  out = capsys.readouterr().out
  assert "[finetune 1/4] fake on a: 1 seeds x 1 steps (started before this stage)" in out
  assert "[finetune 2/4] fake on c: 1 seeds x 1 steps: done, skipped" in out
  assert out.count(f"fake job early -> {early.folder}") == 1
  assert "[finetune] 4/4 jobs, 100% of the stage's work" in out
  assert all(job.done() for job in late + [early])
  assert len({ran(job)["core"] for job in late + [early]}) == 2  # the second core joined
  assert state.data["stages"]["finetune"]["seconds"] > 0


def test_the_stage_in_this_process_paces_its_eta(tmp_path, monkeypatch, capsys):
  """One worker, no pool: jobs run in turn here, and each counts toward the ETA's rate."""
  from bort_jax.finetune import population_mode  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(demo_workers, "job_size", lambda job: job.size)
  monkeypatch.setattr(population_mode, "run",
                      lambda config, folder: (time.sleep(0.1), os.makedirs(folder),
                                              open(os.path.join(folder, "ran.json"), "w").close()))
  jobs = [FakeFinetuneJob(str(tmp_path / f"j{k}"), size=1, task=f"t{k}") for k in range(2)]
  demo_workers.run_finetune(jobs, FakeState(), workers=1)
  out = capsys.readouterr().out
  assert "[finetune] 1/2 jobs, 50% of the stage's work" in out
  assert "eta after the first job" not in out and "eta 0:00" in out
