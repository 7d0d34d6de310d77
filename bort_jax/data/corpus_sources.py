"""Where pretraining documents come from: text files (local or on a bucket) or a TFDS dataset.

``config.data`` names one of two sources; ``distill``, ``teacher-adapt`` and ``extract`` read
either the same way:

* ``corpus_files``: glob patterns of text files, on local disk or on a bucket path the file
  layer reads (``gs://bucket/wiki/*.txt``). They are built once into an array_record dataset
  under ``data_dir`` (see :mod:`bort_jax.data.corpus`) that every process then opens.
* ``corpus_tfds`` (read instead of the files when set): a TFDS dataset by name
  (``wikipedia/20230601.en``, ``c4/en``), read with ``tfds.data_source`` from ``data_dir``;
  ``corpus_field`` names the feature that holds the text and ``corpus_split`` the split read.
  It is downloaded and prepared only with ``config.data.download=True``. The validation
  documents are chosen by a hash of their text (:func:`bort_jax.data.corpus.split_of`), as
  for text files, since catalog corpora such as Wikipedia have no validation split. On a run
  of several processes each process reads only its share of the records (every
  ``process_count``-th, from its own index), so no host holds the corpus or reads all of it.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Callable, Sequence

from etils import epath

from bort_jax.data import corpus as corpus_lib


class CorpusSourceError(ValueError):
  """A corpus cannot be read as configured; the message names the field and the value."""


def expand(patterns: Sequence[str]) -> list[str]:
  """The files that glob patterns match, sorted and without duplicates.

  A pattern with a scheme (``gs://...``) is matched by the file layer (etils.epath): the part
  before the first component holding a wildcard is the folder searched.
  """
  found = set()
  for pattern in patterns:
    if not pattern:
      continue
    if "://" not in pattern:
      found.update(glob.glob(os.path.expanduser(pattern)))
      continue
    scheme, rest = pattern.split("://", 1)
    parts = rest.split("/")
    fixed = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")),
                 len(parts))
    if fixed == len(parts):
      if epath.Path(pattern).exists():
        found.add(pattern)
      continue
    base = epath.Path(f"{scheme}://{'/'.join(parts[:fixed])}")
    found.update(os.fspath(p) for p in base.glob("/".join(parts[fixed:])))
  return sorted(found)


def process_share(count: int, process_index: int, process_count: int) -> range:
  """The record indices one process reads: every ``process_count``-th from its index."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  return range(process_index, count, process_count)


def open_tfds(name: str, split: str, data_dir: str | None, download: bool):
  """The data source of one split of a TFDS dataset; a clear error when it cannot be read."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as error:  # TFDS raises DatasetNotFoundError and others
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise CorpusSourceError(f"config.data.corpus_tfds={name!r}: no such TFDS dataset here "
                            f"({first})") from None
  if not builder.is_prepared() and not download:
    raise CorpusSourceError(
        f"config.data.corpus_tfds={name!r}: not prepared under config.data.data_dir="
        f"{data_dir!r}; prepare it there, or set config.data.download=True to let TFDS "
        "download it")
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=download)
  except Exception as error:  # an unknown split, or a failed download
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise CorpusSourceError(f"config.data.corpus_tfds={name!r}, corpus_split={split!r}: "
                            f"cannot be read ({first})") from None


def check_tfds(name: str, field: str, split: str, data_dir: str | None, download: bool):
  """:func:`open_tfds`, and the text feature ``field`` checked to exist; the data source."""
  source = open_tfds(name, split, data_dir, download)
  features = getattr(source.dataset_info, "features", None)
  names = sorted(features.keys()) if features is not None else []
  if names and field not in names:
    raise CorpusSourceError(f"config.data.corpus_field={field!r}: {name} has no such feature; "
                            f"it has {', '.join(names)}")
  return source


def tfds_documents(name: str, *, field: str = "text", split: str = "train",
                   data_dir: str | None = None, download: bool = False,
                   which: str = "train", validation_fraction: float = 0.01,
                   process_index: int = 0, process_count: int = 1) -> list[str]:
  """This process's documents of one hash split of a TFDS text dataset, in record order.

  Args:
    name: the dataset, ``NAME`` or ``NAME/CONFIG`` (a version may follow: ``NAME:1.0.0``).
    field: the feature holding the text.
    split: the TFDS split read (e.g. "train").
    data_dir: the TFDS data directory.
    download: let TFDS download and prepare a missing dataset.
    which: "train" or "validation": the documents that :func:`corpus.split_of` puts there.
    validation_fraction: the expected share of documents held out.
    process_index, process_count: this process and how many share the records.

  Returns:
    document texts, their lines stripped and blank lines dropped.

  Raises:
    CorpusSourceError: an unknown dataset, one not prepared, or a field that is not there.
  """
  source = check_tfds(name, field, split, data_dir, download)
  text_of = document_reader(field, which, validation_fraction)
  texts = (text_of(source[i]) for i in process_share(len(source), process_index, process_count))
  return [t for t in texts if t]


def document_reader(field: str, which: str, validation_fraction: float
                    ) -> Callable[[Any], str | None]:
  """``record -> text``: a TFDS record's document as a text file's document holds it (lines
  stripped, blank ones dropped, so the same text from a file or from TFDS lands in the same
  split and packs the same way), or None when it is empty or in the other hash split."""

  def text_of(record: Any) -> str | None:
    value = record[field]
    value = value.decode("utf-8") if isinstance(value, bytes) else str(value)
    text = "\n".join(line.strip() for line in value.splitlines() if line.strip())
    return text if text and corpus_lib.split_of(text, validation_fraction) == which else None

  return text_of
