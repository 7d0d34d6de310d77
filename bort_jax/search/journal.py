"""The FPTAS journal: finished (candidate, theta) proxy errors, durable across kills.

A killed extraction resumes from its journal without retraining what finished; the header's
config hash refuses a journal written by a run whose proxy errors are not comparable.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

from bort_jax.runtime import fileio

JOURNAL_KIND = "bort_jax.fptas.journal"
JOURNAL_VERSION = 1


def theta_key(theta: Any) -> str:
  """Canonical JSON text of a hyperparameter set; keys the journal.

  Raises:
    ValueError: when ``theta`` is not JSON-serialisable.
  """
  try:
    return json.dumps(theta, sort_keys=True, separators=(",", ":"), allow_nan=False)
  except (TypeError, ValueError) as err:
    raise ValueError(f"hyperparameter set {theta!r} is not JSON-serialisable ({err}); pass "
                     "plain dicts of numbers and strings") from err


def config_hash(obj: Any) -> str:
  """A short stable hash of a JSON-able object (for a journal header).

  Args:
    obj: whatever determines the proxy errors of a run (proxy steps, batch, teacher, seed...).

  Returns:
    16 hex digits of the SHA-256 of its canonical JSON.
  """
  text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


class Journal:
  """Append-only JSONL record of finished (candidate, theta) proxy errors.

  Line 1 is a header ``{"kind", "version", "config_hash"}``; every other line is
  ``{"candidate": name, "theta": theta, "e": error}``. Lines are written whole, then flushed
  and fsynced, so after a kill the file holds every finished pair plus at most one torn last
  line, which loading drops with a warning (and cuts off, so later appends stay parseable).
  A journal written under a different config hash is refused rather than mixed in.
  Only one process may write a journal (process 0 in a multi-host run).

  Attributes:
    path: the file.
    config_hash: the hash this journal belongs to.
    entries: {(candidate name, theta key): e} loaded or appended so far.
  """

  def __init__(self, path: str | os.PathLike, config_hash: str):
    """Opens (or creates) the journal at ``path`` for runs of ``config_hash``."""
    self.path = os.fspath(path)
    self.config_hash = str(config_hash)
    self.entries: dict[tuple[str, str], float] = {}
    if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
      self._load()
    else:
      self._write_header()

  def _write_header(self):
    parent = os.path.dirname(self.path)
    if parent:
      os.makedirs(parent, exist_ok=True)
    header = {"kind": JOURNAL_KIND, "version": JOURNAL_VERSION,
              "config_hash": self.config_hash}
    with open(self.path, "w", encoding="utf-8") as f:
      f.write(json.dumps(header) + "\n")
      f.flush()
      os.fsync(f.fileno())

  def _load(self):
    parsed = fileio.read_jsonl(self.path, repair=True, strict=True)  # a torn tail is cut
    if not parsed:  # Only a torn header: start afresh.
      self._write_header()
      return
    header = parsed[0]
    if not isinstance(header, dict) or header.get("kind") != JOURNAL_KIND:
      raise ValueError(f"{self.path} is not an FPTAS journal (first line {header!r})")
    if header.get("version") != JOURNAL_VERSION:
      raise ValueError(f"journal {self.path} has version {header.get('version')}, this code "
                       f"reads version {JOURNAL_VERSION}")
    if header.get("config_hash") != self.config_hash:
      raise ValueError(
          f"journal {self.path} was written for config hash {header.get('config_hash')!r} but "
          f"this run's config hash is {self.config_hash!r}; its proxy errors are not "
          "comparable. Use a fresh workdir (or delete the journal) to start over.")
    for line_no, rec in enumerate(parsed[1:], start=2):
      if not isinstance(rec, dict) or not {"candidate", "theta", "e"} <= set(rec):
        raise ValueError(f"journal {self.path} line {line_no} lacks candidate/theta/e: {rec!r}")
      key = (str(rec["candidate"]), theta_key(rec["theta"]))
      # The first record of a pair wins: a duplicate can only come from a rerun of the same
      # deterministic pair, so it carries the same value.
      self.entries.setdefault(key, float(rec["e"]))

  def get(self, name: str, theta: Any) -> float | None:
    """The recorded error of (candidate name, theta), or None."""
    return self.entries.get((str(name), theta_key(theta)))

  def append(self, records: Sequence[tuple[str, Any, float]]):
    """Appends finished (candidate name, theta, e) records durably.

    Args:
      records: the pairs finished by one ``train_and_eval`` call.
    """
    if not records:
      return
    text = "".join(
        json.dumps({"candidate": str(n), "theta": t, "e": float(e)}) + "\n"
        for n, t, e in records)
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    for n, t, e in records:
      self.entries.setdefault((str(n), theta_key(t)), float(e))
