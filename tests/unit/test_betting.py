"""The anytime-valid betting test (`smoothadv.betting`, `certify --mode sequential --test betting`).

Counts-level checks against Bernoulli votes with known p (validity by exact first-passage probabilities and
by simulation, the confidence sequence's monotonicity, closed-form stopping points), then the drivers:
packing independence and the settings. The command line's rows, resume and shards: tests/e2e/test_cli_sequential.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from smoothadv import SmoothAdvError
from smoothadv.betting import DEFAULT_BETS, BettingConfig, _bound_z, log_wealth, run_betting
from smoothadv.run import sequential_test
from smoothadv.sequential import SequentialConfig, certify_sequential_many
from smoothadv.settings import BettingSettings, CertifySettings
from smoothadv.smoothing import Smooth
from smoothadv.stats import clopper_pearson_lower
from smoothadv.validity import Problem, betting_checks, clopper_pearson_lower_all, exact_betting_failure


def bernoulli(p: float, seed: int):
    rng = np.random.default_rng(seed)
    return lambda sizes: [int(rng.binomial(k, p)) for k in sizes]


def test_default_schedule_keeps_the_cap_and_spends_alpha_once() -> None:
    config = BettingConfig(0.5)
    assert config.schedule.last == 111616 == SequentialConfig(0.5).schedule.looks[-1]  # the grid's fitted last look
    assert config.threshold == pytest.approx(math.log(1 / 0.0005))  # (1 - eta) alpha + eta alpha = alpha
    assert config.schedule.radii == (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    assert config.max_radius == pytest.approx(0.5 * norm.ppf(clopper_pearson_lower(111616, 111616, 0.0005)))
    assert config.draws[:5] == (64, 128, 192, 256, 320) and config.draws[-1] == 111616
    assert all(d % 1024 == 0 for d in config.draws if d > 1024)
    assert sorted(config.forecasts)[:3] == [256, 512, 1024] and config.schedule.last in config.forecasts
    assert config.checks(0, 64) == (16, 32, 48, 64) and config.checks(8192, 10240) == (9216, 10240)
    assert sum(w for _, w in DEFAULT_BETS) == pytest.approx(1.0)
    pure = BettingConfig(0.5, final_share=0)
    assert pure.schedule.last == 131072 and pure.threshold == pytest.approx(math.log(1000))
    for bad in ({"first": 6}, {"final_share": 1.0}, {"bets": ((1.0, 0.5),)}, {"bets": ((0.0, 1.0),)},
                {"policy": "nope"}, {"last": 8}):
        with pytest.raises(SmoothAdvError):
            BettingConfig(0.5, **bad)


def test_wealth_decreases_in_the_threshold_and_the_bound_is_a_rejected_threshold() -> None:
    config = BettingConfig(0.25)
    successes, failures = np.array([950, 300, 64]), np.array([50, 2, 0])
    zs = np.linspace(-2, 4, 200)
    for s, f in zip(successes, failures):
        w = [log_wealth([s], [f], z, config)[0] for z in zs]
        assert np.all(np.diff(w) < 0)
    z = _bound_z(successes, failures, config)
    at = log_wealth(successes, failures, z, config)
    above = log_wealth(successes, failures, z + 1e-9, config)
    assert at.max() >= config.threshold > above.max()  # the largest rejected threshold, over every check
    assert _bound_z(np.array([0]), np.array([100]), config) == -math.inf


def test_unanimous_votes_stop_where_the_all_in_bet_first_crosses() -> None:
    # all votes agree: the all-in gambler (weight 1/2) has wealth 0.5 / q^t; the radius 0.5 at sigma = 0.25 is
    # certified once 0.5 q^-t >= 1 / ((1 - eta) alpha), i.e. t >= ln(4000) / -ln(q), at the next check (every 16)
    config = BettingConfig(0.25, radii=(0.5,))
    q = norm.cdf(2.0)
    need = math.log(2 / (0.5 * 0.001)) / -math.log(q)
    result = run_betting(config, lambda sizes: list(sizes))
    assert result.certified and result.radius >= 0.5
    assert result.n == 64 * math.ceil(need / 64) and result.stop == "settled"
    full = run_betting(BettingConfig(0.25, policy="full"), lambda sizes: list(sizes))
    assert full.n == 111616 and full.radius == pytest.approx(BettingConfig(0.25).max_radius)


def test_inputs_below_a_radius_stop_early_and_abstain() -> None:
    config = BettingConfig(0.25, radii=(0.5,))
    low = run_betting(config, bernoulli(0.3, 0))
    assert not low.certified and low.stop == "futile" and low.n == 256
    below = run_betting(config, bernoulli(0.9, 1))  # certified at some radius, not at 0.5
    assert below.certified and below.radius < 0.5 and below.n <= 1024


@pytest.mark.parametrize("share", [0.5, 0.0])
def test_exact_failure_probability_matches_simulation_and_the_test_object(share) -> None:
    problem = Problem("lin", (1, 1, 1), 1.0, (0.0,), float(norm.ppf(0.8)))
    config = BettingConfig(1.0, 0.1, policy="full", first=8, last=100, final_share=share)
    exact = exact_betting_failure(problem, None, config)
    checks = np.array(betting_checks(config))
    rng = np.random.default_rng(3)
    trials = 20_000
    votes = np.cumsum(rng.binomial(np.diff(checks, prepend=0), 0.8, (trials, len(checks))), axis=1)
    z_star = problem.bound_radius * (1 + 1e-9)
    wealth = log_wealth(votes, checks - votes, z_star, config)
    final = clopper_pearson_lower_all(100, 0.1 * share)[votes[:, -1]] > norm.cdf(z_star) if share else False
    fails = (wealth >= config.threshold).any(axis=1) | final
    assert 0.01 < exact <= 0.1
    assert abs(fails.mean() - exact) <= 4.5 * math.sqrt(exact * (1 - exact) / trials)
    for row, failed in zip(votes[:200], fails[:200]):  # the test object decides as the first-passage event says
        counts = iter(np.diff(row, prepend=0).tolist())
        result = run_betting(config, lambda sizes, c=counts: [next(c) for _ in sizes])
        assert (result.radius > problem.bound_radius * (1 + 1e-9)) == failed


def test_level_alpha_exactly_at_the_papers_alpha_and_doubled_alpha_exceeds_it() -> None:
    # alpha = 0.001, label mode, policy full (every check, then the final look): the exact probability that the
    # radius exceeds sigma * Phi^-1(p_A) is at most alpha; the factor-2 slip (wealth threshold 1 / (2 alpha))
    # exceeds alpha on the same input, so the exact computation has the power to see it
    config = BettingConfig(0.5, 0.001, policy="full", first=16, last=2048)
    slipped = BettingConfig(0.5, 0.002, policy="full", first=16, last=2048)
    assert betting_checks(config)[:3] == (4, 8, 12) and betting_checks(config)[-1] == 2048
    for p in (0.9, 0.97):
        problem = Problem("lin", (1, 1, 1), 0.5, (0.0,), 0.5 * float(norm.ppf(p)))
        sound = exact_betting_failure(problem, None, config)
        assert 1e-4 < sound <= 0.001
    assert exact_betting_failure(problem, None, slipped) > 0.001


def test_packing_does_not_change_results_and_sigma_must_match(linear_model) -> None:
    from conftest import image_with_margin

    smooth = Smooth(linear_model, 2, 0.25)
    config = BettingConfig(0.25, radii=(0.1, 0.2))
    xs = [image_with_margin(m) for m in (0.05, 0.3, -0.2, 0.15)]

    def gens(seed: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(seed + i) for i in range(len(xs))]

    together = certify_sequential_many(smooth, xs, config, batch_size=200, n0=20, selection_generators=gens(0),
                                       estimation_generators=gens(100))
    alone = [certify_sequential_many(smooth, [x], config, batch_size=200, n0=20, selection_generators=[s],
                                     estimation_generators=[e])[0]
             for x, s, e in zip(xs, gens(0), gens(100))]
    assert together == alone
    assert together[1].prediction == 1 and together[1].radius >= 0.2 and together[2].prediction in (0, -1)
    with pytest.raises(SmoothAdvError, match="sigma"):
        certify_sequential_many(smooth, xs, BettingConfig(0.5), batch_size=200)


def test_settings_build_the_betting_config() -> None:
    settings = CertifySettings(sigma=0.5, mode="sequential",
                               sequential=BettingSettings(radii=(0.5,), first=32, last=4096))
    config = sequential_test(settings)
    assert isinstance(config, BettingConfig) and config.first == 32 and config.schedule.last == 4096
    assert config.schedule.radii == (0.5,) and config.policy == "grid" and (config.sigma, config.alpha) == (0.5, 0.001)
    assert isinstance(sequential_test(CertifySettings(sigma=0.5, mode="sequential")), SequentialConfig)
    with pytest.raises(SmoothAdvError, match="needs mode sequential"):
        CertifySettings(sigma=0.5, sequential=BettingSettings())
