"""Pretraining by knowledge distillation (docs/BORT.md section 4), and plain masked-LM training.

The student comes from a preset, an arch string or an extraction result; the teacher from a
Hugging Face checkpoint or one of ours. The teacher is frozen: its parameters travel into the
step as ``frozen`` (never differentiated, never in the optimizer state, never checkpointed)
and see the same corrupted input as the student. Without a teacher the same loop trains a
plain masked LM; ``teacher-adapt`` uses that to give a headless teacher (the demo's
all-MiniLM-L6-v2) a trained MLM head. What it trains is ``config.adapt.trainable``: "mlm_head"
(a fresh head on the frozen body, a probe of what the body already encodes) or "all" (the
body fine-tuned together with the fresh head). A body trained without a masked-LM objective,
as a sentence-embedding model is, encodes nothing about the token behind a ``[MASK]``, so a
head alone cannot beat the unigram distribution there; the demo fine-tunes the whole model.

    bort-jax distill --config=configs/pretrain_demo.py --workdir=runs/demo/distill
    bort-jax teacher-adapt --config=configs/pretrain_demo.py:adapt --workdir=runs/demo/teacher

A run checks everything that user input can get wrong (vocabularies of teacher, student and
tokenizer; whether the mesh divides every parameter; whether the batch divides over the batch
axes and the processes) before it compiles anything, so a bad config fails in seconds with a
message that names the offending field.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from bort_jax.core import arch as arch_lib
from bort_jax.core import losses, masks, model, optim
from bort_jax.core.model import MLM
from bort_jax.interop import export as export_lib
from bort_jax.pipelines import setup as run_setup
from bort_jax.runtime import checkpoint, preemption, rundir, sharding, train

TRAINABLE = ("all", "mlm_head")
# Trainable parameters that belong to the distillation, not to the student (the hidden-state
# projection): a subtree of the train state that the export drops.
AUX = "distill_aux"

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass
class Models:
  """The models of a run, loaded and checked, before any device work.

  Attributes:
    student: the trained model's config.
    teacher: the teacher's config, or None (plain masked LM).
    teacher_params: host copy of the teacher's parameters, or None.
    body: for ``trainable="mlm_head"``, the frozen body's parameters; else None.
    trainable: "all" or "mlm_head".
    pretrained: for ``trainable="all"`` with ``config.student.path`` set, the loaded model's
      parameters without a head: the start of training (a fresh head is added); else None
      (the student starts from a fresh init).
  """

  student: arch_lib.ModelConfig
  teacher: arch_lib.ModelConfig | None
  teacher_params: Any
  body: Any
  trainable: str
  pretrained: Any = None


def load_models(config: ml_collections.ConfigDict, trainable: str = "all") -> Models:
  """Loads the teacher, builds the student (or loads the body to adapt) and checks them.

  The student is read from ``config.student.path`` (kind "hf" or "params") when the path is
  set, and built fresh from ``config.student.arch`` otherwise.

  Args:
    config: the run's config (``teacher``, ``student``).
    trainable: "all" trains the whole student (the loaded model and a fresh head, when
      ``config.student.path`` is set); "mlm_head" trains only a fresh MLM head on the frozen
      body read from ``config.student.path``.

  Returns:
    :class:`Models`.
  """
  if trainable not in TRAINABLE:
    raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
  teacher_cfg, teacher_params = run_setup.load_teacher(config.teacher)
  path = config.student.get("path", "")
  if trainable == "mlm_head" and not path:
    raise ValueError("teacher-adapt needs config.student.path (the headless model to adapt)")
  if not path:
    student = run_setup.student_config(config.student, teacher_cfg)
    return Models(student, teacher_cfg, teacher_params, None, trainable)
  from bort_jax.interop import convert  # pylint: disable=import-outside-toplevel
  kind = config.student.get("kind", "hf")
  if kind == "hf":
    student, loaded = convert.load_hf(path, with_mlm_head=None)
  elif kind == "params":
    student, loaded = export_lib.load(path)
  else:
    raise ValueError(f"config.student.kind must be 'hf' or 'params', got {kind!r}")
  # An existing head is replaced by a fresh one: adapting trains the head from scratch.
  loaded = {k: v for k, v in loaded.items() if k != "mlm_head"}
  if teacher_cfg is not None and teacher_cfg.vocab_size != student.vocab_size:
    raise ValueError(f"student vocabulary ({student.vocab_size}) differs from the "
                     f"teacher's ({teacher_cfg.vocab_size})")
  if trainable == "mlm_head":
    return Models(student, teacher_cfg, teacher_params, loaded, trainable)
  return Models(student, teacher_cfg, teacher_params, None, trainable, pretrained=loaded)


def adapt_trainable(config: ml_collections.ConfigDict) -> str:
  """What ``teacher-adapt`` trains: ``config.adapt.trainable`` ("mlm_head" when unset).

  Raises:
    ValueError: the field names neither "all" nor "mlm_head".
  """
  trainable = (config.get("adapt") or {}).get("trainable", "mlm_head")
  if trainable not in TRAINABLE:
    raise ValueError(f"config.adapt.trainable must be one of {TRAINABLE}, got {trainable!r}")
  return trainable


def check_tokenizer(tokenizer: Any, models: Models) -> None:
  """Every id the tokenizer emits must index the embeddings of the student and the teacher."""
  for name, cfg in (("student", models.student), ("teacher", models.teacher)):
    if cfg is not None and tokenizer.vocab_size > cfg.vocab_size:
      raise ValueError(
          f"the tokenizer has {tokenizer.vocab_size} ids but the {name}'s vocabulary has "
          f"{cfg.vocab_size} rows: config.data.tokenizer does not belong to this {name} "
          f"(family {cfg.family!r})")


# ----------------------------------------------------------------------------- losses


def make_loss_fn(student: arch_lib.ModelConfig, teacher: arch_lib.ModelConfig | None,
                 loss_cfg: ml_collections.ConfigDict, trainable: str = "all",
                 training: bool = True, inherited: tuple[int, ...] | None = None) -> Callable:
  """``loss_fn(params, batch, rng, frozen)`` for distillation (teacher) or masked LM (none).

  Args:
    student: the trained model's config.
    teacher: the teacher's config, or None for plain masked-LM training.
    loss_cfg: temperature, alpha_kd, alpha_mlm, kind ("kl" | "original"), and the
      intermediate terms alpha_hidden, alpha_attn, layer_map (``losses.intermediate_loss``).
    trainable: "all", or "mlm_head" to train only the head on a frozen body
      (``frozen["body"]`` then holds the rest of the student's parameters).
    training: dropout on (the step's rng drives it) or off (evaluation).
    inherited: the teacher layers an inherited student took (for ``layer_map="inherited"``).

  Returns:
    The loss function; its metrics hold the loss's parts and the masked-token count.
  """
  alpha_hidden, alpha_attn = run_setup.intermediate_weights(loss_cfg)
  deep = teacher is not None and trainable == "all" and bool(alpha_hidden or alpha_attn)
  pairs = losses.layer_map(student.arch.depth, teacher.arch.depth,
                           loss_cfg.get("layer_map", "uniform"), inherited) if deep else ()
  wants = dict(output_hidden_states=bool(alpha_hidden), output_attentions=bool(alpha_attn))

  def loss_fn(params, batch, rng, frozen):
    aux = params.get(AUX, {})
    params = {k: v for k, v in params.items() if k != AUX}
    full = params if trainable == "all" else {**frozen["body"], **params}
    out = model.apply(full, student, batch, head=MLM, train=training,
                      rng=rng if training else None, **(wants if deep else {}))
    labels, weights = batch["masked_labels"], batch["masked_weights"]
    if teacher is None:
      total, count = losses.mlm_loss(out["logits"], labels, weights)
      loss = losses.safe_divide(total, count)
      return loss, {"mlm_loss": loss, "masked_tokens": count}
    # The teacher runs in eval mode (no dropout) on the student's corrupted input.
    t_out = model.apply(frozen["teacher"], teacher, batch, head=MLM, train=False,
                        **(wants if deep else {}))
    t_out = jax.lax.stop_gradient(t_out)
    loss, metrics = losses.distillation_loss(
        out["logits"], t_out["logits"], labels, weights,
        temperature=loss_cfg.temperature, alpha_kd=loss_cfg.alpha_kd,
        alpha_mlm=loss_cfg.alpha_mlm, kind=loss_cfg.kind)
    if deep:
      extra, parts = losses.intermediate_loss(
          out, t_out, batch["attention_mask"], pairs, alpha_hidden, alpha_attn,
          aux.get("hidden_projection"))
      loss, metrics = loss + extra, {**metrics, **parts}
    return loss, metrics

  return loss_fn


def make_eval_fn(student, teacher, loss_cfg, trainable, frozen, batches: list,
                 inherited: tuple[int, ...] | None = None) -> Callable:
  """Mean loss (and its parts) over fixed held-out batches, dropout off.

  Returns:
    ``eval_fn(state) -> dict`` of floats.
  """
  loss_fn = make_loss_fn(student, teacher, loss_cfg, trainable, training=False,
                         inherited=inherited)

  @jax.jit
  def one(params, batch, frozen_):
    loss, metrics = loss_fn(params, batch, None, frozen_)
    return dict(metrics, loss=loss)

  def eval_fn(state):
    results = [sharding.host_get(one(state.params, b, frozen)) for b in batches]
    return {k: float(np.mean([r[k] for r in results])) for k in results[0]}

  return eval_fn


# ----------------------------------------------------------------------------- data


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Setup:
  """Everything a run builds before its first step (returned for tests and notebooks).

  Attributes:
    models: the checked models.
    mesh: the device mesh.
    state: the train state (restored or fresh), sharded.
    state_shardings: its shardings.
    frozen: ``{"teacher": ..., "body": ...}`` (sharded, never trained), or None.
    step_fn: the compiled train step ``(state, batch, rng, frozen) -> (state, metrics)``.
    rng: the run's base key (replicated).
    source: where the state came from ("workdir", "init_from" or "scratch").
    inherited: the teacher layers an inherited student took (None unless known).
  """

  models: Models
  mesh: Any
  state: train.TrainState
  state_shardings: Any
  frozen: Any
  step_fn: Callable
  rng: Any
  source: str
  inherited: tuple[int, ...] | None = None

  @property
  def student(self) -> arch_lib.ModelConfig:
    return self.models.student

  @property
  def teacher(self) -> arch_lib.ModelConfig | None:
    return self.models.teacher


@dataclasses.dataclass
class Plan:
  """Shapes and shardings of a run, computed abstractly (nothing compiled or allocated)."""

  mesh: Any
  init_fn: Callable
  tx: Any
  abstract_state: Any
  state_shardings: Any
  frozen_shardings: dict


def plan(config: ml_collections.ConfigDict, models: Models,
         devices: Sequence[jax.Device] | None = None) -> Plan:
  """Builds the mesh and every sharding, and checks that the mesh divides the run.

  Raises:
    ValueError: the batch does not divide over the batch axes or the processes, a loaded
      model's parameters do not have the student config's layout, or a parameter dimension
      (of the student, its frozen body or the teacher) does not divide over the mesh axes its
      logical name maps to. Nothing has been compiled at that point.
  """
  mesh = sharding.make_mesh(dict(config.mesh), devices=devices)
  sharding.check_batch_size(config.data.global_batch_size, mesh)
  rules = sharding.rules_from_config(config.get("rules"))
  student = models.student
  specs = model.logical_axes(student, MLM)
  seed = int(config.seed)
  if models.trainable == "mlm_head":
    specs = {"mlm_head": specs["mlm_head"]}
    init_fn = lambda r: {"mlm_head": model.init(r, student, MLM)["mlm_head"]}
  else:
    init_fn = lambda r: model.init(r, student, MLM)
  proj = run_setup.projection_shape(student, models.teacher, config.loss, models.trainable)
  if proj is not None:  # the hidden loss's projection, leading identity until inherited
    specs = {**specs, AUX: {"hidden_projection": jax.sharding.PartitionSpec(None, None)}}
    init_fn = _with_projection(init_fn, proj)
  init_rng = lambda: jax.random.split(jax.random.key(seed))[0]
  abstract_params = jax.eval_shape(lambda: init_fn(init_rng()))
  param_sh = sharding.logical_to_shardings(specs, mesh, rules)
  sharding.check_divisible(abstract_params, param_sh, what=f"student ({student.arch}) parameter")
  if models.pretrained is not None:
    want = traverse_util.flatten_dict(
        {k: v for k, v in abstract_params.items() if k not in ("mlm_head", AUX)})
    masks.check_layout(models.pretrained, {k: tuple(v.shape) for k, v in want.items()},
                       "the parameters of the model to adapt")

  tx = optim.make_optimizer(run_setup.optimizer_config(config))
  abstract_state = jax.eval_shape(lambda p: train.create_state(p, tx), abstract_params)
  treedef = jax.tree_util.tree_structure(abstract_params)
  state_sh = train.TrainState(
      step=sharding.replicated(mesh), params=param_sh,
      opt_state=sharding.tree_shardings_like(abstract_state.opt_state, treedef, param_sh, mesh))

  frozen_sh = {}
  if models.teacher_params is not None:
    t_sh = sharding.logical_to_shardings(model.logical_axes(models.teacher, MLM), mesh, rules)
    sharding.check_divisible(models.teacher_params, t_sh,
                             what=f"teacher ({models.teacher.arch}) parameter")
    frozen_sh["teacher"] = t_sh
  if models.body is not None:
    full_specs = model.logical_axes(student, model.HeadSpec("none"))
    missing = sorted(set(full_specs) - set(models.body))
    if missing:
      raise ValueError(f"the model to adapt lacks parameter groups {missing}")
    b_sh = sharding.logical_to_shardings({k: full_specs[k] for k in models.body}, mesh, rules)
    sharding.check_divisible(models.body, b_sh, what="frozen body parameter")
    frozen_sh["body"] = b_sh
  return Plan(mesh, lambda: init_fn(init_rng()), tx, abstract_state, state_sh, frozen_sh)


def _with_projection(init_fn: Callable, shape: tuple[int, int]) -> Callable:
  eye = lambda: jax.numpy.eye(shape[0], shape[1], dtype=jax.numpy.float32)
  return lambda r: {**init_fn(r), AUX: {"hidden_projection": eye()}}


def place(tree: Any, shardings: Any) -> Any:
  """Puts a host pytree onto global shardings, each process writing only its own shards.

  Works in multi-process runs too (every process holds the same host values), where
  ``jax.device_put`` of a process-local array onto a global sharding is not allowed.
  """
  host = jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
  return jax.tree_util.tree_map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
      host, shardings)


def build(config: ml_collections.ConfigDict, trainable: str = "all", manager: Any = None,
          models: Models | None = None, devices: Sequence[jax.Device] | None = None,
          batches: Callable[[int], list] | None = None) -> Setup:
  """Builds models, mesh, sharded state (restored or fresh) and the compiled step.

  Every check that can fail on user input (vocabularies, mesh divisibility, batch size) runs
  before anything is compiled.

  Args:
    config: the run's config.
    trainable: "all" or "mlm_head" (see :func:`load_models`).
    manager: the workdir's ``checkpoint.CheckpointManager`` (None: always start fresh or
      from ``config.init_from``).
    models: already loaded models (default: :func:`load_models`).
    devices: devices of the mesh (default: all).
    batches: ``n -> [n host batches]`` of training data, the batches the teacher's importance
      is measured on when ``config.student.init="inherit"`` (only on a fresh start, or to
      recover the inherited layers for ``config.loss.layer_map="inherited"`` on a resume).

  Returns:
    :class:`Setup`.
  """
  models = models or load_models(config, trainable)
  inheritance = run_setup.inheritance(config, models, batches)
  p = plan(config, models, devices)
  frozen = {}
  if models.teacher_params is not None:
    frozen["teacher"] = place(models.teacher_params, p.frozen_shardings["teacher"])
  if models.body is not None:
    frozen["body"] = place(models.body, p.frozen_shardings["body"])

  def fresh():
    if inheritance is not None:
      params = place(run_setup.inherited_params(config, models, *inheritance(), AUX),
                     p.state_shardings.params)
    elif models.pretrained is None:
      params = jax.jit(p.init_fn, out_shardings=p.state_shardings.params)()
    else:  # The loaded model, and the same fresh head a head-only run would start from.
      param_sh = p.state_shardings.params
      head = jax.jit(lambda: p.init_fn()["mlm_head"], out_shardings=param_sh["mlm_head"])()
      params = place(models.pretrained, {k: param_sh[k] for k in models.pretrained})
      params = {**params, "mlm_head": head}
    return jax.jit(lambda q: train.create_state(q, p.tx), out_shardings=p.state_shardings)(params)

  initial = checkpoint.resolve_initial_state(
      manager, config.get("init_from") or None, _with_shardings(p.abstract_state,
                                                                p.state_shardings), fresh)
  inherited = None
  if inheritance is not None and config.loss.get("layer_map", "uniform") == "inherited":
    inherited = inheritance()[1]
  loss_fn = make_loss_fn(models.student, models.teacher, config.loss, models.trainable,
                         inherited=inherited)
  # Batches arrive as global arrays already sharded over the batch axes (global_batch).
  step_fn = train.compile_step(loss_fn, p.tx, p.state_shardings, None,
                               p.frozen_shardings or None)
  seed = int(config.seed)
  rng = jax.jit(lambda: jax.random.fold_in(jax.random.key(seed), 1),
                out_shardings=sharding.replicated(p.mesh))()
  return Setup(models, p.mesh, initial.state, p.state_shardings, frozen or None, step_fn, rng,
               initial.source, inherited)


def _with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)



def run(config: ml_collections.ConfigDict, workdir: str, trainable: str = "all") -> dict:
  """Trains per ``config`` in ``workdir``; resumes from the workdir's latest checkpoint.

  Resume order: the workdir's latest readable checkpoint, then ``config.init_from``, then
  scratch. SIGTERM saves a checkpoint at the step reached and returns normally, with
  ``preempted`` true and no ``export/`` (a half-trained model must not pass for the finished
  one: the demo takes an existing export as its stage's end).

  Args:
    config: see ``configs/pretrain_demo.py`` for the fields.
    workdir: checkpoints, ``metrics.jsonl``, ``config.json`` and (on request, or when the
      run adapts a model read from ``config.student.path``) ``export/``.
    trainable: "all" or "mlm_head" (``teacher-adapt``: :func:`adapt_trainable`).

  Returns:
    The final metrics (last train loss, eval loss when configured, step, where it started).
  """
  # Every check first, cheapest first: the config's fields and paths, the models and their
  # vocabularies, the mesh, the tokenizer. Nothing is written before they all pass.
  run_setup.check_config(config)
  models = load_models(config, trainable)
  plan(config, models)
  family = models.teacher.family if models.teacher is not None else models.student.family
  inputs, tokenizer = run_setup.make_input(config.data, family, config.seed)
  check_tokenizer(tokenizer, models)

  os.makedirs(workdir, exist_ok=True)
  train.write_config(workdir, config)
  manager = checkpoint.CheckpointManager(
      os.path.join(workdir, "checkpoints"), save_interval_steps=1,
      max_to_keep=config.train.get("keep_checkpoints", 2))
  stop_flag = preemption.install_preemption_handler()
  try:
    # The same batches in every process (each gathers the global batch), so every process
    # measures the same importance and inherits the same student.
    first = lambda n: [sharding.host_get(inputs.batch(i)) for i in range(n)]
    built = build(config, trainable, manager, models=models, batches=first)
    get_batch = lambda step: sharding.global_batch(inputs.batch(step), built.mesh)
    eval_fn = None
    if config.train.get("eval_batches", 0) and config.train.get("eval_every", 0):
      held_out, _ = run_setup.make_input(config.data, family, config.seed + 1, split="validation")
      batches = [sharding.global_batch(held_out.batch(i), built.mesh)
                 for i in range(config.train.eval_batches)]
      eval_fn = make_eval_fn(models.student, models.teacher, config.loss, trainable,
                             built.frozen, batches, built.inherited)
    loop = train.LoopConfig(
        total_steps=config.train.total_steps, log_every=config.train.log_every,
        checkpoint_every=config.train.checkpoint_every,
        eval_every=config.train.get("eval_every", 0),
        tokens_per_step=config.data.global_batch_size * config.data.seq_len)
    log.info("%s: student %s, teacher %s, mesh %s, starting from %s", workdir,
             models.student.arch, models.teacher.arch if models.teacher else "none",
             dict(built.mesh.shape), built.source)
    state, metrics = train.run_loop(
        built.state, built.step_fn, get_batch, built.rng, loop, frozen=built.frozen,
        workdir=workdir, checkpointer=manager, eval_fn=eval_fn,
        should_stop=stop_flag.should_stop)
    step = int(sharding.host_get(state.step))
    preempted = step < config.train.total_steps
    metrics = dict(metrics, step=step, started_from=built.source, preempted=preempted,
                   processes=jax.process_count(), devices=jax.device_count())
    adapted = models.body is not None or models.pretrained is not None
    if (adapted or config.get("export_params", False)) and not preempted:
      metrics["export"] = export(state.params, built, workdir)
    return metrics
  finally:
    stop_flag.uninstall()
    manager.close()


def export(params: Any, built: Setup, workdir: str) -> str:
  """Writes the trained model (with its frozen body, if any) under ``workdir/export``.

  The format is ``export.save`` (params.safetensors + model_config.json), which
  ``config.teacher.kind = "params"`` reads.

  Returns:
    The export directory.
  """
  host = {k: v for k, v in sharding.host_get(params).items() if k != AUX}  # the distillation's own
  if built.models.trainable == "mlm_head":
    host = {**sharding.host_get(built.frozen["body"]), **host}
  out = rundir.export_dir(workdir)
  if jax.process_index() == 0:
    export_lib.save(out, host, built.student)
  sharding.barrier("bort_jax.pipelines.distill.export")
  return out


def run_adapt(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """``bort-jax teacher-adapt``: gives a headless model a trained MLM head.

  ``config.adapt.trainable`` says whether the body is fine-tuned with it ("all") or frozen
  ("mlm_head"); see :func:`run`.
  """
  return run(config, workdir, trainable=adapt_trainable(config))
