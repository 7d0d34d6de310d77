"""The offline demo suite: TFDS datasets built from the files `bort-jax data fetch` extracts.

Three tasks, one TFDS builder `bort_demo` with a config each (array_record, read with
`as_data_source()`, no TensorFlow), registered for fine-tuning as `demo/<config>` by
`register_demo_tasks()`:

| config | source | kind | record keys |
|---|---|---|---|
| `vitaminc` | BIG-bench `vitaminc_fact_verification` | 3-way sentence pair | `premise` (the Wikipedia evidence, page title first), `hypothesis` (the claim), `label` (0 true / 1 false / 2 neither), `idx` |
| `movie_sentiment` | VADER `movieReviewSnippets_GroundTruth.txt` | binary single sentence | `sentence`, `label` (0 negative / 1 positive), `rating` (mean of 20+ raters, -4..4), `idx` |
| `social_iqa` | BIG-bench `social_iqa` | 3-way multiple choice | `context`, `question`, `answerA`, `answerB`, `answerC`, `choices` (the three answers; added by `demo_source`), `label` (0..2), `idx` |

The keys follow the GLUE layouts (MNLI premise/hypothesis, SST-2 sentence) so the task
registry's casts apply unchanged. Records from `demo_source` have `str` text and Python
numbers, and `source[i]["idx"] == i` (the builder disables TFDS's storage shuffle).

Splits are 80 / 10 / 10 % train / validation / test by a hash of a grouping key (sha256 of
`"<config>:<key>"`), so they do not depend on file order and related records never straddle
splits: VitaminC groups by Wikipedia page title (its contrastive evidence/claim pairs come
from the same page), Social IQa by context (several questions share one), movie snippets by
their text. Within a split, records keep source-file order.

Movie snippets: the label is the sign of the mean rating; snippets with |mean| < 0.5
(`MOVIE_MIN_ABS_RATING`) are dropped as near-neutral. Social IQa: the 4 questions whose
`target_scores` list only two distinct answers are dropped (a fixed 3-way head needs 3).

Pretraining corpus: `write_demo_corpus` writes the English articles of BIG-bench
`paragraph_segmentation` (which holds 1,000 articles each of nine Wikipedias) as plain text,
one sentence per line and a blank line between articles, so `corpus.build_corpus` reads it
like any user corpus. An article counts as English when at least 90 % of its letters are
ASCII and English function words outnumber those of the other eight languages 2.5 to 1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from bort_jax.data import fetch
from bort_jax.runtime.fileio import atomic_write_text, to_jsonable

CONFIGS = ("vitaminc", "movie_sentiment", "social_iqa")
SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
VITAMINC_LABELS = ("true", "false", "neither")
MOVIE_LABELS = ("negative", "positive")
MOVIE_MIN_ABS_RATING = 0.5
SOCIAL_IQA_CHOICES = 3
_VERSION = "1.0.0"

# Source file of each config, as named by `fetch.paths_for`.
_SOURCE = {"vitaminc": "vitaminc", "movie_sentiment": "movie_snippets",
           "social_iqa": "social_iqa"}


class DemoDataError(ValueError):
  """A demo source file is missing or not in the expected format."""


# ------------------------------------------------------------------------------- splits


def split_of(config: str, key: str) -> str:
  """The split of a record: a fixed function of its config and grouping key.

  Args:
    config: one of `CONFIGS` (salts the hash, so the tasks split independently).
    key: the grouping key (page title, context, sentence).

  Returns:
    "train", "validation" or "test" with probabilities `SPLIT_FRACTIONS`.
  """
  digest = hashlib.sha256(f"{config}:{key}".encode("utf-8")).digest()
  u = int.from_bytes(digest[:8], "big") / 2.0**64
  edge = 0.0
  for split, fraction in zip(SPLITS, SPLIT_FRACTIONS):
    edge += fraction
    if u < edge:
      return split
  return SPLITS[-1]


# ------------------------------------------------------------------------------ parsing
# Each parser returns the full list of records (without `idx`) in file order, each with a
# private "_key" used for the split; `split_records` assigns splits and indices.


def _load_examples(path: str) -> list[dict]:
  if not os.path.isfile(path):
    raise DemoDataError(f"demo source {path} not found; run `bort-jax data fetch` first")
  try:
    with open(path, encoding="utf-8") as f:
      examples = json.load(f)["examples"]
  except (ValueError, KeyError, TypeError) as err:
    raise DemoDataError(f"{path} is not a BIG-bench task.json with 'examples': {err}") from err
  return examples


def _one_correct(scores: dict, path: str, i: int) -> tuple[list[str], int]:
  """Choices (in file order) and the index of the single choice scored 1."""
  if not isinstance(scores, dict) or not scores:
    raise DemoDataError(f"{path}: example {i} has no target_scores")
  choices = list(scores)
  correct = [j for j, c in enumerate(choices) if scores[c] == 1]
  return choices, correct[0] if len(correct) == 1 else -1


def parse_vitaminc(path: str) -> list[dict]:
  """VitaminC evidence/claim pairs from BIG-bench's task.json.

  Each input reads `"<page title>: <evidence>\\nClaim: <claim>"`; the target scores name
  True, False or Neither.

  Args:
    path: the extracted `vitaminc_fact_verification` task.json.

  Returns:
    records `{"premise", "hypothesis", "label", "_key"}` in file order.
  """
  records = []
  for i, ex in enumerate(_load_examples(path)):
    text = ex.get("input", "")
    evidence, sep, claim = text.rpartition("\nClaim: ")
    choices, correct = _one_correct(ex.get("target_scores"), path, i)
    if not sep or correct < 0 or choices[correct] not in ("True", "False", "Neither"):
      raise DemoDataError(f"{path}: example {i} is not an evidence/claim pair with one of "
                          f"True/False/Neither marked: {text[:80]!r}")
    label = ("True", "False", "Neither").index(choices[correct])
    title = evidence.split(": ", 1)[0]
    records.append({"premise": evidence, "hypothesis": claim, "label": label, "_key": title})
  return records


# A question is the last sentence of the input and ends with "?".
_SIQA_RE = re.compile(r"^(.*[.!?\"'])\s+([^.!?]*\?)$", re.S)


def parse_social_iqa(path: str) -> tuple[list[dict], int]:
  """Social IQa questions from BIG-bench's task.json.

  Args:
    path: the extracted `social_iqa` task.json.

  Returns:
    (records `{"context", "question", "answerA", "answerB", "answerC", "label", "_key"}` in
    file order, number of examples dropped for not having exactly 3 choices and one answer).
  """
  records, dropped = [], 0
  for i, ex in enumerate(_load_examples(path)):
    choices, correct = _one_correct(ex.get("target_scores"), path, i)
    if len(choices) != SOCIAL_IQA_CHOICES or correct < 0:
      dropped += 1
      continue
    text = ex.get("input", "").strip()
    match = _SIQA_RE.match(text)
    context, question = (match.group(1), match.group(2)) if match else ("", text)
    records.append({"context": context, "question": question, "answerA": choices[0],
                    "answerB": choices[1], "answerC": choices[2], "label": correct,
                    "_key": context or question})
  return records, dropped


def parse_movie_snippets(path: str, min_abs_rating: float = MOVIE_MIN_ABS_RATING
                         ) -> tuple[list[dict], dict[str, int]]:
  """Rotten Tomatoes snippets with their mean human rating, labelled by its sign.

  Lines read `"<id>\\t<mean rating>\\t<sentence>"` (CRLF line ends in the original file).

  Args:
    path: the extracted `movieReviewSnippets_GroundTruth.txt`.
    min_abs_rating: snippets with |mean| below this are dropped as near-neutral.

  Returns:
    (records `{"sentence", "label", "rating", "_key"}` in file order, counts
    `{"lines", "bad_lines", "neutral_dropped", "kept"}`).
  """
  if not os.path.isfile(path):
    raise DemoDataError(f"demo source {path} not found; run `bort-jax data fetch` first")
  records = []
  stats = {"lines": 0, "bad_lines": 0, "neutral_dropped": 0}
  with open(path, "rb") as f:
    for raw in f:
      if not raw.strip():
        continue
      stats["lines"] += 1
      try:
        _, rating, sentence = raw.decode("utf-8").rstrip("\r\n").split("\t", 2)
        rating = float(rating)
      except ValueError:  # UnicodeDecodeError is a ValueError too
        stats["bad_lines"] += 1
        continue
      if abs(rating) < min_abs_rating:
        stats["neutral_dropped"] += 1
        continue
      sentence = sentence.strip()
      records.append({"sentence": sentence, "label": int(rating > 0),
                      "rating": np.float32(rating), "_key": sentence})
  stats["kept"] = len(records)
  return records, stats


def split_records(config: str, records: Sequence[dict]) -> dict[str, list[dict]]:
  """Assigns each record to a split by its key and numbers it within the split.

  Args:
    config: the config name (salts the split hash).
    records: parsed records with a "_key".

  Returns:
    {split: records without "_key", with "idx" = position in the split}.
  """
  out = {s: [] for s in SPLITS}
  for rec in records:
    split = split_of(config, rec["_key"])
    clean = {k: v for k, v in rec.items() if k != "_key"}
    clean["idx"] = len(out[split])
    out[split].append(clean)
  return out


def parse_config(config: str, cache_dir: str | None = None) -> dict[str, list[dict]]:
  """Reads and splits one demo task from the fetched files.

  Args:
    config: one of `CONFIGS`.
    cache_dir: the fetch cache (default `fetch.default_cache_dir()`).

  Returns:
    {split: records} as stored in the TFDS dataset.
  """
  path = fetch.paths_for(cache_dir)[_SOURCE[_check_config(config)]]
  if config == "vitaminc":
    records = parse_vitaminc(path)
  elif config == "social_iqa":
    records, _ = parse_social_iqa(path)
  else:
    records, _ = parse_movie_snippets(path)
  return split_records(config, records)


def _check_config(config: str) -> str:
  name = config.split("/", 1)[1] if "/" in config else config
  if name not in CONFIGS:
    raise ValueError(f"unknown demo task {config!r}; known: "
                     f"{', '.join('demo/' + c for c in CONFIGS)}")
  return name


# ------------------------------------------------------------------------------ corpus

_EN_WORDS = frozenset(
    "the and of to with that which from his her by for at on it this were has have he she "
    "they an was is in as".split())
_OTHER_WORDS = frozenset(
    "de la le les des und der die das het een van en el los del il di che da do em os w i z "
    "na est une dans ist ein eine von zu por para con per um uma se nie и в на что".split())
_WORD_RE = re.compile(r"\w+")


def is_english(text: str) -> bool:
  """Whether a Wikipedia article is English (see the module docstring for the rule)."""
  letters = [c for c in text if c.isalpha()]
  if not letters or sum(c.isascii() for c in letters) < 0.9 * len(letters):
    return False
  words = _WORD_RE.findall(text.lower())
  english = sum(w in _EN_WORDS for w in words)
  other = sum(w in _OTHER_WORDS for w in words)
  return (english + 1) >= 2.5 * (other + 1)


def corpus_documents(cache_dir: str | None = None) -> list[list[str]]:
  """The English articles of `paragraph_segmentation`, each a list of sentences.

  Args:
    cache_dir: the fetch cache (default `fetch.default_cache_dir()`).

  Returns:
    articles in file order, sentences stripped, empty ones dropped.
  """
  path = fetch.paths_for(cache_dir)["paragraph_segmentation"]
  docs = []
  for ex in _load_examples(path):
    text = ex.get("input", "")
    if is_english(text):
      sentences = [s.strip() for s in text.split("\n") if s.strip()]
      if sentences:
        docs.append(sentences)
  return docs


def write_demo_corpus(out_dir: str, cache_dir: str | None = None, num_shards: int = 8
                      ) -> list[str]:
  """Writes the demo pretraining corpus as text files for `corpus.build_corpus`.

  Article i goes to shard i % num_shards. Each shard is written to a temporary file and
  renamed, so a shard file is either complete or absent.

  Args:
    out_dir: folder for the files (created).
    cache_dir: the fetch cache (default `fetch.default_cache_dir()`).
    num_shards: number of files.

  Returns:
    the shard paths, in order.
  """
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  docs = corpus_documents(cache_dir)
  if not docs:
    raise DemoDataError("no English articles found in paragraph_segmentation")
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for shard in range(num_shards):
    path = os.path.join(out_dir, f"wiki_en-{shard:05d}-of-{num_shards:05d}.txt")
    text = "\n\n".join("\n".join(d) for d in docs[shard::num_shards]) + "\n"
    atomic_write_text(path, text)
    paths.append(path)
  return paths


# ------------------------------------------------------------------------------- TFDS


def _features(config: str) -> tfds.features.FeaturesDict:
  text = tfds.features.Text
  if config == "vitaminc":
    spec = {"premise": text(), "hypothesis": text(),
            "label": tfds.features.ClassLabel(names=list(VITAMINC_LABELS))}
  elif config == "movie_sentiment":
    spec = {"sentence": text(), "label": tfds.features.ClassLabel(names=list(MOVIE_LABELS)),
            "rating": np.float32}
  else:
    spec = {"context": text(), "question": text(), "answerA": text(), "answerB": text(),
            "answerC": text(), "label": tfds.features.ClassLabel(num_classes=3)}
  spec["idx"] = np.int32
  return tfds.features.FeaturesDict(spec)


class BortDemo(tfds.core.GeneratorBasedBuilder):
  """The demo tasks as a TFDS dataset (`bort_demo/<config>`), built from the fetch cache."""

  VERSION = tfds.core.Version(_VERSION)
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=c, version=_VERSION) for c in CONFIGS]
  # No download checksums: the default lookup goes through `code_path`, which for a builder in
  # a regular package imports the `importlib_resources` backport that TFDS does not declare.
  url_infos = None

  def __init__(self, *, cache_dir: str | None = None, **kwargs):
    self._cache_dir = cache_dir
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # Outside a TFDS dataset package there are no metadata files beside the class, so the
    # info is built here. disable_shuffling keeps records in idx order on disk.
    source = fetch.paths_for(self._cache_dir)[_SOURCE[self.builder_config.name]]
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"bort_jax demo task {self.builder_config.name} (see bort_jax/data/demo.py)",
        features=_features(self.builder_config.name),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(
            source_sha256=fetch.sha256_file(source) if os.path.isfile(source) else ""),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything comes from the fetch cache
    splits = parse_config(self.builder_config.name, self._cache_dir)
    return {split: self._generate_examples(recs) for split, recs in splits.items() if recs}

  def _generate_examples(self, records):
    for rec in records:
      yield rec["idx"], rec


def build_demo(config: str, data_dir: str | None = None, cache_dir: str | None = None
               ) -> tfds.core.DatasetBuilder:
  """Builds (or reuses) one demo dataset and returns its prepared builder.

  A dataset built from other source bytes than the cache now holds (a re-fetch) is rebuilt.

  Args:
    config: one of `CONFIGS` (a `demo/` or `bort_demo/` prefix is accepted).
    data_dir: TFDS data folder (default `<cache_dir>/tfds`).
    cache_dir: the fetch cache (default `fetch.default_cache_dir()`).

  Returns:
    the prepared `BortDemo` builder.
  """
  config = _check_config(config)
  cache_dir = cache_dir or fetch.default_cache_dir()
  data_dir = data_dir or os.path.join(cache_dir, "tfds")
  source = fetch.paths_for(cache_dir)[_SOURCE[config]]
  if not os.path.isfile(source):
    raise DemoDataError(f"demo source {source} not found; run `bort-jax data fetch "
                        f"--cache-dir {cache_dir}` first")

  def make():
    return BortDemo(config=config, data_dir=data_dir, cache_dir=cache_dir,
                    file_format="array_record")

  builder = make()
  if builder.is_prepared():
    if builder.info.metadata.get("source_sha256") == fetch.sha256_file(source):
      return builder
    shutil.rmtree(builder.data_dir)  # stale: rebuild from the current source
    builder = make()
  # TFDS writes into an `incomplete.*` folder and renames it on success.
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig())
  return builder


@dataclasses.dataclass
class DemoRecords(Sequence):
  """A split of a demo dataset as a sequence of plain dict records (str text, ints).

  Attributes:
    source: the TFDS data source of the split.
    config: the demo config name.
  """
  source: Any
  config: str

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    n = len(self)
    i = i + n if i < 0 else i
    if not 0 <= i < n:  # IndexError (not array_record's ValueError) ends iteration
      raise IndexError(f"record {i} out of range for a split of {n}")
    rec = {k: to_jsonable(v) for k, v in self.source[i].items()}
    if self.config == "social_iqa":
      rec["choices"] = [rec["answerA"], rec["answerB"], rec["answerC"]]
    return rec


def demo_source(task_name: str, split: str, data_dir: str | None = None,
                cache_dir: str | None = None) -> DemoRecords:
  """Records of one split of a demo task (the task registry's `source` hook).

  Args:
    task_name: `"vitaminc"`, `"movie_sentiment"` or `"social_iqa"` (with or without a
      `demo/` prefix).
    split: "train", "validation" or "test".
    data_dir: TFDS data folder (default `<cache_dir>/tfds`); built there on first use.
    cache_dir: the fetch cache (default `fetch.default_cache_dir()`).

  Returns:
    a sequence of dict records (keys in the module docstring) with `rec["idx"] == i`.
  """
  config = _check_config(task_name)
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r} for demo/{config}; known: {SPLITS}")
  builder = build_demo(config, data_dir, cache_dir)
  if split not in builder.info.splits:
    raise ValueError(f"demo/{config} has no {split!r} records (too few examples)")
  return DemoRecords(builder.as_data_source(split=split), config)


def _cast_social_iqa(record):
  from bort_jax.finetune import tasks  # pylint: disable=import-outside-toplevel
  text = f"{tasks.as_text(record['context'])} {tasks.as_text(record['question'])}".strip()
  choices = tuple(tasks.as_text(record[k]) for k in ("answerA", "answerB", "answerC"))
  label = tasks.as_int(record["label"]) if "label" in record else -1
  return [tasks.Example(text, None, choices=choices, label=label)]


def register_demo_tasks(cache_dir: str | None = None, overwrite: bool = True) -> list[str]:
  """Registers `demo/vitaminc`, `demo/movie_sentiment`, `demo/social_iqa` with the registry.

  Args:
    cache_dir: the fetch cache the sources read (default `fetch.default_cache_dir()`).
    overwrite: replace earlier registrations of the same names.

  Returns:
    the registered task names.
  """
  # Imported here so that fetching and building do not pull in the registry.
  from bort_jax.finetune import tasks  # pylint: disable=import-outside-toplevel

  def source(config):
    return lambda split, data_dir: demo_source(config, split, data_dir, cache_dir)

  specs = [
      tasks.TaskSpec(name="demo/vitaminc", builder=None, kind="classification",
                     num_labels=3, cast=tasks.pair_cast("premise", "hypothesis"),
                     metrics=("accuracy", "macro_f1"), label_names=VITAMINC_LABELS,
                     source=source("vitaminc")),
      tasks.TaskSpec(name="demo/movie_sentiment", builder=None, kind="classification",
                     num_labels=2, cast=tasks.pair_cast("sentence"), metrics=("accuracy",),
                     label_names=MOVIE_LABELS, source=source("movie_sentiment")),
      tasks.TaskSpec(name="demo/social_iqa", builder=None, kind="multiple_choice",
                     num_labels=SOCIAL_IQA_CHOICES, cast=_cast_social_iqa,
                     metrics=("accuracy",), label_names=("A", "B", "C"),
                     source=source("social_iqa")),
  ]
  for spec in specs:
    tasks.register_task(spec, overwrite=overwrite)
  return [s.name for s in specs]
