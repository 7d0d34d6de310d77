"""The Hugging Face tensor table of BERT / RoBERTa / Bort models, heads included.

One :class:`Entry` per tensor: its Hugging Face name, our tree path, how its layout changes and
its shape. ``interop.convert`` walks this table in both directions, so a name or a transpose is
written once. HF ``Linear`` weights are ``[out, in]``, ours ``[in, out]``; query/key/value
kernels are ``[H, A, S]`` and the attention output kernel ``[A, S, H]``; LayerNorm
``weight``/``bias`` become ``scale``/``bias``.

Task heads (docs/INTERFACES.md, "Model"): the BERT layout and every multiple-choice head are
``classifier.{weight,bias}`` on the pooler; RoBERTa's sequence head is ``classifier.dense`` and
``classifier.out_proj`` on the first token. This module also maps a head to the transformers
class that has it (:func:`hf_architecture`) and reads the head back from a checkpoint
(:func:`head_from_hf`).

A RoBERTa-layout sequence head on a BERT or Bort body (Bort's default) goes into
``BertForSequenceClassification``: at inference ``out_proj(tanh(dense(first token)))`` is that
class's ``classifier(pooler(first token))``, so ``classifier/dense`` is written as the pooler
and ``classifier/out_proj`` as the classifier. The logits are the same; only training dropout
differs (transformers has none before the pooler). The ``bort_jax`` block of config.json keeps
the layout, so a reload gives back the RoBERTa-layout head.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bort_jax.core.arch import Arch, ModelConfig
from bort_jax.core.model import TASK_KINDS, HeadSpec

_BODY_ROOTS = ("embeddings.", "encoder.", "pooler.")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor: its HF name (without the body prefix for body tensors), our tree path, how
  to transform it, its HF shape and which config fields that shape comes from."""

  hf_name: str
  path: tuple[str, ...]
  kind: str  # copy | linear | qkv_kernel | qkv_bias | out_kernel
  hf_shape: tuple[int, ...]
  fields: str
  group: str  # body | pooler | mlm | head (head tensors sit outside the body's prefix)


def body_entries(config: ModelConfig) -> list[Entry]:
  a = config.arch
  h, att, inter = a.hidden, a.attention_size, a.intermediate
  out = [
      Entry("embeddings.word_embeddings.weight", ("embeddings", "word_embeddings",
             "embedding"), "copy", (config.vocab_size, h), "vocab_size x hidden_size", "body"),
      Entry("embeddings.position_embeddings.weight", ("embeddings", "position_embeddings",
             "embedding"), "copy", (config.max_positions, h),
             "max_position_embeddings x hidden_size", "body"),
  ]
  if config.type_vocab_size > 0:
    out.append(Entry("embeddings.token_type_embeddings.weight",
                      ("embeddings", "token_type_embeddings", "embedding"), "copy",
                      (config.type_vocab_size, h), "type_vocab_size x hidden_size", "body"))
  out += _layer_norm("embeddings.LayerNorm", ("embeddings", "LayerNorm"), h, "body")
  for i in range(a.depth):
    hf, ours = f"encoder.layer.{i}", ("encoder", f"layer_{i}")
    for name in ("query", "key", "value"):
      out.append(Entry(f"{hf}.attention.self.{name}.weight", ours + ("attention", name,
                        "kernel"), "qkv_kernel", (att, h), "hidden_size x hidden_size", "body"))
      out.append(Entry(f"{hf}.attention.self.{name}.bias", ours + ("attention", name, "bias"),
                        "qkv_bias", (att,), "hidden_size", "body"))
    out.append(Entry(f"{hf}.attention.output.dense.weight", ours + ("attention", "output",
                      "kernel"), "out_kernel", (h, att), "hidden_size x hidden_size", "body"))
    out.append(Entry(f"{hf}.attention.output.dense.bias", ours + ("attention", "output",
                      "bias"), "copy", (h,), "hidden_size", "body"))
    out += _layer_norm(f"{hf}.attention.output.LayerNorm", ours + ("attention", "LayerNorm"),
                       h, "body")
    out.append(Entry(f"{hf}.intermediate.dense.weight", ours + ("intermediate", "kernel"),
                      "linear", (inter, h), "intermediate_size x hidden_size", "body"))
    out.append(Entry(f"{hf}.intermediate.dense.bias", ours + ("intermediate", "bias"), "copy",
                      (inter,), "intermediate_size", "body"))
    out.append(Entry(f"{hf}.output.dense.weight", ours + ("output", "kernel"), "linear",
                      (h, inter), "hidden_size x intermediate_size", "body"))
    out.append(Entry(f"{hf}.output.dense.bias", ours + ("output", "bias"), "copy", (h,),
                      "hidden_size", "body"))
    out += _layer_norm(f"{hf}.output.LayerNorm", ours + ("output", "LayerNorm"), h, "body")
  return out


def pooler_entries(config: ModelConfig) -> list[Entry]:
  h = config.arch.hidden
  return [Entry("pooler.dense.weight", ("pooler", "kernel"), "linear", (h, h),
                 "hidden_size x hidden_size", "pooler"),
          Entry("pooler.dense.bias", ("pooler", "bias"), "copy", (h,), "hidden_size",
                 "pooler")]


def mlm_entries(config: ModelConfig) -> list[Entry]:
  """The MLM head; names differ between BERT (``cls.predictions``) and RoBERTa (``lm_head``)."""
  h = config.arch.hidden
  if config.family == "roberta":
    dense, norm, bias = "lm_head.dense", "lm_head.layer_norm", "lm_head.bias"
  else:
    dense = "cls.predictions.transform.dense"
    norm = "cls.predictions.transform.LayerNorm"
    bias = "cls.predictions.bias"
  return [
      Entry(f"{dense}.weight", ("mlm_head", "dense", "kernel"), "linear", (h, h),
             "hidden_size x hidden_size", "mlm"),
      Entry(f"{dense}.bias", ("mlm_head", "dense", "bias"), "copy", (h,), "hidden_size", "mlm"),
      *_layer_norm(norm, ("mlm_head", "LayerNorm"), h, "mlm"),
      Entry(bias, ("mlm_head", "bias"), "copy", (config.vocab_size,), "vocab_size", "mlm"),
  ]


def _layer_norm(hf: str, ours: tuple[str, ...], h: int, group: str) -> list[Entry]:
  return [Entry(f"{hf}.weight", ours + ("scale",), "copy", (h,), "hidden_size", group),
          Entry(f"{hf}.bias", ours + ("bias",), "copy", (h,), "hidden_size", group)]


def mlm_decoder_names(family: str) -> dict[str, str]:
  """Tied copies a checkpoint may carry: decoder name -> the tensor it must equal."""
  if family == "roberta":
    return {"lm_head.decoder.weight": "embeddings.word_embeddings.weight",
            "lm_head.decoder.bias": "lm_head.bias"}
  return {"cls.predictions.decoder.weight": "embeddings.word_embeddings.weight",
          "cls.predictions.decoder.bias": "cls.predictions.bias"}


def mlm_prefixes(family: str) -> tuple[str, ...]:
  return ("lm_head.",) if family == "roberta" else ("cls.predictions.",)


def to_ours(value: np.ndarray, entry: Entry, arch: Arch) -> np.ndarray:
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


def to_hf(value: np.ndarray, entry: Entry) -> np.ndarray:
  """Ours -> HF layout (the inverse of to_ours)."""
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


def our_shape(entry: Entry, arch: Arch) -> tuple[int, ...]:
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


def head_entries(config: ModelConfig, head: HeadSpec) -> list[Entry]:
  """The tensors of a task head (none for "none" and "mlm"), in its resolved layout."""
  head = head.resolve(config.family)
  if head.kind not in TASK_KINDS:
    return []
  h, n = config.arch.hidden, head.outputs
  labels = "num_labels" if head.kind == "classification" else "1"
  out_fields = f"{labels} x hidden_size"
  if head.uses_pooler(config.family):
    return [Entry("classifier.weight", ("classifier", "kernel"), "linear", (n, h), out_fields,
                  "head"),
            Entry("classifier.bias", ("classifier", "bias"), "copy", (n,), labels,
                  "head")]
  if config.family != "roberta":
    return _roberta_head_in_bert_class(h, n, labels, out_fields)
  return [
      Entry("classifier.dense.weight", ("classifier", "dense", "kernel"), "linear", (h, h),
            "hidden_size x hidden_size", "head"),
      Entry("classifier.dense.bias", ("classifier", "dense", "bias"), "copy", (h,),
            "hidden_size", "head"),
      Entry("classifier.out_proj.weight", ("classifier", "out_proj", "kernel"), "linear",
            (n, h), out_fields, "head"),
      Entry("classifier.out_proj.bias", ("classifier", "out_proj", "bias"), "copy", (n,),
            labels, "head"),
  ]


def _roberta_head_in_bert_class(h: int, n: int, labels: str, out_fields: str
                                ) -> list[Entry]:
  """A RoBERTa-layout sequence head as ``BertForSequenceClassification`` holds it: its dense
  layer is the pooler, its out_proj the classifier (see the module docstring)."""
  return [
      Entry("pooler.dense.weight", ("classifier", "dense", "kernel"), "linear", (h, h),
            "hidden_size x hidden_size", "pooler"),
      Entry("pooler.dense.bias", ("classifier", "dense", "bias"), "copy", (h,), "hidden_size",
            "pooler"),
      Entry("classifier.weight", ("classifier", "out_proj", "kernel"), "linear", (n, h),
            out_fields, "head"),
      Entry("classifier.bias", ("classifier", "out_proj", "bias"), "copy", (n,), labels,
            "head"),
  ]


def hf_architecture(config: ModelConfig, head: HeadSpec) -> str:
  """The transformers class that holds a model of ``config`` with ``head``.

  Raises:
    ValueError: when transformers has no class with that head for the family (a BERT-layout
      sequence head on a RoBERTa body).
  """
  name = "Roberta" if config.family == "roberta" else "Bert"
  head = head.resolve(config.family)
  if head.kind == "none":
    return f"{name}Model"
  if head.kind == "mlm":
    return f"{name}ForMaskedLM"
  if head.kind == "multiple_choice":
    return f"{name}ForMultipleChoice"
  if name == "Roberta" and head.layout == "bert":
    raise ValueError(
        f"head layout 'bert' has no transformers class for a {config.family} body: "
        "RobertaForSequenceClassification has the 'roberta' layout (use HeadSpec(..., "
        "layout='roberta') to fine-tune a model you want to export, or keep our own format)")
  return f"{name}ForSequenceClassification"


def keeps_pooler(config: ModelConfig, head: HeadSpec) -> bool:
  """Whether the transformers class of ``config`` with ``head`` has a place for our pooler.

  ``*ForMaskedLM`` and ``RobertaForSequenceClassification`` have no pooler, and a
  RoBERTa-layout head on a BERT body takes the pooler's place; a pooler written there would be
  reported as unexpected when transformers loads the folder.
  """
  head = head.resolve(config.family)
  return head.kind in ("none", "multiple_choice") or head.layout == "bert"


def head_config_fields(head: HeadSpec, label_names: tuple = ()) -> dict:
  """The config.json fields transformers reads for a task head (labels and problem type).

  Class names are ``label_names`` when they name every output once, else ``LABEL_i``.
  """
  if head.kind not in ("classification", "regression"):
    return {}
  n = head.outputs
  names = [str(x) for x in label_names]
  if head.kind != "classification" or len(names) != n or len(set(names)) != n:
    names = [f"LABEL_{i}" for i in range(n)]
  return {"id2label": {str(i): names[i] for i in range(n)},
          "label2id": {names[i]: i for i in range(n)},
          "problem_type": ("regression" if head.kind == "regression"
                           else "single_label_classification")}


def head_from_hf(hf_config: dict, names: dict[str, tuple[int, ...]], family: str,
                 saved: dict | None = None) -> HeadSpec:
  """Which head a checkpoint carries, from its tensor names and config.json.

  Args:
    hf_config: the parsed config.json.
    names: tensor name (body prefix stripped) -> shape.
    family: the model family.
    saved: the head block that ``save_hf`` writes, when config.json has one.

  Returns:
    ``HeadSpec("mlm")`` or ``HeadSpec("none")`` when there is no ``classifier.*`` tensor (the
    MLM choice is the caller's), else the task head with its layout and width.
  """
  if saved:
    try:
      return HeadSpec(saved["kind"], int(saved.get("num_labels", 0)), saved.get("layout"))
    except (KeyError, TypeError, ValueError) as error:
      raise ValueError(f"config.json field 'bort_jax.head' is {saved!r}, not a head: "
                       f"{error}") from None
  if not any(n.startswith("classifier.") for n in names):
    prefixes = mlm_prefixes(family)
    return HeadSpec("mlm" if any(n.startswith(prefixes) for n in names) else "none")
  layout = "roberta" if "classifier.out_proj.weight" in names else "bert"
  weight = names.get("classifier.out_proj.weight" if layout == "roberta" else "classifier.weight")
  if weight is None or len(weight) != 2:
    found = sorted(n for n in names if n.startswith("classifier."))
    raise ValueError(f"the checkpoint's classifier tensors {found} fit neither transformers "
                     "head layout")
  archs = [str(a) for a in hf_config.get("architectures") or []]
  if any(a.endswith("ForMultipleChoice") for a in archs):
    return HeadSpec("multiple_choice").resolve(family)  # one layout: pooler + Linear(H, 1)
  if not any(a.endswith("ForSequenceClassification") for a in archs):
    raise ValueError(f"config.json field 'architectures' is {archs}; a checkpoint with a "
                     "classifier must name a *ForSequenceClassification or *ForMultipleChoice "
                     "class")
  outputs = int(weight[0])
  # transformers' rule: problem_type decides; unset, one output means regression.
  problem = hf_config.get("problem_type")
  if problem == "regression" or (problem is None and outputs == 1):
    return HeadSpec("regression", 1, layout)
  return HeadSpec("classification", outputs, layout)


# ---------------------------------------------------------------------------------------------
# Checkpoint names as found in the wild


def normalise_names(tensors: dict[str, np.ndarray], base: str
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


def tied_copies(named: dict[str, np.ndarray], original: dict[str, str], hf_config: dict,
                 family: str) -> set[str]:
  """The decoder tensors a checkpoint may repeat; they must equal what they are tied to."""
  copies = mlm_decoder_names(family)
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


def ignorable(name: str) -> bool:
  """Buffers (not parameters) and the next-sentence-prediction head, which we do not model."""
  return (name.endswith(("embeddings.position_ids", "embeddings.token_type_ids"))
          or name.startswith("cls.seq_relationship."))


def as_float32(value: np.ndarray, name: str) -> np.ndarray:
  if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
    raise ValueError(f"tensor {name!r} has dtype {value.dtype}, expected floating point")
  return np.asarray(value, dtype=np.float32)
