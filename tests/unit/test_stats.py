"""Closed forms and exact-test agreement for the certification statistics."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
from scipy.stats import binomtest, norm

from smoothadv import stats


@pytest.mark.parametrize("n", [1, 10, 100, 1000, 100_000])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_all_successes_give_alpha_to_the_one_over_n(n: int, alpha: float) -> None:
    assert stats.clopper_pearson_lower(n, n, alpha) == pytest.approx(alpha ** (1 / n), rel=1e-12)


def test_zero_successes_give_zero_lower_bound() -> None:
    assert stats.clopper_pearson_lower(0, 50, 0.001) == 0.0
    assert stats.clopper_pearson_upper(0, 50, 0.01) == pytest.approx(1 - 0.01 ** (1 / 50))


@pytest.mark.parametrize(("k", "n"), [(1, 10), (7, 10), (55, 100), (990, 1000), (98_000, 100_000)])
@pytest.mark.parametrize("alpha", [0.001, 0.01, 0.1])
def test_lower_bound_equals_scipy_exact_interval(k: int, n: int, alpha: float) -> None:
    # The one-sided (1-alpha) bound is the lower end of the two-sided exact interval at level 1 - 2 alpha.
    low = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
    assert stats.clopper_pearson_lower(k, n, alpha) == pytest.approx(low, rel=1e-9, abs=1e-12)


def test_lower_bound_is_monotone_in_k_and_below_the_estimate() -> None:
    bounds = [stats.clopper_pearson_lower(k, 200, 0.001) for k in range(201)]
    assert all(a < b for a, b in zip(bounds, bounds[1:]))
    assert all(b <= k / 200 for k, b in enumerate(bounds))


def test_binomial_coverage_of_lower_bound_is_exact_sum() -> None:
    # P(lower(K) > p) for K ~ Bin(n, p) computed exactly must not exceed alpha.
    from scipy.stats import binom

    n, alpha = 60, 0.05
    for p in (0.3, 0.5, 0.77, 0.93):
        miss = sum(binom.pmf(k, n, p) for k in range(n + 1) if stats.clopper_pearson_lower(k, n, alpha) > p)
        assert miss <= alpha + 1e-12


@pytest.mark.parametrize(("k", "n"), [(0, 0), (5, 10), (10, 10), (3, 40), (60, 100)])
def test_pvalue_matches_scipy_binomtest(k: int, n: int) -> None:
    expected = 1.0 if n == 0 else binomtest(k, n, 0.5).pvalue
    assert stats.binom_pvalue(k, n) == pytest.approx(expected)


def test_pvalue_closed_form_for_all_successes() -> None:
    # Two-sided test of n successes out of n at p = 1/2: 2 * 2^-n.
    assert stats.binom_pvalue(12, 12) == pytest.approx(2 * 0.5**12)


def test_radius_is_sigma_times_inverse_normal() -> None:
    assert stats.certified_radius(0.5, 0.25) == 0.0
    assert stats.certified_radius(0.3, 0.25) == 0.0
    assert stats.certified_radius(norm.cdf(1.0), 0.5) == pytest.approx(0.5)
    assert stats.certified_radius(0.9, 1.0) == pytest.approx(1.2815515655446004)


def test_max_certifiable_radius_matches_cohen_table() -> None:
    # Reference notes section 2.3: R_max / sigma for alpha = 0.001.
    for n, expected in [(100, 1.500), (1000, 2.463), (10_000, 3.199), (100_000, 3.8115)]:
        assert stats.max_certifiable_radius(n, 0.001, 1.0) == pytest.approx(expected, abs=6e-4)


def test_certified_accuracy_and_acr_on_hand_table() -> None:
    radius = [0.0, 0.3, 0.6, 1.0, 0.0]
    correct = [0, 1, 1, 0, 1]
    acc = stats.certified_accuracy(radius, correct, [0.0, 0.25, 0.5, 0.75])
    np.testing.assert_allclose(acc, [3 / 5, 2 / 5, 1 / 5, 0.0])
    assert stats.average_certified_radius(radius, correct) == pytest.approx((0.3 + 0.6) / 5)


def test_high_probability_correction_formula() -> None:
    radius, correct = [0.5] * 100, [1] * 80 + [0] * 20
    got = stats.high_prob_certified_accuracy(radius, correct, [0.0], alpha=0.001, rho=0.001)[0]
    log_term = math.log(1000)
    expected = 0.8 - 0.001 - math.sqrt(0.001 * 0.999 * log_term / 100) - log_term / 300
    assert got == pytest.approx(expected)


@pytest.mark.parametrize(("k", "n", "alpha"), [(-1, 10, 0.1), (11, 10, 0.1), (5, 0, 0.1), (5, 10, 0.0), (5, 10, 1.0)])
def test_bad_arguments_raise(k: int, n: int, alpha: float) -> None:
    with pytest.raises(ValueError):
        stats.clopper_pearson_lower(k, n, alpha)


def test_radius_rejects_bad_sigma_and_probability() -> None:
    with pytest.raises(ValueError):
        stats.certified_radius(0.9, 0.0)
    with pytest.raises(ValueError):
        stats.certified_radius(1.5, 0.25)


def _old_grid(top: float, step: float) -> list[float]:
    """The inline grid `report.default_radii` and `sequential.standard_radii` used before `radius_grid`."""
    return [round(i * step, 10) for i in range(int(math.floor(top / step + 1e-9)) + 1)]


def test_radius_grid_values() -> None:
    assert stats.radius_grid(1.0, 0.25) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert stats.radius_grid(0.99, 0.25) == [0.0, 0.25, 0.5, 0.75]
    assert stats.radius_grid(0.3, 0.1) == [0.0, 0.1, 0.2, 0.3]  # 0.3 / 0.1 = 2.9999999999999996: 0.3 kept
    assert stats.radius_grid(0.75 - 1e-12, 0.25)[-1] == 0.75
    assert stats.radius_grid(0.0, 0.25) == [0.0] and stats.radius_grid(-0.1, 0.25) == []
    for bad in (0.0, -0.25, math.inf, math.nan):
        with pytest.raises(ValueError, match="step"):
            stats.radius_grid(1.0, bad)
    with pytest.raises(ValueError, match="top"):
        stats.radius_grid(math.nan, 0.25)


def test_radius_grid_equals_the_grids_it_replaced() -> None:
    rng = np.random.default_rng(0)
    tops = [*rng.uniform(0, 5, 300), *(k * 0.125 for k in range(40)), *(k * 0.1 for k in range(40))]
    for step in (0.05, 0.1, 0.125, 0.25, 0.5, 1 / 3):
        for top in tops:
            assert stats.radius_grid(float(top), step) == _old_grid(float(top), step)


def test_abstain_has_one_home() -> None:
    from smoothadv import ABSTAIN, report, smoothing

    assert stats.ABSTAIN == ABSTAIN == smoothing.ABSTAIN == report.ABSTAIN == smoothing.Smooth.ABSTAIN == -1
    for module in (report, smoothing):  # imported from stats, not defined again
        assert "\nABSTAIN" not in inspect.getsource(module)


def test_mcnemar_exact_is_the_sign_test_on_the_discordant_examples() -> None:
    assert stats.mcnemar_exact(0, 0) == 1.0 and stats.mcnemar_exact(3, 3) == 1.0
    assert stats.mcnemar_exact(0, 5) == pytest.approx(2 / 32) and stats.mcnemar_exact(6, 0) == pytest.approx(2 / 64)
    # 18 against 10: 2 sum_{i <= 10} C(28, i) / 2^28, exactly
    exact = 2 * sum(math.comb(28, i) for i in range(11)) / 2**28
    assert stats.mcnemar_exact(18, 10) == pytest.approx(exact, rel=1e-12)
    assert exact == pytest.approx(0.184933, abs=1e-6)
    assert stats.mcnemar_exact(10, 18) == stats.mcnemar_exact(18, 10)
    assert stats.mcnemar_exact(18, 10) == pytest.approx(binomtest(10, 28, 0.5).pvalue)
    with pytest.raises(ValueError):
        stats.mcnemar_exact(-1, 3)


def test_holm_adjust_steps_down_and_keeps_the_order() -> None:
    adjusted = stats.holm_adjust([0.01, 0.04, 0.03, 0.5])
    # sorted 0.01, 0.03, 0.04, 0.5 -> 4 x 0.01, 3 x 0.03, max(0.09, 2 x 0.04), max(0.09, 0.5)
    assert adjusted == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert stats.holm_adjust([0.3, 0.6]) == pytest.approx([0.6, 0.6])
    assert stats.holm_adjust([0.2]) == pytest.approx([0.2])
    with pytest.raises(ValueError):
        stats.holm_adjust([0.1, 1.5])


def test_mean_interval_is_the_student_t_interval() -> None:
    mean, low, high = stats.mean_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2  # t(0.975, 3) s / sqrt(4), s^2 = 5/3
    assert mean == 2.5 and (low, high) == pytest.approx((2.5 - half, 2.5 + half), abs=1e-12)
    assert (low, high) == pytest.approx((0.445739, 4.554261), abs=1e-6)
    with pytest.raises(ValueError):
        stats.mean_interval([1.0])
