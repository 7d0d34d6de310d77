"""The downstream test of an extraction's choice: distil and fine-tune it against its rivals.

The paper's claim is that the W-optimal architecture is the best trade-off after full
distillation and fine-tuning. This mode tests it on one extraction: it takes the chosen
architecture and its rivals from the extraction's workdir (:func:`pick_rivals`), distils each
under the same step budget (``pipelines/distill.run``, one config for all), fine-tunes each on
the same tasks as a population of seeds (``finetune/population_mode.run``), measures each one's
latency on this device, and writes:

- ``study.json``: ``{"archs": [...], "teacher": ...}``: every architecture's roles, size,
  latency, speed-up over the teacher (timed beside them) and dev metric per task (mean, std,
  values over the seeds, learning rate, majority class);
- ``study.md``: the table (arch, roles, parameters, measured latency, dev metric mean +- std per
  task) and, per task, whether the chosen one is on the accuracy/latency front;
- ``study.png``: dev metric against latency, one panel per task, the chosen one marked.

Every step is resumable: a finished distillation (its export) or fine-tuning population (its
``population.json``) is not redone.

    bort-jax study --config=configs/study_demo.py --workdir=runs/demo/study
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from typing import Any, Mapping, Sequence

import ml_collections

from bort_jax.runtime import fileio, rundir
from bort_jax.runtime.fileio import atomic_write_text, to_jsonable
from bort_jax.search.report import pareto_front
from bort_jax.search.select import speed_words

ROLES = ("chosen", "smallest", "near_latency", "lowest_error", "teacher_shaped")
TEACHER = "teacher"  # the key of the teacher's latency, timed beside the studied models


def _read_json(path: str, what: str) -> dict:
  if not os.path.exists(path):
    raise FileNotFoundError(f"no {what} at {path}; run `bort-jax extract` (with "
                            "config.audit.enabled=True) into config.extract_dir first")
  with open(path) as f:
    return json.load(f)


def pick_rivals(results: Mapping[str, Any], audit: Mapping[str, Any],
                band: float) -> list[tuple[str, list[str]]]:
  """The architectures of the study, each with its roles, the chosen one first.

  * ``chosen``: the extraction's choice (its configured rule's: W's or the budget's);
  * ``smallest``: the candidate of smallest p (then i, then name);
  * ``near_latency``: among the audited candidates other than the chosen and the smallest one
    whose inference cost i lies within ``band`` (relative) of the chosen one's, the one of
    lowest S-step error; when none does, the audited candidate nearest in i. i is the
    extraction's inference cost: measured latency, or FLOPs standing in for it
    (``config.cost.inference``);
  * ``lowest_error``: the audited candidate (other than the chosen and the smallest one) of
    lowest S-step error over the whole space: the accuracy end of what the audit saw;
  * ``teacher_shaped``: the maximum point T (the space's largest shape, the nearest to the
    teacher's), or the largest p when T was given as a point outside the space.
  An architecture with several roles is trained once.

  Args:
    results: the extraction's results.json.
    audit: its audit.json.
    band: the relative latency band of ``near_latency`` (>= 0).

  Returns:
    [(arch name, [roles])], in the order of :data:`ROLES` by first role.
  """
  rows = {r["name"]: r for r in results["rows"]}
  # The configured selection rule's choice (chosen_arch.txt); W's in results from before the
  # budget rule, which had no "chosen".
  chosen = results.get("chosen", results["best"])
  smallest = min(rows.values(), key=lambda r: (r["p"], r["i"], r["name"]))["name"]
  i_c = rows[chosen]["i"]
  audited = [r for r in audit["rows"] if r["name"] not in (chosen, smallest)
             and r.get("long") is not None and math.isfinite(r["long"])]
  if not audited:
    raise ValueError("the audit has no candidate besides the chosen and the smallest one; "
                     "raise config.audit.sample in the extraction")
  near = [r for r in audited if abs(r["i"] - i_c) <= band * i_c]
  pick = (min(near, key=lambda r: (r["long"], r["name"])) if near else
          min(audited, key=lambda r: (abs(r["i"] - i_c), r["name"])))
  best = min(audited, key=lambda r: (r["long"], r["name"]))
  teacher = results.get("maximum_point") or max(
      rows.values(), key=lambda r: (r["p"], r["i"], r["name"]))["name"]
  out: dict[str, list[str]] = {}
  for role, name in zip(ROLES, (chosen, smallest, pick["name"], best["name"], teacher)):
    out.setdefault(name, []).append(role)
  return list(out.items())


def check_config(config: ml_collections.ConfigDict) -> None:
  """The study's own fields (the step configs check theirs when they run)."""
  if not config.get("extract_dir"):
    raise ValueError("config.extract_dir is empty: give the extraction's workdir")
  if not config.finetune:
    raise ValueError("config.finetune is empty: give at least one task's fine-tuning config")
  if not (isinstance(config.near_band, (int, float)) and config.near_band >= 0):
    raise ValueError(f"config.near_band={config.near_band!r}: must be a number >= 0")
  from bort_jax.finetune import setup as ft_setup  # pylint: disable=import-outside-toplevel
  for key, ft in config.finetune.items():
    seeds = ft.population.seeds
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
      raise ValueError(f"config.finetune.{key}.population.seeds={seeds!r}: must be an integer "
                       ">= 1 (the seeds of the mean +- std)")
    ft_setup.resolve_task(ft.task)  # registers the demo tasks on first use


def tasks_of(config: ml_collections.ConfigDict) -> list[str]:
  """The fine-tuning tasks, in the order of ``config.finetune``."""
  return [ft.task for ft in config.finetune.values()]


def _finetune_config(config: ml_collections.ConfigDict, key: str, init: str):
  """``config.finetune[key]`` pointed at a distilled export; no test-set predictions."""
  ft = copy.deepcopy(config.finetune[key])
  ft.init.kind, ft.init.path = "params", init
  ft.predict_test = False
  return ft


def _train_one(config, arch: str, workdir: str) -> dict | None:
  """Distils ``arch`` and fine-tunes it on every task (each step skipped when done); None
  when a SIGTERM stopped the distillation (its checkpoint saved, no export)."""
  from bort_jax.finetune import population_mode  # pylint: disable=import-outside-toplevel
  from bort_jax.interop import export  # pylint: disable=import-outside-toplevel
  from bort_jax.pipelines import distill  # pylint: disable=import-outside-toplevel
  base = os.path.join(workdir, arch)
  export_dir = rundir.export_dir(os.path.join(base, "distill"))
  if not os.path.exists(os.path.join(export_dir, export.PARAMS_FILE)):
    cfg = copy.deepcopy(config.distill)
    cfg.student.arch, cfg.export_params = arch, True
    if distill.run(cfg, os.path.join(base, "distill")).get("preempted"):
      return None
  metrics = {}
  for key, ft in config.finetune.items():
    task = ft.task
    out_dir = os.path.join(base, "finetune", key)
    path = os.path.join(out_dir, rundir.POPULATION)
    if not os.path.exists(path):
      population_mode.run(_finetune_config(config, key, export_dir), out_dir)
    with open(path) as f:
      done = json.load(f)
    # Each architecture gets its own learning rate: the setting of best mean dev metric.
    setting = population_mode.best_setting(done)
    if setting is None:
      raise ValueError(f"{path} has no setting with a finite mean {done['metric']}")
    stats = setting[done["metric"]]
    metrics[task] = {"metric": done["metric"], "mean": stats["mean"], "std": stats["std"],
                     "values": stats["values"], "lr": setting["lr"],
                     "majority": done.get("majority", {}).get(done["metric"]),
                     "dev_records": done.get("dev_records")}
  return {"export": export_dir, "metrics": metrics}


def _measure(exports: Mapping[str, str], latency) -> dict:
  """arch -> parameter counts and forward latency, every model timed side by side.

  The models are timed round-robin in one run (``cost.interleaved_latency``), so a slow spell
  of a shared machine lands on all of them rather than on whichever was timed then.
  """
  from bort_jax.core import cost  # pylint: disable=import-outside-toplevel
  from bort_jax.interop import export  # pylint: disable=import-outside-toplevel
  configs = {arch: export.load_config(path) for arch, path in exports.items()}
  timed = cost.interleaved_latency(configs, latency.batch, latency.seq_len,
                                   rounds=latency.repeats)
  out = {}
  for arch, model_cfg in configs.items():
    counts = cost.param_counts(model_cfg)
    out[arch] = {"params_total": counts["total"], "params_effective": counts["effective"],
                 "latency_ms": timed[arch]["median_ms"], "latency_iqr_ms": timed[arch]["iqr_ms"]}
  return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """``bort-jax study``: the chosen architecture and its rivals, distilled and fine-tuned.

  Returns:
    {"archs": [...], "files": {...}} (the rows of study.json), or ``{"preempted": True,
    "message"}`` when a SIGTERM stopped a distillation (a rerun resumes it).
  """
  check_config(config)
  results = _read_json(os.path.join(config.extract_dir, rundir.RESULTS), "extraction result")
  audit = _read_json(os.path.join(config.extract_dir, "audit.json"), "proxy audit")
  picks = pick_rivals(results, audit, float(config.near_band))
  from bort_jax.pipelines import setup  # pylint: disable=import-outside-toplevel
  for arch, _ in picks:  # every distillation config is checked before anything is written
    cfg = copy.deepcopy(config.distill)
    cfg.student.arch = arch
    setup.check_config(cfg)
  os.makedirs(workdir, exist_ok=True)
  trained = {}
  for arch, roles in picks:
    logging.info("study: %s (%s)", arch, ", ".join(roles))
    trained[arch] = _train_one(config, arch, workdir)
    if trained[arch] is None:
      message = (f"the distillation of {arch} was preempted (SIGTERM); its checkpoint is "
                 "saved: run the same command again to resume")
      print(f"Stopped: {message}", flush=True)
      return {"preempted": True, "message": message}
  exports = {arch: t["export"] for arch, t in trained.items()}
  teacher = config.distill.teacher.path  # timed beside them: the speed-up each one buys
  if teacher and os.path.isdir(teacher):
    exports[TEACHER] = teacher
  measured = _measure(exports, config.latency)
  reference = measured.pop(TEACHER, None)
  rows = [{"arch": arch, "roles": roles, **measured[arch], "metrics": trained[arch]["metrics"]}
          for arch, roles in picks]
  if reference:
    for row in rows:
      row["speedup_vs_teacher"] = reference["latency_ms"] / row["latency_ms"]
  files = write_study(rows, tasks_of(config), workdir, config.latency, reference)
  return {"archs": rows, "files": files}


def write_study(rows: Sequence[Mapping], tasks: Sequence[str], workdir: str, latency,
                teacher: Mapping[str, Any] | None = None) -> dict:
  """study.json, study.md and study.png; returns their paths.

  ``teacher``: the teacher's measured latency (timed with the rows), for a speed-up column.
  """
  paths = {k: os.path.join(workdir, f"study.{k}") for k in ("json", "md", "png")}
  atomic_write_text(paths["json"], json.dumps(to_jsonable(
      {"archs": list(rows), "teacher": teacher}), indent=1) + "\n")
  speed = teacher is not None
  head = (["arch", "roles", "params (total)", f"latency ms (B={latency.batch}, "
           f"T={latency.seq_len})"] + (["speed vs the teacher"] if speed else [])
          + [f"{t} ({rows[0]['metrics'][t]['metric']})" for t in tasks])
  lines = ["# Downstream study of the extraction's choice", "",
           "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
  for r in rows:
    cells = ([r["arch"], ", ".join(r["roles"]), f"{r['params_total']:,}",
              f"{r['latency_ms']:.2f} (IQR {r['latency_iqr_ms']:.2f})"]
             + ([speed_words(r["speedup_vs_teacher"], ".1f", than="")] if speed else [])
             + [_metric_cell(r["metrics"][t]) for t in tasks])
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  if speed:
    lines += [f"Latency: median of {latency.repeats} rounds of every model and the teacher "
              f"timed round-robin in one run (random weights, no head); the teacher: "
              f"{teacher['latency_ms']:.2f} ms (IQR {teacher['latency_iqr_ms']:.2f}).", ""]
  first = rows[0]["metrics"]
  lines += ["Each cell: mean +- std over the seeds at the learning rate of best mean (in "
            "brackets). Majority class on the same dev records: " + "; ".join(
                f"{t} {first[t]['majority']:.4f} ({first[t].get('dev_records')} records)"
                for t in tasks if first[t].get("majority") is not None) + ".", ""]
  chosen = next(k for k, r in enumerate(rows) if "chosen" in r["roles"])
  for t in tasks:
    on = chosen in pareto_front([(r["latency_ms"], -r["metrics"][t]["mean"]) for r in rows])
    lines.append(f"- {t}: the chosen {rows[chosen]['arch']} is "
                 f"{'on' if on else 'NOT on'} the accuracy/latency front")
  atomic_write_text(paths["md"], "\n".join(lines) + "\n")
  _plot(rows, tasks, paths["png"], chosen)
  return paths


def _metric_cell(m: Mapping[str, Any]) -> str:
  lr = f" (lr {m['lr']:g})" if m.get("lr") is not None else ""
  return f"{m['mean']:.4f} +- {m['std']:.4f}{lr}"


def _plot(rows, tasks, path: str, chosen: int) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(5 * len(tasks), 4.5), dpi=110)
  FigureCanvasAgg(fig)
  for col, task in enumerate(tasks):
    ax = fig.add_subplot(1, len(tasks), col + 1)
    for k, r in enumerate(rows):
      m = r["metrics"][task]
      style = ({"marker": "*", "ms": 16, "color": "tab:red"} if k == chosen else
               {"marker": "o", "ms": 7, "color": "0.35"})
      ax.errorbar([r["latency_ms"]], [m["mean"]], yerr=[m["std"]], capsize=3, **style)
      # Alternate the label above and below its point: ties in latency stay readable.
      ax.annotate(r["arch"], (r["latency_ms"], m["mean"]),
                  xytext=(6, 6 if k % 2 == 0 else -12), textcoords="offset points", fontsize=8)
    majority = rows[0]["metrics"][task].get("majority")
    if majority is not None:
      ax.axhline(majority, color="0.5", linestyle="--", linewidth=1, label="majority class")
      ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel(f"dev {rows[0]['metrics'][task]['metric']} (mean +- std over seeds)")
    ax.set_title(task, fontsize=10)
    ax.ticklabel_format(axis="both", style="plain", useOffset=False)
    ax.grid(alpha=0.3)
  fig.suptitle("Chosen architecture (red star) against its rivals")
  fig.tight_layout()
  fileio.save_figure(fig, path)
