"""``bort-jax export --format onnx``: a model as a folder that ONNX Runtime serves.

    bort-jax export --checkpoint runs/ft/best --out runs/ft/onnx --quantize int8

The checkpoint is any model the project makes or loads: our export (distillation's, teacher
adaptation's), a fine-tuned ``WORKDIR/best``, or a Hugging Face folder (BERT, RoBERTa, Bort;
MLM, sequence classification or multiple choice). The folder written (atomically: all of it or
nothing):

* ``model.onnx``: the float32 graph (``serve.onnx_graph``), checked against the JAX forward
  at export time on a batch with padding: a largest difference above 1e-4 stops the export
  (:class:`ParityError`), nothing written;
* ``model.int8.onnx`` with ``--quantize int8``: ONNX Runtime's dynamic quantisation of every
  weight MatMul (counted in the record). For a task model, both graphs are scored on the task's
  dev split at export time, and both are timed (batch 1, the task's sequence length, spinning
  off, alternating), so the record and the card state what int8 costs and gains;
* ``model_config.json``, ``finetune.json`` (a task model: task, head, labels, sequence length),
  the tokenizer files, ``serve.json`` (the record :mod:`serve.served` checks before serving:
  files with sha256, inputs and output, parity, int8 accuracy and speed) and ``README.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import numpy as np

from bort_jax.core import model as model_lib
from bort_jax.interop import export as export_lib
from bort_jax.runtime import fileio
from bort_jax.serve import runtime as runtime_lib

SERVE_FILE = "serve.json"
FILES = {"onnxruntime": "model.onnx", "onnxruntime-int8": "model.int8.onnx"}
PARITY_TOLERANCE = 1e-4
QUANTIZE = ("", "int8")


class ParityError(RuntimeError):
  """The exported graph does not compute what the JAX model computes (a bug, not bad input)."""


def _head_of(loaded) -> model_lib.HeadSpec:
  if loaded.head is not None:
    return loaded.head
  return model_lib.MLM if "mlm_head" in loaded.params else model_lib.NO_HEAD


def parity_batch(config, head: model_lib.HeadSpec, seq_len: int, seed: int = 0) -> dict:
  """Two rows of random real tokens (three choices each for multiple choice); the second row
  padded after half its length, so the mask and the pad positions are exercised."""
  rng = np.random.default_rng(seed)
  shape = (2, 3, seq_len) if head.kind == "multiple_choice" else (2, seq_len)
  ids = rng.integers(0, config.vocab_size, shape)
  ids = np.where(ids == config.pad_id, (config.pad_id + 1) % config.vocab_size, ids)
  mask = np.ones(shape, np.int32)
  mask[1, ..., max(seq_len // 2, 1):] = 0
  batch = {"input_ids": np.where(mask == 1, ids, config.pad_id).astype(np.int32),
           "attention_mask": mask}
  if config.type_vocab_size > 0:
    types = np.zeros(shape, np.int32)
    types[..., seq_len // 3:] = min(1, config.type_vocab_size - 1)
    batch["token_type_ids"] = types
  return batch


def check_parity(params, config, head: model_lib.HeadSpec, path: str, seq_len: int) -> float:
  """Largest |ONNX Runtime - JAX| of the graph at ``path`` on :func:`parity_batch`.

  Raises:
    ParityError: above :data:`PARITY_TOLERANCE`.
  """
  import jax  # pylint: disable=import-outside-toplevel
  batch = parity_batch(config, head, seq_len)
  out = jax.jit(lambda p, b: model_lib.apply(p, config, b, head=head))(params, batch)
  want = np.asarray(out["hidden"] if head.kind == "none" else out["logits"])
  got = runtime_lib.forward(runtime_lib.session(path, spinning=False))(batch)
  if got.shape != want.shape:
    raise ParityError(f"the exported graph gives {got.shape}, the JAX model {want.shape}")
  diff = float(np.max(np.abs(got - want)))
  if not diff <= PARITY_TOLERANCE:
    raise ParityError(f"the exported graph differs from the JAX forward by up to {diff:.3g} "
                      f"(allowed {PARITY_TOLERANCE:g}) on a {config.family} {config.arch} "
                      f"{head.kind} model; nothing was written. Please report it with the "
                      "checkpoint's model_config.json.")
  return diff


def time_graphs(paths: dict[str, str], batch: dict, rounds: int = 5, calls: int = 10
                ) -> dict[str, dict]:
  """Median and IQR (ms) of each graph on ``batch``: sessions without spinning, timed in
  alternating blocks of ``calls`` calls over ``rounds`` rounds (a slow spell hits all)."""
  from bort_jax.core import cost  # pylint: disable=import-outside-toplevel
  runs = {}
  for name, path in paths.items():
    run = runtime_lib.forward(runtime_lib.session(path, spinning=False))
    runs[name] = lambda run=run: run(batch)
  times: dict[str, list[float]] = {name: [] for name in runs}
  for r in range(rounds):
    order = list(runs) if r % 2 == 0 else list(runs)[::-1]
    for name in order:
      times[name] += cost.time_back_to_back(runs[name], calls, warmup=1)
  return {name: {k: v for k, v in cost.summarize_times(t).items()
                 if k in ("median_ms", "iqr_ms", "repeats")} for name, t in times.items()}


def dev_scores(spec, paths: dict[str, str], tokenizer, seq_len: int, data_dir: str | None,
               split: str | None, limit: int, log: Callable[[str], None]) -> dict:
  """Each graph's metrics on the task's dev split (``split``, default its first one)."""
  from bort_jax.finetune import compiled as compiled_lib  # pylint: disable=C0415
  from bort_jax.finetune import prepare  # pylint: disable=import-outside-toplevel
  from bort_jax.finetune import setup as setup_lib  # pylint: disable=import-outside-toplevel
  name = split or (spec.validation_splits or (None,))[0]
  if name is None or name not in spec.splits:
    raise setup_lib.InputError(f"--split {name!r}: task {spec.name!r} has no such labelled "
                               f"split; its dev splits: {', '.join(spec.validation_splits)}.")
  data = prepare.read_split(spec, name, data_dir, False, labelled=True, limit=limit)
  out = {"split": name, "examples": len(data.records), "metric": spec.metrics[0]}
  for runtime, path in paths.items():
    run = runtime_lib.forward(runtime_lib.session(path))
    start = time.perf_counter()
    preds, _ = compiled_lib.split_outputs(data, lambda b, run=run: dict(b, logits=run(b)),
                                          tokenizer, seq_len, 32)
    out[runtime] = compiled_lib.score(spec, preds)
    log(f"{runtime}: {spec.metrics[0]} {out[runtime][spec.metrics[0]]:.4f} on {name} "
        f"({len(data.records)} examples, {time.perf_counter() - start:.0f} s)")
  main = spec.metrics[0]
  out["change_points"] = 100.0 * (out["onnxruntime-int8"][main] - out["onnxruntime"][main])
  return out


@dataclasses.dataclass
class Source:
  """A model read for export, with what its export needs (built by :func:`read_source`)."""

  config: Any
  head: model_lib.HeadSpec
  params: Any
  spec: Any  # the task (a model with a task head), else None
  meta: dict  # what finetune.json of the export holds ({} without a task head)
  seq_len: int
  tokenizer: Any  # None when none was found (allowed unless int8 needs a dev score)


def read_source(checkpoint: str, *, quantize: str = "", task: str | None = None,
                split: str | None = None, data_dir: str | None = None, tokenizer: str = "",
                seq_len: int | None = None) -> Source:
  """Reads and checks what :func:`export` is given (arguments as its own), writing nothing.

  Raises:
    InputError: any argument that does not fit the checkpoint.
  """
  from bort_jax.finetune import evaluate  # pylint: disable=import-outside-toplevel
  from bort_jax.finetune import setup as setup_lib  # pylint: disable=import-outside-toplevel
  from bort_jax.interop import hf_tokenizer  # pylint: disable=import-outside-toplevel
  if quantize not in QUANTIZE:
    raise setup_lib.InputError(f"--quantize={quantize!r}: allowed: int8 (or leave it out)")
  loaded = setup_lib.load_model(checkpoint, field="--checkpoint", keep_mlm_head=True)
  config, head, spec, meta = loaded.config, _head_of(loaded), None, {}
  params = loaded.params
  if loaded.head is not None:
    spec = evaluate.checkpoint_task(loaded, checkpoint, task, data_dir)
    params, _ = setup_lib.fit_head(loaded, spec, training=False, field="--checkpoint")
    meta = dict(loaded.meta, task=spec.name, kind=spec.kind, num_labels=spec.num_labels,
                layout=head.layout, label_names=list(spec.label_names))
  elif task:
    raise setup_lib.InputError(f"--task {task}: --checkpoint {checkpoint!r} has no task head "
                               f"(a {head.kind} model); leave --task out.")
  seq_len = int(seq_len or meta.get("seq_len") or min(128, config.max_length))
  if not 2 <= seq_len <= config.max_length:
    raise setup_lib.InputError(f"--seq-len {seq_len} must be in 2..{config.max_length}.")
  meta["seq_len"] = seq_len
  tok_path = hf_tokenizer.find_tokenizer(loaded.path, tokenizer)
  if tokenizer and tok_path is None:
    raise setup_lib.InputError(f"--tokenizer {tokenizer!r}: no tokenizer files there.")
  if quantize and spec is not None:
    if tok_path is None:  # the dev score needs one: the message says where to name it
      setup_lib.tokenizer_dir(loaded.path, tokenizer, field="--tokenizer")
    dev_name = split or (spec.validation_splits or ("",))[0]
    if not dev_name or dev_name not in spec.validation_splits:
      raise setup_lib.InputError(f"--split {dev_name!r} is not a labelled dev split of "
                                 f"{spec.name!r}; its dev splits: "
                                 f"{', '.join(spec.validation_splits) or 'none'}.")
  tok = setup_lib.load_tokenizer(tok_path, config, field="--tokenizer") if tok_path else None
  return Source(config, head, params, spec, meta, seq_len, tok)


def _int8(source: Source, paths: dict, weight_matmuls: int, split: str | None,
          data_dir: str | None, dev_limit: int, log: Callable[[str], None]) -> dict:
  """Writes the int8 graph beside the float32 one (``paths`` gains it); its record: MatMuls
  quantised, latency of both graphs, and (a task model) both graphs' dev scores."""
  paths["onnxruntime-int8"] = os.path.join(os.path.dirname(paths["onnxruntime"]),
                                           FILES["onnxruntime-int8"])
  runtime_lib.quantize_int8(paths["onnxruntime"], paths["onnxruntime-int8"])
  after = runtime_lib.count_ops(paths["onnxruntime-int8"])
  out = {"matmuls_quantized": after.get("MatMulInteger", 0), "weight_matmuls": weight_matmuls,
         "matmuls_left_float": after.get("MatMul", 0)}
  log(f"int8: {out['matmuls_quantized']} of {weight_matmuls} weight MatMuls quantised")
  one = {k: v[:1] for k, v in parity_batch(source.config, source.head, source.seq_len).items()}
  out["latency"] = time_graphs(paths, one)
  fp, q8 = (out["latency"][k]["median_ms"] for k in paths)
  out["speedup"] = fp / q8
  log(f"latency at batch 1 x {source.seq_len}: float32 {fp:.1f} ms, int8 {q8:.1f} ms "
      f"({fp / q8:.2f}x)")
  if source.spec is not None:
    out["dev"] = dev_scores(source.spec, paths, source.tokenizer, source.seq_len, data_dir,
                            split, dev_limit, log)
  return out


def export(checkpoint: str, out: str, *, quantize: str = "", task: str | None = None,
           split: str | None = None, data_dir: str | None = None, tokenizer: str = "",
           seq_len: int | None = None, dev_limit: int = 0,
           log: Callable[[str], None] = print) -> dict:
  """Writes the ONNX folder of a model (see the module docstring).

  Args:
    checkpoint: our export, a fine-tuned ``WORKDIR/best`` or a Hugging Face folder.
    out: the folder to write (replaced whole if it exists).
    quantize: ``""`` or ``"int8"`` (also write and check the int8 graph).
    task: the task of a model with a task head (default: the one it was fine-tuned on).
    split: the dev split the int8 graph is scored on (default: the task's first).
    data_dir: the TFDS data folder of a TFDS task.
    tokenizer: the tokenizer folder (default: the checkpoint's).
    seq_len: the sequence length to check and time at (default: the fine-tuning run's, else
      128 or the model's longest).
    dev_limit: score at most this many dev records (0: all of them).
    log: progress lines.

  Returns:
    The record written to ``serve.json``.
  """
  runtime_lib.require()
  import onnx  # pylint: disable=import-outside-toplevel

  from bort_jax.interop import hf_tokenizer  # pylint: disable=import-outside-toplevel
  from bort_jax.serve import card as card_lib  # pylint: disable=import-outside-toplevel
  from bort_jax.serve import onnx_graph  # pylint: disable=import-outside-toplevel
  src = read_source(checkpoint, quantize=quantize, task=task, split=split, data_dir=data_dir,
                    tokenizer=tokenizer, seq_len=seq_len)
  config, head = src.config, src.head
  record: dict[str, Any] = {
      "format": "onnx", "opset": onnx_graph.OPSET, "producer": "bort_jax",
      "family": config.family, "arch": str(config.arch),
      "head": {"kind": head.kind, "num_labels": head.num_labels, "layout": head.layout},
      "task": src.meta.get("task"), "label_names": src.meta.get("label_names", []),
      "seq_len": src.seq_len, "inputs": list(onnx_graph.input_names(config)),
      "output": onnx_graph.output_name(head), "source": checkpoint}
  with fileio.atomic_dir(out) as tmp:
    start = time.perf_counter()
    graph = onnx_graph.build(src.params, config, head, doc=f"bort_jax {config.family} "
                             f"{config.arch} {head.kind} model")
    paths = {"onnxruntime": os.path.join(tmp, FILES["onnxruntime"])}
    onnx.save(graph, paths["onnxruntime"])
    weight_matmuls = len(weight_matmuls_of(graph))
    del graph
    log(f"graph written ({time.perf_counter() - start:.0f} s); checking it against JAX")
    diff = check_parity(src.params, config, head, paths["onnxruntime"], src.seq_len)
    record["parity"] = {"max_abs_diff": diff, "tolerance": PARITY_TOLERANCE,
                        "batch": "2 rows, the second half padded", "seq_len": src.seq_len}
    log(f"parity: largest |onnxruntime - jax| {diff:.2e}")
    if quantize:
      record["int8"] = _int8(src, paths, weight_matmuls, split, data_dir, dev_limit, log)
    _write_json(os.path.join(tmp, export_lib.MODEL_CONFIG_FILE), config.to_dict())
    if src.spec is not None:
      _write_json(os.path.join(tmp, export_lib.FINETUNE_FILE), src.meta)
    record["tokenizer_files"] = (
        hf_tokenizer.write_hf_tokenizer(src.tokenizer, tmp, config.max_length)
        if src.tokenizer is not None else [])
    record["files"] = {os.path.basename(p): {"sha256": fileio.sha256_file(p),
                                             "bytes": os.path.getsize(p)}
                       for p in paths.values()}
    _write_json(os.path.join(tmp, SERVE_FILE), record)
    with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
      f.write(card_lib.render(record, os.path.basename(os.path.abspath(out))))
  return record


def weight_matmuls_of(proto) -> list:
  """The MatMul nodes of a model whose second input is an initializer (a weight)."""
  graph = proto.graph
  weights = {i.name for i in graph.initializer}
  return [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def _write_json(path: str, value: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(fileio.to_jsonable(value), f, indent=2, sort_keys=True)
