"""Students inherited from the teacher (core/inherit.py) on tiny random models.

Shown here: an inherited student that keeps everything is the teacher; one that drops layers
is the teacher with those layers skipped (the model's own layer mask, an independent path);
the importance order is a permutation that leaves the teacher's outputs unchanged, and it
ranks (a head or neuron whose output is zeroed ranks last); every width mismatch follows the
documented rule or fails with a clear error.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from flax import traverse_util

from bort_jax.core import arch as arch_lib
from bort_jax.core import inherit, masks, model

TEACHER = "D3-A4-H32-I48"
VOCAB = 50


def config(spec: str = TEACHER, **changes) -> arch_lib.ModelConfig:
  fields = dict(family="bert", vocab_size=VOCAB, max_positions=32)
  fields.update(changes)
  return arch_lib.get_model_config(spec, **fields)


def batch(seed: int, rows: int = 3, length: int = 12) -> dict:
  r = np.random.RandomState(seed)
  ids = r.randint(5, VOCAB, (rows, length)).astype(np.int32)
  attention = np.ones((rows, length), np.int32)
  attention[0, length - 3:] = 0  # one padded row
  return {"input_ids": ids, "attention_mask": attention, "token_type_ids": np.zeros_like(ids),
          "masked_positions": r.randint(0, length - 3, (rows, 4)).astype(np.int32),
          "masked_labels": r.randint(5, VOCAB, (rows, 4)).astype(np.int32),
          "masked_weights": np.ones((rows, 4), np.float32)}


@pytest.fixture(scope="module")
def teacher():
  cfg = config()
  params = model.init(jax.random.key(1), cfg)
  # A spread-out output bias and larger weights make the importances distinct.
  params["mlm_head"]["bias"] = 2.0 * jax.random.normal(jax.random.key(2), (VOCAB,))
  imp = inherit.importance(params, cfg, [batch(0), batch(1)])
  return cfg, params, imp


def logits(params, cfg, b, arch_mask=None):
  return np.asarray(_apply(params, b, arch_mask, cfg)["logits"])


def _apply_impl(params, b, arch_mask, cfg):
  return model.apply(params, cfg, b, arch_mask=arch_mask, output_hidden_states=True)


_apply = jax.jit(_apply_impl, static_argnums=(3,))


def test_importance_shapes_and_positivity(teacher):
  cfg, _, imp = teacher
  a = cfg.arch
  assert imp.heads.shape == (a.depth, a.heads) and imp.ffn.shape == (a.depth, a.intermediate)
  assert imp.hidden.shape == (a.hidden,) and imp.layers.shape == (a.depth,)
  assert np.all(imp.heads > 0) and np.all(imp.ffn >= 0) and np.all(imp.hidden > 0)
  assert np.all(np.isfinite(imp.layers))


def test_student_keeping_everything_is_the_teacher(teacher):
  cfg, params, imp = teacher
  b = batch(5)
  want = _apply(params, b, None, cfg)
  same = inherit.inherit(params, cfg, cfg)  # the teacher's own order: bitwise the teacher
  got = _apply(same, b, None, cfg)
  np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-6, rtol=0)
  # With the importance order, the hidden units are permuted but the outputs are the same.
  ordered = inherit.inherit(params, cfg, cfg, imp)
  np.testing.assert_allclose(logits(ordered, cfg, b), want["logits"], atol=1e-6, rtol=0)


def test_reorder_is_a_function_preserving_permutation(teacher):
  cfg, params, imp = teacher
  b = batch(6)
  moved = inherit.reorder(params, cfg, imp)
  before = _apply(params, b, None, cfg)
  after = _apply(moved, b, None, cfg)
  np.testing.assert_allclose(after["logits"], before["logits"], atol=1e-5, rtol=0)
  order = np.argsort(-imp.hidden, kind="stable")
  for h_before, h_after in zip(before["all_hidden"], after["all_hidden"]):
    np.testing.assert_allclose(h_after, np.asarray(h_before)[..., order], atol=1e-5, rtol=0)
  flat_a = traverse_util.flatten_dict(params)
  flat_b = traverse_util.flatten_dict(moved)
  for key, value in flat_a.items():  # every array holds the same values, rearranged
    np.testing.assert_array_equal(np.sort(np.ravel(value)), np.sort(np.ravel(flat_b[key])))
    if key[-1] in ("kernel", "embedding"):  # random matrices: a permutation moves them
      assert not np.array_equal(value, flat_b[key]), key
  # The word table's columns are the hidden units in the new order.
  np.testing.assert_array_equal(flat_b[("embeddings", "word_embeddings", "embedding")],
                                flat_a[("embeddings", "word_embeddings", "embedding")][:, order])


def test_importance_ranks_a_dead_head_and_neuron_last(teacher):
  cfg, params, _ = teacher
  dead = jax.tree_util.tree_map(np.array, params)
  layer = dead["encoder"]["layer_1"]
  layer["attention"]["output"]["kernel"][0] = 0.0  # head 0 of layer 1 writes nothing
  layer["output"]["kernel"][3] = 0.0  # FFN neuron 3 of layer 1 writes nothing
  imp = inherit.importance(dead, cfg, [batch(0)])
  assert imp.heads[1, 0] == 0.0 and np.all(imp.heads[1, 1:] > 0)
  assert imp.ffn[1, 3] == 0.0
  moved = inherit.reorder(dead, cfg, imp)
  layer = moved["encoder"]["layer_1"]
  assert np.all(np.asarray(layer["attention"]["output"]["kernel"][-1]) == 0.0)
  order = np.argsort(-imp.hidden, kind="stable")  # the rows follow the hidden units
  np.testing.assert_array_equal(
      layer["attention"]["query"]["kernel"][:, -1],
      dead["encoder"]["layer_1"]["attention"]["query"]["kernel"][order, 0])
  zero_rows = np.where(np.all(np.asarray(layer["output"]["kernel"]) == 0.0, axis=1))[0]
  assert zero_rows.tolist() == [cfg.arch.intermediate - 1]


def test_dropping_layers_equals_skipping_them(teacher):
  cfg, params, imp = teacher
  b = batch(7)
  small = config("D2-A4-H32-I48")
  for kept in ((0, 2), (1, 2), (0, 1)):
    student = inherit.inherit(params, cfg, small, layers=kept)
    # The independent path: the teacher itself with the other layer switched off by the
    # model's layer mask (a masked-off layer is the identity).
    arch_mask = masks.make_arch_mask(cfg.arch, cfg.arch)
    skip = np.array([float(i in kept) for i in range(cfg.arch.depth)], np.float32)
    arch_mask = dict(arch_mask, layers=skip)
    want = logits(params, cfg, b, arch_mask=arch_mask)
    np.testing.assert_allclose(logits(student, small, b), want, atol=1e-6, rtol=0)
    # A wrong layer choice would be caught: another skip gives other outputs.
    other = dict(arch_mask, layers=np.roll(skip, 1))
    assert np.max(np.abs(logits(params, cfg, b, arch_mask=other) - want)) > 1e-3
  chosen = inherit.select_layers(imp, 2)
  assert chosen == tuple(sorted(np.argsort(-imp.layers, kind="stable")[:2].tolist()))
  student = inherit.inherit(params, cfg, small, imp)  # layers from the importance
  arch_mask = dict(masks.make_arch_mask(cfg.arch, cfg.arch),
                   layers=np.array([float(i in chosen) for i in range(3)], np.float32))
  np.testing.assert_allclose(logits(student, small, b), logits(params, cfg, b, arch_mask=arch_mask),
                             atol=1e-5, rtol=0)


def test_select_layers_and_uniform_layers():
  imp = inherit.Importance(heads=np.ones((4, 1)), ffn=np.ones((4, 1)), hidden=np.ones(2),
                           layers=np.array([0.3, -0.1, 0.9, 0.5]))
  assert inherit.select_layers(imp, 2) == (2, 3)
  assert inherit.select_layers(imp, 3) == (0, 2, 3)
  with pytest.raises(ValueError, match="depth 5"):
    inherit.select_layers(imp, 5)
  assert inherit.uniform_layers(6, 4) == (1, 2, 4, 5)
  assert inherit.uniform_layers(6, 3) == (1, 3, 5)
  assert inherit.uniform_layers(4, 4) == (0, 1, 2, 3)


def test_narrower_student_takes_leading_importance_ordered_slices(teacher):
  cfg, params, imp = teacher
  # An extraction-style candidate with an explicit head size: A*S = 18 of the teacher's 32.
  small = config("D2-A3-H24-I20-S6")
  student = inherit.inherit(params, cfg, small, imp, layers=(0, 2))
  moved = inherit.reorder(params, cfg, imp)
  shapes = masks.param_shapes(small, model.MLM)
  flat = masks.check_layout(student, shapes, "student")
  t = moved["encoder"]["layer_2"]["attention"]
  s = student["encoder"]["layer_1"]["attention"]
  q_cols = np.asarray(t["query"]["kernel"]).reshape(32, 32)[:24, :18].reshape(24, 3, 6)
  np.testing.assert_allclose(s["query"]["kernel"], q_cols * math.sqrt(6 / 8), rtol=1e-6)
  v_cols = np.asarray(t["value"]["kernel"]).reshape(32, 32)[:24, :18].reshape(24, 3, 6)
  np.testing.assert_array_equal(s["value"]["kernel"], v_cols)
  out_rows = np.asarray(t["output"]["kernel"]).reshape(32, 32)[:18, :24].reshape(3, 6, 24)
  np.testing.assert_array_equal(s["output"]["kernel"], out_rows)
  np.testing.assert_array_equal(
      flat[("encoder", "layer_0", "intermediate", "kernel")],
      np.asarray(moved["encoder"]["layer_0"]["intermediate"]["kernel"])[:24, :20])
  np.testing.assert_array_equal(
      flat[("embeddings", "word_embeddings", "embedding")],
      np.asarray(moved["embeddings"]["word_embeddings"]["embedding"])[:, :24])
  out = logits(student, small, batch(8))
  assert out.shape == (3, 4, VOCAB) and np.all(np.isfinite(out))


def test_mismatches_fail_clearly_and_missing_parts_are_fresh(teacher):
  cfg, params, imp = teacher
  with pytest.raises(ValueError, match="attention width"):
    inherit.inherit(params, cfg, config("D2-A4-H32-I48-S10"), imp)
  with pytest.raises(ValueError, match="hidden"):
    inherit.inherit(params, cfg, config("D2-A4-H40-I48-S8"), imp)
  with pytest.raises(ValueError, match="vocab_size"):
    inherit.inherit(params, cfg, config("D2-A4-H32-I48", vocab_size=60), imp)
  with pytest.raises(ValueError, match="max_positions"):
    inherit.inherit(params, cfg, config("D2-A4-H32-I48", max_positions=16), imp)
  with pytest.raises(ValueError, match="distinct teacher layers"):
    inherit.inherit(params, cfg, config("D2-A4-H32-I48"), layers=(1, 1))
  # A pooler the teacher lacks comes from the fresh init with the given rng.
  bare = {k: v for k, v in params.items() if k != "pooler"}
  pooled = config("D2-A4-H32-I48", pooler=True)
  student = inherit.inherit(bare, cfg.replace(pooler=False), pooled, imp, rng=jax.random.key(4))
  fresh = model.init(jax.random.key(4), pooled)
  np.testing.assert_array_equal(student["pooler"]["kernel"], fresh["pooler"]["kernel"])
  assert not np.array_equal(student["encoder"]["layer_0"]["output"]["kernel"],
                            fresh["encoder"]["layer_0"]["output"]["kernel"])


def test_hidden_projection_and_kept_share(teacher):
  cfg, _, imp = teacher
  proj = inherit.hidden_projection(imp, 24, 32)
  order = np.argsort(-imp.hidden, kind="stable")
  assert proj.shape == (24, 32) and np.all(proj.sum(1) == 1) and np.all(proj.sum(0) <= 1)
  assert np.all(proj[np.arange(24), order[:24]] == 1)
  share = inherit.kept_share(imp, config("D2-A3-H24-I20-S6"), (0, 2))
  assert set(share) == {"layers", "heads", "ffn", "hidden"}
  assert all(0.0 <= v <= 1.0 for v in share.values())
  full = inherit.kept_share(imp, cfg, (0, 1, 2))
  assert full["heads"] == pytest.approx(1.0) and full["hidden"] == pytest.approx(1.0)
  # Two heads of size 12 cover three of the teacher's heads of size 8 (width 24 of 32).
  wide = config("D3-A2-H24-I20-S12")
  three = np.sort(imp.heads, axis=-1)[:, ::-1][:, :3].sum() / imp.heads.sum()
  assert inherit.kept_share(imp, wide, (0, 1, 2), cfg)["heads"] == pytest.approx(three)
  assert inherit.kept_share(imp, wide, (0, 1, 2))["heads"] < three
