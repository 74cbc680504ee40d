"""Contracts of the betting test's configuration and bound (`smoothadv.betting`) at their edges: the radii a
short schedule can settle, bets of zero weight, where the wealth is checked inside a draw, the cap of pure
betting, and the confidence bound from very few successes or from just below its root."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from smoothadv import SmoothAdvError
from smoothadv.betting import BettingConfig, _bound_z, log_wealth
from smoothadv.sequential import standard_radii
from smoothadv.smoothing import Smooth


def _is_largest_rejected(z: float, successes: list[int], failures: list[int], config: BettingConfig) -> bool:
    """Whether z = Phi^-1(q) is rejected at one of the counts and every threshold 1e-9 above it is not."""
    at = log_wealth(np.array(successes), np.array(failures), z, config).max()
    above = log_wealth(np.array(successes), np.array(failures), z + 1e-9, config).max()
    return bool(at >= config.threshold > above)


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
