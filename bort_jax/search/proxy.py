"""Population training: many candidate architectures trained for s proxy steps at once.

The FPTAS (``search/fptas.py``) asks for the proxy errors of many (architecture, theta) pairs;
:class:`PopulationTrainer` trains them in *buckets* planned by ``search/buckets.py``. Inside a
bucket every member is padded to the bucket's shape and carries an architecture mask
(``core/masks.make_arch_mask``), so it computes exactly what the unpadded model computes while
its padded parameters stay zero: they start at zero and get exactly zero gradient, and Adam
turns a zero gradient into a zero update. One bucket is one compiled program that builds its
members' initial weights, runs all s steps (``lax.scan``) and scores the held-out batch; a
bucket whose members all have the padded shape takes the mask-free fast path. Programs are
cached per (padded shape, members, mode, data shapes), and ``compile_workers > 1`` compiles
every bucket's program ahead in threads.

The trainer takes everything it needs as arguments: the student's base config, the largest
shape, the loss and optimizer fields and, in :class:`ProxyData`, the batches with the teacher's
logits already computed. It imports nothing from ``pipelines/``; the extraction pipeline
(``pipelines/extract.py``) loads the teacher and builds the data, then calls::

    trainer = PopulationTrainer(base, master_arch, loss_cfg, optim_cfg, error=..., mode=...)
    errors = trainer.train_and_eval(pairs, ProxyData(batches, heldout, teacher, held_teacher))

Why buckets: compiling a program costs far more than a short proxy run of it on a CPU, so
a few shared programs beat one per candidate, until a longer proxy makes the padded FLOPs show
(``max_overhead`` bounds them). ``benchmarks/extract.py`` measures the trade (its results and
their reading are in ``benchmarks/results/extract_s3.json``, ``extract_s30.json`` and
docs/EXTRACTION.md).

Inside a bucket the members run under ``jax.vmap`` (accelerators) or ``jax.lax.map`` (one at a
time inside the same program: on a small CPU vmap adds no throughput, see
``benchmarks/results/extract_s3.json``, and map keeps memory flat). With a mesh, vmapped members
are sharded over its ``data`` axis (filler members pad the population to a multiple of the axis;
their results are dropped).

Determinism and exactness choices:
* A candidate's initial weights are the leading slices of one *master* set of weights of the
  search space's largest shape (seeded random, or the caller's ``master_init``). They do not
  depend on the bucket, so bucketing cannot change a proxy error; a resume re-creates them. The
  program receives the master cut to the bucket's shape once and multiplies it by each
  member's parameter mask (``masks.param_mask`` of its traced arch mask), so no per-member
  weights cross from the host.
* Proxy steps run without dropout: dropout masks drawn at a padded shape would differ from
  the unpadded model's, and three steps gain nothing from it.
* The proxy optimizer is the distillation optimizer (``optim.make_optimizer``: Adam without
  bias correction, decoupled weight decay off LayerNorm and biases, optional clipping) at a
  constant learning rate; each member's theta (``lr``, ``weight_decay``) enters the program as
  data, so members with different thetas share one compile.
* The teacher's logits for each batch are computed once (by the caller, in :class:`ProxyData`)
  and shared by the whole population.
* Inputs are checked once, where they enter: thetas by :func:`check_theta` (a :class:`Theta`
  is already checked and is trusted), pairs, buckets and data at :meth:`PopulationTrainer.train`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from bort_jax.core import cost, losses, masks, model, optim
from bort_jax.core import members as members_lib
from bort_jax.core.arch import Arch, ModelConfig
from bort_jax.core.model import MLM
from bort_jax.search import proxy_data
from bort_jax.search.buckets import Bucket, check_bounds, exceeded_field, padded_arch, plan_buckets
from bort_jax.search.proxy_data import ProxyData
from bort_jax.search.theta import Theta, check_theta



def _leading_slice(flat_master: Mapping[tuple, np.ndarray], config: ModelConfig) -> dict:
  """The leading slices of a flat master tree at ``config``'s shape (host numpy, no copies)."""
  return {path: flat_master[path][tuple(slice(0, n) for n in shape)]
          for path, shape in masks.param_shapes(config, MLM).items()}


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


@dataclasses.dataclass
class Trained:
  """What :meth:`PopulationTrainer.train` returns, one entry per pair in input order.

  Attributes:
    errors: held-out errors (floats; non-finite when the proxy diverged).
    train_losses: [N, s] training losses per step.
    params: each pair's final parameters at its bucket's padded shape (with
      ``return_params``), else None.
  """

  errors: list
  train_losses: np.ndarray
  params: list | None = None


class PopulationTrainer:
  """Trains (arch, theta) pairs for s proxy steps and returns their held-out errors.

  Args:
    base: the family fields every candidate shares (vocabulary, positions, ...); its arch is
      replaced per candidate. Dropout is switched off.
    master_arch: the largest shape of the search space (head size included); candidates'
      initial weights are leading slices of one initialisation of it.
    loss_cfg: ``temperature``, ``alpha_kd``, ``alpha_mlm``, ``kind`` (as in distillation).
    optim_cfg: optimizer fields of ``optim.make_optimizer`` (``name``, ``b1``, ``b2``, ``eps``,
      ``clip_norm``); lr and weight decay come from each pair's theta, the schedule fields are
      ignored (proxies use a constant learning rate).
    error: held-out error, "distill" (the distillation loss) or "mlm" (cross-entropy).
    mode: "vmap", "map" or "auto" (map on CPU, vmap elsewhere).
    max_overhead, max_members: bucket planning bounds (``buckets.plan_buckets``).
    mesh: optional mesh; in vmap mode, members are sharded over its ``data`` axis.
    seed: seed of the master initialisation.
    batch_size, seq_len, max_predictions: the proxy batch shape (B, T, P); used for the FLOP
      model and checked against the data.
    compile_workers: threads that compile bucket programs ahead of their run (1: compile
      each program just before it runs).
    master_init: ``f(master_config) -> params`` giving the master weights (an MLM tree of the
      master shape, e.g. the teacher's inherited weights); None: ``model.init`` seeded with
      ``seed``. Called once, when the first bucket needs it.
  """

  def __init__(self, base: ModelConfig, master_arch: Arch, loss_cfg: Mapping[str, Any],
               optim_cfg: Mapping[str, Any], error: str = "distill", mode: str = "auto",
               max_overhead: float = 1.5, max_members: int = 64, mesh=None, seed: int = 0,
               batch_size: int = 8, seq_len: int = 128, max_predictions: int = 20,
               compile_workers: int = 1, master_init: Callable[[ModelConfig], Any] | None = None):
    if error not in ("distill", "mlm"):
      raise ValueError(f"proxy error must be 'distill' or 'mlm', got {error!r}")
    mode = members_lib.resolve_mode(mode)
    if mesh is not None and "data" not in mesh.shape:
      raise ValueError(f"the mesh needs a 'data' axis to shard populations, has {mesh.shape}")
    if isinstance(compile_workers, bool) or int(compile_workers) < 1:
      raise ValueError(f"compile_workers must be a positive int, got {compile_workers!r}")
    self.max_overhead, self.max_members = check_bounds(max_overhead, max_members)
    self.base = base.replace(dropout=0.0, attention_dropout=0.0)
    self.master_config = self.base.replace(arch=master_arch)
    self.loss_cfg = {"temperature": 2.0, "alpha_kd": 0.5, "alpha_mlm": 0.1, "kind": "kl",
                     **dict(loss_cfg)}
    self.optim_cfg = dict(optim_cfg)
    optim.make_optimizer(self.optim_cfg, lr=1.0, weight_decay=0.0)  # bad fields fail here
    self.error, self.mode, self.mesh = error, mode, mesh
    self.compile_workers = int(compile_workers)
    self.seed = seed
    self.master_init = master_init
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
    """Buckets for (arch, theta) pairs under this trainer's bounds (checked when trained)."""
    return plan_buckets([a for a, _ in pairs], self.flops, self.max_overhead, self.max_members)

  def group(self, pairs: Sequence[tuple[Arch, Mapping]]) -> list[list[int]]:
    """The plan as lists of pair indices (``fptas.run_fptas(group=...)``); train each list
    with ``train_and_eval(..., one_bucket=True)`` so it is not re-planned."""
    return [list(b.members) for b in self.plan(pairs)]

  def _check_pairs(self, pairs) -> list[tuple[Arch, Theta]]:
    master = self.master_config.arch
    checked = []
    for arch, theta in pairs:
      if not isinstance(arch, Arch):
        raise ValueError(f"a proxy candidate must be an Arch, got {arch!r}")
      field = exceeded_field(arch, master)
      if field is not None:
        raise ValueError(f"candidate {arch} exceeds the master shape {master} in {field} "
                         f"({getattr(arch, field)} > {getattr(master, field)}); the master "
                         "must hold every candidate of the search space")
      checked.append((arch, check_theta(theta)))
    return checked

  # -- parameters

  @property
  def master(self) -> dict:
    """Flat {path: numpy array} of the master initialisation (host memory, made once)."""
    if self._master is None:
      if self.master_init is None:
        init = jax.jit(lambda r: model.init(r, self.master_config, MLM))
        params = init(jax.random.key(self.seed))
      else:
        params = self.master_init(self.master_config)
      flat = traverse_util.flatten_dict(jax.device_get(params))
      want = masks.param_shapes(self.master_config, MLM)
      got = {k: tuple(np.shape(v)) for k, v in flat.items()}
      bad = sorted("/".join(k) for k in set(got) | set(want) if got.get(k) != want.get(k))
      if bad:
        raise ValueError(f"master_init's weights do not have the master shape "
                         f"{self.master_config.arch}: {len(bad)} parameter(s) differ, e.g. "
                         f"{bad[:3]}")
      self._master = {k: np.asarray(v) for k, v in flat.items()}
    return self._master

  # -- the compiled program of one bucket

  def _loss(self, config: ModelConfig, masked: bool):
    cfg = self.loss_cfg

    def loss(params, arch_mask, batch, teacher_logits, kind):
      inputs = {k: batch[k] for k in proxy_data.MODEL_KEYS if k in batch}
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
    optim_cfg, error = self.optim_cfg, self.error

    def member(master, arch_mask, lr, weight_decay, data):
      batches, heldout, teacher, heldout_teacher = data
      params = master
      if masked:
        params = jax.tree.map(jnp.multiply, master, masks.param_mask(config, arch_mask, MLM))
      tx = optim.make_optimizer(optim_cfg, lr=lr, weight_decay=weight_decay)

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
      return members_lib.over_members(
          lambda mask, lr_, wd, master_, data_: member(master_, mask, lr_, wd, data_), mode,
          (arch_mask, lr, weight_decay), (master, data))

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
    proxy_data.check(data, self._shape, self.base.vocab_size, self.error)

  # -- public

  def _prepare(self, bucket: Bucket, pairs: Sequence[tuple[Arch, Theta]], data: ProxyData,
               return_params: bool) -> dict:
    """Host work of one bucket (pairs already checked): member masks and thetas, the master
    cut, the cache key."""
    t0 = time.perf_counter()
    members = [pairs[m][0] for m in bucket.members]
    masked = any(a != bucket.padded for a in members)
    k = len(members)
    pad_to = k
    if self._sharded():
      pad_to = -(-k // self.mesh.shape["data"]) * self.mesh.shape["data"]
    order = list(range(k)) + [0] * (pad_to - k)  # filler members repeat member 0
    thetas = [pairs[bucket.members[j]][1] for j in order]
    lr = np.asarray([t.lr for t in thetas], np.float32)
    wd = np.asarray([t.weight_decay for t in thetas], np.float32)
    if masked:
      member_masks = [masks.make_arch_mask(bucket.padded, members[j]) for j in order]
      arch_mask = {key: np.stack([np.asarray(m[key]) for m in member_masks])
                   for key in member_masks[0]}
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

  def abstract_job(self, bucket: Bucket, pairs: Sequence[tuple[Arch, Mapping]],
                   data: ProxyData) -> tuple[Any, tuple, int]:
    """A bucket's (program, :meth:`_prepare`'s arguments as shapes, padded members)."""
    members = [pairs[m][0] for m in bucket.members]
    masked = any(a != bucket.padded for a in members)
    pad_to = k = len(members)
    if self._sharded():
      pad_to = -(-k // self.mesh.shape["data"]) * self.mesh.shape["data"]
    shapes = masks.param_shapes(self.base.replace(arch=bucket.padded), MLM)
    master = traverse_util.unflatten_dict(
        {key: jax.ShapeDtypeStruct(shape, np.float32) for key, shape in shapes.items()})
    theta = jax.ShapeDtypeStruct((pad_to,), np.float32)
    arch_mask = theta
    if masked:
      arch_mask = {key: jax.ShapeDtypeStruct((pad_to,) + np.shape(v), np.asarray(v).dtype)
                   for key, v in masks.make_arch_mask(bucket.padded, members[0]).items()}
    args = (master, arch_mask, theta, theta, data.tree())
    if self._sharded():
      P, named = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
      put = lambda tree, spec: jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=named(self.mesh, spec)), tree)
      args = tuple(put(a, P("data") if n in (1, 2, 3) else P()) for n, a in enumerate(args))
    return self._jit(bucket.padded, masked, False), args, pad_to

  def _compile(self, job: dict) -> tuple[Any, float]:
    """Lowers and compiles a job's program; returns (executable, seconds)."""
    t0 = time.perf_counter()
    compiled = self._jit(job["bucket"].padded, job["masked"], job["return_params"]).lower(
        *job["args"]).compile()
    return compiled, time.perf_counter() - t0

  def _execute(self, job: dict, compiled, fresh: bool, compile_seconds: float) -> tuple:
    """Runs a compiled job; returns (params or None, train_losses [K, s], errors [K])."""
    t0 = time.perf_counter()
    out = jax.device_get(compiled(*job["args"]))
    run_seconds = time.perf_counter() - t0
    k, bucket, s = job["k"], job["bucket"], job["steps"]
    self.stats.append(BucketStats(
        padded=str(bucket.padded), members=k, masked=job["masked"], compiled=fresh,
        compile_seconds=compile_seconds, run_seconds=run_seconds,
        host_seconds=job["host_seconds"], padded_flops=k * self.flops(bucket.padded) * s,
        real_flops=sum(self.flops(a) for a in job["members"]) * s))
    params = None
    if job["return_params"]:
      params, out = out[0], out[1:]
      params = jax.tree.map(lambda x: x[:k], params)
    train_losses, errors = out
    return params, np.asarray(train_losses)[:k], np.asarray(errors)[:k]

  def _buckets(self, pairs: Sequence[tuple[Arch, Theta]], buckets: Sequence[Bucket] | None,
               one_bucket: bool) -> list[Bucket]:
    """The plan to train: one bucket, the caller's (checked), or this trainer's own."""
    archs = [a for a, _ in pairs]
    if one_bucket:
      return [Bucket(padded_arch(archs), tuple(range(len(pairs))))]
    if buckets is None:
      return self.plan(pairs)
    covered = sorted(m for b in buckets for m in b.members)
    if covered != list(range(len(pairs))):
      raise ValueError("buckets must cover every pair exactly once")
    for bucket in buckets:
      for m in bucket.members:
        if exceeded_field(archs[m], bucket.padded) is not None:
          raise ValueError(f"bucket shape {bucket.padded} does not hold member {archs[m]}")
    return list(buckets)

  def train(self, pairs: Sequence[tuple[Arch, Mapping]], data: ProxyData,
            buckets: Sequence[Bucket] | None = None, one_bucket: bool = False,
            return_params: bool = False) -> Trained:
    """Trains (arch, theta) pairs for s steps and scores them on the held-out batch.

    With ``compile_workers > 1`` every bucket's program is compiled ahead in a thread pool
    (XLA compiles outside the GIL), overlapping compiles with each other and with the runs of
    earlier buckets; the results are the same.

    Args:
      pairs: (candidate, theta) pairs; a candidate may appear under several thetas.
      data: the proxy batches (shared by every pair).
      buckets: an explicit plan over ``pairs``; None plans with :meth:`plan`.
      one_bucket: train all pairs in one bucket (a group from :meth:`group`).
      return_params: also return each pair's final (padded) parameters.

    Returns:
      A :class:`Trained`.
    """
    pairs = self._check_pairs(list(pairs))
    self.check_data(data)
    if not pairs:
      return Trained([], np.zeros((0, data.steps), np.float32), [] if return_params else None)
    jobs = [self._prepare(b, pairs, data, return_params)
            for b in self._buckets(pairs, buckets, one_bucket)]
    futures = {}
    pool = None
    if self.compile_workers > 1:
      pool = concurrent.futures.ThreadPoolExecutor(self.compile_workers)
      for job in jobs:
        if job["key"] not in self._compiled and job["key"] not in futures:
          futures[job["key"]] = pool.submit(self._compile, job)
    errors = [math.nan] * len(pairs)
    train_losses = np.full((len(pairs), data.steps), np.nan, np.float32)
    params = [None] * len(pairs) if return_params else None
    try:
      for job in jobs:
        key, seconds, fresh = job["key"], 0.0, True
        if key in futures:
          self._compiled[key], seconds = futures.pop(key).result()
        elif key not in self._compiled:
          self._compiled[key], seconds = self._compile(job)
        else:
          fresh = False
        out_params, losses_k, errs = self._execute(job, self._compiled[key], fresh, seconds)
        for j, index in enumerate(job["bucket"].members):
          errors[index], train_losses[index] = float(errs[j]), losses_k[j]
          if return_params:
            params[index] = jax.tree.map(lambda x, j=j: x[j], out_params)
        logging.info("proxy bucket %s: %d members, compile %.1fs run %.1fs",
                     job["bucket"].padded, job["k"], seconds, self.stats[-1].run_seconds)
    finally:
      if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)
    return Trained(errors, train_losses, params)

  def train_and_eval(self, pairs: Sequence[tuple[Arch, Mapping]], data: ProxyData,
                     buckets: Sequence[Bucket] | None = None,
                     one_bucket: bool = False) -> list[float]:
    """Proxy errors of (arch, theta) pairs, in order (:meth:`train`'s errors).

    Args:
      pairs, data, buckets, one_bucket: as in :meth:`train`.

    Returns:
      The held-out error of each pair (a float; non-finite when the proxy diverged).
    """
    return self.train(pairs, data, buckets=buckets, one_bucket=one_bucket).errors

  def ledger(self, since: int = 0) -> dict:
    """Compile count and time, run time and FLOPs spent so far (JSON-able).

    Args:
      since: count only the buckets trained after the first ``since`` (``len(stats)`` taken
        before a phase gives that phase's own cost).
    """
    stats = self.stats[since:]
    padded = sum(s.padded_flops for s in stats)
    real = sum(s.real_flops for s in stats)
    return {
        "buckets_trained": len(stats),
        "compiles": sum(s.compiled for s in stats),
        "compile_seconds": sum(s.compile_seconds for s in stats),
        "run_seconds": sum(s.run_seconds for s in stats),
        "host_seconds": sum(s.host_seconds for s in stats),
        "padded_flops": padded, "real_flops": real,
        "padding_overhead": padded / real if real else None,
        "mode": self.mode,
        "buckets": [dataclasses.asdict(s) for s in stats],
    }
