"""ONNX Runtime as a runtime: sessions, the forward of one batch, and forward-pass latency.

The runtimes a user can name (``predict --runtime``, ``cost --measure --runtime``,
``config.cost.runtime`` of an extraction): ``jax`` (the compiled ``model.apply``),
``onnxruntime`` (the float32 graph of ``serve.onnx_graph``) and ``onnxruntime-int8`` (that
graph with ONNX Runtime's dynamic int8 quantisation of every weight MatMul).

Sessions made for timing turn ONNX Runtime's thread spinning off
(``session.intra_op.allow_spinning``): its intra-op threads otherwise keep the cores busy for a
while after each call and slow whatever runs next in the process (JAX was once measured 50-60%
slower that way). A served model (``predict``) keeps the default.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any, Callable

import numpy as np

from bort_jax.core.arch import get_model_config

RUNTIMES = ("jax", "onnxruntime", "onnxruntime-int8")
ONNX_RUNTIMES = RUNTIMES[1:]
INSTALL = "pip install -e '.[serve]'"


class MissingExtraError(ValueError):
  """ONNX Runtime or onnx is not installed (a ValueError: exit status 2, one line)."""


def check_runtime(runtime: str, field: str = "--runtime") -> str:
  """``runtime`` if it is one of :data:`RUNTIMES` and, for an ONNX one, the extra is installed.

  Raises:
    ValueError: an unknown runtime. MissingExtraError: onnx / onnxruntime missing.
  """
  if runtime not in RUNTIMES:
    raise ValueError(f"{field}={runtime!r} is not a runtime; allowed: {', '.join(RUNTIMES)}")
  if runtime != "jax":
    require()
  return runtime


def require() -> None:
  """Raises MissingExtraError (one line naming the install command) without onnx/onnxruntime."""
  missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
  if missing:
    raise MissingExtraError(f"{' and '.join(missing)} not installed: ONNX export and the "
                            f"ONNX Runtime runtimes need the serve extra ({INSTALL})")


def session(model: str | bytes, *, threads: int = 0, spinning: bool = True):
  """An ONNX Runtime CPU session of a model file (or serialized bytes).

  Args:
    model: path of the ``.onnx`` file, or its bytes.
    threads: intra-op threads (0: ONNX Runtime's default, one per physical core).
    spinning: let idle intra-op threads spin (see the module docstring; False for timing).
  """
  require()
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  options = ort.SessionOptions()
  options.intra_op_num_threads = int(threads)
  options.log_severity_level = 3  # errors only
  if not spinning:
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
  return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def forward(sess) -> Callable[[dict], np.ndarray]:
  """``run(batch) -> output``: the session on a batch dict of integer arrays (the keys the
  graph takes, as int64; other keys such as ``label`` or ``weight`` are ignored)."""
  names = [i.name for i in sess.get_inputs()]

  def run(batch: dict) -> np.ndarray:
    feed = {}
    for name in names:
      if name in batch:
        feed[name] = np.asarray(batch[name], np.int64)
      elif name == "token_type_ids":
        feed[name] = np.zeros(np.shape(batch["input_ids"]), np.int64)
    return sess.run(None, feed)[0]

  return run


def quantize_int8(source: str, target: str) -> None:
  """Writes ``target``: ``source`` with every MatMul by a weight quantised to int8.

  ONNX Runtime's dynamic quantisation: signed int8 weights with one scale per output channel
  (per tensor lost 1.3 points of accuracy on the demo's bbc_news student, per channel none, at
  the same speed); activations quantised at run time. MatMuls of two activations (attention)
  and the embedding tables stay float32.
  """
  require()
  from onnxruntime.quantization import QuantType, quantize_dynamic  # pylint: disable=C0415
  quiet = logging.getLogger()
  level = quiet.level
  quiet.setLevel(logging.ERROR)  # its advice to pre-process the graph, printed every time
  try:
    quantize_dynamic(source, target, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     per_channel=True, extra_options={"MatMulConstBOnly": True})
  finally:
    quiet.setLevel(level)


def count_ops(path: str) -> dict[str, int]:
  """How many nodes of each op type the graph at ``path`` has."""
  import onnx  # pylint: disable=import-outside-toplevel
  counts: dict[str, int] = {}
  for node in onnx.load(path, load_external_data=False).graph.node:
    counts[node.op_type] = counts.get(node.op_type, 0) + 1
  return counts


def timing_model(config, runtime: str, seq_len: int, folder: str, head: Any = "none",
                 seed: int = 0) -> str:
  """Writes the graph of a random-weight model of ``config`` for ``runtime`` into ``folder``
  (the int8 one quantised) and returns its path."""
  import onnx  # pylint: disable=import-outside-toplevel

  from bort_jax.core import cost, model  # pylint: disable=import-outside-toplevel
  from bort_jax.serve import onnx_graph  # pylint: disable=import-outside-toplevel
  spec = model.HeadSpec(head) if isinstance(head, str) else head
  params = cost.timing_params(config, spec, seq_len, seed)
  path = os.path.join(folder, "model.onnx")
  onnx.save(onnx_graph.build(params, config, spec), path)
  if runtime == "onnxruntime-int8":
    quantized = os.path.join(folder, "model.int8.onnx")
    quantize_int8(path, quantized)
    return quantized
  return path


def compile_forward(config, batch: int, seq_len: int, runtime: str, head: Any = "none",
                    seed: int = 0) -> tuple[Callable[[], Any], float]:
  """``cost.compile_forward`` for any runtime: ``(run, seconds to build)`` of a random-weight
  model and batch; for ONNX Runtime, building is the export (and quantisation) and session
  creation, and the session runs without spinning."""
  import tempfile  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel

  from bort_jax.core import cost  # pylint: disable=import-outside-toplevel
  config = get_model_config(config)
  if runtime == "jax":
    return cost.compile_forward(config, batch, seq_len, head, seed)
  check_runtime(runtime)
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="bort_onnx_") as folder:
    sess = session(timing_model(config, runtime, seq_len, folder, head, seed), spinning=False)
  inputs = cost.random_batch(config, batch, seq_len, seed)
  run_batch = forward(sess)
  return (lambda: run_batch(inputs)), time.perf_counter() - start


def measure_latency(config, batch: int, seq_len: int, runtime: str = "jax", repeats: int = 10,
                    warmup: int = 2, head: Any = "none", seed: int = 0) -> dict:
  """``cost.measure_latency`` in ``runtime``; the result names the runtime."""
  from bort_jax.core import cost  # pylint: disable=import-outside-toplevel
  if runtime == "jax":
    return dict(cost.measure_latency(config, batch, seq_len, repeats=repeats, warmup=warmup,
                                     head=head, seed=seed), runtime="jax")
  if repeats < 1 or warmup < 0:
    raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
  config = get_model_config(config)
  run, build_seconds = compile_forward(config, batch, seq_len, runtime, head, seed)
  times = cost.time_back_to_back(run, repeats, warmup)
  return {"arch": str(config.arch), "batch": batch, "seq_len": seq_len, "device": "cpu",
          "runtime": runtime, "compile_s": build_seconds, **cost.summarize_times(times)}
