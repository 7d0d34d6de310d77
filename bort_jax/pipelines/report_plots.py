"""The report's figures: the extraction's Pareto plot, distillation curves, fine-tuning bars.

Every axis is in plain units (M parameters, GFLOPs, ms, nats) with plain tick labels: no
offset and no scientific notation, so a reader copies numbers off the axes as printed. Each
function takes plain data (lists and dicts read by ``report.py``), writes one PNG atomically
and returns its path.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from bort_jax.runtime import fileio
from bort_jax.search import report as search_report


def _figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(width, height), dpi=110)
  FigureCanvasAgg(fig)
  return fig


def _plain(ax, log_x: bool = False, axis: str = "both") -> None:
  """Plain tick labels (``search.report.plain_ticks``) and a light grid."""
  search_report.plain_ticks(ax, log_x, axis)
  ax.grid(alpha=0.3)


def _save(fig, path: str) -> str:
  fig.tight_layout()
  return fileio.save_figure(fig, path)


def pareto(rows: Sequence[Mapping], chosen: str, size_label: str, cost_label: str,
           cost_scale: float, path: str, budget_choice: str | None = None) -> str:
  """The extraction's Pareto plot (``search.report.front_plot``) from ``results.json`` rows.

  Args:
    rows: ``results.json`` rows (``name``, ``p``, ``i``, ``e``, ``w``, ``trained``).
    chosen: W's choice.
    size_label: the x label of the size panel (which count W used).
    cost_label: the x label of the cost panel, in the units after ``cost_scale``.
    cost_scale: factor taking ``i`` to those units (1e-9: FLOPs to GFLOPs).
    path: the PNG.
    budget_choice: the budget rule's choice (a green diamond), or None.
  """
  points = [{"name": r["name"], "size": float(r["p"]) / 1e6, "cost": float(r["i"]) * cost_scale,
             "e": r.get("e"), "w": r.get("w")} for r in rows if r.get("trained")]
  trained = sum(1 for p in points if p["e"] is not None and np.isfinite(float(p["e"])))
  return search_report.front_plot(
      points, chosen, budget_choice, path, size_label, cost_label,
      f"Extraction: {trained} trained candidates; chosen {budget_choice or chosen}",
      error_label="proxy error e (held-out loss)")


def distill_curves(train: Sequence[tuple[int, float]], heldout: Sequence[tuple[int, float]],
                   teacher: float | None, path: str, what: str = "masked-LM loss") -> str:
  """The student's training and held-out loss against steps, the teacher's level as a line."""
  fig = _figure(8, 4.5)
  ax = fig.add_subplot(1, 1, 1)
  if train:
    ax.plot(*zip(*train), "-", c="tab:blue", lw=1.5, label=f"student, training {what}")
  if heldout:
    ax.plot(*zip(*heldout), "o-", c="tab:orange", ms=5, lw=1.5,
            label=f"student, held-out {what}")
  if teacher is not None:
    ax.axhline(teacher, ls="--", c="tab:green", lw=1.5,
               label=f"teacher, held-out {what} ({teacher:.3f})")
  ax.set_xlabel("distillation step")
  ax.set_ylabel(f"{what} (nats per masked token)")
  ax.set_title("Distillation of the chosen student")
  _plain(ax)
  ax.legend(fontsize=8)
  return _save(fig, path)


def finetune_bars(rows: Sequence[Mapping], path: str) -> str:
  """Per task: majority baseline, student and teacher dev scores (mean, +- std over seeds).

  Args:
    rows: ``{"task", "metric", "majority", "student": stats | None, "teacher": stats |
      None}`` with stats ``{"mean", "std"}``.
    path: the PNG.
  """
  fig = _figure(max(6, 2.6 * len(rows)), 4.5)
  ax = fig.add_subplot(1, 1, 1)
  x = np.arange(len(rows))
  width = 0.27
  bars = (("majority", "majority class", "0.7"), ("student", "student", "tab:blue"),
          ("teacher", "teacher", "tab:orange"))
  for k, (key, label, colour) in enumerate(bars):
    means, stds = [], []
    for r in rows:
      value = r.get(key)
      mean = value if isinstance(value, (int, float)) else (value or {}).get("mean", np.nan)
      std = 0.0 if isinstance(value, (int, float)) else (value or {}).get("std", 0.0)
      if isinstance(value, dict) and len(value.get("values", [])) == 1:
        std = np.nan  # one seed: no spread to draw (not a measured zero)
      means.append(100.0 * float(mean) if mean is not None else np.nan)
      stds.append(100.0 * float(std) if std is not None else 0.0)
    ax.bar(x + (k - 1) * width, means, width, yerr=None if key == "majority" else stds,
           capsize=3, color=colour, label=label)
  ax.set_xticks(x, [f"{r['task']}\n({r['metric']})" for r in rows])
  ax.set_ylabel("dev score (%), mean +- std over seeds")
  ax.set_ylim(0, 100)
  ax.set_title("Fine-tuning on the demo tasks")
  _plain(ax, axis="y")
  # Below the axes: a bar can reach any height up to 100.
  ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3)
  return _save(fig, path)
