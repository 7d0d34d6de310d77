"""``bort-jax cost``: parameter counts, FLOPs and, with ``--measure``, latency in a runtime.

    bort-jax cost --arch bort --arch bert-large
    bort-jax cost --arch bort --measure --runtime onnxruntime-int8 --batch 8

Only ``argparse`` is imported here: ``bort_jax.main`` reads the flags of every mode at start.
"""

from __future__ import annotations

import argparse
import json

RUNTIMES = ("jax", "onnxruntime", "onnxruntime-int8")  # serve.runtime.RUNTIMES


def flags(parser: argparse.ArgumentParser) -> None:
  from bort_jax.core import arch  # pylint: disable=import-outside-toplevel
  parser.add_argument("--arch", action="append", default=None,
                      help=f"preset ({', '.join(sorted(arch.PRESETS))}) or arch string like "
                           "D4-A8-H1024-I768; repeatable (default: the paper's table)")
  parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
  parser.add_argument("--batch", type=int, default=1, help="sequences per forward pass")
  parser.add_argument("--measure", action="store_true",
                      help="also time the forward pass (random weights, no MLM head)")
  parser.add_argument("--runtime", default="jax",
                      help=f"with --measure: {', '.join(RUNTIMES)} (the ONNX Runtime ones "
                           "need the serve extra)")
  parser.add_argument("--repeats", type=int, default=10, help="timed runs with --measure")
  parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
  """The table (or JSON) of the architectures; the exit status.

  Raises:
    ValueError: a bad flag value (exit status 2, one paragraph).
  """
  from bort_jax.cli import UsageError  # pylint: disable=import-outside-toplevel
  from bort_jax.core import arch, cost  # pylint: disable=import-outside-toplevel
  from bort_jax.serve import runtime  # pylint: disable=import-outside-toplevel
  if args.batch < 1 or args.seq_len < 1 or args.repeats < 1:
    raise UsageError(f"--batch={args.batch}, --seq-len={args.seq_len}, "
                     f"--repeats={args.repeats}: each must be >= 1")
  if args.runtime != "jax" and not args.measure:
    raise UsageError(f"--runtime={args.runtime} times the forward pass: add --measure")
  runtime.check_runtime(args.runtime)
  rows = []
  for name in args.arch or list(cost.DEFAULT_ARCHS):
    try:
      config = arch.get_model_config(name)
      if args.seq_len > config.max_length:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the {config.max_length} positions "
                         f"of {name}")
      rows.append(cost.cost_row(name, args.batch, args.seq_len))
    except (ValueError, TypeError) as error:
      raise UsageError(f"bad --arch {name!r}: {error}") from error
  if args.measure:
    for row in rows:
      latency = runtime.measure_latency(row["name"], args.batch, args.seq_len, args.runtime,
                                        repeats=args.repeats)
      row.update(latency_ms=latency["median_ms"], latency_iqr_ms=latency["iqr_ms"],
                 compile_s=latency["compile_s"], device=latency["device"],
                 runtime=args.runtime)
  if args.json:
    print(json.dumps(rows, indent=2))
  else:
    print(cost.format_table(rows, cost.REFERENCE_ARCH))
  return 0
