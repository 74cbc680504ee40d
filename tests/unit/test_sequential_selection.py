"""Adaptive class selection (`sequential.selection_step`): 16 selection votes at a time up to n0, stop when unanimous.

The rule only reads the selection votes, drawn from a noise stream independent of the estimation samples, so the
test of the chosen class keeps its level; these tests check the rule itself, that it changes nothing but the
selection samples when it stops early, that it is Cohen's argmax otherwise, and its exact failure probability.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import multinomial, norm
from torch import nn

from smoothadv import Smooth, SmoothAdvError
from smoothadv.betting import BettingConfig
from smoothadv.sequential import (
    SELECTION_CHUNK,
    SequentialConfig,
    certify_sequential_many,
    select_classes,
    selection_step,
)
from smoothadv.smoothing import PackedSampler
from smoothadv.validity import (
    ADAPTIVE_N0,
    Problem,
    adaptive_selection_modes,
    chosen_class_probabilities,
    exact_betting_failure,
    exact_sequential_failure,
    run_problem,
    selection_probabilities,
    standard_problems,
    suite_betting_config,
)


class Constant(nn.Module):
    """f(x) = `label` whatever x."""

    def __init__(self, label: int, classes: int = 3) -> None:
        super().__init__()
        self.label, self.classes = label, classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(x), self.classes)
        out[:, self.label] = 1.0
        return out


def gens(seed: int, count: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + k) for k in range(count)]


def test_selection_step_values() -> None:
    assert SELECTION_CHUNK == 16
    assert selection_step([0, 0, 0], 100, "adaptive") == -16       # first chunk
    assert selection_step([0, 16, 0], 100, "adaptive") == 1        # unanimous: stop
    assert selection_step([1, 15, 0], 100, "adaptive") == -84      # split: the rest of n0 at once
    assert selection_step([30, 40, 30], 100, "adaptive") == 1      # Cohen's argmax at n0
    assert selection_step([50, 50, 0], 100, "adaptive") == 0       # ties to the lowest index, as torch.argmax
    assert selection_step([0, 0, 0], 100, "fixed") == -100
    assert selection_step([0, 0, 0], 10, "adaptive") == -10        # n0 below a chunk: all of it
    assert selection_step([0, 0, 10], 10, "adaptive") == 2
    with pytest.raises(SmoothAdvError, match="selection must be one of adaptive, fixed"):
        SequentialConfig(0.25, selection="greedy")
    with pytest.raises(SmoothAdvError, match="selection must be one of adaptive, fixed"):
        BettingConfig(0.25, selection="greedy")
    assert SequentialConfig(0.25).selection == BettingConfig(0.25).selection == "adaptive"


@pytest.mark.parametrize("betting", [False, True])
def test_constant_classifier_stops_at_the_first_chunk_with_the_fixed_paths_certificate(betting) -> None:
    smooth = Smooth(Constant(2), 3, 0.25)
    xs = [torch.rand(1, 4, 4) for _ in range(3)]
    make = BettingConfig if betting else SequentialConfig
    certs = {}
    for selection in ("adaptive", "fixed"):
        config = make(0.25, radii=(0.5,), selection=selection)
        certs[selection] = certify_sequential_many(smooth, xs, config, batch_size=64, n0=100,
                                                   selection_generators=gens(0, 3), estimation_generators=gens(10, 3))
    for adaptive, fixed in zip(certs["adaptive"], certs["fixed"], strict=True):
        assert (adaptive.n0, fixed.n0) == (16, 100)
        assert adaptive.samples == fixed.samples - 84
        assert (adaptive.prediction, adaptive.radius, adaptive.p_lower, adaptive.count, adaptive.n) == \
               (fixed.prediction, fixed.radius, fixed.p_lower, fixed.count, fixed.n)
        assert adaptive.prediction == 2 and adaptive.radius >= 0.5


def test_chosen_class_is_cohens_argmax_unless_the_first_chunk_is_unanimous() -> None:
    # a 3-class interval classifier with split votes (p about 0.04, 0.94, 0.02): some first chunks agree, some not
    problem = Problem("3-class", (1, 4, 4), 0.25, (-0.45, 0.5), 0.0, seed=7)
    model, x = problem.tensors()
    smooth = Smooth(model, 3, 0.25)
    sampler = PackedSampler(smooth.sampler)
    count = 64
    xs = [x] * count
    adaptive, used = select_classes(sampler, xs, gens(100, count), 100, "adaptive", 32)
    first = [smooth.sampler.counts(x, 16, 32, g) for g in gens(100, count)]
    full = [smooth.sampler.counts(x, 100, 32, g) for g in gens(100, count)]  # the same selection streams
    cohen, cohen_used = select_classes(sampler, xs, gens(100, count), 100, "fixed", 32)
    assert cohen == [int(c.argmax()) for c in full] and cohen_used == [100] * count
    unanimous = [int(c.max()) == 16 for c in first]
    assert 5 < sum(unanimous) < count - 5  # both branches are exercised
    for k in range(count):
        if unanimous[k]:
            assert (adaptive[k], used[k]) == (int(first[k].argmax()), 16)
        else:
            assert (adaptive[k], used[k]) == (cohen[k], 100)
    # stopping early never picked a class other than Cohen's here (the first 16 votes were unanimous for it)
    assert adaptive == cohen


def test_chosen_class_probabilities_match_enumeration() -> None:
    p = np.array([0.3, 0.6, 0.1])
    n0 = 20
    brute = np.zeros(3)
    for head in itertools.product(range(17), repeat=2):
        first = [*head, 16 - sum(head)]
        if first[2] < 0:
            continue
        w = multinomial.pmf(first, 16, p)
        if max(first) == 16:
            brute[int(np.argmax(first))] += w
            continue
        for tail in itertools.product(range(5), repeat=2):
            rest = [*tail, 4 - sum(tail)]
            if rest[2] < 0:
                continue
            brute[int(np.argmax(np.add(first, rest)))] += w * multinomial.pmf(rest, 4, p)
    np.testing.assert_allclose(chosen_class_probabilities(p, n0, "adaptive"), brute, atol=1e-12)
    np.testing.assert_allclose(chosen_class_probabilities(p, n0, "fixed"), selection_probabilities(p, n0))
    np.testing.assert_allclose(chosen_class_probabilities(p, 16, "adaptive"), selection_probabilities(p, 16))


@pytest.mark.parametrize("alpha", [0.1, 0.001])
def test_adaptive_selection_keeps_alpha_exactly_on_the_oracles(alpha) -> None:
    # exact failure probability of policy full (every other policy stops on a subset of its checks) with the
    # adaptive rule's class probabilities, on the suite's problems: at most alpha, as with Cohen's selection
    n = 100
    for problem in standard_problems(n, alpha, ADAPTIVE_N0, quick=True):
        spending = SequentialConfig(problem.sigma, alpha, looks=(25, 50, 100), policy="full")
        schedule = spending.schedule
        fail = exact_sequential_failure(problem, ADAPTIVE_N0, schedule.looks, alpha, levels=schedule.levels,
                                        selection="adaptive")
        betting = exact_betting_failure(problem, ADAPTIVE_N0, suite_betting_config(problem.sigma, alpha, n))
        assert 0 <= fail <= alpha and 0 <= betting <= alpha, problem.name


def test_validity_suite_adaptive_modes_pass_against_their_exact_rates() -> None:
    alpha, n = 0.1, 100
    problems = standard_problems(n, alpha, ADAPTIVE_N0, quick=True)
    three = next(p for p in problems if p.name.startswith("3-class"))
    for mode in adaptive_selection_modes(alpha, n):
        assert "adaptive selection n0=100" in mode.name
        result = run_problem(three, mode, 300, alpha, seed=5)
        assert result.passed and result.exact_rate is not None and 0.005 < result.exact_rate <= alpha


def test_the_split_vote_problem_has_both_kinds_of_first_chunk() -> None:
    # the problem of the seeded check: a first chunk is unanimous with probability sum_k p_k^16, about 0.38
    p = Problem("3-class", (1, 4, 4), 0.25, (-0.45, 0.5), 0.0, seed=7).probabilities()
    assert p[1] == pytest.approx(norm.cdf(0.5 / 0.25) - norm.cdf(-0.45 / 0.25))
    assert 0.3 < float((p ** 16).sum()) < 0.45
