"""Config files, ``--config.*`` overrides and workdir checks: the plumbing the modes share.

``--config=configs/pretrain_demo.py:tiny`` loads ``get_config("tiny")`` from that file; a file
inside a package folder (``configs/`` is one) is imported as a module of that package, so
configs can share ``configs/common.py``. A path that does not exist relative to the current
folder is also looked up relative to the repository root, so the commands in the configs'
docstrings work from anywhere in a source checkout.

``--config.train.total_steps=20`` overrides one field. The text is read according to the
field's current type (int, float, bool, str, tuple, dict); a field that does not exist is an
error naming the closest ones, never a new field.

Every function here raises ``UsageError`` (a ``ValueError``) for bad input and writes nothing.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import os
import sys
from typing import Any, Iterable, Sequence

import ml_collections

from bort_jax.runtime import rundir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# UsageError and check_workdir live with the run folder's layout (runtime/rundir.py), so
# that a mode outside this module can check its output folder the same way.
UsageError = rundir.UsageError
check_workdir = rundir.check_workdir


# ----------------------------------------------------------------------------- config files


def resolve_config_path(spec: str) -> tuple[str, str]:
  """Maps ``path[:arg]`` to ``(existing file, arg)``, trying the repository root too."""
  path, _, arg = spec.partition(":")
  if not path:
    raise UsageError(f"--config={spec!r} names no file; give a Python file with a "
                     "get_config(arg) function, e.g. configs/pretrain_demo.py:tiny")
  if not os.path.isfile(path):
    candidate = os.path.join(REPO_ROOT, path)
    if not os.path.isfile(candidate):
      raise UsageError(f"--config: config file {path!r} not found (also tried {candidate!r}); "
                       "give a Python file with a get_config(arg) function")
    path = candidate
  return os.path.abspath(path), arg


def _import_config_module(path: str):
  """Imports a config file; one inside a package folder as a module of that package."""
  folder, file = os.path.split(path)
  name = os.path.splitext(file)[0]
  if os.path.isfile(os.path.join(folder, "__init__.py")):
    root, package = os.path.split(folder)
    if root not in sys.path:
      sys.path.append(root)
    module = importlib.import_module(f"{package}.{name}")
    if os.path.realpath(module.__file__) != os.path.realpath(path):
      raise UsageError(f"--config: {path} would load as {package}.{name}, which is already "
                       f"imported from {module.__file__}; run from one checkout at a time")
    return module
  if REPO_ROOT not in sys.path and os.path.isdir(os.path.join(REPO_ROOT, "configs")):
    sys.path.append(REPO_ROOT)  # a loose config file may still use configs.common
  module_spec = importlib.util.spec_from_file_location(f"bort_jax_config_{name}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``get_config(arg)`` of the file named by ``path[:arg]``.

  Raises:
    UsageError: no such file, no ``get_config``, or an arg the config does not take.
  """
  path, arg = resolve_config_path(spec)
  module = _import_config_module(path)
  if not callable(getattr(module, "get_config", None)):
    raise UsageError(f"--config: {path} has no get_config(arg) function")
  try:
    config = module.get_config(arg or None)
  except ValueError as error:  # the configs' arg parser names the arg and what is allowed
    raise UsageError(f"--config={spec}: {error}") from error
  if not isinstance(config, ml_collections.ConfigDict):
    raise UsageError(f"--config: get_config of {path} returned {type(config).__name__}, "
                     "not an ml_collections.ConfigDict")
  return config


# ----------------------------------------------------------------------------- overrides


def field_paths(config: ml_collections.ConfigDict, prefix: str = "config") -> list[str]:
  """Dotted names of every field, ``config.optim.lr`` style, nested ConfigDicts included."""
  out = []
  for key in sorted(config.keys()):
    value = config[key]
    out.append(f"{prefix}.{key}")
    if isinstance(value, ml_collections.ConfigDict):
      out += field_paths(value, f"{prefix}.{key}")
  return out


def field_lines(config: ml_collections.ConfigDict, width: int = 100) -> list[str]:
  """``config.optim.lr = 0.0005`` for every leaf field (long values cut), for ``--help``."""
  lines = []
  for path in field_paths(config):
    value = get_field(config, path)
    if isinstance(value, ml_collections.ConfigDict) and len(value):
      continue
    text = f"  {path} = {value.to_dict() if hasattr(value, 'to_dict') else value!r}"
    lines.append(text if len(text) <= width else text[:width - 3] + "...")
  return lines


def get_field(config: ml_collections.ConfigDict, path: str) -> Any:
  """The value at a dotted ``config.a.b`` path (the field must exist)."""
  node = config
  for key in path.split(".")[1:]:
    node = node[key]
  return node


def _unknown_field(config: ml_collections.ConfigDict, path: str) -> UsageError:
  """The error for an override of a field that does not exist, naming the closest ones."""
  node, parent, missing = config, "config", ""
  for key in path.split(".")[1:]:
    if not isinstance(node, ml_collections.ConfigDict):
      return UsageError(f"--{path}: unknown config field; {parent} is a value, not a group "
                        f"of fields (set it with --{parent}=VALUE)")
    if key not in node:
      missing = key
      break
    node, parent = node[key], f"{parent}.{key}"
  siblings = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
  close = [f"{parent}.{k}" for k in difflib.get_close_matches(missing, siblings, n=3)]
  if close:
    hint = f"did you mean {' or '.join(close)}?"
  else:
    hint = f"{parent} has the fields {', '.join(siblings) or '(none)'}"
  return UsageError(f"--{path}: unknown config field; {hint} (--help lists every field with "
                    "its default)")


def parse_value(text: str, current: Any, path: str) -> Any:
  """Reads override text as the type of the field's current value.

  Raises:
    UsageError: the text is not a value of that type.
  """
  def bad(want: str) -> UsageError:
    return UsageError(f"--{path}={text}: expected {want} (the field is now {current!r})")

  if isinstance(current, bool):
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise bad("true or false")
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise bad("an integer") from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise bad("a number") from None
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if isinstance(current, (tuple, list)):
    # A bare string is a one-element tuple: --config.data.corpus_files=/data/*.txt
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)
  if isinstance(current, ml_collections.ConfigDict) or current is None and isinstance(value,
                                                                                    dict):
    if not isinstance(value, dict):
      raise bad("a dict like {'data': 4}")
    return ml_collections.ConfigDict(value)
  return value


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Iterable[tuple[str, str]]) -> ml_collections.ConfigDict:
  """Sets ``config.a.b = text`` for each ``("config.a.b", text)``; returns the config.

  Raises:
    UsageError: an unknown field (naming the closest ones) or a value of the wrong type.
  """
  for path, text in overrides:
    keys = path.split(".")[1:]
    node = config
    for key in keys[:-1]:
      if not isinstance(node, ml_collections.ConfigDict) or key not in node:
        raise _unknown_field(config, path)
      node = node[key]
    if not keys or not isinstance(node, ml_collections.ConfigDict) or keys[-1] not in node:
      raise _unknown_field(config, path)
    value = parse_value(text, node[keys[-1]], path)
    try:
      node[keys[-1]] = value
    except (TypeError, ValueError) as error:
      raise UsageError(f"--{path}={text}: {error}") from None
  return config


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """Separates ``--config.a.b=V`` / ``--config.a.b V`` from the other arguments.

  Returns:
    ``(other arguments, [("config.a.b", "V"), ...])`` in command-line order.

  Raises:
    UsageError: an override without a value.
  """
  rest, overrides, argv = [], [], list(argv)
  k = 0
  while k < len(argv):
    arg = argv[k]
    if arg.startswith("--config."):
      name, sep, value = arg[2:].partition("=")
      if not sep:
        if k + 1 >= len(argv):
          raise UsageError(f"{arg} needs a value: {arg}=VALUE")
        k, value = k + 1, argv[k + 1]
      overrides.append((name, value))
    else:
      rest.append(arg)
    k += 1
  return rest, overrides


# ----------------------------------------------------------------------------- paths


