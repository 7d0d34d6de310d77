"""Tests of bort_jax.core.cost: parameter counts, analytic FLOPs, latency helper and the CLI.

Parameter counts are checked three ways: against the paper's per-layer formula, against what
transformers counts for every preset (committed fixture from scripts/hf_param_counts.py, and a
live check under the ``parity`` marker), and against the leaves of ``model.init``. FLOPs are
checked against XLA's cost analysis of the compiled ``model.apply``.
"""

import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bort_jax import main as cli_main
from bort_jax.core import cost, model
from bort_jax.core.arch import PRESETS, Arch, SearchSpace, get_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hf_param_counts.json")

TINY = get_model_config("D2-A2-H32-I64", family="bert", vocab_size=100, max_positions=64)


def _leaf_count(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


# --- parameter counts -------------------------------------------------------------------------

def test_layer_count_matches_paper_formula_over_paper_space():
  space = SearchSpace.paper().enumerate()
  assert len(space) == 300
  for arch in space:
    h, i = arch.hidden, arch.intermediate
    paper = 4 * (h * h + h) + 2 * h * i + i + h + 4 * h
    assert cost.layer_param_count(get_model_config(arch)) == paper, arch


def test_layer_count_with_padded_head_size():
  # heads * head_size = 6 * 16 = 96 != hidden 64: Q, K, V map 64 -> 96, the output 96 -> 64.
  arch = Arch(2, 6, 64, 128, head_size=16)
  w, h, i = 96, 64, 128
  expected = 3 * (h * w + w) + (w * h + h) + 2 * h * i + i + h + 4 * h
  assert cost.layer_param_count(get_model_config(arch)) == expected


def test_param_count_parts_add_up():
  for name, config in PRESETS.items():
    counts = cost.param_counts(config)
    assert counts["total"] == (counts["embeddings"] + counts["embedding_layer_norm"] +
                               counts["encoder"] + counts["pooler"] + counts["mlm_head"]), name
    assert counts["effective"] == counts["total"] - counts["embeddings"], name
    assert counts["embeddings"] == config.arch.hidden * (
        config.vocab_size + config.max_positions + config.type_vocab_size), name


def test_param_counts_equal_transformers_fixture():
  """Every preset against transformers' own count (fixture by scripts/hf_param_counts.py).

  Correspondence: ours with the MLM head == ``*ForMaskedLM`` (which has no pooler) plus a
  pooler (H^2 + H) iff our config has one; ours without a head == ``*Model`` built with
  ``add_pooling_layer=config.pooler``. Bort's Hugging Face port keeps a one-row token-type
  table that our preset drops, so for Bort ours == transformers - H.
  """
  with open(FIXTURE) as f:
    fixture = json.load(f)["presets"]
  assert set(fixture) == set(PRESETS)
  for name, config in PRESETS.items():
    hf = fixture[name]
    h = config.arch.hidden
    extra_types = (config.type_vocab_size - hf["hf_type_vocab_size"]) * h
    pooler = (h * h + h) if config.pooler else 0
    assert cost.param_counts(config, "mlm")["total"] == hf["masked_lm"] + pooler + extra_types
    base = hf["base_model_with_pooler" if config.pooler else "base_model_without_pooler"]
    assert cost.param_counts(config, "none")["total"] == base + extra_types, name
  # The Bort correction is exactly one hidden-sized row.
  assert fixture["bort"]["hf_type_vocab_size"] - PRESETS["bort"].type_vocab_size == 1


def _hf_head_count(config, hf, key):
  """Our count of ``config`` with the head that transformers' class ``key`` has, and that
  class's count corrected for Bort's dropped token-type row."""
  layout = "roberta" if config.family == "roberta" else "bert"
  head = {"sequence_classification_3": model.HeadSpec("classification", 3, layout),
          "sequence_classification_1": model.HeadSpec("regression", layout=layout),
          "multiple_choice": model.HeadSpec("multiple_choice", 2)}[key]
  extra_types = (config.type_vocab_size - hf["hf_type_vocab_size"]) * config.arch.hidden
  # transformers' fine-tuning classes have a pooler exactly when their head reads it.
  ours = cost.param_counts(config.replace(pooler=False), head)["total"]
  return ours, hf[key] + extra_types


def test_task_head_counts_equal_transformers_fixture():
  """Every preset with each fine-tuning class of its family, exactly as transformers counts."""
  with open(FIXTURE) as f:
    fixture = json.load(f)["presets"]
  for name, config in PRESETS.items():
    for key in ("sequence_classification_3", "sequence_classification_1", "multiple_choice"):
      ours, theirs = _hf_head_count(config, fixture[name], key)
      assert ours == theirs, (name, key)


def test_task_head_counts_equal_the_head_fixtures():
  """Our count of each committed fine-tuned checkpoint equals the numbers it stores."""
  from bort_jax.interop import convert, hf_files

  for name in ("bert_seqcls", "bert_mc", "roberta_seqcls", "roberta_regression", "roberta_mc"):
    path = os.path.join(ROOT, "tests", "fixtures", name)
    config, _, head = convert.load_hf_with_head(path)
    stored = sum(v.size for v in hf_files.read_hf_tensors(path).values())
    assert cost.param_counts(config, head)["total"] == stored, name


@pytest.mark.parity
def test_param_counts_equal_live_transformers():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  spec = importlib.util.spec_from_file_location(
      "hf_param_counts", os.path.join(ROOT, "scripts", "hf_param_counts.py"))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  for name in ("bort", "bert-base", "roberta-base"):
    config = PRESETS[name]
    hf = script.hf_counts(config)
    extra_types = (config.type_vocab_size - hf["hf_type_vocab_size"]) * config.arch.hidden
    pooler = cost.param_counts(config)["pooler"]
    assert cost.param_counts(config)["total"] == hf["masked_lm"] + pooler + extra_types, name
    for key in ("sequence_classification_3", "sequence_classification_1", "multiple_choice"):
      ours, theirs = _hf_head_count(config, hf, key)
      assert ours == theirs, (name, key)


def test_paper_percentages_of_bert_large():
  """bort-paper reproduces the paper's 5.5% (effective) and 16% (total) of BERT-large.

  Definition that does it: total = embedding tables + embedding LayerNorm + encoder + pooler
  iff the config has one (BERT-large yes, Bort no) + MLM head (dense, LayerNorm, decoder bias;
  decoder tied); effective = total - (word + position + token-type tables). That gives 5.39%
  and 16.48%. Without the MLM head the effective share is 5.20%, outside 5.5 +- 0.2.
  """
  large = cost.param_counts("bert-large")
  paper = cost.param_counts("bort-paper")
  effective_pct = 100 * paper["effective"] / large["effective"]
  total_pct = 100 * paper["total"] / large["total"]
  assert abs(effective_pct - 5.5) <= 0.2, effective_pct
  assert abs(total_pct - 16.0) <= 1.0, total_pct
  assert paper["embeddings"] == pytest.approx(39e6, rel=0.01)  # the paper's "39M embeddings"
  headless = 100 * (cost.param_counts("bort-paper", "none")["effective"] /
                    cost.param_counts("bert-large", "none")["effective"])
  assert abs(headless - 5.5) > 0.2, headless


def test_released_bort_size():
  counts = cost.param_counts("bort")
  assert 74e6 < cost.param_counts("bort", "none")["total"] < 76e6  # "about 75M"
  assert counts["total"] == 76_208_217
  large = cost.param_counts("bert-large")
  assert 7.5 < 100 * counts["effective"] / large["effective"] < 8.5


def test_task_head_counts_per_layout():
  h = 1024
  bort = cost.param_counts("bort", model.HeadSpec("classification", 3))  # RoBERTa layout
  assert (bort["pooler"], bort["task_head"]) == (0, (h * h + h) + (3 * h + 3))
  as_bert = cost.param_counts("bort", model.HeadSpec("classification", 3, "bert"))
  assert (as_bert["pooler"], as_bert["task_head"]) == (h * h + h, 3 * h + 3)
  choice = cost.param_counts("bort", "multiple_choice")  # pooler + Linear(H, 1) in any layout
  assert (choice["pooler"], choice["task_head"]) == (h * h + h, h + 1)
  assert cost.param_counts("bort", "regression")["task_head"] == (h * h + h) + (h + 1)


def test_bad_head_is_named():
  with pytest.raises(ValueError, match="sparkle"):
    cost.param_counts("bort", head="sparkle")
  with pytest.raises(ValueError, match="num_labels"):
    cost.param_counts("bort", head="classification")


# --- against the model ------------------------------------------------------------------------

@pytest.mark.parametrize("config,head", [
    (TINY, "none"), (TINY, "mlm"), (TINY, ("classification", 3)), (TINY, ("regression", 1)),
    (TINY, ("multiple_choice", 1)), (TINY, ("classification", 3, "roberta")),
    (TINY.replace(pooler=False), ("classification", 2)),  # the BERT layout brings its pooler
    (get_model_config("D2-A2-H32-I64", family="bort", vocab_size=100), ("classification", 3)),
    (get_model_config("D2-A2-H32-I64", family="bort", vocab_size=100), ("multiple_choice", 4)),
    (get_model_config("D2-A2-H32-I64", family="bort", vocab_size=100), "mlm"),
    (get_model_config(Arch(1, 3, 32, 48, head_size=16), family="roberta", vocab_size=90,
                      max_positions=40), "mlm"),
])
def test_param_counts_equal_model_init(config, head):
  from bort_jax.core import model

  spec = model.HeadSpec(*head) if isinstance(head, tuple) else model.HeadSpec(head)
  # Shapes only: eval_shape runs init abstractly, without allocating or initialising.
  params = jax.eval_shape(lambda rng: model.init(rng, config, head=spec, seq_len=8),
                          jax.random.PRNGKey(0))
  assert _leaf_count(params) == cost.param_counts(config, spec)["total"]


# --- FLOPs ------------------------------------------------------------------------------------

def test_count_xla_flops_of_a_matmul():
  a = jnp.ones((8, 32), jnp.float32)
  b = jnp.ones((32, 16), jnp.float32)
  assert cost.count_xla_flops(jnp.matmul, a, b) == 2 * 8 * 32 * 16


def test_forward_flops_are_twice_the_weight_macs():
  # Without attention products, a token's matmul FLOPs are 2 x (its layer weight matrices).
  config = PRESETS["bert-base"]
  flops = cost.forward_flops(config, batch=2, seq_len=128)
  h, i = 768, 3072
  weights = 12 * (4 * h * h + 2 * h * i)
  assert flops["attention_projections"] + flops["ffn"] == 2 * 2 * 128 * weights
  assert flops["attention_scores"] == 12 * 2 * 2 * 2 * 12 * 128 * 128 * 64
  assert flops["pooler"] == 2 * 2 * h * h
  assert flops["total"] == flops["encoder"] + flops["pooler"]


def test_flop_ratio_large_over_bort():
  ratio = (cost.forward_flops("bert-large", 1, 128)["total"] /
           cost.forward_flops("bort", 1, 128)["total"])
  assert 12.5 < ratio < 13.1, ratio  # the matmul-FLOP ratio is 12.8x


SMALL = get_model_config("D2-A2-H64-I128", family="bert", vocab_size=100, max_positions=64)
MEDIUM = get_model_config("D2-A4-H256-I1024", family="bert", vocab_size=1000)
# Bort's layer shape at full width (vocabulary cut, it does not enter the encoder's FLOPs).
BORT_BODY = get_model_config("bort", vocab_size=1000)


def _xla_forward_flops(config, batch, seq_len, head, predictions):
  from bort_jax.core import model

  spec = model.HeadSpec(*head) if isinstance(head, tuple) else model.HeadSpec(head)
  # XLA counts from shapes alone: lower with abstract parameters and inputs.
  params = jax.eval_shape(lambda rng: model.init(rng, config, head=spec, seq_len=seq_len),
                          jax.random.PRNGKey(0))
  inputs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
            for k, v in cost.random_batch(config, batch, seq_len).items()}
  if predictions is not None:
    inputs["masked_positions"] = jax.ShapeDtypeStruct((batch, predictions), jnp.int32)

  def forward(params, inputs):
    return model.apply(params, config, inputs, head=spec, train=False)

  return cost.count_xla_flops(forward, params, inputs), spec


@pytest.mark.parametrize("config,batch,seq_len,head,predictions", [
    (SMALL, 2, 16, "none", None),
    (SMALL, 2, 16, "mlm", 4),
    (SMALL.replace(family="bort", pooler=False, type_vocab_size=0), 2, 16, "mlm", None),
    (MEDIUM, 2, 64, "none", None),
    (SMALL, 2, 16, ("classification", 3), None),
    (SMALL, 2, 16, ("classification", 3, "roberta"), None),
    (MEDIUM.replace(family="bort", pooler=False, type_vocab_size=0), 2, 64, "mlm", None),
])
def test_analytic_flops_match_xla(config, batch, seq_len, head, predictions):
  """Matmuls + the elementwise estimate agree with XLA's count of the compiled model.apply.

  Matmuls alone are 86% of XLA's count for the small shape (H=64) and 95.5% for the medium
  one; at H=32 even the estimate reaches only 84%, because XLA then recomputes cheap
  elementwise producers inside several fusions and counts each copy.
  """
  xla, spec = _xla_forward_flops(config, batch, seq_len, head, predictions)
  flops = cost.forward_flops(config, batch, seq_len, spec, predictions)
  estimate = flops["total_with_elementwise"]
  assert math.isclose(estimate, xla, rel_tol=0.05), (estimate, xla, estimate / xla)
  assert flops["total"] < xla  # matmuls are a strict part of the work


@pytest.mark.parametrize("config,batch,seq_len", [(MEDIUM, 2, 64), (BORT_BODY, 1, 128)])
def test_matmul_flops_match_xla_for_real_widths(config, batch, seq_len):
  xla, _ = _xla_forward_flops(config, batch, seq_len, "none", None)
  matmuls = cost.forward_flops(config, batch, seq_len)["total"]
  assert math.isclose(matmuls, xla, rel_tol=0.05), (matmuls, xla, matmuls / xla)


# --- latency and CLI --------------------------------------------------------------------------

def test_measure_latency_tiny():
  result = cost.measure_latency(TINY, batch=2, seq_len=16, repeats=5, warmup=1)
  assert result["repeats"] == 5
  assert result["compile_s"] > 0
  assert 0 < result["min_ms"] <= result["median_ms"] <= result["max_ms"]
  assert result["arch"] == "D2-A2-H32-I64"


def test_summarize_times():
  summary = cost.summarize_times([0.003, 0.001, 0.002, 0.010])
  assert summary["median_ms"] == pytest.approx(2.5)
  assert summary["min_ms"] == pytest.approx(1.0) and summary["max_ms"] == pytest.approx(10.0)


def test_cli_json_has_the_paper_figures(capsys):
  assert cli_main.main(["cost", "--json"]) == 0
  rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
  assert list(rows) == list(cost.DEFAULT_ARCHS)
  assert rows["bort-paper"]["pct_of_bert-large_effective"] == pytest.approx(5.39, abs=0.01)
  assert rows["bert-large"]["pct_of_bert-large_total"] == pytest.approx(100.0)
  assert rows["bort"]["params_total"] == cost.param_counts("bort")["total"]
  assert rows["bort"]["gflops_forward"] == pytest.approx(
      cost.forward_flops("bort", 1, 128)["total"] / 1e9)


def test_cli_table_and_arch_strings(capsys):
  assert cli_main.main(["cost", "--arch", "D2-A4-H256-I512", "--arch", "bert-large",
                        "--seq-len", "64", "--batch", "2"]) == 0
  out = capsys.readouterr().out
  assert "D2-A4-H256-I512" in out and "% bert-large eff" in out and "GFLOPs" in out
  assert "100.00" in out


def test_cli_measure_tiny(capsys):
  assert cli_main.main(["cost", "--arch", "D1-A2-H32-I64", "--seq-len", "8", "--measure",
                        "--repeats", "2", "--json"]) == 0
  row = json.loads(capsys.readouterr().out)[0]
  assert row["latency_ms"] > 0 and row["compile_s"] > 0


def test_cli_bad_arch_exits_2(capsys):
  assert cli_main.main(["cost", "--arch", "bort", "--arch", "D4-X8"]) == 2
  err = capsys.readouterr().err
  assert "D4-X8" in err
  assert cli_main.main(["cost", "--arch", "bort", "--seq-len", "4096"]) == 2
  assert "4096" in capsys.readouterr().err


def test_back_to_back_timing_warms_up_then_times_each_call():
  calls = []
  times = cost.time_back_to_back(lambda: calls.append(len(calls)), repeats=3, warmup=2)
  assert calls == [0, 1, 2, 3, 4] and len(times) == 3 and all(t >= 0 for t in times)
