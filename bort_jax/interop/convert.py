"""Hugging Face BERT / RoBERTa / Bort checkpoints <-> bort_jax parameters, both ways.

A Hugging Face checkpoint directory holds ``config.json`` and the weights as
``model.safetensors`` (read with ``safetensors.numpy``) or ``pytorch_model.bin`` (a torch zip
archive, read by ``torch_reader`` with a restricted unpickler, so torch is never needed).
Loading is strict: every tensor of the checkpoint is either placed in the parameter tree or
named as one we may ignore (position-id buffers, the NSP head, tied copies of the decoder), and
a missing tensor, a shape that disagrees with ``config.json`` or an unsupported model type
raises ``ValueError`` naming the offending tensor or field. There is no silent partial load.

The tensor table (names, transposes, shapes, heads) is ``interop.hf_layout``; the MLM decoder
is tied to the word embeddings and keeps its own bias. Heads follow the transformers class:
``*ForMaskedLM``, ``*Model``, ``*ForSequenceClassification`` and ``*ForMultipleChoice`` load
with their head (:func:`load_hf_with_head`) and :func:`save_hf` writes each of them back (a
RoBERTa-layout head on a BERT or Bort body as ``BertForSequenceClassification``, see
``hf_layout``). A pooler that the class has no place for, as in ``*ForMaskedLM``, is left out.

Families: ``bert`` and ``roberta`` by ``model_type``; ``bort`` is a BERT body with the RoBERTa
vocabulary (``model_type`` bert and 50,265 ids, or a ``bort_jax`` block in config.json that this
module writes). The Hugging Face Bort port keeps a 1-row token-type table of zeros, which we
drop; a non-zero row is kept as ``type_vocab_size=1``.

CLI::

    bort-jax convert --from-hf DIR --out OUT     Hugging Face directory -> our checkpoint
    bort-jax convert --to-hf CKPT --out DIR      our checkpoint -> Hugging Face directory
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Callable

import numpy as np
from flax import traverse_util

from bort_jax.core.arch import FAMILY_DEFAULTS, Arch, ModelConfig
from bort_jax.core.model import MLM, NO_HEAD, TASK_KINDS, HeadSpec, has_pooler
from bort_jax.interop import hf_layout
from bort_jax.interop.hf_files import read_hf_config, read_hf_tensors
from bort_jax.runtime import fileio

logger = logging.getLogger(__name__)

BORT_VOCAB_SIZE = 50265
# Key of the block that save_hf adds to config.json; transformers keeps unknown keys as-is.
EXTRA_KEY = "bort_jax"

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def detect_family(hf_config: dict, family: str | None = None) -> str:
  """Decides which of our families a Hugging Face config describes.

  Args:
    hf_config: the parsed config.json.
    family: an explicit choice ("bert", "roberta", "bort") checked against the model type.

  Returns:
    "bert", "roberta" or "bort".
  """
  model_type = hf_config.get("model_type")
  if model_type is None:
    archs = hf_config.get("architectures") or []
    if archs and str(archs[0]).startswith("Roberta"):
      model_type = "roberta"
    elif archs and str(archs[0]).startswith("Bert"):
      model_type = "bert"
  if model_type not in ("bert", "roberta"):
    raise ValueError(
        f"config.json field 'model_type' is {model_type!r}; bort_jax converts 'bert' "
        "(BERT and Bort) and 'roberta' checkpoints only")
  marked = (hf_config.get(EXTRA_KEY) or {}).get("family")
  chosen = family or marked
  if chosen is None:
    if model_type == "bert" and hf_config.get("vocab_size") == BORT_VOCAB_SIZE:
      chosen = "bort"  # A BERT body with the RoBERTa vocabulary: the Bort port.
    else:
      chosen = model_type
  wanted_type = "roberta" if chosen == "roberta" else "bert"
  if chosen not in FAMILY_DEFAULTS or wanted_type != model_type:
    raise ValueError(f"family {chosen!r} does not fit config.json model_type {model_type!r}")
  return chosen


def config_from_hf(hf_config: dict, *, family: str | None = None, pooler: bool = False,
                   type_vocab_size: int | None = None) -> ModelConfig:
  """Maps the fields of a Hugging Face config.json to a :class:`ModelConfig`.

  Args:
    hf_config: the parsed config.json.
    family: optional explicit family (see :func:`detect_family`).
    pooler: whether the checkpoint has a pooler (config.json does not say).
    type_vocab_size: overrides config.json's (the Bort port's all-zero table is dropped).

  Returns:
    The model config.
  """
  fam = detect_family(hf_config, family)
  defaults = FAMILY_DEFAULTS[fam]
  extra = hf_config.get(EXTRA_KEY) or {}

  def need(field):
    if field not in hf_config:
      raise ValueError(f"config.json lacks the field {field!r}")
    return hf_config[field]

  if hf_config.get("position_embedding_type", "absolute") not in (None, "absolute"):
    raise ValueError("config.json field 'position_embedding_type' is "
                     f"{hf_config['position_embedding_type']!r}; only 'absolute' is supported")
  for flag in ("is_decoder", "add_cross_attention"):
    if hf_config.get(flag):
      raise ValueError(f"config.json field {flag!r} is true; only encoders are supported")
  act = need("hidden_act")
  if act not in _ACTIVATIONS:
    raise ValueError(f"config.json field 'hidden_act' is {act!r}; supported: "
                     f"{sorted(_ACTIVATIONS)}")
  hidden, heads = need("hidden_size"), need("num_attention_heads")
  if hidden % heads:
    raise ValueError(f"config.json: hidden_size {hidden} is not divisible by "
                     f"num_attention_heads {heads}")
  arch = Arch(need("num_hidden_layers"), heads, hidden, need("intermediate_size"))
  pad_id = hf_config.get("pad_token_id")
  pad_id = defaults["pad_id"] if pad_id is None else int(pad_id)
  eps = float(hf_config.get("layer_norm_eps", 1e-12))
  return ModelConfig(
      arch=arch,
      family=fam,
      vocab_size=need("vocab_size"),
      max_positions=need("max_position_embeddings"),
      # RoBERTa numbers positions from padding_idx + 1.
      position_offset=pad_id + 1 if fam == "roberta" else 0,
      type_vocab_size=(hf_config.get("type_vocab_size", 2) if type_vocab_size is None
                       else type_vocab_size),
      pad_id=pad_id,
      layer_norm_eps=eps,
      # transformers uses layer_norm_eps in the MLM head too; our own block may say otherwise.
      mlm_layer_norm_eps=float(extra.get("mlm_layer_norm_eps", eps)),
      activation=_ACTIVATIONS[act],
      dropout=float(hf_config.get("hidden_dropout_prob", 0.1)),
      attention_dropout=float(hf_config.get("attention_probs_dropout_prob", 0.1)),
      pooler=pooler,
      initializer_range=float(hf_config.get("initializer_range", 0.02)),
  )


def config_to_hf(config: ModelConfig, head: HeadSpec = NO_HEAD, label_names: tuple = ()
                 ) -> dict:
  """The config.json that describes ``config`` with ``head`` to transformers.

  Args:
    config: our model config.
    head: the head the weights carry (picks the architecture name; task heads add their
      labels and problem type).
    label_names: the class names of a classification head (else ``LABEL_i``).

  Returns:
    A JSON-ready dict.
  """
  a = config.arch
  if a.attention_size != a.hidden:
    raise ValueError(f"architecture {a} has heads * head_size != hidden; transformers' BERT "
                     "cannot express it")
  if config.family == "roberta":
    if config.position_offset != config.pad_id + 1:
      raise ValueError(f"RoBERTa needs position_offset == pad_id + 1, got "
                       f"{config.position_offset} and {config.pad_id}")
    model_type = "roberta"
  else:
    if config.position_offset != 0:
      raise ValueError(f"a {config.family} model needs position_offset 0, got "
                       f"{config.position_offset}")
    model_type = "bert"
  head = head.resolve(config.family)
  extra = {"family": config.family, "mlm_layer_norm_eps": config.mlm_layer_norm_eps,
           "pooler": config.pooler}
  if head.kind in TASK_KINDS:
    extra["head"] = dataclasses.asdict(head)
  act = {"gelu": "gelu", "gelu_tanh": "gelu_new"}[config.activation]
  return {
      "architectures": [hf_layout.hf_architecture(config, head)],
      "model_type": model_type,
      "vocab_size": config.vocab_size,
      "hidden_size": a.hidden,
      "num_hidden_layers": a.depth,
      "num_attention_heads": a.heads,
      "intermediate_size": a.intermediate,
      "hidden_act": act,
      "hidden_dropout_prob": config.dropout,
      "attention_probs_dropout_prob": config.attention_dropout,
      "max_position_embeddings": config.max_positions,
      # HF always has a token-type table; a model without one gets a single row of zeros.
      "type_vocab_size": max(config.type_vocab_size, 1),
      "initializer_range": config.initializer_range,
      "layer_norm_eps": config.layer_norm_eps,
      "pad_token_id": config.pad_id,
      "position_embedding_type": "absolute",
      "tie_word_embeddings": True,
      "dtype": "float32",
      **hf_layout.head_config_fields(head, label_names),
      EXTRA_KEY: extra,
  }


# ---------------------------------------------------------------------------------------------
# Tensors <-> params (pure functions on dicts of numpy arrays)


def hf_to_params(tensors: dict[str, np.ndarray], hf_config: dict, *,
                 with_mlm_head: bool | None = True, family: str | None = None
                 ) -> tuple[ModelConfig, dict]:
  """Places the tensors of a Hugging Face state dict into our parameter tree.

  A task head (``classifier.*``) is always placed; :func:`hf_to_model` also says which.

  Args:
    tensors: name -> numpy array, as stored in the checkpoint.
    hf_config: the parsed config.json.
    with_mlm_head: True requires the MLM head, False leaves it out (and ignores its tensors),
      None takes it when the checkpoint has one.
    family: optional explicit family.

  Returns:
    ``(config, params)`` with params a nested dict of float32 numpy arrays.

  Raises:
    ValueError: on a missing tensor, a wrong shape, an unexpected tensor or a config field we
      cannot express.
  """
  config, params, _ = hf_to_model(tensors, hf_config, with_mlm_head=with_mlm_head,
                                  family=family)
  return config, params


def hf_to_model(tensors: dict[str, np.ndarray], hf_config: dict, *,
                with_mlm_head: bool | None = None, family: str | None = None
                ) -> tuple[ModelConfig, dict, HeadSpec]:
  """As :func:`hf_to_params`, also returning the head the parameters carry.

  Returns:
    ``(config, params, head)``: head is the checkpoint's task head (``*ForSequenceClassification``
    or ``*ForMultipleChoice``, with its layout), else ``model.MLM`` when the MLM head was
    taken, else ``model.NO_HEAD``.
  """
  fam = detect_family(hf_config, family)
  base = "roberta" if fam == "roberta" else "bert"
  named, original = hf_layout.normalise_names(tensors, base)
  extra = hf_config.get(EXTRA_KEY) or {}
  head = hf_layout.head_from_hf(hf_config, {n: v.shape for n, v in named.items()}, fam,
                                extra.get("head"))
  type_rows = None
  table = named.get("embeddings.token_type_embeddings.weight")
  if fam == "bort" and table is not None and table.shape[0] == 1 and not np.any(table):
    type_rows = 0  # The Bort port's all-zero token-type row adds nothing: drop it.
  # Our own block keeps config.pooler apart from a pooler that only the head brings.
  pooler = bool(extra.get("pooler", any(n.startswith("pooler.") for n in named)))
  config = config_from_hf(hf_config, family=fam, pooler=pooler, type_vocab_size=type_rows)

  take_mlm = _take_mlm(head, with_mlm_head, fam)
  if head.kind not in TASK_KINDS:
    head = MLM if take_mlm else NO_HEAD
  entries = hf_layout.body_entries(config)
  if has_pooler(config, head):
    entries += hf_layout.pooler_entries(config)
  if take_mlm:
    entries += hf_layout.mlm_entries(config)
  entries += hf_layout.head_entries(config, head)
  params = _place(entries, named, original, config, base)
  used = {e.hf_name for e in entries}
  if type_rows == 0:
    used.add("embeddings.token_type_embeddings.weight")
    logger.info("dropped the all-zero 1-row token-type table of the Bort checkpoint")
  if take_mlm:
    used |= hf_layout.tied_copies(named, original, hf_config, fam)
  for name in named:
    if name in used:
      continue
    if hf_layout.ignorable(name):
      used.add(name)
      logger.info("ignored %s (a buffer or the next-sentence head)", original[name])
    elif not take_mlm and name.startswith(hf_layout.mlm_prefixes(fam)):
      used.add(name)
      logger.info("left out the MLM head tensor %s (with_mlm_head=False)", original[name])
  unused = [original[n] for n in named if n not in used]
  if unused:
    raise ValueError(f"checkpoint tensors not used by a {fam} model of this config "
                     f"(head {head.kind}): {sorted(unused)}")
  return config, params, head


def _take_mlm(found: HeadSpec, with_mlm_head: bool | None, family: str) -> bool:
  """Whether to load the MLM head, given the head the checkpoint's tensors show."""
  if found.kind in TASK_KINDS:
    if with_mlm_head:
      raise ValueError(f"the checkpoint carries a {found.kind} head, not an MLM head; load it "
                       "with with_mlm_head=None or False")
    return False
  has_mlm = found.kind == "mlm"
  if with_mlm_head and not has_mlm:
    raise ValueError(f"the checkpoint has no MLM head (no {hf_layout.mlm_prefixes(family)[0]}* "
                     "tensors); load it with with_mlm_head=False")
  return has_mlm if with_mlm_head is None else bool(with_mlm_head)


def _place(entries: list[hf_layout.Entry], named: dict[str, np.ndarray],
           original: dict[str, str], config: ModelConfig, base: str) -> dict:
  """Checks each expected tensor's presence and shape and puts it, transformed, in a tree."""
  flat: dict = {}
  prefixed = any(name != original[name] for name in named if not name.startswith("cls."))
  known = {e.hf_name for e in entries}
  for entry in entries:
    if entry.hf_name not in named:
      outside = entry.group in ("mlm", "head") or not prefixed
      shown = entry.hf_name if outside else f"{base}.{entry.hf_name}"
      strays = sorted(original[n] for n in named
                      if n not in known and not hf_layout.ignorable(n))
      hint = f" (it has tensors that fit nowhere: {strays[:3]})" if strays else ""
      raise ValueError(f"checkpoint is missing the tensor {shown!r} that config.json implies"
                       f"{hint}")
    value, name = named[entry.hf_name], original[entry.hf_name]
    if tuple(value.shape) != entry.hf_shape:
      raise ValueError(f"tensor {name!r} has shape {tuple(value.shape)}, but config.json "
                       f"implies {entry.hf_shape} ({entry.fields})")
    value = hf_layout.as_float32(value, name)
    flat[entry.path] = hf_layout.to_ours(value, entry, config.arch)
  return traverse_util.unflatten_dict(flat)


def params_to_hf(params: dict, config: ModelConfig, head: HeadSpec | None = None,
                 label_names: tuple = ()) -> tuple[dict, dict[str, np.ndarray]]:
  """Lays our parameters out as a Hugging Face state dict.

  Args:
    params: our parameter tree (numpy or jax arrays).
    config: its model config.
    head: the head the parameters carry. None means the MLM head when ``mlm_head`` is in the
      params, else none; a task head must be named (its kind is not in the tensors).

  Returns:
    ``(hf_config, tensors)``: the config.json dict and name -> contiguous float32 array.

  Raises:
    ValueError: on a missing parameter, a wrong shape, a parameter that has no place in the
      transformers class, or a head transformers has no class for.
  """
  if head is None:
    if "classifier" in params:
      raise ValueError("params have a task head ('classifier') but no head was given; pass "
                       "head=HeadSpec(kind, num_labels, layout) so the transformers class and "
                       "labels can be written")
    head = MLM if "mlm_head" in params else NO_HEAD
  head = head.resolve(config.family)
  params, config = drop_unplaced_pooler(params, config, head)
  hf_config = config_to_hf(config, head, label_names)
  base = "roberta" if config.family == "roberta" else "bert"
  entries = hf_layout.body_entries(config)
  if has_pooler(config, head):
    entries += hf_layout.pooler_entries(config)
  elif "pooler" in params:
    raise ValueError("params have a 'pooler' but the config says pooler=False")
  if head.kind == "mlm":
    entries += hf_layout.mlm_entries(config)
  entries += hf_layout.head_entries(config, head)
  flat = traverse_util.flatten_dict(params)
  # A base model's tensors carry no prefix; a model with a head nests the body under it.
  nested = head.kind != "none"
  tensors: dict[str, np.ndarray] = {}
  for entry in entries:
    if entry.path not in flat:
      raise ValueError(f"params lack {'/'.join(entry.path)!r}, which {config.family} "
                       f"{config.arch} with head {head.kind!r} needs")
    value = np.asarray(flat[entry.path])
    want = hf_layout.our_shape(entry, config.arch)
    if value.shape != want:
      raise ValueError(f"parameter {'/'.join(entry.path)!r} has shape {value.shape}, expected "
                       f"{want} for {config.arch}")
    outside = entry.group in ("mlm", "head")
    name = f"{base}.{entry.hf_name}" if nested and not outside else entry.hf_name
    tensors[name] = hf_layout.to_hf(value.astype(np.float32), entry)
  if config.type_vocab_size == 0:
    name = f"{base}." if nested else ""
    tensors[name + "embeddings.token_type_embeddings.weight"] = np.zeros(
        (1, config.arch.hidden), np.float32)
  consumed = {e.path for e in entries}
  extra = sorted("/".join(p) for p in flat if p not in consumed)
  if extra:
    raise ValueError(f"params {extra} have no place in a Hugging Face "
                     f"{hf_config['architectures'][0]}")
  return hf_config, tensors


def drop_unplaced_pooler(params: dict, config: ModelConfig, head: HeadSpec
                         ) -> tuple[dict, ModelConfig]:
  """``params`` and ``config`` without a pooler that the transformers class cannot hold.

  ``*ForMaskedLM`` and ``RobertaForSequenceClassification`` have no pooler (and a RoBERTa-layout
  head on a BERT body takes its place); the head does not read it, so leaving it out changes no
  output, and transformers then loads the folder without reporting unexpected tensors.

  Returns:
    ``(params, config)``, with ``config.pooler`` False where the pooler was left out.
  """
  if not config.pooler or hf_layout.keeps_pooler(config, head):
    return params, config
  logger.info("left out the pooler: %s has no place for it and the %s head does not use it",
              hf_layout.hf_architecture(config, head), head.kind)
  return {k: v for k, v in params.items() if k != "pooler"}, config.replace(pooler=False)


# ---------------------------------------------------------------------------------------------
# Reading checkpoint files


def load_hf(path: str, with_mlm_head: bool | None = True, family: str | None = None
            ) -> tuple[ModelConfig, dict]:
  """Loads a Hugging Face BERT / RoBERTa / Bort checkpoint directory into our parameters.

  Args:
    path: directory with config.json and model.safetensors or pytorch_model.bin.
    with_mlm_head: True requires the MLM head, False leaves it out, None takes it if present.
    family: force "bert", "roberta" or "bort" (otherwise read from config.json).

  Returns:
    ``(config, params)``, params a nested dict of float32 jax arrays in the layout of
    docs/INTERFACES.md (with the task head of a fine-tuned checkpoint; see
    :func:`load_hf_with_head` for which head that is).
  """
  config, params, _ = load_hf_with_head(path, with_mlm_head=with_mlm_head, family=family)
  return config, params


def load_hf_with_head(path: str, with_mlm_head: bool | None = None, family: str | None = None
                      ) -> tuple[ModelConfig, dict, HeadSpec]:
  """Loads a checkpoint directory with whatever head it has (fine-tuned ones included).

  Args:
    path: directory with config.json and model.safetensors or pytorch_model.bin.
    with_mlm_head: as in :func:`load_hf`; the default takes the MLM head when present.
    family: force "bert", "roberta" or "bort".

  Returns:
    ``(config, params, head)``; ``model.apply(params, config, batch, head=head)`` gives the
    logits transformers gives for the same checkpoint.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  hf_config = read_hf_config(path)  # First: a wrong path gets the plainest message.
  config, params, head = hf_to_model(read_hf_tensors(path), hf_config,
                                     with_mlm_head=with_mlm_head, family=family)
  return config, jax.tree.map(jnp.asarray, params), head


def save_hf(params: dict, config: ModelConfig, out_dir: str, head: HeadSpec | None = None,
            label_names: tuple = (), extra: Callable[[str], None] | None = None) -> None:
  """Writes our parameters as a Hugging Face directory (config.json + model.safetensors).

  The class follows the head: ``*ForMaskedLM``, ``*Model``, ``*ForSequenceClassification``
  (classification, regression) or ``*ForMultipleChoice``. Bort is written as a BERT (with a
  1-row zero token-type table); our own fields ride along in config.json's ``bort_jax`` block
  so that :func:`load_hf_with_head` gives back the same config and head (less a pooler the
  class cannot hold: :func:`drop_unplaced_pooler`). The directory is
  built under a temporary name and renamed into place (an existing one is replaced whole);
  files get normal permissions (``fileio.atomic_dir``).

  Args:
    params: our parameter tree.
    config: its model config.
    out_dir: directory to write.
    head: the head the params carry (see :func:`params_to_hf`).
    label_names: class names of a classification head, for config.json's ``id2label``.
    extra: called with the folder being built, after the weights and config.json, to add
      files (the tokenizer and model card of ``interop.hf_export``) to the same atomic write.
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  hf_config, tensors = params_to_hf(params, config, head, label_names)
  if config.mlm_layer_norm_eps != config.layer_norm_eps and "mlm_head" in params:
    logger.warning("transformers uses layer_norm_eps=%g in the MLM head, ours %g: its logits "
                   "will differ slightly", config.layer_norm_eps, config.mlm_layer_norm_eps)
  with fileio.atomic_dir(out_dir) as tmp:
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2, sort_keys=True)
    if extra is not None:
      extra(tmp)
