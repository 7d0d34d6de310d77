"""The dry-run flags of the training modes, and how ``main`` runs a dry run.

``bort-jax distill|teacher-adapt|extract|finetune --dry-run --target=NAME`` plans the run with
its config (``plan/dry_run.py``) instead of running it: no workdir is needed, nothing is
written. JAX is set up for it before it starts: CPU only (a TPU plan compiles with libtpu's
compile-only devices, never a local TPU), with as many simulated CPU devices as a GPU target
has.
"""

from __future__ import annotations

import argparse

from bort_jax.plan import targets as targets_lib

DRY_RUN_FLAGS = ("target", "mfu", "max_batch", "shapes", "prices", "json", "largest_only")


def plan_flags(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group("planning (no workdir needed, nothing written)")
  group.add_argument("--dry-run", action="store_true",
                     help="compile the run's real programs for --target and say whether they "
                          "fit (memory per device, FLOPs, ETA, chip-hours); run nothing")
  group.add_argument("--target", default=None, choices=targets_lib.NAMES,
                     help="the slice or host to plan for (TPU targets need the plan extra)")
  group.add_argument("--mfu", type=float, default=None,
                     help="model FLOP utilisation for the ETA (default: the one this project "
                          "measured for the step kind, else a stated assumption)")
  group.add_argument("--max-batch", action="store_true",
                     help="also find the largest per-device batch that fits (bisection over "
                          "compiles)")
  group.add_argument("--shapes", default="",
                     help="model shapes when the checkpoints are elsewhere: teacher=, student=, "
                          "init= a preset or arch string (e.g. teacher=roberta-large)")
  group.add_argument("--prices", default="",
                     help="JSON object (or a file) of price per chip-hour by target or family, "
                          "e.g. '{\"v5e\": 1.2}': adds the bill")
  group.add_argument("--largest-only", action="store_true",
                     help="compile only the program that holds the most (an extraction's "
                          "largest bucket); the others' FLOPs are analytic, their memory "
                          "unchecked")
  group.add_argument("--json", action="store_true", help="print the plan as JSON")


def check_flags(args: argparse.Namespace) -> None:
  """Planning flags only go with --dry-run; --dry-run needs a target."""
  used = [f for f in DRY_RUN_FLAGS if getattr(args, f, None) not in (None, False, "")]
  if not getattr(args, "dry_run", False):
    if used:
      raise ValueError(f"--{used[0].replace('_', '-')} is a planning flag: it goes with "
                       "--dry-run")
    return
  if not args.target:
    raise ValueError(f"--dry-run needs --target, one of {', '.join(targets_lib.NAMES)}")


def prepare_jax(args: argparse.Namespace) -> None:
  """CPU only, and a GPU target's count of simulated devices; before JAX starts."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  if xla_bridge.backends_are_initialized():  # called from Python: JAX is already set up
    return
  jax.config.update("jax_platforms", "cpu")
  target = targets_lib.TARGETS.get(args.target)
  if target is not None and target.platform == "gpu":
    jax.config.update("jax_num_cpu_devices", max(target.devices,
                                                 int(jax.config.jax_num_cpu_devices)))


def dry_run(name: str, config, args: argparse.Namespace) -> int:
  """Runs the dry run of mode ``name``; 0 when everything fits (a misfit raises DoesNotFit).

  ``demo`` is planned stage by stage (``plan/stages.py``); every stage is planned and printed
  before a misfit ends the command.
  """
  from bort_jax.plan import dry_run as dry_run_lib  # pylint: disable=import-outside-toplevel
  flags = dict(mfu=args.mfu, prices=args.prices, find_max_batch=args.max_batch,
               as_json=args.json, largest_only=args.largest_only)
  if name != "demo":
    dry_run_lib.run(name, config, args.target, shapes=args.shapes, **flags)
    return 0
  from bort_jax.plan import programs, stages  # pylint: disable=import-outside-toplevel
  given = programs.parse_shapes(args.shapes)
  misfits, eta = [], 0.0
  for stage, mode, cfg, shapes, note in stages.stages(config, args.workdir, given):
    print(f"\n== demo stage {stage}" + (f" (planned with {note})" if note else ""), flush=True)
    try:
      eta += dry_run_lib.run(mode, cfg, args.target, shapes=shapes, **flags)["eta_s"]
    except dry_run_lib.DoesNotFit as error:
      misfits.append(f"stage {stage}: {error}")
  print(f"\n== the demo's training stages: ETA {dry_run_lib.clock(eta)} in all (fetch, Agora "
        "and the report not counted)", flush=True)
  if misfits:
    raise dry_run_lib.DoesNotFit(f"{len(misfits)} demo stage(s) do not fit; the first, "
                                 f"{misfits[0]}")
  return 0
