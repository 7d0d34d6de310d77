"""What libraries print (not log) around a step of a run, and how ``--verbose`` keeps it.

TFDS prints two lines around every dataset it builds, "Downloading and preparing dataset
Unknown size (...) to DIR..." and "Dataset NAME downloaded and prepared to DIR. Subsequent
calls will reuse this data.", and draws tqdm bars meanwhile. The package builds its datasets
from files already on disk, so they say nothing the run's own line does not; they go to stdout
through ``print``, past any logging level. :func:`tfds_build` runs one build without them.

``bort_jax.main.quiet_noise`` sets :data:`VERBOSE` from ``--verbose``; the logging side of
the same rule (loggers, levels, one line per record) lives there. This module imports
nothing heavy.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from typing import Iterator

VERBOSE = False  # set by bort_jax.main.quiet_noise from --verbose


@contextlib.contextmanager
def tfds_build() -> Iterator[None]:
  """Runs a TFDS ``download_and_prepare`` without its printed lines and bars (unless verbose).

  Only ``sys.stdout`` is captured, and only for the duration of the build; the build's errors
  and logged warnings pass unchanged.
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  tfds.display_progress_bar(VERBOSE)
  if VERBOSE:
    yield
    return
  with contextlib.redirect_stdout(io.StringIO()):
    yield


class PlainFormatter(logging.Formatter):
  """A record as one plain line, like the package's printed ones (no time, no level tag).

  WARNING and above say so (``warning: ...``); another library's records (shown by
  ``--verbose``, or from WARNING up) name their logger (``[absl] ...``).
  """

  def formatMessage(self, record: logging.LogRecord) -> str:
    own = record.name == "root" or record.name.split(".")[0] == "bort_jax"
    source = "" if own else f"[{record.name}] "
    level = "" if record.levelno <= logging.INFO else f"{record.levelname.lower()}: "
    return f"{source}{level}{record.message}"


class StderrHandler(logging.StreamHandler):
  """Writes to the current ``sys.stderr`` (a notebook or a test may replace it after set-up)."""

  def __init__(self):
    super().__init__()
    self.setFormatter(PlainFormatter())

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, _):
    pass  # always the current sys.stderr
