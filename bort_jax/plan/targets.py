"""The machines a run can be planned for, and their devices without the machines.

One table, :data:`TARGETS`, holds each target's per-device memory, peak bf16 FLOP/s and
interconnect, with the date each figure was checked against its vendor's page. A TPU target's
devices come from libtpu's compile-only topology (``jax.experimental.topologies``): the TPU
compiler itself compiles for them, so its memory verdict is the real one. A GPU target cannot
be compiled without its GPUs: it is planned on a simulated CPU mesh of the same size, and every
figure of its plan is labelled an estimate.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

GIB = 1024 ** 3
CHECKED = "2026-12-07"

# Topology names that libtpu's compile-only client accepts. A device is a chip, as on the real
# slice: v5e has one TensorCore per chip; v4's and v5p's two run as one device (megacore, which
# v4's compile-only topology must be asked for).


@dataclasses.dataclass(frozen=True)
class Target:
  """One machine or slice a run can be planned for.

  Attributes:
    name: what ``--target`` takes.
    platform: "tpu", "gpu" or "cpu".
    devices: devices of the slice (what ``jax.devices()`` lists there).
    chips: chips billed (chip-hours count these).
    memory_per_device: bytes of accelerator memory per device.
    peak_flops_per_device: peak dense bf16 FLOP/s per device.
    interconnect: the chip-to-chip link, in words.
    topology: the compile-only topology name (TPU), else "".
    source: where the figures were read, on :data:`CHECKED`.
    options: keyword options of the compile-only topology.
  """

  name: str
  platform: str
  devices: int
  chips: int
  memory_per_device: int
  peak_flops_per_device: float
  interconnect: str
  topology: str = ""
  source: str = ""
  options: tuple = ()

  @property
  def estimate(self) -> bool:
    """True when the plan is not the target's own compiler's (GPU targets)."""
    return self.platform == "gpu"


_TPU_DOCS = "Cloud TPU system architecture pages (cloud.google.com/tpu/docs)"
_NVIDIA = "NVIDIA's A100 / H100 SXM datasheets (dense bf16, no sparsity)"

TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("v5e-4", "tpu", 4, 4, 16 * GIB, 197e12, "ICI 1,600 Gbps per chip, 2D torus",
           "v5e:2x2", _TPU_DOCS),
    Target("v5e-8", "tpu", 8, 8, 16 * GIB, 197e12, "ICI 1,600 Gbps per chip, 2D torus",
           "v5e:2x4", _TPU_DOCS),
    Target("v5e-64", "tpu", 64, 64, 16 * GIB, 197e12, "ICI 1,600 Gbps per chip, 2D torus",
           "v5e:8x8", _TPU_DOCS),
    Target("v4-32", "tpu", 16, 16, 32 * GIB, 275e12, "ICI 2,400 Gbps per chip, 3D torus",
           "v4:2x2x4", _TPU_DOCS, (("chip_config_name", "megacore"),)),
    Target("v5p-128", "tpu", 64, 64, 95 * GIB, 459e12, "ICI 4,800 Gbps per chip, 3D torus",
           "v5p:4x4x4", _TPU_DOCS),
    Target("a100-80g-x8", "gpu", 8, 8, 80 * GIB, 312e12, "NVLink 600 GB/s per GPU", "",
           _NVIDIA),
    Target("h100-x8", "gpu", 8, 8, 80 * GIB, 989e12, "NVLink 900 GB/s per GPU", "", _NVIDIA),
)}
# "cpu" is this machine's CPU devices as the run would see them: no table row (its memory is
# the host's, its peak is measured), made by :func:`cpu_target`.
NAMES = tuple(TARGETS) + ("cpu",)


class MissingExtraError(ValueError):
  """A TPU target without libtpu: one line naming the extra (exit 2)."""


def resolve(name: str) -> Target:
  """The :class:`Target` ``--target`` names (``cpu`` built from this host).

  Raises:
    ValueError: an unknown name, with the known ones.
  """
  if name == "cpu":
    return cpu_target()
  if name not in TARGETS:
    raise ValueError(f"--target={name!r} is not a known target; known: {', '.join(NAMES)}")
  return TARGETS[name]


def cpu_target(devices: int | None = None) -> Target:
  """This host's CPU devices: memory is the host's RAM shared by the devices, the peak is
  :func:`measured_cpu_peak` shared by them (a simulated mesh runs on the same cores)."""
  import jax  # pylint: disable=import-outside-toplevel
  n = devices or len(jax.devices("cpu"))
  total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return Target("cpu", "cpu", n, 1, total // n, measured_cpu_peak() / n,
                "host memory (simulated devices share the host's cores)", "",
                "this host: RAM from sysconf, peak from a float32 matmul timed now")


@functools.lru_cache(maxsize=None)
def measured_cpu_peak(size: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of a float32 ``size`` x ``size`` matmul on one CPU device, the best of a few
  calls: the CPU's attainable peak, against which its MFU is stated."""
  import time  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  device = jax.devices("cpu")[0]
  x = jax.device_put(jnp.ones((size, size), jnp.float32), device)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * size ** 3 / best


def _quiet_libtpu() -> None:
  """libtpu looks for a TPU VM's metadata on first use and prints warnings when there is
  none; a planning machine has none, so the answers it would look up are given (the package
  does this on import off a TPU VM; a real TPU VM's own variables are kept)."""
  import bort_jax  # pylint: disable=import-outside-toplevel
  for key, value in bort_jax.TPU_QUIET_ENV:
    os.environ.setdefault(key, value)


def devices_of(target: Target) -> Sequence:
  """The target's devices: compile-only TPU devices, or this host's CPU devices.

  Raises:
    MissingExtraError: a TPU target without libtpu installed.
    ValueError: a GPU or CPU target needing more CPU devices than this process has.
  """
  import jax  # pylint: disable=import-outside-toplevel
  if target.platform == "tpu":
    import importlib.util  # pylint: disable=import-outside-toplevel
    if importlib.util.find_spec("libtpu") is None:
      raise MissingExtraError(
          f"--target={target.name} compiles with the TPU compiler, which comes with libtpu: "
          "pip install -e '.[plan]' (jax[tpu] at this project's jax version), then run the "
          "dry run again")
    _quiet_libtpu()
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    return list(topologies.get_topology_desc(target.topology, "tpu",
                                             **dict(target.options)).devices)
  have = jax.devices("cpu")
  if len(have) < target.devices:
    raise ValueError(
        f"--target={target.name} is planned on {target.devices} simulated CPU devices but this "
        f"process has {len(have)}; bort-jax sets them itself when --dry-run comes before JAX "
        "starts (set XLA_FLAGS=--xla_force_host_platform_device_count="
        f"{target.devices} when calling it from Python)")
  return list(have[:target.devices])
