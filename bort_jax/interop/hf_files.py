"""Reading a Hugging Face checkpoint folder's files: its config.json and its weights.

Weights come from model.safetensors, pytorch_model.bin (read without torch) or a sharded index
of either; a file that cannot be read is a ``ValueError`` naming it and what is allowed (the
CLI's exit 2), never a library traceback.
"""

from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np

from bort_jax.interop import model_card
from bort_jax.interop.torch_reader import read_torch_bin


def read_hf_tensors(path: str) -> dict[str, np.ndarray]:
  """Reads every tensor of a Hugging Face checkpoint directory, without torch.

  Args:
    path: directory with model.safetensors (or a sharded index) or pytorch_model.bin.

  Returns:
    Name -> numpy array.

  Raises:
    ValueError: no weights file, or one (or an index) that cannot be read, named in the message.
  """
  for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    index_path = os.path.join(path, index_name)
    if os.path.exists(index_path):
      out: dict[str, np.ndarray] = {}
      for shard in _shards(index_path):
        out.update(_read_weights(os.path.join(path, shard)))
      return out
  for name in ("model.safetensors", "pytorch_model.bin"):
    if os.path.exists(os.path.join(path, name)):
      return _read_weights(os.path.join(path, name))
  raise ValueError(f"{path!r} has neither model.safetensors nor pytorch_model.bin")


def _shards(index_path: str) -> list[str]:
  """The weight files a sharded checkpoint's index names."""
  expected = ('expected the index save_pretrained writes: {"weight_map": {tensor name: '
              'shard file}}')
  index = model_card.read_json(index_path, "weights index", expected)
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not all(
      isinstance(v, str) for v in weight_map.values()):
    raise ValueError(f"weights index {index_path!r} has no weight_map of file names; {expected}")
  return sorted(set(weight_map.values()))


def _read_weights(file: str) -> dict[str, np.ndarray]:
  """One weights file, safetensors or a torch zip archive by its name.

  A file that is not what its name says (cut short, overwritten, another format) raises
  ValueError naming it, so the command ends with that message rather than a reader's traceback.
  """
  from safetensors import SafetensorError  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  if file.endswith(".bin"):
    try:
      return read_torch_bin(file)
    except (pickle.UnpicklingError, EOFError, KeyError, zipfile.BadZipFile) as error:
      raise ValueError(f"weights file {file!r} is not a readable torch.save archive "
                       f"({type(error).__name__}: {error}); allowed: a pytorch_model.bin "
                       "written by torch.save or save_pretrained, or model.safetensors"
                       ) from None
  try:
    return dict(load_file(file))
  except SafetensorError as error:
    raise ValueError(f"weights file {file!r} is not a readable safetensors file ({error}); "
                     "allowed: a model.safetensors written by safetensors or save_pretrained, "
                     "or pytorch_model.bin") from None


# ---------------------------------------------------------------------------------------------
# Directories


def read_hf_config(path: str) -> dict:
  """The parsed config.json of a checkpoint directory.

  Raises:
    ValueError: no directory, no config.json, or a config.json that is not a JSON object (the
      message names the file).
  """
  if not os.path.isdir(path):
    raise ValueError(f"{path!r} is not a directory")
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise ValueError(f"{path!r} has no config.json")
  expected = ("expected the JSON object of a Hugging Face BERT or RoBERTa config "
              "(as save_pretrained writes it)")
  hf_config = model_card.read_json(config_path, "config.json", expected)
  if not isinstance(hf_config, dict):
    raise ValueError(f"config.json {config_path!r} holds a JSON {type(hf_config).__name__}; "
                     f"{expected}")
  return hf_config
