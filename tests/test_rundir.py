"""The run folder's layout and the one content hash (runtime/rundir.py)."""

import hashlib
import json
import os

import numpy as np

from bort_jax.finetune.members import best_index
from bort_jax.runtime import fileio, rundir


def test_digest_feeds_the_bytes_its_docstring_names(tmp_path):
  # The caches' keys must not move when the code that computes them is reorganised: each
  # method feeds exactly the bytes the old hand-written hashes fed.
  path = tmp_path / "model.bin"
  path.write_bytes(b"\x00\x01weights" * 1000)
  config = {"b": [1, 2.5], "a": {"z": "x"}}
  array = np.arange(6, dtype=np.int32).reshape(2, 3)
  by_hand = hashlib.sha256("config text".encode())
  by_hand.update(f"model.bin:{hashlib.sha256(path.read_bytes()).hexdigest()}".encode())
  by_hand.update(json.dumps(config, sort_keys=True).encode())
  by_hand.update(b"ids:int32:(2, 3)")
  by_hand.update(array.tobytes())
  digest = rundir.Digest("config text").file(str(path)).json(config).array("ids", array)
  assert digest.hex() == by_hand.hexdigest()
  assert digest.hex(12) == by_hand.hexdigest()[:12]
  assert rundir.Digest().file(str(path), name="other").hex() != rundir.Digest().file(
      str(path)).hex()


def test_sha256_file_reads_in_chunks(tmp_path):
  path = tmp_path / "big"
  data = os.urandom(3 * (1 << 20) + 17)  # more than one chunk, not a whole number of them
  path.write_bytes(data)
  assert fileio.sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_layout_names_and_a_finished_export(tmp_path):
  run = str(tmp_path / "run")
  assert not rundir.has_export(run)
  with fileio.atomic_dir(rundir.export_dir(run)) as tmp:
    open(os.path.join(tmp, "params.safetensors"), "wb").close()
  assert rundir.has_export(run)
  assert rundir.export_dir(run) == os.path.join(run, "export")
  assert rundir.best_dir(run) == os.path.join(run, "best")


def test_best_index_is_the_first_of_the_highest_finite_values():
  nan, inf = float("nan"), float("inf")
  assert best_index([0.5, 0.7, 0.7, 0.6]) == 1          # a tie keeps the first
  assert best_index([nan, 0.2, nan]) == 1                # NaN never wins
  assert best_index([inf, 0.9]) == 1                     # nor does an infinity
  assert best_index([nan, nan]) is None and best_index([]) is None
  # As a running rule (a later value replaces the best only when strictly higher).
  assert best_index([0.8, 0.8]) == 0 and best_index([0.8, 0.81]) == 1
