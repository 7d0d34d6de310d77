"""Outputs of an extraction run: result tables, the Pareto plot and the cost ledger.

Everything is written into the run's workdir:
- ``results.md`` / ``results.csv`` / ``results.json``: one row per candidate, sorted by W
  (largest first, untrained candidates last), from a :class:`bort_jax.search.fptas.Result`;
- ``chosen_arch.txt``: the returned architecture string;
- ``pareto.png``: size and inference cost against proxy error, Pareto fronts highlighted and
  the chosen candidate marked;
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

from bort_jax.runtime.fileio import atomic_write_text, to_jsonable

LEDGER_KEYS = ("wall_time_s", "compile_time_s", "compile_count", "flops")
"""Keys every cost ledger must have (more are allowed)."""


def _columns(result) -> list[str]:
  extra = sorted({k for row in result.rows for k in row.extra})
  return ["rank", "arch", "p", *extra, "i", "e", "W", "theta", "trained", "interval"]


def _cells(rank: int, row, extra_keys: Sequence[str]) -> list[Any]:
  return [rank, row.name, row.p, *[row.extra.get(k) for k in extra_keys], row.i, row.e,
          row.w, row.theta, row.trained, row.interval]


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


def write_tables(result, workdir: str | os.PathLike) -> dict[str, str]:
  """Writes results.md, results.csv, results.json and chosen_arch.txt.

  Args:
    result: a :class:`bort_jax.search.fptas.Result`. Row ``extra`` columns (e.g. params_total,
      params_effective, flops, latency_ms) become table columns after ``p``.
    workdir: the run's directory (created if needed).

  Returns:
    {"md", "csv", "json", "chosen"} -> path.
  """
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  columns = _columns(result)
  extra_keys = columns[3:columns.index("i")]
  rows = result.sorted_rows()
  table = [_cells(rank, row, extra_keys) for rank, row in enumerate(rows, start=1)]

  best = result.best
  t_name = (result.rows[result.maximum_index].name if result.maximum_index is not None
            else f"reference point (p={result.p_T:g}, i={result.i_T:g})")
  trained = sum(r.trained for r in result.rows)
  lines = [
      "# Extraction results",
      "",
      f"- chosen: **{best.name}** (W = {_md(best.w)}, e = {_md(best.e)}, "
      f"theta = {_md(best.theta)})",
      f"- maximum point T: {t_name} (p = {_md(result.p_T)}, i = {_md(result.i_T)})",
      f"- interval size eps = {result.eps}, rule `{result.rule}`: {trained} of "
      f"{len(result.rows)} candidates trained, {result.num_pairs} (candidate, theta) pairs, "
      f"{result.num_computed} computed in the last run",
      "- sorted by W, largest first; untrained candidates (no e, no W) last",
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
  atomic_write_text(paths["chosen"], best.name + "\n")
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
  """Two panels: size vs proxy error and inference cost vs proxy error.

  Only trained candidates with a finite error are plotted. Each panel's Pareto front (both
  axes minimised) is drawn as a line through highlighted points; the chosen candidate is a
  red star with its name.

  Args:
    result: a :class:`bort_jax.search.fptas.Result`.
    path: the PNG to write.
    size_key: the row ``extra`` column used as size (falls back to ``p`` when absent).
    size_label: x label of the first panel (default: the key's name).
    i_label: x label of the second panel (e.g. "latency (ms)" or "FLOPs").

  Returns:
    The path written.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  path = os.fspath(path)
  rows = [r for r in result.rows if r.trained and r.e is not None and math.isfinite(r.e)]
  if not rows:
    raise ValueError("no trained candidate with a finite error to plot")
  has_size = all(size_key in r.extra for r in rows)
  size = np.array([float(r.extra[size_key]) if has_size else r.p for r in rows])
  cost = np.array([r.i for r in rows])
  err = np.array([r.e for r in rows])
  chosen = next(k for k, r in enumerate(rows) if r.name == result.best.name)

  fig = Figure(figsize=(12, 5), dpi=110)
  FigureCanvasAgg(fig)
  panels = [(size, size_label or (size_key if has_size else "p (parameters)")),
            (cost, i_label)]
  for col, (x, label) in enumerate(panels):
    ax = fig.add_subplot(1, 2, col + 1)
    front = pareto_front(np.stack([x, err], axis=1))
    ax.scatter(x, err, s=18, c="0.6", label=f"trained ({len(rows)})", zorder=2)
    ax.plot(x[front], err[front], "-o", c="tab:blue", ms=6, lw=1.5,
            label=f"Pareto front ({len(front)})", zorder=3)
    ax.scatter([x[chosen]], [err[chosen]], marker="*", s=260, c="tab:red",
               edgecolors="k", label="chosen (max W)", zorder=4)
    ax.annotate(f"{rows[chosen].name}\nW={rows[chosen].w:.3g}", (x[chosen], err[chosen]),
                xytext=(12, 12), textcoords="offset points", fontsize=9,
                arrowprops={"arrowstyle": "->", "lw": 0.8},
                bbox={"boxstyle": "round", "fc": "white", "alpha": 0.85})
    ax.set_xlabel(label)
    ax.set_ylabel("proxy error e")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    if x.max() / max(x.min(), 1e-300) > 50:
      ax.set_xscale("log")
  untrained = len(result.rows) - len(rows)
  fig.suptitle(f"Extraction: {len(result.rows)} candidates, eps={result.eps}, rule "
               f"{result.rule}, {untrained} not trained or diverged; chosen {result.best.name}")
  fig.tight_layout()
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  tmp = path + ".tmp.png"
  fig.savefig(tmp, format="png")
  os.replace(tmp, path)
  return path


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
