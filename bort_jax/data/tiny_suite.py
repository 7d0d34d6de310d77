"""A tiny synthetic stand-in for the offline demo suite, for smoke runs of the whole demo.

``bort-jax demo --config=configs/demo.py:tiny`` (the notebook's test mode and CI) runs every
stage of the real pipeline in about a minute on a CPU and without the network. Instead of
``bort-jax data fetch``, :func:`write_tiny_suite` writes a cache folder with the same layout
(``fetch.PATHS``) holding:

* ``teacher/``: a random 2-layer BERT of hidden size 32 as a headless Hugging Face checkpoint
  (like all-MiniLM-L6-v2, which has no MLM head), with a WordPiece ``vocab.txt`` of the
  suite's words, the letters and their ``##`` continuations (so any ASCII text tokenises);
* ``corpus/*.txt``: generated sentences, one per line, a blank line between documents;
* the three demo tasks' sources in their real formats (VADER's tab-separated movie snippets,
  WordNet data files, BBC articles as JSON Lines), small and learnable (the label follows a
  word).

Nothing in it means anything: it exercises the code path, not the method. The files are
deterministic; a folder that already holds the suite (``tiny_suite.json``) is left as it is.
"""

from __future__ import annotations

import json
import os
import string

import numpy as np

from bort_jax.data import archives, fetch
from bort_jax.runtime.fileio import atomic_write_text

MARKER = "tiny_suite.json"
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
SUBJECTS = ("the town", "a river", "the market", "our school", "the old bridge", "a farmer",
            "the film", "the story", "a child", "the actor")
VERBS = ("was built", "runs", "opened", "grew", "was painted", "moved", "was praised",
         "was told", "played", "was loved")
ENDINGS = ("in the north", "by the sea", "near the hills", "after the war", "every day",
           "in the spring", "with great care", "for many years")
GOOD, BAD = ("funny", "moving", "bright", "warm"), ("dull", "slow", "flat", "tired")
TEACHER = dict(arch="D2-A2-H32-I64", max_positions=128)
NUM_DOCS, SENTENCES_PER_DOC, NUM_SHARDS = 24, 6, 2


EXTRA_WORDS = "a it is that and was not cold move fast daily"


def _words() -> list[str]:
  phrases = SUBJECTS + VERBS + ENDINGS + GOOD + BAD + (EXTRA_WORDS,)
  return sorted({word for phrase in phrases for word in phrase.split()})


def vocabulary() -> list[str]:
  """The WordPiece vocabulary: specials, punctuation, digits, letters, ``##`` pieces, words."""
  letters = list(string.ascii_lowercase)
  pieces = list(".,!?:;'\"-()") + list(string.digits) + letters
  return (list(SPECIALS) + pieces + ["##" + c for c in letters + list(string.digits)]
          + _words())


def _sentence(rng: np.random.Generator) -> str:
  return (f"{SUBJECTS[rng.integers(len(SUBJECTS))].capitalize()} "
          f"{VERBS[rng.integers(len(VERBS))]} {ENDINGS[rng.integers(len(ENDINGS))]}.")


def corpus_documents(seed: int = 0) -> list[list[str]]:
  """``NUM_DOCS`` documents of ``SENTENCES_PER_DOC`` generated sentences."""
  rng = np.random.default_rng(seed)
  return [[_sentence(rng) for _ in range(SENTENCES_PER_DOC)] for _ in range(NUM_DOCS)]


TOPICS = ("business", "entertainment", "politics", "sports", "tech")
SENSES = ("in the north", "by the sea")  # a word's two senses: a cue its examples carry


def _wordnet_line(offset: int, pos: str, word: str, definition: str,
                  examples: list[str], lexfile: int = 0) -> str:
  """One synset in WordNet's data-file format (a single word, no pointers)."""
  quoted = "; ".join(f'"{e}"' for e in examples)
  return f"{offset:08d} {lexfile:02d} {pos} 01 {word.replace(' ', '_')} 0 000 | {definition}; {quoted}  "


def _task_files(rng: np.random.Generator) -> dict[str, object]:
  """The three tasks' sources (relative path -> text) in their real formats."""
  movie, articles = [], []
  for i in range(60):
    sentence = _sentence(rng)
    good = i % 2 == 0
    rating = (1.0 + (i % 3)) * (1 if good else -1)
    adjective = (GOOD if good else BAD)[i % 4]
    movie.append(f"{i + 1}\t{rating}\tThe film was {adjective} and {sentence.lower()}")
    topic = TOPICS[i % len(TOPICS)]
    articles.append(json.dumps({"category": topic, "id": f"{topic}/{i:03d}",
                                "text": f"{SUBJECTS[i % len(SUBJECTS)].capitalize()} "
                                        f"{VERBS[i % len(TOPICS)]}\n\n{sentence}"}))
  # WordNet: every subject noun has two senses (in two lexicographer files), each with three
  # examples that carry its cue.
  lines, offset = {pos: [] for pos in archives.WORDNET_POS}, 1000
  for subject in SUBJECTS:
    word = subject.split()[-1]
    for lexfile, cue in enumerate(SENSES, start=5):
      examples = [f"{subject} {VERBS[int(rng.integers(len(VERBS)))]} {cue}" for _ in range(3)]
      lines["noun"].append(_wordnet_line(offset, "n", word, f"a {word} {cue}", examples,
                                         lexfile))
      offset += 100
  lines["verb"].append(_wordnet_line(offset, "v", "run", "move fast", ["it runs every day"]))
  lines["adj"].append(_wordnet_line(offset + 100, "a", "warm", "not cold", ["a warm day"]))
  lines["adv"].append(_wordnet_line(offset + 200, "r", "every day", "daily", ["it ran"]))
  files = {f"word_sense/data.{pos}": "  1 tiny synthetic WordNet\n" + "\n".join(rows) + "\n"
           for pos, rows in lines.items()}
  files["movie_sentiment/" + archives.VADER_FILE] = "\r\n".join(movie)
  files["bbc_news/" + archives.BBC_FILE] = "\n".join(articles) + "\n"
  return files


def _write_teacher(out_dir: str) -> None:
  """A random headless BERT as a Hugging Face folder, with its vocabulary."""
  import jax  # pylint: disable=import-outside-toplevel
  from bort_jax.core import arch as arch_lib  # pylint: disable=import-outside-toplevel
  from bort_jax.core import model  # pylint: disable=import-outside-toplevel
  from bort_jax.interop import convert  # pylint: disable=import-outside-toplevel

  vocab = vocabulary()
  cfg = arch_lib.get_model_config(TEACHER["arch"], family="bert", vocab_size=len(vocab),
                                  max_positions=TEACHER["max_positions"], pad_id=0)
  params = model.init(jax.random.key(0), cfg, model.NO_HEAD)

  def add_vocab(tmp: str) -> None:
    with open(os.path.join(tmp, "vocab.txt"), "w", encoding="utf-8") as f:
      f.write("\n".join(vocab) + "\n")

  convert.save_hf(params, cfg, out_dir, model.NO_HEAD, extra=add_vocab)


def write_tiny_suite(cache_dir: str) -> dict[str, str]:
  """Writes the suite into ``cache_dir`` (skipped when it is already there).

  Returns:
    ``fetch.paths_for(cache_dir)`` plus ``corpus`` (the corpus folder).
  """
  cache_dir = os.path.abspath(cache_dir)
  paths = dict(fetch.paths_for(cache_dir), corpus=os.path.join(cache_dir, "corpus"))
  if os.path.exists(os.path.join(cache_dir, MARKER)):
    return paths
  os.makedirs(cache_dir, exist_ok=True)
  _write_teacher(os.path.join(cache_dir, "teacher"))
  for rel, content in _task_files(np.random.default_rng(0)).items():
    path = os.path.join(cache_dir, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, content)
  os.makedirs(paths["corpus"], exist_ok=True)
  docs = corpus_documents(0)
  for shard in range(NUM_SHARDS):
    text = "\n\n".join("\n".join(d) for d in docs[shard::NUM_SHARDS]) + "\n"
    atomic_write_text(os.path.join(paths["corpus"], f"part-{shard:02d}.txt"), text)
  atomic_write_text(os.path.join(cache_dir, MARKER),
                    json.dumps({"teacher": TEACHER, "documents": NUM_DOCS}, indent=2))
  return paths
