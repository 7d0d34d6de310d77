"""Leaderboard submission files for GLUE (``.tsv``) and SuperGLUE (``.jsonl``).

GLUE wants one ``<Task>.tsv`` per test set with a header ``index<TAB>prediction``; NLI tasks
(MNLI, AX, QNLI, RTE) write label strings (``entailment``, ``neutral``, ``contradiction``,
``not_entailment``), the other classification tasks write 0/1, STS-B a score in [0, 5].
SuperGLUE wants one ``<Task>.jsonl`` per test set with ``{"idx": ..., "label": ...}`` lines:
BoolQ and WiC ``"true"/"false"``, WSC ``"True"/"False"``, CB / RTE / AX-b / AX-g label
strings, COPA the chosen choice 0/1, ReCoRD the answer text (``idx`` is the query's), and
MultiRC one line per paragraph nesting questions and answers::

  {"idx": p, "passage": {"questions": [{"idx": q, "answers": [{"idx": a, "label": 0/1}]}]}}

``predictions`` are aligned with the split's records (what ``tasks.gather_predictions``
returns for these tasks). Rows are written in ``idx`` order since TFDS array_record sources
store records shuffled. Files are written to a temporary name and renamed, so a crash never
leaves a half-written submission.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Sequence

import numpy as np

from bort_jax.finetune import casts
from bort_jax.finetune import tasks as tasks_lib
from bort_jax.runtime.fileio import atomic_write_text

GLUE_FILES = {
    ("glue/cola", "test"): "CoLA.tsv",
    ("glue/sst2", "test"): "SST-2.tsv",
    ("glue/mrpc", "test"): "MRPC.tsv",
    ("glue/stsb", "test"): "STS-B.tsv",
    ("glue/qqp", "test"): "QQP.tsv",
    ("glue/mnli", "test_matched"): "MNLI-m.tsv",
    ("glue/mnli", "test_mismatched"): "MNLI-mm.tsv",
    ("glue/mnli_matched", "test"): "MNLI-m.tsv",
    ("glue/mnli_mismatched", "test"): "MNLI-mm.tsv",
    ("glue/qnli", "test"): "QNLI.tsv",
    ("glue/rte", "test"): "RTE.tsv",
    ("glue/wnli", "test"): "WNLI.tsv",
    ("glue/ax", "test"): "AX.tsv",
}

SUPERGLUE_FILES = {
    "super_glue/boolq": "BoolQ.jsonl",
    "super_glue/cb": "CB.jsonl",
    "super_glue/copa": "COPA.jsonl",
    "super_glue/multirc": "MultiRC.jsonl",
    "super_glue/record": "ReCoRD.jsonl",
    "super_glue/rte": "RTE.jsonl",
    "super_glue/wic": "WiC.jsonl",
    "super_glue/wsc": "WSC.jsonl",
    "super_glue/axb": "AX-b.jsonl",
    "super_glue/axg": "AX-g.jsonl",
}

# GLUE tasks whose server expects label strings; the rest take the class id.
_GLUE_STRING_LABELS = {"glue/mnli", "glue/mnli_matched", "glue/mnli_mismatched", "glue/ax",
                       "glue/qnli", "glue/rte"}
_SUPERGLUE_BOOLS = {"super_glue/boolq": ("false", "true"), "super_glue/wic": ("false", "true"),
                    "super_glue/wsc": ("False", "True")}


def submission_file_name(task: str, split: str = "test") -> str:
  """The file name the leaderboard expects for ``task``'s ``split``.

  Raises:
    ValueError: the task/split has no leaderboard file.
  """
  name = tasks_lib.get_task(task).name
  if (name, split) in GLUE_FILES:
    return GLUE_FILES[(name, split)]
  if name in SUPERGLUE_FILES and split == "test":
    return SUPERGLUE_FILES[name]
  known = sorted({f"{t}:{s}" for t, s in GLUE_FILES} | {f"{t}:test" for t in SUPERGLUE_FILES})
  raise ValueError(f"no leaderboard file for task {name!r} split {split!r}; known: "
                   f"{', '.join(known)}")


def _class_id(value: Any, spec: tasks_lib.TaskSpec, n_classes: int) -> int:
  k = int(value)
  if not 0 <= k < n_classes:
    raise ValueError(f"task {spec.name!r}: prediction {value!r} is not a class id in "
                     f"[0, {n_classes})")
  return k


def _write_lines(path: str, lines: list[str]) -> None:
  atomic_write_text(path, "".join(line + "\n" for line in lines))


def _glue_value(spec: tasks_lib.TaskSpec, pred: Any) -> str:
  if spec.kind == "regression":
    # The server scores STS-B in [0, 5]; clip out-of-range regressions.
    return f"{min(max(float(pred), 0.0), 5.0):.3f}"
  k = _class_id(pred, spec, spec.num_labels)
  return spec.label_names[k] if spec.name in _GLUE_STRING_LABELS else str(k)


def _superglue_value(spec: tasks_lib.TaskSpec, pred: Any) -> Any:
  if spec.name == "super_glue/record":
    return casts.as_text(pred) if not isinstance(pred, str) else pred
  if spec.name == "super_glue/copa":
    return _class_id(pred, spec, 2)
  if spec.name in _SUPERGLUE_BOOLS:
    return _SUPERGLUE_BOOLS[spec.name][_class_id(pred, spec, 2)]
  return spec.label_names[_class_id(pred, spec, len(spec.label_names))]


def _multirc_lines(spec, records, predictions) -> list[str]:
  nested: dict[int, dict[int, list]] = collections.defaultdict(
      lambda: collections.defaultdict(list))
  for record, pred in zip(records, predictions):
    idx = record["idx"]
    answer = {"idx": casts.as_int(idx["answer"]), "label": _class_id(pred, spec, 2)}
    nested[casts.as_int(idx["paragraph"])][casts.as_int(idx["question"])].append(answer)
  lines = []
  for p in sorted(nested):
    questions = [{"idx": q, "answers": sorted(nested[p][q], key=lambda a: a["idx"])}
                 for q in sorted(nested[p])]
    lines.append(json.dumps({"idx": p, "passage": {"questions": questions}}))
  return lines


def write_submission(task: str, records: Sequence, predictions: Sequence, out_dir: str,
                     split: str = "test") -> str:
  """Writes one leaderboard file.

  Args:
    task: registered task name.
    records: the split's records (their ``idx`` fields key the rows).
    predictions: one per record: class id, STS-B score, or ReCoRD entity text.
    out_dir: directory to write into (created if missing).
    split: the test split (``test_matched`` / ``test_mismatched`` for ``glue/mnli``).

  Returns:
    The path written.
  """
  spec = tasks_lib.get_task(task)
  file_name = submission_file_name(spec.name, split)
  if len(records) != len(predictions):
    raise ValueError(f"task {spec.name!r}: {len(predictions)} predictions for "
                     f"{len(records)} records")
  records = [records[i] for i in range(len(records))]
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, file_name)
  if spec.name == "super_glue/multirc":
    _write_lines(path, _multirc_lines(spec, records, predictions))
    return path
  if spec.name == "super_glue/record":
    keys = [casts.as_int(r["idx"]["query"]) for r in records]
  else:
    keys = [casts.as_int(r["idx"]) for r in records]
  if len(set(keys)) != len(keys):
    raise ValueError(f"task {spec.name!r}: duplicate idx values among the records")
  order = np.argsort(keys, kind="stable")
  if file_name.endswith(".tsv"):
    lines = ["index\tprediction"]
    lines += [f"{keys[i]}\t{_glue_value(spec, predictions[i])}" for i in order]
  else:
    lines = [json.dumps({"idx": keys[i], "label": _superglue_value(spec, predictions[i])})
             for i in order]
  _write_lines(path, lines)
  return path
