"""Optimal subarchitecture extraction (docs/BORT.md section 3): the W-coefficient FPTAS, end to end.

1. Enumerate the search space; compute every candidate's parameter size p (exact counts) and
   inference cost i (analytic FLOPs, or the measured latency of its compiled forward pass on
   this device, kept in a per-device latency table so later runs reuse it).
2. Find the maximum point T; sort by p and partition into intervals of eps candidates.
3. Train each interval's representatives for s proxy steps under every hyperparameter set
   theta (all at once in vmapped, bucketed populations, ``proxy.py``), score the proxy error e
   on a held-out batch, compute W, keep the best theta.
4. Return the candidate of largest W with the full table.

Outputs in the workdir: ``journal.jsonl`` (one line per finished candidate and theta; a killed
run resumes without redoing them), ``results.md`` / ``results.csv`` / ``results.json`` sorted
by W, ``pareto.png``, ``chosen_arch.txt`` and ``ledger.json`` (wall time, compile time and count,
FLOPs spent).

    bort-jax extract --config=configs/extract_demo.py --workdir=runs/extract
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bort_jax.core import arch as arch_lib
from bort_jax.core import cost, model
from bort_jax.search import buckets, fptas, proxy, report
from bort_jax.runtime import sharding
from bort_jax.runtime.fileio import atomic_write_text
from bort_jax.core.model import MLM


def search_space(space_cfg: Mapping[str, Any]) -> list[arch_lib.Arch]:
  """The candidates of ``config.space``; an empty result is an error, not an empty search."""
  space = arch_lib.SearchSpace(depth=tuple(space_cfg["depth"]), heads=tuple(space_cfg["heads"]),
                               hidden=tuple(space_cfg["hidden"]),
                               intermediate=tuple(space_cfg["intermediate"]))
  candidates = space.enumerate()
  if not candidates:
    raise ValueError(
        f"the search space {dict(space_cfg)} has no candidate once its constraints apply "
        "(every hidden size must be divisible by some head count)")
  return candidates


def validate(config: ml_collections.ConfigDict, n: int) -> fptas.Settings:
  """Checks eps, the interval rule and Theta before anything is built; returns the settings."""
  settings = fptas.validate(config.fptas.eps, config.fptas.rule,
                            [dict(t) for t in config.fptas.thetas], n,
                            check_theta=proxy.check_theta, where="fptas.")
  if config.proxy.steps < 1:
    raise ValueError(f"proxy.steps must be >= 1, got {config.proxy.steps}")
  return settings


# ----------------------------------------------------------------------------- costs


def latency_table_path(cost_cfg: ml_collections.ConfigDict) -> str:
  """Per-device latency table, shared across runs (keyed by device kind)."""
  if cost_cfg.get("latency_table"):
    return cost_cfg.latency_table
  from bort_jax.data import fetch  # the one place that knows the cache folder
  cache = fetch.default_cache_dir()
  device = jax.devices()[0]
  kind = f"{device.platform}_{device.device_kind}".replace(" ", "_").replace("/", "_")
  return os.path.join(cache, f"latency_{kind}.json")


def inference_costs(configs: Sequence[arch_lib.ModelConfig], cost_cfg) -> tuple[list, str]:
  """i for every candidate: analytic FLOPs or measured latency (ms), and its unit label."""
  b, t = cost_cfg.batch, cost_cfg.seq_len
  if cost_cfg.inference == "flops":
    return [float(cost.forward_flops(c, b, t)["total"]) for c in configs], "forward FLOPs"
  if cost_cfg.inference != "latency":
    raise ValueError(f"cost.inference must be 'flops' or 'latency', got {cost_cfg.inference!r}")
  path = latency_table_path(cost_cfg)
  table = {}
  if os.path.exists(path):
    with open(path) as f:
      table = json.load(f)
  out = []
  for index, c in enumerate(configs):
    key = f"{c.arch}|V{c.vocab_size}|B{b}|T{t}"
    if key not in table:
      measured = cost.measure_latency(c, b, t, repeats=cost_cfg.repeats)
      table[key] = measured["median_ms"]
      logging.info("latency %d/%d %s: %.2f ms", index + 1, len(configs), c.arch, table[key])
      if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        atomic_write_text(path, json.dumps(table, indent=1, sort_keys=True))
    out.append(float(table[key]))
  return out, "latency (ms)"


# ----------------------------------------------------------------------------- data


def synthetic_batch(rng: np.random.Generator, vocab: int, batch: int, seq_len: int,
                    predictions: int, special: int = 5) -> dict:
  """Random tokens with random masked positions: for tests and for spaces with no corpus."""
  ids = rng.integers(special, vocab, size=(batch, seq_len), dtype=np.int32)
  positions = np.stack([np.sort(rng.choice(np.arange(1, seq_len), predictions, replace=False))
                        for _ in range(batch)]).astype(np.int32)
  labels = np.take_along_axis(ids, positions, axis=1)
  corrupted = ids.copy()
  np.put_along_axis(corrupted, positions, 1, axis=1)
  return {"input_ids": corrupted, "attention_mask": np.ones_like(ids),
          "token_type_ids": np.zeros_like(ids), "masked_positions": positions,
          "masked_labels": labels.astype(np.int32),
          "masked_weights": np.ones(positions.shape, np.float32)}


def proxy_batches(config: ml_collections.ConfigDict, base: arch_lib.ModelConfig,
                  family: str) -> tuple[list[dict], dict]:
  """The s training batches and the held-out batch B of the proxy phase."""
  d, steps = config.data, config.proxy.steps
  if d.kind == "synthetic":
    rng = np.random.default_rng([config.seed, 7])
    make = lambda: synthetic_batch(rng, base.vocab_size, d.global_batch_size, d.seq_len,
                                   d.max_predictions)
    return [make() for _ in range(steps)], make()
  if d.kind != "corpus":
    raise ValueError(f"data.kind must be 'corpus' or 'synthetic', got {d.kind!r}")
  from bort_jax.pipelines import distill  # the pretraining input pipeline
  train_input, _ = distill.make_input(d, family, config.seed)
  held_input, _ = distill.make_input(d, family, config.seed + 1, split="validation")
  return [train_input.batch(s) for s in range(steps)], held_input.batch(0)


def teacher_logits(teacher_cfg, teacher_params, batches: Sequence[dict]) -> list:
  """The teacher's MLM logits at the masked positions, computed once per batch."""
  forward = jax.jit(lambda p, b: model.apply(p, teacher_cfg, b, head=MLM)["logits"])
  return [forward(teacher_params, b) for b in batches]


# ----------------------------------------------------------------------------- the run


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the extraction in ``workdir``; returns a summary with the chosen architecture."""
  from bort_jax.pipelines import distill  # teacher loading and the student family rules
  t_start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  candidates = search_space(config.space)
  settings = validate(config, len(candidates))

  teacher_cfg, teacher_params = distill.load_teacher(config.teacher)
  student_spec = ml_collections.ConfigDict(
      {"arch": str(candidates[0]), "family": config.student.family,
       "overrides": dict(config.student.get("overrides", {}) or {})})
  base = distill.student_config(student_spec, teacher_cfg)  # checks the vocabularies
  configs = [base.replace(arch=a) for a in candidates]
  family = teacher_cfg.family if teacher_cfg is not None else base.family

  counts = [cost.param_counts(c) for c in configs]
  p = [float(c[config.cost.size]) for c in counts]
  i, i_label = inference_costs(configs, config.cost)
  t_costs = time.perf_counter()

  batches, heldout = proxy_batches(config, base, family)
  stack = lambda bs: {k: jnp.stack([jnp.asarray(b[k]) for b in bs]) for k in bs[0]}
  data = proxy.ProxyData(batches=stack(batches), heldout={k: jnp.asarray(v)
                                                          for k, v in heldout.items()})
  if teacher_params is not None and config.proxy.error_teacher:
    logits = teacher_logits(teacher_cfg, teacher_params, batches + [heldout])
    data.teacher, data.heldout_teacher = jnp.stack(logits[:-1]), logits[-1]

  mesh = sharding.make_mesh(dict(config.mesh)) if config.get("mesh") else None
  master = buckets.padded_arch(candidates)
  trainer = proxy.PopulationTrainer(
      base, master, dict(config.loss), dict(config.proxy.optim), error=config.proxy.error,
      mode=config.proxy.mode, max_overhead=config.proxy.max_overhead,
      max_members=config.proxy.max_members, mesh=mesh, seed=config.seed,
      batch_size=config.data.global_batch_size, seq_len=config.data.seq_len,
      max_predictions=config.data.max_predictions)

  # Everything that determines a proxy error goes into the journal's hash; eps, the rule and
  # the latency table do not, so a rerun with another eps reuses the finished trainings.
  determines_e = {
      "seed": config.seed, "student": base.to_dict(), "master": str(master),
      "teacher": dict(config.teacher), "data": config.data.to_dict(),
      "proxy": {k: v for k, v in config.proxy.to_dict().items() if k not in ("mode",)},
      "loss": config.loss.to_dict()}
  journal = None
  if jax.process_index() == 0:
    journal = fptas.Journal(os.path.join(workdir, "journal.jsonl"),
                            fptas.config_hash(determines_e))

  def train_and_eval(pairs):
    # One call per bucket of trainer.group's plan, so each bucket is journalled as it ends.
    return trainer.train_and_eval(list(pairs), data, one_bucket=True)

  result = fptas.run_fptas(
      candidates, p, i, train_and_eval, settings, journal=journal,
      maximum=config.fptas.get("maximum") or None, group=trainer.group,
      columns=_report_columns(config, configs, counts))
  t_end = time.perf_counter()

  chosen = result.best.name
  summary = {"chosen": chosen, "w": result.best.w, "e": result.best.e,
             "candidates": len(candidates), "trained": sum(r.trained for r in result.rows),
             "computed_now": result.num_computed}
  if jax.process_index() == 0:
    paths = report.write_tables(result, workdir)
    report.pareto_plot(result, os.path.join(workdir, "pareto.png"), i_label=i_label)
    ledger = trainer.ledger()
    report.write_ledger(workdir, {
        "wall_time_s": t_end - t_start, "cost_model_s": t_costs - t_start,
        "compile_time_s": ledger["compile_seconds"], "compile_count": ledger["compiles"],
        "flops": ledger["padded_flops"], "real_flops": ledger["real_flops"],
        "padding_overhead": ledger["padding_overhead"], "proxy_run_s": ledger["run_seconds"],
        "population_mode": ledger["mode"], "device": str(jax.devices()[0].device_kind),
        "buckets": ledger["buckets"]})
    summary["files"] = paths
  return summary


def _report_columns(config, configs, counts) -> dict:
  """Size and cost columns of the result table that p and i do not already show.

  The Pareto plot's size axis is ``params_effective``, or p itself when p is that count.
  """
  columns = {}
  for size in ("total", "effective"):
    if config.cost.size != size:
      columns[f"params_{size}"] = [c[size] for c in counts]
  if config.cost.inference != "flops":
    columns["flops"] = [cost.forward_flops(c, config.cost.batch, config.cost.seq_len)["total"]
                        for c in configs]
  return columns


def main(argv) -> int:
  from bort_jax import cli
  flags = cli.parse(argv, "extract", default_config="configs/extract_demo.py")
  sharding.maybe_initialize_distributed()
  summary = run(flags.config, flags.workdir)
  print(json.dumps(summary, indent=2, default=str))
  return 0
