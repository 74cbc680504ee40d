"""Denoised smoothing: a certificate for a classifier you cannot retrain.

Salman, Sun, Yang, Kapoor & Kolter, "Denoised Smoothing: A Provable Defense for Pretrained Classifiers",
NeurIPS 2020 (arXiv:2003.01908). A denoiser D is trained to remove Gaussian noise of level sigma, and the
*unchanged* classifier f is certified through it: randomized smoothing (Cohen et al. 2019) of the base
classifier f o D. The guarantee is Cohen et al.'s, unchanged, because the noise is added before D.

Only what is new lives here; D is trained by the one training loop (`train.run_loop`):

- `DnCNN` (Zhang et al. 2017), the paper's denoiser: conv + ReLU, `depth - 2` x [conv (no bias) +
  BatchNorm (eps 1e-4, momentum 0.95, the paper's code) + ReLU], conv (no bias); residual, D(z) = z - net(z);
  orthogonal init and a zeroed last convolution, so a fresh D is exactly the identity. `DENOISERS` names the
  sizes: `dncnn` (17 x 64), `dncnn_wide` (17 x 128) and `dncnn_small` (5 x 16, the CPU default).
- `DenoisedClassifier` (f o D), what `certify --denoiser` certifies (`models.attach_denoiser` puts a saved
  denoiser in front of the classifier and refuses one trained for another sigma, or one that does not fit
  the classifier, in one line).
- The paper's three losses (Section 3.2) as `Objective`s of the loop: `MSE`, `Stability` (cross-entropy of
  f(D(x + delta)) against f's label on the clean x) and `Classification` (against the true label). Each
  holds the frozen classifier(s) f: eval mode, no parameter gradients, never written. Several
  classifiers are the paper's query access through surrogates, used round-robin ("batch i uses
  surrogate i mod k"); the target (`eval_classifier`) then only measures accuracy. `evaluate_denoiser`
  measures D (MSE, PSNR, accuracy of f o D).

Elsewhere: a training run is `train.train_denoiser` (its trainee, `train.DenoiserTrainee`, evaluates, saves
and resumes D); checkpoints (`models.save_denoiser` / `models.load_denoiser`, the one format of `models.py`,
kind "denoiser", weights digest verified on every load; files of the earlier "smoothadv-denoiser" format
still load, unverified) and the cost of f o D (`models.multiply_adds`, `models.cost_summary`) live in
`models`. This module imports `models` (and still offers `save_denoiser`, `load_denoiser` and
`multiply_adds` under their old names here), never the reverse: the DnCNN family registers itself there
(`models.register_denoisers`). `init=` an MSE denoiser with the stability objective is the paper's best
recipe (MSE then stability).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import SmoothAdvError
from .models import load_denoiser as load_denoiser  # their home is models; user code imports them from here
from .models import multiply_adds as multiply_adds
from .models import register_denoisers
from .models import save_denoiser as save_denoiser
from .noise import NoiseSource, gaussian_noise
from .objectives import LossOutput, Objective
from .settings import register_names
from .smoothing import eval_mode

__all__ = [
    "Classification", "DENOISERS", "DENOISER_LOSSES", "DenoisedClassifier", "DenoiserInfo", "DenoiserObjective",
    "DnCNN", "MSE", "Stability", "build_denoiser", "denoiser_names", "evaluate_denoiser", "frozen",
]


class DnCNN(nn.Module):
    """DnCNN (Zhang et al. 2017) as denoised smoothing uses it (Salman et al. 2020, Section 3.1); 3x3
    convolutions with padding 1 (any image size). Predicts the noise: D(z) = z - net(z), not clamped."""

    def __init__(self, channels: int = 1, depth: int = 17, width: int = 64, bn_eps: float = 1e-4,
                 bn_momentum: float = 0.95) -> None:
        super().__init__()
        if depth < 2 or width < 1 or channels < 1:
            raise SmoothAdvError(f"DnCNN needs depth >= 2, width >= 1, channels >= 1; got {depth}, {width}, "
                                 f"{channels}")
        self.channels, self.depth, self.width = channels, depth, width
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width, eps=bn_eps, momentum=bn_momentum), nn.ReLU(inplace=True)]
        last = nn.Conv2d(width, channels, 3, padding=1, bias=False)
        self.net = nn.Sequential(*layers, last)
        for module in self.net.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.orthogonal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.zeros_(last.weight)  # starts as the identity

    def forward(self, z: Tensor) -> Tensor:
        return z - self.net(z)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, depth={self.depth}, width={self.width}, residual"


@dataclass(frozen=True)
class DenoiserInfo:
    """A named DnCNN size: `depth` convolutions of `width` channels."""

    name: str
    depth: int
    width: int
    description: str


DENOISERS: dict[str, DenoiserInfo] = {info.name: info for info in (
    DenoiserInfo("dncnn", 17, 64, "the paper's DnCNN (CIFAR-10, ImageNet)"),
    DenoiserInfo("dncnn_wide", 17, 128, "the paper's wide DnCNN"),
    DenoiserInfo("dncnn_small", 5, 16, "CPU default for Fashion-MNIST (5.1x fashion_cnn's multiply-adds)"),
)}
"""Denoiser name -> its size. `--depth` / `--width` override either number."""


def denoiser_names() -> tuple[str, ...]:
    return tuple(DENOISERS)


register_names("denoiser", denoiser_names)


def build_denoiser(arch: str, channels: int, depth: int | None = None, width: int | None = None) -> DnCNN:
    """The DnCNN named `arch` (a `DENOISERS` key) for images of `channels` channels, sizes overridable."""
    info = DENOISERS.get(arch)
    if info is None:
        raise SmoothAdvError(f"unknown denoiser {arch!r}; choose one of {', '.join(DENOISERS)}")
    return DnCNN(channels, depth if depth is not None else info.depth, width if width is not None else info.width)


class DenoisedClassifier(nn.Sequential):
    """The base classifier f o D of denoised smoothing: Sequential(denoiser, classifier). The classifier keeps
    its own input normalization; the denoiser works on raw [0, 1] pixels plus noise, as in the paper."""

    def __init__(self, denoiser: nn.Module, classifier: nn.Module) -> None:
        super().__init__(denoiser, classifier)

    @property
    def denoiser(self) -> nn.Module:
        return self[0]

    @property
    def classifier(self) -> nn.Module:
        return self[1]


register_denoisers(build_denoiser, DenoisedClassifier)


# ------------------------------------------------------------------ the losses, as objectives of the one loop


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Inside: every module in eval mode and none of its parameters requires grad (so no gradient is ever
    accumulated into it and no BatchNorm statistic moves); both restored on exit."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    flags = [(p, p.requires_grad) for module in modules for p in module.parameters()]
    for module in modules:
        module.eval()
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        for module, training in saved:
            module.training = training


@dataclass(frozen=True)
class DenoiserObjective(Objective):
    """A loss of D on one batch (Salman et al. 2020, Section 3.2), an `Objective` of `train.train_epoch`: the
    model it is given is D. It holds the classifiers f it trains D through, frozen (`frozen`) during each
    call; step s of the run (counted from `first_step`, which `at_epoch` sets) goes through
    `classifiers[s % k]`. Described (in checkpoints) by its name and sigma only."""

    sigma: float
    classifiers: tuple[nn.Module, ...] = dataclasses.field(default=(), repr=False, compare=False)
    steps_per_epoch: int = dataclasses.field(default=0, metadata={"internal": True})
    first_step: int = dataclasses.field(default=0, metadata={"internal": True})
    needs_classifier: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.needs_classifier and not self.classifiers:
            raise SmoothAdvError(f"the {type(self).__name__.lower()} objective trains D through a classifier; give "
                                 "--classifier CKPT")
        object.__setattr__(self, "classifiers", tuple(self.classifiers))
        object.__setattr__(self, "_steps", itertools.count(self.first_step))

    def at_epoch(self, epoch: int) -> DenoiserObjective:
        return dataclasses.replace(self, first_step=epoch * self.steps_per_epoch)

    def describe(self) -> dict[str, Any]:
        return {"name": type(self).__name__, "sigma": self.sigma}

    def classifier(self) -> nn.Module:
        """This step's classifier (round-robin)."""
        return self.classifiers[next(self._steps) % len(self.classifiers)]  # type: ignore[attr-defined]


@dataclass(frozen=True)
class MSE(DenoiserObjective):
    """Denoising: mean over all B*C*H*W elements of (D(x + delta) - x)^2; no classifier. Its optimum among all
    functions is the posterior mean E[x | x + delta] (the Wiener filter for Gaussian x)."""

    needs_classifier: ClassVar[bool] = False

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: NoiseSource = None) -> LossOutput:
        denoised = model(x + gaussian_noise(x, self.sigma, generator))
        nothing = torch.empty(0, dtype=torch.long, device=x.device)  # no prediction to score
        return LossOutput(F.mse_loss(denoised, x), nothing.float().view(0, 1), nothing)


@dataclass(frozen=True)
class Stability(DenoiserObjective):
    """Stability: cross-entropy of f(D(x + delta)) with f's own hard label argmax f(x) on the clean image
    (computed without gradient), so no true labels are needed (the paper's code)."""

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: NoiseSource = None) -> LossOutput:
        f = self.classifier()
        with frozen(f):
            with torch.no_grad():
                target = f(x).argmax(1)
            logits = f(model(x + gaussian_noise(x, self.sigma, generator))).float()
        return LossOutput(F.cross_entropy(logits, target), logits, target)


@dataclass(frozen=True)
class Classification(DenoiserObjective):
    """Classification: cross-entropy of f(D(x + delta)) with the true label y."""

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: NoiseSource = None) -> LossOutput:
        f = self.classifier()
        with frozen(f):
            logits = f(model(x + gaussian_noise(x, self.sigma, generator))).float()
        return LossOutput(F.cross_entropy(logits, y), logits, y)


DENOISER_LOSSES: dict[str, type[DenoiserObjective]] = {"mse": MSE, "stability": Stability,
                                                            "classification": Classification}


def evaluate_denoiser(denoiser: nn.Module, batches: Iterable[tuple[Tensor, ...]], sigma: float, *,
                      classifier: nn.Module | None = None, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None) -> dict[str, float]:
    """On noisy copies x + delta (eval mode): the MSE of D(x + delta) against x, its PSNR (peak 1; NaN for
    a NaN MSE), and with `classifier` the accuracy of f(D(x + delta)) and of f(x + delta)."""
    device = torch.device(device)
    squared, elements, right, right_noisy, count = 0.0, 0, 0, 0, 0
    with eval_mode(denoiser), contextlib.ExitStack() as stack, torch.no_grad():
        if classifier is not None:
            stack.enter_context(eval_mode(classifier))
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            noisy = x + sigma * torch.randn(x.shape, device=device, generator=generator)
            denoised = denoiser(noisy)
            squared += float(((denoised - x) ** 2).sum())
            elements += x.numel()
            count += len(y)
            if classifier is not None:
                right += int((classifier(denoised).argmax(1) == y).sum())
                right_noisy += int((classifier(noisy).argmax(1) == y).sum())
    mse = squared / max(elements, 1)
    psnr = math.nan if math.isnan(mse) else 10 * math.log10(1 / mse) if mse > 0 else math.inf
    result = {"mse": mse, "psnr": psnr}
    if classifier is not None:
        result.update(acc_denoised=right / max(count, 1), acc_noisy=right_noisy / max(count, 1))
    return result
