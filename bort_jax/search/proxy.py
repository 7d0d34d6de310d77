"""Population training: many candidate architectures trained for s proxy steps at once.

vmap needs equal shapes, so candidates are grouped into *buckets*. Inside a bucket every member
is padded to the bucket's shape (the elementwise maximum of depth, heads, head size, hidden and
intermediate) and carries an architecture mask (``masks.make_arch_mask``), so it computes
exactly what the unpadded model computes while its padded parameters stay zero: they start at
zero and get exactly zero gradient, and Adam turns a zero gradient into a zero update.

Choosing buckets trades compiles against wasted FLOPs. :func:`plan_buckets` makes the choice
explicit: it starts from one bucket per distinct shape and greedily merges the pair of buckets
whose merge adds the fewest padded FLOPs, while the population's padded FLOPs stay within
``max_overhead`` times the real ones (and buckets within ``max_members``). One bucket is one
compiled program that builds its members' initial weights, runs all s steps (``lax.scan``)
and scores the held-out batch; a bucket whose members all have the padded shape takes the
mask-free fast path. Programs are cached per (padded shape, members, mode, data shapes), and
``compile_workers > 1`` compiles every bucket's program ahead in threads.

Measured on the 2-core CPU (``benchmarks/extract.py``, results in
``benchmarks/results/extract_s3.json`` and ``extract_s30.json``: 72 candidates D1-4/A2,4/H64-256/
I128-512, vocab 8000, B=8, T=64): with ``max_overhead`` 1.5 the plan has 9 buckets at 1.48x
padded FLOPs, and the proxy phase at s=3 is 3.9x (map) / 3.7x (vmap) faster end to end than 72
programs compiled one after another, because compiling dominates (about 4-7 s a program against
about 0.3 s of running). At s=30 the padded FLOPs start to show and the gain falls to 2.7x (2.0x
on a loaded machine); past roughly 150 steps a tighter ``max_overhead`` is the better choice.

Inside a bucket the members run under ``jax.vmap`` (accelerators) or ``jax.lax.map`` (one at a
time inside the same program: on a small CPU vmap adds no throughput, see BASELINES.md, and
map keeps memory flat). With a mesh, vmapped members are sharded over its ``data`` axis
(filler members pad the population to a multiple of the axis; their results are dropped).

Determinism and exactness choices:
* A candidate's initial weights are the leading slices of one *master* initialisation of the
  largest shape of the search space (seeded). They do not depend on the bucket, so bucketing
  cannot change a candidate's proxy error, and a resumed run re-creates them exactly. The
  program receives the master cut to the bucket's shape once and multiplies it by each
  member's parameter mask, so no per-member weights cross from the host.
* Proxy steps run without dropout: dropout masks drawn at a padded shape would differ from
  the unpadded model's, and three steps gain nothing from it.
* The proxy optimizer is the distillation optimizer (Adam without bias correction, decoupled
  weight decay off LayerNorm and biases, optional clipping) at a constant learning rate; each
  member's theta (``lr``, ``weight_decay``) enters the program as data, so members with
  different thetas share one compile.
* The teacher's logits for each batch are computed once (by the caller, in :class:`ProxyData`)
  and shared by the whole population.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import heapq
import logging
import math
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from bort_jax.core import cost, losses, model, optim
from bort_jax.core import masks
from bort_jax.core.arch import Arch, ModelConfig
from bort_jax.core.model import MLM

THETA_KEYS = ("lr", "weight_decay")
MODES = ("vmap", "map", "auto")
_FIELDS = ("depth", "heads", "head_size", "hidden", "intermediate")


# ----------------------------------------------------------------------------- buckets


def padded_arch(archs: Sequence[Arch]) -> Arch:
  """The smallest shape that holds every arch: the elementwise maximum (head size included).

  Args:
    archs: at least one architecture.

  Returns:
    An ``Arch`` whose head size may differ from hidden / heads.
  """
  if not archs:
    raise ValueError("padded_arch of no architectures")
  return Arch(depth=max(a.depth for a in archs), heads=max(a.heads for a in archs),
              hidden=max(a.hidden for a in archs),
              intermediate=max(a.intermediate for a in archs),
              head_size=max(a.head_size for a in archs))


@dataclasses.dataclass(frozen=True)
class Bucket:
  """Members (indices into the caller's list) trained together at the ``padded`` shape."""

  padded: Arch
  members: tuple[int, ...]


def plan_buckets(archs: Sequence[Arch], flops: Callable[[Arch], float],
                 max_overhead: float = 1.5, max_members: int = 64,
                 min_buckets: int = 1) -> list[Bucket]:
  """Groups architectures into buckets, trading compiles against padded FLOPs.

  Greedy agglomeration: start with one bucket per distinct shape (split into chunks of
  ``max_members``); repeatedly merge the two buckets whose merge adds the fewest FLOPs
  (members x FLOPs of the padded shape), as long as the population's total stays within
  ``max_overhead`` x the unpadded total, the merged bucket has at most ``max_members`` members,
  and more than ``min_buckets`` buckets remain. Every merge saves one compile, so merging the
  cheapest first buys the most compiles for the FLOP budget. ``max_overhead=1`` merges only
  identical shapes: one program per distinct shape, the baseline.

  Args:
    archs: one entry per population member (repeats allowed, e.g. one per theta).
    flops: cost of one member at a shape (any positive cost; analytic FLOPs in practice).
    max_overhead: bound on padded / real FLOPs of the whole population (>= 1).
    max_members: bound on members per bucket (memory).
    min_buckets: stop merging at this many buckets.

  Returns:
    Buckets in a deterministic order (by padded FLOPs, then shape); members sorted.
  """
  if not max_overhead >= 1:
    raise ValueError(f"max_overhead must be >= 1, got {max_overhead}")
  if isinstance(max_members, bool) or int(max_members) < 1:
    raise ValueError(f"max_members must be a positive int, got {max_members!r}")
  if not archs:
    return []
  cache: dict[Arch, float] = {}

  def cost_of(shape: Arch) -> float:
    if shape not in cache:
      value = float(flops(shape))
      if not value > 0:
        raise ValueError(f"flops({shape}) must be positive, got {value}")
      cache[shape] = value
    return cache[shape]

  real = sum(cost_of(a) for a in archs)
  by_shape: dict[Arch, list[int]] = {}
  for index, arch in enumerate(archs):
    by_shape.setdefault(arch, []).append(index)
  # Ids are assigned in first-appearance order, which keeps the heap's tie-breaks stable.
  groups: dict[int, tuple[Arch, list[int]]] = {}
  for shape, members in by_shape.items():
    for start in range(0, len(members), max_members):
      groups[len(groups)] = (shape, members[start:start + max_members])
  total = sum(len(m) * cost_of(s) for s, m in groups.values())

  def merge_cost(a: int, b: int) -> float:
    (sa, ma), (sb, mb) = groups[a], groups[b]
    shape = padded_arch([sa, sb])
    return (len(ma) + len(mb)) * cost_of(shape) - len(ma) * cost_of(sa) - len(mb) * cost_of(sb)

  heap = []
  ids = sorted(groups)
  for x, a in enumerate(ids):
    for b in ids[x + 1:]:
      if len(groups[a][1]) + len(groups[b][1]) <= max_members:
        heap.append((merge_cost(a, b), a, b))
  heapq.heapify(heap)
  alive = set(groups)
  budget = max_overhead * real * (1 + 1e-12)
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
      if len(groups[other][1]) + len(groups[new][1]) <= max_members:
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


# ----------------------------------------------------------------------------- members


def check_theta(theta: Mapping[str, Any]) -> dict:
  """Validates a hyperparameter set: ``lr`` (required, > 0), ``weight_decay`` (default 0).

  Args:
    theta: a mapping with keys from ``THETA_KEYS``.

  Returns:
    ``{"lr": float, "weight_decay": float}``.
  """
  if not isinstance(theta, Mapping):
    raise ValueError(f"theta must be a mapping like {{'lr': 1e-4}}, got {theta!r}")
  unknown = set(theta) - set(THETA_KEYS)
  if unknown:
    raise ValueError(f"unknown hyperparameters {sorted(unknown)} in theta {dict(theta)}; "
                     f"proxy training understands {THETA_KEYS}")
  if "lr" not in theta:
    raise ValueError(f"theta {dict(theta)} needs a learning rate 'lr'")
  lr, wd = float(theta["lr"]), float(theta.get("weight_decay", 0.0))
  if not (math.isfinite(lr) and lr > 0):
    raise ValueError(f"theta {dict(theta)}: 'lr' must be a finite positive number")
  if not (math.isfinite(wd) and wd >= 0):
    raise ValueError(f"theta {dict(theta)}: 'weight_decay' must be finite and >= 0")
  return {"lr": lr, "weight_decay": wd}


def make_tx(optim_cfg: Mapping[str, Any]) -> Callable[[Any, Any], optax.GradientTransformation]:
  """The proxy optimizer as a function of a member's (lr, weight_decay).

  The two may be traced arrays: the chain is built inside the compiled program, so every
  member of a population carries its own theta without a recompile.

  Args:
    optim_cfg: ``name`` ("adam_nobc" or "adamw"), ``b1``, ``b2``, ``eps``, ``clip_norm``
      (0/None: no clipping). Other keys (a schedule's) are ignored: proxies use a constant lr.

  Returns:
    ``factory(lr, weight_decay) -> optax.GradientTransformation``.
  """
  name = optim_cfg.get("name", "adam_nobc")
  if name not in optim.OPTIMIZER_NAMES:
    raise ValueError(f"unknown optimizer {name!r} for proxy training; expected one of "
                     f"{optim.OPTIMIZER_NAMES}")
  b1, b2 = float(optim_cfg.get("b1", 0.9)), float(optim_cfg.get("b2", 0.999))
  eps = float(optim_cfg.get("eps", 1e-6))
  clip = float(optim_cfg.get("clip_norm", 0.0) or 0.0)

  def factory(lr, weight_decay):
    if name == "adam_nobc":
      adam = optim.scale_by_adam_no_bias_correction(b1, b2, eps)
    else:
      adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=0.0)
    parts = [optax.clip_by_global_norm(clip)] if clip else []
    parts += [adam, optax.add_decayed_weights(weight_decay, mask=optim.decay_mask),
              optax.scale_by_learning_rate(lr)]
    return optax.chain(*parts)

  return factory


def member_param_mask(config: ModelConfig, arch_mask: Mapping[str, jax.Array]) -> dict:
  """The parameter mask of one member, built from its architecture mask (traceable).

  Equals ``masks.param_mask(config, arch)`` for ``arch_mask = make_arch_mask(config.arch,
  arch)``, but works on traced masks, so a compiled program builds its members' weights itself.

  Args:
    config: the padded shape's config (MLM head; pooler and token types as configured).
    arch_mask: a member's mask dict (``layers``, ``heads``, ``head_dim``, ``hidden``, ``ffn``).

  Returns:
    A float32 pytree shaped like the padded parameters.
  """
  hid, hdim = arch_mask["hidden"], arch_mask["head_dim"]
  outer = lambda *vs: functools.reduce(jnp.multiply, [
      v.reshape((1,) * k + v.shape + (1,) * (len(vs) - k - 1)) for k, v in enumerate(vs)])
  flat = _flat_shapes(config)
  out = {}
  for path, shape in flat.items():
    if path[0] == "encoder":
      i = int(path[1].split("_")[1])
      layer, heads, ffn = arch_mask["layers"][i], arch_mask["heads"][i], arch_mask["ffn"][i]
      block, leaf = path[2:-1], path[-1]
      if block[0] == "attention" and block[1] in ("query", "key", "value"):
        mask = outer(hid, heads, hdim) if leaf == "kernel" else outer(heads, hdim)
      elif block == ("attention", "output") and leaf == "kernel":
        mask = outer(heads, hdim, hid)
      elif block == ("intermediate",):
        mask = outer(hid, ffn) if leaf == "kernel" else ffn
      elif block == ("output",) and leaf == "kernel":
        mask = outer(ffn, hid)
      else:  # output biases and the LayerNorms: [H]
        mask = hid
      mask = mask * layer
    elif path[-1] == "embedding":  # word, position and token-type tables: [rows, H]
      mask = outer(jnp.ones(shape[:1], jnp.float32), hid)
    elif path == ("mlm_head", "bias"):  # [V]
      mask = jnp.ones(shape, jnp.float32)
    elif len(shape) == 2:  # square H x H kernels: MLM head dense, pooler
      mask = outer(hid, hid)
    else:  # LayerNorm and dense biases: [H]
      mask = hid
    if tuple(mask.shape) != tuple(shape):
      raise ValueError(f"member_param_mask: no rule for parameter {'/'.join(path)} {shape}")
    out[path] = mask.astype(jnp.float32)
  return traverse_util.unflatten_dict(out)


@functools.lru_cache(maxsize=None)
def _flat_shapes(config: ModelConfig) -> dict:
  """{path: shape} of the MLM model's parameters, computed abstractly once per config."""
  abstract = jax.eval_shape(lambda r: model.init(r, config, MLM, 1), jax.random.key(0))
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract).items()}


def _leading_slice(flat_master: Mapping[tuple, np.ndarray], config: ModelConfig) -> dict:
  """The leading slices of a flat master tree at ``config``'s shape (host numpy, no copies)."""
  out = {}
  for path, shape in _flat_shapes(config).items():
    out[path] = flat_master[path][tuple(slice(0, n) for n in shape)]
  return out


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class ProxyData:
  """The s training batches (stacked on a leading step axis) and the held-out batch.

  Attributes:
    batches: pretraining-batch dict with a leading step axis: ``input_ids``,
      ``attention_mask`` (``token_type_ids``) [s, B, T]; ``masked_positions``,
      ``masked_labels``, ``masked_weights`` [s, B, P].
    heldout: one such batch without the step axis.
    teacher: the teacher's logits at the masked positions, [s, B, P, V]; None trains with the
      masked-LM loss alone.
    heldout_teacher: [B', P, V] for the held-out batch; needed when the error is "distill".
  """

  batches: dict
  heldout: dict
  teacher: Any = None
  heldout_teacher: Any = None

  @property
  def steps(self) -> int:
    return int(np.shape(self.batches["input_ids"])[0])

  def tree(self) -> tuple:
    """The arrays as one pytree (what a compiled program takes)."""
    return (self.batches, self.heldout, self.teacher, self.heldout_teacher)


_BATCH_KEYS = ("input_ids", "attention_mask", "masked_positions", "masked_labels",
               "masked_weights")
_MODEL_KEYS = _BATCH_KEYS + ("token_type_ids",)


@dataclasses.dataclass
class BucketStats:
  """What one bucket cost."""

  padded: str
  members: int
  masked: bool
  compiled: bool  # False when the program came from the cache
  compile_seconds: float
  run_seconds: float
  host_seconds: float
  padded_flops: float
  real_flops: float


# ----------------------------------------------------------------------------- the trainer


class PopulationTrainer:
  """Trains (arch, theta) pairs for s proxy steps and returns their held-out errors.

  Args:
    base: the family fields every candidate shares (vocabulary, positions, ...); its arch is
      replaced per candidate. Dropout is switched off.
    master_arch: the largest shape of the search space (head size included); candidates'
      initial weights are leading slices of one initialisation of it.
    loss_cfg: ``temperature``, ``alpha_kd``, ``alpha_mlm``, ``kind`` (as in distillation).
    optim_cfg: optimizer fields (``name``, ``b1``, ``b2``, ``eps``, ``clip_norm``); lr and
      weight decay come from each pair's theta.
    error: held-out error, "distill" (the distillation loss) or "mlm" (cross-entropy).
    mode: "vmap", "map" or "auto" (map on CPU, vmap elsewhere).
    max_overhead, max_members: bucket planning bounds (see :func:`plan_buckets`).
    mesh: optional mesh; in vmap mode, members are sharded over its ``data`` axis.
    seed: seed of the master initialisation.
    batch_size, seq_len, max_predictions: the proxy batch shape (B, T, P); used for the FLOP
      model and checked against the data.
    compile_workers: threads that compile bucket programs ahead of their run (1: compile
      each program just before it runs).
  """

  def __init__(self, base: ModelConfig, master_arch: Arch, loss_cfg: Mapping[str, Any],
               optim_cfg: Mapping[str, Any], error: str = "distill", mode: str = "auto",
               max_overhead: float = 1.5, max_members: int = 64, mesh=None, seed: int = 0,
               batch_size: int = 8, seq_len: int = 128, max_predictions: int = 20,
               compile_workers: int = 1):
    if error not in ("distill", "mlm"):
      raise ValueError(f"proxy error must be 'distill' or 'mlm', got {error!r}")
    if mode not in MODES:
      raise ValueError(f"population mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
      mode = "map" if jax.default_backend() == "cpu" else "vmap"
    if not max_overhead >= 1:
      raise ValueError(f"max_overhead must be >= 1, got {max_overhead}")
    if isinstance(max_members, bool) or int(max_members) < 1:
      raise ValueError(f"max_members must be a positive int, got {max_members!r}")
    if mesh is not None and "data" not in mesh.shape:
      raise ValueError(f"the mesh needs a 'data' axis to shard populations, has {mesh.shape}")
    self.base = base.replace(dropout=0.0, attention_dropout=0.0)
    self.master_config = self.base.replace(arch=master_arch)
    self.loss_cfg = {"temperature": 2.0, "alpha_kd": 0.5, "alpha_mlm": 0.1, "kind": "kl",
                     **dict(loss_cfg)}
    self.tx_factory = make_tx(dict(optim_cfg))
    self.error, self.mode, self.mesh = error, mode, mesh
    self.max_overhead, self.max_members = float(max_overhead), int(max_members)
    if isinstance(compile_workers, bool) or int(compile_workers) < 1:
      raise ValueError(f"compile_workers must be a positive int, got {compile_workers!r}")
    self.compile_workers = int(compile_workers)
    self.seed = seed
    self._shape = (int(batch_size), int(seq_len), int(max_predictions))
    self._master = None
    self._flops: dict[Arch, float] = {}
    self._compiled: dict[tuple, Any] = {}
    self._device_data: tuple[int, Any] | None = None
    self.stats: list[BucketStats] = []

  # -- costs and plans

  def flops(self, arch: Arch) -> float:
    """Analytic FLOPs of one member's proxy step (forward + backward ~ 3 x forward)."""
    if arch not in self._flops:
      b, t, p = self._shape
      self._flops[arch] = 3.0 * cost.forward_flops(
          self.base.replace(arch=arch), b, t, head="mlm", masked_predictions=p)["total"]
    return self._flops[arch]

  def plan(self, pairs: Sequence[tuple[Arch, Mapping]]) -> list[Bucket]:
    """Buckets for (arch, theta) pairs under this trainer's bounds (pairs are checked)."""
    self._check_pairs(pairs)
    return plan_buckets([a for a, _ in pairs], self.flops, self.max_overhead, self.max_members)

  def group(self, pairs: Sequence[tuple[Arch, Mapping]]) -> list[list[int]]:
    """The plan as lists of pair indices (``fptas.run_fptas(group=...)``); train each list
    with ``train_and_eval(..., one_bucket=True)`` so it is not re-planned."""
    return [list(b.members) for b in self.plan(pairs)]

  def _check_pairs(self, pairs):
    master = self.master_config.arch
    for arch, theta in pairs:
      if not isinstance(arch, Arch):
        raise ValueError(f"a proxy candidate must be an Arch, got {arch!r}")
      for field in _FIELDS:
        if getattr(arch, field) > getattr(master, field):
          raise ValueError(f"candidate {arch} exceeds the master shape {master} in {field} "
                           f"({getattr(arch, field)} > {getattr(master, field)}); the master "
                           "must hold every candidate of the search space")
      check_theta(theta)

  # -- parameters

  @property
  def master(self) -> dict:
    """Flat {path: numpy array} of the master initialisation (host memory, made once)."""
    if self._master is None:
      init = jax.jit(lambda r: model.init(r, self.master_config, MLM))
      params = jax.device_get(init(jax.random.key(self.seed)))
      self._master = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    return self._master

  def initial_params(self, arch: Arch) -> dict:
    """A candidate's initial weights at its own shape (leading slices of the master)."""
    self._check_pairs([(arch, {"lr": 1.0})])
    flat = _leading_slice(self.master, self.base.replace(arch=arch))
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})

  # -- the compiled program of one bucket

  def _loss(self, config: ModelConfig, masked: bool):
    cfg = self.loss_cfg

    def loss(params, arch_mask, batch, teacher_logits, kind):
      inputs = {k: batch[k] for k in _MODEL_KEYS if k in batch}
      out = model.apply(params, config, inputs, head=MLM, arch_mask=arch_mask if masked else None)
      labels, weights = batch["masked_labels"], batch["masked_weights"]
      if kind == "mlm" or teacher_logits is None:
        return losses.safe_divide(*losses.mlm_loss(out["logits"], labels, weights))
      value, _ = losses.distillation_loss(
          out["logits"], teacher_logits, labels, weights, temperature=cfg["temperature"],
          alpha_kd=cfg["alpha_kd"], alpha_mlm=cfg["alpha_mlm"], kind=cfg["kind"])
      return value

    return loss

  def _member_fn(self, config: ModelConfig, masked: bool, return_params: bool):
    """One member: build its weights, run s steps, score the held-out batch."""
    loss = self._loss(config, masked)
    factory, error = self.tx_factory, self.error

    def member(master, arch_mask, lr, weight_decay, data):
      batches, heldout, teacher, heldout_teacher = data
      params = master
      if masked:
        params = jax.tree.map(jnp.multiply, master, member_param_mask(config, arch_mask))
      tx = factory(lr, weight_decay)

      def step(carry, xs):
        params, opt_state = carry
        batch, teacher_logits = xs
        value, grads = jax.value_and_grad(loss)(params, arch_mask, batch, teacher_logits,
                                                "distill")
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

      (params, _), train_losses = jax.lax.scan(step, (params, tx.init(params)),
                                               (batches, teacher))
      held = loss(params, arch_mask, heldout, heldout_teacher, error)
      return (params, train_losses, held) if return_params else (train_losses, held)

    return member

  def _sharded(self) -> bool:
    return self.mesh is not None and self.mode == "vmap" and self.mesh.shape["data"] > 1

  def _jit(self, padded: Arch, masked: bool, return_params: bool):
    member = self._member_fn(self.base.replace(arch=padded), masked, return_params)
    mode = self.mode

    def population(master, arch_mask, lr, weight_decay, data):
      if mode == "vmap":
        return jax.vmap(member, in_axes=(None, 0, 0, 0, None))(
            master, arch_mask, lr, weight_decay, data)
      return jax.lax.map(lambda x: member(master, *x, data), (arch_mask, lr, weight_decay))

    if not self._sharded():
      return jax.jit(population)
    P = jax.sharding.PartitionSpec
    rows = jax.sharding.NamedSharding(self.mesh, P("data"))
    repl = jax.sharding.NamedSharding(self.mesh, P())
    return jax.jit(population, in_shardings=(repl, rows, rows, rows, repl), out_shardings=rows)

  def _put_data(self, data: ProxyData):
    """The data on the device(s), converted once per ProxyData object."""
    if self._device_data is None or self._device_data[0] is not data:
      tree = data.tree()
      if self._sharded():
        repl = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        tree = jax.device_put(tree, repl)
      else:
        tree = jax.device_put(tree)
      self._device_data = (data, tree)
    return self._device_data[1]

  def check_data(self, data: ProxyData) -> None:
    """Raises a clear error when the data does not fit this trainer's shapes."""
    if not isinstance(data, ProxyData):
      raise ValueError(f"data must be a ProxyData, got {type(data).__name__}")
    b, t, p = self._shape
    s = data.steps
    want = {k: (s, b, t) for k in ("input_ids", "attention_mask")}
    want.update({k: (s, b, p) for k in _BATCH_KEYS[2:]})
    for key, shape in want.items():
      if key not in data.batches:
        raise ValueError(f"proxy batches lack {key!r} (have {sorted(data.batches)})")
      if tuple(np.shape(data.batches[key])) != shape:
        raise ValueError(f"proxy batches[{key!r}] has shape {np.shape(data.batches[key])}, "
                         f"expected [s, B, .] = {shape} (trainer batch_size={b}, "
                         f"seq_len={t}, max_predictions={p})")
    for key in _BATCH_KEYS:
      if key not in data.heldout:
        raise ValueError(f"held-out batch lacks {key!r} (have {sorted(data.heldout)})")
    vocab = self.base.vocab_size
    if data.teacher is not None:
      shape = tuple(np.shape(data.teacher))
      if shape != (s, b, p, vocab):
        raise ValueError(f"teacher logits have shape {shape}, expected [s, B, P, V] = "
                         f"{(s, b, p, vocab)}: the teacher's vocabulary must be the student's")
    needs_heldout = self.error == "distill" and data.teacher is not None
    if needs_heldout and data.heldout_teacher is None:
      raise ValueError("error='distill' needs heldout_teacher (the teacher's held-out logits)")
    if data.heldout_teacher is not None:
      shape = tuple(np.shape(data.heldout_teacher))
      want = tuple(np.shape(data.heldout["masked_positions"])) + (vocab,)
      if shape != want:
        raise ValueError(f"held-out teacher logits have shape {shape}, expected {want}")

  # -- public

  def _prepare(self, bucket: Bucket, archs: Sequence[Arch], thetas: Sequence[Mapping],
               data: ProxyData, return_params: bool) -> dict:
    """Host work of one bucket: checks, member masks and thetas, the master cut, cache key."""
    t0 = time.perf_counter()
    members = [archs[m] for m in bucket.members]
    if not members:
      raise ValueError("an empty bucket")
    self._check_pairs([(archs[m], thetas[m]) for m in bucket.members])
    for arch in members:
      for field in _FIELDS:
        if getattr(arch, field) > getattr(bucket.padded, field):
          raise ValueError(f"bucket shape {bucket.padded} does not hold member {arch}")
    masked = any(a != bucket.padded for a in members)
    k = len(members)
    pad_to = k
    if self._sharded():
      pad_to = -(-k // self.mesh.shape["data"]) * self.mesh.shape["data"]
    order = list(range(k)) + [0] * (pad_to - k)  # filler members repeat member 0
    theta = [check_theta(thetas[bucket.members[j]]) for j in order]
    lr = np.asarray([t["lr"] for t in theta], np.float32)
    wd = np.asarray([t["weight_decay"] for t in theta], np.float32)
    if masked:
      member_masks = [masks.make_arch_mask(bucket.padded, members[j]) for j in order]
      arch_mask = {key: np.stack([np.asarray(m[key]) for m in member_masks]) for key in member_masks[0]}
    else:
      arch_mask = np.zeros((pad_to,), np.float32)  # unused by the mask-free path
    master = traverse_util.unflatten_dict(
        _leading_slice(self.master, self.base.replace(arch=bucket.padded)))
    device_data = self._put_data(data)
    args = (master, arch_mask, lr, wd, device_data)
    if self._sharded():
      P = jax.sharding.PartitionSpec
      rows = jax.sharding.NamedSharding(self.mesh, P("data"))
      repl = jax.sharding.NamedSharding(self.mesh, P())
      args = (jax.device_put(master, repl), jax.device_put(arch_mask, rows),
              jax.device_put(lr, rows), jax.device_put(wd, rows), device_data)
    # The data's shapes are part of the key: a program compiled for s=3 cannot run s=30.
    signature = str(jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), device_data))
    key = (bucket.padded, masked, pad_to, self.mode, return_params, signature)
    return {"bucket": bucket, "members": members, "masked": masked, "k": k, "args": args,
            "key": key, "return_params": return_params, "steps": data.steps,
            "host_seconds": time.perf_counter() - t0}

  def _compile(self, job: dict) -> tuple[Any, float]:
    """Lowers and compiles a job's program; returns (executable, seconds)."""
    t0 = time.perf_counter()
    compiled = self._jit(job["bucket"].padded, job["masked"], job["return_params"]).lower(
        *job["args"]).compile()
    return compiled, time.perf_counter() - t0

  def _execute(self, job: dict, compiled, fresh: bool, compile_seconds: float):
    t0 = time.perf_counter()
    out = jax.device_get(compiled(*job["args"]))
    run_seconds = time.perf_counter() - t0
    k, bucket, s = job["k"], job["bucket"], job["steps"]
    self.stats.append(BucketStats(
        padded=str(bucket.padded), members=k, masked=job["masked"], compiled=fresh,
        compile_seconds=compile_seconds, run_seconds=run_seconds,
        host_seconds=job["host_seconds"], padded_flops=k * self.flops(bucket.padded) * s,
        real_flops=sum(self.flops(a) for a in job["members"]) * s))
    if job["return_params"]:
      params, train_losses, errors = out
      params = jax.tree.map(lambda x: x[:k], params)
      return params, np.asarray(train_losses)[:k], np.asarray(errors)[:k]
    train_losses, errors = out
    return np.asarray(train_losses)[:k], np.asarray(errors)[:k]

  def train_bucket(self, bucket: Bucket, archs: Sequence[Arch], thetas: Sequence[Mapping],
                   data: ProxyData, return_params: bool = False):
    """Trains one bucket.

    Args:
      bucket: the padded shape and the member indices into ``archs`` / ``thetas``.
      archs, thetas: the population.
      data: the proxy batches.
      return_params: also return the members' final padded parameters (for tests).

    Returns:
      ``(train_losses [K, s], errors [K])`` as numpy, K = len(bucket.members), plus the final
      padded parameters (a pytree with a leading K axis) first when ``return_params``.
    """
    self.check_data(data)
    job = self._prepare(bucket, archs, thetas, data, return_params)
    compiled, seconds = self._compiled.get(job["key"]), 0.0
    fresh = compiled is None
    if fresh:
      compiled, seconds = self._compile(job)
      self._compiled[job["key"]] = compiled
    return self._execute(job, compiled, fresh, seconds)

  def train_and_eval(self, pairs: Sequence[tuple[Arch, Mapping]], data: ProxyData,
                     buckets: Sequence[Bucket] | None = None,
                     one_bucket: bool = False) -> list[float]:
    """Proxy errors of (arch, theta) pairs, in order.

    With ``compile_workers > 1`` every bucket's program is compiled ahead in a thread pool
    (XLA compiles outside the GIL), overlapping compiles with each other and with the runs of
    earlier buckets; the results are the same.

    Args:
      pairs: (candidate, theta) pairs; a candidate may appear under several thetas.
      data: the proxy batches (shared by every pair).
      buckets: an explicit plan over ``pairs``; None plans with :meth:`plan`.
      one_bucket: train all pairs in one bucket (a group from :meth:`group`).

    Returns:
      The held-out error of each pair (a float; non-finite when the proxy diverged).
    """
    pairs = list(pairs)
    self._check_pairs(pairs)
    self.check_data(data)
    if not pairs:
      return []
    archs = [a for a, _ in pairs]
    thetas = [t for _, t in pairs]
    if one_bucket:
      buckets = [Bucket(padded_arch(archs), tuple(range(len(pairs))))]
    elif buckets is None:
      buckets = self.plan(pairs)
    covered = sorted(m for b in buckets for m in b.members)
    if covered != list(range(len(pairs))):
      raise ValueError("buckets must cover every pair exactly once")
    jobs = [self._prepare(b, archs, thetas, data, False) for b in buckets]
    futures = {}
    pool = None
    if self.compile_workers > 1:
      pool = concurrent.futures.ThreadPoolExecutor(self.compile_workers)
      for job in jobs:
        if job["key"] not in self._compiled and job["key"] not in futures:
          futures[job["key"]] = pool.submit(self._compile, job)
    errors = [math.nan] * len(pairs)
    try:
      for job in jobs:
        key, seconds, fresh = job["key"], 0.0, True
        if key in futures:
          self._compiled[key], seconds = futures.pop(key).result()
        elif key not in self._compiled:
          self._compiled[key], seconds = self._compile(job)
        else:
          fresh = False
        _, errs = self._execute(job, self._compiled[key], fresh, seconds)
        for index, e in zip(job["bucket"].members, errs):
          errors[index] = float(e)
        logging.info("proxy bucket %s: %d members, compile %.1fs run %.1fs",
                     job["bucket"].padded, job["k"], seconds, self.stats[-1].run_seconds)
    finally:
      if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)
    return errors

  def ledger(self) -> dict:
    """Compile count and time, run time and FLOPs spent so far (JSON-able)."""
    padded = sum(s.padded_flops for s in self.stats)
    real = sum(s.real_flops for s in self.stats)
    return {
        "buckets_trained": len(self.stats),
        "compiles": sum(s.compiled for s in self.stats),
        "compile_seconds": sum(s.compile_seconds for s in self.stats),
        "run_seconds": sum(s.run_seconds for s in self.stats),
        "host_seconds": sum(s.host_seconds for s in self.stats),
        "padded_flops": padded, "real_flops": real,
        "padding_overhead": padded / real if real else None,
        "mode": self.mode,
        "buckets": [dataclasses.asdict(s) for s in self.stats],
    }
