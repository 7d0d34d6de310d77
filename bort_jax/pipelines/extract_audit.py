"""The proxy audit of an extraction (docs/EXTRACTION.md, "Proxy audit").

After the search, a stratified sample of the trained candidates (``audit.sample`` strata along
p, plus the configured rule's choice and its runner-up: W's, or with the budget rule the
budget's) is trained again for S = ``audit.steps`` proxy steps, under every theta, by the
search's own :class:`~bort_jax.search.proxy.PopulationTrainer`: the same master weights, the
same bucketed populations, the same held-out batch, the first s training batches the same as
the search's. The statistics and the verdict are the pure
``search/audit.py``; this module trains, journals and writes:

- ``audit.json``: the sample with both errors, Kendall tau-b, Spearman rho, the configured
  rule's choice with the S-step errors (W's largest g / e, or the budget's lowest error among
  the sampled candidates meeting the budget), the verdict and the audit's cost;
- ``audit.png``: s-step against S-step error, the chosen candidate marked;
- ``audit_journal.jsonl``: finished (candidate, theta) S-step errors, so a killed audit
  resumes like the search (its hash adds S to the search's).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Callable

import ml_collections

from bort_jax.runtime.fileio import atomic_write_text, to_jsonable
from bort_jax.search import audit, fptas, proxy, report, select
from bort_jax.search import journal as journal_lib

AUDIT_JOURNAL = "audit_journal.jsonl"


def check_config(config: ml_collections.ConfigDict) -> None:
  """Checks ``config.audit`` (absent or disabled: nothing to check).

  Raises:
    ValueError: naming the field, its value and what is allowed.
  """
  block = config.get("audit")
  if block is None or not block.get("enabled", False):
    return
  steps, sample = block.get("steps"), block.get("sample")
  s = config.proxy.steps
  if isinstance(steps, bool) or not isinstance(steps, int) or steps <= s:
    raise ValueError(f"config.audit.steps={steps!r}: must be an integer larger than "
                     f"config.proxy.steps={s} (the audit trains longer than the search)")
  if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
    raise ValueError(f"config.audit.sample={sample!r}: must be an integer >= 1 (strata along p)")
  tau_min = block.get("tau_min", 0.6)
  if isinstance(tau_min, bool) or not isinstance(tau_min, (int, float)) or not (
      -1 <= tau_min <= 1):
    raise ValueError(f"config.audit.tau_min={tau_min!r}: must be a number in [-1, 1] (a "
                     "threshold on Kendall's tau-b)")
  seed = _seed(block)
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ValueError(f"config.audit.seed={seed!r}: must be an integer")


def _seed(block) -> Any:
  """``config.audit.seed`` (which member of each stratum is drawn); 0 when absent."""
  return block.get("seed", 0)


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether the config asks for the audit."""
  block = config.get("audit")
  return bool(block is not None and block.get("enabled", False))


def _sample(result: fptas.Result, block) -> tuple[list[fptas.Row], dict]:
  """The audited rows (trained, finite e) and the runners-up by rule ({"w", "budget"})."""
  rows = [r for r in result.rows if r.trained and r.e is not None and math.isfinite(r.e)]
  runners = {"w": report.explain(result)["runner_up"]}
  must = {result.best.name, runners["w"]}
  if result.budget is not None:
    # The verdict is about the configured rule's choice: the budget's choice and the runner-up
    # it might lose to replace W's pair (the sample, and the audit's cost, keep their size).
    second = result.budget_second
    runners["budget"] = result.rows[second].name if second is not None else None
    must = {result.chosen.name, runners["budget"]}
  include = [k for k, r in enumerate(rows) if r.name in must]
  picked = audit.stratified_sample([r.p for r in rows], int(block.sample), int(_seed(block)),
                                   include=include)
  return [rows[k] for k in picked], runners


def _train(rows, thetas, trainer: proxy.PopulationTrainer, make_data: Callable[[], Any],
           journal: journal_lib.Journal | None) -> dict:
  """S-step errors {(name, theta index): e}, from the journal or trained bucket by bucket."""
  errors, pending = {}, []
  for row in rows:
    for t, theta in enumerate(thetas):
      known = journal.get(row.name, theta) if journal is not None else None
      if known is not None:
        errors[(row.name, t)] = known
      else:
        pending.append((row, t))
  if not pending:
    return errors
  data = make_data()
  pairs = [(row.candidate, thetas[t]) for row, t in pending]
  for group in trainer.group(pairs):
    out = trainer.train_and_eval([pairs[j] for j in group], data, one_bucket=True)
    records = []
    for j, e in zip(group, out):
      row, t = pending[j]
      errors[(row.name, t)] = float(e)
      records.append((row.name, thetas[t], float(e)))
    if journal is not None:
      journal.append(records)
  return errors


def run_audit(config: ml_collections.ConfigDict, result: fptas.Result,
              trainer: proxy.PopulationTrainer, make_data: Callable[[], Any], workdir: str,
              search_hash: str, error_label: str, write: bool = True) -> dict:
  """Trains the sample for S steps and writes audit.json and audit.png.

  Args:
    config: the extraction config (``audit`` and ``proxy.steps`` are read).
    result: the finished search.
    trainer: the search's trainer (its master weights and compiled programs are reused).
    make_data: builds the S-step :class:`~bort_jax.search.proxy.ProxyData` (called only when
      something is left to train).
    workdir: the run's directory.
    search_hash: the search journal's hash (the audit journal's adds S to it).
    error_label: what the proxy error is, with its unit (the plot's axes).
    write: write the files (process 0 only).

  Returns:
    {"summary": the verdict dict, "line": results.md's line, "ledger": the audit's cost}.
  """
  t0 = time.perf_counter()
  since = len(trainer.stats)
  block = config.audit
  short_steps, long_steps = int(config.proxy.steps), int(block.steps)
  rows, runners = _sample(result, block)
  thetas = list(result.thetas)
  journal = None
  if write:
    journal = journal_lib.Journal(os.path.join(workdir, AUDIT_JOURNAL),
                            journal_lib.config_hash({"search": search_hash, "steps": long_steps}))
  errors = _train(rows, thetas, trainer, make_data, journal)
  # Best over theta, as the search does: the smallest finite error (W = g / e, g > 0).
  long = [min((errors[(r.name, t)] for t in range(len(thetas))
               if math.isfinite(errors[(r.name, t)])), default=math.nan) for r in rows]
  # With the budget rule the verdict is about the budget's choice (the one distilled), and the
  # short error it ranks by is the best over theta, as in the search.
  budget = result.budget is not None
  summary = audit.audit_summary(
      [r.name for r in rows], [r.gain for r in rows],
      [select.best_error(r.errors) if budget else r.e for r in rows], long, result.chosen.name,
      float(block.get("tau_min", 0.6)), feasible=[r.feasible for r in rows] if budget else None,
      keys=[(r.i, r.p, r.name) for r in rows])
  line = audit.verdict_line(summary, short_steps, long_steps)
  (logging.info if summary["trusted"] else logging.warning)("%s", line)
  own = trainer.ledger(since=since)
  cost = {"wall_time_s": time.perf_counter() - t0, "pairs": len(rows) * len(thetas),
          "trained_now": sum(b["members"] for b in own["buckets"]),
          "compile_time_s": own["compile_seconds"], "compile_count": own["compiles"],
          "proxy_run_s": own["run_seconds"], "flops": own["padded_flops"]}
  table = [{"name": r.name, "p": r.p, "i": r.i, "gain": r.gain, "feasible": r.feasible,
            "short": r.e, "long": e,
            "long_per_theta": [errors[(r.name, t)] for t in range(len(thetas))]}
           for r, e in zip(rows, long)]
  if write:
    payload = {"short_steps": short_steps, "long_steps": long_steps,
               "sample": int(block.sample), "seed": int(_seed(block)), "runner_up": runners["w"],
               "budget_runner_up": runners.get("budget"),
               "summary": summary, "line": line, "rows": table, "cost": cost}
    atomic_write_text(os.path.join(workdir, "audit.json"),
                      json.dumps(to_jsonable(payload), indent=1) + "\n")
    report.audit_plot(table, summary, os.path.join(workdir, "audit.png"), short_steps,
                      long_steps, error_label=error_label)
  return {"summary": summary, "line": line, "ledger": cost}
