"""``bort-jax predict``: a fine-tuned checkpoint on your own text -> labels and probabilities.

    bort-jax predict --checkpoint runs/ft/best --text "a gripping, funny film"
    bort-jax predict --checkpoint runs/ft/best --text "The claim." --text-b "The evidence."
    bort-jax predict --checkpoint runs/ft/best --input mine.jsonl --output predictions.jsonl
    bort-jax predict --checkpoint runs/ft/onnx --runtime onnxruntime-int8 --text "a dull film"

Inputs: ``--text`` (repeatable) with an optional ``--text-b`` per text (sentence pairs) and,
for multiple-choice tasks, ``--choice`` (repeatable, one set shared by every text); or
``--input``: JSON lines with ``text`` (or ``text_a``), optional ``text_b`` and ``choices``,
or a TSV file with one ``text_a[<TAB>text_b]`` row per line. Output: one JSON line per input
with the predicted ``label`` (its name when the task has names), ``label_id`` and the class
(or choice) ``probabilities``; regression tasks give a ``score``. ``--runtime``: ``jax`` (the
default, here) on a checkpoint; ``onnxruntime`` or ``onnxruntime-int8`` on the folder of
``bort-jax export`` (``serve/cli.py``; docs/SERVING.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Sequence

import jax
import numpy as np

from bort_jax.finetune import casts
from bort_jax.finetune import evaluate
from bort_jax.finetune import setup as setup_lib
from bort_jax.finetune import tasks as tasks_lib
from bort_jax.runtime import fileio, sharding


def read_inputs(path: str) -> list[dict]:
  """Rows of a JSONL (``.jsonl`` / ``.json``) or TSV file as ``{"text_a", "text_b", "choices"}``.

  Raises:
    setup.InputError: missing file, bad JSON, or a row without text (names the line).
  """
  if not os.path.isfile(path):
    raise setup_lib.InputError(f"--input {path!r} is not a file (JSON lines or TSV).")
  rows = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      if path.endswith((".jsonl", ".json")):
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as error:
          raise setup_lib.InputError(f"--input {path!r} line {n}: not JSON ({error}).") from None
        text = obj.get("text", obj.get("text_a")) if isinstance(obj, dict) else None
        if not isinstance(text, str) or not text:
          raise setup_lib.InputError(f"--input {path!r} line {n}: needs a non-empty string "
                                     "field 'text' (or 'text_a').")
        rows.append({"text_a": text, "text_b": obj.get("text_b"),
                     "choices": obj.get("choices")})
      else:
        parts = line.rstrip("\n").split("\t")
        rows.append({"text_a": parts[0], "text_b": parts[1] if len(parts) > 1 else None,
                     "choices": None})
  if not rows:
    raise setup_lib.InputError(f"--input {path!r} holds no rows.")
  return rows


def to_examples(spec: tasks_lib.TaskSpec, rows: Sequence[dict]) -> list[casts.Example]:
  """Input rows as task examples (checked against the task's kind)."""
  out = []
  for i, row in enumerate(rows):
    choices = row.get("choices")
    if spec.kind == "multiple_choice":
      if not choices or len(choices) != spec.num_labels:
        raise setup_lib.InputError(
            f"input {i + 1}: task {spec.name!r} is multiple choice with {spec.num_labels} "
            f"choices; got {choices!r} (give --choice {spec.num_labels} times, or a "
            "'choices' list per JSON line).")
      choices = tuple(str(c) for c in choices)
    else:
      choices = None
    out.append(casts.Example(str(row["text_a"]), row.get("text_b"), choices=choices,
                                 example_id=i, candidate=0))
  return out


def predict(inf: evaluate.Inference, rows: Sequence[dict]) -> list[dict]:
  """Labels and probabilities for each input row (in order), from the compiled JAX model."""

  def run_batch(local):
    batch = sharding.global_batch(local, inf.mesh)
    return sharding.host_get({"logits": inf.compiled.eval_step(inf.params, batch)["logits"],
                              "example_id": batch["example_id"], "weight": batch["weight"]})

  return predict_with(inf.spec, rows, inf.tokenizer, inf.seq_len, inf.batch_size, run_batch)


def predict_with(spec: tasks_lib.TaskSpec, rows: Sequence[dict], tokenizer: Any, seq_len: int,
                 batch_size: int, run_batch: Callable[[dict], dict]) -> list[dict]:
  """Labels and probabilities for each input row (in order) from any runtime:
  ``run_batch(this process's batch)`` returns host ``logits``, ``example_id`` and ``weight``
  of the whole (global) batch."""
  examples = to_examples(spec, rows)
  logits = np.zeros((len(examples), 1 if spec.kind == "regression" else
                     (2 if spec.kind == "candidates" else spec.num_labels)), np.float64)
  for local in tasks_lib.batch_examples(spec, examples, tokenizer, seq_len, batch_size,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count()):
    out = run_batch(local)
    real = np.asarray(out["weight"]) > 0
    ids = np.asarray(out["example_id"])[real]
    logits[ids] = np.asarray(out["logits"], np.float64).reshape(len(real), -1)[real]
  names = spec.label_names if spec.kind in ("classification", "multiple_choice") else ()
  results = []
  for row, z in zip(rows, logits):
    item: dict[str, Any] = {"text_a": row["text_a"]}
    if row.get("text_b") is not None:
      item["text_b"] = row["text_b"]
    if spec.kind == "regression":
      item["score"] = float(z[0])
    else:
      probs = np.exp(z - z.max())
      probs /= probs.sum()
      k = int(np.argmax(probs))
      item.update(label=names[k] if k < len(names) else k, label_id=k,
                  probabilities=[round(float(p), 6) for p in probs])
    results.append(item)
  return results


def input_rows(args: argparse.Namespace) -> list[dict]:
  """The inputs of ``--text`` / ``--text-b`` / ``--choice`` or of ``--input`` (checked)."""
  if bool(args.text) == bool(args.input):
    raise setup_lib.InputError("give the inputs either as --text (repeatable) or as --input "
                               "FILE, not both and not neither.")
  if args.input:
    return read_inputs(args.input)
  if args.text_b and len(args.text_b) != len(args.text):
    raise setup_lib.InputError(f"--text-b was given {len(args.text_b)} times for "
                               f"{len(args.text)} --text: give one per text, or none.")
  texts_b = args.text_b or [None] * len(args.text)
  return [{"text_a": a, "text_b": b, "choices": args.choice or None}
          for a, b in zip(args.text, texts_b)]


def write_results(results: Sequence[dict], output: str | None) -> None:
  """One JSON line per result, to ``output`` (atomically) or stdout; process 0 only."""
  if jax.process_index() == 0:
    text = "".join(json.dumps(fileio.to_jsonable(r)) + "\n" for r in results)
    if output:
      fileio.atomic_write_text(output, text)
    else:
      sys.stdout.write(text)
      sys.stdout.flush()


def cli_run(args: argparse.Namespace) -> int:
  """``bort-jax predict --runtime jax`` (flags in ``bort_jax.main``; the mode's entry is
  ``serve.cli.predict``, which sends the other runtimes to ONNX Runtime): one JSON line per
  input.

  Bad input raises :class:`setup.InputError` (a ``ValueError``) before anything is compiled
  or written: ``bort_jax.main`` prints it as one paragraph and exits with status 2.
  """
  rows = input_rows(args)
  inf = evaluate.load_for_inference(args.checkpoint, args.task, args.tokenizer, args.seq_len,
                                    args.batch_size, lambda spec: to_examples(spec, rows))
  write_results(predict(inf, rows), args.output)
  return 0
