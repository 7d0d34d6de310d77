"""Hugging Face BERT / RoBERTa / Bort checkpoints <-> bort_jax parameters, both ways.

A Hugging Face checkpoint directory holds ``config.json`` and the weights as
``model.safetensors`` (read with ``safetensors.numpy``) or ``pytorch_model.bin`` (a torch zip
archive, read by ``torch_reader`` with a restricted unpickler, so torch is never needed).
Loading is strict: every tensor of the checkpoint is either placed in the parameter tree or
named as one we may ignore (position-id buffers, the NSP head, tied copies of the decoder), and
a missing tensor, a shape that disagrees with ``config.json`` or an unsupported model type
raises ``ValueError`` naming the offending tensor or field. There is no silent partial load.

The layout mapping (see docs/INTERFACES.md): HF ``Linear`` weights are ``[out, in]``, ours are
``[in, out]``; query/key/value kernels are ``[H, A, S]`` and the attention output kernel is
``[A, S, H]``; LayerNorm ``weight``/``bias`` (``gamma``/``beta`` in old checkpoints) become
``scale``/``bias``; the MLM decoder is tied to the word embeddings and keeps its own bias.

Families: ``bert`` and ``roberta`` by ``model_type``; ``bort`` is a BERT body with the RoBERTa
vocabulary (``model_type`` bert and 50,265 ids, or a ``bort_jax`` block in config.json that this
module writes). The Hugging Face Bort port keeps a 1-row token-type table of zeros, which we
drop; a non-zero row is kept as ``type_vocab_size=1``.

Our own checkpoint format (``save_params`` / ``load_params``): a directory with
``params.safetensors`` (names are '/'-joined tree paths) and ``model_config.json``.

CLI::

    bort-jax convert --from-hf DIR --out OUT     Hugging Face directory -> our checkpoint
    bort-jax convert --to-hf CKPT --out DIR      our checkpoint -> Hugging Face directory
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any, Callable, Iterable

import numpy as np

from bort_jax.core.arch import FAMILY_DEFAULTS, Arch, ModelConfig
from bort_jax.interop import export
from bort_jax.interop.torch_reader import read_torch_bin

logger = logging.getLogger(__name__)

BORT_VOCAB_SIZE = 50265
# Key of the block that save_hf adds to config.json; transformers keeps unknown keys as-is.
EXTRA_KEY = "bort_jax"

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_BODY_ROOTS = ("embeddings.", "encoder.", "pooler.")


# ---------------------------------------------------------------------------------------------
# The name and shape table shared by both directions.


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One tensor: its HF name (without the body prefix for body tensors), our tree path, how
  to transform it, its HF shape and which config fields that shape comes from."""

  hf_name: str
  path: tuple[str, ...]
  kind: str  # copy | linear | qkv_kernel | qkv_bias | out_kernel
  hf_shape: tuple[int, ...]
  fields: str
  group: str  # body | pooler | mlm


def _body_entries(config: ModelConfig) -> list[_Entry]:
  a = config.arch
  h, att, inter = a.hidden, a.attention_size, a.intermediate
  out = [
      _Entry("embeddings.word_embeddings.weight", ("embeddings", "word_embeddings",
             "embedding"), "copy", (config.vocab_size, h), "vocab_size x hidden_size", "body"),
      _Entry("embeddings.position_embeddings.weight", ("embeddings", "position_embeddings",
             "embedding"), "copy", (config.max_positions, h),
             "max_position_embeddings x hidden_size", "body"),
  ]
  if config.type_vocab_size > 0:
    out.append(_Entry("embeddings.token_type_embeddings.weight",
                      ("embeddings", "token_type_embeddings", "embedding"), "copy",
                      (config.type_vocab_size, h), "type_vocab_size x hidden_size", "body"))
  out += _layer_norm("embeddings.LayerNorm", ("embeddings", "LayerNorm"), h, "body")
  for i in range(a.depth):
    hf, ours = f"encoder.layer.{i}", ("encoder", f"layer_{i}")
    for name in ("query", "key", "value"):
      out.append(_Entry(f"{hf}.attention.self.{name}.weight", ours + ("attention", name,
                        "kernel"), "qkv_kernel", (att, h), "hidden_size x hidden_size", "body"))
      out.append(_Entry(f"{hf}.attention.self.{name}.bias", ours + ("attention", name, "bias"),
                        "qkv_bias", (att,), "hidden_size", "body"))
    out.append(_Entry(f"{hf}.attention.output.dense.weight", ours + ("attention", "output",
                      "kernel"), "out_kernel", (h, att), "hidden_size x hidden_size", "body"))
    out.append(_Entry(f"{hf}.attention.output.dense.bias", ours + ("attention", "output",
                      "bias"), "copy", (h,), "hidden_size", "body"))
    out += _layer_norm(f"{hf}.attention.output.LayerNorm", ours + ("attention", "LayerNorm"),
                       h, "body")
    out.append(_Entry(f"{hf}.intermediate.dense.weight", ours + ("intermediate", "kernel"),
                      "linear", (inter, h), "intermediate_size x hidden_size", "body"))
    out.append(_Entry(f"{hf}.intermediate.dense.bias", ours + ("intermediate", "bias"), "copy",
                      (inter,), "intermediate_size", "body"))
    out.append(_Entry(f"{hf}.output.dense.weight", ours + ("output", "kernel"), "linear",
                      (h, inter), "hidden_size x intermediate_size", "body"))
    out.append(_Entry(f"{hf}.output.dense.bias", ours + ("output", "bias"), "copy", (h,),
                      "hidden_size", "body"))
    out += _layer_norm(f"{hf}.output.LayerNorm", ours + ("output", "LayerNorm"), h, "body")
  return out


def _pooler_entries(config: ModelConfig) -> list[_Entry]:
  h = config.arch.hidden
  return [_Entry("pooler.dense.weight", ("pooler", "kernel"), "linear", (h, h),
                 "hidden_size x hidden_size", "pooler"),
          _Entry("pooler.dense.bias", ("pooler", "bias"), "copy", (h,), "hidden_size",
                 "pooler")]


def _mlm_entries(config: ModelConfig) -> list[_Entry]:
  """The MLM head; names differ between BERT (``cls.predictions``) and RoBERTa (``lm_head``)."""
  h = config.arch.hidden
  if config.family == "roberta":
    dense, norm, bias = "lm_head.dense", "lm_head.layer_norm", "lm_head.bias"
  else:
    dense = "cls.predictions.transform.dense"
    norm = "cls.predictions.transform.LayerNorm"
    bias = "cls.predictions.bias"
  return [
      _Entry(f"{dense}.weight", ("mlm_head", "dense", "kernel"), "linear", (h, h),
             "hidden_size x hidden_size", "mlm"),
      _Entry(f"{dense}.bias", ("mlm_head", "dense", "bias"), "copy", (h,), "hidden_size", "mlm"),
      *_layer_norm(norm, ("mlm_head", "LayerNorm"), h, "mlm"),
      _Entry(bias, ("mlm_head", "bias"), "copy", (config.vocab_size,), "vocab_size", "mlm"),
  ]


def _layer_norm(hf: str, ours: tuple[str, ...], h: int, group: str) -> list[_Entry]:
  return [_Entry(f"{hf}.weight", ours + ("scale",), "copy", (h,), "hidden_size", group),
          _Entry(f"{hf}.bias", ours + ("bias",), "copy", (h,), "hidden_size", group)]


def _mlm_decoder_names(family: str) -> dict[str, str]:
  """Tied copies a checkpoint may carry: decoder name -> the tensor it must equal."""
  if family == "roberta":
    return {"lm_head.decoder.weight": "embeddings.word_embeddings.weight",
            "lm_head.decoder.bias": "lm_head.bias"}
  return {"cls.predictions.decoder.weight": "embeddings.word_embeddings.weight",
          "cls.predictions.decoder.bias": "cls.predictions.bias"}


def _mlm_prefixes(family: str) -> tuple[str, ...]:
  return ("lm_head.",) if family == "roberta" else ("cls.predictions.",)


def _to_ours(value: np.ndarray, entry: _Entry, arch: Arch) -> np.ndarray:
  """HF layout -> ours."""
  a, s, h = arch.heads, arch.head_size, arch.hidden
  if entry.kind == "copy":
    return value
  if entry.kind == "linear":
    return value.T
  if entry.kind == "qkv_kernel":
    return value.T.reshape(h, a, s)
  if entry.kind == "qkv_bias":
    return value.reshape(a, s)
  if entry.kind == "out_kernel":
    return value.T.reshape(a, s, h)
  raise AssertionError(entry.kind)


def _to_hf(value: np.ndarray, entry: _Entry) -> np.ndarray:
  """Ours -> HF layout (the inverse of _to_ours)."""
  if entry.kind == "copy":
    out = value
  elif entry.kind == "linear":
    out = value.T
  elif entry.kind == "qkv_kernel":
    out = value.reshape(value.shape[0], -1).T
  elif entry.kind == "qkv_bias":
    out = value.reshape(-1)
  elif entry.kind == "out_kernel":
    out = value.reshape(-1, value.shape[-1]).T
  else:
    raise AssertionError(entry.kind)
  return np.ascontiguousarray(out)


def _our_shape(entry: _Entry, arch: Arch) -> tuple[int, ...]:
  a, s, h = arch.heads, arch.head_size, arch.hidden
  if entry.kind == "linear":
    return tuple(reversed(entry.hf_shape))
  if entry.kind == "qkv_kernel":
    return (h, a, s)
  if entry.kind == "qkv_bias":
    return (a, s)
  if entry.kind == "out_kernel":
    return (a, s, h)
  return entry.hf_shape


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


def config_to_hf(config: ModelConfig, *, mlm_head: bool) -> dict:
  """The config.json that describes ``config`` to transformers.

  Args:
    config: our model config.
    mlm_head: whether the weights include the MLM head (picks the architecture name).

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
    model_type, name = "roberta", "Roberta"
  else:
    if config.position_offset != 0:
      raise ValueError(f"a {config.family} model needs position_offset 0, got "
                       f"{config.position_offset}")
    model_type, name = "bert", "Bert"
  act = {"gelu": "gelu", "gelu_tanh": "gelu_new"}[config.activation]
  return {
      "architectures": [f"{name}ForMaskedLM" if mlm_head else f"{name}Model"],
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
      EXTRA_KEY: {"family": config.family, "mlm_layer_norm_eps": config.mlm_layer_norm_eps},
  }


# ---------------------------------------------------------------------------------------------
# Tensors <-> params (pure functions on dicts of numpy arrays)


def _normalise_names(tensors: dict[str, np.ndarray], base: str
                     ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Strips the body prefix and renames old LayerNorm gamma/beta.

  Returns the renamed tensors and a map from new name to the checkpoint's original name.
  """
  out, original = {}, {}
  for name, value in tensors.items():
    new = name
    if new.startswith(base + "."):
      candidate = new[len(base) + 1:]
      if candidate.startswith(_BODY_ROOTS):
        new = candidate
    if "LayerNorm" in new or "layer_norm" in new:
      if new.endswith(".gamma"):
        new = new[:-len("gamma")] + "weight"
      elif new.endswith(".beta"):
        new = new[:-len("beta")] + "bias"
    if new in out:
      raise ValueError(f"checkpoint tensors {original[new]!r} and {name!r} both map to {new!r}")
    out[new], original[new] = value, name
  return out, original


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> Any:
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      raise KeyError("/".join(path))
    tree = tree[key]
  return tree


def hf_to_params(tensors: dict[str, np.ndarray], hf_config: dict, *,
                 with_mlm_head: bool | None = True, family: str | None = None
                 ) -> tuple[ModelConfig, dict]:
  """Places the tensors of a Hugging Face state dict into our parameter tree.

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
  fam = detect_family(hf_config, family)
  base = "roberta" if fam == "roberta" else "bert"
  named, original = _normalise_names(tensors, base)
  has_pooler = any(n.startswith("pooler.") for n in named)
  type_rows = None
  table = named.get("embeddings.token_type_embeddings.weight")
  if fam == "bort" and table is not None and table.shape[0] == 1 and not np.any(table):
    type_rows = 0  # The Bort port's all-zero token-type row adds nothing: drop it.
  config = config_from_hf(hf_config, family=fam, pooler=has_pooler, type_vocab_size=type_rows)

  mlm_prefixes = _mlm_prefixes(fam)
  has_mlm = any(n.startswith(mlm_prefixes) for n in named)
  if with_mlm_head and not has_mlm:
    raise ValueError(f"the checkpoint has no MLM head (no {mlm_prefixes[0]}* tensors); "
                     "load it with with_mlm_head=False")
  take_mlm = has_mlm if with_mlm_head is None else bool(with_mlm_head)

  entries = _body_entries(config)
  if has_pooler:
    entries += _pooler_entries(config)
  if take_mlm:
    entries += _mlm_entries(config)
  params = _place(entries, named, original, config, base)
  used = {e.hf_name for e in entries}
  if type_rows == 0:
    used.add("embeddings.token_type_embeddings.weight")
    logger.info("dropped the all-zero 1-row token-type table of the Bort checkpoint")
  if take_mlm:
    used |= _tied_copies(named, original, hf_config, fam)
  for name in named:
    if name in used:
      continue
    if _ignorable(name):
      used.add(name)
      logger.info("ignored %s (a buffer or the next-sentence head)", original[name])
    elif not take_mlm and name.startswith(mlm_prefixes):
      used.add(name)
      logger.info("left out the MLM head tensor %s (with_mlm_head=False)", original[name])
  unused = [original[n] for n in named if n not in used]
  if unused:
    raise ValueError(f"checkpoint tensors not used by a {fam} model of this config: "
                     f"{sorted(unused)}")
  return config, params


def _place(entries: list[_Entry], named: dict[str, np.ndarray], original: dict[str, str],
           config: ModelConfig, base: str) -> dict:
  """Checks each expected tensor's presence and shape and puts it, transformed, in a tree."""
  params: dict = {}
  prefixed = any(name != original[name] for name in named if not name.startswith("cls."))
  known = {e.hf_name for e in entries}
  for entry in entries:
    if entry.hf_name not in named:
      shown = entry.hf_name if entry.group == "mlm" or not prefixed else f"{base}.{entry.hf_name}"
      strays = sorted(original[n] for n in named if n not in known and not _ignorable(n))
      hint = f" (it has tensors that fit nowhere: {strays[:3]})" if strays else ""
      raise ValueError(f"checkpoint is missing the tensor {shown!r} that config.json implies"
                       f"{hint}")
    value, name = named[entry.hf_name], original[entry.hf_name]
    if tuple(value.shape) != entry.hf_shape:
      raise ValueError(f"tensor {name!r} has shape {tuple(value.shape)}, but config.json "
                       f"implies {entry.hf_shape} ({entry.fields})")
    _set(params, entry.path, _to_ours(_as_float32(value, name), entry, config.arch))
  return params


def _tied_copies(named: dict[str, np.ndarray], original: dict[str, str], hf_config: dict,
                 family: str) -> set[str]:
  """The decoder tensors a checkpoint may repeat; they must equal what they are tied to."""
  copies = _mlm_decoder_names(family)
  decoder_weight = next(iter(copies))
  if hf_config.get("tie_word_embeddings") is False and decoder_weight not in named:
    raise ValueError(f"config.json says tie_word_embeddings=false but the checkpoint has no "
                     f"{decoder_weight!r}; only a decoder tied to the word embeddings is "
                     "supported")
  found = set()
  for copy, source in copies.items():
    if copy not in named:
      continue
    if not (source in named and named[source].shape == named[copy].shape
            and np.array_equal(named[source], named[copy])):
      raise ValueError(f"tensor {original[copy]!r} differs from "
                       f"{original.get(source, source)!r}; only a tied decoder is supported")
    found.add(copy)
  return found


def _ignorable(name: str) -> bool:
  """Buffers (not parameters) and the next-sentence-prediction head, which we do not model."""
  return (name.endswith(("embeddings.position_ids", "embeddings.token_type_ids"))
          or name.startswith("cls.seq_relationship."))


def _as_float32(value: np.ndarray, name: str) -> np.ndarray:
  if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
    raise ValueError(f"tensor {name!r} has dtype {value.dtype}, expected floating point")
  return np.asarray(value, dtype=np.float32)


def params_to_hf(params: dict, config: ModelConfig) -> tuple[dict, dict[str, np.ndarray]]:
  """Lays our parameters out as a Hugging Face state dict.

  Args:
    params: our parameter tree (numpy or jax arrays).
    config: its model config.

  Returns:
    ``(hf_config, tensors)``: the config.json dict and name -> contiguous float32 array.

  Raises:
    ValueError: on a missing parameter, a wrong shape, or a parameter that has no place in a
      Hugging Face checkpoint (for example a classification head).
  """
  mlm = "mlm_head" in params
  hf_config = config_to_hf(config, mlm_head=mlm)
  base = "roberta" if config.family == "roberta" else "bert"
  entries = _body_entries(config)
  if config.pooler or "pooler" in params:
    if not config.pooler:
      raise ValueError("params have a 'pooler' but the config says pooler=False")
    entries += _pooler_entries(config)
  if mlm:
    entries += _mlm_entries(config)
  tensors: dict[str, np.ndarray] = {}
  for entry in entries:
    try:
      value = np.asarray(_get(params, entry.path))
    except KeyError:
      raise ValueError(f"params lack {'/'.join(entry.path)!r}, which {config.family} "
                       f"{config.arch} needs") from None
    want = _our_shape(entry, config.arch)
    if value.shape != want:
      raise ValueError(f"parameter {'/'.join(entry.path)!r} has shape {value.shape}, expected "
                       f"{want} for {config.arch}")
    # A base model's tensors carry no prefix; a model with a head nests the body under it.
    name = f"{base}.{entry.hf_name}" if mlm and entry.group != "mlm" else entry.hf_name
    tensors[name] = _to_hf(value.astype(np.float32), entry)
  if config.type_vocab_size == 0:
    name = f"{base}." if mlm else ""
    tensors[name + "embeddings.token_type_embeddings.weight"] = np.zeros(
        (1, config.arch.hidden), np.float32)
  consumed = {e.path for e in entries}
  extra = sorted("/".join(p) for p in _paths(params) if p not in consumed)
  if extra:
    raise ValueError(f"params {extra} have no place in a Hugging Face "
                     f"{hf_config['architectures'][0]}")
  if mlm and config.pooler:
    logger.warning("%s has no pooler; the pooler is saved but transformers will report it as "
                   "unexpected when loading the masked-LM class", hf_config["architectures"][0])
  return hf_config, tensors


def _paths(tree: dict, prefix: tuple[str, ...] = ()) -> Iterable[tuple[str, ...]]:
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _paths(value, prefix + (key,))
    else:
      yield prefix + (key,)


# ---------------------------------------------------------------------------------------------
# Reading checkpoint files


def read_hf_tensors(path: str) -> dict[str, np.ndarray]:
  """Reads every tensor of a Hugging Face checkpoint directory, without torch.

  Args:
    path: directory with model.safetensors (or a sharded index) or pytorch_model.bin.

  Returns:
    Name -> numpy array.
  """
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  for index_name, reader in (("model.safetensors.index.json", load_file),
                             ("pytorch_model.bin.index.json", read_torch_bin)):
    index_path = os.path.join(path, index_name)
    if os.path.exists(index_path):
      with open(index_path) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      out: dict[str, np.ndarray] = {}
      for shard in shards:
        out.update(reader(os.path.join(path, shard)))
      return out
  if os.path.exists(os.path.join(path, "model.safetensors")):
    return dict(load_file(os.path.join(path, "model.safetensors")))
  if os.path.exists(os.path.join(path, "pytorch_model.bin")):
    return read_torch_bin(os.path.join(path, "pytorch_model.bin"))
  raise ValueError(f"{path!r} has neither model.safetensors nor pytorch_model.bin")


# ---------------------------------------------------------------------------------------------
# Directories


def read_hf_config(path: str) -> dict:
  """The parsed config.json of a checkpoint directory."""
  if not os.path.isdir(path):
    raise ValueError(f"{path!r} is not a directory")
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise ValueError(f"{path!r} has no config.json")
  with open(config_path) as f:
    return json.load(f)


def load_hf(path: str, with_mlm_head: bool | None = True, family: str | None = None
            ) -> tuple[ModelConfig, dict]:
  """Loads a Hugging Face BERT / RoBERTa / Bort checkpoint directory into our parameters.

  Args:
    path: directory with config.json and model.safetensors or pytorch_model.bin.
    with_mlm_head: True requires the MLM head, False leaves it out, None takes it if present.
    family: force "bert", "roberta" or "bort" (otherwise read from config.json).

  Returns:
    ``(config, params)``, params a nested dict of float32 jax arrays in the layout of
    docs/INTERFACES.md.
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  hf_config = read_hf_config(path)  # First: a wrong path gets the plainest message.
  config, params = hf_to_params(read_hf_tensors(path), hf_config,
                                with_mlm_head=with_mlm_head, family=family)
  return config, _map(jnp.asarray, params)


def save_hf(params: dict, config: ModelConfig, out_dir: str) -> None:
  """Writes our parameters as a Hugging Face directory (config.json + model.safetensors).

  A model with the MLM head becomes ``BertForMaskedLM`` / ``RobertaForMaskedLM``, one without
  it ``BertModel`` / ``RobertaModel``. Bort is written as a BERT (with a 1-row zero
  token-type table); our own fields ride along in config.json's ``bort_jax`` block so that
  :func:`load_hf` gives back the same config.

  Args:
    params: our parameter tree.
    config: its model config.
    out_dir: directory to create (or overwrite files in).
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  hf_config, tensors = params_to_hf(params, config)
  if config.mlm_layer_norm_eps != config.layer_norm_eps and "mlm_head" in params:
    logger.warning("transformers uses layer_norm_eps=%g in the MLM head, ours %g: its logits "
                   "will differ slightly", config.layer_norm_eps, config.mlm_layer_norm_eps)
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)


def _map(fn: Callable, tree: dict) -> dict:
  return {k: _map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def main(argv: list[str] | None = None) -> int:
  """``bort-jax convert``: Hugging Face directory <-> our checkpoint.

  Args:
    argv: the arguments after ``convert``.

  Returns:
    The process exit code.
  """
  parser = argparse.ArgumentParser(prog="bort-jax convert", description=__doc__.split("\n")[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--from-hf", metavar="DIR", help="Hugging Face checkpoint directory")
  source.add_argument("--to-hf", metavar="CKPT", help="bort_jax checkpoint directory")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--family", choices=sorted(FAMILY_DEFAULTS),
                      help="force the model family (default: from config.json)")
  parser.add_argument("--no-mlm-head", action="store_true",
                      help="leave the MLM head out (default: keep it when present)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    if args.from_hf:
      config, params = load_hf(args.from_hf, with_mlm_head=False if args.no_mlm_head else None,
                               family=args.family)
      export.save(args.out, params, config)
    else:
      config, params = export.load(args.to_hf)
      if args.no_mlm_head:
        params = {k: v for k, v in params.items() if k != "mlm_head"}
      save_hf(params, config, args.out)
  except ValueError as error:
    print(f"bort-jax convert: {error}", file=sys.stderr)
    return 1
  count = sum(int(np.prod(np.shape(_get(params, p)))) for p in _paths(params))
  print(f"wrote {args.out}: {config.family} {config.arch}, {count:,} parameters")
  return 0
