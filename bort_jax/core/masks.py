"""Padded shapes: one parameter tree computing a smaller architecture.

A candidate inside a larger (padded) shape keeps its weights in the leading slices of every
matrix; the architecture masks switch off the rest (whole layers, heads, head dimensions, hidden
units with LayerNorm statistics over the active ones only, FFN units). This module owns the
parameter shape table of a config, the masks, and moving weights into and out of a padded tree.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta

from bort_jax.core import model
from bort_jax.core.arch import Arch, ModelConfig
from bort_jax.core.model import HeadSpec, Params



def _check_fits(padded: Arch, arch: Arch):
  for field in ("depth", "heads", "head_size", "hidden", "intermediate"):
    if getattr(arch, field) > getattr(padded, field):
      raise ValueError(f"arch {arch} does not fit inside the padded arch {padded}: its "
                       f"{field} {getattr(arch, field)} > {getattr(padded, field)}")


def make_arch_mask(padded_arch: Arch, arch: Arch) -> dict:
  """The 0/1 masks that make the padded shape compute ``arch`` (leading units active).

  Args:
    padded_arch: the shape the parameters have.
    arch: the smaller architecture to compute.

  Returns:
    ``{"layers": [D_pad], "heads": [D_pad, A_pad], "head_dim": [S_pad], "hidden": [H_pad],
    "ffn": [D_pad, I_pad]}`` float32 arrays; rows of inactive layers are all zero.
  """
  _check_fits(padded_arch, arch)
  lead = lambda n, k: (np.arange(n) < k).astype(np.float32)
  layers = lead(padded_arch.depth, arch.depth)
  return {
      "layers": jnp.asarray(layers),
      "heads": jnp.asarray(layers[:, None] * lead(padded_arch.heads, arch.heads)[None]),
      "head_dim": jnp.asarray(lead(padded_arch.head_size, arch.head_size)),
      "hidden": jnp.asarray(lead(padded_arch.hidden, arch.hidden)),
      "ffn": jnp.asarray(layers[:, None] *
                         lead(padded_arch.intermediate, arch.intermediate)[None]),
  }


def param_shapes(config: ModelConfig, head: HeadSpec) -> dict:
  """Flat {path: shape} of the parameters, computed abstractly."""
  return dict(_cached_shapes(config, head))


@functools.lru_cache(maxsize=64)
def _cached_shapes(config: ModelConfig, head: HeadSpec) -> tuple:
  # Tracing the model costs about a second; population code asks for the same shapes often.
  abstract = jax.eval_shape(lambda r: model._boxed_init(r, config, head, 1), jax.random.key(0))
  flat = traverse_util.flatten_dict(meta.unbox(abstract))
  return tuple((k, tuple(v.shape)) for k, v in flat.items())


def _small_config(padded: ModelConfig, arch: Arch) -> ModelConfig:
  _check_fits(padded.arch, arch)
  return padded.replace(arch=arch)


def check_layout(params: Params, shapes: dict, what: str) -> dict:
  flat = traverse_util.flatten_dict(params)
  missing, extra = set(shapes) - set(flat), set(flat) - set(shapes)
  if missing or extra:
    name = lambda ks: sorted("/".join(k) for k in ks)[:5]
    raise ValueError(f"{what} do not match their config: missing {name(missing)}, "
                     f"unexpected {name(extra)}")
  for key, shape in shapes.items():
    if tuple(flat[key].shape) != shape:
      raise ValueError(f"{what}: {'/'.join(key)} has shape {tuple(flat[key].shape)}, "
                       f"the config says {shape}")
  return flat


def _leading(shape) -> tuple:
  return tuple(slice(0, n) for n in shape)


# The probe shape used to find which parameter axes follow which architecture field: every
# field has a distinct size, and each is bumped by one in turn (see _axis_fields).
_PROBE = Arch(depth=1, heads=2, hidden=5, intermediate=7, head_size=3)
_AXIS_FIELDS = ("hidden", "heads", "head_size", "intermediate")
# The arch-mask entry that masks an axis following a field.
_MASK_KEY = {"hidden": "hidden", "heads": "heads", "head_size": "head_dim",
             "intermediate": "ffn"}


def layer_of(key: tuple) -> int | None:
  """The encoder layer a parameter path belongs to, or None (embeddings, heads, pooler)."""
  # Encoder parameters live under encoder/layer_{i}/... (the layout of docs/INTERFACES.md).
  if len(key) > 1 and key[0] == "encoder" and key[1].startswith("layer_"):
    return int(key[1][len("layer_"):])
  return None


def _generic(key: tuple) -> tuple:
  return key[:1] + ("layer_*",) + key[2:] if layer_of(key) is not None else key


@functools.lru_cache(maxsize=64)
def _axis_fields(config: ModelConfig, head: HeadSpec) -> dict:
  """{generic path: per-axis arch field or None}, found by growing each field of a tiny probe.

  Deriving the table from the model itself (rather than listing rules per parameter name)
  keeps the masks right for any head layout the model gains.
  """
  probe = config.replace(arch=_PROBE)
  base = param_shapes(probe, head)
  fields = {key: [None] * len(shape) for key, shape in base.items()}
  for field in _AXIS_FIELDS:
    grown = param_shapes(
        probe.replace(arch=dataclasses.replace(_PROBE, **{field: getattr(_PROBE, field) + 1})),
        head)
    for key, shape in base.items():
      for axis, (a, b) in enumerate(zip(shape, grown[key])):
        if a != b:
          if fields[key][axis] is not None:
            raise ValueError(f"parameter {'/'.join(key)} axis {axis} follows both "
                             f"{fields[key][axis]} and {field}; it cannot be masked per unit")
          fields[key][axis] = field
  return {_generic(key): tuple(f) for key, f in fields.items()}


def axis_fields(config: ModelConfig, head: HeadSpec) -> dict:
  """{path: per-axis field} of ``config``'s parameters: the unit each axis follows.

  A field is "hidden", "heads", "head_size", "intermediate" or None (vocabulary, positions,
  classes); :mod:`core.inherit` permutes and slices parameters by it.
  """
  fields = _axis_fields(config.replace(arch=_PROBE), head)
  return {key: fields[_generic(key)] for key in param_shapes(config, head)}


def param_mask(padded: ModelConfig, arch: Arch | Mapping[str, jax.Array],
               head: HeadSpec = HeadSpec("mlm")) -> Params:
  """1 where a parameter of the smaller architecture lives inside the padded shape, else 0.

  Each axis of a parameter follows one architecture field (hidden, heads, head size,
  intermediate) or none (vocabulary, positions, classes); its mask is the outer product of the
  arch mask's vectors for those fields, times the layer's own entry for encoder parameters.
  Built from an arch mask, it is traceable: a compiled population program builds each member's
  mask from that member's (traced) arch mask.

  Args:
    padded: config of the padded shape.
    arch: the smaller architecture, or its arch mask (``make_arch_mask(padded.arch, arch)``,
      possibly traced).
    head: the head the parameters carry.

  Returns:
    A float32 pytree with the padded parameters' structure.
  """
  if isinstance(arch, Arch):  # concrete: numpy on the host, no eager device ops
    xp = np
    arch_mask = {k: np.asarray(v) for k, v in make_arch_mask(padded.arch, arch).items()}
  else:
    xp, arch_mask = jnp, arch
  fields = _axis_fields(padded.replace(arch=_PROBE), head)
  out = {}
  for key, shape in param_shapes(padded, head).items():
    layer = layer_of(key)
    mask = xp.ones((), xp.float32)
    for axis, (size, field) in enumerate(zip(shape, fields[_generic(key)])):
      if field is None:
        vector = xp.ones((size,), xp.float32)
      else:
        vector = xp.asarray(arch_mask[_MASK_KEY[field]], xp.float32)
        if vector.ndim == 2:  # per-layer rows: heads [D, A] and ffn [D, I]
          if layer is None:
            raise ValueError(f"{'/'.join(key)} follows {field} outside the encoder layers")
          vector = vector[layer]
      mask = mask[..., None] * vector.reshape((1,) * axis + (size,))
    if layer is not None:
      mask = mask * arch_mask["layers"][layer]
    out[key] = jnp.asarray(mask)
  return traverse_util.unflatten_dict(out)


def embed_params(small_params: Params, small_config: ModelConfig, padded_config: ModelConfig,
                 head: HeadSpec = HeadSpec("mlm")) -> Params:
  """Places a small model's parameters in the leading slices of a zero padded tree.

  Args:
    small_params: parameters of ``small_config``.
    small_config: the small model's config; must equal ``padded_config`` but for the arch.
    padded_config: the padded shape.
    head: the head both carry.

  Returns:
    Parameters of ``padded_config``; with ``make_arch_mask(padded.arch, small.arch)`` they
    compute the small model.
  """
  if small_config.replace(arch=padded_config.arch) != padded_config:
    raise ValueError("small_config and padded_config differ in more than the arch: "
                     f"{small_config} vs {padded_config}")
  _check_fits(padded_config.arch, small_config.arch)
  flat = check_layout(small_params, param_shapes(small_config, head), "small_params")
  return _embed_jit(flat, padded_config, head)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _embed_jit(flat, padded_config, head):
  out = {}
  for key, shape in param_shapes(padded_config, head).items():
    if key in flat:
      out[key] = jnp.pad(flat[key], [(0, n - m) for n, m in zip(shape, flat[key].shape)])
    else:  # a layer beyond the small depth
      out[key] = jnp.zeros(shape, jnp.float32)
  return traverse_util.unflatten_dict(out)


def slice_params(padded_params: Params, padded_config: ModelConfig, arch: Arch,
                 head: HeadSpec = HeadSpec("mlm")) -> Params:
  """Cuts the smaller ``arch``'s parameters (or gradients) out of a padded tree.

  Args:
    padded_params: a pytree shaped like ``padded_config``'s parameters.
    padded_config: the padded shape.
    arch: the architecture to extract.
    head: the head the parameters carry.

  Returns:
    Parameters of ``padded_config.replace(arch=arch)``.
  """
  flat = check_layout(padded_params, param_shapes(padded_config, head), "padded_params")
  return _slice_jit(flat, _small_config(padded_config, arch), head)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _slice_jit(flat, small_config, head):
  return traverse_util.unflatten_dict(
      {key: flat[key][_leading(shape)] for key, shape in param_shapes(small_config, head).items()})
