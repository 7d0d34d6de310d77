"""Masked-LM pretraining batches: pack documents once, mask dynamically per step.

Pipeline:
1. :func:`pack_documents` tokenises every document once (the library's parallel batch encoder)
   and cuts it into segment pairs that fill ``seq_len``: a document's lines are laid end to end
   and cut into chunks of the sequence's content length (a line that does not fit continues in
   the next chunk), and each chunk is cut into segments A and B at a random line boundary
   (inside the line when the chunk holds part of one line). No token is dropped: a long
   document becomes several examples, a one-token document a single segment; examples never
   cross documents.
   The result (numpy arrays) can be cached on disk.
2. :class:`PretrainInput` serves ``batch(step)`` by random access: the global batch of a step is
   rows ``[step * B, (step + 1) * B)`` of an endless stream that concatenates one permutation of
   the examples per epoch (permutation seeded by (seed, epoch)). Process ``p`` of ``n`` takes
   rows ``[p * B / n, (p + 1) * B / n)`` of it.
3. Masking (BERT's recipe) is drawn per row from a generator seeded by (seed, step, global row),
   that is by (seed, step, process, local row): 15% of the non-special tokens (at least one, at
   most ``max_predictions``), of which 80% become the mask id, 10% a random non-special token
   and 10% stay. Seeding by the global row rather than the process alone makes the global batch
   identical for any process count, so resuming on another topology sees the same data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Iterator, Sequence

import numpy as np

from bort_jax.data import corpus as corpus_lib
from bort_jax.data.tokenization import Tokenizer

# Stream tags keep the generators of different purposes apart for the same seed.
_PACK, _ORDER, _MASK = 3, 2, 1
_CACHE_FORMAT = 1


@dataclasses.dataclass
class PackedExamples:
  """Pre-tokenised segment pairs.

  Attributes:
    input_ids: int32 [N, T], the family's template applied, padded with the pad id.
    token_type_ids: int32 [N, T].
    lengths: int32 [N], real tokens per row.
    doc_index: int32 [N], the document each row came from (in document order).
  """
  input_ids: np.ndarray
  token_type_ids: np.ndarray
  lengths: np.ndarray
  doc_index: np.ndarray

  def __len__(self) -> int:
    return len(self.lengths)


def default_max_predictions(seq_len: int) -> int:
  """The paper's 80 predictions per 512 tokens, scaled to ``seq_len`` (at least 1)."""
  return max(1, int(round(seq_len * 80 / 512)))


def _chunks(lines: list[list[int]], max_content: int) -> Iterator[list[list[int]]]:
  """Chunks of exactly ``max_content`` tokens (the last may be shorter), as lists of pieces.

  A line that does not fit the room left is split and continues in the next chunk: filling
  every sequence wastes no compute on padding (line-boundary packing left ~22% padding on
  real text), and the model step costs the same whatever the fill.
  """
  chunk, size = [], 0
  for line in lines:
    start = 0
    while start < len(line):
      piece = line[start:start + max_content - size]
      chunk.append(piece)
      size += len(piece)
      start += len(piece)
      if size == max_content:
        yield chunk
        chunk, size = [], 0
  if chunk:
    yield chunk


def pack_documents(docs: Sequence[str], tokenizer: Tokenizer, seq_len: int,
                   seed: int | Sequence[int] = 0) -> PackedExamples:
  """Tokenises documents and cuts them into segment pairs of at most ``seq_len`` tokens.

  Args:
    docs: document texts, lines separated by "\\n".
    tokenizer: the family's tokenizer (fixes the specials and the pair template).
    seq_len: sequence length T, specials included.
    seed: seeds where each chunk is cut into A and B (an int, or a sequence of ints: a
      streamed window's (seed, epoch, window)).

  Returns:
    :class:`PackedExamples`.
  """
  max_content = seq_len - tokenizer.num_special_pair
  if max_content < 2:
    raise ValueError(f"seq_len={seq_len} leaves no room for a segment pair "
                     f"({tokenizer.num_special_pair} special tokens)")
  doc_lines = [[ln for ln in d.split("\n") if ln.strip()] for d in docs]
  flat = [ln for lines in doc_lines for ln in lines]
  flat_ids = tokenizer.encode_many(flat) if flat else []
  rng = np.random.default_rng([*np.atleast_1d(np.asarray(seed, np.int64)).tolist(), _PACK])

  rows, types, lengths, doc_index = [], [], [], []
  offset = 0
  for d, lines in enumerate(doc_lines):
    ids = [x for x in flat_ids[offset:offset + len(lines)] if x]
    offset += len(lines)
    for chunk in _chunks(ids, max_content):
      if len(chunk) >= 2:
        # Cut at a line boundary, as BERT does, so that A and B end on sentence breaks.
        cut = int(rng.integers(1, len(chunk)))
        a = [t for piece in chunk[:cut] for t in piece]
        b = [t for piece in chunk[cut:] for t in piece]
      elif len(chunk[0]) >= 2:
        cut = int(rng.integers(1, len(chunk[0])))
        a, b = chunk[0][:cut], chunk[0][cut:]
      else:
        a, b = chunk[0], None  # A one-token document: a single segment.
      row, tt = tokenizer.build_inputs(a, b)
      rows.append(row)
      types.append(tt)
      lengths.append(len(row))
      doc_index.append(d)

  n = len(rows)
  input_ids = np.full((n, seq_len), tokenizer.pad_id, np.int32)
  token_type_ids = np.zeros((n, seq_len), np.int32)
  for i, (row, tt) in enumerate(zip(rows, types)):
    input_ids[i, :len(row)] = row
    token_type_ids[i, :len(tt)] = tt
  return PackedExamples(input_ids, token_type_ids, np.asarray(lengths, np.int32).reshape(n),
                        np.asarray(doc_index, np.int32).reshape(n))


def _cache_key(docs: Sequence[str], tokenizer: Tokenizer, seq_len: int, seed: int) -> str:
  h = hashlib.sha256(f"{_CACHE_FORMAT}\0{seq_len}\0{seed}\0".encode())
  h.update(tokenizer.backend.to_str().encode())
  for d in docs:
    h.update(hashlib.sha256(d.encode("utf-8")).digest())
  return h.hexdigest()[:20]


def load_or_pack(docs: Sequence[str], tokenizer: Tokenizer, seq_len: int, seed: int = 0,
                 cache_dir: str | None = None) -> PackedExamples:
  """:func:`pack_documents` with an optional on-disk cache keyed by inputs and settings.

  Args:
    docs, tokenizer, seq_len, seed: as for :func:`pack_documents`.
    cache_dir: folder for ``packed-<key>.npz`` files, or None for no cache.

  Returns:
    :class:`PackedExamples`.
  """
  if cache_dir is None:
    return pack_documents(docs, tokenizer, seq_len, seed)
  path = os.path.join(cache_dir, f"packed-{_cache_key(docs, tokenizer, seq_len, seed)}.npz")
  if os.path.exists(path):
    with np.load(path) as z:
      return PackedExamples(**{f.name: z[f.name] for f in dataclasses.fields(PackedExamples)})
  packed = pack_documents(docs, tokenizer, seq_len, seed)
  os.makedirs(cache_dir, exist_ok=True)
  # Written under a temporary name and renamed, so a killed run never leaves a partial cache.
  tmp = f"{path}.tmp-{os.getpid()}.npz"
  np.savez(tmp, **dataclasses.asdict(packed))
  os.replace(tmp, path)
  return packed


def mask_row(rng: np.random.Generator, ids: np.ndarray, candidates: np.ndarray,
             replacement_ids: np.ndarray, mask_id: int, max_predictions: int,
             rate: float = 0.15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Chooses and corrupts the predictions of one sequence (BERT's 80/10/10 recipe).

  Args:
    rng: this row's generator.
    ids: int32 [T] token ids; not modified.
    candidates: int [C] positions that may be masked (real, non-special tokens).
    replacement_ids: ids a "random token" is drawn from (the non-special vocabulary).
    mask_id: the mask token id.
    max_predictions: cap on the number of predictions.
    rate: share of candidates to predict.

  Returns:
    (corrupted ids [T], sorted positions [k], original labels [k]).
  """
  k = min(max_predictions, max(1, int(len(candidates) * rate + 0.5))) if len(candidates) else 0
  positions = np.sort(rng.choice(candidates, size=k, replace=False)) if k else candidates[:0]
  labels = ids[positions]
  out = ids.copy()
  u = rng.random(k)
  random_tokens = replacement_ids[rng.integers(0, len(replacement_ids), size=k)]
  out[positions] = np.where(u < 0.8, mask_id, np.where(u < 0.9, random_tokens, labels))
  return out, positions, labels


def masked_batch(ids: np.ndarray, token_type_ids: np.ndarray, lengths: np.ndarray, *,
                 tokenizer: Tokenizer, replacement_ids: np.ndarray, seed: int, step: int,
                 first_row: int, max_predictions: int, mask_rate: float
                 ) -> dict[str, np.ndarray]:
  """Packed rows made a masked-LM batch: row ``r`` masked by a generator seeded by (seed,
  step, ``first_row + r``), BERT's recipe (:func:`mask_row`).

  Args:
    ids, token_type_ids: int32 [B, T] packed rows; lengths: int32 [B] real tokens per row.
    first_row: the global index of the first row (this process's offset in the global batch).

  Returns:
    ``input_ids, attention_mask, token_type_ids`` [B, T], ``masked_positions,
    masked_labels`` [B, P] (int32) and ``masked_weights`` [B, P] (float32).
  """
  seq_len = ids.shape[1]
  attention = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int32)
  maskable = (attention == 1) & ~np.isin(ids, tokenizer.special_ids)
  b, p = len(ids), max_predictions
  positions = np.zeros((b, p), np.int32)
  labels = np.full((b, p), tokenizer.pad_id, np.int32)
  weights = np.zeros((b, p), np.float32)
  out = np.empty_like(ids)
  for r in range(b):
    rng = np.random.default_rng([seed, _MASK, step, first_row + r])
    out[r], pos, lab = mask_row(rng, ids[r], np.flatnonzero(maskable[r]), replacement_ids,
                                tokenizer.mask_id, p, mask_rate)
    positions[r, :len(pos)] = pos
    labels[r, :len(pos)] = lab
    weights[r, :len(pos)] = 1.0
  return dict(input_ids=out, attention_mask=attention, token_type_ids=token_type_ids,
              masked_positions=positions, masked_labels=labels, masked_weights=weights)


class BatchStream:
  """Masked-LM batches by step, random access: what every pretraining input shares (the
  masking settings, the orders of the epochs, the masking of a step's rows); a subclass gives
  :meth:`step_rows`, the packed rows of a step."""

  def __init__(self, tokenizer: Tokenizer, seq_len: int, seed: int,
               max_predictions: int | None, mask_rate: float):
    if not 0.0 < mask_rate < 1.0:
      raise ValueError(f"mask_rate must be in (0, 1), got {mask_rate}")
    self.tokenizer = tokenizer
    self.seq_len = seq_len
    self.seed = seed
    self.max_predictions = max_predictions or default_max_predictions(seq_len)
    self.mask_rate = mask_rate
    self.replacement_ids = np.setdiff1d(np.arange(tokenizer.vocab_size, dtype=np.int32),
                                        tokenizer.special_ids)
    self._orders: dict[int, np.ndarray] = {}

  def epoch_order(self, epoch: int, count: int, tag: int) -> np.ndarray:
    """A permutation of ``count`` items for ``epoch``, seeded by (seed, tag, epoch); the last
    two epochs' are kept (a step's rows straddle at most two epochs)."""
    order = self._orders.get(epoch)
    if order is None:
      order = np.random.default_rng([self.seed, tag, epoch]).permutation(count)
      if len(self._orders) >= 2:
        self._orders.pop(min(self._orders))
      self._orders[epoch] = order
    return order

  def step_rows(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(input_ids, token_type_ids, lengths) of this process's rows at ``step``, and the
    global index of its first row (what seeds its masking)."""
    raise NotImplementedError

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's share of the global batch at ``step``.

    Args:
      step: training step (>= 0).

    Returns:
      dict with int32 ``input_ids, attention_mask, token_type_ids`` [B_local, T],
      int32 ``masked_positions, masked_labels`` [B_local, P], float32 ``masked_weights``
      [B_local, P].
    """
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    ids, types, lengths, first_row = self.step_rows(step)
    return masked_batch(ids, types, lengths, tokenizer=self.tokenizer,
                        replacement_ids=self.replacement_ids, seed=self.seed, step=step,
                        first_row=first_row, max_predictions=self.max_predictions,
                        mask_rate=self.mask_rate)

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches from ``start_step`` on, endlessly (resume = start at the restored step)."""
    step = start_step
    while True:
      yield self.batch(step)
      step += 1

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self.iterate(0)


class PretrainInput(BatchStream):
  """Masked-LM batches for one process, random access by step.

  Args:
    source: a corpus split (a data source from ``corpus.build_corpus``) or a sequence of
      document strings; or ready :class:`PackedExamples`.
    tokenizer: the family's :class:`~bort_jax.data.tokenization.Tokenizer`.
    seq_len: sequence length T.
    global_batch_size: rows per step over all processes.
    seed: the run's data seed.
    process_index, process_count: this process and how many read the global batch.
    max_predictions: predictions per row P (default: 80 per 512 tokens, scaled).
    mask_rate: share of non-special tokens predicted.
    cache_dir: where to cache the packed examples (None: pack in memory only).
  """

  def __init__(self, source, tokenizer: Tokenizer, seq_len: int, global_batch_size: int,
               seed: int = 0, process_index: int = 0, process_count: int = 1,
               max_predictions: int | None = None, mask_rate: float = 0.15,
               cache_dir: str | None = None):
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                       f"process_count={process_count}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    if isinstance(source, dict):
      raise ValueError(f"PretrainInput takes one split, not the dict of splits {sorted(source)};"
                       " pass e.g. sources['train']")
    super().__init__(tokenizer, seq_len, seed, max_predictions, mask_rate)
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.process_index = process_index
    self.process_count = process_count
    if isinstance(source, PackedExamples):
      self.examples = source
    else:
      self.examples = load_or_pack(corpus_lib.documents(source), tokenizer, seq_len, seed,
                                   cache_dir)
    if self.examples.input_ids.shape[1:] != (seq_len,):
      raise ValueError(f"packed examples have length {self.examples.input_ids.shape[1:]}, "
                       f"expected ({seq_len},)")
    if len(self.examples) == 0:
      raise ValueError("the corpus produced no pretraining examples")

  @property
  def num_examples(self) -> int:
    return len(self.examples)

  @property
  def steps_per_epoch(self) -> float:
    return self.num_examples / self.global_batch_size

  def example_indices(self, step: int) -> np.ndarray:
    """Indices into the packed examples of this process's rows at ``step``."""
    first = step * self.global_batch_size + self.process_index * self.local_batch_size
    stream = np.arange(first, first + self.local_batch_size, dtype=np.int64)
    epochs, within = np.divmod(stream, self.num_examples)
    return np.array([self.epoch_order(int(e), self.num_examples, _ORDER)[i]
                     for e, i in zip(epochs, within)], np.int64)

  def step_rows(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    rows = self.example_indices(step)
    return (self.examples.input_ids[rows], self.examples.token_type_ids[rows],
            self.examples.lengths[rows], self.process_index * self.local_batch_size)
