"""Pretraining corpora from a TFDS dataset by name (data/corpus_sources.py).

A tiny TFDS builder made here stands in for a catalog corpus such as Wikipedia (no internet in
tests): it holds the documents of test_distill's text files, so the same text read by name must
give the very batches the files give, and distillation reads it by name end to end.
"""

import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bort_jax import main as cli_main
from bort_jax.data import corpus_sources
from bort_jax.pipelines import distill, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_distill import DOCUMENTS, make_assets, make_config  # noqa: E402


class BortJaxTinyWiki(tfds.core.GeneratorBasedBuilder):
  """Articles with a title and a text, one train split: the shape of the wikipedia builder."""

  VERSION = tfds.core.Version("1.0.0")
  url_infos = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "title": tfds.features.Text(), "text": tfds.features.Text()}), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):  # pylint: disable=arguments-differ
    # The order of test_distill's files (part-0 holds the even documents, part-1 the odd);
    # blank lines and stray spaces between paragraphs, as article texts have them.
    ordered = DOCUMENTS[0::2] + DOCUMENTS[1::2]
    for i, lines in enumerate(ordered):
      yield i, {"title": f"article {i}", "text": "  \n\n".join(lines) + "\n"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("corpus_sources"))
  out = make_assets(root)
  out["catalog"] = os.path.join(root, "catalog")
  builder = BortJaxTinyWiki(data_dir=out["catalog"], file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig())
  return out


def by_name(assets, **extra):
  return {"data.corpus_tfds": "bort_jax_tiny_wiki", "data.data_dir": assets["catalog"],
          "data.cache_dir": "", **extra}


def test_a_tfds_corpus_gives_the_batches_of_the_same_text_files(assets):
  files = make_config(assets, **{"data.cache_dir": ""})
  named = make_config(assets, **by_name(assets))
  for split in ("train", "validation"):
    for seed in (0, 3):
      try:
        a, _ = setup.make_input(files.data, "bert", seed, split=split)
      except ValueError as error:  # the files' corpus may hold no validation document
        assert "has no 'validation' split" in str(error) and split == "validation"
        with pytest.raises(ValueError, match="no 'validation' documents"):
          setup.make_input(named.data, "bert", seed, split=split)
        continue
      b, _ = setup.make_input(named.data, "bert", seed, split=split)
      assert a.num_examples == b.num_examples > 0
      for step in range(3):
        x, y = a.batch(step), b.batch(step)
        assert x.keys() == y.keys()
        for key in x:
          np.testing.assert_array_equal(x[key], y[key], err_msg=f"{split} {key} step {step}")


def test_process_shares_partition_the_records():
  shares = [list(corpus_sources.process_share(11, i, 3)) for i in range(3)]
  assert sorted(sum(shares, [])) == list(range(11))
  assert shares[1] == [1, 4, 7, 10]
  with pytest.raises(ValueError):
    corpus_sources.process_share(11, 3, 3)


def test_each_process_reads_only_its_share(assets):
  whole = corpus_sources.tfds_documents("bort_jax_tiny_wiki", data_dir=assets["catalog"],
                                        validation_fraction=0.0)
  parts = [corpus_sources.tfds_documents("bort_jax_tiny_wiki", data_dir=assets["catalog"],
                                         validation_fraction=0.0, process_index=i,
                                         process_count=2) for i in range(2)]
  assert len(whole) == len(DOCUMENTS) and parts[0] == whole[0::2] and parts[1] == whole[1::2]
  assert whole[0] == "\n".join(DOCUMENTS[0])


def test_expand_matches_sorted_unique_files(tmp_path):
  for name in ("b.txt", "a.txt", "c.md"):
    (tmp_path / name).write_text("x\n")
  pattern = str(tmp_path / "*.txt")
  assert corpus_sources.expand([pattern, pattern, ""]) == [str(tmp_path / "a.txt"),
                                                          str(tmp_path / "b.txt")]


def test_distillation_reads_a_tfds_corpus_by_name(assets, tmp_path):
  workdir = str(tmp_path / "run")
  config = make_config(assets, **by_name(assets, **{"train.total_steps": 4,
                                                    "train.eval_every": 0}))
  result = distill.run(config, workdir)
  assert result["step"] == 4 and os.path.isdir(result["export"])


@pytest.mark.parametrize("extra, want", [
    ({"data.corpus_tfds": "no_such_corpus_xyz"},
     "config.data.corpus_tfds='no_such_corpus_xyz': no such TFDS dataset here"),
    ({"data.corpus_field": "body"},
     "config.data.corpus_field='body': bort_jax_tiny_wiki has no such feature; it has text, "
     "title"),
])
def test_bad_corpus_settings_exit_2_naming_the_field(assets, tmp_path, capsys, extra, want):
  flags = {**by_name(assets), "teacher.kind": "params", "teacher.path": assets["teacher"],
           "data.tokenizer": assets["tokenizer"], **extra}
  args = [f"--config.{k}={v}" for k, v in flags.items()]
  status = cli_main.main(["distill", "--config=configs/pretrain_demo.py:tiny",
                          f"--workdir={tmp_path / 'run'}", *args])
  err = capsys.readouterr().err
  assert status == 2 and want in err, err
  assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_a_corpus_that_is_not_prepared_says_how_to_get_it(tmp_path):
  with pytest.raises(corpus_sources.CorpusSourceError, match="config.data.download=True"):
    corpus_sources.open_tfds("bort_jax_tiny_wiki", "train", str(tmp_path), False)
