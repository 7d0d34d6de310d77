"""Metrics agree with sklearn / scipy and with hand-computed values for the custom ones."""

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from bort_jax.finetune import metrics
from bort_jax.finetune import tasks


def _random_classes(n_classes, n=200, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, n_classes, n)
  # Agree with the labels 60% of the time so the scores are away from chance.
  preds = np.where(rng.random(n) < 0.6, labels, rng.integers(0, n_classes, n))
  return preds, labels


def test_classification_metrics_match_sklearn_and_hand_values():
  p, y = _random_classes(2)
  assert metrics.accuracy(p, y) == pytest.approx(skm.accuracy_score(y, p))
  assert metrics.mcc(p, y) == pytest.approx(skm.matthews_corrcoef(y, p))
  assert metrics.f1(p, y) == pytest.approx(skm.f1_score(y, p))
  # Hand case: tp=2, tn=1, fp=1, fn=1.
  p, y = [1, 1, 1, 0, 0], [1, 1, 0, 1, 0]
  assert metrics.accuracy(p, y) == pytest.approx(3 / 5)
  assert metrics.f1(p, y) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
  assert metrics.mcc(p, y) == pytest.approx((2 * 1 - 1 * 1) / np.sqrt(3 * 3 * 2 * 2))


def test_three_class_metrics():
  p, y = _random_classes(3, seed=1)
  assert metrics.mcc(p, y) == pytest.approx(skm.matthews_corrcoef(y, p))
  assert metrics.macro_f1(p, y, 3) == pytest.approx(skm.f1_score(y, p, average="macro"))
  # A class absent from both counts as F1 0 in CB's mean over its 3 classes.
  assert metrics.macro_f1([0, 1, 1], [0, 1, 0], 3) == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_correlations_match_scipy():
  rng = np.random.default_rng(2)
  y = rng.uniform(0, 5, 100)
  p = y + rng.normal(0, 1, 100)
  assert metrics.pearson(p, y) == pytest.approx(stats.pearsonr(p, y)[0])
  assert metrics.pearson(p, y) == pytest.approx(np.corrcoef(p, y)[0, 1])
  assert metrics.spearman(p, y) == pytest.approx(stats.spearmanr(p, y)[0])
  # Monotone but not linear: Spearman 1, Pearson below 1.
  assert metrics.spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
  assert metrics.pearson([1, 2, 3, 4], [1, 4, 9, 100]) < 0.9


def test_normalize_answer_hand_cases():
  assert metrics.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
  assert metrics.normalize_answer("an apple, a pear") == "apple pear"
  assert metrics.normalize_answer("U.S.A.") == "usa"
  assert metrics.normalize_answer("Theatre") == "theatre"  # "the" only as a word
  assert metrics.normalize_answer("  ") == ""


def test_token_f1_and_exact_match_hand_cases():
  assert metrics.token_f1("the Barack Obama", "Obama") == pytest.approx(2 * 0.5 * 1 / 1.5)
  assert metrics.token_f1("New York City", "new york") == pytest.approx(2 * (2 / 3) / (5 / 3))
  assert metrics.token_f1("Paris", "London") == 0.0
  assert metrics.exact_match("The Beatles.", "beatles") == 1.0
  assert metrics.exact_match("Beatles", "Rolling Stones") == 0.0
  scores = metrics.record_scores(["Obama", "Paris", "New York City"],
                                 [["Barack Obama", "Obama"], ["London"], ["new york"]])
  assert scores["exact_match"] == pytest.approx(1 / 3)
  assert scores["token_f1"] == pytest.approx((1.0 + 0.0 + 0.8) / 3)


def test_multirc_hand_values():
  preds = [1, 1, 0, 0, 1, 0]
  labels = [1, 0, 0, 1, 1, 0]
  groups = [0, 0, 1, 1, 2, 2]
  got = metrics.compute_metrics("super_glue/multirc", preds, labels, groups)
  # F1a over all options: tp=2, fp=1, fn=1 -> 2/3. EM: only question 2 is all right.
  assert got == pytest.approx({"f1a": 2 / 3, "em": 1 / 3})
  assert got["f1a"] == pytest.approx(skm.f1_score(labels, preds))


def test_gender_parity_hand_values():
  preds = [0, 0, 1, 0, 1, 1, 0, 1]
  groups = [0, 0, 1, 1, 2, 2, 3, 3]
  assert metrics.gender_parity(preds, groups) == pytest.approx(0.5)
  with pytest.raises(ValueError, match="pairs"):
    metrics.gender_parity([0, 0, 1], [0, 0, 0])


@pytest.mark.parametrize("name", [n for n in tasks.task_names()
                                  if not n.startswith("test/")])
def test_compute_metrics_returns_each_task_metric(name):
  spec = tasks.get_task(name)
  if spec.name == "super_glue/record":
    preds, labels, groups = ["a b", "c"], [["a b"], ["d", "c e"]], None
  elif spec.kind == "regression":
    preds, labels, groups = [0.5, 2.0, 4.0], [1.0, 2.5, 3.0], None
  else:
    n = spec.num_labels if spec.kind != "candidates" else 2
    preds, labels = _random_classes(n, n=40, seed=3)
    groups = np.arange(40) // 2
  got = metrics.compute_metrics(name, preds, labels, groups)
  assert list(got) == list(spec.metrics)
  assert all(np.isfinite(v) for v in got.values())


def test_bad_inputs_get_clear_errors():
  with pytest.raises(ValueError, match="unlabeled"):
    metrics.accuracy([0, 1], [0, -1])
  with pytest.raises(ValueError, match="2 predictions but 3 labels"):
    metrics.accuracy([0, 1], [0, 1, 1])
  with pytest.raises(ValueError, match="class ids"):
    metrics.mcc([0.5, 1.0], [0, 1])
  with pytest.raises(ValueError, match="needs groups"):
    metrics.compute_metrics("super_glue/multirc", [0, 1], [0, 1])
  with pytest.raises(ValueError, match="no gold answers"):
    metrics.record_scores(["x"], [[]])
  with pytest.raises(ValueError, match="unknown task"):
    metrics.compute_metrics("glue/sts", [0.1, 0.2], [0.1, 0.2])


def test_mse_matches_sklearn():
  preds, labels = [0.5, 2.0, 4.0, 1.0], [1.0, 2.5, 3.0, 1.0]
  assert metrics.mse(preds, labels) == pytest.approx(skm.mean_squared_error(labels, preds))


def _regression_task(name):
  tasks.register_task(tasks.TaskSpec(name=name, builder=None, kind="regression", num_labels=1,
                                     cast=None, metrics=("pearson", "spearman", "mse"),
                                     source=lambda split, data_dir=None: []),
                      overwrite=True)


def test_baseline_is_the_train_majority_or_mean_scored_like_the_model():
  # Classification: the train split's most frequent class, on every metric of the task.
  floor = metrics.baseline("glue/sst2", [1, 1, 0, -1], [1, 0, 0, 0])
  assert floor == {"answer": "majority class", "value": 1, "scores": {"accuracy": 0.25}}
  floor = metrics.baseline("glue/mrpc", [0, 0, 1], [1, 0, 0, 0])
  assert floor["value"] == 0 and floor["scores"] == pytest.approx(
      {"accuracy": 0.75, "f1": skm.f1_score([1, 0, 0, 0], [0, 0, 0, 0], zero_division=0)})
  # Multiple choice: the most frequent correct choice.
  assert metrics.baseline("race/middle", [2, 2, 1], [2, 0, 3, 2])["scores"] == {"accuracy": 0.5}
  # Regression: the train mean; a constant has no correlation, so only its mean squared error.
  _regression_task("test/regression_floor")
  train, dev = [1.0, 2.0, 6.0], [2.0, 4.0, 3.0]
  floor = metrics.baseline("test/regression_floor", train, dev)
  assert floor["answer"] == "training mean" and floor["value"] == pytest.approx(3.0)
  assert floor["scores"] == {"mse": pytest.approx(skm.mean_squared_error(dev, [3.0] * 3))}
  # STS-B scores correlations only: no floor is defined for a constant answer.
  assert metrics.baseline("glue/stsb", train, dev)["scores"] == {}
  # Nothing to score, or no labelled training row: no floor.
  assert metrics.baseline("glue/sst2", [-1, -1], [0, 1]) == {}
  assert metrics.baseline("glue/sst2", [0, 1], []) == {}
