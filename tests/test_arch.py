"""Architectures, presets and search spaces; the command-line dispatcher."""

import pytest

from bort_jax import main as cli_main
from bort_jax.core.arch import (Arch, ModelConfig, PRESETS, SearchSpace, get_model_config,
                           heads_divide_hidden)


def test_arch_strings_round_trip():
  arch = Arch.parse("D4-A8-H1024-I768")
  assert arch == Arch(4, 8, 1024, 768) and arch.head_size == 128
  assert str(arch) == "D4-A8-H1024-I768"
  padded = Arch(2, 16, 512, 256, head_size=128)
  assert str(padded) == "D2-A16-H512-I256-S128"
  assert Arch.parse(str(padded)) == padded
  assert padded.attention_size == 2048


@pytest.mark.parametrize("text", ["D4-A8-H1024", "bort-large", "D0-A8-H1024-I768", "d4-a8-h1024-i768"])
def test_bad_arch_strings_are_refused(text):
  with pytest.raises(ValueError):
    Arch.parse(text)


def test_arch_needs_divisible_heads_or_a_head_size():
  with pytest.raises(ValueError, match="not divisible"):
    Arch(2, 3, 128, 256)
  assert Arch(2, 3, 128, 256, head_size=40).attention_size == 120


def test_presets_are_the_documented_shapes():
  expected = {"bort": (4, 8, 1024, 768), "bort-paper": (4, 8, 768, 1024),
              "bert-base": (12, 12, 768, 3072), "bert-large": (24, 16, 1024, 4096),
              "roberta-base": (12, 12, 768, 3072), "roberta-large": (24, 16, 1024, 4096),
              "minilm-l6-h384": (6, 12, 384, 1536)}
  assert {name: PRESETS[name].arch.tuple for name in PRESETS} == expected
  bort = PRESETS["bort"]
  assert (bort.vocab_size, bort.max_positions, bort.position_offset, bort.type_vocab_size,
          bort.pad_id, bort.pooler) == (50265, 512, 0, 0, 1, False)
  assert (bort.layer_norm_eps, bort.mlm_layer_norm_eps) == (1e-5, 1e-12)
  roberta = PRESETS["roberta-large"]
  assert (roberta.max_positions, roberta.position_offset, roberta.max_length) == (514, 2, 512)


def test_model_config_resolution_and_serialisation():
  config = get_model_config("D2-A4-H256-I512", family="bert", vocab_size=1000)
  assert config.family == "bert" and config.vocab_size == 1000
  assert ModelConfig.from_dict(config.to_dict()) == config
  assert get_model_config("bort").replace(arch="D2-A2-H64-I128").arch == Arch(2, 2, 64, 128)
  with pytest.raises(ValueError, match="unknown model family"):
    get_model_config("D2-A4-H256-I512", family="gpt")
  with pytest.raises(ValueError, match="pad_id"):
    get_model_config("bort", vocab_size=1)


def test_paper_space_has_300_members_with_both_bort_shapes():
  space = SearchSpace.paper()
  members = space.enumerate()
  assert len(space) == len(members) == 300
  assert len(set(members)) == 300
  assert all(heads_divide_hidden(a) for a in members)
  assert PRESETS["bort"].arch in space and PRESETS["bort-paper"].arch in space
  # 6 depths x 5 FFN sizes x 10 (heads, hidden) pairs with A | H.
  assert len({(a.heads, a.hidden) for a in members}) == 10


def test_space_errors_and_constraints():
  with pytest.raises(ValueError, match="no values for depth"):
    SearchSpace(depth=(), heads=(2,), hidden=(64,), intermediate=(64,))
  only_wide = SearchSpace(depth=(1, 2), heads=(2, 4), hidden=(64, 128), intermediate=(64,),
                          constraints=(heads_divide_hidden, lambda a: a.hidden >= 128))
  assert {a.hidden for a in only_wide} == {128} and len(only_wide) == 4
  none_left = SearchSpace(depth=(1,), heads=(3,), hidden=(64,), intermediate=(64,))
  assert none_left.enumerate() == []


def test_cli_usage_and_unknown_mode(capsys):
  assert cli_main.main([]) == 0
  assert "extract" in capsys.readouterr().out
  assert cli_main.main(["frobnicate"]) == 2
  assert "unknown mode 'frobnicate'" in capsys.readouterr().err
  assert cli_main.main(["data"]) == 2
