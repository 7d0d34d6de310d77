"""The official metrics of GLUE, SuperGLUE and RACE.

Standard scores come from scikit-learn and SciPy; only ReCoRD's SQuAD-style token F1 / exact
match and the two grouped scores (MultiRC exact match per question, AX-g gender parity) have no
library equivalent and are written here. All values are fractions in [0, 1] (correlations in
[-1, 1]), not percentages.

``compute_metrics(task_name, predictions, labels, groups)`` reads the metric names from the
task registry, so it takes what ``tasks.gather_predictions`` returns.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Any, Callable, Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from bort_jax.finetune import tasks as tasks_lib


def _ints(values, name: str) -> np.ndarray:
  arr = np.asarray(values)
  if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{name} must be a 1-D sequence of class ids, got dtype {arr.dtype} "
                     f"and shape {arr.shape}")
  return arr


def _check(predictions, labels):
  if len(predictions) != len(labels):
    raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
  if len(labels) == 0:
    raise ValueError("no predictions to score")


def _class_pair(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
  _check(predictions, labels)
  p, y = _ints(predictions, "predictions"), _ints(labels, "labels")
  if (y < 0).any():
    raise ValueError(f"{int((y < 0).sum())} labels are -1 (an unlabeled test split cannot be "
                     "scored)")
  return p, y


def accuracy(predictions, labels) -> float:
  """Fraction of exact matches (sklearn ``accuracy_score``)."""
  p, y = _class_pair(predictions, labels)
  return float(skm.accuracy_score(y, p))


def mcc(predictions, labels) -> float:
  """Matthews correlation (CoLA, AX, AX-b); sklearn's multi-class form for 3 classes."""
  p, y = _class_pair(predictions, labels)
  return float(skm.matthews_corrcoef(y, p))


def f1(predictions, labels) -> float:
  """Binary F1 of the positive class 1 (MRPC, QQP)."""
  p, y = _class_pair(predictions, labels)
  return float(skm.f1_score(y, p, pos_label=1, average="binary", zero_division=0))


def macro_f1(predictions, labels, num_labels: int | None = None) -> float:
  """Unweighted mean of per-class F1 (CB, over all of its 3 classes)."""
  p, y = _class_pair(predictions, labels)
  classes = list(range(num_labels)) if num_labels else None
  return float(skm.f1_score(y, p, labels=classes, average="macro", zero_division=0))


def _floats(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
  _check(predictions, labels)
  p = np.asarray(predictions, np.float64).reshape(-1)
  y = np.asarray(labels, np.float64).reshape(-1)
  if len(p) < 2:
    raise ValueError("a correlation needs at least 2 predictions")
  return p, y


def pearson(predictions, labels) -> float:
  """Pearson correlation (STS-B), ``scipy.stats.pearsonr``."""
  p, y = _floats(predictions, labels)
  return float(stats.pearsonr(p, y)[0])


def spearman(predictions, labels) -> float:
  """Spearman rank correlation (STS-B), ``scipy.stats.spearmanr``."""
  p, y = _floats(predictions, labels)
  return float(stats.spearmanr(p, y)[0])


def mse(predictions, labels) -> float:
  """Mean squared error of a regression (``sklearn.metrics.mean_squared_error``)."""
  p, y = _floats(predictions, labels)
  return float(skm.mean_squared_error(y, p))


def _group_ids(groups, n: int, metric: str) -> np.ndarray:
  if groups is None:
    raise ValueError(f"{metric} needs groups (one group id per prediction)")
  g = np.asarray(groups).reshape(-1)
  if len(g) != n:
    raise ValueError(f"{metric}: {len(g)} group ids for {n} predictions")
  return g


def group_exact_match(predictions, labels, groups) -> float:
  """Fraction of groups whose predictions are all right (MultiRC EM, per question)."""
  p, y = _class_pair(predictions, labels)
  g = _group_ids(groups, len(p), "group exact match")
  correct = collections.defaultdict(lambda: True)
  for gi, ok in zip(g.tolist(), (p == y).tolist()):
    correct[gi] = correct[gi] and ok
  return float(np.mean(list(correct.values())))


def gender_parity(predictions, groups) -> float:
  """Fraction of groups (AX-g minimal pairs) whose members all get the same prediction."""
  p = _ints(predictions, "predictions")
  g = _group_ids(groups, len(p), "gender parity")
  seen: dict[Any, set] = collections.defaultdict(set)
  for gi, pi in zip(g.tolist(), p.tolist()):
    seen[gi].add(pi)
  sizes = collections.Counter(g.tolist())
  if any(size != 2 for size in sizes.values()):
    bad = sorted(k for k, v in sizes.items() if v != 2)[:5]
    raise ValueError(f"gender parity expects pairs; groups {bad} do not have 2 members")
  return float(np.mean([len(s) == 1 for s in seen.values()]))


# --------------------------------------------------------------------- SQuAD-style (ReCoRD)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
  """Lowercases, drops punctuation and the articles a/an/the, and collapses whitespace."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
  """Bag-of-tokens F1 between normalised answers (0 when nothing overlaps)."""
  pred_tokens = normalize_answer(prediction).split()
  gold_tokens = normalize_answer(gold).split()
  overlap = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
  if overlap == 0:
    return 0.0
  precision = overlap / len(pred_tokens)
  recall = overlap / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
  """1.0 when the normalised answers are equal."""
  return float(normalize_answer(prediction) == normalize_answer(gold))


def _max_over_gold(fn: Callable[[str, str], float], prediction: str,
                   golds: Sequence[str]) -> float:
  return max(fn(prediction, g) for g in golds)


def record_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]
                  ) -> dict[str, float]:
  """ReCoRD: mean over queries of the max-over-gold token F1 and exact match.

  Args:
    predictions: the chosen entity per query.
    answers: the gold answers per query (non-empty).

  Returns:
    ``{"token_f1": ..., "exact_match": ...}``.
  """
  _check(predictions, answers)
  f1s, ems = [], []
  for i, (pred, golds) in enumerate(zip(predictions, answers)):
    golds = list(golds)
    if not golds:
      raise ValueError(f"ReCoRD query {i} has no gold answers (unlabeled test split?)")
    f1s.append(_max_over_gold(token_f1, pred, golds))
    ems.append(_max_over_gold(exact_match, pred, golds))
  return {"token_f1": float(np.mean(f1s)), "exact_match": float(np.mean(ems))}


# --------------------------------------------------------------------- dispatch


def compute_metrics(task_name: str, predictions: Sequence, labels: Sequence,
                    groups: Sequence[int] | None = None) -> dict[str, float]:
  """Scores one task with its official metrics.

  Args:
    task_name: a registered task (``"glue/cola"``, ``"super_glue/record"``, ...).
    predictions: one prediction per unit: class ids, floats (STS-B), or entity strings
      (ReCoRD).
    labels: gold labels aligned with ``predictions`` (ReCoRD: a list of answers per query).
    groups: group ids aligned with ``predictions`` (MultiRC questions, AX-g pairs).

  Returns:
    ``{metric name: value}`` for every metric in the task's spec.
  """
  spec = tasks_lib.get_task(task_name)
  wanted = spec.metrics
  if "token_f1" in wanted or "exact_match" in wanted:  # ReCoRD: answers are strings
    scores = record_scores(predictions, labels)
    return {k: scores[k] for k in wanted}
  out = {}
  for name in wanted:
    if name == "accuracy":
      out[name] = accuracy(predictions, labels)
    elif name == "mcc":
      out[name] = mcc(predictions, labels)
    elif name == "f1":
      out[name] = f1(predictions, labels)
    elif name == "macro_f1":
      out[name] = macro_f1(predictions, labels, spec.num_labels)
    elif name == "pearson":
      out[name] = pearson(predictions, labels)
    elif name == "spearman":
      out[name] = spearman(predictions, labels)
    elif name == "mse":
      out[name] = mse(predictions, labels)
    elif name == "f1a":  # MultiRC: binary F1 over every answer option
      out[name] = f1(predictions, labels)
    elif name == "em":  # MultiRC: every answer of a question right
      out[name] = group_exact_match(predictions, labels, groups)
    elif name == "gender_parity":
      out[name] = gender_parity(predictions, groups)
    else:
      raise ValueError(f"task {spec.name!r}: unknown metric {name!r}")
  return out


# --------------------------------------------------------------------- baselines

# A constant answer has no correlation with anything: of a regression's metrics only these
# are defined for it.
_CONSTANT_REGRESSION_METRICS = ("mse",)


def baseline(task_name: str, train_labels: Sequence, labels: Sequence,
             groups: Sequence[int] | None = None) -> dict[str, Any]:
  """The floor a fine-tuned model must clear: one constant answer, scored like the model.

  The answer is the training split's majority class (classification; the most frequent
  correct choice of multiple choice) or the training split's mean (regression), scored on
  ``labels`` with every metric of the task that a constant answer has (a correlation has none,
  so a regression's floor is its ``mse``).

  Args:
    task_name: a registered task.
    train_labels: the training split's labels (unlabelled entries, -1, are skipped).
    labels: the scored split's gold labels, aligned with ``groups``.
    groups: as in :func:`compute_metrics`.

  Returns:
    ``{"answer": "majority class" | "training mean", "value": the answer, "scores": {metric:
    value}}``, or ``{}`` when the task has no such floor (candidates, ReCoRD) or no labels.
  """
  spec = tasks_lib.get_task(task_name)
  if spec.kind in ("classification", "multiple_choice"):
    known = [int(y) for y in train_labels if int(y) >= 0]
    if not known or not len(labels):
      return {}
    answer = int(np.bincount(known).argmax())
    scores = compute_metrics(task_name, [answer] * len(labels), labels, groups)
    return {"answer": "majority class", "value": answer, "scores": scores}
  if spec.kind == "regression":
    known = np.asarray([float(y) for y in train_labels], np.float64)
    if not known.size or len(labels) < 2:
      return {}
    answer = float(known.mean())
    scores = {name: mse([answer] * len(labels), labels) for name in spec.metrics
              if name in _CONSTANT_REGRESSION_METRICS}
    return {"answer": "training mean", "value": answer, "scores": scores}
  return {}
