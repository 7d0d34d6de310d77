"""The modes that name a runtime: ``export``, ``cost`` and ``predict`` (their flags and runs).

    bort-jax export --checkpoint runs/ft/best --out runs/ft/onnx --quantize int8
    bort-jax predict --checkpoint runs/ft/onnx --runtime onnxruntime-int8 --text "a dull film"
    bort-jax cost --arch bort --arch bert-large
    bort-jax cost --arch bort --measure --runtime onnxruntime-int8 --batch 8

``predict --runtime jax`` (the default) is ``finetune.predict``; the ONNX Runtime runtimes
read an export (``serve.served``). Only ``argparse`` is imported here at start: ``bort_jax.main``
reads the flags of every mode when it starts.
"""

from __future__ import annotations

import argparse

RUNTIMES = ("jax", "onnxruntime", "onnxruntime-int8")  # as serve.runtime.RUNTIMES (tested)
FORMATS = ("onnx",)


def export_flags(parser: argparse.ArgumentParser) -> None:
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


def export(args: argparse.Namespace) -> int:
  """Writes the export; the exit status. Bad input raises ValueError (exit status 2)."""
  from bort_jax.runtime import rundir  # pylint: disable=import-outside-toplevel
  if args.format not in FORMATS:
    raise rundir.UsageError(f"--format={args.format!r}: allowed: {', '.join(FORMATS)} (a Hugging "
                         "Face folder is `bort-jax convert --to-hf CKPT --out DIR`)")
  if args.dev_limit < 0:
    raise rundir.UsageError(f"--dev-limit={args.dev_limit}: must be >= 0 (0: every dev record)")
  from bort_jax.serve import runtime  # pylint: disable=import-outside-toplevel
  runtime.require()
  rundir.check_workdir(args.out, "--out")
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


def predict(args: argparse.Namespace) -> int:
  """``bort-jax predict`` in the runtime ``--runtime`` names; the exit status."""
  from bort_jax.finetune import predict as predict_lib  # pylint: disable=import-outside-toplevel
  from bort_jax.finetune import setup  # pylint: disable=import-outside-toplevel
  from bort_jax.serve import served  # pylint: disable=import-outside-toplevel
  if args.runtime == "jax":
    if served.is_export(args.checkpoint):
      raise setup.InputError(f"--checkpoint {args.checkpoint!r} is an ONNX export: serve it "
                             "with --runtime onnxruntime (or onnxruntime-int8).")
    return predict_lib.cli_run(args)
  rows = predict_lib.input_rows(args)
  model = served.load(args.checkpoint, args.runtime, args.task, args.tokenizer, args.seq_len,
                      args.batch_size, lambda spec: predict_lib.to_examples(spec, rows))
  results = predict_lib.predict_with(model.spec, rows, model.tokenizer, model.seq_len,
                                     model.batch_size, lambda b: dict(b, logits=model.forward(b)))
  predict_lib.write_results(results, args.output)
  return 0


def cost_flags(parser: argparse.ArgumentParser) -> None:
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


def cost(args: argparse.Namespace) -> int:
  """The table (or JSON) of the architectures; the exit status.

  Raises:
    ValueError: a bad flag value (exit status 2, one paragraph).
  """
  import json  # pylint: disable=import-outside-toplevel

  from bort_jax.core import arch, cost  # pylint: disable=import-outside-toplevel
  from bort_jax.runtime.rundir import UsageError  # pylint: disable=import-outside-toplevel
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
