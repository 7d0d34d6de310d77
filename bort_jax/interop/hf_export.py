"""``bort-jax convert --to-hf``: our export -> a Hugging Face folder a user loads in one line;
``bort-jax convert --from-hf``: a Hugging Face folder -> our export, its task head kept.

    bort-jax convert --to-hf runs/demo/distill/export --out hf/student
    bort-jax convert --to-hf runs/ft/best --out hf/movie --speed speed.json --results ft.json
    bort-jax convert --from-hf hf/movie --out runs/movie      (then --to-hf runs/movie again)

The folder holds what ``convert.save_hf`` writes (``config.json`` + ``model.safetensors``),
the tokenizer files (``interop.hf_tokenizer``; ``AutoTokenizer.from_pretrained(dir)`` works)
and a model card ``README.md`` (``interop.model_card``), all in one atomic write. A fine-tuned
export (``WORKDIR/best``, with ``finetune.json``) keeps its task head and its class names
(``AutoModelForSequenceClassification`` / ``AutoModelForMultipleChoice``); a pretrained one
keeps its MLM head unless ``--no-mlm-head``.

Every input is checked before anything is written: the checkpoint, the tokenizer (its kind
must fit the family and its ids the vocabulary), the speed and results files.

``import_hf`` writes the export of a fine-tuned Hugging Face folder with a ``finetune.json``
naming its head (kind, num_labels, layout, label names), as fine-tuning does: the tensors alone
cannot tell regression from multiple choice, and without it ``--to-hf`` would find a
classifier it has no class for.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from bort_jax.core import cost
from bort_jax.core.arch import ModelConfig
from bort_jax.core.model import TASK_KINDS, HeadSpec
from bort_jax.data import tokenization
from bort_jax.interop import convert, export, hf_files, hf_layout, hf_tokenizer, model_card
from bort_jax.runtime import fileio

_LICENSE_LINE = re.compile(r"^license:\s*(\S+)\s*$", re.MULTILINE)


def finetuned_head(meta: dict, path: str) -> tuple[HeadSpec, tuple]:
  """The head (and class names) a fine-tuned export's ``finetune.json`` describes.

  Task kinds map to heads as fine-tuning builds them: classification and candidates (a binary
  classifier scored per candidate) -> classification, regression, multiple choice.

  Raises:
    ValueError: the file does not name a head.
  """
  try:
    kind, num_labels = str(meta["kind"]), int(meta["num_labels"])
    if kind in ("classification", "candidates"):
      head = HeadSpec("classification", num_labels, meta.get("layout"))
    else:
      head = HeadSpec(kind, num_labels if kind == "multiple_choice" else 1, meta.get("layout"))
  except (KeyError, TypeError, ValueError) as error:
    raise ValueError(f"{path!r}: {export.FINETUNE_FILE} does not describe a task head "
                     f"({error})") from None
  names = tuple(meta.get("label_names") or ()) if kind == "classification" else ()
  return head, names


def recorded_license(places: list[str]) -> str | None:
  """The licence a base model records: ``license`` in its config.json or its README front matter."""
  for place in places:
    if not place or not os.path.isdir(place):
      continue
    config_path, readme = os.path.join(place, "config.json"), os.path.join(place, "README.md")
    if os.path.isfile(config_path):
      try:
        with open(config_path) as f:
          value = json.load(f).get("license")
      except (OSError, ValueError, AttributeError):
        value = None
      if isinstance(value, str) and value:
        return value
    if os.path.isfile(readme):
      with open(readme, encoding="utf-8", errors="replace") as f:
        text = f.read(4000)
      if text.startswith("---"):
        found = _LICENSE_LINE.search(text.split("---", 2)[1])
        if found:
          return found.group(1)
  return None


def _tokenizer(checkpoint: str, explicit: str, config) -> tuple[Any, str | None]:
  """The tokenizer to write (checked against the model), or (None, None) when none is known."""
  path = hf_tokenizer.find_tokenizer(checkpoint, explicit)
  if path is None:
    return None, None
  try:
    tok = tokenization.load_tokenizer(path, config.family)
  except (OSError, ValueError) as error:
    raise ValueError(f"tokenizer {path!r}: {error}") from None
  if tok.vocab_size > config.vocab_size:
    raise ValueError(f"tokenizer {path!r} has {tok.vocab_size} ids but the model's vocabulary "
                     f"has {config.vocab_size} rows: it belongs to another model (name the "
                     "right one with --tokenizer)")
  return tok, path


def _values_in(path: str) -> int:
  """The number of values in a safetensors file (read from its header)."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  total = 0
  with safe_open(path, framework="numpy") as f:
    for name in f.keys():
      n = 1
      for d in f.get_slice(name).get_shape():
        n *= int(d)
      total += n
  return total


def export_hf(checkpoint: str, out: str, *, tokenizer: str = "", speed: str = "",
              results: str = "", no_mlm_head: bool = False) -> dict:
  """Writes the Hugging Face folder of an export (see the module docstring).

  Args:
    checkpoint: our export (``export.save`` format, fine-tuned or not).
    out: the folder to write (replaced whole if it exists).
    tokenizer: the tokenizer folder ("" = the one recorded with the checkpoint).
    speed: optional JSON of measured speed (``bort-jax cost --measure --json``).
    results: optional JSON of fine-tuning results (its numbers go in a table).
    no_mlm_head: leave the MLM head out.

  Returns:
    ``{"out", "config", "head", "parameters", "tokenizer", "files"}``.
  """
  config, params = export.load(checkpoint)
  head, names, meta = None, (), export.read_head(checkpoint)
  if meta is not None:
    head, names = finetuned_head(meta, checkpoint)
  meta = meta or {}
  if no_mlm_head:
    params = {k: v for k, v in params.items() if k != "mlm_head"}
  if head is None:
    head = HeadSpec("mlm") if "mlm_head" in params else HeadSpec("none")
  head = head.resolve(config.family)
  params, config = convert.drop_unplaced_pooler(params, config, head)
  tok, tok_path = _tokenizer(checkpoint, tokenizer, config)
  speed_rows = model_card.speed_rows(model_card.read_json(speed, "--speed"), speed) \
      if speed else []
  numbers = model_card.results_numbers(model_card.read_json(results, "--results"), results) \
      if results else {}
  fields, metrics, source = model_card.run_record(checkpoint)
  card = model_card.Card(
      name=os.path.basename(os.path.abspath(out)), family=config.family, arch=str(config.arch),
      hf_class=hf_layout.hf_architecture(config, head), head=head.kind,
      num_labels=head.outputs if head.kind == "classification" else 0, label_names=names,
      counts=cost.param_counts(config, head), vocab_size=config.vocab_size,
      max_length=config.max_length, speed=speed_rows, speed_source=os.path.basename(speed),
      training=fields, training_source=source, last_metrics=metrics,
      finetune={k: v for k, v in meta.items() if k in ("task", "metric", "value", "step")},
      results=numbers, results_source=os.path.basename(results),
      license=recorded_license([checkpoint, tok_path or ""]
                               + [str(v) for k, v in _recorded_paths(checkpoint)]))
  written: dict = {}

  def extra(tmp: str) -> None:
    card.exported_values = _values_in(os.path.join(tmp, "model.safetensors"))
    if tok is not None:
      card.tokenizer_files = tuple(hf_tokenizer.write_hf_tokenizer(tok, tmp, config.max_length))
    with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
      f.write(model_card.render(card))
    written["files"] = sorted(os.listdir(tmp))

  convert.save_hf(params, config, out, head, label_names=names, extra=extra)
  return {"out": out, "config": config, "head": head, "parameters": card.exported_values,
          "tokenizer": tok_path, "files": written["files"]}


def import_hf(path: str, out: str, *, no_mlm_head: bool = False, family: str | None = None
              ) -> tuple[ModelConfig, dict]:
  """Writes our export of a Hugging Face folder; a task head gets a ``finetune.json``.

  Args:
    path: the Hugging Face checkpoint directory.
    out: the export folder to write (replaced whole if it exists, in one atomic write).
    no_mlm_head: leave the MLM head out.
    family: force "bert", "roberta" or "bort" (otherwise read from config.json).

  Returns:
    ``(config, params)`` as written.
  """
  hf_config = hf_files.read_hf_config(path)  # first: a wrong path gets the plainest message
  config, params, head = convert.hf_to_model(
      hf_files.read_hf_tensors(path), hf_config, with_mlm_head=False if no_mlm_head else None,
      family=family)
  if head.kind not in TASK_KINDS:
    export.save(out, params, config)
    return config, params
  meta = head_record(head, hf_config)
  with fileio.atomic_dir(out) as tmp:
    export.save_with_head(tmp, params, config, meta)
  return config, params


def head_record(head: HeadSpec, hf_config: dict) -> dict:
  """The ``finetune.json`` of an imported task head: what :func:`finetuned_head` reads back.

  Class names come from config.json's ``id2label`` (a classification head only).
  """
  record = {"kind": head.kind, "num_labels": head.num_labels, "layout": head.layout}
  id2label = hf_config.get("id2label")
  id2label = id2label if isinstance(id2label, dict) else {}
  names = [id2label.get(str(i)) for i in range(head.num_labels)]
  if head.kind == "classification" and None not in names:
    record["label_names"] = [str(n) for n in names]
  return record


def _recorded_paths(checkpoint: str) -> list[tuple[str, str]]:
  """Absolute model paths recorded in the run's config.json (teacher, student, init)."""
  run_config = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.json")
  if not os.path.isfile(run_config):
    return []
  try:
    with open(run_config) as f:
      flat = model_card.flatten(json.load(f))
  except (OSError, ValueError):
    return []
  return [(k, v) for k, v in flat.items()
          if k in ("teacher.path", "student.path", "init.path") and isinstance(v, str) and v]
