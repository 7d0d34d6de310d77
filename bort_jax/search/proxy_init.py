"""The proxy's master weights when candidates inherit the teacher's (``config.proxy.init``).

A proxy candidate's initial weights are the leading slices of one master set of the space's
largest (padded) shape (``proxy.py``). With ``init="inherit"`` that master is built from the
teacher (``core/inherit.py``): the largest part of the master that fits inside the teacher,

    depth D_m, hidden H_m, intermediate I_m (all at most the teacher's; checked),
    heads min(A_m, A_t), head size min(S_m, S_t),

is ``inherit(teacher -> that shape)`` (units in importance order, layers selected for the
master's depth), written into the leading corner of a seeded random initialisation of the
master; the rest of the master (heads or head dimensions the teacher does not have) keeps its
random values. A candidate then takes, as always, the leading slices:

* the first d of the master's selected teacher layers (a padded population cannot give each
  member its own layer choice: its program receives one master and multiplies it by each
  member's mask);
* its leading hidden units and FFN neurons in importance order, as ``inherit`` gives them;
* its A_c most important teacher heads, each cut to (or, beyond S_t, padded with random
  values to) its head size S_c. With S_c = S_t this is exactly ``inherit``'s "keep the best
  A_c heads"; otherwise ``inherit`` would lay the teacher's columns end to end and rescale the
  query, which one master cannot do for several head sizes at once (docs/EXTRACTION.md).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import traverse_util

from bort_jax.core import inherit, model
from bort_jax.core.arch import Arch, ModelConfig
from bort_jax.core.model import MLM


def inner_arch(master: Arch, teacher: Arch) -> Arch:
  """The part of the master shape that the teacher can fill (module docstring)."""
  for field in ("depth", "hidden", "intermediate"):
    if getattr(master, field) > getattr(teacher, field):
      raise ValueError(
          f"config.proxy.init='inherit' needs the search space inside the teacher {teacher}: "
          f"its largest {field} is {getattr(master, field)} > the teacher's "
          f"{getattr(teacher, field)}")
  return Arch(master.depth, min(master.heads, teacher.heads), master.hidden,
              master.intermediate, head_size=min(master.head_size, teacher.head_size))


def inherited_master(teacher_params: Any, teacher_config: ModelConfig, master_config: ModelConfig,
                     batches: Sequence[dict] | None = None, seed: int = 0) -> dict:
  """The master weights for ``proxy.init="inherit"``.

  Args:
    teacher_params: the teacher's parameters with its MLM head.
    teacher_config: the teacher's config.
    master_config: the proxy's master config (the space's padded shape, the student's
      vocabulary, which must be the teacher's).
    batches: masked-LM batches to measure the teacher's importance on; None keeps the
      teacher's own unit order and evenly spaced layers.
    seed: seed of the random part (the same seed as ``init="random"``'s master).

  Returns:
    An MLM parameter tree of the master shape.
  """
  inner = master_config.replace(arch=inner_arch(master_config.arch, teacher_config.arch))
  importance = (inherit.importance(teacher_params, teacher_config, list(batches))
                if batches else None)
  key = jax.random.key(seed)
  taken = traverse_util.flatten_dict(jax.device_get(
      inherit.inherit(teacher_params, teacher_config, inner, importance=importance, rng=key,
                      head=MLM)))
  master = {k: np.array(v) for k, v in traverse_util.flatten_dict(
      jax.device_get(model.init(key, master_config, MLM))).items()}
  for path, value in taken.items():
    value = np.asarray(value)
    master[path][tuple(slice(0, n) for n in value.shape)] = value
  return traverse_util.unflatten_dict(master)
