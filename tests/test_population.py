"""Seeds x learning rates as one population: equal to separate runs, reports, resume."""

import functools

import jax
import numpy as np
import pytest

from bort_jax.core import model, optim
from bort_jax.core.arch import get_model_config
from bort_jax.finetune import casts, prepare, setup, steps, tasks
from bort_jax.finetune import population as pop_lib

VOCAB, T, N = 40, 8, 44  # 44 rows: the last batch of an epoch is padded


class _Tokenizer:
  """Words ``w<id>`` -> ids; [CLS]=2 and [SEP]=3 around each segment; padding 0."""

  pad_id = 0

  def encode_pair(self, a, b, max_length):
    ids = [2] + [int(w[1:]) for w in a.split()] + [3]
    if b:
      ids += [int(w[1:]) for w in b.split()] + [3]
    ids = ids[:max_length]
    return ids, [0] * len(ids)


SPEC = tasks.TaskSpec(name="test/pattern", builder=None, kind="classification", num_labels=2,
                      cast=lambda record: [], source=lambda split, data_dir: [])


def _examples(n, seed):
  """Binary task: does word 7 occur? Sentences of 3-6 words from ids 8..39 (and 7)."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    words = rng.integers(8, VOCAB, size=rng.integers(3, 7))
    if rng.random() < 0.5:
      words[rng.integers(len(words))] = 7
    out.append(casts.Example(" ".join(f"w{w}" for w in words), label=int(7 in words),
                             example_id=i))
  return out


def _config():
  return get_model_config("D1-A2-H16-I32", family="bert", vocab_size=VOCAB, max_positions=16)


def _setup():
  config = _config()
  train_ex, dev_ex = _examples(N, 0), _examples(24, 1)
  train_data = pop_lib.encode_examples(SPEC, train_ex, _Tokenizer(), T)
  dev = pop_lib.encode_examples(SPEC, dev_ex, _Tokenizer(), T)
  init_params = model.init(jax.random.key(99), config, model.HeadSpec("mlm"))  # "pretrained"
  members = [pop_lib.Member(3e-3, 0.0, seed=0), pop_lib.Member(1e-3, 0.01, warmup=0.5, seed=1)]
  return config, train_ex, train_data, dev, init_params, members


def _separate_run(config, member, settings, train_ex, dev, init_params):
  """One member alone, as ``bort-jax finetune`` runs one model (the reference)."""
  cfg = steps.StepConfig(config, "classification", 2, settings.total_steps)
  tx = optim.make_direction(settings.direction_config())
  state = steps.init_state(setup.init_params(config, cfg.head, member.seed, init_params), tx)
  step = jax.jit(functools.partial(steps.train_step, cfg=cfg, tx=tx))
  hp = steps.hparams(member.lr, member.weight_decay, member.warmup)
  losses = []
  for t in range(settings.total_steps):
    batch = prepare.train_batch(SPEC, train_ex, _Tokenizer(), T, settings.batch_size, member.seed,
                             t)
    state, metrics = step(state, batch, jax.random.key(member.seed), hp)
    losses.append(float(metrics["loss"]))
  logits = jax.jit(lambda p: steps.forward(p, dev, cfg))(state.params)
  return state.params, np.asarray(logits), losses


def test_population_equals_separate_runs():
  config, train_ex, train_data, dev, init_params, members = _setup()
  # Chunks of 4 and 2 steps: the short last chunk runs in the same program, padded; step 5
  # is the padded last batch of the first epoch.
  settings = pop_lib.Settings(total_steps=6, batch_size=8, eval_every=4, mode="map")
  score = pop_lib.accuracy_scorer(dev)
  result = pop_lib.train_population(config, "classification", 2, members, settings,
                                    train_data, dev, score, init_params=init_params)
  assert [h["step"] for h in result.history] == [4, 6]
  for i, member in enumerate(members):
    params, logits, losses = _separate_run(config, member, settings, train_ex, dev,
                                           init_params)
    np.testing.assert_allclose(result.dev_logits[i], logits, atol=1e-5)
    assert result.metrics[i] == pytest.approx(score(logits), abs=1e-5)
    # The last chunk's mean training loss (steps 4 and 5).
    assert result.train_loss[i] == pytest.approx(np.mean(losses[4:]), abs=1e-5)
    for a, b in zip(jax.tree.leaves(result.params(i)), jax.tree.leaves(params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # Members differ: seeds and settings are not silently shared.
  assert not np.allclose(result.dev_logits[0], result.dev_logits[1])


def test_vmap_and_map_populations_agree():
  config, _, train_data, dev, init_params, members = _setup()
  score = pop_lib.accuracy_scorer(dev)
  out = {}
  for mode in ("vmap", "map"):
    settings = pop_lib.Settings(total_steps=3, batch_size=8, mode=mode)
    out[mode] = pop_lib.train_population(config, "classification", 2, members, settings,
                                         train_data, dev, score, init_params=init_params)
  np.testing.assert_allclose(out["vmap"].dev_logits, out["map"].dev_logits, atol=1e-5)
  np.testing.assert_allclose(out["vmap"].train_loss, out["map"].train_loss, atol=1e-5)


def test_batch_indices_follow_the_loop_order():
  a = pop_lib.batch_indices(3, 7, 50, 8)
  assert np.array_equal(a, pop_lib.batch_indices(3, 7, 50, 8))
  assert not np.array_equal(a, pop_lib.batch_indices(4, 7, 50, 8))
  # One epoch is 7 batches of 8 over 50 rows: every row once, the last batch padded with -1.
  epoch = np.concatenate([pop_lib.batch_indices(3, t, 50, 8) for t in range(7)])
  assert np.array_equal(epoch[:50], np.random.default_rng([3, 0]).permutation(50))
  assert np.all(epoch[50:] == -1)
  assert np.array_equal(pop_lib.batch_indices(3, 7, 50, 8),
                        np.random.default_rng([3, 1]).permutation(50)[:8])


def test_summarize_reports_mean_std_best_per_setting():
  members = pop_lib.grid([1e-4, 1e-5], seeds=(0, 1, 2))
  values = [0.5, 0.7, 0.6, 0.9, 0.8, 1.0]
  rows = pop_lib.summarize(members, [{"accuracy": v} for v in values])
  assert [r["lr"] for r in rows] == [1e-4, 1e-5]
  assert rows[0]["seeds"] == [0, 1, 2]
  assert rows[0]["accuracy"]["mean"] == pytest.approx(0.6)
  assert rows[0]["accuracy"]["std"] == pytest.approx(0.1)
  assert rows[1]["accuracy"]["best"] == pytest.approx(1.0)
  assert rows[1]["accuracy"]["values"] == pytest.approx([0.9, 0.8, 1.0])
  table = pop_lib.format_table(rows, "accuracy")
  assert "0.6000 +- 0.1000" in table and "| 3 |" in table


def test_bad_inputs_are_refused_before_compiling():
  config, _, train_data, dev, _, _ = _setup()
  settings = pop_lib.Settings(total_steps=2)
  score = pop_lib.accuracy_scorer(dev)
  bad = dict(train_data, label=np.where(train_data["label"] == 1, 2, 0).astype(np.int32))
  with pytest.raises(ValueError, match="label 2 is outside the label space 0..1"):
    pop_lib.train_population(config, "classification", 2, pop_lib.grid([1e-3]), settings, bad,
                             dev, score)
  with pytest.raises(ValueError, match="same .setting, seed. twice"):
    pop_lib.train_population(config, "classification", 2, pop_lib.grid([1e-3, 1e-3]),
                             settings, train_data, dev, score)
  with pytest.raises(ValueError, match="lr must be a finite positive"):
    pop_lib.Member(lr=0.0)


class _Killed(Exception):
  pass


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
  config, _, train_data, dev, _, _ = _setup()
  members = pop_lib.grid([2e-3], seeds=(0, 1))
  settings = pop_lib.Settings(total_steps=4, eval_every=2)
  score = pop_lib.accuracy_scorer(dev)
  args = (config, "classification", 2, members, settings, train_data, dev, score)
  full = pop_lib.train_population(*args)

  def kill(line):
    if "step 2/4" in line:
      raise _Killed(line)  # after the first chunk's checkpoint

  with pytest.raises(_Killed):
    pop_lib.train_population(*args, workdir=str(tmp_path), report=kill)
  lines = []
  resumed = pop_lib.train_population(*args, workdir=str(tmp_path), report=lines.append)
  assert len(lines) == 1 and "step 4/4" in lines[0]  # only the second chunk ran again
  assert resumed.history == full.history
  for a, b in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(full.state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  other = pop_lib.grid([1e-3], seeds=(0, 1))
  with pytest.raises(ValueError, match="other members"):
    pop_lib.train_population(config, "classification", 2, other, settings, train_data, dev,
                             score, workdir=str(tmp_path))


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """A tiny pretrained model (our export, MLM head), a WordPiece vocabulary, a local task."""
  from bort_jax.interop import export
  root = tmp_path_factory.mktemp("population_cli")
  tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(59)]
  (root / "tok").mkdir()
  (root / "tok" / "vocab.txt").write_text("\n".join(tokens) + "\n")
  cfg = get_model_config("D1-A2-H16-I32", family="bert", vocab_size=64, max_positions=64,
                         pad_id=0)
  export.save(str(root / "pretrained"), model.init(jax.random.key(3), cfg,
                                                   model.HeadSpec("mlm")), cfg)
  rng = np.random.default_rng(0)
  records = []
  for i in range(40):
    words = [f"w{w}" for w in rng.integers(10, 59, size=5)]
    label = int(rng.random() < 0.5)
    if label:
      words[rng.integers(5)] = "w7"
    records.append({"sentence": " ".join(words), "label": int("w7" in words), "idx": i})
  tasks.register_task(tasks.TaskSpec(
      name="test/population_cli", builder=None, kind="classification", num_labels=2,
      cast=casts.pair_cast("sentence"), source=lambda split, data_dir: records),
      overwrite=True)
  return {"init": str(root / "pretrained"), "tokenizer": str(root / "tok")}


def _cli(assets, workdir, arg, *flags):
  from bort_jax import main as cli_main
  return cli_main.main(["finetune", f"--config=configs/finetune.py:task=test/population_cli,"
                        f"tiny,{arg}", f"--workdir={workdir}",
                        f"--config.init.path={assets['init']}",
                        f"--config.tokenizer={assets['tokenizer']}", *flags])


def test_finetune_mode_runs_seeds_and_lrs_as_one_population(assets, tmp_path, capsys):
  import json
  code = _cli(assets, tmp_path / "wd", "seeds=2,lrs=1e-3/3e-3")
  assert code == 0, capsys.readouterr().err
  out = json.loads((tmp_path / "wd" / "population.json").read_text())
  assert out["metric"] == "accuracy"
  assert [r["lr"] for r in out["settings"]] == [1e-3, 3e-3]
  for row in out["settings"]:
    assert row["seeds"] == [0, 1]
    values = row["accuracy"]["values"]
    assert len(values) == 2 and row["accuracy"]["best"] == max(values)
    assert row["accuracy"]["mean"] == pytest.approx(np.mean(values))
  assert [h["step"] for h in out["history"]] == [2, 4]


def test_agora_mode_refuses_a_weak_labeller(assets, tmp_path, capsys):
  # The labeller is the MLM-only init checkpoint fine-tuned for one tiny step: near chance.
  code = _cli(assets, tmp_path / "wd", "agora,seeds=2", "--config.agora.labeller_steps=1",
              "--config.agora.labeller_lr=1e-6")
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert "at or below 2/3" in err and "Traceback" not in err
  assert not (tmp_path / "wd" / "agora.jsonl").exists()


def test_save_best_writes_the_best_member_as_a_labeller_agora_loads(assets, tmp_path, capsys):
  import json
  code = _cli(assets, tmp_path / "pop", "seeds=2", "--config.population.save_best=True")
  assert code == 0, capsys.readouterr().err
  out = json.loads((tmp_path / "pop" / "population.json").read_text())
  meta = json.loads((tmp_path / "pop" / "best" / "finetune.json").read_text())
  values = out["settings"][0]["accuracy"]["values"]
  assert meta["metric"] == "accuracy" and meta["value"] == max(values)
  assert meta["member"]["seed"] == int(np.argmax(values))
  loaded = setup.load_model(str(tmp_path / "pop" / "best"), "auto", 0)
  assert loaded.kind == "finetuned" and loaded.head.num_labels == 2
  # As Agora's labeller (no fine-tuning of its own: it has a binary head), with the bar set
  # below its accuracy so the rounds run.
  code = _cli(assets, tmp_path / "agora", "agora,seeds=2",
              f"--config.agora.labeller={tmp_path / 'pop' / 'best'}",
              "--config.agora.min_labeller_accuracy=0.0")
  assert code == 0, capsys.readouterr().err
  agora_out = json.loads((tmp_path / "agora" / "agora.json").read_text())
  assert agora_out["labeller_accuracy"] == pytest.approx(meta["value"])
  assert agora_out["rounds"]


def test_agora_refuses_a_bad_labeller_bar(assets, tmp_path, capsys):
  code = _cli(assets, tmp_path / "wd", "agora,seeds=2", "--config.agora.min_labeller_accuracy=1.5")
  err = capsys.readouterr().err.strip()
  assert code == 2 and "config.agora.min_labeller_accuracy=1.5" in err and "Traceback" not in err
  assert not (tmp_path / "wd").exists() or not any((tmp_path / "wd").iterdir())
