"""The model card (``README.md``) of a Hugging Face export: only what is known or measured.

:func:`render` turns a :class:`Card` into Markdown with a Hugging Face metadata header. Every
section comes from a recorded source and says which: the architecture and the exact parameter
counts from the config (``core.cost.param_counts``, and the number of values in the exported
tensors); the measured speed from a JSON file the caller passes (``bort-jax cost --measure
--json`` rows, or any dict of numbers); how it was trained from the run's ``config.json``,
``metrics.jsonl`` and ``finetune.json`` beside the export; fine-tuning results from a JSON
file; the licence when one is recorded. A section without a source says "not recorded" rather
than guessing, and no number is rounded into a claim: values are printed as found.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable

from bort_jax.runtime import fileio

PIPELINE_TAG = {"mlm": "fill-mask", "none": "feature-extraction",
                "classification": "text-classification", "regression": "text-classification",
                "multiple_choice": "multiple-choice"}
# Fields of a run's config.json worth a line in "How it was trained" (dotted paths).
TRAINING_FIELDS = ("task", "teacher.kind", "teacher.path", "student.arch", "student.path",
                   "init.path", "init.kind", "data.corpus_files", "data.tokenizer", "seq_len",
                   "batch_size", "train.total_steps", "train.batch_size", "train.seq_len",
                   "train.epochs", "optim.name", "optim.lr", "optim.weight_decay",
                   "optim.warmup", "loss.kind", "loss.alpha", "loss.temperature", "seed")


@dataclasses.dataclass
class Card:
  """What a model card says.

  Attributes:
    name: the export's folder name (the model's name on the card).
    family: ``bert``, ``roberta`` or ``bort``.
    arch: the arch string (``D4-A8-H1024-I768``).
    hf_class: the transformers class config.json names.
    head: the head kind (``mlm``, ``none``, ``classification``, ...).
    num_labels: outputs of a task head.
    label_names: names of the classes, when known.
    counts: ``cost.param_counts`` of the model with its head.
    exported_values: values in ``model.safetensors``.
    vocab_size, max_length: of the model.
    tokenizer_files: the tokenizer files written ([] when none was found).
    speed: rows of measured speed (dicts), with ``speed_source`` the file they came from.
    training: a run's recorded fields (dotted name -> value), with ``training_source``.
    last_metrics: the last logged metrics of that run.
    finetune: ``finetune.json`` of a fine-tuned export ({} otherwise).
    results: fine-tuning results (dotted name -> number), with ``results_source``.
    license: SPDX identifier of the base model's licence, when recorded.
  """

  name: str
  family: str
  arch: str
  hf_class: str
  head: str
  num_labels: int = 0
  label_names: tuple = ()
  counts: dict = dataclasses.field(default_factory=dict)
  exported_values: int = 0
  vocab_size: int = 0
  max_length: int = 0
  tokenizer_files: tuple = ()
  speed: list = dataclasses.field(default_factory=list)
  speed_source: str = ""
  training: dict = dataclasses.field(default_factory=dict)
  training_source: str = ""
  last_metrics: dict = dataclasses.field(default_factory=dict)
  finetune: dict = dataclasses.field(default_factory=dict)
  results: dict = dataclasses.field(default_factory=dict)
  results_source: str = ""
  license: str | None = None


# ----------------------------------------------------------------------------- reading sources


def flatten(value: Any, prefix: str = "") -> dict:
  """Dotted names of the numeric, string and boolean leaves of nested dicts (lists: indices)."""
  out: dict = {}
  if isinstance(value, dict):
    items: Iterable = value.items()
  elif isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list)) for v in value):
    items = enumerate(value)
  else:
    return {prefix: value} if prefix else {}
  for key, item in items:
    out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
  return out


def read_json(path: str, what: str, expected: str = "") -> Any:
  """A JSON file the user named; ValueError (naming ``what``) if missing or not JSON.

  ``expected`` (what the file should be) ends the message, so it says what is allowed.
  """
  tail = f"; {expected}" if expected else ""
  if not os.path.isfile(path):
    raise ValueError(f"{what} {path!r} is not a file{tail}")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except ValueError as error:
    raise ValueError(f"{what} {path!r} is not JSON: {error}{tail}") from None


def speed_rows(data: Any, path: str) -> list[dict]:
  """Speed rows from ``bort-jax cost --measure --json`` output (a list) or one dict.

  Raises:
    ValueError: the file holds no dict with a measured number.
  """
  rows = data if isinstance(data, list) else [data]
  rows = [r for r in rows if isinstance(r, dict)]
  measured = [r for r in rows if any(_is_number(v) for k, v in r.items()
                                     if "ms" in k or "per_second" in k or "latency" in k)]
  if not measured:
    raise ValueError(f"--speed {path!r} holds no measured latency or throughput (expected the "
                     "rows of `bort-jax cost --measure --json`, or a dict with *_ms fields)")
  return measured


def results_numbers(data: Any, path: str) -> dict:
  """Every numeric leaf of a results JSON, by dotted name.

  Raises:
    ValueError: the file holds no number.
  """
  numbers = {k: v for k, v in flatten(data).items() if _is_number(v)}
  if not numbers:
    raise ValueError(f"--results {path!r} holds no numbers to report")
  return numbers


def run_record(checkpoint: str) -> tuple[dict, dict, str]:
  """The recorded fields and last metrics of the run whose export ``checkpoint`` is.

  Returns:
    ``(fields, last metrics, source)``: :data:`TRAINING_FIELDS` found in the run's
    ``config.json`` one level up, the last values of its ``metrics.jsonl``, and the folder
    name they came from ("" when there is no record).
  """
  run_dir = os.path.dirname(os.path.abspath(checkpoint))
  fields, metrics = {}, {}
  config_path = os.path.join(run_dir, "config.json")
  if os.path.isfile(config_path):
    try:
      with open(config_path) as f:
        flat = flatten(json.load(f))
      fields = {k: _plain(flat[k]) for k in TRAINING_FIELDS if k in flat and flat[k] != ""}
    except (OSError, ValueError):
      fields = {}
  for record in fileio.read_jsonl(os.path.join(run_dir, "metrics.jsonl")):
    if isinstance(record, dict):
      metrics.update({k: v for k, v in record.items() if _is_number(v)})
  source = os.path.basename(run_dir) if (fields or metrics) else ""
  return fields, metrics, source


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plain(value: Any) -> Any:
  """A recorded value for the card: absolute paths keep only their last two parts (the
  folder layout of the machine that trained the model says nothing to a reader)."""
  if isinstance(value, str) and ":/" in value:  # extract:/abs/path
    prefix, _, path = value.partition(":")
    return f"{prefix}:{_plain(path)}"
  if isinstance(value, str) and os.path.isabs(value):
    return os.path.join(*value.rstrip("/").split("/")[-2:])
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


# ----------------------------------------------------------------------------- rendering


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.6g}"
  if isinstance(value, int) and not isinstance(value, bool):
    return f"{value:,}"
  return str(value)


def _front_matter(card: Card) -> list[str]:
  lines = ["---", "library_name: transformers", f"pipeline_tag: {PIPELINE_TAG[card.head]}",
           "tags:", "- bort_jax", f"- {card.family}"]
  if card.license:
    lines.append(f"license: {card.license}")
  return lines + ["---", ""]


def _size_lines(card: Card) -> list[str]:
  c = card.counts
  lines = ["## Architecture and size", "",
           f"- family `{card.family}`, architecture `{card.arch}` (depth-attention heads-hidden-"
           f"intermediate), transformers class `{card.hf_class}`, head `{card.head}`"
           + (f" with {card.num_labels} outputs" if card.num_labels else ""),
           f"- vocabulary {card.vocab_size:,} ids, inputs up to {card.max_length:,} tokens"]
  if c:
    lines.append(f"- parameters (exact, `bort_jax.core.cost`): {c['total']:,} in total, "
                 f"{c['effective']:,} without the embedding tables; the word, position and "
                 f"token-type tables hold {c['embeddings']:,}")
  if card.exported_values:
    lines.append(f"- values in `model.safetensors`: {card.exported_values:,} (the tied MLM "
                 "decoder is stored once; a Bort export adds a zero token-type row)")
  if card.label_names:
    lines.append("- labels: " + ", ".join(f"{i} `{n}`" for i, n in enumerate(card.label_names)))
  return lines + [""]


def _speed_lines(card: Card) -> list[str]:
  lines = ["## Measured speed", ""]
  if not card.speed:
    return lines + ["Not measured for this export (pass `--speed` with the JSON of "
                    "`bort-jax cost --measure --json` to record it).", ""]
  keys = []
  for row in card.speed:
    keys += [k for k in row if k not in keys and (_is_number(row[k]) or k in ("name", "device"))]
  lines += [f"From `{card.speed_source}`:", "", "| " + " | ".join(keys) + " |",
            "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in card.speed]
  return lines + [""]


def _training_lines(card: Card) -> list[str]:
  lines = ["## How it was trained", ""]
  if card.finetune:
    ft = card.finetune
    line = f"Fine-tuned on `{ft.get('task', '?')}`"
    if "metric" in ft and _is_number(ft.get("value")):
      line += f"; best dev {ft['metric']} {_fmt(ft['value'])}"
    if "step" in ft:
      line += f" at step {_fmt(ft['step'])}"
    lines += [line + " (`finetune.json` of the export).", ""]
  if card.training:
    lines += [f"Recorded in the run's `config.json` (`{card.training_source}`):", ""]
    lines += [f"- `{k}`: {_fmt(v)}" for k, v in card.training.items()]
    lines.append("")
  if card.last_metrics:
    shown = ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(card.last_metrics.items()))
    lines += [f"Last logged metrics (`metrics.jsonl`): {shown}.", ""]
  if len(lines) == 2:
    lines += ["Not recorded beside this export.", ""]
  return lines


def _results_lines(card: Card) -> list[str]:
  if not card.results:
    return []
  lines = ["## Fine-tuning results", "", f"From `{card.results_source}`:", "",
           "| result | value |", "|---|---|"]
  lines += [f"| {k} | {_fmt(v)} |" for k, v in card.results.items()]
  return lines + [""]


def _use_lines(card: Card) -> list[str]:
  load = ("AutoModelForMaskedLM" if card.head == "mlm" else "AutoModel" if card.head == "none"
          else "AutoModelForMultipleChoice" if card.head == "multiple_choice"
          else "AutoModelForSequenceClassification")
  lines = ["## Use", "", "```python",
           "from transformers import AutoTokenizer, " + load,
           f'tokenizer = AutoTokenizer.from_pretrained("{card.name}")',
           f'model = {load}.from_pretrained("{card.name}")', "```", ""]
  if not card.tokenizer_files:
    lines += ["No tokenizer was recorded with this model: `AutoTokenizer` needs the files of "
              "the tokenizer it was trained with.", ""]
  lines += ["## Intended use and limits", "",
            "A research model written by bort_jax (a JAX implementation of Bort, de Wynter and "
            "Perry, 2020).",
            "Its quality is what the sections above record and nothing more: it has not been "
            "evaluated for bias, safety or any use beyond them, its training data and teacher "
            "carry their own limits and licences, and a small distilled model may fail on text "
            "unlike what it was trained on. Check it on your own data before relying on it.", ""]
  lines += ["## Licence", "",
            (f"`{card.license}` (recorded with the base model)." if card.license else
             "Not recorded: the licence of the base model and data apply."), ""]
  return lines


def render(card: Card) -> str:
  """The Markdown of the model card."""
  title = [f"# {card.name}", "",
           f"A `{card.family}` encoder of shape `{card.arch}` exported by `bort-jax convert "
           "--to-hf`.", ""]
  lines = (_front_matter(card) + title + _size_lines(card) + _speed_lines(card)
           + _training_lines(card) + _results_lines(card) + _use_lines(card))
  return "\n".join(lines).rstrip() + "\n"
