"""Quiet logs: a normal run hides the libraries' routine lines, ``--verbose`` brings them back.

The JAX line is checked end to end (a ``bort-jax cost --measure`` child process, without
``JAX_PLATFORMS`` so that JAX probes for accelerators as it does for a user); the TFDS and absl
lines are checked on the loggers they come through, in this process.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys

import pytest

from bort_jax import main as cli_main
from bort_jax.runtime import quiet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_NOISE = "Unable to initialize backend"


def _child(extra: list[str]) -> subprocess.Popen:
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  env["PYTHONPATH"] = REPO
  cmd = [sys.executable, "-m", "bort_jax.main", "cost", "--arch", "D1-A2-H16-I32", "--measure",
         "--repeats", "1"] + extra
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_cost_run_hides_backend_probing_and_verbose_shows_it():
  quiet, verbose = _child([]), _child(["--verbose"])
  (q_out, q_err), (v_out, v_err) = quiet.communicate(timeout=300), verbose.communicate(timeout=300)
  assert quiet.returncode == 0 and verbose.returncode == 0, q_err + v_err
  assert "D1-A2-H16-I32" in q_out and "D1-A2-H16-I32" in v_out
  assert JAX_NOISE not in q_err and "Platform '" not in q_err
  assert q_err.strip() == "", q_err  # nothing else either: the table is the whole output
  if importlib.util.find_spec("libtpu") is None:  # where no TPU runtime is installed
    assert JAX_NOISE in v_err


def _emitted(records: list[tuple[str, int, str]]) -> list[str]:
  """Messages that reach a handler on the root logger."""
  seen = []

  class Keep(logging.Handler):
    def emit(self, record):
      seen.append(record.getMessage())

  handler = Keep()
  root = logging.getLogger()
  root.addHandler(handler)
  old_level = root.level
  root.setLevel(logging.INFO)
  try:
    for name, level, message in records:
      logging.getLogger(name).log(level, message)
  finally:
    root.removeHandler(handler)
    root.setLevel(old_level)
  return seen


NOISY = [("absl", logging.WARNING, "Using custom data configuration: BuilderConfig(name='corpus')"),
         ("absl", logging.WARNING, "Variant folder /x/corpus/1.0.0 has no dataset_info.json"),
         ("jax._src.xla_bridge", logging.INFO, "Unable to initialize backend 'tpu': INTERNAL"),
         ("jax._src.xla_bridge", logging.WARNING, "Platform 'tpu' is experimental"),
         ("matplotlib.font_manager", logging.INFO, "generated new fontManager")]
KEPT = [("absl", logging.WARNING, "Dataset text_corpus is missing a split"),
        ("bort_jax.pipelines.distill", logging.INFO, "student D1-A2-H32-I48, teacher ...")]


@pytest.fixture
def restore_quiet():
  yield
  cli_main.quiet_noise(False)
  logging.getLogger("absl").setLevel(logging.WARNING)


def test_noise_filters_and_verbose(restore_quiet):
  cli_main.quiet_noise(False)
  logging.getLogger("absl").setLevel(logging.WARNING)
  assert _emitted(NOISY + KEPT) == [m for _, _, m in KEPT]
  cli_main.quiet_noise(False)  # set twice: still one filter per logger
  assert len(logging.getLogger("absl").filters) == 1
  cli_main.quiet_noise(True)
  assert _emitted(NOISY + KEPT) == [m for _, _, m in NOISY + KEPT]
  assert logging.getLogger("absl").level == logging.INFO
  assert not logging.getLogger("jax._src.xla_bridge").filters


def test_verbose_is_a_global_flag(capsys, restore_quiet):
  assert cli_main.main(["cost", "--arch", "D1-A2-H16-I32", "--verbose", "--json"]) == 0
  assert '"D1-A2-H16-I32"' in capsys.readouterr().out
  assert quiet.VERBOSE
  assert cli_main.main(["cost", "--help"]) == 0
  assert "--verbose" in capsys.readouterr().out


def test_records_read_like_the_printed_lines(capsys, restore_quiet):
  """One plain line per record: the package's as its printed lines, warnings say so, another
  library's name their logger; absl's ``logging.basicConfig()`` handler (installed when orbax
  logs at import) is replaced, not added to."""
  root = logging.getLogger()
  saved, level = root.handlers[:], root.level
  basic = logging.StreamHandler(sys.stderr)
  basic.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
  root.handlers = [basic]
  try:
    cli_main.quiet_noise(False)
    cli_main.configure_logging()
    cli_main.configure_logging()  # twice: still one handler
    assert len(root.handlers) == 1 and basic not in root.handlers
    logging.getLogger("bort_jax.interop.convert").info("dropped the all-zero token-type table")
    logging.warning("proxy audit: the proxy can NOT be trusted")
    logging.getLogger("absl").warning("Dataset text_corpus is missing a split")
    logging.getLogger("absl").info("Generating dataset bort_demo")
    logging.getLogger("matplotlib.font_manager").info("generated new fontManager")
    cli_main.quiet_noise(True)
    logging.getLogger("absl").info("Generating dataset bort_demo")
    logging.getLogger("matplotlib.font_manager").info("generated new fontManager")
  finally:
    root.handlers = saved
    root.setLevel(level)
  assert capsys.readouterr().err == (
      "dropped the all-zero token-type table\n"
      "warning: proxy audit: the proxy can NOT be trusted\n"
      "[absl] warning: Dataset text_corpus is missing a split\n"
      "[absl] Generating dataset bort_demo\n"
      "[matplotlib.font_manager] generated new fontManager\n")


def _font_cache_child(tmp_path, verbose: bool) -> subprocess.CompletedProcess:
  """A first matplotlib import (an empty MPLCONFIGDIR) after the command's logging set-up."""
  code = ("import sys; from bort_jax import main; main.quiet_noise('--verbose' in sys.argv); "
          "main.configure_logging(); import matplotlib.font_manager; print('imported')")
  env = dict(os.environ, PYTHONPATH=REPO, MPLCONFIGDIR=str(tmp_path / f"mpl{verbose}"))
  return subprocess.run([sys.executable, "-c", code] + (["--verbose"] if verbose else []),
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_first_matplotlib_import_is_quiet_unless_verbose(tmp_path):
  quiet_run, verbose_run = _font_cache_child(tmp_path, False), _font_cache_child(tmp_path, True)
  assert quiet_run.stdout == verbose_run.stdout == "imported\n"
  assert quiet_run.stderr == "", quiet_run.stderr
  assert "[matplotlib.font_manager] generated new fontManager" in verbose_run.stderr


TFDS_LINES = ("Downloading and preparing dataset", "downloaded and prepared to")


def test_demo_dataset_build_prints_nothing_unless_verbose(tmp_path, capsys, restore_quiet):
  from bort_jax.data import demo, tiny_suite
  tiny_suite.write_tiny_suite(str(tmp_path))
  capsys.readouterr()
  cli_main.quiet_noise(False)
  demo.build_demo("movie_sentiment", cache_dir=str(tmp_path))
  quiet_out = capsys.readouterr().out
  cli_main.quiet_noise(True)
  demo.build_demo("bbc_news", cache_dir=str(tmp_path))
  verbose_out = capsys.readouterr().out
  assert not any(line in quiet_out for line in TFDS_LINES), quiet_out
  assert all(line in verbose_out for line in TFDS_LINES), verbose_out
