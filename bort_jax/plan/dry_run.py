"""``--dry-run --target=NAME``: compile a mode's real programs for a target and say whether
they fit, before anything is paid for.

What it prints, per program and device: the compiled memory analysis (arguments, temporaries,
output; donated arguments counted once), the headroom against the device's memory, the FLOPs per
run, the runs (steps), and an ETA at a stated MFU: the MFU this project measured for that kind
of step on that platform, or ``--mfu``, or a stated assumption where it has measured none. Then
chip-hours and, with ``--prices``, the bill. Exit 0 when every program fits; when one does not,
the compiler's verdict in one line and what to change, exit 2. ``--max-batch`` bisects the
per-device batch over compiles. Nothing is written to the workdir; compiles go through JAX's
persistent compilation cache (``$BORT_JAX_CACHE/xla`` or ``~/.cache/bort_jax/xla``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Mapping

from bort_jax.plan import targets as targets_lib

GIB = 1024 ** 3
# MFU (model FLOP/s over the peak the target table states) this project measured, per platform
# and kind of step, with the benchmark that measured it. TPU and GPU: none measured here (no
# accelerator): a plan on them states ASSUMED_MFU unless --mfu is given.
MEASURED_MFU: dict[tuple[str, str], tuple[float, str]] = {
    ("cpu", "distill"): (0.17, "benchmarks/plan.py: the demo's distillation step, 8 simulated "
                               "devices, batch 8"),
    ("cpu", "proxy"): (0.40, "benchmarks/plan.py: the demo extraction's largest bucket, "
                             "batch 8"),
}
ASSUMED_MFU = 0.35
PAPER_GPU_HOURS = 288.0  # Bort's distillation, as the paper reports it (a GPU count x hours)


class DoesNotFit(ValueError):
  """A program that does not fit the target: its one-line verdict (exit 2)."""


@dataclasses.dataclass
class CompiledPlan:
  """One program's compile on the target: memory per device, FLOPs per run, compile time."""

  name: str
  runs: int
  seconds: float
  argument: int = 0
  temp: int = 0
  output: int = 0
  alias: int = 0
  flops: float = 0.0
  verdict: str = ""
  compiled: bool = True

  @property
  def total(self) -> int:
    """Bytes a device holds at the program's peak (donated inputs reuse their outputs)."""
    return self.argument + self.temp + self.output - self.alias


def cache_dir() -> str:
  from bort_jax.data import fetch  # pylint: disable=import-outside-toplevel
  return os.path.join(fetch.default_cache_dir(), "xla")


_CACHE_SETTINGS = {"jax_compilation_cache_dir": None,
                   "jax_persistent_cache_min_compile_time_secs": 0.0,
                   "jax_persistent_cache_min_entry_size_bytes": 0}


@contextlib.contextmanager
def compilation_cache():
  """JAX's persistent compilation cache for every compile inside, the settings restored after
  (a dry run called from Python leaves the caller's JAX as it was). JAX decides once whether
  it uses a cache, so the decision is reset on the way in and on the way out."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src import compilation_cache as jax_cache  # pylint: disable=import-outside-toplevel
  before = {name: getattr(jax.config, name) for name in _CACHE_SETTINGS}
  try:
    for name, value in _CACHE_SETTINGS.items():
      jax.config.update(name, cache_dir() if value is None else value)
    jax_cache.reset_cache()
    yield
  finally:
    for name, value in before.items():
      jax.config.update(name, value)
    jax_cache.reset_cache()


def _first_line(error: Exception) -> str:
  text = " ".join(str(error).split())
  cut = text.find(" Source Location")
  return (text[:cut] if cut > 0 else text[:400]).rstrip(". ")


def compile_program(program, target: targets_lib.Target, say: Callable[[str], None]
                    ) -> CompiledPlan:
  """Lowers and compiles ``program`` for the target's devices; a refusal for memory is a
  verdict, any other compiler error propagates."""
  t0 = time.perf_counter()
  say(f"[dry-run] compiling {program.name} for {target.name} ...")
  try:
    compiled = program.fn.lower(*program.args).compile()
  except Exception as error:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" not in str(error) and "Ran out of memory" not in str(error):
      raise
    seconds = time.perf_counter() - t0
    say(f"[dry-run]   refused after {seconds:.1f} s")
    return CompiledPlan(program.name, program.runs, seconds, verdict=_first_line(error))
  seconds = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  costs = compiled.cost_analysis()
  if isinstance(costs, (list, tuple)):
    costs = costs[0] if costs else {}
  flops = program.flops / target.devices if program.flops else float(costs.get("flops", 0.0))
  out = CompiledPlan(program.name, program.runs, seconds, int(memory.argument_size_in_bytes),
                     int(memory.temp_size_in_bytes), int(memory.output_size_in_bytes),
                     int(memory.alias_size_in_bytes), flops)
  if out.total > target.memory_per_device:
    out.verdict = (f"needs {out.total / GIB:.2f} GiB per device, the device has "
                   f"{target.memory_per_device / GIB:.2f} GiB")
  say(f"[dry-run]   compiled in {seconds:.1f} s")
  return out


def mfu_for(target: targets_lib.Target, kind: str, given: float | None) -> tuple[float, str]:
  """The MFU an ETA uses and where it comes from."""
  if given is not None:
    if not 0.0 < given <= 1.0:
      raise ValueError(f"--mfu={given}: must be in (0, 1]")
    return given, "given with --mfu"
  if (target.platform, kind) in MEASURED_MFU:
    value, source = MEASURED_MFU[(target.platform, kind)]
    return value, f"measured by this project ({source})"
  return ASSUMED_MFU, (f"assumed: this project has measured no {kind} step on "
                       f"{target.platform.upper()}; pass --mfu")


def clock(seconds: float) -> str:
  if seconds >= 86400:
    return f"{seconds / 86400:.1f} days"
  if seconds >= 3600:
    return f"{seconds / 3600:.1f} h"
  if seconds >= 60:
    return f"{seconds / 60:.1f} min"
  return f"{seconds:.2f} s"


def summarise(plan, results: list, target: targets_lib.Target, mfu: tuple[float, str],
              prices: Mapping[str, float]) -> dict:
  """The plan's figures as one JSON-able dict (what the lines print)."""
  rate = target.peak_flops_per_device * mfu[0]
  seconds = sum(r.flops * r.runs / rate for r in results if not r.verdict)
  worst = max(results, key=lambda r: r.total)
  chip_hours = seconds / 3600 * target.chips
  family = target.name.split("-")[0]
  out = {"target": target.name, "estimate": target.estimate, "mode": plan.mode,
         "mesh": plan.mesh_shape, "global_batch": plan.global_batch,
         "per_device_batch": plan.per_device_batch,
         "memory_per_device_gib": target.memory_per_device / GIB,
         "programs": [dataclasses.asdict(r) | {"total": r.total} for r in results],
         "peak_gib": worst.total / GIB, "headroom_gib": (target.memory_per_device - worst.total)
         / GIB, "fits": not any(r.verdict for r in results), "mfu": mfu[0],
         "mfu_source": mfu[1], "eta_s": seconds, "chip_hours": chip_hours,
         "notes": list(plan.notes)}
  price = prices.get(target.name, prices.get(family))
  if price is not None:
    out["bill"] = chip_hours * float(price)
  return out


def lines(summary: Mapping[str, Any], target: targets_lib.Target) -> list[str]:
  """The dry run's report, one fact a line."""
  tag = " (ESTIMATE: compiled for a simulated CPU mesh of the same size)" if target.estimate \
      else ""
  peak = (f"{target.peak_flops_per_device / 1e9:.1f} GFLOP/s (float32 matmul, timed now)"
          if target.platform == "cpu" else
          f"{target.peak_flops_per_device / 1e12:.1f} TFLOP/s (bf16 peak)")
  out = [f"dry run of {summary['mode']} on {target.name}: {target.devices} devices, "
         f"chips billed {target.chips}, {target.memory_per_device / GIB:.2f} GiB and {peak} "
         f"per device, {target.interconnect}{tag}",
         f"mesh {summary['mesh']}, global batch {summary['global_batch']}, per-device batch "
         f"{summary['per_device_batch']}"]
  for p in summary["programs"]:
    if not p["compiled"]:
      out.append(f"  {p['name']}: not compiled (--largest-only); {p['flops'] / 1e9:,.1f} GFLOP "
                 f"per device per run (analytic) x {p['runs']:,} runs")
      continue
    if p["verdict"] and not p["total"]:
      out.append(f"  {p['name']}: DOES NOT FIT: {p['verdict']}")
      continue
    out.append(f"  {p['name']}: per device arguments {p['argument'] / GIB:.3f} GiB, "
               f"temporaries {p['temp'] / GIB:.3f} GiB, output {p['output'] / GIB:.3f} GiB "
               f"(donated {p['alias'] / GIB:.3f}), total {p['total'] / GIB:.3f} GiB, headroom "
               f"{(summary['memory_per_device_gib'] - p['total'] / GIB):.2f} GiB; "
               f"{p['flops'] / 1e9:,.1f} GFLOP per device per run x {p['runs']:,} runs; "
               f"compiled in {p['seconds']:.1f} s" + (f"; DOES NOT FIT: {p['verdict']}"
                                                       if p["verdict"] else ""))
  out += [f"  {note}" for note in summary["notes"]]
  out.append(f"ETA {clock(summary['eta_s'])} at MFU {summary['mfu']:.2f} "
             f"({summary['mfu_source']}); {summary['chip_hours']:,.1f} chip-hours"
             + (f", about {summary['bill']:,.0f} at the given price" if "bill" in summary
                else " (--prices for a bill)"))
  return out


def check_prices(text: str) -> dict[str, float]:
  """``--prices``: a JSON object of price per chip-hour by target or family name."""
  if not text:
    return {}
  try:
    table = json.loads(open(text).read() if os.path.isfile(text) else text)
  except (OSError, json.JSONDecodeError) as error:
    raise ValueError(f"--prices={text!r}: not a JSON object or a file holding one ({error}); "
                     "e.g. '{\"v5e\": 1.2, \"h100-x8\": 3.0}' (price per chip-hour)") from None
  if not isinstance(table, dict) or not all(
      isinstance(v, (int, float)) and v >= 0 for v in table.values()):
    raise ValueError(f"--prices={text!r}: must map target or family names to prices per "
                     "chip-hour (numbers >= 0)")
  return table


def compile_all(plan, target, say, largest_only: bool = False) -> list[CompiledPlan]:
  """Every program compiled; ``largest_only``: only the one holding the most (the others keep
  their analytic FLOPs, their memory unchecked)."""
  chosen = range(len(plan.programs))
  if largest_only and len(plan.programs) > 1:
    chosen = [max(chosen, key=lambda k: plan.programs[k].size)]
  results = []
  for n, program in enumerate(plan.programs):
    if n not in chosen:
      results.append(CompiledPlan(program.name, program.runs, 0.0,
                                  flops=(program.flops or 0.0) / target.devices, compiled=False))
      continue
    if len(plan.programs) > 1:
      say(f"[dry-run] program {n + 1} of {len(plan.programs)}")
    results.append(compile_program(program, target, say))
  return results


def max_batch(plan, target, say, start: int = 1, first_fits: bool | None = None,
              limit: int = 1 << 14, largest_only: bool = False) -> tuple[int, list]:
  """The largest per-device batch whose programs all fit, from the configured one: doubling
  while it fits (halving while it does not), then bisection to within 1/16 of the answer (a
  compile per probe; the last few rows of batch are not worth minutes each)."""
  probes = []

  def fits(b: int, known: bool | None = None) -> bool:
    ok = known if known is not None else not any(
        r.verdict for r in compile_all(plan.rebatch(b), target, say, largest_only))
    probes.append(f"{b} {'fits' if ok else 'does not fit'}")
    return ok

  b = max(1, int(start))
  if fits(b, first_fits):
    lo, hi = b, None
    while lo * 2 <= limit:
      if not fits(lo * 2):
        hi = lo * 2
        break
      lo *= 2
    if hi is None:
      return lo, probes + [f"stopped at {limit}"]
  else:
    hi, lo = b, None
    while hi > 1:
      if fits(hi // 2):
        lo = hi // 2
        break
      hi //= 2
    if lo is None:
      return 0, probes
  while hi - lo > max(1, lo // 16):
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo, probes


ADVICE = ("lower the per-device batch (--max-batch finds the largest that fits), or shard the "
          "parameters and optimizer state over more devices (--config.mesh.fsdp=K with "
          "--config.mesh.data=-1); this project's model has no rematerialisation switch")


def run(mode: str, config, target_name: str, *, mfu: float | None = None,
        shapes: str | Mapping[str, Any] = "",
        prices: str = "", find_max_batch: bool = False, as_json: bool = False,
        largest_only: bool = False, say: Callable[[str], None] | None = None) -> dict:
  """Plans ``mode`` with ``config`` on the target; prints the report; returns the summary.

  Raises:
    DoesNotFit: a program does not fit (after the report is printed).
    ValueError: bad input (an unknown target, a bad --shapes, --mfu or --prices).
  """
  from bort_jax.plan import programs  # pylint: disable=import-outside-toplevel
  say = say or (lambda line: print(line, file=sys.stderr, flush=True))
  target = targets_lib.resolve(target_name)
  table = check_prices(prices)
  shape_of = programs.parse_shapes(shapes) if isinstance(shapes, str) else dict(shapes)
  devices = targets_lib.devices_of(target)
  with compilation_cache():
    plan = programs.build(mode, config, devices, shape_of)
    chosen = mfu_for(target, plan.kind, mfu)
    summary = summarise(plan, compile_all(plan, target, say, largest_only), target, chosen,
                        table)
    if find_max_batch and plan.rebatch is not None:
      best, probes = max_batch(plan, target, say, plan.per_device_batch, summary["fits"],
                               largest_only=largest_only)
      summary["max_per_device_batch"] = best
      summary["notes"].append(f"largest per-device batch that fits: {best} (probes: "
                              f"{', '.join(probes)})")
  if mode == "distill" and str(config.student.get("arch", "")).startswith("bort"):
    summary["notes"].append(f"the paper reports {PAPER_GPU_HOURS:.0f} GPU-hours for Bort's "
                            "distillation")
  if as_json:
    print(json.dumps(summary, indent=2))
  else:
    print("\n".join(lines(summary, target)), flush=True)
  bad = [p for p in summary["programs"] if p["verdict"]]
  if bad:
    raise DoesNotFit(f"--dry-run --target={target.name}: {bad[0]['name']} does not fit: "
                     f"{bad[0]['verdict']}. To fit, {ADVICE}")
  return summary
