"""``bort-jax convert --to-hf``: weights, tokenizer files, model card, permissions, errors.

A tiny fine-tuned checkpoint is written the way ``bort-jax finetune`` writes ``WORKDIR/best``
(random weights, a 2-class head on glue/sst2, its WordPiece tokenizer beside it); a tiny Bort
(byte-level BPE) masked LM is written the way distillation writes its export, with the
tokenizer recorded only in the run's ``config.json``. The ``parity`` test loads the export with
transformers' ``AutoTokenizer`` and ``AutoModelForSequenceClassification`` and compares with
``bort-jax predict``; it is skipped where torch and transformers are not installed.
"""

import json
import os
import stat

import jax
import numpy as np
import pytest
import tokenizers

from bort_jax import main as cli_main
from bort_jax.core import arch as arch_lib
from bort_jax.core import cost, model
from bort_jax.data import tokenization
from bort_jax.finetune import setup, steps, tasks
from bort_jax.interop import convert, export, hf_export, hf_files

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["a", "gripping", ",", "funny", "film", "dull", "and", "slow", "the", "plot", "is",
         "##s", "!", "."]
SENTENCES = ["A gripping, funny film!", "Dull and slow.", "the plot is dull",
             "films funny gripping plots"]
SEQ_LEN = 16
BPE_VOCAB = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "h": 4, "e": 5, "l": 6, "o": 7,
             "Ġ": 8, "w": 9, "r": 10, "d": 11, "he": 12, "ll": 13, "hell": 14, "hello": 15,
             "Ġw": 16, "or": 17, "ld": 18, "<mask>": 19}
BPE_MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"),
              ("l", "d")]
# Byte-level texts inside the toy vocabulary (a real one holds every byte).
BPE_TEXTS = ["hello world", "hello", "world hello world"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("hf_export"))
  tok_dir = os.path.join(root, "tok")
  os.makedirs(tok_dir)
  with open(os.path.join(tok_dir, "vocab.txt"), "w") as f:
    f.write("\n".join(SPECIALS + WORDS) + "\n")
  cfg = arch_lib.get_model_config("D1-A2-H32-I64", family="bert", vocab_size=24,
                                  max_positions=64, pad_id=0)
  head = steps.task_head("classification", 2).resolve(cfg.family)
  params = model.init(jax.random.key(3), cfg, head)
  path = os.path.join(root, "best")
  meta = dict(setup.head_meta(tasks.get_task("glue/sst2"), SEQ_LEN, head), metric="accuracy",
              value=0.75, step=40)
  setup.save_finetuned(path, params, cfg, meta, tok_dir)
  return {"root": root, "path": path, "config": cfg, "head": head, "params": params,
          "tokenizer": tok_dir}


def _convert(ckpt, out, *extra):
  return cli_main.main(["convert", "--to-hf", ckpt, "--out", out, *extra])


def test_finetuned_export_has_tokenizer_card_and_normal_modes(finetuned, tmp_path, capsys):
  out = str(tmp_path / "hf")
  old = os.umask(0o022)
  try:
    assert _convert(finetuned["path"], out) == 0
  finally:
    os.umask(old)
  assert "tokenizer from" in capsys.readouterr().out
  names = sorted(os.listdir(out))
  assert names == sorted(["config.json", "model.safetensors", "README.md", "tokenizer.json",
                          "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"])
  for name in names:
    assert stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode) == 0o644, name
  assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
  hf_config = hf_files.read_hf_config(out)
  assert hf_config["architectures"] == ["BertForSequenceClassification"]
  assert hf_config["id2label"] == {"0": "negative", "1": "positive"}
  # The weights and head come back as they were.
  cfg, params, head = convert.load_hf_with_head(out)
  assert cfg == finetuned["config"] and head == finetuned["head"]
  for (p, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(params),
                            jax.tree_util.tree_leaves_with_path(finetuned["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(p))
  # The tokenizers package alone gives the ids (and token types) we feed the model.
  ours = tokenization.load_tokenizer(finetuned["tokenizer"], "bert")
  theirs = tokenizers.Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
  for text in SENTENCES:
    encoding = theirs.encode(text)
    assert (encoding.ids, encoding.type_ids) == ours.encode_pair(text, None, 64)
  pair = theirs.encode(SENTENCES[0], SENTENCES[1])
  assert (pair.ids, pair.type_ids) == ours.encode_pair(SENTENCES[0], SENTENCES[1], 64)
  with open(os.path.join(out, "tokenizer_config.json")) as f:
    tok_config = json.load(f)
  assert tok_config["tokenizer_class"] == "BertTokenizer" and tok_config["do_lower_case"]
  assert tok_config["model_max_length"] == 64
  # The card: architecture, the exact count, how it was trained; no speed without a source.
  card = (tmp_path / "hf" / "README.md").read_text()
  total = cost.param_counts(finetuned["config"], finetuned["head"])["total"]
  assert f"{total:,} in total" in card and f"model.safetensors`: {total:,}" in card
  assert "`D1-A2-H32-I64`" in card and "pipeline_tag: text-classification" in card
  assert "Fine-tuned on `glue/sst2`; best dev accuracy 0.75 at step 40" in card
  assert "0 `negative`, 1 `positive`" in card
  assert "Not measured for this export" in card and "license:" not in card


def test_predict_from_the_export_matches_the_checkpoint(finetuned, tmp_path, capsys):
  out = str(tmp_path / "hf")
  assert _convert(finetuned["path"], out) == 0
  rows = {}
  for name, ckpt, extra in (("ours", finetuned["path"], []),
                            ("hf", out, ["--task", "glue/sst2", "--seq-len", str(SEQ_LEN)])):
    argv = ["predict", "--checkpoint", ckpt, *extra]
    for text in SENTENCES:
      argv += ["--text", text]
    capsys.readouterr()
    assert cli_main.main(argv) == 0
    rows[name] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["label"] for r in rows["ours"]] == [r["label"] for r in rows["hf"]]
  np.testing.assert_allclose([r["probabilities"] for r in rows["ours"]],
                             [r["probabilities"] for r in rows["hf"]], atol=2e-6)


def _tiny_bort(tmp_path_factory, name):
  """A folder with a byte-level BPE tokenizer in it and the tiny Bort shape these tests use."""
  root = str(tmp_path_factory.mktemp(name))
  tok_dir = os.path.join(root, "bpe")
  tokenization.save_bpe_files(BPE_VOCAB, BPE_MERGES, tok_dir)
  cfg = arch_lib.get_model_config("D1-A2-H32-I64", family="bort", vocab_size=24,
                                  max_positions=64)
  return root, tok_dir, cfg


@pytest.fixture(scope="module")
def bort_mlm(tmp_path_factory):
  """A Bort masked LM exported the way distillation exports, tokenizer recorded in config.json."""
  root, tok_dir, cfg = _tiny_bort(tmp_path_factory, "hf_export_bort")
  params = model.init(jax.random.key(4), cfg, model.HeadSpec("mlm"))
  run = os.path.join(root, "distill")
  export.save(os.path.join(run, "export"), params, cfg)
  with open(os.path.join(run, "config.json"), "w") as f:
    json.dump({"data": {"tokenizer": tok_dir}, "train": {"total_steps": 7},
               "teacher": {"path": "/somewhere/teacher"}}, f)
  with open(os.path.join(run, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 7, "loss": 2.5}) + "\n")
  return {"export": os.path.join(run, "export"), "config": cfg, "tokenizer": tok_dir,
          "root": root}


def test_bort_export_finds_the_recorded_tokenizer(bort_mlm, tmp_path):
  out = str(tmp_path / "hf")
  speed = tmp_path / "speed.json"
  speed.write_text(json.dumps([{"name": "student", "latency_ms": 1.25, "latency_iqr_ms": 0.5,
                                "device": "cpu"}]))
  results = tmp_path / "results.json"
  results.write_text(json.dumps({"demo/movie_sentiment": {"accuracy": {"mean": 0.8125}}}))
  assert _convert(bort_mlm["export"], out, "--speed", str(speed), "--results",
                  str(results)) == 0
  assert {"vocab.json", "merges.txt", "tokenizer.json", "README.md"} <= set(os.listdir(out))
  with open(os.path.join(out, "tokenizer_config.json")) as f:
    assert json.load(f)["tokenizer_class"] == "RobertaTokenizer"
  ours = tokenization.load_tokenizer(bort_mlm["tokenizer"], "bort")
  theirs = tokenizers.Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
  for text in BPE_TEXTS:
    assert theirs.encode(text).ids == ours.encode_pair(text, None, 64)[0]
  assert theirs.encode(*BPE_TEXTS[:2]).ids == ours.encode_pair(*BPE_TEXTS[:2], 64)[0]
  card = (tmp_path / "hf" / "README.md").read_text()
  assert "| student | 1.25 | 0.5 | cpu |" in card and "From `speed.json`" in card
  assert "| demo/movie_sentiment.accuracy.mean | 0.8125 |" in card
  assert "`train.total_steps`: 7" in card and "`teacher.path`: somewhere/teacher" in card
  assert "loss 2.5" in card and "pipeline_tag: fill-mask" in card
  total = cost.param_counts(bort_mlm["config"], "mlm")["total"]
  assert f"{total:,} in total" in card


def test_recorded_license_goes_on_the_card(bort_mlm, tmp_path):
  tok = tmp_path / "tok"
  tokenization.save_bpe_files(BPE_VOCAB, BPE_MERGES, str(tok))
  (tok / "README.md").write_text("---\nlanguage: en\nlicense: apache-2.0\n---\n# A model\n")
  assert _convert(bort_mlm["export"], str(tmp_path / "hf"), "--tokenizer", str(tok)) == 0
  card = (tmp_path / "hf" / "README.md").read_text()
  assert "license: apache-2.0" in card and "`apache-2.0` (recorded with the base model)" in card


def test_no_tokenizer_recorded_still_exports_and_says_so(bort_mlm, tmp_path, capsys):
  bare = str(tmp_path / "bare")
  cfg, params = export.load(bort_mlm["export"])
  export.save(bare, params, cfg)
  assert _convert(bare, str(tmp_path / "hf")) == 0
  assert "no tokenizer recorded" in capsys.readouterr().out
  assert "tokenizer.json" not in os.listdir(tmp_path / "hf")
  assert "No tokenizer was recorded" in (tmp_path / "hf" / "README.md").read_text()


@pytest.mark.parametrize("extra, want", [
    (["--tokenizer", "{root}"], "is not a directory with tokenizer files"),
    (["--tokenizer", "{bpe}"], "family 'bert' expects a wordpiece vocabulary"),
    (["--speed", "{bad_json}"], "--speed '{bad_json}' is not JSON"),
    (["--speed", "{no_numbers}"], "holds no measured latency"),
    (["--results", "{root}/missing.json"], "is not a file"),
])
def test_bad_input_exits_2_and_writes_nothing(finetuned, bort_mlm, tmp_path, capsys, extra,
                                              want):
  (tmp_path / "bad.json").write_text("{not json")
  (tmp_path / "none.json").write_text(json.dumps({"name": "x", "device": "cpu"}))
  names = {"root": str(tmp_path), "bpe": bort_mlm["tokenizer"],
           "bad_json": str(tmp_path / "bad.json"), "no_numbers": str(tmp_path / "none.json")}
  out = str(tmp_path / "hf")
  assert _convert(finetuned["path"], out, *[e.format(**names) for e in extra]) == 2
  err = capsys.readouterr().err.strip()
  assert want.format(**names) in err and "\n" not in err
  assert not os.path.exists(out)


def test_card_flags_belong_to_to_hf(finetuned, tmp_path, capsys):
  assert cli_main.main(["convert", "--from-hf", finetuned["path"], "--out",
                        str(tmp_path / "x"), "--speed", "s.json"]) == 2
  assert "--speed is a flag of --to-hf" in capsys.readouterr().err


def test_tokenizer_with_more_ids_than_the_model_is_refused(finetuned, tmp_path, capsys):
  big = tmp_path / "big"
  big.mkdir()
  (big / "vocab.txt").write_text("\n".join(SPECIALS + [f"w{i}" for i in range(40)]) + "\n")
  assert _convert(finetuned["path"], str(tmp_path / "hf"), "--tokenizer", str(big)) == 2
  assert "45 ids but the model's vocabulary has 24 rows" in capsys.readouterr().err


@pytest.mark.parity
def test_transformers_loads_the_export_in_one_line(finetuned, tmp_path, capsys):
  """AutoTokenizer + AutoModelForSequenceClassification give `bort-jax predict`'s answers."""
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  out = str(tmp_path / "hf")
  assert _convert(finetuned["path"], out) == 0
  argv = ["predict", "--checkpoint", finetuned["path"]]
  for text in SENTENCES:
    argv += ["--text", text]
  capsys.readouterr()
  assert cli_main.main(argv) == 0
  ours = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  ours_tok = tokenization.load_tokenizer(finetuned["tokenizer"], "bert")
  for text, row in zip(SENTENCES, ours):
    encoded = tokenizer(text, return_tensors="pt")
    assert encoded["input_ids"][0].tolist() == ours_tok.encode_pair(text, None, SEQ_LEN)[0]
    with torch.no_grad():
      logits = hf_model(**encoded).logits[0].double()
    probs = torch.softmax(logits, -1).numpy()
    label = hf_model.config.id2label[int(probs.argmax())]
    assert label == row["label"]
    np.testing.assert_allclose(probs, row["probabilities"], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# What transformers' classes can hold: the pooler of a masked LM, Bort's default head


@pytest.fixture(scope="module")
def bert_mlm(tmp_path_factory):
  """A BERT masked LM with a pooler (the BERT default), in our export format."""
  path = str(tmp_path_factory.mktemp("hf_export_mlm") / "export")
  cfg = arch_lib.get_model_config("D1-A2-H32-I64", family="bert", vocab_size=24,
                                  max_positions=64)
  params = model.init(jax.random.key(5), cfg, model.HeadSpec("mlm"))
  assert cfg.pooler and "pooler" in params
  export.save(path, params, cfg)
  return {"path": path, "config": cfg, "params": params}


def _tensor_names(folder):
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with safe_open(os.path.join(folder, "model.safetensors"), framework="numpy") as f:
    return sorted(f.keys())


def test_mlm_export_leaves_the_pooler_out(bert_mlm, tmp_path):
  """BertForMaskedLM has no pooler: writing one made transformers report unexpected keys."""
  out = str(tmp_path / "hf")
  assert _convert(bert_mlm["path"], out) == 0
  names = _tensor_names(out)
  assert "cls.predictions.bias" in names
  assert not [n for n in names if "pooler" in n]
  hf_config = hf_files.read_hf_config(out)
  assert hf_config["architectures"] == ["BertForMaskedLM"]
  assert hf_config["bort_jax"]["pooler"] is False
  config, params = convert.load_hf(out)
  assert config == bert_mlm["config"].replace(pooler=False)
  want = {k: v for k, v in bert_mlm["params"].items() if k != "pooler"}
  assert jax.tree.all(jax.tree.map(np.array_equal, params, want))
  with open(os.path.join(out, "README.md"), encoding="utf-8") as f:
    card = f.read()  # it counts what was written: no pooler
  total = cost.param_counts(config, model.HeadSpec("mlm"))["total"]
  assert f"{total:,} in total" in card


@pytest.mark.parity
def test_mlm_export_loads_in_transformers_without_a_report(bert_mlm, tmp_path, capfd):
  """AutoModelForMaskedLM loads the export with nothing unexpected or missing, and silently."""
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  out = str(tmp_path / "hf")
  assert _convert(bert_mlm["path"], out) == 0
  capfd.readouterr()
  hf_model, info = transformers.AutoModelForMaskedLM.from_pretrained(out,
                                                                     output_loading_info=True)
  printed = capfd.readouterr()
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  for word in ("UNEXPECTED", "MISSING", "pooler"):
    assert word not in printed.out + printed.err, printed
  ids = np.array([[2, 7, 9, 11, 3, 0]], np.int32)
  mask = np.array([[1, 1, 1, 1, 1, 0]], np.int32)
  ours = model.apply(bert_mlm["params"], bert_mlm["config"],
                     {"input_ids": ids, "attention_mask": mask,
                      "token_type_ids": np.zeros_like(ids)}, head=model.HeadSpec("mlm"))["logits"]
  with torch.no_grad():
    theirs = hf_model.eval()(input_ids=torch.from_numpy(ids.astype(np.int64)),
                             attention_mask=torch.from_numpy(mask.astype(np.int64))).logits
  np.testing.assert_allclose(theirs.numpy()[0, :5], np.asarray(ours)[0, :5], atol=1e-4)


@pytest.fixture(scope="module")
def bort_classifier(tmp_path_factory):
  """A Bort fine-tuned with its default head (RoBERTa layout: dense + out_proj)."""
  root, tok_dir, cfg = _tiny_bort(tmp_path_factory, "hf_export_bort_cls")
  head = steps.task_head("classification", 2).resolve(cfg.family)
  assert head.layout == "roberta"
  params = model.init(jax.random.key(6), cfg, head)
  params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(7), x.shape),
                        params)  # biases away from zero
  path = os.path.join(root, "best")
  setup.save_finetuned(path, params, cfg, setup.head_meta(tasks.get_task("glue/sst2"), SEQ_LEN,
                                                        head), tok_dir)
  return {"path": path, "config": cfg, "head": head, "params": params}


def _bort_logits(params, config, head):
  ids = np.array([[0, 15, 16, 17, 18, 2], [0, 14, 2, 1, 1, 1]], np.int32)
  mask = (ids != config.pad_id).astype(np.int32)
  out = model.apply(params, config, {"input_ids": ids, "attention_mask": mask}, head=head)
  return ids, mask, np.asarray(out["logits"])


def test_bort_default_head_survives_both_ways(bort_classifier, tmp_path):
  """--to-hf writes the RoBERTa-layout head as BertForSequenceClassification's pooler and
  classifier; --from-hf gives back the same params and head."""
  hf, again = str(tmp_path / "hf"), str(tmp_path / "again")
  assert _convert(bort_classifier["path"], hf) == 0
  hf_config = hf_files.read_hf_config(hf)
  assert hf_config["architectures"] == ["BertForSequenceClassification"]
  names = _tensor_names(hf)
  assert {"bert.pooler.dense.weight", "classifier.weight", "classifier.bias"} <= set(names)
  assert not [n for n in names if "out_proj" in n or "classifier.dense" in n]
  assert cli_main.main(["convert", "--from-hf", hf, "--out", again]) == 0
  config, params = export.load(again)
  assert config == bort_classifier["config"]
  assert jax.tree.all(jax.tree.map(np.array_equal, params, bort_classifier["params"]))
  with open(os.path.join(again, export.FINETUNE_FILE)) as f:
    head, names = hf_export.finetuned_head(json.load(f), again)
  assert head == bort_classifier["head"] and names == ("negative", "positive")


@pytest.mark.parity
def test_bort_default_head_export_matches_transformers(bort_classifier, tmp_path):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  out = str(tmp_path / "hf")
  assert _convert(bort_classifier["path"], out) == 0
  hf_model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      out, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  ids, mask, ours = _bort_logits(bort_classifier["params"], bort_classifier["config"],
                                 bort_classifier["head"])
  assert float(np.std(ours)) > 1e-2
  with torch.no_grad():
    theirs = hf_model.eval()(input_ids=torch.from_numpy(ids.astype(np.int64)),
                             attention_mask=torch.from_numpy(mask.astype(np.int64))).logits
  np.testing.assert_allclose(theirs.numpy(), ours, atol=1e-4)
