"""The notebook ``launch/notebooks/bort_jax_demo.ipynb`` runs as committed, headless (nbclient).

Default suite: the notebook is valid and clean, has exactly one cell to edit, finds the clone it
sits in, and outside a clone with ``BORT_JAX_SOURCE`` unset stops with a message that says what
to set (these execute only its set-up cells: a kernel start, seconds); and the whole notebook as
committed in its tiny mode (``BORT_JAX_NOTEBOOK_TINY=1``: ``bort-jax demo --quick
--config=configs/demo.py:tiny`` on the synthetic suite, a few minutes on a 2-core machine, most
of it compiling), which must run all seven stages and end with the headline and the run's plots
displayed inline. It is in the default suite on purpose: it guards the README's and the
notebook's promise, and a slow test that nobody ran let both rot once.
"""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "launch", "notebooks", "bort_jax_demo.ipynb")
SETUP_CELLS = 4  # intro, the source cell, a heading, find-or-install


def _read():
  return nbformat.read(NOTEBOOK, as_version=4)


def _execute(nb, cwd, timeout=120):
  client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                   resources={"metadata": {"path": str(cwd)}})
  client.execute()
  return nb


def _text(nb) -> str:
  out = []
  for cell in nb.cells:
    for output in cell.get("outputs", []):
      out.append(output.get("text", ""))
      out.append(output.get("data", {}).get("text/markdown", ""))
      out.append(output.get("evalue", ""))
  return "\n".join(out)


def test_notebook_is_valid_clean_and_has_one_cell_to_edit():
  nb = _read()
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code)  # committed clean
  assert [c.source.count('BORT_JAX_SOURCE = ""') for c in code].count(1) == 1
  assert "already cloned" not in "".join(c.source for c in nb.cells)


def test_outside_a_clone_an_unset_source_stops_with_what_to_set(tmp_path):
  nb = _read()
  nb.cells = nb.cells[:SETUP_CELLS]
  with pytest.raises(nbclient.exceptions.CellExecutionError) as raised:
    _execute(nb, tmp_path)
  message = str(raised.value)
  assert "not inside a bort_jax clone, and BORT_JAX_SOURCE is empty" in message
  assert "Set BORT_JAX_SOURCE in the cell above" in message
  assert not os.listdir(tmp_path)  # nothing cloned or written


def test_inside_the_clone_it_uses_the_clone():
  nb = _read()
  nb.cells = nb.cells[:SETUP_CELLS]
  _execute(nb, os.path.dirname(NOTEBOOK))
  assert f"bort_jax from {REPO}" in _text(nb)


def test_the_whole_notebook_in_tiny_mode(tmp_path, monkeypatch):
  monkeypatch.setenv("BORT_JAX_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("BORT_JAX_NOTEBOOK_WORKDIR", str(tmp_path / "demo"))
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, as a user's runtime has
  nb = _execute(_read(), os.path.dirname(NOTEBOOK), timeout=900)
  text = _text(nb)
  assert "--quick" in text and "=== [7/7] report: done" in text
  assert "Chosen" in text and "Headline" in text
  images = [o for c in nb.cells for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
  pngs = sorted(p.relative_to(tmp_path / "demo") for p in (tmp_path / "demo").glob("**/*.png"))
  assert pngs and len(images) == len(pngs)
  assert f"{len(pngs)} plot(s) under" in text


def test_tiny_suite_is_a_demo_cache(tmp_path):
  """The notebook's tiny mode reads the synthetic suite through the real parsers and loaders."""
  from bort_jax import cli
  from bort_jax.data import demo, tiny_suite, tokenization
  from bort_jax.interop import convert
  paths = tiny_suite.write_tiny_suite(str(tmp_path))
  config, params = convert.load_hf(paths["teacher_dir"], with_mlm_head=False)
  assert str(config.arch) == tiny_suite.TEACHER["arch"] and "mlm_head" not in params
  tok = tokenization.load_tokenizer(paths["teacher_dir"], "bert")
  corpus = "".join(open(os.path.join(paths["corpus"], n)).read()
                   for n in sorted(os.listdir(paths["corpus"])))
  assert tok.unk_id not in tok.encode(corpus)  # every word of the corpus is in the vocabulary
  for name in demo.CONFIGS:
    splits = demo.parse_config(name, str(tmp_path))
    assert splits["train"] and splits["validation"], name
    assert sum(map(len, splits.values())) >= 60, name
  before = os.path.getmtime(paths["teacher_config"])
  tiny_suite.write_tiny_suite(str(tmp_path))  # already there: left as it is
  assert os.path.getmtime(paths["teacher_config"]) == before
  demo_config = cli.load_config("configs/demo.py:tiny")
  assert demo_config.tiny and demo_config.distill.train.total_steps <= 10
