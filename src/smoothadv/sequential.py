"""Sequential certification: Cohen et al.'s CERTIFY with far fewer samples and the same guarantee.

Group-sequential Clopper-Pearson (GS-CP). The counts of the tested class c are looked at after
N_1 < N_2 < ... < N_K samples (a schedule fixed before sampling); samples are reused across looks.
At look j the one-sided Clopper-Pearson lower bound L_j is computed at level alpha_j, with
alpha_1 + ... + alpha_K <= alpha, and the certificate uses the largest L_j seen. Schedules:

- explicit looks (e.g. 1024 * 2^j up to 131,072, K = 8): alpha_j = alpha / K;
- the grid policy's default, `fitted_schedule` (alpha spending): the doubling looks below the last,
  a look where unanimous votes first certify the largest grid radius (alpha / 4) and a last look
  sized to keep the doubling schedule's cap (alpha / 2; 111,616 samples at alpha = 0.001); the
  other looks share alpha / 4.

Guarantee (union bound): each L_j <= p_c fails with probability at most alpha_j, so with
probability at least 1 - alpha *all* K bounds hold at once, whatever rule decides when to stop.
So the result is ABSTAIN or, with probability >= 1 - alpha, g(x) = c and g is constant on the
L2 ball of the returned radius sigma * Phi^-1(max_j L_j) (Cohen, Rosenfeld & Kolter, ICML 2019,
Theorem 1). The stopping policy changes the cost and the power, never the validity. The
largest radius at the last look, sigma * Phi^-1((alpha/8)^(1/131072)) = 3.813 sigma at
alpha = 0.001 (the fitted schedule's last look is sized to keep it), matches fixed n = 100,000's
3.811 sigma.

Stopping policies (all stop at the last look):
- `grid` (with `radii`): stop once the answer "certified at r or not" is settled for every r in
  `radii`: either the radius already reaches r, or r is out of reach, judged optimistically by
  the radius the last look would give if the class's rate were the current upper bound U_j
  (Clopper-Pearson at level `forecast_alpha`, 0.05 by default, or the look's alpha_j for the
  strict forecast). One radius is the single-radius policy.
- `tolerance`: stop once that optimistic reachable radius is within `tolerance` of the current one.
- `full`: every look (Cohen-equivalent radius; costs N_K samples).
- futility (all but `full`): stop when U_j <= 1/2 (no certificate is reachable).

Class: "selection" chooses it from at most n0 separate selection samples, discarded, from a
separate noise stream, and is what a deployed classifier must use: by default adaptively (16 at a
time, stopping as soon as they are unanimous, else Cohen's argmax of all n0; `selection_step`),
or with `selection="fixed"` as Cohen's argmax of n0. Any rule that reads only the selection votes
keeps the level: the estimation samples are independent of them, so the test's guarantee holds
for whichever class is tested. "label" tests the known label directly (evaluation only, no
selection samples): a certificate then says the label is g(x) and robust, and ABSTAIN means "not
certified" (g(x) may or may not be the label).

References: Cohen et al. 2019 (arXiv:1902.02918); the look schedule with a Bonferroni split is
the classical group-sequential design (Pocock 1977), and spending more of alpha on chosen looks is
alpha spending (Lan & DeMets 1983); multi-stage sampling for randomized
smoothing: Horvath et al., ICLR 2022.

The counts-level logic (`SequentialConfig`, `SequentialTest`, `run_sequential`) uses no network,
so it is tested against Bernoulli samplers with known p; `certify_sequential` and
`certify_sequential_dataset` drive it with a base classifier through `PackedSampler` and return a
`SequentialCertificate`, a `smoothing.Certificate` (same fields, same `n0`/`n`/`samples` meaning).
The drivers take any config whose `start()` makes a test with `next_segments()` / `update_segments()`:
this module's, or the anytime-valid betting test of `smoothadv.betting` (`certify --test betting`),
which checks its wealth inside each draw and so asks for the counts of several segments per draw.

Sigma has one source: the radius sigma * Phi^-1(.) must use the sigma of the noise, so the drivers
refuse a config whose sigma is not the smoothed classifier's (`SequentialConfig.for_smooth`
builds a config with it).
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

import torch
from scipy.stats import norm
from torch.utils.data import Dataset

from .errors import SmoothAdvError
from .evaluate import CERTIFY_COLUMNS, _load_example, format_time
from .seeds import split_generator, stream_seed
from .settings import DEFAULT_LOOKS, SpendingSettings
from .smoothing import ABSTAIN, Certificate, PackedSampler, SampleRequest, Smooth, check_generator
from .stats import certified_radius, clopper_pearson_lower, clopper_pearson_upper, radius_grid

if TYPE_CHECKING:
    from .betting import BettingConfig

__all__ = [
    "AnyConfig", "CLASS_FROM", "LEGACY_SEQUENTIAL_COLUMNS", "SELECTION_CHUNK", "SEQUENTIAL_COLUMNS", "Schedule",
    "SequentialCertificate", "SequentialConfig", "SequentialResult", "SequentialRow", "SequentialTest",
    "certify_sequential", "certify_sequential_dataset", "certify_sequential_many", "check_same_sigma",
    "check_test_settings", "doubling_looks", "fitted_schedule", "run_sequential", "select_classes",
    "selection_step", "sequential_columns", "standard_radii", "stream_generator",
]

CLASS_FROM = ("selection", "label")
SELECTION_CHUNK = 16
"""Adaptive selection draws its votes this many at a time (up to n0) and stops once they are unanimous."""
SEQUENTIAL_COLUMNS = (*CERTIFY_COLUMNS, "samples", "mode")
"""Cohen's six columns, then `samples` (noisy forward passes used for the row: n0 selection plus n estimation
samples, `SequentialRow.samples` and `Certificate.samples`) and `mode` (`sequential/selection`,
`sequential/label`, `betting/...`: which test, and how the tested class was chosen)."""

LEGACY_SEQUENTIAL_COLUMNS = (*CERTIFY_COLUMNS, "n", "mode")
"""The header of sequential TSVs written before the `samples` column had its name (`n`, which the glossary keeps
for estimation samples). Readers accept both; a resumed or merged file keeps the header it was started with
(`sequential_columns`)."""


def sequential_columns(existing_header: str | None) -> tuple[str, ...]:
    """The columns to write to a sequential TSV whose first line is `existing_header` (None: a new file): the
    legacy header for a file started with it, else `SEQUENTIAL_COLUMNS`."""
    if existing_header is not None and existing_header.split("\t") == list(LEGACY_SEQUENTIAL_COLUMNS):
        return LEGACY_SEQUENTIAL_COLUMNS
    return SEQUENTIAL_COLUMNS


def doubling_looks(first: int = 1024, last: int = 131072) -> tuple[int, ...]:
    """first, 2 first, 4 first, ... up to and including `last` (which is appended if not a doubling)."""
    if first < 1 or last < first:
        raise SmoothAdvError(f"looks need 1 <= first <= last, got {first}:{last}")
    looks = [first]
    while looks[-1] * 2 <= last:
        looks.append(looks[-1] * 2)
    if looks[-1] != last:
        looks.append(last)
    return tuple(looks)


def fitted_schedule(sigma: float, alpha: float, radii: Sequence[float], base: Sequence[int] = DEFAULT_LOOKS,
                    last_share: float = 0.5, top_share: float = 0.25,
                    ) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Looks and per-look levels (alpha spending) fitted to the grid `radii`; the levels sum to alpha.

    Two looks decide most inputs, so they get most of alpha (shares of alpha, the rest split equally
    over the other looks of `base`):

    - the last look (`last_share`, default 1/2): inputs whose vote rate sits at a grid radius take
      every look. It is the smallest multiple of base[0] whose cap (the radius when every vote agrees)
      is at least `base`'s with an equal split (131,072 at alpha / 8: 3.813 sigma, fixed n = 100,000
      gives 3.811 sigma), so the largest radius is unchanged and the worst case costs 111,616 samples
      at alpha = 0.001 instead of 131,072.
    - the look where unanimous votes first certify the largest grid radius (`top_share`, default
      1/4): near-unanimous inputs stop there (sigma = 0.5, r = 1.75 = 3.5 sigma: 35,840 instead of
      65,536; sigma = 0.25, r = 0.75: 6,144). It is added to `base` (or takes a look it coincides
      with) when it comes before the last look; otherwise its share goes to the other looks.

    The schedule depends only on (sigma, alpha, radii, base, shares), so it is fixed before sampling
    and the union bound over the looks (each failing with probability at most its level) keeps the
    certificate valid at level alpha whatever the stopping rule.
    """
    base = tuple(int(n) for n in base)
    if not 0.0 < last_share < 1.0 or not 0.0 <= top_share < 1.0 - last_share:
        raise SmoothAdvError(f"need 0 < last_share < 1 and 0 <= top_share < 1 - last_share, got {last_share}, "
                             f"{top_share}")
    step = base[0]
    cap = clopper_pearson_lower(base[-1], base[-1], alpha / len(base))
    last = min(_unanimous_look(cap, alpha * last_share, step), base[-1])  # never beyond the base's last look
    earlier = [b for b in base if b < last]
    if not earlier:  # a one-look base: nothing to spend early
        return (base[-1],), (alpha,)
    top = max((float(r) for r in radii), default=0.0)
    special = _unanimous_look(float(norm.cdf(top / sigma)), alpha * top_share, step) if top > 0 and top_share else last
    if special >= last:
        levels = {b: alpha * (1 - last_share) / len(earlier) for b in earlier}
    else:
        others = [b for b in earlier if b != special]
        levels = {b: alpha * (1 - last_share - top_share) / len(others) for b in others} if others else {}
        levels[special] = alpha * (top_share if others else 1 - last_share)
    levels[last] = alpha * last_share
    looks = tuple(sorted(levels))
    return looks, tuple(levels[n] for n in looks)


def _unanimous_look(target: float, level: float, step: int) -> int:
    """Smallest multiple of `step` at which all-agreeing votes give a lower bound >= `target` at `level`."""
    if target >= 1.0:
        return sys.maxsize
    n = max(step, math.ceil(math.log(level) / math.log(target) / step) * step)
    while clopper_pearson_lower(n, n, level) < target:
        n += step
    return n


def standard_radii(sigma: float, alpha: float = 0.001, looks: Sequence[int] = DEFAULT_LOOKS,
                   step: float = 0.25) -> tuple[float, ...]:
    """0, step, 2 step, ... up to the largest radius the schedule can certify (the usual table columns)."""
    cap = certified_radius(clopper_pearson_lower(looks[-1], looks[-1], alpha / len(looks)), sigma)
    return tuple(radius_grid(cap, step))


def check_test_settings(config: SequentialConfig | BettingConfig) -> None:
    """The checks both tests' configs make on sigma and alpha (their other shared settings are checked by
    `settings.SequentialSettings`); raises SmoothAdvError naming the first bad one."""
    if isinstance(config.sigma, bool) or not isinstance(config.sigma, (int, float)) or not config.sigma > 0 \
            or not math.isfinite(config.sigma):
        raise SmoothAdvError(f"sigma must be a finite number > 0, got {config.sigma}")
    if isinstance(config.alpha, bool) or not isinstance(config.alpha, (int, float)) or not 0.0 < config.alpha < 1.0:
        raise SmoothAdvError(f"alpha must be in (0, 1), got {config.alpha}")


def selection_step(votes: Sequence[int], n0: int, selection: str) -> int:
    """The class-selection rule: from the cumulative selection votes `votes` (one count per class) of the
    n0 allowed, the class chosen (>= 0), or minus the number of votes to draw next (< 0).

    - "fixed" (Cohen's): draw all n0, then the argmax (ties to the lowest index, as torch.argmax).
    - "adaptive": draw `SELECTION_CHUNK` (16) votes at a time up to n0; stop after a chunk when every vote
      so far is for one class, and choose it; otherwise, after all n0, the argmax as Cohen's. Votes that
      are split after the first chunk stay split, so the rule draws the rest in one go then: it uses
      min(16, n0) selection samples when they agree, n0 otherwise.

    Either rule sees only the selection votes, drawn from a noise stream independent of the estimation
    samples, so the test of the chosen class keeps its level alpha (its guarantee holds given the class).
    """
    drawn = int(sum(votes))
    if drawn >= n0:
        return max(range(len(votes)), key=lambda c: (votes[c], -c))
    if selection == "fixed" or drawn == 0:
        return -(n0 - drawn if selection == "fixed" else min(SELECTION_CHUNK, n0))
    if max(votes) == drawn:
        return max(range(len(votes)), key=lambda c: votes[c])
    return -(n0 - drawn)


class Schedule(NamedTuple):
    """What an alpha-spending test does: its looks (cumulative sample sizes), the failure probability spent at
    each, and the radii the grid policy settles (sorted; empty for the other policies)."""

    looks: tuple[int, ...]
    levels: tuple[float, ...]
    radii: tuple[float, ...]


@dataclass(frozen=True)
class SequentialConfig(SpendingSettings):
    """A pre-declared sequential test: noise level, failure probability, look schedule and stopping policy.

    Args:
        sigma: noise level of the smoothed classifier; it must be the `Smooth`'s sigma (the drivers
            refuse a mismatch: the radius sigma * Phi^-1(p_lower) is only valid for the noise's sigma).
            `SequentialConfig.for_smooth(smooth, ...)` takes it from the smoothed classifier.
        alpha: total failure probability (split over the looks by `levels`).
        looks: strictly increasing cumulative sample sizes, fixed before sampling. Default (None):
            `base` (1024, 2048, ..., 131072, K = 8); for the grid policy `fitted_schedule` on `base` for
            its radii (sigma = 0.5 with the standard radii: 1024, ..., 32768, 35840, 65536, 111616).
        policy: "grid", "tolerance" or "full" (see the module docstring).
        radii: the radii whose decision `grid` settles (default: `standard_radii`).
        tolerance: for `tolerance`, the radius loss accepted against the best reachable radius.
        forecast_alpha: level of the Clopper-Pearson upper bound U_j used to forecast the reachable
            radius. Default 0.05: stop when even a 95% upper bound on the vote rate could not change
            the answer at the last look. None is the strict forecast at the look's level alpha_j
            (stop only when more samples can change the answer with probability at most alpha_j).
            It changes when the test stops, never the validity.
        levels: the failure probability spent at each look (summing to at most alpha). Default: the
            fitted schedule's levels for the grid policy with default looks (1/2 of alpha at the last
            look, 1/4 at the look fitted to the largest radius), otherwise alpha / K at every look.
        base: the doubling looks used when `looks` is None (default 1024, ..., 131072): the grid
            policy's schedule is fitted on them, the other policies make exactly these looks.
        selection: how the drivers choose the tested class from the n0 selection samples (Cohen's mode):
            "adaptive" (default: 16 samples when they all agree, else all n0) or "fixed" (all n0, Cohen's);
            see `selection_step`. Unused with the label given; it never changes the test's level.

    The fields keep what was passed (`looks` None stays None); `schedule` is what the test does: the
    looks it makes, the alpha it spends at each and the radii the grid policy settles. It is computed
    from the fields alone, before any sample, and checked at construction.
    """

    sigma: float
    alpha: float = 0.001

    MODE = "sequential"
    """The `mode` column's prefix of this test's rows (`betting.BettingConfig` writes "betting")."""

    def __post_init__(self) -> None:
        """Check the settings and the schedule they resolve to."""
        check_test_settings(self)
        super().__post_init__()
        _ = self.schedule

    @cached_property
    def schedule(self) -> Schedule:
        """The looks, per-look levels and grid radii this test uses (`_resolved_schedule`)."""
        return Schedule(*_resolved_schedule(self.sigma, self.alpha, self.policy, self.looks, self.levels,
                                            self.radii, self.base))

    @classmethod
    def for_smooth(cls, smooth: Smooth, **settings: Any) -> SequentialConfig:
        """The config for certifying with `smooth`: its sigma, and `settings` for the other fields."""
        if "sigma" in settings:
            raise SmoothAdvError("SequentialConfig.for_smooth takes sigma from the smoothed classifier; "
                                 "do not pass it")
        return cls(smooth.sigma, **settings)

    @classmethod
    def for_budget(cls, sigma: float, n: int, alpha: float = 0.001, **settings: Any) -> SequentialConfig:
        """A test that never draws more than `n` estimation samples, as Cohen's CERTIFY with `n` would: the
        schedule is fitted on doubling looks from about n / 64 up to n (`base`), so a user who wants a small
        budget does not pay for the default schedule, which is sized for n = 100,000 (up to 111,616 samples). The
        grid schedule's last look is fitted below n, so its largest certifiable radius (`max_radius`) is a few
        percent below fixed n's (0.654 against 0.676 at sigma = 0.25, n = 2,000, alpha = 0.001). `settings` are
        the other fields."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 16:
            raise SmoothAdvError(f"the sample budget n must be an integer >= 16, got {n!r}")
        first = max(16, 2 ** int(math.log2(n / 64))) if n >= 1024 else 16
        return cls(sigma, alpha, base=doubling_looks(first, n), **settings)

    @property
    def max_radius(self) -> float:
        """Largest radius the schedule can certify (all N_K samples vote for the class)."""
        last = self.schedule.looks[-1]
        return certified_radius(clopper_pearson_lower(last, last, self.schedule.levels[-1]), self.sigma)

    def start(self) -> SequentialTest:
        """A fresh test with this config."""
        return SequentialTest(self)


def _resolved_schedule(sigma: float, alpha: float, policy: str, looks: Sequence[int] | None,
                       levels: Sequence[float] | None, radii: Sequence[float], base: Sequence[int],
                       ) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]:
    """The (looks, levels, radii) a `SequentialConfig` runs, from the fields it was given.

    - looks: as given, else `base`; for the grid policy with neither looks nor levels given, the
      `fitted_schedule` on `base` for the radii, which also gives the levels;
    - levels: as given, else the fitted ones, else alpha / K at each of the K looks;
    - radii: sorted; for the grid policy without radii, `standard_radii(sigma, alpha, looks)`.

    Depends only on its arguments (fixed before sampling), so the test's guarantee holds for it.
    Raises SmoothAdvError unless the looks are strictly increasing positive sizes, the radii finite
    and >= 0, and the levels one probability in (0, 1) per look summing to at most alpha.
    """
    given = base if looks is None else looks
    resolved_looks = tuple(int(n) for n in given)
    if not resolved_looks or resolved_looks[0] < 1 or any(b <= a for a, b in itertools.pairwise(resolved_looks)):
        raise SmoothAdvError(f"looks must be strictly increasing positive sample sizes, got {given}")
    resolved_radii = tuple(sorted(float(r) for r in radii))
    if any(not math.isfinite(r) or r < 0 for r in resolved_radii):
        raise SmoothAdvError(f"radii must be finite and >= 0, got {radii}")
    if policy == "grid" and not resolved_radii:
        resolved_radii = standard_radii(sigma, alpha, resolved_looks)
    resolved_levels = None if levels is None else tuple(float(v) for v in levels)
    if policy == "grid" and looks is None and resolved_levels is None:
        resolved_looks, resolved_levels = fitted_schedule(sigma, alpha, resolved_radii, resolved_looks)
    if resolved_levels is None:
        resolved_levels = (alpha / len(resolved_looks),) * len(resolved_looks)
    if len(resolved_levels) != len(resolved_looks) or any(not 0.0 < v < 1.0 for v in resolved_levels) \
            or sum(resolved_levels) > alpha * (1 + 1e-9):
        raise SmoothAdvError(f"levels must be one probability in (0, 1) per look, summing to at most alpha = "
                             f"{alpha:g}; got {levels} for {len(resolved_looks)} looks")
    return resolved_looks, resolved_levels, resolved_radii


AnyConfig: TypeAlias = "SequentialConfig | BettingConfig"
"""What the drivers certify with: the group-sequential test or the betting test (`betting.BettingConfig`).
Both make a test with `start()` whose `next_segments()` / `update_segments(counts)` the drivers call."""


class SequentialResult(NamedTuple):
    """Outcome of one sequential test of the class's vote probability p."""

    certified: bool   # max_j L_j > 1/2 (the class is certified at radius `radius`)
    radius: float     # sigma * Phi^-1(max_j L_j), 0 when not certified
    p_lower: float    # max_j L_j
    successes: int    # votes for the class among the `n` estimation samples
    n: int            # estimation samples used (the look at which the test stopped)
    looks: int        # number of looks made
    stop: str         # "settled", "futile" or "last look"


class SequentialTest:
    """State of one group-sequential Clopper-Pearson test (see the module docstring for the guarantee).

    Use: while `next_draw()` > 0, draw that many new samples and pass the number voting for the
    class to `update`; then read `result()`.
    """

    def __init__(self, config: SequentialConfig) -> None:
        self.config = config
        self.successes = 0
        self.n = 0
        self.look = 0
        self.p_lower = 0.0
        self.stop: str | None = None

    @property
    def done(self) -> bool:
        return self.stop is not None

    def next_draw(self) -> int:
        """New samples needed before the next look (0 once the test has stopped)."""
        return 0 if self.done else self.config.schedule.looks[self.look] - self.n

    def next_segments(self) -> tuple[int, ...]:
        """The next draw as the segments `update_segments` takes counts of: one, up to the next look."""
        draw = self.next_draw()
        return (draw,) if draw else ()

    def update_segments(self, counts: Sequence[int]) -> None:
        """`update` with the one count of `next_segments()`'s segment (the drivers' interface)."""
        if len(counts) != 1:
            raise SmoothAdvError(f"a group-sequential look takes one count, got {len(counts)}")
        self.update(int(counts[0]))

    def update(self, successes: int) -> None:
        """Record the class's votes among the `next_draw()` new samples and make the look."""
        draw = self.next_draw()
        if draw == 0:
            raise SmoothAdvError("the sequential test has already stopped")
        if not 0 <= successes <= draw:
            raise SmoothAdvError(f"successes must be in [0, {draw}], got {successes}")
        config = self.config
        level = config.schedule.levels[self.look]
        self.successes += int(successes)
        self.n += draw
        self.look += 1
        self.p_lower = max(self.p_lower, clopper_pearson_lower(self.successes, self.n, level))
        if self.look == len(config.schedule.looks):
            self.stop = "last look"
        elif config.policy == "full":
            return
        else:
            upper = clopper_pearson_upper(self.successes, self.n, config.forecast_alpha or level)
            if upper <= 0.5 and self.p_lower <= 0.5:
                self.stop = "futile"
            elif self._settled(upper):
                self.stop = "settled"

    def reachable_radius(self, upper: float) -> float:
        """Optimistic forecast: the last look's radius if its vote fraction were `upper` (0 if none)."""
        last = self.config.schedule.looks[-1]
        k = min(last, math.ceil(upper * last))
        p = clopper_pearson_lower(k, last, self.config.schedule.levels[-1]) if k > 0 else 0.0
        return certified_radius(p, self.config.sigma) if p > 0.5 else -1.0

    def _settled(self, upper: float) -> bool:
        certified = self.p_lower > 0.5
        radius = certified_radius(self.p_lower, self.config.sigma) if certified else -1.0
        reachable = max(self.reachable_radius(upper), radius)
        if self.config.policy == "tolerance":
            return reachable - max(radius, 0.0) <= self.config.tolerance
        return all((certified and radius >= r) or reachable < r for r in self.config.schedule.radii)

    def result(self) -> SequentialResult:
        certified = self.p_lower > 0.5
        radius = certified_radius(self.p_lower, self.config.sigma) if certified else 0.0
        return SequentialResult(certified, radius, self.p_lower, self.successes, self.n, self.look,
                                self.stop or "running")


def run_sequential(config: SequentialConfig, sample: Callable[[int], int]) -> SequentialResult:
    """Run one test; `sample(k)` draws k new samples and returns how many voted for the class."""
    test = SequentialTest(config)
    while (draw := test.next_draw()) > 0:
        test.update(int(sample(draw)))
    return test.result()


# ------------------------------------------------------------------ with a base classifier


@dataclass(frozen=True)
class SequentialCertificate(Certificate):
    """Result of sequential CERTIFY: a `Certificate` (same fields and meaning) plus how the test ran.

    Unpacks as Cohen's `(prediction, radius)` pair. As for every `Certificate`: `tested_class` is the
    class whose vote probability was bounded (chosen from the selection samples by the config's rule,
    `n0` being how many were drawn: 16 or the n0 asked for with adaptive selection; or the given label
    with n0 = 0), `p_lower` = max_j L_j over the looks made, `count` its votes among the `n`
    estimation samples drawn (the look at which the test stopped) and `samples` = n0 + n.

    Attributes:
        looks: number of looks made.
        stop: why the test stopped: "settled" (the policy's question is answered), "futile" (no
            certificate reachable) or "last look".
    """

    looks: int
    stop: str


def stream_generator(seed: int, index: int, stream: int, device: torch.device | str) -> torch.Generator:
    """Generator of noise stream `stream` (0: selection, 1: estimation) of example `index` under `seed`."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, index, stream))


def check_same_sigma(smooth: Smooth, config: AnyConfig) -> None:
    """Raise SmoothAdvError unless the config's sigma is the smoothed classifier's (one source of sigma).

    The noise is drawn with `smooth.sigma` and the radius is computed with `config.sigma`; a
    difference would make every radius wrong (scaled by their ratio) without any other sign.
    """
    if float(config.sigma) != smooth.sigma:
        raise SmoothAdvError(f"the sequential config has sigma = {config.sigma!r} but the smoothed classifier has "
                             f"sigma = {smooth.sigma!r}; use SequentialConfig.for_smooth(smooth, ...)")


def select_classes(sampler: PackedSampler, xs: Sequence[torch.Tensor],
                   generators: Sequence[torch.Generator | None], n0: int, selection: str, batch_size: int,
                   ) -> tuple[list[int], list[int]]:
    """Each input's class by the rule `selection_step` (at most n0 selection samples, drawn from its generator),
    and the selection samples it used. Inputs still drawing advance together: one sampler call per round."""
    votes = [[0] * sampler.sampler.num_classes for _ in xs]
    chosen: list[int | None] = [None] * len(xs)
    while True:
        draws = []
        for i, v in enumerate(votes):
            if chosen[i] is None:
                step = selection_step(v, n0, selection)
                if step >= 0:
                    chosen[i] = step
                else:
                    draws.append((i, -step))
        if not draws:
            return [int(c) for c in chosen if c is not None], [sum(v) for v in votes]
        counts = sampler.counts([SampleRequest(xs[i], (k,), generators[i]) for i, k in draws], batch_size)
        for (i, _), row in zip(draws, counts.cpu().tolist()):
            votes[i] = [a + b for a, b in zip(votes[i], row)]


def certify_sequential_many(smooth: Smooth, xs: Sequence[torch.Tensor], config: AnyConfig, *,
                            batch_size: int, labels: Sequence[int] | None = None, n0: int = 100,
                            selection_generators: Sequence[torch.Generator | None] | None = None,
                            estimation_generators: Sequence[torch.Generator | None] | None = None,
                            generators: Sequence[torch.Generator | None] | None = None,
                            ) -> list[SequentialCertificate]:
    """Sequential CERTIFY of several inputs, their samples packed into shared forward passes.

    With `labels` the given class of each input is tested (evaluation mode, no selection
    samples); without, the class is chosen from at most `n0` selection samples drawn from the
    selection generator by `config.selection`'s rule (`select_classes`; "fixed": Cohen's argmax of
    n0). Estimation samples come from the estimation generators,
    in pieces that depend only on the input's own schedule, so each result is the same whichever
    inputs are certified together. The looks (draws, for the betting test) of all inputs advance
    in waves: one forward-pass stream and one host synchronisation per wave; a test's draw may be
    split into segments, whose counts it receives one by one. `config` is a `SequentialConfig` or a
    `betting.BettingConfig`; `config.sigma` must be `smooth.sigma`.

    Randomness (`smoothadv.seeds`): `generators=`, one per input, each split into its two streams as
    `certify_sequential` splits its `generator` (`seeds.split_generator`), so result i is what
    `certify_sequential(..., generator=generators[i])` gives; or the two streams of each input
    explicitly (`selection_generators=`, `estimation_generators=`, what the dataset driver seeds).
    """
    check_same_sigma(smooth, config)
    count = len(xs)
    if count == 0:
        return []
    for x in xs:
        smooth.check_input(x)
    if generators is not None:
        if selection_generators is not None or estimation_generators is not None:
            raise SmoothAdvError("give generators= (one per input) or selection_generators= and "
                                 "estimation_generators=, not both")
        generators = list(generators)
        if len(generators) != count:
            raise SmoothAdvError(f"got {count} inputs but {len(generators)} generators")
        streams = [split_generator(g, x.device) if g is not None else (None, None) for g, x in zip(generators, xs)]
        selection_generators = [a for a, _ in streams]
        estimation_generators = [b for _, b in streams]
    if int(batch_size) != batch_size or batch_size < 1:
        raise SmoothAdvError(f"batch_size must be a positive integer, got {batch_size}")
    selection_generators = list(selection_generators or [None] * count)
    estimation_generators = list(estimation_generators or [None] * count)
    if len(selection_generators) != count or len(estimation_generators) != count:
        raise SmoothAdvError("give one selection and one estimation generator per input")
    sampler = PackedSampler(smooth.sampler)
    if labels is not None:
        if len(labels) != count:
            raise SmoothAdvError(f"got {count} inputs but {len(labels)} labels")
        classes = [int(c) for c in labels]
        if any(not 0 <= c < smooth.num_classes for c in classes):
            raise SmoothAdvError(f"labels must be in [0, {smooth.num_classes})")
        used_n0 = [0] * count
    else:
        if int(n0) != n0 or n0 < 1:
            raise SmoothAdvError(f"n0 must be a positive integer, got {n0}")
        classes, used_n0 = select_classes(sampler, xs, selection_generators, int(n0), config.selection, batch_size)
    tests = [config.start() for _ in xs]
    while active := [i for i, test in enumerate(tests) if not test.done]:
        segments = [tests[i].next_segments() for i in active]
        requests = [SampleRequest(xs[i], segs, estimation_generators[i]) for i, segs in zip(active, segments)]
        counts = sampler.counts(requests, batch_size).cpu()
        row = 0
        for i, segs in zip(active, segments):  # one row of counts per segment, in request order
            tests[i].update_segments(counts[row:row + len(segs), classes[i]].tolist())
            row += len(segs)
    certificates = []
    for c, used, test in zip(classes, used_n0, tests):
        result = test.result()
        certificates.append(SequentialCertificate(
            prediction=c if result.certified else ABSTAIN, radius=result.radius, tested_class=c,
            p_lower=result.p_lower, count=result.successes, n0=used, n=result.n, looks=result.looks,
            stop=result.stop))
    return certificates


def certify_sequential(smooth: Smooth, x: torch.Tensor, config: AnyConfig, *, batch_size: int,
                       label: int | None = None, n0: int = 100, generator: torch.Generator | None = None,
                       ) -> SequentialCertificate:
    """Sequential CERTIFY of one input (Cohen's class selection unless `label` is given).

    With `generator`, the selection and estimation streams are two independent generators
    seeded from one draw of it (`seeds.split_generator`); without, both use the global generator
    (selection first). `config.sigma` must be `smooth.sigma`.
    """
    check_same_sigma(smooth, config)
    smooth.check_input(x)
    check_generator(generator, x)
    return certify_sequential_many(smooth, [x], config, batch_size=batch_size,
                                   labels=None if label is None else [label], n0=n0, generators=[generator])[0]


class SequentialRow(NamedTuple):
    """One row of a sequential certify TSV (columns `SEQUENTIAL_COLUMNS`, in this order).

    `samples`: noisy forward passes used for the row, n0 selection plus n estimation samples
    (`SequentialCertificate.samples`); files written before it had that name call the column `n`.
    """

    idx: int
    label: int
    predict: int
    radius: float
    correct: int
    time: str
    samples: int
    mode: str


def certify_sequential_dataset(smooth: Smooth, dataset: Dataset, indices: Iterable[int], *,
                               config: AnyConfig, class_from: str = "selection", n0: int = 100,
                               batch_size: int, seed: int = 0, device: torch.device | str = "cpu",
                               group: int = 32) -> Iterator[SequentialRow]:
    """Sequential CERTIFY over dataset examples; yields one `SequentialRow` per example (in index order).

    Examples are certified in groups of `group` whose looks advance together. Each example's
    selection and estimation noise streams are seeded by (seed, dataset index, stream), so a row
    does not depend on the group, order or sharding. `correct` is 1 when the certified class is
    the label (in label mode: when the label is certified). `time` is the group's time shared in
    proportion to the samples each example used. The settings (`class_from`, `config.sigma` =
    `smooth.sigma`) are checked on the call, before the first row is asked for.
    """
    if class_from not in CLASS_FROM:
        raise SmoothAdvError(f"class_from must be one of {', '.join(CLASS_FROM)}, got {class_from!r}")
    check_same_sigma(smooth, config)
    return _sequential_rows(smooth, dataset, list(indices), config, class_from, n0, batch_size, seed,
                            torch.device(device), max(1, group))


def _sequential_rows(smooth: Smooth, dataset: Dataset, todo: list[int], config: AnyConfig, class_from: str,
                     n0: int, batch_size: int, seed: int, device: torch.device, group: int) -> Iterator[SequentialRow]:
    mode = f"{config.MODE}/{class_from}"
    for start in range(0, len(todo), group):
        chunk = todo[start:start + group]
        examples = [_load_example(dataset, i, device) for i in chunk]
        xs = [x for x, _ in examples]
        labels = [label for _, label in examples]
        started = time.time()
        certificates = certify_sequential_many(
            smooth, xs, config, batch_size=batch_size, labels=labels if class_from == "label" else None, n0=n0,
            selection_generators=[stream_generator(seed, i, 0, device) for i in chunk],
            estimation_generators=[stream_generator(seed, i, 1, device) for i in chunk])
        elapsed = time.time() - started
        total = sum(c.samples for c in certificates)
        for index, label, cert in zip(chunk, labels, certificates):
            correct = int(cert.prediction == label and cert.prediction != ABSTAIN)
            yield SequentialRow(index, label, cert.prediction, cert.radius, correct,
                                format_time(elapsed * cert.samples / total), cert.samples, mode)
