"""The BERT / RoBERTa / Bort encoder in Flax Linen, with exact architecture masks.

Public surface (docs/INTERFACES.md, "Model"): :class:`HeadSpec`, :func:`init`, :func:`apply`,
:func:`attach_head`, :func:`has_pooler` and :func:`logical_axes` (the padded-shape helpers are
in ``core/masks.py``). Parameters are plain pytrees named after the Hugging Face layout.

Architecture masks let one padded shape compute a smaller architecture exactly, as population
training needs under ``jax.vmap``. Every masked quantity is multiplied by an exact 0/1 mask so that (a) padded
parameters never reach an active output, whatever their values, and (b) they receive exactly
zero gradient. With ``arch_mask=None`` the plain code path runs with no mask arithmetic.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import meta

from bort_jax.core.arch import ModelConfig
from bort_jax.core.dropout import Dropout

HEAD_KINDS = ("none", "mlm", "classification", "regression", "multiple_choice")
TASK_KINDS = ("classification", "regression", "multiple_choice")
HEAD_LAYOUTS = ("bert", "roberta")
# The layout a task head takes when its HeadSpec names none. Bort follows RoBERTa: the original
# release fine-tuned with the dense + tanh + out_proj head.
DEFAULT_LAYOUT = {"bert": "bert", "roberta": "roberta", "bort": "roberta"}
_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "masked_positions")

Params = Any
Mask = dict  # one layer's slice of an architecture mask, or None on the fast path


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  """Which output head the model carries, laid out as Hugging Face lays it out.

  Task heads come in two layouts. ``"bert"``: the pooler (dense H->H + tanh on the first
  token) -> dropout -> ``classifier`` Linear(H, n), as ``BertForSequenceClassification``.
  ``"roberta"``: first token -> dropout -> ``classifier/dense`` (H->H) -> tanh -> dropout ->
  ``classifier/out_proj`` (H->n), as ``RobertaForSequenceClassification``. Multiple choice is
  the pooler then ``classifier`` Linear(H, 1) in both layouts (as both ``*ForMultipleChoice``).

  Attributes:
    kind: one of ``HEAD_KINDS``.
    num_labels: classes of a classification head; regression takes 0 or 1 and keeps 1;
      multiple choice may give its number of choices (unused).
    layout: ``"bert"``, ``"roberta"`` or None (the family's ``DEFAULT_LAYOUT``; see
      :meth:`resolve`). Only task heads have a layout.
  """

  kind: str = "mlm"
  num_labels: int = 0
  layout: str | None = None

  def __post_init__(self):
    if self.kind not in HEAD_KINDS:
      raise ValueError(f"unknown head kind {self.kind!r}; known: {HEAD_KINDS}")
    if self.kind == "classification" and self.num_labels < 1:
      raise ValueError(f"HeadSpec('classification') needs num_labels >= 1, got {self.num_labels}")
    if self.kind == "regression" and self.num_labels not in (0, 1):
      raise ValueError(f"HeadSpec('regression') has one output; num_labels {self.num_labels}")
    if self.kind == "regression":
      object.__setattr__(self, "num_labels", 1)  # so HeadSpec("regression") == (.., 1)
    if self.layout is not None and self.layout not in HEAD_LAYOUTS:
      raise ValueError(f"unknown head layout {self.layout!r}; known: {HEAD_LAYOUTS}")
    if self.layout is not None and self.kind not in TASK_KINDS:
      raise ValueError(f"a {self.kind!r} head has no layout; got layout={self.layout!r}")

  @property
  def outputs(self) -> int:
    """Width of the task head's last projection."""
    return self.num_labels if self.kind == "classification" else 1

  def resolve(self, family: str) -> "HeadSpec":
    """This head with its layout filled in from the model family (task heads only)."""
    if self.kind not in TASK_KINDS or self.layout is not None:
      return self
    return dataclasses.replace(self, layout=DEFAULT_LAYOUT[family])

  def uses_pooler(self, family: str) -> bool:
    """Whether the head reads the pooler (then the model has one whatever its config says)."""
    if self.kind == "multiple_choice":
      return True
    return self.kind in TASK_KINDS and self.resolve(family).layout == "bert"


MLM = HeadSpec("mlm")
NO_HEAD = HeadSpec("none")


def has_pooler(config: ModelConfig, head: HeadSpec) -> bool:
  """Whether a model of ``config`` carrying ``head`` has pooler parameters.

  ``config.pooler`` asks for one; BERT-layout and multiple-choice heads need one.
  """
  return bool(config.pooler) or head.uses_pooler(config.family)


def _constrain(x, axes):
  # A no-op unless logical axis rules are active (flax returns x untouched without rules).
  return nn.with_logical_constraint(x, axes)


def _activation(name: str):
  return lambda x: jax.nn.gelu(x, approximate=(name == "gelu_tanh"))


def _masked(x, mask):
  return x if mask is None else x * mask


class Dense(nn.Module):
  """A projection contracting the last ``n_in`` axes of x with a ``[*in, *features]`` kernel."""

  features: tuple[int, ...]
  axes: tuple[str, ...]  # logical names of the kernel's axes; the bias takes the output part
  n_in: int = 1
  std: float = 0.02

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[x.ndim - self.n_in:]
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(nn.initializers.normal(self.std), self.axes),
        tuple(in_shape) + tuple(self.features), jnp.float32)
    bias = self.param(
        "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), self.axes[self.n_in:]),
        tuple(self.features), jnp.float32)
    return jnp.tensordot(x, kernel, axes=self.n_in) + bias


class LayerNorm(nn.Module):
  """LayerNorm whose statistics use the active hidden units only when a mask is given."""

  eps: float

  @nn.compact
  def __call__(self, x, hidden_mask=None):
    width = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (width,), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ("embed",)), (width,), jnp.float32)
    if hidden_mask is None:
      mean = jnp.mean(x, axis=-1, keepdims=True)
      centered = x - mean
      var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    else:
      # Divide by the active count, not the padded width, so a small model's statistics are
      # reproduced; masking x before every sum keeps padded inputs out of the statistics.
      count = jnp.sum(hidden_mask)
      mean = jnp.sum(x * hidden_mask, axis=-1, keepdims=True) / count
      centered = (x - mean) * hidden_mask
      var = jnp.sum(jnp.square(centered), axis=-1, keepdims=True) / count
    y = centered * jax.lax.rsqrt(var + self.eps) * scale + bias
    return _masked(y, hidden_mask)


class Embeddings(nn.Module):
  """Word + position (with the family's offset) + optional token-type embeddings, LN, dropout."""

  config: ModelConfig

  def setup(self):
    cfg = self.config
    table = lambda rows, axis: nn.Embed(rows, cfg.arch.hidden, embedding_init=(
        nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range),
                                     (axis, "embed"))))
    self.word_embeddings = table(cfg.vocab_size, "vocab")
    self.position_embeddings = table(cfg.max_positions, "position")
    if cfg.type_vocab_size > 0:
      self.token_type_embeddings = table(cfg.type_vocab_size, "type")
    self.LayerNorm = LayerNorm(cfg.layer_norm_eps)  # pylint: disable=invalid-name
    self.dropout = Dropout(cfg.dropout)

  def __call__(self, input_ids, token_type_ids, deterministic, hidden_mask=None):
    cfg = self.config
    if cfg.family == "roberta":
      # As Hugging Face's RoBERTa: real tokens count from padding_idx + 1 (= position_offset)
      # and pad tokens sit at padding_idx, so left-padded batches match it too.
      real = (input_ids != cfg.pad_id).astype(jnp.int32)
      positions = jnp.cumsum(real, axis=-1) * real + (cfg.position_offset - 1)
      x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
    else:
      positions = jnp.arange(input_ids.shape[-1], dtype=jnp.int32) + cfg.position_offset
      x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
    if cfg.type_vocab_size > 0:
      if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
      x = x + self.token_type_embeddings(token_type_ids)
    # Families without a token-type table (Bort) ignore the token_type_ids the data emits.
    x = self.LayerNorm(x, hidden_mask)
    return self.dropout(x, deterministic=deterministic)

  def word_table(self):
    """The [V, H] word table, shared with the tied MLM decoder."""
    return self.word_embeddings.embedding


class Attention(nn.Module):
  """Multi-head self-attention, residual connection and post-LayerNorm."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, attention_mask, deterministic, mask: Mask = None):
    cfg, arch = self.config, self.config.arch
    std = cfg.initializer_range
    qkv_shape = (arch.heads, arch.head_size)
    q = Dense(qkv_shape, ("embed", "heads", "kv"), std=std, name="query")(x)
    k = Dense(qkv_shape, ("embed", "heads", "kv"), std=std, name="key")(x)
    v = Dense(qkv_shape, ("embed", "heads", "kv"), std=std, name="value")(x)
    if mask is None:
      scale = 1.0 / math.sqrt(arch.head_size)
    else:
      # Zeroing q's padded dims removes them from every logit (and from k's gradient).
      q = q * mask["head_dim"]
      scale = jax.lax.rsqrt(jnp.sum(mask["head_dim"]))
    q = _constrain(q, ("batch", "length", "heads", "kv"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    keep = attention_mask[:, None, None, :].astype(bool)
    logits = jnp.where(keep, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1)
    self.sow("intermediates", "probs", probs)  # kept only when apply asks for attentions
    probs = Dropout(cfg.attention_dropout)(probs, deterministic=deterministic)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    if mask is not None:
      # Masking the context (not the probabilities) keeps padded heads and head dims out of
      # the output projection, so their q/k/v parameters get exactly zero gradient.
      context = context * (mask["heads"][:, None] * mask["head_dim"][None, :])
    out = Dense((arch.hidden,), ("heads", "kv", "embed"), n_in=2, std=std, name="output")(
        context)
    out = Dropout(cfg.dropout)(out, deterministic=deterministic)
    hidden_mask = None if mask is None else mask["hidden"]
    return LayerNorm(cfg.layer_norm_eps, name="LayerNorm")(out + x, hidden_mask)


class OutputBlock(nn.Module):
  """`encoder/layer_i/output`: kernel [I, H] and bias [H] held directly, then residual + LN."""

  config: ModelConfig

  @nn.compact
  def __call__(self, inter, residual, deterministic, hidden_mask=None):
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, ("mlp", "embed")),
                        (inter.shape[-1], cfg.arch.hidden), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ("embed",)),
                      (cfg.arch.hidden,), jnp.float32)
    out = jnp.dot(inter, kernel) + bias
    out = Dropout(cfg.dropout)(out, deterministic=deterministic)
    return LayerNorm(cfg.layer_norm_eps, name="LayerNorm")(out + residual, hidden_mask)


class EncoderLayer(nn.Module):
  """One post-LN transformer layer; a masked-off layer is the identity."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, attention_mask, deterministic, mask: Mask = None):
    cfg = self.config
    hidden_mask = None if mask is None else mask["hidden"]
    y = Attention(cfg, name="attention")(x, attention_mask, deterministic, mask)
    inter = Dense((cfg.arch.intermediate,), ("embed", "mlp"), std=cfg.initializer_range,
                  name="intermediate")(y)
    inter = _activation(cfg.activation)(inter)
    if mask is not None:
      inter = inter * mask["ffn"]  # after the activation: gelu(0) = 0 but gelu(bias) is not
    inter = _constrain(inter, ("batch", "length", "mlp"))
    out = OutputBlock(cfg, name="output")(inter, y, deterministic, hidden_mask)
    if mask is not None:
      out = mask["layer"] * out + (1.0 - mask["layer"]) * x
    return _constrain(out, ("batch", "length", "embed"))


class MLMHead(nn.Module):
  """Dense H->H, activation, LayerNorm (own eps), decoder tied to the word table, own bias."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, word_table, hidden_mask=None):
    cfg = self.config
    x = Dense((cfg.arch.hidden,), ("embed", "mlp"), std=cfg.initializer_range, name="dense")(x)
    x = _activation(cfg.activation)(x)
    x = LayerNorm(cfg.mlm_layer_norm_eps, name="LayerNorm")(x, hidden_mask)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ("vocab",)),
                      (cfg.vocab_size,), jnp.float32)
    return jnp.dot(x, word_table.T) + bias


class ClassificationHead(nn.Module):
  """The RoBERTa layout: first token -> dropout -> dense(H, tanh) -> dropout -> out_proj(n)."""

  config: ModelConfig
  outputs: int

  @nn.compact
  def __call__(self, x, deterministic, hidden_mask=None):
    cfg = self.config
    std = cfg.initializer_range
    x = Dropout(cfg.dropout)(x[:, 0], deterministic=deterministic)
    x = jnp.tanh(Dense((cfg.arch.hidden,), ("embed", "mlp"), std=std, name="dense")(x))
    x = _masked(x, hidden_mask)
    x = Dropout(cfg.dropout)(x, deterministic=deterministic)
    return Dense((self.outputs,), ("embed", "classes"), std=std, name="out_proj")(x)


def _layer_mask(arch_mask, i: int) -> Mask:
  if arch_mask is None:
    return None
  return {"layer": arch_mask["layers"][i], "heads": arch_mask["heads"][i],
          "head_dim": arch_mask["head_dim"], "hidden": arch_mask["hidden"],
          "ffn": arch_mask["ffn"][i]}


class Encoder(nn.Module):
  """The stack of ``layer_{i}``; returns the final states and every layer's input/output."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, attention_mask, deterministic, arch_mask=None):
    states = [x]
    for i in range(self.config.arch.depth):
      x = EncoderLayer(self.config, name=f"layer_{i}")(
          x, attention_mask, deterministic, _layer_mask(arch_mask, i))
      states.append(x)
    return x, tuple(states)


class Model(nn.Module):
  """The whole encoder plus the optional pooler and the head named by ``head``."""

  config: ModelConfig
  head: HeadSpec

  @nn.compact
  def __call__(self, batch, deterministic=True, arch_mask=None, output_hidden_states=False):
    cfg, head = self.config, self.head
    ids = batch["input_ids"]
    lead = ids.shape[:-1]  # [B] or [B, C] for multiple choice
    flat = lambda a: None if a is None else a.reshape((-1, a.shape[-1]))
    input_ids = flat(ids)
    attention_mask = flat(batch["attention_mask"])
    token_type_ids = flat(batch.get("token_type_ids"))
    hidden_mask = None if arch_mask is None else arch_mask["hidden"]

    embeddings = Embeddings(cfg, name="embeddings")
    x = embeddings(input_ids, token_type_ids, deterministic, hidden_mask)
    x = _constrain(x, ("batch", "length", "embed"))
    x, all_hidden = Encoder(cfg, name="encoder")(x, attention_mask, deterministic, arch_mask)
    unflat = lambda a: a.reshape(lead + a.shape[1:])
    out = {"hidden": unflat(x.astype(jnp.float32))}
    if output_hidden_states:
      out["all_hidden"] = tuple(unflat(h.astype(jnp.float32)) for h in all_hidden)
    if has_pooler(cfg, head):
      pooled = jnp.tanh(Dense((cfg.arch.hidden,), ("embed", "mlp"),
                              std=cfg.initializer_range, name="pooler")(x[:, 0]))
      pooled = _masked(pooled, hidden_mask)
      out["pooled"] = unflat(pooled)

    if head.kind == "mlm":
      positions = batch.get("masked_positions")
      if positions is not None:
        # Gather first: the vocabulary projection is the costliest matmul.
        x = jnp.take_along_axis(x, positions[..., None].astype(jnp.int32), axis=1)
      out["logits"] = MLMHead(cfg, name="mlm_head")(x, embeddings.word_table(), hidden_mask)
    elif head.kind != "none":
      if head.uses_pooler(cfg.family):
        # BERT layout and every multiple-choice head: dropout on the pooler, one Linear.
        dropped = Dropout(cfg.dropout)(pooled, deterministic=deterministic)
        logits = Dense((head.outputs,), ("embed", "classes"), std=cfg.initializer_range,
                       name="classifier")(dropped)
      else:
        logits = ClassificationHead(cfg, head.outputs, name="classifier")(
            x, deterministic, hidden_mask)
      if head.kind == "classification":
        out["logits"] = logits
      else:  # regression [B] and multiple choice [B, C] both score with one output
        out["logits"] = logits[..., 0].reshape(lead)
    return out


# ----------------------------------------------------------------------------------------------
# Pure functions.


def _module(config: ModelConfig, head: HeadSpec) -> Model:
  if not isinstance(config, ModelConfig):
    raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
  if not isinstance(head, HeadSpec):
    raise TypeError(f"head must be a HeadSpec, got {head!r}")
  return Model(config, head.resolve(config.family))


def _dummy_batch(config: ModelConfig, head: HeadSpec, seq_len: int) -> dict:
  if not 1 <= seq_len <= config.max_length:
    raise ValueError(f"seq_len {seq_len} outside 1..{config.max_length} (the position table)")
  shape = (1, 2, seq_len) if head.kind == "multiple_choice" else (1, seq_len)
  batch = {"input_ids": jnp.zeros(shape, jnp.int32), "attention_mask": jnp.ones(shape, jnp.int32)}
  if config.type_vocab_size > 0:
    batch["token_type_ids"] = jnp.zeros(shape, jnp.int32)
  return batch


def _boxed_init(rng, config: ModelConfig, head: HeadSpec, seq_len: int):
  return _module(config, head).init({"params": rng}, _dummy_batch(config, head, seq_len))["params"]


def init(rng, config: ModelConfig, head: HeadSpec = MLM, seq_len: int = 8) -> Params:
  """Initialises parameters: normal(initializer_range) kernels, zero biases, unit LN scales.

  Args:
    rng: a PRNG key.
    config: the model config (its arch fixes every shape).
    head: the output head to create.
    seq_len: length of the dummy tracing batch (no effect on shapes).

  Returns:
    A plain (unboxed) nested dict of float32 arrays, laid out as in docs/INTERFACES.md.
  """
  return _init_jit(rng, config, head, seq_len)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _init_jit(rng, config, head, seq_len):
  # One compiled program instead of dozens of eagerly dispatched (and compiled) initialisers.
  return meta.unbox(_boxed_init(rng, config, head, seq_len))


def _check_batch(config: ModelConfig, head: HeadSpec, batch: dict):
  for key in ("input_ids", "attention_mask"):
    if key not in batch:
      raise KeyError(f"batch is missing {key!r} (has {sorted(batch)})")
  rank = 3 if head.kind == "multiple_choice" else 2
  shape = tuple(batch["input_ids"].shape)
  if len(shape) != rank:
    raise ValueError(f"batch['input_ids'] must have rank {rank} for head {head.kind!r}, "
                     f"got shape {shape}")
  for key in ("attention_mask", "token_type_ids"):
    if key in batch and tuple(batch[key].shape) != shape:
      raise ValueError(f"batch[{key!r}] has shape {tuple(batch[key].shape)}, "
                       f"input_ids has {shape}")
  if shape[-1] > config.max_length:
    raise ValueError(f"sequence length {shape[-1]} exceeds the {config.max_length} positions "
                     f"of this {config.family} config")
  if "masked_positions" in batch and head.kind == "mlm":
    mp = tuple(batch["masked_positions"].shape)
    if len(mp) != 2 or mp[0] != shape[0]:
      raise ValueError(f"batch['masked_positions'] must be [B, P] with B={shape[0]}, got {mp}")


def _check_arch_mask(config: ModelConfig, arch_mask: dict):
  arch = config.arch
  want = {"layers": (arch.depth,), "heads": (arch.depth, arch.heads),
          "head_dim": (arch.head_size,), "hidden": (arch.hidden,),
          "ffn": (arch.depth, arch.intermediate)}
  if set(arch_mask) != set(want):
    raise KeyError(f"arch_mask keys {sorted(arch_mask)} != {sorted(want)}")
  for key, shape in want.items():
    if tuple(arch_mask[key].shape) != shape:
      raise ValueError(f"arch_mask[{key!r}] has shape {tuple(arch_mask[key].shape)}, expected "
                       f"{shape} for the padded arch {arch} (under vmap: one member's mask)")


def apply(params: Params, config: ModelConfig, batch: dict, *, head: HeadSpec = MLM,
          train: bool = False, rng=None, arch_mask: dict | None = None,
          output_hidden_states: bool = False, output_attentions: bool = False) -> dict:
  """Runs the model.

  Args:
    params: parameters from :func:`init` (or a converter).
    config: the model config the parameters were made for.
    batch: ``input_ids``, ``attention_mask`` and optional ``token_type_ids`` ([B, T], or
      [B, C, T] for multiple choice), optional ``masked_positions`` [B, P]. Other keys are
      ignored.
    head: the head the parameters carry.
    train: enables dropout (needs ``rng``); False is fully deterministic.
    rng: PRNG key for dropout.
    arch_mask: optional mask dict from :func:`make_arch_mask` (unbatched; vmap it for a
      population). None runs the plain, mask-free path.
    output_hidden_states: also return the D+1 hidden states.
    output_attentions: also return ``attentions``, each layer's [..., A, T, T] attention
      probabilities before dropout (off: not kept at all).

  Returns:
    A dict with ``hidden`` (with the batch's leading dims, so [B, C, T, H] for multiple
    choice), optionally ``all_hidden``, ``attentions``, ``pooled``, and ``logits``.
  """
  _check_batch(config, head, batch)
  if arch_mask is not None:
    _check_arch_mask(config, arch_mask)
  if train and rng is None:
    raise ValueError("apply(train=True) needs an rng for dropout")
  inputs = {k: jnp.asarray(batch[k]) for k in _INPUT_KEYS if k in batch}
  if head.kind != "mlm":
    inputs.pop("masked_positions", None)
  rngs = {"dropout": rng} if train else {}
  out = _module(config, head).apply(
      {"params": params}, inputs, deterministic=not train, arch_mask=arch_mask,
      output_hidden_states=output_hidden_states, rngs=rngs,
      mutable=["intermediates"] if output_attentions else False)
  if output_attentions:
    out, state = out
    lead, sown = inputs["input_ids"].shape[:-1], state["intermediates"]["encoder"]
    probs = [sown[f"layer_{i}"]["attention"]["probs"][0] for i in range(config.arch.depth)]
    out["attentions"] = tuple(p.reshape(lead + p.shape[1:]) for p in probs)
  return out


def attach_head(rng, params: Params, config: ModelConfig, head: HeadSpec) -> Params:
  """Parameters for ``head`` on the body of ``params``: the start of a fine-tuning run.

  The body is kept; so are a pooler and head of the right shapes. What the head needs but
  ``params`` lacks (a Bort body's pooler under a multiple-choice head, a fresh classifier) is
  initialised from ``rng`` as :func:`init` would; what it does not use is left out.

  Args:
    rng: PRNG key for the new parts.
    params: a model's parameters, with any head or none.
    config: their config.
    head: the head to carry.

  Returns:
    A parameter tree laid out for ``(config, head)``.

  Raises:
    ValueError: when a body parameter is missing or has another shape than ``config`` gives.
  """
  fresh = traverse_util.flatten_dict(init(rng, config, head))
  given = traverse_util.flatten_dict(params)
  out = {}
  for key, value in fresh.items():
    old = given.get(key)
    if old is not None and tuple(old.shape) == tuple(value.shape):
      out[key] = old
    elif key[0] in ("pooler", "classifier", "mlm_head"):
      out[key] = value
    else:
      found = "missing" if old is None else f"of shape {tuple(old.shape)}"
      raise ValueError(f"body parameter {'/'.join(key)} is {found}; {config.family} "
                       f"{config.arch} needs {tuple(value.shape)}")
  return traverse_util.unflatten_dict(out)


def logical_axes(config: ModelConfig, head: HeadSpec = MLM) -> Params:
  """PartitionSpecs of logical axis names, with the same tree structure as the params.

  Names from vocab, embed, heads, kv, mlp, position, type, classes; computed abstractly.
  """
  boxed = jax.eval_shape(lambda r: _boxed_init(r, config, head, 1), jax.random.key(0))
  return nn.get_partition_spec(boxed)
