"""Anytime-valid certification by betting: a confidence sequence for the class's vote probability.

The tested class c's votes X_1, X_2, ... are i.i.d. Bernoulli(p), p = P(f(x + delta) = c). For a
threshold q (the radius sigma * Phi^-1(q)), a gambler bets against H0(q): p <= q. With a constant
bet lambda = u / q (u in (0, 1]: the share of the wealth put at risk) the wealth after t votes is

    K_t(q; u) = prod_i (1 + (u / q) (X_i - q)) = (1 + u (1 - q) / q)^S_t * (1 - u)^F_t,

S_t votes for c and F_t = t - S_t against. The test uses a fixed mixture of such gamblers,
M_t(q) = sum_k w_k K_t(q; u_k) with weights w_k >= 0 summing to 1 (`DEFAULT_BETS`). Fixed-mixture
betting: the mixture is itself one gambler whose bet at each vote is the wealth-weighted mean of
the u_k / q, a predictable bet, as the Kelly/Krichevsky-Trofimov plug-in bettors are.

Guarantee (Ville's inequality). Under H0(q) each factor has mean 1 + (u / q)(p - q) <= 1 and is
>= 0, so K_t(q; u), and the mixture M_t(q), are non-negative supermartingales with M_0 = 1, and
Ville's inequality gives P(exists t: M_t(q) >= 1 / a) <= a: at every sample size at once, so for
every stopping rule, including rules that look at the votes, stop at any sample or only at the
end of a batch. For fixed (S, F), M_t(q) decreases strictly in q (each factor
(1 + u (1 - q) / q) does and (1 - u)^F does not depend on q), so the set of thresholds the test has
rejected by time t is an interval (0, L_t): L_t = max over s <= t of the root a_s of
M_s(q) = 1 / a. L_t is a lower confidence sequence: if p < L_t then M_s(p) >= M_s(a_s) = 1 / a for
some s <= t, an event of probability at most a under the true p (apply Ville to q = p, where M(p)
is a martingale). Hence P(exists t: p < L_t) <= a, with no union bound over thresholds, radii or
sample sizes: one level, exactly as stated.

The procedure spends alpha on two parts (`final_share` = eta):

- the betting confidence sequence at level a = (1 - eta) alpha, checked after every `step`
  votes (every `coarse` votes past `coarse`);
- if the test reaches its last sample size N (`last`), one Clopper-Pearson bound at level
  eta alpha on the N votes. It restores fixed n's resolution for inputs whose rate sits at a
  radius (a betting test needs about twice the samples for the same resolution at a fixed n, the
  price of validity at every n); eta = 0 is the pure betting test.

The certificate uses p_lower = max(L_t, the final bound if made). By the union bound, both
bounds hold at once with probability >= 1 - (1 - eta) alpha - eta alpha = 1 - alpha, whatever
rule stopped the test. So the result is ABSTAIN or, with probability >= 1 - alpha, g(x) = c and g
is constant on the L2 ball of radius sigma * Phi^-1(p_lower) (Cohen, Rosenfeld & Kolter 2019,
Theorem 1). The level is alpha: Ville's bound 1 / a with a = (1 - eta) alpha, no factor 2.

Stopping policies are those of `smoothadv.sequential` (grid, single radius, tolerance, full),
judged at the end of each draw: a radius is settled once certified, or once it is out of reach
for the optimistic forecast (the radius the last sample size would give if the vote rate were
the Clopper-Pearson upper bound at `forecast_alpha`); the forecast is made only at the doubling
sample sizes 4 first, 8 first, ... and at the last (a forecast at every draw, or from a few dozen
votes, would stop inputs at a radius's boundary too often: no effect on validity, but a bias
against fixed n).
Draws: `first` votes at a time up to `coarse` (= 16 first), then `coarse` up to 8 coarse, then
the largest power-of-two multiple of `coarse` at most an eighth of the votes so far; each draw is
split into segments of `step` (= first / 4) votes up to `coarse`, then `coarse`, whose counts the
test checks one by one. The schedule depends only on the config, so the noise an input gets is
the same whichever inputs are certified together.

References: Ville (1939); Waudby-Smith & Ramdas, "Estimating means of bounded random variables by
betting" (JRSS-B 2024); Voracek, "Treatment of statistical estimation problems in randomized
smoothing" (NeurIPS 2024), which certifies one radius with a betting sequence (re-derived here, not
ported: its released code tests at 2 alpha). The validity suite (`smoothadv validity`) checks this
test against its exact failure probability (`validity.exact_betting_failure`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any, NamedTuple

import numpy as np
from scipy.optimize import brentq
from scipy.special import ndtr, ndtri

from .errors import SmoothAdvError
from .sequential import SequentialResult, _unanimous_look, check_test_settings, standard_radii
from .settings import DEFAULT_BETS, DEFAULT_LOOKS, BettingSettings
from .smoothing import Smooth
from .stats import clopper_pearson_lower, clopper_pearson_upper

# The mixture `settings.DEFAULT_BETS`, (u, weight) of the gamblers: half the weight goes all in (u = 1: the wealth
# grows by 1 / q per agreeing vote and dies at the first other vote: the fastest test of a unanimous input, which pays
# only ln 2 for the mixture), a fifth to near-unanimous bets, the rest to ten bets u = 1/2 ... 1/1024 for rates near
# the threshold. Fixed before sampling, the same for every threshold (which keeps M_t(q) monotone in q).

Z_RANGE = (-8.0, 8.5)
"""Range of Phi^-1(q) searched for the confidence bound (Phi(8.5) = 1 - 1e-17: no test reaches it)."""


def betting_last(alpha: float, final_share: float, step: int, reference: Sequence[int] = DEFAULT_LOOKS) -> int:
    """The last sample size: where all-agreeing votes reach the cap of `reference` (the doubling looks
    1024..131072 at alpha / 8 by default: 3.813 sigma) with the final Clopper-Pearson look at final_share
    alpha, as a multiple of `step` (111,616 at alpha = 0.001, final_share 1/2); `reference[-1]` for the
    pure betting test (final_share = 0)."""
    if final_share == 0:
        return int(reference[-1])
    cap = clopper_pearson_lower(reference[-1], reference[-1], alpha / len(reference))
    return _unanimous_look(cap, alpha * final_share, step)


class BettingSchedule(NamedTuple):
    """What a betting test does beyond its fields: its largest number of votes and the radii its grid settles."""

    last: int
    radii: tuple[float, ...]


@dataclass(frozen=True)
class BettingConfig(BettingSettings):
    """An anytime-valid betting test (see the module docstring for the guarantee).

    Args:
        sigma: noise level; must be the `Smooth`'s (the drivers refuse a mismatch).
        alpha: total failure probability.
        policy, radii, tolerance, forecast_alpha: as `sequential.SequentialConfig` (None forecast: at alpha).
        first: votes per draw at first (the first forecast is at 4 first); checks every first / 4 votes up
            to coarse = 16 first, then every coarse votes.
        last: largest number of estimation votes (None: `betting_last`, 111,616 at alpha = 0.001).
        final_share: share eta of alpha spent on one Clopper-Pearson bound at `last` (0: pure betting).
        bets: the mixture, (u, weight) pairs with u in (0, 1] and weights summing to 1.
        selection: how the tested class is chosen from the selection samples, as `SequentialConfig`'s
            ("adaptive", the default, or "fixed": Cohen's n0).

    The fields keep what was passed; `schedule` is what the test does (`last` resolved, and the grid's
    radii: the standard radii up to the cap when none are given), checked at construction.
    """

    sigma: float
    alpha: float = 0.001

    MODE = "betting"

    def __post_init__(self) -> None:
        check_test_settings(self)
        super().__post_init__()
        if self.first < 4 or self.first % 4:
            raise SmoothAdvError(f"first must be a multiple of 4, got {self.first}")
        if not self.bets or any(not 0.0 < u <= 1.0 or not w >= 0.0 for u, w in self.bets) \
                or abs(sum(w for _, w in self.bets) - 1.0) > 1e-9:
            raise SmoothAdvError("bets must be (u, weight) pairs with u in (0, 1], weights >= 0 summing to 1")
        if self.schedule.last < self.first:
            raise SmoothAdvError(f"last must be >= first = {self.first}, got {self.schedule.last}")

    @cached_property
    def schedule(self) -> BettingSchedule:
        """The largest number of votes (`last`, or `betting_last`) and the radii the grid policy settles (sorted)."""
        last = betting_last(self.alpha, self.final_share, self.coarse) if self.last is None else int(self.last)
        radii = tuple(sorted(self.radii))
        if self.policy == "grid" and not radii:
            cap = self._max_radius(last)
            radii = tuple(r for r in standard_radii(self.sigma, self.alpha) if r <= cap + 1e-12)
        return BettingSchedule(last, radii)

    @classmethod
    def for_smooth(cls, smooth: Smooth, **settings: Any) -> BettingConfig:
        """The config for certifying with `smooth`: its sigma, and `settings` for the other fields."""
        if "sigma" in settings:
            raise SmoothAdvError("BettingConfig.for_smooth takes sigma from the smoothed classifier; do not pass it")
        return cls(smooth.sigma, **settings)

    @property
    def step(self) -> int:
        """Votes between checks below `coarse`."""
        return self.first // 4

    @property
    def coarse(self) -> int:
        """From this many votes on, checks (and draws) come every `coarse` votes or more."""
        return 16 * self.first

    @property
    def threshold(self) -> float:
        """ln(1 / a): the betting sequence rejects q once ln M_t(q) reaches it (a = (1 - eta) alpha)."""
        return math.log(1.0 / ((1.0 - self.final_share) * self.alpha))

    @cached_property
    def draws(self) -> tuple[int, ...]:
        """Cumulative votes at the end of each draw (the sizes at which the test may stop)."""
        ends, n = [], 0
        last = self.schedule.last
        while n < last:
            if n < self.coarse:
                n += self.first
            elif n < 8 * self.coarse:
                n += self.coarse
            else:
                n += self.coarse * 2 ** int(math.log2(n / (8 * self.coarse)))
            n = min(n, last)
            ends.append(n)
        return tuple(ends)

    @cached_property
    def forecasts(self) -> frozenset[int]:
        """Sizes at which the reachable radius is forecast: 4 first * 2^j and the last (none earlier: a forecast
        from a few dozen votes stops too many inputs that fixed n would certify)."""
        last = self.schedule.last
        out, n = {last}, 4 * self.first
        while n < last:
            out.add(n)
            n *= 2
        return frozenset(out)

    def checks(self, start: int, end: int) -> tuple[int, ...]:
        """Cumulative votes at which the wealth is checked in the draw from `start` to `end`."""
        out, n = [], start
        while n < end:
            n = min(end, (n // self.step + 1) * self.step if n < self.coarse else (n // self.coarse + 1) * self.coarse)
            out.append(n)
        return tuple(out)

    @property
    def max_radius(self) -> float:
        """Largest certifiable radius: all `last` votes agree (betting sequence or the final look)."""
        return self._max_radius(self.schedule.last)

    def _max_radius(self, last: int) -> float:
        z = max(_bound_z(np.array([last]), np.array([0]), self), _final_z(last, last, self, last))
        return float(self.sigma * z)

    def start(self) -> BettingTest:
        """A fresh test with this config."""
        return BettingTest(self)


def _mixture(config: BettingConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, ln w, ln(1 - u)) of the config's bets (ln 0 = -inf)."""
    return _mixture_of(config.bets)


@lru_cache(maxsize=64)
def _mixture_of(bets: tuple[tuple[float, float], ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u = np.array([b for b, _ in bets])
    with np.errstate(divide="ignore"):
        return u, np.log(np.array([w for _, w in bets])), np.log1p(-u)


def log_wealth(successes: np.ndarray | Sequence[int], failures: np.ndarray | Sequence[int], z: float,
               config: BettingConfig) -> np.ndarray:
    """ln M_t(q) at q = Phi(z) for each count (S, F) of the arrays (any shape): the test's own arithmetic."""
    s = np.asarray(successes)
    return _Wealth(s.ravel(), np.asarray(failures).ravel(), config).logs(z).reshape(s.shape)


class _Wealth:
    """ln M(S_k, F_k; q) at given counts, fast for one q at a time (the root search's inner loop)."""

    def __init__(self, successes: np.ndarray, failures: np.ndarray, config: BettingConfig) -> None:
        u, log_w, fail = _mixture(config)
        self.u = u
        self.s = np.asarray(successes, float)[:, None]
        f = np.asarray(failures, float)[:, None]
        with np.errstate(invalid="ignore"):
            self.base = log_w + np.where(f > 0, f * fail, 0.0)  # u = 1 with no failure: (1 - u)^0 = 1

    def logs(self, z: float) -> np.ndarray:
        """ln M at q = Phi(z), one value per count."""
        ratio = math.erfc(z / _SQRT2) / math.erfc(-z / _SQRT2)  # (1 - q) / q, accurate near q = 1
        terms = self.base + self.s * np.log1p(self.u * ratio)
        top = terms.max(axis=1)
        with np.errstate(invalid="ignore"):
            logs = top + np.log(np.exp(terms - top[:, None]).sum(axis=1))
        return np.where(np.isnan(logs), -np.inf, logs)  # every gambler broke (all in, a failure): -inf - -inf

    def max_log(self, z: float) -> float:
        """max over the counts of ln M at q = Phi(z)."""
        return float(self.logs(z).max())


_SQRT2 = math.sqrt(2.0)


def _bound_z(successes: np.ndarray, failures: np.ndarray, config: BettingConfig,
             floor: float = -math.inf) -> float:
    """Phi^-1 of the largest threshold the betting sequence rejects at any of the given counts (S, F), if it is
    above `floor` (else -inf).

    max_k ln M(S_k, F_k; q) decreases in q, so its root is the largest of the per-check roots: one Brent root
    search on z = Phi^-1(q) over `Z_RANGE`, then a step down to a threshold that is rejected, so the result
    is valid (and within about 1e-12 of the root).
    """
    thr = config.threshold
    keep = successes > 0
    if not keep.any():
        return -math.inf
    wealth = _Wealth(successes[keep], failures[keep], config)

    def excess(z: float) -> float:
        return wealth.max_log(z) - thr

    lo, hi = max(floor, Z_RANGE[0]), Z_RANGE[1]
    if excess(lo) < 0:
        return -math.inf
    if excess(hi) >= 0:
        return hi
    root, gap = brentq(excess, lo, hi, xtol=1e-13), 1e-13
    while root > lo and excess(root) < 0:  # keep the rejected side
        root, gap = max(lo, root - gap), 2 * gap
    return root


def _final_z(successes: int, n: int, config: BettingConfig, last: int | None = None) -> float:
    """Phi^-1 of the final Clopper-Pearson bound at level final_share * alpha, made at the last size (`last`,
    default the config's); -inf if there is none."""
    if config.final_share == 0 or n != (config.schedule.last if last is None else last) or successes == 0:
        return -math.inf
    return float(ndtri(clopper_pearson_lower(successes, n, config.final_share * config.alpha)))


class BettingTest:
    """State of one betting test. Use: while `next_segments()` is not empty, draw that many votes per
    segment and pass the class's count in each to `update_segments`; then read `result()`.

    The stopping rules need only which thresholds were rejected at the grid radii and at 1/2 (checked
    exactly as the counts come in); the continuous bound L_t (a root search over every check) is
    computed when it is read (`z`, `radius`, `result()`, and each draw for the tolerance policy).
    """

    def __init__(self, config: BettingConfig) -> None:
        self.config = config
        self.successes = 0
        self.n = 0
        self.draws = 0
        self.certified = False       # H0(1/2) rejected: the class is g(x), with probability >= 1 - alpha
        self.grid_radius = 0.0       # largest radius of config.radii whose threshold was rejected (0: none)
        self.reach = math.inf        # Phi^-1 of the last forecast's reachable bound
        self.stop: str | None = None
        self._z = -math.inf          # Phi^-1 of the bound from the checks folded in so far
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # counts at checks not yet folded into _z
        self._checks: tuple[int, ...] = ()

    @property
    def done(self) -> bool:
        return self.stop is not None

    def next_draw(self) -> int:
        """Votes in the next draw (0 once stopped)."""
        return 0 if self.done else self.config.draws[self.draws] - self.n

    def next_segments(self) -> tuple[int, ...]:
        """The next draw, split at the sizes where the wealth is checked (empty once stopped)."""
        if self.done:
            return ()
        self._checks = self.config.checks(self.n, self.config.draws[self.draws])
        return tuple(int(d) for d in np.diff((self.n, *self._checks)))

    def update_segments(self, counts: Sequence[int]) -> None:
        """Record the class's votes in each segment of `next_segments()` and check the wealth after each."""
        if self.done:
            raise SmoothAdvError("the betting test has already stopped")
        sizes = np.diff((self.n, *self._checks))
        given = np.asarray([int(c) for c in counts])
        if len(given) != len(sizes) or (given < 0).any() or (given > sizes).any():
            raise SmoothAdvError(f"expected one count in [0, size] for each of the segments {sizes.tolist()}")
        config = self.config
        successes = self.successes + np.cumsum(given)
        failures = np.asarray(self._checks) - successes
        self._pending.append((successes, failures))
        wealth = _Wealth(successes, failures, config)
        self.certified = self.certified or wealth.max_log(0.0) >= config.threshold
        for r in config.schedule.radii:  # thresholds decreasing in the wealth: stop at the first one not rejected
            if r <= self.grid_radius or r == 0:
                continue
            if not self.certified or wealth.max_log(r / config.sigma) < config.threshold:
                break
            self.grid_radius = r
        self.successes = int(successes[-1])
        self.n = int(self._checks[-1])
        self.draws += 1
        if self.n == config.schedule.last and config.final_share:
            final = _final_z(self.successes, self.n, config)
            self._z = max(self._z, final)
            self.certified = self.certified or final > 0
            self.grid_radius = max([self.grid_radius, *(r for r in config.schedule.radii if r <= config.sigma * final)])
        if self.n >= config.schedule.last:
            self.stop = "last look"
        elif config.policy == "full":
            return
        else:
            if self.n in config.forecasts:
                upper = clopper_pearson_upper(self.successes, self.n, config.forecast_alpha or config.alpha)
                if upper <= 0.5 and not self.certified:
                    self.stop = "futile"
                    return
                self.reach = self.reachable_z(upper)
            if self._settled():
                self.stop = "settled"

    @property
    def z(self) -> float:
        """Phi^-1(p_lower): the confidence sequence's bound over every check so far, and the final look's."""
        if self._pending:
            s = np.concatenate([a for a, _ in self._pending])
            f = np.concatenate([b for _, b in self._pending])
            self._z = max(self._z, _bound_z(s, f, self.config, self._z))
            self._pending.clear()
        return self._z

    def reachable_z(self, upper: float) -> float:
        """Phi^-1 of the bound the last size would give if its vote fraction were `upper`."""
        last = self.config.schedule.last
        k = min(last, math.ceil(upper * last))
        if k == 0:
            return -math.inf
        return max(_bound_z(np.array([k]), np.array([last - k]), self.config), _final_z(k, last, self.config))

    @property
    def radius(self) -> float:
        """The certified radius so far (0 when not certified)."""
        if not self.certified:
            return 0.0
        return max(self.config.sigma * self.z, self.grid_radius, 0.0)

    def _settled(self) -> bool:
        tolerance = self.config.policy == "tolerance"
        radius = (self.radius if tolerance else self.grid_radius) if self.certified else -1.0
        reachable = max(self.config.sigma * self.reach if self.reach > 0 else -1.0, radius)
        if tolerance:
            return reachable - max(radius, 0.0) <= self.config.tolerance
        return all((self.certified and radius >= r) or reachable < r for r in self.config.schedule.radii)

    def result(self) -> SequentialResult:
        z = self.z
        p_lower = float(ndtr(z)) if self.certified else float(ndtr(min(z, 0.0))) if z > -math.inf else 0.0
        return SequentialResult(self.certified, self.radius, p_lower, self.successes, self.n, self.draws,
                                self.stop or "running")


def run_betting(config: BettingConfig, sample: Callable[[tuple[int, ...]], Sequence[int]]) -> SequentialResult:
    """Run one test; `sample(sizes)` draws each segment's votes and returns how many voted for the class in each."""
    test = config.start()
    while segments := test.next_segments():
        test.update_segments(sample(segments))
    return test.result()


__all__ = ["BettingConfig", "BettingTest", "DEFAULT_BETS", "betting_last", "log_wealth", "run_betting"]
