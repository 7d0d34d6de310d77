"""Agora: fine-tuning that feeds the best model's dev mistakes back as labelled new points.

The authors' method (docs/BORT.md section 5; never released), as implemented here:

1. fine-tune one model per hyperparameter set in Theta (one population: every set is a
   :class:`population.Member`, trained from the same checkpoint in one compiled program) on
   the current training set; record each one's dev accuracy;
2. take the best model's dev mistakes;
3. make nearby new points from each mistake with a pluggable transformation (default
   ``augment.MLMTokenTransform``: resample some tokens with an MLM head, then a simple token
   edit);
4. label them with a pluggable labeller (default :class:`ModelLabeller`: a fine-tuned teacher
   named in the config) whose dev accuracy must exceed 2/3 (one at or below it is refused
   before anything trains), and add them to the training set;
5. prune Theta (below);
6. repeat while Theta is not empty; return the best model of every round.

**Step 5, made precise.** Theta is sorted by dev accuracy, best first (ties keep Theta's
order). "The longest common run rooted at the best one" is read as the maximal prefix of
that list whose accuracies are within one standard error of the best one,
``acc_best - acc <= sqrt(acc_best * (1 - acc_best) / n_dev)`` (a binomial standard error on
the n_dev dev points): the sets this dev set cannot tell apart from the best. They have had
their chance on the data the best one also saw, so they leave, and the next round tries the
remaining sets on the augmented data. Why this reading and not "shares a hyperparameter
value with the best": that one depends on how the grid is written (a grid with one weight
decay removes everything in round 1), while a statistical tie depends only on the results.
The best set is always in its own run, so Theta loses at least one set per round and the
loop ends after at most ``len(Theta)`` rounds.

**Preconditions.** Agora is defined for binary classification. Tasks are cast to binary
(:func:`to_binary`): a binary classification or a candidates task (COPA, MultiRC, ReCoRD,
already one binary row per candidate) stays as it is; a multi-class task becomes
"majority class of the training split vs the rest" (one vs rest, the class the model most
needs to separate); a multiple-choice task becomes one (context, choice) row per choice,
labelled 1 for the right choice. Regression is refused. The accuracy reported is on the
binary-cast dev rows.

**Journal and resume.** Each finished round appends one line to ``workdir/agora.jsonl``
(written, flushed and fsync'd): the round, Theta's members and dev accuracies, the best set,
mistakes, points added, the sets removed and those left. The round's new points are written
to ``points_<round>.npz`` and, when the round's best model beats every earlier round's, its
parameters to ``best/`` (``interop.export`` format), both before the journal line. A killed
run replays the journal, reloads the points, and starts at the round after the last finished
one; every random choice is a function of (seed, round, step, row), so it ends where an
uninterrupted run ends.

**Round 0 from a finished run.** Round 0 trains Theta on the task's own rows: for a task that
needs no cast, that is exactly a plain population run of the same members
(``finetune ...,seeds=N``). ``config.agora.first_round`` names such a run's folder; its final
checkpoint is used for round 0 when its members, training rows, initial weights and settings
match (``population.restore_finished``), and the journal's ``read_from`` says so. The demo
runs Agora this way on the student's own fine-tuning.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import numpy as np

from bort_jax.core import model
from bort_jax.core.arch import ModelConfig
from bort_jax.finetune import population as pop_lib
from bort_jax.finetune.augment import ROW_KEYS, Transform, fixed_batches
from bort_jax.finetune.members import best_index, members_from_config, settings_from_config
from bort_jax.finetune.prepare import prepare
from bort_jax.runtime import fileio, rundir

MIN_LABELLER_ACCURACY = 2.0 / 3.0
JOURNAL = "agora.jsonl"


class AgoraError(ValueError):
  """Agora cannot run as configured (a task it cannot cast, a weak labeller)."""


# ----------------------------------------------------------------------------- casting


def majority_class(labels: np.ndarray, weight: np.ndarray) -> int:
  """The most frequent label among weighted rows (the smallest id on a tie)."""
  counts = np.bincount(np.asarray(labels)[np.asarray(weight) > 0])
  return int(np.argmax(counts))


def to_binary(data: Mapping[str, np.ndarray], kind: str, num_labels: int,
              positive: int | None = None) -> dict[str, np.ndarray]:
  """Casts a tokenised split to binary rows (see the module docstring).

  Args:
    data: ``input_ids``, ``attention_mask``, ``token_type_ids`` (``[N, T]``, or ``[N, C, T]``
      for multiple choice), ``label``, ``weight``.
    kind: the task kind.
    num_labels: the task's label count.
    positive: multi-class only: the class that becomes 1 (pass the training split's
      majority class for every split).

  Returns:
    ``[M, T]`` rows with 0/1 ``label`` and ``weight``.
  """
  keep = np.asarray(data["weight"]) > 0
  rows = {k: np.asarray(data[k])[keep] for k in ROW_KEYS + ("label",)}
  if kind == "regression":
    raise AgoraError("Agora needs a classification task; regression has no classes to cast")
  if kind == "multiple_choice":
    n, c = rows["input_ids"].shape[:2]
    out = {k: rows[k].reshape((n * c,) + rows[k].shape[2:]) for k in ROW_KEYS}
    out["label"] = (np.arange(c)[None, :] == rows["label"][:, None]).reshape(-1).astype(np.int32)
  elif kind in ("classification", "candidates"):
    out = {k: rows[k] for k in ROW_KEYS}
    label = rows["label"].astype(np.int32)
    if num_labels > 2:
      if positive is None:
        raise AgoraError("a multi-class task needs the class cast to 1 (positive=...)")
      label = (label == positive).astype(np.int32)
    out["label"] = label
  else:
    raise AgoraError(f"Agora cannot cast task kind {kind!r}")
  out["weight"] = np.ones(len(out["label"]), np.float32)
  return out


# ----------------------------------------------------------------------------- labellers


class Labeller(Protocol):
  """What Agora needs from a labeller."""

  def __call__(self, rows: Mapping[str, np.ndarray]) -> np.ndarray:
    """Binary labels ``[N]`` int32 for ``[N, T]`` rows."""


class ModelLabeller:
  """Labels rows with a model that carries a 2-class classification head.

  Args:
    config: its model config.
    params: its parameters (a fine-tuned teacher).
    batch_size: rows per forward pass.
    layout: its head's layout (None: the family's default).
  """

  def __init__(self, config: ModelConfig, params: Any, batch_size: int = 32,
               layout: str | None = None):
    self.config = config.replace(dropout=0.0, attention_dropout=0.0)
    self.params = params
    self.batch_size = batch_size
    head = model.HeadSpec("classification", 2, layout).resolve(config.family)
    self._forward = jax.jit(lambda p, b: model.apply(p, self.config, b, head=head)["logits"])

  def __call__(self, rows: Mapping[str, np.ndarray]) -> np.ndarray:
    keys = ROW_KEYS if self.config.type_vocab_size else ROW_KEYS[:2]
    out = [np.argmax(np.asarray(self._forward(self.params, batch)), axis=-1)[:count]
           for _, count, batch in fixed_batches({k: rows[k] for k in keys}, self.batch_size)]
    return np.concatenate(out).astype(np.int32) if out else np.zeros((0,), np.int32)


def labeller_bar(value: Any, field: str) -> float:
  """A labeller bar from a config (``field`` names it): a number in [0, 1)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
    raise AgoraError(f"{field}={value!r} must be a number in [0, 1) (Agora's rule is 2/3)")
  return float(value)


def check_labeller(labeller: Labeller, dev: Mapping[str, np.ndarray],
                   min_accuracy: float = MIN_LABELLER_ACCURACY) -> float:
  """The labeller's dev accuracy; refuses one at or below ``min_accuracy``.

  The default, 2/3, is the authors' "ok-ish" labeller; ``config.agora.min_labeller_accuracy``
  changes it (the demo's tiny smoke run lowers it to 0 so that its random-level models still
  go through the rounds).

  Raises:
    AgoraError: accuracy <= min_accuracy.
  """
  accuracy = float(np.mean(np.asarray(labeller(dev)) == np.asarray(dev["label"])))
  if accuracy <= min_accuracy:
    bound = "2/3" if min_accuracy == MIN_LABELLER_ACCURACY else f"{min_accuracy:.4f}"
    raise AgoraError(f"the labeller's dev accuracy is {accuracy:.4f}, at or below {bound}; "
                     "Agora needs a labeller better than that (fine-tune the teacher longer or "
                     "name another one in config.agora.labeller)")
  return accuracy


# ----------------------------------------------------------------------------- pruning


def prune(accuracies: Sequence[float], n_dev: int) -> list[int]:
  """Indices of the Theta sets that step 5 removes (see the module docstring).

  Args:
    accuracies: dev accuracy of each set, in Theta's order.
    n_dev: number of dev rows the accuracies were measured on.

  Returns:
    The indices of the run rooted at the best set, best first (never empty).
  """
  if not accuracies:
    raise ValueError("prune needs at least one accuracy")
  order = sorted(range(len(accuracies)), key=lambda i: (-accuracies[i], i))
  best = accuracies[order[0]]
  stderr = math.sqrt(max(best * (1.0 - best), 0.0) / max(n_dev, 1))
  run = [order[0]]
  for i in order[1:]:
    if best - accuracies[i] > stderr + 1e-12:
      break
    run.append(i)
  return run


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class AgoraResult:
  """What :func:`run_agora` returns.

  Attributes:
    rounds: the journal entries, one per round.
    best: ``{"round", "member", "accuracy"}`` of the best model over every round.
    best_params: its parameters.
    labeller_accuracy: the labeller's dev accuracy.
    train_rows: rows of the final training set (original + added).
  """

  rounds: list[dict]
  best: dict
  best_params: Any
  labeller_accuracy: float
  train_rows: int


def _append_journal(path: str, entry: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(entry, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _train_theta(config: ModelConfig, left: list, settings: pop_lib.Settings, train: Mapping,
                 dev_data: Mapping, init_params: Any, layout: str | None, first_round: str,
                 say: Callable[[str], None]) -> tuple[pop_lib.Result, str]:
  """One round's training of Theta's sets: read from ``first_round`` when it holds the same
  job finished (round 0 only), trained otherwise. Returns the result and where it was read
  from ("" when trained)."""
  scorer = pop_lib.accuracy_scorer(dev_data)
  if first_round:
    result = pop_lib.restore_finished(config, "classification", 2, left, settings, train,
                                      dev_data, scorer, first_round, init_params, layout)
    if result is not None:
      say(f"agora round 0: read from the finished population run in {first_round}")
      return result, first_round
    say(f"agora round 0: {first_round} holds no finished run of the same job; training")
  return pop_lib.train_population(config, "classification", 2, left, settings, train,
                                  dev_data, scorer, init_params, layout=layout), ""


def _points_path(workdir: str, round_index: int) -> str:
  return os.path.join(workdir, f"points_{round_index:03d}.npz")


def _save_points(path: str, points: Mapping[str, np.ndarray]) -> None:
  tmp = path + ".tmp.npz"
  np.savez(tmp, **{k: np.asarray(v) for k, v in points.items()})
  os.replace(tmp, path)


def _concat(parts: Sequence[Mapping[str, np.ndarray]]) -> dict:
  keys = ROW_KEYS + ("label", "weight")
  return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in keys}


def _new_points(best_logits, dev, transform: Transform, labeller: Labeller, round_index: int):
  """Step 2-4: the best model's dev mistakes, their transformed neighbours, labelled."""
  mistakes = np.flatnonzero(np.argmax(best_logits, axis=-1) != np.asarray(dev["label"]))
  made = transform({k: np.asarray(dev[k])[mistakes] for k in ROW_KEYS}, round_index, mistakes)
  points = {k: np.asarray(made[k], np.int32) for k in ROW_KEYS}
  points["label"] = np.asarray(labeller(points), np.int32).reshape(-1)
  points["weight"] = np.ones(len(points["label"]), np.float32)
  return mistakes, points


def run_agora(config: ModelConfig, thetas: Sequence[pop_lib.Member],
              settings: pop_lib.Settings, train_data: Mapping[str, np.ndarray],
              dev_data: Mapping[str, np.ndarray], transform: Transform, labeller: Labeller,
              workdir: str, init_params: Any = None, layout: str | None = None,
              report: Callable[[str], None] | None = None,
              min_labeller_accuracy: float = MIN_LABELLER_ACCURACY,
              first_round: str = "") -> AgoraResult:
  """Runs Agora to the end (Theta empty), resuming from ``workdir``'s journal.

  Args:
    config: the model config being fine-tuned.
    thetas: Theta, the hyperparameter sets (each a population member, seed included).
    settings: what the sets share (steps, batch size, optimizer constants).
    train_data, dev_data: binary-cast tokenised splits (:func:`to_binary`).
    transform: ``transform(rows, round, row_ids) -> rows`` (``augment.py``).
    labeller: ``labeller(rows) -> 0/1 labels``; refused at dev accuracy <=
      ``min_labeller_accuracy`` (2/3).
    workdir: journal, points and the best model's parameters go here.
    init_params: the checkpoint every round fine-tunes from (None: scratch).
    layout: the binary head's layout (None: the family's default).
    report: progress lines.
    min_labeller_accuracy: the labeller's bar.
    first_round: a finished population run of this job (module docstring): round 0 is read
      from it, not trained again; "" or a run of another job: round 0 trains.

  Returns:
    An :class:`AgoraResult`.
  """
  from bort_jax.interop import export  # pylint: disable=import-outside-toplevel
  say = report or (lambda line: None)
  thetas = pop_lib._check_members(thetas)  # pylint: disable=protected-access
  pop_lib.check_data(dev_data, "classification", 2, "dev")
  pop_lib.check_data(train_data, "classification", 2, "training")
  labeller_accuracy = check_labeller(labeller, dev_data, min_labeller_accuracy)
  os.makedirs(workdir, exist_ok=True)
  journal_path = os.path.join(workdir, JOURNAL)
  rounds = fileio.read_jsonl(journal_path, repair=True, strict=True)  # a torn tail is cut
  left, added, best, best_params = list(thetas), [], None, None
  for entry in rounds:  # replay the finished rounds
    left = [pop_lib.Member(**m) for m in entry["left"]]
    added.append(dict(np.load(_points_path(workdir, entry["round"]))))
    if best is None or best_index([best["accuracy"], entry["best"]["accuracy"]]) == 1:
      best = dict(entry["best"], round=entry["round"])
  if rounds:
    say(f"agora: resuming after round {rounds[-1]['round']} ({len(left)} sets left)")
  n_dev = len(dev_data["label"])
  while left:
    round_index = len(rounds)
    t0 = time.perf_counter()
    train = _concat([train_data] + added)
    result, read_from = _train_theta(config, left, settings, train, dev_data, init_params,
                                     layout, first_round if round_index == 0 else "", say)
    accs = [m["accuracy"] for m in result.metrics]
    b = best_index(accs) or 0  # no finite accuracy: the first set (the round is still kept)
    mistakes, points = _new_points(result.dev_logits[b], dev_data, transform, labeller, round_index)
    removed = prune(accs, n_dev)
    _save_points(_points_path(workdir, round_index), points)
    round_best = {"member": dataclasses.asdict(left[b]), "accuracy": accs[b]}
    if best is None or best_index([best["accuracy"], accs[b]]) == 1:
      best = dict(round_best, round=round_index)
      best_params = result.params(b)
      export.save(rundir.best_dir(workdir), jax.device_get(best_params), config)
    entry = {"round": round_index, "train_rows": len(train["label"]),
             "members": [dataclasses.asdict(m) for m in left], "dev_accuracy": accs,
             "best": round_best, "mistakes": len(mistakes), "points_added": len(points["label"]),
             "positive_points": int(points["label"].sum()), "read_from": read_from,
             "removed": [dataclasses.asdict(left[i]) for i in removed],
             "left": [dataclasses.asdict(m) for i, m in enumerate(left) if i not in removed],
             "seconds": time.perf_counter() - t0}
    _append_journal(journal_path, entry)
    rounds.append(entry)
    added.append(points)
    left = [pop_lib.Member(**m) for m in entry["left"]]
    say(f"agora round {round_index}: dev accuracy best {accs[b]:.4f} of {len(accs)} sets, "
        f"{len(mistakes)} mistakes -> {len(points['label'])} points, removed {len(removed)}, "
        f"{len(left)} left")
  if best_params is None:  # every round ran before a resume: the best is on disk
    _, best_params = export.load(rundir.best_dir(workdir))
  return AgoraResult(rounds, best, best_params, labeller_accuracy,
                     sum(len(p["label"]) for p in [train_data] + added))


# ----------------------------------------------------------------------------- the mode


def _labeller_from_config(config, train, dev, settings, seed: int) -> Labeller:
  """``config.agora.labeller``: a checkpoint with a binary head, else fine-tuned here."""
  from bort_jax.finetune import setup  # pylint: disable=import-outside-toplevel
  path = config.agora.labeller or config.init.path
  loaded = setup.load_model(path, "auto", seed)
  head = loaded.head
  if head is not None and head.kind == "classification" and head.num_labels == 2:
    return ModelLabeller(loaded.config, loaded.params, layout=head.layout)
  # A teacher without a binary head: fine-tune it on the binary-cast training split first.
  steps_ = int(config.agora.labeller_steps) or settings.total_steps
  member = pop_lib.Member(float(config.agora.labeller_lr), seed=seed)
  result = pop_lib.train_population(
      loaded.config, "classification", 2, [member],
      dataclasses.replace(settings, total_steps=steps_, eval_every=0), train, dev,
      pop_lib.accuracy_scorer(dev), init_params=loaded.params)
  return ModelLabeller(loaded.config, result.params(0))


def _transform_from_config(config, tokenizer) -> Transform:
  """``config.agora.mlm`` (default: the init checkpoint) when it has an MLM head."""
  from bort_jax.finetune import augment  # pylint: disable=import-outside-toplevel
  from bort_jax.interop import export  # pylint: disable=import-outside-toplevel
  cfg, specials = config.agora, [int(i) for i in tokenizer.special_ids]
  path = cfg.mlm or config.init.path
  common = dict(special_ids=specials, pad_id=int(tokenizer.pad_id),
                points_per_row=int(cfg.points_per_mistake), seed=int(config.seed))
  if path and os.path.exists(os.path.join(path, export.MODEL_CONFIG_FILE)):
    mlm_config, params = export.load(path)
    if "mlm_head" in params:
      return augment.MLMTokenTransform(**common, mlm_config=mlm_config, mlm_params=params,
                                       mask_id=int(tokenizer.mask_id),
                                       resample_fraction=float(cfg.resample_fraction),
                                       edit_prob=float(cfg.edit_prob))
  return augment.TokenEditTransform(**common)


def run(config: Any, workdir: str) -> dict:
  """``bort-jax finetune ...,agora``: Agora on one task with ``config.population``'s grid.

  Inputs are checked by ``prepare.prepare`` (exit status 2 before compiling); the task is cast
  to binary (module docstring). Writes the journal, points and ``best/`` (see above) and
  ``agora.json``.

  Returns:
    ``{"task", "rounds", "best", "labeller_accuracy", "train_rows"}``.
  """
  prep = prepare(config)
  min_accuracy = labeller_bar(config.agora.get("min_labeller_accuracy", MIN_LABELLER_ACCURACY),
                              "config.agora.min_labeller_accuracy")
  spec, seq_len = prep.spec, int(config.seq_len)
  train = pop_lib.encode_examples(spec, prep.train.examples, prep.tokenizer, seq_len)
  dev = pop_lib.encode_examples(spec, prep.dev[0].examples, prep.tokenizer, seq_len)
  positive = None
  if spec.kind == "classification" and spec.num_labels > 2:
    positive = majority_class(train["label"], train["weight"])
  train = to_binary(train, spec.kind, spec.num_labels, positive)
  dev = to_binary(dev, spec.kind, spec.num_labels, positive)
  settings = settings_from_config(config, prep.total_steps, config.population.mode)
  labeller = _labeller_from_config(config, train, dev, settings, int(config.seed))
  thetas = members_from_config(config)
  result = run_agora(prep.loaded.config, thetas, settings, train,
                     dev, _transform_from_config(config, prep.tokenizer), labeller, workdir,
                     init_params=prep.params, layout=prep.layout, report=print,
                     min_labeller_accuracy=min_accuracy,
                     first_round=str(config.agora.get("first_round", "") or ""))
  out = {"task": spec.name, "binary_positive_class": positive, "rounds": result.rounds,
         "best": result.best, "labeller_accuracy": result.labeller_accuracy,
         "train_rows": result.train_rows}
  fileio.atomic_write_text(os.path.join(workdir, rundir.AGORA),
                           json.dumps(fileio.to_jsonable(out), indent=2) + "\n")
  return {k: out[k] for k in ("task", "best", "labeller_accuracy", "train_rows")} | {
      "rounds": len(result.rounds)}
