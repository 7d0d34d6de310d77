"""Agora's mechanics on a small synthetic task, its casts, pruning rule and transformations."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from bort_jax.core import model
from bort_jax.core.arch import get_model_config
from bort_jax.finetune import agora, augment
from bort_jax.finetune import population as pop_lib
from bort_jax.runtime import fileio

VOCAB, T, N_DEV = 40, 10, 60
SPECIALS = (0, 2, 3)  # padding, [CLS], [SEP]


def _rows(n, seed):
  """Binary task: does token 7 occur? [CLS] w... [SEP] then padding; 4-7 content tokens."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((n, T), np.int32)
  mask = np.zeros((n, T), np.int32)
  for i in range(n):
    words = rng.integers(8, VOCAB, size=rng.integers(4, 8))
    if rng.random() < 0.5:
      words[rng.integers(len(words))] = 7
    row = [2, *words, 3]
    ids[i, :len(row)] = row
    mask[i, :len(row)] = 1
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
          "label": oracle({"input_ids": ids}), "weight": np.ones(n, np.float32)}


def oracle(rows):
  return np.any(np.asarray(rows["input_ids"]) == 7, axis=1).astype(np.int32)


def _config():
  return get_model_config("D1-A2-H16-I32", family="bert", vocab_size=VOCAB, max_positions=16)


class _Killed(Exception):
  pass


THETAS = [pop_lib.Member(1e-2, seed=0), pop_lib.Member(3e-3, seed=1),
          pop_lib.Member(1e-4, seed=2)]
SETTINGS = pop_lib.Settings(total_steps=16, batch_size=8, mode="map")


def _run(workdir, report=None, first_round=""):
  transform = augment.TokenEditTransform(SPECIALS, pad_id=0, points_per_row=2, seed=5)
  return agora.run_agora(_config(), THETAS, SETTINGS, _rows(40, 0), _rows(N_DEV, 1), transform,
                         oracle, str(workdir), report=report, first_round=first_round)


def _strip(rounds):
  return [{k: v for k, v in e.items() if k not in ("seconds", "read_from")} for e in rounds]


def test_agora_rounds_add_labelled_points_prune_theta_end_and_resume(tmp_path):
  full = _run(tmp_path / "full")
  rounds = full.rounds
  assert len(rounds) >= 2 and not rounds[-1]["left"]  # several rounds, ending with Theta empty
  train_rows = 40
  for entry in rounds:
    members = entry["members"]
    # Theta shrinks by the rule: the removed sets are prune()'s run, the rest are left.
    removed = agora.prune(entry["dev_accuracy"], N_DEV)
    assert entry["removed"] == [members[i] for i in removed]
    assert entry["left"] == [m for i, m in enumerate(members) if i not in removed]
    assert len(entry["left"]) < len(members)
    # Every mistake of the best model made two new points, labelled by the labeller.
    assert entry["points_added"] == 2 * entry["mistakes"]
    points = np.load(tmp_path / "full" / f"points_{entry['round']:03d}.npz")
    assert np.array_equal(points["label"], oracle(points))
    assert entry["positive_points"] == int(points["label"].sum())
    # The points of earlier rounds joined the training set.
    assert entry["train_rows"] == train_rows
    train_rows += entry["points_added"]
  assert full.train_rows == train_rows
  assert any(e["mistakes"] > 0 for e in rounds)
  best_round = max(rounds, key=lambda e: e["best"]["accuracy"])
  assert full.best["accuracy"] == best_round["best"]["accuracy"]
  assert full.labeller_accuracy == 1.0
  # The journal is the returned rounds, one JSON line each.
  with open(tmp_path / "full" / agora.JOURNAL) as f:
    assert [json.loads(line)["round"] for line in f] == [e["round"] for e in rounds]

  # A run killed after its first round resumes at round 1 and ends where the full run ended.
  def kill(line):
    if line.startswith("agora round 0"):
      raise _Killed(line)

  with pytest.raises(_Killed):
    _run(tmp_path / "killed", report=kill)
  lines = []
  resumed = _run(tmp_path / "killed", report=lines.append)
  assert lines[0] == "agora: resuming after round 0 (%d sets left)" % len(rounds[0]["left"])
  assert _strip(resumed.rounds) == _strip(rounds)
  assert resumed.best == full.best
  for a, b in zip(jax.tree.leaves(resumed.best_params), jax.tree.leaves(full.best_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  assert os.path.isdir(tmp_path / "killed" / "best")


def test_round_zero_is_read_from_a_finished_population_run_of_the_same_job_only(tmp_path):
  full = _run(tmp_path / "full")
  assert all(e["read_from"] == "" for e in full.rounds)
  dev = _rows(N_DEV, 1)

  def population(folder, train):
    pop_lib.train_population(_config(), "classification", 2, THETAS, SETTINGS, train, dev,
                             pop_lib.accuracy_scorer(dev), workdir=str(folder))
    return str(folder)

  # The plain population run of Theta on the same rows is round 0: read, not trained, and
  # the rounds, the best and its weights come out as when round 0 trained.
  same = population(tmp_path / "plain", _rows(40, 0))
  lines = []
  warm = _run(tmp_path / "warm", report=lines.append, first_round=same)
  assert lines[0] == f"agora round 0: read from the finished population run in {same}"
  assert [e["read_from"] for e in warm.rounds] == [same] + [""] * (len(warm.rounds) - 1)
  assert _strip(warm.rounds) == _strip(full.rounds)
  assert warm.best == full.best
  for a, b in zip(jax.tree.leaves(warm.best_params), jax.tree.leaves(full.best_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  # A run on other rows (or of other members, or unfinished) is not the same job: round 0
  # trains, with the same outcome as without it.
  other = population(tmp_path / "other", _rows(40, 7))
  lines = []
  cold = _run(tmp_path / "cold", report=lines.append, first_round=other)
  assert lines[0] == (f"agora round 0: {other} holds no finished run of the same job; training")
  assert cold.rounds[0]["read_from"] == "" and _strip(cold.rounds) == _strip(full.rounds)
  assert pop_lib.restore_finished(_config(), "classification", 2, THETAS[:2], SETTINGS,
                                  _rows(40, 0), dev, pop_lib.accuracy_scorer(dev), same) is None
  longer = dataclasses.replace(SETTINGS, total_steps=32)
  assert pop_lib.restore_finished(_config(), "classification", 2, THETAS, longer,
                                  _rows(40, 0), dev, pop_lib.accuracy_scorer(dev), same) is None


def test_a_resume_into_a_folder_of_another_job_is_refused(tmp_path):
  dev = _rows(N_DEV, 1)

  def kill(line):
    if line.startswith("population step 8/16"):
      raise _Killed(line)

  def run(train, steps=16, report=None):
    return pop_lib.train_population(
        _config(), "classification", 2, THETAS,
        dataclasses.replace(SETTINGS, total_steps=steps, eval_every=8), train, dev,
        pop_lib.accuracy_scorer(dev), workdir=str(tmp_path), report=report)

  with pytest.raises(_Killed):
    run(_rows(40, 0), report=kill)
  # Other rows, or another length (its schedule differs), are another job: refused.
  for train, steps in ((_rows(40, 7), 16), (_rows(40, 0), 32)):
    with pytest.raises(ValueError, match="trained on other data, settings or initial weights"):
      run(train, steps)
  resumed = run(_rows(40, 0))  # the same job resumes after step 8
  assert [h["step"] for h in resumed.history] == [8, 16]


def test_a_weak_labeller_is_refused_before_training(tmp_path):
  dev = _rows(30, 1)
  always_no = lambda rows: np.zeros(len(rows["input_ids"]), np.int32)
  with pytest.raises(agora.AgoraError, match="at or below 2/3"):
    agora.check_labeller(always_no, dev)
  # Exactly 2/3 is refused too; one more right answer passes.
  labels = dev["label"].copy()
  wrong = np.arange(10)
  two_thirds = lambda rows: np.where(np.isin(np.arange(30), wrong), 1 - labels, labels)
  with pytest.raises(agora.AgoraError):
    agora.check_labeller(two_thirds, dev)
  better = lambda rows: np.where(np.isin(np.arange(30), wrong[:9]), 1 - labels, labels)
  assert agora.check_labeller(better, dev) == pytest.approx(21 / 30)
  with pytest.raises(agora.AgoraError):
    agora.run_agora(_config(), [pop_lib.Member(1e-3)], pop_lib.Settings(total_steps=1),
                    _rows(16, 0), dev, augment.TokenEditTransform(SPECIALS, 0), always_no,
                    str(tmp_path))
  assert not os.path.exists(tmp_path / agora.JOURNAL)


def test_prune_removes_the_run_within_one_standard_error_of_the_best():
  # n=100, best 0.9: standard error 0.03, so 0.88 and 0.87 tie with it and 0.8 does not.
  assert agora.prune([0.8, 0.9, 0.88, 0.6, 0.87], 100) == [1, 2, 4]
  # A perfect best has zero standard error: only exact ties leave with it.
  assert agora.prune([1.0, 0.99, 1.0], 100) == [0, 2]
  assert agora.prune([0.5], 10) == [0]  # Theta of one empties in one round


def test_casts_to_binary():
  base = {"input_ids": np.arange(4 * T).reshape(4, T), "attention_mask": np.ones((4, T)),
          "token_type_ids": np.zeros((4, T)), "weight": np.array([1, 1, 1, 0], np.float32)}
  three = dict(base, label=np.array([0, 2, 2, 1]))
  positive = agora.majority_class(three["label"], three["weight"])
  assert positive == 2
  out = agora.to_binary(three, "classification", 3, positive)
  assert out["label"].tolist() == [0, 1, 1]  # the weight-0 row is dropped
  with pytest.raises(agora.AgoraError, match="positive"):
    agora.to_binary(three, "classification", 3)
  choices = {k: np.stack([v, v + 1000, v + 2000], axis=1) if v.ndim == 2 else v
             for k, v in base.items()}
  choices["label"] = np.array([1, 0, 2, 0])
  mc = agora.to_binary(choices, "multiple_choice", 3)
  assert mc["input_ids"].shape == (9, T)
  assert mc["label"].tolist() == [0, 1, 0, 1, 0, 0, 0, 0, 1]
  assert np.array_equal(mc["input_ids"][4], choices["input_ids"][1, 1])
  with pytest.raises(agora.AgoraError, match="regression"):
    agora.to_binary(dict(base, label=np.zeros(4)), "regression", 1)


def test_token_edits_keep_specials_and_lengths():
  rows = _rows(6, 3)
  edits = set()
  for seed in range(30):
    rng = np.random.default_rng(seed)
    ids, types, mask = rows["input_ids"][0], rows["token_type_ids"][0], rows["attention_mask"][0]
    content = augment.content_positions(ids, mask, SPECIALS)
    new_ids, _, new_mask, edit = augment.token_edit(ids, types, mask, content, rng, 0)
    edits.add(edit)
    length, new_length = int(mask.sum()), int(new_mask.sum())
    assert new_length == length + {"swap": 0, "delete": -1, "duplicate": 1}[edit]
    assert new_ids[0] == 2 and new_ids[new_length - 1] == 3  # [CLS] ... [SEP] kept
    assert np.all(new_ids[new_length:] == 0)
    old_counts = np.bincount(ids[1:length - 1], minlength=VOCAB)
    new_counts = np.bincount(new_ids[1:new_length - 1], minlength=VOCAB)
    # Only content tokens move; one is removed or copied, none is invented.
    assert np.abs(new_counts - old_counts).sum() == {"swap": 0, "delete": 1, "duplicate": 1}[edit]
  assert edits == {"swap", "delete", "duplicate"}


def test_mlm_transform_resamples_content_tokens_deterministically():
  config = _config()
  params = model.init(jax.random.key(0), config, model.HeadSpec("mlm"))
  rows = _rows(5, 4)
  transform = augment.MLMTokenTransform(SPECIALS, pad_id=0, points_per_row=3, seed=1,
                                        mlm_config=config, mlm_params=params, mask_id=1,
                                        resample_fraction=0.3, edit_prob=0.0)
  ids = np.arange(5) * 10
  out = transform(rows, 2, ids)
  assert out["input_ids"].shape == (15, T)
  assert out["source"].tolist() == [i for i in range(5) for _ in range(3)]
  changed = 0
  for new, src in zip(out["input_ids"], out["source"]):
    old = rows["input_ids"][src]
    diff = np.flatnonzero(new != old)
    content = augment.content_positions(old, rows["attention_mask"][src], SPECIALS)
    assert set(diff.tolist()) <= set(content.tolist())  # specials and padding untouched
    assert not np.isin(new[diff], SPECIALS + (1,)).any()  # no special or [MASK] sampled
    n_content = len(content)
    assert len(diff) <= max(1, round(0.3 * n_content))
    changed += len(diff) > 0
  assert changed > 0
  again = transform(rows, 2, ids)
  assert np.array_equal(again["input_ids"], out["input_ids"])  # a function of (seed, round, row)
  other = transform(rows, 3, ids)
  assert not np.array_equal(other["input_ids"], out["input_ids"])


def test_batching_changes_neither_the_points_nor_the_labels():
  """Fixed-size batches (one compile whatever the row count) give what one batch gives."""
  config = _config()
  params = model.init(jax.random.key(0), config, model.HeadSpec("mlm"))
  rows = _rows(7, 5)
  batches = list(augment.fixed_batches({"x": np.arange(7)}, 3))
  assert [(start, count) for start, count, _ in batches] == [(0, 3), (3, 3), (6, 1)]
  assert all(len(b["x"]) == 3 for _, _, b in batches) and batches[-1][2]["x"].tolist() == [6] * 3
  make = lambda size: augment.MLMTokenTransform(
      SPECIALS, pad_id=0, points_per_row=2, seed=1, mlm_config=config, mlm_params=params,
      mask_id=1, resample_fraction=0.3, edit_prob=0.5, batch_size=size)
  one, small = make(64)(rows, 0, np.arange(7)), make(3)(rows, 0, np.arange(7))
  assert np.array_equal(one["input_ids"], small["input_ids"])
  head = model.HeadSpec("classification", 2)
  cls_params = model.init(jax.random.key(1), config, head)
  whole = np.argmax(np.asarray(model.apply(cls_params, config, {
      k: rows[k] for k in augment.ROW_KEYS}, head=head)["logits"]), axis=-1)
  labels = agora.ModelLabeller(config, cls_params, batch_size=3)(rows)
  assert labels.dtype == np.int32 and labels.tolist() == whole.tolist()


def test_a_torn_journal_line_is_cut_so_the_next_round_appends_cleanly(tmp_path):
  path = str(tmp_path / agora.JOURNAL)
  agora._append_journal(path, {"round": 0})  # pylint: disable=protected-access
  agora._append_journal(path, {"round": 1})  # pylint: disable=protected-access
  with open(path, "a") as f:
    f.write('{"round": 2, "memb')  # a kill in the middle of the third line
  with pytest.warns(UserWarning, match="torn last line"):
    assert [e["round"] for e in fileio.read_jsonl(path, repair=True, strict=True)] == [0, 1]
  agora._append_journal(path, {"round": 2})  # pylint: disable=protected-access
  assert [e["round"] for e in fileio.read_jsonl(path, repair=True, strict=True)] == [0, 1, 2]
