"""Outputs of an extraction run: result tables, the Pareto plot and the cost ledger.

Everything is written into the run's workdir:
- ``results.md`` / ``results.csv`` / ``results.json``: one row per candidate, sorted by W
  (largest first, untrained candidates last), from a :class:`bort_jax.search.fptas.Result`;
- ``chosen_arch.txt``: the configured selection rule's choice (W's, or the budget's with
  ``config.select.rule="budget"``), the architecture distillation reads;
- ``pareto.png``: size and inference cost against proxy error, Pareto fronts highlighted and
  the chosen candidate marked;
- ``audit.png``: the proxy audit's s-step against S-step errors, the chosen candidate marked;
- ``ledger.json``: what the run cost (wall time, compile time, compile count, FLOPs).

Plots use matplotlib's object API on an Agg canvas, so no display and no pyplot global state
are needed. Files are written to a temporary name and renamed, so a kill never leaves a
half-written table behind. In a multi-host run only process 0 should call these.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from bort_jax.runtime import fileio
from bort_jax.runtime.fileio import atomic_write_text, to_jsonable
from bort_jax.search import audit, guarantee
from bort_jax.search.select import speed_words
from bort_jax.search.formula import gain_parts

LEDGER_KEYS = ("wall_time_s", "compile_time_s", "compile_count", "flops")
"""Keys every cost ledger must have (more are allowed)."""


def _columns(result) -> list[str]:
  extra = sorted({k for row in result.rows for k in row.extra})
  # The budget's columns only with a budget, so W-only tables keep their shape.
  budget = ["feasible", "plan"] if result.budget is not None else []
  return ["rank", "arch", "p", *extra, "i", "gain_p", "gain_i", "e", "1/e", "W", "theta",
          "trained", *budget, "tie", "interval"]


def _cells(rank: int, row, extra_keys: Sequence[str], p_T: float, i_T: float,
           budget: bool = False) -> list[Any]:
  # W = gain_p * gain_i * (1/e): the three factors are shown beside it.
  gain_p, gain_i = gain_parts(p_T, i_T, row.p, row.i)
  inv_e = 1.0 / row.e if row.e is not None and math.isfinite(row.e) else None
  return [rank, row.name, row.p, *[row.extra.get(k) for k in extra_keys], row.i, gain_p,
          gain_i, row.e, inv_e, row.w, row.theta, row.trained,
          *([row.feasible, row.plan] if budget else []), row.tie, row.interval]


def explain(result) -> dict:
  """Why W chose what it chose: the runner-up, the margin and whether size alone decided.

  Args:
    result: a :class:`bort_jax.search.fptas.Result`.

  Returns:
    {"runner_up": name or None, "margin": :func:`audit.choice_margin`,
     "max_gain": the trained candidate of largest gain, "size": :func:`audit.size_decides`},
    all over W's plan (the budget's extra trainings do not enter W's choice).
  """
  trained = [r for r in result.rows if r.in_w_plan]
  best, second = audit.best_two([r.w for r in trained])
  runner_up = trained[second] if second is not None else None
  max_gain = max(trained, key=lambda r: (r.gain, -r.p)).name
  return {"runner_up": runner_up.name if runner_up is not None else None,
          "margin": audit.choice_margin(trained[best].w,
                                        runner_up.w if runner_up is not None else None),
          "max_gain": max_gain,
          "size": audit.size_decides([r.e for r in trained], [r.gain for r in trained])}


def explanation_lines(result, why: Mapping[str, Any]) -> list[str]:
  """results.md's lines on ties, the margin of the choice and the size-alone warning."""
  lines = []
  ties = sum(1 for r in result.rows if r.tie > 1)
  if ties:
    rule = ("every member of a tie with a representative is trained (`ties=all`, "
            f"{result.tie_extra} extra trainings)" if result.ties == "all" else
            "only the member the sort order puts first is trained (`ties=first`: p, then i, "
            "then input order)")
    lines.append(f"- ties in (p, i): {ties} candidates share their size and cost with another; "
                 f"{rule}; column `tie` counts each one's tie")
  margin = why["margin"]
  whose = "W's choice" if result.budget is not None else "the choice"
  if why["runner_up"] is None:
    lines.append("- margin: only one candidate was trained")
  elif margin["runner_up_e_fall"] is None:
    lines.append(f"- margin: the runner-up {why['runner_up']} has W <= 0; no change of the "
                 "errors can make it overtake")
  else:
    lines.append(
        f"- margin: {whose} changes if {result.best.name}'s e rises by "
        f"{100 * margin['winner_e_rise']:.3g}% or the runner-up {why['runner_up']}'s e falls "
        f"by {100 * margin['runner_up_e_fall']:.3g}%")
  size = why["size"]
  if size["warn"]:
    lines.append(
        f"- **WARNING: {whose} is made by size alone**: the proxy errors spread by "
        f"{size['error_spread']:.3g}x (max/min over the trained candidates) against "
        f"{size['gain_spread']:.3g}x for the cost gains gain_p*gain_i, so W ranks the "
        f"candidates mostly by size and cost (the largest gain is {why['max_gain']})")
  return lines


def choice_lines(result) -> list[str]:
  """results.md's lines on the choice: W's alone, or the budget's and W's side by side."""
  best = result.best
  w_line = f"W = {_md(best.w)}, e = {_md(best.e)}, theta = {_md(best.theta)}"
  if result.budget is None:
    return [f"- chosen: **{best.name}** ({w_line})"]
  sel = result.selection()
  speedup = f", {speed_words(sel['speedup'])}" if sel["speedup"] else ""
  trained = [k for k, r in enumerate(result.rows) if r.trained]
  delta = guarantee.budget_bound([r.p for r in result.rows], result.p_T,
                                 result.budget.feasible, trained, 1.0)
  return [
      f"- chosen (rule `budget`, written to chosen_arch.txt): **{sel['choice']}**, the lowest "
      f"proxy error among the trained candidates that meet the budget ({sel['budget']}): "
      f"e = {_md(sel['e'])}, p = {_md(sel['p'])}{speedup}; runner-up "
      f"{sel['runner_up'] or 'none'}",
      f"- W's choice (rule `w`, the paper's): **{best.name}** ({w_line})",
      f"- budget: {sel['feasible']} of {len(result.rows)} candidates meet it, "
      f"{sel['feasible_trained']} of them trained ({result.budget_extra} candidates beyond W's "
      f"plan, column `plan`); guarantee under (A2) with constant L: e(chosen) <= e(best "
      f"feasible) + L x {delta:.4g} (delta / p_T; 0 when every feasible candidate is trained)"]


def _md(value: Any) -> str:
  """A Markdown cell: thousands separators for counts, 4 significant digits otherwise."""
  if value is None:
    return ""
  if isinstance(value, bool):
    return "yes" if value else "no"
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, int):
    return f"{value:,}"
  if isinstance(value, float):
    if not math.isfinite(value):
      return str(value)
    if value.is_integer() and abs(value) >= 1000:
      return f"{value:,.0f}"
    return f"{value:.4g}"
  if isinstance(value, (dict, list, tuple)):
    text = json.dumps(to_jsonable(value), sort_keys=True, separators=(",", ":"))
  else:
    text = str(value)
  return text.replace("|", "\\|")


def _csv(value: Any) -> Any:
  if value is None:
    return ""
  if isinstance(value, (dict, list, tuple)):
    return json.dumps(to_jsonable(value), sort_keys=True, separators=(",", ":"))
  if isinstance(value, np.generic):
    return value.item()
  return value


def write_tables(result, workdir: str | os.PathLike,
                 notes: Sequence[str] = ()) -> dict[str, str]:
  """Writes results.md, results.csv, results.json and chosen_arch.txt.

  Args:
    result: a :class:`bort_jax.search.fptas.Result`. Row ``extra`` columns (e.g. params_total,
      params_effective, flops, latency_ms) become table columns after ``p``.
    workdir: the run's directory (created if needed).
    notes: more lines for results.md's summary (e.g. the proxy audit's verdict).

  Returns:
    {"md", "csv", "json", "chosen"} -> path.
  """
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  columns = _columns(result)
  extra_keys = columns[3:columns.index("i")]
  rows = result.sorted_rows()
  table = [_cells(rank, row, extra_keys, result.p_T, result.i_T, result.budget is not None)
           for rank, row in enumerate(rows, start=1)]

  t_name = (result.rows[result.maximum_index].name if result.maximum_index is not None
            else f"reference point (p={result.p_T:g}, i={result.i_T:g})")
  trained = sum(r.trained for r in result.rows)
  lines = [
      "# Extraction results",
      "",
      *choice_lines(result),
      f"- maximum point T: {t_name} (p = {_md(result.p_T)}, i = {_md(result.i_T)})",
      f"- interval size eps = {result.eps}, rule `{result.rule}`: {trained} of "
      f"{len(result.rows)} candidates trained, {result.num_pairs} (candidate, theta) pairs, "
      f"{result.num_computed} computed in the last run",
      *explanation_lines(result, explain(result)),
      *[f"- {note}" for note in notes],
      "- sorted by W = gain_p * gain_i * (1/e), largest first; untrained candidates (no e, "
      "no W) last",
      "",
      "| " + " | ".join(columns) + " |",
      "|" + "|".join("---:" if c not in ("arch", "theta", "trained") else "---"
                     for c in columns) + "|",
  ]
  lines += ["| " + " | ".join(_md(v) for v in cells) + " |" for cells in table]
  paths = {k: os.path.join(workdir, name) for k, name in (
      ("md", "results.md"), ("csv", "results.csv"), ("json", "results.json"),
      ("chosen", "chosen_arch.txt"))}
  atomic_write_text(paths["md"], "\n".join(lines) + "\n")

  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(columns)
  writer.writerows([[_csv(v) for v in cells] for cells in table])
  atomic_write_text(paths["csv"], buf.getvalue())

  atomic_write_text(paths["json"], json.dumps(to_jsonable(result.to_dict()), indent=1) + "\n")
  atomic_write_text(paths["chosen"], result.chosen.name + "\n")
  return paths


def pareto_front(points: Sequence[Sequence[float]] | np.ndarray) -> list[int]:
  """Indices of the non-dominated points when every coordinate is to be minimised.

  A point is dominated when another is <= in every coordinate and < in at least one. Equal
  points do not dominate each other, so duplicates on the front are all kept.

  Args:
    points: [n, k] finite numbers.

  Returns:
    The front's indices, sorted by the first coordinate (then the next ones).
  """
  pts = np.asarray(points, dtype=np.float64)
  if pts.ndim != 2:
    raise ValueError(f"points must be a 2-D array [n, k], got shape {pts.shape}")
  if pts.size and not np.isfinite(pts).all():
    bad = int(np.flatnonzero(~np.isfinite(pts).all(axis=1))[0])
    raise ValueError(f"points must be finite; point {bad} is {pts[bad].tolist()}")
  if len(pts) == 0:
    return []
  le = (pts[:, None, :] <= pts[None, :, :]).all(axis=2)  # le[a, b]: a <= b everywhere
  lt = (pts[:, None, :] < pts[None, :, :]).any(axis=2)
  dominated = (le & lt).any(axis=0)
  front = np.flatnonzero(~dominated)
  order = np.lexsort(tuple(pts[front, c] for c in reversed(range(pts.shape[1]))))
  return [int(k) for k in front[order]]


def pareto_plot(result, path: str | os.PathLike, size_key: str = "params_effective",
                size_label: str | None = None, i_label: str = "inference cost") -> str:
  """The extraction's Pareto plot (:func:`front_plot`) of a search result.

  Args:
    result: a :class:`bort_jax.search.fptas.Result`.
    path: the PNG to write.
    size_key: the row ``extra`` column used as size (falls back to ``p`` when absent).
    size_label: x label of the first panel (default: the key's name).
    i_label: x label of the second panel (e.g. "latency (ms)" or "FLOPs").

  Returns:
    The path written.
  """
  rows = [r for r in result.rows if r.trained]
  has_size = bool(rows) and all(size_key in r.extra for r in rows)
  points = [{"name": r.name, "size": float(r.extra[size_key]) if has_size else r.p,
             "cost": r.i, "e": r.e, "w": r.w} for r in rows]
  untrained = len(result.rows) - len(
      [r for r in rows if r.e is not None and math.isfinite(r.e)])
  return front_plot(
      points, result.best.name, result.chosen.name if result.budget is not None else None,
      path, size_label or (size_key if has_size else "p (parameters)"), i_label,
      f"Extraction: {len(result.rows)} candidates, eps={result.eps}, rule {result.rule}, "
      f"{untrained} not trained or diverged; chosen {result.chosen.name}")


def front_plot(points: Sequence[Mapping[str, Any]], w_choice: str, budget_choice: str | None,
               path: str | os.PathLike, size_label: str, cost_label: str, title: str,
               error_label: str = "proxy error e") -> str:
  """Two panels, size and inference cost against the proxy error, each with its Pareto front.

  The one drawing of the extraction's trade-off (the search's ``pareto.png`` and the demo
  report's). Points with no finite error are left out. Each panel's front (both axes
  minimised) is a line through highlighted points; W's choice is a red star with its name and
  W, the budget rule's choice (when given and different) a green diamond. The legend sits
  above the axes, so it hides no candidate; tick labels are plain numbers.

  Args:
    points: ``{"name", "size", "cost", "e", "w"}`` per trained candidate.
    w_choice: the name of W's choice.
    budget_choice: the budget rule's choice, or None.
    path: the PNG to write.
    size_label, cost_label: the x labels.
    title: the figure's title.
    error_label: the y label.

  Returns:
    The path written.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  rows = [r for r in points if r.get("e") is not None and math.isfinite(float(r["e"]))]
  if not rows:
    raise ValueError("no trained candidate with a finite error to plot")
  size = np.array([float(r["size"]) for r in rows])
  cost = np.array([float(r["cost"]) for r in rows])
  err = np.array([float(r["e"]) for r in rows])
  names = [r["name"] for r in rows]
  chosen = names.index(w_choice) if w_choice in names else int(np.argmin(err))
  budget = (names.index(budget_choice) if budget_choice in names and budget_choice != w_choice
            else None)
  fig = Figure(figsize=(12, 5), dpi=110)
  FigureCanvasAgg(fig)
  for col, (x, label) in enumerate(((size, size_label), (cost, cost_label))):
    ax = fig.add_subplot(1, 2, col + 1)
    front = pareto_front(np.stack([x, err], axis=1))
    ax.scatter(x, err, s=18, c="0.6", label=f"trained candidates ({len(rows)})", zorder=2)
    ax.plot(x[front], err[front], "-o", c="tab:blue", ms=6, lw=1.5,
            label=f"Pareto front ({len(front)})", zorder=3)
    ax.scatter([x[chosen]], [err[chosen]], marker="*", s=260, c="tab:red", edgecolors="k",
               zorder=4, label="chosen (max W)" if budget is None else "W's choice (max W)")
    ax.annotate(f"{names[chosen]}\nW={float(rows[chosen].get('w') or 0):.3g}",
                (x[chosen], err[chosen]), xytext=(12, 12), textcoords="offset points",
                fontsize=9, arrowprops={"arrowstyle": "->", "lw": 0.8},
                bbox={"boxstyle": "round", "fc": "white", "alpha": 0.85})
    if budget is not None:
      ax.scatter([x[budget]], [err[budget]], marker="D", s=110, c="tab:green", edgecolors="k",
                 label="chosen (lowest e under the budget)", zorder=5)
      ax.annotate(names[budget], (x[budget], err[budget]), xytext=(12, -18),
                  textcoords="offset points", fontsize=9, color="tab:green")
    ax.set_xlabel(label)
    ax.set_ylabel(error_label)
    ax.grid(alpha=0.3)
    plain_ticks(ax, log_x=x.max() / max(x.min(), 1e-300) > 50)
    legend_outside(ax)
  fig.suptitle(title)
  fig.tight_layout()
  return _save(fig, os.fspath(path))


def plain_ticks(ax, log_x: bool = False, axis: str = "both") -> None:
  """Plain tick labels (no offset, no 1e6 factor); a log x axis keeps plain numbers too.

  ``axis="y"`` for a plot whose x ticks are names.
  """
  from matplotlib.ticker import FuncFormatter, NullFormatter
  if log_x:
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
  else:
    ax.ticklabel_format(axis=axis, useOffset=False, style="plain")


def legend_outside(ax, ncol: int = 3) -> None:
  """The axes' legend above them, outside the plotting area, so it covers no data point.

  ``tight_layout`` then makes room for it (it counts the legend as part of the axes).
  """
  ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.02, 1.0, 0.2), mode="expand", ncol=ncol,
            fontsize=8, borderaxespad=0.0)


def _save(fig, path: str) -> str:
  return fileio.save_figure(fig, path)


def audit_plot(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any],
               path: str | os.PathLike, short_steps: int, long_steps: int,
               error_label: str = "held-out proxy loss (nats)") -> str:
  """The proxy audit's scatter: error after s steps (x) against error after S steps (y).

  Every audited candidate is a point; the search's choice is a red star, the choice W makes
  with the S-step errors (when it differs) a blue diamond. Axes are in the loss's own units
  with plain tick labels (no offset or scientific notation), so the numbers read as they are.

  Args:
    rows: the audited candidates, each with "name", "short" and "long" errors.
    summary: :func:`bort_jax.search.audit.audit_summary`'s result.
    path: the PNG to write.
    short_steps, long_steps: s and S.
    error_label: what the error is, with its unit.

  Returns:
    The path written.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  path = os.fspath(path)
  keep = [r for r in rows if math.isfinite(r["short"]) and math.isfinite(r["long"])]
  if not keep:
    raise ValueError("no audited candidate with finite errors to plot")
  x = np.array([r["short"] for r in keep])
  y = np.array([r["long"] for r in keep])
  fig = Figure(figsize=(7, 6), dpi=110)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  ax.scatter(x, y, s=30, c="0.45", label=f"audited ({len(keep)})", zorder=2)
  for name, marker, color, size, label in (
      (summary["chosen"], "*", "tab:red", 280, "chosen by the search"),
      (summary["choice_long"] if summary["choice_changed"] else None, "D", "tab:blue", 90,
       f"{'the budget' if summary.get('rule') == 'budget' else 'W'}'s choice with "
       f"{long_steps}-step errors")):
    match = [k for k, r in enumerate(keep) if r["name"] == name]
    if match:
      k = match[0]
      ax.scatter([x[k]], [y[k]], marker=marker, s=size, c=color, edgecolors="k", label=label,
                 zorder=4)
      ax.annotate(name, (x[k], y[k]), xytext=(10, 10), textcoords="offset points", fontsize=9)
  ax.set_xlabel(f"{error_label} after s={short_steps} steps")
  ax.set_ylabel(f"{error_label} after S={long_steps} steps")
  ax.ticklabel_format(axis="both", style="plain", useOffset=False)
  ax.grid(alpha=0.3)
  ax.legend(loc="best", fontsize=8)
  ax.set_title(f"Proxy audit: Kendall tau-b {summary['kendall_tau_b']:.3f}, Spearman rho "
               f"{summary['spearman_rho']:.3f}; " + ("trusted" if summary["trusted"]
                                                      else "not trusted"), fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def write_ledger(workdir: str | os.PathLike, ledger: Mapping[str, Any]) -> str:
  """Writes the cost ledger ``ledger.json``.

  Args:
    workdir: the run's directory (created if needed).
    ledger: at least :data:`LEDGER_KEYS` (seconds of wall time and of compilation, number of
      compilations, FLOPs spent on proxy training), each a finite number >= 0; any other
      JSON-able entries (e.g. per-phase times, device name) are kept.

  Returns:
    The path written.
  """
  missing = [k for k in LEDGER_KEYS if k not in ledger]
  if missing:
    raise ValueError(f"cost ledger lacks {missing}; it needs {list(LEDGER_KEYS)}")
  for key in LEDGER_KEYS:
    value = ledger[key]
    if isinstance(value, np.generic):
      value = value.item()
    if (isinstance(value, bool) or not isinstance(value, (int, float))
        or not math.isfinite(value) or value < 0):
      raise ValueError(f"cost ledger entry {key!r} must be a finite number >= 0, got {value!r}")
  try:
    text = json.dumps(to_jsonable(dict(ledger), strict=True), indent=1, sort_keys=True,
                      allow_nan=False)
  except (TypeError, ValueError) as err:
    raise ValueError(f"cost ledger is not JSON-serialisable: {err}") from err
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "ledger.json")
  atomic_write_text(path, text + "\n")
  return path
