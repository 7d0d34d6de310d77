"""The demo report's fine-tuning part: each task's scores, their share of the teacher's, Agora.

One row per task (:func:`finetune_rows`): the metric, the dev records, the majority-class
baseline and each model's statistics over seeds for its best setting; the section's table
gives the student's share of the teacher's score and of the teacher's margin above the majority
class (:func:`margin_share`), with the dev set's standard error, and Agora's rounds beside the
plain populations.
"""

from __future__ import annotations

import glob
import math
import os
from typing import Any

from bort_jax.pipelines import report_plots
from bort_jax.runtime import rundir
from bort_jax.runtime.fileio import read_json

MODELS = ("student", "teacher")
NOT_RUN = "not run"


def fmt(value: Any, digits: int = 3) -> str:
  """A table cell: floats to ``digits`` places, a missing or non-finite value as "-"."""
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "-"
  return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------- fine-tuning


def finetune_runs(workdir: str, state: dict) -> dict[str, list[str]]:
  """Each model's fine-tuning run folders: as the demo recorded them (the teacher's live in
  the cache), else every ``WORKDIR/finetune/<model>/*`` folder."""
  runs = dict(state.get("finetune_runs") or {})
  for model_name in MODELS:
    if model_name not in runs:
      runs[model_name] = sorted(glob.glob(os.path.join(workdir, "finetune", model_name, "*")))
  return runs


def _best_setting(population: dict) -> dict | None:
  """The setting with the best mean dev metric, its stats under ``"stats"``."""
  from bort_jax.finetune import population_mode  # pylint: disable=import-outside-toplevel
  row = population_mode.best_setting(population)
  return None if row is None else dict(row, stats=row[population["metric"]])


def finetune_rows(runs: dict[str, list[str]]) -> list[dict]:
  """One row per task: its metric, dev records, majority baseline and each model's stats."""
  rows: dict[str, dict] = {}
  for model_name, folders in runs.items():
    for folder in folders:
      path = os.path.join(folder, rundir.POPULATION)
      population = read_json(path)
      if not population or "metric" not in population:
        continue
      row = rows.setdefault(population["task"], {
          "task": population["task"], "metric": population["metric"],
          "dev_records": population.get("dev_records"),
          "max_dev_examples": population.get("max_dev_examples", 0),
          "majority": (population.get("majority") or {}).get(population["metric"])})
      best = _best_setting(population)
      if best is not None:
        row[model_name] = dict(best["stats"], steps=population.get("total_steps"),
                               setting={k: best[k] for k in ("lr", "weight_decay", "warmup")
                                        if k in best})
      agora = agora_summary(read_json(os.path.join(os.path.dirname(path) + "_agora",
                                                   "agora.json")))
      if agora:
        row[f"{model_name}_agora"] = agora
  return [rows[k] for k in sorted(rows)]


def agora_summary(agora: dict | None) -> dict | None:
  """What the report shows of an ``agora.json``: round 0's best (the plain population's best
  member, Theta being its seeds), the best over rounds and its round, the points added, the
  labeller's dev accuracy; None when there is no finished run."""
  if not agora or not isinstance(agora.get("best"), dict) or not agora.get("rounds"):
    return None
  rounds = agora["rounds"]
  return {"best": agora["best"].get("accuracy"), "best_round": agora["best"].get("round"),
          "round0": rounds[0]["best"]["accuracy"], "rounds": len(rounds),
          "points": sum(int(r.get("points_added", 0)) for r in rounds[:-1]),
          "labeller": agora.get("labeller_accuracy")}


def _stats_cell(stats: dict | None) -> str:
  if not stats:
    return NOT_RUN
  n = len(stats.get("values", []))
  if n == 1:  # one seed: no spread was measured
    return f"{100 * stats['mean']:.1f} (n=1, no spread; {stats.get('steps', '?')} steps)"
  return (f"{100 * stats['mean']:.1f} +- {100 * stats['std']:.1f} "
          f"(n={n}, {stats.get('steps', '?')} steps)")


def standard_error(p: float | None, n: int | None) -> float | None:
  """The standard error of an accuracy ``p`` measured on ``n`` dev records."""
  if p is None or not n:
    return None
  return math.sqrt(max(p * (1 - p), 0.0) / n)


def finetune_section(rows: list[dict], out_dir: str,
                     skipped: dict[str, str] | None = None) -> list[str]:
  """The fine-tuning table (and its bar chart), then Agora's (``skipped``: task -> why Agora
  did not run on it, as the demo recorded it)."""
  skipped = skipped or {}
  lines = ["## Fine-tuning", ""]
  if not rows:
    return lines + [f"Fine-tuning: {NOT_RUN}.", ""]
  capped = [r for r in rows if r.get("max_dev_examples")]
  if capped:
    lines += [f"Dev scores are on {capped[0]['max_dev_examples']} records spread evenly over "
              "each dev split (all of a smaller split; the count is in the table), the "
              "majority baseline on the same records.", ""]
  lines += ["Scores in %: mean +- standard deviation over seeds (sample std), the best "
            "setting by mean; SE is the dev set's standard error of the teacher's mean.", "",
            "| task | metric | dev records | majority | student | teacher | student / "
            "teacher | share of the margin | SE |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    s, t = r.get("student"), r.get("teacher")
    ratio = s["mean"] / t["mean"] if s and t and t["mean"] else None
    share = margin_share(r) if s and t else None
    se = standard_error(t["mean"] if t else (s or {}).get("mean"), r.get("dev_records"))
    lines.append(f"| {r['task']} | {r['metric']} | {fmt(r.get('dev_records'))} | "
                 f"{fmt(100 * r['majority'] if r.get('majority') is not None else None, 1)} | "
                 f"{_stats_cell(s)} | {_stats_cell(t)} | {fmt(ratio)} | {fmt(share)} | "
                 f"{fmt(100 * se if se is not None else None, 1)} |")
  lines.append("")
  report_plots.finetune_bars(rows, os.path.join(out_dir, "finetune.png"))
  return lines + ["![Fine-tuning](finetune.png)", ""] + agora_section(rows, skipped)


def agora_section(rows: list[dict], skipped: dict[str, str]) -> list[str]:
  """Agora's runs beside the plain populations, and the tasks it did not take, with why."""
  lines = ["### Agora", ""]
  ran = [(r, m) for r in rows for m in MODELS if f"{m}_agora" in r]
  if ran:
    lines += ["Theta is the plain population's settings (its seeds), so round 0 is the plain "
              "run and its best member; each later round adds the best model's dev mistakes, "
              "made into new points and labelled by the fine-tuned teacher. Accuracy % on the "
              "binary cast of dev, best member per round: a maximum over members, so compare "
              "it with round 0, not with the mean above.", "",
              "| task | model | labeller dev acc. | rounds | points added | round 0 (plain) "
              "best | Agora best | gain |", "|---|---|---|---|---|---|---|---|"]
    for r, m in ran:
      a = r[f"{m}_agora"]
      gain = a["best"] - a["round0"]
      lines.append(f"| {r['task']} | {m} | {fmt(a['labeller'])} | {a['rounds']} | "
                   f"{a['points']:,} | {100 * a['round0']:.1f} | {100 * a['best']:.1f} (round "
                   f"{a['best_round']}) | {100 * gain:+.1f} |")
    lines.append("")
  for task, reason in skipped.items():
    lines.append(f"- {task}: not run: {reason}")
  if not ran and not skipped:
    lines.append("Agora: not run (plain fine-tuning only).")
  return lines + [""]


def margin_share(row: dict) -> float | None:
  """(student - majority) / (teacher - majority) of one task's means; None without a margin."""
  s, t, m = row["student"]["mean"], row["teacher"]["mean"], row.get("majority")
  return (s - m) / (t - m) if m is not None and t > m else None
