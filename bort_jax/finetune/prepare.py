"""What a fine-tuning run reads and checks before anything compiles: its splits and inputs.

:func:`prepare` runs every check that user input can fail (task, model, head, tokenizer,
labels, sequence length, batch over the mesh) and reads the splits, so a bad run stops with
exit status 2 before compiling. Every fine-tuning mode (one model, a population of seeds,
Agora) starts from its :class:`Prepared`. :func:`train_batch` gives the batch of any step by
random access, so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import ml_collections
import numpy as np

from bort_jax.finetune import casts
from bort_jax.finetune import setup as setup_lib
from bort_jax.finetune import tasks as tasks_lib
from bort_jax.runtime import sharding


def train_batch(spec: tasks_lib.TaskSpec, examples: Sequence[casts.Example], tokenizer: Any,
                seq_len: int, batch_size: int, seed: int, step: int,
                process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
  """This process's rows of the global train batch of ``step`` (random access by step).

  Epoch ``e = step // ceil(n / batch_size)`` visits the examples in the order
  ``default_rng([seed, e]).permutation(n)``; a final partial batch is padded with weight-0
  rows, so every example is seen once per epoch.
  """
  n = len(examples)
  per_epoch = max(1, math.ceil(n / batch_size))
  epoch, index = divmod(int(step), per_epoch)
  order = np.random.default_rng([int(seed), epoch]).permutation(n)
  chunk = [examples[k] for k in order[index * batch_size:(index + 1) * batch_size]]
  return next(tasks_lib.batch_examples(spec, chunk, tokenizer, seq_len, batch_size,
                                       process_index=process_index,
                                       process_count=process_count))


@dataclasses.dataclass
class Split:
  """One split, read and cast: ``records`` (for decoding and submissions) and ``examples``."""

  task: tasks_lib.TaskSpec
  name: str
  records: Sequence[Any]
  examples: list


def read_split(spec: tasks_lib.TaskSpec, split: str, data_dir: str | None, download: bool,
               labelled: bool = True, limit: int = 0) -> Split:
  """Loads and casts one split, checking its labels (``labelled=False``: -1 allowed).

  ``limit`` > 0 keeps ``limit`` records spread evenly over the split (positions
  ``round(linspace(0, n - 1, limit))``): a cheaper dev score on a small machine, the same
  records every time, and not the first ones, since a split kept in file order can be sorted
  (the demo's movie_sentiment dev split starts with 88% positive reviews in its first 500).
  """
  try:
    records = tasks_lib.load_split(spec, split, data_dir or None, download=download)
  except ValueError as error:
    raise setup_lib.InputError(str(error)) from None
  if limit and limit < len(records):
    records = [records[int(i)] for i in np.linspace(0, len(records) - 1, int(limit)).round()]
  examples = tasks_lib.cast_split(spec, records)
  setup_lib.check_labels(spec, examples, split, allow_unlabeled=not labelled)
  return Split(spec, split, records, examples)


@dataclasses.dataclass
class Prepared:
  """Everything checked and read before compiling (returned for tests and notebooks)."""

  spec: tasks_lib.TaskSpec
  loaded: setup_lib.Loaded
  params: Any
  layout: str | None
  tokenizer: Any
  tokenizer_path: str
  train: Split
  dev: list
  mesh: Any
  rules: tuple
  total_steps: int


def prepare(config: ml_collections.ConfigDict) -> Prepared:
  """Every input check of a fine-tuning run (task, splits, labels, checkpoint, head,
  tokenizer, batch over the mesh); nothing is compiled.

  Raises:
    setup.InputError: bad input, with a one-paragraph message.
  """
  block = config.get("tfds" if str(config.task).startswith("tfds:") else "files")
  data_dir = os.path.expanduser(config.get("data_dir", "") or "") or None
  spec = setup_lib.resolve_task(config.task, settings=block.to_dict() if block else None,
                                data_dir=data_dir)
  setup_lib.check_trainable(spec)
  loaded = setup_lib.load_model(config.init.path, config.init.get("kind", "auto"),
                                int(config.seed))
  params, layout = setup_lib.fit_head(loaded, spec, bool(config.init.get("reset_head", False)))
  tok_path = setup_lib.tokenizer_dir(loaded.path, config.get("tokenizer", ""))
  tokenizer = setup_lib.load_tokenizer(tok_path, loaded.config)
  if not 2 <= int(config.seq_len) <= loaded.config.max_length:
    raise setup_lib.InputError(f"config.seq_len={config.seq_len} must be in 2.."
                               f"{loaded.config.max_length} (the model's positions).")
  data_dir = os.path.expanduser(config.get("data_dir", "") or "") or None
  download = bool(config.get("download", False))
  train_split = read_split(spec, spec.train_split, data_dir, download)
  if not train_split.examples:
    raise setup_lib.InputError(f"task {spec.name!r}: the train split is empty.")
  limit = int(config.get("max_dev_examples", 0) or 0)
  if limit < 0:
    raise setup_lib.InputError(f"config.max_dev_examples={limit} must be >= 0 (0 = all).")
  dev = [read_split(spec, s, data_dir, download, limit=limit) for s in spec.validation_splits]
  mesh = sharding.make_mesh(dict(config.mesh))
  for field in ("batch_size", "eval_batch_size"):
    try:
      sharding.check_batch_size(int(config[field]), mesh)
    except ValueError as error:
      raise setup_lib.InputError(f"config.{field}: {error}") from None
  rules = tuple(sharding.rules_from_config(config.get("rules")))
  total = int(config.train.total_steps) or int(config.train.epochs) * max(
      1, math.ceil(len(train_split.examples) / int(config.batch_size)))
  return Prepared(spec, loaded, params, layout, tokenizer, tok_path, train_split, dev, mesh,
                  rules, total)
