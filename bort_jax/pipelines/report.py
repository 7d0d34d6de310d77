"""``bort-jax report --workdir=W``: one Markdown page of a demo workdir, with its figures.

Writes ``W/report/report.md`` and the PNGs it embeds (``pareto.png``, ``distill.png``,
``finetune.png``, and ``audit.png`` copied from the extraction when it made one):

* the stages and their times (``W/demo_state.json``);
* the extraction: the best candidates by W and the Pareto plot drawn from
  ``extract/results.json``, its size axis the count W used (``config.extract.cost.size``);
* the distillation curves: the student's training and held-out masked-LM loss against steps
  (``distill/metrics.jsonl``) and the adapted teacher's held-out loss as a line;
* fine-tuning: per task and model, the dev metric's mean +- std over the seeds of the best
  setting (``population.json``), the majority-class baseline on the same dev records and the
  dev set's standard error; where an Agora run lies beside a population (``<folder>_agora/
  agora.json``), its round 0 (the plain run's best member), its best round and the points it
  added; the tasks the demo's Agora stage did not take, with why;
* speed: student, teacher and BERT shapes timed side by side (``cost.interleaved_latency``:
  rounds of A B C ..., median and interquartile range), and with the serve extra the teacher
  and the student in ONNX Runtime float32 and int8, each in a process of its own
  (``serve.timing``), kept in ``report/speed.json``.

Decisions: the report reads files only (it trains nothing); anything missing is listed as
"not run", so it works on a partial workdir. The headline is the student's mean dev score over
the tasks as a share of the teacher's, the same as a share of the teacher's margin above the
majority baseline (``(student - majority) / (teacher - majority)``, the fairer number when the
baseline is high), and the teacher's median latency over the student's.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import ml_collections

from bort_jax.pipelines import report_choice, report_plots, report_products
from bort_jax.pipelines.report_finetune import (NOT_RUN, finetune_rows, finetune_runs,
                                                finetune_section, fmt as _fmt, margin_share,
                                                standard_error)
from bort_jax.runtime import rundir
from bort_jax.runtime.fileio import atomic_write_text, read_json, read_jsonl, to_jsonable
from bort_jax.search.select import speed_words

REPORT_DIR = "report"


# ----------------------------------------------------------------------------- stages


def stages_section(state: dict) -> list[str]:
  """The demo's stages with their status and time (from ``demo_state.json``)."""
  stages = state.get("stages") or {}
  if not stages:
    return ["## Stages", "", f"No `{rundir.DEMO_STATE}`: this workdir was not made by `bort-jax "
            "demo` (the sections below read its files directly).", ""]
  lines = ["## Stages", "", "| stage | status | time (s) |", "|---|---|---|"]
  # The report stage is writing this page: its own row would always read "not run".
  stages = {k: v for k, v in stages.items() if k != "report"}
  for name, entry in stages.items():
    status = "done" if entry.get("done") else ("started" if entry.get("seconds") else NOT_RUN)
    lines.append(f"| {name} | {status} | {_fmt(float(entry.get('seconds') or 0.0), 0)} |")
  total = sum(float(e.get("seconds") or 0.0) for e in stages.values())
  lines += [f"| total | | {total:.0f} |", ""]
  sources = state.get("sources") or {}
  if sources:  # which pinned archive each item came from (a fallback shows here)
    lines += ["Data sources (`bort-jax data fetch`): " + ", ".join(
        f"{item} from `{spec}`" for item, spec in sorted(sources.items())) + ".", ""]
  return lines


# ----------------------------------------------------------------------------- extraction


def _size_label(rows: list[dict], size: str | None) -> str:
  """Which parameter count W used as p (the demo state says; else from the extra columns)."""
  if size is None and rows:
    extra = rows[0].get("extra") or {}
    size = "total" if "params_effective" in extra else (
        "effective" if "params_total" in extra else None)
  what = {"total": "total parameters", "effective": "effective parameters (no embeddings)"}
  return f"p = {what.get(size, 'parameters')} used by W (M)"


def extraction_section(workdir: str, out_dir: str, state: dict) -> tuple[list[str], dict]:
  """The top candidates by W, the Pareto plot and the extraction audit (when present)."""
  extract_dir = os.path.join(workdir, "extract")
  result = read_json(os.path.join(extract_dir, rundir.RESULTS))
  lines = ["## Extraction", ""]
  if not result or not result.get("rows"):
    return lines + [f"Extraction: {NOT_RUN}.", ""], {}
  rows = result["rows"]
  cost_cfg = state.get("extract_cost") or {}
  flops = cost_cfg.get("inference", "flops" if float(result.get("i_T", 1e9)) > 1e4
                       else "latency") == "flops"
  scale, unit = (1e-9, "GFLOPs") if flops else (1.0, "ms")
  cost_label = (f"i = forward {unit}" + (f" (batch {cost_cfg['batch']}, {cost_cfg['seq_len']} "
                                         "tokens)" if "batch" in cost_cfg else ""))
  ranked = sorted((r for r in rows if r.get("w") is not None), key=lambda r: -float(r["w"]))
  lines += report_choice.extraction_lines(result)
  who = "W's choice" if result.get("chosen", result["best"]) != result["best"] else "Chosen"
  lines += [f"{who}: **{result['best']}** (W = {float(result['best_w']):.4f}) of {len(rows)} "
            f"candidates, eps = {result.get('eps')}, rule {result.get('rule')}. The best "
            f"{min(10, len(ranked))} by W (the full table: `extract/results.md`):", "",
            f"| rank | candidate | p (M) | {cost_label} | proxy error e | W |",
            "|---|---|---|---|---|---|"]
  for k, r in enumerate(ranked[:10]):
    lines.append(f"| {k + 1} | {r['name']} | {float(r['p']) / 1e6:.4g} | "
                 f"{float(r['i']) * scale:.4g} | {_fmt(r.get('e'), 4)} | "
                 f"{float(r['w']):.4f} |")
  lines.append("")
  try:
    budget = result.get("chosen")
    budget = budget if budget not in (None, result["best"]) else None
    report_plots.pareto(rows, result["best"], _size_label(rows, cost_cfg.get("size")),
                        cost_label, scale, os.path.join(out_dir, "pareto.png"), budget)
    lines += ["![Pareto plot](pareto.png)", ""]
  except ValueError as error:
    lines += [f"No Pareto plot: {error}.", ""]
  lines += _audit_lines(extract_dir, out_dir)
  return lines, {"chosen": result.get("chosen", result["best"]), "w_choice": result["best"],
                 "w": result["best_w"], "select": result.get("select")}


def _audit_lines(extract_dir: str, out_dir: str) -> list[str]:
  """The extraction's audit of its proxy (``audit.json`` / ``audit.png``), when it has one."""
  audit = read_json(os.path.join(extract_dir, "audit.json"))
  lines = ["### Proxy audit", ""]
  if audit is None and not os.path.exists(os.path.join(extract_dir, "audit.png")):
    return lines + [f"Audit of the proxy: {NOT_RUN}.", ""]
  if isinstance(audit, dict):
    shown = {k: v for k, v in audit.items() if isinstance(v, (int, float, str, bool))}
    lines += [f"- {k}: {_fmt(v, 4) if isinstance(v, float) else v}" for k, v in shown.items()]
    lines.append("")
  if os.path.exists(os.path.join(extract_dir, "audit.png")):
    shutil.copyfile(os.path.join(extract_dir, "audit.png"), os.path.join(out_dir, "audit.png"))
    lines += ["![Proxy audit](audit.png)", ""]
  return lines


# ----------------------------------------------------------------------------- distillation


def _curve(records: list[dict], keys: tuple[str, ...]) -> list[tuple[int, float]]:
  for key in keys:
    points = [(int(r["step"]), float(r[key])) for r in records if key in r]
    if points:
      return points
  return []


def distill_section(workdir: str, out_dir: str) -> tuple[list[str], dict]:
  """The student's masked-LM loss curves against the teacher's held-out level."""
  records = read_jsonl(os.path.join(workdir, "distill", "metrics.jsonl"))
  lines = ["## Distillation", ""]
  train = _curve(records, ("mlm_loss", "loss"))
  heldout = _curve(records, ("eval_mlm_loss", "eval_loss"))
  if not train and not heldout:
    return lines + [f"Distillation: {NOT_RUN}.", ""], {}
  teacher_curve = _curve(read_jsonl(os.path.join(workdir, "teacher", "metrics.jsonl")),
                         ("eval_mlm_loss", "eval_loss"))
  teacher = teacher_curve[-1][1] if teacher_curve else None
  report_plots.distill_curves(train, heldout, teacher, os.path.join(out_dir, "distill.png"))
  info = {"steps": max(s for s, _ in train + heldout),
          "student_heldout": heldout[-1][1] if heldout else None,
          "teacher_heldout": teacher}
  lines += [f"{info['steps']} steps. Held-out masked-LM loss: student "
            f"{_fmt(info['student_heldout'])}, teacher {_fmt(teacher)} (nats per masked "
            "token).", "", "![Distillation curves](distill.png)", ""]
  return lines, info


# ----------------------------------------------------------------------------- speed


def speed_models(workdir: str, config: ml_collections.ConfigDict) -> dict:
  """name -> ModelConfig of the student, the teacher and ``config.speed_models``."""
  from bort_jax.core import arch as arch_lib  # pylint: disable=import-outside-toplevel
  from bort_jax.interop import export  # pylint: disable=import-outside-toplevel
  models = {}
  for name, sub in (("student", "distill"), ("teacher", "teacher")):
    try:
      models[name] = export.load_config(rundir.export_dir(os.path.join(workdir, sub)))
    except (ValueError, OSError):
      continue
  for preset in config.speed_models:
    models[preset] = arch_lib.get_model_config(preset)
  return models


def measure_speed(workdir: str, config: ml_collections.ConfigDict, out_dir: str) -> dict:
  """Latency of every model, measured side by side, or reused from ``speed.json``."""
  from bort_jax.core import cost  # pylint: disable=import-outside-toplevel
  models = speed_models(workdir, config)
  if "student" not in models:
    return {}
  # W's and the budget's choice: a model of each shape the student does not have is timed too.
  choices = report_choice.picks(read_json(os.path.join(workdir, "extract", rundir.RESULTS)))
  models.update(report_choice.choice_models(choices, models))
  runtimes = other_runtimes(config)
  key = {"models": {k: str(v.arch) for k, v in models.items()}, "batch": int(config.batch),
         "seq_len": int(config.seq_len), "rounds": int(config.rounds)}
  if runtimes:
    key["runtimes"] = list(runtimes)
  path = os.path.join(out_dir, "speed.json")
  cached = read_json(path)
  if cached and cached.get("key") == key and not config.remeasure:
    return dict(cached, choices=choices)
  print(f"report: timing {', '.join(models)} ({config.rounds} interleaved rounds)",
        flush=True)
  busy = cost.busy_share()  # what other processes take of the CPUs, measured just before
  timings = cost.interleaved_latency(models, int(config.batch), int(config.seq_len),
                                     int(config.rounds), int(config.warmup))
  report_choice.annotate(timings, models, int(config.batch), int(config.seq_len))
  out = {"key": key, "timings": timings, "busy_share": busy, "choices": choices}
  if runtimes:
    out["runtimes"] = time_runtimes(models, runtimes, config)
  atomic_write_text(path, json.dumps(to_jsonable(out), indent=2))
  return out


def other_runtimes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The ONNX Runtime forms the speed table adds (none without the serve extra)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  wanted = tuple(config.get("runtimes") or ())
  if not wanted or importlib.util.find_spec("onnxruntime") is None:
    return ()
  return wanted


def time_runtimes(models: dict, runtimes: tuple[str, ...], config: ml_collections.ConfigDict
                  ) -> dict:
  """Teacher and student in each ONNX Runtime form, each form timed in a process of its own
  (``serve.timing.in_own_process``): runtime -> name -> timing."""
  from bort_jax.serve import timing  # pylint: disable=import-outside-toplevel
  pair = {k: models[k] for k in ("teacher", "student") if k in models}
  out = {}
  for runtime in runtimes:
    print(f"report: timing {', '.join(pair)} in {runtime} (a process of its own)", flush=True)
    try:
      out[runtime] = timing.in_own_process(pair, int(config.batch), int(config.seq_len),
                                           runtime, int(config.rounds), int(config.warmup))
    except RuntimeError as error:  # the page is still written, with the reason in its place
      print(f"report: {error}", flush=True)
      out[runtime] = {"error": str(error)}
  return out


def runtime_lines(speed: dict) -> list[str]:
  """The speed section's table of the teacher and the student in each runtime."""
  runtimes = {"jax": speed["timings"], **(speed.get("runtimes") or {})}
  if len(runtimes) < 2:
    return []
  lines = ["The teacher and the student in each runtime (ONNX Runtime: this project's ONNX "
           "export, float32 and dynamic int8, CPU; each runtime timed in a process of its "
           "own, so no runtime's threads slow another's):", "",
           "| runtime | student median (ms) | IQR | teacher median (ms) | IQR | speed-up |",
           "|---|---|---|---|---|---|"]
  for runtime, t in runtimes.items():
    if "error" in t:
      lines.append(f"| {runtime} | not measured: {t['error']} | | | | |")
    if "student" not in t or "teacher" not in t:
      continue
    s, te = t["student"], t["teacher"]
    lines.append(f"| {runtime} | {s['median_ms']:.2f} | {s['iqr_ms']:.2f} | "
                 f"{te['median_ms']:.2f} | {te['iqr_ms']:.2f} | "
                 f"{te['median_ms'] / s['median_ms']:.2f}x |")
  return lines + [""]


BUSY = 0.2  # above this share of the CPUs taken by other processes, the timings are flagged


def busy_note(speed: dict) -> str | None:
  """A warning when other processes kept the machine busy while the models were timed."""
  busy = (speed or {}).get("busy_share")
  if busy is None or busy <= BUSY:
    return None
  return (f"other processes kept {100 * busy:.0f}% of the CPUs busy just before the timing, so "
          "the larger models (which use every core) were slowed more than the student and the "
          "speed-up is overstated; time again on an idle machine with `bort-jax report "
          "--workdir=WORKDIR --config.remeasure=True`")


def speed_section(speed: dict, config: ml_collections.ConfigDict) -> list[str]:
  """The speed table: counts, FLOPs and measured latency with its spread."""
  lines = ["## Speed", ""]
  if not speed:
    return lines + [f"Speed: {NOT_RUN} (no distilled student).", ""]
  timings = speed["timings"]
  first = next(iter(timings.values()))
  lines += [f"Forward pass at batch {config.batch} x {config.seq_len} tokens on this "
            f"machine ({first['device']}, random weights, no head), {config.rounds} rounds "
            "timed interleaved (A B C A B C ...): median and interquartile range.", "",
            "| model | arch | params (M, total) | GFLOPs | median (ms) | IQR (ms) | "
            "x student's latency |", "|---|---|---|---|---|---|---|"]
  student = timings["student"]["median_ms"]
  for name, t in timings.items():
    lines.append(f"| {name} | {t['arch']} | {t['params_total'] / 1e6:.4g} | "
                 f"{t['gflops']:.4g} | {t['median_ms']:.2f} | {t['iqr_ms']:.2f} | "
                 f"{t['median_ms'] / student:.1f} |")
  lines += [""] + runtime_lines(speed) + report_choice.choice_table(speed)
  note = busy_note(speed)
  if note:
    lines += [f"**Busy machine**: {note}.", ""]
  elif speed.get("busy_share") is not None:
    lines += [f"Other processes took {100 * speed['busy_share']:.0f}% of the CPUs just before "
              "the timing.", ""]
  return lines


# ----------------------------------------------------------------------------- the page


def headline(rows: list[dict], speed: dict) -> dict:
  """The student's share of the teacher's dev score and of its margin; the speed-up."""
  both = [r for r in rows if r.get("student") and r.get("teacher")]
  out: dict[str, Any] = {"tasks": [r["task"] for r in both]}
  if both:
    s = sum(r["student"]["mean"] for r in both) / len(both)
    t = sum(r["teacher"]["mean"] for r in both) / len(both)
    out.update(student_mean=s, teacher_mean=t, share=s / t if t else None)
    if all(r.get("majority") is not None for r in both):
      m = sum(r["majority"] for r in both) / len(both)
      # The margin share is the mean over tasks of each task's share (each task counts the
      # same, whatever its margin); a share of a margin the teacher does not have means
      # nothing, so one such task makes it None.
      shares = [margin_share(r) for r in both]
      out.update(majority_mean=m, task_margin_shares=dict(zip(out["tasks"], shares)),
                 margin_share=(sum(shares) / len(shares)
                               if all(x is not None for x in shares) else None))
    # A task the teacher does not learn (its mean within one standard error of the majority
    # class) makes the plain share look better than it is: such tasks are named.
    out["unlearnt"] = [r["task"] for r in both if r.get("majority") is not None
                       and r["teacher"]["mean"] - r["majority"]
                       <= (standard_error(r["teacher"]["mean"], r.get("dev_records")) or 0.0)]
  timings = (speed or {}).get("timings", {})
  if "student" in timings and "teacher" in timings:
    out["speedup"] = timings["teacher"]["median_ms"] / timings["student"]["median_ms"]
    out["busy"] = busy_note(speed) is not None
  return out


def headline_text(head: dict) -> str:
  """The headline as one sentence."""
  parts = []
  if head.get("share") is not None:
    parts.append(f"the student reaches {100 * head['share']:.1f}% of the teacher's mean dev "
                 f"score over {len(head['tasks'])} tasks ({100 * head['student_mean']:.1f} vs "
                 f"{100 * head['teacher_mean']:.1f})")
    if head.get("margin_share") is not None:
      each = "; ".join(f"{t.split('/')[-1]} {100 * v:.0f}%"
                       for t, v in (head.get("task_margin_shares") or {}).items())
      parts.append(f"{100 * head['margin_share']:.1f}% of the teacher's margin above the "
                   f"majority class, averaged over the tasks ({each})")
    elif head.get("majority_mean") is not None:
      parts.append(f"with the teacher not above the majority class "
                   f"({100 * head['majority_mean']:.1f}), so no share of its margin")
  if head.get("unlearnt"):
    parts.append(f"but the teacher is within one standard error of the majority class on "
                 f"{', '.join(head['unlearnt'])} (read the margin share, not the plain share)")
  if head.get("speedup") is not None:
    busy = ("; timed on a busy machine, so overstated: see the speed section"
            if head.get("busy") else "")
    parts.append(f"{'and it' if parts else 'the student'} runs "
                 f"{speed_words(head['speedup'], '.1f')} (measured median latency{busy})")
  return ("Headline: " + ", ".join(parts) + ".") if parts else "Headline: not available yet."


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Writes ``workdir/report/report.md`` and its PNGs; returns the headline and the path.

  Raises:
    FileNotFoundError: ``workdir`` is not a directory.
  """
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir={workdir} is not a directory: run `bort-jax demo "
                            "--workdir=...` first (or point at one it made)")
  for field in ("batch", "seq_len", "rounds"):
    if int(config[field]) < 1:
      raise ValueError(f"config.{field}={config[field]} must be >= 1")
  out_dir = os.path.join(workdir, REPORT_DIR)
  os.makedirs(out_dir, exist_ok=True)
  state = read_json(os.path.join(workdir, rundir.DEMO_STATE)) or {}
  extract_lines, extracted = extraction_section(workdir, out_dir, state)
  distill_lines, distilled = distill_section(workdir, out_dir)
  rows = finetune_rows(finetune_runs(workdir, state))
  speed = measure_speed(workdir, config, out_dir)
  head = headline(rows, speed)
  lines = ["# bort_jax demo report", "", headline_text(head), ""]
  lines += stages_section(state) + extract_lines + distill_lines
  skipped = {entry.get("task") or f"demo/{key}": entry["reason"]
             for key, entry in (state.get("agora") or {}).items() if not entry.get("run")}
  lines += finetune_section(rows, out_dir, skipped) + speed_section(speed, config)
  product_lines, made = report_products.products(workdir, state)
  lines += product_lines
  path = os.path.join(out_dir, "report.md")
  atomic_write_text(path, "\n".join(lines))
  summary = {"report": path, "headline": head, "extraction": extracted,
             "distillation": distilled, "finetune": rows, "products": made}
  atomic_write_text(os.path.join(out_dir, "report.json"), json.dumps(to_jsonable(summary),
                                                                      indent=2))
  return summary


def cli_run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """``bort-jax report``: :func:`run`, then where the page is and its headline."""
  summary = run(config, workdir)
  print(f"Report: {summary['report']}\n{headline_text(summary['headline'])}", flush=True)
  return summary
