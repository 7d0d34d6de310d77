"""Preemption: SIGTERM becomes a flag the train loop polls, agreed across processes.

The loop then saves a checkpoint at the step reached and exits cleanly.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import numpy as np


class PreemptionFlag:
  """Set by SIGTERM (or :meth:`set`); the train loop polls :meth:`should_stop`.

  In a multi-process run the processes must stop at the same step (saving is collective), so
  every ``sync_every``-th poll all-gathers the local flags and stops everywhere if any process
  was signalled. All processes must poll equally often (the loop polls once per step).
  """

  def __init__(self, sync_every: int = 1):
    self._event = threading.Event()
    self._stop = False
    self._polls = 0
    self._sync_every = max(1, int(sync_every))
    self._previous: dict[int, Any] = {}
    self.signal_number: int | None = None

  def set(self, signum: int | None = None, frame: Any = None) -> None:
    """Marks a stop request (also the signal handler)."""
    del frame
    self.signal_number = signum
    self._event.set()

  @property
  def signalled(self) -> bool:
    """Whether this process received a stop request (no cross-process agreement)."""
    return self._event.is_set()

  def should_stop(self) -> bool:
    """Whether the loop should save and exit now (agreed across processes)."""
    if self._stop:
      return True
    local = self._event.is_set()
    if jax.process_count() == 1:
      self._stop = local
      return local
    self._polls += 1
    if self._polls % self._sync_every:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.asarray(int(local), np.int32))
    self._stop = bool(np.asarray(flags).any())
    return self._stop

  __call__ = should_stop

  def uninstall(self) -> None:
    """Restores the signal handlers that were there before."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()


def install_preemption_handler(signals: tuple[int, ...] = (signal.SIGTERM,),
                               sync_every: int = 1) -> PreemptionFlag:
  """Makes SIGTERM (by default) request a save-and-exit instead of killing the process.

  Must be called from the main thread (Python delivers signals there).

  Args:
    signals: the signals to catch.
    sync_every: polls between cross-process agreements (multi-process runs).

  Returns:
    The :class:`PreemptionFlag`; pass ``flag.should_stop`` to the train loop.
  """
  if threading.current_thread() is not threading.main_thread():
    raise RuntimeError("install_preemption_handler must be called from the main thread.")
  flag = PreemptionFlag(sync_every)
  for signum in signals:
    flag._previous[signum] = signal.signal(signum, flag.set)  # pylint: disable=protected-access
  return flag
