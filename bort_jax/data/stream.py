"""Pretraining batches streamed from a corpus too large to pack at once, a window at a time.

``config.data.stream_window`` > 0 (documents per window) turns it on for a TFDS corpus or a
built corpus of text files. Each process streams its own share of the records (every
``process_count``-th, :func:`corpus_sources.process_share`) with a seed of its own; it holds
the share's record order and at most two packed windows, never the share's text or token ids.

The stream of one process:

* epoch ``e`` visits the share's records in the order of a permutation seeded by (seed, e);
* that order is cut into windows of ``W`` records; window (e, w) keeps the records of the
  split asked for (a TFDS corpus: train or validation by the hash of their text, as
  :func:`corpus_sources.tfds_documents` does), packs them as :func:`pretrain.pack_documents`
  does (cut points seeded by (seed, e, w)) and shuffles its examples (seeded by (seed, e, w));
* the stream is the windows' examples end to end, epoch after epoch, and step ``s`` takes its
  rows ``[s * B, (s + 1) * B)``, masked as :class:`pretrain.PretrainInput` masks them
  (seeded by (seed, step, row)).

So a batch is a function of the corpus, the seed and the step: a resumed run finds its place by
counting the examples of the windows before it. Counts are kept in memory and, with
``cache_dir``, on disk (a small JSON file), so once counted a window is never packed only to be
counted again. The order differs from :class:`pretrain.PretrainInput`'s, whose examples mix over
the whole share: here they mix within a window of a shuffled share, the shuffle buffer of
streamed pretraining.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
from typing import Any, Callable, Sequence

import numpy as np

from bort_jax.data import pretrain
from bort_jax.data.tokenization import Tokenizer
from bort_jax.runtime import fileio

_ORDER, _WINDOW = 4, 5  # stream tags, apart from pretrain's
_KEEP = 2  # packed windows held: a batch straddles at most two


class DocumentShare:
  """One process's documents of a corpus data source, read only when asked for.

  Args:
    source: a random-access data source (records are ``str``/``bytes`` or dicts).
    indices: the record indices of this process's share.
    text_of: the document text of one record, or None when the record is not in the split
      read (the TFDS route's hash split).
  """

  def __init__(self, source: Any, indices: Sequence[int],
               text_of: Callable[[Any], str | None]):
    self.source, self.indices, self.text_of = source, indices, text_of

  def __len__(self) -> int:
    return len(self.indices)

  def documents(self, positions: Sequence[int]) -> list[str]:
    """The texts of the share's records at ``positions`` that are in the split, in order."""
    texts = (self.text_of(self.source[self.indices[int(i)]]) for i in positions)
    return [t for t in texts if t]


class StreamedInput(pretrain.BatchStream):
  """Masked-LM batches for one process, streamed a window of documents at a time.

  Args:
    share: the process's :class:`DocumentShare`.
    tokenizer: the family's tokenizer.
    seq_len: sequence length T.
    batch_size: this process's rows per step.
    seed: this process's data seed.
    window: records per window W.
    max_predictions: predictions per row (default: 80 per 512 tokens, scaled).
    mask_rate: share of non-special tokens predicted.
    cache_dir: where the window counts are kept (None: in memory only).
    key: what identifies the corpus and split in the counts' file name.
  """

  def __init__(self, share: DocumentShare, tokenizer: Tokenizer, seq_len: int,
               batch_size: int, seed: int = 0, window: int = 2048,
               max_predictions: int | None = None, mask_rate: float = 0.15,
               cache_dir: str | None = None, key: str = ""):
    if not len(share):
      raise ValueError("the corpus share of this process holds no records")
    if window < 1 or batch_size < 1:
      raise ValueError(f"window={window} and batch_size={batch_size} must be >= 1")
    if not 0.0 < mask_rate < 1.0:
      raise ValueError(f"mask_rate must be in (0, 1), got {mask_rate}")
    self.share, self.tokenizer, self.seq_len = share, tokenizer, seq_len
    self.batch_size, self.seed, self.window = batch_size, seed, window
    self.max_predictions = max_predictions or pretrain.default_max_predictions(seq_len)
    self.mask_rate = mask_rate
    self.windows_per_epoch = math.ceil(len(share) / window)
    self.replacement_ids = np.setdiff1d(np.arange(tokenizer.vocab_size, dtype=np.int32),
                                        tokenizer.special_ids)
    self._orders: dict[int, np.ndarray] = {}
    self._packed: collections.OrderedDict = collections.OrderedDict()
    self._counts_path = None
    self._counts: list[int] = []  # examples per window, in stream order, as far as known
    if cache_dir:
      digest = hashlib.sha256(json.dumps(
          [key, tokenizer.backend.to_str(), seq_len, seed, window, len(share)]).encode())
      self._counts_path = os.path.join(cache_dir, f"stream-counts-{digest.hexdigest()[:20]}.json")
      kept = fileio.read_json(self._counts_path)  # None: missing or cut short
      if isinstance(kept, list):
        self._counts = [int(c) for c in kept]
    self._starts = list(np.cumsum([0] + self._counts))  # first stream row of each window

  # ------------------------------------------------------------------------ windows

  def _order(self, epoch: int) -> np.ndarray:
    order = self._orders.get(epoch)
    if order is None:
      order = np.random.default_rng([self.seed, _ORDER, epoch]).permutation(len(self.share))
      if len(self._orders) >= 2:
        self._orders.pop(min(self._orders))
      self._orders[epoch] = order
    return order

  def window_examples(self, index: int) -> pretrain.PackedExamples:
    """The packed, shuffled examples of the ``index``-th window of the stream."""
    if index in self._packed:
      self._packed.move_to_end(index)
      return self._packed[index]
    epoch, w = divmod(index, self.windows_per_epoch)
    positions = self._order(epoch)[w * self.window:(w + 1) * self.window]
    docs = self.share.documents(positions)
    tag = (self.seed, _WINDOW, epoch, w)
    packed = pretrain.pack_documents(docs, self.tokenizer, self.seq_len, tag)
    order = np.random.default_rng([*tag, _ORDER]).permutation(len(packed))
    packed = pretrain.PackedExamples(packed.input_ids[order], packed.token_type_ids[order],
                                     packed.lengths[order], packed.doc_index[order])
    self._packed[index] = packed
    while len(self._packed) > _KEEP:
      self._packed.popitem(last=False)
    return packed

  def _count_next(self) -> None:
    """Counts the first window whose count is not known yet."""
    index = len(self._counts)
    if index and index % self.windows_per_epoch == 0 and not sum(
        self._counts[index - self.windows_per_epoch:]):
      raise ValueError("the corpus produced no pretraining examples (a whole epoch of this "
                       "process's share holds no document of the split)")
    self._counts.append(len(self.window_examples(index)))
    self._starts.append(self._starts[-1] + self._counts[-1])
    if self._counts_path:
      os.makedirs(os.path.dirname(self._counts_path), exist_ok=True)
      fileio.atomic_write_text(self._counts_path, json.dumps(self._counts))

  def rows(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stream rows ``[first, first + count)``: (input_ids, token_type_ids, lengths)."""
    while self._starts[-1] < first + count:
      self._count_next()
    parts, row = [], first
    index = int(np.searchsorted(self._starts, first, side="right")) - 1
    while row < first + count:
      while self._starts[index + 1] <= row:  # windows with no example of the split
        index += 1
      packed = self.window_examples(index)
      lo = row - self._starts[index]
      hi = min(len(packed), lo + first + count - row)
      parts.append((packed.input_ids[lo:hi], packed.token_type_ids[lo:hi],
                    packed.lengths[lo:hi]))
      row += hi - lo
      index += 1
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))

  # ------------------------------------------------------------------------ batches

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's batch at ``step`` (the keys of :meth:`pretrain.PretrainInput.batch`)."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    ids, types, lengths = self.rows(step * self.batch_size, self.batch_size)
    return pretrain.masked_batch(ids, types, lengths, tokenizer=self.tokenizer,
                                 replacement_ids=self.replacement_ids, seed=self.seed,
                                 step=step, first_row=0, max_predictions=self.max_predictions,
                                 mask_rate=self.mask_rate)
