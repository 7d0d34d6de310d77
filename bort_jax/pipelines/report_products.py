"""What the demo leaves a user to use at once: per task, the fine-tuned student, its Hugging
Face export and the command that runs it.

The student's fine-tuning population writes its best member as a fine-tuned model
(``<job>/best``, ``population_mode.save_best``; the job lies in the demo's cache). The report
stage copies it into the workdir, ``WORKDIR/products/<task>/model`` (``bort-jax predict`` and
``bort-jax evaluate`` take it as it is), exports it to a Hugging Face folder beside it,
``WORKDIR/products/<task>/hf`` (``interop/hf_export.py``: weights, config with the label names,
tokenizer files and a model card) and, with the serve extra, an ONNX folder
``WORKDIR/products/<task>/onnx`` (``serve/export.py``: float32 and int8 graphs, the int8 one
scored on the task's dev split and timed), each redone only when the fine-tuned model changed,
and lists the predict commands with an example input of the task's kind.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from bort_jax.runtime import fileio, rundir
from bort_jax.runtime.fileio import atomic_write_text, read_json

PRODUCTS_DIR = "products"
# An example input per demo task, as predict's flags: the command works as printed.
EXAMPLES = {
    "demo/movie_sentiment": '--text "A gripping, beautifully acted film."',
    "demo/word_sense": ('--text "they sat on the bank of the river" '
                        '--text-b "bank: sloping land beside a body of water"'),
    "demo/bbc_news": ('--text "Shares in the carmaker rose 5% after its profits beat '
                      'forecasts."'),
}


def _stamp(best: str) -> str:
  """What the export was made from: the fine-tuned model's record (task, score, step)."""
  return json.dumps(read_json(os.path.join(best, "finetune.json")), sort_keys=True)


def copy_student(best: str, out: str) -> str:
  """``best`` copied to ``out`` (atomically) unless ``out`` holds the same model already."""
  from bort_jax.interop import export  # pylint: disable=import-outside-toplevel
  params = lambda folder: os.path.join(folder, export.PARAMS_FILE)
  same = (read_json(os.path.join(out, "finetune.json")) == read_json(
      os.path.join(best, "finetune.json")) and os.path.exists(params(out))
          and fileio.sha256_file(params(out)) == fileio.sha256_file(params(best)))
  if not same:
    with fileio.atomic_dir(out) as tmp:
      shutil.copytree(best, tmp, dirs_exist_ok=True)
  return out


def export_student(best: str, out: str) -> dict[str, Any]:
  """The Hugging Face folder of one fine-tuned student, made unless it is up to date."""
  from bort_jax.interop import hf_export  # pylint: disable=import-outside-toplevel
  stamp_path = os.path.join(out, ".made_from.json")
  stamp = _stamp(best)
  if read_json(stamp_path) == json.loads(stamp):
    return {"out": out, "made": False}
  done = hf_export.export_hf(best, out)
  atomic_write_text(stamp_path, stamp)
  return {"out": out, "made": True, "parameters": done["parameters"]}


def export_onnx_student(best: str, out: str) -> dict[str, Any]:
  """The ONNX folder (float32 and int8, the int8 graph scored on the task's dev split) of one
  fine-tuned student, made unless it is up to date; ``{"out": None, "why"}`` without the
  serve extra."""
  from bort_jax.serve import export, runtime  # pylint: disable=import-outside-toplevel
  try:
    runtime.require()
  except runtime.MissingExtraError as error:
    return {"out": None, "why": str(error)}
  stamp_path = os.path.join(out, ".made_from.json")
  stamp = _stamp(best)
  record = read_json(os.path.join(out, export.SERVE_FILE))
  if read_json(stamp_path) == json.loads(stamp) and record:
    return {"out": out, "made": False, "record": record}
  try:
    record = export.export(best, out, quantize="int8",
                           log=lambda line: print(f"report: onnx {line}", flush=True))
  except (ValueError, OSError) as error:  # e.g. a dev split it cannot read: the page still
    print(f"report: no ONNX export of {best}: {error}", flush=True)  # says why
    return {"out": None, "why": " ".join(str(error).split())}
  atomic_write_text(stamp_path, stamp)
  return {"out": out, "made": True, "record": record}


def _onnx_line(onnx: dict) -> str:
  if onnx.get("out") is None:
    return f"  No ONNX export ({onnx.get('why')})."
  q = onnx["record"].get("int8") or {}
  dev = q.get("dev") or {}
  gain = f"int8 {q['speedup']:.2f}x the float32 graph" if q.get("speedup") else ""
  cost = (f", {dev['change_points']:+.2f} points of {dev['metric']} on {dev['split']} "
          f"({dev['examples']} examples)") if dev else ""
  return f"  ONNX export `{onnx['out']}` ({gain}{cost})."


def products(workdir: str, state: dict) -> tuple[list[str], list[dict]]:
  """The products section: per task, the fine-tuned student, its HF export, predict's command.

  Args:
    workdir: the demo's workdir.
    state: ``demo_state.json`` (where the student's fine-tuning jobs are).

  Returns:
    (the section's Markdown lines, one dict per product).
  """
  lines = ["## Use the student", ""]
  rows = []
  for folder in (state.get("finetune_runs") or {}).get("student", []):
    meta = read_json(os.path.join(rundir.best_dir(folder), "finetune.json"))
    if not isinstance(meta, dict):
      continue
    task = meta.get("task", "")
    # The demo's name for the task (finetune_tasks' key: "own" for a task of your own).
    name = (state.get("task_keys") or {}).get(task) or task.split("/")[-1] or "task"
    best = copy_student(rundir.best_dir(folder),
                        os.path.join(workdir, PRODUCTS_DIR, name, "model"))
    hf = export_student(best, os.path.join(workdir, PRODUCTS_DIR, name, "hf"))
    onnx = export_onnx_student(best, os.path.join(workdir, PRODUCTS_DIR, name, "onnx"))
    example = EXAMPLES.get(task, '--text "..."')
    command = f"bort-jax predict --checkpoint {best} {example}"
    row = {"task": task, "checkpoint": best, "hf": hf["out"], "predict": command,
           "onnx": onnx["out"], "onnx_line": _onnx_line(onnx)}
    if onnx["out"]:
      row["predict_onnx"] = (f"bort-jax predict --checkpoint {onnx['out']} --runtime "
                             f"onnxruntime-int8 {example}")
      row["int8"] = {k: v for k, v in onnx["record"].get("int8", {}).items()
                     if k in ("speedup", "dev")}
    rows.append(row)
  if not rows:
    return lines + ["No fine-tuned student yet (the finetune stage writes one per task).", ""], []
  lines += ["The best seed of the student's fine-tuning on each task is a fine-tuned model "
            "`bort-jax predict` and `bort-jax evaluate` take as it is; its Hugging Face export "
            "(weights, config with the label names, tokenizer, model card) loads with "
            "`AutoModelForSequenceClassification.from_pretrained(DIR)`.", ""]
  for row in rows:
    lines += [f"- **{row['task']}**: `{row['checkpoint']}`, Hugging Face export "
              f"`{row['hf']}`", "", "  ```bash", f"  {row['predict']}"]
    if row.get("predict_onnx"):
      lines.append(f"  {row['predict_onnx']}")
    lines += ["  ```", "", row["onnx_line"], ""]
  return lines, rows
