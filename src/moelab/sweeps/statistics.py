"""Statistics that fit a handful of seeds: a mean's 95 % t interval, Welch's t-test of two arms
(unequal variances; Welch 1947) and Holm's step-down correction for the several comparisons
of one table (Holm 1979). With n = 3 a z-rule ("beyond 2 standard errors") overstates what
the runs show; these are what a reviewer would compute from the same numbers.

The t distribution comes from `scipy.special` (stdtr, stdtrit); the formulas are written
here and checked against `scipy.stats.ttest_ind(equal_var=False)` in the tests."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

from scipy.special import stdtr, stdtrit

ALPHA = 0.05


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """(low, high) of the mean's t interval; None for fewer than two values."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    half = float(stdtrit(len(values) - 1, 0.5 + confidence / 2)) * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


@dataclass
class Welch:
    """Welch's two-sample t-test of mean(a) − mean(b)."""

    difference: float
    t: float
    df: float
    p: float  # two-sided
    low: float  # the difference's 95 % interval
    high: float

    def __str__(self) -> str:
        return f"{self.difference:+.4g} (95 % CI [{self.low:+.3g}, {self.high:+.3g}], Welch p = {self.p:.2g})"


def welch(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Welch | None:
    """Welch's t-test; None when either arm has fewer than two values (no variance)."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    difference = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(va + vb)
    if se == 0:
        p = 1.0 if difference == 0 else 0.0
        return Welch(difference, math.copysign(math.inf, difference) if difference else 0.0, math.inf, p, difference, difference)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = difference / se
    p = 2 * float(stdtr(df, -abs(t)))
    half = float(stdtrit(df, 0.5 + confidence / 2)) * se
    return Welch(difference, t, df, p, difference - half, difference + half)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's adjusted p-values (same order as given): the i-th smallest is multiplied by
    (m − i + 1), made monotone, capped at 1. Reject where adjusted p < α: the family-wise
    error rate stays at α over the table's m comparisons."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def verdict(test: Welch | None, adjusted_p: float | None, alpha: float = ALPHA) -> str:
    """Words for one comparison: whether it holds at α after Holm's correction."""
    if test is None or adjusted_p is None:
        return "one seed: no test"
    if adjusted_p < alpha:
        return f"{'higher' if test.difference > 0 else 'lower'} at α = {alpha} (Holm-adjusted p = {adjusted_p:.2g})"
    return f"not distinguishable at α = {alpha} (Holm-adjusted p = {adjusted_p:.2g})"
