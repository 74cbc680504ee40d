"""Certification statistics: confidence bounds, tests, radii and certified-accuracy curves.

Pure functions over numbers and NumPy arrays (no torch), so every one of them can be checked
against a closed form. Paper: Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via
Randomized Smoothing", ICML 2019 (https://arxiv.org/abs/1902.02918), Theorem 1 and Section 3.2.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import numpy as np
from scipy.special import gammaln
from scipy.stats import beta, binom, binomtest, norm, t

__all__ = [
    "ABSTAIN", "average_certified_radius", "binom_pvalue", "certified_accuracy", "certified_radius",
    "clopper_pearson_interval", "clopper_pearson_lower", "clopper_pearson_upper", "high_prob_certified_accuracy",
    "holm_adjust", "max_certifiable_radius", "mcnemar_exact", "mean_interval", "radius_grid",
]

ABSTAIN: int = -1
"""The prediction of a smoothed classifier that abstains (its test did not reject; Cohen et al.'s ABSTAIN).
Defined here, free of torch, so result files can be read without it; `smoothing` re-exports it."""


def _check_counts(k: int, n: int) -> None:
    if n < 1:
        raise ValueError(f"sample count n must be >= 1, got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"success count k must be in [0, n={n}], got {k}")


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower confidence bound on a binomial proportion.

    Guarantee: if k ~ Binomial(n, p), then P(clopper_pearson_lower(k, n, alpha) <= p) >= 1 - alpha.
    Equals the alpha-quantile of Beta(k, n - k + 1); 0 when k = 0; alpha ** (1 / n) when k = n.
    This is the bound of Cohen et al.'s CERTIFY (their code obtains it as the lower end of a
    two-sided interval at level 1 - 2 alpha, which is the same number).
    """
    _check_counts(k, n)
    _check_alpha(alpha)
    if k == 0:
        return 0.0
    if k == n:
        return float(alpha ** (1.0 / n))
    if alpha >= 1e-40:  # scipy's quantile is accurate to ~1e-10 in the tail here
        with contextlib.suppress(ArithmeticError):
            bound = float(beta.ppf(alpha, k, n - k + 1))
            if math.isfinite(bound):
                return bound
    # extreme alpha: beta.ppf is unreliable (NaN, or too large). P(Bin(n, p) >= k) <= C(n, k) p^k, so the root
    # (alpha / C(n, k))^(1/k) of the right side is a valid (smaller, conservative) lower confidence bound
    log_choose = gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)
    return float(math.exp((math.log(alpha) - log_choose) / k))


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper confidence bound on a binomial proportion.

    Guarantee: P(clopper_pearson_upper(k, n, alpha) >= p) >= 1 - alpha. Equals 1 - (alpha) ** (1/n)
    when k = 0 and 1 when k = n.
    """
    _check_counts(k, n)
    _check_alpha(alpha)
    if k == n:
        return 1.0
    return 1.0 - clopper_pearson_lower(n - k, n, alpha)


def clopper_pearson_interval(k: int | np.ndarray, n: int, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided Clopper-Pearson (exact) confidence interval at `level` for a binomial proportion k / n.

    Guarantee: if k ~ Binomial(n, p), then P(low <= p <= high) >= level. low is the (1 - level) / 2
    quantile of Beta(k, n - k + 1) (0 when k = 0), high the (1 + level) / 2 quantile of Beta(k + 1,
    n - k) (1 when k = n): the one-sided bounds above, each at (1 - level) / 2. `k` may be an array
    (one interval per entry); returns (low, high) as float arrays of k's shape.
    """
    if n < 1:
        raise ValueError(f"sample count n must be >= 1, got {n}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    counts = np.asarray(k)
    if np.any(counts < 0) or np.any(counts > n) or np.any(counts != np.round(counts)):
        raise ValueError(f"success counts must be integers in [0, n={n}]")
    tail = (1.0 - level) / 2
    with np.errstate(all="ignore"):
        low = np.where(counts == 0, 0.0, beta.ppf(tail, np.maximum(counts, 1), n - counts + 1))
        high = np.where(counts == n, 1.0, beta.ppf(1 - tail, counts + 1, np.maximum(n - counts, 1)))
    return np.asarray(low, dtype=float), np.asarray(high, dtype=float)


def binom_pvalue(k: int, n: int, p: float = 0.5) -> float:
    """Exact two-sided binomial test p-value of k successes in n trials under success rate p.

    PREDICT (Cohen et al., Algorithm "PREDICT") abstains unless this p-value for the top class's
    count among the top two classes' counts is at most alpha (Hung & Fithian, arXiv:1610.03944).
    An empty test (n = 0) has p-value 1.
    """
    if n == 0:
        return 1.0
    _check_counts(k, n)
    return float(binomtest(k, n, p).pvalue)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar test of two classifiers evaluated on the same examples (the sign test on the
    discordant examples).

    `only_a` examples are right under A and wrong under B, `only_b` the reverse; the examples both get right
    or both get wrong say nothing about which is better and do not enter. Under the null hypothesis that A
    and B are equally accurate on the population the examples come from, each discordant example is A's
    with probability 1/2, so only_a ~ Binomial(only_a + only_b, 1/2) and the p-value is
    min(1, 2 P(Binomial(only_a + only_b, 1/2) <= min(only_a, only_b))). No discordant example: 1.
    """
    if only_a < 0 or only_b < 0 or only_a != int(only_a) or only_b != int(only_b):
        raise ValueError(f"discordant counts must be integers >= 0, got {only_a} and {only_b}")
    total = int(only_a) + int(only_b)
    if total == 0:
        return 1.0
    return float(min(1.0, 2.0 * binom.cdf(min(only_a, only_b), total, 0.5)))


def holm_adjust(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of several p-values (one family): rejecting each hypothesis whose adjusted
    p-value is <= a level keeps the probability of any false rejection <= that level, whatever the
    dependence between the tests. With the p-values sorted ascending, p_(1) <= ... <= p_(m), the adjusted
    value of p_(i) is max over j <= i of min(1, (m - j + 1) p_(j)); returned in the input's order."""
    values = np.asarray(pvalues, dtype=float)
    if values.ndim != 1 or np.any(~np.isfinite(values)) or np.any((values < 0) | (values > 1)):
        raise ValueError("p-values must be a list of numbers in [0, 1]")
    order = np.argsort(values, kind="stable")
    count = len(values)
    stepped = np.minimum(1.0, (count - np.arange(count)) * values[order])
    adjusted = np.empty(count)
    adjusted[order] = np.maximum.accumulate(stepped) if count else stepped
    return adjusted


def mean_interval(values: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student t interval at `level` of the mean of independent values, mean +- t
    s / sqrt(N) with s the sample standard deviation and t the (1 + level) / 2 quantile of t with N - 1
    degrees of freedom. Approximate (the values' mean is about normal for large N); for the paired
    difference of two models' certified radii over the same test images, bounded numbers, with N in the
    hundreds. ValueError for fewer than 2 values."""
    data = np.asarray(values, dtype=float)
    if data.ndim != 1 or data.size < 2 or not np.all(np.isfinite(data)):
        raise ValueError("the interval of a mean needs at least 2 finite values")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    mean = float(data.mean())
    half = float(t.ppf((1 + level) / 2, data.size - 1) * data.std(ddof=1) / math.sqrt(data.size))
    return mean, mean - half, mean + half


def certified_radius(p_lower: float, sigma: float) -> float:
    """Certified L2 radius sigma * Phi^-1(p_lower) of Cohen et al.'s Theorem 1 (p_B = 1 - p_A).

    Returns 0.0 when p_lower <= 1/2 (no certificate). The radius is in the units of the input
    space in which the Gaussian noise is added ([0, 1] pixels in this library).
    """
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
    if not 0.0 <= p_lower <= 1.0:
        raise ValueError(f"p_lower must be in [0, 1], got {p_lower}")
    if p_lower <= 0.5:
        return 0.0
    return float(sigma * norm.ppf(p_lower))


def max_certifiable_radius(n: int, alpha: float, sigma: float) -> float:
    """Largest radius CERTIFY can return with n estimation samples: sigma * Phi^-1(alpha^(1/n))."""
    return certified_radius(clopper_pearson_lower(n, n, alpha), sigma)


def radius_grid(top: float, step: float) -> list[float]:
    """The radii 0, step, 2 step, ..., k step with k = floor(top / step + 1e-9): every multiple of `step` up to
    `top`, a multiple within 1e-9 steps below `top` included (so float noise in `top` keeps its column).

    Each radius is `round(i * step, 10)`, so 0.1 * 3 is 0.3. Empty when top < 0; ValueError unless step is
    finite and > 0 and top is finite.
    """
    if not (step > 0 and math.isfinite(step)):
        raise ValueError(f"step must be a finite number > 0, got {step}")
    if not math.isfinite(top):
        raise ValueError(f"top must be a finite number, got {top}")
    return [round(i * step, 10) for i in range(int(math.floor(top / step + 1e-9)) + 1)]


def certified_accuracy(
    radius: np.ndarray | Sequence[float], correct: np.ndarray | Sequence[int], radii: np.ndarray | Sequence[float]
) -> np.ndarray:
    """Approximate certified accuracy at each radius in `radii`.

    The fraction of rows with correct == 1 and radius >= r (Cohen et al., Section 4). Abstentions
    have correct == 0 and therefore never count. Returns an array of len(radii).
    """
    radius_a = np.asarray(radius, dtype=float)
    correct_a = np.asarray(correct, dtype=bool)
    radii_a = np.asarray(radii, dtype=float)
    if radius_a.shape != correct_a.shape:
        raise ValueError("radius and correct must have the same length")
    if radius_a.size == 0:
        raise ValueError("no rows to compute certified accuracy on")
    ok = (radius_a[None, :] >= radii_a[:, None]) & correct_a[None, :]
    return ok.mean(axis=1)


def average_certified_radius(radius: np.ndarray | Sequence[float], correct: np.ndarray | Sequence[int]) -> float:
    """Average certified radius (ACR, Zhai et al. 2020): mean of radius * correct over all rows."""
    radius_a = np.asarray(radius, dtype=float)
    correct_a = np.asarray(correct, dtype=float)
    if radius_a.size == 0:
        raise ValueError("no rows to compute the average certified radius on")
    return float(np.mean(radius_a * correct_a))


def high_prob_certified_accuracy(
    radius: np.ndarray | Sequence[float],
    correct: np.ndarray | Sequence[int],
    radii: np.ndarray | Sequence[float],
    alpha: float = 0.001,
    rho: float = 0.001,
) -> np.ndarray:
    """Cohen et al.'s finite-sample correction of certified accuracy (their Appendix, Figure "high_prob").

    Returns acc(r) - alpha - sqrt(alpha (1 - alpha) ln(1/rho) / N) - ln(1/rho) / (3 N), with N the
    number of rows. Guarantee: with probability >= 1 - rho over the certification randomness, the
    smoothed classifier's true certified accuracy on these N points is at least this value
    (Bernstein's inequality on the per-point failure indicators, each failing with prob <= alpha).
    """
    _check_alpha(alpha)
    _check_alpha(rho)
    acc = certified_accuracy(radius, correct, radii)
    count = len(np.asarray(radius))
    log_term = math.log(1.0 / rho)
    return acc - alpha - math.sqrt(alpha * (1 - alpha) * log_term / count) - log_term / (3 * count)
