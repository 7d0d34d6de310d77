"""Task registry: every GLUE / SuperGLUE / RACE config from TFDS mock data to model batches.

No network and no TensorFlow: records come from ``tfds.testing.mock_data`` read through
``tfds.data_source``; the tokenizer is a tiny fake with the ``encode_pair`` / ``pad_id``
protocol of ``data/tokenization.py``. Also covers the paper's casts on hand-made records,
grouping predictions back, shuffling / process shares, and the submission files.
"""

import json
import os
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bort_jax.finetune import metrics
from bort_jax.finetune import submission
from bort_jax.finetune import casts, tasks

CLS, SEP, PAD = 0, 2, 1
SEQ_LEN = 24
NUM_EXAMPLES = 5


class FakeTokenizer:
  """Words hashed into ids 5..94, ``[CLS] a [SEP] b [SEP]``, truncated to max_length."""

  pad_id = PAD

  def _words(self, text):
    return [5 + zlib.crc32(w.encode()) % 90 for w in text.split()]

  def encode_pair(self, a, b, max_length):
    a_ids = self._words(a)
    if b is None:
      ids = [CLS] + a_ids[:max_length - 2] + [SEP]
      return ids, [0] * len(ids)
    b_ids = self._words(b)
    a_ids = a_ids[:max(1, (max_length - 3) // 2)]
    b_ids = b_ids[:max_length - 3 - len(a_ids)]
    ids = [CLS] + a_ids + [SEP] + b_ids + [SEP]
    return ids, [0] * (len(a_ids) + 2) + [1] * (len(b_ids) + 1)


TOKENIZER = FakeTokenizer()
TFDS_TASKS = [n for n in tasks.task_names() if tasks.get_task(n).source is None]
TASK_SPLITS = [(n, s) for n in TFDS_TASKS for s in tasks.get_task(n).splits]


def _race_records(self, split, **kwargs):
  """Well-formed random RACE records (the generic mock draws ragged, letterless ones)."""
  del self, kwargs
  rng = np.random.default_rng(zlib.crc32(split.encode()))
  words = np.array(["the", "cat", "sat", "on", "a", "mat", "and", "read", "books"])
  out = []
  for i in range(NUM_EXAMPLES):
    n = int(rng.integers(1, 4))
    out.append({
        "article": " ".join(rng.choice(words, 30)).encode(),  # bytes, as array_record gives
        "questions": np.array([" ".join(rng.choice(words, 5)).encode() for _ in range(n)],
                              dtype=object),
        "answers": np.array([b"ABCD"[int(k):int(k) + 1] for k in rng.integers(0, 4, n)],
                            dtype=object),
        "options": np.array([[" ".join(rng.choice(words, 3)).encode() for _ in range(4)]
                             for _ in range(n)], dtype=object),
        "example_id": f"{split}/{i}.txt".encode(),
    })
  return out


def _mock(task_name):
  if task_name.startswith("race/"):
    return tfds.testing.mock_data(num_examples=NUM_EXAMPLES, as_data_source_fn=_race_records)
  return tfds.testing.mock_data(num_examples=NUM_EXAMPLES)


def _random_logits(spec, batch, rng):
  n = len(batch["weight"])
  if spec.kind == "regression":
    return rng.uniform(0, 5, size=n)
  return rng.normal(size=(n, spec.num_labels))


@pytest.mark.parametrize("name,split", TASK_SPLITS, ids=[f"{n}:{s}" for n, s in TASK_SPLITS])
def test_mock_data_to_model_batches(name, split):
  spec = tasks.get_task(name)
  with _mock(name):
    records = tasks.load_split(name, split)
    assert len(records) == NUM_EXAMPLES
    examples = tasks.cast_split(spec, records)
    batches = list(tasks.make_batches(name, records, TOKENIZER, SEQ_LEN, batch_size=4))
  assert examples and all(isinstance(e.text_a, str) and e.text_a for e in examples)
  if spec.kind in ("classification", "regression"):
    assert len(examples) == NUM_EXAMPLES
  assert len(batches) == -(-len(examples) // 4)
  per_row = (4, spec.num_labels, SEQ_LEN) if spec.kind == "multiple_choice" else (4, SEQ_LEN)
  seen = []
  for batch in batches:
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "label",
                          "example_id", "candidate", "weight"}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
      assert batch[key].shape == per_row and batch[key].dtype == np.int32
    for key in ("example_id", "candidate"):
      assert batch[key].shape == (4,) and batch[key].dtype == np.int32
    assert batch["weight"].dtype == np.float32
    real = batch["weight"] > 0
    ids, mask = batch["input_ids"], batch["attention_mask"]
    # Real rows start with [CLS], are padded with pad_id past the mask; padding rows are empty.
    assert (ids[real][..., 0] == CLS).all()
    assert ((ids == PAD) == (mask == 0)).all()
    assert (mask[~real] == 0).all() and (batch["example_id"][~real] == -1).all()
    assert ((batch["token_type_ids"] == 1) <= (mask == 1)).all()
    eid = batch["example_id"][real]
    assert ((0 <= eid) & (eid < NUM_EXAMPLES)).all()
    label = batch["label"][real]
    if spec.kind == "regression":
      assert batch["label"].dtype == np.float32 and np.isfinite(label).all()
    else:
      assert batch["label"].dtype == np.int32
      top = 2 if spec.kind == "candidates" else spec.num_labels
      assert ((-1 <= label) & (label < top)).all()
    seen += list(zip(eid.tolist(), batch["candidate"][real].tolist()))
  # Every example appears exactly once; only the final batch is padded.
  assert sorted(seen) == sorted((e.example_id, e.candidate) for e in examples)
  assert all(b["weight"].all() for b in batches[:-1])


@pytest.mark.parametrize("name", TFDS_TASKS)
def test_mock_predictions_score_and_group(name):
  """Batches -> random logits -> grouped predictions -> the task's metrics."""
  spec = tasks.get_task(name)
  split = spec.validation_splits[0] if spec.validation_splits else spec.test_splits[0]
  rng = np.random.default_rng(0)
  with _mock(name):
    records = tasks.load_split(name, split)
    batches = list(tasks.make_batches(name, records, TOKENIZER, SEQ_LEN, batch_size=3,
                                      shuffle_seed=1))
  outs = [(b["example_id"], b["candidate"], _random_logits(spec, b, rng), b["weight"])
          for b in batches]
  cols = [np.concatenate(c) for c in zip(*outs)]
  preds = tasks.gather_predictions(spec, records, *cols)
  n_units = len(tasks.cast_split(spec, records)) if name.startswith("race/") else len(records)
  assert len(preds.predictions) == len(preds.labels) == len(preds.record_index) == n_units
  if name == "super_glue/axg":
    # Mock idx values are random, so they do not form the minimal pairs AX-g is made of.
    with pytest.raises(ValueError, match="pairs"):
      metrics.compute_metrics(name, preds.predictions, preds.labels, preds.groups)
    return
  scores = metrics.compute_metrics(name, preds.predictions, preds.labels, preds.groups)
  assert set(scores) == set(spec.metrics)
  assert all(np.isnan(v) or -1.0 <= v <= 1.0 for v in scores.values())


def test_every_benchmark_task_is_registered():
  expected = {f"glue/{t}" for t in ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli",
                                    "mnli_matched", "mnli_mismatched", "qnli", "rte",
                                    "wnli", "ax")}
  expected |= {f"super_glue/{t}" for t in ("boolq", "cb", "copa", "multirc", "record",
                                           "rte", "wic", "wsc", "axb", "axg")}
  expected |= {"race/high", "race/middle"}
  assert expected <= set(tasks.task_names())
  assert tasks.get_task("glue/mnli").validation_splits == ("validation_matched",
                                                           "validation_mismatched")
  assert tasks.get_task("super_glue/wsc").builder == "super_glue/wsc.fixed"
  for diag in ("glue/ax", "super_glue/axb", "super_glue/axg"):
    spec = tasks.get_task(diag)
    assert spec.splits == ("test",) and spec.train_task is not None


def test_unknown_task_lists_known_names():
  with pytest.raises(ValueError, match="unknown task 'glue/nope'") as err:
    tasks.get_task("glue/nope")
  for known in ("glue/rte", "super_glue/record", "race/middle"):
    assert known in str(err.value)


def test_unknown_split_names_the_task_splits():
  with pytest.raises(ValueError, match="validation_matched"):
    tasks.load_split("glue/mnli", "validation")


def test_race_mock_with_ragged_records_gets_a_clear_error():
  # The generic mock draws unrelated lengths for questions / options / answers.
  with tfds.testing.mock_data(num_examples=2):
    records = tasks.load_split("race/high", "train")
    with pytest.raises(ValueError, match="RACE record"):
      tasks.cast_split("race/high", records)


def test_source_hook_and_registration():
  rows = [{"sentence": f"row {i} text", "label": i % 3} for i in range(7)]
  calls = []

  def source(split, data_dir):
    calls.append((split, data_dir))
    return rows

  spec = tasks.TaskSpec(name="test/local_three_way", builder=None, kind="classification",
                        num_labels=3, cast=casts.pair_cast("sentence"), source=source)
  tasks.register_task(spec, overwrite=True)
  with pytest.raises(ValueError, match="already registered"):
    tasks.register_task(spec)
  records = tasks.load_split("test/local_three_way", "validation", "/some/dir")
  assert calls == [("validation", "/some/dir")]
  batches = list(tasks.make_batches("test/local_three_way", records, TOKENIZER, 8, 4))
  assert [b["label"].tolist() for b in batches] == [[0, 1, 2, 0], [1, 2, 0, -1]]
  assert batches[1]["weight"].tolist() == [1, 1, 1, 0]
  with pytest.raises(ValueError, match="kind"):
    tasks.TaskSpec(name="bad", builder="x", kind="ranking", num_labels=2,
                   cast=casts.pair_cast("s"))
  with pytest.raises(ValueError, match="decode"):
    tasks.TaskSpec(name="bad", builder="x", kind="candidates", num_labels=2,
                   cast=casts.pair_cast("s"))


def test_shuffle_is_a_function_of_seed_and_epoch_and_processes_split_rows():
  rows = [{"sentence": f"s{i}", "label": 0} for i in range(10)]
  spec = tasks.get_task("glue/sst2")

  def order(seed, epoch, **kw):
    return [b["example_id"].tolist()
            for b in tasks.make_batches(spec, rows, TOKENIZER, 8, 4, seed, epoch, **kw)]

  assert order(3, 0) == order(3, 0)
  assert order(3, 0) != order(3, 1) and order(3, 0) != order(4, 0)
  assert sorted(sum(order(3, 1), [])) == [-1, -1] + list(range(10))
  assert order(None, 0)[0] == [0, 1, 2, 3]
  p0, p1 = order(3, 1, process_index=0, process_count=2), order(3, 1, process_index=1,
                                                                 process_count=2)
  assert [a + b for a, b in zip(p0, p1)] == order(3, 1)
  assert len(order(3, 1, drop_remainder=True)) == 2
  with pytest.raises(ValueError, match="split evenly"):
    order(3, 1, process_index=0, process_count=3)


# ----------------------------------------------------------------------------- the casts


def test_copa_cast_and_grouping():
  spec = tasks.get_task("super_glue/copa")
  record = {"premise": b"The man broke his toe.", "choice1": b"He dropped a hammer on his foot.",
            "choice2": b"He got a hole in his sock.", "question": b"cause",
            "label": np.array(0), "idx": np.array(3, np.int32)}
  examples = spec.cast(record)
  assert [e.text_a for e in examples] == [
      "The man broke his toe because He dropped a hammer on his foot.",
      "The man broke his toe because He got a hole in his sock."]
  assert [e.label for e in examples] == [1, 0] and examples[0].text_b is None
  effect = dict(record, question="effect", label=np.array(-1))
  assert " so " in spec.cast(effect)[0].text_a and spec.cast(effect)[1].label == -1
  # Rows arrive shuffled; the second choice has the larger log-odds.
  preds = tasks.gather_predictions(spec, [record], [0, 0], [1, 0],
                                   [[0.0, 2.0], [0.0, 1.0]])
  assert preds.predictions == [1] and preds.labels == [0]


def test_wsc_wic_multirc_casts():
  wsc = tasks.get_task("super_glue/wsc").cast(
      {"text": "Mark told Pete many lies about himself.", "span1_text": "Pete",
       "span2_text": "himself", "span1_index": 2, "span2_index": 6, "label": 0, "idx": 0})
  assert (wsc[0].text_a, wsc[0].text_b) == ("Mark told Pete many lies about himself.",
                                            "himself means Pete")
  wic = tasks.get_task("super_glue/wic").cast(
      {"word": b"bank", "sentence1": b"the river bank", "sentence2": b"the bank loan",
       "label": np.array(1)})
  assert wic[0].text_a.startswith("bank") and wic[0].text_b == "the bank loan"
  multirc = tasks.get_task("super_glue/multirc").cast(
      {"paragraph": "P.", "question": "Who?", "answer": "Ann", "label": 1,
       "idx": {"paragraph": 0, "question": 1, "answer": 2}})
  assert (multirc[0].text_a, multirc[0].text_b, multirc[0].label) == ("P.", "Who? Ann", 1)


def test_record_candidates_and_best_entity():
  spec = tasks.get_task("super_glue/record")
  record = {"passage": b"Obama met Merkel in Berlin.@highlight\nTalks went well",
            "query": b"@placeholder hosted the meeting",
            "entities": np.array([b"Berlin", b"Merkel", b"Obama"], dtype=object),
            "answers": np.array([b"Merkel"], dtype=object),
            "idx": {"passage": np.array(0), "query": np.array(9)}}
  examples = spec.cast(record)
  assert [e.text_b for e in examples] == ["Berlin hosted the meeting",
                                          "Merkel hosted the meeting",
                                          "Obama hosted the meeting"]
  assert [e.label for e in examples] == [0, 1, 0]
  assert "@highlight" not in examples[0].text_a
  unlabeled = dict(record, answers=np.array([], dtype=object))
  assert [e.label for e in spec.cast(unlabeled)] == [-1, -1, -1]
  preds = tasks.gather_predictions(spec, [record], [0, 0, 0, -1], [2, 0, 1, -1],
                                   [[1.0, 0.0], [0.0, 0.5], [0.0, 3.0], [0.0, 9.0]],
                                   weight=[1, 1, 1, 0])
  assert preds.predictions == ["Merkel"] and preds.labels == [["Merkel"]]
  assert metrics.compute_metrics("super_glue/record", preds.predictions, preds.labels) == {
      "token_f1": 1.0, "exact_match": 1.0}


def test_race_cast_and_multiple_choice_batch():
  spec = tasks.get_task("race/middle")
  record = {"article": b"Tom has a dog.", "questions": np.array([b"Who has a dog?",
                                                                b"What does Tom have?"]),
            "answers": np.array([b"B", b"D"]),
            "options": np.array([[b"Ann", b"Tom", b"Bob", b"Sue"],
                                 [b"a cat", b"a hat", b"a bat", b"a dog"]]),
            "example_id": b"middle1.txt"}
  examples = spec.cast(record)
  assert [e.label for e in examples] == [1, 3]
  assert examples[0].text_a == "Tom has a dog. Who has a dog?"
  assert examples[1].choices == ("a cat", "a hat", "a bat", "a dog")
  (batch,) = tasks.make_batches(spec, [record], TOKENIZER, 16, 2)
  assert batch["input_ids"].shape == (2, 4, 16) and batch["label"].tolist() == [1, 3]
  assert batch["candidate"].tolist() == [0, 1]
  bad = dict(record, answers=np.array([b"B", b"E"]))
  with pytest.raises(ValueError, match="answer 'E'"):
    spec.cast(bad)


def test_multirc_and_axg_groups():
  mrc = tasks.get_task("super_glue/multirc")
  recs = [{"paragraph": "p", "question": "q", "answer": "a", "label": y,
           "idx": {"paragraph": p, "question": q, "answer": a}}
          for p, q, a, y in [(0, 0, 0, 1), (0, 0, 1, 0), (0, 1, 0, 1), (1, 0, 0, 0)]]
  logits = [[0, 1], [0, -1], [0, -1], [0, -1]]  # predictions 1, 0, 0, 0
  preds = tasks.gather_predictions(mrc, recs, [0, 1, 2, 3], [0, 0, 0, 0], logits)
  assert preds.predictions == [1, 0, 0, 0] and preds.groups == [0, 0, 1, 2]
  got = metrics.compute_metrics("super_glue/multirc", preds.predictions, preds.labels,
                                preds.groups)
  # F1a: tp=1, fp=0, fn=1 -> 2/3; EM: questions (0,0) right, (0,1) wrong, (1,0) right -> 2/3.
  assert got == pytest.approx({"f1a": 2 / 3, "em": 2 / 3})
  axg = tasks.get_task("super_glue/axg")
  recs = [{"premise": "x", "hypothesis": "y", "label": 0, "idx": i} for i in (1, 0, 3, 2)]
  preds = tasks.gather_predictions(axg, recs, [0, 1, 2, 3], [0] * 4,
                                   [[1, 0], [1, 0], [0, 1], [1, 0]])
  assert preds.groups == [0, 0, 1, 1]
  got = metrics.compute_metrics("super_glue/axg", preds.predictions, preds.labels,
                                preds.groups)
  assert got == pytest.approx({"accuracy": 0.75, "gender_parity": 0.5})


def test_gather_reports_missing_outputs():
  spec = tasks.get_task("glue/rte")
  recs = [{"sentence1": "a", "sentence2": "b", "label": 0}] * 2
  with pytest.raises(ValueError, match="record 1"):
    tasks.gather_predictions(spec, recs, [0], [0], [[0.0, 1.0]])


def test_text_normalisation():
  assert casts.as_text(b"caf\xc3\xa9") == "café"
  assert casts.as_text(np.array("x")) == "x"
  assert casts.as_texts(np.array([b"a", b"b"], dtype=object)) == ["a", "b"]
  assert casts.as_texts(np.array(["a", "b"])) == ["a", "b"]
  with pytest.raises(TypeError, match="text value"):
    casts.as_text(3)


# ----------------------------------------------------------------------------- submissions


def _read_tsv(path):
  with open(path) as f:
    return [line.rstrip("\n").split("\t") for line in f]


def test_glue_submission_files(tmp_path):
  cases = {
      ("glue/mnli", "test_matched"): ("MNLI-m.tsv", [0, 1, 2], ["entailment", "neutral",
                                                                "contradiction"]),
      ("glue/mnli", "test_mismatched"): ("MNLI-mm.tsv", [2, 2, 0], ["contradiction"] * 2 +
                                         ["entailment"]),
      ("glue/ax", "test"): ("AX.tsv", [1, 0, 2], ["neutral", "entailment", "contradiction"]),
      ("glue/rte", "test"): ("RTE.tsv", [1, 0, 1], ["not_entailment", "entailment",
                                                    "not_entailment"]),
      ("glue/qnli", "test"): ("QNLI.tsv", [0, 0, 1], ["entailment", "entailment",
                                                      "not_entailment"]),
      ("glue/cola", "test"): ("CoLA.tsv", [1, 0, 1], ["1", "0", "1"]),
      ("glue/sst2", "test"): ("SST-2.tsv", [0, 1, 1], ["0", "1", "1"]),
      ("glue/mrpc", "test"): ("MRPC.tsv", [1, 1, 0], ["1", "1", "0"]),
      ("glue/qqp", "test"): ("QQP.tsv", [0, 1, 0], ["0", "1", "0"]),
      ("glue/wnli", "test"): ("WNLI.tsv", [1, 0, 0], ["1", "0", "0"]),
      ("glue/stsb", "test"): ("STS-B.tsv", [3.14159, -0.5, 7.0], ["3.142", "0.000", "5.000"]),
      ("glue/mnli_matched", "test"): ("MNLI-m.tsv", [0, 0, 0], ["entailment"] * 3),
  }
  for (name, split), (file_name, preds, expected) in cases.items():
    # Records arrive out of idx order; the file is sorted by idx.
    records = [{"idx": np.array(i, np.int32)} for i in (5, 1, 3)]
    path = submission.write_submission(name, records, preds, str(tmp_path / name), split)
    assert os.path.basename(path) == file_name
    rows = _read_tsv(path)
    assert rows[0] == ["index", "prediction"]
    by_index = dict(rows[1:])
    assert [r[0] for r in rows[1:]] == ["1", "3", "5"]
    assert [by_index[str(i)] for i in (5, 1, 3)] == expected
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path / name))


def test_superglue_submission_files(tmp_path):
  simple = {
      "super_glue/boolq": ("BoolQ.jsonl", [1, 0], ["true", "false"]),
      "super_glue/wic": ("WiC.jsonl", [0, 1], ["false", "true"]),
      "super_glue/wsc": ("WSC.jsonl", [1, 0], ["True", "False"]),
      "super_glue/cb": ("CB.jsonl", [2, 1], ["neutral", "contradiction"]),
      "super_glue/rte": ("RTE.jsonl", [0, 1], ["entailment", "not_entailment"]),
      "super_glue/axb": ("AX-b.jsonl", [1, 1], ["not_entailment"] * 2),
      "super_glue/axg": ("AX-g.jsonl", [0, 1], ["entailment", "not_entailment"]),
      "super_glue/copa": ("COPA.jsonl", [1, 0], [1, 0]),
  }
  for name, (file_name, preds, expected) in simple.items():
    records = [{"idx": np.array(7)}, {"idx": np.array(2)}]
    path = submission.write_submission(name, records, preds, str(tmp_path))
    assert os.path.basename(path) == file_name
    with open(path) as f:
      rows = [json.loads(line) for line in f]
    assert rows == [{"idx": 2, "label": expected[1]}, {"idx": 7, "label": expected[0]}]

  records = [{"idx": {"passage": np.array(0), "query": np.array(q)}} for q in (4, 1)]
  path = submission.write_submission("super_glue/record", records, ["Merkel", "Berlin"],
                                     str(tmp_path))
  with open(path) as f:
    assert [json.loads(line) for line in f] == [{"idx": 1, "label": "Berlin"},
                                                {"idx": 4, "label": "Merkel"}]

  keys = [(1, 0, 0), (0, 1, 1), (0, 0, 0), (0, 1, 0), (0, 0, 1)]
  records = [{"idx": {"paragraph": p, "question": q, "answer": a}} for p, q, a in keys]
  path = submission.write_submission("super_glue/multirc", records, [1, 0, 1, 1, 0],
                                     str(tmp_path))
  assert os.path.basename(path) == "MultiRC.jsonl"
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  assert rows == [
      {"idx": 0, "passage": {"questions": [
          {"idx": 0, "answers": [{"idx": 0, "label": 1}, {"idx": 1, "label": 0}]},
          {"idx": 1, "answers": [{"idx": 0, "label": 1}, {"idx": 1, "label": 0}]}]}},
      {"idx": 1, "passage": {"questions": [{"idx": 0, "answers": [{"idx": 0, "label": 1}]}]}},
  ]


def test_submission_from_mock_test_split(tmp_path):
  with tfds.testing.mock_data(num_examples=4):
    records = tasks.load_split("super_glue/cb", "test")
    path = submission.write_submission("super_glue/cb", records, [0, 1, 2, 0], str(tmp_path))
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 4 and {r["label"] for r in rows} <= {"entailment", "contradiction",
                                                           "neutral"}


def test_submission_errors(tmp_path):
  with pytest.raises(ValueError, match="no leaderboard file"):
    submission.submission_file_name("race/high")
  with pytest.raises(ValueError, match="not a class id"):
    submission.write_submission("glue/rte", [{"idx": 0}], [2], str(tmp_path))
  with pytest.raises(ValueError, match="1 predictions for 2 records"):
    submission.write_submission("glue/rte", [{"idx": 0}, {"idx": 1}], [0], str(tmp_path))
  assert not os.path.exists(tmp_path / "RTE.tsv")
