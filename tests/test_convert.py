"""Tests of bort_jax.interop.convert: parity with transformers, exact round trips, strict loading.

The committed fixtures under tests/fixtures/ come from scripts/make_parity_fixtures.py
(transformers, float32, eval mode). Tests marked ``parity`` build fresh models with
transformers and torch and are skipped where those are not installed.
"""

import json
import os
import pickle
import shutil
import struct
import zipfile

import jax
import numpy as np
import pytest
from flax import traverse_util

from bort_jax import main as cli_main
from bort_jax.interop import export, hf_export
from bort_jax.interop import convert, hf_files, torch_reader
from bort_jax.core import model
from bort_jax.core.arch import get_model_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TOL = 1e-4
# name -> (family expected after loading, the family argument load_hf needs)
PARITY = {
    "bert_mlm": ("bert", None),
    "bert_base": ("bert", None),
    "roberta_mlm": ("roberta", None),
    "roberta_base": ("roberta", None),
    # The Bort port's config says model_type bert; only its 50,265-id vocabulary (too big for a
    # fixture) marks it as Bort, so the small fixture names the family.
    "bort_mlm": ("bort", "bort"),
    "bert_mlm_bin": ("bert", None),
}
# Fine-tuned fixtures: name -> (transformers class, the head load_hf_with_head must find).
HEADS = {
    "bert_seqcls": ("BertForSequenceClassification", model.HeadSpec("classification", 3, "bert")),
    "bert_mc": ("BertForMultipleChoice", model.HeadSpec("multiple_choice", layout="bert")),
    "roberta_seqcls": ("RobertaForSequenceClassification",
                       model.HeadSpec("classification", 3, "roberta")),
    "roberta_regression": ("RobertaForSequenceClassification",
                           model.HeadSpec("regression", 1, "roberta")),
    "roberta_mc": ("RobertaForMultipleChoice", model.HeadSpec("multiple_choice", layout="roberta")),
}


def _fixture(name):
  return os.path.join(FIXTURES, name)


def _tensors(name):
  return hf_files.read_hf_tensors(_fixture(name))


def _hf_config(name):
  return hf_files.read_hf_config(_fixture(name))


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_trees_equal(a, b):
  la, lb = _leaves(a), _leaves(b)
  assert sorted(la) == sorted(lb)
  for key, value in la.items():
    assert value.dtype == lb[key].dtype, key
    assert np.array_equal(value, lb[key]), key


def _max_diffs(params, config, expected):
  """Max |ours - transformers| per output, over every position, padded ones included (our
  RoBERTa numbers pad tokens' positions as transformers does)."""
  head = model.HeadSpec("mlm" if "logits" in expected else "none")
  batch = {k: expected[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
  if config.type_vocab_size == 0:
    del batch["token_type_ids"]
  out = model.apply(params, config, batch, head=head, output_hidden_states=True)
  hidden = np.stack([np.asarray(h) for h in out["all_hidden"]])
  assert hidden.shape == expected["all_hidden"].shape
  assert not expected["attention_mask"].all(), "the fixture batch must contain padding"
  diffs = {"all_hidden": float(np.abs(hidden - expected["all_hidden"]).max())}
  if "logits" in expected:
    diffs["logits"] = float(np.abs(np.asarray(out["logits"]) - expected["logits"]).max())
  if "pooled" in expected:
    diffs["pooled"] = float(np.abs(np.asarray(out["pooled"]) - expected["pooled"]).max())
  else:
    assert "pooled" not in out
  return diffs


# ---------------------------------------------------------------------------------------------
# Parity with the committed fixtures


@pytest.mark.parametrize("name", sorted(PARITY))
def test_fixture_parity(name):
  family, force = PARITY[name]
  config, params = convert.load_hf(_fixture(name), with_mlm_head=None, family=force)
  expected = dict(np.load(os.path.join(_fixture(name), "expected.npz")))
  assert config.family == family
  assert ("mlm_head" in params) == ("logits" in expected)
  assert config.pooler == ("pooled" in expected)
  diffs = _max_diffs(params, config, expected)
  print(f"{name}: max |diff| {diffs}")
  assert max(diffs.values()) <= TOL, diffs


def test_fixture_configs():
  bert, _ = convert.load_hf(_fixture("bert_mlm"))
  assert (bert.type_vocab_size, bert.position_offset, bert.layer_norm_eps) == (2, 0, 1e-12)
  roberta, _ = convert.load_hf(_fixture("roberta_base"), with_mlm_head=False)
  assert (roberta.position_offset, roberta.pad_id, roberta.max_positions) == (2, 1, 66)
  assert (roberta.layer_norm_eps, roberta.activation, roberta.type_vocab_size) == (
      1e-5, "gelu_tanh", 1)
  bort, params = convert.load_hf(_fixture("bort_mlm"), family="bort")
  # The all-zero token-type row is dropped; the MLM head uses transformers' eps.
  assert bort.type_vocab_size == 0 and "token_type_embeddings" not in params["embeddings"]
  assert (bort.layer_norm_eps, bort.mlm_layer_norm_eps, bort.pooler) == (1e-5, 1e-5, False)


def test_bin_reader_matches_safetensors():
  from_bin, from_st = _tensors("bert_mlm_bin"), _tensors("bert_mlm")
  # torch.save also writes the tied decoder copies that safetensors drops.
  assert set(from_bin) - set(from_st) == {"cls.predictions.decoder.weight",
                                          "cls.predictions.decoder.bias"}
  assert set(from_st) <= set(from_bin)
  for key, value in from_st.items():
    assert from_bin[key].dtype == value.dtype and np.array_equal(from_bin[key], value), key
  _assert_trees_equal(convert.load_hf(_fixture("bert_mlm_bin"))[1],
                      convert.load_hf(_fixture("bert_mlm"))[1])


def _op_global(module, name):
  return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _op_str(text):
  return b"X" + struct.pack("<I", len(text)) + text.encode()


def _op_tuple(*items):
  return b"(" + b"".join(items) + b"t"


def _op_int(value):
  return b"J" + struct.pack("<i", value)


def _op_tensor(storage_type, key, numel, offset, size, stride):
  """Pickle opcodes of torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)."""
  storage = _op_tuple(_op_str("storage"), _op_global("torch", storage_type), _op_str(key),
                      _op_str("cpu"), _op_int(numel)) + b"Q"  # BINPERSID
  hooks = _op_global("collections", "OrderedDict") + b")R"
  args = _op_tuple(storage, _op_int(offset), _op_tuple(*map(_op_int, size)),
                   _op_tuple(*map(_op_int, stride)), b"\x89", hooks)  # \x89: False
  return _op_global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def test_bin_reader_strided_and_half(tmp_path):
  # A hand-built torch zip: a transposed (strided) view at an offset, and a float16 tensor.
  pkl = (b"\x80\x02}(" + _op_str("a") + _op_tensor("FloatStorage", "0", 8, 1, (3, 2), (1, 3))
         + _op_str("b") + _op_tensor("HalfStorage", "1", 2, 0, (2,), (1,)) + b"u.")
  path = tmp_path / "pytorch_model.bin"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", pkl)
    archive.writestr("archive/byteorder", "little")
    archive.writestr("archive/version", "3\n")
    archive.writestr("archive/data/0", np.arange(8, dtype="<f4").tobytes())
    archive.writestr("archive/data/1", np.array([1.5, -2.0], dtype="<f2").tobytes())
  out = torch_reader.read_torch_bin(str(path))
  # storage [0..7], offset 1, size (3, 2), stride (1, 3): a column-major view.
  np.testing.assert_array_equal(out["a"], np.array([[1, 4], [2, 5], [3, 6]], np.float32))
  assert out["b"].dtype == np.float16 and out["b"].tolist() == [1.5, -2.0]


def test_bin_reader_refuses_other_globals(tmp_path):
  path = tmp_path / "pytorch_model.bin"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", pickle.dumps({"x": os.getcwd}, protocol=2))
  with pytest.raises(pickle.UnpicklingError, match="posix.getcwd"):
    torch_reader.read_torch_bin(str(path))
  (tmp_path / "legacy.bin").write_bytes(b"\x80\x02not a zip")
  with pytest.raises(ValueError, match="not a torch zip"):
    torch_reader.read_torch_bin(str(tmp_path / "legacy.bin"))


# ---------------------------------------------------------------------------------------------
# Round trips


def _random_params(config, head, seed=0):
  """Random values in the exact tree model.init makes (its shapes, taken abstractly, which is
  much cheaper than running it); nothing is 1 or 0, so a swapped LayerNorm cannot hide."""
  shapes = jax.eval_shape(lambda key: model.init(key, config, head), jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(0.0, 0.3, s.shape).astype(np.float32), shapes)


def _tiny(family, **overrides):
  positions = 66 if family == "roberta" else 64
  return get_model_config("D2-A2-H32-I64", family=family, vocab_size=100,
                          max_positions=positions, **overrides)


@pytest.mark.parametrize("family", ["bert", "roberta", "bort"])
@pytest.mark.parametrize("kind", ["mlm", "none"])
def test_round_trip_ours_hf_ours_exact(family, kind, tmp_path):
  config = _tiny(family)
  params = _random_params(config, model.HeadSpec(kind))
  convert.save_hf(params, config, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    architecture = json.load(f)["architectures"][0]
  assert architecture.endswith("ForMaskedLM" if kind == "mlm" else "Model")
  loaded_config, loaded = convert.load_hf(str(tmp_path), with_mlm_head=None)
  if kind == "mlm":  # *ForMaskedLM has no pooler: the export leaves it out.
    assert ("pooler" in params) == (family != "bort")
    config = config.replace(pooler=False)
    params = {k: v for k, v in params.items() if k != "pooler"}
  assert loaded_config == config
  _assert_trees_equal(params, loaded)


def test_round_trip_hf_ours_hf_exact():
  for name in ("bert_mlm", "roberta_mlm", "bert_base"):
    tensors = _tensors(name)
    config, params = convert.hf_to_params(tensors, _hf_config(name), with_mlm_head=None)
    hf_config, back = convert.params_to_hf(params, config)
    assert set(back) == set(tensors), name
    for key, value in tensors.items():
      assert np.array_equal(back[key], value), (name, key)
    original = _hf_config(name)
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "max_position_embeddings", "type_vocab_size",
                  "pad_token_id", "layer_norm_eps", "hidden_act", "model_type"):
      assert hf_config[field] == original[field], (name, field)


def test_save_and_load_params(tmp_path):
  config = _tiny("bort")
  params = _random_params(config, model.HeadSpec("mlm"))
  export.save(str(tmp_path / "ckpt"), params, config)
  loaded_config, loaded = export.load(str(tmp_path / "ckpt"))
  assert loaded_config == config
  _assert_trees_equal(params, loaded)
  with pytest.raises(ValueError, match="not a bort_jax checkpoint"):
    export.load(str(tmp_path))


def test_cli_both_ways(tmp_path, capsys):
  ours, hf = str(tmp_path / "ours"), str(tmp_path / "hf")
  assert cli_main.main(["convert", "--from-hf", _fixture("roberta_mlm"), "--out", ours]) == 0
  assert cli_main.main(["convert", "--to-hf", ours, "--out", hf]) == 0
  assert "roberta D2-A4-H32-I64" in capsys.readouterr().out
  _assert_trees_equal(export.load(ours)[1], convert.load_hf(hf)[1])
  assert cli_main.main(["convert", "--from-hf", str(tmp_path / "nowhere"),
                        "--out", ours]) == 2
  assert "nowhere' is not a directory" in capsys.readouterr().err
  os.makedirs(tmp_path / "empty")
  assert cli_main.main(["convert", "--from-hf", str(tmp_path / "empty"),
                        "--out", ours]) == 2
  assert "has no config.json" in capsys.readouterr().err


def _cli_convert(direction, source, out):
  return cli_main.main(["convert", direction, source, "--out", out])


@pytest.mark.parametrize("name", sorted(HEADS))
def test_cli_keeps_the_task_head_both_ways(name, tmp_path):
  """from-hf -> to-hf -> from-hf of a fine-tuned folder: the class, labels and tensors come
  back as they were, the params are equal, and the logits are transformers' (the fixture's)."""
  class_name, want = HEADS[name]
  ours, hf, again = (str(tmp_path / d) for d in ("ours", "hf", "again"))
  assert _cli_convert("--from-hf", _fixture(name), ours) == 0
  assert _cli_convert("--to-hf", ours, hf) == 0
  assert _cli_convert("--from-hf", hf, again) == 0

  hf_config, original = hf_files.read_hf_config(hf), _hf_config(name)
  assert hf_config["architectures"] == [class_name]
  if want.kind != "multiple_choice":
    assert hf_config["id2label"] == original["id2label"]
    problem = original.get("problem_type", "single_label_classification")
    assert hf_config["problem_type"] == problem
  tensors, back = _tensors(name), hf_files.read_hf_tensors(hf)
  assert sorted(back) == sorted(tensors)
  for key, value in tensors.items():
    assert np.array_equal(back[key], value), key

  config, params = export.load(ours)
  config2, params2 = export.load(again)
  assert config2 == config
  _assert_trees_equal(params, params2)
  with open(os.path.join(again, export.FINETUNE_FILE)) as f:
    head, _ = hf_export.finetuned_head(json.load(f), again)
  assert head == want
  expected = dict(np.load(os.path.join(_fixture(name), "expected.npz")))
  logits, _ = _head_outputs(params2, config2, head, expected)
  assert float(np.abs(logits - expected["logits"].reshape(logits.shape)).max()) <= TOL


def test_sharded_checkpoint_reads_as_one(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  tensors = _tensors("bert_seqcls")
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[:5],
            "model-00002-of-00002.safetensors": names[5:]}
  for shard, part in shards.items():
    save_file({n: tensors[n] for n in part}, str(tmp_path / shard))
  weight_map = {n: shard for shard, part in shards.items() for n in part}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  back = hf_files.read_hf_tensors(str(tmp_path))
  assert sorted(back) == names
  assert all(np.array_equal(back[n], tensors[n]) for n in names)


def _truncated_pickle_bin(folder):
  os.remove(folder / "model.safetensors")
  with zipfile.ZipFile(folder / "pytorch_model.bin", "w") as archive:
    archive.writestr("archive/data.pkl", pickle.dumps({"a": 1})[:-4])
  return "pytorch_model.bin"


def _garbage_safetensors(folder):
  (folder / "model.safetensors").write_bytes(b"\xff" * 64)
  return "model.safetensors"


def _truncated_config(folder):
  (folder / "config.json").write_text('{"model_type": "be')
  return "config.json"


def _index_without_weight_map(folder):
  (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
  return "model.safetensors.index.json"


@pytest.mark.parametrize("spoil,want", [
    (_garbage_safetensors, "is not a readable safetensors file (Error while deserializing "
                           "header: header too large); allowed: a model.safetensors"),
    (_truncated_pickle_bin, "is not a readable torch.save archive (UnpicklingError: pickle "
                            "data was truncated); allowed: a pytorch_model.bin"),
    (_truncated_config, "is not JSON: Unterminated string starting at: line 1 column 16 (char "
                        "15); expected the JSON object of a Hugging Face BERT or RoBERTa config"),
    (_index_without_weight_map, "has no weight_map of file names; expected the index "
                                "save_pretrained writes"),
], ids=["safetensors", "bin", "config", "index"])
def test_cli_unreadable_file_exits_2_naming_it(spoil, want, tmp_path, capsys):
  folder = tmp_path / "hf"
  folder.mkdir()
  for name in ("config.json", "model.safetensors"):
    shutil.copy(os.path.join(_fixture("bert_seqcls"), name), folder / name)
  bad = str(folder / spoil(folder))
  out = str(tmp_path / "ours")
  assert _cli_convert("--from-hf", str(folder), out) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("bort-jax convert: ") and repr(bad) in err and want in err, err
  assert "\n" not in err and "Traceback" not in err
  assert not os.path.exists(out)


# ---------------------------------------------------------------------------------------------
# Strict loading: clear errors


def test_wrong_shape_names_the_tensor():
  tensors = _tensors("bert_mlm")
  name = "bert.encoder.layer.1.intermediate.dense.weight"
  tensors[name] = tensors[name][:-1]
  with pytest.raises(ValueError, match=rf"{name}.*\(63, 32\).*\(64, 32\).*intermediate_size"):
    convert.hf_to_params(tensors, _hf_config("bert_mlm"))
  config = dict(_hf_config("bert_mlm"), vocab_size=121)
  with pytest.raises(ValueError, match="bert.embeddings.word_embeddings.weight.*vocab_size"):
    convert.hf_to_params(_tensors("bert_mlm"), config)


def test_missing_tensor_names_it():
  tensors = _tensors("roberta_mlm")
  del tensors["roberta.encoder.layer.0.attention.self.key.bias"]
  with pytest.raises(ValueError, match=r"missing .*roberta.encoder.layer.0.attention.self.key"):
    convert.hf_to_params(tensors, _hf_config("roberta_mlm"))
  tensors = _tensors("roberta_mlm")
  del tensors["lm_head.bias"]
  with pytest.raises(ValueError, match="missing the tensor 'lm_head.bias'"):
    convert.hf_to_params(tensors, _hf_config("roberta_mlm"))
  # A third layer in config.json that the checkpoint does not have.
  config = dict(_hf_config("bert_base"), num_hidden_layers=3)
  with pytest.raises(ValueError, match=r"missing the tensor 'encoder.layer.2"):
    convert.hf_to_params(_tensors("bert_base"), config, with_mlm_head=False)


def test_unknown_model_type_and_fields():
  for bad, match in ((dict(model_type="gpt2"), "model_type.*gpt2"),
                     (dict(hidden_act="relu"), "hidden_act.*relu"),
                     (dict(position_embedding_type="relative_key"), "position_embedding_type"),
                     (dict(is_decoder=True), "is_decoder")):
    with pytest.raises(ValueError, match=match):
      convert.hf_to_params(_tensors("bert_mlm"), dict(_hf_config("bert_mlm"), **bad))
  with pytest.raises(ValueError, match="family 'roberta' does not fit"):
    convert.load_hf(_fixture("bert_mlm"), family="roberta")


def test_unexpected_and_untied_tensors_fail():
  tensors = _tensors("bert_mlm")
  tensors["bert.encoder.layer.7.output.dense.weight"] = np.zeros((32, 64), np.float32)
  with pytest.raises(ValueError, match="not used.*layer.7"):
    convert.hf_to_params(tensors, _hf_config("bert_mlm"))
  tensors = _tensors("bert_mlm_bin")
  tensors["cls.predictions.decoder.weight"] = tensors["cls.predictions.decoder.weight"] + 1
  with pytest.raises(ValueError, match="decoder.weight.*differs"):
    convert.hf_to_params(tensors, _hf_config("bert_mlm_bin"))


def test_mlm_head_choice():
  with pytest.raises(ValueError, match="no MLM head.*with_mlm_head=False"):
    convert.load_hf(_fixture("bert_base"))
  config, params = convert.load_hf(_fixture("bert_mlm"), with_mlm_head=False)
  assert "mlm_head" not in params and not config.pooler
  assert "mlm_head" in convert.load_hf(_fixture("bert_mlm"), with_mlm_head=None)[1]


def test_ignorable_tensors_and_name_variants():
  reference = convert.hf_to_params(_tensors("bert_mlm"), _hf_config("bert_mlm"))[1]
  tensors = _tensors("bert_mlm")
  # Old checkpoints: LayerNorm gamma/beta, position-id buffers and an NSP head.
  for key in [k for k in tensors if "LayerNorm" in k]:
    tensors[key.replace(".weight", ".gamma").replace(".bias", ".beta")] = tensors.pop(key)
  tensors["bert.embeddings.position_ids"] = np.arange(64, dtype=np.int64)[None]
  tensors["cls.seq_relationship.weight"] = np.zeros((2, 32), np.float32)
  tensors["cls.seq_relationship.bias"] = np.zeros((2,), np.float32)
  _assert_trees_equal(convert.hf_to_params(tensors, _hf_config("bert_mlm"))[1], reference)
  # A base model saved without the "bert." prefix and one saved with it load alike.
  bare = _tensors("bert_base")
  prefixed = {f"bert.{k}": v for k, v in bare.items()}
  _assert_trees_equal(
      convert.hf_to_params(bare, _hf_config("bert_base"), with_mlm_head=False)[1],
      convert.hf_to_params(prefixed, _hf_config("bert_base"), with_mlm_head=False)[1])


def test_bort_detection_and_token_types():
  bort_config = dict(_hf_config("bort_mlm"), vocab_size=convert.BORT_VOCAB_SIZE)
  assert convert.detect_family(bort_config) == "bort"
  assert convert.detect_family(_hf_config("bort_mlm")) == "bert"
  assert convert.detect_family(dict(_hf_config("bort_mlm"), bort_jax={"family": "bort"})) == "bort"
  # A non-zero single token-type row is real information: kept as type_vocab_size=1.
  tensors = _tensors("bort_mlm")
  tensors["bert.embeddings.token_type_embeddings.weight"] = np.full((1, 32), 0.5, np.float32)
  config, params = convert.hf_to_params(tensors, _hf_config("bort_mlm"), family="bort")
  assert config.type_vocab_size == 1
  assert params["embeddings"]["token_type_embeddings"]["embedding"].shape == (1, 32)


def test_save_hf_errors():
  config = _tiny("bert")
  params = _random_params(config, model.HeadSpec("classification", 3))
  with pytest.raises(ValueError, match="no head was given"):
    convert.params_to_hf(params, config)
  with pytest.raises(ValueError, match="classifier.*no place"):  # the head the params lack
    convert.params_to_hf(params, config, model.NO_HEAD)
  params = _random_params(config, model.HeadSpec("none"))
  del params["encoder"]["layer_1"]["output"]["LayerNorm"]
  with pytest.raises(ValueError, match="encoder/layer_1/output/LayerNorm/scale"):
    convert.params_to_hf(params, config)


# ---------------------------------------------------------------------------------------------
# Task heads


def _head_outputs(params, config, head, batch):
  """Our logits, pooled output and hidden states with the leading dims flattened as
  transformers flattens multiple-choice batches."""
  batch = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
  if config.type_vocab_size == 0:
    del batch["token_type_ids"]
  out = model.apply(params, config, batch, head=head, output_hidden_states=True)
  rows = int(np.prod(batch["input_ids"].shape[:-1]))
  hidden = np.stack([np.asarray(h).reshape((rows,) + h.shape[-2:]) for h in out["all_hidden"]])
  return np.asarray(out["logits"]), hidden


@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_fixture_parity_and_round_trip(name, tmp_path):
  class_name, want = HEADS[name]
  config, params, head = convert.load_hf_with_head(_fixture(name))
  assert head == want
  expected = dict(np.load(os.path.join(_fixture(name), "expected.npz")))
  logits, hidden = _head_outputs(params, config, head, expected)
  # Regression is [B] here and [B, 1] in transformers.
  want_logits = expected["logits"].reshape(logits.shape)
  diffs = {"logits": float(np.abs(logits - want_logits).max()),
           "all_hidden": float(np.abs(hidden - expected["all_hidden"]).max())}
  print(f"{name}: max |diff| {diffs}")
  assert max(diffs.values()) <= TOL, diffs
  assert float(np.std(logits)) > 1e-2  # the head does something

  out = str(tmp_path / "hf")
  convert.save_hf(params, config, out, head)
  hf_config = hf_files.read_hf_config(out)
  assert hf_config["architectures"] == [class_name]
  assert oct(os.stat(os.path.join(out, "model.safetensors")).st_mode & 0o777) == "0o644"
  if head.kind != "multiple_choice":
    assert len(hf_config["id2label"]) == head.outputs
    assert hf_config["problem_type"] == _hf_config(name).get("problem_type",
                                                           "single_label_classification")
  original, back = _tensors(name), hf_files.read_hf_tensors(out)
  assert sorted(back) == sorted(original)
  for key, value in original.items():
    assert np.array_equal(back[key], value), key
  config2, params2, head2 = convert.load_hf_with_head(out)
  assert (config2, head2) == (config, head)
  _assert_trees_equal(params, params2)


@pytest.mark.parametrize("family,head,class_name", [
    ("bort", model.HeadSpec("classification", 3, "bert"), "BertForSequenceClassification"),
    ("bort", model.HeadSpec("classification", 3), "BertForSequenceClassification"),
    ("bort", model.HeadSpec("multiple_choice", 4), "BertForMultipleChoice"),
    ("bort", model.HeadSpec("regression", layout="bert"), "BertForSequenceClassification"),
    ("roberta", model.HeadSpec("classification", 2), "RobertaForSequenceClassification"),
], ids=lambda x: getattr(x, "kind", x))
def test_task_head_round_trip_ours_hf_ours(family, head, class_name, tmp_path):
  config = _tiny(family, pooler=False)
  params = _random_params(config, head, seed=5)
  assert ("pooler" in params) == model.has_pooler(config, head)
  convert.save_hf(params, config, str(tmp_path), head)
  assert hf_files.read_hf_config(str(tmp_path))["architectures"] == [class_name]
  loaded_config, loaded, loaded_head = convert.load_hf_with_head(str(tmp_path))
  # Bort's config keeps pooler=False: the pooler belongs to the head.
  assert loaded_config == config and loaded_head == head.resolve(family)
  _assert_trees_equal(params, loaded)
  with pytest.raises(ValueError, match="with_mlm_head"):
    convert.load_hf(str(tmp_path))  # the default asks for an MLM head


def test_roberta_layout_head_on_bort_is_bert_class_head():
  """Bort's default head (dense + out_proj on the first token) is written as the pooler and
  classifier of BertForSequenceClassification; read as that class, it gives the same logits."""
  bort = _tiny("bort", pooler=True)
  head = model.HeadSpec("classification", 3)  # Bort's default: the RoBERTa layout
  params = _random_params(bort, head, seed=6)
  hf_config, tensors = convert.params_to_hf(params, bort, head)
  assert hf_config["architectures"] == ["BertForSequenceClassification"]
  assert hf_config["bort_jax"]["head"]["layout"] == "roberta"
  flat = traverse_util.flatten_dict(params, sep="/")
  assert np.array_equal(tensors["bert.pooler.dense.weight"], flat["classifier/dense/kernel"].T)
  assert np.array_equal(tensors["classifier.weight"], flat["classifier/out_proj/kernel"].T)
  # Our own pooler has no place (the head takes it) and is left out.
  assert "pooler/kernel" in flat and hf_config["bort_jax"]["pooler"] is False
  assert not [n for n in tensors if "out_proj" in n or "classifier.dense" in n]

  plain = {k: v for k, v in hf_config.items() if k != "bort_jax"}  # as transformers reads it
  config, as_bert, bert_head = convert.hf_to_model(tensors, plain, family="bort")
  assert bert_head == model.HeadSpec("classification", 3, "bert")
  batch = _padded_batch(100, bort.pad_id, 1, seed=3)
  del batch["token_type_ids"]
  ours = model.apply(params, bort, batch, head=head)["logits"]
  theirs = model.apply(as_bert, config, batch, head=bert_head)["logits"]
  assert float(np.std(ours)) > 1e-2
  np.testing.assert_allclose(theirs, ours, atol=1e-5)


def test_heads_transformers_cannot_hold():
  roberta = _tiny("roberta")
  head = model.HeadSpec("classification", 3, "bert")
  with pytest.raises(ValueError, match="layout 'bert'.*roberta"):
    convert.params_to_hf(_random_params(roberta, head), roberta, head)


def test_head_checkpoint_errors():
  tensors, hf_config = _tensors("bert_seqcls"), _hf_config("bert_seqcls")
  with pytest.raises(ValueError, match="architectures"):
    convert.hf_to_model(tensors, dict(hf_config, architectures=["BertForPreTraining"]))
  broken = {k: v for k, v in tensors.items() if k != "classifier.bias"}
  with pytest.raises(ValueError, match="classifier.bias"):
    convert.hf_to_model(broken, hf_config)
  wrong = dict(tensors, **{"classifier.bias": np.zeros(4, np.float32)})
  with pytest.raises(ValueError, match="classifier.bias.*num_labels"):
    convert.hf_to_model(wrong, hf_config)
  with pytest.raises(ValueError, match="bort_jax.head.*sparkle"):
    convert.hf_to_model(tensors, dict(hf_config, bort_jax={"head": {"kind": "sparkle"}}))
  # transformers' rule: one output and no problem_type is a regression head.
  one = dict(tensors, **{"classifier.weight": tensors["classifier.weight"][:1],
                         "classifier.bias": tensors["classifier.bias"][:1]})
  plain = {k: v for k, v in hf_config.items() if k != "problem_type"}
  assert convert.hf_to_model(one, plain)[2] == model.HeadSpec("regression", 1, "bert")


# ---------------------------------------------------------------------------------------------
# Live checks against transformers (parity extra)


def _torch_outputs(hf_model, batch):
  torch = pytest.importorskip("torch")
  with torch.no_grad():
    out = hf_model(**{k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in batch.items()},
                   output_hidden_states=True)
  result = {"all_hidden": np.stack([h.numpy() for h in out.hidden_states])}
  if getattr(out, "logits", None) is not None:
    result["logits"] = out.logits.numpy()
  if getattr(out, "pooler_output", None) is not None:
    result["pooled"] = out.pooler_output.numpy()
  return result


def _padded_batch(vocab, pad_id, types, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, (2, 9))
  mask = np.ones((2, 9), np.int32)
  ids[1, 5:], mask[1, 5:] = pad_id, 0
  token_types = np.zeros((2, 9), np.int32)
  if types > 1:
    token_types[:, 3:] = 1
  return {"input_ids": ids.astype(np.int32), "attention_mask": mask,
          "token_type_ids": token_types}


@pytest.mark.parity
@pytest.mark.parametrize("class_name", ["BertForMaskedLM", "RobertaModel"])
def test_live_parity(class_name, tmp_path):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  torch.manual_seed(7)
  is_roberta = class_name.startswith("Roberta")
  config_class = transformers.RobertaConfig if is_roberta else transformers.BertConfig
  hf_config = config_class(vocab_size=90, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=48,
                           max_position_embeddings=40, type_vocab_size=1 if is_roberta else 2,
                           pad_token_id=1 if is_roberta else 0, initializer_range=0.3)
  hf_model = getattr(transformers, class_name)(hf_config).eval()
  with torch.no_grad():  # LayerNorms away from their 1/0 init
    for name, param in hf_model.named_parameters():
      if "LayerNorm" in name:
        param.add_(0.2 * torch.randn(param.shape))
  hf_model.save_pretrained(str(tmp_path))
  config, params = convert.load_hf(str(tmp_path), with_mlm_head=None)
  expected = _padded_batch(90, hf_config.pad_token_id, hf_config.type_vocab_size)
  expected.update(_torch_outputs(hf_model, expected))
  diffs = _max_diffs(params, config, expected)
  print(f"live {class_name}: max |diff| {diffs}")
  assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parity
@pytest.mark.parametrize("family,kind", [("bert", "mlm"), ("roberta", "none"), ("bort", "mlm")])
def test_live_save_hf_loads_in_transformers(family, kind, tmp_path):
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("torch")
  # A BERT-family masked LM in transformers has no pooler; a base model has one. transformers
  # uses one LayerNorm eps for body and MLM head, so Bort's own head eps (1e-12) cannot be
  # expressed there: the comparison uses the body's.
  config = _tiny(family, pooler=kind == "none")
  config = config.replace(mlm_layer_norm_eps=config.layer_norm_eps)
  params = _random_params(config, model.HeadSpec(kind), seed=3)
  convert.save_hf(params, config, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    architecture = json.load(f)["architectures"][0]
  hf_model, info = getattr(transformers, architecture).from_pretrained(
      str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  hf_model.eval()
  expected = _padded_batch(100, config.pad_id, config.type_vocab_size, seed=1)
  expected.update(_torch_outputs(hf_model, expected))
  diffs = _max_diffs(params, config, expected)
  print(f"save_hf {family}/{kind}: max |diff| {diffs}")
  assert max(diffs.values()) <= TOL, diffs


def _torch_logits(hf_model, batch):
  torch = pytest.importorskip("torch")
  with torch.no_grad():
    return hf_model(**{k: torch.from_numpy(np.asarray(v, np.int64))
                       for k, v in batch.items()}).logits.numpy()


def _random_hf_model(class_name, labels, folder):
  """A random transformers model of ``class_name`` saved in ``folder``, with a padded batch of
  its inputs (1 example x 2 choices for multiple choice)."""
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  torch.manual_seed(11)
  is_roberta = class_name.startswith("Roberta")
  config_class = transformers.RobertaConfig if is_roberta else transformers.BertConfig
  extra = {"num_labels": labels} if labels else {}
  hf_config = config_class(vocab_size=90, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=48,
                           max_position_embeddings=40, type_vocab_size=1 if is_roberta else 2,
                           pad_token_id=1 if is_roberta else 0, initializer_range=0.3, **extra)
  hf_model = getattr(transformers, class_name)(hf_config).eval()
  with torch.no_grad():  # LayerNorms away from their 1/0 init
    for name, param in hf_model.named_parameters():
      if "LayerNorm" in name:
        param.add_(0.2 * torch.randn(param.shape))
  hf_model.save_pretrained(folder)
  batch = _padded_batch(90, hf_config.pad_token_id, hf_config.type_vocab_size)
  if class_name.endswith("ForMultipleChoice"):
    batch = {k: v[None] for k, v in batch.items()}
  return hf_model, batch


@pytest.mark.parity
@pytest.mark.parametrize("class_name,labels", [
    ("BertForSequenceClassification", 3), ("RobertaForMultipleChoice", None),
    ("BertForMultipleChoice", None), ("RobertaForSequenceClassification", 1)])
def test_live_heads_both_ways(class_name, labels, tmp_path):
  """A random transformers checkpoint with a head loads with transformers' logits, and the
  directory save_hf writes back loads in transformers with nothing missing and those logits."""
  transformers = pytest.importorskip("transformers")
  hf_model, batch = _random_hf_model(class_name, labels, str(tmp_path / "hf"))
  config, params, head = convert.load_hf_with_head(str(tmp_path / "hf"))
  want = _torch_logits(hf_model, batch)
  ours, _ = _head_outputs(params, config, head, batch)
  diff = float(np.abs(ours - want.reshape(ours.shape)).max())
  print(f"live {class_name}: {head}, max |diff| {diff:.2e}")
  assert diff <= TOL

  convert.save_hf(params, config, str(tmp_path / "back"), head)
  back, info = getattr(transformers, class_name).from_pretrained(
      str(tmp_path / "back"), output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert back.config.num_labels == hf_model.config.num_labels
  # The same weights; a reloaded model may round differently in the last bit.
  np.testing.assert_allclose(_torch_logits(back.eval(), batch), want, rtol=0, atol=1e-6)


@pytest.mark.parity
@pytest.mark.parametrize("family,head", [
    ("bort", model.HeadSpec("classification", 3, "bert")),
    ("bort", model.HeadSpec("multiple_choice")),
    ("roberta", model.HeadSpec("regression")),
    ("bert", model.HeadSpec("classification", 2)),
], ids=lambda x: getattr(x, "kind", x))
def test_live_task_heads_from_ours_load_in_transformers(family, head, tmp_path):
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("torch")
  config = _tiny(family, pooler=False)
  params = _random_params(config, head, seed=4)
  convert.save_hf(params, config, str(tmp_path), head)
  class_name = hf_files.read_hf_config(str(tmp_path))["architectures"][0]
  hf_model, info = getattr(transformers, class_name).from_pretrained(
      str(tmp_path), output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  batch = _padded_batch(100, config.pad_id, max(config.type_vocab_size, 1), seed=2)
  if head.kind == "multiple_choice":
    batch = {k: v[None] for k, v in batch.items()}
  ours, _ = _head_outputs(params, config, head, batch)
  want = _torch_logits(hf_model.eval(), batch)
  diff = float(np.abs(ours - want.reshape(ours.shape)).max())
  print(f"save_hf {family}/{head}: {class_name}, max |diff| {diff:.2e}")
  assert diff <= TOL


@pytest.mark.parity
@pytest.mark.parametrize("class_name,labels", [
    ("BertForSequenceClassification", 3), ("BertForMultipleChoice", None),
    ("RobertaForSequenceClassification", 2), ("RobertaForMultipleChoice", None)])
def test_live_cli_keeps_the_task_head_both_ways(class_name, labels, tmp_path):
  """`convert --from-hf` then `--to-hf` of a transformers checkpoint with a head: our logits
  are transformers', and the folder written back loads cleanly with the same logits."""
  transformers = pytest.importorskip("transformers")
  hf_model, batch = _random_hf_model(class_name, labels, str(tmp_path / "hf"))
  ours, back = str(tmp_path / "ours"), str(tmp_path / "back")
  assert _cli_convert("--from-hf", str(tmp_path / "hf"), ours) == 0
  assert _cli_convert("--to-hf", ours, back) == 0
  want = _torch_logits(hf_model, batch)
  config, params = export.load(ours)
  with open(os.path.join(ours, export.FINETUNE_FILE)) as f:
    head, _ = hf_export.finetuned_head(json.load(f), ours)
  logits, _ = _head_outputs(params, config, head, batch)
  assert float(np.abs(logits - want.reshape(logits.shape)).max()) <= TOL
  reloaded, info = getattr(transformers, class_name).from_pretrained(back,
                                                                    output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert reloaded.config.id2label == hf_model.config.id2label
  np.testing.assert_allclose(_torch_logits(reloaded.eval(), batch), want, rtol=0, atol=1e-6)
