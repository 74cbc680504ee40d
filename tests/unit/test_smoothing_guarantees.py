"""CERTIFY, PREDICT and certify_many where their guarantees break: three or more classes, ties, near-ties,
which samples choose the class, and the exact law of the result.

Two kinds of base classifier:

- `VoteScript` ignores its input and votes a scripted sequence of classes, one per noisy sample in the order
  the sampler draws them. The vote counts are then chosen by the test, so the decision rule of Cohen,
  Rosenfeld & Kolter (ICML 2019, Algorithms PREDICT and CERTIFY) is checked exactly against a reference
  written here from the paper (NumPy argmax, SciPy's Beta quantile, SciPy's binomial test), on count vectors
  with ties and near-ties, and the selection samples (the first n0 of each input's stream) can be made to
  disagree with the estimation samples.
- `validity.IntervalClassifier` (three classes along one direction): the class probabilities are known in
  closed form, so the law of CERTIFY's and PREDICT's output is known exactly (computed here by enumeration,
  independently of the library) and seeded runs are compared with it by exact binomial/multinomial tests.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import beta, binom, binomtest, chi2, multinomial, norm
from torch import Tensor, nn

from smoothadv import ABSTAIN, Smooth
from smoothadv.validity import Problem

# ------------------------------------------------------------------ an input-ignoring, scripted base classifier


class VoteScript(nn.Module):
    """Votes script[0], script[1], ... for the successive rows it is given (one-hot logits), whatever the input."""

    def __init__(self, script: list[int], num_classes: int) -> None:
        super().__init__()
        self.script = list(script)
        self.num_classes = num_classes
        self.position = 0

    def forward(self, x: Tensor) -> Tensor:
        rows = x.shape[0]
        assert self.position + rows <= len(self.script), "the sampler drew more samples than scripted"
        votes = torch.tensor(self.script[self.position:self.position + rows])
        self.position += rows
        return nn.functional.one_hot(votes, self.num_classes).float()


def script_for(counts: np.ndarray, rng: np.random.Generator) -> list[int]:
    """A shuffled sequence of votes with the given per-class counts."""
    votes = np.repeat(np.arange(len(counts)), counts)
    rng.shuffle(votes)
    return votes.tolist()


def image() -> Tensor:
    return torch.full((1, 2, 2), 0.5)


# ------------------------------------------------------------------ references written from the paper


def reference_certify(selection: np.ndarray, estimation: np.ndarray, n: int, alpha: float, sigma: float):
    """Cohen et al.'s CERTIFY on given counts: c = argmax of the selection counts (first index on ties, as
    NumPy), p_lower = the alpha quantile of Beta(k, n - k + 1) with k the estimation count of c (0 if k = 0),
    abstain if p_lower < 1/2, else radius sigma Phi^-1(p_lower)."""
    c = int(np.argmax(selection))
    k = int(estimation[c])
    lower = 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))
    if lower < 0.5:
        return ABSTAIN, 0.0, c, lower, k
    return c, sigma * float(norm.ppf(lower)), c, lower, k


def reference_predict(counts: np.ndarray, alpha: float) -> int:
    """Cohen et al.'s PREDICT: the two largest counts n_A >= n_B; abstain unless the two-sided binomial test of
    n_A successes in n_A + n_B trials at 1/2 has p-value <= alpha; else the class of n_A."""
    order = np.argsort(-counts, kind="stable")
    a, b = int(counts[order[0]]), int(counts[order[1]])
    if a + b == 0 or binomtest(a, a + b, 0.5).pvalue > alpha:
        return ABSTAIN
    return int(order[0])


def random_counts(rng: np.random.Generator, total: int, classes: int, tie: bool) -> np.ndarray:
    """Counts summing to `total` over `classes`; with `tie`, the two largest are made equal (or as near as the
    total allows)."""
    counts = rng.multinomial(total, rng.dirichlet(np.full(classes, 0.7)))
    if tie:
        order = np.argsort(-counts, kind="stable")
        a, b = order[0], order[1]
        both = counts[a] + counts[b]
        counts[a], counts[b] = both - both // 2, both // 2
        if rng.random() < 0.5:  # the tie in the other order: the lower index holds the larger count or not
            counts[a], counts[b] = counts[b], counts[a]
    return counts


# ------------------------------------------------------------------ CERTIFY's decision rule, exactly


@pytest.mark.parametrize("classes", [3, 4, 7])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_certify_decides_from_selection_class_and_estimation_count(classes: int, batch: int) -> None:
    rng = np.random.default_rng(classes * 100 + batch)
    sigma, alpha = 0.37, 0.01
    for trial in range(12):
        n0, n = int(rng.integers(1, 20)), int(rng.integers(5, 80))
        selection = random_counts(rng, n0, classes, tie=trial % 3 == 0)
        estimation = random_counts(rng, n, classes, tie=trial % 4 == 0)
        if trial % 2:  # estimation concentrated on the selected class: certificates are issued
            estimation = np.zeros(classes, dtype=int)
            c = int(np.argmax(selection))
            estimation[c] = n - int(rng.integers(0, 3))
            estimation[(c + 1) % classes] = n - estimation[c]
        model = VoteScript(script_for(selection, rng) + script_for(estimation, rng), classes)
        cert = Smooth(model, classes, sigma).certify(image(), n0, n, alpha, batch)
        prediction, radius, c, lower, k = reference_certify(selection, estimation, n, alpha, sigma)
        assert model.position == n0 + n
        assert (cert.prediction, cert.tested_class, cert.count, cert.n0, cert.n) == (prediction, c, k, n0, n)
        assert cert.p_lower == pytest.approx(lower, rel=1e-9, abs=1e-12)
        assert cert.radius == pytest.approx(radius, rel=1e-9, abs=1e-12)
        assert tuple(cert) == (cert.prediction, cert.radius) and cert.samples == n0 + n
        assert cert.abstained == (prediction == ABSTAIN)


def test_the_selection_samples_choose_the_class_and_only_the_estimation_samples_bound_it() -> None:
    """Selection votes all for class 2, estimation votes 95% for class 0: Cohen's CERTIFY must test class 2 on the
    estimation samples (5 votes of 100) and abstain. Choosing the class from the estimation samples would
    certify class 0; bounding with the selection votes would certify class 2."""
    n0, n = 10, 100
    script = [2] * n0 + [0] * 95 + [2] * 5
    for batch in (3, 10, 11, 1000):  # pieces that end inside, at and past the selection samples
        cert = Smooth(VoteScript(script, 3), 3, 0.5).certify(image(), n0, n, 0.001, batch)
        assert (cert.prediction, cert.tested_class, cert.count, cert.radius) == (ABSTAIN, 2, 5, 0.0)
    # the estimation votes decide the bound: the same selection with a unanimous estimation certifies class 2
    cert = Smooth(VoteScript([2] * n0 + [2] * n, 3), 3, 0.5).certify(image(), n0, n, 0.001, 7)
    assert (cert.prediction, cert.count) == (2, n)
    assert cert.p_lower == pytest.approx(0.001 ** (1 / n), rel=1e-12)
    assert cert.radius == pytest.approx(0.5 * norm.ppf(0.001 ** (1 / n)), rel=1e-12)


def test_selection_ties_go_to_the_lowest_class() -> None:
    """A tie among the selection votes is broken towards the lowest index (Cohen's argmax): classes 1 and 2 tie
    at 4 votes each; class 1 is tested although class 2 has every estimation vote."""
    script = [2, 1, 2, 1, 0, 2, 1, 2, 1] + [2] * 50
    cert = Smooth(VoteScript(script, 3), 3, 0.25).certify(image(), 9, 50, 0.01, 4)
    assert (cert.tested_class, cert.count, cert.prediction) == (1, 0, ABSTAIN)
    assert cert.p_lower == 0.0


def test_certify_abstains_exactly_below_one_half() -> None:
    """Around the count where the Clopper-Pearson bound crosses 1/2: one vote fewer abstains, the critical count
    certifies with a radius just above 0 (3 classes, the other votes split between the two others)."""
    n, alpha, sigma = 200, 0.05, 0.5
    critical = next(k for k in range(n + 1) if beta.ppf(alpha, k, n - k + 1) >= 0.5)
    for k, certified in ((critical - 1, False), (critical, True)):
        others = n - k
        script = [1] * 5 + [1] * k + [0] * (others // 2) + [2] * (others - others // 2)
        cert = Smooth(VoteScript(script, 3), 3, sigma).certify(image(), 5, n, alpha, 64)
        assert cert.count == k and cert.tested_class == 1
        assert (cert.prediction == 1) == certified
        if certified:
            lower = beta.ppf(alpha, k, n - k + 1)
            assert 0.5 <= cert.p_lower == pytest.approx(lower, rel=1e-9)
            assert 0.0 <= cert.radius == pytest.approx(sigma * norm.ppf(lower), rel=1e-9, abs=1e-15)
            assert cert.radius < 0.05
        else:
            assert cert.p_lower < 0.5 and cert.radius == 0.0


def test_certify_many_packs_streams_in_order_and_decides_each_like_certify() -> None:
    """Several inputs with scripted votes packed into shared batches: each input's n0 + n samples are its own
    consecutive stream (the model sees input 0's samples, then input 1's, ...) and each decision is the
    reference CERTIFY of its own counts."""
    rng = np.random.default_rng(7)
    classes, n0, n, alpha, sigma = 4, 6, 40, 0.05, 0.3
    plan = []
    for i in range(5):
        selection = random_counts(rng, n0, classes, tie=i == 1)
        estimation = np.zeros(classes, dtype=int)
        estimation[int(np.argmax(selection))] = n - i * 3
        estimation[(int(np.argmax(selection)) + 1) % classes] += i * 3
        if i == 3:  # the estimation samples disagree with the selection
            estimation = np.roll(estimation, 1)
        plan.append((selection, estimation))
    script = [v for s, e in plan for v in script_for(s, rng) + script_for(e, rng)]
    xs = torch.stack([image()] * len(plan))
    for batch in (5, 13, 400):
        certs = Smooth(VoteScript(script, classes), classes, sigma).certify_many(xs, n0, n, alpha, batch)
        assert len(certs) == len(plan)
        for cert, (selection, estimation) in zip(certs, plan):
            prediction, radius, c, lower, k = reference_certify(selection, estimation, n, alpha, sigma)
            assert (cert.prediction, cert.tested_class, cert.count) == (prediction, c, k)
            assert cert.radius == pytest.approx(radius, rel=1e-9, abs=1e-12)
            assert cert.p_lower == pytest.approx(lower, rel=1e-9, abs=1e-12)
    assert Smooth(VoteScript([], 3), 3, 0.5).certify_many([], 2, 3, 0.1, 8) == []


# ------------------------------------------------------------------ PREDICT's decision rule, exactly


@pytest.mark.parametrize("classes", [3, 5])
def test_predict_tests_the_top_two_counts_on_split_votes(classes: int) -> None:
    rng = np.random.default_rng(classes)
    alpha = 0.05
    for trial in range(40):
        n = int(rng.integers(10, 120))
        counts = random_counts(rng, n, classes, tie=trial % 5 == 0)
        for batch in (n, 9):
            model = VoteScript(script_for(counts, rng), classes)
            assert Smooth(model, classes, 0.5).predict(image(), n, alpha, batch) == reference_predict(counts, alpha)
            assert model.position == n


@pytest.mark.parametrize("counts, expected", [
    ([40, 35, 25], ABSTAIN),      # top two close: abstain, though 40 vs the third's 25 would decide
    ([25, 35, 40], ABSTAIN),      # the same, larger class index
    ([30, 30, 40], ABSTAIN),      # 40 vs 30: p-value 0.32
    ([60, 20, 20], 0),            # clear winner
    ([20, 20, 20], ABSTAIN),      # three-way tie
    ([0, 33, 33], ABSTAIN),       # tie of the top two
    ([0, 0, 50], 2),              # unanimous, last class
    ([1, 0, 0], ABSTAIN),         # one vote: p-value 1
])
def test_predict_on_hand_counts(counts: list[int], expected: int) -> None:
    counts_a = np.array(counts)
    assert reference_predict(counts_a, 0.05) == expected
    model = VoteScript(script_for(counts_a, np.random.default_rng(0)), 3)
    assert Smooth(model, 3, 0.5).predict(image(), int(counts_a.sum()), 0.05, 16) == expected


def test_predict_near_tie_at_the_critical_count() -> None:
    """n_A + n_B = 100 with a third class present: the smallest n_A with p-value <= alpha predicts, one fewer
    abstains; a test against the *third* count or a one-sided test would move this edge."""
    alpha, total, third = 0.01, 100, 37
    critical = next(a for a in range(51, total + 1) if binomtest(a, total, 0.5).pvalue <= alpha)
    for a, expected in ((critical - 1, ABSTAIN), (critical, 1)):
        counts = np.array([total - a, a, third])
        assert reference_predict(counts, alpha) == expected
        model = VoteScript(script_for(counts, np.random.default_rng(a)), 3)
        assert Smooth(model, 3, 0.5).predict(image(), int(counts.sum()), alpha, 32) == expected


# ------------------------------------------------------------------ the exact law of the output (real noise)


def three_class_problem(s: float = 0.0) -> Problem:
    # classes 0 | 1 | 2 split at -0.1 and +0.1 along u with sigma 0.25: near-tie of classes 0 and 2 around the
    # middle class 1 (p = (0.345, 0.311, 0.345) at s = 0)
    return Problem("three", (1, 2, 2), 0.25, (-0.1, 0.1), s, seed=3)


def exact_selection(p: np.ndarray, n0: int) -> np.ndarray:
    """P(argmax of Multinomial(n0, p) = j), ties to the lowest index, by enumerating every count vector."""
    out = np.zeros(len(p))
    for counts in itertools.product(range(n0 + 1), repeat=len(p) - 1):
        last = n0 - sum(counts)
        if last < 0:
            continue
        vector = np.array([*counts, last])
        out[int(np.argmax(vector))] += multinomial.pmf(vector, n0, p)
    return out


def exact_certify_law(p: np.ndarray, n0: int, n: int, alpha: float) -> dict[tuple[int, bool], float]:
    """P(CERTIFY tests class j and certifies it / abstains) for each j: the class is the argmax of n0 votes, and
    it is certified when its count among n fresh votes reaches the smallest k with beta.ppf(alpha, k, n - k + 1)
    >= 1/2 (independent of the selection: fresh samples)."""
    critical = next(k for k in range(1, n + 1) if beta.ppf(alpha, k, n - k + 1) >= 0.5)
    select = exact_selection(p, n0)
    law = {}
    for j in range(len(p)):
        certified = float(binom.sf(critical - 1, n, p[j]))
        law[(j, True)] = float(select[j]) * certified
        law[(j, False)] = float(select[j]) * (1.0 - certified)
    return law


def exact_predict_law(p: np.ndarray, n: int, alpha: float) -> dict[int, float]:
    """P(PREDICT returns j) and P(ABSTAIN), by enumerating Multinomial(n, p) with the reference rule."""
    law = {j: 0.0 for j in range(len(p))}
    law[ABSTAIN] = 0.0
    for a in range(n + 1):
        for b in range(n + 1 - a):
            counts = np.array([a, b, n - a - b])
            law[reference_predict(counts, alpha)] += multinomial.pmf(counts, n, p)
    return law


def chi_square_pvalue(observed: dict, law: dict, trials: int) -> float:
    """Pearson's goodness-of-fit p-value of the observed outcome counts against the exact law (cells with
    expected count >= 5; the rest pooled)."""
    keys = sorted(law)
    expected = np.array([law[k] * trials for k in keys])
    seen = np.array([observed.get(k, 0) for k in keys], dtype=float)
    big = expected >= 5
    e = np.append(expected[big], expected[~big].sum())
    o = np.append(seen[big], seen[~big].sum())
    keep = e > 0
    assert np.all(o[~keep] == 0), f"outcomes of probability 0 happened: {observed}"
    statistic = float((((o - e) ** 2)[keep] / e[keep]).sum())
    return float(chi2.sf(statistic, keep.sum() - 1))


def test_certify_many_output_follows_the_exact_law_with_three_classes() -> None:
    """2000 seeded CERTIFY runs on a three-class problem with p = (0.56, 0.27, 0.17) (n0 = 10, n = 60,
    alpha = 0.2): the frequencies of (tested class, certified or not), six outcomes, match the exact law
    (chi-square p-value >= 1e-4; a correct implementation fails this with probability about 1e-4). Selecting with
    the estimation samples, a level 2 alpha, or a bound from the selection votes changes this law by far more."""
    problem = Problem("three-certify", (1, 2, 2), 0.25, (0.0, 0.2), -0.04, seed=3)
    p = problem.probabilities()
    n0, n, alpha, trials = 10, 60, 0.2, 2000
    law = exact_certify_law(p, n0, n, alpha)
    assert sorted(law.values())[-4] * trials > 40  # four outcomes are frequent (a wrong class is rarely certified)
    model, x = problem.tensors()
    smooth = Smooth(model, 3, problem.sigma)
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(trials)]
    certs = smooth.certify_many([x] * trials, n0, n, alpha, 4096, generators=gens)
    observed: dict[tuple[int, bool], int] = {}
    for cert in certs:
        key = (cert.tested_class, not cert.abstained)
        observed[key] = observed.get(key, 0) + 1
        assert cert.abstained or cert.prediction == cert.tested_class
    assert chi_square_pvalue(observed, law, trials) >= 1e-4, (observed, {k: v * trials for k, v in law.items()})
    # each input is decided like certify on its own generator at the same batch size (a few checked)
    for i in (0, 1, trials - 1):
        assert smooth.certify(x, n0, n, alpha, 4096, generator=torch.Generator().manual_seed(1000 + i)) == certs[i]


def test_certify_count_given_the_class_is_binomial_on_fresh_samples() -> None:
    """Given the tested class c, the estimation count is Binomial(n, p_c) (fresh samples, independent of the
    selection): its mean over the runs that tested each class matches n p_c within 4.5 standard errors. Were
    the selection votes reused, the count of the selected class would be biased upward."""
    problem = three_class_problem(0.0)
    p = problem.probabilities()
    n0, n, trials = 5, 20, 3000
    model, x = problem.tensors()
    gens = [torch.Generator().manual_seed(50_000 + i) for i in range(trials)]
    certs = Smooth(model, 3, problem.sigma).certify_many([x] * trials, n0, n, 0.1, 8192, generators=gens)
    select = exact_selection(p, n0)
    tested = np.array([c.tested_class for c in certs])
    counts = np.array([c.count for c in certs])
    for c in range(3):
        runs = counts[tested == c]
        # the selection frequency matches the exact one (exact binomial test)
        assert binomtest(len(runs), trials, select[c]).pvalue >= 1e-4
        se = math.sqrt(n * p[c] * (1 - p[c]) / len(runs))
        assert abs(runs.mean() - n * p[c]) <= 4.5 * se, (c, runs.mean(), n * p[c])


def test_selection_and_estimation_votes_are_independent_draws() -> None:
    """The selection and estimation segments are disjoint draws of one stream: over seeded runs, the
    correlation between the selection and the estimation vote count of a class is 0 within 4.5 / sqrt(T), and
    each segment's counts are Multinomial(size, p) (means within 4.5 standard errors)."""
    problem = three_class_problem(0.0)
    p = problem.probabilities()
    model, x = problem.tensors()
    smooth = Smooth(model, 3, problem.sigma)
    trials, n0, n = 600, 8, 24
    rows = [smooth.sampler.segment_counts(x, (n0, n), 7, torch.Generator().manual_seed(i)).numpy()
            for i in range(trials)]
    selection, estimation = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    assert np.all(selection.sum(1) == n0) and np.all(estimation.sum(1) == n)
    for c in range(3):
        r = np.corrcoef(selection[:, c], estimation[:, c])[0, 1]
        assert abs(r) <= 4.5 / math.sqrt(trials), (c, r)
        for size, counts in ((n0, selection[:, c]), (n, estimation[:, c])):
            se = math.sqrt(size * p[c] * (1 - p[c]) / trials)
            assert abs(counts.mean() - size * p[c]) <= 4.5 * se


def test_predict_output_follows_the_exact_law_with_three_classes() -> None:
    """1500 seeded PREDICT runs (n = 40, alpha = 0.1) on a three-class problem where the top two classes are
    near-tied: the frequencies of (0, 1, 2, ABSTAIN) match the exact law, enumerated here (chi-square p-value
    >= 1e-4), and the wrong-class rate is at most alpha."""
    problem = Problem("three-predict", (1, 2, 2), 0.25, (-0.05, 0.25), 0.06, seed=5)
    p = problem.probabilities()
    n, alpha, trials = 40, 0.1, 1500
    law = exact_predict_law(p, n, alpha)
    g = problem.g
    assert sum(v for k, v in law.items() if k not in (g, ABSTAIN)) <= alpha
    model, x = problem.tensors()
    smooth = Smooth(model, 3, problem.sigma)
    gen = torch.Generator().manual_seed(11)
    observed: dict[int, int] = {}
    for _ in range(trials):
        outcome = smooth.predict(x, n, alpha, n, generator=gen)
        observed[outcome] = observed.get(outcome, 0) + 1
    assert chi_square_pvalue(observed, law, trials) >= 1e-4, (observed, {k: v * trials for k, v in law.items()})


# ------------------------------------------------------------------ the sampler's contract at its edges


class Recorder(nn.Module):
    """A linear-threshold classifier (3 classes along the first pixel) that records each batch's size and dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, torch.dtype]] = []

    def forward(self, x: Tensor) -> Tensor:
        self.calls.append((x.shape[0], x.dtype))
        s = x.flatten(1)[:, 0].float()
        return torch.stack([-s, torch.zeros_like(s), s - 1.0], dim=1)


def test_certify_many_equals_certify_input_by_input_when_pieces_straddle_batches() -> None:
    """Batches of 7 with n0 = 5, n = 12: every input's pieces straddle the shared batches (staged and copied), and
    each certificate is bit for bit the one `certify` gives on its own generator at the same batch size."""
    model = Recorder()
    smooth = Smooth(model, 3, 0.4)
    xs = [torch.full((1, 2, 2), v) for v in (0.1, 0.5, 0.9, 0.45)]
    packed = smooth.certify_many(xs, 5, 12, 0.3, 7, generators=[torch.Generator().manual_seed(i) for i in range(4)])
    sizes = [size for size, _ in model.calls]
    assert sum(sizes) == 4 * 17 and all(size == 7 for size in sizes[:-1])  # full shared batches
    single = [smooth.certify(x, 5, 12, 0.3, 7, generator=torch.Generator().manual_seed(i)) for i, x in enumerate(xs)]
    assert packed == single
    assert len({c.tested_class for c in packed}) >= 2


def test_a_huge_batch_size_costs_no_memory_and_low_precision_input_gets_float32_noise() -> None:
    model = Recorder()
    smooth = Smooth(model, 3, 0.25)
    x = torch.full((1, 2, 2), 0.5, dtype=torch.float16)
    counts = smooth.sample_counts(x, 10, 10**12, generator=torch.Generator().manual_seed(0))
    assert int(counts.sum()) == 10 and model.calls == [(10, torch.float32)]
    certs = smooth.certify_many([x.float(), x.float()], 3, 4, 0.1, 10**12)
    assert len(certs) == 2 and model.calls[-1] == (14, torch.float32)


def test_nan_logits_and_wrong_output_shapes_are_errors_not_votes() -> None:
    from smoothadv.errors import SmoothAdvError

    class NaNs(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            out = torch.zeros(x.shape[0], 3)
            out[::2] = float("nan")
            return out

    class Wide(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return torch.zeros(x.shape[0], 4)

    for model in (NaNs(), Wide()):
        with pytest.raises(SmoothAdvError):
            Smooth(model, 3, 0.5).certify(image(), 2, 5, 0.1, 4)
        with pytest.raises(SmoothAdvError):
            Smooth(model, 3, 0.5).certify_many([image(), image()], 2, 5, 0.1, 4)


def test_the_base_classifier_votes_in_eval_mode_and_gets_its_modes_back() -> None:
    """Dropout or BatchNorm in train mode would make the votes depend on the batch: every sampler runs the model
    in eval mode and restores each submodule's mode afterwards."""
    seen: list[bool] = []

    class Probe(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            seen.append(self.training)
            return x.flatten(1)[:, :3]

    model = nn.Sequential(Probe(), nn.Identity())
    model.train()
    model[1].eval()
    smooth = Smooth(model, 3, 0.25)
    smooth.certify(image(), 2, 5, 0.1, 4)
    smooth.certify_many([image(), image()], 2, 5, 0.1, 4)
    smooth.predict(image(), 5, 0.1, 4)
    assert seen and not any(seen)
    assert [m.training for m in model.modules()] == [True, True, False]


def test_domains_are_pairs_lo_below_hi() -> None:
    from smoothadv.errors import SmoothAdvError
    from smoothadv.smoothing import check_domain

    assert check_domain(None) is None
    assert check_domain((0, 1)) == (0.0, 1.0) and check_domain([-1.5, float("inf")]) == (-1.5, float("inf"))
    for bad in ((0.5, 0.5), (1.0, 0.0), (float("nan"), 1.0), "01", b"01", (0.0,), (0.0, 1.0, 2.0), ("a", "b"), 3.0,
                {0.0, 1.0}):
        with pytest.raises(SmoothAdvError):
            check_domain(bad)
