"""Your own labelled data as a fine-tuning task: CSV, TSV and JSON Lines files.

    bort-jax finetune --workdir=runs/reviews \\
        --config=configs/finetune.py:task=file:reviews/train.csv,init=runs/demo/distill/export \\
        --config.files.validation=reviews/dev.csv

``task=file:PATH`` names the training file; ``config.files`` (:class:`FileTask`) says the rest:
the validation and test files (without a validation file, a deterministic share of the training
rows is held out), the columns, and the kind. The format follows the file name: ``.csv``,
``.tsv`` / ``.tab``, ``.jsonl`` / ``.json`` (one JSON object per line). Paths go through
``etils.epath``, so a bucket path (``gs://...``) reads where its file system is installed.

Columns default to the usual names of GLUE files and of Hugging Face datasets written as JSON
Lines: the text is the first of ``text``, ``sentence``, ``sentence1``, ``question`` present,
the optional second text the first of ``text_pair``, ``sentence2``, ``hypothesis`` present,
the label ``label``. Kinds:

* ``classification``: labels as strings or integers; the label set is read from the training
  file (integers in numeric order, strings in sorted order) and stored with the model, so
  ``predict`` prints the names and the Hugging Face export carries them as ``id2label``;
* ``regression``: a number per row;
* ``multiple_choice``: ``choices`` names the columns of the choices (``/``-separated) or one
  JSON Lines field holding the list; the label is the index of the right choice.

``kind = "auto"`` takes multiple choice when ``choices`` is set, regression when a label is a
number that is not an integer, classification otherwise (integer scores meant as regression
need ``kind = "regression"``). Metrics: accuracy and macro-F1 (classification), Pearson,
Spearman and mean squared error (regression), accuracy (multiple choice); the results give the
score of a constant answer beside them (the majority class, or the training mean).

Bad input (a missing file or column, an empty file, bytes that are not UTF-8, a CSV row with
more or fewer fields than its header, a label the training file never shows, a regression
label that is not a number, a multiple-choice row with another number of choices) raises
:class:`FileTaskError` naming the file and the row.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
from typing import Any, Mapping, Sequence

from etils import epath

from bort_jax.finetune import casts
from bort_jax.finetune import tasks as tasks_lib

PREFIX = "file:"
KINDS = ("auto", "classification", "regression", "multiple_choice")
TEXT_COLUMNS = ("text", "sentence", "sentence1", "question")
PAIR_COLUMNS = ("text_pair", "sentence2", "hypothesis")
METRICS = {"classification": ("accuracy", "macro_f1"),
           "regression": ("pearson", "spearman", "mse"), "multiple_choice": ("accuracy",)}


class FileTaskError(ValueError):
  """A file task's input is unusable; the message names the file and the row."""


@dataclasses.dataclass(frozen=True)
class FileTask:
  """Where a file task's data is and how to read it (``config.files``; the train file comes
  from ``task=file:PATH``). Empty column names take the defaults of the module docstring;
  ``text_pair = "-"`` reads no second text even when a default column exists."""

  train: str
  validation: str = ""
  test: str = ""
  kind: str = "auto"
  text: str = ""
  text_pair: str = ""
  label: str = "label"
  choices: str = ""
  held_out: float = 0.1

  @classmethod
  def from_config(cls, train: str, block: Mapping[str, Any] | None) -> FileTask:
    fields = {f.name for f in dataclasses.fields(cls)} - {"train"}
    given = dict(block or {})
    unknown = sorted(set(given) - fields)
    if unknown:
      raise FileTaskError(f"config.files has no field {unknown[0]!r}; it has "
                          f"{', '.join(sorted(fields))}")
    task = cls(train=train, **{k: v for k, v in given.items()})
    if task.kind not in KINDS:
      raise FileTaskError(f"config.files.kind={task.kind!r} is not one of {', '.join(KINDS)}")
    if not 0.0 < float(task.held_out) < 1.0:
      raise FileTaskError(f"config.files.held_out={task.held_out!r} must be a share between 0 "
                          "and 1 (the training rows held out when there is no validation file)")
    return task


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of a file: its fields and where it is (for messages)."""

  fields: Mapping[str, Any]
  where: str


def read_rows(path: str) -> list[Row]:
  """Every row of a CSV, TSV or JSON Lines file.

  Raises:
    FileTaskError: a missing or empty file, an unknown format, bytes that are not UTF-8, a
      ragged CSV row or a line that is not a JSON object.
  """
  lower = path.lower()
  fmt = ("csv" if lower.endswith(".csv") else "tsv" if lower.endswith((".tsv", ".tab"))
         else "jsonl" if lower.endswith((".jsonl", ".json")) else None)
  if fmt is None:
    raise FileTaskError(f"{path}: the file name must end in .csv, .tsv, .tab, .jsonl or .json "
                        "(that is how its format is known)")
  try:
    data = epath.Path(path).read_bytes()
  except (OSError, ValueError) as error:
    raise FileTaskError(f"{path}: cannot be read ({error})") from None
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as error:
    line = data[:error.start].count(b"\n") + 1
    raise FileTaskError(f"{path} line {line}: byte {error.start} is not UTF-8 (save the file "
                        "as UTF-8)") from None
  rows = _json_rows(path, text) if fmt == "jsonl" else _table_rows(path, text, fmt)
  if not rows:
    raise FileTaskError(f"{path}: the file holds no rows")
  return rows


def _json_rows(path: str, text: str) -> list[Row]:
  rows = []
  for n, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as error:
      raise FileTaskError(f"{path} line {n}: not JSON ({error.msg})") from None
    if not isinstance(obj, dict):
      raise FileTaskError(f"{path} line {n}: a JSON object per line is expected, got "
                          f"{type(obj).__name__}")
    rows.append(Row(obj, f"{path} line {n}"))
  return rows


def _table_rows(path: str, text: str, fmt: str) -> list[Row]:
  reader = csv.reader(io.StringIO(text, newline=""), delimiter="," if fmt == "csv" else "\t")
  try:
    header = next(reader, None)
    if header is None:
      return []
    header = [h.strip() for h in header]
    rows = []
    for record in reader:
      if not record or (len(record) == 1 and not record[0].strip()):
        continue
      if len(record) != len(header):
        raise FileTaskError(f"{path} line {reader.line_num}: {len(record)} fields, the header "
                            f"has {len(header)} ({', '.join(header)})")
      rows.append(Row(dict(zip(header, record)), f"{path} line {reader.line_num}"))
  except csv.Error as error:
    raise FileTaskError(f"{path} line {reader.line_num}: {error}") from None
  return rows


# ----------------------------------------------------------------------------- columns, labels


def choose(wanted: str, have: Sequence[str], defaults: Sequence[str]) -> tuple[str | None, bool]:
  """Which of the names ``have`` to read, and whether a ``wanted`` name was missing.

  ``wanted`` "-" reads none; a name reads that name (missing: ``(None, True)``); "" reads the
  first of ``defaults`` present (none: ``(None, False)``). Shared by file columns and TFDS
  features, which word their errors each their own way.
  """
  if wanted == "-":
    return None, False
  if wanted:
    return (wanted, False) if wanted in have else (None, True)
  return next((c for c in defaults if c in have), None), False


def _column(rows: Sequence[Row], wanted: str, defaults: Sequence[str], what: str,
            path: str, required: bool = True) -> str | None:
  """The column to read: ``wanted``, else the first default the file has."""
  have = list(rows[0].fields)
  found, missing = choose(wanted, have, defaults)
  if missing:
    raise FileTaskError(f"{path}: no column {wanted!r} for the {what} (config.files); the "
                        f"file has {', '.join(have)}")
  if found is None and required and wanted != "-":
    raise FileTaskError(f"{path}: no {what} column (looked for {', '.join(defaults)}); the "
                        f"file has {', '.join(have)}: name it in config.files")
  return found


def _is_int(value: Any) -> bool:
  if isinstance(value, bool):
    return False
  if isinstance(value, int):
    return True
  try:
    return float(str(value)) == int(str(value).strip())
  except ValueError:
    return False


def _number(value: Any, where: str) -> float:
  try:
    number = float(value)
  except (TypeError, ValueError):
    number = float("nan")
  if not math.isfinite(number):
    raise FileTaskError(f"{where}: the label {value!r} is not a number (a regression task)")
  return number


def label_set(values: Sequence[Any]) -> tuple[str, ...]:
  """Class names in label order: integers in numeric order, otherwise sorted strings."""
  distinct = {str(v).strip() for v in values}
  if all(_is_int(v) for v in distinct):
    return tuple(str(k) for k in sorted(int(v) for v in distinct))
  return tuple(sorted(distinct))


@dataclasses.dataclass(frozen=True)
class Layout:
  """What a file task reads: its kind, columns and label set (fixed by the training file)."""

  kind: str
  text: str
  text_pair: str | None
  label: str
  choices: tuple[str, ...]
  label_names: tuple[str, ...]
  num_labels: int


def infer_layout(task: FileTask, rows: Sequence[Row]) -> Layout:
  """Kind, columns and label set from the training rows and ``config.files``."""
  path = task.train
  text = _column(rows, task.text, TEXT_COLUMNS, "text", path)
  pair = _column(rows, task.text_pair, PAIR_COLUMNS, "second text", path, required=False)
  label = _column(rows, task.label, (), "label", path)
  choices = tuple(c for c in task.choices.split("/") if c) if task.choices else ()
  kind = task.kind
  if kind == "auto":
    values = [r.fields[label] for r in rows]
    kind = ("multiple_choice" if choices else
            "regression" if not all(_is_int(v) for v in values)
            and all(_is_float(v) for v in values) else "classification")
  if kind == "multiple_choice":
    if not choices:
      raise FileTaskError("config.files.choices is empty: a multiple-choice task names its "
                          "choice columns (a/b/c) or the one JSON field holding the list")
    for c in choices:
      _column(rows, c, (), "choices", path)
    width = len(choices) if len(choices) > 1 else len(_choice_list(rows[0], choices))
    return Layout(kind, text, pair, label, choices, (), width)
  if kind == "regression":
    return Layout(kind, text, pair, label, (), (), 1)
  names = label_set([r.fields[label] for r in rows])
  if len(names) < 2:
    raise FileTaskError(f"{path}: the label column {label!r} holds one class only "
                        f"({names[0]!r}): a classifier needs two or more")
  return Layout(kind, text, pair, label, (), names, len(names))


def _is_float(value: Any) -> bool:
  try:
    return math.isfinite(float(value))
  except (TypeError, ValueError):
    return False


def _choice_list(row: Row, choices: Sequence[str]) -> list[str]:
  if len(choices) > 1:
    return [str(row.fields[c]) for c in choices]
  value = row.fields[choices[0]]
  if isinstance(value, str):
    try:
      value = json.loads(value)
    except json.JSONDecodeError:
      value = None
  if not isinstance(value, list) or not value:
    raise FileTaskError(f"{row.where}: the choices field {choices[0]!r} must hold a list of "
                        "texts")
  return [str(v) for v in value]


def to_record(layout: Layout, row: Row, labelled: bool = True) -> dict:
  """One row as a task record ``{"text_a", "text_b", "choices", "label"}`` (label -1: none)."""
  text_b = None if layout.text_pair is None else str(row.fields.get(layout.text_pair, ""))
  record = {"text_a": str(row.fields.get(layout.text, "")), "text_b": text_b, "choices": None,
            "label": -1}
  value = row.fields.get(layout.label)
  missing = value is None or (isinstance(value, str) and not value.strip())
  if missing and labelled:
    raise FileTaskError(f"{row.where}: no label in column {layout.label!r}")
  if layout.kind == "multiple_choice":
    choices = _choice_list(row, layout.choices)
    if len(choices) != layout.num_labels:
      raise FileTaskError(f"{row.where}: {len(choices)} choices, the training file's rows "
                          f"have {layout.num_labels}")
    record["choices"] = tuple(choices)
    if not missing:
      if not _is_int(value) or not 0 <= int(str(value).strip()) < layout.num_labels:
        raise FileTaskError(f"{row.where}: the label {value!r} must be the index of the right "
                            f"choice, 0..{layout.num_labels - 1}")
      record["label"] = int(str(value).strip())
  elif layout.kind == "regression":
    record["label"] = -1.0 if missing else _number(value, row.where)
  elif not missing:
    name = str(value).strip()
    if _is_int(name) and all(_is_int(n) for n in layout.label_names):
      name = str(int(name))
    if name not in layout.label_names:
      raise FileTaskError(f"{row.where}: the label {name!r} never occurs in the training file "
                          f"(its labels: {', '.join(layout.label_names)})")
    record["label"] = layout.label_names.index(name)
  return record


def held_out(record: Mapping[str, Any], share: float) -> bool:
  """Whether a training row is held out for validation: a hash of its texts, so the split
  does not depend on file order and equal rows fall on the same side."""
  key = json.dumps([record["text_a"], record["text_b"], record["choices"]])
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2 ** 64 < share


# ----------------------------------------------------------------------------- the task


def _cast(record: Mapping[str, Any]) -> list[casts.Example]:
  return [casts.Example(record["text_a"], record["text_b"], choices=record["choices"],
                        label=record["label"])]


class _Source:
  """The task's ``source`` hook: splits read on first use and kept."""

  def __init__(self, task: FileTask, layout: Layout,
               train_rows: Sequence[Row] | FileTaskError):
    self.task, self.layout, self._rows, self._splits = task, layout, train_rows, {}

  def __call__(self, split: str, data_dir: str | None = None) -> list[dict]:
    del data_dir
    if split not in self._splits:
      self._splits.update(self._read(split))
    return self._splits[split]

  def _read(self, split: str) -> dict[str, list[dict]]:
    task, layout = self.task, self.layout
    if split == "test":
      return {"test": [to_record(layout, r, labelled=False) for r in read_rows(task.test)]}
    if isinstance(self._rows, FileTaskError):
      raise self._rows
    rows = self._rows
    train = [to_record(layout, r) for r in rows]
    if task.validation:
      return {"train": train,
              "validation": [to_record(layout, r) for r in read_rows(task.validation)]}
    share = float(task.held_out)
    return {"train": [r for r in train if not held_out(r, share)],
            "validation": [r for r in train if held_out(r, share)]}


def register(name: str, block: Mapping[str, Any] | None = None,
             recorded: Mapping[str, Any] | None = None) -> tasks_lib.TaskSpec:
  """Registers the file task ``name`` (``file:PATH``) and returns its spec.

  Args:
    name: ``"file:" + the training file``.
    block: ``config.files`` (None: the defaults).
    recorded: a fine-tuned model's ``finetune.json``: its kind, label names and number of
      labels stand in for the training file's (``predict`` needs no data files).

  Raises:
    FileTaskError: bad settings, or (without ``recorded``) an unusable training file.
  """
  if not name.startswith(PREFIX) or not name[len(PREFIX):]:
    raise FileTaskError(f"task {name!r}: a file task is named file:PATH (the training file)")
  task = FileTask.from_config(name[len(PREFIX):],
                              {k: v for k, v in (block or {}).items() if k != "train"})
  known = recorded if recorded and recorded.get("kind") in METRICS else None
  try:
    rows = read_rows(task.train)
    layout = _as_recorded(infer_layout(task, rows), known)
    source = _Source(task, layout, rows)
    for split in ("train", "validation") + (("test",) if task.test else ()):
      source(split)  # every file read and checked now, before anything else of the run
  except FileTaskError as error:
    if known is None:
      raise
    # The model's record stands in (predict needs no data); reading a split says why not.
    layout = _as_recorded(Layout(known["kind"], "", None, task.label, (), (), 1), known)
    source = _Source(task, layout, error)
  spec = tasks_lib.TaskSpec(
      name=name, builder=None, kind=layout.kind, num_labels=layout.num_labels, cast=_cast,
      metrics=METRICS[layout.kind], label_names=layout.label_names,
      test_splits=("test",) if task.test else (), source=source)
  tasks_lib.register_task(spec, overwrite=True)
  _SETTINGS[name] = dataclasses.asdict(task)
  return spec


def _as_recorded(layout: Layout, recorded: Mapping[str, Any] | None) -> Layout:
  """A fine-tuned model's kind and classes (in its head's order) over the files' own."""
  if recorded is None:
    return layout
  return dataclasses.replace(layout, kind=recorded["kind"],
                             label_names=tuple(recorded.get("label_names") or ()),
                             num_labels=int(recorded["num_labels"]))


_SETTINGS: dict[str, dict] = {}


def source_digest(task: FileTask) -> str:
  """sha256 over the task's files (train, validation, test: each path and its bytes' sha256):
  what a result on the task was made from, so a cached result goes stale with its data."""
  sha = hashlib.sha256()
  for path in (task.train, task.validation, task.test):
    if path:
      content = hashlib.sha256(epath.Path(path).read_bytes()).hexdigest()
      sha.update(f"{path}:{content}\n".encode())
  return sha.hexdigest()


def settings(name: str) -> dict | None:
  """The ``config.files`` a registered file task was read with (kept in ``finetune.json``)."""
  return _SETTINGS.get(name)
