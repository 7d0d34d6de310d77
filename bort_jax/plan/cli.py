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

DRY_RUN_FLAGS = ("target", "mfu", "max_batch", "shapes", "prices", "json")


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
  """Runs the dry run of mode ``name``; 0 when everything fits (a misfit raises DoesNotFit)."""
  from bort_jax.plan import dry_run as dry_run_lib  # pylint: disable=import-outside-toplevel
  dry_run_lib.run(name, config, args.target, mfu=args.mfu, shapes=args.shapes,
                  prices=args.prices, find_max_batch=args.max_batch, as_json=args.json)
  return 0
