"""The inherited proxy master (bort_jax/search/proxy_init.py): what the teacher fills, what
stays random, and that a master of the teacher's own shape computes the teacher's function."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from bort_jax.core import arch as arch_lib
from bort_jax.core import model
from bort_jax.core.arch import Arch
from bort_jax.pipelines import extract
from bort_jax.search import proxy_init

VOCAB = 64
TEACHER = arch_lib.get_model_config("D2-A2-H32-I64", family="bert", vocab_size=VOCAB,
                                    max_positions=32, pooler=False)


@pytest.fixture(scope="module")
def teacher_params():
  return model.init(jax.random.key(1), TEACHER, model.MLM)


def _batches(n=2):
  rng = np.random.default_rng(0)
  return [extract.synthetic_batch(rng, VOCAB, 4, 16, 3) for _ in range(n)]


def test_inner_arch_and_the_space_must_fit_the_teacher():
  assert proxy_init.inner_arch(Arch(2, 4, 32, 64, head_size=16), TEACHER.arch) == Arch(
      2, 2, 32, 64, head_size=16)
  assert proxy_init.inner_arch(Arch(1, 1, 16, 32, head_size=32), TEACHER.arch) == Arch(
      1, 1, 16, 32, head_size=16)
  with pytest.raises(ValueError, match="largest depth is 3 > the teacher's 2"):
    proxy_init.inner_arch(Arch(3, 2, 32, 64), TEACHER.arch)


def test_teacher_shaped_master_computes_the_teachers_function(teacher_params):
  # Importance reorders units without changing the function: logits equal the teacher's.
  master = proxy_init.inherited_master(teacher_params, TEACHER, TEACHER, _batches(), seed=0)
  batch = _batches(3)[2]
  want = model.apply(teacher_params, TEACHER, batch, head=model.MLM)["logits"]
  got = model.apply(master, TEACHER, batch, head=model.MLM)["logits"]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4, rtol=0)


def test_parts_the_teacher_lacks_keep_the_random_master(teacher_params):
  # Four heads of size 16: the teacher has two, so heads 2 and 3 stay random; the first two
  # are the teacher's (no importance: its own order, evenly spaced layers).
  master_cfg = TEACHER.replace(arch=Arch(2, 4, 32, 64, head_size=16))
  master = traverse_util.flatten_dict(
      proxy_init.inherited_master(teacher_params, TEACHER, master_cfg, None, seed=0))
  rand = traverse_util.flatten_dict(model.init(jax.random.key(0), master_cfg, model.MLM))
  teach = traverse_util.flatten_dict(teacher_params)
  q = ("encoder", "layer_1", "attention", "query", "kernel")
  np.testing.assert_array_equal(master[q][:, :2], np.asarray(teach[q]))
  np.testing.assert_array_equal(master[q][:, 2:], np.asarray(rand[q])[:, 2:])
  emb = ("embeddings", "word_embeddings", "embedding")
  np.testing.assert_array_equal(master[emb], np.asarray(teach[emb]))
  assert not np.array_equal(master[q][:, 2:], 0 * master[q][:, 2:])
