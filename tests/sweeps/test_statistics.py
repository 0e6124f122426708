"""The report's statistics against scipy on fixed numbers: Welch's t-test (statistic, degrees of
freedom, two-sided p, the difference's interval), the mean's t interval, and Holm's
correction against its definition worked out by hand."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from moelab.sweeps.statistics import holm, t_interval, verdict, welch

# results.md's LM study, MoE vs dense val bpb over 3 seeds (the review's example), and a
# pair with very different spreads and sizes.
CASES = [
    ([1.5917, 1.6004, 1.5871], [1.6089, 1.6204, 1.6112]),
    ([0.962, 0.9667, 0.9574, 0.9611, 0.9648], [0.9648, 0.9556]),
    ([10.0, 12.5, 9.0, 14.0], [11.0, 11.2, 10.9]),
]


@pytest.mark.parametrize("a,b", CASES)
def test_welch_matches_scipys_unequal_variance_t_test(a, b):
    ours = welch(a, b)
    theirs = stats.ttest_ind(a, b, equal_var=False)
    assert ours.t == pytest.approx(theirs.statistic, rel=1e-10)
    assert ours.p == pytest.approx(theirs.pvalue, rel=1e-8)
    assert ours.df == pytest.approx(theirs.df, rel=1e-10)
    low, high = theirs.confidence_interval(0.95)
    assert (ours.low, ours.high) == (pytest.approx(low, rel=1e-8), pytest.approx(high, rel=1e-8))


def test_the_t_interval_matches_scipy_and_needs_two_values():
    values = [0.962, 0.9667, 0.9574]
    low, high = stats.t.interval(0.95, len(values) - 1, loc=sum(values) / 3, scale=stats.sem(values))
    assert t_interval(values) == (pytest.approx(low, rel=1e-10), pytest.approx(high, rel=1e-10))
    assert t_interval([1.0]) is None and welch([1.0], [1.0, 2.0]) is None


def test_holm_adjusts_by_rank_keeps_order_and_stays_monotone():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005 ×4 = 0.02, 0.01 ×3 = 0.03, 0.03 ×2 = 0.06, 0.04 ×1 = 0.04 → monotone 0.06
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.9, 0.8]) == [1.0, 1.0]
    test = welch(*CASES[0])
    assert verdict(test, 0.03).startswith("lower at α = 0.05")
    assert verdict(test, 0.2).startswith("not distinguishable")
    assert math.isclose(test.difference, sum(CASES[0][0]) / 3 - sum(CASES[0][1]) / 3)
