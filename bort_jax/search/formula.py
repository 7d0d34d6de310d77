"""The W coefficient of Bort's extraction (docs/EXTRACTION.md), as plain arithmetic.

W(T, b) = gain_p * gain_i / e_b with gain_p = (p_T - p_b) / p_T and gain_i = (i_T - i_b) / i_T.
Pure (no array library): the search (``fptas.py``), the report and the proxy audit
(``audit.py``) all use these one definitions.
"""

from __future__ import annotations

import math


def check_positive(name: str, value: float) -> float:
  """``float(value)`` when it is finite and > 0; else a ValueError naming ``name``."""
  value = float(value)
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f"{name} must be a finite positive number, got {value!r}")
  return value


def raw_gain(p_T, i_T, p_b, i_b):
  # The one definition of the cost part of W; works on floats and on numpy arrays of b.
  return ((p_T - p_b) / p_T) * ((i_T - i_b) / i_T)


def gain(p_T: float, i_T: float, p_b: float, i_b: float) -> float:
  """The cost part of W: [(p_T - p_b) / p_T] * [(i_T - i_b) / i_T].

  Args:
    p_T, i_T: size and inference cost of the maximum point T (both > 0).
    p_b, i_b: size and inference cost of the candidate b (finite).

  Returns:
    The product of the relative savings; 0 for b = T, negative when b is larger than T in
    exactly one of the two.
  """
  p_T = check_positive("p_T (size of the maximum point)", p_T)
  i_T = check_positive("i_T (inference cost of the maximum point)", i_T)
  for name, value in (("p_b", p_b), ("i_b", i_b)):
    if not math.isfinite(float(value)):
      raise ValueError(f"{name} must be finite, got {value!r}")
  return raw_gain(p_T, i_T, float(p_b), float(i_b))


def w_coefficient(p_T: float, i_T: float, p_b: float, i_b: float, e_b: float) -> float:
  """W(T, b) = [(p_T - p_b) / p_T] * [(i_T - i_b) / i_T] * [1 / e_b] (docs/EXTRACTION.md).

  Args:
    p_T, i_T: size and inference cost of the maximum point T (both > 0).
    p_b, i_b: size and inference cost of the candidate b.
    e_b: proxy error of b (> 0; a loss of 0 would make W infinite).

  Returns:
    W; larger is better. W(T, T) = 0.
  """
  e_b = check_positive("e_b (proxy error)", e_b)
  return gain(p_T, i_T, p_b, i_b) / e_b


def gain_parts(p_T: float, i_T: float, p_b: float, i_b: float) -> tuple[float, float]:
  """The two factors of the cost gain: (gain_p, gain_i) = ((p_T - p_b)/p_T, (i_T - i_b)/i_T).

  The report shows them apart so a reader sees which saving (size or inference cost) drives W.

  Args:
    p_T, i_T: size and inference cost of the maximum point T (both > 0).
    p_b, i_b: size and inference cost of the candidate b.

  Returns:
    (gain_p, gain_i); their product is :func:`gain`.
  """
  p_T = check_positive("p_T (size of the maximum point)", p_T)
  i_T = check_positive("i_T (inference cost of the maximum point)", i_T)
  return (p_T - float(p_b)) / p_T, (i_T - float(i_b)) / i_T
