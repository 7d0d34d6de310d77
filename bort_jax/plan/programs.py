"""The programs a run would compile, built from its config with shapes only (no weights read).

For each plannable mode, :func:`build` returns a :class:`ModePlan`: the mesh the run would build
on the target's devices, and the real jitted programs with abstract arguments
(``jax.ShapeDtypeStruct`` carrying their ``NamedSharding``), ready for ``.lower().compile()``:

* ``distill`` / ``teacher-adapt``: ``runtime.train.train_step`` with the distillation loss of
  ``pipelines/distill.py``, state and frozen models sharded by ``distill.plan``;
* ``finetune``: ``finetune.compiled.compile_steps``'s train step (one model);
* ``extract``: every bucket program of ``search.proxy.PopulationTrainer`` for every
  (candidate, theta) pair the search space holds (the FPTAS trains at most these).

Models are read as shapes: a checkpoint's ``model_config.json`` or ``config.json``, or a preset
or arch string given with ``--shapes`` (``teacher=roberta-large``) when the files are elsewhere.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from bort_jax.core import arch as arch_lib
from bort_jax.core import model
from bort_jax.runtime import sharding, train

MLM = model.HeadSpec("mlm")
PLANNABLE = ("distill", "teacher-adapt", "extract", "finetune")
SHAPE_KEYS = ("teacher", "student", "init")


@dataclasses.dataclass
class Program:
  """One program a run compiles: its jitted function, abstract arguments, and how often it
  runs (steps for a train step, 1 for a bucket program that runs all its steps).

  ``flops`` is the analytic FLOP count of one run over all devices when the compiler's count
  cannot be used (a loop body counted once), else None; ``size`` ranks a mode's programs by
  what they hold (parameters x members), for ``--largest-only``."""

  name: str
  fn: Callable
  args: tuple
  runs: int
  flops: float | None = None
  size: float = 0.0


@dataclasses.dataclass
class ModePlan:
  """What a mode would compile on a target: programs, mesh, batch and notes."""

  mode: str
  kind: str
  mesh_shape: dict
  global_batch: int
  per_device_batch: int
  programs: list
  notes: list
  rebatch: Callable[[int], "ModePlan"] | None = None


def parse_shapes(text: str) -> dict[str, str]:
  """``teacher=roberta-large,init=bort`` -> a dict; keys from :data:`SHAPE_KEYS`."""
  out = {}
  for part in [p.strip() for p in (text or "").split(",") if p.strip()]:
    key, sep, value = part.partition("=")
    if not sep or key not in SHAPE_KEYS or not value:
      raise ValueError(f"--shapes={text!r}: each entry is NAME=PRESET_OR_ARCH with NAME one of "
                       f"{', '.join(SHAPE_KEYS)} (e.g. teacher=roberta-large)")
    out[key] = value
  return out


def model_shape(path: str, field: str, given: str | arch_lib.ModelConfig | None = None,
                family: str = "bort") -> arch_lib.ModelConfig:
  """A checkpoint's ModelConfig read from its config file alone, or the ``--shapes`` one (a
  preset or arch string; a ModelConfig as it is)."""
  if isinstance(given, arch_lib.ModelConfig):
    return given
  if given:
    try:
      return arch_lib.get_model_config(given, family=family)
    except ValueError as error:
      raise ValueError(f"--shapes: {error}") from None
  if not path:
    raise ValueError(f"{field} is empty: a dry run reads the model's shape from its config file "
                     f"(or give it with --shapes {field.split('.')[1]}=PRESET_OR_ARCH)")
  path = os.path.expanduser(path)
  from bort_jax.interop import convert, export  # pylint: disable=import-outside-toplevel
  if os.path.exists(os.path.join(path, export.MODEL_CONFIG_FILE)):
    return export.load_config(path)
  hf = os.path.join(path, "config.json")
  if not os.path.exists(hf):
    raise ValueError(f"{field}={path!r} holds neither {export.MODEL_CONFIG_FILE} nor "
                     "config.json; a dry run reads only the shape (or give it with --shapes)")
  with open(hf) as f:
    return convert.config_from_hf(json.load(f))


def abstract(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of ``tree``'s leaves with the given shardings (a tree or one)."""
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings),
                        tree)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def _key(mesh) -> jax.ShapeDtypeStruct:
  key = jax.eval_shape(lambda: jax.random.key(0))
  return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))


def _batch_parts(mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


# ----------------------------------------------------------------------------- distillation


def _family(config: ml_collections.ConfigDict, teacher=None) -> str:
  """The family a bare arch string of ``--shapes`` takes: the student's (the teacher's when it
  copies the teacher's; BERT when there is none to copy)."""
  family = config.student.get("family", "bort")
  if family == "teacher":
    return teacher.family if teacher is not None else "bert"
  return family


def _checkable(config: ml_collections.ConfigDict, shapes: Mapping) -> ml_collections.ConfigDict:
  """The config as the run's checks see it: a path that ``--shapes`` stands in for is filled
  with a placeholder (a dry run never opens it), so the checks pass on everything else."""
  config = copy.deepcopy(config)
  if "teacher" in shapes and config.teacher.get("kind", "none") != "none":
    config.teacher.path = config.teacher.get("path") or "(--shapes teacher)"
  if "student" in shapes and "path" in config.student:
    config.student.path = config.student.get("path") or "(--shapes student)"
  return config


def _teacher(config: ml_collections.ConfigDict, shapes: Mapping):
  if config.teacher.get("kind", "none") == "none" and "teacher" not in shapes:
    return None
  return model_shape(config.teacher.get("path", ""), "config.teacher.path",
                     shapes.get("teacher"), _family(config))


def _distill_models(config: ml_collections.ConfigDict, trainable: str, shapes: Mapping):
  from bort_jax.pipelines import distill, setup  # pylint: disable=import-outside-toplevel
  teacher = _teacher(config, shapes)
  init = lambda cfg, head: jax.eval_shape(lambda: model.init(jax.random.key(0), cfg, head))
  teacher_params = init(teacher, MLM) if teacher is not None else None
  path = config.student.get("path", "")
  if trainable == "mlm_head" or path or "student" in shapes:
    student = model_shape(path, "config.student.path", shapes.get("student"),
                          _family(config, teacher))
    body = {k: v for k, v in init(student, model.HeadSpec("none")).items()}
    if trainable == "mlm_head":
      return distill.Models(student, teacher, teacher_params, body, trainable)
    return distill.Models(student, teacher, teacher_params, None, trainable, pretrained=body)
  student = setup.student_config(config.student, teacher)
  return distill.Models(student, teacher, teacher_params, None, trainable)


def distill_plan(config: ml_collections.ConfigDict, devices: Sequence, mode: str,
                 shapes: Mapping) -> ModePlan:
  """The distillation (or teacher-adapt) train step on ``devices``."""
  # pylint: disable-next=import-outside-toplevel
  from bort_jax.pipelines import distill, setup as run_setup
  run_setup.check_config(_checkable(config, shapes), paths=False)
  trainable = distill.adapt_trainable(config) if mode == "teacher-adapt" else "all"
  models = _distill_models(config, trainable, shapes)
  p = distill.plan(config, models, devices)
  inherited = None
  if config.loss.get("layer_map", "uniform") == "inherited":
    inherited = tuple(range(models.student.arch.depth))  # which layers: same cost
  loss_fn = distill.make_loss_fn(models.student, models.teacher, config.loss, trainable,
                                 inherited=inherited)
  step = train.compile_step(loss_fn, p.tx, p.state_shardings, None, p.frozen_shardings or None)
  frozen = None
  if p.frozen_shardings:
    frozen = {}
    if models.teacher_params is not None:
      frozen["teacher"] = abstract(models.teacher_params, p.frozen_shardings["teacher"])
    if models.body is not None:
      frozen["body"] = abstract(models.body, p.frozen_shardings["body"])
  b, t = int(config.data.global_batch_size), int(config.data.seq_len)
  from bort_jax.data import pretrain  # pylint: disable=import-outside-toplevel
  k = int(config.data.get("max_predictions") or 0) or pretrain.default_max_predictions(t)
  rows = sharding.batch_sharding(p.mesh)
  batch = {name: jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rows)
           for name in ("input_ids", "attention_mask", "token_type_ids")}
  batch.update({name: jax.ShapeDtypeStruct((b, k), dtype, sharding=rows) for name, dtype in (
      ("masked_positions", jnp.int32), ("masked_labels", jnp.int32),
      ("masked_weights", jnp.float32))})
  args = (abstract(p.abstract_state, p.state_shardings), batch, _key(p.mesh), frozen)
  steps = int(config.train.total_steps)
  parts = _batch_parts(p.mesh)

  def rebatch(per_device: int) -> ModePlan:
    changed = copy.deepcopy(config)
    changed.data.global_batch_size = per_device * parts
    return distill_plan(changed, devices, mode, shapes)

  kind = "adapt" if mode == "teacher-adapt" else "distill"
  return ModePlan(mode, kind, dict(p.mesh.shape), b, b // parts,
                  [Program(f"{kind} train step ({models.student.arch} student"
                           + (f", {models.teacher.arch} teacher)" if models.teacher else ")"),
                           step, args, steps)],
                  [], rebatch)


# ----------------------------------------------------------------------------- fine-tuning


def finetune_plan(config: ml_collections.ConfigDict, devices: Sequence,
                  shapes: Mapping) -> ModePlan:
  """One fine-tuning model's train step on ``devices`` (a population plans one member)."""
  # pylint: disable-next=import-outside-toplevel
  from bort_jax.finetune import compiled, setup as ft_setup, steps as ft_steps
  spec = ft_setup.resolve_task(config.task)
  cfg_model = model_shape(config.init.get("path", ""), "config.init.path", shapes.get("init"))
  kind = "classification" if spec.kind == "candidates" else spec.kind
  steps = int(config.train.total_steps)
  cfg = ft_steps.StepConfig(cfg_model, kind, spec.num_labels, max(steps, 1))
  mesh = sharding.make_mesh(dict(config.mesh), devices=devices)
  b, t = int(config.batch_size), int(config.seq_len)
  sharding.check_batch_size(b, mesh)
  rules = tuple(sharding.rules_from_config(config.get("rules")))
  built = compiled.compile_steps(cfg, compiled.direction_key(config.optim), mesh, rules)
  abstract_params = jax.eval_shape(lambda: model.init(jax.random.key(0), cfg.model, cfg.head))
  state = jax.eval_shape(lambda p: ft_steps.init_state(p, built.tx), abstract_params)
  shape = (b, spec.num_labels, t) if kind == "multiple_choice" else (b, t)
  rows = lambda nd: sharding.batch_sharding(mesh, nd)
  batch = {name: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows(len(shape)))
           for name in ("input_ids", "attention_mask", "token_type_ids")}
  label = jnp.float32 if kind == "regression" else jnp.int32
  batch.update(label=jax.ShapeDtypeStruct((b,), label, sharding=rows(1)),
               weight=jax.ShapeDtypeStruct((b,), jnp.float32, sharding=rows(1)))
  rep = sharding.replicated(mesh)
  hp = abstract(ft_steps.hparams(1e-4, 0.0, 0.0), rep)
  args = (abstract(state, built.state_shardings), batch, _key(mesh), hp)
  parts = _batch_parts(mesh)
  notes, members = [], 1
  if not steps:
    notes.append("config.train.total_steps=0: the run's length comes from its data (epochs x "
                 "train split); set it for an ETA")
  if config.get("population") is not None and int(config.population.get("seeds", 0) or 0) > 1:
    members = int(config.population.seeds)
    notes.append(f"a population of {members} seeds: planned as one member's step, run "
                 f"{members} times a step (the members one after another)")

  def rebatch(per_device: int) -> ModePlan:
    changed = copy.deepcopy(config)
    changed.batch_size = per_device * parts
    return finetune_plan(changed, devices, shapes)

  return ModePlan("finetune", "finetune", dict(mesh.shape), b, b // parts,
                  [Program(f"fine-tune train step ({cfg_model.arch}, {spec.name})",
                           built.train_step, args, steps * members)], notes, rebatch)


# ----------------------------------------------------------------------------- extraction


def extract_plan(config: ml_collections.ConfigDict, devices: Sequence,
                 shapes: Mapping) -> ModePlan:
  """Every bucket program of the extraction's proxy phase on ``devices``."""
  # pylint: disable-next=import-outside-toplevel
  from bort_jax.pipelines import extract
  # pylint: disable-next=import-outside-toplevel
  from bort_jax.search import buckets, proxy, proxy_data
  candidates = extract.search_space(config.space)
  extract.validate(_checkable(config, shapes), len(candidates), paths=False)
  teacher = _teacher(config, shapes)
  base = extract.base_student(config, candidates, teacher)
  master = buckets.padded_arch(candidates)
  mesh = sharding.make_mesh(dict(config.mesh), devices=devices) if config.get("mesh") else None
  b, t = int(config.data.global_batch_size), int(config.data.seq_len)
  k = int(config.data.max_predictions)
  trainer = proxy.PopulationTrainer(
      base, master, dict(config.loss), dict(config.proxy.optim), error=config.proxy.error,
      mode=config.proxy.mode, max_overhead=config.proxy.max_overhead,
      max_members=config.proxy.max_members, mesh=mesh, seed=config.seed, batch_size=b,
      seq_len=t, max_predictions=k)
  thetas = [dict(th) for th in config.fptas.thetas]
  pairs = [(a, th) for th in thetas for a in candidates]
  plan = trainer.plan(pairs)
  s = int(config.proxy.steps)
  with_teacher = teacher is not None and bool(config.proxy.get("error_teacher", True))
  data = proxy_data.abstract(s, b, t, k, teacher.vocab_size if with_teacher else 0)
  programs = []
  for n, bucket in enumerate(plan):
    fn, args, members = trainer.abstract_job(bucket, pairs, data)
    flops = trainer.flops(bucket.padded) * members * s
    held = sum(math.prod(a.shape) for a in jax.tree.leaves(args[0]))  # the bucket's weights
    programs.append(Program(f"bucket {n + 1}/{len(plan)}: {bucket.padded} x {members} members",
                            fn, args, 1, flops, float(held * members)))
  useful = sum(trainer.flops(a) * s for a, _ in pairs)
  padded = sum(p.flops for p in programs)
  notes = [f"bucket plan: {len(plan)} programs for {len(pairs)} (candidate, theta) pairs "
           f"({len(candidates)} candidates x {len(thetas)} thetas; the FPTAS trains at most "
           f"these), padded-FLOP overhead {padded / useful:.2f}x, total proxy FLOPs "
           f"{padded:.3g} ({s} steps of batch {b} x {t})"]

  def rebatch(per_device: int) -> ModePlan:
    changed = copy.deepcopy(config)
    changed.data.global_batch_size = per_device
    return extract_plan(changed, devices, shapes)

  return ModePlan("extract", "proxy", dict(mesh.shape) if mesh is not None else {"data": 1},
                  b, b, programs, notes, rebatch)


def build(mode: str, config: ml_collections.ConfigDict, devices: Sequence,
          shapes: Mapping) -> ModePlan:
  """The :class:`ModePlan` of ``mode`` with ``config`` on ``devices``."""
  if mode in ("distill", "teacher-adapt"):
    return distill_plan(config, devices, mode, shapes)
  if mode == "finetune":
    return finetune_plan(config, devices, shapes)
  if mode == "extract":
    return extract_plan(config, devices, shapes)
  raise ValueError(f"bort-jax {mode} has no dry run; the modes with one: {', '.join(PLANNABLE)}")

