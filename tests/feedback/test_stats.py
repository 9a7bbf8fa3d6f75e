"""The report statistics against statsmodels and scipy, and the 95 % interval's coverage over
simulated campaigns with a known true uplift (issue 12, "The proof"). No servers."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy.stats import chi2_contingency
from statsmodels.stats import proportion as sm  # a module: pytest would collect test_*

from services.feedback import stats

TOL = 1e-9
# statsmodels also computes ratios and odds ratios, which divide by zero on empty groups.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")


def _random_cases(seed: int, k: int) -> list[tuple[int, int, int, int]]:
    """Pairs of (x, n): tiny, moderate and large groups, rare and common conversions."""
    rng = random.Random(seed)
    cases = []
    for _ in range(k):
        n1 = rng.choice([1, 2, 3, 5, 10, 37, 100, 1000, rng.randint(1, 50_000)])
        n2 = rng.choice([1, 2, 4, 9, 50, 400, rng.randint(1, 20_000)])
        rate1, rate2 = rng.choice([0.01, 0.03, 0.2, 0.5, 0.97]), rng.random()
        x1 = min(n1, int(rng.betavariate(1, 1 / rate1) * n1 * 2))
        x2 = min(n2, round(rate2 * n2))
        cases.append((x1, n1, x2, n2))
    return cases


EDGES = [
    (0, 1, 0, 1),
    (1, 1, 1, 1),
    (0, 1, 1, 1),
    (1, 1, 0, 1),
    (0, 10, 0, 10),
    (10, 10, 10, 10),
    (0, 10, 10, 10),
    (10, 10, 0, 10),
    (0, 3000, 0, 300),
    (3000, 3000, 0, 300),
    (0, 2, 1, 2),
    (1, 2, 1, 3),
    (27, 900, 0, 100),
    (0, 900, 3, 100),
    (1, 100_000, 0, 10_000),
    (99_999, 100_000, 10_000, 10_000),
]
CASES = EDGES + _random_cases(12, 300)


@pytest.mark.parametrize(("x", "n"), sorted({(c[0], c[1]) for c in CASES} | {(0, 7), (7, 7)}))
def test_wilson_matches_statsmodels(x: int, n: int) -> None:
    lo, hi = stats.wilson(x, n)
    ref_lo, ref_hi = sm.proportion_confint(x, n, alpha=0.05, method="wilson")
    assert lo == pytest.approx(ref_lo, abs=TOL)
    assert hi == pytest.approx(ref_hi, abs=TOL)
    assert 0.0 <= lo <= x / n <= hi <= 1.0


def test_wilson_edges() -> None:
    assert stats.wilson(0, 0) == (0.0, 1.0)
    lo, hi = stats.wilson(0, 50)
    assert lo == 0.0 and 0 < hi < 0.08  # "no conversion" is not "a rate of exactly 0"
    lo, hi = stats.wilson(50, 50)
    assert hi == 1.0 and 0.92 < lo < 1
    # Hand calculation: 10 of 100 at z = 1.96, Wilson's closed form.
    z = stats.Z95
    centre = (0.1 + z * z / 200) / (1 + z * z / 100)
    half = z / (1 + z * z / 100) * math.sqrt(0.1 * 0.9 / 100 + z * z / 40_000)
    assert stats.wilson(10, 100) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert stats.wilson(10, 100) == pytest.approx((0.0552291, 0.1743657), abs=1e-7)
    with pytest.raises(ValueError, match="successes"):
        stats.wilson(3, 2)


@pytest.mark.parametrize(("x1", "n1", "x2", "n2"), CASES)
def test_newcombe_matches_statsmodels(x1: int, n1: int, x2: int, n2: int) -> None:
    lo, hi = stats.newcombe_diff(x1, n1, x2, n2)
    ref_lo, ref_hi = sm.confint_proportions_2indep(
        x1, n1, x2, n2, method="newcomb", compare="diff", alpha=0.05
    )
    assert lo == pytest.approx(ref_lo, abs=TOL)
    assert hi == pytest.approx(ref_hi, abs=TOL)
    assert -1.0 <= lo <= x1 / n1 - x2 / n2 <= hi <= 1.0


def test_newcombe_published_example() -> None:
    """Newcombe (1998), table II, example (a): 56/70 vs 48/80 → 0.0524 to 0.3339."""
    lo, hi = stats.newcombe_diff(56, 70, 48, 80)
    assert (round(lo, 4), round(hi, 4)) == (0.0524, 0.3339)


def test_newcombe_without_contacts_is_uninformative() -> None:
    # No control contact at all: the difference is anything the target group allows.
    lo, hi = stats.newcombe_diff(30, 1000, 0, 0)
    w_lo, w_hi = stats.wilson(30, 1000)
    assert (lo, hi) == pytest.approx((w_lo - 1.0, w_hi))
    assert stats.newcombe_diff(0, 0, 0, 0) == (-1.0, 1.0)
    lo, hi = stats.newcombe_diff(0, 0, 5, 50)
    assert lo < 0 < hi


@pytest.mark.parametrize(("x1", "n1", "x2", "n2"), CASES)
def test_p_value_matches_z_test_and_chi_square(x1: int, n1: int, x2: int, n2: int) -> None:
    p = stats.p_value_two_proportions(x1, n1, x2, n2)
    pooled = (x1 + x2) / (n1 + n2)
    if pooled in (0.0, 1.0):
        assert p == 1.0  # every statistic is 0/0 here; no evidence of a difference
        return
    _, ref = sm.proportions_ztest([x1, x2], [n1, n2])
    assert p == pytest.approx(ref, rel=1e-9, abs=1e-300)
    score = sm.test_proportions_2indep(
        x1, n1, x2, n2, method="score", compare="diff", correction=False
    ).pvalue
    assert p == pytest.approx(score, rel=1e-7, abs=1e-300)
    chi2 = chi2_contingency([[x1, n1 - x1], [x2, n2 - x2]], correction=False).pvalue
    assert p == pytest.approx(chi2, rel=1e-7, abs=1e-300)


def test_p_value_undefined_is_one() -> None:
    assert stats.p_value_two_proportions(0, 0, 3, 10) == 1.0
    assert stats.p_value_two_proportions(0, 10, 0, 0) == 1.0
    assert stats.p_value_two_proportions(0, 10, 0, 30) == 1.0
    assert stats.p_value_two_proportions(10, 10, 30, 30) == 1.0
    assert stats.p_value_two_proportions(5, 10, 5, 10) == 1.0


def test_uplift_object() -> None:
    u = stats.uplift(300, 10_000, 20, 1_000, revenue_t=3_000.0, revenue_c=150.0)
    assert set(u) == {
        "target_rate",
        "control_rate",
        "absolute",
        "relative",
        "ci95",
        "p_value",
        "incremental_revenue",
        "revenue_per_contact_target",
        "revenue_per_contact_control",
    }
    assert u["target_rate"] == pytest.approx(0.03)
    assert u["control_rate"] == pytest.approx(0.02)
    assert u["absolute"] == pytest.approx(0.01)
    assert u["relative"] == pytest.approx(0.5)
    ref = sm.confint_proportions_2indep(300, 10_000, 20, 1_000, method="newcomb", compare="diff")
    assert u["ci95"] == pytest.approx(list(ref), abs=TOL)
    assert isinstance(u["ci95"], list)
    assert u["p_value"] == pytest.approx(sm.proportions_ztest([300, 20], [10_000, 1_000])[1])
    assert u["revenue_per_contact_target"] == pytest.approx(0.30)
    assert u["revenue_per_contact_control"] == pytest.approx(0.15)
    # 10,000 targets each brought 0.15 more than a control customer did.
    assert u["incremental_revenue"] == pytest.approx(1_500.0)


def test_uplift_empty_and_zero_control() -> None:
    u = stats.uplift(0, 0, 0, 0)
    assert u["target_rate"] == u["control_rate"] == u["absolute"] == u["relative"] == 0.0
    assert u["ci95"] == [-1.0, 1.0]
    assert u["p_value"] == 1.0
    assert u["incremental_revenue"] == 0.0
    u = stats.uplift(12, 400, 0, 100, revenue_t=60.0)
    assert u["relative"] == 0.0  # relative to a control rate of 0 is not a number
    assert u["absolute"] == pytest.approx(0.03)
    assert u["ci95"][0] < 0.03 < u["ci95"][1]
    assert u["incremental_revenue"] == pytest.approx(60.0)
    assert all(math.isfinite(v) for k, v in u.items() if k != "ci95")


def _coverage(
    seed: int, sims: int, contacts: int, control_share: float, p_c: float, p_t: float
) -> tuple[float, float]:
    """Share of simulated campaigns whose interval holds the true difference: Newcombe's and,
    for contrast, Wald's."""
    rng = np.random.default_rng(seed)
    n_c = round(contacts * control_share)
    n_t = contacts - n_c
    x_t = rng.binomial(n_t, p_t, sims)
    x_c = rng.binomial(n_c, p_c, sims)
    truth = p_t - p_c
    newcombe = wald = 0
    for a, b in zip(x_t.tolist(), x_c.tolist(), strict=True):
        lo, hi = stats.newcombe_diff(a, n_t, b, n_c)
        newcombe += lo <= truth <= hi
        r_t, r_c = a / n_t, b / n_c
        se = math.sqrt(r_t * (1 - r_t) / n_t + r_c * (1 - r_c) / n_c)
        wald += abs(r_t - r_c - truth) <= stats.Z95 * se
    return newcombe / sims, wald / sims


@pytest.mark.parametrize(
    ("seed", "contacts", "control_share"),
    [(2026, 30_000, 0.10), (7, 5_000, 0.10), (11, 8_000, 0.25)],
)
def test_interval_coverage_over_1000_campaigns(
    seed: int, contacts: int, control_share: float
) -> None:
    """2 % baseline, 3 % with the offer: the 95 % interval holds the true +1 point in 93–97 %
    of 1,000 simulated campaigns."""
    covered, _ = _coverage(seed, 1000, contacts, control_share, 0.02, 0.03)
    assert 0.93 <= covered <= 0.97, covered


def test_small_control_groups_keep_their_coverage_where_wald_fails() -> None:
    """60 control customers at 2 % (about one conversion): Wald covers ~75 %, Newcombe ≥ 93 %."""
    covered, wald = _coverage(3, 1000, 600, 0.10, 0.02, 0.03)
    assert covered >= 0.93, covered
    assert wald < 0.85, wald
