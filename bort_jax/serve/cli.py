"""``bort-jax export``: its flags and its run (the writer is ``serve.export``).

    bort-jax export --checkpoint runs/ft/best --out runs/ft/onnx --quantize int8

Only ``argparse`` is imported here: ``bort_jax.main`` reads the flags of every mode at start.
"""

from __future__ import annotations

import argparse

RUNTIMES = ("jax", "onnxruntime", "onnxruntime-int8")  # serve.runtime.RUNTIMES
FORMATS = ("onnx",)


def flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--checkpoint", required=True,
                      help="our export, a fine-tuned WORKDIR/best or a Hugging Face folder")
  parser.add_argument("--out", required=True, help="the folder to write (replaced whole)")
  parser.add_argument("--format", default="onnx",
                      help="onnx (Hugging Face folders: `bort-jax convert --to-hf`)")
  parser.add_argument("--quantize", default="",
                      help="int8: also write model.int8.onnx, its dev score and speed measured")
  parser.add_argument("--task", default=None,
                      help="task of a model with a task head (default: the checkpoint's)")
  parser.add_argument("--split", default=None,
                      help="dev split the int8 graph is scored on (default: the task's first)")
  parser.add_argument("--data-dir", default=None, help="TFDS data folder of a TFDS task")
  parser.add_argument("--dev-limit", type=int, default=0,
                      help="score at most this many dev records (default 0: all)")
  parser.add_argument("--tokenizer", default="",
                      help="tokenizer folder (default: the checkpoint's)")
  parser.add_argument("--seq-len", type=int, default=None,
                      help="length to check and time at (default: the fine-tuning run's, 128)")


def run(args: argparse.Namespace) -> int:
  """Writes the export; the exit status. Bad input raises ValueError (exit status 2)."""
  from bort_jax import cli  # pylint: disable=import-outside-toplevel
  if args.format not in FORMATS:
    raise cli.UsageError(f"--format={args.format!r}: allowed: {', '.join(FORMATS)} (a Hugging "
                         "Face folder is `bort-jax convert --to-hf CKPT --out DIR`)")
  if args.dev_limit < 0:
    raise cli.UsageError(f"--dev-limit={args.dev_limit}: must be >= 0 (0: every dev record)")
  from bort_jax.serve import runtime  # pylint: disable=import-outside-toplevel
  runtime.require()
  cli.check_workdir(args.out, "--out")
  from bort_jax.serve import export  # pylint: disable=import-outside-toplevel
  record = export.export(args.checkpoint, args.out, quantize=args.quantize, task=args.task,
                         split=args.split, data_dir=args.data_dir, tokenizer=args.tokenizer,
                         seq_len=args.seq_len, dev_limit=args.dev_limit)
  files = ", ".join(sorted(record["files"]))
  line = (f"wrote {args.out}: {record['family']} {record['arch']} {record['head']['kind']} "
          f"model, {files}; parity {record['parity']['max_abs_diff']:.1e}")
  q = record.get("int8")
  if q:
    line += f"; int8 {q['speedup']:.2f}x float32"
    if q.get("dev"):
      line += f", {q['dev']['change_points']:+.2f} points of {q['dev']['metric']}"
  print(line, flush=True)
  return 0
