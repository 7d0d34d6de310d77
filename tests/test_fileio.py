"""Tests of bort_jax.runtime.fileio: atomic files and folders, the JSON-plain converter."""

import json
import math
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from bort_jax.runtime import fileio


def test_atomic_write_text_replaces_whole_file(tmp_path):
  path = tmp_path / "a.txt"
  fileio.atomic_write_text(path, "old")
  fileio.atomic_write_text(path, "new\r\n")
  assert path.read_bytes() == b"new\r\n"
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
  assert os.listdir(tmp_path) == ["a.txt"]


def test_atomic_dir_appears_only_when_complete(tmp_path):
  out = tmp_path / "export"
  with fileio.atomic_dir(out) as tmp:
    with open(os.path.join(tmp, "w.bin"), "wb") as f:
      f.write(b"1")
    assert not out.exists()  # nothing visible until the block ends
  assert (out / "w.bin").read_bytes() == b"1"
  assert stat.S_IMODE(os.stat(out / "w.bin").st_mode) == 0o644
  assert stat.S_IMODE(os.stat(out).st_mode) == 0o755


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755),
                                                       (0o077, 0o600, 0o700),
                                                       (0o002, 0o664, 0o775)])
def test_atomic_outputs_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
  """Permissions are those a plain open()/mkdir() would give, not the temporary folder's 0700."""
  old = os.umask(umask)
  try:
    with fileio.atomic_dir(tmp_path / "export") as tmp:
      os.makedirs(os.path.join(tmp, "sub"))
      open(os.path.join(tmp, "sub", "f"), "w").close()
    fileio.atomic_write_text(tmp_path / "t.txt", "x")
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(tmp_path / "export").st_mode) == dir_mode
  assert stat.S_IMODE(os.stat(tmp_path / "export" / "sub").st_mode) == dir_mode
  assert stat.S_IMODE(os.stat(tmp_path / "export" / "sub" / "f").st_mode) == file_mode
  assert stat.S_IMODE(os.stat(tmp_path / "t.txt").st_mode) == file_mode


def test_atomic_dir_crash_keeps_the_old_folder_and_cleans_up(tmp_path):
  out = tmp_path / "export"
  with fileio.atomic_dir(out) as tmp:
    open(os.path.join(tmp, "old"), "w").close()
  with pytest.raises(RuntimeError):
    with fileio.atomic_dir(out) as tmp:
      open(os.path.join(tmp, "new"), "w").close()
      raise RuntimeError("killed midway")
  assert sorted(os.listdir(out)) == ["old"]
  assert os.listdir(tmp_path) == ["export"]


def _dead_pid() -> int:
  """The pid of a process that has exited (and been reaped)."""
  child = subprocess.Popen([sys.executable, "-c", ""])
  child.wait()
  return child.pid


def test_atomic_dir_replaces_and_removes_stale_temporaries(tmp_path):
  out = tmp_path / "export"
  host = fileio._host()  # what a SIGKILL inside the block leaves behind: a dead owner
  stale = tmp_path / f".export-{host}-{_dead_pid()}-abc.tmp"
  stale.mkdir()
  (stale / "half").write_text("x")
  with fileio.atomic_dir(out) as tmp:
    open(os.path.join(tmp, "one"), "w").close()
  with fileio.atomic_dir(out) as tmp:
    open(os.path.join(tmp, "two"), "w").close()
  assert os.listdir(out) == ["two"]
  assert sorted(os.listdir(tmp_path)) == ["export"]


def test_atomic_dir_keeps_temporaries_not_provably_abandoned(tmp_path):
  """Another live writer's, another host's, another target's and an unknown owner's stay."""
  host = fileio._host()
  assert host != "elsewhere"
  kept = [f".export-{host}-{os.getppid()}-live.tmp",  # a live process on this host
          f".export-elsewhere-{_dead_pid()}-far.tmp",  # a pid on another host says nothing
          f".export-b-{host}-{_dead_pid()}-sib.tmp",  # the folder "export-b"'s, not ours
          ".export-abc.tmp"]  # no owner in the name
  for name in kept:
    (tmp_path / name).mkdir()
  with fileio.atomic_dir(tmp_path / "export") as tmp:
    open(os.path.join(tmp, "f"), "w").close()
  assert sorted(os.listdir(tmp_path)) == sorted(kept + ["export"])


# One writer of tests below: writes PARTS files tagged with its name into an atomic_dir,
# handing over to the other writer through flag files so that the two really overlap: "b"
# enters only once "a" is inside (its temporary folder exists), "a" finishes writing only once
# "b" is inside, and both leave the block (rename into place) together.
WRITER = """
import os, sys, time
from bort_jax.runtime import fileio
me, other, target, flags, parts = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], 40

def flag(name):
  open(os.path.join(flags, f"{me}.{name}"), "w").close()

def wait(name):
  deadline = time.monotonic() + 30
  while not os.path.exists(os.path.join(flags, f"{other}.{name}")):
    if os.path.exists(os.path.join(flags, f"{other}.exit")) or time.monotonic() > deadline:
      sys.exit(f"{me}: {other} never reached {name}")
    time.sleep(0.005)

try:
  if me == "b":
    wait("inside")
  with fileio.atomic_dir(target) as tmp:
    for k in range(parts // 2):
      open(os.path.join(tmp, f"part{k}"), "w").write(me)
    flag("inside")
    wait("inside")
    for k in range(parts // 2, parts):
      open(os.path.join(tmp, f"part{k}"), "w").write(me)
    flag("ready")
    wait("ready")
finally:
  flag("exit")
"""


def _two_writers(target, flags):
  """Runs writers "a" and "b" on ``target`` at once; their exit statuses and stderr."""
  flags.mkdir()
  procs = [subprocess.Popen([sys.executable, "-c", WRITER, me, other, str(target), str(flags)],
                            stderr=subprocess.PIPE, text=True)
           for me, other in (("a", "b"), ("b", "a"))]
  return [(p.wait(timeout=120), p.stderr.read()) for p in procs]


def test_two_concurrent_writers_both_finish_and_leave_one_whole_folder(tmp_path):
  cache = tmp_path / "cache"
  target = cache / "export"
  for round_ in range(3):  # the first writes a new folder, the next ones replace it
    for code, err in _two_writers(target, tmp_path / f"flags{round_}"):
      assert code == 0, err
    files = sorted(os.listdir(target))
    assert files == sorted(f"part{k}" for k in range(40))
    writers = {(target / f).read_text() for f in files}
    assert writers in ({"a"}, {"b"}), writers  # one writer's whole result, not a mix
    assert os.listdir(cache) == ["export"]  # neither left a temporary folder behind


def test_to_jsonable_is_strict_json():
  class Config:
    def to_dict(self):
      return {"lr": np.float32(0.5)}

  value = {"a": np.int64(3), "b": np.arange(3), "c": np.float32(math.nan), 4: (1.5, math.inf),
           "d": b"text", "e": Config(), "f": np.asarray(2.0), "g": None, "h": object}
  out = fileio.to_jsonable(value)
  text = json.dumps(out, allow_nan=False)  # raises on NaN or infinity
  assert json.loads(text) == {"a": 3, "b": [0, 1, 2], "c": None, "4": [1.5, None], "d": "text",
                              "e": {"lr": 0.5}, "f": 2.0, "g": None, "h": str(object)}


def test_read_jsonl_ignores_a_torn_tail_repairs_it_and_tells_damage_from_a_kill(tmp_path):
  path = str(tmp_path / "log.jsonl")
  assert fileio.read_jsonl(path) == []  # missing
  with open(path, "w") as f:
    f.write('{"a": 1}\n{"a": 2}\n{"a": 3, "b"')  # a kill inside the third line
  before = open(path).read()
  assert fileio.read_jsonl(path) == [{"a": 1}, {"a": 2}]
  assert open(path).read() == before  # read only: untouched
  with pytest.warns(UserWarning, match="torn last line"):
    assert fileio.read_jsonl(path, repair=True) == [{"a": 1}, {"a": 2}]
  assert open(path).read() == '{"a": 1}\n{"a": 2}\n'  # cut back, the next line starts clean
  # A whole last line that does not parse (zero-filled by a crash) is a torn tail too.
  with open(path, "ab") as f:
    f.write(b"\x00\x00\x00\n")
  with pytest.warns(UserWarning):
    assert fileio.read_jsonl(path, repair=True, strict=True) == [{"a": 1}, {"a": 2}]
  assert open(path).read() == '{"a": 1}\n{"a": 2}\n'
  # A damaged line before the last is not a kill: skipped by a reader, refused when strict.
  with open(path, "w") as f:
    f.write('{"a": 1}\n{"a": 2, "b\n{"a": 3}\n')
  assert fileio.read_jsonl(path, repair=True) == [{"a": 1}, {"a": 3}]
  with pytest.raises(ValueError, match="line 2 is corrupt"):
    fileio.read_jsonl(path, strict=True)
