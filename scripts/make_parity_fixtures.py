"""Regenerates the Hugging Face parity fixtures under tests/fixtures/.

Needs the ``parity`` extra (torch + transformers; ``pip install -e .[parity]``)::

    python scripts/make_parity_fixtures.py [--out tests/fixtures]

For each fixture it builds a tiny transformers model (hidden 32, 2 layers), fills every
parameter with seeded random values (LayerNorm scales around 1, everything else around 0, so a
swapped or mis-transposed tensor cannot hide behind the default init), saves it as a Hugging
Face directory (config.json + model.safetensors, or pytorch_model.bin for the torch-free
reader) and writes ``expected.npz``: a right-padded batch and transformers' float32 eval-mode
outputs (every hidden state, MLM or task logits, pooler output where the model has one).

The fine-tuned fixtures carry the task heads of both families: ``BertForSequenceClassification``
(pooler -> classifier), ``RobertaForSequenceClassification`` (classifier.dense -> out_proj; one
with 3 labels, one regression) and ``*ForMultipleChoice`` (pooler -> Linear(H, 1) per choice,
batch ``[2 examples, 3 choices, T]``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import torch
import transformers

_SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
# Lengths of the batch's rows: full, middle, short, so every row but one has padding.
_LENGTHS = (12, 7, 4)
# Multiple choice: 2 examples x 3 choices, flattened row-major into these lengths.
_CHOICE_LENGTHS = (12, 7, 4, 9, 12, 5)
_CHOICES = 3


def _bert_config(**fields):
  return transformers.BertConfig(**_SHAPE, vocab_size=120, max_position_embeddings=64,
                                 type_vocab_size=2, pad_token_id=0, **fields)


def _roberta_config(**fields):
  return transformers.RobertaConfig(**_SHAPE, vocab_size=150, max_position_embeddings=66,
                                    type_vocab_size=1, pad_token_id=1, bos_token_id=0,
                                    eos_token_id=2, layer_norm_eps=1e-5, **fields)


def _bort_config():
  # The shape of the Hugging Face Bort port's config (a BertForMaskedLM with one token type,
  # eps 1e-5, pad 1), with a small vocabulary instead of RoBERTa's 50,265 ids.
  return transformers.BertConfig(**_SHAPE, vocab_size=130, max_position_embeddings=64,
                                 type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5)


# name -> (model class, config factory, seed, file format)
FIXTURES = {
    "bert_mlm": ("BertForMaskedLM", _bert_config, 1, "safetensors"),
    "bert_base": ("BertModel", _bert_config, 2, "safetensors"),
    "roberta_mlm": ("RobertaForMaskedLM", _roberta_config, 3, "safetensors"),
    # gelu_new (tanh approximation) exercises the "gelu_tanh" activation.
    "roberta_base": ("RobertaModel", lambda: _roberta_config(hidden_act="gelu_new"), 4,
                     "safetensors"),
    "bort_mlm": ("BertForMaskedLM", _bort_config, 5, "safetensors"),
    # The same weights as bert_mlm, written by torch.save: the torch-free reader must agree.
    "bert_mlm_bin": ("BertForMaskedLM", _bert_config, 1, "bin"),
    # Fine-tuned checkpoints with their heads.
    "bert_seqcls": ("BertForSequenceClassification", lambda: _bert_config(num_labels=3), 6,
                    "safetensors"),
    "bert_mc": ("BertForMultipleChoice", _bert_config, 7, "safetensors"),
    "roberta_seqcls": ("RobertaForSequenceClassification", lambda: _roberta_config(num_labels=3),
                       8, "safetensors"),
    "roberta_regression": ("RobertaForSequenceClassification",
                           lambda: _roberta_config(num_labels=1, problem_type="regression"), 9,
                           "safetensors"),
    "roberta_mc": ("RobertaForMultipleChoice", _roberta_config, 10, "safetensors"),
}


def randomise(model: torch.nn.Module, seed: int, zero_token_types: bool = False) -> None:
  """Overwrites every parameter with seeded random values (ties stay tied)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=gen) * 0.2
      if "LayerNorm" in name or "layer_norm" in name:
        param.copy_(1.0 + noise if name.endswith("weight") else noise)
      else:
        param.copy_(noise)
      if zero_token_types and "token_type_embeddings" in name:
        param.zero_()  # The Bort port's single token-type row is all zeros.


def make_batch(config, seed: int, choices: bool = False) -> dict[str, np.ndarray]:
  """A right-padded batch; token types alternate halves for BERT, zeros otherwise.

  With ``choices`` the rows are ``[examples, choices, T]`` (multiple choice).
  """
  lengths = _CHOICE_LENGTHS if choices else _LENGTHS
  rng = np.random.default_rng(seed)
  batch, length = len(lengths), max(lengths)
  ids = np.full((batch, length), config.pad_token_id, np.int64)
  mask = np.zeros((batch, length), np.int64)
  types = np.zeros((batch, length), np.int64)
  for row, n in enumerate(lengths):
    # Ids from 3 up: never the pad id, so RoBERTa's position numbering sees real tokens.
    ids[row, :n] = rng.integers(3, config.vocab_size, n)
    mask[row, :n] = 1
    if config.type_vocab_size > 1:
      types[row, n // 2:n] = 1
  out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
  if choices:
    out = {k: v.reshape(-1, _CHOICES, length) for k, v in out.items()}
  return out


def build(name: str, out_root: str) -> dict:
  """Builds, saves and runs one fixture model; returns its manifest entry."""
  class_name, make_config, seed, fmt = FIXTURES[name]
  config = make_config()
  torch.manual_seed(seed)
  model = getattr(transformers, class_name)(config).eval()
  randomise(model, seed, zero_token_types=name.startswith("bort"))
  out = os.path.join(out_root, name)
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(out)
  if fmt == "bin":
    config.architectures = [class_name]
    config.save_pretrained(out)
    torch.save(model.state_dict(), os.path.join(out, "pytorch_model.bin"))
  else:
    model.save_pretrained(out)
  for extra in os.listdir(out):  # keep only what a checkpoint needs
    if extra not in ("config.json", "model.safetensors", "pytorch_model.bin"):
      os.remove(os.path.join(out, extra))

  batch = make_batch(config, seed, choices=class_name.endswith("ForMultipleChoice"))
  with torch.no_grad():
    outputs = model(**{k: torch.from_numpy(v) for k, v in batch.items()},
                    output_hidden_states=True)
  expected = {k: v.astype(np.int32) for k, v in batch.items()}
  expected["all_hidden"] = np.stack([h.numpy() for h in outputs.hidden_states]).astype(np.float32)
  if getattr(outputs, "logits", None) is not None:
    expected["logits"] = outputs.logits.numpy().astype(np.float32)
  if getattr(outputs, "pooler_output", None) is not None:
    expected["pooled"] = outputs.pooler_output.numpy().astype(np.float32)
  np.savez_compressed(os.path.join(out, "expected.npz"), **expected)
  return {"class": class_name, "seed": seed, "format": fmt,
          "outputs": sorted(k for k in expected if k not in batch)}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests",
                                                    "fixtures"))
  parser.add_argument("--only", nargs="+", choices=sorted(FIXTURES), metavar="NAME",
                      help="rebuild these fixtures only, keeping the others and their manifest "
                           "entries as they are")
  args = parser.parse_args(argv)
  torch.set_num_threads(1)
  manifest_path = os.path.join(args.out, "parity_manifest.json")
  versions = {"torch": torch.__version__, "transformers": transformers.__version__}
  if args.only:
    with open(manifest_path) as f:
      manifest = json.load(f)
    # The top-level versions are those of the last full run; a partial run notes its own.
    manifest["fixtures"].update({name: dict(build(name, args.out), **versions)
                                 for name in args.only})
  else:
    manifest = dict(versions, fixtures={name: build(name, args.out) for name in FIXTURES})
  with open(manifest_path, "w") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
  total = sum(os.path.getsize(os.path.join(root, f))
              for root, _, files in os.walk(args.out) for f in files)
  print(f"wrote {len(args.only or FIXTURES)} fixtures to {args.out}: {total / 1e6:.2f} MB in all")


if __name__ == "__main__":
  main()
