"""``bort-jax evaluate`` and ``bort-jax predict`` on a tiny fine-tuned checkpoint.

The checkpoint is written directly (random weights with a binary head, saved the way
``bort-jax finetune`` saves ``WORKDIR/best``): what is tested is the plumbing from files to
metrics, submission files and probabilities, checked against the model run directly.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bort_jax import main as cli_main
from bort_jax.core import arch as arch_lib
from bort_jax.core import model
from bort_jax.data import tokenization
from bort_jax.finetune import compiled as compiled_lib
from bort_jax.finetune import evaluate, setup, steps, tasks
from bort_jax.interop import export

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
  setup.save_finetuned(path, params, cfg, setup.head_meta(tasks.get_task("glue/rte"), SEQ_LEN,
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
  code = cli_main.main(["predict", "--checkpoint", checkpoint["path"], "--text", "good film",
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
    assert cli_main.main(["predict", "--checkpoint", checkpoint["path"], "--input",
                          str(tmp_path / name), "--output", str(out)]) == 0
    got = [json.loads(l) for l in open(out)]
    assert got[0]["probabilities"] == rows[0]["probabilities"]


@pytest.mark.parametrize("args,want", [
    (["--task", "glue/mnli", "--text", "x"], "needs a classification head with 3"),
    (["--task", "glue/rtee", "--text", "x"], "Did you mean 'glue/rte'"),
    ([], "either as --text"),
    (["--input", "/nonexistent.jsonl"], "is not a file"),
])
def test_predict_and_evaluate_bad_input_exit_2(checkpoint, capsys, monkeypatch, args, want):
  monkeypatch.setattr(compiled_lib, "compile_steps", lambda *a, **k: pytest.fail("compiled"))
  assert cli_main.main(["predict", "--checkpoint", checkpoint["path"]] + args) == 2
  err = capsys.readouterr().err.strip()
  assert want in err and "\n" not in err and err.startswith("bort-jax predict: ")


def test_evaluate_unknown_split_exits_2(checkpoint, capsys):
  assert cli_main.main(["evaluate", "--checkpoint", checkpoint["path"], "--split", "dev"]) == 2
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


@pytest.fixture(scope="module")
def bad_checkpoints(checkpoint, tmp_path_factory):
  """Folders that are not a usable fine-tuned checkpoint, each failing one check."""
  root = tmp_path_factory.mktemp("bad_checkpoints")
  (root / "empty").mkdir()
  (root / "unreadable").mkdir()
  (root / "unreadable" / export.MODEL_CONFIG_FILE).write_text("{not json")
  for name in ("unknown_task", "no_tokenizer"):
    shutil.copytree(checkpoint["path"], root / name)
  meta = json.loads((root / "unknown_task" / "finetune.json").read_text())
  (root / "unknown_task" / "finetune.json").write_text(json.dumps({**meta, "task": "glue/rtee"}))
  shutil.rmtree(root / "no_tokenizer" / "tokenizer")
  pretrained = {k: v for k, v in checkpoint["params"].items() if k != "classifier"}
  export.save(str(root / "pretrained"), jax.device_get(pretrained), checkpoint["config"])
  return {name: str(root / name) for name in ("empty", "unreadable", "unknown_task",
                                              "no_tokenizer", "pretrained")}


# (case, the checkpoint (a bad_checkpoints name, or None: the good one), further flags, what
# the message must say, CKPT standing for the --checkpoint value). Each names the flag the user
# typed, never the finetune config field.
FLAG_CASES = [
    ("missing-folder", "/nonexistent/ckpt", [],
     "--checkpoint '/nonexistent/ckpt' is not a directory"),
    ("empty-flag", "", [], "--checkpoint is empty"),
    ("not-a-checkpoint", "empty", [], "--checkpoint 'CKPT' holds neither model_config.json"),
    ("unreadable", "unreadable", [], "--checkpoint 'CKPT' cannot be read as a params checkpoint"),
    ("not-fine-tuned", "pretrained", [], "--checkpoint 'CKPT' has no task head: fine-tune it"),
    ("unknown-task", None, ["--task", "glue/rtee"],
     "--task 'glue/rtee' is not a known task. Did you mean 'glue/rte'"),
    ("unknown-recorded-task", "unknown_task", [],
     "the task recorded in --checkpoint 'CKPT', 'glue/rtee', is not a known task (pass --task)."),
    ("head-does-not-fit", None, ["--task", "glue/mnli"],
     "--checkpoint 'CKPT' (fine-tuned on 'glue/rte') has a classification head with 2 output(s)"),
    ("no-tokenizer-files", "/nonexistent/tok", None,
     "in '/nonexistent/tok': set --tokenizer to the directory holding them"),
    ("no-tokenizer-beside", "no_tokenizer", [], "in 'CKPT': set --tokenizer to the directory"),
]


CONFIG_FIELDS = ("config.init", "config.task", "config.tokenizer")


@pytest.mark.parametrize("mode", ["predict", "evaluate"])
@pytest.mark.parametrize("case, which, flags, want", FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_checkpoint_errors_name_the_flags(checkpoint, bad_checkpoints, capsys, monkeypatch,
                                          tmp_path, mode, case, which, flags, want):
  monkeypatch.setattr(compiled_lib, "compile_steps", lambda *a, **k: pytest.fail("compiled"))
  path = checkpoint["path"] if which is None else bad_checkpoints.get(which, which)
  if flags is None:  # the value is a --tokenizer folder
    path, flags = checkpoint["path"], ["--tokenizer", which]
  out = tmp_path / "out"
  extra = (["--text", "x", "--output", str(out)] if mode == "predict" else
           ["--out", str(out)])
  assert cli_main.main([mode, "--checkpoint", path] + flags + extra) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"bort-jax {mode}: ") and err.count("\n") == 1, err
  assert want.replace("CKPT", path) in err, err  # the flag and the value the user gave
  assert not any(field in err for field in CONFIG_FIELDS) and "Traceback" not in err
  assert not out.exists()


def test_finetune_overrides_keep_the_config_field_name(tmp_path, capsys):
  """Where the user typed --config.init.path, the message names that field."""
  argv = ["finetune", f"--workdir={tmp_path / 'run'}", "--config.task=glue/rte",
          "--config.init.path=/nonexistent/ckpt"]
  assert cli_main.main(argv) == 2
  err = capsys.readouterr().err
  assert "config.init.path='/nonexistent/ckpt' is not a directory" in err
  assert "--checkpoint" not in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", ["predict", "evaluate"])
def test_inference_modes_use_the_one_flag_system(checkpoint, capsys, mode):
  """Unknown flags, bad values and a missing --checkpoint: status 2 and one paragraph, like
  every other mode; --debug adds the traceback."""
  for argv, want in (([mode, "--checkpoint", checkpoint["path"], "--seq-lenn", "8"],
                      "unrecognized arguments: --seq-lenn 8 (`bort-jax "
                      f"{mode} --help` lists the flags)"),
                     ([mode, "--checkpoint", checkpoint["path"], "--seq-len", "x"],
                      f"argument --seq-len: invalid int value: 'x' (`bort-jax {mode} --help` "
                      "lists the flags)"),
                     ([mode], "the following arguments are required: --checkpoint (`bort-jax "
                               f"{mode} --help` lists the flags)")):
    assert cli_main.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"bort-jax {mode}: {want}\n"
  texts = ["--text", "x"] if mode == "predict" else []
  assert cli_main.main([mode, "--debug", "--checkpoint", "/nonexistent/ckpt"] + texts) == 2
  err = capsys.readouterr().err
  assert "Traceback" in err and err.endswith(
      f"bort-jax {mode}: --checkpoint '/nonexistent/ckpt' is not a directory (a checkpoint "
      "directory: our export, a `bort-jax finetune` WORKDIR/best, or a Hugging Face one).\n")
