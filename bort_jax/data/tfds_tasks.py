"""Any TFDS text dataset by name as a fine-tuning task: ``task=tfds:NAME[/CONFIG]``.

    bort-jax finetune --config=configs/finetune.py:task=tfds:imdb_reviews,init=... \\
        --config.data_dir=~/tensorflow_datasets --config.download=True --workdir=runs/imdb

The dataset is read with ``tfds.data_source`` (array_record, no TensorFlow) from
``config.data_dir``; it is downloaded and prepared only with ``config.download=True``, as the
GLUE tasks are. ``config.tfds`` names what the features do; empty fields are inferred from the
dataset's own description:

* the text: the first ``Text`` feature, or one named ``text``, ``sentence``, ``sentence1``,
  ``review``, ``content`` or ``question``; the second text: ``sentence2``, ``hypothesis``
  or ``text_pair`` when present;
* the label: the ``ClassLabel`` feature (classification, with its class names; the model
  keeps them, so ``predict`` prints them), or a float feature named ``label`` (regression);
* the splits: ``train``; the validation split is ``validation`` when the dataset has one,
  else ``test`` (the usual case of review datasets, which then have no separate test split).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
from typing import Any, Mapping

import numpy as np
from etils import epath

from bort_jax.data import files
from bort_jax.finetune import casts
from bort_jax.finetune import tasks as tasks_lib

PREFIX = "tfds:"
TEXT_FEATURES = ("text", "sentence", "sentence1", "review", "content", "question")
PAIR_FEATURES = ("sentence2", "hypothesis", "text_pair")
METRICS = {"classification": ("accuracy", "macro_f1"),
           "regression": ("pearson", "spearman", "mse")}


class TfdsTaskError(ValueError):
  """A TFDS task cannot be read as asked; the message names the dataset and the feature."""


@dataclasses.dataclass(frozen=True)
class Layout:
  """The features a TFDS task reads and what it predicts."""

  builder: str
  text: str
  text_pair: str | None
  label: str
  kind: str
  label_names: tuple[str, ...]
  train_split: str
  validation_split: str
  test_splits: tuple[str, ...]


def _builder(name: str, data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  tasks_lib._prepare_tfds()  # pylint: disable=protected-access  (glue/super_glue, no TF)
  try:
    return tfds.builder(name, data_dir=data_dir)
  except Exception as error:  # TFDS raises its own DatasetNotFoundError and others
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise TfdsTaskError(f"tfds:{name}: no such TFDS dataset here ({first})") from None


def layout_of(name: str, block: Mapping[str, Any] | None, data_dir: str | None) -> Layout:
  """Which features and splits of the TFDS dataset ``name`` the task reads."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  block = dict(block or {})
  builder = _builder(name, data_dir)
  features = builder.info.features
  have = list(features.keys())

  def pick(wanted: str, defaults, kind_test, what: str, required: bool = True):
    found, missing = files.choose(wanted, have, defaults)
    if missing:
      raise TfdsTaskError(f"tfds:{name}: no feature {wanted!r} for the {what} "
                          f"(config.tfds); it has {', '.join(have)}")
    if wanted:  # a name, or "-" for none
      return found
    found = found or next((f for f in have if kind_test(features[f])), None)
    if found is None and required:
      raise TfdsTaskError(f"tfds:{name}: no {what} feature found; it has "
                          f"{', '.join(have)}: name it in config.tfds")
    return found

  is_text = lambda f: isinstance(f, tfds.features.Text)
  text = pick(block.get("text", ""), TEXT_FEATURES, is_text, "text")
  pair = pick(block.get("text_pair", ""), PAIR_FEATURES, lambda f: False, "second text",
              required=False)
  label = pick(block.get("label", ""), ("label",),
               lambda f: isinstance(f, tfds.features.ClassLabel), "label")
  if isinstance(features[label], tfds.features.ClassLabel):
    kind, names = "classification", tuple(features[label].names)
  elif np.issubdtype(np.dtype(features[label].dtype), np.floating):
    kind, names = "regression", ()
  else:
    raise TfdsTaskError(f"tfds:{name}: the label feature {label!r} is neither a ClassLabel "
                        "nor a float")
  splits = list(builder.info.splits.keys())
  validation = block.get("validation_split") or ("validation" if "validation" in splits
                                                 else "test")
  if splits and ("train" not in splits or validation not in splits):  # [] = not prepared here
    raise TfdsTaskError(f"tfds:{name}: needs a train split and a validation split "
                        f"({validation!r}, config.tfds.validation_split); it has "
                        f"{', '.join(splits)}")
  tests = tuple(s for s in ("test",) if s in splits and s != validation)
  return Layout(name, text, pair, label, kind, names, "train", validation, tests)


def _cast_with(layout: Layout):
  def cast(record: Mapping[str, Any]) -> list[casts.Example]:
    text_b = None if layout.text_pair is None else casts.as_text(record[layout.text_pair])
    value = np.asarray(record[layout.label]).item()
    label = float(value) if layout.kind == "regression" else int(value)
    return [casts.Example(casts.as_text(record[layout.text]), text_b, label=label)]
  return cast


def register(name: str, block: Mapping[str, Any] | None = None, data_dir: str | None = None,
             ) -> tasks_lib.TaskSpec:
  """Registers ``tfds:NAME[/CONFIG]`` as a task and returns its spec.

  Raises:
    TfdsTaskError: an unknown dataset, a feature that is not there, or missing splits.
  """
  builder = name[len(PREFIX):]
  if not name.startswith(PREFIX) or not builder:
    raise TfdsTaskError(f"task {name!r}: a TFDS task is named tfds:NAME or tfds:NAME/CONFIG")
  if importlib.util.find_spec("tensorflow_datasets") is None:
    raise TfdsTaskError(f"task {name!r} needs tensorflow-datasets")
  layout = layout_of(builder, block, data_dir)
  spec = tasks_lib.TaskSpec(
      name=name, builder=builder, kind=layout.kind,
      num_labels=len(layout.label_names) if layout.kind == "classification" else 1,
      cast=_cast_with(layout), metrics=METRICS[layout.kind], label_names=layout.label_names,
      train_split=layout.train_split, validation_splits=(layout.validation_split,),
      test_splits=layout.test_splits)
  tasks_lib.register_task(spec, overwrite=True)
  # What was inferred is recorded too: a model's evaluation reads the same features and split.
  _SETTINGS[name] = {"text": layout.text, "text_pair": layout.text_pair or "-",
                     "label": layout.label, "validation_split": layout.validation_split}
  return spec


_SETTINGS: dict[str, dict] = {}


def settings(name: str) -> dict | None:
  """The ``config.tfds`` a registered TFDS task was read with (kept in ``finetune.json``)."""
  return _SETTINGS.get(name)


def source_digest(builder: str, data_dir: str | None) -> str:
  """sha256 over a prepared TFDS dataset: its ``dataset_info.json`` and every file's name and
  size (its record files are not read: a catalog dataset can be large). What a result on the
  dataset was made from, so that a cached result goes stale when it is prepared again.

  Args:
    builder: the TFDS name (``imdb_reviews``, ``glue/sst2``, ``NAME/CONFIG``).
    data_dir: the TFDS data folder.
  """
  folder = epath.Path(_builder(builder, data_dir).data_dir)
  sha = hashlib.sha256(builder.encode())
  if not folder.exists():
    return sha.hexdigest()  # not prepared: the fine-tuning says so when it reads it
  for path in sorted(p for p in folder.rglob("*") if p.is_file()):
    sha.update(f"{path.relative_to(folder)}:{path.stat().length}\n".encode())
  info = folder / "dataset_info.json"
  if info.exists():
    sha.update(info.read_bytes())
  return sha.hexdigest()
