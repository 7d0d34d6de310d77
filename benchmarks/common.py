"""Shared helpers of the benchmark scripts: machine facts, a matmul ceiling, fair timing, JSON.

Timings on a shared machine drift, so the scripts compare things measured side by side in one
run: :func:`interleaved_timing` runs every contender once per round, round-robin, and reports
the median over rounds, so a slow patch of the machine hits all contenders alike.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python benchmarks/x.py` from anywhere
  sys.path.insert(0, ROOT)


def optional_import(name: str):
  """The module ``name``, or None when it is not installed (torch, onnxruntime...)."""
  if importlib.util.find_spec(name) is None:
    return None
  return importlib.import_module(name)


def load_script(relative_path: str):
  """Imports a repository script (e.g. ``scripts/hf_param_counts.py``) as a module."""
  path = os.path.join(ROOT, relative_path)
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def machine_info() -> dict:
  """What the numbers were measured on: CPU, load, library versions."""
  import jax

  info = {
      "platform": platform.platform(),
      "processor": _cpu_model(),
      "cpu_count": os.cpu_count(),
      "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jax_device": jax.devices()[0].device_kind,
      "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  for name in ("torch", "transformers", "onnxruntime"):
    if importlib.util.find_spec(name) is not None:
      info[name] = getattr(importlib.import_module(name), "__version__", "?")
  return info


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def summarize(seconds: list[float]) -> dict:
  """``cost.summarize_times`` (median, extremes, IQR in ms) with every timing kept."""
  from bort_jax.core import cost  # pylint: disable=import-outside-toplevel
  out = cost.summarize_times(seconds)
  out.pop("repeats")
  return out | {"times_ms": sorted(round(1e3 * s, 3) for s in seconds)}


def interleaved_timing(fns: dict[str, Callable[[], Any]], rounds: int,
                       warmup: int = 1, log: Callable[[str], None] | None = None) -> dict:
  """Times each callable once per round, round-robin, and summarises over rounds.

  The starting contender rotates from round to round so none always runs first (right after
  another one's cache pollution) or last.

  Args:
    fns: name -> a callable that runs one measured unit and returns when it is done (it must
      block on asynchronous work itself).
    rounds: rounds; each contender is timed once per round.
    warmup: untimed calls of each contender before the first round.
    log: optional progress printer.

  Returns:
    name -> :func:`summarize` of its timings (``cost.time_interleaved``, the package's one
    round-robin timer; it adds ``repeats``).
  """
  from bort_jax.core import cost  # pylint: disable=import-outside-toplevel
  return cost.time_interleaved(fns, rounds, warmup=warmup, log=log)


def jax_matmul(n: int = 2048, seed: int = 0) -> tuple[Callable[[], Any], float]:
  """A compiled float32 n x n matmul on the default device and its FLOP count.

  Returns:
    ``(run, flops)``: ``run()`` multiplies once and waits for the result.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(seed)
  a = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32))
  b = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32))
  compiled = jax.jit(lambda x, y: jnp.matmul(x, y, precision="highest")).lower(a, b).compile()
  return (lambda: compiled(a, b).block_until_ready()), 2.0 * n ** 3


def matmul_ceiling(n: int = 2048, repeats: int = 7) -> dict:
  """Measured float32 matmul throughput of JAX (and numpy) on this machine.

  Args:
    n: the square matrices' size.
    repeats: timed runs; the median is reported.

  Returns:
    ``jax_gflops`` and ``numpy_gflops`` (median over repeats) and the size.
  """
  import numpy as np

  run, flops = jax_matmul(n)
  rng = np.random.default_rng(1)
  a = rng.standard_normal((n, n), dtype=np.float32)
  b = rng.standard_normal((n, n), dtype=np.float32)
  result = interleaved_timing({"jax": run, "numpy": lambda: a @ b}, rounds=repeats, warmup=2)
  return {"n": n, "dtype": "float32",
          "jax_gflops": flops / result["jax"]["median_ms"] / 1e6,
          "numpy_gflops": flops / result["numpy"]["median_ms"] / 1e6}


def write_json(result: Any, out: str | None = None) -> None:
  """Prints ``result`` as JSON to stdout and, when ``out`` is given, to that file."""
  text = json.dumps(result, indent=2, sort_keys=False)
  print(text)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      f.write(text + "\n")


def log(message: str) -> None:
  """Progress to stderr, so stdout stays pure JSON."""
  print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
