"""Reads ``pytorch_model.bin`` (a ``torch.save`` zip archive of a state dict) without torch.

The archive holds ``<root>/data.pkl`` (the pickled dict) and one ``<root>/data/<key>`` file per
storage. A restricted unpickler maps torch's tensor-rebuilding functions and storage classes to
numpy and refuses every other global, so a checkpoint cannot run code on load.
"""

from __future__ import annotations

import pickle
import zipfile
from typing import Any

import numpy as np


class _StorageType:
  """Stands in for ``torch.FloatStorage`` and friends: just the element dtype."""

  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


def _storage_types() -> dict[str, _StorageType]:
  import ml_dtypes  # pylint: disable=import-outside-toplevel  (ships with jax)
  return {name: _StorageType(dtype) for name, dtype in {
      "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
      "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
      "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
      "BoolStorage": np.bool_}.items()}


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """numpy version of torch._utils._rebuild_tensor_v2: a strided view of a flat storage."""
  del unused  # requires_grad, backward hooks, metadata: meaningless for numpy.
  if not size:
    return np.array(storage[offset])
  item = storage.itemsize
  needed = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset
  if needed > storage.size:
    raise ValueError(f"tensor of size {tuple(size)} runs past its storage of {storage.size}")
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * item for s in stride))
  return np.array(view)


def _rebuild_parameter(data, *unused):
  del unused
  return data


class _StateDict(dict):
  """Stands in for the OrderedDict of a state dict; it also takes the ``_metadata`` attribute
  that torch pickles along with it (which a plain dict could not)."""


class _TorchUnpickler(pickle.Unpickler):
  """Unpickles a torch state dict into numpy arrays; any other global is refused."""

  def __init__(self, file, archive: zipfile.ZipFile, root: str):
    super().__init__(file)
    self._archive, self._root, self._storages = archive, root, {}
    self._types = _storage_types()
    self._globals: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("collections", "OrderedDict"): _StateDict,
    }

  def find_class(self, module, name):
    if module == "torch" and name in self._types:
      return self._types[name]
    if (module, name) in self._globals:
      return self._globals[(module, name)]
    raise pickle.UnpicklingError(
        f"pytorch_model.bin refers to {module}.{name}, which the torch-free reader does not "
        "allow (only tensors, parameters and dicts are read)")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r} in pytorch_model.bin")
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
    if key not in self._storages:
      data = self._archive.read(f"{self._root}/data/{key}")
      self._storages[key] = np.frombuffer(data, dtype=storage_type.dtype.newbyteorder("<"))
    return self._storages[key]


def read_torch_bin(path: str) -> dict[str, np.ndarray]:
  """Reads a ``torch.save`` zip archive of a state dict into numpy arrays, without torch.

  Args:
    path: the pytorch_model.bin file.

  Returns:
    Name -> numpy array (copies, independent of the file).
  """
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path!r} is not a torch zip archive (the legacy pre-1.6 format is not "
                     "supported; re-save it with a current torch or as safetensors)")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise ValueError(f"{path!r} should hold exactly one */data.pkl, found {pickles}")
    root = pickles[0][:-len("/data.pkl")]
    byteorder = f"{root}/byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
      raise ValueError(f"{path!r} was written big-endian, which is not supported")
    with archive.open(pickles[0]) as f:
      state = _TorchUnpickler(f, archive, root).load()
  if not isinstance(state, dict):
    raise ValueError(f"{path!r} does not hold a state dict")
  if "state_dict" in state and isinstance(state["state_dict"], dict):
    state = state["state_dict"]
  bad = [k for k, v in state.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise ValueError(f"{path!r} entries {bad[:5]} are not tensors")
  return dict(state)
