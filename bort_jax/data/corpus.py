"""A TFDS dataset of documents built from text files, local or on a bucket (array_record).

Input format: UTF-8 text files, one sentence or paragraph per line, documents separated by
blank lines. Each document becomes one record ``{"text": lines joined by "\\n", "doc_id": int}``
where ``doc_id`` numbers the documents in file order (records are stored shuffled, so readers
sort by it to get a deterministic order). Documents go to ``train`` or ``validation`` by a hash
of their text, so the split does not depend on file order and duplicates never straddle it.

Bad input: a missing file is an error before anything is written; an empty file and lines that
are not valid UTF-8 are skipped with a warning that names the file and the count. TFDS builds
into an ``incomplete.*`` folder and renames it on success, removing it on an exception, so a
failed build leaves no dataset behind (tests check this).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from bort_jax.runtime import quiet

log = logging.getLogger(__name__)

_VERSION = "1.0.0"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def _on_bucket(path: str) -> bool:
  """A path with a scheme (``gs://``, ``s3://``): read through the file layer (etils.epath)."""
  return "://" in path


def _absolute(path: str) -> str:
  return path if _on_bucket(path) else os.path.abspath(path)


def split_of(text: str, validation_fraction: float) -> str:
  """The split of a document: a deterministic function of its text.

  Args:
    text: the document text.
    validation_fraction: share of documents (in expectation) that go to validation.

  Returns:
    "train" or "validation".
  """
  digest = hashlib.sha256(text.encode("utf-8")).digest()
  u = int.from_bytes(digest[:8], "big") / 2.0**64
  return "validation" if u < validation_fraction else "train"


def read_documents(path: str, warn: bool = True) -> Iterator[list[str]]:
  """Yields the documents of one text file as lists of non-empty lines.

  Lines that are not valid UTF-8 are skipped; a warning names the file and how many.

  Args:
    path: a text file.
    warn: log the warnings (off where the same file is read again).

  Yields:
    one list of stripped lines per document.
  """
  bad = 0
  doc: list[str] = []
  with (epath.Path(path).open("rb") if _on_bucket(path) else open(path, "rb")) as f:
    for raw in f:
      try:
        line = raw.decode("utf-8").strip()
      except UnicodeDecodeError:
        bad += 1
        continue
      if line:
        doc.append(line)
      elif doc:
        yield doc
        doc = []
  if doc:
    yield doc
  if bad and warn:
    log.warning("corpus file %s: skipped %d line(s) that are not valid UTF-8", path, bad)


def fingerprint(files: Sequence[str], validation_fraction: float) -> str:
  """A fingerprint of the inputs (paths, sizes, modification times, split fraction)."""
  h = hashlib.sha256(repr(validation_fraction).encode())
  for f in files:
    if _on_bucket(f):
      st = epath.Path(f).stat()
      size, mtime = st.length, st.mtime
    else:
      st = os.stat(f)
      size, mtime = st.st_size, st.st_mtime_ns
    h.update(f"{_absolute(f)}\0{size}\0{mtime}\0".encode())
  return h.hexdigest()[:16]


class TextCorpus(tfds.core.GeneratorBasedBuilder):
  """Documents from local text files; one builder config per corpus name."""

  VERSION = tfds.core.Version(_VERSION)
  # Nothing is downloaded, so there are no URL checksums to look up. Finding them would go
  # through `code_path`, which for a builder inside a regular package imports the
  # `importlib_resources` backport that TFDS does not declare (and CI lacks).
  url_infos = None

  def __init__(self, *, files: Sequence[str] = (), validation_fraction: float = 0.01,
               splits: Sequence[str] = ("train", "validation"), **kwargs):
    self._files = [os.fspath(f) for f in files]
    self._splits = list(splits)
    self._validation_fraction = validation_fraction
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # A builder outside a TFDS dataset package has no metadata files beside it, so the info is
    # built here directly.
    return tfds.core.DatasetInfo(
        builder=self,
        description="Documents from local text files (one line per sentence or paragraph, "
                    "documents separated by blank lines).",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "doc_id": np.int64,
        }),
        metadata=tfds.core.MetadataDict(
            files=[_absolute(f) for f in self._files],
            fingerprint=fingerprint(self._files, self._validation_fraction)
            if self._files else "",
            validation_fraction=self._validation_fraction),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    return {split: self._generate_examples(split) for split in self._splits}

  def _generate_examples(self, split: str):
    doc_id = 0
    for path in self._files:
      for lines in read_documents(path, warn=False):
        text = "\n".join(lines)
        if split_of(text, self._validation_fraction) == split:
          yield doc_id, {"text": text, "doc_id": doc_id}
        doc_id += 1


def build_corpus(files: Sequence[str | os.PathLike], data_dir: str | os.PathLike,
                 name: str = "corpus", validation_fraction: float = 0.01,
                 overwrite: bool = False) -> dict:
  """Builds (or reuses) a corpus dataset and returns its data sources.

  Args:
    files: text files, read in this order.
    data_dir: TFDS data directory; the dataset lands in ``data_dir/text_corpus/<name>/1.0.0``.
    name: corpus name (lower-case letters, digits, underscores).
    validation_fraction: expected share of documents in the validation split.
    overwrite: rebuild even if a dataset of that name exists (needed when its files changed).

  Returns:
    dict split -> random-access data source; ``source[i]`` is ``{"text": bytes, "doc_id": int}``.
  """
  if not _NAME_RE.match(name):
    raise ValueError(f"corpus name {name!r} must be lower-case letters, digits and underscores")
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
  files = [os.fspath(f) for f in files]
  if not files:
    raise ValueError("build_corpus needs at least one text file")
  for f in files:
    if not (epath.Path(f).is_file() if _on_bucket(f) else os.path.isfile(f)):
      raise FileNotFoundError(f"corpus file not found: {f}")
  # One scan before building: it reports bad lines and empty files once, finds which splits
  # have documents (TFDS cannot write an empty split), and no empty dataset is ever written.
  docs_per_file = {f: 0 for f in files}
  split_sizes = {"train": 0, "validation": 0}
  for f in files:
    for lines in read_documents(f):
      docs_per_file[f] += 1
      split_sizes[split_of("\n".join(lines), validation_fraction)] += 1
  for f, n in docs_per_file.items():
    if n == 0:
      log.warning("corpus file %s holds no documents (empty or no readable lines)", f)
  if not split_sizes["train"]:
    raise ValueError(f"corpus {name!r}: no training documents in {files} "
                     f"({split_sizes['validation']} went to validation)")
  splits = [s for s, n in split_sizes.items() if n]

  def make_builder():
    return TextCorpus(files=files, validation_fraction=validation_fraction, splits=splits,
                      config=tfds.core.BuilderConfig(name=name, version=_VERSION),
                      data_dir=os.fspath(data_dir), file_format="array_record")

  builder = make_builder()
  if builder.is_prepared() and not overwrite:
    want = fingerprint(files, validation_fraction)
    have = builder.info.metadata.get("fingerprint") if builder.info.metadata else None
    if have != want:
      raise ValueError(f"corpus {name!r} in {builder.data_dir} was built from other files or "
                       "settings; pass overwrite=True or choose another name")
    return builder.as_data_source()
  aside = None
  if builder.is_prepared():
    # Move the old dataset aside rather than deleting it, so that a failed rebuild can put it
    # back; a fresh builder then sees no stale metadata on disk.
    aside = f"{builder.data_dir}.old-{os.getpid()}"
    os.rename(builder.data_dir, aside)
    builder = make_builder()
  try:
    with quiet.tfds_build():  # without TFDS's printed lines (bort-jax --verbose keeps them)
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig())
  except BaseException:
    # TFDS has already removed its incomplete.* folder; drop the empty config folder it
    # leaves, or put the previous dataset back.
    if aside is not None:
      os.rename(aside, builder.data_dir)
    else:
      config_dir = os.path.dirname(builder.data_dir)
      if os.path.isdir(config_dir) and not os.listdir(config_dir):
        os.rmdir(config_dir)
    raise
  if aside is not None:
    shutil.rmtree(aside)
  return builder.as_data_source()


def load_corpus(data_dir: str | os.PathLike, name: str = "corpus") -> dict:
  """Opens a corpus built earlier by :func:`build_corpus`, without its source files.

  Args:
    data_dir: the TFDS data directory given to :func:`build_corpus`.
    name: corpus name.

  Returns:
    dict split -> data source.
  """
  path = os.path.join(os.fspath(data_dir), "text_corpus", name, _VERSION)
  if not os.path.isfile(os.path.join(path, "dataset_info.json")):
    raise FileNotFoundError(f"no built corpus {name!r} under {data_dir} (looked in {path})")
  return tfds.builder_from_directory(path).as_data_source()


def documents(source) -> list[str]:
  """All documents of a data source as strings, in ``doc_id`` order.

  Args:
    source: a data source from :func:`build_corpus` (records with "text" and "doc_id"), or a
      plain sequence of ``str``/``bytes`` documents (kept in the given order).

  Returns:
    list of document texts (lines separated by "\\n").
  """
  records = [source[i] for i in range(len(source))]
  if records and isinstance(records[0], dict):
    records.sort(key=lambda r: int(r["doc_id"]))
    records = [r["text"] for r in records]
  # array_record gives bytes, mock data and plain lists give str.
  return [r.decode("utf-8") if isinstance(r, bytes) else str(r) for r in records]
