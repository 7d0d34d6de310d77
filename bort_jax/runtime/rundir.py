"""The layout of a run folder, and the one hash that keys what a run produced.

Every mode runs in a folder (``--workdir``). Other modes read it: the demo skips a finished
stage, the report and the study read the extraction's results and the fine-tunings'
summaries, Agora takes a fine-tuning's best model as its labeller. The names of what a run
leaves behind are therefore defined once, here, for writers and readers alike:

| name | written by | what it holds |
|---|---|---|
| ``export/`` | teacher-adapt, distill | the trained model in our export format |
| ``best/`` | finetune (every mode) | the best fine-tuned model, its ``finetune.json`` and tokenizer |
| ``results.json`` | extract, finetune | the finished run's results (marks it done) |
| ``population.json`` | finetune with seeds | the population's summary (marks it done) |
| ``agora.json`` | finetune with Agora | the rounds' summary (marks it done) |
| ``checkpoints/`` | every training | resumable state |
| ``config.json``, ``metrics.jsonl`` | every training | the run's config and its metrics |
| ``demo_state.json``, ``report/`` | the demo | stage times and state; the report |

Exports and ``best/`` are written as whole folders (``fileio.atomic_dir``, ``export.save``):
a reader sees no folder or a complete one, so a folder's presence means the run finished it.

:class:`Digest` is the one content hash behind the caches' keys (``CACHE/adapted``,
``extracted``, ``distilled``, ``finetuned``) and the demo's per-stage config hashes: a
SHA-256 over what determines a run's output, fed as text, canonical JSON, file contents or
arrays. :func:`check_workdir` is the one check of a folder a command is told to write (the
workdir, ``--out``, ``--cache-dir``): it raises :class:`UsageError`, bad input (exit status 2).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from bort_jax.runtime.fileio import sha256_file, to_jsonable

EXPORT = "export"
BEST = "best"
RESULTS = "results.json"
POPULATION = "population.json"
AGORA = "agora.json"
CHECKPOINTS = "checkpoints"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
DEMO_STATE = "demo_state.json"
REPORT = "report"

def export_dir(run: str) -> str:
  """``RUN/export``: a training run's model in our export format."""
  return os.path.join(run, EXPORT)


def best_dir(run: str) -> str:
  """``RUN/best``: a fine-tuning's best model."""
  return os.path.join(run, BEST)


def has_export(run: str) -> bool:
  """Whether a training run in ``run`` finished (its export is written whole, or not at all)."""
  return os.path.isdir(export_dir(run))


class Digest:
  """A SHA-256 over what determines a run's output; each method adds one input and returns
  the digest, so a key reads as one expression.

  The bytes fed are fixed by the methods (cache keys written by earlier versions stay valid
  as long as they do not change): ``text`` its UTF-8; ``json`` the sorted JSON of
  ``fileio.to_jsonable(value)``; ``file`` ``"<name>:<sha256 of the file>"``; ``array``
  ``"<name>:<dtype>:<shape>"`` and the array's bytes.
  """

  def __init__(self, text: str = ""):
    self._sha = hashlib.sha256(text.encode())

  def text(self, value: str) -> Digest:
    self._sha.update(value.encode())
    return self

  def json(self, value: Any) -> Digest:
    return self.text(json.dumps(to_jsonable(value), sort_keys=True))

  def file(self, path: str, name: str | None = None) -> Digest:
    return self.text(f"{os.path.basename(path) if name is None else name}:{sha256_file(path)}")

  def array(self, name: str, value: Any) -> Digest:
    array = np.ascontiguousarray(np.asarray(value))
    self.text(f"{name}:{array.dtype}:{array.shape}")
    self._sha.update(array.tobytes())
    return self

  def hex(self, length: int | None = None) -> str:
    """The hex digest, cut to ``length`` characters when given."""
    return self._sha.hexdigest()[:length]


class UsageError(ValueError):
  """Bad user input (a flag, a config field, a path): exit status 2, no traceback."""


def check_workdir(path: str | None, flag: str = "--workdir") -> str:
  """The workdir must be a folder this process can create or write (nothing is created).

  Remote paths (``gs://...``) are left to the file system that serves them.

  Raises:
    UsageError: no path, a path that is a file (or lies under one), or a folder that is not
      writable.
  """
  if not path:
    raise UsageError(f"{flag} is required: the folder for checkpoints, metrics and results")
  if "://" in path:
    return path
  absolute = os.path.abspath(os.path.expanduser(path))
  probe = absolute
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    where = "is a file" if probe == absolute else f"lies under the file {probe}"
    raise UsageError(f"{flag}={path} {where}; give a folder (existing or to be created)")
  if not os.access(probe, os.W_OK | os.X_OK):
    what = "the folder" if probe == absolute else f"its nearest existing parent {probe}"
    raise UsageError(f"{flag}={path}: {what} is not writable by this user; give a folder you "
                     "can write to")
  return path
