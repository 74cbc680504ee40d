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
- `DenoisedClassifier` (f o D) and `attach_denoiser`, what `certify --denoiser` uses: it refuses a denoiser
  trained for another sigma, or one that does not fit the classifier, in one line.
- The paper's three losses (Section 3.2) as `Objective`s of the loop: `MSE`, `Stability` (cross-entropy of
  f(D(x + delta)) against f's label on the clean x) and `Classification` (against the true label). Each
  holds the frozen classifier(s) f: eval mode, no parameter gradients, never written. Several
  classifiers are the paper's query access through surrogates, used round-robin ("batch i uses
  surrogate i mod k"); the target (`eval_classifier`) then only measures accuracy.
- Checkpoints in the one format of `models.py` (kind "denoiser", weights digest verified on every load);
  files of the earlier "smoothadv-denoiser" format still load, unverified (`weights_verified` False).
  `init=` an MSE denoiser with the stability objective is the paper's best recipe (MSE then stability).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from .accel import resolve_device
from .data import batches, get_dataset, input_shape, subset
from .diffusion import diffusion_denoiser
from .errors import SmoothAdvError
from .files import file_sha256
from .models import DENOISER, FORMAT, is_denoiser, load_checkpoint, read_checkpoint, save_checkpoint
from .noise import NoiseSource, gaussian_noise
from .objectives import LossOutput, Objective
from .settings import DenoiserTrainSettings, register_names
from .smoothing import eval_mode
from .train import Data, Trainee, run_loop

__all__ = [
    "CHECKPOINT", "Classification", "DENOISERS", "DENOISER_LOSSES", "DenoisedClassifier", "DenoiserInfo",
    "DenoiserObjective", "DenoiserTrainee", "DnCNN", "LOG_COLUMNS", "MSE", "Stability", "attach_denoiser",
    "build_denoiser", "check_fits", "check_sigma", "cost_summary", "denoiser_names", "evaluate_denoiser", "frozen",
    "load_denoiser", "multiply_adds", "save_denoiser", "train_denoiser",
]

CHECKPOINT = "denoiser.pth.tar"
LOG_COLUMNS = ("epoch", "time", "lr", "train_loss", "test_mse", "test_psnr", "test_acc_denoised", "test_acc_noisy")


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


def multiply_adds(module: nn.Module, shape: Sequence[int]) -> int:
    """Multiply-adds of one forward pass of `module` on one image of `shape` (C, H, W), counting the
    Conv2d and Linear layers (the rest is negligible for these networks)."""
    total = 0

    def count(layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        if isinstance(layer, nn.Conv2d):
            total += output.numel() * layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
        elif isinstance(layer, nn.Linear):
            total += output.numel() * layer.in_features

    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with eval_mode(module), torch.no_grad():
            module(torch.zeros((1, *shape), device=_device_of(module)))
    finally:
        for hook in hooks:
            hook.remove()
    return total


def cost_summary(denoiser: nn.Module, classifier: nn.Module, shape: Sequence[int]) -> str:
    """One line: multiply-adds per image of D, of f and of f o D (a certification sample costs f o D)."""
    d, f = multiply_adds(denoiser, shape), multiply_adds(classifier, shape)
    return (f"denoiser {d / 1e6:.2f} M multiply-adds per image, classifier {f / 1e6:.2f} M: f o D costs "
            f"{(d + f) / max(f, 1):.1f}x f per noise sample")


def _device_of(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


# ------------------------------------------------------------------ checkpoints


def save_denoiser(path: str | Path, denoiser: DnCNN, *, arch: str, dataset: str, sigma: float, **extra: Any) -> None:
    """Write a denoiser checkpoint (`models.save_checkpoint`, kind "denoiser", with its weights digest):
    arch (a `DENOISERS` name), channels, depth, width, dataset, sigma (the noise level it removes), and
    `extra` (epoch, objective, history, classifiers, ...)."""
    save_checkpoint(path, denoiser, arch=arch, dataset=dataset, normalization={"kind": "none"}, sigma=sigma,
                    kind=DENOISER, channels=denoiser.channels, depth=denoiser.depth, width=denoiser.width, **extra)


def load_denoiser(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[DnCNN, dict[str, Any]]:
    """(DnCNN in eval mode, metadata without the tensors; `weights_verified` says whether a digest was checked).

    Refuses, in one line, a missing, corrupt or truncated file, flipped weight bytes (digest), a file holding
    anything but plain data, a classifier checkpoint, malformed fields, and weights that do not fit the
    recorded size."""
    file = Path(path)
    try:
        payload = read_checkpoint(file, map_location)
    except SmoothAdvError as exc:
        text = str(exc)
        raise SmoothAdvError(text if text.startswith("denoiser") else f"denoiser {text}") from None
    if not is_denoiser(payload):
        if payload.get("format") == FORMAT:
            raise SmoothAdvError(f"{file} is a classifier checkpoint ({payload.get('arch')}), not a denoiser; train "
                                 "one with `smoothadv train-denoiser`")
        raise SmoothAdvError(f"{file} is not a smoothadv denoiser checkpoint")
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
    state, own = payload["state_dict"], denoiser.state_dict()
    if not isinstance(state, dict) or set(state) != set(own) or any(
            not isinstance(state[k], Tensor) or state[k].shape != own[k].shape for k in own):
        raise SmoothAdvError(f"the weights in denoiser {file} do not fit a DnCNN of depth {payload['depth']} and width "
                             f"{payload['width']}; the file is damaged")
    denoiser.load_state_dict(state)
    denoiser.to(map_location).eval()
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "optimizer", "scheduler", "rng")}
    return denoiser, {**meta, "weights_verified": "weights_sha256" in payload}


def check_sigma(denoiser_sigma: float, sigma: float, source: str = "the denoiser") -> None:
    """Refuse a denoiser trained for another noise level than the smoothing's `sigma` (one line): the
    certificate would stay valid, but f o D would be a poor classifier, almost always a mistake."""
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
    probe = torch.zeros((2, *shape), device=_device_of(denoiser))
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


def check_dataset(meta: Mapping[str, Any], dataset: Any, source: str = "the denoiser") -> None:
    """Refuse (one line) a denoiser recorded as trained on another dataset than the classifier's images: with the
    same channel count it fits, and f o D would silently be a poor classifier."""
    recorded = meta.get("dataset")
    if isinstance(recorded, str) and isinstance(dataset, str) and recorded != dataset:
        raise SmoothAdvError(f"{source} was trained on {recorded}, but the classifier is for {dataset}; train a "
                             f"denoiser on {dataset} (smoothadv train-denoiser --dataset {dataset})")


def attach_denoiser(classifier: nn.Module, path: str | Path, *, sigma: float, shape: Sequence[int],
                    device: torch.device | str = "cpu", steps: int = 1) -> tuple[DenoisedClassifier, dict[str, Any]]:
    """f o D for `certify --denoiser`: the denoiser at `path` in front of `classifier`, checked (corrupt
    file, another sigma, a misfit: one line). `path` is a denoiser checkpoint, or a directory holding a
    diffusers diffusion model: diffusion denoised smoothing (Carlini et al., ICLR 2023;
    `diffusion.diffusion_denoiser`: the UNet at the timestep of `sigma`, `steps` network evaluations, 1 for
    a checkpoint). Returns the composed model (eval mode) and the denoiser's metadata with its digest
    (`sha256`: the file's, or the diffusion model's weights and configs') and `facts`, what an evaluation
    records in OUT.args.json and compares on resume and merge."""
    source = f"denoiser {path}"
    if Path(path).is_dir():
        diffusion, meta = diffusion_denoiser(path, sigma=sigma, shape=shape, device=device, steps=steps)
        check_fits(diffusion, classifier, shape, None, source)
        return DenoisedClassifier(diffusion, classifier).eval(), meta
    if steps != 1:
        raise SmoothAdvError(f"--denoiser-steps {steps} needs a diffusion model directory as --denoiser; {path} is a "
                             "one-step denoiser checkpoint")
    denoiser, meta = load_denoiser(path, device)
    check_fits(denoiser, classifier, shape, meta["channels"], source)
    check_sigma(meta["sigma"], sigma, source)
    digest = file_sha256(path)
    facts = {"denoiser_sha256": digest, "denoiser_sigma": meta["sigma"],
             "denoiser_arch": f"{meta['arch']} ({meta['depth']}x{meta['width']})"}
    return DenoisedClassifier(denoiser, classifier).eval(), {**meta, "sha256": digest, "facts": facts}


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


# ------------------------------------------------------------------ a training run


def _record(source: str | nn.Module) -> dict[str, Any]:
    """What provenance says about a classifier or denoiser: a file's path and SHA-256, or a module's type."""
    return {"module": type(source).__name__} if isinstance(source, nn.Module) else \
        {"path": str(source), "sha256": file_sha256(source)}


class DenoiserTrainee(Trainee):
    """A DnCNN as the loop's trainee: built seeded (or from `init` on a fresh start), checked against every
    classifier, evaluated by `evaluate_denoiser` (the log's MSE, PSNR and accuracies), saved by `save_denoiser`
    with its classifiers' digests and its objective history (`init`'s stages, then this one)."""

    checkpoint = CHECKPOINT
    log_columns = LOG_COLUMNS
    finite_metrics = ("mse",)

    def __init__(self, cfg: DenoiserTrainSettings, sources: Sequence[str | nn.Module], evaluator: nn.Module | None,
                 classifiers: Sequence[nn.Module], objective: DenoiserObjective) -> None:
        self.cfg, self.evaluator, self.classifiers = cfg, evaluator, list(classifiers)
        self.shape = input_shape(cfg.dataset)
        self.sources = [_record(s) for s in sources]
        self.stage = {"objective": objective.describe(), "epochs": cfg.epochs, "classifiers": self.sources,
                      "init": _record(cfg.init) if cfg.init else None}
        self.start, self.history = None, []
        if cfg.init is not None:
            self.start, init_meta = load_denoiser(cfg.init)
            check_dataset(init_meta, cfg.dataset, f"--init {cfg.init}")
            self.history = list(init_meta.get("history") or [])
        self._data: Data | None = None

    def inputs(self) -> list[tuple[str, str | None]]:
        return [("--init", self.cfg.init), *(("--classifier", path) for path in self.cfg.classifier or ()),
                ("--eval-classifier", self.cfg.eval_classifier)]

    def data(self) -> Data:
        if self._data is None:
            cfg = self.cfg
            self._data = Data(subset(get_dataset(cfg.dataset, "train", cfg.data_dir), cfg.train_subset),
                              subset(get_dataset(cfg.dataset, "test", cfg.data_dir), cfg.eval_subset))
        return self._data

    def build(self, device: torch.device, fresh: bool) -> nn.Module:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        denoiser = build_denoiser(cfg.arch, self.shape[0], cfg.depth, cfg.width).to(device)
        if self.start is not None:
            start = self.start
            if (start.channels, start.depth, start.width) != (denoiser.channels, denoiser.depth, denoiser.width):
                raise SmoothAdvError(f"--init {cfg.init} is a DnCNN of depth {start.depth} and width {start.width} "
                                     f"with {start.channels} channels; this run builds {denoiser.depth} x "
                                     f"{denoiser.width} with {denoiser.channels} (set --arch/--depth/--width to match)")
            if fresh:
                denoiser.load_state_dict(start.state_dict())
        for model in (*self.classifiers, *([self.evaluator] if self.evaluator is not None else [])):
            check_fits(denoiser, model, self.shape, denoiser.channels, f"a {cfg.arch} denoiser for {cfg.dataset}")
        return denoiser

    def check_checkpoint(self, saved: Mapping[str, Any], path: Path) -> None:
        """Refuse to resume anything but a denoiser of this dataset trained through these very classifiers
        (compared by content: a classifier file replaced at the same path would change the run)."""
        if not is_denoiser(saved):
            raise SmoothAdvError(f"{path} is not a denoiser checkpoint; refusing to resume")
        check_dataset(saved, self.cfg.dataset, str(path))
        then = saved.get("classifiers")
        if not isinstance(then, list):
            return  # an earlier version's checkpoint: its classifiers' paths are compared as settings
        now = self.sources
        digests = [c.get("sha256", c.get("module")) if isinstance(c, dict) else c for c in then]
        if digests != [c.get("sha256", c.get("module")) for c in now]:
            names = ", ".join(str(c.get("path", c.get("module"))) for c in now) or "none"
            raise SmoothAdvError(f"cannot resume {path}: it was trained through other classifiers than {names} (their "
                                 "SHA-256 differ from those its checkpoint records); resume with the same files, or "
                                 "start over with --force or a new --out")

    def checkpoint_fields(self, epochs_done: int) -> dict[str, Any]:
        return {"arch": self.cfg.arch, "dataset": self.cfg.dataset, "normalization": {"kind": "none"},
                "sigma": self.cfg.sigma, "kind": DENOISER, "channels": self.shape[0],
                "depth": self.cfg.depth or DENOISERS[self.cfg.arch].depth,
                "width": self.cfg.width or DENOISERS[self.cfg.arch].width, "classifiers": self.stage["classifiers"],
                "history": [*self.history, {**self.stage, "epochs_done": epochs_done}]}

    def provenance(self) -> dict[str, Any]:
        return {"stage": self.stage,
                "eval_classifier": _record(self.cfg.eval_classifier) if self.cfg.eval_classifier else None}

    def evaluate(self, model: nn.Module, test: Dataset, device: torch.device) -> dict[str, float]:
        return evaluate_denoiser(model, batches(test, 512, shuffle=False), self.cfg.sigma, classifier=self.evaluator,
                                 device=device, generator=torch.Generator(device=device).manual_seed(self.cfg.seed + 7))

    def log_row(self, epoch: int, elapsed: float, lr: float, stats: dict[str, float],
                test: dict[str, float]) -> list[str]:
        return [str(epoch), f"{elapsed:.1f}", f"{lr:.6g}", f"{stats['loss']:.6f}", f"{test['mse']:.6f}",
                f"{test['psnr']:.3f}", f"{test.get('acc_denoised', math.nan):.4f}",
                f"{test.get('acc_noisy', math.nan):.4f}"]

    def summary(self, stats: dict[str, float], test: dict[str, float]) -> str:
        accuracy = (f"  acc f(D(x+d)) {test['acc_denoised']:.3f}  f(x+d) {test['acc_noisy']:.3f}"
                    if "acc_denoised" in test else "")
        return f"loss {stats['loss']:.5f}  test PSNR {test['psnr']:.2f} dB{accuracy}"


def train_denoiser(cfg: DenoiserTrainSettings, classifiers: Sequence[nn.Module] | None = None,
                   eval_classifier: nn.Module | None = None) -> Path:
    """Train a denoiser with the one loop; returns its checkpoint path (`cfg.out_dir / denoiser.pth.tar`).

    Classifiers come from `cfg.classifier` (checkpoint files, with their normalization layers) or, through
    the API, from `classifiers`: any `nn.Module`s mapping [0, 1] images (B, C, H, W) to logits,
    normalization included. They are never updated (`frozen`). The run directory's life (lock, provenance,
    checkpoint then log row each epoch, resume by the one rule, divergence stop) is the loop's."""
    if classifiers is not None and cfg.classifier:
        raise SmoothAdvError("give the classifiers as files (settings.classifier) or as modules, not both")
    device = resolve_device(cfg.device)
    if classifiers is None:
        loaded = [_load_classifier(path, cfg, device) for path in cfg.classifier or ()]
        sources: list[str | nn.Module] = list(cfg.classifier or ())
    else:
        loaded, sources = [m.to(device) for m in classifiers], list(classifiers)
    if eval_classifier is not None:
        evaluator: nn.Module | None = eval_classifier.to(device)
    elif cfg.eval_classifier:
        evaluator = _load_classifier(cfg.eval_classifier, cfg, device)
    else:
        evaluator = loaded[0] if loaded else None
    objective = DENOISER_LOSSES[cfg.objective](cfg.sigma, tuple(loaded))
    trainee = DenoiserTrainee(cfg, sources, evaluator, loaded, objective)
    steps = math.ceil(len(trainee.data().train) / cfg.batch_size)  # type: ignore[arg-type]
    return run_loop(cfg, dataclasses.replace(objective, steps_per_epoch=steps), trainee)


def _load_classifier(path: str, cfg: DenoiserTrainSettings, device: torch.device) -> nn.Module:
    model, meta = load_checkpoint(path, device, normalization=cfg.normalization)
    if meta["dataset"] != cfg.dataset:
        raise SmoothAdvError(f"classifier {path} was trained on {meta['dataset']}, the denoiser on {cfg.dataset}")
    return model
