"""Padded shapes: one parameter tree computing a smaller architecture.

A candidate inside a larger (padded) shape keeps its weights in the leading slices of every
matrix; the architecture masks switch off the rest (whole layers, heads, head dimensions, hidden
units with LayerNorm statistics over the active ones only, FFN units). This module owns the
parameter shape table of a config, the masks, and moving weights into and out of a padded tree.
"""

from __future__ import annotations

import functools

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


def param_mask(padded: ModelConfig, arch: Arch, head: HeadSpec = HeadSpec("mlm")) -> Params:
  """1 where a parameter of the smaller ``arch`` lives inside the padded shape, else 0.

  Args:
    padded: config of the padded shape.
    arch: the smaller architecture.
    head: the head the parameters carry.

  Returns:
    A float32 pytree with the padded parameters' structure.
  """
  small = param_shapes(_small_config(padded, arch), head)
  out = {}
  for key, shape in param_shapes(padded, head).items():
    mask = np.zeros(shape, np.float32)
    if key in small:  # layers beyond the small depth are absent and stay all zero
      mask[_leading(small[key])] = 1.0
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
