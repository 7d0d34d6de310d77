"""Is a pinned archive still published? Asks the registries, downloads nothing.

The test suite calls :func:`check_listed` for every pin of ``data/fetch.py``, so the next
disappearance of an archive from its registry fails CI rather than a user's first run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

from bort_jax.data.fetch import Source, last_line


class RegistryUnreachable(RuntimeError):
  """The registry could not be asked (no network, npm not installed)."""


def _pip_index_url() -> str:
  """The index pip is configured with (PIP_INDEX_URL, pip's config, else pip's default)."""
  if os.environ.get("PIP_INDEX_URL"):
    return os.environ["PIP_INDEX_URL"]
  proc = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                        capture_output=True, text=True, check=False)
  if proc.returncode == 0 and proc.stdout.strip():
    return proc.stdout.strip()
  from pip._internal.models.index import PyPI  # pylint: disable=import-outside-toplevel
  return PyPI.simple_url


def _pypi_listing(project: str, timeout: float) -> list[dict]:
  """The files of a project on the index (PEP 691 JSON simple API)."""
  name = re.sub(r"[-_.]+", "-", project).lower()
  url = f"{_pip_index_url().rstrip('/')}/{name}/"
  request = urllib.request.Request(url, headers={
      "Accept": "application/vnd.pypi.simple.v1+json"})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      return json.load(response).get("files", [])
  except urllib.error.HTTPError as err:
    if err.code == 404:
      return []
    raise RegistryUnreachable(f"the package index answered {err.code} for {project}") from err
  except (urllib.error.URLError, OSError, ValueError) as err:
    raise RegistryUnreachable(f"the package index cannot be reached ({err})") from err


def check_listed(source: Source, timeout: float = 30.0) -> str | None:
  """Asks the source's registry whether its pinned archive is still published unchanged.

  Args:
    source: the pin.
    timeout: seconds per request.

  Returns:
    None when the registry lists the file with the pinned hash (sha256 on the index; npm's
    sha512 integrity on npm), else what is wrong, in words.

  Raises:
    RegistryUnreachable: the registry could not be asked (no network, npm not installed).
  """
  if source.registry == "pypi":
    project = re.split(r"[=<>!~ ]", source.spec, maxsplit=1)[0]
    files = {f.get("filename"): f for f in _pypi_listing(project, timeout)}
    if source.filename not in files:
      return f"{source.filename} is no longer listed on the package index"
    listed = files[source.filename].get("hashes", {}).get("sha256")
    if listed != source.sha256:
      return f"{source.filename} is listed with sha256 {listed}, not the pinned {source.sha256}"
    return None
  if shutil.which("npm") is None:
    raise RegistryUnreachable("npm is not installed, so the npm registry cannot be asked")
  try:
    proc = subprocess.run(["npm", "view", source.spec, "dist.integrity", "--json"],
                          capture_output=True, text=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired as err:
    raise RegistryUnreachable(f"npm view {source.spec} timed out") from err
  if proc.returncode != 0:
    if "E404" in proc.stderr or "404" in last_line(proc.stderr):
      return f"{source.spec} is no longer on the npm registry"
    raise RegistryUnreachable(f"npm view failed: {last_line(proc.stderr)}")
  listed = json.loads(proc.stdout) if proc.stdout.strip() else None
  if not listed:
    return f"{source.spec} is no longer on the npm registry"
  if listed != source.npm_integrity:
    return f"{source.spec} is listed with integrity {listed}, not the pinned {source.npm_integrity}"
  return None
