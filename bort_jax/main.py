"""The ``bort-jax`` command: a thin dispatcher to each mode's own ``main(argv)``.

    bort-jax cost --arch bort --arch bert-large        parameter counts, FLOPs, latency
    bort-jax convert --from-hf DIR --out OUT           Hugging Face <-> bort_jax checkpoints
    bort-jax data fetch                                the offline demo suite
    bort-jax teacher-adapt --config=... --workdir=...  give a headless teacher an MLM head
    bort-jax distill --config=... --workdir=...        pretraining by distillation
    bort-jax extract --config=... --workdir=...        optimal subarchitecture extraction
    bort-jax demo --workdir=...                        the whole demo pipeline
    bort-jax finetune --config=...:task=... --workdir  fine-tuning, dev metrics, submissions
    bort-jax evaluate --checkpoint DIR --split ...     a fine-tuned checkpoint's metrics
    bort-jax predict --checkpoint DIR --text ...       labels and probabilities for your text

Modules are imported only when their mode runs, so ``bort-jax cost`` does not pay for TFDS.
"""

from __future__ import annotations

import importlib
import sys

# mode -> (module, function, one-line help)
MODES = {
    "cost": ("bort_jax.core.cost", "main", "parameter counts, FLOPs and latency of architectures"),
    "convert": ("bort_jax.interop.convert", "main", "convert Hugging Face checkpoints both ways"),
    "data": ("bort_jax.main", "data_main", "data fetch: fetch the offline demo suite"),
    "teacher-adapt": ("bort_jax.pipelines.distill", "teacher_adapt_main",
                      "train an MLM head for a headless teacher"),
    "distill": ("bort_jax.pipelines.distill", "main", "pretrain a student by distillation"),
    "extract": ("bort_jax.pipelines.extract", "main", "optimal subarchitecture extraction (FPTAS)"),
    "demo": ("bort_jax.pipelines.demo", "main", "run the whole demo pipeline"),
    "finetune": ("bort_jax.finetune.loop", "main", "fine-tune on a GLUE/SuperGLUE/RACE/demo task"),
    "evaluate": ("bort_jax.finetune.evaluate", "main", "score a fine-tuned checkpoint on a split"),
    "predict": ("bort_jax.finetune.predict", "main", "labels and probabilities for your text"),
}


def _usage() -> str:
  lines = ["usage: bort-jax MODE [options]   (bort-jax MODE --help for a mode's options)", "",
           "modes:"]
  lines += [f"  {name:<14} {help_}" for name, (_, _, help_) in MODES.items()]
  return "\n".join(lines)


def data_main(argv: list[str]) -> int:
  """``bort-jax data fetch ...``: the demo suite into the cache (``data/fetch.py``)."""
  if not argv or argv[0] not in ("fetch",):
    print("usage: bort-jax data fetch [--cache-dir DIR] [--items a,b] [--force]",
          file=sys.stderr)
    return 0 if argv and argv[0] in ("-h", "--help") else 2
  from bort_jax.data import fetch
  return fetch.main(argv[1:])


def main(argv: list[str] | None = None) -> int:
  """Entry point of the console script; returns the process exit code."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(_usage())
    return 0
  mode, rest = argv[0], argv[1:]
  if mode not in MODES:
    print(f"bort-jax: unknown mode {mode!r}\n\n{_usage()}", file=sys.stderr)
    return 2
  module_name, function_name, _ = MODES[mode]
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as error:
    if error.name and error.name.startswith("bort_jax"):
      print(f"bort-jax: mode {mode!r} is not available in this build ({error})",
            file=sys.stderr)
      return 2
    raise
  result = getattr(module, function_name)(rest)
  return int(result or 0)


if __name__ == "__main__":
  sys.exit(main())
