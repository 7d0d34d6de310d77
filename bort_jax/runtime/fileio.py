"""File I/O: atomic files and folders, the one JSON-plain converter, readers and file hashes.

A reader sees the old file (or folder) or the whole new one, never half of it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
import warnings
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
  def write(f):
    f.write(text.encode("utf-8"))
  return _atomic_write(os.fspath(path), write, ".tmp")


def save_figure(fig: Any, path: str | os.PathLike) -> str:
  """Saves a matplotlib figure as a PNG at ``path`` through a unique temporary file and a
  rename (parent folders made): a reader sees the old plot or the new one, never half of one.

  Returns:
    ``path`` as a string.
  """
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  return _atomic_write(path, lambda f: fig.savefig(f, format="png"), ".tmp.png")


def _atomic_write(path: str, write: Any, suffix: str) -> str:
  """``write(binary file)`` into a unique temporary file beside ``path``, fsynced, given the
  modes of a plain write and renamed into place; removed again if anything fails."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                             prefix=f".{os.path.basename(path)}-", suffix=suffix)
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
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
  sees either no folder, the old one, or a complete new one. Files written inside get normal
  permissions, those of ``open`` and ``mkdir`` (:func:`normal_modes`: 0644 and 0755 under the
  usual umask 022), not the owner-only 0700 of the temporary folder.

  Several writers may share the parent (two runs sharing a cache): each temporary folder is
  ``.NAME-HOST-PID-RANDOM.tmp``, named after its writer, and a call removes only those whose
  writer is provably gone (same host, process no longer alive), e.g. what a SIGKILL inside the
  block left; another writer's work in progress is never touched. An existing folder at
  ``path`` is replaced only after the new one is complete. When two writers finish the same
  ``path`` together, each rename installs one whole folder and the last one stays: the result
  is always one writer's complete folder, never a mix.

  Yields:
    The temporary folder to write into.
  """
  path = os.path.abspath(os.fspath(path))
  parent, name = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  _remove_abandoned(parent, name)
  tmp = _make_temp(parent, name)
  try:
    yield tmp
    _normal_permissions(tmp)
    _install(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
  """Holds an exclusive advisory lock on the file ``path`` (created if missing) for the block.

  For work that two processes must not do at once on a shared cache, such as building one
  dataset: the second waits for the first and then finds its result. The lock is the
  operating system's (``fcntl.flock``), so it is released when its holder exits, however it
  exits. Where ``fcntl`` is missing (Windows), the block runs unlocked.
  """
  try:
    import fcntl  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover - not POSIX
    yield
    return
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a", encoding="utf-8") as handle:
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _host() -> str:
  """This machine's name, reduced to characters safe in a file name."""
  return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"


def _make_temp(parent: str, name: str) -> str:
  """A new empty folder ``.NAME-HOST-PID-RANDOM.tmp`` in ``parent``, owned by this process."""
  return tempfile.mkdtemp(dir=parent, prefix=f".{name}-{_host()}-{os.getpid()}-",
                          suffix=".tmp")


def _temp_owner(entry: str, name: str) -> tuple[str, int] | None:
  """``(host, pid)`` of a temporary folder of ``name``, or None when ``entry`` is not one.

  The random part has no ``-`` (``tempfile`` draws it from ``[a-z0-9_]``), so the last two
  dashes delimit the pid whatever the host name holds.
  """
  prefix, suffix = f".{name}-", ".tmp"
  if not (entry.startswith(prefix) and entry.endswith(suffix)):
    return None
  parts = entry[len(prefix):-len(suffix)].rsplit("-", 2)
  if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) <= 0:
    return None
  return parts[0], int(parts[1])


def _alive(pid: int) -> bool:
  """Whether process ``pid`` exists on this machine (another user's counts)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _remove_abandoned(parent: str, name: str) -> None:
  """Removes ``name``'s temporary folders whose writer died on this host; keeps the rest.

  A folder of another host, of a live process (this one included: another thread may be
  writing) or of an unknown owner (an older naming) is left alone: it is not provably
  abandoned.
  """
  host = _host()
  for entry in os.listdir(parent):
    owner = _temp_owner(entry, name)
    if owner and owner[0] == host and owner[1] != os.getpid() and not _alive(owner[1]):
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _normal_permissions(folder: str) -> None:
  """Gives ``folder`` and everything in it the modes of a plain ``mkdir`` and ``open``."""
  file_mode, dir_mode = normal_modes()
  for root, _, files in os.walk(folder):
    os.chmod(root, dir_mode)
    for f in files:
      os.chmod(os.path.join(root, f), file_mode)


def _install(tmp: str, path: str, tries: int = 100) -> None:
  """Renames the finished folder ``tmp`` to ``path``, moving a folder already there aside.

  The rename succeeds only where ``path`` is absent (or an empty folder). When it is taken,
  the folder there is renamed to a temporary name of ours and removed, and the rename tried
  again; another writer that installs or moves ``path`` in between only costs a retry. Each
  rename moves a whole folder, so ``path`` always holds one writer's complete result.
  """
  parent, name = os.path.split(path)
  for _ in range(tries):
    try:
      os.rename(tmp, path)
      return
    except OSError as e:
      if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
        raise
    old = _make_temp(parent, name)
    try:
      os.rename(path, old)  # onto our own empty folder: allowed, and the name stays ours
    except FileNotFoundError:
      os.rmdir(old)  # another writer moved it first: try again
      continue
    shutil.rmtree(old, ignore_errors=True)
  raise OSError(f"could not install {path}: other writers kept replacing it ({tries} tries)")


def clock(seconds: float, hours: bool = False) -> str:
  """A duration as ``M:SS`` (``H:MM:SS`` with ``hours``) for progress lines; ``?`` when it is
  not known (an ETA before any rate was measured)."""
  if not math.isfinite(seconds):
    return "?"
  seconds = int(max(seconds, 0))
  if hours:
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
  return f"{seconds // 60}:{seconds % 60:02d}"


def sha256_file(path: str | os.PathLike) -> str:
  """Hex SHA-256 of a file, read in 1 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def read_json(path: str) -> Any:
  """A JSON file's content, or None when it is missing or cut short."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def read_jsonl(path: str, repair: bool = False, strict: bool = False) -> list:
  """The records of a JSON-lines file this project appends to (``[]`` when it is missing).

  The one reader of metrics, journals and run records, with the torn-last-line rule: writers
  append whole lines, so a kill can leave only the last line torn (cut short, or bytes after
  the last newline). That tail is ignored; with ``repair`` (a journal about to be appended to)
  the file is cut back to its whole lines, with a warning, so the next line starts clean. A
  line before the last that does not parse is damage, not a kill: ``strict`` (journals whose
  every record counts) raises ValueError naming the line; otherwise it is skipped (a report
  shows what it can).
  """
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    raw = f.read()
  lines = raw.split(b"\n")[:-1]  # the piece after the last newline is never whole
  out, offset, whole = [], 0, 0  # whole: bytes up to the end of the last line that parsed
  for number, line in enumerate(lines, 1):
    offset += len(line) + 1
    try:
      out.append(json.loads(line))
    except ValueError as error:
      if number < len(lines) and strict:
        raise ValueError(f"{path} line {number} is corrupt ({error}); only the last line may "
                         "be torn by a kill") from None
      continue
    whole = offset
  if repair and whole < len(raw):
    warnings.warn(f"{path}: ignoring a torn last line ({len(raw) - whole} bytes) left by an "
                  "interrupted write")
    with open(path, "r+b") as f:
      f.truncate(whole)
      f.flush()
      os.fsync(f.fileno())
  return out
