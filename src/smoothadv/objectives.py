"""Training objectives: the per-batch loss is the only thing training methods differ in.

An `Objective` maps (model, x, y) to a `LossOutput`; `train.fit` runs one loop for all of them.
Adding a method (consistency regularization, MACER, ...) is one small class and one entry in
`OBJECTIVES`.

- `GaussianAugmentation`: cross-entropy of f on x + delta, delta ~ N(0, sigma^2 I)
  (Cohen et al. 2019, Section 4, "training").
- `SmoothAdv`: cross-entropy on adversarial examples of the smoothed soft classifier, plus the same
  noise (Salman et al. 2019, Section 4).
- `StabilityTraining`: clean cross-entropy plus a soft cross-entropy between the clean and the noisy
  prediction (Li et al., NeurIPS 2019).
- `Consistency`: cross-entropy on m noisy copies plus `ConsistencyRegularizer` (Jeong & Shin, NeurIPS
  2020); the same regularizer composes with SmoothAdv (`SmoothAdv(consistency=True)`).
- `MACER`: log-likelihood of the soft smoothed classifier plus a hinge on its certified radius (Zhai
  et al., ICLR 2020), with the deferred start used at sigma = 1.0.
- `SmoothMix`: cross-entropy on m copies plus a masked KL to a mixup target between a (one-step)
  adversary and a multi-step adversary of the smoothed classifier (Jeong et al., NeurIPS 2021).
- `CATRS`: cross-entropy on the K most confident of m copies, plus, for images whose copies are all
  kept, the worst KL to a precomputed smoothed prediction under a noise-space attack (Jeong, Kim &
  Shin, AAAI 2023). The smoothed prediction comes from `smoothadv smooth-prediction`.

Hyperparameters named like an attack setting (`eps`, `steps`) belong to the objective that declares
them (SmoothMix's and CAT-RS's own attacks); `--eps`/`--steps` set them, with the objective's default
when not given (`train.recipe`).

The methods after SmoothAdv follow the code their authors released, which the CAT-RS authors (Jeong,
Kim & Shin, AAAI 2023) re-ran for every baseline; each class says where it differs from that code.
Conventions shared by all of them: sigma and eps in [0, 1]-pixel L2 units; the m noisy copies of a
batch are drawn as one (B, m, C, H, W) tensor (row i of the draw belongs to image i, so the noise of
an image does not depend on the number of torchrun processes) and fed to the model image-major (the
m copies of image 1, then of image 2, ...; the originals concatenate them noise-major, which only
changes BatchNorm batch statistics in floating point and the order of random draws); losses are
computed in float32 even under bf16 autocast.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import DDN, Attack, l2_norm, project
from .errors import SmoothAdvError
from .evaluate import read_smooth_prediction
from .noise import (  # noqa: F401  (re-exported: objectives are written against these names)
    NoiseSource,
    RowNoise,
    gaussian_noise,
    noise_copies,
    noisy_rows,
    row_generator,
    standard_normal,
    uniform_draws,
)
from .settings import AT_LEAST_ONE, COUNT, NONNEGATIVE, POSITIVE, check_fields, convert, fields_of, recipe_key, setting
from .smoothing import SoftSmoothed, eval_mode

__all__ = [
    "CATRS", "Consistency", "ConsistencyRegularizer", "GaussianAugmentation", "LossOutput", "MACER", "OBJECTIVES",
    "Objective", "SmoothAdv", "SmoothMix", "StabilityTraining", "build_objective", "catrs_noise_attack",
    "catrs_selection", "check_hyperparameters", "describe_value", "has_attack", "hyperparameters",
    "load_smooth_prediction", "macer_margins", "same_description", "scheduled", "smoothmix_attack",
]


class LossOutput(NamedTuple):
    loss: Tensor      # scalar to backpropagate
    logits: Tensor    # what the loss was computed on (for training accuracy)
    targets: Tensor   # the labels matching `logits` rows


class Objective(ABC):
    """A training method's per-batch loss. Implementations are frozen dataclasses whose fields are their
    hyperparameters (declared with `settings.setting`), with `sigma` the noise level they train for.

    The contract with a training loop. `train.train_epoch` keeps it; a loop of your own must keep it too:

    1. At the start of each epoch e (counted from 0), use `objective.at_epoch(e)`, the objective of that
       epoch (SmoothAdv's eps warm-up, SmoothMix's ramp, MACER's deferred start). An objective with such a
       schedule refuses to be called before `at_epoch` was applied, so a forgotten call is an error, not
       a silently different method.
    2. Split each loader batch into `steps_per_batch` chunks (`split`) and take one optimizer step on
       each chunk's loss, in order (SmoothAdv with multi-noise, Consistency, SmoothMix and CAT-RS take m
       steps per batch, as their authors' code).
    3. If `uses_index`, pass `index=` (each example's position in the training set) to `__call__`.
    4. Call it with the model in train mode; it switches to eval mode itself where the method attacks.
    """

    @property
    def steps_per_batch(self) -> int:
        """Optimizer steps per loader batch: the loop splits each batch into this many chunks (`split`)."""
        return 1

    @property
    def uses_index(self) -> bool:
        """Whether `__call__` needs `index=`: each example's position in the training set (CAT-RS)."""
        return False

    def split(self, *tensors: Tensor) -> list[tuple[Tensor, ...]]:
        """The chunks of one loader batch (x, y[, index]) on which the loop takes one step each (`steps_per_batch`)."""
        chunks = [t.chunk(self.steps_per_batch) for t in tensors]
        return list(zip(*chunks))

    @abstractmethod
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: NoiseSource = None) -> LossOutput:
        """The loss on one batch x (B, C, H, W) in [0, 1] with labels y (B,); the model is in train mode.

        `model` is always the plain network (never a DistributedDataParallel wrapper), so an
        objective may run any forward and backward passes on it (an attack, several losses). Under
        torchrun the training loop alone keeps the ranks' replicas in step (`distributed.sync_replicas`
        after the backward of `loss`), and `generator` draws this rank's rows of the global batch's
        noise; an objective needs no distributed code. An objective whose `uses_index` is true
        (CAT-RS) is also given `index=`: each example's position in the training set (a (B,) tensor)."""

    def at_epoch(self, epoch: int) -> Objective:
        """The objective to use in (0-indexed) `epoch`; schedules such as eps warm-up override this."""
        return self

    def describe(self) -> dict:
        """Plain-data description stored in checkpoints and run folders (the epoch an objective was made for is
        not part of it: `at_epoch` records its effect, such as the warm-up eps)."""
        if not dataclasses.is_dataclass(self):
            return {"name": type(self).__name__}
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "epoch"}
        return {"name": type(self).__name__, **{k: describe_value(v) for k, v in fields.items()}}

    def _require_epoch(self, scheduled: bool) -> None:
        """Refuse a call of an objective whose schedule (`scheduled`) was never given its epoch (`at_epoch`)."""
        if scheduled and getattr(self, "epoch", None) is None:
            name = type(self).__name__
            raise SmoothAdvError(f"{name} has a schedule over the epochs: call it as objective.at_epoch(epoch)(model, "
                                 f"x, y), once per epoch (train.fit does); without it the {name} of no epoch is "
                                 "undefined")


def scheduled(default: Any) -> Any:
    """A dataclass field that `at_epoch` sets (e.g. a warm-up weight): recorded by `describe()`, but not a
    hyperparameter (no command-line flag, no recipe key)."""
    return dataclasses.field(default=default, metadata={"internal": True})


def check_hyperparameters(objective: Objective) -> None:
    """Check sigma and every hyperparameter field of a dataclass objective against its declared type and
    limit (converting e.g. an int given for a float); SmoothAdvError (one line, naming the class and field, e.g.
    "MACER m must be an integer, got 8.0") if one fails."""
    name = type(objective).__name__
    sigma = getattr(objective, "sigma", 0.0)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise SmoothAdvError(f"{name} sigma must be a finite number >= 0, got {sigma!r}")
    check_fields(objective, lambda field: f"{name} {field.name}",
                 skip=lambda field: field.name in ("sigma", "attack") or bool(field.metadata.get("internal")))


def describe_value(value: Any) -> Any:
    """A hyperparameter as plain data for checkpoints and `args.json`: a nested dataclass (an attack) as
    {"name": its class, **its fields}, anything else as is. (Files written before 0.2 hold a nested
    dataclass as its `repr()` string; `same_description` compares the two forms.)"""
    if hasattr(value, "describe"):
        return value.describe()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"name": type(value).__name__, **{f.name: describe_value(getattr(value, f.name))
                                                  for f in dataclasses.fields(value)}}
    return value


def same_description(recorded: Any, current: Any) -> bool:
    """Whether a recorded hyperparameter (from a checkpoint or `args.json`) equals the current one (as
    `describe_value` gives it), accepting the `repr()` string that files before 0.2 recorded for an attack."""
    if isinstance(recorded, str) and isinstance(current, dict) and "name" in current:
        fields = ", ".join(f"{k}={v!r}" for k, v in current.items() if k != "name")
        return recorded == f"{current['name']}({fields})"
    return bool(recorded == current)


@dataclass(frozen=True)
class GaussianAugmentation(Objective):
    """Cross-entropy of the base classifier on Gaussian-noised inputs (Cohen et al. 2019).

    Training f this way makes f(x + delta) accurate, which is what the smoothed classifier needs.
    """

    sigma: float

    def __post_init__(self) -> None:
        check_hyperparameters(self)

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

    With `consistency` (and `multi_noise`), `ConsistencyRegularizer(lbd, eta)` is added on the logits of
    the m copies of each adversarial example: "SmoothAdv + Consistency" of Jeong & Shin (2020), which
    gives that paper's best rows (published: PGD, T = 10, warm-up 10, m = 4, lambda = 2, eps = 255/256
    at sigma = 0.25; m = 2, lambda = 1, eps = 2 at sigma = 0.5 and 1.0; eta = 0.5). Their training code
    uses its own PGD, which projects onto the eps-ball before clamping to [0, 1] and has no zero-gradient
    fallback; here the attack stays Salman et al.'s (`attacks.PGDL2`: clamp, then project), deliberately,
    so that SmoothAdv with and without the regularizer differ in the regularizer only.
    """

    sigma: float
    attack: Attack
    m: int = setting(1, "noise draws per image in the attack (and in training with --multi-noise)", limit=AT_LEAST_ONE)
    multi_noise: bool = setting(False, "train on all m noisy copies (m SGD steps per batch)")
    warmup: int = setting(1, "warm-up epochs: eps ramps linearly from eps/warmup to eps", limit=AT_LEAST_ONE)
    consistency: bool = setting(False, "add the consistency regularizer (Jeong & Shin 2020; --lbd, --eta) on the m "
                                "noisy copies of each adversarial example (needs --multi-noise and --m >= 2)")
    lbd: float = setting(1.0, "with --consistency: weight of its KL term", limit=NONNEGATIVE)
    eta: float = setting(0.5, "with --consistency: weight of the entropy of the average prediction", limit=NONNEGATIVE)

    epoch: int | None = scheduled(None)  # set by at_epoch

    def __post_init__(self) -> None:
        check_hyperparameters(self)
        if not (dataclasses.is_dataclass(self.attack) and not isinstance(self.attack, type)) \
                or not hasattr(self.attack, "eps"):
            raise SmoothAdvError(f"SmoothAdv's attack must be a dataclass with an eps field (as attacks.PGDL2 and "
                                 f"attacks.DDN are; the warm-up replaces its eps each epoch), got "
                                 f"{type(self.attack).__name__}")
        if self.consistency and not (self.multi_noise and self.m >= 2):
            raise SmoothAdvError("SmoothAdv with consistency regularization trains on the m noisy copies: "
                                 f"it needs multi_noise=True and m >= 2, got multi_noise={self.multi_noise}, "
                                 f"m={self.m} (the CLI's --multi-noise --m 2)")

    @property
    def steps_per_batch(self) -> int:
        return self.m if self.multi_noise else 1

    def eps_at(self, epoch: int) -> float:
        """The warm-up eps of (0-indexed) `epoch`: min(eps, (epoch + 1) * eps / warmup)."""
        return min(self.attack.eps, (epoch + 1) * self.attack.eps / self.warmup)

    def at_epoch(self, epoch: int) -> SmoothAdv:
        eps = self.eps_at(epoch)
        changes: dict[str, Any] = {"eps": eps}
        if isinstance(self.attack, DDN) and eps > 0:
            changes["init_norm"] = eps
        attack: Any = self.attack  # a dataclass: checked when the objective is made
        return dataclasses.replace(self, attack=dataclasses.replace(attack, **changes), epoch=epoch)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: NoiseSource = None) -> LossOutput:
        self._require_epoch(self.warmup > 1)
        noise = standard_normal((x.shape[0], self.m, *x.shape[1:]), x, generator) * self.sigma
        if self.attack.eps > 0:
            with eval_mode(model):
                x = self.attack(SoftSmoothed(model, noise), x, y, row_generator(generator))
        if self.multi_noise:
            inputs, targets = (x.unsqueeze(1) + noise).flatten(0, 1), y.repeat_interleave(self.m)
        else:
            inputs, targets = x + noise[:, 0], y
        logits = model(inputs)
        loss = F.cross_entropy(logits, targets)
        if self.consistency:
            loss = loss + ConsistencyRegularizer(self.lbd, self.eta)(logits.float().view(x.shape[0], self.m, -1))
        return LossOutput(loss, logits, targets)

    def describe(self) -> dict:
        described = super().describe()
        if not self.consistency:  # plain SmoothAdv: the regularizer's weights are not part of the method
            for key in ("consistency", "lbd", "eta"):
                described.pop(key)
        return described


@dataclass(frozen=True)
class StabilityTraining(Objective):
    """Stability training (Li, Chen, Wang & Carin, "Certified Adversarial Robustness with Additive Noise",
    NeurIPS 2019), as the code of Jeong & Shin (2020) implements it (`train_stab.py`, re-run by the CAT-RS
    authors).

    One draw delta_i ~ N(0, sigma^2 I) per image and two forward passes, clean and noisy:

        L = (1/B) sum_i [ CE(f(x_i), y_i) + lbd * S_i ],   S_i = -sum_k q(x_i)_k log q(x_i + delta_i)_k,

    q = softmax(f). S is a soft cross-entropy whose target q(x_i) is *not* detached, as in that code:
    S = H(q(x)) + KL(q(x) || q(x + delta)), so the term also lowers the entropy of the clean prediction
    (kept: the published numbers come from it). The classification term sees no noise. One SGD step
    per loader batch; training accuracy is that of the noisy pass. Cost: 2 forward/backward per image.
    """

    sigma: float
    lbd: float = setting(2.0, "weight of the stability term", limit=NONNEGATIVE)

    def __post_init__(self) -> None:
        check_hyperparameters(self)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: NoiseSource = None) -> LossOutput:
        noise = gaussian_noise(x, self.sigma, generator)
        clean = model(x).float()
        noisy = model(x + noise).float()
        stability = -(F.softmax(clean, dim=1) * F.log_softmax(noisy, dim=1)).sum(1).mean()
        return LossOutput(F.cross_entropy(clean, y) + self.lbd * stability, noisy, y)


@dataclass(frozen=True)
class ConsistencyRegularizer:
    """The consistency regularizer of Jeong & Shin, "Consistency Regularization for Certified Robustness of
    Smoothed Classifiers", NeurIPS 2020, as their code computes it (`consistency.py`, the mode all
    published runs use). Not an objective: a term that objectives add to their loss.

    On logits of shape (b, m, K) (m noisy copies of each of b images), with q_ij = softmax of copy j
    and p_i = (1/m) sum_j q_ij:

        R = (1/b) sum_i [ lbd * (1/m) sum_j KL(p_i || q_ij) + eta * H(p_i) ],

    H the entropy (p clamped at 1e-20 inside the log). p is *not* detached: it is both the KL target
    and the entropy's argument and receives gradient, as in the original. KL is 0 when all copies of
    an image predict the same distribution; with m = 1 only the entropy term is left.
    """

    lbd: float
    eta: float

    def __call__(self, logits: Tensor) -> Tensor:
        if logits.dim() != 3:
            raise ValueError(f"consistency needs logits of shape (b, m, K), got {tuple(logits.shape)}")
        log_q = F.log_softmax(logits, dim=2)
        average = log_q.exp().mean(1)  # (b, K)
        kl = F.kl_div(log_q, average.unsqueeze(1).expand_as(log_q), reduction="none").sum(2).mean(1)
        entropy = -(average * torch.log(average.clamp(min=1e-20))).sum(1)
        return (self.lbd * kl + self.eta * entropy).mean()


@dataclass(frozen=True)
class Consistency(Objective):
    """Gaussian augmentation with m copies plus consistency regularization (Jeong & Shin, NeurIPS 2020;
    their `train_consistency.py` without `--adv-training`).

    Per chunk of b images: m draws per image, one forward pass over the b*m noisy copies, and

        L = (1/(b m)) sum_ij CE(f(x_i + delta_ij), y_i) + ConsistencyRegularizer(lbd, eta).

    As in the original the loader batch is cut into m chunks with one SGD step each (`steps_per_batch`),
    so every image is seen m times per epoch. Defaults are the published ones: m = 2 (the code's
    default m = 1 is degenerate, KL = 0), lambda = 10, eta = 0.5; the CIFAR-10 runs used lambda = 20 /
    10 / 10 at sigma = 0.25 / 0.5 / 1.0, MNIST lambda = 10 / 5 / 5. Cost: m forward/backward per image.
    For SmoothAdv + Consistency use `SmoothAdv(consistency=True)`.
    """

    sigma: float
    m: int = setting(2, "noise draws per image (m SGD steps per batch)", limit=AT_LEAST_ONE)
    lbd: float = setting(10.0, "weight of the consistency KL term", limit=NONNEGATIVE)
    eta: float = setting(0.5, "weight of the entropy of the average prediction", limit=NONNEGATIVE)

    def __post_init__(self) -> None:
        check_hyperparameters(self)

    @property
    def steps_per_batch(self) -> int:
        return self.m

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: NoiseSource = None) -> LossOutput:
        noise = noise_copies(x, self.m, self.sigma, generator)
        logits = model(noisy_rows(x, noise)).float()
        targets = y.repeat_interleave(self.m)
        regularizer = ConsistencyRegularizer(self.lbd, self.eta)(logits.view(x.shape[0], self.m, -1))
        return LossOutput(F.cross_entropy(logits, targets) + regularizer, logits, targets)


def macer_margins(logits: Tensor, y: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """MACER's robustness margins on logits (b, m, K): (p1, p2, correct).

    p~_i = (1/m) sum_j softmax(beta f(x_i + delta_ij)); p1_i >= p2_i are its two largest entries and
    `correct` says whether its arg-max is y_i (the beta-sharpened soft classifier, not hard votes, as in
    the original). Gradients flow through p1 and p2; `correct` is a constant.
    """
    sharpened = F.softmax(beta * logits, dim=2).mean(1)
    top = sharpened.topk(2, dim=1)
    return top.values[:, 0], top.values[:, 1], top.indices[:, 0] == y


@dataclass(frozen=True)
class MACER(Objective):
    """MACER: attack-free training by maximizing the certified radius (Zhai, Dan, He, Zhang, Gong, Ravikumar,
    Hsieh & Wang, ICLR 2020), as in the authors' code (`macer.py`, also used unchanged by the CAT-RS authors;
    ).

    Each of the B images of a loader batch gets m draws; one forward pass over the B*m copies gives
    logits (B, m, K). With p_i the average softmax over image i's copies and p~, p1, p2, correct from
    `macer_margins`, xi_i = Phi^-1(p1_i) - Phi^-1(p2_i) (Phi^-1 the standard normal quantile):

        C = sum_i -log(p_i[y_i] + 1e-10)
        R = (sigma / 2) sum_{i kept} (gamma - xi_i),   kept: correct_i, xi_i finite and |xi_i| <= gamma
        L = (C + lbd R) / B

    i.e. the hinge (sigma/2) max(0, gamma - xi_i) on the correct images, except that images whose xi is
    not finite (p1 rounding to 1) are dropped, as in the original; both sums are divided by the full B.
    One SGD step per loader batch (no chunking). With lbd = 0 the robustness term is not computed.

    `deferred` (epochs, 0 = off): the robustness term is off (lbd = 0) in epochs 0 .. deferred - 1. The
    re-run code's `--deferred` switches MACER on at the first epoch run at the dropped learning rate
    (sigma = 1.0 on CIFAR-10, every sigma on (Fashion-)MNIST); this library drops the rate at epoch
    `--lr-step` exactly (the re-run code one epoch later), so `deferred = lr_step` keeps that meaning.

    Defaults are MACER's own: m = 16, beta = 16, gamma = 8, lbd = 12 (the CAT-RS re-runs: lbd 12 / 6 / 12,
    deferred at sigma = 1.0, on CIFAR-10; lbd 16 / 16 / 6, deferred, on MNIST). Cost: m forward/backward
    per image. The training accuracy logged is that of the B*m noisy copies (the original logs 0).
    """

    sigma: float
    m: int = setting(16, "noise draws per image", limit=AT_LEAST_ONE)
    lbd: float = setting(12.0, "weight of the robustness (hinge) term", limit=NONNEGATIVE)
    beta: float = setting(16.0, "beta: inverse temperature of MACER's soft smoothed classifier", limit=NONNEGATIVE)
    gamma: float = setting(8.0, "gamma: MACER's hinge margin on Phi^-1(p1) - Phi^-1(p2) (the code's --margin)",
                           limit=NONNEGATIVE)
    deferred: int = setting(0, "MACER: epochs trained with lambda = 0 before the robustness term starts (0: off; "
                            "the re-run code's --deferred is --lr-step here)", limit=COUNT)

    epoch: int | None = scheduled(None)  # set by at_epoch

    def __post_init__(self) -> None:
        check_hyperparameters(self)

    def at_epoch(self, epoch: int) -> MACER:
        return dataclasses.replace(self, lbd=0.0 if epoch < self.deferred else self.lbd, epoch=epoch)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: NoiseSource = None) -> LossOutput:
        self._require_epoch(self.deferred > 0)
        batch = x.shape[0]
        noise = noise_copies(x, self.m, self.sigma, generator)
        flat = model(noisy_rows(x, noise)).float()
        logits = flat.view(batch, self.m, -1)
        average = F.softmax(logits, dim=2).mean(1)
        classification = F.nll_loss(torch.log(average + 1e-10), y, reduction="sum")
        loss = classification
        if self.lbd > 0:
            p1, p2, correct = macer_margins(logits, y, self.beta)
            with torch.no_grad():
                xi = torch.special.ndtri(p1) - torch.special.ndtri(p2)
                kept = correct & torch.isfinite(xi) & (xi.abs() <= self.gamma)
            # the quantiles are recomputed on the kept images only, so a dropped image's infinite
            # derivative never meets a zero (0 x inf would be NaN)
            xi_kept = torch.special.ndtri(p1[kept]) - torch.special.ndtri(p2[kept])
            robustness = (self.gamma - xi_kept).sum() * self.sigma / 2
            loss = loss + self.lbd * robustness
        return LossOutput(loss / batch, flat, y.repeat_interleave(self.m))


def _unit(g: Tensor) -> Tensor:
    """g / (||g|| + 1e-8) per example, the normalization of the SmoothMix and CAT-RS attacks."""
    return g / (l2_norm(g) + 1e-8).view(-1, *([1] * (g.dim() - 1)))


def smoothmix_attack(model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, *, step_size: float, steps: int,
                     mix_step: int) -> tuple[Tensor, Tensor]:
    """SmoothMix's adversary of the smoothed soft classifier (Jeong et al. 2021, `SmoothMix_PGD`): (x_mix_step, x_T).

    Starting at x, `steps` ascent steps on sum_i -log p_i(x')[y_i], p_i the average softmax over image i's
    fixed noise draws `noise` (B, m, ...): each step moves by `step_size` along the per-image normalized
    gradient (g / (||g|| + 1e-8)) and clamps to [0, 1]; there is no eps-ball (the original's default,
    `--maxnorm` unset), so x_T can be up to T step_size away. x_mix_step is the iterate before step
    `mix_step` (x itself for mix_step = 0, and when mix_step >= steps). Gradients are taken with respect
    to the input only; put the model in eval mode yourself.
    """
    smoothed = SoftSmoothed(model, noise)
    adv = start = x.detach()
    for step in range(steps):
        if step == mix_step:
            start = adv
        with torch.enable_grad():
            point = adv.requires_grad_(True)
            loss = F.nll_loss(smoothed(point).float(), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, point)
        adv = (adv.detach() + step_size * _unit(grad)).clamp(0.0, 1.0).detach()
    return start.detach(), adv


@dataclass(frozen=True)
class SmoothMix(Objective):
    """SmoothMix (Jeong, Park, Kim, Lee, Kim & Shin, NeurIPS 2021), as in the authors' code (`train.py` of
    jh-jeong/smoothmix = `train_smoothmix.py` of the CAT-RS re-runs).

    Per chunk of b images with m draws delta_ij shared by every pass: `smoothmix_attack` (eval mode)
    gives x_init (the iterate before step `mix_step`, then projected onto the ball of radius
    w_e step_size mix_step around x) and x_adv (after T = `steps` steps). With the "clean" pass
    q_ij = softmax(f(x_init,i + delta_ij)) (train mode), p_i = (1/m) sum_j q_ij, lambda_i ~ U[0, 1/2]
    per image, x~_i = (1 - lambda_i) x_init,i + lambda_i x_adv,i, the target t_i = (1 - lambda_i) p_i +
    lambda_i u (u uniform over the K classes; lambda drawn after the noise, `uniform_draws`) and
    c_i = 1[argmax p_i = y_i]:

        L = (1/(b m)) sum_ij [ CE(f(x_init,i + delta_ij), y_i) + eta w_e c_i KL(t_i || q(x~_i + delta_ij)) ].

    The clean side is x_init, as in the code (it reassigns the chunk's inputs to the attack's first
    output): x itself for mix_step = 0, the warmed-up one-step adversary for mix_step = 1 (the "one-step
    adversary" variant, published at sigma = 0.5 and 1.0 on CIFAR-10), so the cross-entropy, p_i and the
    mask are then taken there too. t_i is not detached (its gradient reaches the clean pass through
    p_i), as in the original; c and lambda are constants; the masked mean divides by all b m rows.
    Warm-up: w_e = min(1, (e + 1) / warmup) (`at_epoch`) scales both the mixup term and x_init's radius;
    x_adv is not warmed up. m SGD steps per loader batch (`steps_per_batch`). Training accuracy is that
    of the clean-side copies (the original logs 0).

    Defaults: the published CIFAR-10 settings that do not depend on sigma (m = 2, T = 4, eta = 5,
    warm-up 10) and the code's step size (its `alpha`) 1 and mix_step = 0; CIFAR-10 used step size / mix_step = 0.5 / 0,
    1.0 / 1, 2.0 / 1 at sigma = 0.25 / 0.5 / 1.0; MNIST m = 4, step size 1, (T, eta) = (2, 5) / (4, 5) /
    (8, 5) or eta = 1. The original's `--maxnorm` (an eps-ball for x_adv) is not offered: no published
    run set it. Cost: m (T + 2) forward/backward per image.
    """

    sigma: float
    m: int = setting(2, "noise draws per image (m SGD steps per batch)", limit=AT_LEAST_ONE)
    steps: int = setting(4, "steps T of SmoothMix's attack", limit=AT_LEAST_ONE)
    step_size: float = setting(1.0, "step size of SmoothMix's attack (L2, [0, 1] pixels; the code's alpha)",
                                limit=POSITIVE)
    eta: float = setting(5.0, "weight of the mixup term", limit=NONNEGATIVE)
    mix_step: int = setting(0, "SmoothMix: the attack iterate mixed with x_adv (0: x itself, 1: the one-step "
                            "adversary)", limit=COUNT)
    warmup: int = setting(10, "warm-up epochs: the mixup weight and the mix radius ramp linearly to full",
                         limit=AT_LEAST_ONE)
    ramp: float = scheduled(1.0)  # w_e of the epoch (set by at_epoch)
    epoch: int | None = scheduled(None)  # set by at_epoch

    def __post_init__(self) -> None:
        check_hyperparameters(self)

    @property
    def steps_per_batch(self) -> int:
        return self.m

    def at_epoch(self, epoch: int) -> SmoothMix:
        return dataclasses.replace(self, ramp=min(1.0, (epoch + 1) / self.warmup), epoch=epoch)

    def mixed(self, x_init: Tensor, x_adv: Tensor, average: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
        """The mixup input (1 - lam) x_init + lam x_adv and its target (1 - lam) average + lam u, lam (b,)."""
        weight = lam.view(-1, *([1] * (x_init.dim() - 1)))
        uniform = torch.full_like(average, 1.0 / average.shape[1])
        return (1 - weight) * x_init + weight * x_adv, (1 - lam.view(-1, 1)) * average + lam.view(-1, 1) * uniform

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: NoiseSource = None) -> LossOutput:
        self._require_epoch(self.warmup > 1)
        batch = x.shape[0]
        noise = noise_copies(x, self.m, self.sigma, generator)
        with eval_mode(model):
            x_init, x_adv = smoothmix_attack(model, x, y, noise, step_size=self.step_size, steps=self.steps,
                                             mix_step=self.mix_step)
        x_init = (x + project(x, x_init - x, self.ramp * self.step_size * self.mix_step)).detach()
        logits = model(noisy_rows(x_init, noise)).float()
        targets = y.repeat_interleave(self.m)
        average = F.softmax(logits, dim=1).view(batch, self.m, -1).mean(1)
        lam = uniform_draws((batch,), x, generator) / 2
        x_mix, target = self.mixed(x_init, x_adv, average, lam)
        log_q = F.log_softmax(model(noisy_rows(x_mix, noise)).float(), dim=1)
        correct = (average.argmax(1) == y).to(log_q.dtype).repeat_interleave(self.m)
        kl = F.kl_div(log_q, target.repeat_interleave(self.m, dim=0), reduction="none").sum(1)
        loss = F.cross_entropy(logits, targets) + self.eta * self.ramp * (correct * kl).mean()
        return LossOutput(loss, logits, targets)


def catrs_selection(accuracy: Tensor, uniform: Tensor) -> Tensor:
    """CAT-RS's number of kept copies per image: K_i ~ Binomial(m, a_i), then K_i <- max(K_i, 1).

    `uniform` (B, m) holds U(0, 1) draws; K_i is the number of them below a_i, which is exactly
    Binomial(m, a_i) distributed.
    """
    return (uniform < accuracy.unsqueeze(1)).sum(1).clamp(min=1)


def catrs_noise_attack(model: nn.Module, x: Tensor, noise: Tensor, target: Tensor, *, eps: float, steps: int) -> Tensor:
    """CAT-RS's attack on the noise (`KL_PGD`): the draws `noise` (B, m, ...) moved to raise KL(target_i || q).

    Starting from each draw delta0: T = `steps` ascent steps of length 2 eps / T on
    sum_i (1/m) sum_j KL(target_i || softmax(f(x_i + delta_ij))) along the per-copy normalized gradient
    (g / (||g|| + 1e-8)); after each, delta - delta0 is projected onto the eps-ball per copy and then every
    copy is re-standardized as in the original: its pixel mean removed, divided by its root mean square
    (uncentred), multiplied by delta0's root mean square and delta0's mean added. So each copy keeps
    delta0's mean exactly and its scale nearly (the mean square becomes rms0^2 (1 - mean^2 / rms^2) +
    mean0^2, mean and rms those of the attacked copy), ||delta - delta0|| may slightly exceed eps, and
    nothing is clamped to [0, 1]. Returns the attacked noise (B, m, ...), detached; input gradients only.
    """
    batch, m = noise.shape[:2]
    start = noise.flatten(0, 1).detach()
    dims = tuple(range(1, start.dim()))
    mean0, rms0 = start.mean(dims, keepdim=True), start.pow(2).mean(dims, keepdim=True).sqrt()
    inputs, targets = x.detach().repeat_interleave(m, 0), target.detach().repeat_interleave(m, 0)
    delta = start
    for _ in range(steps):
        with torch.enable_grad():
            point = delta.requires_grad_(True)
            log_q = F.log_softmax(model(inputs + point).float(), dim=1)
            loss = F.kl_div(log_q, targets, reduction="none").sum() / m
            (grad,) = torch.autograd.grad(loss, point)
        delta = delta.detach() + (2 * eps / steps) * _unit(grad)
        moved = delta - start
        norms = l2_norm(moved).view(-1, *([1] * len(dims)))
        delta = start + moved * torch.clamp(eps / norms.clamp_min(1e-12), max=1.0)
        mean, rms = delta.mean(dims, keepdim=True), delta.pow(2).mean(dims, keepdim=True).sqrt()
        delta = (delta - mean) / rms * rms0 + mean0
    return delta.detach().view_as(noise)


@functools.lru_cache(maxsize=4)
def _cached_prediction(path: str, stamp: tuple[int, int]) -> Tensor:
    return read_smooth_prediction(path)


def load_smooth_prediction(path: str) -> Tensor:
    """pi (N, K) from a `smoothadv smooth-prediction` TSV (`evaluate.read_smooth_prediction`), cached per version."""
    try:
        info = os.stat(path)
    except OSError:
        raise SmoothAdvError(f"smoothed prediction {path} does not exist; compute it with `smoothadv "
                             "smooth-prediction`") from None
    return _cached_prediction(str(path), (info.st_mtime_ns, info.st_size))


@dataclass(frozen=True)
class CATRS(Objective):
    """CAT-RS: confidence-aware training of randomized smoothing (Jeong, Kim & Shin, AAAI 2023), as in the
    authors' `train_catrs.py`.

    It needs pi, the smoothed prediction of a Gaussian-trained model on every training image (vote
    frequencies over n noisy copies; `smoothadv smooth-prediction`, whose TSV `smoothed_prediction`
    names; the authors used one sigma = 0.25 model with n = 10,000 for every sigma). Per chunk of b
    images with m draws delta_ij:

    1. a clean noisy pass (train mode): CE_ij = CE(f(x_i + delta_ij), y_i), and the accuracy under noise
       a_i = (1/m) sum_j 1[argmax f(x_i + delta_ij) = y_i] (or a_i = pi_i[y_i] with `confidence_mask`);
    2. K_i ~ Binomial(m, a_i), K_i <- max(K_i, 1) (`catrs_selection`, from m uniform draws per image made
       after the noise, `uniform_draws`);
    3. L_low,i = (1/m) (sum of the K_i smallest CE_ij) (divided by m, not K_i, as in the original);
    4. the noise attacked toward pi (`catrs_noise_attack`, eps, T steps, eval mode) and a second pass
       (train mode): L_high,i = max_j KL(pi_i || softmax(f(x_i + delta*_ij)));
    5. L = (1/b) sum_i [ L_low,i + lbd 1[K_i = m] L_high,i ].

    pi, a, K are constants; gradient flows through both passes. m SGD steps per loader batch
    (`steps_per_batch`). The loop passes each example's training-set index (`uses_index`), so extra
    (pseudo-labelled) data cannot be used. Training accuracy: the adversarial copies (as the original).
    Defaults are the code's: m = 4, eps = 1, T = 4, lbd = 1 (CIFAR-10: lbd 0.5 / 1 / 2 at sigma 0.25 /
    0.5 / 1.0). Not offered: the ImageNet-only `--warmup` (doubles eps from an epoch on) and `--lr_drop`.
    Cost: m (T + 2) forward/backward per image, plus the smoothed prediction once (n forward passes
    per training image).
    """

    sigma: float
    smoothed_prediction: str | None = setting(None, "CAT-RS: the `smoothadv smooth-prediction` TSV of the training "
                                              "set (pi)")
    m: int = setting(4, "noise draws per image (m SGD steps per batch)", limit=AT_LEAST_ONE)
    eps: float = setting(1.0, "eps: L2 radius of CAT-RS's attack on the noise", limit=NONNEGATIVE)
    steps: int = setting(4, "steps T of CAT-RS's attack on the noise", limit=AT_LEAST_ONE)
    lbd: float = setting(1.0, "weight of L_high", limit=NONNEGATIVE)
    confidence_mask: bool = setting(False, "CAT-RS: draw K from pi_i[y_i] instead of the accuracy under noise")
    pi: Tensor | None = dataclasses.field(default=None, repr=False, compare=False, metadata={"internal": True})

    @property
    def uses_index(self) -> bool:
        return True

    def __post_init__(self) -> None:
        check_hyperparameters(self)
        if self.pi is None:
            if self.smoothed_prediction is None:
                raise SmoothAdvError("CATRS needs smoothed_prediction= (the CLI's --smoothed-prediction): the TSV "
                                     "of `smoothadv smooth-prediction` on the training set, or pi= its frequencies")
            object.__setattr__(self, "pi", load_smooth_prediction(self.smoothed_prediction))

    @property
    def steps_per_batch(self) -> int:
        return self.m

    def describe(self) -> dict:
        """The settings, with `pi_sha256` (the SHA-256 of the smoothed prediction's frequencies as float32) in place
        of pi: a resumed run is refused when the table at `smoothed_prediction` changed since it was read."""
        described = super().describe()
        described.pop("pi")
        assert self.pi is not None
        frequencies = self.pi.detach().to("cpu", torch.float32).contiguous().numpy()
        described["pi_sha256"] = hashlib.sha256(frequencies.tobytes()).hexdigest()
        return described

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: NoiseSource = None,
                 index: Tensor | None = None) -> LossOutput:
        if index is None:
            raise SmoothAdvError("CAT-RS needs each example's training-set index (train.fit passes it)")
        assert self.pi is not None
        if int(index.max()) >= self.pi.shape[0]:
            raise SmoothAdvError(f"the smoothed prediction has {self.pi.shape[0]} rows, but training example "
                                 f"{int(index.max())} was asked for: was it computed on this training set?")
        batch, m = x.shape[0], self.m
        pi = self.pi[index.cpu()].to(x.device)
        noise = noise_copies(x, m, self.sigma, generator)
        logits0 = model(noisy_rows(x, noise)).float().view(batch, m, -1)
        if logits0.shape[2] != pi.shape[1]:
            raise SmoothAdvError(f"the smoothed prediction has {pi.shape[1]} classes, the model {logits0.shape[2]}")
        targets = y.repeat_interleave(m)
        losses = F.cross_entropy(logits0.flatten(0, 1), targets, reduction="none").view(batch, m)
        with torch.no_grad():
            if self.confidence_mask:
                accuracy = pi.gather(1, y.view(-1, 1)).squeeze(1)
            else:
                accuracy = (logits0.argmax(2) == y.view(-1, 1)).float().mean(1)
            kept = catrs_selection(accuracy, uniform_draws((batch, m), logits0, generator))
        smallest = losses.sort(dim=1).values * (torch.arange(m, device=x.device) < kept.view(-1, 1))
        low = smallest.sum(1) / m
        adversarial = noise
        if self.eps > 0 and self.sigma > 0:
            with eval_mode(model):
                adversarial = catrs_noise_attack(model, x, noise, pi, eps=self.eps, steps=self.steps)
        logits = model(noisy_rows(x, adversarial)).float()
        kl = F.kl_div(F.log_softmax(logits, dim=1), pi.repeat_interleave(m, 0), reduction="none").sum(1)
        high = kl.view(batch, m).max(1).values
        loss = (low + self.lbd * (kept == m).to(low.dtype) * high).mean()
        return LossOutput(loss, logits, targets)


OBJECTIVES: dict[str, type[Objective]] = {"gaussian": GaussianAugmentation, "smoothadv": SmoothAdv,
                                          "stability": StabilityTraining, "consistency": Consistency,
                                          "macer": MACER, "smoothmix": SmoothMix, "catrs": CATRS}
"""Objective name (the CLI's --objective) -> class. Each class is a frozen dataclass whose fields are its
hyperparameters: `sigma` (the training noise level), `attack` (built by `build_attack`) and the others,
declared with `settings.setting(...)` so that the command line, recipes and checks know them."""


# ------------------------------------------------------------------ the factory


def hyperparameters(name: str) -> dict[str, tuple[dataclasses.Field, Any]]:
    """The own settings of the objective registered as `name`, by recipe key: key -> (field, type).

    `sigma` (the training settings' noise level) and `attack` (built by `attacks.build_attack` from
    the attack's own settings) are not among them, nor fields set by `at_epoch` (`scheduled`)."""
    if name not in OBJECTIVES:
        raise SmoothAdvError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return {recipe_key(field): (field, kind) for key, (field, kind) in fields_of(OBJECTIVES[name]).items()
            if key not in ("sigma", "attack") and not field.metadata.get("internal")}


def has_attack(name: str) -> bool:
    """Whether the objective registered as `name` trains against an `attacks.Attack` (its `attack` field)."""
    return "attack" in fields_of(OBJECTIVES[name]) if name in OBJECTIVES else False


def build_objective(name: str, sigma: float, options: Mapping[str, Any] | None = None,
                    attack: Attack | None = None) -> Objective:
    """The objective registered as `name` at noise level `sigma`.

    `options` holds the objective's own hyperparameters by recipe key (`hyperparameters(name)`), each
    converted strictly to its declared type; a key the objective does not have is refused (one line).
    `attack` is required by the objectives that have an `attack` field (SmoothAdv) and refused by the others.
    """
    known = hyperparameters(name)
    options = dict(options or {})
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise SmoothAdvError(f"{', '.join(unknown)} {'is not a setting' if len(unknown) == 1 else 'are not settings'} "
                             f"of the {name} objective")
    kwargs: dict[str, Any] = {known[key][0].name: convert(value, known[key][1], key) for key, value in options.items()}
    if has_attack(name):
        if attack is None:
            raise SmoothAdvError(f"the {name} objective needs an attack (attacks.build_attack)")
        kwargs["attack"] = attack
    elif attack is not None:
        raise SmoothAdvError(f"the {name} objective has no attack of the smoothed classifier to set")
    built: Objective = OBJECTIVES[name](sigma=sigma, **kwargs)  # type: ignore[call-arg]  # every one has sigma
    return built
