"""A TFDS dataset by name as a task (data/tfds_tasks.py): a tiny builder made here stands in for
a catalog dataset (no internet in tests)."""

import json
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bort_jax import main as cli_main
from bort_jax.data import tfds_tasks
from bort_jax.finetune import tasks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_finetune import tiny  # noqa: E402,F401  (the tiny model and tokenizer fixture)

WORDS = {"negative": ["bad", "awful", "poor"], "positive": ["good", "great", "fine"]}


class BortJaxTinyReviews(tfds.core.GeneratorBasedBuilder):
  """Reviews with a ClassLabel, train and test splits: the shape of imdb_reviews."""

  VERSION = tfds.core.Version("1.0.0")
  url_infos = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "text": tfds.features.Text(),
        "label": tfds.features.ClassLabel(names=["negative", "positive"])}),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, 48), "test": self._generate_examples(1, 16)}

  def _generate_examples(self, seed, n):  # pylint: disable=arguments-differ
    rng = np.random.default_rng(seed)
    for i in range(n):
      label = ["negative", "positive"][int(rng.integers(2))]
      yield i, {"text": " ".join(rng.choice(WORDS[label], 3)), "label": label}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  builder = BortJaxTinyReviews(data_dir=path, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig())
  return path


def test_features_and_splits_are_inferred(data_dir):
  spec = tfds_tasks.register("tfds:bort_jax_tiny_reviews", {}, data_dir)
  assert (spec.kind, spec.num_labels, spec.label_names) == ("classification", 2,
                                                            ("negative", "positive"))
  assert spec.validation_splits == ("test",) and spec.test_splits == ()
  examples = tasks.cast_split(spec, tasks.load_split(spec, "train", data_dir))
  assert len(examples) == 48 and examples[0].text_a.split()[0] in sum(WORDS.values(), [])


@pytest.mark.parametrize("block, want", [
    ({"text": "review"}, "no feature 'review' for the text (config.tfds); it has text, label"),
    ({"validation_split": "dev"}, "needs a train split and a validation split ('dev'"),
])
def test_bad_settings_name_the_dataset_and_the_feature(data_dir, block, want):
  with pytest.raises(tfds_tasks.TfdsTaskError) as info:
    tfds_tasks.register("tfds:bort_jax_tiny_reviews", block, data_dir)
  assert want in str(info.value)


def test_an_unknown_dataset_exits_2(tmp_path, capsys):
  status = cli_main.main(["finetune", "--config=configs/finetune.py:task=tfds:no_such_set_xyz",
                          f"--workdir={tmp_path / 'run'}"])
  err = capsys.readouterr().err
  assert status == 2 and "tfds:no_such_set_xyz: no such TFDS dataset here" in err, err
  assert not (tmp_path / "run").exists()


def test_fine_tune_evaluate_and_predict_by_name(tiny, data_dir, tmp_path, capsys):
  work = str(tmp_path / "run")
  status = cli_main.main(["finetune", "--config=configs/finetune.py:task=tfds:bort_jax_tiny_"
                          f"reviews,tiny,init={tiny['init']},tokenizer={tiny['tokenizer']}",
                          f"--config.data_dir={data_dir}", "--config.seq_len=16",
                          f"--workdir={work}"])
  out = capsys.readouterr()
  assert status == 0, out.err
  best = os.path.join(work, "best")
  assert json.load(open(os.path.join(best, "finetune.json")))["label_names"] == [
      "negative", "positive"]
  status = cli_main.main(["evaluate", "--checkpoint", best, "--data-dir", data_dir])
  out = capsys.readouterr()
  assert status == 0, out.err
  assert set(json.loads(out.out)["metrics"]) == {"accuracy", "macro_f1"}
  status = cli_main.main(["predict", "--checkpoint", best, "--text", "great fine"])
  out = capsys.readouterr()
  assert status == 0, out.err
  assert json.loads(out.out)["label"] in ("negative", "positive")
