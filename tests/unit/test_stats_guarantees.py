"""The certification statistics against their defining equations and exact coverage, at the edges.

Each bound is checked through what it promises, not against the formula it is computed with: a one-sided
(1 - alpha) Clopper-Pearson lower bound L(k) is the p at which P(Binomial(n, p) >= k) = alpha exactly
(Clopper & Pearson 1934), so its coverage P_p(L(K) <= p) is >= 1 - alpha for every p and equal to it at the
bound's own values; the extreme-alpha branch must stay a valid (conservative) bound; the tests' p-values are
recomputed by enumeration; the accuracy curves at radii equal to a row's radius (the >= of Cohen et al.,
Section 4). Input checks are probed exactly at their boundaries.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import gammaln
from scipy.stats import binom, norm, t

from smoothadv import stats

# ------------------------------------------------------------------ Clopper-Pearson: the defining equations


@pytest.mark.parametrize("n", [2, 7, 60, 1000])
@pytest.mark.parametrize("alpha", [0.2, 0.01, 1e-6])
def test_lower_bound_solves_the_tail_equation(n: int, alpha: float) -> None:
    """P(Binomial(n, L(k)) >= k) = alpha for 0 < k < n (relative 1e-6): the bound is exact, not only valid."""
    for k in sorted({1, 2, n // 3, n // 2, n - 1} - {0, n}):
        lower = stats.clopper_pearson_lower(k, n, alpha)
        assert 0.0 < lower < k / n
        assert binom.sf(k - 1, n, lower) == pytest.approx(alpha, rel=1e-6)


@pytest.mark.parametrize("n", [2, 7, 60, 1000])
@pytest.mark.parametrize("alpha", [0.2, 0.01])
def test_upper_bound_solves_the_tail_equation(n: int, alpha: float) -> None:
    """P(Binomial(n, U(k)) <= k) = alpha for k < n; U(n) = 1; U(0) = 1 - alpha^(1/n); U(k) = 1 - L(n - k)."""
    for k in sorted({0, 1, n // 2, n - 1}):
        upper = stats.clopper_pearson_upper(k, n, alpha)
        assert k / n < upper < 1.0
        assert binom.cdf(k, n, upper) == pytest.approx(alpha, rel=1e-6)
    assert stats.clopper_pearson_upper(n, n, alpha) == 1.0
    assert stats.clopper_pearson_upper(0, n, alpha) == pytest.approx(1 - alpha ** (1 / n), rel=1e-12)


@pytest.mark.parametrize("n, alpha", [(20, 0.1), (57, 0.05), (200, 0.001)])
def test_lower_bound_coverage_is_exact(n: int, alpha: float) -> None:
    """Exact coverage P_p(L(K) <= p) = sum over k with L(k) <= p of the binomial pmf: >= 1 - alpha on a grid of
    p, and equal to 1 - alpha (to 1e-6) just below each bound value, where the guarantee is tight."""
    bounds = np.array([stats.clopper_pearson_lower(k, n, alpha) for k in range(n + 1)])
    assert np.all(np.diff(bounds) > 0)
    ks = np.arange(n + 1)
    for p in np.linspace(0.001, 0.999, 97):
        assert binom.pmf(ks, n, p)[bounds <= p].sum() >= 1 - alpha - 1e-9
    for k in range(1, n):
        p = bounds[k] * (1 - 1e-12)  # L(0..k-1) <= p < L(k): coverage = P(K <= k - 1)
        assert bounds[k - 1] <= p
        assert binom.cdf(k - 1, n, p) == pytest.approx(1 - alpha, abs=1e-6)


def test_lower_bound_at_the_edge_of_the_beta_branch() -> None:
    """alpha = 1e-40 exactly is still the exact bound (the Beta quantile), which solves the tail equation."""
    for k, n in ((30, 50), (90, 100)):
        lower = stats.clopper_pearson_lower(k, n, 1e-40)
        log_tail = float(binom.logsf(k - 1, n, lower))
        assert log_tail == pytest.approx(math.log(1e-40), rel=1e-5)


@pytest.mark.parametrize("k, n", [(30, 50), (90, 100), (1, 5), (999, 1000)])
@pytest.mark.parametrize("alpha", [1e-60, 1e-200])
def test_extreme_alpha_bound_is_valid_and_the_union_bound_root(k: int, n: int, alpha: float) -> None:
    """Below 1e-40 the bound is (alpha / C(n, k))^(1/k): the root of C(n, k) p^k = alpha, which dominates the
    tail, so P(Binomial(n, L) >= k) <= alpha (checked in logs) and L is below the exact bound."""
    lower = stats.clopper_pearson_lower(k, n, alpha)
    log_choose = gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)
    assert lower == pytest.approx(math.exp((math.log(alpha) - log_choose) / k), rel=1e-9)
    assert 0.0 < lower < k / n
    assert float(binom.logsf(k - 1, n, lower)) <= math.log(alpha) + 1e-9


def test_interval_ends_solve_their_equations() -> None:
    """Two-sided interval at level 0.9: each end is the one-sided bound at 0.05, for an array of counts."""
    n, level = 40, 0.9
    counts = np.arange(n + 1)
    low, high = stats.clopper_pearson_interval(counts, n, level)
    assert low.shape == high.shape == (n + 1,)
    assert low[0] == 0.0 and high[n] == 1.0
    for k in range(1, n):
        assert binom.sf(k - 1, n, low[k]) == pytest.approx(0.05, rel=1e-6)
        assert binom.cdf(k, n, high[k]) == pytest.approx(0.05, rel=1e-6)
    assert high[0] == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-9)
    assert low[n] == pytest.approx(0.05 ** (1 / n), rel=1e-9)
    one_low, one_high = stats.clopper_pearson_interval(1, 1, 0.5)  # n = 1 is a sample
    assert float(one_low) == pytest.approx(0.25) and float(one_high) == 1.0


# ------------------------------------------------------------------ input checks at their boundaries


def test_counts_and_levels_are_checked_at_their_boundaries() -> None:
    assert stats.clopper_pearson_lower(1, 1, 0.5) == 0.5
    assert stats.clopper_pearson_lower(0, 1, 0.5) == 0.0
    for bad in ((-1, 5, 0.1), (6, 5, 0.1), (0, 0, 0.1), (1, 5, 0.0), (1, 5, 1.0)):
        with pytest.raises(ValueError):
            stats.clopper_pearson_lower(*bad)
        with pytest.raises(ValueError):
            stats.clopper_pearson_upper(*bad)
    for alpha in (0.0, 1.0):  # all successes: the upper bound is 1 whatever alpha, but alpha is still checked
        with pytest.raises(ValueError):
            stats.clopper_pearson_upper(5, 5, alpha)
    for level in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError):
            stats.clopper_pearson_interval(1, 5, level)
    with pytest.raises(ValueError):
        stats.clopper_pearson_interval(0, 0, 0.9)
    for counts in ([-1, 2], [6], [1.5]):
        with pytest.raises(ValueError):
            stats.clopper_pearson_interval(np.array(counts), 5, 0.9)
    for k, n in ((-1, 5), (6, 5)):
        with pytest.raises(ValueError):
            stats.binom_pvalue(k, n)
    assert stats.binom_pvalue(0, 0) == 1.0


def test_mean_interval_is_defined_from_two_values_and_open_levels() -> None:
    mean, low, high = stats.mean_interval([1.0, 3.0], level=0.5)
    half = t.ppf(0.75, 1) * math.sqrt(2.0) / math.sqrt(2)
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half), rel=1e-12)
    with pytest.raises(ValueError):
        stats.mean_interval([1.0])
    for level in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError):
            stats.mean_interval([1.0, 2.0, 4.0], level)


# ------------------------------------------------------------------ tests' p-values by enumeration


@pytest.mark.parametrize("n", [1, 2, 9, 30])
@pytest.mark.parametrize("p", [0.5, 0.3])
def test_binomial_pvalue_is_the_sum_of_outcomes_no_more_likely(n: int, p: float) -> None:
    """Two-sided exact p-value: sum of P(j) over the j with P(j) <= P(k) (relative tolerance 1e-7, as scipy)."""
    pmf = binom.pmf(np.arange(n + 1), n, p)
    for k in range(n + 1):
        expected = min(1.0, float(pmf[pmf <= pmf[k] * (1 + 1e-7)].sum()))
        assert stats.binom_pvalue(k, n, p) == pytest.approx(expected, rel=1e-9)
    if p == 0.5:
        assert stats.binom_pvalue(n, n) == pytest.approx(min(1.0, 2 * 0.5 ** n), rel=1e-12)


def test_mcnemar_by_enumeration_of_the_discordant_split() -> None:
    for only_a, only_b in ((0, 0), (1, 0), (0, 1), (3, 0), (7, 2), (2, 7), (10, 10), (0, 12)):
        total = only_a + only_b
        pmf = binom.pmf(np.arange(total + 1), total, 0.5)
        extreme = min(only_a, only_b)
        expected = 1.0 if total == 0 else min(1.0, 2 * float(pmf[: extreme + 1].sum()))
        assert stats.mcnemar_exact(only_a, only_b) == pytest.approx(expected, rel=1e-12)
    assert stats.mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    for bad in ((-1, 2), (1.5, 2)):
        with pytest.raises(ValueError):
            stats.mcnemar_exact(*bad)


def test_holm_accepts_zero_and_one_and_matches_its_definition() -> None:
    values = np.array([0.0, 0.04, 1.0, 0.01, 0.03])
    order = np.argsort(values, kind="stable")
    m = len(values)
    expected = np.empty(m)
    running = 0.0
    for i, index in enumerate(order):
        running = max(running, min(1.0, (m - i) * values[index]))
        expected[index] = running
    assert np.allclose(stats.holm_adjust(values), expected, rtol=0, atol=1e-15)
    assert stats.holm_adjust([]).shape == (0,)
    for bad in ([-0.01], [1.01], [float("nan")]):
        with pytest.raises(ValueError):
            stats.holm_adjust(bad)


# ------------------------------------------------------------------ radii and curves at their edges


def test_radius_edges() -> None:
    assert stats.certified_radius(0.5, 1.0) == 0.0
    assert stats.certified_radius(np.nextafter(0.5, 1.0), 1.0) > 0.0
    assert stats.certified_radius(0.975, 0.5) == pytest.approx(0.5 * norm.ppf(0.975), rel=1e-12)
    assert stats.certified_radius(1.0, 0.5) == math.inf
    assert stats.certified_radius(0.0, 0.5) == 0.0
    assert stats.max_certifiable_radius(100, 0.001, 0.25) == pytest.approx(0.25 * norm.ppf(0.001 ** 0.01), rel=1e-12)
    for p in (-0.1, 1.1):
        with pytest.raises(ValueError):
            stats.certified_radius(p, 0.5)
    for sigma in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError):
            stats.certified_radius(0.9, sigma)


def test_certified_accuracy_counts_a_radius_equal_to_r_and_ignores_wrong_rows() -> None:
    radius = [0.5, 0.5, 0.25, 0.0, 1.0]
    correct = [1, 0, 1, 1, 1]
    acc = stats.certified_accuracy(radius, correct, [0.0, 0.25, 0.5, 0.75, 1.0, 1.25])
    assert acc.tolist() == pytest.approx([4 / 5, 3 / 5, 2 / 5, 1 / 5, 1 / 5, 0.0])
    assert stats.average_certified_radius(radius, correct) == pytest.approx((0.5 + 0.25 + 0.0 + 1.0) / 5)
    with pytest.raises(ValueError):
        stats.certified_accuracy([0.1], [1, 0], [0.0])
    assert stats.certified_accuracy([0.2], [1], [0.0, 0.2, 0.3]).tolist() == [1.0, 1.0, 0.0]  # one row is a table
    assert stats.average_certified_radius([0.2], [1]) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        stats.certified_accuracy([], [], [0.0])
    with pytest.raises(ValueError):
        stats.average_certified_radius([], [])


def test_high_probability_accuracy_subtracts_bernsteins_margin() -> None:
    radius, correct = np.full(400, 0.3), np.ones(400)
    alpha, rho, count = 0.01, 0.05, 400
    margin = alpha + math.sqrt(alpha * (1 - alpha) * math.log(1 / rho) / count) + math.log(1 / rho) / (3 * count)
    out = stats.high_prob_certified_accuracy(radius, correct, [0.0, 0.3, 0.31], alpha=alpha, rho=rho)
    assert out.tolist() == pytest.approx([1 - margin, 1 - margin, -margin], rel=1e-12)
    default = 0.001 + math.sqrt(0.001 * 0.999 * math.log(1000) / count) + math.log(1000) / (3 * count)
    assert stats.high_prob_certified_accuracy(radius, correct, [0.0]).tolist() == pytest.approx([1 - default])
    for bad in ({"alpha": 0.0}, {"rho": 1.0}):
        with pytest.raises(ValueError):
            stats.high_prob_certified_accuracy(radius, correct, [0.0], **bad)


def test_radius_grid_includes_its_top_within_float_noise() -> None:
    assert stats.radius_grid(0.75, 0.25) == [0.0, 0.25, 0.5, 0.75]
    assert stats.radius_grid(0.3 - 1e-12, 0.1) == [0.0, 0.1, 0.2, 0.3]
    assert stats.radius_grid(0.29, 0.1) == [0.0, 0.1, 0.2]
    assert stats.radius_grid(-0.1, 0.1) == []
    assert stats.radius_grid(0.0, 0.5) == [0.0]
