"""The costs of an extraction: i per candidate, the maximum point T and the budget rule's
feasible set (``pipelines/extract.py``; docs/EXTRACTION.md).

Everything here runs before the first proxy training, so a budget no candidate meets, like any
other bad input, is refused before the search spends anything.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Sequence

import jax
import ml_collections

from bort_jax.core import arch as arch_lib
from bort_jax.core import cost
from bort_jax.runtime.fileio import atomic_write_text
from bort_jax.search import select


def selection(config: ml_collections.ConfigDict) -> select.Selection:
  """``config.select`` checked (absent: the paper's rule W); a speed limit needs a teacher.

  Raises:
    ValueError: naming the field, its value and what is allowed.
  """
  sel = select.validate(config.get("select"), where="config.select.")
  if sel.budget and sel.min_speedup and config.teacher.get("kind", "none") == "none":
    raise ValueError(f"config.select.min_speedup={sel.min_speedup:g} needs a teacher: the "
                     "speed-up is i(teacher) / i(candidate), and config.teacher.kind is 'none' "
                     "(give a teacher, or set config.select.min_speedup=0 and use "
                     "max_latency_ms or max_params)")
  return sel


# ----------------------------------------------------------------------------- costs


def latency_table_path(cost_cfg: ml_collections.ConfigDict) -> str:
  """Latency table, shared across runs: one per device kind and runtime (a JAX table keeps
  its old name, ``latency_<device>.json``; ``..._onnxruntime-int8.json`` beside it)."""
  if cost_cfg.get("latency_table"):
    return cost_cfg.latency_table
  from bort_jax.data import fetch  # the one place that knows the cache folder
  cache = fetch.default_cache_dir()
  device = jax.devices()[0]
  kind = f"{device.platform}_{device.device_kind}".replace(" ", "_").replace("/", "_")
  runtime = cost_cfg.get("runtime", "jax")
  return os.path.join(cache, f"latency_{kind}" + ("" if runtime == "jax" else f"_{runtime}")
                      + ".json")


def check_runtime(cost_cfg: ml_collections.ConfigDict) -> str:
  """``config.cost.runtime`` (default jax), known and installed.

  Raises:
    ValueError: unknown, or an ONNX Runtime form without the serve extra.
  """
  from bort_jax.serve import runtime  # pylint: disable=import-outside-toplevel
  return runtime.check_runtime(cost_cfg.get("runtime", "jax"), "config.cost.runtime")


def inference_costs(configs: Sequence[arch_lib.ModelConfig], cost_cfg) -> tuple[list, str]:
  """i for every candidate: analytic FLOPs or measured latency (ms) in ``cost.runtime``, and
  its unit label."""
  from bort_jax.serve import runtime  # pylint: disable=import-outside-toplevel
  b, t = cost_cfg.batch, cost_cfg.seq_len
  if cost_cfg.inference == "flops":
    return [float(cost.forward_flops(c, b, t)["total"]) for c in configs], "forward FLOPs"
  if cost_cfg.inference != "latency":
    raise ValueError(f"cost.inference must be 'flops' or 'latency', got {cost_cfg.inference!r}")
  name = check_runtime(cost_cfg)
  path = latency_table_path(cost_cfg)
  table = {}
  if os.path.exists(path):
    with open(path) as f:
      table = json.load(f)
  out = []
  for index, c in enumerate(configs):
    key = f"{c.arch}|V{c.vocab_size}|B{b}|T{t}"
    if key not in table:
      measured = runtime.measure_latency(c, b, t, name, repeats=cost_cfg.repeats)
      table[key] = measured["median_ms"]
      logging.info("latency %d/%d %s (%s): %.2f ms", index + 1, len(configs), c.arch, name,
                   table[key])
      if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        atomic_write_text(path, json.dumps(table, indent=1, sort_keys=True))
    out.append(float(table[key]))
  unit = "latency (ms)" if name == "jax" else f"latency in {name} (ms)"
  return out, unit


def shape_cost(config, base: arch_lib.ModelConfig, teacher_cfg, name: str,
               field: str = "config.fptas.maximum") -> tuple[float, float]:
  """(p, i) of a shape outside the space, costed like the candidates.

  Args:
    config: the extraction config (``cost`` is read).
    base: the candidates' shared config (family, vocabulary).
    teacher_cfg: the teacher's config, or None.
    name: ``"teacher"`` (the teacher's own shape) or a shape name such as
      ``"D6-A12-H384-I1536"`` (costed with the candidates' family).
    field: the config field that named it, for messages.

  Returns:
    (p, i) in the candidates' size and inference measures.
  """
  if name == "teacher":
    if teacher_cfg is None:
      raise ValueError(f"{field}='teacher' needs a teacher (config.teacher.kind 'params' or "
                       "'hf'); give T by name instead")
    point = teacher_cfg
  else:
    try:
      point = base.replace(arch=arch_lib.Arch.parse(name))
    except ValueError as err:
      raise ValueError(f"{field}={name!r}: not a candidate, 'teacher' or an architecture name "
                       f"such as 'D6-A12-H384-I1536' ({err})") from None
  return (float(cost.param_counts(point)[config.cost.size]),
          inference_costs([point], config.cost)[0][0])


def reference_point(config, base: arch_lib.ModelConfig, teacher_cfg, candidates: Sequence[str]):
  """T for W from ``config.fptas.maximum``: None (the space's largest p and i), a candidate's
  name, or the (p_T, i_T) of an architecture outside the space: ``"teacher"`` (the teacher's
  own shape, as in the paper, where T was BERT-large, the teacher's shape) or a name such as
  ``"D6-A12-H384-I1536"``, costed with the same size and inference measures as the candidates.
  """
  name = config.fptas.get("maximum") or ""
  if not name or name in [str(c) for c in candidates]:
    return name or None
  p_t, i_t = shape_cost(config, base, teacher_cfg, name)
  logging.info("maximum point T: %s (p_T %.4g, i_T %.4g)", name, p_t, i_t)
  return (p_t, i_t)


def budget_of(config: ml_collections.ConfigDict, base: arch_lib.ModelConfig, teacher_cfg,
              configs: Sequence[arch_lib.ModelConfig], p: Sequence[float], i: Sequence[float],
              i_label: str) -> select.Budget | None:
  """The budget rule's feasible set, before any training; None with rule "w".

  The speed-up's reference is the teacher's shape costed like T = "teacher"
  (:func:`shape_cost`). A latency limit reads measured latencies: i itself when i is latency,
  else the per-device latency table (measured once per candidate and kept).

  Raises:
    ValueError: no candidate meets the budget (with the fastest and smallest one's figures).
  """
  sel = selection(config)
  if not sel.budget:
    return None
  i_ref = (shape_cost(config, base, teacher_cfg, "teacher", "config.select.min_speedup")[1]
           if teacher_cfg is not None else None)
  latency = None
  if sel.max_latency_ms:
    latency = (list(i) if config.cost.inference == "latency" else inference_costs(
        configs, ml_collections.ConfigDict(dict(config.cost.to_dict(), inference="latency")))[0])
  size = ("total" if config.cost.size == "total" else "effective") + " parameters"
  return select.apply(sel, [str(c.arch) for c in configs], p, i, i_ref=i_ref,
                      latency_ms=latency, i_label=i_label, size=size)


def report_columns(config, configs, counts, budget: select.Budget | None = None) -> dict:
  """Size and cost columns of the result table that p and i do not already show.

  The Pareto plot's size axis is ``params_effective``, or p itself when p is that count. With
  a budget: each candidate's speed-up over the teacher and, when a latency limit measured it
  beside FLOPs, its latency.
  """
  columns = {}
  for size in ("total", "effective"):
    if config.cost.size != size:
      columns[f"params_{size}"] = [c[size] for c in counts]
  if config.cost.inference != "flops":
    columns["flops"] = [cost.forward_flops(c, config.cost.batch, config.cost.seq_len)["total"]
                        for c in configs]
  if budget is not None and budget.speedup is not None:
    columns["speedup"] = list(budget.speedup)
  if budget is not None and budget.latency_ms is not None and config.cost.inference == "flops":
    columns["latency_ms"] = list(budget.latency_ms)
  return columns
