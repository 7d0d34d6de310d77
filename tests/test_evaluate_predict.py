"""``bort-jax evaluate`` and ``bort-jax predict`` on a tiny fine-tuned checkpoint.

The checkpoint is written directly (random weights with a binary head, saved the way
``bort-jax finetune`` saves ``WORKDIR/best``): what is tested is the plumbing from files to
metrics, submission files and probabilities, checked against the model run directly.
"""

import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bort_jax.core import arch as arch_lib
from bort_jax.core import model
from bort_jax.data import tokenization
from bort_jax.finetune import evaluate, loop, predict, steps, tasks

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SEQ_LEN = 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A BERT-family D1-A2-H32-I64 model with a 2-class head 'fine-tuned' on glue/rte."""
  root = str(tmp_path_factory.mktemp("eval_assets"))
  letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
  tokens = SPECIALS + letters + ["##" + c for c in letters] + ["good", "bad", "film"]
  tok_dir = os.path.join(root, "tok")
  os.makedirs(tok_dir)
  with open(os.path.join(tok_dir, "vocab.txt"), "w") as f:
    f.write("\n".join(tokens) + "\n")
  cfg = arch_lib.get_model_config("D1-A2-H32-I64", family="bert", vocab_size=len(tokens),
                                  max_positions=64, pad_id=0)
  head = steps.task_head("classification", 2).resolve(cfg.family)
  params = model.init(jax.random.key(5), cfg, head)
  path = os.path.join(root, "best")
  loop.save_finetuned(path, params, cfg, loop.head_meta(tasks.get_task("glue/rte"), SEQ_LEN,
                                                        head), tok_dir)
  return {"path": path, "params": params, "config": cfg, "head": head}


def test_evaluate_dev_split_and_test_submission(checkpoint, tmp_path):
  with tfds.testing.mock_data(num_examples=6):
    dev = evaluate.run(checkpoint["path"], out=str(tmp_path / "m.json"))
    test = evaluate.run(checkpoint["path"], split="test",
                        submission_dir=str(tmp_path / "sub"))
  assert dev["task"] == "glue/rte" and dev["split"] == "validation" and dev["units"] == 6
  assert set(dev["metrics"]) == {"accuracy"} and 0.0 <= dev["metrics"]["accuracy"] <= 1.0
  assert json.load(open(tmp_path / "m.json")) == json.loads(json.dumps(dev))
  lines = open(tmp_path / "sub" / "RTE.tsv").read().splitlines()
  assert lines[0] == "index\tprediction" and len(lines) == 7
  assert {l.split("\t")[1] for l in lines[1:]} <= {"entailment", "not_entailment"}
  assert test["metrics"] == {} or set(test["metrics"]) == {"accuracy"}


def _direct_probs(checkpoint, a, b=None):
  tok = tokenization.load_tokenizer(os.path.join(checkpoint["path"], "tokenizer"), "bert")
  ids, types = tok.encode_pair(a, b, SEQ_LEN)
  pad = SEQ_LEN - len(ids)
  batch = {"input_ids": np.array([list(ids) + [0] * pad], np.int32),
           "attention_mask": np.array([[1] * len(ids) + [0] * pad], np.int32),
           "token_type_ids": np.array([list(types) + [0] * pad], np.int32)}
  logits = model.apply(checkpoint["params"], checkpoint["config"], batch,
                       head=checkpoint["head"])["logits"][0]
  return np.asarray(jax.nn.softmax(logits))


def test_predict_texts_and_files_match_the_model(checkpoint, tmp_path, capsys):
  code = predict.main(["--checkpoint", checkpoint["path"], "--text", "good film",
                       "--text-b", "bad", "--text", "a bad film", "--text-b", "good"])
  rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
  assert code == 0 and len(rows) == 2
  for row, (a, b) in zip(rows, [("good film", "bad"), ("a bad film", "good")]):
    want = _direct_probs(checkpoint, a, b)
    np.testing.assert_allclose(row["probabilities"], want, atol=1e-5)
    assert row["label"] == ("entailment", "not_entailment")[int(np.argmax(want))]
  (tmp_path / "in.jsonl").write_text('{"text": "good film", "text_b": "bad"}\n')
  (tmp_path / "in.tsv").write_text("good film\tbad\n")
  for name in ("in.jsonl", "in.tsv"):
    out = tmp_path / (name + ".out")
    assert predict.main(["--checkpoint", checkpoint["path"], "--input", str(tmp_path / name),
                         "--output", str(out)]) == 0
    got = [json.loads(l) for l in open(out)]
    assert got[0]["probabilities"] == rows[0]["probabilities"]


@pytest.mark.parametrize("args,want", [
    (["--task", "glue/mnli", "--text", "x"], "needs a classification head with 3"),
    (["--task", "glue/rtee", "--text", "x"], "Did you mean 'glue/rte'"),
    ([], "either as --text"),
    (["--input", "/nonexistent.jsonl"], "is not a file"),
])
def test_predict_and_evaluate_bad_input_exit_2(checkpoint, capsys, monkeypatch, args, want):
  monkeypatch.setattr(loop, "compile_steps", lambda *a, **k: pytest.fail("compiled"))
  assert predict.main(["--checkpoint", checkpoint["path"]] + args) == 2
  err = capsys.readouterr().err.strip()
  assert want in err and "\n" not in err


def test_evaluate_unknown_split_exits_2(checkpoint, capsys):
  assert evaluate.main(["--checkpoint", checkpoint["path"], "--split", "dev"]) == 2
  err = capsys.readouterr().err.strip()
  assert "--split 'dev' is not a split of 'glue/rte'" in err and "\n" not in err


def test_hugging_face_checkpoint_with_its_head(checkpoint, tmp_path):
  """A BertForSequenceClassification (3 labels) directory: its head and layout are kept."""
  from bort_jax.finetune import setup
  from bort_jax.interop import convert
  cfg = checkpoint["config"]
  head = model.HeadSpec("classification", 3, "bert")
  params = model.init(jax.random.key(9), cfg, head)
  hf_dir = str(tmp_path / "hf")
  convert.save_hf(params, cfg, hf_dir, head=head)
  loaded = setup.load_model(hf_dir)
  assert loaded.kind == "hf" and loaded.head.layout == "bert" and loaded.head.outputs == 3
  kept, layout = setup.fit_head(loaded, tasks.get_task("glue/mnli"))
  assert layout == "bert" and "classifier" in kept
  with pytest.raises(setup.InputError, match="has a classification head with 3 output"):
    setup.fit_head(loaded, tasks.get_task("glue/rte"))
  fresh, layout = setup.fit_head(loaded, tasks.get_task("glue/rte"), reset_head=True)
  assert layout is None and "classifier" not in fresh
  with tfds.testing.mock_data(num_examples=4):
    result = evaluate.run(hf_dir, task="glue/mnli", split="validation_matched",
                          tokenizer=os.path.join(checkpoint["path"], "tokenizer"),
                          seq_len=SEQ_LEN)
  assert result["units"] == 4 and set(result["metrics"]) == {"accuracy"}


def test_random_init_keeps_only_the_shape(checkpoint):
  """``init_kind=random``: the checkpoint's config, fresh weights from the seed (the baseline)."""
  from bort_jax.finetune import setup
  loaded = setup.load_model(checkpoint["path"], "random", seed=1)
  assert loaded.params is None and loaded.head is None and loaded.config == checkpoint["config"]
  head = steps.task_head("classification", 2).resolve(loaded.config.family)
  a = setup.init_params(loaded.config, head, 1)
  b = setup.init_params(loaded.config, head, 1)
  c = setup.init_params(loaded.config, head, 2)
  emb = lambda p: np.asarray(p["embeddings"]["word_embeddings"]["embedding"])
  np.testing.assert_array_equal(emb(a), emb(b))
  assert not np.allclose(emb(a), emb(c))
  assert not np.allclose(emb(a), emb(checkpoint["params"]))
  with pytest.raises(setup.InputError, match="not one of"):
    setup.load_model(checkpoint["path"], "orbax")
