"""Transformations for Agora: new training points near a dev mistake, in token space.

Agora (``agora.py``) needs "nearby new points" for each dev example its best model got
wrong. The points are made from the tokenised row itself (``input_ids``, ``attention_mask``,
``token_type_ids``), so no detokenise / retokenise round trip can change them, and the
transformation works for any tokenizer and for both segments of a pair.

A transformation is any callable ``transform(rows, round_index, row_ids) -> rows`` where
``rows`` is a dict of ``[N, T]`` arrays (the mistakes), ``row_ids`` are their stable ids (dev
row numbers) and the result is a dict of ``[M, T]`` arrays with a ``source`` entry (the
position in ``rows`` each new point came from). The default, :class:`MLMTokenTransform`:

1. picks ``resample_fraction`` of the row's content tokens (never a special token, never
   padding; at least one) and replaces them with tokens sampled from a masked-LM head's
   distribution at those positions (the row with those positions masked, one forward pass
   for all points; specials are never sampled);
2. then, with probability ``edit_prob``, applies one simple token edit: swap two adjacent
   content tokens, delete one, or duplicate one (when the row has room).

Without an MLM head, :class:`TokenEditTransform` does step 2 only (always one edit).
Every choice is drawn from ``np.random.default_rng([seed, round, row_id, j])`` for the j-th
point of a row, so the points are a function of (seed, round, row) and a resumed run makes
the same ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from bort_jax.core import model
from bort_jax.core.arch import ModelConfig

ROW_KEYS = ("input_ids", "attention_mask", "token_type_ids")
EDITS = ("swap", "delete", "duplicate")
Transform = Callable[[Mapping[str, np.ndarray], int, np.ndarray], dict]


def content_positions(ids: np.ndarray, mask: np.ndarray, special_ids: Sequence[int]
                      ) -> np.ndarray:
  """Positions of one row that hold real, non-special tokens."""
  special = np.isin(ids, np.asarray(special_ids))
  return np.flatnonzero((mask > 0) & ~special)


def token_edit(ids: np.ndarray, types: np.ndarray, mask: np.ndarray, content: np.ndarray,
               rng: np.random.Generator, pad_id: int) -> tuple[np.ndarray, ...]:
  """One swap, delete or duplicate of content tokens (copies; specials stay in place).

  Args:
    ids, types, mask: one row ``[T]``.
    content: its content positions (:func:`content_positions`).
    rng: the point's generator.
    pad_id: written into freed positions.

  Returns:
    ``(ids, types, mask, edit name)``; the row is unchanged ("none") without content.
  """
  ids, types, mask = ids.copy(), types.copy(), mask.copy()
  length = int(mask.sum())
  choices = ["delete", "duplicate"] if len(content) > 0 else []
  if len(content) > 1:
    choices.append("swap")
  if length >= len(ids) and "duplicate" in choices:
    choices.remove("duplicate")  # no room to insert
  if len(content) < 2 and "delete" in choices:
    choices.remove("delete")  # keep at least one content token
  if not choices:
    return ids, types, mask, "none"
  edit = choices[rng.integers(len(choices))]
  if edit == "swap":
    # Adjacent content tokens (positions that are both content and neighbours).
    pairs = [p for p in content[:-1] if p + 1 in set(content.tolist())]
    if not pairs:
      return ids, types, mask, "none"
    p = pairs[rng.integers(len(pairs))]
    ids[p], ids[p + 1] = ids[p + 1], ids[p]
    return ids, types, mask, edit
  p = int(content[rng.integers(len(content))])
  if edit == "delete":
    ids[p:length - 1], types[p:length - 1] = ids[p + 1:length].copy(), types[p + 1:length].copy()
    ids[length - 1], types[length - 1], mask[length - 1] = pad_id, 0, 0
  else:  # duplicate: insert a copy right after position p
    ids[p + 1:length + 1], types[p + 1:length + 1] = ids[p:length].copy(), types[p:length].copy()
    mask[length] = 1
  return ids, types, mask, edit


@dataclasses.dataclass
class TokenEditTransform:
  """``points_per_row`` new points per mistake, each one simple token edit away.

  Attributes:
    special_ids: token ids never edited ([CLS], [SEP], padding, ...).
    pad_id: the padding id.
    points_per_row: new points per mistake.
    seed: the run's seed.
  """

  special_ids: Sequence[int]
  pad_id: int
  points_per_row: int = 2
  seed: int = 0

  def rng(self, round_index: int, row_id: int, j: int) -> np.random.Generator:
    """The generator of the j-th point of dev row ``row_id`` in round ``round_index``."""
    return np.random.default_rng([int(self.seed), int(round_index), int(row_id), int(j)])

  def __call__(self, rows: Mapping[str, np.ndarray], round_index: int, row_ids: np.ndarray
               ) -> dict:
    out = {k: [] for k in ROW_KEYS + ("source", "edit")}
    for i, row_id in enumerate(np.asarray(row_ids)):
      for j in range(self.points_per_row):
        ids, types, mask = (np.asarray(rows[k][i]) for k in ROW_KEYS)
        content = content_positions(ids, mask, self.special_ids)
        ids, types, mask, edit = token_edit(ids, types, mask, content,
                                            self.rng(round_index, row_id, j), self.pad_id)
        for key, value in zip(ROW_KEYS + ("source", "edit"), (ids, types, mask, i, edit)):
          out[key].append(value)
    return _stack(out)


def fixed_batches(batch: Mapping[str, np.ndarray], size: int):
  """Yields ``(start, count, padded)``: ``batch`` cut into batches of exactly ``size`` rows.

  The last batch is completed with copies of its first row (``count`` says how many rows are
  real), so a jitted forward compiles once for every call, whatever the number of rows (Agora
  labels and transforms a different number of points each round).
  """
  n = len(next(iter(batch.values())))
  for start in range(0, n, size):
    count = min(size, n - start)
    rows = np.concatenate([np.arange(start, start + count), np.full(size - count, start)])
    yield start, count, {k: np.asarray(v)[rows] for k, v in batch.items()}


def _stack(out: dict) -> dict:
  result = {k: np.asarray(out[k], np.int32) for k in ROW_KEYS + ("source",)}
  result["edit"] = np.asarray(out["edit"], object)
  return result


@dataclasses.dataclass
class MLMTokenTransform(TokenEditTransform):
  """MLM resampling of some tokens, then (with ``edit_prob``) one token edit.

  Attributes:
    mlm_config: config of a model with an MLM head over the task's vocabulary.
    mlm_params: its parameters (``HeadSpec("mlm")``).
    mask_id: the [MASK] id.
    resample_fraction: share of content tokens resampled (at least one).
    edit_prob: probability of a token edit after the resampling.
    temperature: softmax temperature of the MLM distribution.
  """

  mlm_config: ModelConfig | None = None
  mlm_params: Any = None
  mask_id: int = 0
  resample_fraction: float = 0.15
  edit_prob: float = 0.5
  temperature: float = 1.0
  batch_size: int = 32  # points per MLM forward pass

  def __post_init__(self):
    if self.mlm_config is None or self.mlm_params is None:
      raise ValueError("MLMTokenTransform needs mlm_config and mlm_params (a model with an "
                       "MLM head); use TokenEditTransform without one")
    if not 0.0 < self.resample_fraction <= 1.0:
      raise ValueError(f"resample_fraction must be in (0, 1], got {self.resample_fraction}")
    config = self.mlm_config.replace(dropout=0.0, attention_dropout=0.0)
    self._forward = jax.jit(lambda p, b: model.apply(p, config, b, head=model.HeadSpec("mlm"))
                            ["logits"])

  def _plan(self, rows, round_index, row_ids):
    """Per point: its generator, source row, masked input and the positions to resample."""
    plan = []
    for i, row_id in enumerate(np.asarray(row_ids)):
      for j in range(self.points_per_row):
        rng = self.rng(round_index, row_id, j)
        ids, mask = np.asarray(rows["input_ids"][i]), np.asarray(rows["attention_mask"][i])
        content = content_positions(ids, mask, self.special_ids)
        k = min(len(content), max(1, int(round(self.resample_fraction * len(content)))))
        picked = np.sort(rng.choice(content, size=k, replace=False)) if k else content
        masked = ids.copy()
        masked[picked] = self.mask_id
        plan.append((rng, i, masked, picked))
    return plan

  def __call__(self, rows: Mapping[str, np.ndarray], round_index: int, row_ids: np.ndarray
               ) -> dict:
    plan = self._plan(rows, round_index, row_ids)
    out = {k: [] for k in ROW_KEYS + ("source", "edit")}
    if not plan:
      return _stack(out)
    batch = {"input_ids": np.stack([p[2] for p in plan]),
             "attention_mask": np.stack([np.asarray(rows["attention_mask"][p[1]]) for p in plan]),
             "token_type_ids": np.stack([np.asarray(rows["token_type_ids"][p[1]])
                                         for p in plan])}
    if self.mlm_config.type_vocab_size == 0:
      batch.pop("token_type_ids")
    # The MLM logits of the picked positions only ([positions, V] per point): a whole
    # [points, T, V] array would be gigabytes for a 30k vocabulary.
    picked_logits = []
    for start, count, padded in fixed_batches(batch, self.batch_size):
      logits = np.asarray(jax.device_get(self._forward(self.mlm_params, padded)))
      picked_logits += [logits[j, plan[start + j][3]] for j in range(count)]
    banned = np.asarray(self.special_ids)
    for (rng, i, _, picked), row_logits in zip(plan, picked_logits):
      ids = np.asarray(rows["input_ids"][i]).copy()
      for p, position_logits in zip(picked, row_logits):
        scores = position_logits.astype(np.float64) / self.temperature
        scores[banned[banned < len(scores)]] = -np.inf
        probs = np.exp(scores - scores.max())
        ids[p] = rng.choice(len(probs), p=probs / probs.sum())
      types, mask = (np.asarray(rows[k][i]) for k in ROW_KEYS[1:])
      edit = "none"
      if rng.random() < self.edit_prob:
        content = content_positions(ids, mask, self.special_ids)
        ids, types, mask, edit = token_edit(ids, types, mask, content, rng, self.pad_id)
      for key, value in zip(ROW_KEYS + ("source", "edit"), (ids, types, mask, i, edit)):
        out[key].append(value)
    return _stack(out)
