"""The statistics of campaign reports: conversion rates, uplift against the control group, a
95 % interval for the difference and a two-sided p-value. Pure functions, no I/O.

Sources of the formulas:

- Wilson score interval: E. B. Wilson, "Probable inference, the law of succession, and
  statistical inference", JASA 22 (1927) 209–212; as written in R. G. Newcombe, "Two-sided
  confidence intervals for the single proportion: comparison of seven methods", Statistics
  in Medicine 17 (1998) 857–872, method 3.
- Difference of two independent proportions: R. G. Newcombe, "Interval estimation for the
  difference between independent proportions: comparison of eleven methods", Statistics in
  Medicine 17 (1998) 873–890, method 10 (the hybrid score interval built from the two
  Wilson intervals). The Wald interval (p̂₁ − p̂₂ ± z·se) is not used: it collapses to a
  point when a group has no conversion and its coverage falls well below 95 % at the small
  counts that control groups of rare conversions have.
- p-value: the pooled two-proportion z-test, z = (p̂₁ − p̂₂) / √(p̄(1 − p̄)(1/n₁ + 1/n₂)),
  which is the Pearson χ² test of the 2×2 table without continuity correction (z² = χ²);
  two-sided p = erfc(|z| / √2).

``tests/feedback/test_stats.py`` checks all of them against statsmodels and scipy, and the
interval's coverage over simulated campaigns.
"""

from __future__ import annotations

import math
from typing import Any

Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion successes / n (n = 0: the whole of [0, 1])."""
    _check_counts(successes, n)
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n)) / denom
    # At 0 or n the exact bound is 0 or 1; rounding would otherwise leave 1e-17 on it.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


def newcombe_diff(x1: int, n1: int, x2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's hybrid score interval (method 10) for p1 − p2 (target minus control).

    With l_i, u_i the Wilson bounds of group i and d = p̂₁ − p̂₂:
    lower = d − √((p̂₁ − l₁)² + (u₂ − p̂₂)²), upper = d + √((u₁ − p̂₁)² + (p̂₂ − l₂)²).
    A group without contacts says nothing about its rate, so with n = 0 the interval is the
    widest one the other group allows, (l₁ − u₂, u₁ − l₂) with that group's bounds [0, 1].
    """
    l1, u1 = wilson(x1, n1, z)
    l2, u2 = wilson(x2, n2, z)
    if n1 == 0 or n2 == 0:
        return (l1 - u2, u1 - l2)
    p1 = x1 / n1
    p2 = x2 / n2
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return (max(-1.0, lo), min(1.0, hi))


def p_value_two_proportions(x1: int, n1: int, x2: int, n2: int) -> float:
    """Two-sided p-value of the pooled z-test that p1 = p2 (1.0 when it is undefined)."""
    _check_counts(x1, n1)
    _check_counts(x2, n2)
    if n1 == 0 or n2 == 0:
        return 1.0
    pooled = (x1 + x2) / (n1 + n2)
    var = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)
    if var <= 0.0:  # nobody or everybody converted in both groups: no evidence either way
        return 1.0
    zstat = (x1 / n1 - x2 / n2) / math.sqrt(var)
    return min(1.0, math.erfc(abs(zstat) / math.sqrt(2.0)))


def uplift(
    x_t: int,
    n_t: int,
    x_c: int,
    n_c: int,
    revenue_t: float = 0.0,
    revenue_c: float = 0.0,
) -> dict[str, Any]:
    """The report's ``uplift`` object (API.md) for x_t of n_t targets and x_c of n_c controls
    converted, with the revenue each group's conversions brought."""
    target_rate = x_t / n_t if n_t else 0.0
    control_rate = x_c / n_c if n_c else 0.0
    absolute = target_rate - control_rate
    lo, hi = newcombe_diff(x_t, n_t, x_c, n_c)
    rpc_t = revenue_t / n_t if n_t else 0.0
    rpc_c = revenue_c / n_c if n_c else 0.0
    return {
        "target_rate": target_rate,
        "control_rate": control_rate,
        "absolute": absolute,
        # Relative to a control rate of 0 is infinite; JSON has no infinity, and 0.0 says
        # "not measurable" in the same place a reader looks (the interval still tells).
        "relative": absolute / control_rate if control_rate else 0.0,
        "ci95": [lo, hi],
        "p_value": p_value_two_proportions(x_t, n_t, x_c, n_c),
        # What the campaign earned over what the targets would have brought without it,
        # estimated from the control group's revenue per contact.
        "incremental_revenue": (rpc_t - rpc_c) * n_t,
        "revenue_per_contact_target": rpc_t,
        "revenue_per_contact_control": rpc_c,
    }


def _check_counts(successes: int, n: int) -> None:
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
