"""The claims lab's statistics: paired confidence intervals, the five verdicts, Holm's method.

Pure NumPy/SciPy and independent of the experiments, so that the rule is tested on hand-made
numbers (`tests/test_claims_lab.py`).

A claim is pre-registered as one primary `Comparison` (`a - b` per seed, in the direction the
literature gives, with the minimum effect that matters) plus an optional precondition (that
the baseline shows the problem). Its verdict comes from the 95 % confidence interval of the
mean paired difference over seeds (Student's t, n - 1 degrees of freedom):

* `not testable here`: the precondition fails (the design cannot show the effect);
* `reproduced`: the interval lies above zero and the mean is at least the minimum effect;
* `contradicted`: the interval lies below zero;
* `no effect`: the interval lies within plus or minus the minimum effect;
* `inconclusive`: otherwise.

An *equivalence* claim ("RMS norm matches layer norm") is reproduced when the interval lies
within plus or minus the minimum effect, contradicted when it excludes that band entirely,
inconclusive otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

VERDICTS = ("reproduced", "contradicted", "no effect", "inconclusive", "not testable here")
LEVEL = 0.95


def t_quantile(p: float, df: int) -> float:
  """The p-quantile of Student's t with `df` degrees of freedom."""
  from scipy import stats
  return float(stats.t.ppf(p, df))


class Interval(NamedTuple):
  """Mean paired difference over seeds with its two-sided confidence interval."""
  mean: float
  low: float
  high: float
  sd: float        # sample standard deviation of the per-seed differences (ddof 1)
  n: int
  p_value: float   # two-sided, H0: mean difference 0


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Interval:
  """The mean of `a - b` (paired by index) and its Student-t confidence interval.

  Raises:
    ValueError: fewer than 2 pairs, or `a` and `b` of different lengths.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"a and b must be 1-D of equal length (paired by seed); got shapes "
                     f"{a.shape} and {b.shape}")
  return interval(a - b, level)


def interval(d: Sequence[float], level: float = LEVEL) -> Interval:
  """The mean of the per-seed values `d` and its Student-t confidence interval."""
  d = np.asarray(d, np.float64)
  n = d.size
  if n < 2:
    raise ValueError(f"a confidence interval needs at least 2 seeds; got {n}")
  mean, sd = float(d.mean()), float(d.std(ddof=1))
  half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
  if sd == 0.0:
    p = 1.0 if mean == 0.0 else 0.0
  else:
    from scipy import stats
    p = float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
  return Interval(mean, mean - half, mean + half, sd, n, p)


def verdict(ci: Interval, min_effect: float, precondition: bool = True,
            equivalence: bool = False) -> str:
  """One of `VERDICTS` from a paired interval (`a - b`, the claimed direction positive)."""
  if min_effect <= 0:
    raise ValueError(f"min_effect must be > 0; got {min_effect}")
  if not precondition:
    return "not testable here"
  if equivalence:
    if -min_effect <= ci.low and ci.high <= min_effect:
      return "reproduced"
    if ci.low > min_effect or ci.high < -min_effect:
      return "contradicted"
    return "inconclusive"
  if ci.low > 0 and ci.mean >= min_effect:
    return "reproduced"
  if ci.high < 0:
    return "contradicted"
  if -min_effect <= ci.low and ci.high <= min_effect:
    return "no effect"
  return "inconclusive"


def holm(p_values: Sequence[float]) -> list[float]:
  """Holm-Bonferroni adjusted p-values (family-wise error), in the input order."""
  p = np.asarray(p_values, np.float64)
  m = p.size
  order = np.argsort(p)
  adjusted = np.empty(m)
  running = 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (m - rank) * p[i]))
    adjusted[i] = running
  return adjusted.tolist()


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
