"""Run setup shared by the pipelines: the teacher, the student's config and the input data.

Distillation, teacher adaptation and extraction all load a frozen teacher, derive a student's
``ModelConfig`` from a config block (copying the teacher's vocabulary and embedding
conventions when asked) and read the masked-LM pretraining input; this module is the one home
of those three steps, so no pipeline borrows its setup from another.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

import jax
import ml_collections

from bort_jax.core import arch as arch_lib
from bort_jax.core import inherit as inherit_lib
from bort_jax.finetune import setup as finetune_setup
from bort_jax.runtime import sharding


# ----------------------------------------------------------------------------- models


def load_teacher(teacher_cfg: ml_collections.ConfigDict) -> tuple[arch_lib.ModelConfig, Any]:
  """Loads the teacher named by ``config.teacher``.

  Args:
    teacher_cfg: ``kind`` ("hf": a Hugging Face directory, "params": our
      ``export.save`` format, "none": no teacher) and ``path``.

  Returns:
    ``(model config, params)`` with the MLM head, or ``(None, None)`` for kind "none".
  """
  kind = teacher_cfg.get("kind", "none")
  if kind == "none":
    return None, None
  if not teacher_cfg.get("path"):
    raise ValueError(f"config.teacher.kind={kind!r} needs config.teacher.path")
  if kind not in ("hf", "params"):
    raise ValueError(f"unknown config.teacher.kind {kind!r}; use 'hf', 'params' or 'none'")
  loaded = finetune_setup.load_model(teacher_cfg.path, kind, field="config.teacher.path",
                                     keep_mlm_head=True)
  config, params = loaded.config, loaded.params
  if "mlm_head" not in params:
    raise ValueError(f"teacher {teacher_cfg.path} has no MLM head; give it one first with "
                     "`bort-jax teacher-adapt` (the demo does this for all-MiniLM-L6-v2)")
  return config, params


def resolve_student_arch(spec: str) -> str:
  """An arch string or preset; ``extract:WORKDIR`` reads an extraction's chosen architecture."""
  if spec.startswith("extract:"):
    path = os.path.join(spec[len("extract:"):], "chosen_arch.txt")
    if not os.path.exists(path):
      raise FileNotFoundError(f"no extraction result at {path}; run `bort-jax extract` first")
    with open(path) as f:
      return f.read().strip()
  return spec


def student_config(student_cfg: ml_collections.ConfigDict,
                   teacher: arch_lib.ModelConfig | None) -> arch_lib.ModelConfig:
  """The student's ModelConfig: its shape from the config, its vocabulary from the teacher.

  Args:
    student_cfg: ``arch`` (preset, arch string or ``extract:WORKDIR``), ``family`` ("bort",
      "bert", "roberta", or "teacher" to copy the teacher's embedding conventions:
      vocabulary, positions, token types, pad id) and ``overrides`` (ModelConfig fields).
    teacher: the teacher's config, or None.

  Returns:
    The student's config.

  Raises:
    ValueError: the student's vocabulary differs from the teacher's.
  """
  spec = resolve_student_arch(student_cfg.arch)
  family = student_cfg.get("family", "teacher")
  overrides = dict(student_cfg.get("overrides", {}) or {})
  if family == "teacher":
    if teacher is None:
      raise ValueError("config.student.family='teacher' needs a teacher (config.teacher.kind)")
    fields = {f: getattr(teacher, f) for f in (
        "family", "vocab_size", "max_positions", "position_offset", "type_vocab_size",
        "pad_id", "layer_norm_eps", "mlm_layer_norm_eps", "activation")}
    fields.update(overrides)
    config = arch_lib.get_model_config(spec, family=teacher.family).replace(**fields)
  else:
    config = arch_lib.get_model_config(spec, family=family, **overrides)
  if teacher is not None and config.vocab_size != teacher.vocab_size:
    raise ValueError(
        f"student vocabulary ({config.vocab_size}, family {config.family!r}) differs from the "
        f"teacher's ({teacher.vocab_size}, family {teacher.family!r}): distillation compares "
        "logits over one vocabulary. Use config.student.family='teacher' or set "
        "config.student.overrides.vocab_size.")
  return config


# ----------------------------------------------------------------------------- inheriting


def intermediate_weights(loss_cfg: ml_collections.ConfigDict) -> tuple[float, float]:
  """``(alpha_hidden, alpha_attn)`` of ``config.loss`` (0 when absent: the paper's loss)."""
  return float(loss_cfg.get("alpha_hidden", 0.0)), float(loss_cfg.get("alpha_attn", 0.0))


def projection_shape(student: arch_lib.ModelConfig, teacher: arch_lib.ModelConfig | None,
                     loss_cfg: ml_collections.ConfigDict, trainable: str = "all"):
  """``(H_s, H_t)`` when the hidden loss needs a learned projection (widths differ), else None."""
  if teacher is None or trainable != "all" or not intermediate_weights(loss_cfg)[0]:
    return None
  if student.arch.hidden == teacher.arch.hidden:
    return None
  return (student.arch.hidden, teacher.arch.hidden)


def inheritance(config: ml_collections.ConfigDict, models: Any,
                 batches: Callable[[int], list] | None) -> Callable | None:
  """``() -> (importance, kept layers)``, measured once when first asked; None: no inheriting."""
  if config.student.get("init", "random") != "inherit":
    return None
  if models.teacher_params is None or models.trainable != "all" or models.pretrained is not None:
    raise ValueError("config.student.init='inherit' needs a teacher and a student built from "
                     "config.student.arch (not config.student.path)")
  if batches is None:
    raise ValueError("config.student.init='inherit' needs training batches to measure the "
                     "teacher's importance on")
  memo = []

  def get():
    if not memo:
      n = int(config.student.get("importance_batches", 4))
      imp = inherit_lib.importance(models.teacher_params, models.teacher, batches(n))
      layers = inherit_lib.select_layers(imp, models.student.arch.depth)
      share = inherit_lib.kept_share(imp, models.student, layers, models.teacher)
      logging.getLogger(__name__).info(
          "inherit: teacher layers %s kept; share of the teacher's importance kept: %s "
          "(measured on %d batches)", list(layers),
          ", ".join(f"{k} {v:.3f}" for k, v in share.items()), n)
      memo.append((imp, layers))
    return memo[0]

  return get


def inherited_params(config: ml_collections.ConfigDict, models: Any, imp: Any,
                     layers: tuple[int, ...], aux: str) -> Any:
  """Host parameters of an inherited student (plus the hidden projection, when it has one)."""
  rng = jax.random.key(int(config.seed))
  params = inherit_lib.inherit(models.teacher_params, models.teacher, models.student, imp,
                               layers, rng=rng)
  proj = projection_shape(models.student, models.teacher, config.loss, models.trainable)
  if proj is not None:
    params[aux] = {"hidden_projection": inherit_lib.hidden_projection(imp, *proj)}
  return params


# ----------------------------------------------------------------------------- data


def make_input(data_cfg: ml_collections.ConfigDict, tokenizer_family: str, seed: int,
               split: str = "train"):
  """The pretraining input pipeline of ``config.data`` for this process.

  Text files (``corpus_files``): process 0 builds the corpus dataset (TFDS, array_record) first
  and the others open it after a barrier, so processes sharing a file system never build it
  concurrently; every process packs all documents and reads its rows of the global batch.
  A TFDS dataset (``corpus_tfds``): each process reads and packs only its share of the records
  and draws its rows from them, with an order and masking of its own (seeded by seed and
  process), so no host reads the whole corpus. ``stream_window`` > 0 streams either kind
  instead (``data/stream.py``): each process reads its share a window of that many records at
  a time and never holds the share's text or token ids.

  Args:
    data_cfg: ``corpus_files`` (glob patterns, local or on a bucket) or ``corpus_tfds`` (with
      ``corpus_field``, ``corpus_split``, ``download``), ``data_dir``, optional
      ``corpus_name``, ``validation_fraction`` (share of documents held out, by a hash of
      their text) and ``cache_dir``, ``tokenizer``, ``seq_len``, ``global_batch_size``,
      ``max_predictions``.
    tokenizer_family: "bert", "roberta" or "bort".
    seed: the data seed (order and masking).
    split: "train" or "validation".

  Returns:
    ``(pretrain.PretrainInput or stream.StreamedInput, tokenizer)``.
  """
  from bort_jax.data import pretrain, tokenization  # pylint: disable=import-outside-toplevel
  if not data_cfg.get("tokenizer"):
    raise ValueError("config.data.tokenizer must name the tokenizer files (a directory)")
  tokenizer = tokenization.load_tokenizer(os.path.expanduser(data_cfg.tokenizer),
                                          tokenizer_family)
  index, count = jax.process_index(), jax.process_count()
  if int(data_cfg.get("stream_window", 0) or 0) > 0:
    return _streamed_input(data_cfg, tokenizer, seed, split), tokenizer
  if data_cfg.get("corpus_tfds"):
    source = _tfds_documents(data_cfg, split)
    # Each process packs its own share: its rows are the whole local batch, ordered and masked
    # by a seed of its own (one process keeps the run's seed).
    batch, seed = _own_share(data_cfg, seed)
    index, count = 0, 1
  else:
    source = _file_documents(data_cfg, split)
    batch = data_cfg.global_batch_size
  cache_dir = data_cfg.get("cache_dir") or None
  inputs = pretrain.PretrainInput(
      source, tokenizer, seq_len=data_cfg.seq_len, global_batch_size=batch, seed=seed,
      process_index=index, process_count=count,
      max_predictions=data_cfg.get("max_predictions") or None,
      cache_dir=os.path.expanduser(cache_dir) if cache_dir else None)
  return inputs, tokenizer


def _own_share(data_cfg: ml_collections.ConfigDict, seed: int) -> tuple[int, int]:
  """(rows per step, data seed) of a process that reads a share of the corpus of its own: its
  part of the global batch, and a seed of its own (one process keeps the run's seed)."""
  index, count = jax.process_index(), jax.process_count()
  if data_cfg.global_batch_size % count:
    raise ValueError(f"config.data.global_batch_size={data_cfg.global_batch_size} is not "
                     f"divisible by the {count} processes")
  return data_cfg.global_batch_size // count, seed if count == 1 else seed * 65536 + index


def _streamed_input(data_cfg: ml_collections.ConfigDict, tokenizer, seed: int, split: str):
  """``stream.StreamedInput`` over this process's share of the corpus (``stream_window``)."""
  # pylint: disable-next=import-outside-toplevel
  from bort_jax.data import corpus, corpus_sources, stream
  index, count = jax.process_index(), jax.process_count()
  batch, seed = _own_share(data_cfg, seed)
  fraction = float(data_cfg.get("validation_fraction", 0.01))
  if data_cfg.get("corpus_tfds"):
    field = data_cfg.get("corpus_field", "text")
    source = corpus_sources.check_tfds(
        data_cfg.corpus_tfds, field, data_cfg.get("corpus_split", "train"),
        _tfds_data_dir(data_cfg), bool(data_cfg.get("download", False)))
    text_of = corpus_sources.document_reader(field, split, fraction)
    key = ["tfds", data_cfg.corpus_tfds, field, data_cfg.get("corpus_split", "train")]
  else:  # the corpus built from the files, already split in two
    source = _file_documents(data_cfg, split)
    text_of = lambda record: corpus.documents([record])[0] if record else None
    key = ["files", source.dataset_info.metadata["fingerprint"]]  # set when it was built
  share = stream.DocumentShare(source, corpus_sources.process_share(len(source), index, count),
                               text_of)
  if not len(share):
    raise ValueError(f"config.data: the {split!r} corpus has no record for process {index} of "
                     f"{count}; add documents or turn evaluation off "
                     "(config.train.eval_batches=0)")
  cache_dir = data_cfg.get("cache_dir") or None
  return stream.StreamedInput(
      share, tokenizer, data_cfg.seq_len, batch, seed=seed, window=int(data_cfg.stream_window),
      max_predictions=data_cfg.get("max_predictions") or None,
      cache_dir=os.path.expanduser(cache_dir) if cache_dir else None,
      key=json.dumps(key + [split, fraction, index, count, len(source)]))


def _file_documents(data_cfg: ml_collections.ConfigDict, split: str):
  """One split of the corpus built from ``corpus_files`` (built by process 0 first)."""
  from bort_jax.data import corpus, corpus_sources  # pylint: disable=import-outside-toplevel
  patterns = [p for p in data_cfg.corpus_files if p]
  files = corpus_sources.expand(patterns)
  if not files:
    raise FileNotFoundError(f"no corpus files match config.data.corpus_files={patterns}")
  name = data_cfg.get("corpus_name", "corpus")
  data_dir = os.path.expanduser(data_cfg.data_dir)
  build = lambda: corpus.build_corpus(
      files, data_dir, name=name,
      validation_fraction=float(data_cfg.get("validation_fraction", 0.01)))
  if jax.process_index() == 0:
    sources = build()
  sharding.barrier("bort_jax.pipelines.setup.build_corpus")
  if jax.process_index() != 0:
    sources = build()
  if split not in sources:
    raise ValueError(f"corpus {name!r} has no {split!r} split (it has {sorted(sources)}); "
                     "add documents or turn evaluation off (config.train.eval_batches=0)")
  return sources[split]


def _tfds_documents(data_cfg: ml_collections.ConfigDict, split: str) -> list[str]:
  """This process's documents of one split of the TFDS corpus ``corpus_tfds``."""
  from bort_jax.data import corpus_sources  # pylint: disable=import-outside-toplevel
  docs = corpus_sources.tfds_documents(
      data_cfg.corpus_tfds, field=data_cfg.get("corpus_field", "text"),
      split=data_cfg.get("corpus_split", "train"),
      data_dir=_tfds_data_dir(data_cfg),
      download=bool(data_cfg.get("download", False)), which=split,
      validation_fraction=float(data_cfg.get("validation_fraction", 0.01)),
      process_index=jax.process_index(), process_count=jax.process_count())
  if not docs:
    raise ValueError(f"config.data.corpus_tfds={data_cfg.corpus_tfds!r}: no {split!r} "
                     f"documents for process {jax.process_index()}; add documents or turn "
                     "evaluation off (config.train.eval_batches=0)")
  return docs


def _tfds_data_dir(data_cfg: ml_collections.ConfigDict) -> str | None:
  """``config.data.data_dir`` for TFDS (None: TFDS's default)."""
  return os.path.expanduser(data_cfg.data_dir) if data_cfg.get("data_dir") else None


# ----------------------------------------------------------------------------- checks


def _integer(block: str, cfg: Any, field: str, low: int, allowed: str) -> None:
  value = cfg.get(field)
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"config.{block}.{field}={value!r}: must be {allowed}")


def check_config(config: ml_collections.ConfigDict, paths: bool = True) -> None:
  """Checks the shared blocks of a run config before anything is created or written.

  Looks at whichever of ``train``, ``optim``, ``loss``, ``data``, ``student``, ``teacher`` and
  ``mesh`` the config has: integer fields and their ranges, the optimizer and its schedule, the
  loss kind, arch strings, teacher kinds, and whether the global batch divides over the mesh.

  Args:
    config: a run config (distillation, teacher adaptation or extraction).
    paths: also check that the input paths (teacher, student, tokenizer, corpus, an
      ``extract:WORKDIR`` result) exist; the demo turns this off for paths its earlier steps
      produce.

  Raises:
    ValueError: naming the field, its value and what is allowed.
  """
  from bort_jax.core import losses, optim  # pylint: disable=import-outside-toplevel
  if "train" in config:
    for field, low, allowed in (
        ("total_steps", 1, "an integer >= 1 (the number of training steps)"),
        ("log_every", 1, "an integer >= 1 (steps between metrics lines)"),
        ("checkpoint_every", 1, "an integer >= 1 (steps between checkpoints)"),
        ("keep_checkpoints", 1, "an integer >= 1 (checkpoints kept)"),
        ("eval_every", 0, "an integer >= 0 (0 turns evaluation off)"),
        ("eval_batches", 0, "an integer >= 0 (0 turns evaluation off)")):
      if field in config.train:
        _integer("train", config.train, field, low, allowed)
  if "optim" in config and "train" in config:
    optim.make_optimizer(optimizer_config(config))  # its own checks name the field
  if "loss" in config:
    if config.loss.kind not in losses.KD_KINDS:
      raise ValueError(f"config.loss.kind={config.loss.kind!r}: must be one of "
                       f"{', '.join(losses.KD_KINDS)}")
    if not config.loss.temperature > 0:
      raise ValueError(f"config.loss.temperature={config.loss.temperature!r}: must be > 0")
    _check_intermediate(config)
  if "data" in config:
    _check_data(config.data)
  if "teacher" in config:
    _check_teacher(config.teacher)
  if "student" in config and "arch" in config.student:
    _check_arch(config.student.arch, paths)
  if config.get("mesh") and "data" in config:
    sharding.check_batch_size(config.data.global_batch_size,
                              sharding.make_mesh(dict(config.mesh)))
  if paths:  # last: a bad value is reported before a missing file
    _check_paths(config)


INITS = ("random", "inherit")


def _check_intermediate(config: ml_collections.ConfigDict) -> None:
  """The student's init and the intermediate-layer loss fields."""
  from bort_jax.core import losses  # pylint: disable=import-outside-toplevel
  for field in ("alpha_hidden", "alpha_attn"):
    value = config.loss.get(field, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
      raise ValueError(f"config.loss.{field}={value!r}: must be a number >= 0 (0 turns the "
                       "term off)")
  layer_map = config.loss.get("layer_map", "uniform")
  if layer_map not in losses.LAYER_MAPS:
    raise ValueError(f"config.loss.layer_map={layer_map!r}: must be one of "
                     f"{', '.join(losses.LAYER_MAPS)}")
  student = config.get("student") or {}
  init = student.get("init", "random")
  if init not in INITS:
    raise ValueError(f"config.student.init={init!r}: must be one of {', '.join(INITS)}")
  if "importance_batches" in student:
    _integer("student", student, "importance_batches", 1, "an integer >= 1 (batches the "
             "teacher's importance is measured on)")
  if layer_map == "inherited" and init != "inherit":
    raise ValueError("config.loss.layer_map='inherited' needs config.student.init='inherit' "
                     "(a random student inherited no layers); use layer_map='uniform'")


def optimizer_config(config: ml_collections.ConfigDict) -> dict:
  """``config.optim`` with the schedule's length, which is ``config.train.total_steps``."""
  return {**config.optim.to_dict(), "total_steps": config.train.total_steps}


def _check_data(data_cfg: ml_collections.ConfigDict) -> None:
  _integer("data", data_cfg, "global_batch_size", 1, "an integer >= 1")
  _integer("data", data_cfg, "seq_len", 8, "an integer >= 8 (tokens per sequence)")
  if "max_predictions" in data_cfg:
    _integer("data", data_cfg, "max_predictions", 1, "an integer >= 1")
    if data_cfg.max_predictions > data_cfg.seq_len:
      raise ValueError(f"config.data.max_predictions={data_cfg.max_predictions}: must not "
                       f"exceed config.data.seq_len={data_cfg.seq_len}")


def _check_paths(config: ml_collections.ConfigDict) -> None:
  teacher = config.get("teacher") or {}
  if teacher.get("kind", "none") != "none" and not os.path.isdir(
      os.path.expanduser(teacher.path)):
    raise FileNotFoundError(f"config.teacher.path={teacher.path!r}: no such folder; give the "
                            f"teacher's folder (kind {teacher.kind!r})")
  student = config.get("student") or {}
  if student.get("path") and not os.path.isdir(os.path.expanduser(student.path)):
    raise FileNotFoundError(f"config.student.path={student.path!r}: no such folder; give the "
                            "folder of the model to adapt")
  if config.get("init_from") and "://" not in config.init_from and not os.path.isdir(
      os.path.expanduser(config.init_from)):
    raise FileNotFoundError(f"config.init_from={config.init_from!r}: no such folder; give a "
                            "checkpoint folder or leave it empty")
  data_cfg = config.get("data")
  if data_cfg is None or data_cfg.get("kind", "corpus") != "corpus":
    return
  from bort_jax.data import corpus_sources  # pylint: disable=import-outside-toplevel
  if data_cfg.get("corpus_tfds"):
    corpus_sources.check_tfds(
        data_cfg.corpus_tfds, data_cfg.get("corpus_field", "text"),
        data_cfg.get("corpus_split", "train"), _tfds_data_dir(data_cfg),
        bool(data_cfg.get("download", False)))
  elif not corpus_sources.expand(data_cfg.corpus_files):
    raise FileNotFoundError(f"config.data.corpus_files={tuple(data_cfg.corpus_files)!r}: no "
                            "file matches; give glob patterns of text files (the demo's "
                            "come from `bort-jax data fetch`)")
  tokenizer = os.path.expanduser(data_cfg.get("tokenizer") or "")
  if not os.path.isdir(tokenizer):
    raise FileNotFoundError(f"config.data.tokenizer={data_cfg.get('tokenizer')!r}: not a "
                            "folder; give the folder with the tokenizer's files")


def _check_teacher(teacher_cfg: ml_collections.ConfigDict) -> None:
  kind = teacher_cfg.get("kind", "none")
  if kind not in ("hf", "params", "none"):
    raise ValueError(f"config.teacher.kind={kind!r}: must be 'hf' (a Hugging Face folder), "
                     "'params' (our export format) or 'none'")
  if kind == "none":
    return
  if not teacher_cfg.get("path"):
    raise ValueError(f"config.teacher.path is empty: config.teacher.kind={kind!r} needs the "
                     "teacher's folder")


def _check_arch(spec: str, paths: bool) -> None:
  if spec.startswith("extract:"):
    if paths:
      resolve_student_arch(spec)
    return
  if spec in arch_lib.PRESETS:
    return
  try:
    arch_lib.Arch.parse(spec)
  except ValueError as error:
    raise ValueError(f"config.student.arch: {error} (or extract:WORKDIR, an extraction's "
                     "result)") from None
