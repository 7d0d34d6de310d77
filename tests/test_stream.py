"""Streamed pretraining input (data/stream.py): every token once per epoch, batches a function of
(seed, step), a resume that finds its place again, at most two windows held, shares by process,
and distillation reading a streamed TFDS corpus end to end."""

import collections
import os
import sys

import jax
import numpy as np
import pytest

from bort_jax.data import pretrain, stream, tokenization
from bort_jax.pipelines import distill, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_corpus_sources import assets, by_name  # noqa: E402,F401  (the tiny TFDS corpus)
from test_distill import DOCUMENTS, make_config, write_vocab  # noqa: E402

TEXTS = ["\n".join(lines) for lines in DOCUMENTS] * 3  # 24 documents


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  folder = tmp_path_factory.mktemp("stream_tok")
  write_vocab(str(folder / "vocab.txt"))
  return tokenization.load_tokenizer(str(folder), "bert")


class Reads:
  """A share's ``text_of`` that counts the records read."""

  def __init__(self, keep=lambda text: True):
    self.count, self.keep = 0, keep

  def __call__(self, record):
    self.count += 1
    return record if self.keep(record) else None


def make(tokenizer, reads=None, **extra):
  share = stream.DocumentShare(TEXTS, range(len(TEXTS)), reads or Reads())
  kwargs = dict(seq_len=24, batch_size=4, seed=7, window=5) | extra
  return stream.StreamedInput(share, tokenizer, **kwargs)


def _content(tokenizer, ids):
  return collections.Counter(int(t) for t in np.asarray(ids).reshape(-1)
                             if t not in tokenizer.special_ids)


def test_one_epoch_holds_every_token_once(tokenizer):
  inputs = make(tokenizer)
  for _ in range(inputs.windows_per_epoch):
    inputs._count_next()  # pylint: disable=protected-access
  epoch_rows = inputs._starts[-1]  # pylint: disable=protected-access
  ids, _, lengths = inputs.rows(0, epoch_rows)
  assert (lengths > 0).all()
  want = collections.Counter()
  for text in TEXTS:
    want += _content(tokenizer, [t for line in text.split("\n")
                                 for t in tokenizer.encode_many([line])[0]])
  assert _content(tokenizer, ids) == want
  # The next epoch visits the records in another order.
  again, _, _ = inputs.rows(epoch_rows, epoch_rows)
  assert _content(tokenizer, again) == want and not np.array_equal(again, ids)


def test_a_resumed_stream_gives_the_batches_of_an_uninterrupted_one(tokenizer, tmp_path):
  steps = 14  # more than one epoch of 24 documents at 4 rows a step
  straight = make(tokenizer)
  batches = [straight.batch(s) for s in range(steps)]
  assert len(straight._packed) <= 2  # pylint: disable=protected-access
  resumed = make(tokenizer)
  for s in reversed(range(steps)):
    got = resumed.batch(s)
    for key, value in batches[s].items():
      np.testing.assert_array_equal(got[key], value, err_msg=f"{key} at step {s}")
  assert batches[0]["input_ids"].shape == (4, 24)
  assert batches[0]["masked_positions"].shape == (4, pretrain.default_max_predictions(24))
  # Another seed, another stream.
  assert not np.array_equal(make(tokenizer, seed=8).batch(0)["input_ids"],
                            batches[0]["input_ids"])
  # With cache_dir the counts are kept: a resume at step 13 reads only the windows it serves.
  first = make(tokenizer, cache_dir=str(tmp_path))
  first.batch(steps - 1)
  reads = Reads()
  later = make(tokenizer, reads, cache_dir=str(tmp_path))
  np.testing.assert_array_equal(later.batch(steps - 1)["input_ids"],
                                batches[steps - 1]["input_ids"])
  assert reads.count <= 2 * 5  # at most the two windows of its rows, of 5 records each
  # A counts file cut short by a kill is counted again, not trusted.
  (path,) = [p for p in tmp_path.iterdir() if p.name.startswith("stream-counts-")]
  path.write_text(path.read_text()[:-3])
  np.testing.assert_array_equal(make(tokenizer, cache_dir=str(tmp_path)).batch(steps - 1)[
      "input_ids"], batches[steps - 1]["input_ids"])


def test_a_split_with_no_document_is_an_error(tokenizer):
  with pytest.raises(ValueError, match="no pretraining examples"):
    make(tokenizer, Reads(keep=lambda text: False)).batch(0)
  with pytest.raises(ValueError, match="holds no records"):
    stream.StreamedInput(stream.DocumentShare([], [], Reads()), tokenizer, 24, 4)


def test_processes_stream_disjoint_shares_of_a_tfds_corpus(assets, monkeypatch):  # pylint: disable=redefined-outer-name
  config = make_config(assets, **by_name(assets, **{"data.stream_window": 2,
                                                    "data.validation_fraction": 0.0}))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  shares = []
  for index in range(2):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    inputs, _ = setup.make_input(config.data, "bert", 5)
    assert isinstance(inputs, stream.StreamedInput)
    assert inputs.batch_size == config.data.global_batch_size // 2
    assert inputs.seed == 5 * 65536 + index
    shares.append(list(inputs.share.indices))
    assert inputs.batch(3)["input_ids"].shape == (inputs.batch_size, config.data.seq_len)
  assert sorted(shares[0] + shares[1]) == list(range(len(DOCUMENTS)))
  assert shares[0] == list(range(0, len(DOCUMENTS), 2))


def test_distillation_streams_a_tfds_corpus_and_text_files(assets, tmp_path):  # pylint: disable=redefined-outer-name
  for name, extra in (("tfds", by_name(assets)), ("files", {"data.cache_dir": ""})):
    config = make_config(assets, **extra, **{"data.stream_window": 3,
                                             "train.total_steps": 4, "train.eval_every": 0})
    inputs, _ = setup.make_input(config.data, "bert", config.seed)
    assert isinstance(inputs, stream.StreamedInput), name
    result = distill.run(config, str(tmp_path / name))
    assert result["step"] == 4 and os.path.isdir(result["export"]), name


def test_streaming_off_keeps_the_demo_cache_keys_of_configs_without_the_field():
  from bort_jax.pipelines import demo_cache  # pylint: disable=import-outside-toplevel
  config = make_config({"teacher": "T", "tokenizer": "K", "corpus": "C/x.txt",
                        "data_dir": "D"})  # paths only written into the config, never read
  assert config.data.stream_window == 0
  text = demo_cache.config_text(config, "/cache")
  without = config.copy_and_resolve_references()
  del without.data["stream_window"]
  assert demo_cache.config_text(without, "/cache") == text
  config.data.stream_window = 64
  assert demo_cache.config_text(config, "/cache") != text
