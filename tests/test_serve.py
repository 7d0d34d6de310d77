"""Serving on CPU: the ONNX graph against the JAX model, the export folder, int8, the runtimes.

Tiny models (random weights): what is tested is that the graph computes what ``model.apply``
computes for every family and head, that the export writes, checks and records what it says,
and that every runtime a user can name serves the same labels.
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
from bort_jax.finetune import setup
from bort_jax.interop import convert
from bort_jax.serve import export, onnx_graph, runtime, served, timing
from test_evaluate_predict import checkpoint  # noqa: F401  (the fine-tuned model fixture)

HEADS = [model.MLM, model.NO_HEAD, model.HeadSpec("classification", 3),
         model.HeadSpec("classification", 2, "bert"), model.HeadSpec("regression"),
         model.HeadSpec("multiple_choice")]


def _ort_logits(proto, batch):
  return runtime.forward(runtime.session(proto.SerializeToString()))(batch)


@pytest.mark.parametrize("family,activation,heads", [
    ("bert", "gelu", HEADS), ("roberta", "gelu", [HEADS[0], HEADS[2], HEADS[5]]),
    ("bort", "gelu_tanh", [HEADS[1], HEADS[3], HEADS[4], HEADS[5]])])
def test_graph_matches_the_jax_model_for_every_head(family, activation, heads):
  """Every head on BERT, and on RoBERTa (offset positions) and Bort (no token types, tanh
  GELU) the ones whose graph differs; with padding; one graph run at two lengths (the axes
  are dynamic)."""
  cfg = arch_lib.get_model_config("D2-A2-H16-I32", family=family, vocab_size=50,
                                  max_positions=40, activation=activation)
  rng = np.random.default_rng(0)
  for head in heads:
    params = model.init(jax.random.key(1), cfg, head)
    params = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape, np.float32), params)
    proto = onnx_graph.build(params, cfg, head)
    for length in ((7, 11) if head.kind == "multiple_choice" else (5 + len(head.kind),)):
      batch = export.parity_batch(cfg, head, length, seed=length)
      want = model.apply(params, cfg, batch, head=head)
      want = np.asarray(want["hidden"] if head.kind == "none" else want["logits"])
      got = _ort_logits(proto, batch)
      assert got.shape == want.shape, (head, length)
      np.testing.assert_allclose(got, want, atol=1e-5, err_msg=str(head))
    names = [i.name for i in proto.graph.input]
    assert names == (["input_ids", "attention_mask"] + (["token_type_ids"]
                                                         if family != "bort" else []))


def test_graph_has_one_weight_matmul_per_projection_and_no_einsum():
  cfg = arch_lib.get_model_config("D3-A2-H16-I32", family="bort", vocab_size=50,
                                  max_positions=40)
  head = model.HeadSpec("classification", 2)
  proto = onnx_graph.build(model.init(jax.random.key(0), cfg, head), cfg, head)
  ops = [n.op_type for n in proto.graph.node]
  # q, k, v, attention output, intermediate, output per layer; classifier dense + out_proj.
  assert len(export.weight_matmuls_of(proto)) == 6 * 3 + 2
  assert "Einsum" not in ops and "Dropout" not in ops
  assert ops.count("LayerNormalization") == 1 + 2 * 3


@pytest.fixture(scope="module")
def assets(checkpoint, tmp_path_factory):  # pylint: disable=redefined-outer-name
  """test_evaluate_predict's BERT 'fine-tuned' on glue/rte, its ONNX export with int8."""
  onnx_dir = str(tmp_path_factory.mktemp("serve") / "onnx")
  with tfds.testing.mock_data(num_examples=12):
    record = export.export(checkpoint["path"], onnx_dir, quantize="int8", log=lambda line: None)
  return {"best": checkpoint["path"], "onnx": onnx_dir, "record": record,
          "config": checkpoint["config"], "tok": os.path.join(checkpoint["path"], "tokenizer")}


def test_export_folder_records_parity_int8_and_its_accuracy(assets):
  record, folder = assets["record"], assets["onnx"]
  assert sorted(os.listdir(folder)) == sorted(
      ["README.md", "finetune.json", "model.int8.onnx", "model.onnx", "model_config.json",
       "serve.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
       "vocab.txt"])
  assert json.load(open(os.path.join(folder, "serve.json"))) == json.loads(json.dumps(record))
  assert 0 <= record["parity"]["max_abs_diff"] <= export.PARITY_TOLERANCE
  assert record["task"] == "glue/rte" and record["label_names"] == ["entailment",
                                                                    "not_entailment"]
  # The int8 graph has every weight MatMul quantised (q, k, v, out, ffn x2, classifier x2).
  q = record["int8"]
  counts = runtime.count_ops(os.path.join(folder, "model.int8.onnx"))
  assert q["weight_matmuls"] == 8 and counts["MatMulInteger"] == q["matmuls_quantized"] == 8
  assert counts.get("MatMul", 0) == q["matmuls_left_float"] == 2  # attention: two activations
  dev = q["dev"]
  assert dev["split"] == "validation" and dev["examples"] == 12 and dev["metric"] == "accuracy"
  assert dev["change_points"] == pytest.approx(
      100 * (dev["onnxruntime-int8"]["accuracy"] - dev["onnxruntime"]["accuracy"]))
  assert set(q["latency"]) == {"onnxruntime", "onnxruntime-int8"}
  assert q["speedup"] == pytest.approx(q["latency"]["onnxruntime"]["median_ms"]
                                       / q["latency"]["onnxruntime-int8"]["median_ms"])
  for name, entry in record["files"].items():
    from bort_jax.runtime import fileio
    assert fileio.sha256_file(os.path.join(folder, name)) == entry["sha256"]
  card = open(os.path.join(folder, "README.md")).read()
  assert f"{dev['change_points']:+.2f} points of accuracy" in card
  assert "8 of the 8 weight MatMuls" in card


def test_predict_gives_the_same_labels_in_every_runtime(assets, capsys):
  texts = ["--text", "good film", "--text-b", "bad", "--text", "a bad film", "--text-b", "good",
           "--text", "film", "--text-b", "a good bad film"]
  rows = {}
  for name, path in (("jax", assets["best"]), ("onnxruntime", assets["onnx"]),
                     ("onnxruntime-int8", assets["onnx"])):
    assert cli_main.main(["predict", "--checkpoint", path, "--runtime", name] + texts) == 0
    rows[name] = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
  assert len(rows["jax"]) == 3
  for a, b in zip(rows["jax"], rows["onnxruntime"]):
    assert a["label"] == b["label"]
    np.testing.assert_allclose(a["probabilities"], b["probabilities"], atol=1e-5)
  for a, b in zip(rows["jax"], rows["onnxruntime-int8"]):
    np.testing.assert_allclose(a["probabilities"], b["probabilities"], atol=0.05)


def test_export_of_hugging_face_multiple_choice_roberta(assets, tmp_path):
  """A RobertaForMultipleChoice folder (RoBERTa positions, [B, C, T] inputs) exports and
  matches the JAX model; a model without a task head exports its MLM head."""
  cfg = arch_lib.get_model_config("D1-A2-H16-I32", family="roberta", vocab_size=60,
                                  max_positions=40)
  head = model.HeadSpec("multiple_choice").resolve("roberta")
  params = model.init(jax.random.key(3), cfg, head)
  hf_dir = str(tmp_path / "hf")
  convert.save_hf(params, cfg, hf_dir, head=head)
  with pytest.raises(setup.InputError, match="pass --task"):
    export.export(hf_dir, str(tmp_path / "no_task"), log=lambda line: None)
  record = export.export(hf_dir, str(tmp_path / "mc"), task="race/middle", seq_len=12,
                         log=lambda line: None)
  assert record["head"]["kind"] == "multiple_choice" and "int8" not in record
  assert record["tokenizer_files"] == []  # none with the checkpoint: predict takes --tokenizer
  assert record["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
  mlm = model.init(jax.random.key(4), cfg, model.MLM)
  ours = str(tmp_path / "ours")
  from bort_jax.interop import export as export_lib
  export_lib.save(ours, mlm, cfg)
  record = export.export(ours, str(tmp_path / "mlm"), log=lambda line: None)
  assert record["head"]["kind"] == "mlm" and record["output"] == "logits"
  assert record["parity"]["max_abs_diff"] <= export.PARITY_TOLERANCE


def _exit_2(capsys, argv, want):
  assert cli_main.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert want in err and "\n" not in err and "Traceback" not in err, err


def test_bad_input_exits_2_with_one_line(assets, tmp_path, capsys):
  out = str(tmp_path / "out")
  _exit_2(capsys, ["export", "--checkpoint", assets["tok"], "--out", out],
          "--checkpoint")  # a folder that holds no model
  _exit_2(capsys, ["export", "--checkpoint", assets["best"], "--out", out, "--format", "tflite"],
          "--format='tflite': allowed: onnx")
  _exit_2(capsys, ["export", "--checkpoint", assets["best"], "--out", out, "--quantize", "int4"],
          "--quantize='int4': allowed: int8")
  _exit_2(capsys, ["predict", "--checkpoint", assets["onnx"], "--runtime", "tensorrt",
                   "--text", "x"], "argument --runtime: invalid choice: 'tensorrt'")
  _exit_2(capsys, ["cost", "--arch", "D1-A2-H32-I64", "--measure", "--runtime", "tvm"],
          "--runtime='tvm' is not a runtime; allowed: jax, onnxruntime, onnxruntime-int8")
  _exit_2(capsys, ["predict", "--checkpoint", assets["onnx"], "--text", "x"],
          "is an ONNX export: serve it with --runtime onnxruntime")
  _exit_2(capsys, ["predict", "--checkpoint", assets["best"], "--runtime", "onnxruntime",
                   "--text", "x"], "is not an ONNX export of bort-jax (no serve.json)")
  _exit_2(capsys, ["predict", "--checkpoint", os.path.join(assets["onnx"], "model.onnx"),
                   "--runtime", "onnxruntime", "--text", "x"], "is not a folder")
  assert not os.path.exists(out)


def test_another_models_graph_is_refused(assets, tmp_path, capsys):
  """model.onnx replaced by the graph of another model: exit 2 before any session."""
  copy = str(tmp_path / "copy")
  shutil.copytree(assets["onnx"], copy)
  other = assets["config"].replace(arch="D1-A2-H16-I32")
  head = model.HeadSpec("classification", 2)
  proto = onnx_graph.build(model.init(jax.random.key(0), other, head), other, head)
  with open(os.path.join(copy, "model.onnx"), "wb") as f:
    f.write(proto.SerializeToString())
  _exit_2(capsys, ["predict", "--checkpoint", copy, "--runtime", "onnxruntime", "--text", "x"],
          "is not the graph this export wrote (its sha256 differs")
  os.remove(os.path.join(copy, "model.int8.onnx"))
  _exit_2(capsys, ["predict", "--checkpoint", copy, "--runtime", "onnxruntime-int8", "--text",
                   "x"], "has no model.int8.onnx for --runtime onnxruntime-int8")


def test_missing_extra_names_the_install_command(assets, tmp_path, capsys, monkeypatch):
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "onnxruntime" else real(name, *a))
  want = "onnxruntime not installed: ONNX export and the ONNX Runtime runtimes need the serve " \
         "extra (pip install -e '.[serve]')"
  _exit_2(capsys, ["export", "--checkpoint", assets["best"], "--out", str(tmp_path / "x")],
          want)
  _exit_2(capsys, ["predict", "--checkpoint", assets["onnx"], "--runtime", "onnxruntime",
                   "--text", "x"], want)
  _exit_2(capsys, ["cost", "--arch", "D1-A2-H32-I64", "--measure", "--runtime", "onnxruntime"],
          want)
  assert not os.path.exists(tmp_path / "x")


def test_a_parity_failure_writes_nothing(assets, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(export, "PARITY_TOLERANCE", -1.0)
  out = str(tmp_path / "bad")
  assert cli_main.main(["export", "--checkpoint", assets["best"], "--out", out]) == 1
  err = capsys.readouterr().err.strip()
  assert "differs from the JAX forward by up to" in err and "nothing was written" in err
  assert not os.path.exists(out) and os.listdir(tmp_path) == []


def test_cost_measure_and_timing_in_each_runtime(capsys):
  assert cli_main.main(["cost", "--arch", "D1-A2-H32-I64", "--measure", "--runtime",
                        "onnxruntime-int8", "--repeats", "3", "--seq-len", "16", "--json"]) == 0
  row = json.loads(capsys.readouterr().out)[0]
  assert row["runtime"] == "onnxruntime-int8" and row["latency_ms"] > 0
  _exit_2(capsys, ["cost", "--arch", "D1-A2-H32-I64", "--runtime", "onnxruntime"],
          "add --measure")
  configs = {"a": "D1-A2-H32-I64", "b": "D2-A2-H32-I64"}
  got = timing.in_own_process({k: arch_lib.get_model_config(v) for k, v in configs.items()},
                              1, 16, "onnxruntime", rounds=3, warmup=1)
  assert set(got) == {"a", "b"} and all(t["runtime"] == "onnxruntime" and t["repeats"] == 3
                                        for t in got.values())
  assert got["b"]["arch"] == "D2-A2-H32-I64"


def test_extraction_latency_runtime_is_checked_and_keyed(tmp_path):
  import ml_collections
  from bort_jax.pipelines import extract_costs
  cfg = ml_collections.ConfigDict({"inference": "latency", "batch": 1, "seq_len": 8,
                                   "repeats": 2, "latency_table": "", "runtime": "onnx"})
  with pytest.raises(ValueError, match="config.cost.runtime='onnx' is not a runtime"):
    extract_costs.check_runtime(cfg)
  cfg.runtime = "onnxruntime-int8"
  assert extract_costs.latency_table_path(cfg).endswith("_onnxruntime-int8.json")
  cfg.latency_table = str(tmp_path / "table.json")
  configs = [arch_lib.get_model_config("D1-A2-H32-I64", vocab_size=50, max_positions=16)]
  values, unit = extract_costs.inference_costs(configs, cfg)
  assert unit == "latency in onnxruntime-int8 (ms)" and values[0] > 0
  assert list(json.load(open(cfg.latency_table)).values()) == values


def test_the_cli_names_the_runtimes_serve_knows():
  from bort_jax.serve import cli as serve_cli
  assert serve_cli.RUNTIMES == runtime.RUNTIMES


def test_served_load_checks_the_task_against_the_head(assets):
  with pytest.raises(setup.InputError, match="task 'glue/mnli' needs classification with 3"):
    served.load(assets["onnx"], "onnxruntime", task="glue/mnli")


def test_report_keeps_its_page_when_a_runtime_cannot_be_timed(monkeypatch):
  import ml_collections
  from bort_jax.pipelines import report

  def fail(*args, **kwargs):
    raise RuntimeError("timing onnxruntime in its own process failed: boom")

  monkeypatch.setattr(timing, "in_own_process", fail)
  cfg = ml_collections.ConfigDict({"batch": 1, "seq_len": 8, "rounds": 1, "warmup": 0})
  models = {k: arch_lib.get_model_config("D1-A2-H32-I64") for k in ("teacher", "student")}
  got = report.time_runtimes(models, ("onnxruntime",), cfg)
  assert got == {"onnxruntime": {"error": "timing onnxruntime in its own process failed: boom"}}
  row = {"median_ms": 2.0, "iqr_ms": 0.1}
  lines = report.runtime_lines({"timings": {"student": row, "teacher": dict(row, median_ms=8.0)},
                                "runtimes": got})
  assert "| jax | 2.00 | 0.10 | 8.00 | 0.10 | 4.00x |" in lines
  assert "| onnxruntime | not measured: timing onnxruntime in its own process failed: boom " \
         "| | | | |" in lines


def test_demo_product_without_onnx_says_why(tmp_path):
  """A student the export cannot take leaves the report its reason, not a crash."""
  from bort_jax.pipelines import report_products
  best = tmp_path / "best"
  best.mkdir()
  (best / "finetune.json").write_text("{}")
  got = report_products.export_onnx_student(str(best), str(tmp_path / "onnx"))
  assert got["out"] is None and "--checkpoint" in got["why"]
  assert "No ONNX export (" in report_products._onnx_line(got)  # pylint: disable=W0212
  assert not (tmp_path / "onnx").exists()
