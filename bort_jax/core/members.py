"""Many models in one compiled program: how a population walks its members' axis.

Both populations of this project keep their members on a leading axis and share one program:
the extraction's proxy trainings (``search/proxy.py``: candidates, each with its mask and
learning rate) and fine-tuning's seeds x settings (``finetune/population.py``). ``mode`` says
how the program goes over that axis:

* ``vmap``: every member at once (accelerators: the members fill the chip);
* ``map``: ``jax.lax.map``, one member after another inside the same program (a small CPU
  gains no throughput from vmap, and map keeps memory flat;
  ``benchmarks/results/finetune.json`` and ``extract_s3.json``);
* ``auto``: map on a CPU, vmap elsewhere.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

MODES = ("vmap", "map", "auto")


def check_mode(mode: str) -> str:
  """``mode`` if it is one of :data:`MODES`; ValueError otherwise."""
  if mode not in MODES:
    raise ValueError(f"population mode must be one of {MODES}, got {mode!r}")
  return mode


def resolve_mode(mode: str) -> str:
  """``vmap`` or ``map``: ``auto`` resolved for the default backend."""
  if check_mode(mode) != "auto":
    return mode
  return "map" if jax.default_backend() == "cpu" else "vmap"


def over_members(fn: Callable[..., Any], mode: str, per_member: tuple, shared: tuple) -> Any:
  """``fn(*per_member_slices, *shared)`` for every member (leading axis of ``per_member``),
  stacked: vmapped, or one member at a time (a resolved ``mode``)."""
  if mode == "vmap":
    axes = (0,) * len(per_member) + (None,) * len(shared)
    return jax.vmap(fn, in_axes=axes)(*per_member, *shared)
  return jax.lax.map(lambda xs: fn(*xs, *shared), per_member)
