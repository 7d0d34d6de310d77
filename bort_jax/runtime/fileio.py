"""File writing: atomic files and folders, and the one JSON-plain converter.

A reader sees the old file (or folder) or the whole new one, never half of it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from typing import Any, Iterator

import numpy as np


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
  """Writes ``text`` to ``path`` through a temporary file in the same folder and a rename.

  The temporary name is unique (two writers never share it), the data is fsynced before the
  rename, and a failed write removes the temporary file and re-raises. The text is written
  verbatim (no newline translation). The parent folder must exist.

  Returns:
    ``path`` as a string.
  """
  path = os.fspath(path)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                             prefix=f".{os.path.basename(path)}-", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, normal_modes()[0])  # mkstemp makes the file owner-only; plain outputs
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def to_jsonable(value: Any, strict: bool = False) -> Any:
  """A strict-JSON form of ``value``: the one converter for reports, logs, records and metadata.

  Arrays and numpy/jax scalars become Python numbers or nested lists, ``bytes`` become UTF-8
  text, config dicts (anything with ``to_dict``) become dicts, dicts, lists and tuples are
  converted recursively, and non-finite floats become None (JSON has no NaN or infinity).
  Anything else is returned unchanged when JSON can hold it, else as ``str(value)``.

  Args:
    value: what to convert.
    strict: raise ``ValueError`` for a value JSON cannot hold instead of writing its ``str``.

  Returns:
    Plain dicts, lists, strings, numbers, booleans and None.
  """
  if isinstance(value, dict):
    return {str(k): to_jsonable(v, strict) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v, strict) for v in value]
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  if hasattr(value, "to_dict") and not isinstance(value, np.ndarray):
    return to_jsonable(value.to_dict(), strict)
  if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "__array__"):
    array = np.asarray(value)
    value = array.item() if array.ndim == 0 else array.tolist()
    return to_jsonable(value, strict) if isinstance(value, list) else _finite_or_none(value)
  if isinstance(value, float):
    return _finite_or_none(value)
  if value is None or isinstance(value, (str, int, bool)):
    return value
  if strict:
    raise ValueError(f"{value!r} ({type(value).__name__}) is not JSON-serialisable")
  return str(value)


def _finite_or_none(value: Any) -> Any:
  return None if isinstance(value, float) and not math.isfinite(value) else value


def normal_modes() -> tuple[int, int]:
  """``(file mode, folder mode)`` that ``open`` and ``mkdir`` would give: 0666 and 0777 less
  the process's umask (read by setting it and putting it straight back)."""
  mask = os.umask(0o022)
  os.umask(mask)
  return 0o666 & ~mask, 0o777 & ~mask


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
  """Builds a folder under a temporary name beside ``path`` and renames it into place.

  Use as ``with atomic_dir(out) as tmp: write files into tmp``. A reader (or a resumed run)
  sees either no folder, the old one, or the complete new one: a crash inside the block leaves
  only a hidden ``.NAME-*.tmp`` folder, which the next call for the same path removes. An
  existing folder at ``path`` is replaced only after the new one is complete. Files written
  inside get normal permissions, those of ``open`` and ``mkdir`` (:func:`normal_modes`: 0644
  and 0755 under the usual umask 022), not the owner-only 0700 of the temporary folder.

  Yields:
    The temporary folder to write into.
  """
  path = os.path.abspath(os.fspath(path))
  parent, name = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  for stale in os.listdir(parent):
    if stale.startswith(f".{name}-") and stale.endswith(".tmp"):
      shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}-", suffix=".tmp")
  try:
    yield tmp
    file_mode, dir_mode = normal_modes()
    for root, _, files in os.walk(tmp):
      os.chmod(root, dir_mode)
      for f in files:
        os.chmod(os.path.join(root, f), file_mode)
    if os.path.isdir(path):
      old = tempfile.mkdtemp(dir=parent, prefix=f".{name}-", suffix=".tmp")
      os.rmdir(old)
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def read_json(path: str) -> Any:
  """A JSON file's content, or None when it is missing or cut short."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def read_jsonl(path: str) -> list[dict]:
  """The complete lines of a JSON-lines file (a line cut short by a kill is skipped)."""
  out = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          out.append(json.loads(line))
        except ValueError:
          continue
  return out
