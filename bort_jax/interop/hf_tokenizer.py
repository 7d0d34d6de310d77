"""The tokenizer files of a Hugging Face export, and where a checkpoint's tokenizer is.

A Hugging Face directory is loadable in one line (``AutoTokenizer.from_pretrained(dir)``) when
it holds the tokenizer beside the weights. :func:`write_hf_tokenizer` writes, from the
tokenizer the model was trained with (``data.tokenization.Tokenizer``):

* ``tokenizer.json``: our backend with the family's special-token template as its
  post-processor (ours applies the template in Python, :meth:`Tokenizer.build_inputs`), so
  that the ``tokenizers`` package alone gives the ids we feed the model: ``[CLS] A [SEP] B
  [SEP]`` with token types 0/1 for WordPiece, ``<s> A </s></s> B </s>`` for byte-level BPE.
  Padding and truncation are left to the caller.
* the slow-tokenizer files of the kind: ``vocab.txt`` (WordPiece) or ``vocab.json`` +
  ``merges.txt`` (BPE), written by the backend's model;
* ``tokenizer_config.json``: the transformers class (``BertTokenizer``, or
  ``RobertaTokenizer`` for RoBERTa and Bort, whose config says ``model_type`` bert), the
  normaliser's settings (lower-casing, accents, Chinese characters) read from the backend,
  the special tokens and ``model_max_length``;
* ``special_tokens_map.json``.

:func:`find_tokenizer` decides which tokenizer a checkpoint goes with: an explicit directory,
else the ``tokenizer/`` folder a fine-tuned export carries, else tokenizer files in the
checkpoint itself, else the tokenizer recorded in the run's ``config.json`` beside the export
(``tokenizer`` of a fine-tuning run, ``data.tokenizer`` of distillation and teacher-adapt).
"""

from __future__ import annotations

import json
import os

import tokenizers
from tokenizers import processors

from bort_jax.data import tokenization

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt")
# The transformers tokenizer class of each tokenizer kind.
HF_CLASS = {"wordpiece": "BertTokenizer", "bpe": "RobertaTokenizer"}
_ROLES = ("cls", "sep", "pad", "mask", "unk")


def has_tokenizer_files(path: str) -> bool:
  """Whether ``path`` is a directory with tokenizer files (see ``load_tokenizer``)."""
  return os.path.isdir(path) and (
      any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.txt"))
      or all(os.path.exists(os.path.join(path, f)) for f in ("vocab.json", "merges.txt")))


def _recorded(checkpoint: str) -> str | None:
  """The tokenizer named by the run's ``config.json`` one level above the export."""
  run_config = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.json")
  if not os.path.isfile(run_config):
    return None
  try:
    with open(run_config) as f:
      recorded = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(recorded, dict):
    return None
  data = recorded.get("data") if isinstance(recorded.get("data"), dict) else {}
  for value in (recorded.get("tokenizer"), data.get("tokenizer")):
    if isinstance(value, str) and value and has_tokenizer_files(os.path.expanduser(value)):
      return os.path.expanduser(value)
  return None


def find_tokenizer(checkpoint: str, explicit: str = "") -> str | None:
  """The tokenizer directory that goes with ``checkpoint`` (see the module docstring).

  Args:
    checkpoint: the export being converted.
    explicit: a directory the user named (``--tokenizer``); it must hold tokenizer files.

  Returns:
    The directory, or None when nothing is recorded anywhere.

  Raises:
    ValueError: ``explicit`` is given but holds no tokenizer files.
  """
  if explicit:
    path = os.path.expanduser(explicit)
    if not has_tokenizer_files(path):
      raise ValueError(f"--tokenizer {explicit!r} is not a directory with tokenizer files "
                       f"({', '.join(TOKENIZER_FILES)}): name the folder of the tokenizer the "
                       "model was trained with")
    return path
  for path in (os.path.join(checkpoint, "tokenizer"), checkpoint):
    if has_tokenizer_files(path):
      return path
  return _recorded(checkpoint)


def _normaliser_settings(backend: tokenizers.Tokenizer) -> dict:
  """``do_lower_case``, ``strip_accents`` and ``tokenize_chinese_chars`` of a BERT normaliser."""
  normalizer = json.loads(backend.to_str()).get("normalizer") or {}
  if normalizer.get("type") != "BertNormalizer":
    return {}
  lowercase = bool(normalizer.get("lowercase", False))
  return {"do_lower_case": lowercase, "strip_accents": normalizer.get("strip_accents"),
          "tokenize_chinese_chars": bool(normalizer.get("handle_chinese_chars", True))}


def hf_backend(tok: tokenization.Tokenizer) -> tokenizers.Tokenizer:
  """A copy of ``tok``'s backend that adds the family's specials itself (no padding/truncation)."""
  backend = tokenizers.Tokenizer.from_str(tok.backend.to_str())
  names = tok.special_tokens
  cls, sep = (names["cls"], tok.cls_id), (names["sep"], tok.sep_id)
  if tok.kind == "wordpiece":
    backend.post_processor = processors.BertProcessing(sep, cls)
  else:
    backend.post_processor = processors.RobertaProcessing(sep, cls, trim_offsets=True,
                                                          add_prefix_space=False)
  backend.no_padding()
  backend.no_truncation()
  return backend


def write_hf_tokenizer(tok: tokenization.Tokenizer, out_dir: str, model_max_length: int
                       ) -> list[str]:
  """Writes the tokenizer files of a Hugging Face directory (see the module docstring).

  Args:
    tok: the tokenizer the model was trained with.
    out_dir: an existing directory.
    model_max_length: the longest input the model takes (its position table).

  Returns:
    The names of the files written.
  """
  backend = hf_backend(tok)
  backend.save(os.path.join(out_dir, "tokenizer.json"))
  written = ["tokenizer.json"]
  written += [os.path.basename(p) for p in backend.model.save(out_dir)]
  specials = {f"{role}_token": tok.special_tokens[role] for role in _ROLES}
  if tok.kind == "bpe":
    specials["bos_token"], specials["eos_token"] = specials["cls_token"], specials["sep_token"]
  config = {"tokenizer_class": HF_CLASS[tok.kind], "model_max_length": int(model_max_length),
            "clean_up_tokenization_spaces": False, **specials}
  if tok.kind == "wordpiece":
    config.update(_normaliser_settings(backend))
  else:
    config.update(add_prefix_space=False, trim_offsets=True)
  for name, content in (("tokenizer_config.json", config),
                        ("special_tokens_map.json", specials)):
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
      json.dump(content, f, indent=2, sort_keys=True)
    written.append(name)
  return sorted(written)
