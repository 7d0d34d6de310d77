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
    super().__init__(tokenizer, seq_len, seed, max_predictions, mask_rate)
    self.share, self.batch_size, self.window = share, batch_size, window
    self.windows_per_epoch = math.ceil(len(share) / window)
    self._packed: collections.OrderedDict = collections.OrderedDict()
    self._counts_path = None
    # The first stream row of each window whose examples are counted (one more entry than
    # counted windows: the last is where the next window starts).
    self._starts = [0]
    if cache_dir:
      digest = hashlib.sha256(json.dumps(
          [key, tokenizer.backend.to_str(), seq_len, seed, window, len(share)]).encode())
      self._counts_path = os.path.join(cache_dir, f"stream-counts-{digest.hexdigest()[:20]}.json")
      kept = fileio.read_json(self._counts_path)  # None: missing or cut short
      if isinstance(kept, list):
        self._starts = [0] + np.cumsum([int(c) for c in kept]).tolist()

  # ------------------------------------------------------------------------ windows

  def window_examples(self, index: int) -> pretrain.PackedExamples:
    """The packed, shuffled examples of the ``index``-th window of the stream."""
    if index in self._packed:
      self._packed.move_to_end(index)
      return self._packed[index]
    epoch, w = divmod(index, self.windows_per_epoch)
    order = self.epoch_order(epoch, len(self.share), _ORDER)
    positions = order[w * self.window:(w + 1) * self.window]
    docs = self.share.documents(positions)
    tag = (self.seed, _WINDOW, epoch, w)
    packed = pretrain.pack_documents(docs, self.tokenizer, self.seq_len, tag)
    mix = np.random.default_rng([*tag, _ORDER]).permutation(len(packed))
    packed = pretrain.PackedExamples(packed.input_ids[mix], packed.token_type_ids[mix],
                                     packed.lengths[mix], packed.doc_index[mix])
    self._packed[index] = packed
    while len(self._packed) > _KEEP:
      self._packed.popitem(last=False)
    return packed

  def _count_next(self) -> None:
    """Counts the first window whose count is not known yet."""
    starts, index = self._starts, len(self._starts) - 1
    if index and index % self.windows_per_epoch == 0 and (
        starts[index] == starts[index - self.windows_per_epoch]):
      raise ValueError("the corpus produced no pretraining examples (a whole epoch of this "
                       "process's share holds no document of the split)")
    starts.append(starts[-1] + len(self.window_examples(index)))
    if self._counts_path:
      os.makedirs(os.path.dirname(self._counts_path), exist_ok=True)
      fileio.atomic_write_text(self._counts_path, json.dumps(np.diff(starts).tolist()))

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

  def step_rows(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    return self.rows(step * self.batch_size, self.batch_size) + (0,)
