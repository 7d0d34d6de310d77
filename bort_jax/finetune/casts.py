"""Casts: how one raw GLUE / SuperGLUE / RACE record becomes model text (docs/BORT.md section 5).

The task registry (``tasks.py``) names a cast, a decoder and a grouping per task; they live here
so the registry stays a table. Text comes back as ``bytes`` from a real array_record source and
as ``str`` from ``tfds.testing.mock_data``; every cast goes through :func:`as_text`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Hashable, Mapping

import numpy as np

Record = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Example:
  """One model input cast from a raw record.

  Attributes:
    text_a: first segment (for multiple choice, the context shared by every choice).
    text_b: second segment, or None for single-sentence tasks.
    choices: multiple choice only: the second segment of each choice.
    label: class id, float score (regression), 1/0 (candidates), or -1 when unlabeled.
    example_id: position of the source record in its split (set by :func:`cast_split`).
    candidate: position of this example among those cast from the same record.
  """

  text_a: str
  text_b: str | None = None
  choices: tuple[str, ...] | None = None
  label: int | float = -1
  example_id: int = -1
  candidate: int = 0




# ----------------------------------------------------------------------------- record values


def as_text(value: Any) -> str:
  """Normalises a TFDS text value (bytes, str, numpy scalar) to ``str``."""
  if isinstance(value, np.ndarray):
    value = value.item() if value.ndim == 0 else value
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  if isinstance(value, str):
    return str(value)
  raise TypeError(f"expected a text value, got {type(value).__name__}: {value!r}")


def as_texts(values: Any) -> list[str]:
  """Normalises a TFDS text sequence (list or numpy array of bytes/str) to ``list[str]``."""
  return [as_text(v) for v in np.asarray(values, dtype=object).reshape(-1)]


def as_int(value: Any) -> int:
  """A TFDS scalar (numpy 0-d array, numpy int, int) as a Python int."""
  return int(np.asarray(value).item())


def label_of(record: Record) -> int:
  # Test splits of GLUE/SuperGLUE carry -1; a record without a label is unlabeled too.
  return as_int(record["label"]) if "label" in record else -1


# ----------------------------------------------------------------------------- casts


def pair_cast(text_a: str, text_b: str | None = None, *, label: str = "label",
              regression: bool = False) -> Callable[[Record], list[Example]]:
  """Cast for single-sentence and sentence-pair tasks.

  Args:
    text_a: feature holding the first segment.
    text_b: feature holding the second segment, or None.
    label: feature holding the label.
    regression: keep the label as a float.

  Returns:
    ``cast(record) -> [Example]``.
  """

  def cast(record: Record) -> list[Example]:
    a = as_text(record[text_a])
    b = as_text(record[text_b]) if text_b else None
    if regression:
      value = float(np.asarray(record[label]).item()) if label in record else -1.0
    else:
      value = as_int(record[label]) if label in record else -1
    return [Example(a, b, label=value)]

  return cast


def cast_wic(record: Record) -> list[Example]:
  # The target word leads the first segment so the model knows which word to compare.
  word = as_text(record["word"])
  return [Example(f"{word}: {as_text(record['sentence1'])}", as_text(record["sentence2"]),
                  label=label_of(record))]


def cast_wsc(record: Record) -> list[Example]:
  # span2 is the pronoun, span1 the candidate referent (docs/BORT.md section 5).
  claim = f"{as_text(record['span2_text'])} means {as_text(record['span1_text'])}"
  return [Example(as_text(record["text"]), claim, label=label_of(record))]


_COPA_CONNECTORS = {"cause": " because ", "effect": " so "}


def cast_copa(record: Record) -> list[Example]:
  premise = as_text(record["premise"]).strip()
  question = as_text(record["question"]).strip()
  # A question that is neither cause nor effect (mock data) falls back to "because".
  connector = _COPA_CONNECTORS.get(question, " because ")
  # Drop the premise's final full stop so the joined text reads as one sentence.
  if premise.endswith("."):
    premise = premise[:-1]
  answer = label_of(record)
  out = []
  for j, key in enumerate(("choice1", "choice2")):
    label = -1 if answer < 0 else int(answer == j)
    out.append(Example(premise + connector + as_text(record[key]).strip(), None,
                       label=label, candidate=j))
  return out


def cast_multirc(record: Record) -> list[Example]:
  qa = f"{as_text(record['question'])} {as_text(record['answer'])}"
  return [Example(as_text(record["paragraph"]), qa, label=label_of(record))]


def record_passage(record: Record) -> str:
  # ReCoRD passages mark the article's summary bullets with "@highlight"; make them sentences.
  return as_text(record["passage"]).replace("@highlight\n", "- ")


def cast_record(record: Record) -> list[Example]:
  passage = record_passage(record)
  query = as_text(record["query"])
  entities = as_texts(record["entities"])
  answers = set(as_texts(record["answers"]))
  out = []
  for j, entity in enumerate(entities):
    label = int(entity in answers) if answers else -1
    out.append(Example(passage, query.replace("@placeholder", entity), label=label,
                       candidate=j))
  return out


RACE_CHOICES = 4
RACE_LETTERS = "ABCD"


def cast_race(record: Record) -> list[Example]:
  article = as_text(record["article"])
  questions = as_texts(record["questions"])
  answers = as_texts(record["answers"])
  options = record["options"]
  where = f"RACE record {as_text(record['example_id'])!r}" if "example_id" in record else \
      "RACE record"
  if len(options) != len(questions):
    raise ValueError(f"{where}: {len(questions)} questions but {len(options)} option lists")
  if answers and len(answers) != len(questions):
    raise ValueError(f"{where}: {len(questions)} questions but {len(answers)} answers")
  out = []
  for i, question in enumerate(questions):
    choices = as_texts(options[i])
    if len(choices) != RACE_CHOICES:
      raise ValueError(f"{where}, question {i}: expected {RACE_CHOICES} options, "
                       f"got {len(choices)}")
    if answers:
      if answers[i] not in RACE_LETTERS:
        raise ValueError(f"{where}, question {i}: answer {answers[i]!r} is not one of "
                         f"{', '.join(RACE_LETTERS)}")
      label = RACE_LETTERS.index(answers[i])
    else:
      label = -1
    out.append(Example(f"{article} {question}", None, choices=tuple(choices), label=label,
                       candidate=i))
  return out


# ----------------------------------------------------------------------------- decoders


def decode_argmax(record: Record, scores: np.ndarray) -> int:
  del record  # the winning candidate's position is the prediction (COPA: choice index)
  return int(np.argmax(scores))


def decode_binary(record: Record, scores: np.ndarray) -> int:
  del record  # MultiRC: each record is one answer option, positive when log-odds > 0
  return int(scores[0] > 0)


def decode_record(record: Record, scores: np.ndarray) -> str:
  entities = as_texts(record["entities"])
  return entities[int(np.argmax(scores))] if len(scores) else ""


def reference_record(record: Record) -> list[str]:
  return as_texts(record["answers"])


def group_multirc(record: Record) -> Hashable:
  idx = record["idx"]
  return (as_int(idx["paragraph"]), as_int(idx["question"]))


def group_pairs(record: Record) -> Hashable:
  # AX-g lists each Winogender minimal pair as consecutive idx values (2k, 2k + 1).
  return as_int(record["idx"]) // 2
