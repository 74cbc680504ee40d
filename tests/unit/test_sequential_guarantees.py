"""Sequential CERTIFY (group-sequential Clopper-Pearson) and the betting test where their guarantees break.

- The group-sequential test's decisions on scripted count paths, against a reference written here from the
  module's specification (max over looks of Clopper-Pearson bounds at the per-look levels, the futility and
  settling rules of each policy, strict > 1/2 for a certificate), with SciPy's Beta quantiles.
- Its exact failure probability P(max_j L_j > p) for the `full` policy, computed here by a dynamic programme
  over the count path, and a seeded run of the test compared with it by an exact binomial test (powerful
  enough to catch an unsplit alpha).
- Class selection in the sequential drivers on scripted votes: the class comes from the selection samples
  only (adaptive: 16 unanimous votes, else the argmax of n0 with ties to the lowest class; fixed: Cohen's n0),
  the estimation counts from the later samples; label mode draws no selection sample.
- The betting test's wealth against its product formula, and its bound against the root it claims (Ville's
  inequality makes M_t(q) >= 1/a the rejection of q; Waudby-Smith & Ramdas 2024).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import ndtr
from scipy.stats import beta, binom, binomtest, norm
from torch import Tensor, nn

from smoothadv import ABSTAIN, Smooth
from smoothadv.betting import BettingConfig, log_wealth
from smoothadv.sequential import (
    SELECTION_CHUNK,
    SequentialConfig,
    certify_sequential_many,
    fitted_schedule,
    run_sequential,
    selection_step,
)

# ------------------------------------------------------------------ the reference test


def cp_lower(k: int, n: int, level: float) -> float:
    return 0.0 if k == 0 else float(beta.ppf(level, k, n - k + 1))


def cp_upper(k: int, n: int, level: float) -> float:
    return 1.0 if k == n else float(beta.ppf(1 - level, k + 1, n - k))


def reference_sequential(looks, levels, policy, radii, sigma, forecast, tolerance, increments):
    """The group-sequential test of `sequential`'s specification on given per-look vote increments:
    (certified, radius, p_lower, successes, n, looks made, stop)."""
    successes = n = made = 0
    lower, stop = 0.0, "running"
    last, last_level = looks[-1], levels[-1]

    def reachable(upper: float) -> float:
        k = min(last, math.ceil(upper * last))
        p = cp_lower(k, last, last_level) if k > 0 else 0.0
        return sigma * norm.ppf(p) if p > 0.5 else -1.0

    for look, level, add in zip(looks, levels, increments):
        successes += add
        n = look
        made += 1
        lower = max(lower, cp_lower(successes, n, level))
        if made == len(looks):
            stop = "last look"
            break
        if policy == "full":
            continue
        upper = cp_upper(successes, n, forecast if forecast else level)
        certified = lower > 0.5
        if upper <= 0.5 and not certified:
            stop = "futile"
            break
        radius = sigma * norm.ppf(lower) if certified else -1.0
        reach = max(reachable(upper), radius)
        if policy == "tolerance":
            settled = reach - max(radius, 0.0) <= tolerance
        else:
            settled = all((certified and radius >= r) or reach < r for r in radii)
        if settled:
            stop = "settled"
            break
    certified = lower > 0.5
    return certified, (sigma * norm.ppf(lower) if certified else 0.0), lower, successes, n, made, stop


@pytest.mark.parametrize("policy", ["full", "grid", "tolerance"])
def test_sequential_decisions_match_the_specification_on_random_paths(policy: str) -> None:
    rng = np.random.default_rng({"full": 1, "grid": 2, "tolerance": 3}[policy])
    looks = (20, 40, 80, 160, 320)
    levels = (0.01, 0.01, 0.02, 0.02, 0.04)  # unequal: the level of each look matters
    sigma = 0.5
    for trial in range(40):
        forecast = (None, 0.05, 0.3)[trial % 3]
        radii = (0.0, 0.25, 0.5, 0.75) if trial % 2 else (0.3,)
        config = SequentialConfig(sigma, 0.1, looks=looks, levels=levels, policy=policy, radii=radii,
                                  tolerance=0.1, forecast_alpha=forecast)
        p = rng.choice([0.3, 0.5, 0.55, 0.62, 0.7, 0.8, 0.9, 0.97, 1.0])
        draws = np.diff((0, *looks))
        increments = [int(rng.binomial(d, p)) for d in draws]
        position = iter(increments)
        result = run_sequential(config, lambda k, position=position: next(position))
        expected = reference_sequential(looks, levels, policy, sorted(radii), sigma, forecast, 0.1, increments)
        assert (result.certified, result.successes, result.n, result.looks, result.stop) == \
            (expected[0], expected[3], expected[4], expected[5], expected[6]), (p, increments, forecast, radii)
        assert result.p_lower == pytest.approx(expected[2], rel=1e-9, abs=1e-15)
        assert result.radius == pytest.approx(expected[1], rel=1e-9, abs=1e-12)


def test_certificate_needs_a_bound_strictly_above_one_half() -> None:
    """One look at level a: k votes of n with L = 1/2 exactly would not certify (sequential uses > 1/2); the
    smallest certifying count certifies with radius sigma Phi^-1(L)."""
    n, level, sigma = 100, 0.05, 0.25
    critical = next(k for k in range(n + 1) if cp_lower(k, n, level) > 0.5)
    for k, certified in ((critical - 1, False), (critical, True)):
        result = run_sequential(SequentialConfig(sigma, level, looks=(n,), policy="full"), lambda _, k=k: k)
        assert result.certified == certified
        if certified:
            assert result.radius == pytest.approx(sigma * norm.ppf(cp_lower(k, n, level)), rel=1e-9)
        else:
            assert result.radius == 0.0


def test_default_levels_split_alpha_equally_and_fitted_ones_spend_all_of_it() -> None:
    config = SequentialConfig(0.5, 0.01, looks=(10, 30, 90), policy="full")
    assert config.schedule.levels == pytest.approx((0.01 / 3,) * 3, rel=1e-12)
    looks, levels = fitted_schedule(0.5, 0.001, (0.0, 0.5, 1.0, 1.5))
    assert sum(levels) == pytest.approx(0.001, rel=1e-9)
    assert levels[-1] == pytest.approx(0.0005, rel=1e-12)
    assert list(looks) == sorted(set(looks))
    grid = SequentialConfig(0.5, 0.001, policy="grid", radii=(0.5, 1.0))
    assert sum(grid.schedule.levels) <= 0.001 * (1 + 1e-9)


# ------------------------------------------------------------------ exact failure probability of the full policy


def exact_full_failure(p: float, looks: tuple[int, ...], levels: tuple[float, ...]) -> float:
    """P(max_j L_j > p) for Binomial counts with rate p, by propagating the count distribution of the paths on which
    no bound has exceeded p yet (first passage)."""
    alive = np.zeros(looks[-1] + 1)
    alive[0] = 1.0
    failed, previous = 0.0, 0
    for look, level in zip(looks, levels):
        step = binom.pmf(np.arange(look - previous + 1), look - previous, p)
        alive = np.convolve(alive, step)[: looks[-1] + 1]
        bad = np.array([cp_lower(k, look, level) > p if k <= look else False for k in range(looks[-1] + 1)])
        failed += float(alive[bad].sum())
        alive[bad] = 0.0
        previous = look
    return failed


def test_full_policy_fails_at_its_exact_rate_and_not_at_twice_alpha() -> None:
    """alpha = 0.3 over three looks at p = 0.6 (rate at which the union bound is nearly tight): 3000 seeded
    runs fail (max_j L_j > p) at the exact rate of the dynamic programme (two-sided binomial p-value >= 1e-4);
    the exact rate is <= alpha, and the same test with alpha unsplit (each look at alpha) fails far more often,
    a difference this check detects."""
    looks, alpha, p, trials = (15, 30, 60), 0.3, 0.6, 3000
    levels = (alpha / 3,) * 3
    exact = exact_full_failure(p, looks, levels)
    unsplit = exact_full_failure(p, looks, (alpha,) * 3)
    assert exact <= alpha and unsplit > alpha
    # power: at this T the acceptance region around `exact` excludes `unsplit`
    assert binomtest(round(unsplit * trials), trials, exact).pvalue < 1e-6
    config = SequentialConfig(0.5, alpha, looks=looks, policy="full")
    rng = np.random.default_rng(2024)
    failures = 0
    for _ in range(trials):
        result = run_sequential(config, lambda k: int(rng.binomial(k, p)))
        failures += result.p_lower > p
        assert result.n == looks[-1] and result.looks == 3
    assert binomtest(failures, trials, exact).pvalue >= 1e-4, (failures / trials, exact)


# ------------------------------------------------------------------ class selection in the drivers, on scripted votes


class VoteScript(nn.Module):
    """Votes script[0], script[1], ... for the successive rows it is given, whatever the input."""

    def __init__(self, script: list[int], num_classes: int) -> None:
        super().__init__()
        self.script, self.num_classes, self.position = list(script), num_classes, 0

    def forward(self, x: Tensor) -> Tensor:
        votes = torch.tensor(self.script[self.position:self.position + x.shape[0]])
        assert len(votes) == x.shape[0], "the sampler drew more samples than scripted"
        self.position += x.shape[0]
        return nn.functional.one_hot(votes, self.num_classes).float()


def image() -> Tensor:
    return torch.full((1, 2, 2), 0.25)


def test_selection_rule_adaptive_and_fixed() -> None:
    assert selection_step([0, 0, 0], 100, "adaptive") == -SELECTION_CHUNK
    assert selection_step([0, 0, 0], 10, "adaptive") == -10
    assert selection_step([0, 0, 0], 100, "fixed") == -100
    assert selection_step([0, 16, 0], 100, "adaptive") == 1  # unanimous first chunk
    assert selection_step([1, 15, 0], 100, "adaptive") == -84  # split: the rest in one go
    assert selection_step([40, 40, 20], 100, "adaptive") == 0  # tie: the lowest class
    assert selection_step([10, 45, 45], 100, "fixed") == 1
    assert selection_step([0, 0, 3], 3, "fixed") == 2


@pytest.mark.parametrize("selection", ["adaptive", "fixed"])
def test_sequential_selection_uses_only_the_selection_samples(selection: str) -> None:
    """Selection votes say class 2 (unanimous 16, then split), estimation votes say class 0: the test is of
    class 2 with its estimation count, so it cannot certify; a driver choosing from the estimation votes would."""
    n0, looks = 40, (50, 100)
    selection_votes = [2] * 16 + [1] * 10 + [2] * 14
    estimation_votes = [0] * 95 + [2] * 5
    used = 16 if selection == "adaptive" else n0
    script = selection_votes[:used] + estimation_votes
    config = SequentialConfig(0.5, 0.01, looks=looks, policy="full", selection=selection)
    (cert,) = certify_sequential_many(Smooth(VoteScript(script, 3), 3, 0.5), [image()], config, batch_size=32, n0=n0)
    assert (cert.tested_class, cert.n0, cert.count, cert.n, cert.prediction) == (2, used, 5, 100, ABSTAIN)


def test_split_adaptive_selection_draws_all_n0_and_takes_the_argmax() -> None:
    """First chunk split, so all n0 = 30 are drawn: classes 0 and 1 tie at 15 (ties to the lowest class, 0) and
    the estimation votes (all 0) certify class 0 with the Clopper-Pearson bound of 60/60 at alpha / 2."""
    selection_votes = [1, 0] * 15
    config = SequentialConfig(0.5, 0.02, looks=(30, 60), policy="full")
    smooth = Smooth(VoteScript(selection_votes + [0] * 60, 3), 3, 0.5)
    (cert,) = certify_sequential_many(smooth, [image()], config, batch_size=7, n0=30)
    assert (cert.tested_class, cert.n0, cert.count, cert.n, cert.prediction) == (0, 30, 60, 60, 0)
    assert cert.p_lower == pytest.approx(0.01 ** (1 / 60), rel=1e-12)
    assert cert.radius == pytest.approx(0.5 * norm.ppf(0.01 ** (1 / 60)), rel=1e-12)
    assert cert.samples == 90 and cert.looks == 2 and cert.stop == "last look"


def test_label_mode_draws_no_selection_sample() -> None:
    config = SequentialConfig(0.25, 0.01, looks=(40,), policy="full")
    smooth = Smooth(VoteScript([1] * 38 + [0] * 2, 3), 3, 0.25)
    (cert,) = certify_sequential_many(smooth, [image()], config, batch_size=16, labels=[1])
    lower = cp_lower(38, 40, 0.01)
    assert (cert.tested_class, cert.n0, cert.count, cert.n, cert.prediction) == (1, 0, 38, 40, 1)
    assert cert.p_lower == pytest.approx(lower, rel=1e-9)


# ------------------------------------------------------------------ the betting test


def direct_log_wealth(s: int, f: int, q: float, bets) -> float:
    """ln sum_k w_k (1 + u_k (1 - q) / q)^S (1 - u_k)^F, term by term."""
    total = 0.0
    for u, w in bets:
        if w == 0 or (u == 1.0 and f > 0):
            continue
        total += w * (1 + u * (1 - q) / q) ** s * (1 - u) ** f
    return math.log(total) if total > 0 else -math.inf


def test_log_wealth_is_the_mixture_of_constant_bets() -> None:
    bets = ((1.0, 0.4), (0.5, 0.3), (0.1, 0.2), (0.01, 0.1))
    config = BettingConfig(0.5, 0.05, bets=bets, first=8, last=512, policy="full")
    for s, f, z in ((0, 0, 0.0), (10, 0, 0.3), (10, 3, 0.3), (40, 20, -0.2), (5, 50, 1.0), (60, 1, 1.5)):
        ours = float(log_wealth(np.array([s]), np.array([f]), z, config)[0])
        expected = direct_log_wealth(s, f, float(ndtr(z)), bets)
        assert ours == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_betting_bound_is_the_largest_rejected_threshold() -> None:
    """After unanimous and mixed votes, z = Phi^-1(p_lower) is rejected (some check's wealth >= 1/a at Phi(z))
    and Phi(z + 1e-6) is not (below 1/a at every check): the bound is the root it claims, no larger."""
    bets = ((1.0, 0.5), (0.5, 0.25), (0.05, 0.25))
    config = BettingConfig(0.5, 0.01, bets=bets, first=8, last=256, final_share=0.0, policy="full")
    a = (1 - config.final_share) * config.alpha
    rng = np.random.default_rng(5)
    for p in (1.0, 0.95, 0.8):
        test = config.start()
        checks_s, checks_f = [], []
        while segments := test.next_segments():
            counts = [int(rng.binomial(size, p)) for size in segments]
            test.update_segments(counts)
            start = test.n - sum(segments)
            cumulative = test.successes - sum(counts) + np.cumsum(counts)
            checks_s += cumulative.tolist()
            checks_f += (start + np.cumsum(segments) - cumulative).tolist()
        z = test.z
        assert math.isfinite(z)
        at = [direct_log_wealth(s, f, float(ndtr(z)), bets) for s, f in zip(checks_s, checks_f)]
        above = [direct_log_wealth(s, f, float(ndtr(z + 1e-6)), bets) for s, f in zip(checks_s, checks_f)]
        assert max(at) >= math.log(1 / a) - 1e-9
        assert max(above) < math.log(1 / a)
        result = test.result()
        assert result.p_lower == pytest.approx(float(ndtr(z)), rel=1e-12)
        assert result.certified == (z > 0)
        if result.certified:
            assert result.radius == pytest.approx(0.5 * z, rel=1e-9)


def test_betting_final_look_is_clopper_pearson_at_its_share_of_alpha() -> None:
    """With final_share 1/2, a test that reaches `last` with every vote for the class has p_lower at least the
    Clopper-Pearson bound of last/last at alpha / 2, i.e. (alpha / 2)^(1 / last)."""
    config = BettingConfig(0.5, 0.02, first=8, last=256, final_share=0.5, policy="full")
    test = config.start()
    while segments := test.next_segments():
        test.update_segments(list(segments))
    result = test.result()
    assert result.n == 256 and result.successes == 256
    assert result.p_lower >= (0.01) ** (1 / 256) * (1 - 1e-12)
    assert config.threshold == pytest.approx(math.log(1 / 0.01), rel=1e-12)


# ------------------------------------------------------------------ the exact law of sequential CERTIFY, three classes


def exact_certified_probability(p: float, looks: tuple[int, ...], levels: tuple[float, ...]) -> float:
    """P(max_j L_j > 1/2) for Binomial counts of rate p under the full policy (first passage over the looks)."""
    alive = np.zeros(looks[-1] + 1)
    alive[0] = 1.0
    done, previous = 0.0, 0
    for look, level in zip(looks, levels):
        alive = np.convolve(alive, binom.pmf(np.arange(look - previous + 1), look - previous, p))[: looks[-1] + 1]
        passed = np.array([k <= look and cp_lower(k, look, level) > 0.5 for k in range(looks[-1] + 1)])
        done += float(alive[passed].sum())
        alive[passed] = 0.0
        previous = look
    return done


def exact_fixed_selection(p: np.ndarray, n0: int) -> np.ndarray:
    """P(argmax of Multinomial(n0, p) = j), ties to the lowest class, by enumeration (three classes)."""
    out = np.zeros(3)
    for a in range(n0 + 1):
        for b in range(n0 + 1 - a):
            counts = np.array([a, b, n0 - a - b])
            pmf = math.factorial(n0) / (math.factorial(a) * math.factorial(b) * math.factorial(n0 - a - b)) \
                * p[0] ** a * p[1] ** b * p[2] ** (n0 - a - b)
            out[int(np.argmax(counts))] += pmf
    return out


def test_sequential_certify_with_selection_follows_the_exact_law_on_three_classes() -> None:
    """1500 seeded sequential CERTIFY runs (fixed selection of n0 = 8, full policy, looks 20 / 40 / 80 at
    alpha = 0.2) on a three-class interval classifier with p = (0.56, 0.27, 0.17): the frequencies of (tested
    class, certified) match P(selected = c) P(max_j L_j > 1/2 | p_c), computed here exactly (chi-square p-value >=
    1e-4). Reusing selection votes, a wrong level per look or a non-strict certificate shifts this law."""
    from scipy.stats import chi2

    from smoothadv.validity import Problem

    problem = Problem("three-sequential", (1, 2, 2), 0.25, (0.0, 0.2), -0.04, seed=3)
    p = problem.probabilities()
    looks, alpha, n0, trials = (20, 40, 80), 0.2, 8, 1500
    levels = (alpha / 3,) * 3
    select = exact_fixed_selection(p, n0)
    law = {}
    for c in range(3):
        certified = exact_certified_probability(float(p[c]), looks, levels)
        law[(c, True)], law[(c, False)] = select[c] * certified, select[c] * (1 - certified)
    model, x = problem.tensors()
    smooth = Smooth(model, 3, problem.sigma)
    config = SequentialConfig(problem.sigma, alpha, looks=looks, policy="full", selection="fixed")
    certs = certify_sequential_many(
        smooth, [x] * trials, config, batch_size=8192, n0=n0,
        selection_generators=[torch.Generator().manual_seed(7_000 + i) for i in range(trials)],
        estimation_generators=[torch.Generator().manual_seed(90_000 + i) for i in range(trials)])
    observed: dict[tuple[int, bool], int] = {}
    for cert in certs:
        key = (cert.tested_class, not cert.abstained)
        observed[key] = observed.get(key, 0) + 1
        assert cert.n0 == n0 and cert.n == looks[-1]
    keys = sorted(law)
    expected = np.array([law[k] * trials for k in keys])
    seen = np.array([observed.get(k, 0) for k in keys], dtype=float)
    big = expected >= 5
    e, o = np.append(expected[big], expected[~big].sum()), np.append(seen[big], seen[~big].sum())
    keep = e > 0
    statistic = float((((o - e) ** 2)[keep] / e[keep]).sum())
    assert chi2.sf(statistic, keep.sum() - 1) >= 1e-4, (observed, dict(zip(keys, expected)))


def test_doubling_looks_at_their_edges() -> None:
    from smoothadv.errors import SmoothAdvError
    from smoothadv.sequential import doubling_looks

    assert doubling_looks(1, 1) == (1,)
    assert doubling_looks(1, 5) == (1, 2, 4, 5)
    assert doubling_looks(16, 64) == (16, 32, 64)
    assert doubling_looks(1024, 131072) == tuple(1024 * 2 ** j for j in range(8))
    for first, last in ((0, 10), (-1, 10), (20, 10)):
        with pytest.raises(SmoothAdvError):
            doubling_looks(first, last)


def test_schedules_and_drivers_refuse_what_would_break_the_guarantee() -> None:
    """Each refusal guards the union bound or the one source of sigma: levels over alpha, a level per look missing,
    looks not increasing from >= 1, negative radii, a config of another sigma, labels outside the classes."""
    from smoothadv.errors import SmoothAdvError
    from smoothadv.sequential import SequentialTest

    for bad in ({"looks": (0, 10)}, {"looks": (10, 5)}, {"looks": (10, 20), "levels": (0.006, 0.006)},
                {"looks": (10, 20), "levels": (0.01,)}, {"looks": (10, 20), "levels": (0.0, 0.005)},
                {"radii": (-0.1, 0.5)}, {"radii": (float("inf"),)}):
        with pytest.raises(SmoothAdvError):
            SequentialConfig(0.25, 0.01, **bad)
    assert SequentialConfig(0.25, 0.01, looks=(10, 20), levels=(0.005, 0.005)).schedule.levels == (0.005, 0.005)
    for sigma, alpha in ((0.0, 0.01), (-1.0, 0.01), (float("inf"), 0.01), (True, 0.01), (0.25, 0.0), (0.25, 1.0)):
        with pytest.raises(SmoothAdvError):
            SequentialConfig(sigma, alpha)
    test = SequentialTest(SequentialConfig(0.25, 0.01, looks=(10, 20), policy="full"))
    assert test.next_segments() == (10,)
    with pytest.raises(SmoothAdvError):
        test.update_segments([3, 4])
    test.update_segments([10])
    test.update(10)
    assert test.done and test.next_segments() == () and test.next_draw() == 0
    config = SequentialConfig(0.25, 0.01, looks=(8,), policy="full")
    smooth = Smooth(VoteScript([0] * 100, 3), 3, 0.25)
    assert certify_sequential_many(smooth, [], config, batch_size=4) == []
    for kwargs in ({"labels": [3]}, {"labels": [-1]}, {"labels": [0, 1]}, {"n0": 0}, {"batch_size": 0},
                   {"selection_generators": [None, None]}):
        with pytest.raises(SmoothAdvError):
            certify_sequential_many(smooth, [image()], config, **{"batch_size": 4, **kwargs})
    with pytest.raises(SmoothAdvError, match="sigma"):
        certify_sequential_many(Smooth(VoteScript([0] * 10, 3), 3, 0.5), [image()], config, batch_size=4)


def test_budget_schedules_and_the_cap() -> None:
    from smoothadv.errors import SmoothAdvError

    for n in (16, 100, 1000, 2000, 100_000):
        config = SequentialConfig.for_budget(0.25, n, 0.001, policy="full")
        looks = config.schedule.looks
        assert looks[-1] == n and list(looks) == sorted(set(looks))
        assert config.max_radius == pytest.approx(0.25 * norm.ppf(cp_lower(n, n, 0.001 / len(looks))), rel=1e-9)
    assert SequentialConfig.for_budget(0.25, 1000).base[0] == 16
    assert SequentialConfig.for_budget(0.25, 4096).base[0] == 64
    for n in (15, 16.0, True):
        with pytest.raises(SmoothAdvError):
            SequentialConfig.for_budget(0.25, n)  # type: ignore[arg-type]


def test_seeded_sequential_certify_is_reproducible_and_streams_are_separate() -> None:
    """One generator seeds two independent streams (selection, estimation): the same seed gives the same
    certificate, another seed another one, and the selection samples are not reused for estimation."""
    from smoothadv.sequential import certify_sequential
    from smoothadv.validity import Problem

    problem = Problem("three-seeded", (1, 2, 2), 0.25, (0.0, 0.2), -0.04, seed=3)
    model, x = problem.tensors()
    smooth = Smooth(model, 3, 0.25)
    config = SequentialConfig(0.25, 0.1, looks=(30, 60), policy="full", selection="fixed")
    one = certify_sequential(smooth, x, config, batch_size=16, n0=10, generator=torch.Generator().manual_seed(5))
    two = certify_sequential(smooth, x, config, batch_size=16, n0=10, generator=torch.Generator().manual_seed(5))
    assert one == two and one.n0 == 10 and one.n == 60
    others = {certify_sequential(smooth, x, config, batch_size=16, n0=10, generator=torch.Generator().manual_seed(s))
              .count for s in range(6, 12)}
    assert len(others) > 1


def reference_draws(first: int, last: int) -> list[int]:
    """Draw ends from the betting module's specification: `first` votes at a time up to coarse = 16 first, then
    coarse up to 8 coarse, then the largest power-of-two multiple of coarse at most an eighth of the votes so far;
    never past `last`."""
    coarse, ends, n = 16 * first, [], 0
    while n < last:
        if n < coarse:
            n += first
        elif n < 8 * coarse:
            n += coarse
        else:
            multiple = 1
            while coarse * multiple * 2 <= n / 8:
                multiple *= 2
            n += coarse * multiple
        n = min(n, last)
        ends.append(n)
    return ends


@pytest.mark.parametrize("first, last", [(4, 100), (8, 5000), (64, 111_616)])
def test_betting_draws_checks_and_forecasts_follow_the_specification(first: int, last: int) -> None:
    config = BettingConfig(0.5, 0.001, first=first, last=last, policy="grid")
    assert list(config.draws) == reference_draws(first, last)
    step, coarse = first // 4, 16 * first
    checks, start = [], 0
    for end in config.draws:
        within = config.checks(start, end)
        assert within[-1] == end and list(within) == sorted(set(within))
        for a, b in zip((start, *within), within):
            assert b - a == min(end, (a // step + 1) * step if a < coarse else (a // coarse + 1) * coarse) - a
            assert b - a <= (step if a < coarse else coarse)
        checks += within
        start = end
    assert checks[-1] == last
    expected_forecasts = {last} | {4 * first * 2 ** j for j in range(40) if 4 * first * 2 ** j < last}
    assert set(config.forecasts) == expected_forecasts


def test_betting_last_size_keeps_the_doubling_schedules_cap() -> None:
    """The last size is the smallest multiple of coarse at which unanimous votes reach, with the final look at
    eta alpha, the cap of the doubling looks 1024..131072 at alpha / 8; with eta = 0 it is 131072."""
    from smoothadv.betting import betting_last

    alpha, share, coarse = 0.001, 0.5, 16 * 64
    cap = cp_lower(131072, 131072, alpha / 8)
    last = betting_last(alpha, share, coarse)
    assert last % coarse == 0
    assert cp_lower(last, last, alpha * share) >= cap > cp_lower(last - coarse, last - coarse, alpha * share)
    assert last == 111_616 == BettingConfig(0.5, alpha).schedule.last
    assert betting_last(alpha, 0.0, coarse) == 131072
    pure = BettingConfig(0.5, 0.01, final_share=0.0, first=8, last=512)
    assert pure.threshold == pytest.approx(math.log(100.0), rel=1e-12)


def test_betting_config_refuses_what_would_break_ville() -> None:
    from smoothadv.errors import SmoothAdvError

    for bad in ({"first": 6}, {"first": 2}, {"bets": ((0.5, 0.5), (0.1, 0.4))}, {"bets": ((1.5, 1.0),)},
                {"bets": ((0.0, 1.0),)}, {"bets": ((0.5, 1.2), (0.1, -0.2))}, {"bets": ()}, {"last": 4}):
        with pytest.raises(SmoothAdvError):
            BettingConfig(0.5, 0.01, **{"first": 8, **bad})
    for sigma, alpha in ((0.0, 0.01), (0.5, 0.0), (0.5, 1.0)):
        with pytest.raises(SmoothAdvError):
            BettingConfig(sigma, alpha)
    assert BettingConfig(0.5, 0.01, first=8, last=8).draws == (8,)


def test_default_doubling_looks_are_cohens_scale() -> None:
    from smoothadv.sequential import doubling_looks

    assert doubling_looks() == (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


def test_fitted_schedule_edge_cases_spend_exactly_alpha() -> None:
    """Without a top share the earlier looks split 1 - last_share
    equally; the last look is where unanimous votes at alpha * last_share reach the base's cap; bad shares are
    refused."""
    from smoothadv.errors import SmoothAdvError

    base = (1024, 2048, 4096, 8192)
    looks, levels = fitted_schedule(0.5, 0.01, (0.25, 0.5), base=base, last_share=0.5, top_share=0.0)
    assert sum(levels) == pytest.approx(0.01, rel=1e-12) and levels[-1] == pytest.approx(0.005, rel=1e-12)
    assert all(level == pytest.approx(0.005 / (len(looks) - 1), rel=1e-12) for level in levels[:-1])
    cap = cp_lower(base[-1], base[-1], 0.01 / len(base))
    last = looks[-1]
    assert last % base[0] == 0 and cp_lower(last, last, 0.005) >= cap > cp_lower(last - 1024, last - 1024, 0.005)
    looks, levels = fitted_schedule(0.5, 0.01, (0.25, 0.5, 1.0), base=base)
    assert sum(levels) == pytest.approx(0.01, rel=1e-12)
    for last_share, top_share in ((0.0, 0.1), (1.0, 0.0), (0.5, 0.5), (0.5, -0.1)):
        with pytest.raises(SmoothAdvError):
            fitted_schedule(0.5, 0.01, (0.5,), base=base, last_share=last_share, top_share=top_share)
    # no radius to certify: no look is added for the largest one, whatever its share (the schedule of no top share)
    assert fitted_schedule(0.5, 0.01, (), base=base) == fitted_schedule(0.5, 0.01, (), base=base, top_share=0.0)
    assert fitted_schedule(0.5, 0.01, (), base=base) != fitted_schedule(0.5, 0.01, (1.0,), base=base)



def test_a_small_budget_never_draws_more_than_n() -> None:
    """`SequentialConfig.for_budget` promises a test that never draws more than n estimation samples (as Cohen's
    CERTIFY with n), with the default grid policy; and `fitted_schedule` on a one-look base spends all of alpha on
    that look ("a one-look base: nothing to spend early")."""
    for n in (16, 20, 31, 32, 40, 63):
        assert SequentialConfig.for_budget(0.25, n).schedule.looks[-1] <= n, n
    assert fitted_schedule(0.5, 0.001, (0.5,), base=(1000,)) == ((1000,), (0.001,))
