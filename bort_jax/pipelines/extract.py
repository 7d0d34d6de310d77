"""Optimal subarchitecture extraction (docs/BORT.md section 3): the W-coefficient FPTAS, end to end.

1. Enumerate the search space; compute every candidate's parameter size p (exact counts) and
   inference cost i (analytic FLOPs, or the measured latency of its compiled forward pass on
   this device, kept in a per-device latency table so later runs reuse it).
2. Find the maximum point T; sort by p and partition into intervals of eps candidates.
3. Train each interval's representatives for s proxy steps under every hyperparameter set
   theta (all at once in vmapped, bucketed populations, ``proxy.py``), score the proxy error e
   on a held-out batch, compute W, keep the best theta.
4. Return the candidate of largest W with the full table; with ``config.select.rule="budget"``,
   also the lowest-error candidate among those meeting the budget (at least K times faster
   than the teacher, a latency or a size limit), for which the feasible candidates' own
   intervals are trained too (``search/select.py``; docs/EXTRACTION.md, "Selection by a
   budget"). ``chosen_arch.txt`` holds the configured rule's choice.

5. With ``config.audit.enabled``, audit the proxy: train a sample for S >> s steps and compare
   (``extract_audit.py``).

Outputs in the workdir: ``journal.jsonl`` (one line per finished candidate and theta; a killed
run resumes without redoing them), ``results.md`` / ``results.csv`` / ``results.json`` sorted
by W (with the margin of the choice, the tie handling and, when the errors spread less than the
gains, a warning), ``pareto.png``, ``chosen_arch.txt``, ``ledger.json`` (wall time, compile
time and count, FLOPs spent; the audit's own cost under ``audit``) and, with the audit,
``audit.json``, ``audit.png`` and ``audit_journal.jsonl``.

    bort-jax extract --config=configs/extract_demo.py --workdir=runs/extract
"""

from __future__ import annotations

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
from bort_jax.core import members as members_lib
from bort_jax.core.model import MLM
from bort_jax.pipelines import extract_audit, setup
from bort_jax.pipelines.extract_costs import (budget_of, check_runtime, inference_costs,
                                              reference_point, report_columns, selection)
from bort_jax.runtime import sharding
from bort_jax.search import buckets, fptas, proxy, proxy_init, report
from bort_jax.search import journal as journal_lib
from bort_jax.search import theta as theta_lib


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
                            check_theta=theta_lib.check_theta, where="config.fptas.",
                            ties=config.fptas.get("ties", "all"))
  for field, value, allowed in (
      ("cost.size", config.cost.size, ("total", "effective")),
      ("cost.inference", config.cost.inference, ("flops", "latency")),
      ("data.kind", config.data.kind, ("corpus", "synthetic")),
      ("proxy.error", config.proxy.error, ("distill", "mlm")),
      ("proxy.mode", config.proxy.mode, members_lib.MODES),
      ("proxy.init", config.proxy.get("init", "random"), PROXY_INITS)):
    if value not in allowed:
      raise ValueError(f"config.{field}={value!r}: must be one of {', '.join(allowed)}")
  if isinstance(config.proxy.steps, bool) or not isinstance(config.proxy.steps, int) or (
      config.proxy.steps < 1):
    raise ValueError(f"config.proxy.steps={config.proxy.steps!r}: must be an integer >= 1")
  _check_init(config)
  check_runtime(config.cost)
  selection(config)
  extract_audit.check_config(config)
  setup.check_config(config, paths)
  return settings


PROXY_INITS = ("random", "inherit")


def _check_init(config: ml_collections.ConfigDict) -> None:
  """``proxy.init="inherit"`` needs a teacher (the shapes are checked with the teacher)."""
  if config.proxy.get("init", "random") != "inherit":
    return
  if config.teacher.get("kind", "none") == "none":
    raise ValueError("config.proxy.init='inherit' needs a teacher to inherit from "
                     "(config.teacher.kind is 'none')")


def master_init(config: ml_collections.ConfigDict, teacher_cfg, teacher_params,
                data: proxy.ProxyData):
  """The proxy's master weights for ``config.proxy.init``: None means the seeded random ones.

  "inherit" gives ``proxy_init.inherited_master``: the teacher's units ordered by their
  importance, measured on the proxy's own training batches, its layers selected for the
  master's depth, written into the master's leading corner.
  """
  if config.proxy.get("init", "random") == "random":
    return None
  batches = [{k: v[j] for k, v in data.batches.items()} for j in range(data.steps)]
  return lambda master_config: proxy_init.inherited_master(
      teacher_params, teacher_cfg, master_config, batches, seed=config.seed)


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
                  family: str, steps: int | None = None) -> tuple[list[dict], dict]:
  """The training batches and the held-out batch B of the proxy phase.

  ``steps`` (default ``proxy.steps``, the audit passes S) batches; whatever ``steps``, the
  first s batches and the held-out batch are the search's own, so the audit's S-step errors
  extend the search's s-step trajectories on the same held-out batch.
  """
  d, s = config.data, config.proxy.steps
  steps = s if steps is None else steps
  if d.kind == "synthetic":
    rng = np.random.default_rng([config.seed, 7])
    make = lambda: synthetic_batch(rng, base.vocab_size, d.global_batch_size, d.seq_len,
                                   d.max_predictions)
    batches = [make() for _ in range(min(s, steps))]
    heldout = make()  # drawn after the search's s batches, as before the audit existed
    return batches + [make() for _ in range(steps - len(batches))], heldout
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
  journal_hash = journal_lib.config_hash(_determines_e(config, base, master))
  if jax.process_index() == 0 and os.path.exists(journal_path):
    journal_lib.Journal(journal_path, journal_hash)  # refuses a corrupt journal or another config's

  counts = [cost.param_counts(c) for c in configs]
  p = [float(c[config.cost.size]) for c in counts]
  i, i_label = inference_costs(configs, config.cost)
  maximum = reference_point(config, base, teacher_cfg, candidates)
  budget = budget_of(config, base, teacher_cfg, configs, p, i, i_label)  # before any training
  t_costs = time.perf_counter()
  family = teacher_cfg.family if teacher_cfg is not None else base.family
  data = proxy_data(config, base, family, teacher_cfg, teacher_params)
  trainer = proxy.PopulationTrainer(
      base, master, dict(config.loss), dict(config.proxy.optim), error=config.proxy.error,
      mode=config.proxy.mode, max_overhead=config.proxy.max_overhead,
      max_members=config.proxy.max_members,
      mesh=sharding.make_mesh(dict(config.mesh)) if config.get("mesh") else None,
      seed=config.seed, batch_size=config.data.global_batch_size,
      seq_len=config.data.seq_len, max_predictions=config.data.max_predictions,
      master_init=master_init(config, teacher_cfg, teacher_params, data))
  if trainer.master_init is not None:
    trainer.master  # pylint: disable=pointless-statement  (inherit's shape errors come now)

  os.makedirs(workdir, exist_ok=True)
  journal = journal_lib.Journal(journal_path, journal_hash) if jax.process_index() == 0 else None
  result = fptas.run_fptas(
      candidates, p, i,
      # One call per bucket of trainer.group's plan, so each bucket is journalled as it ends.
      lambda pairs: trainer.train_and_eval(list(pairs), data, one_bucket=True),
      settings, journal=journal, maximum=maximum, group=trainer.group, budget=budget,
      columns=report_columns(config, configs, counts, budget))
  t_end = time.perf_counter()
  search_ledger = trainer.ledger()
  _warn_if_size_decides(result)

  # "chosen" is the configured rule's choice (chosen_arch.txt); "w" is W's choice's W.
  summary = {"chosen": result.chosen.name, "w_choice": result.best.name, "w": result.best.w,
             "e": result.best.e if result.budget is None else result.selection()["e"],
             "select": result.selection(),
             "candidates": len(candidates), "trained": sum(r.trained for r in result.rows),
             "computed_now": result.num_computed, "ties": result.ties,
             "tie_extra": result.tie_extra}
  audited = None
  if extract_audit.enabled(config):
    audited = extract_audit.run_audit(
        config, result, trainer,
        lambda: proxy_data(config, base, family, teacher_cfg, teacher_params,
                           steps=config.audit.steps),
        workdir, journal_hash, _error_label(config), write=jax.process_index() == 0)
    summary["audit"] = audited["summary"]
  if jax.process_index() == 0:
    summary["files"] = write_outputs(result, search_ledger, workdir, i_label, {
        "wall_time_s": time.perf_counter() - t_start, "search_wall_time_s": t_end - t_start,
        "cost_model_s": t_costs - t_start}, audited, notes=[_measures_line(config, i_label)])
  return summary


def _measures_line(config: ml_collections.ConfigDict, i_label: str) -> str:
  """results.md's line on what p, i and the proxy's starting weights are."""
  size = ("the total parameter count" if config.cost.size == "total" else
          "the effective parameter count (embedding tables left out)")
  init = config.proxy.get("init", "random")
  start = ("seeded random weights" if init == "random" else
           "the teacher's weights (importance-ordered, inherited)")
  return (f"p is {size} (config.cost.size={config.cost.size!r}), i the {i_label}; the "
          f"{config.proxy.steps}-step proxies start from {start} (config.proxy.init={init!r})")


def _error_label(config: ml_collections.ConfigDict) -> str:
  """The proxy error with its unit, for the audit plot's axes."""
  if config.proxy.error == "mlm" or not config.proxy.error_teacher:
    return "held-out masked-LM cross-entropy (nats)"
  return "held-out distillation loss (nats)"


def _warn_if_size_decides(result: fptas.Result) -> None:
  """Logs a WARNING when the errors spread less than the gains (report.explain)."""
  size = report.explain(result)["size"]
  if size["warn"]:
    logging.warning(
        "the choice %s is made by size alone: the proxy errors spread by %.3gx over the trained "
        "candidates, the cost gains by %.3gx, so W ranks them mostly by size and cost (see "
        "results.md; the proxy audit measures whether the errors mean anything)",
        result.best.name, size["error_spread"], size["gain_spread"])


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
      # proxy.init="random" is what every run did before the field existed: left out, so
      # those journals stay valid.
      "proxy": {k: v for k, v in config.proxy.to_dict().items()
                if k != "mode" and not (k == "init" and v == "random")},
      "loss": config.loss.to_dict()}


def proxy_data(config: ml_collections.ConfigDict, base: arch_lib.ModelConfig, family: str,
               teacher_cfg: arch_lib.ModelConfig | None, teacher_params: Any,
               steps: int | None = None) -> proxy.ProxyData:
  """The proxy phase's stacked training batches, held-out batch and teacher logits."""
  batches, heldout = proxy_batches(config, base, family, steps)
  stack = lambda bs: {k: jnp.stack([jnp.asarray(b[k]) for b in bs]) for k in bs[0]}
  data = proxy.ProxyData(batches=stack(batches),
                         heldout={k: jnp.asarray(v) for k, v in heldout.items()})
  if teacher_params is not None and config.proxy.error_teacher:
    logits = teacher_logits(teacher_cfg, teacher_params, batches + [heldout])
    data.teacher, data.heldout_teacher = jnp.stack(logits[:-1]), logits[-1]
  return data


def write_outputs(result: fptas.Result, ledger: Mapping[str, Any], workdir: str,
                  i_label: str, times: Mapping[str, float],
                  audited: Mapping[str, Any] | None = None,
                  notes: Sequence[str] = ()) -> dict:
  """The result tables, the Pareto plot and the cost ledger; returns the tables' paths.

  Args:
    result: the search.
    ledger: the trainer's ledger of the search alone (``PopulationTrainer.ledger``).
    workdir: the run's directory.
    i_label: the inference cost's name and unit.
    times: wall times (``wall_time_s`` is the whole run, audit included).
    audited: ``extract_audit.run_audit``'s result, or None without an audit: its verdict line
      goes into results.md, its cost into the ledger under ``audit``.
    notes: more lines for results.md.
  """
  notes = list(notes) + ([audited["line"]] if audited is not None else [])
  paths = report.write_tables(result, workdir, notes=notes)
  report.pareto_plot(result, os.path.join(workdir, "pareto.png"), i_label=i_label)
  report.write_ledger(workdir, {
      **times, "compile_time_s": ledger["compile_seconds"],
      "compile_count": ledger["compiles"], "flops": ledger["padded_flops"],
      "real_flops": ledger["real_flops"], "padding_overhead": ledger["padding_overhead"],
      "proxy_run_s": ledger["run_seconds"], "population_mode": ledger["mode"],
      "device": str(jax.devices()[0].device_kind), "buckets": ledger["buckets"],
      "ties": result.ties, "tie_extra_trainings": result.tie_extra,
      "budget_extra_trainings": result.budget_extra,
      "audit": audited["ledger"] if audited is not None else None})
  return paths
