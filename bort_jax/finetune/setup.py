"""What a fine-tuning, evaluation or prediction run starts from: task, model, head, tokenizer.

Every check that user input can fail runs here, before anything is compiled, and fails with a
:class:`InputError` (a ``ValueError``) whose message names the field, the value and what is
allowed; the command-line entry points print it as one paragraph and exit with status 2.

A model comes from any of these directories (``config.init.kind = "auto"`` tells them apart):

* ``params``: our export format (``interop/export.py``; distillation, teacher adaptation and
  extraction write it), ``model_config.json`` + ``params.safetensors``;
* ``finetuned``: the same format plus ``finetune.json`` (task, head, label names, sequence
  length), written by ``bort-jax finetune`` as ``WORKDIR/best`` (:func:`save_finetuned`, the
  one writer of it, used by every fine-tuning mode), with the tokenizer beside it;
* ``hf``: a Hugging Face checkpoint (``config.json`` + weights), with or without a head;
* ``random``: the architecture and vocabulary of any of the above with fresh weights (the
  "same shape from random initialisation" baseline).

A pretrained model's MLM head is dropped and a fresh task head is initialised. A checkpoint
that already has a task head keeps it when its output width fits the task; one that does not
fit is refused unless ``config.init.reset_head`` asks for a fresh head.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import shutil
from typing import Any, Sequence

import jax
import numpy as np

from bort_jax.core import model
from bort_jax.core.arch import ModelConfig
from bort_jax.finetune import casts
from bort_jax.finetune import steps
from bort_jax.finetune import tasks as tasks_lib
from bort_jax.interop import export as export_lib
from bort_jax.interop import hf_tokenizer
from bort_jax.runtime import fileio, rundir

TOKENIZER_DIR = "tokenizer"
INIT_KINDS = ("auto", "params", "finetuned", "hf", "random")


class InputError(ValueError):
  """Bad user input (a task, split, checkpoint or label); printed as one paragraph, exit 2."""


# The ``field`` keywords below say how a message names the value the user gave: a config
# field of `bort-jax finetune` (the default), or the flag of `bort-jax evaluate` / `predict`.


def _named(field: str, value: str) -> str:
  """``field`` and ``value`` as a message names them.

  ``config.task='x'`` for a config field, ``--task 'x'`` for a flag or a phrase (``the
  checkpoint 'x'``), ``the task recorded in ..., 'x',`` for a phrase ending in a comma.
  """
  if field.endswith(","):
    return f"{field} {value!r},"
  if field.startswith("-") or " " in field:
    return f"{field} {value!r}"
  return f"{field}={value!r}"


# ----------------------------------------------------------------------------- tasks


def resolve_task(name: str, *, field: str = "config.task", note: str = "",
                 settings: Any = None, recorded: dict | None = None,
                 data_dir: str | None = None) -> tasks_lib.TaskSpec:
  """The registered task ``name``; the demo tasks are registered on first use, a file task
  (``file:PATH``, ``data/files.py``) and a TFDS task (``tfds:NAME``, ``data/tfds_tasks.py``)
  from ``settings``.

  Args:
    name: the task name.
    field: how the message names it (a config field, a flag or a phrase).
    note: a remedy, put in parentheses after "is not a known task".
    settings: a file task's ``config.files`` or a TFDS task's ``config.tfds`` (or what a
      fine-tuned model recorded of them).
    recorded: a fine-tuned model's ``finetune.json``: a file task's kind and label names.
    data_dir: the TFDS data folder (a TFDS task).

  Raises:
    InputError: unknown name (the message suggests the closest known names), or a file or
      TFDS task that cannot be read as asked.
  """
  if name.startswith(("file:", "tfds:")):
    # pylint: disable-next=import-outside-toplevel
    from bort_jax.data import files as files_lib, tfds_tasks
    try:
      if name.startswith("file:"):
        return files_lib.register(name, settings, recorded)
      return tfds_tasks.register(name, settings, data_dir)
    except (files_lib.FileTaskError, tfds_tasks.TfdsTaskError) as error:
      raise InputError(str(error)) from None
  if name.startswith("demo/") and name not in tasks_lib.task_names():
    from bort_jax.data import demo  # pylint: disable=import-outside-toplevel
    demo.register_demo_tasks()
  known = tasks_lib.task_names()
  if name in known:
    return tasks_lib.get_task(name)
  close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
  hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
  note = f" ({note})" if note else ""
  raise InputError(f"{_named(field, name)} is not a known task{note}.{hint} Known tasks: "
                   f"{', '.join(known)}.")


def check_trainable(spec: tasks_lib.TaskSpec) -> None:
  """A task to fine-tune needs a train split and a dev (validation) split.

  Raises:
    InputError: either is missing; diagnostic sets name the task whose model scores them.
  """
  how = (f" It is scored by a model fine-tuned on {spec.train_task!r}: `bort-jax finetune` on "
         f"that task writes its predictions too." if spec.train_task else "")
  if not spec.train_split:
    raise InputError(f"config.task={spec.name!r} has no train split (its splits: "
                     f"{', '.join(spec.splits)}), so it cannot be fine-tuned.{how}")
  if not spec.validation_splits:
    raise InputError(f"config.task={spec.name!r} has no dev split to evaluate and keep the "
                     f"best checkpoint on (its splits: {', '.join(spec.splits)}).{how}")


def check_labels(spec: tasks_lib.TaskSpec, examples: Sequence[casts.Example], split: str,
                 allow_unlabeled: bool = False) -> None:
  """Every label must lie in the task's label space.

  Args:
    spec: the task.
    examples: cast examples of one split.
    split: its name, for the message.
    allow_unlabeled: accept -1 (test splits).

  Raises:
    InputError: the first offending example (record index, value, allowed values).
  """
  if spec.kind == "regression":
    for ex in examples:
      if not np.isfinite(float(ex.label)):
        raise InputError(f"task {spec.name!r}, split {split!r}, record {ex.example_id}: "
                         f"label {ex.label!r} is not a finite number (regression target).")
    return
  top = 2 if spec.kind == "candidates" else spec.num_labels
  for ex in examples:
    value = ex.label
    ok = isinstance(value, (int, np.integer)) and (0 <= value < top or
                                                   (allow_unlabeled and value == -1))
    if not ok:
      allowed = f"an integer in 0..{top - 1}" + (" or -1 (unlabeled)" if allow_unlabeled
                                                 else "")
      raise InputError(f"task {spec.name!r}, split {split!r}, record {ex.example_id}: label "
                       f"{value!r} is outside the label space; allowed: {allowed}.")


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass
class Loaded:
  """A model read from disk (host arrays), before any device work.

  Attributes:
    config: its model config.
    params: its parameters; without an MLM head, with a task head if it had one.
    kind: how it was read (:data:`INIT_KINDS` minus "auto").
    path: where from.
    meta: ``finetune.json`` of a fine-tuned checkpoint, else {}.
    head: the task head it carries (``model.HeadSpec``, layout resolved), or None.
  """

  config: ModelConfig
  params: Any
  kind: str
  path: str
  meta: dict
  head: model.HeadSpec | None = None


def detect_kind(path: str, *, field: str = "config.init.path") -> str:
  """``finetuned``, ``params`` or ``hf`` from the files in ``path`` (messages name it ``field``).

  Raises:
    InputError: not a directory or none of the three layouts.
  """
  if not os.path.isdir(path):
    raise InputError(f"{_named(field, path)} is not a directory (a checkpoint directory: "
                     "our export, a `bort-jax finetune` WORKDIR/best, or a Hugging Face one).")
  if os.path.exists(os.path.join(path, export_lib.MODEL_CONFIG_FILE)):
    return "finetuned" if os.path.exists(os.path.join(path, export_lib.FINETUNE_FILE)) else "params"
  if os.path.exists(os.path.join(path, "config.json")):
    return "hf"
  raise InputError(f"{_named(field, path)} holds neither {export_lib.MODEL_CONFIG_FILE} "
                   "(our export) nor config.json (Hugging Face).")


def load_model(path: str, kind: str = "auto", seed: int = 0, *,
               field: str = "config.init.path", keep_mlm_head: bool = False) -> Loaded:
  """Reads a model from a checkpoint folder (see the module docstring for the kinds): the one
  loader of the package's models, fine-tuning's and the pipelines' teachers alike.

  Args:
    path: the checkpoint directory.
    kind: one of :data:`INIT_KINDS`.
    seed: for ``random``: the weights are ``model.init(fold_in(key(seed), 2))``.
    field: how messages name ``path`` (a config field or a flag).
    keep_mlm_head: keep the MLM head (a distillation teacher) instead of dropping it.

  Returns:
    :class:`Loaded` with host parameters (no MLM head unless ``keep_mlm_head``).
  """
  if kind not in INIT_KINDS:
    raise InputError(f"config.init.kind={kind!r} is not one of {', '.join(INIT_KINDS)}.")
  if not path:
    raise InputError(f"{field} is empty: name the checkpoint to start from (our "
                     "export, a fine-tuned WORKDIR/best, or a Hugging Face directory).")
  path = os.path.expanduser(path)
  found = detect_kind(path, field=field)
  if kind == "auto":
    kind = found
  meta, head = {}, None
  try:
    if found in ("params", "finetuned"):
      config, params = export_lib.load(path) if kind != "random" else \
          (export_lib.load_config(path), None)
      if found == "finetuned":
        meta = export_lib.read_head(path) or {}
        head = steps.task_head(meta["kind"], int(meta["num_labels"]), meta.get("layout"))
    else:
      from bort_jax.interop import convert  # pylint: disable=import-outside-toplevel
      config, params, head = convert.load_hf_with_head(path, with_mlm_head=None)
  except (OSError, KeyError, ValueError) as error:
    raise InputError(f"{_named(field, path)} cannot be read as a {found} checkpoint: "
                     f"{error}") from None
  if head is not None and head.kind not in model.TASK_KINDS:
    head = None
  if kind == "random":
    params, meta, head = None, {}, None
  else:
    params = jax.tree.map(np.asarray, {k: v for k, v in params.items()
                                       if keep_mlm_head or k != "mlm_head"})
  head = head.resolve(config.family) if head is not None else None
  return Loaded(config, params, kind, path, meta, head)


def fit_head(loaded: Loaded, spec: tasks_lib.TaskSpec, reset_head: bool = False,
             training: bool = True, *, field: str = "the checkpoint"
             ) -> tuple[Any, str | None]:
  """The checkpoint's parameters with a task head that fits ``spec`` (or none, to be made).

  Args:
    loaded: the checkpoint.
    spec: the task.
    reset_head: replace a head that does not fit with a fresh one (fine-tuning).
    training: whether the head may be replaced at all (False: evaluation, prediction).
    field: how the message names the checkpoint (a phrase or a flag).

  Returns:
    ``(host params, head layout)``: the checkpoint's own head and layout kept when it fits;
    dropped (layout None: the family's default) when it has none or ``reset_head`` is set.

  Raises:
    InputError: the checkpoint's head does not fit the task (kind or output count).
  """
  if loaded.params is None:
    return None, None
  want = steps.task_head(spec.kind, spec.num_labels)
  have = loaded.head
  if have is None:
    return {k: v for k, v in loaded.params.items() if k != "classifier"}, None
  if have.kind == want.kind and have.outputs == want.outputs:
    return loaded.params, have.layout
  if reset_head:
    return {k: v for k, v in loaded.params.items() if k != "classifier"}, None
  trained_on = f" (fine-tuned on {loaded.meta['task']!r})" if loaded.meta.get("task") else ""
  fix = ("Start from a checkpoint without a task head, or set config.init.reset_head=True to "
         "train a fresh head." if training else
         "Score it on a task with that head (--task), or fine-tune it for this one first.")
  raise InputError(
      f"{_named(field, loaded.path)}{trained_on} has a {have.kind} head with "
      f"{have.outputs} output(s), but task {spec.name!r} ({spec.kind}, {spec.num_labels} "
      f"labels) needs a {want.kind} head with {want.outputs}. {fix}")


def init_params(config: ModelConfig, head: model.HeadSpec, seed: int,
                loaded_params: Any = None, *, field: str = "the checkpoint") -> Any:
  """Full parameters for ``head``: the loaded ones where they fit, fresh ones elsewhere.

  The fresh parts come from ``fold_in(key(seed), 2)`` (``model.attach_head``), a function of
  the seed only. ``field`` names the checkpoint in the message when they do not fit.
  """
  rng = jax.random.fold_in(jax.random.key(seed), 2)
  if loaded_params is None:
    return model.init(rng, config, head)
  try:
    return model.attach_head(rng, loaded_params, config, head)
  except ValueError as error:
    raise InputError(f"{field} does not match its own config: {error}") from None


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_dir(init_path: str, configured: str = "", *,
                  field: str = "config.tokenizer (--tokenizer)") -> str:
  """Where the tokenizer files are: ``configured``, else the one that goes with the checkpoint
  (``hf_tokenizer.find_tokenizer``, the one rule: its ``tokenizer/`` folder, its own files, or
  the tokenizer its run's ``config.json`` names, as distillation's export has).

  ``field`` is what the message tells the user to set when there are none.

  Raises:
    InputError: no tokenizer files there.
  """
  if configured:
    path = os.path.expanduser(configured)
    if hf_tokenizer.has_tokenizer_files(path):
      return path
  else:
    found = hf_tokenizer.find_tokenizer(init_path)
    if found:
      return found
  where = configured or init_path
  raise InputError(f"no tokenizer files ({', '.join(hf_tokenizer.TOKENIZER_FILES)}) in "
                   f"{where!r}: set {field} to the directory holding them.")


def load_tokenizer(path: str, config: ModelConfig, *, field: str = "config.tokenizer"):
  """The tokenizer in ``path`` for ``config``'s family, checked against its vocabulary.

  ``field`` is how messages name ``path`` (a config field, a flag or a phrase).
  """
  from bort_jax.data import tokenization  # pylint: disable=import-outside-toplevel
  try:
    tokenizer = tokenization.load_tokenizer(path, config.family)
  except (OSError, ValueError) as error:
    raise InputError(f"{_named(field, path)}: {error}") from None
  if tokenizer.vocab_size > config.vocab_size:
    raise InputError(f"{_named(field, path)} has {tokenizer.vocab_size} ids but the model's "
                     f"vocabulary has {config.vocab_size} rows: it belongs to another model.")
  return tokenizer


def copy_tokenizer(src: str, dst: str) -> None:
  """Copies the tokenizer files of ``src`` into ``dst`` (so a fine-tuned export stands alone)."""
  os.makedirs(dst, exist_ok=True)
  for name in hf_tokenizer.TOKENIZER_FILES:
    if os.path.exists(os.path.join(src, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


# ----------------------------------------------------------------------------- a fine-tuned model


def save_finetuned(path: str, params: Any, config: ModelConfig, meta: dict,
                   tokenizer_path: str) -> None:
  """Writes a fine-tuned model: our export, ``finetune.json`` and the tokenizer, atomically."""
  if jax.process_index() != 0:
    return
  with fileio.atomic_dir(path) as tmp:
    export_lib.save_with_head(tmp, params, config, meta)
    copy_tokenizer(tokenizer_path, os.path.join(tmp, TOKENIZER_DIR))


def read_best(workdir: str) -> dict | None:
  """``finetune.json`` of ``WORKDIR/best`` (``step``, ``metric``, ``value``, ...) or None."""
  return export_lib.read_head(rundir.best_dir(workdir))


def head_meta(spec: tasks_lib.TaskSpec, seq_len: int, head: model.HeadSpec) -> dict:
  """What ``evaluate`` / ``predict`` need to know about a fine-tuned head (for a file task,
  also the ``config.files`` it was read with)."""
  meta = {"task": spec.name, "kind": spec.kind, "num_labels": spec.num_labels,
          "label_names": list(spec.label_names), "seq_len": seq_len, "layout": head.layout}
  if spec.name.startswith("file:"):
    from bort_jax.data import files as files_lib  # pylint: disable=import-outside-toplevel
    meta["files"] = files_lib.settings(spec.name)
  if spec.name.startswith("tfds:"):
    from bort_jax.data import tfds_tasks  # pylint: disable=import-outside-toplevel
    meta["tfds"] = tfds_tasks.settings(spec.name)
  return meta
