"""An ONNX export read back for serving (``bort-jax predict --runtime onnxruntime[-int8]``).

:func:`load` checks the folder before any session is made: it must be an export of
``bort-jax export --format onnx`` (its ``serve.json``), hold the graph of the runtime asked
for, with the sha256 recorded for it (a graph copied in from another model is refused), whose
inputs and output are the ones recorded; a task model names its task, labels and tokenizer.
Each failure is an ``InputError`` (exit status 2, one paragraph).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import numpy as np

from bort_jax.finetune import setup as setup_lib
from bort_jax.finetune import tasks as tasks_lib
from bort_jax.interop import export as export_lib
from bort_jax.runtime import fileio
from bort_jax.serve import runtime as runtime_lib
from bort_jax.serve.export import FILES, SERVE_FILE


@dataclasses.dataclass
class Served:
  """A task model in ONNX Runtime, ready for ``predict``."""

  spec: tasks_lib.TaskSpec
  tokenizer: Any
  seq_len: int
  batch_size: int
  forward: Callable[[dict], np.ndarray]
  record: dict


def is_export(path: str) -> bool:
  return os.path.isfile(os.path.join(path, SERVE_FILE))


def read_record(path: str, field: str = "--checkpoint") -> dict:
  """The ``serve.json`` of an export folder.

  Raises:
    InputError: not a folder, or no readable record.
  """
  if not os.path.isdir(path):
    raise setup_lib.InputError(f"{field} {path!r} is not a folder: give the folder that "
                               "`bort-jax export --format onnx` wrote (not the .onnx file).")
  file = os.path.join(path, SERVE_FILE)
  if not os.path.isfile(file):
    raise setup_lib.InputError(f"{field} {path!r} is not an ONNX export of bort-jax (no "
                               f"{SERVE_FILE}): write one with `bort-jax export --format onnx "
                               "--checkpoint CKPT --out DIR`.")
  try:
    with open(file, encoding="utf-8") as f:
      record = json.load(f)
    record["files"], record["inputs"], record["output"]  # pylint: disable=pointless-statement
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise setup_lib.InputError(f"{file!r} cannot be read as an export record ({error}); "
                               "export the model again.") from None
  return record


def check_graph(path: str, runtime: str, record: dict, field: str = "--checkpoint") -> str:
  """The graph file of ``runtime`` in the export, checked against the record.

  Raises:
    InputError: missing, another model's (sha256), or inputs/output not the recorded ones.
  """
  name = FILES[runtime]
  file = os.path.join(path, name)
  if not os.path.isfile(file) or name not in record["files"]:
    how = " --quantize int8" if runtime == "onnxruntime-int8" else ""
    raise setup_lib.InputError(f"{field} {path!r} has no {name} for --runtime {runtime}: "
                               f"export it with `bort-jax export --format onnx{how}`.")
  if fileio.sha256_file(file) != record["files"][name]["sha256"]:
    raise setup_lib.InputError(f"{file!r} is not the graph this export wrote (its sha256 "
                               f"differs from the one in {SERVE_FILE}): it was replaced or is "
                               "another model's; export the model again.")
  import onnx  # pylint: disable=import-outside-toplevel
  graph = onnx.load(file, load_external_data=False).graph
  inputs = [i.name for i in graph.input]
  outputs = [o.name for o in graph.output]
  if inputs != list(record["inputs"]) or outputs != [record["output"]]:
    raise setup_lib.InputError(f"{file!r} takes {inputs} and gives {outputs}, but {SERVE_FILE} "
                               f"records {record['inputs']} and {record['output']!r}: it is "
                               "another model's graph; export the model again.")
  return file


def load(path: str, runtime: str, task: str | None = None, tokenizer: str = "",
         seq_len: int | None = None, batch_size: int = 32,
         check: Callable[[tasks_lib.TaskSpec], None] | None = None) -> Served:
  """A task model's export, checked, with its session (see the module docstring).

  Raises:
    InputError: any check above, a model without a task head, or a task that does not fit.
  """
  runtime_lib.check_runtime(runtime)
  record = read_record(path)
  file = check_graph(path, runtime, record)
  meta = export_lib.read_head(path)
  if meta is None or record["head"]["kind"] not in ("classification", "regression",
                                                    "multiple_choice"):
    raise setup_lib.InputError(f"--checkpoint {path!r} is a {record['head']['kind']} model "
                               "without a task head: predict needs a fine-tuned model's export.")
  config = export_lib.load_config(path)
  settings = meta.get("files") or meta.get("tfds")
  name = task or meta.get("task")
  spec = setup_lib.resolve_task(name, field="--task" if task else
                                f"the task recorded in --checkpoint {path!r},",
                                settings=settings, recorded=meta)
  want = (spec.num_labels if spec.kind in ("classification", "candidates") else 1)
  have = record["head"]["num_labels"] if record["head"]["kind"] == "classification" else 1
  kind = {"candidates": "classification"}.get(spec.kind, spec.kind)
  if kind != record["head"]["kind"] or want != have:
    raise setup_lib.InputError(f"--checkpoint {path!r} has a {record['head']['kind']} head with "
                               f"{have} output(s); task {spec.name!r} needs {kind} with {want}.")
  if check is not None:
    check(spec)
  tok_dir = setup_lib.tokenizer_dir(path, tokenizer, field="--tokenizer")
  tok = setup_lib.load_tokenizer(tok_dir, config, field="--tokenizer")
  seq_len = int(seq_len or record.get("seq_len") or 128)
  if not 2 <= seq_len <= config.max_length:
    raise setup_lib.InputError(f"--seq-len {seq_len} must be in 2..{config.max_length}.")
  forward = runtime_lib.forward(runtime_lib.session(file))
  return Served(spec, tok, seq_len, max(int(batch_size), 1), forward, record)
