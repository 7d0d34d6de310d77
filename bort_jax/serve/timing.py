"""Several models timed side by side in one runtime, in a process of that runtime's own.

:func:`interleaved_latency` is ``cost.interleaved_latency`` for any runtime of
``serve.runtime.RUNTIMES``: random-weight models without a head, timed round-robin (A B C A B
C ...), median and IQR. :func:`in_own_process` runs it in a fresh Python process
(``python -m bort_jax.serve.timing``, JSON in and out), so that no other runtime's threads
share the cores while it times: the report times JAX in its own process and each ONNX Runtime
form in one of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Callable, Mapping

from bort_jax.core.arch import ModelConfig, get_model_config


def interleaved_latency(configs: Mapping[str, ModelConfig | str], batch: int, seq_len: int,
                        runtime: str = "jax", rounds: int = 10, warmup: int = 2,
                        log: Callable[[str], None] | None = None) -> dict:
  """name -> the timing of ``cost.interleaved_latency`` plus ``runtime``."""
  from bort_jax.core import cost  # pylint: disable=import-outside-toplevel
  from bort_jax.serve import runtime as runtime_lib  # pylint: disable=import-outside-toplevel
  runtime_lib.check_runtime(runtime, "runtime")
  if runtime == "jax":
    out = cost.interleaved_latency(configs, batch, seq_len, rounds, warmup, log)
  else:
    runs, builds, archs = {}, {}, {}
    for name, config in configs.items():
      config = get_model_config(config)
      runs[name], builds[name] = runtime_lib.compile_forward(config, batch, seq_len, runtime)
      archs[name] = str(config.arch)
    out = cost.time_interleaved(runs, rounds, warmup, log)
    for name in out:
      out[name].update(compile_s=builds[name], arch=archs[name], batch=batch, seq_len=seq_len,
                       device="cpu")
  for timing in out.values():
    timing["runtime"] = runtime
  return out


def in_own_process(configs: Mapping[str, ModelConfig], batch: int, seq_len: int, runtime: str,
                   rounds: int, warmup: int, timeout: float = 3600.0) -> dict:
  """:func:`interleaved_latency` in a new Python process (the isolation the module describes).

  Raises:
    RuntimeError: the process failed (its last lines of stderr in the message).
  """
  request = {"configs": {k: get_model_config(v).to_dict() for k, v in configs.items()},
             "batch": batch, "seq_len": seq_len, "runtime": runtime, "rounds": rounds,
             "warmup": warmup}
  done = subprocess.run([sys.executable, "-m", "bort_jax.serve.timing"],
                        input=json.dumps(request), capture_output=True, text=True,
                        timeout=timeout, check=False)
  if done.returncode != 0:
    tail = " | ".join(done.stderr.strip().splitlines()[-3:])
    raise RuntimeError(f"timing {runtime} in its own process failed: {tail}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def _main() -> None:
  request = json.loads(sys.stdin.read())
  configs = {k: ModelConfig.from_dict(v) for k, v in request["configs"].items()}
  out = interleaved_latency(configs, request["batch"], request["seq_len"], request["runtime"],
                            request["rounds"], request["warmup"])
  print(json.dumps(out))


if __name__ == "__main__":
  _main()
