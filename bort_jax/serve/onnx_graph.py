"""The ONNX graph of one of our models, built node by node from its parameters.

It computes what ``core.model.apply`` computes in evaluation (no dropout, no architecture
mask) for the three families and every head:

* inputs (int64): ``input_ids`` and ``attention_mask``, plus ``token_type_ids`` when the
  family has a token-type table (BERT, RoBERTa; Bort has none); ``[batch, length]``, or
  ``[batch, choices, length]`` for a multiple-choice head; every axis is dynamic.
* output ``logits``: ``[batch, labels]`` (classification), ``[batch]`` (regression),
  ``[batch, choices]`` (multiple choice), ``[batch, length, vocab]`` (MLM); a model without
  a head gives ``last_hidden_state`` ``[batch, length, hidden]``.

Every projection is a ``MatMul`` whose weight is an initializer, so that ONNX Runtime's
dynamic quantisation makes each of them an int8 ``MatMulInteger`` (a graph traced through
``jnp.einsum`` would give ``Einsum`` nodes, which it leaves in float32). LayerNorm is the
``LayerNormalization`` op; GELU is written out with ``Erf`` (or ``Tanh``), which ONNX Runtime
fuses. The MLM decoder reads the word table through ``Gemm(transB=1)``, so the table is stored
once. Initializers are named by their parameter path (``encoder.layer_0.attention.query.kernel``).
"""

from __future__ import annotations

import math

import numpy as np
from flax import traverse_util

from bort_jax.core import model as model_lib
from bort_jax.core.arch import ModelConfig

OPSET = 17
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def input_names(config: ModelConfig) -> tuple[str, ...]:
  """The graph's inputs for a model of ``config`` (token types only with a type table)."""
  return INPUTS if config.type_vocab_size > 0 else INPUTS[:2]


def output_name(head: model_lib.HeadSpec) -> str:
  return "last_hidden_state" if head.kind == "none" else "logits"


class _Builder:
  """Nodes and initializers with unique names; helpers for the few patterns the model uses."""

  def __init__(self):
    import onnx  # pylint: disable=import-outside-toplevel
    from onnx import helper, numpy_helper  # pylint: disable=import-outside-toplevel
    self.onnx, self.helper, self.numpy_helper = onnx, helper, numpy_helper
    self.nodes, self.initializers, self._names = [], [], set()
    self._consts: dict[tuple, str] = {}

  def weight(self, name: str, array) -> str:
    """An initializer named ``name`` (a parameter)."""
    array = np.ascontiguousarray(np.asarray(array, np.float32))
    self.initializers.append(self.numpy_helper.from_array(array, name))
    self._names.add(name)
    return name

  def const(self, value, dtype=np.float32) -> str:
    """A small constant, shared between the nodes that use the same value."""
    array = np.asarray(value, dtype)
    key = (array.dtype.str, array.shape, array.tobytes())
    if key not in self._consts:
      name = self._unique("const")
      self.initializers.append(self.numpy_helper.from_array(array, name))
      self._consts[key] = name
    return self._consts[key]

  def _unique(self, hint: str) -> str:
    name, n = hint, 0
    while name in self._names:
      n += 1
      name = f"{hint}_{n}"
    self._names.add(name)
    return name

  def op(self, op_type: str, inputs: list[str], hint: str, **attrs) -> str:
    out = self._unique(f"{hint}/{op_type}")
    self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=out, **attrs))
    return out

  def linear(self, x: str, kernel, bias, name: str) -> str:
    y = self.op("MatMul", [x, self.weight(f"{name}.kernel", kernel)], name)
    return self.op("Add", [y, self.weight(f"{name}.bias", bias)], name)

  def layer_norm(self, x: str, params: dict, eps: float, name: str) -> str:
    return self.op("LayerNormalization", [x, self.weight(f"{name}.scale", params["scale"]),
                                          self.weight(f"{name}.bias", params["bias"])],
                   name, axis=-1, epsilon=float(eps))

  def gelu(self, x: str, activation: str, name: str) -> str:
    if activation == "gelu":  # 0.5 x (1 + erf(x / sqrt 2))
      inner = self.op("Erf", [self.op("Div", [x, self.const(math.sqrt(2.0))], name)], name)
    else:  # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
      cube = self.op("Mul", [self.op("Mul", [x, x], name), x], name)
      poly = self.op("Add", [x, self.op("Mul", [cube, self.const(0.044715)], name)], name)
      inner = self.op("Tanh", [self.op("Mul", [poly, self.const(math.sqrt(2 / math.pi))],
                                       name)], name)
    one_plus = self.op("Add", [inner, self.const(1.0)], name)
    return self.op("Mul", [self.op("Mul", [x, one_plus], name), self.const(0.5)], name)


def _embeddings(b: _Builder, p: dict, cfg: ModelConfig, ids: str, types: str | None) -> str:
  name = "embeddings"
  x = b.op("Gather", [b.weight(f"{name}.word_embeddings", p["word_embeddings"]["embedding"]),
                      ids], name)
  table = b.weight(f"{name}.position_embeddings", p["position_embeddings"]["embedding"])
  if cfg.family == "roberta":
    # Real tokens count from position_offset; pad tokens sit at position_offset - 1.
    real = b.op("Cast", [b.op("Not", [b.op("Equal", [ids, b.const(cfg.pad_id, np.int64)],
                                           name)], name)], name, to=7)  # int64
    count = b.op("Mul", [b.op("CumSum", [real, b.const(1, np.int64)], name), real], name)
    positions = b.op("Add", [count, b.const(cfg.position_offset - 1, np.int64)], name)
    x = b.op("Add", [x, b.op("Gather", [table, positions], name)], name)
  else:
    length = b.op("Shape", [ids], name, start=1, end=2)
    end = b.op("Add", [length, b.const([cfg.position_offset], np.int64)], name)
    rows = b.op("Slice", [table, b.const([cfg.position_offset], np.int64), end,
                          b.const([0], np.int64)], name)
    x = b.op("Add", [x, rows], name)
  if types is not None:
    type_table = b.weight(f"{name}.token_type_embeddings",
                          p["token_type_embeddings"]["embedding"])
    x = b.op("Add", [x, b.op("Gather", [type_table, types], name)], name)
  return b.layer_norm(x, p["LayerNorm"], cfg.layer_norm_eps, f"{name}.LayerNorm")


def _layer(b: _Builder, p: dict, cfg: ModelConfig, x: str, keep: str, name: str) -> str:
  arch = cfg.arch
  width = arch.heads * arch.head_size
  att = p["attention"]
  split = b.const([0, 0, arch.heads, arch.head_size], np.int64)

  def project(which: str, perm: list[int]) -> str:
    kernel = np.asarray(att[which]["kernel"]).reshape(arch.hidden, width)
    flat = b.linear(x, kernel, np.asarray(att[which]["bias"]).reshape(width),
                    f"{name}.attention.{which}")
    return b.op("Transpose", [b.op("Reshape", [flat, split], name)], name, perm=perm)

  q = project("query", [0, 2, 1, 3])  # [B, heads, T, d]
  k = project("key", [0, 2, 3, 1])  # [B, heads, d, T]
  v = project("value", [0, 2, 1, 3])
  logits = b.op("Mul", [b.op("MatMul", [q, k], name), b.const(1.0 / math.sqrt(arch.head_size))],
                name)
  logits = b.op("Where", [keep, logits, b.const(np.finfo(np.float32).min)], name)
  probs = b.op("Softmax", [logits], name, axis=-1)
  context = b.op("Transpose", [b.op("MatMul", [probs, v], name)], name, perm=[0, 2, 1, 3])
  context = b.op("Reshape", [context, b.const([0, 0, width], np.int64)], name)
  out = b.linear(context, np.asarray(att["output"]["kernel"]).reshape(width, arch.hidden),
                 att["output"]["bias"], f"{name}.attention.output")
  y = b.layer_norm(b.op("Add", [out, x], name), att["LayerNorm"], cfg.layer_norm_eps,
                   f"{name}.attention.LayerNorm")
  inter = b.gelu(b.linear(y, p["intermediate"]["kernel"], p["intermediate"]["bias"],
                          f"{name}.intermediate"), cfg.activation, f"{name}.intermediate")
  out = b.linear(inter, p["output"]["kernel"], p["output"]["bias"], f"{name}.output")
  return b.layer_norm(b.op("Add", [out, y], name), p["output"]["LayerNorm"],
                      cfg.layer_norm_eps, f"{name}.output.LayerNorm")


def _head(b: _Builder, p: dict, cfg: ModelConfig, head: model_lib.HeadSpec, x: str,
          lead: str | None) -> str:
  """The head's output from the final states ``x`` ([B*, T, H]); ``lead`` is [B, C] for MC."""
  if head.kind == "none":
    return x
  if head.kind == "mlm":
    m = p["mlm_head"]
    h = b.gelu(b.linear(x, m["dense"]["kernel"], m["dense"]["bias"], "mlm_head.dense"),
               cfg.activation, "mlm_head")
    h = b.layer_norm(h, m["LayerNorm"], cfg.mlm_layer_norm_eps, "mlm_head.LayerNorm")
    rows = b.op("Reshape", [h, b.const([-1, cfg.arch.hidden], np.int64)], "mlm_head")
    # The decoder is the word table itself (tied), read transposed.
    scores = b.op("Gemm", [rows, "embeddings.word_embeddings",
                           b.weight("mlm_head.bias", m["bias"])], "mlm_head", transB=1)
    shape = b.op("Concat", [b.op("Shape", [x], "mlm_head", start=0, end=2),
                            b.const([cfg.vocab_size], np.int64)], "mlm_head", axis=0)
    return b.op("Reshape", [scores, shape], "mlm_head")
  first = b.op("Gather", [x, b.const(0, np.int64)], "head", axis=1)  # [B*, H]
  if head.uses_pooler(cfg.family):
    pooled = b.op("Tanh", [b.linear(first, p["pooler"]["kernel"], p["pooler"]["bias"],
                                    "pooler")], "pooler")
    c = p["classifier"]
    logits = b.linear(pooled, c["kernel"], c["bias"], "classifier")
  else:
    c = p["classifier"]
    h = b.op("Tanh", [b.linear(first, c["dense"]["kernel"], c["dense"]["bias"],
                               "classifier.dense")], "classifier")
    logits = b.linear(h, c["out_proj"]["kernel"], c["out_proj"]["bias"], "classifier.out_proj")
  if head.kind == "classification":
    return logits
  if head.kind == "regression":
    return b.op("Reshape", [logits, b.const([-1], np.int64)], "head")
  return b.op("Reshape", [logits, lead], "head")  # multiple choice: [B, C]


def build(params: dict, config: ModelConfig, head: model_lib.HeadSpec = model_lib.NO_HEAD,
          *, doc: str = ""):
  """The ``onnx.ModelProto`` of the model ``(params, config)`` carrying ``head``.

  Args:
    params: the parameter tree (host or device arrays) with the head's parameters.
    config: its model config.
    head: the head to compute (``model.MLM``, ``model.NO_HEAD`` or a task head).
    doc: the graph's doc string (what the model is).

  Raises:
    ValueError: a parameter the head needs is missing.
  """
  head = head.resolve(config.family)
  b = _Builder()
  helper, tensor = b.helper, b.onnx.TensorProto
  names = input_names(config)
  choice = head.kind == "multiple_choice"
  axes = ["batch", "choices", "length"] if choice else ["batch", "length"]
  inputs = [helper.make_tensor_value_info(n, tensor.INT64, axes) for n in names]
  flat, lead = dict(zip(names, names)), None
  if choice:  # [B, C, T] -> [B*C, T], as the model flattens its leading axes
    lead = b.op("Shape", ["input_ids"], "inputs", start=0, end=2)
    rows = b.op("Concat", [b.const([-1], np.int64),
                           b.op("Shape", ["input_ids"], "inputs", start=2, end=3)],
                "inputs", axis=0)
    flat = {n: b.op("Reshape", [n, rows], f"inputs.{n}") for n in names}
  host = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
  tree = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in host.items()})
  try:
    x = _embeddings(b, tree["embeddings"], config, flat["input_ids"],
                    flat.get("token_type_ids"))
    keep = b.op("Unsqueeze", [b.op("Cast", [flat["attention_mask"]], "mask", to=9),  # bool
                              b.const([1, 2], np.int64)], "mask")
    for i in range(config.arch.depth):
      x = _layer(b, tree["encoder"][f"layer_{i}"], config, x, keep, f"encoder.layer_{i}")
    out = _head(b, tree, config, head, x, lead)
  except KeyError as error:
    raise ValueError(f"the parameters have no {error.args[0]!r} entry, which a {config.family} "
                     f"model with a {head.kind} head needs") from None
  b.nodes.append(helper.make_node("Identity", [out], [output_name(head)], name="output"))
  dims = {"classification": ["batch", head.num_labels], "regression": ["batch"],
          "multiple_choice": ["batch", "choices"], "mlm": ["batch", "length", config.vocab_size],
          "none": ["batch", "length", config.arch.hidden]}[head.kind]
  outputs = [helper.make_tensor_value_info(output_name(head), tensor.FLOAT, dims)]
  graph = helper.make_graph(b.nodes, "bort_jax", inputs, outputs, b.initializers)
  proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                            producer_name="bort_jax", doc_string=doc)
  proto.ir_version = 8  # opset 17's IR version, read by every ONNX Runtime since 1.13
  b.onnx.checker.check_model(proto)
  return proto
