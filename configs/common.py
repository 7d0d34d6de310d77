"""What the configs share: the cache folder, the one arg-string parser and the common blocks.

An arg is the text after ``:`` in ``--config=configs/pretrain_demo.py:tiny,arch=D2-A2-H64-I128``:
comma-separated flags (``tiny``) and ``key=value`` pairs. Every config declares the args it
takes; an unknown one (a misspelt ``tinyy``) is an error, never silently ignored.
"""

from __future__ import annotations

import difflib
from typing import Mapping

import ml_collections

from bort_jax.data import fetch

FLAG = "flag"    # an arg without a value: ``tiny``
VALUE = "value"  # an arg with a text value: ``arch=D2-A2-H64-I128``
INT = "int"      # an integer: ``seeds=3``
FLOAT = "float"  # a number: ``lr=1e-4``
POSITIVE_FLOATS = "positive floats"  # positive numbers separated by ``/``: ``lrs=3e-5/1e-4``

# What each typed kind parses to, and how the message names what it wants.
_KINDS = {INT: (int, "an integer"), FLOAT: (float, "a number"),
          POSITIVE_FLOATS: (lambda text: _positive_floats(text),
                            "positive numbers separated by '/', e.g. 3e-5/1e-4")}


def _positive_floats(text: str) -> tuple[float, ...]:
  values = tuple(float(part) for part in text.split("/"))
  if not all(0 < v < float("inf") for v in values):
    raise ValueError(text)
  return values


def cache_dir() -> str:
  """The demo data cache: ``$BORT_JAX_CACHE`` or ``~/.cache/bort_jax`` (``fetch``'s rule)."""
  return fetch.default_cache_dir()


def parse_arg(arg: str | None, allowed: Mapping[str, str], config: str) -> dict:
  """Parses a config arg string against the args a config takes.

  Args:
    arg: e.g. ``"adapt,tiny,arch=D2-A2-H64-I128"`` (None or "" for none).
    allowed: ``{name: FLAG | VALUE | INT | FLOAT | POSITIVE_FLOATS}``.
    config: the config's name, for messages.

  Returns:
    ``{name: True}`` for flags, ``{name: value}`` for pairs, the value parsed to its kind
    (``str``, ``int``, ``float`` or a tuple of floats).

  Raises:
    ValueError: an unknown name (with the closest allowed ones), a flag given a value, a
      pair given none, or a value that is not of its kind (naming the arg and the kind).
  """
  out = {}
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    name, sep, value = part.partition("=")
    if name not in allowed:
      close = difflib.get_close_matches(name, list(allowed), n=3)
      hint = f"; did you mean {' or '.join(close)}?" if close else ""
      known = ", ".join(k if v == FLAG else f"{k}=VALUE" for k, v in allowed.items())
      raise ValueError(f"config {config}: unknown arg {part!r}{hint} (it takes "
                       f"{known or 'no args'})")
    if (allowed[name] != FLAG) != bool(sep):
      want = f"{name}=VALUE" if allowed[name] != FLAG else f"{name} without a value"
      raise ValueError(f"config {config}: arg {part!r} must be given as {want}")
    out[name] = _parse_value(name, value, allowed[name], config) if sep else True
  return out


def _parse_value(name: str, value: str, kind: str, config: str):
  if kind == VALUE:
    return value
  parse, wanted = _KINDS[kind]
  try:
    return parse(value)
  except ValueError:
    raise ValueError(f"config {config}: arg {name}={value!r} must be {wanted}") from None


def loss(intermediate: bool = True) -> ml_collections.ConfigDict:
  """The distillation loss of the paper: textbook KL at T=2, weights 0.5 (KD) and 0.1 (MLM).

  With ``intermediate`` the block also has the intermediate-layer terms (docs/STUDENTS.md),
  off (weight 0), so the loss is still exactly the paper's. Extraction's proxy training uses
  the logit loss only and leaves them out (they would only change its journal's identity).
  """
  block = ml_collections.ConfigDict({
      "kind": "kl",          # textbook KL; "original" = the release's double softmax
      "temperature": 2.0,
      "alpha_kd": 0.5,       # weight of T^2 * KD
      "alpha_mlm": 0.1,      # weight of the masked-LM cross-entropy
  })
  if intermediate:
    block.alpha_hidden = 0.0   # hidden-state MSE at mapped layers (projected if widths differ)
    block.alpha_attn = 0.0     # attention-distribution KL at mapped layers
    block.layer_map = "uniform"  # student j <-> teacher round((j+1)*D_t/D_s)-1, or "inherited"
  return block


def student_init(config: ml_collections.ConfigDict) -> None:
  """Adds the student's initialisation fields to ``config.student``."""
  config.student.init = "random"       # "random" (the paper) or "inherit" (from the teacher)
  config.student.importance_batches = 4  # inherit: training batches the importance is measured on


def corpus_tfds(data: ml_collections.ConfigDict) -> None:
  """Adds the fields of a TFDS corpus read by name, and of streaming, to ``config.data`` (off:
  an empty name; 0).

  Set, it is read instead of ``corpus_files``: e.g. ``--config.data.corpus_tfds=wikipedia/
  20230601.en`` with the dataset prepared under ``config.data.data_dir``.
  """
  data.corpus_tfds = ""        # "NAME" or "NAME/CONFIG" of a TFDS text dataset ("" = the files)
  data.corpus_field = "text"   # the feature that holds a document's text
  data.corpus_split = "train"  # the TFDS split read; validation is held out by a text hash
  data.download = False        # let TFDS download and prepare a dataset that is not there
  data.stream_window = 0       # > 0: stream the corpus (files or TFDS), this many documents a
                               # window per process (data/stream.py); 0: pack all at the start


def optim(lr: float, warmup: float) -> ml_collections.ConfigDict:
  """Bort's optimizer: Adam without bias correction, decoupled decay, clipping, linear schedule.

  The schedule's length is ``config.train.total_steps`` (one value, read by the pipelines).
  """
  return ml_collections.ConfigDict({
      "name": "adam_nobc",   # Adam without bias correction, eps after the sqrt
      "lr": lr,              # peak learning rate
      "b1": 0.9,
      "b2": 0.999,
      "eps": 1e-6,
      "weight_decay": 0.01,  # decoupled; not on LayerNorm parameters or biases
      "clip_norm": 1.0,      # global-norm clipping
      "warmup": warmup,      # fraction of total steps for the linear warmup
  })


def train(total_steps: int, log_every: int, checkpoint_every: int, keep_checkpoints: int,
          eval_every: int, eval_batches: int) -> ml_collections.ConfigDict:
  """The training loop's schedule: length, logging, checkpoints and held-out evaluation."""
  return ml_collections.ConfigDict({
      "total_steps": total_steps,            # also the learning-rate schedule's length
      "log_every": log_every,                # steps between metrics.jsonl lines
      "checkpoint_every": checkpoint_every,  # steps between checkpoints
      "keep_checkpoints": keep_checkpoints,  # how many recent checkpoints to keep
      "eval_every": eval_every,              # steps between held-out evaluations (0 = none)
      "eval_batches": eval_batches,          # held-out batches per evaluation
  })


def mesh() -> ml_collections.ConfigDict:
  """Every device on the data axis (-1 = the devices the other axes leave)."""
  return ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})


def make_tiny(config: ml_collections.ConfigDict, seq_len: int, max_predictions: int,
              total_steps: int, log_every: int) -> None:
  """Shrinks a pretraining config in place to a smoke run of the same code path."""
  config.data.seq_len = seq_len
  config.data.max_predictions = max_predictions
  config.data.global_batch_size = 8
  config.optim.warmup = 0.0
  config.train.total_steps = total_steps
  config.train.log_every = log_every
  config.train.checkpoint_every = 2
  config.train.eval_every = 0
  config.train.eval_batches = 0
