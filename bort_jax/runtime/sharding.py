"""The sharding layer: device mesh, logical axis rules, parameter shardings and global batches.

Parameters carry logical axis names (``embed``, ``heads``, ``kv``, ``mlp``, ``vocab``, ...; see
``model.logical_axes``). Rules in the config map them to the mesh axes ``data``, ``fsdp`` and
``model``. Parameters are born sharded: ``jax.eval_shape(init)`` gives shapes, the rules give
shardings, and ``jax.jit(init, out_shardings=...)`` materialises each shard where it lives, with
no full copy on one host. Every process loads only its rows of a global batch;
``global_batch`` assembles them into global arrays.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")

# Logical name -> mesh axes. Order matters: the first rule whose mesh axes are still free wins
# (flax semantics), so activations' ("batch", ..., "embed") put batch on (data, fsdp) and leave
# embed unsharded, while parameters' "embed" goes to fsdp. The vocabulary stays unsharded:
# RoBERTa's 50,265 rows divide by no even axis size.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "model"),
    ("mlp", "model"),
    ("kv", None),
    ("vocab", None),
    ("length", None),
    ("position", None),
    ("type", None),
    ("classes", None),
)


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None,
                                 local_device_ids: Sequence[int] | None = None) -> bool:
  """Initialises multi-process JAX when the arguments or the environment ask for it.

  Explicit arguments win; otherwise ``BORT_JAX_COORDINATOR``, ``BORT_JAX_NUM_PROCESSES`` and
  ``BORT_JAX_PROCESS_ID`` are read; on a Cloud TPU pod (``TPU_WORKER_HOSTNAMES`` names more
  than one host) JAX discovers everything itself. On CPU the gloo collectives are selected.

  Returns:
    True if ``jax.distributed.initialize`` was called.
  """
  coordinator_address = coordinator_address or os.environ.get("BORT_JAX_COORDINATOR")
  if num_processes is None and os.environ.get("BORT_JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["BORT_JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("BORT_JAX_PROCESS_ID"):
    process_id = int(os.environ["BORT_JAX_PROCESS_ID"])
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  on_tpu_pod = len([h for h in tpu_hosts.split(",") if h]) > 1
  if not coordinator_address and not on_tpu_pod:
    return False
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("a coordinator address needs num_processes and process_id too "
                       "(flags or BORT_JAX_NUM_PROCESSES / BORT_JAX_PROCESS_ID)")
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids)
  else:
    jax.distributed.initialize()
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def resolve_mesh_shape(mesh_shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fills the one ``-1`` axis so the mesh uses every device; checks the product.

  Args:
    mesh_shape: sizes for some of ``data``, ``fsdp``, ``model`` (missing axes are 1).
    num_devices: devices available.
  """
  unknown = set(mesh_shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
  sizes = {axis: int(mesh_shape.get(axis, 1)) for axis in MESH_AXES}
  fill = [axis for axis, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {fill}")
  if any(size == 0 or size < -1 for size in sizes.values()):
    raise ValueError(f"mesh axis sizes must be positive or -1, got {sizes}")
  known = math.prod(size for size in sizes.values() if size != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices do not divide into a mesh with fixed axes "
                       f"{ {a: s for a, s in sizes.items() if s != -1} }")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, "
                     f"but {num_devices} are available")
  return sizes


def make_mesh(mesh_shape: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, model) mesh with Auto axis types over all (or the given) devices."""
  devices = list(devices) if devices is not None else jax.devices()
  sizes = resolve_mesh_shape(mesh_shape or {"data": -1}, len(devices))
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
  """Normalises rules given as lists (from a ConfigDict or JSON) into flax's tuple form."""
  if rules is None:
    return DEFAULT_RULES
  out = []
  for rule in rules:
    name, axes = rule
    if isinstance(axes, list):
      axes = tuple(axes)
    out.append((str(name), axes))
  return tuple(out)


def logical_to_shardings(logical_specs: Any, mesh: Mesh,
                         rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
  """Maps a pytree of logical PartitionSpecs to NamedShardings on ``mesh``."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, tuple(rules))


def check_divisible(abstract: Any, shardings: Any, what: str = "parameter") -> None:
  """Raises a clear error when a sharded dimension is not divisible by its mesh axes.

  Called before compiling, so a shape the mesh cannot split is reported by name instead of by
  an XLA error deep inside a compile.
  """
  flat_abstract = jax.tree_util.tree_leaves_with_path(abstract)
  flat_shardings = jax.tree_util.tree_leaves(
      shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  if len(flat_abstract) != len(flat_shardings):
    raise ValueError(f"{what} tree and sharding tree differ in size "
                     f"({len(flat_abstract)} vs {len(flat_shardings)})")
  for (path, leaf), sharding in zip(flat_abstract, flat_shardings):
    mesh_sizes = dict(zip(sharding.mesh.axis_names, sharding.mesh.devices.shape))
    for dim, axes in enumerate(sharding.spec):
      if axes is None:
        continue
      axes = axes if isinstance(axes, tuple) else (axes,)
      parts = math.prod(mesh_sizes[a] for a in axes)
      if leaf.shape[dim] % parts:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        raise ValueError(
            f"{what} {name} has shape {tuple(leaf.shape)}: dimension {dim} of size "
            f"{leaf.shape[dim]} cannot be split over mesh axes {axes} ({parts} devices). "
            "Choose a mesh that divides it, or change the sharding rules.")


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batch dimension over (data, fsdp); the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """Checks the global batch divides over the batch axes and the processes.

  Returns:
    The rows each process loads.
  """
  parts = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch_size % parts:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                     f"{parts} devices of the mesh's batch axes (data x fsdp = "
                     f"{mesh.shape['data']} x {mesh.shape['fsdp']})")
  if global_batch_size % jax.process_count():
    raise ValueError(f"global batch size {global_batch_size} is not divisible by "
                     f"{jax.process_count()} processes")
  return global_batch_size // jax.process_count()


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays sharded over the batch axes.

  Process p holds rows ``[p * B / n, (p + 1) * B / n)`` of the global batch (the data
  pipeline's split), which is the order ``make_array_from_process_local_data`` expects.
  """
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    sharding = batch_sharding(mesh, value.ndim)
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def tree_shardings_like(tree: Any, params_treedef: Any, param_shardings: Any,
                        mesh: Mesh) -> Any:
  """Shardings for a tree (e.g. an optimizer state) that embeds copies of the params tree.

  Every subtree with the params' structure (Adam moments, ...) gets the params' shardings;
  every other leaf (step counters, scalars) is replicated.
  """
  def is_params_like(node):
    try:
      return jax.tree_util.tree_structure(node) == params_treedef
    except Exception:  # pylint: disable=broad-except
      return False

  def assign(node):
    if is_params_like(node):
      return param_shardings
    return replicated(mesh)

  return jax.tree_util.tree_map(assign, tree, is_leaf=is_params_like)


def host_get(tree: Any) -> Any:
  """Host copy of a pytree of global arrays (gathered across processes when needed)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier ``name`` (a no-op in one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)
