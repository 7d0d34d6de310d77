"""Quiet recovery: what a failed orbax restore prints besides its own error, and how it is muted.

orbax runs a restore on its own asyncio loop and closes the loop as soon as one read fails.
tensorstore still completes the other reads on its threads, and each completion produces noise
that has nothing to say beyond the first error:

* a callback aimed at the closed loop, which Python prints as an unraisable
  ``RuntimeError: Event loop is closed`` traceback (dozens for one damaged step);
* futures whose exception nobody awaited, which asyncio logs as "Future/Task exception was
  never retrieved" with a traceback when they are garbage-collected (at any later moment).

:class:`RestoreNoiseFilter` drops exactly those two kinds, the second only when the message
names the checkpoint directory being restored; everything else passes through unchanged. The
error itself reaches the user as one line (:func:`one_line`) in the checkpoint layer's warning.
"""

from __future__ import annotations

import gc
import logging
import sys
from typing import Any

_NEVER_RETRIEVED = ("Future exception was never retrieved", "Task exception was never retrieved")


def one_line(error: BaseException, limit: int = 200) -> str:
  """``Type: first line`` of an error, without tensorstore's long JSON spec."""
  text = str(error).split(" [tensorstore_spec")[0].strip().splitlines()
  text = text[0] if text else ""
  return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


class _NeverRetrieved(logging.Filter):
  """asyncio's "exception was never retrieved" records about one checkpoint directory."""

  def __init__(self, directory: str):
    super().__init__()
    self.directory = directory

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not (message.startswith(_NEVER_RETRIEVED) and self.directory in message)


class RestoreNoiseFilter:
  """Mutes the noise of failed restores of one checkpoint directory.

  Usage: :meth:`install` before each restore attempt, :meth:`attempt_failed` when one raised,
  :meth:`uninstall` when the manager closes (or after a successful restore when none failed).

  Args:
    directory: the checkpoint directory (only asyncio records naming it are dropped).
  """

  def __init__(self, directory: str):
    self.directory = directory
    self.keep = False
    self.dropped = 0
    self._previous = None
    self._log_filter = None

  def install(self) -> None:
    """Routes unraisable exceptions through :meth:`_hook` (idempotent)."""
    if self._previous is None:
      self._previous = sys.unraisablehook
      sys.unraisablehook = self._hook

  def attempt_failed(self) -> None:
    """Keeps the hook until :meth:`uninstall`, and mutes asyncio's late records for good.

    The asyncio filter stays for the life of the process: its records come from garbage
    collection, which may run at any time, even at exit; it only matches this directory.
    """
    self.keep = True
    if self._log_filter is None:
      self._log_filter = _NeverRetrieved(self.directory)
      logging.getLogger("asyncio").addFilter(self._log_filter)

  def uninstall(self) -> None:
    """Restores the previous unraisable hook (collecting the dead futures first)."""
    if self._previous is None:
      return
    if self.keep:
      gc.collect()  # the failed reads' futures report now, while the hook still drops them
    if sys.unraisablehook == self._hook:
      sys.unraisablehook = self._previous
    self._previous = None

  def _hook(self, unraisable: Any) -> None:
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
      self.dropped += 1
      return
    (self._previous or sys.__unraisablehook__)(unraisable)
