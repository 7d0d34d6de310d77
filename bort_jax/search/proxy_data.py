"""The data of a proxy phase: s training batches, a held-out batch and the teacher's logits.

Built by the caller (the extraction pipeline computes the teacher's logits once) and shared by
every member of every population; :func:`check` tells the caller when it does not fit the
trainer's batch shape or vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

@dataclasses.dataclass
class ProxyData:
  """The s training batches (stacked on a leading step axis) and the held-out batch.

  Attributes:
    batches: pretraining-batch dict with a leading step axis: ``input_ids``,
      ``attention_mask`` (``token_type_ids``) [s, B, T]; ``masked_positions``,
      ``masked_labels``, ``masked_weights`` [s, B, P].
    heldout: one such batch without the step axis.
    teacher: the teacher's logits at the masked positions, [s, B, P, V]; None trains with the
      masked-LM loss alone.
    heldout_teacher: [B', P, V] for the held-out batch; needed when the error is "distill".
  """

  batches: dict
  heldout: dict
  teacher: Any = None
  heldout_teacher: Any = None

  @property
  def steps(self) -> int:
    return int(np.shape(self.batches["input_ids"])[0])

  def tree(self) -> tuple:
    """The arrays as one pytree (what a compiled program takes)."""
    return (self.batches, self.heldout, self.teacher, self.heldout_teacher)


BATCH_KEYS = ("input_ids", "attention_mask", "masked_positions", "masked_labels",
              "masked_weights")
MODEL_KEYS = BATCH_KEYS + ("token_type_ids",)


def check(data: ProxyData, batch_shape: tuple[int, int, int], vocab_size: int,
          error: str) -> None:
  """Raises a clear error when the data does not fit a trainer's shapes.

  Args:
    data: the proxy batches.
    batch_shape: the trainer's (batch_size, seq_len, max_predictions).
    vocab_size: the student's vocabulary (the teacher's logits must match it).
    error: the trainer's held-out error, "distill" or "mlm".
  """
  if not isinstance(data, ProxyData):
    raise ValueError(f"data must be a ProxyData, got {type(data).__name__}")
  b, t, p = batch_shape
  s = data.steps
  want = {k: (s, b, t) for k in ("input_ids", "attention_mask")}
  want.update({k: (s, b, p) for k in BATCH_KEYS[2:]})
  for key, shape in want.items():
    if key not in data.batches:
      raise ValueError(f"proxy batches lack {key!r} (have {sorted(data.batches)})")
    if tuple(np.shape(data.batches[key])) != shape:
      raise ValueError(f"proxy batches[{key!r}] has shape {np.shape(data.batches[key])}, "
                       f"expected [s, B, .] = {shape} (trainer batch_size={b}, "
                       f"seq_len={t}, max_predictions={p})")
  for key in BATCH_KEYS:
    if key not in data.heldout:
      raise ValueError(f"held-out batch lacks {key!r} (have {sorted(data.heldout)})")
  if data.teacher is not None:
    shape = tuple(np.shape(data.teacher))
    if shape != (s, b, p, vocab_size):
      raise ValueError(f"teacher logits have shape {shape}, expected [s, B, P, V] = "
                       f"{(s, b, p, vocab_size)}: the teacher's vocabulary must be the student's")
  needs_heldout = error == "distill" and data.teacher is not None
  if needs_heldout and data.heldout_teacher is None:
    raise ValueError("error='distill' needs heldout_teacher (the teacher's held-out logits)")
  if data.heldout_teacher is not None:
    shape = tuple(np.shape(data.heldout_teacher))
    want = tuple(np.shape(data.heldout["masked_positions"])) + (vocab_size,)
    if shape != want:
      raise ValueError(f"held-out teacher logits have shape {shape}, expected {want}")


def abstract(steps: int, batch: int, seq_len: int, predictions: int, vocab_size: int = 0
             ) -> ProxyData:
  """A ProxyData of shapes only (``jax.ShapeDtypeStruct``), for planning a program's compile
  without its data; ``vocab_size`` > 0 adds the teacher's logits."""
  import jax  # pylint: disable=import-outside-toplevel
  int32, float32 = np.dtype(np.int32), np.dtype(np.float32)

  def one(lead: tuple) -> dict:
    out = {k: jax.ShapeDtypeStruct(lead + (seq_len,), int32)
           for k in ("input_ids", "attention_mask", "token_type_ids")}
    out.update({k: jax.ShapeDtypeStruct(lead + (predictions,), d) for k, d in (
        ("masked_positions", int32), ("masked_labels", int32), ("masked_weights", float32))})
    return out

  data = ProxyData(batches=one((steps, batch)), heldout=one((batch,)))
  if vocab_size:
    data.teacher = jax.ShapeDtypeStruct((steps, batch, predictions, vocab_size), float32)
    data.heldout_teacher = jax.ShapeDtypeStruct((batch, predictions, vocab_size), float32)
  return data
