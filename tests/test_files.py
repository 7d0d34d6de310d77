"""Your own data as a task (data/files.py): reading, layouts, errors, and the CLI end to end."""

import json
import os
import sys

import numpy as np
import pytest

from bort_jax import main as cli_main
from bort_jax.data import files
from bort_jax.finetune import tasks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_finetune import tiny  # noqa: E402,F401  (the tiny model and tokenizer fixture)


def _write(path, text, mode="w"):
  with open(path, mode) as f:
    f.write(text)
  return str(path)


def _csv(tmp_path, name, rows, header="sentence,label"):
  return _write(tmp_path / name, header + "\n" + "".join(r + "\n" for r in rows))


def _jsonl(tmp_path, name, rows):
  return _write(tmp_path / name, "".join(json.dumps(r) + "\n" for r in rows))


def test_csv_classification_with_string_labels(tmp_path):
  train = _csv(tmp_path, "train.csv", ['"fine, and good",pos', "awful,neg", "nice,pos"])
  dev = _csv(tmp_path, "dev.csv", ["bad,neg", "great,pos"])
  spec = files.register(f"file:{train}", {"validation": dev})
  assert (spec.kind, spec.num_labels, spec.label_names) == ("classification", 2, ("neg", "pos"))
  assert spec.metrics == ("accuracy", "macro_f1")
  records = tasks.load_split(spec, "train")
  assert records[0] == {"text_a": "fine, and good", "text_b": None, "choices": None, "label": 1}
  assert [r["label"] for r in tasks.load_split(spec, "validation")] == [0, 1]
  assert files.settings(spec.name)["validation"] == dev


def test_integer_labels_keep_numeric_order_and_pairs_take_sentence2(tmp_path):
  rows = [{"sentence1": f"a{i}", "sentence2": f"b{i}", "label": lab}
          for i, lab in enumerate([10, 2, 2, 10, 0])]
  spec = files.register(f"file:{_jsonl(tmp_path, 'train.jsonl', rows)}")
  assert spec.label_names == ("0", "2", "10")
  examples = tasks.cast_split(spec, tasks.load_split(spec, "train")
                              + tasks.load_split(spec, "validation"))
  assert {e.text_b for e in examples} <= {f"b{i}" for i in range(5)}
  assert all(e.text_b is not None for e in examples)


def test_regression_and_multiple_choice(tmp_path):
  reg_train = _csv(tmp_path, "r.csv", ["a,0.5", "b,1.25", "c,3"], header="text,score")
  reg = files.register(f"file:{reg_train}", {"label": "score", "held_out": 0.5})
  assert (reg.kind, reg.num_labels) == ("regression", 1)
  assert reg.metrics == ("pearson", "spearman", "mse")
  labels = [r["label"] for s in ("train", "validation") for r in tasks.load_split(reg, s)]
  assert sorted(labels) == [0.5, 1.25, 3.0]
  mc_train = _jsonl(tmp_path, "mc.jsonl",
                    [{"question": "q1", "options": ["x", "y", "z"], "label": 2},
                     {"question": "q2", "options": ["u", "v", "w"], "label": 0}])
  mc_dev = _jsonl(tmp_path, "mcdev.jsonl",
                  [{"question": "q3", "options": ["a", "b", "c"], "label": 1}])
  mc = files.register(f"file:{mc_train}", {"choices": "options", "validation": mc_dev})
  assert (mc.kind, mc.num_labels) == ("multiple_choice", 3)
  assert tasks.load_split(mc, "train")[0]["choices"] == ("x", "y", "z")


def test_the_held_out_share_is_a_function_of_the_row(tmp_path):
  rows = [f"text number {i},{'ab'[i % 2]}" for i in range(400)]
  spec = files.register(f"file:{_csv(tmp_path, 'a.csv', rows)}")
  dev = {r["text_a"] for r in tasks.load_split(spec, "validation")}
  assert 20 <= len(dev) <= 60  # about 10% of 400
  shuffled = _csv(tmp_path, "b.csv", list(reversed(rows)))
  again = files.register(f"file:{shuffled}")
  assert {r["text_a"] for r in tasks.load_split(again, "validation")} == dev
  assert not dev & {r["text_a"] for r in tasks.load_split(spec, "train")}


@pytest.mark.parametrize("case, want", [
    ("missing-column", "no column 'review' for the text (config.files); the file has "
                       "sentence, label"),
    ("no-text-column", "no text column (looked for text, sentence, sentence1, question); the "
                       "file has words, label"),
    ("empty", "the file holds no rows"),
    ("unseen-label", "dev.csv line 3: the label 'meh' never occurs in the training file"),
    ("not-utf8", "train.csv line 3: byte"),
    ("ragged", "train.csv line 3: 3 fields, the header has 2 (sentence, label)"),
    ("regression-not-a-number", "train.csv line 3: the label 'high' is not a number"),
    ("choices-count", "mc.jsonl line 2: 2 choices, the training file's rows have 3"),
    ("one-class", "holds one class only ('pos')"),
    ("format", "the file name must end in .csv"),
])
def test_bad_files_name_the_file_and_the_row(tmp_path, case, want):
  good = ["good,pos", "bad,neg", "fine,pos"]
  block = {}
  if case == "missing-column":
    train, block = _csv(tmp_path, "train.csv", good), {"text": "review"}
  elif case == "no-text-column":
    train = _csv(tmp_path, "train.csv", good, header="words,label")
  elif case == "empty":
    train = _csv(tmp_path, "train.csv", [])
  elif case == "unseen-label":
    train = _csv(tmp_path, "train.csv", good)
    block = {"validation": _csv(tmp_path, "dev.csv", ["ok,pos", "so-so,meh"])}
  elif case == "not-utf8":
    train = _write(tmp_path / "train.csv", b"sentence,label\ngood,pos\ncaf\xe9,neg\n", "wb")
  elif case == "ragged":
    train = _csv(tmp_path, "train.csv", ["good,pos", "bad,neg,extra"])
  elif case == "regression-not-a-number":
    train, block = _csv(tmp_path, "train.csv", ["a,0.5", "b,high"]), {"kind": "regression"}
  elif case == "choices-count":
    train = _jsonl(tmp_path, "mc.jsonl", [{"text": "q", "c": ["a", "b", "c"], "label": 0},
                                          {"text": "r", "c": ["a", "b"], "label": 1}])
    block = {"choices": "c"}
  elif case == "one-class":
    train = _csv(tmp_path, "train.csv", ["good,pos", "fine,pos"])
  else:
    train = _write(tmp_path / "train.txt", "good\tpos\n")
  with pytest.raises(files.FileTaskError) as info:
    spec = files.register(f"file:{train}", block)
    for split in ("train", "validation"):
      tasks.load_split(spec, split)
  assert want in str(info.value)
  assert "\n" not in str(info.value)


def _cli(args, capsys):
  status = cli_main.main(args)
  out = capsys.readouterr()
  return status, out.out, out.err


def test_a_csv_task_and_a_jsonl_pair_task_through_the_cli(tiny, tmp_path, capsys):
  rng = np.random.default_rng(0)
  words = {"pos": ["good", "great", "fine"], "neg": ["bad", "awful", "poor"]}
  rows = [f"{' '.join(rng.choice(words[lab], 3))},{lab}"
          for lab in rng.choice(["pos", "neg"], 40)]
  csv_train = _csv(tmp_path, "train.csv", rows[:32])
  csv_dev = _csv(tmp_path, "dev.csv", rows[32:])
  pairs = [{"sentence1": str(a), "sentence2": str(b), "label": "same" if a == b else "other"}
           for a, b in rng.integers(0, 3, (30, 2))]
  jsonl_train = _jsonl(tmp_path, "pairs.jsonl", pairs)
  for name, train, extra in (("csv", csv_train, [f"--config.files.validation={csv_dev}"]),
                             ("pairs", jsonl_train, [])):
    work = str(tmp_path / f"run_{name}")
    status, _, err = _cli(["finetune", f"--config=configs/finetune.py:task=file:{train},tiny,"
                           f"init={tiny['init']},tokenizer={tiny['tokenizer']}",
                           f"--workdir={work}", "--config.seq_len=16"] + extra, capsys)
    assert status == 0, err
    best = os.path.join(work, "best")
    meta = json.load(open(os.path.join(best, "finetune.json")))
    assert meta["task"] == f"file:{train}" and meta["files"]["train"] == train
    if name == "csv":  # the majority class of the training file, scored on the dev file
      labels = [r.rsplit(",", 1)[1] for r in rows]
      top = max(sorted(set(labels[:32])), key=labels[:32].count)
      floor = json.load(open(os.path.join(work, "results.json")))["baseline"]["validation"]
      assert floor["answer"] == "majority class"
      assert floor["scores"]["accuracy"] == pytest.approx(labels[32:].count(top) / 8)
    status, out, err = _cli(["evaluate", "--checkpoint", best], capsys)
    assert status == 0, err
    scores = json.loads(out)
    assert set(scores["metrics"]) == {"accuracy", "macro_f1"}
    text = ["--text", "good great"] + (["--text-b", "1"] if name == "pairs" else [])
    status, out, err = _cli(["predict", "--checkpoint", best] + text, capsys)
    assert status == 0, err
    label = json.loads(out.splitlines()[0])["label"]
    assert label in (("neg", "pos") if name == "csv" else ("other", "same"))
    hf = str(tmp_path / f"hf_{name}")
    status, _, err = _cli(["convert", "--to-hf", best, "--out", hf], capsys)
    assert status == 0, err
    id2label = json.load(open(os.path.join(hf, "config.json")))["id2label"]
    assert sorted(id2label.values()) == (["neg", "pos"] if name == "csv" else ["other", "same"])
  # predict needs no data: the model's record stands in for the moved training file.
  os.rename(csv_train, csv_train + ".moved")
  status, out, err = _cli(["predict", "--checkpoint", os.path.join(tmp_path, "run_csv", "best"),
                           "--text", "awful"], capsys)
  assert status == 0, err
  assert json.loads(out)["label"] in ("neg", "pos")
