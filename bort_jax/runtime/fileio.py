"""Atomic file writes: a reader sees the old file or the whole new one, never half of it."""

from __future__ import annotations

import os
import tempfile


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
    os.chmod(tmp, 0o644)  # mkstemp makes the file owner-only; these are plain outputs
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path
