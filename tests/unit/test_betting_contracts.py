"""Contracts of the betting test's configuration and bound (`smoothadv.betting`) at their edges: the radii a
short schedule can settle, bets of zero weight, where the wealth is checked inside a draw, the cap of pure
betting, and the confidence bound from very few successes or from just below its root; then the test's
decisions (`BettingTest`) driven with hand-chosen counts per segment: a wealth of exactly 1 / a rejects
(Ville's inequality is P(M >= 1 / a) <= a), the final Clopper-Pearson look, futility, the forecast that
settles a radius, the tolerance policy and what an abstention reports."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.special import ndtri
from scipy.stats import norm

from smoothadv import SmoothAdvError, betting
from smoothadv.betting import Z_RANGE, BettingConfig, BettingTest, _bound_z, log_wealth
from smoothadv.sequential import standard_radii
from smoothadv.smoothing import Smooth
from smoothadv.stats import clopper_pearson_lower, clopper_pearson_upper


def _is_largest_rejected(z: float, successes: list[int], failures: list[int], config: BettingConfig) -> bool:
    """Whether z = Phi^-1(q) is rejected at one of the counts and every threshold 1e-9 above it is not."""
    at = log_wealth(np.array(successes), np.array(failures), z, config).max()
    above = log_wealth(np.array(successes), np.array(failures), z + 1e-9, config).max()
    return bool(at >= config.threshold > above)


def _drive(config: BettingConfig, draws: list[list[int]]) -> BettingTest:
    """A test fed the given counts, one list per draw (one count per segment of `next_segments()`)."""
    test = config.start()
    for counts in draws:
        assert len(test.next_segments()) == len(counts)
        test.update_segments(counts)
    return test


def _alpha_with_threshold(log_wealth_value: float) -> float:
    """An alpha whose pure-betting threshold ln(1 / alpha) is exactly `log_wealth_value` in floating point."""
    alpha = math.exp(-log_wealth_value)
    for _ in range(1000):
        threshold = math.log(1.0 / alpha)
        if threshold == log_wealth_value:
            return alpha
        alpha = math.nextafter(alpha, 0.0 if threshold < log_wealth_value else 1.0)
    raise AssertionError(f"no alpha gives the threshold {log_wealth_value!r}")


def test_a_short_schedule_settles_only_the_radii_it_can_certify() -> None:
    config = BettingConfig(0.25, last=2048)
    assert 0.5 < config.max_radius < 0.75  # unanimous votes at 2,048 cannot certify 0.75
    assert config.schedule.radii == (0.0, 0.25, 0.5)
    assert config.schedule.radii == tuple(r for r in standard_radii(0.25) if r <= config.max_radius)
    assert BettingConfig(0.25, last=2048, radii=(0.75, 0.25)).schedule.radii == (0.25, 0.75)  # given: kept, sorted


def test_bets_of_zero_weight_are_a_mixture_and_negative_weights_are_not() -> None:
    with_zero = BettingConfig(0.25, bets=((0.5, 1.0), (0.9, 0.0)))
    alone = BettingConfig(0.25, bets=((0.5, 1.0),))
    counts = (np.array([900]), np.array([100]))
    assert log_wealth(*counts, 1.0, with_zero)[0] == pytest.approx(log_wealth(*counts, 1.0, alone)[0], abs=1e-12)
    for bets in (((0.5, 1.5), (0.9, -0.5)), ((0.5, 0.6), (0.9, 0.6)), ((0.5, 0.5),)):
        with pytest.raises(SmoothAdvError, match="weights >= 0 summing to 1"):
            BettingConfig(0.25, bets=bets)


def test_for_smooth_takes_sigma_from_the_smoothed_classifier(linear_model) -> None:
    smooth = Smooth(linear_model, 2, 0.5)
    config = BettingConfig.for_smooth(smooth, alpha=0.01, first=32)
    assert (config.sigma, config.alpha, config.first) == (0.5, 0.01, 32)
    with pytest.raises(SmoothAdvError, match="takes sigma from the smoothed classifier"):
        BettingConfig.for_smooth(smooth, sigma=0.25)


def test_checks_inside_a_draw_fall_on_the_check_grid_wherever_the_draw_starts() -> None:
    config = BettingConfig(0.25)  # first 64: a check every 16 votes below coarse = 1,024, then every 1,024
    assert config.checks(1100, 3072) == (2048, 3072)
    assert config.checks(1024, 2500) == (2048, 2500)  # a draw ending off the grid is checked at its end
    assert config.checks(40, 1100) == (48, 64, *range(80, 1025, 16), 1100)


def test_the_cap_of_pure_betting_is_where_unanimous_votes_are_last_rejected() -> None:
    config = BettingConfig(0.5, final_share=0)
    last = config.schedule.last
    z = config.max_radius / config.sigma
    assert _is_largest_rejected(z, [last], [0], config)
    assert z > _bound_z(np.array([last]), np.array([1]), config)  # one dissenting vote lowers it


def test_the_bound_from_a_single_success_is_the_largest_rejected_threshold() -> None:
    config = BettingConfig(0.25)
    z = _bound_z(np.array([1]), np.array([0]), config)
    assert math.isfinite(z) and z < 0  # one vote rejects only tiny thresholds, but it rejects some
    assert _is_largest_rejected(z, [1], [0], config)
    assert _bound_z(np.array([0, 0]), np.array([0, 50]), config) == -math.inf  # no success rejects nothing


def test_a_floor_just_below_the_root_still_finds_it_and_one_above_finds_nothing() -> None:
    config = BettingConfig(0.25)
    successes, failures = np.array([2000, 500]), np.array([10, 1])
    z = _bound_z(successes, failures, config)
    assert _is_largest_rejected(z, [2000, 500], [10, 1], config)
    assert _bound_z(successes, failures, config, floor=z - 1e-6) == pytest.approx(z, abs=1e-11)
    assert _bound_z(successes, failures, config, floor=z + 1e-6) == -math.inf
    assert 0.98 < norm.cdf(z) < 2000 / 2010  # below the observed frequency of the larger count, and close


def test_a_radius_at_the_cap_up_to_rounding_is_on_the_grid() -> None:
    z_cap = BettingConfig(1.0, last=2048).max_radius  # the cap in units of sigma does not depend on sigma
    config = BettingConfig(0.5 / z_cap, last=2048)  # a sigma whose cap is 0.5, to rounding
    assert config.max_radius == pytest.approx(0.5, abs=1e-15)
    assert config.schedule.radii == (0.0, 0.25, 0.5)


def test_the_bound_of_counts_beyond_any_run_is_the_top_of_the_searched_range() -> None:
    # 9e17 agreeing votes reject q = Phi(8.5) = 1 - 1e-17 (ln M exceeds the threshold there by less than 1), so the
    # largest rejected threshold lies above the range searched: the bound is its top, z = 8.5 exactly
    config = BettingConfig(0.25)
    successes, failures = np.array([9 * 10**17]), np.array([0])
    assert Z_RANGE == (-8.0, 8.5)
    assert 0 < log_wealth(successes, failures, 8.5, config)[0] - config.threshold < 1
    assert _bound_z(successes, failures, config) == 8.5


def test_a_wealth_of_exactly_one_over_a_at_the_bottom_of_the_range_rejects_it() -> None:
    # one success: ln M at z = -8 is about 34.7; with ln(1 / a) equal to it exactly, q = Phi(-8) is rejected
    # (M >= 1 / a) and no threshold above it is: the bound is -8, not "nothing rejected"
    wealth = float(log_wealth([1], [0], -8.0, BettingConfig(0.25, final_share=0))[0])
    config = BettingConfig(0.25, alpha=_alpha_with_threshold(wealth), final_share=0)
    assert config.threshold == wealth
    assert log_wealth([1], [0], -8.0 + 1e-9, config)[0] < config.threshold
    assert _bound_z(np.array([1]), np.array([0]), config) == -8.0


def test_the_bound_steps_down_to_a_rejected_threshold_whatever_the_root_finder_returns(monkeypatch) -> None:
    config = BettingConfig(0.25)
    successes, failures = np.array([2000, 500]), np.array([10, 1])
    z = _bound_z(successes, failures, config)
    # a root finder 5e-12 above the root (on the side not rejected): the step down still ends on a rejected
    # threshold, within about 1e-12 of the root
    monkeypatch.setattr(betting, "brentq", lambda f, lo, hi, **kw: brentq(f, lo, hi, **kw) + 5e-12)
    stepped = _bound_z(successes, failures, config)
    assert log_wealth(successes, failures, stepped, config).max() >= config.threshold
    assert z - 1e-11 < stepped <= z + 1e-12


def test_a_mixture_of_all_in_bets_is_broke_after_one_failure_and_keeps_its_earlier_rejections() -> None:
    # a single all-in gambler: M_t(1/2) = 2^S while every vote agrees, 0 after the first other vote; 1 / a = 16
    config = BettingConfig(1.0, alpha=1 / 16, final_share=0, first=8, last=64, bets=((1.0, 1.0),))
    assert log_wealth([3, 4, 4], [0, 0, 1], 0.0, config).tolist() == [3 * math.log(2), 4 * math.log(2), -math.inf]
    assert _bound_z(np.array([5, 7]), np.array([1, 1]), config) == -math.inf
    # checks every 2 votes: M = 16 = 1 / a at the second check (4 agreeing votes), then a failure ruins the gambler
    test = _drive(config, [[2, 2, 1, 2]])
    assert test.certified and test.stop is None
    result = test.result()
    assert result.certified and result.p_lower == pytest.approx(0.5, abs=1e-12)  # q^-4 >= 16 iff q <= 1/2
    assert result.radius == pytest.approx(0.0, abs=1e-12)
    # a failure at the fourth vote: M reaches 2^2 = 4 at most, so q is rejected only up to 1/4 (q^-2 >= 16)
    short = _drive(config, [[2, 1, 2, 2]]).result()
    assert not short.certified and short.radius == 0.0 and short.p_lower == pytest.approx(0.25, abs=1e-12)


def test_a_wealth_of_exactly_one_over_a_at_a_grid_radius_certifies_it() -> None:
    # all-in bets: after 64 agreeing votes ln M(q) = 64 ln(1 + (1 - q) / q); alpha is chosen so that this equals
    # ln(1 / a) exactly at the threshold of radius 1 (z = 1 / sigma = 2): Ville's rule M >= 1 / a rejects it
    bets, last = ((1.0, 1.0),), 4096
    wealth = float(log_wealth([64], [0], 2.0, BettingConfig(0.5, bets=bets, final_share=0, last=last))[0])
    config = BettingConfig(0.5, alpha=_alpha_with_threshold(wealth), radii=(1.0,), bets=bets, final_share=0,
                           last=last)
    assert config.threshold == wealth
    test = _drive(config, [[16, 16, 16, 16]])
    assert test.certified and test.grid_radius == 1.0
    assert test.stop == "settled" and test.result().radius == pytest.approx(1.0, abs=1e-11)
    missed = _drive(config, [[16, 16, 16, 15]])  # one vote fewer: radius 1 is not rejected, nor settled
    assert missed.certified and missed.grid_radius == 0.0 and missed.stop is None


def test_a_certified_grid_radius_is_kept_when_later_checks_reject_only_smaller_ones() -> None:
    config = BettingConfig(1.0, radii=(0.25, 0.5, 0.75, 3.0))  # 3.0 is not settled before the first forecast
    test = _drive(config, [[16, 16, 16, 16]])
    assert test.grid_radius == 0.75 and test.stop is None
    # the next draw's checks (4 of every 16 votes agree) reject the threshold of 0.25 but not that of 0.5
    checks = np.arange(80, 129, 16)
    successes = 64 + np.cumsum([4, 4, 4, 4])
    for radius, rejected in ((0.25, True), (0.5, False)):
        assert (log_wealth(successes, checks - successes, radius, config).max() >= config.threshold) == rejected
    assert test.next_segments() == (16, 16, 16, 16)
    test.update_segments([4, 4, 4, 4])
    assert test.certified and test.grid_radius == 0.75  # certified at 0.75 once is certified at 0.75 for good


def test_a_fresh_test_draws_the_first_draw_in_steps_and_reports_its_draws() -> None:
    config = BettingConfig(0.25, radii=(0.5,))  # first 64, checked every 16 votes
    test = config.start()
    assert test.next_draw() == 64 and test.next_segments() == (16, 16, 16, 16)
    test.update_segments([10, 10, 10, 10])
    assert (test.n, test.draws, test.successes) == (64, 1, 40)
    assert test.next_draw() == 64 and test.next_segments() == (16, 16, 16, 16)
    for bad in ([16, 16, 16, -1], [16, 16, 16, 17], [16, 16, 16]):
        with pytest.raises(SmoothAdvError, match="one count in"):
            test.update_segments(bad)
    assert (test.n, test.draws, test.successes) == (64, 1, 40)  # a refused update changes nothing
    test.update_segments([16, 16, 16, 16])
    result = test.result()
    assert result.n == 128 and result.looks == 2 and result.successes == 104
    while not test.done:
        test.next_segments()
        test.update_segments([16, 16, 16, 16])
    assert test.next_draw() == 0 and test.next_segments() == ()
    with pytest.raises(SmoothAdvError, match="already stopped"):
        test.update_segments([16, 16, 16, 16])


def test_the_final_look_alone_certifies_and_sets_the_grid_radii_it_reaches() -> None:
    # four votes, all agree, at last = 4: the betting part (1 / a = 72 > 2^4) rejects nothing; the final bound
    # is the Clopper-Pearson bound (eta alpha)^(1/4) = 0.125^(1/4) = 0.595, z = 0.239: radius 0.5 z = 0.1197
    config = BettingConfig(0.5, alpha=0.125 / 0.9, final_share=0.9, first=4, last=4, radii=(0.1, 0.2))
    assert config.final_share * config.alpha == 0.125 and config.threshold > 4 * math.log(2)
    test = _drive(config, [[1, 1, 1, 1]])
    final = float(ndtri(clopper_pearson_lower(4, 4, 0.125)))
    assert 0 < final < 1 and final == pytest.approx(norm.ppf(0.125**0.25))
    result = test.result()
    assert result.certified and result.stop == "last look"
    assert result.radius == pytest.approx(0.5 * final) and result.p_lower == pytest.approx(0.125**0.25)
    assert test.grid_radius == 0.1  # 0.1 <= 0.1197 < 0.2
    at_bound = BettingConfig(0.5, alpha=0.125 / 0.9, final_share=0.9, first=4, last=4, radii=(0.5 * final,))
    assert _drive(at_bound, [[1, 1, 1, 1]]).grid_radius == 0.5 * final  # a radius exactly at the bound is certified


def test_a_final_bound_of_exactly_one_half_certifies_nothing() -> None:
    # eta alpha = 1/16: four agreeing votes of four give the final bound (1/16)^(1/4) = 1/2 exactly, radius 0: not a
    # certificate (g(x) = c needs p_lower > 1/2); the betting part (1 / a = 16 > M) rejects nothing
    config = BettingConfig(1.0, alpha=1 / 8, final_share=0.5, first=4, last=4, policy="full")
    assert clopper_pearson_lower(4, 4, config.final_share * config.alpha) == 0.5
    result = _drive(config, [[1, 1, 1, 1]]).result()
    assert not result.certified and result.radius == 0.0 and result.p_lower == 0.5


def test_a_final_bound_below_one_half_does_not_undo_the_betting_certificate() -> None:
    # 1 / a = 200: the all-in gambler (weight 1/2) rejects q = 1/2 after 9 agreeing votes (0.5 * 2^9 >= 200); the
    # seven votes after disagree, and the final bound at 16 votes (9 agree) is far below 1/2
    config = BettingConfig(1.0, alpha=0.01, final_share=0.5, first=4, last=16, policy="full")
    test = _drive(config, [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert clopper_pearson_lower(9, 16, 0.005) < 0.5
    result = test.result()
    assert result.certified and result.stop == "last look" and result.p_lower > 0.5
    assert result.radius == pytest.approx(float(norm.ppf(result.p_lower)), abs=1e-9)


def test_the_final_bound_from_a_single_success_is_the_clopper_pearson_bound() -> None:
    # one agreeing vote, the last of 16: the betting sequence, whose gamblers lost 15 times first, rejects less
    # than the final Clopper-Pearson look at eta alpha = 0.005, whose bound the abstention reports
    config = BettingConfig(1.0, alpha=0.01, final_share=0.5, first=4, last=16, policy="full")
    result = _drive(config, [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]).result()
    expected = clopper_pearson_lower(1, 16, 0.005)
    assert norm.cdf(_bound_z(np.array([1]), np.array([15]), config)) < expected / 10
    assert not result.certified and result.radius == 0.0 and result.p_lower == pytest.approx(expected, rel=1e-9)


def _ten_of_sixteen(config: BettingConfig) -> BettingTest:
    """Ten of the first 16 votes agree (first = 4: one vote per segment); 16 is the first forecast."""
    return _drive(config, [[1, 1, 0, 1], [1, 1, 0, 1], [1, 0, 1, 0], [1, 0, 1, 0]])


def test_an_input_not_yet_certified_with_a_reachable_radius_goes_on() -> None:
    # 10 of 16: the forecast upper bound (0.05) is 0.83, so the last size could reach z = 0.909: radius 0.5 at
    # sigma 1 is within reach and not certified: the test goes on
    config = BettingConfig(1.0, first=4, radii=(0.5,))
    test = _ten_of_sixteen(config)
    upper = clopper_pearson_upper(10, 16, 0.05)
    assert upper > 0.5 and test.reach == test.reachable_z(upper)
    assert 0.5 < test.reach < 1.0
    assert not test.certified and test.stop is None and test.radius == 0.0
    # the same votes with radius 0.5 at sigma 0.25 (z = 2): out of reach, settled without a certificate
    low = _ten_of_sixteen(BettingConfig(0.25, first=4, radii=(0.5,)))
    assert not low.certified and low.stop == "settled" and 0.25 * low.reach < 0.5
    # a radius exactly at the reachable one is still within reach
    edge = _ten_of_sixteen(BettingConfig(1.0, first=4, radii=(test.reach,)))
    assert edge.stop is None


def test_an_abstention_reports_the_betting_bound_or_zero() -> None:
    test = _ten_of_sixteen(BettingConfig(1.0, first=4, radii=(0.5,)))
    successes = np.cumsum([1, 1, 0, 1, 1, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1, 0])
    checks = np.arange(1, 17)
    result = test.result()
    z = test.z
    assert -2 < z < 0 and _is_largest_rejected(z, successes.tolist(), (checks - successes).tolist(), test.config)
    assert not result.certified and result.radius == 0.0 and result.p_lower == pytest.approx(norm.cdf(z))
    none = _drive(BettingConfig(1.0, first=4, radii=(0.5,)), [[0, 0, 0, 0]] * 4).result()
    assert none.stop == "futile" and none.p_lower == 0.0 and none.radius == 0.0  # no success rejects nothing


def test_futility_uses_the_forecast_level_and_includes_an_upper_bound_of_one_half() -> None:
    # 4 of 16: the upper bound at the forecast level 0.05 is 0.484 <= 1/2: futile; at the strict level (alpha) 0.659
    assert clopper_pearson_upper(4, 16, 0.05) <= 0.5 < clopper_pearson_upper(4, 16, 0.001)
    counts = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    futile = _drive(BettingConfig(1.0, first=4, radii=(0.5,)), counts)
    assert futile.stop == "futile" and futile.n == 16 and not futile.result().certified
    strict = _drive(BettingConfig(1.0, first=4, radii=(0.5,), forecast_alpha=None), counts)
    assert strict.reach == strict.reachable_z(clopper_pearson_upper(4, 16, 0.001)) and 0 < strict.reach < 0.5
    assert strict.stop == "settled"  # not futile: radius 0.5 is out of reach all the same
    # no agreeing vote in 16 at forecast level 2^-16: the upper bound is 1 - (2^-16)^(1/16) = 1/2 exactly: futile
    half = BettingConfig(1.0, first=4, radii=(0.5,), forecast_alpha=2.0**-16)
    assert clopper_pearson_upper(0, 16, half.forecast_alpha) == 0.5
    assert _drive(half, [[0, 0, 0, 0]] * 4).stop == "futile"


def test_a_forecast_at_or_below_radius_zero_settles_an_uncertified_input() -> None:
    # 5 of 16, last 1,024: the upper bound 0.548 > 1/2 is not futile, but a rate of 0.548 at 1,024 votes would give
    # a bound below 1/2 (reach < 0): no radius is reachable, the test settles without a certificate
    config = BettingConfig(1.0, first=4, last=1024, radii=(0.5,))
    test = _drive(config, [[1, 0, 1, 0], [1, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]])
    assert clopper_pearson_upper(5, 16, 0.05) > 0.5 and test.reach < 0
    assert test.stop == "settled" and not test.certified
    # reach exactly 0: with eta alpha = 2^-32 and last = 32, all 32 votes agreeing would give the final bound
    # (2^-32)^(1/32) = 1/2, and the betting part (1 / a = 2^32 > M) less: radius 0 is out of reach after 16
    # agreeing votes (the grid is (0,): the cap is 0)
    zero = BettingConfig(1.0, alpha=2.0**-31, first=4, last=32)
    assert zero.schedule.radii == (0.0,)
    test = _drive(zero, [[1, 1, 1, 1]] * 4)
    assert test.reach == 0.0 and not test.certified and test.stop == "settled" and test.n == 16


def test_reachable_z_is_the_better_of_the_betting_bound_and_the_final_look_at_the_last_size() -> None:
    config = BettingConfig(0.5, last=4096)
    test = config.start()
    assert test.reachable_z(0.0) == -math.inf
    # one agreeing vote of 4,096: the betting part rejects less than the final look at eta alpha = 0.0005
    final_one = float(norm.ppf(clopper_pearson_lower(1, 4096, 0.0005)))
    assert _bound_z(np.array([1]), np.array([4095]), config) < final_one
    assert test.reachable_z(1 / 4096) == pytest.approx(final_one, rel=1e-9)
    assert test.reachable_z(1.0) == pytest.approx(config.max_radius / config.sigma, abs=1e-12)
    k = math.ceil(0.9 * 4096)
    betting_part = _bound_z(np.array([k]), np.array([4096 - k]), config)
    final_part = float(norm.ppf(clopper_pearson_lower(k, 4096, 0.0005)))
    assert _is_largest_rejected(betting_part, [k], [4096 - k], config) and betting_part < final_part
    assert test.reachable_z(0.9) == pytest.approx(final_part, rel=1e-9)
    # pure betting: the betting bound of k agreeing votes of the last size
    pure = BettingConfig(0.5, last=4096, final_share=0)
    reach = pure.start().reachable_z(0.9)
    assert _is_largest_rejected(reach, [k], [4096 - k], pure)
    assert pure.start().reachable_z(1.0) == pytest.approx(pure.max_radius / pure.sigma, abs=1e-12)


def _sixteen_agreeing(tolerance: float) -> BettingTest:
    """16 agreeing votes (first = 4) under the tolerance policy at sigma 0.25: certified at 0.066, and the forecast
    at 16 (upper bound 1) reaches the cap 0.953."""
    config = BettingConfig(0.25, policy="tolerance", tolerance=tolerance, first=4)
    test = _drive(config, [[1, 1, 1, 1]] * 3)
    assert test.stop is None and test.reach == math.inf  # no forecast before 16
    assert test.next_segments() == (1, 1, 1, 1)
    test.update_segments([1, 1, 1, 1])
    return test


def test_the_tolerance_policy_stops_once_the_reachable_radius_is_within_tolerance_of_the_certified_one() -> None:
    probe = _sixteen_agreeing(10.0)
    radius, reachable = probe.radius, 0.25 * probe.reach
    assert 0.05 < radius < 0.1 and reachable == pytest.approx(probe.config.max_radius)
    gap = reachable - radius
    assert _sixteen_agreeing(gap + 0.01).stop == "settled"
    assert _sixteen_agreeing(gap).stop == "settled"  # a loss of exactly the tolerance is accepted
    assert _sixteen_agreeing(gap - 0.01).stop is None
    assert _sixteen_agreeing(0.5).stop is None  # 0.5 < gap, though the reachable radius is below 1
