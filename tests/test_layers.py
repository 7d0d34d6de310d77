"""The package's layering, checked from the source: imports, module sizes, function lengths.

The folders of ``bort_jax`` are its architecture (README, "Layout"): ``core`` sits on nothing
else of the package; ``runtime``, ``interop``, ``data`` and ``search`` never reach up into the
modes (``pipelines``, the fine-tuning loops, the CLI); ``finetune`` sits beside ``pipelines``,
not on it; every folder imports only those ranked below it (docs/ARCHITECTURE.md's map); no
import circle exists anywhere, deferred imports counted; the pure algorithms import no array
library. Every check collects all offenders before failing, so one run lists everything a
change has to fix.
"""

import ast
import importlib
import pathlib
import re
import warnings

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "bort_jax"
MAX_MODULE_BYTES = 25_000
MAX_FUNCTION_LINES = 80

# Lower layers may use these fine-tuning modules (the task registry, its metrics and the
# leaderboard file formats, which the demo data registers into); every other finetune module is
# a mode (a training or evaluation loop) and sits above them.
FINETUNE_REGISTRY = {"bort_jax.finetune", "bort_jax.finetune.tasks", "bort_jax.finetune.metrics",
                     "bort_jax.finetune.submission", "bort_jax.finetune.casts"}
LOWER = ("core", "runtime", "interop", "data", "search")
PURE = ("bort_jax.search.fptas", "bort_jax.search.buckets", "bort_jax.search.audit")
ARRAY_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax")

# Functions allowed over MAX_FUNCTION_LINES, each with its reason.
LONG_FUNCTIONS = {}

# TEMPORARY: modules and functions other engineers are splitting right now. Each entry must go
# as soon as its module is split; an entry that is no longer needed raises a warning naming it.
TEMPORARY_BIG_MODULES = {}
TEMPORARY_LONG_FUNCTIONS = {}


def _modules():
  """{dotted name: path} of every module of the package."""
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _imports(name: str, path: pathlib.Path) -> set:
  """Every module ``name`` imports, at any depth of the file (deferred imports count too)."""
  tree = ast.parse(path.read_text(), filename=str(path))
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      found.add(base)
      # ``from bort_jax.search import fptas`` imports the module bort_jax.search.fptas.
      found.update(f"{base}.{alias.name}" for alias in node.names)
  return found


MODULES = _modules()
IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _internal(name: str) -> set:
  return {m for m in IMPORTS[name] if m in MODULES and m != name}


def _layer(name: str) -> str:
  parts = name.split(".")
  return parts[1] if len(parts) > 1 else ""


def _is_mode(module: str) -> bool:
  """Modules that run a mode: pipelines, the CLI, and fine-tuning outside its registry."""
  layer = _layer(module)
  return (layer in ("pipelines", "main", "cli")
          or (layer == "finetune" and module not in FINETUNE_REGISTRY))


def test_the_walk_sees_the_package():
  # Guards the checks below against passing vacuously on a wrong path or a parse slip.
  assert {"bort_jax.core.model", "bort_jax.search.fptas", "bort_jax.pipelines.extract"} <= set(
      MODULES)
  assert "bort_jax.core.arch" in _internal("bort_jax.search.buckets")
  assert "bort_jax.search.fptas" in _internal("bort_jax.pipelines.extract")


def test_core_imports_only_core():
  offenders = sorted(f"{name} imports {target}" for name in MODULES if _layer(name) == "core"
                     for target in _internal(name) if _layer(target) != "core")
  assert not offenders, "core/ must stand on nothing else of the package:\n" + "\n".join(
      offenders)


def test_lower_layers_never_import_a_mode():
  offenders = sorted(f"{name} imports {target}" for name in MODULES if _layer(name) in LOWER
                     for target in _internal(name) if _is_mode(target))
  assert not offenders, ("core/, runtime/, interop/, data/ and search/ must not import "
                         "pipelines/, fine-tuning loops or the CLI:\n" + "\n".join(offenders))


# The folders in layer order: a module imports only from its own folder and the folders ranked
# below it. data/ and interop/ are peers (the Hugging Face export writes tokenizer files with
# data/'s tokenizers; the tiny suite converts its teacher with interop/). The one exception is
# the demo data registering its tasks in the fine-tuning task registry (FINETUNE_REGISTRY).
RANK = {"": 0, "core": 0, "runtime": 1, "data": 2, "interop": 2, "search": 3, "finetune": 4,
        "serve": 5, "pipelines": 6, "plan": 7, "cli": 8, "main": 9}


def test_each_folder_imports_only_the_folders_below_it():
  offenders = sorted(
      f"{name} imports {target}" for name in MODULES for target in _internal(name)
      if RANK[_layer(target)] > RANK[_layer(name)]
      and not (_layer(name) == "data" and target in FINETUNE_REGISTRY))
  assert not offenders, ("a folder imports one ranked above it (docs/ARCHITECTURE.md):\n"
                         + "\n".join(offenders))


def _cycles(graph: dict) -> list[list[str]]:
  """The import circles of ``graph`` ({module: imported modules}): its strongly connected
  components of two or more modules, and modules that import themselves (Tarjan's algorithm,
  iterative)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []
  for root in sorted(graph):
    if root in index:
      continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = len(index)
    stack.append(root)
    on_stack.add(root)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = len(index)
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph[child]))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = []
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.append(member)
          if member == node:
            break
        if len(component) > 1 or node in graph[node]:
          found.append(sorted(component))
  return found


def test_no_import_circle_anywhere_in_the_package():
  # Deferred imports (inside a function) count: one may keep start-up light, never hide a
  # circle. A circle means two modules cannot be understood, tested or moved apart.
  graph = {name: _internal(name) for name in MODULES}
  circles = _cycles(graph)
  assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_circle_finder_finds_circles():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
  assert sorted(_cycles(graph)) == [["a", "b", "c"], ["e"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_finetune_never_imports_the_pretraining_pipelines():
  offenders = sorted(f"{name} imports {target}" for name in MODULES
                     if _layer(name) == "finetune" for target in _internal(name)
                     if _layer(target) == "pipelines")
  assert not offenders, ("finetune/ sits beside pipelines/, not on it (shared setup belongs "
                         "in a lower layer):\n" + "\n".join(offenders))


def _closure(name: str) -> set:
  seen, todo = set(), [name]
  while todo:
    module = todo.pop()
    if module in seen:
      continue
    seen.add(module)
    todo.extend(_internal(module))
  return seen


def test_pure_algorithms_import_no_array_library():
  offenders = []
  for pure in PURE:
    assert pure in MODULES, f"{pure} is gone: update PURE"
    for module in sorted(_closure(pure)):
      for target in sorted(IMPORTS[module]):
        if target.split(".")[0] in ARRAY_LIBRARIES:
          via = "" if module == pure else f" (through {module})"
          offenders.append(f"{pure} imports {target}{via}")
  assert not offenders, "\n".join(offenders)


def test_no_module_over_the_size_limit():
  offenders, stale = [], []
  for name, path in MODULES.items():
    rel = str(path.relative_to(PACKAGE.parent))
    size = path.stat().st_size
    if size > MAX_MODULE_BYTES and rel not in TEMPORARY_BIG_MODULES:
      offenders.append(f"{rel}: {size} bytes")
    if size <= MAX_MODULE_BYTES and rel in TEMPORARY_BIG_MODULES:
      stale.append(rel)
  assert not offenders, f"modules over {MAX_MODULE_BYTES} bytes:\n" + "\n".join(offenders)
  if stale:
    warnings.warn("remove from TEMPORARY_BIG_MODULES (now small enough): " + ", ".join(stale))


def _long_functions() -> dict:
  """{"path:qualified name": lines} of every function over the limit (docstring included)."""
  out = {}
  for path in MODULES.values():
    rel = str(path.relative_to(PACKAGE.parent))

    def visit(node, prefix):
      for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
          lines = child.end_lineno - child.lineno + 1
          if lines > MAX_FUNCTION_LINES:
            out[f"{rel}:{prefix}{child.name}"] = lines
          visit(child, f"{prefix}{child.name}.")
        elif isinstance(child, ast.ClassDef):
          visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(path.read_text()), "")
  return out


def test_no_function_over_the_length_limit():
  found = _long_functions()
  allowed = {**LONG_FUNCTIONS, **TEMPORARY_LONG_FUNCTIONS}
  offenders = [f"{k}: {n} lines" for k, n in sorted(found.items()) if k not in allowed]
  stale = [k for k in TEMPORARY_LONG_FUNCTIONS if k not in found]
  assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(offenders)
  if stale:
    warnings.warn("remove from TEMPORARY_LONG_FUNCTIONS (now short enough): " + ", ".join(stale))


@pytest.mark.parametrize("source,pattern", [
    ("from bort_jax.pipelines import distill\n", "bort_jax.pipelines.distill"),
    ("def f():\n  from bort_jax import cli\n", "bort_jax.cli"),
    ("import jax.numpy as jnp\n", "jax.numpy"),
])
def test_import_walk_finds_deferred_and_from_imports(tmp_path, source, pattern):
  path = tmp_path / "probe.py"
  path.write_text(source)
  assert pattern in _imports("bort_jax.core.probe", path)


def test_no_file_cites_a_document_outside_the_repository():
  # The decisions the code relies on are in docs/ (BORT.md, EXTRACTION.md, ...); a reader of a
  # clone must not be sent to a specification or a machine path the clone does not have.
  # The names are assembled here so that this file does not match itself.
  outside = [name + ".md" for name in ("PAPER", "BASELINES", "DESIGN", "STYLE")]
  outside.append("/" + "work/")
  root = PACKAGE.parent
  offenders = []
  for path in sorted(root.rglob("*")):
    rel = path.relative_to(root)
    if (not path.is_file() or rel.parts[0].startswith(".") or "fixtures" in rel.parts
        or path.suffix not in (".py", ".md", ".sh", ".cfg", ".toml", ".json", ".txt")):
      continue
    text = path.read_text(errors="replace")
    offenders += [f"{rel}: {name}" for name in outside if name in text]
  assert not offenders, "\n".join(offenders)



def test_every_named_entry_point_exists():
  # "module:function" strings (the CLI's mode table and the examples in docstrings) must name
  # a function that is there: an example naming a module that does not exist misleads.
  named = {m.group(1, 2) for path in MODULES.values()
           for m in re.finditer(r"\b(bort_jax(?:\.\w+)*):(\w+)", path.read_text())}
  assert ("bort_jax.finetune.modes", "run") in named  # the walk sees the mode table
  missing = sorted(f"{module}:{name}" for module, name in named
                   if module not in MODULES or not hasattr(importlib.import_module(module), name))
  assert not missing, f"entry points that do not exist: {missing}"
