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
from bort_jax.core.model import MLM
from bort_jax.pipelines import setup
from bort_jax.runtime import sharding
from bort_jax.runtime.fileio import atomic_write_text
from bort_jax.search import buckets, fptas, proxy, report


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


def validate(config: ml_collections.ConfigDict, n: int, paths: bool = True) -> fptas.Settings:
  """Checks the whole config before anything is built or written; returns the search settings.

  Args:
    config: the extraction config.
    n: the number of candidates of ``config.space``.
    paths: also check that the teacher and the corpus exist (off in the demo, whose teacher
      an earlier step produces).

  Raises:
    ValueError: naming the field, its value and what is allowed.
  """
  # eps, the rule and Theta: the search's one validation (the search then trusts them).
  settings = fptas.validate(config.fptas.eps, config.fptas.rule,
                            [dict(t) for t in config.fptas.thetas], n,
                            check_theta=proxy.check_theta, where="config.fptas.")
  for field, value, allowed in (
      ("cost.size", config.cost.size, ("total", "effective")),
      ("cost.inference", config.cost.inference, ("flops", "latency")),
      ("data.kind", config.data.kind, ("corpus", "synthetic")),
      ("proxy.error", config.proxy.error, ("distill", "mlm")),
      ("proxy.mode", config.proxy.mode, proxy.MODES)):
    if value not in allowed:
      raise ValueError(f"config.{field}={value!r}: must be one of {', '.join(allowed)}")
  if isinstance(config.proxy.steps, bool) or not isinstance(config.proxy.steps, int) or (
      config.proxy.steps < 1):
    raise ValueError(f"config.proxy.steps={config.proxy.steps!r}: must be an integer >= 1")
  setup.check_config(config, paths)
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
  train_input, _ = setup.make_input(d, family, config.seed)
  held_input, _ = setup.make_input(d, family, config.seed + 1, split="validation")
  return [train_input.batch(s) for s in range(steps)], held_input.batch(0)


def teacher_logits(teacher_cfg, teacher_params, batches: Sequence[dict]) -> list:
  """The teacher's MLM logits at the masked positions, computed once per batch."""
  forward = jax.jit(lambda p, b: model.apply(p, teacher_cfg, b, head=MLM)["logits"])
  return [forward(teacher_params, b) for b in batches]


# ----------------------------------------------------------------------------- the run


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the extraction in ``workdir``; returns a summary with the chosen architecture.

  Everything that user input can get wrong (the space, eps, the rule, Theta, the teacher, the
  vocabularies, an existing journal of another config, the corpus) is checked before the
  workdir is created or written; a killed run resumes from the workdir's journal.
  """
  t_start = time.perf_counter()
  candidates = search_space(config.space)
  settings = validate(config, len(candidates))
  teacher_cfg, teacher_params = setup.load_teacher(config.teacher)
  base = base_student(config, candidates, teacher_cfg)
  configs = [base.replace(arch=a) for a in candidates]
  master = buckets.padded_arch(candidates)
  journal_path = os.path.join(workdir, "journal.jsonl")
  journal_hash = fptas.config_hash(_determines_e(config, base, master))
  if jax.process_index() == 0 and os.path.exists(journal_path):
    fptas.Journal(journal_path, journal_hash)  # refuses a corrupt journal or another config's

  counts = [cost.param_counts(c) for c in configs]
  p = [float(c[config.cost.size]) for c in counts]
  i, i_label = inference_costs(configs, config.cost)
  t_costs = time.perf_counter()
  family = teacher_cfg.family if teacher_cfg is not None else base.family
  data = proxy_data(config, base, family, teacher_cfg, teacher_params)
  trainer = proxy.PopulationTrainer(
      base, master, dict(config.loss), dict(config.proxy.optim), error=config.proxy.error,
      mode=config.proxy.mode, max_overhead=config.proxy.max_overhead,
      max_members=config.proxy.max_members,
      mesh=sharding.make_mesh(dict(config.mesh)) if config.get("mesh") else None,
      seed=config.seed, batch_size=config.data.global_batch_size,
      seq_len=config.data.seq_len, max_predictions=config.data.max_predictions)

  os.makedirs(workdir, exist_ok=True)
  journal = fptas.Journal(journal_path, journal_hash) if jax.process_index() == 0 else None
  result = fptas.run_fptas(
      candidates, p, i,
      # One call per bucket of trainer.group's plan, so each bucket is journalled as it ends.
      lambda pairs: trainer.train_and_eval(list(pairs), data, one_bucket=True),
      settings, journal=journal, maximum=config.fptas.get("maximum") or None,
      group=trainer.group, columns=_report_columns(config, configs, counts))
  t_end = time.perf_counter()

  summary = {"chosen": result.best.name, "w": result.best.w, "e": result.best.e,
             "candidates": len(candidates), "trained": sum(r.trained for r in result.rows),
             "computed_now": result.num_computed}
  if jax.process_index() == 0:
    summary["files"] = write_outputs(result, trainer, workdir, i_label, {
        "wall_time_s": t_end - t_start, "cost_model_s": t_costs - t_start})
  return summary


def base_student(config: ml_collections.ConfigDict, candidates: Sequence[arch_lib.Arch],
                 teacher_cfg: arch_lib.ModelConfig | None) -> arch_lib.ModelConfig:
  """The student config every candidate shares (vocabulary checked against the teacher's)."""
  student_spec = ml_collections.ConfigDict(
      {"arch": str(candidates[0]), "family": config.student.family,
       "overrides": dict(config.student.get("overrides", {}) or {})})
  return setup.student_config(student_spec, teacher_cfg)


def _determines_e(config: ml_collections.ConfigDict, base: arch_lib.ModelConfig,
                  master: arch_lib.Arch) -> dict:
  """Everything that determines a proxy error: the journal's hash.

  eps, the rule and the latency table are left out, so a rerun with another eps reuses the
  finished trainings.
  """
  return {
      "seed": config.seed, "student": base.to_dict(), "master": str(master),
      "teacher": dict(config.teacher), "data": config.data.to_dict(),
      "proxy": {k: v for k, v in config.proxy.to_dict().items() if k not in ("mode",)},
      "loss": config.loss.to_dict()}


def proxy_data(config: ml_collections.ConfigDict, base: arch_lib.ModelConfig, family: str,
               teacher_cfg: arch_lib.ModelConfig | None, teacher_params: Any) -> proxy.ProxyData:
  """The proxy phase's stacked training batches, held-out batch and teacher logits."""
  batches, heldout = proxy_batches(config, base, family)
  stack = lambda bs: {k: jnp.stack([jnp.asarray(b[k]) for b in bs]) for k in bs[0]}
  data = proxy.ProxyData(batches=stack(batches),
                         heldout={k: jnp.asarray(v) for k, v in heldout.items()})
  if teacher_params is not None and config.proxy.error_teacher:
    logits = teacher_logits(teacher_cfg, teacher_params, batches + [heldout])
    data.teacher, data.heldout_teacher = jnp.stack(logits[:-1]), logits[-1]
  return data


def write_outputs(result: fptas.Result, trainer: proxy.PopulationTrainer, workdir: str,
                  i_label: str, times: Mapping[str, float]) -> dict:
  """The result tables, the Pareto plot and the cost ledger; returns the tables' paths."""
  paths = report.write_tables(result, workdir)
  report.pareto_plot(result, os.path.join(workdir, "pareto.png"), i_label=i_label)
  ledger = trainer.ledger()
  report.write_ledger(workdir, {
      **times, "compile_time_s": ledger["compile_seconds"],
      "compile_count": ledger["compiles"], "flops": ledger["padded_flops"],
      "real_flops": ledger["real_flops"], "padding_overhead": ledger["padding_overhead"],
      "proxy_run_s": ledger["run_seconds"], "population_mode": ledger["mode"],
      "device": str(jax.devices()[0].device_kind), "buckets": ledger["buckets"]})
  return paths


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
