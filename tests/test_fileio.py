"""Tests of bort_jax.runtime.fileio: atomic files and folders, the JSON-plain converter."""

import json
import math
import os
import stat

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


def test_atomic_dir_replaces_and_removes_stale_temporaries(tmp_path):
  out = tmp_path / "export"
  stale = tmp_path / ".export-abc.tmp"  # what a SIGKILL inside the block leaves behind
  stale.mkdir()
  with fileio.atomic_dir(out) as tmp:
    open(os.path.join(tmp, "one"), "w").close()
  with fileio.atomic_dir(out) as tmp:
    open(os.path.join(tmp, "two"), "w").close()
  assert os.listdir(out) == ["two"]
  assert sorted(os.listdir(tmp_path)) == ["export"]


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
