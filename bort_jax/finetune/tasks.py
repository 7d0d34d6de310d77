"""Task registry: GLUE, SuperGLUE and RACE read through TFDS and cast into model inputs.

A :class:`TaskSpec` says where a task's records come from (a TFDS catalog builder such as
``glue/rte``, or a ``source`` hook for local tasks), which splits it has, what the model
predicts (``kind``) and how one raw record becomes model text (``cast``). The casting follows
docs/BORT.md section 5:

* COPA: ``premise + " because " / " so " + choice``, one binary example per choice, the more
  plausible choice wins;
* WSC: ``text`` vs ``"<span2> means <span1>"``, binary;
* ReCoRD: one binary example per candidate entity (the query with ``@placeholder`` filled in),
  the best-scoring entity wins;
* MultiRC: ``(passage, question + answer)``, binary, grouped back by question for the metrics;
* RACE: ``(article + question, option)`` for each of the 4 options, 4-way multiple choice;
* multi-class tasks (MNLI, CB, AX) keep their classes for plain fine-tuning.

:func:`make_batches` turns records into the Task batch of docs/INTERFACES.md, and
:func:`gather_predictions` turns model outputs back into one prediction per scored unit (a
record, or a RACE question), ready for ``metrics.compute_metrics`` and ``submission``.

The casts themselves, their decoders and groupings live in ``casts.py``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import types
from typing import Any, Callable, Hashable, Iterator, Protocol, Sequence

import numpy as np

from bort_jax.finetune import casts
from bort_jax.finetune.casts import RACE_CHOICES, Example, Record, pair_cast

KINDS = ("classification", "regression", "multiple_choice", "candidates")


class Tokenizer(Protocol):
  """What the task pipeline needs from a tokenizer (see ``data/tokenization.py``)."""

  pad_id: int

  def encode_pair(self, a: str, b: str | None, max_length: int
                  ) -> tuple[Sequence[int], Sequence[int]]:
    """Returns ``(ids, type_ids)`` of at most ``max_length`` tokens, specials included."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """How to load, cast and score one task.

  Attributes:
    name: registry name, e.g. ``"glue/rte"``.
    builder: TFDS name with config (``"super_glue/wsc.fixed"``); None when ``source`` is set.
    kind: one of :data:`KINDS`. ``candidates`` tasks are scored per candidate with a binary
      head and grouped back per record by ``decode``.
    num_labels: size of the model head: classes, 1 (regression), choices (multiple choice),
      2 (candidates).
    cast: ``cast(record) -> list[Example]``.
    metrics: metric names understood by ``metrics.compute_metrics``.
    label_names: class names in TFDS label order (used by the submission writers).
    train_split: split to fine-tune on, or None for evaluation-only sets.
    validation_splits: labelled evaluation splits.
    test_splits: leaderboard splits (labels are -1 there, except RACE's).
    train_task: for diagnostic sets, the task whose model makes the predictions.
    source: ``source(split, data_dir) -> sequence of records``, used instead of TFDS.
    decode: candidates only: ``decode(record, scores) -> prediction`` where ``scores`` are the
      per-candidate log-odds of the positive class.
    reference: candidates only: ``reference(record) -> gold label`` for the metrics.
    group: ``group(record) -> hashable`` when a metric needs groups (MultiRC questions,
      AX-g pronoun pairs).
  """

  name: str
  builder: str | None
  kind: str
  num_labels: int
  cast: Callable[[Record], list[Example]]
  metrics: tuple[str, ...] = ("accuracy",)
  label_names: tuple[str, ...] = ()
  train_split: str | None = "train"
  validation_splits: tuple[str, ...] = ("validation",)
  test_splits: tuple[str, ...] = ("test",)
  train_task: str | None = None
  source: Callable[[str, str | None], Sequence[Record]] | None = None
  decode: Callable[[Record, np.ndarray], Any] | None = None
  reference: Callable[[Record], Any] | None = None
  group: Callable[[Record], Hashable] | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"task {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
    if not isinstance(self.num_labels, int) or self.num_labels < 1:
      raise ValueError(f"task {self.name!r}: num_labels must be a positive int, "
                       f"got {self.num_labels!r}")
    if self.builder is None and self.source is None:
      raise ValueError(f"task {self.name!r}: needs a TFDS builder name or a source hook")
    if self.kind == "candidates" and (self.decode is None or self.reference is None):
      raise ValueError(f"task {self.name!r}: candidates tasks need decode and reference hooks")
    if self.kind == "regression" and self.num_labels != 1:
      raise ValueError(f"task {self.name!r}: a regression head has num_labels=1")

  @property
  def splits(self) -> tuple[str, ...]:
    """Every split this task knows, train first."""
    head = (self.train_split,) if self.train_split else ()
    return head + self.validation_splits + self.test_splits


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec, *, overwrite: bool = False) -> TaskSpec:
  """Adds a task to the registry.

  Args:
    spec: the task.
    overwrite: replace an existing task of the same name instead of raising.

  Returns:
    ``spec``.
  """
  if not isinstance(spec, TaskSpec):
    raise TypeError(f"register_task expects a TaskSpec, got {type(spec).__name__}")
  if spec.name in _REGISTRY and not overwrite:
    raise ValueError(f"task {spec.name!r} is already registered (pass overwrite=True)")
  _REGISTRY[spec.name] = spec
  return spec


def task_names() -> list[str]:
  """Sorted names of every registered task."""
  return sorted(_REGISTRY)


def get_task(name: str | TaskSpec) -> TaskSpec:
  """Looks a task up by name (a TaskSpec passes through).

  Raises:
    ValueError: the name is unknown; the message lists the known names.
  """
  if isinstance(name, TaskSpec):
    return name
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}") \
        from None


_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")


def _glue(config: str, cast, *, kind="classification", num_labels=2, metrics=("accuracy",),
          label_names=(), **kwargs) -> TaskSpec:
  return TaskSpec(name=f"glue/{config}", builder=f"glue/{config}", kind=kind,
                  num_labels=num_labels, cast=cast, metrics=metrics,
                  label_names=label_names, **kwargs)


def _super_glue(config: str, cast, *, name=None, kind="classification", num_labels=2,
                metrics=("accuracy",), label_names=("False", "True"), **kwargs) -> TaskSpec:
  return TaskSpec(name=f"super_glue/{name or config}", builder=f"super_glue/{config}",
                  kind=kind, num_labels=num_labels, cast=cast, metrics=metrics,
                  label_names=label_names, **kwargs)


_TEST_ONLY = dict(train_split=None, validation_splits=())
_MNLI_EVAL = dict(train_split=None, train_task="glue/mnli", num_labels=3, label_names=_NLI3)

_BUILTIN = [
    _glue("cola", pair_cast("sentence"), metrics=("mcc",),
          label_names=("unacceptable", "acceptable")),
    _glue("sst2", pair_cast("sentence"), label_names=("negative", "positive")),
    _glue("mrpc", pair_cast("sentence1", "sentence2"), metrics=("f1", "accuracy"),
          label_names=("not_equivalent", "equivalent")),
    _glue("qqp", pair_cast("question1", "question2"), metrics=("f1", "accuracy"),
          label_names=("not_duplicate", "duplicate")),
    _glue("stsb", pair_cast("sentence1", "sentence2", regression=True), kind="regression",
          num_labels=1, metrics=("pearson", "spearman")),
    _glue("mnli", pair_cast("premise", "hypothesis"), num_labels=3, label_names=_NLI3,
          validation_splits=("validation_matched", "validation_mismatched"),
          test_splits=("test_matched", "test_mismatched")),
    _glue("mnli_matched", pair_cast("premise", "hypothesis"), **_MNLI_EVAL),
    _glue("mnli_mismatched", pair_cast("premise", "hypothesis"), **_MNLI_EVAL),
    _glue("qnli", pair_cast("question", "sentence"), label_names=_NLI2),
    _glue("rte", pair_cast("sentence1", "sentence2"), label_names=_NLI2),
    _glue("wnli", pair_cast("sentence1", "sentence2"),
          label_names=("not_entailment", "entailment")),
    _glue("ax", pair_cast("premise", "hypothesis"), num_labels=3, label_names=_NLI3,
          metrics=("mcc",), train_task="glue/mnli", **_TEST_ONLY),
    _super_glue("boolq", pair_cast("passage", "question")),
    _super_glue("cb", pair_cast("premise", "hypothesis"), num_labels=3,
                metrics=("accuracy", "macro_f1"),
                label_names=("entailment", "contradiction", "neutral")),
    _super_glue("copa", casts.cast_copa, kind="candidates", decode=casts.decode_argmax,
                reference=casts.label_of, label_names=("choice1", "choice2")),
    _super_glue("multirc", casts.cast_multirc, kind="candidates", metrics=("f1a", "em"),
                decode=casts.decode_binary, reference=casts.label_of,
                group=casts.group_multirc),
    _super_glue("record", casts.cast_record, kind="candidates",
                metrics=("token_f1", "exact_match"),
                decode=casts.decode_record, reference=casts.reference_record, label_names=()),
    _super_glue("rte", pair_cast("premise", "hypothesis"), label_names=_NLI2),
    _super_glue("wic", casts.cast_wic),
    # wsc.fixed repairs spans that are not substrings of the text; it is the one to use.
    _super_glue("wsc.fixed", casts.cast_wsc, name="wsc"),
    _super_glue("axb", pair_cast("sentence1", "sentence2"), metrics=("mcc",),
                label_names=_NLI2, train_task="super_glue/rte", **_TEST_ONLY),
    _super_glue("axg", pair_cast("premise", "hypothesis"),
                metrics=("accuracy", "gender_parity"), label_names=_NLI2,
                train_task="super_glue/rte", group=casts.group_pairs, **_TEST_ONLY),
]
_BUILTIN += [
    TaskSpec(name=f"race/{level}", builder=f"race/{level}", kind="multiple_choice",
             num_labels=RACE_CHOICES, cast=casts.cast_race, metrics=("accuracy",),
             label_names=tuple(casts.RACE_LETTERS), validation_splits=("dev",))
    for level in ("high", "middle")
]
for _spec in _BUILTIN:
  register_task(_spec)


# ----------------------------------------------------------------------------- loading

_TFDS_READY = False


def _prepare_tfds():
  """Registers glue/super_glue with TFDS and lets SuperGLUE build its features without TF."""
  global _TFDS_READY
  if _TFDS_READY:
    return
  import tensorflow_datasets as tfds  # slow import; only when a TFDS task is loaded
  # glue and super_glue register lazily: touching a class imports tensorflow_datasets.text.
  _ = tfds.text.Glue
  from tensorflow_datasets.text import super_glue
  # SuperGlue._info() reads tf.int32 from a lazily imported TensorFlow; without TF that
  # import fails, and np.int32 is the same feature dtype to TFDS.
  if importlib.util.find_spec("tensorflow") is None:
    super_glue.tf = types.SimpleNamespace(int32=np.int32)
  _TFDS_READY = True


def load_split(task: str | TaskSpec, split: str, data_dir: str | None = None, *,
               download: bool = False) -> Sequence[Record]:
  """Random-access records of one split.

  Args:
    task: task name or spec.
    split: one of ``task.splits``.
    data_dir: TFDS data directory (passed to the source hook for local tasks).
    download: let TFDS download and prepare missing data (off: this project is offline first).

  Returns:
    A sequence supporting ``len`` and integer indexing.
  """
  spec = get_task(task)
  if split not in spec.splits:
    raise ValueError(f"task {spec.name!r} has no split {split!r}; its splits: "
                     f"{', '.join(spec.splits)}")
  if spec.source is not None:
    return spec.source(split, data_dir)
  _prepare_tfds()
  import tensorflow_datasets as tfds
  return tfds.data_source(spec.builder, split=split, data_dir=data_dir, download=download)


def cast_split(task: str | TaskSpec, records: Sequence[Record]) -> list[Example]:
  """Casts every record, numbering examples by record position and candidate.

  Args:
    task: task name or spec.
    records: the split's records.

  Returns:
    Flat list of examples, record order, candidates in order within a record.
  """
  spec = get_task(task)
  out = []
  for i in range(len(records)):
    for j, ex in enumerate(spec.cast(records[i])):
      out.append(dataclasses.replace(ex, example_id=i, candidate=j))
  return out


# ----------------------------------------------------------------------------- batching


def _encode(tokenizer: Tokenizer, a: str, b: str | None, seq_len: int
            ) -> tuple[np.ndarray, np.ndarray]:
  ids, types_ = tokenizer.encode_pair(a, b, seq_len)
  if len(ids) > seq_len or len(types_) != len(ids):
    raise ValueError(f"tokenizer.encode_pair returned {len(ids)} ids / {len(types_)} type ids "
                     f"for max_length={seq_len}")
  return np.asarray(ids, np.int32), np.asarray(types_, np.int32)


def _fill(row_ids, row_types, row_mask, ids, types_):
  row_ids[:len(ids)] = ids
  row_types[:len(ids)] = types_
  row_mask[:len(ids)] = 1


def batch_examples(task: str | TaskSpec, examples: Sequence[Example], tokenizer: Tokenizer,
                   seq_len: int, batch_size: int, shuffle_seed: int | None = None,
                   epoch: int = 0, *, drop_remainder: bool = False, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Tokenises cast examples into Task batches (docs/INTERFACES.md), lazily per batch.

  Args:
    task: task name or spec.
    examples: output of :func:`cast_split`.
    tokenizer: anything with ``encode_pair(a, b, max_length) -> (ids, type_ids)`` and
      ``pad_id``.
    seq_len: padded length T.
    batch_size: global batch size; this process yields ``batch_size // process_count`` rows.
    shuffle_seed: None keeps example order; else the order is a function of (seed, epoch).
    epoch: epoch number, folded into the shuffle.
    drop_remainder: drop a final partial batch instead of padding it with weight-0 rows.
    process_index: this process's index.
    process_count: number of processes sharing each global batch.

  Yields:
    Dicts of numpy arrays: ``input_ids, attention_mask, token_type_ids`` int32 ``[B, T]``
    (``[B, C, T]`` for multiple choice), ``label`` int32 (float32 for regression, -1 when
    unlabeled), ``example_id`` and ``candidate`` int32 ``[B]`` (-1 on padding rows) and
    ``weight`` float32 ``[B]`` (0 on padding rows).
  """
  spec = get_task(task)
  if batch_size < 1 or seq_len < 2:
    raise ValueError(f"need batch_size >= 1 and seq_len >= 2, got {batch_size}, {seq_len}")
  if not 0 <= process_index < process_count or batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} must split evenly over {process_count} "
                     f"processes and process_index {process_index} be one of them")
  local = batch_size // process_count
  order = np.arange(len(examples))
  if shuffle_seed is not None:
    order = np.random.default_rng([shuffle_seed, epoch]).permutation(len(examples))
  multiple = spec.kind == "multiple_choice"
  label_dtype = np.float32 if spec.kind == "regression" else np.int32
  shape = (local, spec.num_labels, seq_len) if multiple else (local, seq_len)
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    if len(chunk) < batch_size and drop_remainder:
      return
    mine = chunk[process_index * local:(process_index + 1) * local]
    batch = {
        "input_ids": np.full(shape, tokenizer.pad_id, np.int32),
        "attention_mask": np.zeros(shape, np.int32),
        "token_type_ids": np.zeros(shape, np.int32),
        "label": np.full((local,), -1, label_dtype),
        "example_id": np.full((local,), -1, np.int32),
        "candidate": np.full((local,), -1, np.int32),
        "weight": np.zeros((local,), np.float32),
    }
    for row, k in enumerate(mine):
      ex = examples[k]
      if multiple:
        if ex.choices is None or len(ex.choices) != spec.num_labels:
          raise ValueError(f"task {spec.name!r}, example {ex.example_id}: expected "
                           f"{spec.num_labels} choices, got {ex.choices!r}")
        for c, choice in enumerate(ex.choices):
          ids, types_ = _encode(tokenizer, ex.text_a, choice, seq_len)
          _fill(batch["input_ids"][row, c], batch["token_type_ids"][row, c],
                batch["attention_mask"][row, c], ids, types_)
      else:
        ids, types_ = _encode(tokenizer, ex.text_a, ex.text_b, seq_len)
        _fill(batch["input_ids"][row], batch["token_type_ids"][row],
              batch["attention_mask"][row], ids, types_)
      batch["label"][row] = ex.label
      batch["example_id"][row] = ex.example_id
      batch["candidate"][row] = ex.candidate
      batch["weight"][row] = 1.0
    yield batch


def make_batches(task: str | TaskSpec, records: Sequence[Record], tokenizer: Tokenizer,
                 seq_len: int, batch_size: int, shuffle_seed: int | None = None,
                 epoch: int = 0, **kwargs) -> Iterator[dict[str, np.ndarray]]:
  """Casts records and yields Task batches; see :func:`batch_examples` for the arguments.

  Args:
    task: task name or spec.
    records: the split's records (from :func:`load_split`).
    tokenizer: the tokenizer wrapper.
    seq_len: padded length.
    batch_size: global batch size.
    shuffle_seed: None for example order, else shuffled by (seed, epoch).
    epoch: epoch number.
    **kwargs: ``drop_remainder``, ``process_index``, ``process_count``.

  Returns:
    An iterator of batches.
  """
  spec = get_task(task)
  return batch_examples(spec, cast_split(spec, records), tokenizer, seq_len, batch_size,
                        shuffle_seed, epoch, **kwargs)


# ----------------------------------------------------------------------------- predictions


@dataclasses.dataclass
class Predictions:
  """Model outputs grouped back into scored units, aligned lists.

  Attributes:
    predictions: one per unit (class id, float, entity string, ...).
    labels: gold label per unit (-1 / empty when unlabeled).
    groups: int group id per unit when the task's metrics need groups, else None.
    record_index: position of each unit's record in the split.
  """

  predictions: list
  labels: list
  groups: list[int] | None
  record_index: list[int]


def gather_predictions(task: str | TaskSpec, records: Sequence[Record], example_id,
                       candidate, logits, weight=None) -> Predictions:
  """Groups per-row model outputs (from batches in any order) into per-unit predictions.

  Args:
    task: task name or spec.
    records: the split's records, as passed to :func:`make_batches`.
    example_id: ``[N]`` from the batches.
    candidate: ``[N]`` from the batches.
    logits: ``[N, num_labels]`` (``[N]`` or ``[N, 1]`` for regression).
    weight: ``[N]``; rows with weight 0 (padding) are dropped.

  Returns:
    :class:`Predictions`. Units are records for every task except RACE (one per question).
  """
  spec = get_task(task)
  example_id = np.asarray(example_id).reshape(-1)
  candidate = np.asarray(candidate).reshape(-1)
  logits = np.asarray(logits, np.float64)
  logits = logits.reshape(len(example_id), -1)
  keep = np.ones(len(example_id), bool) if weight is None else np.asarray(weight) > 0
  outputs = {(int(e), int(c)): logits[n] for n, (e, c, k)
             in enumerate(zip(example_id, candidate, keep)) if k}

  def lookup(i, j):
    try:
      return outputs[(i, j)]
    except KeyError:
      raise ValueError(f"task {spec.name!r}: no model output for record {i}, "
                       f"candidate {j}") from None

  preds, labels, groups, index = [], [], [], []
  for i in range(len(records)):
    record = records[i]
    examples = spec.cast(record)
    if spec.kind == "candidates":
      rows = [lookup(i, j) for j in range(len(examples))]
      # Log-odds of the positive class rank the candidates of one record.
      scores = np.array([r[1] - r[0] if len(r) > 1 else r[0] for r in rows])
      preds.append(spec.decode(record, scores))
      labels.append(spec.reference(record))
      units = 1
    else:
      for j, ex in enumerate(examples):
        row = lookup(i, j)
        preds.append(float(row[0]) if spec.kind == "regression" else int(np.argmax(row)))
        labels.append(ex.label)
      units = len(examples)
    index += [i] * units
    if spec.group is not None:
      groups += [spec.group(record)] * units
  group_ids = None
  if spec.group is not None:
    numbering: dict[Hashable, int] = {}
    group_ids = [numbering.setdefault(g, len(numbering)) for g in groups]
  return Predictions(preds, labels, group_ids, index)
