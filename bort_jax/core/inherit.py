"""Students that start from the teacher: importance, function-preserving reordering, slicing.

A student inside the teacher's shape takes the teacher's weights in the manner of layer
dropping (DistilBERT) and importance-ordered slicing (DynaBERT, head pruning): the teacher's
heads, FFN neurons and hidden units are first sorted by a measured importance (a permutation
that leaves the teacher's outputs unchanged), a subset of its layers is kept, and the student
takes the leading slice of every width.

Importance, measured on a few masked-LM batches through the teacher's MLM head
(:func:`importance`):

* heads and FFN neurons: the first-order Taylor estimate of the loss change when the unit is
  removed, ``E_x |sum_tokens a * dL/da|`` with ``a`` the head's context (gate) or the neuron's
  activation (Michel et al. 2019; DynaBERT). It is the gradient of the loss with respect to
  the architecture mask's head and FFN gates, taken per example and averaged in absolute
  value, so no extra model code is needed and it costs one backward pass per batch.
* hidden units: the mean absolute activation over the residual stream (every one of the D+1
  hidden states, real tokens only). A hidden unit is shared by every layer; one the stream
  hardly uses feeds little into any projection, and dropping it moves the LayerNorm
  statistics least. (A Taylor score through the hidden mask would also differentiate the
  LayerNorm statistics, which the slicing does not preserve anyway.)
* layers: the measured increase of the masked-LM loss when that one layer is skipped (the
  layer becomes the identity), one forward pass per layer and batch. It is exact for one
  layer, not for a set; :func:`select_layers` keeps the ``depth`` highest scores in their
  original order.

Mismatch rules of :func:`inherit` (student vs teacher):

* depth: the student's layer j is the teacher's ``layers[j]`` (sorted).
* hidden size smaller: the leading hidden units in importance order, in every embedding,
  projection, LayerNorm and the MLM head. LayerNorm then normalises over the kept units only,
  so the student's activations are an approximation of the teacher's, not equal to them.
* attention width ``A_s * S_s``: the query/key/value columns are the leading ``A_s * S_s``
  columns of the importance-ordered teacher heads laid end to end (and the output
  projection's matching rows); a student head may span parts of several teacher heads. With
  ``S_s == S_t`` this is exactly "keep the best A_s heads". A width above the teacher's is a
  ValueError. When ``S_s != S_t`` the query is scaled by ``sqrt(S_s / S_t)`` so the logits
  keep the teacher's ``1 / sqrt(S_t)`` temperature.
* intermediate size: the leading neurons in importance order, per layer.
* vocabulary, positions and token types must equal the teacher's (ValueError otherwise).
* parameters the teacher lacks (a pooler, a head) come from ``model.init`` with the given rng.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bort_jax.core import losses, masks, model
from bort_jax.core.arch import ModelConfig
from bort_jax.core.model import MLM, HeadSpec

Params = Any


@dataclasses.dataclass(frozen=True)
class Importance:
  """Measured importance of a teacher's units (higher = more important).

  Attributes:
    heads: ``[D, A]`` Taylor score of each attention head.
    ffn: ``[D, I]`` Taylor score of each FFN neuron.
    hidden: ``[H]`` mean |activation| of each hidden unit over the residual stream.
    layers: ``[D]`` masked-LM loss increase (nats) when the layer alone is skipped.
  """

  heads: np.ndarray
  ffn: np.ndarray
  hidden: np.ndarray
  layers: np.ndarray


def _check_batch(batch: dict):
  for key in ("input_ids", "attention_mask", "masked_positions", "masked_labels",
              "masked_weights"):
    if key not in batch:
      raise KeyError(f"importance batches need {key!r} (masked-LM batches); got {sorted(batch)}")


def _mlm_sum(params, config, batch, arch_mask):
  out = model.apply(params, config, batch, head=MLM, arch_mask=arch_mask)
  total, count = losses.mlm_loss(out["logits"], batch["masked_labels"], batch["masked_weights"])
  return total, count


@functools.partial(jax.jit, static_argnums=(1,))
def _taylor(params, config, batch, arch_mask):
  """Per-example |dL/dgate| for heads and FFN neurons, summed over the batch."""

  def one(example):
    example = jax.tree_util.tree_map(lambda x: x[None], example)
    grad_fn = jax.grad(lambda m: _mlm_sum(params, config, example, m)[0])
    g = grad_fn(arch_mask)
    return jnp.abs(g["heads"]), jnp.abs(g["ffn"])

  heads, ffn = jax.vmap(one)(batch)
  return jnp.sum(heads, 0), jnp.sum(ffn, 0)


@functools.partial(jax.jit, static_argnums=(1,))
def _stream(params, config, batch):
  """Sum over real tokens of |h| for every hidden state, and the real-token count."""
  out = model.apply(params, config, batch, head=MLM, output_hidden_states=True)
  real = batch["attention_mask"].astype(jnp.float32)[..., None]
  total = sum(jnp.sum(jnp.abs(h) * real, axis=(0, 1)) for h in out["all_hidden"])
  return total, jnp.sum(real) * len(out["all_hidden"])


@functools.partial(jax.jit, static_argnums=(1,))
def _skip_losses(params, config, batch, arch_mask):
  """The masked-LM loss sum with no layer skipped, then with each layer skipped in turn."""
  depth = config.arch.depth

  def with_layers(layers):
    m = dict(arch_mask, layers=layers, heads=arch_mask["heads"] * layers[:, None],
             ffn=arch_mask["ffn"] * layers[:, None])
    return _mlm_sum(params, config, batch, m)[0]

  keep = jnp.ones((depth,), jnp.float32)
  skips = jax.lax.map(with_layers, keep[None] - jnp.eye(depth, dtype=jnp.float32))
  return with_layers(keep), skips


def importance(params: Params, config: ModelConfig, batches: Sequence[dict]) -> Importance:
  """Measures the teacher's unit importances on a few masked-LM batches (module docstring).

  Args:
    params: the teacher's parameters, with its MLM head.
    config: the teacher's config.
    batches: masked-LM batches (``input_ids``, ``attention_mask``, ``masked_positions``,
      ``masked_labels``, ``masked_weights``, optional ``token_type_ids``), at least one.

  Returns:
    :class:`Importance`; heads and neurons per masked token, hidden units per token.
  """
  if not batches:
    raise ValueError("importance needs at least one batch")
  if "mlm_head" not in params:
    raise ValueError("importance is measured through the teacher's MLM head; params have none")
  arch_mask = masks.make_arch_mask(config.arch, config.arch)
  heads = ffn = hidden = 0.0
  base = skips = 0.0
  count = tokens = 0.0
  for batch in batches:
    _check_batch(batch)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    h, f = _taylor(params, config, batch, arch_mask)
    s, n = _stream(params, config, batch)
    b, k = _skip_losses(params, config, batch, arch_mask)
    heads, ffn, hidden = heads + np.asarray(h), ffn + np.asarray(f), hidden + np.asarray(s)
    base, skips = base + float(b), skips + np.asarray(k)
    count += float(jnp.sum(batch["masked_weights"]))
    tokens += float(n)
  count = max(count, 1.0)
  return Importance(heads=heads / count, ffn=ffn / count, hidden=hidden / max(tokens, 1.0),
                    layers=(skips - base) / count)


def _order(scores: np.ndarray) -> np.ndarray:
  # Decreasing importance; ties keep the original order (a stable sort of the negation).
  return np.argsort(-np.asarray(scores, np.float64), kind="stable")


def _permute(x, fields: tuple, layer: int | None, perms: dict):
  x = np.asarray(x)  # host work: a handful of gathers, no compilation
  for axis, field in enumerate(fields):
    if field == "hidden":
      x = np.take(x, perms["hidden"], axis=axis)
    elif field in ("heads", "intermediate"):
      x = np.take(x, perms[field][layer], axis=axis)
  return x


def reorder(params: Params, config: ModelConfig, importance_: Importance,
            head: HeadSpec = MLM) -> Params:
  """The teacher with heads, FFN neurons and hidden units sorted by decreasing importance.

  A permutation of these units computes the same function: attention and the FFN sum over
  heads and neurons, and LayerNorm's statistics do not depend on the order of the hidden
  units, provided every parameter with a hidden axis (embedding tables, LayerNorms, every
  projection, the MLM head's dense, LayerNorm and tied word table) is permuted alike. Which
  axis follows which unit is read from the model itself (``masks``' axis table).

  Args:
    params: parameters of ``config`` carrying ``head``.
    config: their config.
    importance_: from :func:`importance` on this model.
    head: the head the parameters carry.

  Returns:
    The permuted parameters (same layout).
  """
  arch = config.arch
  _check_importance(importance_, config)
  flat = masks.check_layout(params, masks.param_shapes(config, head), "params")
  fields = masks.axis_fields(config, head)
  perms = {"hidden": _order(importance_.hidden),
           "heads": [_order(importance_.heads[i]) for i in range(arch.depth)],
           "intermediate": [_order(importance_.ffn[i]) for i in range(arch.depth)]}
  out = {key: _permute(value, fields[key], masks.layer_of(key), perms)
         for key, value in flat.items()}
  return traverse_util.unflatten_dict(out)


def _check_importance(imp: Importance, config: ModelConfig):
  a = config.arch
  want = {"heads": (a.depth, a.heads), "ffn": (a.depth, a.intermediate), "hidden": (a.hidden,),
          "layers": (a.depth,)}
  for name, shape in want.items():
    if tuple(np.shape(getattr(imp, name))) != shape:
      raise ValueError(f"importance.{name} has shape {np.shape(getattr(imp, name))}; the "
                       f"teacher {a} needs {shape}")


def select_layers(importance_: Importance, depth: int) -> tuple[int, ...]:
  """The teacher layers a depth-``depth`` student keeps: the highest skip-loss scores, sorted.

  Raises:
    ValueError: ``depth`` outside 1..D (the teacher's depth).
  """
  scores = np.asarray(importance_.layers)
  if not 1 <= depth <= scores.shape[0]:
    raise ValueError(f"a student of depth {depth} cannot keep layers of a depth-"
                     f"{scores.shape[0]} teacher (need 1 <= depth <= {scores.shape[0]})")
  return tuple(sorted(int(i) for i in _order(scores)[:depth]))


def kept_share(importance_: Importance, student: ModelConfig,
               layers: Sequence[int], teacher: ModelConfig | None = None) -> dict:
  """Shares of the teacher's total importance a student keeps (for the run's log line).

  Args:
    importance_: the teacher's importance.
    student: the student's config.
    layers: the teacher layers kept.
    teacher: the teacher's config; with it, the heads kept are the teacher heads the
      student's attention width covers, ceil(A_s * S_s / S_t) (a student with a larger head
      size takes more teacher heads than it has), else the student's head count.

  Returns:
    ``{"layers", "heads", "ffn", "hidden"}`` in [0, 1] (negative layer scores count as 0;
    heads and neurons count the leading units the student keeps within the kept layers).
  """
  a = student.arch
  heads = a.heads
  if teacher is not None:
    heads = min(-(-a.attention_size // teacher.arch.head_size), teacher.arch.heads)
  share = lambda kept, total: float(kept / total) if total > 0 else 1.0
  rows = list(layers)
  pos = np.maximum(np.asarray(importance_.layers), 0.0)
  sort = lambda m: -np.sort(-np.asarray(m), axis=-1)
  return {"layers": share(pos[rows].sum(), pos.sum()),
          "heads": share(sort(importance_.heads[rows])[:, :heads].sum(),
                         importance_.heads.sum()),
          "ffn": share(sort(importance_.ffn[rows])[:, :a.intermediate].sum(),
                       importance_.ffn.sum()),
          "hidden": share(sort(importance_.hidden)[:a.hidden].sum(), importance_.hidden.sum())}


def _check_inside(teacher: ModelConfig, student: ModelConfig):
  for field in ("vocab_size", "max_positions", "type_vocab_size", "position_offset"):
    if getattr(student, field) != getattr(teacher, field):
      raise ValueError(f"an inherited student must share the teacher's {field}: student "
                       f"{getattr(student, field)}, teacher {getattr(teacher, field)}")
  t, s = teacher.arch, student.arch
  for field in ("depth", "hidden", "intermediate"):
    if getattr(s, field) > getattr(t, field):
      raise ValueError(f"student {s} is not inside the teacher {t}: its {field} "
                       f"{getattr(s, field)} > {getattr(t, field)}")
  if s.attention_size > t.attention_size:
    raise ValueError(f"student {s} is not inside the teacher {t}: its attention width "
                     f"A*S = {s.attention_size} > the teacher's {t.attention_size}")


def _cut(x, fields: tuple, target: tuple):
  """Leading slices of ``x`` to ``target``; a (heads, head_size) pair is cut as one axis."""
  shape, groups, i = [], [], 0
  while i < len(fields):
    if fields[i] == "heads" and i + 1 < len(fields) and fields[i + 1] == "head_size":
      shape.append(x.shape[i] * x.shape[i + 1])
      groups.append((target[i] * target[i + 1], (target[i], target[i + 1])))
      i += 2
    else:
      shape.append(x.shape[i])
      groups.append((target[i], (target[i],)))
      i += 1
  x = np.asarray(x).reshape(shape)[tuple(slice(0, n) for n, _ in groups)]
  return x.reshape(tuple(d for _, dims in groups for d in dims))


def inherit(teacher_params: Params, teacher_config: ModelConfig, student_config: ModelConfig,
            importance: Importance | None = None, layers: Sequence[int] | None = None,
            rng: Any = None, head: HeadSpec = MLM) -> Params:
  """The student's initial parameters, taken from the teacher (module docstring's rules).

  Args:
    teacher_params: the teacher's parameters (any head; what the student's head needs and the
      teacher lacks is freshly initialised).
    teacher_config: the teacher's config.
    student_config: the student's config: inside the teacher's shape, same vocabulary,
      positions and token types.
    importance: the teacher's :class:`Importance`; None keeps the teacher's own order and
      evenly spaced layers (``round((j + 1) * D_t / D_s) - 1``) unless ``layers`` is given.
    layers: the teacher layers to keep (``student depth`` distinct indices); default
      :func:`select_layers`.
    rng: PRNG key for the parameters the teacher lacks (default ``jax.random.key(0)``).
    head: the student's head.

  Returns:
    Parameters of ``student_config`` carrying ``head``.
  """
  _check_inside(teacher_config, student_config)
  t, s = teacher_config.arch, student_config.arch
  layers = _layers(importance, layers, t.depth, s.depth)
  t_head = MLM if "mlm_head" in teacher_params else model.NO_HEAD
  if importance is not None:
    teacher_params = reorder(teacher_params, teacher_config, importance, t_head)
  flat = masks.check_layout(teacher_params, masks.param_shapes(teacher_config, t_head),
                            "teacher_params")
  fields = masks.axis_fields(teacher_config, t_head)
  rng = jax.random.key(0) if rng is None else rng
  fresh = traverse_util.flatten_dict(model.init(rng, student_config, head))
  q_scale = math.sqrt(s.head_size / t.head_size)
  out = {}
  for key, value in fresh.items():
    j = masks.layer_of(key)
    source = key if j is None else (key[0], f"layer_{layers[j]}") + key[2:]
    if source not in flat:
      out[key] = value
      continue
    cut = _cut(flat[source], fields[source], tuple(value.shape))
    if q_scale != 1.0 and key[2:3] == ("attention",) and key[3:4] == ("query",):
      cut = cut * q_scale
    out[key] = jnp.asarray(cut, value.dtype)
  return traverse_util.unflatten_dict(out)


def _layers(importance_, layers, teacher_depth: int, depth: int) -> tuple[int, ...]:
  if layers is None:
    if importance_ is not None:
      return select_layers(importance_, depth)
    return uniform_layers(teacher_depth, depth)
  layers = tuple(int(i) for i in layers)
  if len(layers) != depth or len(set(layers)) != depth or not all(
      0 <= i < teacher_depth for i in layers):
    raise ValueError(f"layers {layers} must be {depth} distinct teacher layers in "
                     f"0..{teacher_depth - 1}")
  return tuple(sorted(layers))


def uniform_layers(teacher_depth: int, depth: int) -> tuple[int, ...]:
  """Evenly spaced teacher layers: student layer j <-> ``round((j + 1) * D_t / D_s) - 1``.

  Halves round up, so D_t = 6, D_s = 4 keeps layers (1, 2, 4, 5); the last layer is always kept.
  """
  return tuple(t for _, t in losses.layer_map(depth, teacher_depth, "uniform"))


def hidden_projection(importance_: Importance | None, student_hidden: int,
                      teacher_hidden: int) -> np.ndarray:
  """``[H_s, H_t]`` 0/1 matrix mapping an inherited student's hidden units to the teacher's.

  Student unit i is teacher unit ``order[i]`` (the importance order; the identity order
  without an importance), so this is where a learned hidden-state projection starts.
  """
  order = (np.arange(teacher_hidden) if importance_ is None
           else _order(importance_.hidden))[:student_hidden]
  out = np.zeros((student_hidden, teacher_hidden), np.float32)
  out[np.arange(student_hidden), order] = 1.0
  return out
