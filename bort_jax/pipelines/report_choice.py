"""The demo report's side-by-side of the two selection rules (``bort-jax report``, ``report.py``).

The extraction always computes W's choice (the paper's rule) and, with
``config.select.rule="budget"``, the lowest-error candidate among those meeting the budget; the
demo distils the configured rule's choice (``chosen_arch.txt``). This module reads both from
``extract/results.json`` and gives ``report.py``:

* :func:`extraction_lines`: the extraction section's lines on the rule, the budget and both
  choices;
* :func:`choice_models`: a randomly initialised model of each choice whose shape is not the
  distilled student's, to be timed beside the student and the teacher (the speed section times
  random weights anyway, so the student's own shape needs nothing more);
* :func:`annotate`: the sizes and FLOPs of every timed model;
* :func:`choice_table`: the speed section's table: shape, parameters, proxy error, predicted
  speed-up (the teacher's forward FLOPs over the model's, at the timed shape), measured
  speed-up (the teacher's median latency over the model's, interleaved timing) with the median
  and IQR, and which one the demo distilled.

Decisions: the predicted speed-up is the analytic FLOPs ratio at the report's own batch and
length, so it is comparable with the measured one even when the extraction costed i otherwise
(latency, or another length); the extraction's own figure is in results.md.
"""

from __future__ import annotations

import math
from typing import Any

from bort_jax.search.select import speed_words


def picks(result: dict | None) -> list[dict]:
  """W's choice and, with a budget, the budget's, from a ``results.json``.

  Args:
    result: the extraction's results.json content (or None).

  Returns:
    [{"rule", "label", "name", "e", "distilled"}], W's first; [] without a result. An older
    results.json (no ``select``) gives W's choice alone.
  """
  if not result or not result.get("best"):
    return []
  rows = {r["name"]: r for r in result.get("rows", [])}
  sel = result.get("select") or {"rule": "w"}
  chosen = result.get("chosen", result["best"])
  out = [{"rule": "w", "label": "W (the paper's rule)", "name": result["best"],
          "e": (rows.get(result["best"]) or {}).get("e")}]
  if sel.get("rule") == "budget":
    out.append({"rule": "budget", "label": f"budget: {sel.get('budget')}",
                "name": sel["choice"], "e": sel.get("e")})
  for pick in out:
    pick["distilled"] = pick["name"] == chosen
  return out


def extraction_lines(result: dict | None) -> list[str]:
  """The extraction section's lines on the selection rule (none for an older results.json)."""
  sel = (result or {}).get("select")
  if not sel:
    return []
  if sel.get("rule") != "budget":
    return [f"Selection rule `w` (the paper's): W's choice **{result['best']}** is the one "
            "distilled (`extract/chosen_arch.txt`).", ""]
  speedup = (f", {speed_words(sel['speedup'])} in the search's cost"
             if sel.get("speedup") else "")
  return [f"Selection rule `budget` ({sel['budget']}): **{sel['choice']}**, the lowest proxy "
          f"error (e = {_num(sel.get('e'), 4)}) among the {sel['feasible']} candidates meeting "
          f"the budget ({sel.get('feasible_trained', '?')} of them trained){speedup}, is the one "
          f"distilled; W's choice (the paper's rule) is **{result['best']}**. Both are timed "
          "in the speed section.", ""]


def choice_models(choices: list[dict], models: dict) -> dict:
  """Models to time for the choices that are not the student's shape (random weights).

  Each pick gets ``timing``: the name of its timed model (``"student"`` when it has the
  distilled student's shape, else ``"<rule>_choice"``, returned here).

  Args:
    choices: from :func:`picks`.
    models: the report's timed models; ``student`` gives the family (vocabulary, positions).

  Returns:
    name -> ModelConfig of the models to add to the timing.
  """
  from bort_jax.core import arch as arch_lib  # pylint: disable=import-outside-toplevel
  student = models.get("student")
  out, by_shape = {}, {}
  if student is not None:
    by_shape[str(student.arch)] = "student"
  for pick in choices:
    shape = str(arch_lib.Arch.parse(pick["name"]))
    if shape not in by_shape and student is not None:
      by_shape[shape] = f"{pick['rule']}_choice"
      out[by_shape[shape]] = student.replace(arch=arch_lib.Arch.parse(shape))
    pick["timing"] = by_shape.get(shape)
  return out


def annotate(timings: dict, models: dict, batch: int, seq_len: int) -> None:
  """Adds each timed model's parameter counts (no head) and forward GFLOPs to its timing."""
  from bort_jax.core import cost  # pylint: disable=import-outside-toplevel
  for name, c in models.items():
    counts = cost.param_counts(c, head="none")
    timings[name].update(params_total=counts["total"], params_effective=counts["effective"],
                         gflops=cost.forward_flops(c, batch, seq_len)["total"] / 1e9)


def _num(value: Any, digits: int = 3) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "-"
  return f"{float(value):.{digits}g}"


def _times(value: float | None) -> str:
  return "-" if value is None else f"{value:.3g}x"


def choice_table(speed: dict) -> list[str]:
  """The speed section's side-by-side of W's and the budget's choice ([] without choices)."""
  choices = (speed or {}).get("choices") or []
  timings = (speed or {}).get("timings") or {}
  teacher = timings.get("teacher")
  if not choices:
    return []
  lines = ["### W's choice and the budget's choice", "",
           "Predicted speed-up: the teacher's forward FLOPs over the model's at this batch and "
           "length; measured: the teacher's median latency over the model's, timed "
           "interleaved above (a model of the choice's shape with random weights when it is "
           "not the distilled student's). Below 1x the model is slower than the teacher.", "",
           "| rule | shape | params (M, total) | proxy error e | predicted speed-up | measured "
           "speed-up | median (IQR) ms | distilled |", "|---|---|---|---|---|---|---|---|"]
  for pick in choices:
    t = timings.get(pick.get("timing") or "")
    predicted = measured = None
    if t and teacher:
      predicted = teacher["gflops"] / t["gflops"]
      measured = teacher["median_ms"] / t["median_ms"]
    lines.append(
        f"| {pick['label']} | {pick['name']} | "
        f"{_num(t['params_total'] / 1e6 if t else None, 4)} | {_num(pick.get('e'), 4)} | "
        f"{_times(predicted)} | {_times(measured)} | "
        + (f"{t['median_ms']:.2f} ({t['iqr_ms']:.2f})" if t else "-")
        + f" | {'yes' if pick['distilled'] else 'no'} |")
  return lines + [""]
