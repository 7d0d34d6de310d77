"""What the configs share: the cache folder, the one arg-string parser and the common blocks.

An arg is the text after ``:`` in ``--config=configs/pretrain_demo.py:tiny,arch=D2-A2-H64-I128``:
comma-separated flags (``tiny``) and ``key=value`` pairs. Every config declares the args it
takes; an unknown one (a misspelt ``tinyy``) is an error, never silently ignored.
"""

from __future__ import annotations

import difflib
import os
from typing import Mapping

import ml_collections

FLAG = "flag"    # an arg without a value: ``tiny``
VALUE = "value"  # an arg with a value: ``arch=D2-A2-H64-I128``


def cache_dir() -> str:
  """The demo data cache: ``$BORT_JAX_CACHE`` or ``~/.cache/bort_jax``."""
  return os.environ.get("BORT_JAX_CACHE") or os.path.expanduser("~/.cache/bort_jax")


def parse_arg(arg: str | None, allowed: Mapping[str, str], config: str) -> dict:
  """Parses a config arg string against the args a config takes.

  Args:
    arg: e.g. ``"adapt,tiny,arch=D2-A2-H64-I128"`` (None or "" for none).
    allowed: ``{name: FLAG | VALUE}``.
    config: the config's name, for messages.

  Returns:
    ``{name: True}`` for flags, ``{name: value}`` for pairs.

  Raises:
    ValueError: an unknown name (with the closest allowed ones), a flag given a value or a
      pair given none.
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
      known = ", ".join(f"{k}=VALUE" if v == VALUE else k for k, v in allowed.items())
      raise ValueError(f"config {config}: unknown arg {part!r}{hint} (it takes "
                       f"{known or 'no args'})")
    if (allowed[name] == VALUE) != bool(sep):
      want = f"{name}=VALUE" if allowed[name] == VALUE else f"{name} without a value"
      raise ValueError(f"config {config}: arg {part!r} must be given as {want}")
    out[name] = value if sep else True
  return out


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
