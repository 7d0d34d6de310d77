"""Writes tests/fixtures/hf_param_counts.json: what transformers counts for every preset.

Each preset's shape is built as the transformers model of its family (BERT and Bort:
``BertForMaskedLM`` / ``BertModel``; RoBERTa: ``RobertaForMaskedLM`` / ``RobertaModel``; and the
fine-tuning classes ``*ForSequenceClassification`` with 3 labels and 1 (regression) and
``*ForMultipleChoice``) on the meta device, so nothing is allocated, and its parameters are
counted (tied weights once).
Bort is built as the Hugging Face port had it: a BERT with the RoBERTa vocabulary, 512
positions and a one-row token-type table (our ``bort`` preset drops that row).

Run it in an environment with the ``parity`` extra (torch and transformers), made with
``python3 -m venv .venv && .venv/bin/pip install -e '.[parity]'``:

    .venv/bin/python scripts/hf_param_counts.py [--out tests/fixtures/hf_param_counts.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bort_jax.core.arch import PRESETS, ModelConfig  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                           "fixtures", "hf_param_counts.json")


def hf_type_vocab_size(config: ModelConfig) -> int:
  """Rows of the token-type table in the transformers model (Bort's port kept one)."""
  return max(config.type_vocab_size, 1)


def hf_classes(config: ModelConfig):
  """The transformers (config class, masked-LM class, base-model class) of a family."""
  import transformers

  if config.family == "roberta":
    return (transformers.RobertaConfig, transformers.RobertaForMaskedLM,
            transformers.RobertaModel)
  return transformers.BertConfig, transformers.BertForMaskedLM, transformers.BertModel


def hf_config(config: ModelConfig):
  """A transformers config with the same shape and family fields as ``config``."""
  config_class, _, _ = hf_classes(config)
  arch = config.arch
  if arch.attention_size != arch.hidden:
    raise ValueError(f"transformers BERT needs heads * head_size == hidden; {arch} has not")
  return config_class(
      vocab_size=config.vocab_size, hidden_size=arch.hidden, num_hidden_layers=arch.depth,
      num_attention_heads=arch.heads, intermediate_size=arch.intermediate,
      max_position_embeddings=config.max_positions,
      type_vocab_size=hf_type_vocab_size(config), layer_norm_eps=config.layer_norm_eps,
      pad_token_id=config.pad_id, hidden_act="gelu", tie_word_embeddings=True)


def count(module) -> int:
  # parameters() yields a tied tensor once, as transformers' num_parameters() does.
  return sum(p.numel() for p in module.parameters())


def hf_counts(config: ModelConfig) -> dict:
  """Parameter counts of the transformers models of ``config``, built on the meta device."""
  import torch

  _, mlm_class, base_class = hf_classes(config)
  cfg = hf_config(config)
  with torch.device("meta"):
    masked_lm = mlm_class(cfg)
    with_pooler = base_class(cfg, add_pooling_layer=True)
    without_pooler = base_class(cfg, add_pooling_layer=False)
  return {
      "masked_lm_class": mlm_class.__name__,
      "hf_type_vocab_size": hf_type_vocab_size(config),
      "hidden": config.arch.hidden,
      "masked_lm": count(masked_lm),
      "base_model_with_pooler": count(with_pooler),
      "base_model_without_pooler": count(without_pooler),
      **task_head_counts(config),
  }


def task_head_counts(config: ModelConfig) -> dict:
  """Counts of the fine-tuning classes of ``config``'s family, with their heads."""
  import torch
  import transformers

  name = "Roberta" if config.family == "roberta" else "Bert"
  counts = {}
  for key, class_suffix, labels in (("sequence_classification_3", "ForSequenceClassification", 3),
                                    ("sequence_classification_1", "ForSequenceClassification", 1),
                                    ("multiple_choice", "ForMultipleChoice", 2)):
    cfg = hf_config(config)
    cfg.num_labels = labels
    with torch.device("meta"):
      counts[key] = count(getattr(transformers, name + class_suffix)(cfg))
  return counts


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=DEFAULT_OUT, help="where to write the JSON fixture")
  args = parser.parse_args(argv)
  import torch
  import transformers

  data = {
      "generated_by": "scripts/hf_param_counts.py",
      "transformers_version": transformers.__version__,
      "torch_version": torch.__version__,
      "presets": {name: hf_counts(config) for name, config in sorted(PRESETS.items())},
  }
  out = os.path.normpath(os.path.abspath(args.out))
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(data, f, indent=2, sort_keys=True)
    f.write("\n")
  print(f"wrote {len(data['presets'])} presets to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
