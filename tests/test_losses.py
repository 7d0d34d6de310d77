"""Losses against direct float64 numpy formulas (tolerance 1e-5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bort_jax.core import losses

TOL = dict(rtol=1e-5, atol=1e-5)


def _log_softmax64(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _softmax64(x):
  return np.exp(_log_softmax64(x))


@pytest.fixture
def mlm_batch():
  rng = np.random.default_rng(0)
  b, p, v = 3, 5, 11
  student = rng.normal(size=(b, p, v)).astype(np.float32) * 3
  teacher = rng.normal(size=(b, p, v)).astype(np.float32) * 3
  labels = rng.integers(0, v, size=(b, p)).astype(np.int32)
  weights = (rng.random((b, p)) > 0.3).astype(np.float32)
  weights[0, 0] = 1.0
  return student, teacher, labels, weights


def _np_ce(logits, labels, weights):
  lp = _log_softmax64(logits)
  picked = np.take_along_axis(lp, labels[..., None].astype(np.int64), -1)[..., 0]
  return -(picked * weights).sum(), weights.sum()


def _np_kl(student, teacher, t):
  lpt = _log_softmax64(np.asarray(teacher, np.float64) / t)
  lps = _log_softmax64(np.asarray(student, np.float64) / t)
  return (np.exp(lpt) * (lpt - lps)).sum(-1)


def _np_original(student, teacher, t):
  pt = _softmax64(np.asarray(teacher, np.float64) / t)
  q = _softmax64(np.asarray(student, np.float64) / t)
  return -(pt * _log_softmax64(q)).mean(-1)


def test_mlm_loss_matches_numpy(mlm_batch):
  student, _, labels, weights = mlm_batch
  total, count = losses.mlm_loss(jnp.asarray(student), labels, weights)
  ref_total, ref_count = _np_ce(student, labels, weights)
  np.testing.assert_allclose(float(total), ref_total, **TOL)
  assert float(count) == ref_count


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.5])
def test_kd_kl_matches_numpy_and_temperature_matters(mlm_batch, temperature):
  student, teacher, _, weights = mlm_batch
  total, count = losses.kd_loss(student, teacher, weights, temperature, "kl")
  ref = (_np_kl(student, teacher, temperature) * weights).sum()
  np.testing.assert_allclose(float(total), ref, **TOL)
  assert float(count) == weights.sum()
  # KL is non-negative and zero when the student copies the teacher.
  assert float(total) > 0
  same, _ = losses.kd_loss(teacher, teacher, weights, temperature, "kl")
  assert abs(float(same)) < 1e-5


def test_kd_original_variant_matches_numpy(mlm_batch):
  student, teacher, _, weights = mlm_batch
  total, _ = losses.kd_loss(student, teacher, weights, 2.0, "original")
  ref = (_np_original(student, teacher, 2.0) * weights).sum()
  np.testing.assert_allclose(float(total), ref, **TOL)
  # The double softmax keeps each prediction's term near log(V) / V (mean over the vocabulary).
  v = student.shape[-1]
  per_pred = _np_original(student, teacher, 2.0)
  assert np.all(np.abs(per_pred - np.log(v) / v) < 0.1)
  kl_total, _ = losses.kd_loss(student, teacher, weights, 2.0, "kl")
  assert abs(float(kl_total) - float(total)) > 1e-3


@pytest.mark.parametrize("kind", ["kl", "original"])
@pytest.mark.parametrize("temperature,alpha_kd,alpha_mlm", [(2.0, 0.5, 0.1), (3.0, 0.7, 0.0)])
def test_distillation_loss_formula(mlm_batch, kind, temperature, alpha_kd, alpha_mlm):
  student, teacher, labels, weights = mlm_batch
  loss, metrics = losses.distillation_loss(student, teacher, labels, weights,
                                           temperature=temperature, alpha_kd=alpha_kd,
                                           alpha_mlm=alpha_mlm, kind=kind)
  mlm_sum, n = _np_ce(student, labels, weights)
  kd_fn = _np_kl if kind == "kl" else _np_original
  kd_sum = (kd_fn(student, teacher, temperature) * weights).sum()
  ref = (alpha_mlm * mlm_sum + alpha_kd * temperature ** 2 * kd_sum) / n
  np.testing.assert_allclose(float(loss), ref, **TOL)
  np.testing.assert_allclose(float(metrics["mlm_loss"]), mlm_sum / n, **TOL)
  np.testing.assert_allclose(float(metrics["kd_loss"]), kd_sum / n, **TOL)
  assert float(metrics["num_masked"]) == n
  acc = ((student.argmax(-1) == labels) * weights).sum() / n
  np.testing.assert_allclose(float(metrics["accuracy"]), acc, **TOL)


def test_distillation_all_weights_zero_is_zero_not_nan(mlm_batch):
  student, teacher, labels, weights = mlm_batch
  zeros = np.zeros_like(weights)
  loss, metrics = losses.distillation_loss(student, teacher, labels, zeros)
  assert float(loss) == 0.0 and float(metrics["num_masked"]) == 0.0
  grads = jax.grad(lambda s: losses.distillation_loss(s, teacher, labels, zeros)[0])(
      jnp.asarray(student))
  assert np.all(np.isfinite(np.asarray(grads))) and float(jnp.abs(grads).max()) == 0.0


def test_distillation_gradient_ignores_teacher_and_padding(mlm_batch):
  student, teacher, labels, weights = mlm_batch
  fn = lambda s, t: losses.distillation_loss(s, t, labels, weights)[0]
  gs, gt = jax.grad(fn, argnums=(0, 1))(jnp.asarray(student), jnp.asarray(teacher))
  assert float(jnp.abs(gt).max()) == 0.0
  # Padding predictions (weight 0) get no gradient; real ones do.
  gs = np.asarray(gs)
  assert np.all(gs[weights == 0] == 0) and np.all(np.abs(gs[weights == 1]).sum(-1) > 0)


def test_bfloat16_inputs_are_computed_in_float32(mlm_batch):
  student, teacher, labels, weights = mlm_batch
  loss, _ = losses.distillation_loss(jnp.asarray(student, jnp.bfloat16),
                                     jnp.asarray(teacher, jnp.bfloat16), labels, weights)
  assert loss.dtype == jnp.float32
  ref, _ = losses.distillation_loss(student, teacher, labels, weights)
  np.testing.assert_allclose(float(loss), float(ref), rtol=3e-2)


def test_classification_regression_multiple_choice():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(6, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=6).astype(np.int32)
  w = np.array([1, 1, 1, 1, 0, 0], np.float32)
  total, count = losses.softmax_cross_entropy(logits, labels, w)
  ref, _ = _np_ce(logits, labels, w)
  np.testing.assert_allclose(float(total), ref, **TOL)
  assert float(count) == 4
  # Multiple choice is the same loss over [B, C] choice scores; default weights are ones.
  choices = rng.normal(size=(4, 5)).astype(np.float32)
  answer = np.array([0, 4, 2, 1], np.int32)
  total, count = losses.softmax_cross_entropy(choices, answer)
  np.testing.assert_allclose(float(total), _np_ce(choices, answer, np.ones(4))[0], **TOL)
  assert float(count) == 4
  pred = rng.normal(size=5).astype(np.float32)
  target = rng.normal(size=5).astype(np.float32)
  wr = np.array([1, 1, 0, 1, 1], np.float32)
  total, count = losses.mse(pred, target, wr)
  np.testing.assert_allclose(float(total), (wr * (pred.astype(np.float64) - target) ** 2).sum(),
                             **TOL)
  assert float(count) == 4
  hits, n = losses.correct_predictions(logits, labels, w)
  assert float(hits) == ((logits.argmax(-1) == labels) * w).sum() and float(n) == 4


def test_hidden_mse_with_and_without_projection():
  rng = np.random.default_rng(2)
  s = rng.normal(size=(2, 4, 3)).astype(np.float32)
  t = rng.normal(size=(2, 4, 5)).astype(np.float32)
  proj = rng.normal(size=(3, 5)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.float32)
  total, count = losses.hidden_mse(s, t, mask, proj)
  diff = s.astype(np.float64) @ proj.astype(np.float64) - t
  np.testing.assert_allclose(float(total), ((diff ** 2).mean(-1) * mask).sum(), **TOL)
  assert float(count) == 4
  with pytest.raises(ValueError, match="projection"):
    losses.hidden_mse(s, t, mask)
  total, _ = losses.hidden_mse(t, t, mask)
  assert float(total) == 0.0


def test_bad_inputs_have_clear_errors(mlm_batch):
  student, teacher, labels, weights = mlm_batch
  with pytest.raises(ValueError, match="vocabulary"):
    losses.distillation_loss(student, teacher[..., :-1], labels, weights)
  with pytest.raises(ValueError, match="unknown distillation kind"):
    losses.kd_loss(student, teacher, weights, 2.0, "mse")
  with pytest.raises(ValueError, match="temperature"):
    losses.kd_loss(student, teacher, weights, 0.0)
  with pytest.raises(ValueError, match="labels"):
    losses.mlm_loss(student, labels[:, :-1], weights)


# ----------------------------------------------------------------------------- intermediate


def _attention(rng, shape):
  return _softmax64(rng.normal(size=shape) * 2).astype(np.float32)


def test_attention_kl_matches_numpy_and_averages_unequal_heads():
  rng = np.random.default_rng(3)
  student, teacher = _attention(rng, (2, 3, 4, 4)), _attention(rng, (2, 3, 4, 4))
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
  kl = lambda p, q: np.sum(p * (np.log(p) - np.log(q)), -1)
  want = np.sum(kl(teacher.astype(np.float64), student).mean(1) * mask)
  total, count = losses.attention_kl(student, teacher, mask)
  np.testing.assert_allclose(total, want, **TOL)
  assert float(count) == 5.0
  # Two student heads against three teacher heads: the head-averaged distributions.
  total, _ = losses.attention_kl(student[:, :2], teacher, mask)
  s_mean, t_mean = student[:, :2].mean(1, dtype=np.float64), teacher.mean(1, dtype=np.float64)
  np.testing.assert_allclose(total, np.sum(kl(t_mean, s_mean) * mask), **TOL)
  # A teacher that gives a key no probability (a padded key) contributes 0 there, not NaN.
  t_zero = teacher.copy()
  t_zero[..., -1] = 0.0
  t_zero /= t_zero.sum(-1, keepdims=True)
  value, grad = jax.value_and_grad(lambda s: losses.attention_kl(s, t_zero, mask)[0])(student)
  assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
  assert float(losses.attention_kl(teacher, teacher, mask)[0]) == pytest.approx(0.0, abs=1e-6)


def test_layer_map_uniform_and_inherited():
  assert losses.layer_map(2, 6) == ((0, 2), (1, 5))
  assert losses.layer_map(4, 6) == ((0, 1), (1, 2), (2, 4), (3, 5))
  assert losses.layer_map(3, 3) == ((0, 0), (1, 1), (2, 2))
  assert losses.layer_map(2, 6, "inherited", (0, 4)) == ((0, 0), (1, 4))
  with pytest.raises(ValueError, match="inherited"):
    losses.layer_map(2, 6, "inherited", None)
  with pytest.raises(ValueError, match="unknown layer_map"):
    losses.layer_map(2, 6, "every")


def _tiny(spec):
  from bort_jax.core import arch, model  # pylint: disable=import-outside-toplevel
  cfg = arch.get_model_config(spec, family="bert", vocab_size=30, max_positions=16)
  return cfg, model


def _tiny_batch():
  ids = np.random.default_rng(4).integers(3, 30, size=(2, 6)).astype(np.int32)
  mask = np.ones((2, 6), np.int32)
  mask[1, 4:] = 0
  return {"input_ids": ids, "attention_mask": mask}


def test_intermediate_loss_is_zero_for_the_teacher_itself():
  cfg, model = _tiny("D2-A2-H16-I24")
  params = model.init(jax.random.key(0), cfg)
  batch = _tiny_batch()
  run = jax.jit(lambda p: model.apply(p, cfg, batch, output_hidden_states=True,
                                      output_attentions=True))
  out = run(params)
  assert len(out["attentions"]) == 2 and out["attentions"][0].shape == (2, 2, 6, 6)
  np.testing.assert_allclose(np.sum(out["attentions"][1], -1), 1.0, atol=1e-6)
  pairs = losses.layer_map(2, 2)
  total, parts = losses.intermediate_loss(out, out, batch["attention_mask"], pairs,
                                          alpha_hidden=1.0, alpha_attn=1.0)
  assert float(total) == pytest.approx(0.0, abs=1e-7)
  assert set(parts) == {"hidden_loss", "attn_loss"}
  # Off by default: the paper's loss has no intermediate term and asks for no extra outputs.
  assert float(losses.intermediate_loss(out, out, batch["attention_mask"], pairs)[0]) == 0.0
  assert "attentions" not in jax.eval_shape(lambda p: model.apply(p, cfg, batch), params)


def test_intermediate_loss_gradient_matches_finite_differences():
  """A narrower, shallower student against a teacher, through the learned projection."""
  t_cfg, model = _tiny("D2-A2-H16-I24")
  s_cfg, _ = _tiny("D1-A2-H12-I20-S4")
  teacher = model.init(jax.random.key(1), t_cfg)
  student = model.init(jax.random.key(2), s_cfg)
  batch = _tiny_batch()
  t_out = model.apply(teacher, t_cfg, batch, output_hidden_states=True, output_attentions=True)
  pairs = losses.layer_map(1, 2)
  proj0 = np.asarray(jax.random.normal(jax.random.key(3), (12, 16))) * 0.3

  def loss(tree):
    out = model.apply(tree["s"], s_cfg, batch, output_hidden_states=True,
                      output_attentions=True)
    return losses.intermediate_loss(out, t_out, batch["attention_mask"], pairs, 0.7, 1.3,
                                    tree["proj"])[0]

  tree = {"s": student, "proj": jnp.asarray(proj0, jnp.float32)}
  grad = jax.jit(jax.grad(loss))(tree)
  loss = jax.jit(loss)
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  direction = jax.tree_util.tree_unflatten(
      treedef, [jax.random.normal(k, x.shape) * 0.05 for k, x in zip(keys, leaves)])
  analytic = sum(float(jnp.sum(g * d)) for g, d in zip(
      jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(direction)))
  h = 1e-2
  shifted = lambda sign: jax.tree_util.tree_map(lambda x, d: x + sign * h * d, tree, direction)
  numeric = (float(loss(shifted(1.0))) - float(loss(shifted(-1.0)))) / (2 * h)
  assert abs(analytic) > 1e-3  # the direction is not orthogonal to the gradient
  np.testing.assert_allclose(analytic, numeric, rtol=2e-2)
  assert np.any(np.asarray(grad["proj"]) != 0)
