"""Statistical validity suite: measure how often certificates are wrong, against exact answers.

A certificate from CERTIFY promises: with probability at least 1 - alpha over the noise, the
returned class is the smoothed classifier's g(x) and g is constant on the L2 ball of the returned
radius (Cohen, Rosenfeld & Kolter, ICML 2019, Theorem 1 and Proposition 2). PREDICT promises
P(returns a class other than g(x)) <= alpha (ibid., Proposition 1; Hung & Fithian 2019).

This module checks those promises empirically on base classifiers whose smoothed classifier is
known exactly. Every problem is a base classifier that looks only at s = <u, x> for a unit vector
u in d = C*H*W dimensions and splits the line into K intervals:

    f(x) = j  iff  t_j <= <u, x> < t_{j+1}      (t_0 = -inf, t_K = +inf)

Under x + N(0, sigma^2 I), <u, x + delta> ~ N(s, sigma^2), so exactly

    p_j = Phi((t_{j+1} - s) / sigma) - Phi((t_j - s) / sigma),   g(x) = argmax_j p_j.

g depends on s only, so its true robust radius at x is the distance (along u) from s to the
nearest s' where argmax_j p_j(s') changes; it is found by root finding to 1e-12. K = 2 is the
linear binary classifier, where p_A = Phi(margin / sigma) and the true radius is |margin|, the
distance to the hyperplane. For every problem we also know the radius that CERTIFY estimates,
sigma * Phi^-1(p_A) (Theorem 1 with p_B = 1 - p_A), which is <= the true radius; exceeding it
is the event whose probability Clopper-Pearson bounds by alpha, so it is the sharpest check.

For fixed-n CERTIFY, sequential CERTIFY with policy full, and PREDICT (K <= 3) the exact
probability of an invalid result is computed too (selection by multinomial argmax, or by the
adaptive rule of `sequential.selection_step` via `chosen_class_probabilities`, then binomial
tails), so the observed count is also tested for agreement with the exact rate, not only for
being below alpha.

Acceptance: with T trials and F invalid results, each (problem, mode) passes when
F <= the (1 - delta) quantile of Binomial(T, alpha): "within alpha up to sampling error", with a
false-alarm probability of at most delta per check when the true rate is alpha; where the exact
rate is known, the two-sided binomial test of F against it must also have p-value >= delta.
`run_suite` sets delta = 0.01 / (2 x number of checks) (Bonferroni), so a correct implementation
fails the suite with probability at most 0.01. A negative control (a certifier that plugs in the
point estimate k/n instead of a confidence bound) must fail, which shows the suite has power.

Why this is a module of the package and not a benchmark: `smoothadv validity`
is documented for users to check the guarantee on their own install (their torch, their CPU or
GPU kernels, their random number generators), and an installed package cannot reach
`benchmarks/`; keeping the command backward compatible therefore needs the code in the package.
So it is a user-facing module held to the library's rules: every confidence bound is
`stats.clopper_pearson_lower` (vectorized in `clopper_pearson_lower_all`, equal element by
element, extreme alpha included), and it carries no hidden state: the only caches are
`functools.lru_cache` on pure functions of their arguments, modes receive everything they use as
arguments, and results are frozen. `benchmarks/validity.py` runs it at full size and writes files.

Use: `smoothadv validity --quick` (the test-suite version), or `run_suite(...)` then `format_table`,
`format_summary`. Sections below: problems with exact answers; exact failure probabilities;
certification modes; the suite's inputs; running the suite; reporting.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from scipy.optimize import brentq
from scipy.signal import fftconvolve
from scipy.special import gammaln, ndtr
from scipy.stats import beta, binom, binomtest, norm
from torch import Tensor, nn

from .betting import BettingConfig, log_wealth
from .errors import SmoothAdvError
from .sequential import SELECTION_CHUNK, SequentialConfig, certify_sequential_many
from .smoothing import ABSTAIN, Smooth
from .stats import certified_radius, clopper_pearson_lower

# ------------------------------------------------------------------ problems with exact answers


class IntervalClassifier(nn.Module):
    """f(x) = j iff t_j <= <u, flatten(x)> < t_{j+1}; computed in float64 so the class is exact.

    Logits are minus the distance of s = <u, x> to each class's interval (0 inside it).
    """

    u: Tensor
    lo: Tensor
    hi: Tensor

    def __init__(self, direction: np.ndarray, thresholds: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("u", torch.as_tensor(np.asarray(direction, dtype=np.float64)))
        inf = float("inf")
        edges = [-inf, *[float(t) for t in thresholds], inf]
        self.register_buffer("lo", torch.tensor(edges[:-1], dtype=torch.float64))
        self.register_buffer("hi", torch.tensor(edges[1:], dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        s = (x.flatten(1).double() @ self.u).unsqueeze(1)
        return -(torch.relu(self.lo - s) + torch.relu(s - self.hi))


@dataclass(frozen=True)
class Problem:
    """One input x and one interval classifier, with the smoothed classifier's exact answers."""

    name: str
    shape: tuple[int, int, int]
    sigma: float
    thresholds: tuple[float, ...]
    s: float                      # <u, x>
    seed: int = 0                 # picks the direction u and the point x

    @property
    def num_classes(self) -> int:
        return len(self.thresholds) + 1

    def probabilities(self, s: float | None = None) -> np.ndarray:
        """Exact p_j = P(f(x + delta) = j) at position s along u (default: this problem's x)."""
        s = self.s if s is None else s
        return _class_probabilities(self.sigma, self.thresholds, np.array([s]))[0]

    @property
    def g(self) -> int:
        """The smoothed classifier's prediction g(x)."""
        return int(np.argmax(self.probabilities()))

    @property
    def p_a(self) -> float:
        return float(self.probabilities()[self.g])

    @property
    def bound_radius(self) -> float:
        """sigma * Phi^-1(p_A): the radius CERTIFY estimates (<= the true radius)."""
        return certified_radius(self.p_a, self.sigma)

    @property
    def true_radius(self) -> float:
        """Distance from x to the nearest point where g changes (exact, by root finding along u)."""
        return _true_radius(self.sigma, self.thresholds, self.s)

    def tensors(self) -> tuple[IntervalClassifier, Tensor]:
        """The base classifier and the image x in [0, 1]^(C, H, W) with <u, x> = s."""
        d = int(np.prod(self.shape))
        rng = np.random.default_rng(self.seed)
        u = rng.standard_normal(d)
        u /= np.linalg.norm(u)
        x = rng.uniform(0.0, 1.0, d)
        offset = float(u @ x) - self.s  # shift the thresholds so that x sits at position s
        model = IntervalClassifier(u, [t + offset for t in self.thresholds])
        image = torch.tensor(x.reshape(self.shape), dtype=torch.float32)
        return model, image


def _class_probabilities(sigma: float, thresholds: tuple[float, ...], s: np.ndarray) -> np.ndarray:
    """p_j(s) for an array of positions s: shape (len(s), K)."""
    edges = np.array([-np.inf, *thresholds, np.inf])
    return np.diff(ndtr((edges[None, :] - np.asarray(s, dtype=float)[:, None]) / sigma), axis=1)


def _gap(sigma: float, thresholds: tuple[float, ...], c: int, s: float | np.ndarray) -> np.ndarray:
    """p_c(s) - max_{j != c} p_j(s) (positive where g = c)."""
    p = _class_probabilities(sigma, thresholds, np.atleast_1d(s))
    return p[:, c] - np.max(np.delete(p, c, axis=1), axis=1)


@lru_cache(maxsize=4096)
def _true_radius(sigma: float, thresholds: tuple[float, ...], s: float) -> float:
    c = int(np.argmax(_class_probabilities(sigma, thresholds, np.array([s]))[0]))
    span = (max(thresholds) - min(thresholds)) + 20 * sigma + abs(s)
    grid = np.arange(1, int(span / (sigma / 64)) + 2) * (sigma / 64)
    best = math.inf
    for direction in (-1.0, 1.0):
        gaps = _gap(sigma, thresholds, c, s + direction * grid)
        change = np.nonzero(gaps <= 0)[0]
        if len(change) == 0:
            continue
        k = int(change[0])
        lo = 0.0 if k == 0 else float(grid[k - 1])
        root = brentq(lambda r, d=direction: float(_gap(sigma, thresholds, c, s + d * r)[0]), lo, float(grid[k]),
                      xtol=1e-13, rtol=1e-13)
        best = min(best, root)
    return best


# ------------------------------------------------------------------ exact failure probabilities


def selection_probabilities(p: np.ndarray, n0: int, offset: Sequence[int] | None = None) -> np.ndarray:
    """P(argmax of Multinomial(n0, p) counts = j), ties going to the lowest index (torch.argmax); with `offset`,
    of the counts plus `offset` (votes already drawn).

    Exact: for each count m of class j, a dynamic programme over the other classes (each placed
    with its conditional binomial law) gives the probability that all stay below their caps.
    """
    p = np.asarray(p, dtype=float)
    k = len(p)
    extra = np.zeros(k, dtype=int) if offset is None else np.asarray(offset, dtype=int)
    out = np.zeros(k)
    r = np.arange(n0 + 1)
    have, left = np.meshgrid(r, r, indexing="ij")
    take = have - left
    for j in range(k):
        rest = [i for i in range(k) if i != j]
        grids = []
        mass = 1.0 - p[j]
        for i in rest[:-1]:
            q = min(1.0, p[i] / mass) if mass > 0 else 0.0
            grid = np.where(take >= 0, binom.pmf(np.maximum(take, 0), have, q), 0.0)
            grids.append(grid)
            mass -= p[i]
        pm = binom.pmf(r, n0, p[j])
        total = 0.0
        for mj in range(n0 + 1):
            if pm[mj] == 0.0:
                continue
            state = np.zeros(n0 + 1)
            state[n0 - mj] = 1.0
            for pos, i in enumerate(rest):
                cap = mj + extra[j] - extra[i] - (1 if i < j else 0)
                if cap < 0:
                    state[:] = 0.0
                    break
                if pos == len(rest) - 1:  # the last class takes everything left
                    state = np.where(r <= cap, state, 0.0)
                    break
                state = state @ np.where(take <= cap, grids[pos], 0.0)
            total += pm[mj] * state.sum()
        out[j] = total
    return out


def chosen_class_probabilities(p: np.ndarray, n0: int, selection: str = "fixed") -> np.ndarray:
    """P(the class chosen from at most n0 selection votes is j) under `sequential.selection_step`'s rule: Cohen's
    argmax of n0 ("fixed", `selection_probabilities`), or "adaptive": the first c = min(16, n0) votes if they are
    unanimous (probability p_k^c for class k), else the argmax of all n0. The events "the first c votes are all
    k" are disjoint, so P(j) = p_j^c + P(argmax of n0 = j) - sum_k p_k^c P(argmax of c e_k + Multinomial(n0 - c,
    p) = j)."""
    p = np.asarray(p, dtype=float)
    out = selection_probabilities(p, n0)
    c = min(SELECTION_CHUNK, n0)
    if selection == "fixed" or c == n0:
        return out
    for k, pk in enumerate(p):
        first = pk ** c
        if first > 0.0:
            out = out - first * selection_probabilities(p, n0 - c, offset=[c if i == k else 0 for i in range(len(p))])
            out[k] += first
    return out


_BETA_QUANTILE_MIN_ALPHA = 1e-40
"""Below this alpha `stats.clopper_pearson_lower` does not use the beta quantile (extreme-alpha branch)."""


def clopper_pearson_lower_all(n: int, alpha: float) -> np.ndarray:
    """`stats.clopper_pearson_lower(k, n, alpha)` for k = 0..n as one array, equal element by element (tested).

    The interior k take the beta quantile in one vectorized call, exactly where stats takes it; every
    element stats would not take from it (alpha below 1e-40, or a non-finite quantile) and both ends are
    `stats.clopper_pearson_lower` itself, so the extreme-alpha handling is stats' own.
    """
    out = np.full(n + 1, np.nan)
    if n > 1 and alpha >= _BETA_QUANTILE_MIN_ALPHA:
        k = np.arange(1, n)
        with np.errstate(all="ignore"):
            out[1:n] = beta.ppf(alpha, k, n - k + 1)
    for missing in np.flatnonzero(~np.isfinite(out)):
        out[missing] = clopper_pearson_lower(int(missing), n, alpha)
    return out


def _invalid(lower: np.ndarray, is_g: bool, sigma: float, limit: float, strict: bool) -> np.ndarray:
    """Which lower confidence bounds on the selected class's p give an invalid certificate.

    A certificate is issued when the bound is >= 1/2 (fixed n, as `Smooth.certify`) or > 1/2 (`strict`,
    as the sequential certifier). It is invalid when its class is not g(x), or when its radius
    sigma * Phi^-1(bound) exceeds `limit` (relative tolerance 1e-9; never when `limit` is infinite).
    """
    issued = lower > 0.5 if strict else lower >= 0.5
    if not is_g:
        return issued
    if limit == math.inf:
        return np.zeros_like(issued)
    return issued & (sigma * norm.ppf(np.clip(lower, 0.5, 1.0)) > limit * (1 + 1e-9))


def exact_certify_failure(problem: Problem, n0: int, n: int, alpha: float, against: str = "bound") -> float:
    """Exact probability that fixed-n CERTIFY (Smooth.certify) returns an invalid certificate.

    Invalid: a class other than g(x) without abstaining, or class g(x) with radius larger than
    `against` ("bound": sigma * Phi^-1(p_A); "true": g's true robust radius).
    """
    p = problem.probabilities()
    g = problem.g
    limit = problem.bound_radius if against == "bound" else problem.true_radius
    lower = clopper_pearson_lower_all(n, alpha)
    k = np.arange(n + 1)
    select = selection_probabilities(p, n0)
    fail = 0.0
    for j, pj in enumerate(p):
        if select[j] > 0.0:
            bad = _invalid(lower, j == g, problem.sigma, limit, strict=False)
            fail += select[j] * float(binom.pmf(k, n, pj)[bad].sum())
    return fail


def _convolve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distribution of a sum of two independent counts: direct for small supports, by FFT for the papers' scale
    (n ~ 10^5, where the direct sum would take minutes; FFT round-off is ~1e-16 absolute, clipped at 0)."""
    if len(a) * len(b) <= 10**7:
        return np.convolve(a, b)
    return np.clip(fftconvolve(a, b), 0.0, None)


def exact_sequential_failure(problem: Problem, n0: int | None, looks: Sequence[int], alpha: float,
                             against: str = "bound", levels: Sequence[float] | None = None,
                             selection: str = "fixed") -> float:
    """Exact probability that group-sequential CP with policy "full" (every look, radius from the largest
    lower bound, at level `levels[j]` at look j; default alpha / K) is invalid; `n0=None` tests the class g
    itself (label mode), else the class is chosen from at most n0 votes by `selection`'s rule.

    Policies that stop earlier take the maximum over a subset of the same looks, so their failure
    probability is at most this number (same sample path, fewer bounds).
    """
    p = problem.probabilities()
    g = problem.g
    limit = problem.bound_radius if against == "bound" else problem.true_radius
    levels = [alpha / len(looks)] * len(looks) if levels is None else list(levels)
    select = np.eye(len(p))[g] if n0 is None else chosen_class_probabilities(p, n0, selection)
    fail = 0.0
    for c, pc in enumerate(p):
        if select[c] == 0.0:
            continue
        alive = np.zeros(looks[-1] + 1)
        alive[0] = 1.0
        failed, previous = 0.0, 0
        for look, level in zip(looks, levels):
            step = binom.pmf(np.arange(look - previous + 1), look - previous, pc)
            alive = _convolve(alive, step)[: looks[-1] + 1]
            mask = np.zeros_like(alive, dtype=bool)
            lower = clopper_pearson_lower_all(look, level)
            mask[: look + 1] = _invalid(lower, c == g, problem.sigma, limit, strict=True)
            failed += float(alive[mask].sum())
            alive[mask] = 0.0
            previous = look
        fail += select[c] * failed
    return fail


def betting_checks(config: BettingConfig) -> tuple[int, ...]:
    """Every sample size at which a betting test with `config` checks its wealth, up to its last size."""
    out: list[int] = []
    start = 0
    for end in config.draws:
        out += config.checks(start, end)
        start = end
    return tuple(out)


def _first_rejecting(n: int, z: float, config: BettingConfig) -> int:
    """Smallest count S of n votes at which the betting sequence rejects q = Phi(z) (n + 1 if none):
    ln M_n(q) increases with S, so a binary search finds it."""

    def rejects(k: int) -> bool:
        return bool(log_wealth([k], [n - k], z, config)[0] >= config.threshold)

    lo, hi = 0, n + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if mid <= n and rejects(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def exact_betting_failure(problem: Problem, n0: int | None, config: BettingConfig, against: str = "bound") -> float:
    """Exact probability that the betting test with policy "full" (every check up to `config.schedule.last`, then the
    final Clopper-Pearson look) returns an invalid certificate; `n0=None` tests the class g itself (label mode),
    else the class is chosen from at most n0 votes by `config.selection`'s rule.

    Invalid: a class other than g(x) certified (its bound above 1/2 at some check), or g(x) with a radius above
    `against`'s (bound: sigma * Phi^-1(p_A); true: g's robust radius). The confidence sequence is monotone in
    the threshold (module `betting`), so the returned bound exceeds q* iff the wealth at q* reached the
    threshold at some check, or the final bound exceeds q*: a first-passage probability, computed by
    propagating the distribution of the vote count between checks and removing the mass past each check's
    rejection count. Policies that stop earlier make a subset of the same checks, so they fail at most this
    often.
    """
    p = problem.probabilities()
    g = problem.g
    limit = problem.bound_radius if against == "bound" else problem.true_radius
    select = np.eye(len(p))[g] if n0 is None else chosen_class_probabilities(p, n0, config.selection)
    checks = betting_checks(config)
    last = config.schedule.last
    final = clopper_pearson_lower_all(last, config.final_share * config.alpha) if config.final_share else None
    fail = 0.0
    for c, pc in enumerate(p):
        if select[c] == 0.0 or (c == g and limit == math.inf):
            continue
        z_star = 0.0 if c != g else (limit * (1 + 1e-9)) / problem.sigma
        alive = np.zeros(last + 1)
        alive[0] = 1.0
        failed, previous = 0.0, 0
        for look in checks:
            step = binom.pmf(np.arange(look - previous + 1), look - previous, pc)
            alive = _convolve(alive, step)[: last + 1]
            first = _first_rejecting(look, z_star, config)
            failed += float(alive[first:look + 1].sum())
            alive[first:] = 0.0
            previous = look
        if final is not None:
            bad = np.flatnonzero(final > float(norm.cdf(z_star)))
            if len(bad):
                failed += float(alive[bad[0]:].sum())
        fail += select[c] * failed
    return fail


@lru_cache(maxsize=256)
def _predict_critical(n: int, alpha: float) -> tuple[int, ...]:
    """For each total t = a + b of the top two counts, the smallest top count a with p-value <= alpha."""
    crit = []
    for t in range(n + 1):
        lo, hi = t // 2 + 1, t + 1  # a must exceed t / 2; hi = t + 1: no a decides
        while lo < hi:
            mid = (lo + hi) // 2
            if binomtest(mid, t, 0.5).pvalue <= alpha:
                hi = mid
            else:
                lo = mid + 1
        crit.append(lo)
    return tuple(crit)


def exact_predict_failure(problem: Problem, n: int, alpha: float) -> float | None:
    """Exact P(PREDICT returns a class != g(x)) for K = 2 or 3 classes (None for larger K)."""
    p = problem.probabilities()
    g = problem.g
    crit = _predict_critical(n, alpha)
    if len(p) == 2:
        k = np.arange(n + 1)
        pmf = binom.pmf(k, n, p[1 - g])  # counts of the wrong class
        bad = np.array([kk > n - kk and kk >= crit[n] for kk in k])
        return float(pmf[bad].sum())
    if len(p) != 3:
        return None
    a, b = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    c = n - a - b
    ok = c >= 0
    logp = np.where(p > 0, np.log(np.maximum(p, 1e-300)), -np.inf)
    with np.errstate(invalid="ignore"):
        logpmf = (gammaln(n + 1) - gammaln(a + 1) - gammaln(b + 1) - gammaln(np.maximum(c, 0) + 1)
                  + a * logp[0] + b * logp[1] + np.maximum(c, 0) * logp[2])
    pmf = np.where(ok, np.exp(np.nan_to_num(logpmf, nan=-np.inf)), 0.0)
    counts = np.stack([a, b, np.maximum(c, 0)])
    order = np.sort(counts, axis=0)
    top, second = order[2], order[1]
    winner = np.argmax(counts, axis=0)
    unique = top > second
    crit_arr = np.asarray(crit)
    total = top + second
    decides = unique & (top >= crit_arr[np.minimum(total, n)])
    bad = ok & decides & (winner != g)
    return float(pmf[bad].sum())


# ------------------------------------------------------------------ certification modes


Outcome = tuple[int, float]
"""One trial's answer: (class or ABSTAIN, radius); PREDICT reports radius 0."""


@dataclass
class Mode:
    """A way of certifying or predicting, run `trials` times by `run_problem`.

    `run(smooth, x, label, generator)` returns one `Outcome` per independent trial (several when the
    mode packs trials into one call), drawing all its randomness from `generator`. `label` is the
    true class g(x): only label-mode certifiers use it (they are told the class to certify, as with
    `certify --class-from label`); the others ignore it. `exact(problem, against)` is the exact
    probability of the counted invalid event, when known.
    """

    name: str
    kind: str                                            # "certify" or "predict"
    run: Callable[[Smooth, Tensor, int, torch.Generator], list[Outcome]]
    exact: Callable[[Problem, str], float | None] | None = None   # exact invalid probability
    control: bool = False                                # an unsound negative control: must FAIL


def _seeded(gen: torch.Generator, count: int) -> list[torch.Generator]:
    """`count` independent generators seeded from `gen`."""
    return [torch.Generator().manual_seed(int(v)) for v in torch.randint(0, 2**62, (count,), generator=gen).tolist()]


def fixed_n_mode(n0: int, n: int, alpha: float, batch: int = 10_000) -> Mode:
    """Cohen's CERTIFY with one-sided Clopper-Pearson at n samples (Smooth.certify)."""
    def run(smooth: Smooth, x: Tensor, label: int, gen: torch.Generator) -> list[Outcome]:
        cert = smooth.certify(x, n0, n, alpha, min(batch, max(n, n0)), generator=gen)
        return [(cert.prediction, cert.radius)]

    return Mode(f"certify n0={n0} n={n}", "certify", run,
                lambda problem, against: exact_certify_failure(problem, n0, n, alpha, against))


def packed_mode(n0: int, n: int, alpha: float, pack: int = 16, batch: int = 1000) -> Mode:
    """`Smooth.certify_many`: `pack` independent trials (own generators) packed into shared forward passes."""
    def run(smooth: Smooth, x: Tensor, label: int, gen: torch.Generator) -> list[Outcome]:
        certs = smooth.certify_many([x] * pack, n0, n, alpha, batch, generators=_seeded(gen, pack))
        return [(c.prediction, c.radius) for c in certs]

    return Mode(f"certify_many n0={n0} n={n}", "certify", run,
                lambda problem, against: exact_certify_failure(problem, n0, n, alpha, against))


def predict_mode(n: int, alpha: float, batch: int = 10_000) -> Mode:
    """Cohen's PREDICT (Smooth.predict); radius reported as 0."""
    return Mode(f"predict n={n}", "predict",
                lambda smooth, x, label, gen: [(smooth.predict(x, n, alpha, min(batch, n), generator=gen), 0.0)],
                lambda problem, against: exact_predict_failure(problem, n, alpha))


def point_estimate_control(n0: int, n: int, alpha: float) -> Mode:
    """UNSOUND on purpose: radius from the point estimate k/n instead of a lower confidence bound.

    About half of its certificates near p_A exceed the true radius; the suite must flag it.
    """
    def run(smooth: Smooth, x: Tensor, label: int, gen: torch.Generator) -> list[Outcome]:
        c = int(smooth.sample_counts(x, n0, max(n0, 1), generator=gen).argmax())
        p_hat = min(int(smooth.sample_counts(x, n, n, generator=gen)[c]) / n, 1 - 1e-12)
        return [(c, certified_radius(p_hat, smooth.sigma)) if p_hat > 0.5 else (ABSTAIN, 0.0)]

    return Mode(f"control: point estimate n={n}", "certify", run, None, control=True)


def sequential_looks(n: int) -> tuple[int, ...]:
    """The look schedule used for sequential modes at budget n: n/4, n/2, n (fewer when n is tiny)."""
    return tuple(sorted({max(1, n // 4), max(1, n // 2), n}))


def sequential_modes(alpha: float, n0: int, n: int, quick: bool = False) -> list[Mode]:
    """Group-sequential Clopper-Pearson (`smoothadv.sequential`) with looks n/4, n/2, n at alpha / 3 each:
    policy full with Cohen's class selection and with the class given (label mode), and tolerance (not with
    quick); and the schedule `certify --mode sequential` uses by default, `fitted_schedule` on those looks
    (unequal levels: alpha spending), with policies grid and full."""
    equal = sequential_looks(n)

    def schedule(sigma: float, spent: bool) -> tuple[tuple[int, ...], tuple[float, ...] | None]:
        if spent:  # the grid policy's default schedule on these looks (None: alpha / K at each look)
            fitted = SequentialConfig(sigma, alpha, base=equal)
            return fitted.schedule.looks, fitted.schedule.levels
        return equal, None

    def make(policy: str, label_mode: bool, spent: bool = False, pack: int = 16) -> Mode:
        def run(smooth: Smooth, x: Tensor, label: int, gen: torch.Generator) -> list[Outcome]:
            looks, levels = schedule(smooth.sigma, spent)
            config = SequentialConfig(sigma=smooth.sigma, alpha=alpha, looks=looks, policy=policy,
                                      tolerance=0.05 * smooth.sigma, levels=levels)
            gens = _seeded(gen, 2 * pack)  # pack for class selection, then pack for estimation
            certs = certify_sequential_many(
                smooth, [x] * pack, config, batch_size=1000, n0=n0, labels=[label] * pack if label_mode else None,
                selection_generators=gens[:pack], estimation_generators=gens[pack:])
            return [(c.prediction, c.radius) for c in certs]

        def exact(problem: Problem, against: str) -> float:
            looks, levels = schedule(problem.sigma, spent)
            selection = SequentialConfig(problem.sigma, alpha, looks=looks, levels=levels).selection  # the runs' rule
            return exact_sequential_failure(problem, None if label_mode else n0, looks, alpha, against, levels,
                                            selection)

        looks_text = "fitted (alpha spending)" if spent else ",".join(map(str, equal))
        name = f"sequential {policy}{' label' if label_mode else ''} looks={looks_text}"
        return Mode(name, "certify", run, exact if policy == "full" else None)

    modes = [make("full", False), make("grid", False, spent=True), make("full", False, spent=True),
             make("full", True)]
    if not quick:
        modes.append(make("tolerance", False))
    return modes


def suite_betting_config(sigma: float, alpha: float, n: int, policy: str = "full") -> BettingConfig:
    """The betting test at the suite's scale: last size n, first draw about n / 6 (a multiple of 4: checks every
    quarter of it), half of alpha on the final look, as the default; tolerance 0.05 sigma."""
    first = max(4, (n // 6) // 4 * 4)
    return BettingConfig(sigma, alpha, policy=policy, tolerance=0.05 * sigma, first=first, last=max(n, first))


def betting_modes(alpha: float, n0: int, n: int, quick: bool = False) -> list[Mode]:
    """The betting test (`smoothadv.betting`, `certify --test betting`) at last size n: policy full with Cohen's
    class selection, checked against its exact failure probability; with quick only that, else also grid,
    full in label mode and tolerance."""
    def make(policy: str, label_mode: bool, pack: int = 16) -> Mode:
        def run(smooth: Smooth, x: Tensor, label: int, gen: torch.Generator) -> list[Outcome]:
            config = suite_betting_config(smooth.sigma, alpha, n, policy)
            gens = _seeded(gen, 2 * pack)
            certs = certify_sequential_many(
                smooth, [x] * pack, config, batch_size=1000, n0=n0, labels=[label] * pack if label_mode else None,
                selection_generators=gens[:pack], estimation_generators=gens[pack:])
            return [(c.prediction, c.radius) for c in certs]

        def exact(problem: Problem, against: str) -> float:
            return exact_betting_failure(problem, None if label_mode else n0,
                                         suite_betting_config(problem.sigma, alpha, n), against)

        name = f"betting {policy}{' label' if label_mode else ''} last={n}"
        return Mode(name, "certify", run, exact if policy == "full" else None)

    if quick:
        return [make("full", False)]
    return [make("full", False), make("grid", False), make("full", True), make("tolerance", False)]


ADAPTIVE_N0 = 100
"""The adaptive-selection modes' n0 (Cohen's): the rule draws it 16 at a time, so a smaller n0 would hide it."""


def adaptive_selection_modes(alpha: float, n: int) -> list[Mode]:
    """Cohen's mode with adaptive class selection (`sequential.selection_step`: 16 votes at a time up to n0 =
    `ADAPTIVE_N0`, stop when unanimous), for group-sequential CP (looks n/4, n/2, n, alpha / 3 each) and the
    betting test at last size n, policy full; each checked against its exact failure probability with the
    adaptive rule's class probabilities (`chosen_class_probabilities`)."""
    looks = sequential_looks(n)

    def config(sigma: float, betting: bool) -> SequentialConfig | BettingConfig:
        if betting:
            return dataclasses.replace(suite_betting_config(sigma, alpha, n), selection="adaptive")
        return SequentialConfig(sigma, alpha, looks=looks, policy="full", selection="adaptive")

    def make(betting: bool, pack: int = 16) -> Mode:
        def run(smooth: Smooth, x: Tensor, label: int, gen: torch.Generator) -> list[Outcome]:
            gens = _seeded(gen, 2 * pack)
            certs = certify_sequential_many(smooth, [x] * pack, config(smooth.sigma, betting), batch_size=1000,
                                            n0=ADAPTIVE_N0, selection_generators=gens[:pack],
                                            estimation_generators=gens[pack:])
            return [(c.prediction, c.radius) for c in certs]

        def exact(problem: Problem, against: str) -> float:
            cfg = config(problem.sigma, betting)
            if isinstance(cfg, BettingConfig):
                return exact_betting_failure(problem, ADAPTIVE_N0, cfg, against)
            return exact_sequential_failure(problem, ADAPTIVE_N0, looks, alpha, against, cfg.schedule.levels,
                                            cfg.selection)

        test = f"betting full last={n}" if betting else f"sequential full looks={','.join(map(str, looks))}"
        return Mode(f"{test} adaptive selection n0={ADAPTIVE_N0}", "certify", run, exact)

    return [make(False), make(True)]


def betting_double_alpha_control(alpha: float, n0: int, n: int, pack: int = 16) -> Mode:
    """UNSOUND on purpose: the betting test run at 2 alpha (a factor-2 slip in the wealth threshold, 1 / (2 alpha)
    instead of 1 / alpha) while claiming alpha. Checked against the exact failure probability of the test it
    claims to be (at alpha), and against alpha; the suite must flag it."""
    def run(smooth: Smooth, x: Tensor, label: int, gen: torch.Generator) -> list[Outcome]:
        config = suite_betting_config(smooth.sigma, min(2 * alpha, 0.999), n)
        gens = _seeded(gen, 2 * pack)
        certs = certify_sequential_many(smooth, [x] * pack, config, batch_size=1000, n0=n0,
                                        selection_generators=gens[:pack], estimation_generators=gens[pack:])
        return [(c.prediction, c.radius) for c in certs]

    return Mode(f"control: betting at 2 alpha last={n}", "certify", run,
                lambda problem, against: exact_betting_failure(problem, n0, suite_betting_config(problem.sigma,
                                                                                                  alpha, n), against),
                control=True)


# ------------------------------------------------------------------ the suite's inputs


def worst_case_p(n: int, alpha: float, n0: int = 1, low: float = 0.5, high: float = 0.995) -> float:
    """The p_A in [low, high] (just below a Clopper-Pearson threshold) that maximizes fixed-n CERTIFY's exact
    probability of overestimating the radius (selection with n0 samples included, g = class 0): the hardest
    input for the check, so that the test has power."""
    lower = clopper_pearson_lower_all(n, alpha)
    best_p, best_fail = high, -1.0
    for k in range(1, n + 1):
        p = float(lower[k]) * (1 - 1e-4)
        if not low < p <= high:
            continue
        problem = Problem("probe", (1, 1, 1), 1.0, (0.0,), -float(norm.ppf(p)))
        fail = exact_certify_failure(problem, n0, n, alpha)
        if fail > best_fail:
            best_p, best_fail = p, fail
    return best_p


def _middle_s_for(p_target: float, sigma: float, thresholds: tuple[float, ...], c: int) -> float:
    """Position s right of the centre of class c's interval with p_c(s) = p_target."""
    edges = [-math.inf, *thresholds, math.inf]
    lo, hi = edges[c], edges[c + 1]
    centre = (lo + hi) / 2 if math.isfinite(lo) and math.isfinite(hi) else (hi - 5 * sigma if math.isfinite(hi)
                                                                           else lo + 5 * sigma)

    def p_c(s: float) -> float:
        return float(norm.cdf((hi - s) / sigma) - norm.cdf((lo - s) / sigma))

    if p_c(centre) < p_target:
        raise ValueError("target probability is not reachable for this interval")
    right = centre + 20 * sigma
    return float(brentq(lambda s: p_c(s) - p_target, centre, right, xtol=1e-14))


def standard_problems(n: int, alpha: float, n0: int = 1, quick: bool = False) -> list[Problem]:
    """Linear binary classifiers in 1, 16, 192 and 784 dimensions at several sigma, and 3- and 5-class
    interval classifiers, each placed at the p_A that is hardest for n-sample Clopper-Pearson, plus
    easy inputs (p_A = 0.9, 0.99) for tightness."""
    p_hard = worst_case_p(n, alpha, n0)
    problems: list[Problem] = []
    shapes = [(1, 1, 1), (1, 4, 4), (3, 8, 8)] + ([] if quick else [(1, 28, 28)])
    sigmas = [0.25, 0.5] if quick else [0.12, 1.0]  # the check is scale-free in sigma; two scales suffice
    seed = 0
    for shape in shapes:
        for sigma in sigmas:
            for p_a, tag in ((p_hard, "hard"), (0.9, "p=0.9")) if not quick else ((p_hard, "hard"),):
                seed += 1
                margin = sigma * float(norm.ppf(p_a))
                sign = 1.0 if seed % 2 else -1.0  # alternate which class is g
                problems.append(Problem(f"linear d={int(np.prod(shape))} sigma={sigma} {tag}", shape, sigma,
                                        (0.0,), sign * margin, seed))
    if not quick:
        problems.append(Problem("linear d=16 sigma=0.25 p=0.99", (1, 4, 4), 0.25, (0.0,),
                                0.25 * float(norm.ppf(0.99)), 101))
    # multi-class: class 1 is [-0.75, 0.75] (width 6 sigma at sigma = 0.25), classes 0 and 2 outside
    sigma = 0.25
    three = (-0.75, 0.75)
    problems.append(Problem("3-class d=16 sigma=0.25 hard", (1, 4, 4), sigma, three,
                            _middle_s_for(p_hard, sigma, three, 1), 201))
    five = (-1.0, -0.4, 0.4, 0.55, 1.2)   # a narrow class 3 sits next to the middle class 2
    if not quick:
        problems.append(Problem("3-class d=16 sigma=0.25 p=0.9", (1, 4, 4), sigma, three,
                                _middle_s_for(0.9, sigma, three, 1), 202))
        problems.append(Problem("5-class d=192 sigma=0.25", (3, 8, 8), sigma, five,
                                _middle_s_for(min(p_hard, 0.8), 0.25, five, 2), 203))
    return problems


def predict_problems() -> list[Problem]:
    """Inputs near a tie, where PREDICT is most likely to return the wrong class (the same for every n, alpha)."""
    problems = [Problem("linear d=16 sigma=0.25 near tie", (1, 4, 4), 0.25, (0.0,), 0.25 * 0.01, 301)]
    problems.append(Problem("linear d=1 sigma=0.5 p=0.55", (1, 1, 1), 0.5, (0.0,), -0.5 * float(norm.ppf(0.55)), 302))
    three = (-0.75, 0.75)
    s = float(brentq(lambda v: float(_gap(0.25, three, 1, v)[0]) - 0.002, 0.0, 2.0))
    problems.append(Problem("3-class d=16 sigma=0.25 near tie", (1, 4, 4), 0.25, three, s, 303))
    return problems


# ------------------------------------------------------------------ running the suite


@dataclass(frozen=True)
class Result:
    """Outcome of `trials` independent runs of one mode on one problem (`passed` is decided by `run_problem`)."""

    problem: str
    mode: str
    kind: str
    dims: int
    classes: int
    sigma: float
    p_a: float
    true_radius: float
    bound_radius: float
    alpha: float
    trials: int
    invalid: int                   # wrong class, or radius > true radius of g
    bound_exceeded: int            # wrong class, or radius > sigma * Phi^-1(p_A)
    abstained: int
    exact_rate: float | None       # exact probability of the counted event (bound_exceeded; predict: invalid)
    allowed: int                   # (1 - delta) quantile of Binomial(trials, alpha)
    delta: float                   # false-alarm level of this check
    consistency_pvalue: float | None  # two-sided binomial test of the count against exact_rate
    tightness: float | None        # mean returned radius / true radius over non-abstained certificates
    tightness_bound: float | None  # same, over sigma * Phi^-1(p_A)
    control: bool = False
    seconds: float = 0.0
    passed: bool = False           # sound mode: within alpha and consistent; control: detected as unsound

    @property
    def rate(self) -> float:
        """invalid / trials."""
        return self.invalid / self.trials

    @property
    def checked(self) -> int:
        """The count compared with alpha: predict -> invalid; certify -> bound_exceeded (>= invalid)."""
        return self.invalid if self.kind == "predict" else self.bound_exceeded


def binomial_tolerance(trials: int, alpha: float, delta: float = 1e-3) -> int:
    """Largest invalid count still consistent with a true rate <= alpha: the (1 - delta) quantile of Bin(T, alpha)."""
    return int(binom.ppf(1 - delta, trials, alpha))


def run_problem(problem: Problem, mode: Mode, trials: int, alpha: float, seed: int = 0,
                delta: float = 1e-3) -> Result:
    """Run `mode` `trials` times on `problem` with independent noise (all from `seed`) and count invalid results.

    A sound mode passes when its count is at most `binomial_tolerance(trials, alpha, delta)` and, where
    the exact rate is known, the two-sided binomial test of the count against it has p-value >= delta;
    a control passes when it fails that check.
    """
    if trials < 1:
        raise SmoothAdvError(f"trials must be >= 1, got {trials}")
    model, x = problem.tensors()
    smooth = Smooth(model, problem.num_classes, problem.sigma)
    g, true_r, bound_r = problem.g, problem.true_radius, problem.bound_radius
    gen = torch.Generator().manual_seed(seed)
    invalid = exceeded = abstained = 0
    ratios, ratios_bound = [], []
    started = time.time()
    outcomes: list[Outcome] = []
    while len(outcomes) < trials:
        outcomes.extend(mode.run(smooth, x, g, gen))
    for prediction, radius in outcomes[:trials]:
        if prediction == ABSTAIN:
            abstained += 1
        elif prediction != g:
            invalid += 1
            exceeded += 1
        elif mode.kind == "certify":
            invalid += radius > true_r * (1 + 1e-9)
            exceeded += radius > bound_r * (1 + 1e-9)
            ratios.append(radius / true_r if true_r < math.inf else 0.0)
            ratios_bound.append(radius / bound_r if bound_r > 0 else 0.0)
    checked = invalid if mode.kind == "predict" else exceeded
    exact = mode.exact(problem, "bound") if mode.exact is not None else None
    pvalue = None if exact is None else float(binomtest(checked, trials, min(max(exact, 0.0), 1.0)).pvalue)
    allowed = binomial_tolerance(trials, alpha, delta)
    ok = checked <= allowed and (pvalue is None or pvalue >= delta)
    return Result(
        problem=problem.name, mode=mode.name, kind=mode.kind, dims=int(np.prod(problem.shape)),
        classes=problem.num_classes, sigma=problem.sigma, p_a=problem.p_a, true_radius=true_r, bound_radius=bound_r,
        alpha=alpha, trials=trials, invalid=invalid, bound_exceeded=exceeded, abstained=abstained, exact_rate=exact,
        allowed=allowed, delta=delta, consistency_pvalue=pvalue,
        tightness=float(np.mean(ratios)) if ratios else None,
        tightness_bound=float(np.mean(ratios_bound)) if ratios_bound else None,
        control=mode.control, seconds=time.time() - started, passed=(not ok) if mode.control else ok,
    )


def run_suite(trials: int = 2000, alpha: float = 0.1, n: int = 100, n0: int = 10, seed: int = 0,
              quick: bool = False, include_control: bool = True, progress: Callable[[Result], None] | None = None,
              family_delta: float = 0.01, only: str | None = None) -> list[Result]:
    """Run every certification mode (fixed-n, packed, sequential, betting), PREDICT and the negative controls over
    `standard_problems` / `predict_problems`, `trials` times each; with `only`, just the modes whose name contains
    it (with the seeds they get in the whole suite).

    Each of the 2 m tests of the m checks uses the level family_delta / (2 m) (Bonferroni), so a correct implementation
    fails any check of the whole suite with probability at most `family_delta`.
    """
    if not 0 < alpha < 1:
        raise SmoothAdvError(f"alpha must be in (0, 1), got {alpha}")
    if n < 1 or n0 < 1:
        raise SmoothAdvError("n and n0 must be >= 1")
    if trials < 1:
        raise SmoothAdvError(f"trials must be >= 1, got {trials}")
    modes = [fixed_n_mode(n0, n, alpha), packed_mode(n0, n, alpha), *sequential_modes(alpha, n0, n, quick),
             *betting_modes(alpha, n0, n, quick)]
    if not quick:
        modes += adaptive_selection_modes(alpha, n)
    if include_control:
        modes += [point_estimate_control(n0, n, alpha), betting_double_alpha_control(alpha, n0, n)]
    problems = standard_problems(n, alpha, n0, quick)
    plan: list[tuple[Problem, Mode, int]] = []
    for i, problem in enumerate(problems):
        for j, mode in enumerate(modes):
            if quick and j > 0 and i not in (0, len(problems) - 1):  # quick: other modes on linear and 3-class
                continue
            if mode.control and i > (0 if quick else 2):  # the control only needs to be caught a few times
                continue
            if only is None or only in mode.name:
                plan.append((problem, mode, seed * 1_000_003 + 1000 * i + j))
    pmode = predict_mode(n, alpha)
    for i, problem in enumerate(predict_problems()):
        if only is None or only in pmode.name:
            plan.append((problem, pmode, seed * 1_000_003 + 500_000 + i))
    delta = family_delta / (2 * sum(not mode.control for _, mode, _ in plan))  # two tests per check
    results = []
    for problem, mode, run_seed in plan:
        res = run_problem(problem, mode, trials, alpha, seed=run_seed, delta=delta)
        results.append(res)
        if progress:
            progress(res)
    return results


# ------------------------------------------------------------------ reporting


def summarize(results: Sequence[Result]) -> dict[str, Any]:
    """Pooled figures per mode (controls excluded from the sound totals)."""
    sound = [r for r in results if not r.control]
    by_mode: dict[str, dict[str, float]] = {}
    for r in sound:
        entry = by_mode.setdefault(r.mode, {"trials": 0, "invalid": 0, "bound_exceeded": 0, "worst_rate": 0.0})
        entry["trials"] += r.trials
        entry["invalid"] += r.invalid
        entry["bound_exceeded"] += r.checked
        entry["worst_rate"] = max(entry["worst_rate"], r.checked / r.trials)
    tight = [r.tightness for r in sound if r.tightness is not None and r.kind == "certify"]
    return {
        "trials": sum(r.trials for r in sound), "checks": len(sound), "passed": sum(r.passed for r in sound),
        "alpha": sound[0].alpha if sound else None, "modes": by_mode,
        "controls_detected": sum(r.passed for r in results if r.control),
        "controls": sum(r.control for r in results),
        "mean_tightness": float(np.mean(tight)) if tight else None,
    }


def format_table(results: Sequence[Result]) -> str:
    """A markdown table of the results, one row per (problem, mode)."""
    head = ("| problem | mode | p_A | true R | trials | invalid (R > true) | > sigma Phi^-1(p_A) | exact rate | "
            "allowed | abstain | R / true R | ok |")
    lines = [head, "|" + "---|" * 12]
    for r in results:
        exact = f"{r.exact_rate:.4f}" if r.exact_rate is not None else "-"
        tight = f"{r.tightness:.3f}" if r.tightness is not None else "-"
        true_r = f"{r.true_radius:.4f}" if r.true_radius < math.inf else "inf"
        status = ("detected" if r.passed else "MISSED") if r.control else ("yes" if r.passed else "NO")
        lines.append(f"| {r.problem} | {r.mode} | {r.p_a:.4f} | {true_r} | {r.trials} | "
                     f"{r.invalid} ({r.invalid / r.trials:.4f}) | {r.checked} ({r.checked / r.trials:.4f}) | {exact} | "
                     f"{r.allowed} | {r.abstained / r.trials:.3f} | {tight} | {status} |")
    return "\n".join(lines)


def format_summary(results: Sequence[Result]) -> str:
    """Pooled lines per mode: trials, invalid rate versus alpha, worst input's rate, tightness."""
    summary = summarize(results)
    alpha = summary["alpha"]
    lines = []
    for mode, m in summary["modes"].items():
        kind = "wrong class" if mode.startswith("predict") else "invalid certificates"
        lines.append(f"{mode}: {int(m['trials'])} trials, {kind} {int(m['invalid'])} "
                     f"(rate {m['invalid'] / m['trials']:.4f}; radius > sigma*Phi^-1(p_A) rate "
                     f"{m['bound_exceeded'] / m['trials']:.4f}; worst input {m['worst_rate']:.4f}) vs alpha {alpha}")
    tight = summary["mean_tightness"]
    delta = min((r.delta for r in results if not r.control), default=0.0)
    lines.append(f"checks passed: {summary['passed']}/{summary['checks']} (each: count <= the (1 - {delta:.2g}) "
                 f"quantile of Binomial(trials, alpha), and consistent with the exact rate at level {delta:.2g}; "
                 f"Bonferroni: a correct implementation fails any check with probability <= "
                 f"{2 * delta * summary['checks']:.2g})")
    lines.append(f"negative controls detected: {summary['controls_detected']}/{summary['controls']}")
    if tight is not None:
        lines.append(f"mean tightness (returned radius / true radius, certified trials): {tight:.3f}")
    return "\n".join(lines)


def results_json(results: Sequence[Result]) -> str:
    return json.dumps({"summary": summarize(results), "results": [asdict(r) for r in results]}, indent=2,
                      default=float)


__all__ = [
    "IntervalClassifier", "Mode", "Outcome", "Problem", "Result", "betting_checks", "betting_double_alpha_control",
    "betting_modes", "binomial_tolerance", "clopper_pearson_lower_all", "exact_betting_failure",
    "exact_certify_failure", "exact_predict_failure", "exact_sequential_failure", "fixed_n_mode", "format_summary",
    "format_table", "packed_mode", "point_estimate_control", "predict_mode", "predict_problems", "results_json",
    "run_problem", "run_suite", "selection_probabilities", "sequential_modes", "standard_problems",
    "suite_betting_config", "summarize", "worst_case_p",
]
