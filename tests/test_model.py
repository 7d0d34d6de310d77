"""Tests of bort_jax.core.model: shapes, padding, dropout, and exact architecture masks.

Tiny float32 shapes throughout. Most tests draw parameters at random from the shapes of
``init`` (non-zero biases and LN parameters, so a bias that leaks past a mask would show;
``init`` itself is compiled once, in the init test). The mask tests compare a padded, masked
model against the unpadded small model, in outputs and in gradients, with junk (not zeros) in
the padded parameter positions, so that any padded weight reaching an active output fails.
Compiled functions are cached per shape: compilation is what costs time here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from bort_jax.core import model as M
from bort_jax.core import masks
from bort_jax.core.arch import Arch, get_model_config

VOCAB = 100
PADDED = Arch(2, 4, 32, 64, head_size=16)  # "D2-A4-H32-I64-S16"
# Candidates that drop layers, heads, head dims, hidden units and FFN units, alone and together.
SMALL = [
    Arch(1, 2, 16, 32, head_size=8),   # everything smaller at once
    Arch(2, 4, 32, 64, head_size=8),   # head dim only (A4-S16 -> A4-S8): the logit scale
    Arch(1, 2, 32, 48, head_size=16),  # layers, heads and FFN units
    Arch(2, 4, 24, 64, head_size=16),  # hidden units only: LayerNorm statistics
]
TOL = 1e-5
MLM = M.HeadSpec("mlm")


def _config(arch, family="bert"):
  max_positions = 18 if family == "roberta" else 16  # RoBERTa's offset of 2
  return get_model_config(arch, family=family, vocab_size=VOCAB, max_positions=max_positions)


def _random_params(cfg, head, seed):
  """Parameters of init's shapes with non-trivial values everywhere (no compilation)."""
  shapes = jax.eval_shape(lambda: M.init(jax.random.key(0), cfg, head))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    noise = rng.normal(size=leaf.shape)
    value = 1 + 0.1 * noise if name == "scale" else (0.1 if name == "bias" else 0.2) * noise
    return jnp.asarray(value, jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _batch(seed=0, b=2, t=7, lengths=(7, 4), p=3, types=True):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, VOCAB, size=(b, t)).astype(np.int32)
  mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
           "masked_positions": jnp.asarray(rng.integers(0, min(lengths), size=(b, p)),
                                           jnp.int32)}
  if types:
    batch["token_type_ids"] = jnp.asarray((np.arange(t)[None] >= 3) * np.ones((b, 1)), jnp.int32)
  return batch


def _max_diff(a, b):
  # numpy, not jnp: eager jnp ops compile once per new shape, which dominates tiny tests.
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b), initial=0.0))


def _tree_max(tree):
  return max(jax.tree.leaves(tree))


def _padded_params(small_params, small_cfg, padded_cfg, head, seed):
  """embed_params plus random junk wherever the small model has no parameter."""
  embedded = masks.embed_params(small_params, small_cfg, padded_cfg, head)
  pmask = masks.param_mask(padded_cfg, small_cfg.arch, head)
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda e, m: e + rng.normal(size=e.shape).astype(np.float32) * (1 - m), embedded, pmask)


@functools.lru_cache(maxsize=None)
def _forward(cfg, head, train=False):
  """A jitted apply, cached per (config, head) so each shape compiles once."""
  return jax.jit(lambda p, b, m=None, rng=None: M.apply(
      p, cfg, b, head=head, arch_mask=m, train=train, rng=rng, output_hidden_states=True))


@functools.lru_cache(maxsize=None)
def _runner(cfg, head):
  """Jitted (outputs, grads) of a weighted loss over logits, hidden and pooled outputs."""

  def run(params, batch, weights, arch_mask):
    def loss(p):
      out = M.apply(p, cfg, batch, head=head, arch_mask=arch_mask, output_hidden_states=True)
      return sum(jnp.sum(out[k] * w) for k, w in weights.items()), out
    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return out, grads
  return jax.jit(run)


def _weights(hidden, width, seed=7):
  """Loss weights, zero beyond the small model's hidden size.

  Normalised like a mean: with plain sums of ~10^3 random terms the gradients reach ~200 and
  float32 rounding alone (relative 1e-7) would exceed an absolute 1e-5.
  """
  r = np.random.default_rng(seed)
  w = {"logits": r.normal(size=(2, 3, VOCAB)), "hidden": r.normal(size=(2, 7, hidden)),
       "pooled": r.normal(size=(2, hidden))}
  pad = lambda v: np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, width - v.shape[-1])])
  return {k: jnp.asarray(v / v.size if k == "logits" else pad(v / v.size), jnp.float32)
          for k, v in w.items()}


def test_init_tree_and_logical_axes():
  cfg, head = _config("D2-A2-H32-I64"), M.HeadSpec("classification", 3)
  params = M.init(jax.random.key(0), cfg, head)
  flat = traverse_util.flatten_dict(params)
  assert flat[("embeddings", "word_embeddings", "embedding")].shape == (VOCAB, 32)
  assert flat[("embeddings", "token_type_embeddings", "embedding")].shape == (2, 32)
  assert flat[("encoder", "layer_1", "attention", "query", "kernel")].shape == (32, 2, 16)
  assert flat[("encoder", "layer_1", "attention", "query", "bias")].shape == (2, 16)
  assert flat[("encoder", "layer_1", "attention", "output", "kernel")].shape == (2, 16, 32)
  assert flat[("encoder", "layer_0", "output", "kernel")].shape == (64, 32)
  # BERT's layout (the bert family's default): pooler, then one Linear named classifier.
  assert flat[("classifier", "kernel")].shape == (32, 3)
  assert flat[("pooler", "kernel")].shape == (32, 32)
  assert not any(k[0] == "mlm_head" for k in flat)
  # Initialisers: zero biases, unit LN scales, normal(0.02) kernels and tables.
  assert float(np.abs(flat[("encoder", "layer_0", "intermediate", "bias")]).max()) == 0.0
  assert float(np.min(flat[("embeddings", "LayerNorm", "scale")])) == 1.0
  assert 0.015 < float(np.std(flat[("embeddings", "word_embeddings", "embedding")])) < 0.025

  axes = M.logical_axes(cfg, head)
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  assert jax.tree.structure(axes, is_leaf=is_spec) == jax.tree.structure(params)
  allowed = {"vocab", "embed", "heads", "kv", "mlp", "position", "type", "classes"}
  for spec, value in zip(jax.tree.leaves(axes, is_leaf=is_spec), jax.tree.leaves(params)):
    assert len(spec) == value.ndim and set(spec) <= allowed, spec
  assert axes["encoder"]["layer_0"]["attention"]["query"]["kernel"] == jax.sharding.PartitionSpec(
      "embed", "heads", "kv")

  bort = jax.eval_shape(lambda: M.init(jax.random.key(0), _config("D1-A2-H32-I64", "bort")))
  assert "token_type_embeddings" not in bort["embeddings"] and "pooler" not in bort
  assert bort["mlm_head"]["bias"].shape == (VOCAB,)


@pytest.mark.parametrize("head, expected", [
    (M.HeadSpec("none"), None),
    (MLM, (2, 3, VOCAB)),
    (M.HeadSpec("classification", 3), (2, 3)),
    (M.HeadSpec("regression"), (2,)),
    (M.HeadSpec("multiple_choice"), (2, 3)),
])
def test_head_output_shapes(head, expected):
  cfg = _config("D2-A2-H32-I64")
  batch = _batch()
  if head.kind == "multiple_choice":
    batch = {k: jnp.stack([v] * 3, axis=1) for k, v in batch.items() if k != "masked_positions"}
  params = jax.eval_shape(lambda: M.init(jax.random.key(0), cfg, head))
  out = jax.eval_shape(lambda p: M.apply(p, cfg, batch, head=head, output_hidden_states=True),
                       params)
  lead = batch["input_ids"].shape[:-1]
  assert out["hidden"].shape == lead + (7, 32) and out["hidden"].dtype == jnp.float32
  assert len(out["all_hidden"]) == 3 and out["pooled"].shape == lead + (32,)
  assert ("logits" in out) == (expected is not None)
  if expected is not None:
    assert out["logits"].shape == expected
  if head == MLM:  # without masked_positions: every position
    del batch["masked_positions"]
    full = jax.eval_shape(lambda p: M.apply(p, cfg, batch, head=head), params)
    assert full["logits"].shape == (2, 7, VOCAB)


def test_mlm_gathers_masked_positions_and_choices_are_independent():
  cfg = _config("D2-A2-H32-I64")
  params = _random_params(cfg, MLM, seed=1)
  batch = _batch()
  gathered = _forward(cfg, MLM)(params, batch)["logits"]
  full = _forward(cfg, MLM)(params, {k: v for k, v in batch.items()
                                     if k != "masked_positions"})["logits"]
  want = np.take_along_axis(np.asarray(full), np.asarray(batch["masked_positions"])[..., None], 1)
  assert _max_diff(gathered, want) < TOL

  head = M.HeadSpec("multiple_choice")
  params = _random_params(cfg, head, seed=2)
  choices = {k: v.reshape(2, 3, 7) for k, v in _batch(b=6, lengths=(7, 4, 5, 6, 7, 3)).items()
             if k in ("input_ids", "attention_mask", "token_type_ids")}
  out = _forward(cfg, head)(params, choices)["logits"]
  order = np.array([2, 0, 1])  # permuting the choices permutes the scores
  swapped = _forward(cfg, head)(params, {k: v[:, order] for k, v in choices.items()})["logits"]
  assert _max_diff(np.asarray(out)[:, order], swapped) < TOL
  assert float(np.std(np.asarray(out))) > 1e-3  # the scores do depend on the choice


def test_padding_does_not_change_real_tokens():
  cfg = _config("D2-A2-H32-I64", family="roberta")  # position offset 2
  params = _random_params(cfg, MLM, seed=3)
  batch = {k: v for k, v in _batch(seed=4, lengths=(7, 4), types=False).items()
           if k != "masked_positions"}
  other = dict(batch, input_ids=batch["input_ids"].at[1, 4:].set(jnp.array([5, 6, 7])))
  short = {k: v[1:, :4] for k, v in batch.items()}
  out_a = _forward(cfg, MLM)(params, batch)["hidden"][1, :4]
  out_b = _forward(cfg, MLM)(params, other)["hidden"][1, :4]  # other ids in the padding
  out_c = _forward(cfg, MLM)(params, short)["hidden"][0]  # no padding at all
  assert _max_diff(out_a, out_c) < TOL and _max_diff(out_b, out_c) < TOL


def test_dropout_is_driven_by_the_rng():
  cfg = _config("D2-A2-H32-I64")
  params = _random_params(cfg, MLM, seed=5)
  batch = _batch()
  train = lambda seed: _forward(cfg, MLM, train=True)(
      params, batch, rng=jax.random.key(seed))["hidden"]
  evaluate = lambda seed: _forward(cfg, MLM)(params, batch, rng=jax.random.key(seed))["hidden"]
  a, b, c = train(1), train(1), train(2)
  assert _max_diff(a, b) == 0.0
  assert _max_diff(a, c) > 1e-3 and _max_diff(a, evaluate(1)) > 1e-3
  assert _max_diff(evaluate(1), evaluate(2)) == 0.0  # train=False ignores the rng
  with pytest.raises(ValueError, match="rng"):
    M.apply(params, cfg, batch, train=True)


@pytest.mark.parametrize("small_arch", SMALL, ids=str)
def test_masked_padded_model_equals_small_model(small_arch):
  padded_cfg, small_cfg = _config(PADDED), _config(small_arch)
  small_params = _random_params(small_cfg, MLM, seed=8)
  params = _padded_params(small_params, small_cfg, padded_cfg, MLM, seed=9)
  mask = masks.make_arch_mask(PADDED, small_arch)
  batch, h = _batch(), small_arch.hidden

  ref, small_grads = _runner(small_cfg, MLM)(small_params, batch, _weights(h, h), None)
  out, grads = _runner(padded_cfg, MLM)(params, batch, _weights(h, PADDED.hidden), mask)
  assert _max_diff(np.asarray(out["hidden"])[..., :h], ref["hidden"]) <= TOL
  assert float(np.abs(np.asarray(out["hidden"])[..., h:]).max(initial=0.0)) == 0.0
  assert _max_diff(out["logits"], ref["logits"]) <= TOL
  assert _max_diff(np.asarray(out["pooled"])[..., :h], ref["pooled"]) <= TOL
  # A masked layer is the identity: the last small layer's output carries through.
  for i, state in enumerate(out["all_hidden"]):
    expect = ref["all_hidden"][min(i, small_arch.depth)]
    assert _max_diff(np.asarray(state)[..., :h], expect) <= TOL

  sliced = masks.slice_params(grads, padded_cfg, small_arch, MLM)
  diffs = jax.tree.map(_max_diff, sliced, small_grads)
  assert _tree_max(diffs) <= TOL, diffs
  assert _tree_max(jax.tree.map(lambda g: float(np.abs(g).max()), small_grads)) > 1e-3
  outside = jax.tree.map(lambda g, m: float(np.abs(np.asarray(g) * (1 - np.asarray(m))).max()),
                         grads, masks.param_mask(padded_cfg, small_arch, MLM))
  assert _tree_max(outside) == 0.0, outside


@pytest.mark.parametrize("head", [M.HeadSpec("classification", 3),
                                  M.HeadSpec("multiple_choice")], ids=lambda h: h.kind)
def test_masked_task_heads_equal_small_model(head):
  small_arch = SMALL[0]
  padded_cfg, small_cfg = _config(PADDED, "bort"), _config(small_arch, "bort")
  small_params = _random_params(small_cfg, head, seed=10)
  params = _padded_params(small_params, small_cfg, padded_cfg, head, seed=11)
  batch = {k: v for k, v in _batch().items() if k in ("input_ids", "attention_mask")}
  if head.kind == "multiple_choice":
    batch = {k: jnp.stack([v, v[::-1]], axis=1) for k, v in batch.items()}
  ref = _forward(small_cfg, head)(small_params, batch)["logits"]
  out = _forward(padded_cfg, head)(params, batch, masks.make_arch_mask(PADDED, small_arch))["logits"]
  assert _max_diff(out, ref) <= TOL


def test_param_mask_marks_what_embed_params_fills():
  head = M.HeadSpec("classification", 2)
  small_arch = SMALL[0]
  padded_cfg, small_cfg = _config(PADDED), _config(small_arch)
  ones = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype),
                      jax.eval_shape(lambda: M.init(jax.random.key(0), small_cfg, head)))
  embedded = masks.embed_params(ones, small_cfg, padded_cfg, head)
  pmask = masks.param_mask(padded_cfg, small_arch, head)
  same = jax.tree.map(lambda e, m: bool(np.all((np.asarray(e) != 0) == (np.asarray(m) == 1))),
                      embedded, pmask)
  assert all(jax.tree.leaves(same))
  assert float(pmask["encoder"]["layer_1"]["output"]["kernel"].max()) == 0.0
  assert float(pmask["encoder"]["layer_0"]["attention"]["query"]["kernel"].sum()) == 16 * 2 * 8
  # slice_params inverts embed_params.
  small = _random_params(small_cfg, head, seed=12)
  back = masks.slice_params(masks.embed_params(small, small_cfg, padded_cfg, head), padded_cfg,
                        small_arch, head)
  assert _tree_max(jax.tree.map(_max_diff, back, small)) == 0.0


def test_vmap_over_a_population_matches_members():
  padded_cfg = _config(PADDED)
  members = [SMALL[0], SMALL[2], SMALL[3]]
  batch = _batch()
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  smalls = [_random_params(_config(a), MLM, seed=20 + i) for i, a in enumerate(members)]
  population = stack([_padded_params(p, _config(a), padded_cfg, MLM, seed=30 + i)
                      for i, (a, p) in enumerate(zip(members, smalls))])
  arch_masks = stack([masks.make_arch_mask(PADDED, a) for a in members])
  run = lambda p, m: M.apply(p, padded_cfg, batch, head=MLM, arch_mask=m)
  out = jax.jit(jax.vmap(run))(population, arch_masks)
  assert out["logits"].shape == (3, 2, 3, VOCAB)
  for i, (arch, params) in enumerate(zip(members, smalls)):
    h = arch.hidden
    ref, _ = _runner(_config(arch), MLM)(params, batch, _weights(h, h), None)
    assert _max_diff(out["logits"][i], ref["logits"]) <= TOL
    assert _max_diff(np.asarray(out["hidden"][i])[..., :h], ref["hidden"]) <= TOL
  assert _max_diff(out["logits"][0], out["logits"][1]) > 1e-2  # members really differ


def test_unmasked_path_is_plain_and_equals_full_mask():
  cfg = _config(PADDED)
  params = _random_params(cfg, MLM, seed=40)
  batch = _batch()
  full = masks.make_arch_mask(PADDED, PADDED)
  assert all(float(np.min(v)) == 1.0 for v in full.values())
  plain = _forward(cfg, MLM)(params, batch)
  masked = _forward(cfg, MLM)(params, batch, full)
  assert _max_diff(plain["logits"], masked["logits"]) <= TOL
  count = lambda m: len(jax.make_jaxpr(lambda p: M.apply(p, cfg, batch, arch_mask=m))(
      params).jaxpr.eqns)
  assert count(None) < count(full)  # no mask arithmetic on the fast path


@pytest.mark.parametrize("family", ["bert", "roberta", "bort"])
def test_head_layouts_follow_hugging_face(family):
  """Each layout computes what transformers' class of that layout computes, by hand."""
  cfg = _config("D1-A2-H32-I64", family)
  batch = {k: v for k, v in _batch().items() if k in ("input_ids", "attention_mask")}
  if family == "roberta":  # RoBERTa's ids are never the pad id
    batch["input_ids"] = jnp.where(batch["attention_mask"] == 1, batch["input_ids"], cfg.pad_id)
  dense = lambda x, p: np.asarray(x) @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
  for layout in ("bert", "roberta"):
    head = M.HeadSpec("classification", 3, layout)
    params = _random_params(cfg, head, seed=50)
    out = _forward(cfg, head)(params, batch)
    first = np.asarray(out["hidden"])[:, 0]
    if layout == "bert":
      assert set(params["classifier"]) == {"kernel", "bias"} and "pooler" in params
      want = dense(np.tanh(dense(first, params["pooler"])), params["classifier"])
    else:
      assert set(params["classifier"]) == {"dense", "out_proj"}
      assert ("pooler" in params) == cfg.pooler  # the head itself needs none
      want = dense(np.tanh(dense(first, params["classifier"]["dense"])),
                   params["classifier"]["out_proj"])
    assert _max_diff(out["logits"], want) <= TOL
  # The default layout comes from the family; Bort follows RoBERTa.
  default = M.HeadSpec("regression").resolve(family)
  assert default.layout == {"bert": "bert", "roberta": "roberta", "bort": "roberta"}[family]
  assert M.HeadSpec("classification", 2, "bert").resolve(family).layout == "bert"
  # Multiple choice: pooler, then Linear(H, 1) per choice, in both layouts.
  for layout in ("bert", "roberta"):
    head = M.HeadSpec("multiple_choice", layout=layout)
    params = _random_params(cfg, head, seed=51)
    assert params["classifier"]["kernel"].shape == (32, 1) and "pooler" in params
    choices = {k: jnp.stack([v, v[::-1]], axis=1) for k, v in batch.items()}
    out = _forward(cfg, head)(params, choices)
    pooled = np.tanh(dense(np.asarray(out["hidden"])[:, :, 0], params["pooler"]))
    assert _max_diff(out["logits"], dense(pooled, params["classifier"])[..., 0]) <= TOL
    assert M.has_pooler(cfg, head)


def test_attach_head_keeps_the_body_and_fills_the_head():
  cfg = _config("D1-A2-H32-I64", "bort")  # no pooler in the config
  pretrained = _random_params(cfg, MLM, seed=52)
  head = M.HeadSpec("multiple_choice", 4)
  params = M.attach_head(jax.random.key(3), pretrained, cfg, head)
  shapes = jax.tree.map(lambda x: x.shape, M.init(jax.random.key(0), cfg, head))
  assert jax.tree.map(lambda x: x.shape, params) == shapes  # pooler added, MLM head dropped
  word = ("embeddings", "word_embeddings", "embedding")
  assert params[word[0]][word[1]][word[2]] is pretrained[word[0]][word[1]][word[2]]
  assert params["encoder"]["layer_0"]["output"]["kernel"] is (
      pretrained["encoder"]["layer_0"]["output"]["kernel"])
  assert float(np.std(np.asarray(params["pooler"]["kernel"]))) > 0.01  # initialised, not zero
  # A model that already has the head keeps it.
  again = M.attach_head(jax.random.key(4), params, cfg, head)
  assert all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)))
  with pytest.raises(ValueError, match="encoder/layer_0/intermediate/kernel.*shape"):
    broken = jax.tree.map(lambda x: x, pretrained)
    broken["encoder"]["layer_0"]["intermediate"]["kernel"] = jnp.zeros((32, 8))
    M.attach_head(jax.random.key(3), broken, cfg, head)


def test_head_spec_errors():
  with pytest.raises(ValueError, match="layout"):
    M.HeadSpec("classification", 2, "albert")
  with pytest.raises(ValueError, match="no layout"):
    M.HeadSpec("mlm", layout="bert")
  with pytest.raises(ValueError, match="one output"):
    M.HeadSpec("regression", 3)
  assert M.MLM == M.HeadSpec("mlm") and M.MLM.resolve("bort") == M.MLM


def test_clear_errors():
  cfg = _config(PADDED)
  params = _random_params(cfg, MLM, seed=41)
  batch = _batch()
  with pytest.raises(ValueError, match="hidden"):
    bad = dict(masks.make_arch_mask(PADDED, SMALL[0]), hidden=jnp.ones((7,)))
    M.apply(params, cfg, batch, arch_mask=bad)
  with pytest.raises(ValueError, match="head_size"):
    masks.make_arch_mask(Arch(2, 2, 16, 32, head_size=8), Arch(1, 2, 16, 32, head_size=16))
  with pytest.raises(ValueError, match="input_ids"):
    M.apply(params, cfg, {k: v[None] for k, v in batch.items()})
  with pytest.raises(ValueError, match="sequence length"):
    M.apply(params, cfg, {"input_ids": jnp.ones((1, 20), jnp.int32),
                          "attention_mask": jnp.ones((1, 20), jnp.int32)})
  with pytest.raises(ValueError, match="num_labels"):
    M.HeadSpec("classification")
  with pytest.raises(ValueError, match="does not fit"):
    masks.embed_params(params, cfg, _config(SMALL[0]))
  with pytest.raises(ValueError, match="query"):
    broken = jax.tree.map(lambda x: x, params)
    broken["encoder"]["layer_0"]["attention"]["query"]["kernel"] = jnp.zeros((3,))
    masks.slice_params(broken, cfg, SMALL[0])
