"""The optimizer against a hand-written numpy update; schedules; the weight-decay mask."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bort_jax.core import optim


def _tree(rng):
  """A small parameter tree with names from the contract (INTERFACES.md)."""
  f = lambda *s: rng.normal(size=s).astype(np.float32)
  return {
      "embeddings": {"word_embeddings": {"embedding": f(6, 4)},
                     "position_embeddings": {"embedding": f(5, 4)},
                     "LayerNorm": {"scale": f(4), "bias": f(4)}},
      "encoder": {"layer_0": {
          "attention": {"query": {"kernel": f(4, 2, 2), "bias": f(2, 2)},
                        "output": {"kernel": f(2, 2, 4), "bias": f(4)},
                        "LayerNorm": {"scale": f(4), "bias": f(4)}},
          "intermediate": {"kernel": f(4, 3), "bias": f(3)},
          "output": {"kernel": f(3, 4), "bias": f(4), "LayerNorm": {"scale": f(4), "bias": f(4)}},
      }},
      "pooler": {"kernel": f(4, 4), "bias": f(4)},
      "mlm_head": {"dense": {"kernel": f(4, 4), "bias": f(4)},
                   "LayerNorm": {"scale": f(4), "bias": f(4)}, "bias": f(6)},
  }


def _paths(tree):
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {"/".join(k.key for k in path): leaf for path, leaf in leaves}


def test_decay_mask_excludes_exactly_layer_norm_and_biases():
  mask = _paths(optim.decay_mask(_tree(np.random.default_rng(0))))
  no_decay = {p for p, m in mask.items() if not m}
  expected = {p for p in mask if "LayerNorm" in p or p.endswith("/bias")}
  assert no_decay == expected
  assert "embeddings/LayerNorm/scale" in no_decay and "mlm_head/bias" in no_decay
  for p in ("encoder/layer_0/attention/query/kernel", "embeddings/word_embeddings/embedding",
            "encoder/layer_0/output/kernel", "pooler/kernel"):
    assert mask[p] is True
  # 4 LayerNorms x (scale, bias) plus 7 other biases.
  assert len(no_decay) == 8 + 7


def _np_run(params, grads_seq, lr_fn, b1, b2, eps, wd, clip, mask, bias_correction=False):
  p = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  clipped_any = False
  for t, grads in enumerate(grads_seq):
    g = {k: x.astype(np.float64) for k, x in grads.items()}
    norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
    if norm > clip:
      clipped_any = True
      g = {k: x * clip / norm for k, x in g.items()}
    lr = lr_fn(t)
    for k in p:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      mh, vh = m[k], v[k]
      if bias_correction:
        mh, vh = mh / (1 - b1 ** (t + 1)), vh / (1 - b2 ** (t + 1))
      upd = mh / (np.sqrt(vh) + eps)
      if mask[k]:
        upd = upd + wd * p[k]
      p[k] = p[k] - lr * upd
  return p, clipped_any


@pytest.mark.parametrize("name", ["adam_nobc", "adamw"])
def test_optimizer_matches_hand_written_update(name):
  rng = np.random.default_rng(1)
  params = _tree(rng)
  flat = _paths(params)
  # Three steps; the second gradient is large so global-norm clipping (1.0) is active there.
  grads_seq = [{k: rng.normal(size=x.shape).astype(np.float32) * s for k, x in flat.items()}
               for s in (0.01, 5.0, 0.02)]
  cfg = ml_collections.ConfigDict(dict(name=name, lr=1e-2, weight_decay=0.1, b1=0.9, b2=0.999,
                                       eps=1e-6, clip_norm=1.0, warmup=2, total_steps=5))
  tx = optim.make_optimizer(cfg)
  state = tx.init(params)
  p = params
  unflatten = lambda d: jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(params), [d[k] for k in flat])
  for g in grads_seq:
    updates, state = tx.update(unflatten(g), state, p)
    p = optax.apply_updates(p, updates)
  mask = _paths(optim.decay_mask(params))
  lr_fn = lambda t: 1e-2 * min((t + 1) / 2, (5 - t) / 3)
  ref, clipped = _np_run(flat, grads_seq, lr_fn, 0.9, 0.999, 1e-6, 0.1, 1.0, mask,
                         bias_correction=(name == "adamw"))
  assert clipped
  got = _paths(p)
  for k in flat:
    np.testing.assert_allclose(np.asarray(got[k]), ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # Decay moved a decayed parameter further than a no-weight-decay run would.
  assert not np.allclose(np.asarray(got["pooler/kernel"]), flat["pooler/kernel"])


def test_no_bias_correction_differs_from_adam_on_first_step():
  params = {"w": jnp.ones((3,))}
  g = {"w": jnp.array([0.5, -1.0, 2.0])}
  tx = optim.scale_by_adam_no_bias_correction(b1=0.9, b2=0.999, eps=1e-6)
  state = tx.init(params)
  assert isinstance(state, optim.ScaleByAdamNoBiasCorrectionState)
  upd, state = tx.update(g, state)
  # m = 0.1 g, v = 0.001 g^2 -> m / sqrt(v) = 0.1 / sqrt(0.001) * sign(g) (eps after the root).
  expected = 0.1 * np.array([0.5, -1.0, 2.0]) / (np.sqrt(0.001) * np.abs([0.5, -1.0, 2.0]) + 1e-6)
  np.testing.assert_allclose(np.asarray(upd["w"]), expected, rtol=1e-6)
  adam_upd, _ = optax.scale_by_adam(eps=1e-6).update(g, optax.scale_by_adam().init(params))
  assert not np.allclose(np.asarray(adam_upd["w"]), expected, rtol=1e-2)
  # jit-compatible and the state is a pytree of the parameter shapes.
  upd2, _ = jax.jit(tx.update)(g, state)
  assert upd2["w"].shape == (3,)


def test_schedule_key_steps():
  sched = optim.make_schedule(1e-4, total_steps=100, warmup_fraction=0.1)  # W = 10
  val = lambda s: float(sched(s))
  np.testing.assert_allclose(val(0), 1e-5, rtol=1e-6)       # first update: peak / W
  np.testing.assert_allclose(val(4), 5e-5, rtol=1e-6)
  np.testing.assert_allclose(val(9), 1e-4, rtol=1e-6)       # end of warmup
  np.testing.assert_allclose(val(10), 1e-4, rtol=1e-6)      # decay starts at the peak
  np.testing.assert_allclose(val(55), 5e-5, rtol=1e-6)      # halfway through the decay
  np.testing.assert_allclose(val(99), 1e-4 / 90, rtol=1e-5)  # last update
  assert val(100) == 0.0 and val(150) == 0.0
  lin = optim.make_schedule(2.0, total_steps=4, warmup_steps=0)
  np.testing.assert_allclose([float(lin(s)) for s in range(5)], [2.0, 1.5, 1.0, 0.5, 0.0])
  # Monotone up then down.
  vals = np.array([val(s) for s in range(101)])
  assert np.all(np.diff(vals[:10]) > 0) and np.all(np.diff(vals[10:]) < 0)


def test_bad_configs_have_clear_errors():
  with pytest.raises(ValueError, match="unknown optimizer name 'sgd'"):
    optim.make_optimizer({"name": "sgd", "lr": 1e-3, "total_steps": 10})
  with pytest.raises(ValueError, match="total_steps"):
    optim.make_optimizer({"name": "adamw", "lr": 1e-3})
  with pytest.raises(ValueError, match="warmup_fraction"):
    optim.make_schedule(1.0, 10, warmup_fraction=1.5)
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.make_schedule(1.0, 10, warmup_steps=11)
  with pytest.raises(ValueError, match="b2"):
    optim.scale_by_adam_no_bias_correction(b2=1.0)
