"""``bort-jax evaluate``: a fine-tuned checkpoint on one split of a task, metrics as JSON.

    bort-jax evaluate --checkpoint runs/ft/best --split validation
    bort-jax evaluate --checkpoint runs/ft/best --task glue/ax --split test --submission out/
    bort-jax evaluate --checkpoint hf_dir --task glue/mnli --split validation_matched \\
        --tokenizer hf_dir

The checkpoint is a ``bort-jax finetune`` ``WORKDIR/best`` (it names its task, head and
sequence length, and holds its tokenizer) or a Hugging Face ``*ForSequenceClassification`` /
``*ForMultipleChoice`` directory (then ``--task`` is required). Labelled splits are scored with
the task's official metrics; test splits get a predictions file and, where the leaderboard has
one, a submission file. Bad input (unknown task or split, a head that does not fit the task's
label count, labels outside the label space) exits with status 2 and one paragraph, before
anything is compiled.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any, Callable

import jax

from bort_jax.finetune import compiled as compiled_lib
from bort_jax.finetune.prepare import read_split
from bort_jax.finetune import setup as setup_lib
from bort_jax.finetune import steps
from bort_jax.finetune import submission
from bort_jax.finetune import tasks as tasks_lib
from bort_jax.runtime import fileio, sharding


@dataclasses.dataclass
class Inference:
  """A fine-tuned model ready to score batches (built by :func:`load_for_inference`)."""

  spec: tasks_lib.TaskSpec
  loaded: setup_lib.Loaded
  compiled: compiled_lib.Compiled
  params: Any
  tokenizer: Any
  mesh: Any
  seq_len: int
  batch_size: int


# setup's messages name the fields of a `bort-jax finetune` config (config.init.path, ...);
# evaluate and predict pass ``field=`` so that theirs name the flags the user typed.


def _recorded_task(loaded: setup_lib.Loaded, checkpoint: str) -> str:
  """The task a fine-tuned checkpoint names (``finetune.json``)."""
  task = loaded.meta.get("task")
  if not task:
    raise setup_lib.InputError(f"--checkpoint {checkpoint!r} does not say which task it was "
                               "fine-tuned on: pass --task.")
  return task


def checkpoint_task(loaded: setup_lib.Loaded, checkpoint: str, task: str | None,
                    data_dir: str | None = None) -> tasks_lib.TaskSpec:
  """``--task``, else the task the checkpoint was fine-tuned on."""
  if task:
    return setup_lib.resolve_task(task, field="--task", settings=_settings(loaded),
                                  recorded=loaded.meta, data_dir=data_dir)
  return setup_lib.resolve_task(_recorded_task(loaded, checkpoint), note="pass --task",
                                field=f"the task recorded in --checkpoint {checkpoint!r},",
                                settings=_settings(loaded), recorded=loaded.meta,
                                data_dir=data_dir)


def _settings(loaded: setup_lib.Loaded) -> dict | None:
  """What a model fine-tuned on a file or TFDS task recorded of the task's settings."""
  return loaded.meta.get("files") or loaded.meta.get("tfds")


def _load_tokenizer(loaded: setup_lib.Loaded, checkpoint: str, tokenizer: str):
  """``--tokenizer``, else the tokenizer saved with the checkpoint."""
  path = setup_lib.tokenizer_dir(loaded.path, tokenizer, field="--tokenizer")
  field = "--tokenizer" if tokenizer else f"--checkpoint {checkpoint!r}: its tokenizer"
  return setup_lib.load_tokenizer(path, loaded.config, field=field)


def load_for_inference(checkpoint: str, task: str | None = None, tokenizer: str = "",
                       seq_len: int | None = None, batch_size: int = 32,
                       check: Callable[[tasks_lib.TaskSpec], None] | None = None,
                       data_dir: str | None = None) -> Inference:
  """Reads a fine-tuned checkpoint and checks it against the task (nothing compiled yet).

  Args:
    checkpoint: a ``WORKDIR/best`` or a Hugging Face directory with a task head.
    task: the task (default: the one the checkpoint was fine-tuned on).
    tokenizer: tokenizer directory (default: the checkpoint's own).
    seq_len: padded length (default: the fine-tuning run's, else 128).
    batch_size: rows per batch (rounded up to a multiple of the device count).
    check: further input checks against the task, run before anything is compiled.
    data_dir: the TFDS data folder (where a TFDS task's dataset is described).

  Raises:
    setup.InputError: no task head, no task, or a head that does not fit the task.
  """
  loaded = setup_lib.load_model(checkpoint, field="--checkpoint")
  if loaded.head is None:
    raise setup_lib.InputError(f"--checkpoint {checkpoint!r} has no task head: fine-tune it "
                               "first (`bort-jax finetune`) or pass a fine-tuned checkpoint.")
  spec = checkpoint_task(loaded, checkpoint, task, data_dir)
  params, layout = setup_lib.fit_head(loaded, spec, training=False, field="--checkpoint")
  if check is not None:
    check(spec)
  tok = _load_tokenizer(loaded, checkpoint, tokenizer)
  seq_len = int(seq_len or loaded.meta.get("seq_len") or 128)
  if not 2 <= seq_len <= loaded.config.max_length:
    raise setup_lib.InputError(f"--seq-len {seq_len} must be in 2..{loaded.config.max_length}.")
  mesh = sharding.make_mesh({"data": -1})
  devices = mesh.shape["data"]
  batch_size = -(-max(int(batch_size), 1) // devices) * devices
  kind = "classification" if spec.kind == "candidates" else spec.kind
  cfg = steps.StepConfig(loaded.config, kind, spec.num_labels, 1, layout)
  compiled = compiled_lib.compile_steps(cfg, compiled_lib.direction_key({}), mesh,
                                        tuple(sharding.rules_from_config(None)))
  full = setup_lib.init_params(loaded.config, cfg.head, 0, params,
                               field=f"--checkpoint {checkpoint!r}")
  placed = compiled_lib.place(full, compiled.param_shardings)
  return Inference(spec, loaded, compiled, placed, tok, mesh, seq_len, batch_size)


def run(checkpoint: str, task: str | None = None, split: str | None = None, *,
        tokenizer: str = "", seq_len: int | None = None, batch_size: int = 32,
        data_dir: str | None = None, download: bool = False, out: str | None = None,
        submission_dir: str | None = None) -> dict:
  """Scores a checkpoint on one split.

  Args:
    checkpoint: see :func:`load_for_inference`.
    task: the task (default: the checkpoint's).
    split: the split (default: the task's first dev split).
    tokenizer: tokenizer directory (default: the checkpoint's).
    seq_len: padded length (default: the fine-tuning run's).
    batch_size: rows per batch.
    data_dir: TFDS data directory.
    download: let TFDS download the data.
    out: also write the result JSON here.
    submission_dir: for test splits: write predictions and the leaderboard file here.

  Returns:
    ``{"task", "split", "checkpoint", "units", "metrics"}`` (metrics empty when unlabelled).
  """
  chosen = {}

  def check_split(spec):
    name = split or (spec.validation_splits or spec.test_splits)[0]
    if name not in spec.splits:
      raise setup_lib.InputError(f"--split {name!r} is not a split of {spec.name!r}; its "
                                 f"splits: {', '.join(spec.splits)}.")
    chosen["split"] = name

  inf = load_for_inference(checkpoint, task, tokenizer, seq_len, batch_size, check_split,
                           data_dir)
  spec, split = inf.spec, chosen["split"]
  test = split in spec.test_splits
  data = read_split(spec, split, data_dir, download, labelled=not test)
  preds, _ = compiled_lib.predict_split(inf.params, inf.compiled, data, inf.tokenizer, inf.seq_len,
                                inf.batch_size, inf.mesh)
  labelled = bool(preds.labels) and all(not isinstance(x, (int, float)) or x != -1
                                        for x in preds.labels)
  result = {"task": spec.name, "split": split, "checkpoint": checkpoint,
            "units": len(preds.predictions),
            "metrics": compiled_lib.score(spec, preds) if labelled else {}}
  if submission_dir and jax.process_index() == 0:
    os.makedirs(submission_dir, exist_ok=True)
    path = os.path.join(submission_dir, f"{spec.name.replace('/', '_')}_{split}.jsonl")
    compiled_lib.write_predictions(path, data, preds)
    result["files"] = [path]
    try:
      submission.submission_file_name(spec.name, split)
      result["files"].append(submission.write_submission(
          spec.name, data.records, preds.predictions, submission_dir, split))
    except ValueError:
      pass  # no leaderboard file for this task / split
  if out and jax.process_index() == 0:
    fileio.atomic_write_text(out, json.dumps(fileio.to_jsonable(result), indent=2))
  return result


def cli_run(args: argparse.Namespace) -> int:
  """``bort-jax evaluate`` (flags in ``bort_jax.main``): the result as JSON on stdout.

  Bad input raises :class:`setup.InputError` (a ``ValueError``): ``bort_jax.main`` prints it
  as one paragraph and exits with status 2.
  """
  result = run(args.checkpoint, args.task, args.split, tokenizer=args.tokenizer,
               seq_len=args.seq_len, batch_size=args.batch_size, data_dir=args.data_dir,
               download=args.download, out=args.out, submission_dir=args.submission)
  if jax.process_index() == 0:
    print(json.dumps(fileio.to_jsonable(result), indent=2), flush=True)
  return 0
