"""The offline demo suite: TFDS datasets built from the files `bort-jax data fetch` extracts.

Three tasks, one of each kind a BERT user meets, one TFDS builder `bort_demo` with a config each
(array_record, read with `as_data_source()`, no TensorFlow), registered for fine-tuning as
`demo/<config>` by `register_demo_tasks()`:

| config | source | kind | record keys |
|---|---|---|---|
| `movie_sentiment` | VADER `movieReviewSnippets_GroundTruth.txt` | binary, single sentence | `sentence`, `label` (0 negative / 1 positive), `rating` (mean of 20+ raters, -4..4), `idx` |
| `word_sense` | WordNet `data.{noun,verb,adj,adv}` | binary, sentence pair | `sentence` (a WordNet usage example), `definition` (`"<word>: <gloss>"`), `label` (1 when the gloss is the sense the example illustrates, 0 when it is another sense of the same word), `idx` |
| `bbc_news` | BBC News articles (`articles.jsonl`) | 5-way topic, single text | `text` (headline and article), `label` (business / entertainment / politics / sports / tech), `idx` |

The keys follow the GLUE layouts (SST-2's sentence, a pair's two texts) so the task registry's
casts apply unchanged. Records from `demo_source` have `str` text and Python numbers, and
`source[i]["idx"] == i` (the builder disables TFDS's storage shuffle).

Splits are 80 / 10 / 10 % train / validation / test by a hash of a grouping key (sha256 of
`"<config>:<key>"`), so they do not depend on file order and related records never straddle
splits: word_sense groups by the word (a word's senses are all in one split, so dev words are
unseen in training, as in SuperGLUE's WiC), movie snippets and articles by their text (the BBC
set holds a few duplicate articles). Within a split, records keep source-file order.

Movie snippets: the label is the sign of the mean rating; snippets with |mean| < 0.5
(`MOVIE_MIN_ABS_RATING`) are dropped as near-neutral.

word_sense is built from WordNet as gloss matching at coarse grain: for every usage example
of a synset that contains one of the synset's words with senses in two or more lexicographer
files (WordNet's coarse groups: noun.animal, noun.artifact, verb.motion, ...), one positive pair
(the example, the word and this synset's gloss) and one negative pair (the example, the word and
the gloss of a sense of the word from another lexicographer file, drawn by a hash of the
example) are made, so the classes are balanced by construction. Negatives from any other sense
(WordNet's fine grain, as in WiC's WordNet part) were not learnt by the demo's teacher
(docs/DATA.md has the measurement).
"""

from __future__ import annotations

import collections
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

from bort_jax.data import archives, fetch
from bort_jax.runtime import fileio, quiet
from bort_jax.runtime.fileio import to_jsonable

CONFIGS = ("movie_sentiment", "word_sense", "bbc_news")
SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
MOVIE_LABELS = ("negative", "positive")
MOVIE_MIN_ABS_RATING = 0.5
WORD_SENSE_LABELS = ("no", "yes")
BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")
_VERSION = "2.1.0"  # 2.1.0: word_sense negatives from another lexicographer file

# Source of each config, as named by `fetch.paths_for`.
_SOURCE = {"movie_sentiment": "movie_snippets", "word_sense": "wordnet", "bbc_news": "bbc_news"}


class DemoDataError(ValueError):
  """A demo source file is missing or not in the expected format."""


def _missing(path: str) -> DemoDataError:
  return DemoDataError(f"demo source {path} not found; run `bort-jax data fetch` first")


# ------------------------------------------------------------------------------- splits


def split_of(config: str, key: str) -> str:
  """The split of a record: a fixed function of its config and grouping key.

  Args:
    config: one of `CONFIGS` (salts the hash, so the tasks split independently).
    key: the grouping key (word, sentence, article).

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
    raise _missing(path)
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


@dataclasses.dataclass(frozen=True)
class Synset:
  """One WordNet synset: its words (lower case, spaces for underscores), lexicographer file
  (its coarse group, 0-44), gloss and examples."""
  key: str
  lexfile: int
  words: tuple[str, ...]
  definition: str
  examples: tuple[str, ...]


_MARKER = re.compile(r"\([a-z]+\)$")  # adjective position markers: "galore(ip)"
_QUOTED = re.compile(r'"([^"]+)"')


def parse_synset_line(line: str) -> Synset | None:
  """A `data.<pos>` line as a Synset (None for the licence header and blank lines).

  The format (WordNet's wndb(5)): `offset lex_filenum ss_type w_cnt word lex_id ... | gloss`,
  w_cnt in hexadecimal, the gloss a definition followed by quoted examples, `;`-separated.
  """
  if not line.strip() or line.startswith("  "):
    return None
  head, sep, gloss = line.partition(" | ")
  fields = head.split()
  try:
    count, lexfile = int(fields[3], 16), int(fields[1])
    words = tuple(_MARKER.sub("", fields[4 + 2 * k]).replace("_", " ").lower()
                  for k in range(count))
  except (IndexError, ValueError) as err:
    raise DemoDataError(f"not a WordNet data line: {line[:80]!r}") from err
  if not sep:
    return Synset(f"{fields[0]}{fields[2]}", lexfile, words, "", ())
  examples = tuple(e.strip() for e in _QUOTED.findall(gloss) if e.strip())
  definition = "; ".join(p.strip() for p in _QUOTED.sub("", gloss).split(";")
                         if p.strip()).strip()
  return Synset(f"{fields[0]}{fields[2]}", lexfile, words, definition, examples)


def read_wordnet(wordnet_dir: str) -> list[Synset]:
  """Every synset of `data.noun`, `data.verb`, `data.adj`, `data.adv`, in file order."""
  synsets = []
  for pos in archives.WORDNET_POS:
    path = os.path.join(wordnet_dir, f"data.{pos}")
    if not os.path.isfile(path):
      raise _missing(path)
    with open(path, encoding="utf-8", errors="replace") as f:
      synsets.extend(s for s in map(parse_synset_line, f) if s is not None)
  return synsets


def _pick(options: Sequence[Any], salt: str) -> Any:
  """A fixed pseudo-random member of `options` (a function of `salt` only)."""
  digest = hashlib.sha256(salt.encode("utf-8")).digest()
  return options[int.from_bytes(digest[:8], "big") % len(options)]


def _coarse_others(senses: Sequence[Synset], synset: Synset) -> list[Synset]:
  """The senses of a word in another lexicographer file than `synset`, with another gloss."""
  return [o for o in senses
          if o.lexfile != synset.lexfile and o.definition != synset.definition]


def parse_word_sense(wordnet_dir: str) -> list[dict]:
  """Gloss-matching pairs from WordNet (the construction is in the module docstring).

  Args:
    wordnet_dir: the folder of the extracted `data.<pos>` files.

  Returns:
    records `{"sentence", "definition", "label", "_key"}` in file order, a positive then a
    negative pair per usable example.
  """
  synsets = read_wordnet(wordnet_dir)
  senses = collections.defaultdict(list)
  for s in synsets:
    if s.definition:
      for word in s.words:
        senses[word].append(s)
  records = []
  for s in synsets:
    for example in s.examples:
      lower = example.lower()
      word = next((w for w in s.words if _coarse_others(senses[w], s)
                   and re.search(rf"(?<!\w){re.escape(w)}(?!\w)", lower)), None)
      if word is None:
        continue
      others = _coarse_others(senses[word], s)
      if not others:
        continue
      other = _pick(others, f"{s.key}:{example}")
      for definition, label in ((s.definition, 1), (other.definition, 0)):
        records.append({"sentence": example, "definition": f"{word}: {definition}",
                        "label": label, "_key": word})
  return records


def parse_bbc_news(path: str) -> list[dict]:
  """BBC News articles with their topic.

  Args:
    path: the extracted `articles.jsonl` (`{"category", "id", "text"}` per line).

  Returns:
    records `{"text", "label", "_key"}` in file order (the text's whitespace collapsed).
  """
  if not os.path.isfile(path):
    raise _missing(path)
  records = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        article = json.loads(line)
        label = BBC_LABELS.index(article["category"])
        text = " ".join(str(article["text"]).split())
      except (ValueError, KeyError, TypeError) as err:
        raise DemoDataError(f"{path}: line {number} is not an article of one of the topics "
                            f"{', '.join(BBC_LABELS)}: {line[:80]!r}") from err
      records.append({"text": text, "label": label, "_key": text})
  return records


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
  config = _check_config(config)  # "demo/word_sense" is read and split as "word_sense"
  path = fetch.paths_for(cache_dir)[_SOURCE[config]]
  if config == "word_sense":
    records = parse_word_sense(path)
  elif config == "bbc_news":
    records = parse_bbc_news(path)
  else:
    records, _ = parse_movie_snippets(path)
  return split_records(config, records)


def _check_config(config: str) -> str:
  name = config.split("/", 1)[1] if "/" in config else config
  if name not in CONFIGS:
    raise ValueError(f"unknown demo task {config!r}; known: "
                     f"{', '.join('demo/' + c for c in CONFIGS)}")
  return name


def source_digest(config: str, cache_dir: str | None = None) -> str:
  """sha256 of the builder's version and a task's source file(s): what its dataset (and any
  result on it) was made from, so that a new construction invalidates cached results too."""
  path = fetch.paths_for(cache_dir)[_SOURCE[_check_config(config)]]
  paths = ([os.path.join(path, f"data.{pos}") for pos in archives.WORDNET_POS]
           if os.path.isdir(path) else [path])
  for p in paths:
    if not os.path.isfile(p):
      raise DemoDataError(f"demo source {p} not found; run `bort-jax data fetch --cache-dir "
                          f"{fetch.paths_for(cache_dir)['cache_dir']}` first")
  return hashlib.sha256(
      (_VERSION + "".join(fileio.sha256_file(p) for p in paths)).encode()).hexdigest()


# ------------------------------------------------------------------------------- TFDS


def _features(config: str) -> tfds.features.FeaturesDict:
  text = tfds.features.Text
  if config == "word_sense":
    spec = {"sentence": text(), "definition": text(),
            "label": tfds.features.ClassLabel(names=list(WORD_SENSE_LABELS))}
  elif config == "movie_sentiment":
    spec = {"sentence": text(), "label": tfds.features.ClassLabel(names=list(MOVIE_LABELS)),
            "rating": np.float32}
  else:
    spec = {"text": text(), "label": tfds.features.ClassLabel(names=list(BBC_LABELS))}
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
    name = self.builder_config.name
    try:
      digest = source_digest(name, self._cache_dir)
    except DemoDataError:
      digest = ""
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"bort_jax demo task {name} (see bort_jax/data/demo.py)",
        features=_features(name),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(source_sha256=digest),
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

  A dataset built from other source bytes than the cache now holds (a re-fetch, a fallback
  source) is rebuilt.

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
  digest = source_digest(config, cache_dir)

  def make():
    return BortDemo(config=config, data_dir=data_dir, cache_dir=cache_dir,
                    file_format="array_record")

  # One builder at a time per dataset: two processes sharing the cache (the demo's fine-tuning
  # workers starting two jobs of one task) would both build it, and the second rename fails.
  with fileio.locked(os.path.join(data_dir, f".bort_demo-{config}.lock")):
    builder = make()
    if builder.is_prepared():
      if builder.info.metadata.get("source_sha256") == digest:
        return builder
      shutil.rmtree(builder.data_dir)  # stale: rebuild from the current source
      builder = make()
    # TFDS writes into an `incomplete.*` folder and renames it on success.
    with quiet.tfds_build():  # without TFDS's printed lines (bort-jax --verbose keeps them)
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
    return {k: to_jsonable(v) for k, v in self.source[i].items()}


def demo_source(task_name: str, split: str, data_dir: str | None = None,
                cache_dir: str | None = None) -> DemoRecords:
  """Records of one split of a demo task (the task registry's `source` hook).

  Args:
    task_name: `"movie_sentiment"`, `"word_sense"` or `"bbc_news"` (with or without a
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


def register_demo_tasks(cache_dir: str | None = None, overwrite: bool = True) -> list[str]:
  """Registers `demo/movie_sentiment`, `demo/word_sense`, `demo/bbc_news` with the registry.

  Args:
    cache_dir: the fetch cache the sources read (default `fetch.default_cache_dir()`).
    overwrite: replace earlier registrations of the same names.

  Returns:
    the registered task names.
  """
  # Imported here so that fetching and building do not pull in the registry.
  from bort_jax.finetune import casts, tasks  # pylint: disable=import-outside-toplevel

  def source(config):
    return lambda split, data_dir: demo_source(config, split, data_dir, cache_dir)

  specs = [
      tasks.TaskSpec(name="demo/movie_sentiment", builder=None, kind="classification",
                     num_labels=2, cast=casts.pair_cast("sentence"), metrics=("accuracy",),
                     label_names=MOVIE_LABELS, source=source("movie_sentiment")),
      tasks.TaskSpec(name="demo/word_sense", builder=None, kind="classification",
                     num_labels=2, cast=casts.pair_cast("sentence", "definition"),
                     metrics=("accuracy",), label_names=WORD_SENSE_LABELS,
                     source=source("word_sense")),
      tasks.TaskSpec(name="demo/bbc_news", builder=None, kind="classification",
                     num_labels=len(BBC_LABELS), cast=casts.pair_cast("text"),
                     metrics=("accuracy", "macro_f1"), label_names=BBC_LABELS,
                     source=source("bbc_news")),
  ]
  for spec in specs:
    tasks.register_task(spec, overwrite=overwrite)
  return [s.name for s in specs]
