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
