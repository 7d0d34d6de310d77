"""Losses for pretraining, distillation and fine-tuning, as pure ``jax.numpy`` functions.

Every loss returns *sums* together with the total weight they were summed over, so that a
caller can add them up across micro-batches, devices or hosts before dividing once. Inputs may
be bfloat16; all arithmetic is done in float32.

Distillation (docs/BORT.md section 4) combines an MLM cross-entropy with a
knowledge-distillation term at temperature ``T``:

    loss = (alpha_mlm * sum MLM + alpha_kd * T^2 * sum KD) / (number of masked tokens)

Two KD terms are available per masked prediction, with ``p_t = softmax(teacher / T)``:

* ``"kl"`` (default, textbook): ``KL(p_t || p_s) = sum_v p_t[v] * (log p_t[v] - log p_s[v])``
  with ``log p_s = log_softmax(student / T)``; summed over the vocabulary.
* ``"original"`` (the original Bort release): the student's *probabilities*
  ``q = softmax(student / T)`` are passed through a second log-softmax, and the cross-entropy
  against ``p_t`` is averaged over the vocabulary of size ``V``:
  ``-(1 / V) * sum_v p_t[v] * log_softmax(q)[v]``. Because ``q`` lies in [0, 1] the second
  softmax is nearly flat, so this term is close to ``log V`` and its gradient is tiny; it is
  provided only to reproduce the released recipe. (A KL form of the same variant, which adds
  the teacher's entropy ``(1 / V) * sum_v p_t log p_t``, differs by a constant that does not
  depend on the student and so has the same gradient.)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

KD_KINDS = ("kl", "original")


def _f32(x: Any) -> jax.Array:
  return jnp.asarray(x).astype(jnp.float32)


def _check_rank(name: str, logits: jax.Array, other_name: str, other: jax.Array) -> None:
  """Logits are ``[..., V]``; labels and weights are ``[...]``."""
  if tuple(logits.shape[:-1]) != tuple(other.shape):
    raise ValueError(f"{name} has shape {tuple(logits.shape)} but {other_name} has shape "
                     f"{tuple(other.shape)}; expected {other_name} == {name}[:-1].")


def safe_divide(total: jax.Array, count: jax.Array) -> jax.Array:
  """``total / count``, and 0 where ``count`` is 0 (a batch with no masked tokens).

  Args:
    total: a summed loss.
    count: the weight it was summed over.

  Returns:
    The mean, or 0 when ``count == 0``.
  """
  count = _f32(count)
  return _f32(total) / jnp.where(count > 0, count, 1.0)


def mlm_loss(logits: jax.Array, labels: jax.Array,
             weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Masked-LM cross-entropy summed over weighted predictions.

  Args:
    logits: ``[..., V]`` scores at the masked positions.
    labels: ``[...]`` int target ids.
    weights: ``[...]`` float weights (0 on padding predictions).

  Returns:
    ``(sum_loss, sum_weight)``: ``sum_i w_i * -log softmax(logits_i)[label_i]`` and
    ``sum_i w_i``.
  """
  return softmax_cross_entropy(logits, labels, weights)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array,
                          weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Integer-label cross-entropy for classification, multiple choice and MLM.

  Args:
    logits: ``[..., C]`` (``[B, num_labels]`` for classification, ``[B, num_choices]`` for
      multiple choice).
    labels: ``[...]`` int labels in ``[0, C)``.
    weights: ``[...]`` float weights (0 on padded examples); None means all ones.

  Returns:
    ``(sum_loss, sum_weight)``.
  """
  logits = _f32(logits)
  labels = jnp.asarray(labels)
  weights = jnp.ones(labels.shape, jnp.float32) if weights is None else _f32(weights)
  _check_rank("logits", logits, "labels", labels)
  _check_rank("logits", logits, "weights", weights)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return -jnp.sum(picked * weights), jnp.sum(weights)


def correct_predictions(logits: jax.Array, labels: jax.Array,
                        weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Weighted count of argmax hits, for accuracy metrics.

  Args:
    logits: ``[..., C]``.
    labels: ``[...]`` int labels.
    weights: ``[...]`` float weights; None means all ones.

  Returns:
    ``(sum_correct, sum_weight)``.
  """
  labels = jnp.asarray(labels)
  weights = jnp.ones(labels.shape, jnp.float32) if weights is None else _f32(weights)
  _check_rank("logits", logits, "labels", labels)
  hits = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return jnp.sum(hits * weights), jnp.sum(weights)


def mse(predictions: jax.Array, targets: jax.Array,
        weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Squared error for regression heads (STS-B).

  Args:
    predictions: ``[B]`` predicted values.
    targets: ``[B]`` float targets.
    weights: ``[B]`` float weights; None means all ones.

  Returns:
    ``(sum_i w_i * (pred_i - target_i)^2, sum_i w_i)``.
  """
  predictions, targets = _f32(predictions), _f32(targets)
  if predictions.shape != targets.shape:
    raise ValueError(f"predictions have shape {predictions.shape} but targets have shape "
                     f"{targets.shape}.")
  weights = jnp.ones(targets.shape, jnp.float32) if weights is None else _f32(weights)
  return jnp.sum(weights * jnp.square(predictions - targets)), jnp.sum(weights)


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, weights: jax.Array,
            temperature: float = 2.0, kind: str = "kl") -> tuple[jax.Array, jax.Array]:
  """Knowledge-distillation term summed over weighted predictions (no ``T^2`` factor).

  The teacher is treated as a constant (``stop_gradient``).

  Args:
    student_logits: ``[..., V]``.
    teacher_logits: ``[..., V]``; the same vocabulary as the student.
    weights: ``[...]`` float weights (0 on padding predictions).
    temperature: ``T > 0``; both distributions are softened by ``logits / T``.
    kind: ``"kl"`` (textbook KL, summed over the vocabulary) or ``"original"`` (the original
      release's double-softmax cross-entropy, averaged over the vocabulary); see the module
      docstring for the exact formulas.

  Returns:
    ``(sum_i w_i * kd_i, sum_i w_i)``.
  """
  if kind not in KD_KINDS:
    raise ValueError(f"unknown distillation kind {kind!r}; expected one of {KD_KINDS}.")
  if temperature <= 0:
    raise ValueError(f"temperature must be positive, got {temperature}.")
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
        f"student logits have shape {tuple(student_logits.shape)} but teacher logits have "
        f"shape {tuple(teacher_logits.shape)}; the teacher and the student must share the "
        "vocabulary and the masked positions.")
  weights = _f32(weights)
  _check_rank("student_logits", student_logits, "weights", weights)
  teacher_log_p = jax.nn.log_softmax(
      jax.lax.stop_gradient(_f32(teacher_logits)) / temperature, axis=-1)
  teacher_p = jnp.exp(teacher_log_p)
  student_scaled = _f32(student_logits) / temperature
  if kind == "kl":
    student_log_p = jax.nn.log_softmax(student_scaled, axis=-1)
    # Where the teacher's probability underflows to 0 the term is 0 by convention.
    per_pred = jnp.sum(jnp.where(teacher_p > 0, teacher_p * (teacher_log_p - student_log_p), 0.0),
                       axis=-1)
  else:
    student_p = jax.nn.softmax(student_scaled, axis=-1)
    per_pred = -jnp.mean(teacher_p * jax.nn.log_softmax(student_p, axis=-1), axis=-1)
  return jnp.sum(per_pred * weights), jnp.sum(weights)


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
                      weights: jax.Array, temperature: float = 2.0, alpha_kd: float = 0.5,
                      alpha_mlm: float = 0.1, kind: str = "kl") -> tuple[jax.Array, dict]:
  """Bort's pretraining loss: weighted MLM plus temperature-scaled KD per masked token.

  Args:
    student_logits: ``[B, P, V]`` student MLM logits at the masked positions.
    teacher_logits: ``[B, P, V]`` teacher MLM logits at the same positions.
    labels: ``[B, P]`` int original token ids.
    weights: ``[B, P]`` float (0 on padding predictions).
    temperature: ``T``; the KD term is multiplied by ``T^2`` so its gradient scale does not
      shrink as ``T`` grows.
    alpha_kd: weight of the KD term (0.5 in the paper).
    alpha_mlm: weight of the MLM term (0.1 in the paper).
    kind: ``"kl"`` or ``"original"``, see :func:`kd_loss`.

  Returns:
    ``(loss, metrics)``: ``loss = (alpha_mlm * sum_mlm + alpha_kd * T^2 * sum_kd) / n`` where
    ``n`` is the sum of the weights (0 when ``n == 0``); metrics hold the per-token means
    ``mlm_loss`` and ``kd_loss``, the MLM ``accuracy`` and ``num_masked = n``.
  """
  sum_mlm, n = mlm_loss(student_logits, labels, weights)
  sum_kd, _ = kd_loss(student_logits, teacher_logits, weights, temperature, kind)
  total = alpha_mlm * sum_mlm + alpha_kd * temperature ** 2 * sum_kd
  hits, _ = correct_predictions(student_logits, labels, weights)
  metrics = {"mlm_loss": safe_divide(sum_mlm, n), "kd_loss": safe_divide(sum_kd, n),
             "accuracy": safe_divide(hits, n), "num_masked": n}
  return safe_divide(total, n), metrics


def hidden_mse(student_hidden: jax.Array, teacher_hidden: jax.Array, mask: jax.Array,
               projection: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Hidden-state matching: squared error averaged over the hidden units, summed over tokens.

  Args:
    student_hidden: ``[B, T, H_s]``.
    teacher_hidden: ``[B, T, H_t]`` (teacher treated as a constant).
    mask: ``[B, T]`` 0/1 (1 = real token).
    projection: optional ``[H_s, H_t]`` matrix mapping the student's width to the teacher's;
      required when ``H_s != H_t``.

  Returns:
    ``(sum_tokens mask * mean_h (proj(s) - t)^2, sum mask)``.
  """
  student, teacher = _f32(student_hidden), jax.lax.stop_gradient(_f32(teacher_hidden))
  if projection is not None:
    projection = _f32(projection)
    if projection.shape != (student.shape[-1], teacher.shape[-1]):
      raise ValueError(f"projection has shape {projection.shape}; expected "
                       f"{(student.shape[-1], teacher.shape[-1])} (student width, teacher "
                       "width).")
    student = student @ projection
  if student.shape != teacher.shape:
    raise ValueError(f"student hidden {student.shape} and teacher hidden {teacher.shape} "
                     "differ; pass a projection [H_student, H_teacher].")
  mask = _f32(mask)
  _check_rank("student_hidden", student, "mask", mask)
  per_token = jnp.mean(jnp.square(student - teacher), axis=-1)
  return jnp.sum(per_token * mask), jnp.sum(mask)


LAYER_MAPS = ("uniform", "inherited")


def attention_kl(student_probs: jax.Array, teacher_probs: jax.Array,
                 mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Self-attention distribution transfer: ``KL(teacher || student)`` over the keys.

  The KL form of MiniLM's attention-distribution loss, applied at mapped layers as TinyBERT
  applies its attention loss. When the head counts differ, both sides are first averaged over
  their heads (the distribution of the layer's mean head); otherwise head h matches head h and
  the KL is averaged over the heads.

  Args:
    student_probs: ``[B, A_s, T, T]`` attention probabilities (rows sum to 1).
    teacher_probs: ``[B, A_t, T, T]`` (treated as a constant).
    mask: ``[B, T]`` 0/1 (1 = real token); padding queries count 0, padding keys carry no
      teacher probability.

  Returns:
    ``(sum over real queries of mean_h KL_h, number of real queries)``.
  """
  student, teacher = _f32(student_probs), jax.lax.stop_gradient(_f32(teacher_probs))
  if student.shape[1] != teacher.shape[1]:
    student = jnp.mean(student, axis=1, keepdims=True)
    teacher = jnp.mean(teacher, axis=1, keepdims=True)
  if student.shape != teacher.shape:
    raise ValueError(f"attention probabilities differ in shape: student {student.shape}, "
                     f"teacher {teacher.shape} (batch and length must match)")
  tiny = jnp.finfo(jnp.float32).tiny
  log_ratio = jnp.log(jnp.maximum(teacher, tiny)) - jnp.log(jnp.maximum(student, tiny))
  per_query = jnp.sum(jnp.where(teacher > 0, teacher * log_ratio, 0.0), axis=-1)  # [B, A, T]
  mask = _f32(mask)
  return jnp.sum(jnp.mean(per_query, axis=1) * mask), jnp.sum(mask)


def layer_map(student_depth: int, teacher_depth: int, kind: str = "uniform",
              inherited: tuple[int, ...] | None = None) -> tuple[tuple[int, int], ...]:
  """Pairs ``(student layer j, teacher layer t)`` (0-based encoder layers) to distil.

  Args:
    student_depth: ``D_s``.
    teacher_depth: ``D_t``.
    kind: ``"uniform"``: ``t = round((j + 1) * D_t / D_s) - 1`` (halves round up, so the last
      layers always pair); ``"inherited"``: ``t = inherited[j]``, the layers the student took.
    inherited: the inherited teacher layers (needed for ``"inherited"``).

  Returns:
    One pair per student layer.
  """
  if kind == "uniform":
    return tuple((j, int(math.floor((j + 1) * teacher_depth / student_depth + 0.5)) - 1)
                 for j in range(student_depth))
  if kind == "inherited":
    if inherited is None or len(inherited) != student_depth:
      raise ValueError(f"layer_map 'inherited' needs the {student_depth} inherited teacher "
                       f"layers (config.student.init='inherit'); got {inherited}")
    return tuple(enumerate(int(t) for t in inherited))
  raise ValueError(f"unknown layer_map {kind!r}; expected one of {LAYER_MAPS}")


def intermediate_loss(student_out: dict, teacher_out: dict, mask: jax.Array,
                      pairs: tuple[tuple[int, int], ...], alpha_hidden: float = 0.0,
                      alpha_attn: float = 0.0,
                      projection: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Hidden-state MSE and attention KL at the mapped layers, each averaged over its layers.

  The hidden term also pairs the embedding outputs (hidden state 0 of both models). Hidden
  states ``j + 1`` and ``t + 1`` are compared for each pair ``(j, t)``; attentions ``j`` and
  ``t``.

  Args:
    student_out: ``model.apply`` output with ``all_hidden`` (and ``attentions`` when
      ``alpha_attn > 0``).
    teacher_out: the same from the teacher.
    mask: ``[B, T]`` real tokens.
    pairs: from :func:`layer_map`.
    alpha_hidden: weight of the hidden MSE (mean over units, real tokens and mapped states).
    alpha_attn: weight of the attention KL (mean over real queries, heads and mapped layers).
    projection: ``[H_s, H_t]`` when the widths differ.

  Returns:
    ``(alpha_hidden * hidden + alpha_attn * attn, {"hidden_loss", "attn_loss"})``.
  """
  metrics, total = {}, jnp.zeros((), jnp.float32)
  if alpha_hidden:
    states = [(0, 0)] + [(j + 1, t + 1) for j, t in pairs]
    parts = [hidden_mse(student_out["all_hidden"][j], teacher_out["all_hidden"][t], mask,
                        projection) for j, t in states]
    value = sum(safe_divide(s, n) for s, n in parts) / len(parts)
    metrics["hidden_loss"], total = value, total + alpha_hidden * value
  if alpha_attn:
    parts = [attention_kl(student_out["attentions"][j], teacher_out["attentions"][t], mask)
             for j, t in pairs]
    value = sum(safe_divide(s, n) for s, n in parts) / len(parts)
    metrics["attn_loss"], total = value, total + alpha_attn * value
  return total, metrics
