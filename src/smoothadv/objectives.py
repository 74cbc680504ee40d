"""Training objectives: the per-batch loss is the only thing training methods differ in.

An `Objective` maps (model, x, y) to a `LossOutput`; `train.fit` runs one loop for all of them.
Adding a method (consistency regularization, MACER, ...) is one small class and one entry in
`OBJECTIVES`.

- `GaussianAugmentation`: cross-entropy of f on x + delta, delta ~ N(0, sigma^2 I)
  (Cohen et al. 2019, Section 4, "training").
- `SmoothAdv`: cross-entropy on adversarial examples of the smoothed soft classifier, plus the same
  noise (Salman et al. 2019, Section 4; reference §3.5).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import DDN, PGDL2, Attack, SteinPGDL2, get_attack
from .errors import SmoothAdvError
from .settings import AT_LEAST_ONE, AttackSettings, convert, fields_of, setting
from .smoothing import SoftSmoothed, eval_mode


class LossOutput(NamedTuple):
    loss: Tensor      # scalar to backpropagate
    logits: Tensor    # what the loss was computed on (for training accuracy)
    targets: Tensor   # the labels matching `logits` rows


class Objective(ABC):
    """A training method's per-batch loss. Implementations are frozen dataclasses."""

    #: optimizer steps the loop takes per loader batch (the batch is split into this many chunks)
    steps_per_batch: int = 1

    @abstractmethod
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: NoiseSource = None) -> LossOutput:
        """The loss on one batch x (B, C, H, W) in [0, 1] with labels y (B,); the model is in train mode.

        `model` is always the plain network (never a DistributedDataParallel wrapper), so an
        objective may run any forward and backward passes on it (an attack, several losses). Under
        torchrun the training loop alone keeps the ranks' replicas in step (`distributed.sync_replicas`
        after the backward of `loss`), and `generator` draws this rank's rows of the global batch's
        noise; an objective needs no distributed code."""

    def at_epoch(self, epoch: int) -> Objective:
        """The objective to use in (0-indexed) `epoch`; schedules such as eps warm-up override this."""
        return self

    def describe(self) -> dict:
        """Plain-data description stored in checkpoints and run folders."""
        if not dataclasses.is_dataclass(self):
            return {"name": type(self).__name__}
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"name": type(self).__name__, **{k: (v.describe() if hasattr(v, "describe") else
                                                    repr(v) if dataclasses.is_dataclass(v) else v)
                                                 for k, v in fields.items()}}


class RowNoise(Protocol):
    """A noise source that draws one row per batch example, plus a generator for all other draws.

    `distributed.RankSlicedNoise` is one: under torchrun it draws this rank's rows of the whole
    global batch's noise, so each example's noise does not depend on the number of processes.
    """

    local: torch.Generator  # for draws that are not one row per example (an attack's random start)

    def randn(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        """N(0, 1) draws of `shape`, row i belonging to batch example i."""
        ...


NoiseSource = torch.Generator | RowNoise | None
"""What objectives draw their noise from: a torch generator, a `RowNoise`, or None (the global RNG)."""


def standard_normal(shape: tuple[int, ...], like: Tensor, generator: NoiseSource = None) -> Tensor:
    """N(0, 1) draws of `shape` on like's device and dtype, from a generator or a `RowNoise`."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, device=like.device, dtype=like.dtype, generator=generator)
    return generator.randn(shape, like.device, like.dtype)


def row_generator(generator: NoiseSource) -> torch.Generator | None:
    """The plain generator for draws that are not one row per batch example."""
    return generator if generator is None or isinstance(generator, torch.Generator) else generator.local


def gaussian_noise(x: Tensor, sigma: float, generator: NoiseSource = None) -> Tensor:
    """N(0, sigma^2) noise shaped like x, drawn on x's device (from `generator` if given)."""
    return standard_normal(tuple(x.shape), x, generator) * sigma


@dataclass(frozen=True)
class GaussianAugmentation(Objective):
    """Cross-entropy of the base classifier on Gaussian-noised inputs (Cohen et al. 2019).

    Training f this way makes f(x + delta) accurate, which is what the smoothed classifier needs.
    """

    sigma: float

    def __post_init__(self) -> None:
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: NoiseSource = None) -> LossOutput:
        logits = model(x + gaussian_noise(x, self.sigma, generator))
        return LossOutput(F.cross_entropy(logits, y), logits, y)


@dataclass(frozen=True)
class SmoothAdv(Objective):
    """Adversarial training of the smoothed classifier (SmoothAdv; Salman et al., NeurIPS 2019, Section 4).

    Per batch: draw m noise vectors per input, N(0, sigma^2 I), shape (B, m, C, H, W), once; attack
    the smoothed soft classifier `SoftSmoothed(model, noise)` (model in eval mode for the attack,
    its previous mode restored; no parameter flags touched) to get x_adv; then the loss is the
    cross-entropy of f on x_adv + the *same* noise: all m copies with `multi_noise` (labels repeated),
    else the first copy only. With `multi_noise` the loop takes m SGD steps per loader batch, each
    on B/m images x m draws (`steps_per_batch`), as Salman's train_pgd.py. With eps = 0 and m = 1
    this is exactly `GaussianAugmentation` under the same generator (tested).

    Warm-up: `at_epoch(e)` (e counted from 0) uses eps_e = min(eps, (e + 1) eps / warmup) (and a DDN
    init norm of eps_e), so eps ramps linearly from eps/warmup to eps over the first `warmup` epochs.
    """

    sigma: float
    attack: Attack
    m: int = setting(1, "noise draws per input in the attack (m_train)", limit=AT_LEAST_ONE)
    multi_noise: bool = setting(False, "train on all m noisy copies (m SGD steps per batch)")
    warmup: int = setting(1, "epochs over which eps ramps linearly to --eps", limit=AT_LEAST_ONE)

    def __post_init__(self) -> None:
        if not math.isfinite(self.sigma) or self.sigma < 0:
            raise SmoothAdvError(f"sigma must be >= 0, got {self.sigma}")
        if int(self.m) != self.m or self.m < 1:
            raise SmoothAdvError(f"m (noise draws per input) must be an integer >= 1, got {self.m}")
        if int(self.warmup) != self.warmup or self.warmup < 1:
            raise SmoothAdvError(f"warm-up must be an integer >= 1 epochs, got {self.warmup}")

    @property
    def steps_per_batch(self) -> int:  # type: ignore[override]
        return self.m if self.multi_noise else 1

    def eps_at(self, epoch: int) -> float:
        """The warm-up eps of (0-indexed) `epoch`: min(eps, (epoch + 1) * eps / warmup)."""
        return min(self.attack.eps, (epoch + 1) * self.attack.eps / self.warmup)

    def at_epoch(self, epoch: int) -> SmoothAdv:
        eps = self.eps_at(epoch)
        changes: dict[str, Any] = {"eps": eps}
        if isinstance(self.attack, DDN) and eps > 0:
            changes["init_norm"] = eps
        return dataclasses.replace(self, attack=dataclasses.replace(self.attack, **changes))

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: NoiseSource = None) -> LossOutput:
        noise = standard_normal((x.shape[0], self.m, *x.shape[1:]), x, generator) * self.sigma
        if self.attack.eps > 0:
            with eval_mode(model):
                x = self.attack(SoftSmoothed(model, noise), x, y, row_generator(generator))
        if self.multi_noise:
            inputs, targets = (x.unsqueeze(1) + noise).flatten(0, 1), y.repeat_interleave(self.m)
        else:
            inputs, targets = x + noise[:, 0], y
        logits = model(inputs)
        return LossOutput(F.cross_entropy(logits, targets), logits, targets)


OBJECTIVES: dict[str, type[Objective]] = {"gaussian": GaussianAugmentation, "smoothadv": SmoothAdv}
"""Objective name (the CLI's --objective) -> class. Each class is a frozen dataclass whose fields are its
hyperparameters: `sigma` (the training noise level), `attack` (built by `build_attack`) and the others,
declared with `settings.setting(...)` so that the command line, recipes and checks know them."""


# ------------------------------------------------------------------ the factory


def build_attack(settings: AttackSettings) -> Attack:
    """The attack `settings` describe. DDN's gamma and initial norm, when None, follow Salman et al.'s
    prediction script's rule: the norm may shrink from eps to 3/510 in T steps, gamma = 1 - (3/510/eps)^(1/T),
    and starts at eps (>= 1e-3). A deliberate deviation: predict.py itself starts at its --init-norm-DDN
    default, 256/256 = 1.0, whatever eps; we start where its gamma rule assumes (and where training's
    warm-up starts DDN each epoch). Set `ddn_init_norm` (AttackSettings) to 1.0 for the script's behaviour."""
    eps, steps = settings.eps, settings.steps
    if settings.attack == "ddn":
        gamma = settings.ddn_gamma
        if gamma is None:
            gamma = 1 - (3 / 510 / eps) ** (1 / steps) if eps > 3 / 510 else 0.05
        init_norm = settings.ddn_init_norm if settings.ddn_init_norm is not None else max(eps, 1e-3)
        return DDN(eps, steps, gamma=gamma, init_norm=init_norm)
    get_attack(settings.attack)  # a one-line error for an unknown name
    if settings.gradient_free:
        return SteinPGDL2(eps, steps, random_start=settings.random_start)
    return PGDL2(eps, steps, random_start=settings.random_start)


def hyperparameters() -> dict[str, tuple[dataclasses.Field, Any, tuple[str, ...]]]:
    """Every registered objective's own settings: name -> (field, type, objectives that have it).
    `sigma` and `attack` are excluded: they come from the training and attack settings."""
    found: dict[str, tuple[dataclasses.Field, Any, tuple[str, ...]]] = {}
    for name, cls in OBJECTIVES.items():
        for key, (field, kind) in fields_of(cls).items():
            if key in ("sigma", "attack"):
                continue
            owners = found[key][2] if key in found else ()
            found[key] = (found[key][0] if key in found else field, kind, (*owners, name))
    return found


def build_objective(name: str, sigma: float, options: Mapping[str, Any] | None = None,
                    attack: AttackSettings | None = None) -> Objective:
    """The objective registered as `name` at noise level `sigma`.

    `options` holds hyperparameters by field name (the command line's flags, a recipe's keys);
    each is converted strictly to its declared type, including those of other objectives, which
    are then ignored (so one recipe format serves them all). `attack` (default `AttackSettings()`)
    is used when the objective has an `attack` field.
    """
    if name not in OBJECTIVES:
        raise SmoothAdvError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    known = hyperparameters()
    options = dict(options or {})
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise SmoothAdvError(f"unknown objective setting(s) {', '.join(unknown)}")
    values = {key: convert(value, known[key][1], key) for key, value in options.items()}
    kwargs: dict[str, Any] = {}
    for key in fields_of(OBJECTIVES[name]):
        if key == "sigma":
            kwargs[key] = sigma
        elif key == "attack":
            kwargs[key] = build_attack(attack or AttackSettings())
        elif key in values:
            kwargs[key] = values[key]
    return OBJECTIVES[name](**kwargs)
