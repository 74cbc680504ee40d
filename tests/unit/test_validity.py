"""The statistical validity suite: exact answers are right, and every certification mode keeps its promise.

Tolerance used throughout: with T trials of a procedure whose failure probability is q <= alpha, the failure
count is Binomial(T, q); a check passes when the count is at most the 0.999 quantile of Binomial(T, alpha)
(false-alarm probability <= 1e-3 per check) and, where the exact q is known, when the two-sided binomial test
of the count against q has p-value >= 1e-3. Seeds are fixed, so the outcome is deterministic.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, multinomial, norm

from smoothadv import Smooth
from smoothadv.stats import clopper_pearson_lower
from smoothadv.validity import (
    Problem,
    binomial_tolerance,
    exact_certify_failure,
    exact_predict_failure,
    fixed_n_mode,
    point_estimate_control,
    predict_mode,
    run_problem,
    run_suite,
    selection_probabilities,
    standard_problems,
    summarize,
    worst_case_p,
)


def test_selection_probabilities_match_enumeration() -> None:
    p = np.array([0.2, 0.35, 0.3, 0.15])
    n0 = 7
    brute = np.zeros(4)
    for counts in itertools.product(range(n0 + 1), repeat=3):
        last = n0 - sum(counts)
        if last < 0:
            continue
        full = [*counts, last]
        brute[int(np.argmax(full))] += multinomial.pmf(full, n0, p)  # np.argmax: first maximum, like torch
    np.testing.assert_allclose(selection_probabilities(p, n0), brute, atol=1e-12)


def test_linear_problem_has_closed_form_answers() -> None:
    problem = Problem("lin", (1, 4, 4), 0.25, (0.0,), -0.3)
    assert problem.g == 0
    assert problem.p_a == pytest.approx(norm.cdf(0.3 / 0.25), abs=1e-12)
    assert problem.true_radius == pytest.approx(0.3, abs=1e-10)
    assert problem.bound_radius == pytest.approx(0.3, abs=1e-10)
    model, x = problem.tensors()
    assert x.shape == (1, 4, 4) and float(x.min()) >= 0 and float(x.max()) <= 1
    # the base classifier really is the hyperplane at distance 0.3: moving x by 0.3 - eps along u keeps class 0
    u = model.u.float().view(1, 4, 4)
    logits = model(torch.stack([x, x + 0.299 * u, x + 0.301 * u]))
    assert logits.argmax(1).tolist() == [0, 0, 1]


def test_multiclass_true_radius_is_distance_to_where_g_changes() -> None:
    thresholds = (-0.75, 0.75)
    problem = Problem("3c", (1, 4, 4), 0.25, thresholds, 0.4)
    radius = problem.true_radius
    # g = class 1 at s = 0.4; it changes to class 2 exactly radius further right, and nowhere closer on the left
    assert problem.g == 1
    right = Problem("r", (1, 4, 4), 0.25, thresholds, 0.4 + radius)
    probs = right.probabilities()
    assert probs[1] == pytest.approx(probs[2], abs=1e-10)
    for s in np.linspace(0.4 - radius, 0.4 + radius * (1 - 1e-6), 200):
        assert Problem("s", (1, 4, 4), 0.25, thresholds, float(s)).g == 1
    assert radius >= problem.bound_radius  # Cohen's Theorem 1 radius is a lower bound on the true one


def test_exact_certify_failure_matches_direct_sum_and_is_below_alpha() -> None:
    n, n0, alpha = 50, 1, 0.1
    problem = Problem("lin", (1, 1, 1), 1.0, (0.0,), float(norm.ppf(0.8)))  # g = 1, p_A = 0.8
    # n0 = 1: class 1 is selected with probability 0.8; class 0 (p = 0.2) almost never reaches CP >= 1/2
    k = np.arange(n + 1)
    lower = np.array([clopper_pearson_lower(int(i), n, alpha) for i in k])
    direct = 0.8 * binom.pmf(k, n, 0.8)[lower > 0.8].sum() + 0.2 * binom.pmf(k, n, 0.2)[lower >= 0.5].sum()
    assert exact_certify_failure(problem, n0, n, alpha) == pytest.approx(direct, rel=1e-9)
    assert direct <= alpha
    hard = worst_case_p(100, alpha, 10)
    hard_problem = Problem("h", (1, 1, 1), 1.0, (0.0,), -float(norm.ppf(hard)))
    assert 0.09 < exact_certify_failure(hard_problem, 10, 100, alpha) <= alpha  # the check has power


def test_exact_predict_failure_binary_by_hand() -> None:
    n, alpha = 30, 0.1
    problem = Problem("lin", (1, 1, 1), 1.0, (0.0,), 0.05)  # g = 1, p_1 just above 1/2
    p_wrong = 1 - problem.p_a
    from scipy.stats import binomtest
    direct = sum(binom.pmf(k, n, p_wrong) for k in range(n + 1) if k > n - k and binomtest(k, n).pvalue <= alpha)
    assert exact_predict_failure(problem, n, alpha) == pytest.approx(direct, rel=1e-9)
    assert direct <= alpha / 2 + 1e-3


@pytest.mark.slow
def test_suite_certify_and_predict_keep_alpha_and_control_is_caught() -> None:
    results = run_suite(trials=500, alpha=0.1, n=100, n0=10, seed=0, quick=True)
    assert all(r.passed for r in results), [(r.problem, r.mode, r.checked, r.allowed) for r in results
                                            if not r.passed]
    summary = summarize(results)
    assert summary["controls"] == summary["controls_detected"] == 2  # point estimate; betting at 2 alpha
    certify = [r for r in results if r.kind == "certify" and not r.control]
    predict = [r for r in results if r.kind == "predict"]
    assert len(certify) == 7 + 2 * 6 and len(predict) == 3  # fixed-n on 7 inputs; packed, 4 sequential, betting on 2
    pooled = sum(r.checked for r in certify) / sum(r.trials for r in certify)
    assert pooled <= alpha_quantile(sum(r.trials for r in certify), 0.1)
    modes = {r.mode for r in certify}
    assert any(m.startswith("certify_many") for m in modes)
    assert {"full", "grid", "full label"} <= {m.split(" looks")[0][len("sequential "):] for m in modes
                                               if m.startswith("sequential")}
    spent = {m for m in modes if "alpha spending" in m}  # the default schedule: unequal levels, checked exactly too
    assert spent == {"sequential grid looks=fitted (alpha spending)", "sequential full looks=fitted (alpha spending)"}
    for r in certify:
        if r.mode.startswith("certify"):
            assert 0.09 < r.exact_rate <= 0.1  # hardest inputs for fixed n: failures really are observable
        elif r.exact_rate is not None:
            assert 0.005 < r.exact_rate <= 0.1  # sequential / betting, policy full: union bound, Ville
        assert 0.6 < r.tightness < 1.0
    assert binomial_tolerance(600, 0.1) == int(binom.ppf(0.999, 600, 0.1))


def alpha_quantile(trials: int, alpha: float) -> float:
    return binom.ppf(0.999, trials, alpha) / trials


def test_betting_at_doubled_alpha_is_detected_against_its_claimed_exact_rate() -> None:
    # the betting test's factor-2 slip (wealth threshold 1 / (2 alpha)) fails about twice as often as the exact
    # failure probability of the test it claims to be; the suite flags it (and the sound test passes)
    from smoothadv.validity import betting_double_alpha_control, betting_modes

    n, n0, alpha = 100, 10, 0.1
    problem = standard_problems(n, alpha, n0, quick=True)[0]
    slipped = run_problem(problem, betting_double_alpha_control(alpha, n0, n), 320, alpha, seed=4)
    assert slipped.control and slipped.passed and slipped.consistency_pvalue < 1e-4
    assert slipped.checked / slipped.trials > 1.8 * slipped.exact_rate
    sound = run_problem(problem, betting_modes(alpha, n0, n, quick=True)[0], 320, alpha, seed=4)
    assert sound.passed and sound.exact_rate <= alpha


def test_a_certifier_with_doubled_alpha_is_detected() -> None:
    # power: certify at 2 alpha but claim alpha -> its invalid rate (~0.2) exceeds the tolerance for alpha
    n, n0, alpha = 100, 10, 0.1
    problem = standard_problems(n, alpha, n0, quick=True)[0]
    mode = fixed_n_mode(n0, n, 2 * alpha)
    mode.exact = None
    result = run_problem(problem, mode, 600, alpha, seed=5)
    assert not result.passed and result.checked > result.allowed


def test_point_estimate_control_fails_and_predict_passes_on_multiclass() -> None:
    problem = Problem("3c", (1, 4, 4), 0.25, (-0.75, 0.75), 0.45)
    control = run_problem(problem, point_estimate_control(10, 100, 0.1), 300, 0.1, seed=1)
    assert control.passed and control.checked > 100  # "passed" for a control means: detected as unsound
    pred = run_problem(problem, predict_mode(100, 0.1), 300, 0.1, seed=2)
    assert pred.passed and pred.exact_rate is not None and pred.exact_rate < 1e-3


def test_linear_counts_follow_the_binomial_law() -> None:
    # the vote count of a linear classifier is Binomial(n, Phi(margin / sigma)) exactly: z-test at 4.5 sd
    problem = Problem("lin", (3, 8, 8), 0.5, (0.0,), 0.2)
    model, x = problem.tensors()
    smooth = Smooth(model, 2, 0.5)
    n = 200_000
    k = int(smooth.sample_counts(x, n, 20_000, generator=torch.Generator().manual_seed(11))[1])
    p = problem.p_a
    assert abs(k - n * p) <= 4.5 * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("levels", [None, (0.01, 0.03, 0.06)])
def test_exact_sequential_failure_matches_monte_carlo_on_counts(levels) -> None:
    from smoothadv.validity import clopper_pearson_lower_all, exact_sequential_failure

    problem = Problem("lin", (1, 1, 1), 1.0, (0.0,), float(norm.ppf(0.87)))
    looks, alpha = (25, 50, 100), 0.1
    per_look = levels or (alpha / 3,) * 3  # None: the equal split alpha / K
    rng = np.random.default_rng(0)
    trials = 100_000
    steps = np.stack([rng.binomial(25, 0.87, trials), rng.binomial(25, 0.87, trials), rng.binomial(50, 0.87, trials)])
    sums = np.cumsum(steps, axis=0)
    best = np.max([clopper_pearson_lower_all(n, per_look[j])[sums[j]] for j, n in enumerate(looks)], axis=0)
    rate = float(np.mean(best > 0.87))
    exact = exact_sequential_failure(problem, None, looks, alpha, levels=levels)
    assert abs(rate - exact) <= 4.5 * math.sqrt(exact * (1 - exact) / trials)
    assert exact <= sum(per_look) == pytest.approx(alpha)


@pytest.mark.slow
def test_default_sequential_schedule_at_the_papers_scale_fails_at_most_alpha_exactly() -> None:
    # alpha = 0.001 and the grid's default schedule (sigma = 0.5: nine looks up to 111,616, alpha spending), label
    # mode, policy full (every other policy stops on a subset of these looks): the exact probability that the best
    # bound exceeds p_A. Below alpha, yet not vacuous; with alpha at every look (no split) it exceeds alpha.
    from smoothadv.sequential import SequentialConfig
    from smoothadv.validity import exact_sequential_failure

    config = SequentialConfig(0.5)
    assert config.schedule.looks[-1] == 111616 and len(config.schedule.looks) == 9
    for p in (0.99, 0.9999):
        problem = Problem("lin", (1, 1, 1), 0.5, (0.0,), 0.5 * float(norm.ppf(p)))
        assert problem.p_a == pytest.approx(p)
        fail = exact_sequential_failure(problem, None, config.schedule.looks, 0.001, levels=config.schedule.levels)
        assert 1e-4 < fail <= 0.001
    problem = Problem("lin", (1, 1, 1), 0.5, (0.0,), 0.5 * float(norm.ppf(0.99)))
    unsplit = exact_sequential_failure(problem, None, config.schedule.looks, 0.009, levels=(0.001,) * 9)
    assert unsplit > 0.004


@pytest.mark.parametrize("alpha", [0.1, 1e-3, 1e-12, 1e-39, 1e-40, 1e-41, 1e-200, 1e-300])
def test_vectorized_clopper_pearson_equals_stats_including_extreme_alpha(alpha) -> None:
    from smoothadv.validity import clopper_pearson_lower_all

    for n in (1, 2, 7, 50, 300):
        want = [clopper_pearson_lower(k, n, alpha) for k in range(n + 1)]
        assert clopper_pearson_lower_all(n, alpha).tolist() == want  # bit for bit, fallback branch included


def test_modes_carry_no_hidden_state_and_label_mode_is_told_each_problems_class() -> None:
    from smoothadv.validity import sequential_modes

    modes = [fixed_n_mode(5, 40, 0.1), predict_mode(40, 0.1), point_estimate_control(5, 40, 0.1),
             *sequential_modes(0.1, 5, 40)]
    assert all(not vars(mode.run) for mode in modes)  # no function attributes
    label = next(mode for mode in modes if " label " in mode.name)
    for s in (-0.4, 0.4):  # g = 0, then g = 1, with the same mode object
        problem = Problem("lin", (1, 4, 4), 0.25, (0.0,), s)
        result = run_problem(problem, label, 16, 0.1, seed=3)
        assert result.invalid == 0 and result.abstained < 16  # it certified g itself, never the other class
