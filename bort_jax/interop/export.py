"""Our own checkpoint export format: a folder with ``params.safetensors`` and ``model_config.json``.

Parameter names are the tree paths joined with '/'; the config is ``ModelConfig.to_dict()``.
This is what distillation, teacher adaptation and fine-tuning export, and what a later stage
loads as its teacher or initialisation (Hugging Face folders go through ``interop.convert``).
"""

from __future__ import annotations

import json
import os

import numpy as np
from flax import traverse_util

from bort_jax.core.arch import ModelConfig
from bort_jax.runtime import fileio

PARAMS_FILE = "params.safetensors"
MODEL_CONFIG_FILE = "model_config.json"
# Beside an export, a fine-tuned model's task head, labels, sequence length and tokenizer.
FINETUNE_FILE = "finetune.json"


def save(path: str, params: dict, config: ModelConfig) -> None:
  """Writes our checkpoint: ``params.safetensors`` ('/'-joined names) + ``model_config.json``.

  The folder is built under a temporary name and renamed into place, so a crash midway never
  leaves a half-written export that a later run would take as finished.

  Args:
    path: directory to create (an existing one is replaced once the new one is complete).
    params: parameter tree (nested dicts of arrays).
    config: its model config.
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  flat = {}
  for key, value in traverse_util.flatten_dict(params).items():
    if any("/" in part for part in key):
      raise ValueError(f"parameter name {key!r} contains '/'")
    flat["/".join(key)] = np.ascontiguousarray(np.asarray(value))
  with fileio.atomic_dir(path) as tmp:
    save_file(flat, os.path.join(tmp, PARAMS_FILE))
    with open(os.path.join(tmp, MODEL_CONFIG_FILE), "w") as f:
      json.dump(config.to_dict(), f, indent=2, sort_keys=True)


def save_with_head(path: str, params: dict, config: ModelConfig, meta: dict) -> None:
  """Writes a fine-tuned model's export and, beside it, its ``finetune.json`` (the task head).

  The one writer of that pair, for fine-tuning's best model and for a converted Hugging Face
  model with a task head. ``path`` is usually the temporary folder of an ``atomic_dir``.
  """
  save(path, params, config)
  with open(os.path.join(path, FINETUNE_FILE), "w") as f:
    json.dump(fileio.to_jsonable(meta), f, indent=2, sort_keys=True)


def read_head(path: str) -> dict | None:
  """The ``finetune.json`` of the export at ``path`` (its task head and record), or None when
  the export has none (a pretrained model).

  The one reader of that file. It is written with the export, atomically, so a file that is
  not a JSON object is damage, not a run in progress: ValueError naming it.
  """
  file = os.path.join(path, FINETUNE_FILE)
  if not os.path.exists(file):
    return None
  try:
    with open(file, encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, ValueError) as error:
    raise ValueError(f"{file!r} cannot be read as JSON ({error}); the fine-tuned model's "
                     "export is damaged: fine-tune again or restore it") from None
  if not isinstance(meta, dict):
    raise ValueError(f"{file!r} holds {type(meta).__name__}, not a JSON object; the fine-tuned "
                     "model's export is damaged: fine-tune again or restore it")
  return meta


def load_config(path: str) -> ModelConfig:
  """The ModelConfig of a checkpoint written by :func:`save`, without its weights."""
  file = os.path.join(path, MODEL_CONFIG_FILE)
  if not os.path.exists(file):
    raise ValueError(f"{path!r} is not a bort_jax checkpoint: {MODEL_CONFIG_FILE} is missing")
  with open(file) as f:
    return ModelConfig.from_dict(json.load(f))


def load(path: str) -> tuple[ModelConfig, dict]:
  """Reads a checkpoint written by :func:`save`.

  Args:
    path: the directory.

  Returns:
    ``(config, params)`` with params a nested dict of jax arrays.
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  config = load_config(path)
  if not os.path.exists(os.path.join(path, PARAMS_FILE)):
    raise ValueError(f"{path!r} is not a bort_jax checkpoint: {PARAMS_FILE} is missing")
  flat = {tuple(name.split("/")): jnp.asarray(value)
          for name, value in load_file(os.path.join(path, PARAMS_FILE)).items()}
  return config, traverse_util.unflatten_dict(flat)
