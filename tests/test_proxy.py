"""Tests of population training (bort_jax/search/proxy.py, buckets.py): bucket planning,
exactness of padded members against solo runs (vmap and map), sharding over the mesh's data
axis, bad input.

Tiny shapes throughout (vocab 64, seq 16, batch 4, 4 predictions, s=3 steps) so the whole file
compiles a handful of small programs.
"""

import itertools

import jax
import numpy as np
import pytest
from flax import traverse_util

from bort_jax.core import masks, model
from bort_jax.search import buckets, proxy
from bort_jax.runtime import sharding
from bort_jax.core.arch import Arch, ModelConfig

VOCAB, SEQ, BATCH, PREDS, STEPS = 64, 16, 4, 4, 3
BASE = ModelConfig(Arch(1, 1, 8, 8), family="bert", vocab_size=VOCAB, max_positions=32,
                   type_vocab_size=2, pooler=True)
MASTER = Arch(2, 4, 32, 64, head_size=16)
# The candidate under test and three other shapes: together they drop layers, heads, head size,
# hidden and FFN units relative to the bucket's padded shape D2-A4-H32-I64-S16.
TARGET = Arch(1, 2, 24, 40)                      # head size 12
OTHERS = [Arch(2, 4, 32, 64), Arch(1, 2, 32, 32), Arch(2, 4, 16, 48)]  # head sizes 8, 16, 4
THETA_A = {"lr": 2e-3, "weight_decay": 0.01}
THETA_B = {"lr": 5e-3}
LOSS = {"temperature": 2.0, "alpha_kd": 0.5, "alpha_mlm": 0.1, "kind": "kl"}
OPTIM = {"name": "adam_nobc", "b1": 0.9, "b2": 0.999, "eps": 1e-6, "clip_norm": 1.0}


def _batch(rng, lead):
  ids = rng.integers(0, VOCAB, lead + (BATCH, SEQ)).astype(np.int32)
  attention = np.ones(lead + (BATCH, SEQ), np.int32)
  attention[..., 1, SEQ - 3:] = 0  # one padded row end
  positions = np.stack([rng.permutation(SEQ - 3)[:PREDS]
                        for _ in range(int(np.prod(lead + (BATCH,))))])
  weights = np.ones(lead + (BATCH, PREDS), np.float32)
  weights[..., 0, -1] = 0.0  # one padding prediction
  return {"input_ids": ids, "attention_mask": attention,
          "token_type_ids": np.zeros_like(ids),
          "masked_positions": positions.reshape(lead + (BATCH, PREDS)).astype(np.int32),
          "masked_labels": rng.integers(0, VOCAB, lead + (BATCH, PREDS)).astype(np.int32),
          "masked_weights": weights}


def _data(seed=0, steps=STEPS):
  rng = np.random.default_rng(seed)
  return proxy.ProxyData(
      batches=_batch(rng, (steps,)), heldout=_batch(rng, ()),
      teacher=(3 * rng.standard_normal((steps, BATCH, PREDS, VOCAB))).astype(np.float32),
      heldout_teacher=(3 * rng.standard_normal((BATCH, PREDS, VOCAB))).astype(np.float32))


def _trainer(mode="map", mesh=None, **kw):
  return proxy.PopulationTrainer(BASE, MASTER, LOSS, OPTIM, error="distill", mode=mode,
                                 mesh=mesh, seed=0, batch_size=BATCH, seq_len=SEQ,
                                 max_predictions=PREDS, **kw)


# Population: the target under two thetas, the three other shapes.
ARCHS = [TARGET, OTHERS[0], TARGET, OTHERS[1], OTHERS[2]]
THETAS = [THETA_A, THETA_A, THETA_B, {"lr": 1e-3}, THETA_B]
BUCKET = buckets.Bucket(buckets.padded_arch(ARCHS), tuple(range(len(ARCHS))))


@pytest.fixture(scope="module")
def data():
  return _data()


@pytest.fixture(scope="module")
def solo(data):
  """The target trained alone (unpadded fast path) under each theta."""
  trainer = _trainer("map")
  out = {}
  for name, theta in (("A", THETA_A), ("B", THETA_B)):
    trained = trainer.train([(TARGET, theta)], data, return_params=True)
    assert not trainer.stats[-1].masked
    out[name] = (trained.params[0], trained.train_losses[0], trained.errors[0])
  # The second theta reused the first one's program: theta is data, not a compile.
  assert trainer.ledger()["compiles"] == 1
  return out


@pytest.fixture(scope="module")
def bucketed(data):
  """The whole population in one padded bucket, per mode."""
  out = {}
  for mode in ("vmap", "map"):
    trainer = _trainer(mode)
    trained = trainer.train(list(zip(ARCHS, THETAS)), data, buckets=[BUCKET],
                            return_params=True)
    assert trainer.stats[-1].masked and len(trainer.stats) == 1
    out[mode] = (trained.params, trained.train_losses, np.asarray(trained.errors))
  return out


# ----------------------------------------------------------------------------- planning


def _hidden_flops(arch):
  return float(arch.hidden)


def test_plan_identical_shapes_merge_first_and_overhead_one_is_one_per_shape():
  a, b = Arch(1, 2, 16, 32), Arch(1, 2, 20, 32)
  plan = buckets.plan_buckets([a, b, a, a], _hidden_flops, max_overhead=1.0)
  assert plan == [buckets.Bucket(a, (0, 2, 3)), buckets.Bucket(b, (1,))]
  space = [Arch(d, h, 16 * h, i) for d, h, i in itertools.product((1, 2), (1, 2), (32, 64))]
  plan = buckets.plan_buckets(space + space[:3], lambda x: x.depth * x.hidden * x.intermediate,
                            max_overhead=1.0)
  assert len(plan) == len(set(space))
  assert all(len({(space + space[:3])[m] for m in b.members}) == 1 for b in plan)
  # With a loose bound the identical ones still share a bucket (zero added cost first).
  loose = buckets.plan_buckets([a, b, a], _hidden_flops, max_overhead=1.01)
  assert loose == [buckets.Bucket(a, (0, 2)), buckets.Bucket(b, (1,))]


def test_plan_hand_case_cheapest_merge_and_bound():
  small, near, big = Arch(1, 1, 10, 8), Arch(1, 1, 11, 8), Arch(1, 1, 100, 8)
  # real = 121; merging small+near adds 1 (overhead 122/121), merging with big adds >= 89.
  plan = buckets.plan_buckets([small, near, big], _hidden_flops, max_overhead=1.1)
  assert plan == [buckets.Bucket(near, (0, 1)), buckets.Bucket(big, (2,))]
  assert buckets.padding_overhead(plan, [small, near, big], _hidden_flops) == pytest.approx(
      122 / 121)
  # A bound that admits everything: one bucket at the elementwise maximum.
  plan = buckets.plan_buckets([small, near, big], _hidden_flops, max_overhead=3.0)
  assert plan == [buckets.Bucket(big, (0, 1, 2))]
  # min_buckets stops merging early.
  plan = buckets.plan_buckets([small, near, big], _hidden_flops, max_overhead=3.0, min_buckets=2)
  assert len(plan) == 2


def test_plan_bound_members_and_determinism():
  rng = np.random.default_rng(0)
  space = [Arch(int(d), int(h), int(h) * int(s), int(i))
           for d, h, s, i in rng.integers([1, 1, 4, 8], [5, 5, 17, 65], (40, 4))]
  flops = lambda a: a.depth * (4 * a.hidden ** 2 + 2 * a.hidden * a.intermediate) + 1000
  previous = None
  for bound in (1.0, 1.2, 1.5, 2.0, 4.0):
    plan = buckets.plan_buckets(space, flops, max_overhead=bound, max_members=7)
    assert buckets.padding_overhead(plan, space, flops) <= bound + 1e-9
    assert max(len(b.members) for b in plan) <= 7
    assert sorted(m for b in plan for m in b.members) == list(range(len(space)))
    for b in plan:
      assert b.padded == buckets.padded_arch([space[m] for m in b.members])
    assert plan == buckets.plan_buckets(space, flops, max_overhead=bound, max_members=7)
    if previous is not None:
      assert len(plan) <= previous  # a looser bound never needs more programs
    previous = len(plan)
  assert previous < len(set(space))
  many = buckets.plan_buckets([space[0]] * 10, flops, max_members=4)
  assert [len(b.members) for b in many] == [4, 4, 2]
  with pytest.raises(ValueError, match="max_overhead"):
    buckets.plan_buckets(space, flops, max_overhead=0.9)
  with pytest.raises(ValueError, match="max_members"):
    buckets.plan_buckets(space, flops, max_members=0)


# ----------------------------------------------------------------------------- masks


def test_param_mask_from_a_traced_arch_mask_equals_the_leading_slices():
  # The one parameter mask, built inside a compiled program from a member's arch mask (as the
  # population does), against its definition: 1 exactly on the leading slices of the small
  # model's parameter shapes, 0 elsewhere (and on layers the small model lacks).
  padded = BASE.replace(arch=BUCKET.padded)
  from_arch_mask = jax.jit(lambda m: masks.param_mask(padded, m))
  for arch in ARCHS:
    small = masks.param_shapes(padded.replace(arch=arch), model.MLM)
    got = traverse_util.flatten_dict(from_arch_mask(masks.make_arch_mask(padded.arch, arch)))
    assert set(got) == set(masks.param_shapes(padded, model.MLM))
    for key, value in got.items():
      want = np.zeros(value.shape, np.float32)
      if key in small:
        want[tuple(slice(0, n) for n in small[key])] = 1.0
      np.testing.assert_array_equal(np.asarray(value), want, err_msg="/".join(key))


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("mode", ["vmap", "map"])
def test_padded_member_matches_solo_run(mode, data, solo, bucketed):
  params, train, errors = bucketed[mode]
  padded = BASE.replace(arch=BUCKET.padded)
  for index, name in ((0, "A"), (2, "B")):  # the target under its two thetas
    solo_params, solo_train, solo_err = solo[name]
    np.testing.assert_allclose(train[index], solo_train, rtol=0, atol=1e-5)
    np.testing.assert_allclose(errors[index], solo_err, rtol=0, atol=1e-5)
    small = masks.slice_params(params[index], padded, TARGET)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
                 small, solo_params)
  # Different thetas give different trajectories (the lr reached its member).
  assert abs(float(train[0, -1]) - float(train[2, -1])) > 1e-4
  assert np.all(np.isfinite(train)) and np.all(np.isfinite(errors))
  # Every member's padded parameters are still exactly zero after s steps.
  for index, arch in enumerate(ARCHS):
    mask = traverse_util.flatten_dict(masks.param_mask(padded, arch))
    member = traverse_util.flatten_dict(params[index])
    for key, m in mask.items():
      outside = np.asarray(member[key])[np.asarray(m) == 0]
      assert np.all(outside == 0), f"{arch}: {'/'.join(key)} has nonzero padded entries"


def test_map_and_vmap_agree(bucketed):
  _, train_v, err_v = bucketed["vmap"]
  _, train_m, err_m = bucketed["map"]
  np.testing.assert_allclose(train_v, train_m, rtol=0, atol=1e-5)
  np.testing.assert_allclose(err_v, err_m, rtol=0, atol=1e-5)


def test_sharded_population_matches_unsharded(data, bucketed):
  # 5 members over a data axis of 4: three filler members pad the population to 8.
  mesh = sharding.make_mesh({"data": 4, "model": 2})
  trainer = _trainer("vmap", mesh=mesh)
  errors = trainer.train_and_eval(list(zip(ARCHS, THETAS)), data, one_bucket=True)
  _, _, want = bucketed["vmap"]
  assert len(errors) == 5
  np.testing.assert_allclose(errors, want, rtol=0, atol=1e-5)
  ledger = trainer.ledger()
  assert ledger["compiles"] == 1 and ledger["buckets_trained"] == 1
  assert ledger["padding_overhead"] > 1
  # The members really were spread over the data axis.
  assert trainer._compiled  # pylint: disable=protected-access
  compiled = next(iter(trainer._compiled.values()))  # pylint: disable=protected-access
  assert compiled.output_shardings[1].spec[0] == "data"


# ----------------------------------------------------------------------------- bad input


def test_bad_input(data):
  trainer = _trainer("map")
  with pytest.raises(ValueError, match="unknown hyperparameters"):
    trainer.train_and_eval([(TARGET, {"lr": 1e-3, "momentum": 0.9})], data)
  with pytest.raises(ValueError, match="needs a learning rate"):
    trainer.train_and_eval([(TARGET, {"weight_decay": 0.1})], data)
  with pytest.raises(ValueError, match="exceeds the master shape"):
    trainer.train_and_eval([(Arch(4, 4, 32, 64), THETA_A)], data)
  with pytest.raises(ValueError, match="exceeds the master shape"):
    trainer.train_and_eval([(Arch(1, 1, 32, 64, head_size=32), THETA_A)], data)
  wrong_vocab = proxy.ProxyData(data.batches, data.heldout, data.teacher[..., :32],
                                data.heldout_teacher[..., :32])
  with pytest.raises(ValueError, match="vocabulary"):
    trainer.train_and_eval([(TARGET, THETA_A)], wrong_vocab)
  with pytest.raises(ValueError, match="mode"):
    _trainer("pmap")
  assert trainer.stats == []  # nothing was trained


def test_compile_ahead_in_threads_gives_the_same_errors(data, solo, bucketed):
  # Two buckets (the target alone under both thetas; the rest at the padded shape), compiled
  # ahead by two threads. Each member's error is the one its own bucket shape gives.
  pairs = list(zip(ARCHS, THETAS))
  two = [buckets.Bucket(TARGET, (0, 2)), buckets.Bucket(BUCKET.padded, (1, 3, 4))]
  ahead = _trainer("map", compile_workers=2)
  errors = ahead.train_and_eval(pairs, data, buckets=two)
  _, _, padded_errors = bucketed["map"]
  want = [solo["A"][2], padded_errors[1], solo["B"][2], padded_errors[3], padded_errors[4]]
  np.testing.assert_allclose(errors, want, rtol=0, atol=1e-5)
  assert ahead.ledger()["compiles"] == 2
  # A second call reuses both programs.
  assert ahead.train_and_eval(pairs, data, buckets=two) == errors
  assert ahead.ledger()["compiles"] == 2 and ahead.ledger()["buckets_trained"] == 4


def test_master_init_provides_the_master_weights(data, solo):
  # A provider that returns the seeded random initialisation reproduces the default exactly;
  # the trainer slices whatever the provider gives (here: those weights scaled by 0.5).
  def provider(config, scale=1.0):
    params = model.init(jax.random.key(0), config, model.MLM)
    return jax.tree.map(lambda x: x * scale, params)

  same = _trainer("map", master_init=provider)
  assert same.train_and_eval([(TARGET, THETA_A)], data)[0] == pytest.approx(solo["A"][2],
                                                                            abs=1e-6)
  scaled = _trainer("map", master_init=lambda c: provider(c, 0.5))
  flat = traverse_util.flatten_dict(model.init(jax.random.key(0), scaled.master_config,
                                               model.MLM))
  for key, value in flat.items():
    np.testing.assert_allclose(scaled.master[key], 0.5 * np.asarray(value), rtol=1e-6)
  small = _trainer("map", master_init=lambda c: model.init(jax.random.key(0),
                                                           c.replace(arch=TARGET), model.MLM))
  with pytest.raises(ValueError, match="do not have the master shape"):
    small.train_and_eval([(TARGET, THETA_A)], data)
