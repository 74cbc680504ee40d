"""Sequential (group-sequential Clopper-Pearson) certification and packed certification.

The counts-level logic is checked against Bernoulli samplers with known p (no network): validity
of the union bound over looks, closed-form stopping points and the cap radius; the network
drivers are checked for independence from packing (through the command line: tests/e2e/test_cli_sequential.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import image_with_margin
from scipy.stats import binom, norm

from smoothadv import Certificate, Smooth, SmoothAdvError
from smoothadv.betting import BettingConfig
from smoothadv.models import build_model
from smoothadv.sequential import (
    DEFAULT_LOOKS,
    LEGACY_SEQUENTIAL_COLUMNS,
    SEQUENTIAL_COLUMNS,
    SequentialCertificate,
    SequentialConfig,
    SequentialRow,
    SequentialTest,
    certify_sequential,
    certify_sequential_dataset,
    certify_sequential_many,
    doubling_looks,
    fitted_schedule,
    run_sequential,
    sequential_columns,
    standard_radii,
)
from smoothadv.stats import certified_radius, clopper_pearson_lower, max_certifiable_radius


def bernoulli(p: float, seed: int):
    rng = np.random.default_rng(seed)
    return lambda k: int(rng.binomial(k, p))


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0])
def test_max_radius_matches_fixed_n_100k_within_half_percent(sigma) -> None:
    assert DEFAULT_LOOKS == (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
    config = SequentialConfig(sigma)  # the grid's default: the fitted schedule, half of alpha at its last look
    assert config.schedule.looks[-1] == 111616 and config.schedule.levels[-1] == pytest.approx(0.0005)
    assert sum(config.schedule.levels) == pytest.approx(0.001, rel=1e-12)
    assert config.max_radius == pytest.approx(sigma * norm.ppf(0.0005 ** (1 / 111616)), rel=1e-12)
    fixed = max_certifiable_radius(100_000, 0.001, sigma)  # 3.8115 sigma
    assert abs(config.max_radius / fixed - 1) <= 0.005
    full = SequentialConfig(sigma, policy="full")  # K = 8 doubling looks at alpha / 8: every look, every sample agrees
    assert full.schedule.levels == (0.001 / 8,) * 8
    result = run_sequential(full, lambda k: k)
    assert result.n == 131072 and result.radius == pytest.approx(full.max_radius)
    assert config.max_radius >= full.max_radius  # the fitted schedule never lowers the cap
    assert abs(full.max_radius / fixed - 1) <= 0.005


def test_fitted_schedule_spends_alpha_where_inputs_stop() -> None:
    # Last look: the first multiple of 1024 whose cap at alpha / 2 reaches the doubling schedule's cap at alpha / 8:
    # N >= ln(2000) / -ln((alpha/8)^(1/131072)) = 131072 ln 2000 / ln 8000 = 110,946, so 109 * 1024 = 111,616.
    # Top radius sigma = 0.5, r = 1.75 = 3.5 sigma at alpha / 4: N >= ln(4000) / -ln Phi(3.5) = 35,650 -> 35 * 1024.
    looks, levels = fitted_schedule(0.5, 0.001, (0.0, 1.0, 1.75))
    assert looks == (1024, 2048, 4096, 8192, 16384, 32768, 35840, 65536, 111616)
    assert levels == pytest.approx((0.001 / 28,) * 6 + (0.001 / 4, 0.001 / 28, 0.001 / 2), rel=1e-12)
    assert 108 * 1024 < 131072 * math.log(2000) / math.log(8000) <= 111616
    cap8 = clopper_pearson_lower(131072, 131072, 0.001 / 8)
    assert clopper_pearson_lower(110592, 110592, 0.0005) < cap8 <= clopper_pearson_lower(111616, 111616, 0.0005)
    need = math.log(0.001 / 4) / math.log(norm.cdf(3.5))
    assert 34 * 1024 < need <= 35840
    config = SequentialConfig(0.5, radii=(0.0, 1.0, 1.75))
    assert (config.schedule.looks, config.schedule.levels) == (looks, levels)
    result = run_sequential(config, lambda m: m)  # unanimous votes stop at the fitted look
    assert (result.n, result.stop) == (35840, "settled") and result.radius >= 1.75
    # sigma = 0.25, r = 0.75 = 3 sigma: ln(4000) / -ln Phi(3) = 6,140 -> 6,144, between the doublings
    assert fitted_schedule(0.25, 0.001, standard_radii(0.25))[0] == (1024, 2048, 4096, 6144, 8192, 16384, 32768,
                                                                      65536, 111616)
    # a top radius at a doubling look takes that look's place; one beyond the last look adds nothing
    one, one_levels = fitted_schedule(0.5, 0.001, (0.5,))
    assert one == (1024, 2048, 4096, 8192, 16384, 32768, 65536, 111616)
    assert one_levels[0] == pytest.approx(0.00025) and one_levels[1] == pytest.approx(0.00025 / 6)
    far, far_levels = fitted_schedule(0.5, 0.001, (5.0,))
    assert far == (*DEFAULT_LOOKS[:-1], 111616) and far_levels[:-1] == pytest.approx((0.0005 / 7,) * 7)
    # `base` replaces the doubling looks the grid schedule is fitted on; other policies make exactly those looks
    short = doubling_looks(64, 512)
    on_short = SequentialConfig(0.25, base=short)
    fitted = fitted_schedule(0.25, 0.001, standard_radii(0.25, 0.001, short), short)
    assert (on_short.schedule.looks, on_short.schedule.levels) == fitted
    assert SequentialConfig(0.25, policy="full", base=short).schedule.looks == short
    # explicit looks keep the equal split alpha / K
    assert SequentialConfig(0.5, looks=DEFAULT_LOOKS).schedule.levels == (0.001 / 8,) * 8
    assert SequentialConfig(0.5, policy="full").schedule.looks == DEFAULT_LOOKS


def test_the_fields_you_pass_are_the_fields_you_read() -> None:
    # the fields keep what was given; the schedule the test uses is `schedule`, and a config rebuilt from its
    # fields is the same config with the same schedule
    import dataclasses

    for config in (SequentialConfig(0.5), SequentialConfig(0.25, base=doubling_looks(64, 512), radii=(0.5, 0.25)),
                   SequentialConfig(0.5, policy="full"),
                   SequentialConfig(1.0, 0.01, policy="tolerance", tolerance=0.1)):
        assert config.looks is None and config.levels is None
        assert config.schedule.looks and len(config.schedule.levels) == len(config.schedule.looks)
        again = SequentialConfig(**dataclasses.asdict(config))
        assert again == config and again.schedule == config.schedule
    given = SequentialConfig(0.25, radii=(0.5, 0.25))
    assert given.radii == (0.5, 0.25) and given.schedule.radii == (0.25, 0.5)
    assert SequentialConfig(0.5).radii == () and SequentialConfig(0.5).schedule.radii[-1] == 1.75
    betting = BettingConfig(0.5)
    assert betting.last is None and betting.radii == () and betting.schedule.last == 111616


@pytest.mark.parametrize("levels", [(0.0005, 0.0005, 0.0001), (0.001, 0.0), (0.0005,)])
def test_levels_must_sum_to_at_most_alpha(levels) -> None:
    with pytest.raises(SmoothAdvError, match="levels"):
        SequentialConfig(0.5, looks=(1024, 2048, 4096)[: max(len(levels), 2)], levels=levels)


def test_one_look_is_cohens_fixed_n_bound() -> None:
    config = SequentialConfig(0.5, alpha=0.001, looks=(1000,), policy="full")
    result = run_sequential(config, lambda k: 950)
    assert result.p_lower == clopper_pearson_lower(950, 1000, 0.001)
    assert result.radius == pytest.approx(0.5 * norm.ppf(clopper_pearson_lower(950, 1000, 0.001)))
    assert (result.n, result.looks, result.stop) == (1000, 1, "last look")


@pytest.mark.parametrize("policy,p,forecast,fitted", [
    ("full", 0.8, None, False), ("grid", 0.8, None, False), ("tolerance", 0.93, None, False),
    ("grid", 0.8, 0.5, False), ("grid", 0.8, 0.05, True), ("grid", 0.95, 0.05, True), ("full", 0.95, None, True)])
def test_bound_fails_at_most_alpha_whatever_the_stopping_rule(policy, p, forecast, fitted) -> None:
    # alpha = 0.2 over the looks: 7 doubling looks 8..512 at alpha / 7, or the fitted schedule 8, 16, 32, 48, 64, 128,
    # 256, 336 spending alpha / 4 at 48 (unanimous votes certify r = 1.5 there), alpha / 2 at 336 and alpha / 24
    # elsewhere. The reported max_j L_j exceeds the true p in at most a fraction alpha of runs. Tolerance: the
    # 0.999 quantile of Binomial(trials, alpha). (Using alpha at every look instead fails this check: the invalid
    # rate of the running maximum then exceeds 0.3.)
    radii = (0.0, 0.5, 0.9, 1.2, 1.5)
    looks, levels = fitted_schedule(1.0, 0.2, radii, doubling_looks(8, 512)) if fitted else (doubling_looks(8, 512),
                                                                                              None)
    assert looks == ((8, 16, 32, 48, 64, 128, 256, 336) if fitted else (8, 16, 32, 64, 128, 256, 512))
    config = SequentialConfig(1.0, alpha=0.2, looks=looks, policy=policy, radii=radii, tolerance=0.05,
                              forecast_alpha=forecast, levels=levels)
    assert sum(config.schedule.levels) == pytest.approx(0.2)
    trials = 400
    sample = bernoulli(p, 11)
    invalid = sum(run_sequential(config, sample).p_lower > p for _ in range(trials))
    assert invalid <= binom.ppf(0.999, trials, 0.2)


def test_unsplit_alpha_would_be_invalid() -> None:
    # The check above has power: with alpha at each of the 7 looks (no split) the running max is invalid often.
    looks, p, alpha, trials = doubling_looks(8, 512), 0.8, 0.2, 400
    rng = np.random.default_rng(3)
    invalid = 0
    for _ in range(trials):
        draws = np.cumsum(rng.binomial(np.diff((0, *looks)), p))
        invalid += max(clopper_pearson_lower(int(k), n, alpha) for k, n in zip(draws, looks)) > p
    assert invalid > binom.ppf(0.999, trials, alpha)


def test_unanimous_votes_stop_at_the_first_look_that_certifies_the_top_radius() -> None:
    sigma, alpha = 0.25, 0.001
    config = SequentialConfig(sigma)  # grid 0, 0.25, 0.5, 0.75
    assert config.schedule.radii == (0.0, 0.25, 0.5, 0.75) == standard_radii(sigma)
    # all N agree: radius sigma * Phi^-1(alpha_j^(1/N)); the fitted look 6,144 spends alpha / 4 and is the first
    # with radius >= 0.75 = 3 sigma (with alpha / 8 at the doubling looks it would be 8,192)
    radius = {n: sigma * norm.ppf(level ** (1 / n)) for n, level in zip(config.schedule.looks, config.schedule.levels)}
    expected = next(n for n in config.schedule.looks if radius[n] >= 0.75)
    result = run_sequential(config, lambda m: m)
    assert expected == 6144 and result.n == expected and result.stop == "settled"
    assert result.radius == pytest.approx(radius[6144]) and config.schedule.levels[3] == pytest.approx(alpha / 4)
    assert next(n for n in DEFAULT_LOOKS if sigma * norm.ppf((alpha / 8) ** (1 / n)) >= 0.75) == 8192


def test_single_radius_and_futility_stop_at_the_first_look() -> None:
    sigma = 0.25
    one = SequentialConfig(sigma, radii=(0.25,))
    result = run_sequential(one, bernoulli(0.99, 1))  # L ~ 0.975 at 1024 samples: radius ~ 0.49 >= 0.25
    assert result.certified and result.radius >= 0.25 and result.n == 1024 and result.stop == "settled"
    futile = run_sequential(SequentialConfig(sigma), bernoulli(0.05, 2))
    assert not futile.certified and futile.radius == 0.0 and futile.n == 1024 and futile.stop == "futile"
    out_of_reach = run_sequential(one, bernoulli(0.55, 3))  # Phi(1) = 0.84 is far above any upper bound
    assert not out_of_reach.certified or out_of_reach.radius < 0.25
    assert out_of_reach.n == 1024


def test_a_looser_forecast_stops_boundary_inputs_sooner() -> None:
    # p = Phi(3) = 0.99865: the radius is about 0.75 = 3 sigma, the top of the sigma = 0.25 grid
    p = float(norm.cdf(3.0))
    runs = {level: [run_sequential(SequentialConfig(0.25, forecast_alpha=level), bernoulli(p, s)).n for s in range(5)]
            for level in (None, 0.05, 0.2)}  # None: the strict forecast at each look's level
    assert SequentialConfig(0.25).forecast_alpha == 0.05
    for loose, strict in ((runs[0.05], runs[None]), (runs[0.2], runs[0.05])):
        assert all(a <= b for a, b in zip(loose, strict)) and sum(loose) < sum(strict)
    with pytest.raises(SmoothAdvError, match="forecast_alpha"):
        SequentialConfig(0.25, forecast_alpha=1.5)


def test_tolerance_policy_stops_when_the_reachable_gain_is_small() -> None:
    sigma, p = 0.5, 0.9
    loose = run_sequential(SequentialConfig(sigma, policy="tolerance", tolerance=10.0), bernoulli(p, 4))
    assert loose.n == 1024
    tight = run_sequential(SequentialConfig(sigma, policy="tolerance", tolerance=0.01), bernoulli(p, 4))
    assert tight.n > 1024 and tight.radius <= sigma * norm.ppf(p) + 1e-9
    assert sigma * norm.ppf(p) - tight.radius < 0.05  # ~2.5% CP slack at 16-65k samples


def test_config_and_test_reject_bad_input() -> None:
    with pytest.raises(SmoothAdvError, match="strictly increasing"):
        SequentialConfig(0.25, looks=(100, 100))
    with pytest.raises(SmoothAdvError, match="policy"):
        SequentialConfig(0.25, policy="fast")
    with pytest.raises(SmoothAdvError, match="alpha"):
        SequentialConfig(0.25, alpha=1.0)
    test = SequentialTest(SequentialConfig(0.25, looks=(10,)))
    with pytest.raises(SmoothAdvError, match="successes"):
        test.update(11)
    test.update(10)
    with pytest.raises(SmoothAdvError, match="stopped"):
        test.update(0)


# ------------------------------------------------------------------ with a network


def test_sequential_radius_is_valid_and_tight_on_a_linear_classifier(linear_model) -> None:
    sigma, margin = 0.25, 0.2  # p = Phi(0.8) = 0.788; true radius 0.2
    smooth = Smooth(linear_model, 2, sigma)
    config = SequentialConfig(sigma, looks=doubling_looks(1024, 32768), policy="full")
    cert = certify_sequential(smooth, image_with_margin(margin), config, batch_size=8192, label=1,
                              generator=torch.Generator().manual_seed(5))
    assert cert.prediction == 1 and cert.n0 == 0 and cert.samples == 32768
    assert 0.9 * margin <= cert.radius <= margin


def test_sigma_has_one_source_a_mismatched_config_is_refused(linear_model) -> None:
    # Without this check, Smooth(sigma = 0.25) certified with SequentialConfig(sigma = 1.0) drew the noise at 0.25 and
    # computed the radius at 1.0. With margin 0.4 (true radius 0.4) that reported about 1.5, silently.
    smooth = Smooth(linear_model, 2, 0.25)
    x, margin = image_with_margin(0.4), 0.4
    right = SequentialConfig.for_smooth(smooth, looks=doubling_looks(1024, 16384), policy="full")
    assert right.sigma == 0.25 and right == SequentialConfig(0.25, looks=doubling_looks(1024, 16384), policy="full")
    cert = certify_sequential(smooth, x, right, batch_size=4096, label=1, generator=torch.Generator().manual_seed(0))
    assert 0.9 * margin <= cert.radius <= margin
    hole = certified_radius(cert.p_lower, 1.0)  # what the mismatched config made of the same votes
    assert hole > 3.5 * margin
    wrong = SequentialConfig(1.0, looks=doubling_looks(1024, 16384), policy="full")
    calls = {
        "certify_sequential": lambda: certify_sequential(smooth, x, wrong, batch_size=4096, label=1),
        "certify_sequential_many": lambda: certify_sequential_many(smooth, [x], wrong, batch_size=4096),
        # refused on the call, before any row is asked for (no output file is half written)
        "certify_sequential_dataset": lambda: certify_sequential_dataset(
            smooth, torch.utils.data.TensorDataset(x[None], torch.tensor([1])), [0], config=wrong, batch_size=64),
    }
    for name, call in calls.items():
        with pytest.raises(SmoothAdvError, match=r"sigma = 1\.0 but the smoothed classifier has sigma = 0\.25") as info:
            call()
        assert "\n" not in str(info.value), name
    with pytest.raises(SmoothAdvError, match="takes sigma"):
        SequentialConfig.for_smooth(smooth, sigma=0.25)


def test_fixed_and_sequential_certificates_share_one_shape(linear_model) -> None:
    smooth = Smooth(linear_model, 2, 0.25)
    x = image_with_margin(0.2)
    fixed = smooth.certify(x, 64, 1024, 0.001, 512, generator=torch.Generator().manual_seed(1))
    config = SequentialConfig.for_smooth(smooth, looks=doubling_looks(256, 2048), policy="full")
    chosen = certify_sequential(smooth, x, config, batch_size=512, n0=64, generator=torch.Generator().manual_seed(2))
    given = certify_sequential(smooth, x, config, batch_size=512, label=1, generator=torch.Generator().manual_seed(2))
    for cert, n0, n in ((fixed, 64, 1024), (chosen, 64, 2048), (given, 0, 2048)):
        prediction, radius = cert  # Cohen's pair, for both
        assert isinstance(cert, Certificate) and (prediction, radius) == (cert.prediction, cert.radius) == tuple(cert)
        assert (cert.n0, cert.n, cert.samples) == (n0, n, n0 + n)  # n: estimation samples, everywhere
        assert cert.tested_class == 1 == prediction and 0 < cert.count <= cert.n
    assert isinstance(chosen, SequentialCertificate) and (chosen.looks, chosen.stop) == (4, "last look")
    # a row's `samples` (n0 + n forward passes) is the TSV column `samples`; `n` keeps its glossary meaning
    assert dict(zip(SEQUENTIAL_COLUMNS, SequentialRow._fields))["samples"] == "samples"
    assert sequential_columns(None) == SEQUENTIAL_COLUMNS
    assert sequential_columns("\t".join(LEGACY_SEQUENTIAL_COLUMNS)) == LEGACY_SEQUENTIAL_COLUMNS
    data = torch.utils.data.TensorDataset(x[None], torch.tensor([1]))
    (row,) = certify_sequential_dataset(smooth, data, [0], config=config, n0=64, batch_size=512)
    assert row.samples == 64 + 2048


def _gens(seed: int, count: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(count)]


def test_rows_do_not_depend_on_which_inputs_share_a_batch() -> None:
    torch.manual_seed(0)
    model = build_model("toy_cnn", "synthetic").eval()
    smooth = Smooth(model, 4, 0.25)
    xs = [torch.rand(3, 8, 8) for _ in range(4)]
    packed = smooth.certify_many(xs, 30, 170, 0.01, 128, _gens(10, 4))  # 200-sample streams straddle batches
    alone = [smooth.certify(x, 30, 170, 0.01, 128, generator=g) for x, g in zip(xs, _gens(10, 4))]
    assert [(c.prediction, c.count, c.p_lower) for c in packed] == [(c.prediction, c.count, c.p_lower) for c in alone]
    config = SequentialConfig(0.25, alpha=0.01, looks=doubling_looks(96, 768), radii=(0.1, 0.3))
    together = certify_sequential_many(smooth, xs, config, batch_size=128, n0=20, selection_generators=_gens(20, 4),
                                       estimation_generators=_gens(30, 4))
    separately = [certify_sequential_many(smooth, [x], config, batch_size=128, n0=20, selection_generators=[s],
                                          estimation_generators=[e])[0]
                  for x, s, e in zip(xs, _gens(20, 4), _gens(30, 4))]
    assert together == separately
    assert len({c.n for c in together}) > 1 or together[0].n < 768  # looks really differ/stop early


def test_standard_radii_reach_the_cap() -> None:
    radii = standard_radii(0.5)
    assert radii[0] == 0.0 and radii[-1] == 1.75 and math.isclose(radii[1], 0.25)


@pytest.mark.parametrize("n", [100, 2000, 100_000])
def test_a_budget_schedule_never_draws_more_than_fixed_n(n) -> None:
    config = SequentialConfig.for_budget(0.25, n)
    assert config.schedule.looks[-1] <= n and sum(config.schedule.levels) == pytest.approx(0.001)
    fixed = max_certifiable_radius(n, 0.001, 0.25)
    assert 0.93 * fixed <= config.max_radius <= fixed
    assert config.schedule.looks[-1] < SequentialConfig(0.25).schedule.looks[-1]
    for bad in (8, 2000.0, True):
        with pytest.raises(SmoothAdvError, match="sample budget"):
            SequentialConfig.for_budget(0.25, bad)
