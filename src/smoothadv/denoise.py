"""Denoised smoothing: a certificate for a classifier you cannot retrain.

Salman, Sun, Yang, Kapoor & Kolter, "Denoised Smoothing: A Provable Defense for Pretrained
Classifiers", NeurIPS 2020 (arXiv:2003.01908). A denoiser D is trained to remove Gaussian noise of
level sigma, and the *unchanged* classifier f is certified through it: randomized smoothing of the
base classifier f o D. The guarantee is Cohen et al.'s, unchanged, because the noise is added
before D (D is part of the base classifier, whatever it is).

This module holds

- `DnCNN`: the paper's denoiser family (Zhang et al. 2017): conv + ReLU, then `depth - 2` x
  [conv (no bias) + BatchNorm + ReLU], then conv (no bias); residual, D(z) = z - net(z). BatchNorm
  as the paper's code: eps 1e-4, momentum 0.95 (PyTorch convention: the newest batch weighs 95%).
  Init: orthogonal conv weights, zero biases, and a zeroed last convolution, so D starts as the
  identity (exactly: D(z) = z - 0). `DENOISERS` names the sizes: the paper's `dncnn` (17 x 64) and
  `dncnn_wide` (17 x 128), and `dncnn_small` (5 x 16), the CPU default for Fashion-MNIST.
- `DenoisedClassifier`: Sequential(D, f), the base classifier that `Smooth` certifies.
- checkpoints (`save_denoiser` / `load_denoiser`, format `smoothadv-denoiser`, weights-only) that
  record the sigma the denoiser was trained for, its objective history and the digests of the
  classifiers it was trained through; `attach_denoiser` is what `certify --denoiser` uses: it
  refuses a sigma mismatch and a denoiser that does not fit the classifier, in one line.
- the three objectives of the paper (Section 3.2): `MSE` (denoising), `Stability` (cross-entropy of
  f(D(x + delta)) against f's own label on the clean x) and `Classification` (cross-entropy with
  the true label); f is frozen in all of them (`frozen`): eval mode, no parameter gradients, and
  its parameters and buffers are never written.
- `train_denoiser(DenoiserTrainSettings, classifiers=...)`: a small resumable loop (Adam or SGD,
  step schedule, a checkpoint every epoch). With several classifiers the batches go round-robin
  through them, as the paper's query-access training through surrogates does ("batch i uses
  surrogate i mod k"); the target classifier then only measures accuracy (`eval_classifier`).
  MSE-then-stability fine-tuning, the paper's best recipe, is `init=` an MSE denoiser with the
  stability objective.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import SmoothAdvError
from .objectives import NoiseSource, gaussian_noise
from .settings import AT_LEAST_ONE, NONNEGATIVE, POSITIVE, SEED, check_fields, recipe_key, setting

FORMAT = "smoothadv-denoiser"
CHECKPOINT = "denoiser.pth.tar"
LOG_COLUMNS = ("epoch", "time", "lr", "train_loss", "test_mse", "test_psnr", "test_acc_denoised", "test_acc_noisy")


# ------------------------------------------------------------------ the denoiser


class DnCNN(nn.Module):
    """DnCNN (Zhang et al. 2017) as denoised smoothing uses it (Salman et al. 2020, Section 3.1).

    `depth` 3x3 convolutions with padding 1 (so any image size): conv(channels -> width, bias) +
    ReLU; `depth - 2` x [conv(width -> width, no bias) + BatchNorm(eps 1e-4, momentum 0.95) + ReLU];
    conv(width -> channels, no bias). The network predicts the noise: D(z) = z - net(z). The output
    is not clamped. A fresh DnCNN is exactly the identity (the last convolution is zero).
    """

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
        layers.append(nn.Conv2d(width, channels, 3, padding=1, bias=False))
        self.net = nn.Sequential(*layers)
        for module in self.net.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.orthogonal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.zeros_(self.net[-1].weight)  # starts as the identity

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


def build_denoiser(arch: str, channels: int, depth: int | None = None, width: int | None = None) -> DnCNN:
    """The DnCNN named `arch` (a `DENOISERS` key) for images of `channels` channels, sizes overridable."""
    info = DENOISERS.get(arch)
    if info is None:
        raise SmoothAdvError(f"unknown denoiser {arch!r}; choose one of {', '.join(DENOISERS)}")
    return DnCNN(channels, depth if depth is not None else info.depth, width if width is not None else info.width)


class DenoisedClassifier(nn.Sequential):
    """The base classifier f o D of denoised smoothing: Sequential(denoiser, classifier).

    The classifier keeps its own input normalization (its first layer, for this library's models);
    the denoiser works on raw [0, 1] pixels plus noise, as in the paper.
    """

    def __init__(self, denoiser: nn.Module, classifier: nn.Module) -> None:
        super().__init__(denoiser, classifier)

    @property
    def denoiser(self) -> nn.Module:
        return self[0]

    @property
    def classifier(self) -> nn.Module:
        return self[1]


def multiply_adds(module: nn.Module, shape: Sequence[int]) -> int:
    """Multiply-adds of one forward pass of `module` on one image of `shape` (C, H, W), counting the
    Conv2d and Linear layers (the rest is negligible for these networks)."""
    total = 0

    def count(layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        if isinstance(layer, nn.Conv2d):
            kernel = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
            total += output.numel() * kernel
        elif isinstance(layer, nn.Linear):
            total += output.numel() * layer.in_features

    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        from .smoothing import eval_mode

        with eval_mode(module), torch.no_grad():
            parameter = next(module.parameters(), None)
            device = parameter.device if parameter is not None else torch.device("cpu")
            module(torch.zeros((1, *shape), device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return total


# ------------------------------------------------------------------ checkpoints


def save_denoiser(path: str | Path, denoiser: DnCNN, *, arch: str, dataset: str, sigma: float, **extra: Any) -> None:
    """Write a denoiser checkpoint atomically (weights-only loadable: tensors, numbers, strings, lists, dicts).

    Fields: format "smoothadv-denoiser", version 1, arch (a `DENOISERS` name), channels, depth,
    width, dataset (what it was trained on), sigma (the noise level it was trained for),
    state_dict, and `extra` (epoch, objective, history, classifiers, optimizer, ... ).
    """
    from . import __version__
    from .files import atomic_torch_save

    payload: dict[str, Any] = {
        "format": FORMAT, "version": 1, "arch": arch, "channels": denoiser.channels, "depth": denoiser.depth,
        "width": denoiser.width, "dataset": dataset, "sigma": float(sigma),
        "state_dict": {k: v.detach().cpu() for k, v in denoiser.state_dict().items()},
        "smoothadv_version": __version__,
    }
    payload.update(extra)
    atomic_torch_save(payload, path)


def _read(path: str | Path, map_location: str | torch.device) -> dict[str, Any]:
    from .models import FORMAT as CLASSIFIER_FORMAT
    from .models import read_checkpoint

    file = Path(path)
    try:
        payload = read_checkpoint(file, map_location)
    except SmoothAdvError as exc:
        text = str(exc)
        raise SmoothAdvError(text if text.startswith("denoiser") else f"denoiser {text}") from None
    if payload.get("format") == CLASSIFIER_FORMAT:
        raise SmoothAdvError(f"{file} is a classifier checkpoint ({payload.get('arch')}), not a denoiser; train one "
                             "with `smoothadv train-denoiser`")
    if payload.get("format") != FORMAT:
        raise SmoothAdvError(f"{file} is not a smoothadv denoiser checkpoint")
    return payload


def load_denoiser(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[DnCNN, dict[str, Any]]:
    """Load a denoiser checkpoint: (DnCNN in eval mode, metadata without the tensors).

    Refuses, in one line, a missing, corrupt or truncated file, a file holding anything but plain
    data (weights-only loading), a classifier checkpoint, malformed fields, and weights that do not
    fit the recorded size.
    """
    file = Path(path)
    payload = _read(file, map_location)
    for key in ("channels", "depth", "width"):
        value = payload.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SmoothAdvError(f"denoiser {file} is malformed: {key} must be a positive integer, got {value!r}")
    sigma = payload.get("sigma")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise SmoothAdvError(f"denoiser {file} is malformed: sigma must be a number >= 0, got {sigma!r}")
    if payload.get("arch") not in DENOISERS or not isinstance(payload.get("dataset"), str):
        raise SmoothAdvError(f"denoiser {file} is malformed: unknown arch {payload.get('arch')!r} or no dataset")
    denoiser = DnCNN(payload["channels"], payload["depth"], payload["width"])
    state = payload["state_dict"]
    own = denoiser.state_dict()
    if not isinstance(state, dict) or set(state) != set(own) or any(
            not isinstance(state[k], Tensor) or state[k].shape != own[k].shape for k in own):
        raise SmoothAdvError(f"the weights in denoiser {file} do not fit a DnCNN of depth {payload['depth']} and width "
                             f"{payload['width']}; the file is damaged")
    denoiser.load_state_dict(state)
    denoiser.to(map_location).eval()
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "optimizer", "scheduler")}
    return denoiser, meta


def check_sigma(denoiser_sigma: float, sigma: float, source: str = "the denoiser") -> None:
    """Refuse a denoiser trained for another noise level than the smoothing's `sigma` (one line).

    A denoiser removes the noise it was trained on; at another sigma the certificate stays valid but
    f o D is a poor classifier, which is almost always a mistake (a wrong file or flag).
    """
    if not math.isclose(float(denoiser_sigma), float(sigma), rel_tol=1e-9, abs_tol=1e-12):
        raise SmoothAdvError(f"{source} was trained for sigma {denoiser_sigma:g}, but --sigma is {sigma:g}; use a "
                             f"denoiser trained at {sigma:g} (smoothadv train-denoiser --sigma {sigma:g})")


def check_fits(denoiser: nn.Module, classifier: nn.Module, shape: Sequence[int], channels: int | None = None,
               source: str = "the denoiser") -> None:
    """Refuse (one line) a denoiser that does not fit the classifier's images of `shape` (C, H, W):
    other channels, an output of another shape, or an output the classifier cannot take."""
    if channels is not None and channels != shape[0]:
        raise SmoothAdvError(f"{source} takes {channels}-channel images, but the classifier's are {shape[0]}x"
                             f"{shape[1]}x{shape[2]}")
    from .smoothing import eval_mode

    parameter = next(denoiser.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    probe = torch.zeros((2, *shape), device=device)
    try:
        with eval_mode(denoiser), eval_mode(classifier), torch.no_grad():
            out = denoiser(probe)
            if tuple(out.shape) != tuple(probe.shape):
                raise SmoothAdvError(f"{source} turns {tuple(shape)} images into {tuple(out.shape[1:])}; it must keep "
                                     "their shape")
            classifier(out)
    except RuntimeError as exc:
        raise SmoothAdvError(f"{source} does not fit the classifier's {tuple(shape)} images "
                             f"({str(exc).splitlines()[0][:160]})") from None


def attach_denoiser(classifier: nn.Module, path: str | Path, *, sigma: float, shape: Sequence[int],
                    device: torch.device | str = "cpu") -> tuple[DenoisedClassifier, dict[str, Any]]:
    """f o D for `certify --denoiser`: the denoiser at `path` in front of `classifier`, checked.

    Refuses (one line) a corrupt file, a denoiser trained for another sigma, and one that does not
    fit the classifier's images of `shape`. Returns the composed model (eval mode) and the
    denoiser's metadata with its file's SHA-256 (`sha256`).
    """
    from .files import file_sha256

    denoiser, meta = load_denoiser(path, device)
    source = f"denoiser {path}"
    check_fits(denoiser, classifier, shape, meta["channels"], source)
    check_sigma(meta["sigma"], sigma, source)
    return DenoisedClassifier(denoiser, classifier).eval(), {**meta, "sha256": file_sha256(path)}


# ------------------------------------------------------------------ objectives


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Inside: every module in eval mode and none of its parameters requires grad (so no gradient is
    ever accumulated into it and no BatchNorm statistic moves); both restored on exit."""
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


class DenoiserLoss(NamedTuple):
    loss: Tensor              # scalar to backpropagate into D
    logits: Tensor | None     # f(D(x + delta)) when the objective ran f (for the training log)


class DenoiserObjective(ABC):
    """A denoiser training objective (Salman et al. 2020, Section 3.2): the loss of D on one batch.

    `classifier` is f, already frozen by the caller (`frozen`); gradients reach D through it.
    Implementations are frozen dataclasses whose fields are the hyperparameters.
    """

    needs_classifier: ClassVar[bool] = True
    sigma: float

    @abstractmethod
    def __call__(self, denoiser: nn.Module, classifier: nn.Module | None, x: Tensor, y: Tensor,
                 generator: NoiseSource = None) -> DenoiserLoss:
        """The loss on x (B, C, H, W) in [0, 1] with labels y; delta ~ N(0, sigma^2 I) drawn from `generator`."""

    def describe(self) -> dict[str, Any]:
        return {"name": type(self).__name__, **dataclasses.asdict(self)}  # type: ignore[call-overload]


@dataclass(frozen=True)
class MSE(DenoiserObjective):
    """Denoising: mean over all B*C*H*W elements of (D(x + delta) - x)^2. Needs no classifier; its
    optimum among all functions is the posterior mean E[x | x + delta] (the Wiener filter for
    Gaussian x)."""

    sigma: float
    needs_classifier: ClassVar[bool] = False

    def __call__(self, denoiser: nn.Module, classifier: nn.Module | None, x: Tensor, y: Tensor,
                 generator: NoiseSource = None) -> DenoiserLoss:
        denoised = denoiser(x + gaussian_noise(x, self.sigma, generator))
        return DenoiserLoss(F.mse_loss(denoised, x), None)


@dataclass(frozen=True)
class Stability(DenoiserObjective):
    """Stability: cross-entropy of f(D(x + delta)) with f's own hard label argmax f(x) on the clean
    image (computed without gradient), so no true labels are needed (the paper's code)."""

    sigma: float

    def __call__(self, denoiser: nn.Module, classifier: nn.Module | None, x: Tensor, y: Tensor,
                 generator: NoiseSource = None) -> DenoiserLoss:
        assert classifier is not None
        with torch.no_grad():
            target = classifier(x).argmax(1)
        logits = classifier(denoiser(x + gaussian_noise(x, self.sigma, generator)))
        return DenoiserLoss(F.cross_entropy(logits, target), logits)


@dataclass(frozen=True)
class Classification(DenoiserObjective):
    """Classification: cross-entropy of f(D(x + delta)) with the true label y."""

    sigma: float

    def __call__(self, denoiser: nn.Module, classifier: nn.Module | None, x: Tensor, y: Tensor,
                 generator: NoiseSource = None) -> DenoiserLoss:
        assert classifier is not None
        logits = classifier(denoiser(x + gaussian_noise(x, self.sigma, generator)))
        return DenoiserLoss(F.cross_entropy(logits, y), logits)


DENOISER_OBJECTIVES: dict[str, type[DenoiserObjective]] = {"mse": MSE, "stability": Stability,
                                                            "classification": Classification}


def denoiser_epoch(denoiser: nn.Module, objective: DenoiserObjective, optimizer: torch.optim.Optimizer,
                   batches: Iterable[tuple[Tensor, Tensor]], *, classifiers: Sequence[nn.Module] = (),
                   device: torch.device | str = "cpu", generator: NoiseSource = None, first_step: int = 0,
                   progress: Any = None) -> float:
    """One pass over `batches`: one optimizer step of D per batch; returns the mean loss per example.

    Step s (counted from `first_step`) goes through `classifiers[s % k]`: one classifier is full
    access, several are the paper's query access through surrogates. The classifiers are `frozen`
    throughout; only `optimizer`'s parameters (D's) change. D is in train mode.
    """
    if objective.needs_classifier and not classifiers:
        raise SmoothAdvError(f"the {type(objective).__name__.lower()} objective trains D through a classifier; "
                             "give one (--classifier)")
    device = torch.device(device)
    denoiser.train()
    total, seen = 0.0, 0
    with frozen(*classifiers):
        for step, (x, y) in enumerate(batches, start=first_step):
            x, y = x.to(device), y.to(device)
            classifier = classifiers[step % len(classifiers)] if classifiers else None
            out = objective(denoiser, classifier, x, y, generator)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            total += float(out.loss.detach()) * len(x)
            seen += len(x)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{total / seen:.4g}")
    return total / max(seen, 1)


def evaluate_denoiser(denoiser: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], sigma: float, *,
                      classifier: nn.Module | None = None, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None) -> dict[str, float]:
    """On noisy copies x + delta (eval mode): the MSE of D(x + delta) against x, its PSNR (peak 1), and
    with `classifier` the accuracy of f(D(x + delta)) and of f(x + delta)."""
    from .smoothing import eval_mode

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
    result = {"mse": mse, "psnr": 10 * math.log10(1 / mse) if mse > 0 else math.inf}
    if classifier is not None:
        result.update(acc_denoised=right / max(count, 1), acc_noisy=right_noisy / max(count, 1))
    return result


# ------------------------------------------------------------------ training settings and loop


def _dataset_names() -> tuple[str, ...]:
    from .data import dataset_names

    return dataset_names()


@dataclass(frozen=True, kw_only=True)
class DenoiserTrainSettings:
    """A denoiser training run (Salman et al. 2020; defaults are their code's: Adam, lr 1e-3, weight
    decay 1e-4, lr x0.1 every 30 epochs, 90 epochs, batch 256).

    `classifier` lists the classifier checkpoint(s) D is trained through (stability and
    classification objectives): one is full access; several are query access through surrogates,
    used round-robin per batch, with `eval_classifier` (the target) only measuring accuracy.
    `init` fine-tunes a trained denoiser: an MSE denoiser with `objective="stability"` is the
    paper's MSE-then-stability recipe.
    """

    dataset: str = setting("fashion_mnist", "dataset to train on", choices=_dataset_names)
    arch: str = setting("dncnn_small", "denoiser size", choices=denoiser_names)
    depth: int | None = setting(None, "convolutions (default: the arch's)", limit=(lambda v: v >= 2, "an integer >= 2"))
    width: int | None = setting(None, "channels of the hidden convolutions (default: the arch's)", limit=AT_LEAST_ONE)
    out_dir: Path = setting(help="run directory (denoiser.pth.tar, log.tsv, args.json)", flag="--out", rows=False)
    sigma: float = setting(0.25, "noise level the denoiser removes (recorded; certify refuses another)",
                           limit=POSITIVE)
    objective: str = setting("mse", "mse: against the clean image; stability: f(D(x+delta)) vs f(x); "
                             "classification: f(D(x+delta)) vs the label", choices=tuple(DENOISER_OBJECTIVES))
    classifier: tuple[str, ...] | None = setting(None, "classifier checkpoint(s) D is trained through, f frozen "
                                                 "(several: query access, round-robin per batch)")
    eval_classifier: str | None = setting(None, "classifier whose accuracy the log reports (default: the first "
                                          "--classifier; the target under query access)")
    normalization: str | None = setting(None, "input layer of Cohen/Salman classifier checkpoints",
                                        choices=("normalize", "center"))
    init: str | None = setting(None, "fine-tune this denoiser checkpoint (MSE then stability: the paper's best)")
    epochs: int = setting(90, "training epochs", limit=AT_LEAST_ONE)
    batch_size: int = setting(256, "batch size", flag="--batch", limit=AT_LEAST_ONE)
    optimizer: str = setting("adam", "optimizer", choices=("adam", "sgd"))
    lr: float = setting(1e-3, "learning rate", limit=POSITIVE)
    lr_step: int = setting(30, "decay lr every this many epochs", limit=AT_LEAST_ONE)
    lr_gamma: float = setting(0.1, "lr decay factor", limit=POSITIVE)
    momentum: float = setting(0.9, "SGD momentum", limit=NONNEGATIVE)
    weight_decay: float = setting(1e-4, "weight decay", limit=NONNEGATIVE)
    seed: int = setting(0, "seed for initialization, noise and data order", limit=SEED)
    train_subset: int | None = setting(None, "train on the first N images only", limit=AT_LEAST_ONE)
    eval_subset: int | None = setting(1000, "evaluate on N test images each epoch", limit=AT_LEAST_ONE)
    device: str = setting("cpu", "cpu, cuda, cuda:1, ... (auto: cuda when available)", rows=False)
    data_dir: str | None = setting(None, "data root (default: $SMOOTHADV_DATA or ./data)", rows=False)
    resume: bool = setting(False, "continue from the run directory's checkpoint", rows=False)
    force: bool = setting(False, "start over even if a checkpoint exists", rows=False)
    progress: bool = setting(True, "progress bars", rows=False)

    def __post_init__(self) -> None:
        check_fields(self, recipe_key)
        if self.resume and self.force:
            raise SmoothAdvError("--resume and --force contradict each other; give one")

    def build_objective(self) -> DenoiserObjective:
        return DENOISER_OBJECTIVES[self.objective](self.sigma)


def _classifier_record(source: str | nn.Module) -> dict[str, Any]:
    from .files import file_sha256

    if isinstance(source, nn.Module):
        return {"module": type(source).__name__}
    return {"path": str(source), "sha256": file_sha256(source)}


def _load_classifiers(cfg: DenoiserTrainSettings, device: torch.device) -> tuple[list[nn.Module], list[Any]]:
    from .models import load_checkpoint

    loaded, sources = [], []
    for path in cfg.classifier or ():
        model, meta = load_checkpoint(path, device, normalization=cfg.normalization)
        if meta["dataset"] != cfg.dataset:
            raise SmoothAdvError(f"classifier {path} was trained on {meta['dataset']}, the denoiser on {cfg.dataset}")
        loaded.append(model)
        sources.append(path)
    return loaded, sources


def train_denoiser(cfg: DenoiserTrainSettings, classifiers: Sequence[nn.Module] | None = None,
                   eval_classifier: nn.Module | None = None) -> Path:
    """Train a denoiser; returns its checkpoint path (`cfg.out_dir / denoiser.pth.tar`).

    Classifiers come from `cfg.classifier` (checkpoint files, with their normalization layers) or,
    through the API, from `classifiers`: any `nn.Module`s mapping [0, 1] images (B, C, H, W) to
    logits, normalization included (e.g. Sequential(Normalize(mean, std), torchvision_model)).
    They are never updated (`frozen`). Writes, each epoch and atomically, the checkpoint (with
    optimizer, schedule and epoch, so `resume` continues exactly: every epoch's noise and order are
    seeded from (seed, epoch)) and `log.tsv`; `args.json` and `env.json` at the start. A second run
    on the same directory is refused (lock file).
    """
    from .files import locked_run_directory

    if classifiers is not None and cfg.classifier:
        raise SmoothAdvError("give the classifiers as files (settings.classifier) or as modules, not both")
    with locked_run_directory(cfg.out_dir, CHECKPOINT):
        return _train(cfg, list(classifiers) if classifiers is not None else None, eval_classifier)


def _train(cfg: DenoiserTrainSettings, modules: list[nn.Module] | None, eval_module: nn.Module | None) -> Path:
    from tqdm.auto import tqdm

    from .accel import resolve_device
    from .data import get_dataset, input_shape
    from .files import atomic_write_text, write_provenance
    from .models import load_checkpoint
    from .seeds import derive_seed
    from .train import _subset, batches, num_batches

    device = resolve_device(cfg.device)
    path = Path(cfg.out_dir) / CHECKPOINT
    if path.exists() and not (cfg.resume or cfg.force):
        raise SmoothAdvError(f"{path} exists; pass --resume to continue training or --force to start over")
    objective = cfg.build_objective()
    if modules is None:
        classifiers, sources = _load_classifiers(cfg, device)
    else:
        classifiers, sources = [m.to(device) for m in modules], list(modules)
    if objective.needs_classifier and not classifiers:
        raise SmoothAdvError(f"the {cfg.objective} objective trains D through a classifier; give --classifier CKPT")
    if eval_module is not None:
        evaluator: nn.Module | None = eval_module.to(device)
    elif cfg.eval_classifier:
        evaluator = load_checkpoint(cfg.eval_classifier, device, normalization=cfg.normalization)[0]
    else:
        evaluator = classifiers[0] if classifiers else None
    shape = input_shape(cfg.dataset)
    torch.manual_seed(cfg.seed)
    denoiser = build_denoiser(cfg.arch, shape[0], cfg.depth, cfg.width).to(device)
    history: list[dict[str, Any]] = []
    if cfg.init is not None:
        start, init_meta = load_denoiser(cfg.init, device)
        if (start.channels, start.depth, start.width) != (denoiser.channels, denoiser.depth, denoiser.width):
            raise SmoothAdvError(f"--init {cfg.init} is a DnCNN of depth {start.depth} and width {start.width} with "
                                 f"{start.channels} channels; this run builds {denoiser.depth} x {denoiser.width} with "
                                 f"{denoiser.channels} (set --arch/--depth/--width to match)")
        denoiser.load_state_dict(start.state_dict())
        history = list(init_meta.get("history") or [])
    for model in (*classifiers, *([evaluator] if evaluator is not None else [])):
        check_fits(denoiser, model, shape, denoiser.channels, f"a {cfg.arch} denoiser for {cfg.dataset}")
    params = [p for p in denoiser.parameters()]
    if cfg.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    done = 0
    if cfg.resume and path.exists():
        done = _restore(path, cfg, denoiser, optimizer, scheduler, device)
    train_set = _subset(get_dataset(cfg.dataset, "train", cfg.data_dir), cfg.train_subset)
    test_set = _subset(get_dataset(cfg.dataset, "test", cfg.data_dir), cfg.eval_subset)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}
    records = [_classifier_record(s) for s in sources]
    stage = {"objective": objective.describe(), "epochs": cfg.epochs, "classifiers": records,
             "init": _classifier_record(cfg.init) if cfg.init else None}
    write_provenance(cfg.out_dir, {**config, "stage": stage,
                                   "eval_classifier": _classifier_record(cfg.eval_classifier)
                                   if cfg.eval_classifier else None})
    log_path = Path(cfg.out_dir) / "log.tsv"
    lines = ["\t".join(LOG_COLUMNS)]
    if done > 0 and log_path.exists():
        lines = log_path.read_text().splitlines()[: done + 1]
    steps = num_batches(train_set, cfg.batch_size)
    for epoch in range(done, cfg.epochs):
        started, lr = time.time(), optimizer.param_groups[0]["lr"]
        noise = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, epoch, 0))
        order = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, 3))
        with tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False,
                  dynamic_ncols=True) as bar:
            loss = denoiser_epoch(denoiser, objective, optimizer, batches(train_set, cfg.batch_size, shuffle=True,
                                                                          generator=order),
                                  classifiers=classifiers, device=device, generator=noise, first_step=epoch * steps,
                                  progress=bar)
        scheduler.step()
        test = evaluate_denoiser(denoiser, batches(test_set, 512, shuffle=False), cfg.sigma, classifier=evaluator,
                                 device=device, generator=torch.Generator(device=device).manual_seed(cfg.seed + 7))
        elapsed = time.time() - started
        lines.append("\t".join([str(epoch + 1), f"{elapsed:.1f}", f"{lr:.6g}", f"{loss:.6f}", f"{test['mse']:.6f}",
                                f"{test['psnr']:.3f}", f"{test.get('acc_denoised', math.nan):.4f}",
                                f"{test.get('acc_noisy', math.nan):.4f}"]))
        save_denoiser(path, denoiser, arch=cfg.arch, dataset=cfg.dataset, sigma=cfg.sigma, epoch=epoch + 1,
                      objective=objective.describe(), classifiers=records,
                      history=[*history, {**stage, "epochs_done": epoch + 1}],
                      optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), config=config)
        atomic_write_text(log_path, "\n".join(lines) + "\n")  # after the checkpoint: a log row has its checkpoint
        if cfg.progress:
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}  loss {loss:.5f}  test PSNR {test['psnr']:.2f} dB"
                       + (f"  acc f(D(x+d)) {test['acc_denoised']:.3f}  f(x+d) {test['acc_noisy']:.3f}"
                          if "acc_denoised" in test else "") + f"  ({elapsed:.0f}s)")
    return path


def _restore(path: Path, cfg: DenoiserTrainSettings, denoiser: DnCNN, optimizer: torch.optim.Optimizer,
             scheduler: Any, device: torch.device) -> int:
    """Load a checkpoint of this run into the denoiser, optimizer and schedule; returns the epochs done."""
    from .models import read_checkpoint

    saved = read_checkpoint(path, device)
    before = saved.get("config") or {}
    for key in ("dataset", "arch", "sigma", "objective", "depth", "width", "seed", "init"):
        if before.get(key) != getattr(cfg, key):
            raise SmoothAdvError(f"{path} was trained with {key} {before.get(key)!r}, not {getattr(cfg, key)!r}; "
                                 "refusing to resume (use another --out or --force)")
    denoiser.load_state_dict(saved["state_dict"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return int(saved["epoch"])


def cost_summary(denoiser: nn.Module, classifier: nn.Module, shape: Sequence[int]) -> str:
    """One line: multiply-adds per image of D, of f and of f o D (a certification sample costs f o D)."""
    d, f = multiply_adds(denoiser, shape), multiply_adds(classifier, shape)
    return (f"denoiser {d / 1e6:.2f} M multiply-adds per image, classifier {f / 1e6:.2f} M: f o D costs "
            f"{(d + f) / max(f, 1):.1f}x f per noise sample")

