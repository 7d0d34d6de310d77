"""Bucket planning for population training: which candidates share one compiled program.

A pure algorithm (no JAX): it sees architectures and a cost function only, so it can be tested
and reasoned about without a device.

vmap needs equal shapes, so the population trainer (``search/proxy.py``) pads every member of a
bucket to the bucket's shape, the elementwise maximum of depth, heads, head size, hidden and
intermediate (:func:`padded_arch`). Choosing buckets trades compiles against wasted FLOPs.
:func:`plan_buckets` makes the choice explicit: it starts from one bucket per distinct shape and
greedily merges the pair of buckets whose merge adds the fewest padded FLOPs, while the
population's padded FLOPs stay within ``max_overhead`` times the real ones (and buckets within
``max_members``). Every merge saves one compile, so merging the cheapest first buys the most
compiles for the FLOP budget.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Callable, Sequence

from bort_jax.core.arch import Arch

FIELDS = ("depth", "heads", "head_size", "hidden", "intermediate")
"""The architecture fields a padded shape must hold."""


def padded_arch(archs: Sequence[Arch]) -> Arch:
  """The smallest shape that holds every arch: the elementwise maximum (head size included).

  Args:
    archs: at least one architecture.

  Returns:
    An ``Arch`` whose head size may differ from hidden / heads.
  """
  if not archs:
    raise ValueError("padded_arch of no architectures")
  return Arch(**{field: max(getattr(a, field) for a in archs) for field in FIELDS})


def exceeded_field(arch: Arch, outer: Arch) -> str | None:
  """The first field in which ``arch`` is larger than ``outer``, or None when ``outer`` holds it.

  Args:
    arch: the inner shape.
    outer: the shape that should hold it.

  Returns:
    A name from :data:`FIELDS`, or None.
  """
  for field in FIELDS:
    if getattr(arch, field) > getattr(outer, field):
      return field
  return None


def check_bounds(max_overhead: float, max_members: int) -> tuple[float, int]:
  """Validates the planning bounds (the one place they are checked).

  Args:
    max_overhead: bound on padded / real FLOPs of the whole population (>= 1).
    max_members: bound on members per bucket (a positive int).

  Returns:
    ``(float(max_overhead), int(max_members))``.
  """
  if not max_overhead >= 1:
    raise ValueError(f"max_overhead must be >= 1, got {max_overhead}")
  if isinstance(max_members, bool) or int(max_members) < 1:
    raise ValueError(f"max_members must be a positive int, got {max_members!r}")
  return float(max_overhead), int(max_members)


@dataclasses.dataclass(frozen=True)
class Bucket:
  """Members (indices into the caller's list) trained together at the ``padded`` shape."""

  padded: Arch
  members: tuple[int, ...]


class _Costs:
  """flops() with a cache and a positivity check (each shape is costed once)."""

  def __init__(self, flops: Callable[[Arch], float]):
    self._flops, self._cache = flops, {}

  def __call__(self, shape: Arch) -> float:
    if shape not in self._cache:
      value = float(self._flops(shape))
      if not value > 0:
        raise ValueError(f"flops({shape}) must be positive, got {value}")
      self._cache[shape] = value
    return self._cache[shape]


def _initial_groups(archs: Sequence[Arch], max_members: int) -> dict[int, tuple[Arch, list[int]]]:
  """One group per distinct shape, cut into chunks of ``max_members``.

  Ids are assigned in first-appearance order, which keeps the heap's tie-breaks stable.
  """
  by_shape: dict[Arch, list[int]] = {}
  for index, arch in enumerate(archs):
    by_shape.setdefault(arch, []).append(index)
  groups: dict[int, tuple[Arch, list[int]]] = {}
  for shape, members in by_shape.items():
    for start in range(0, len(members), max_members):
      groups[len(groups)] = (shape, members[start:start + max_members])
  return groups


def plan_buckets(archs: Sequence[Arch], flops: Callable[[Arch], float],
                 max_overhead: float = 1.5, max_members: int = 64,
                 min_buckets: int = 1) -> list[Bucket]:
  """Groups architectures into buckets, trading compiles against padded FLOPs.

  Greedy agglomeration: start with one bucket per distinct shape (split into chunks of
  ``max_members``); repeatedly merge the two buckets whose merge adds the fewest FLOPs
  (members x FLOPs of the padded shape), as long as the population's total stays within
  ``max_overhead`` x the unpadded total, the merged bucket has at most ``max_members`` members,
  and more than ``min_buckets`` buckets remain. ``max_overhead=1`` merges only identical
  shapes: one program per distinct shape, the baseline.

  Args:
    archs: one entry per population member (repeats allowed, e.g. one per theta).
    flops: cost of one member at a shape (any positive cost; analytic FLOPs in practice).
    max_overhead: bound on padded / real FLOPs of the whole population (>= 1).
    max_members: bound on members per bucket (memory).
    min_buckets: stop merging at this many buckets.

  Returns:
    Buckets in a deterministic order (by padded FLOPs, then shape); members sorted.
  """
  max_overhead, max_members = check_bounds(max_overhead, max_members)
  if not archs:
    return []
  cost_of = _Costs(flops)
  groups = _initial_groups(archs, max_members)
  total = sum(len(m) * cost_of(s) for s, m in groups.values())
  budget = max_overhead * sum(cost_of(a) for a in archs) * (1 + 1e-12)

  def merge_cost(a: int, b: int) -> float:
    (sa, ma), (sb, mb) = groups[a], groups[b]
    shape = padded_arch([sa, sb])
    return (len(ma) + len(mb)) * cost_of(shape) - len(ma) * cost_of(sa) - len(mb) * cost_of(sb)

  fits = lambda a, b: len(groups[a][1]) + len(groups[b][1]) <= max_members
  ids = sorted(groups)
  heap = [(merge_cost(a, b), a, b) for x, a in enumerate(ids) for b in ids[x + 1:] if fits(a, b)]
  heapq.heapify(heap)
  alive = set(groups)
  while heap and len(alive) > min_buckets:
    added, a, b = heapq.heappop(heap)
    if a not in alive or b not in alive:
      continue  # a stale pair: one side was merged already
    if total + added > budget:
      break  # the cheapest live merge breaks the bound, so every other one does too
    new = max(groups) + 1
    groups[new] = (padded_arch([groups[a][0], groups[b][0]]), groups[a][1] + groups[b][1])
    alive -= {a, b}
    total += added
    for other in sorted(alive):
      if fits(other, new):
        heapq.heappush(heap, (merge_cost(other, new), other, new))
    alive.add(new)
  buckets = [Bucket(groups[g][0], tuple(sorted(groups[g][1]))) for g in alive]
  return sorted(buckets, key=lambda b: (cost_of(b.padded), str(b.padded), b.members))


def padding_overhead(buckets: Sequence[Bucket], archs: Sequence[Arch],
                     flops: Callable[[Arch], float]) -> float:
  """Padded FLOPs of the buckets over the FLOPs of the members' own shapes.

  Args:
    buckets: a plan over ``archs``.
    archs: the population.
    flops: cost of one member at a shape.

  Returns:
    sum over buckets of members x flops(padded), divided by sum of flops(arch).
  """
  padded = sum(len(b.members) * flops(b.padded) for b in buckets)
  return padded / sum(flops(archs[m]) for b in buckets for m in b.members)
