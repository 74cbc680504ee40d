"""Diffusion denoised smoothing: an off-the-shelf diffusion model as the denoiser of randomized smoothing.

Carlini, Tramer, Dvijotham, Rice, Sun & Kolter, "(Certified!!) Adversarial Robustness for Free!",
ICLR 2023 (arXiv:2206.10550). Denoised smoothing (Salman et al. 2020, `smoothadv.denoise`) with the
denoiser replaced by one step of a pretrained denoising diffusion probabilistic model (DDPM, Ho et
al. 2020). The certificate is Cohen et al.'s, unchanged: the Gaussian noise is added to the image
*before* the diffusion model, which is simply part of the base classifier f(D(x + delta)).

The step (the paper's Algorithm 1). A DDPM with cumulative noise schedule abar_t (diffusers'
`alphas_cumprod`) is trained on images in [-1, 1] with x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
Randomized smoothing gives x + delta, delta ~ N(0, sigma^2 I), with x in [0, 1]. Mapped to [-1, 1]
(2 (x + delta) - 1) the noise has standard deviation 2 sigma, so

    t*   = min { t >= 1 : sqrt(1 - abar_t) / sqrt(abar_t) >= 2 sigma }   (the authors' code's rounding)
    x_t* = sqrt(abar_t*) (2 (x + delta) - 1)        (a sample of q(x_t* | x_0) up to the rounding of t*)
    eps  = UNet(x_t*, t*)
    x0^  = (x_t* - sqrt(1 - abar_t*) eps) / sqrt(abar_t*),  clipped to [-1, 1],  returned as (x0^ + 1) / 2.

The paper uses this one-shot estimate; it reports that running the full reverse chain from t*
("multi-step denoising") did not help (it makes the output a sample of a plausible image rather than
the posterior mean, and costs t* network evaluations). `DiffusionDenoiser(steps=k)` for k > 1 offers a
deterministic reverse process from t* instead: DDIM with eta = 0 (Song et al. 2021) on k timesteps
evenly spaced from t* down to 0 (rounded, t* and 0 included). At each timestep t_i the model's
x0^ is clipped to [-1, 1], the noise re-derived from the clipped x0^ (as guided-diffusion's DDIM
sampler does), and x_{t_(i+1)} = sqrt(abar_(t_(i+1))) x0^ + sqrt(1 - abar_(t_(i+1))) eps; the x0^ of
the last timestep (t = 0) is returned. k = 1 is exactly the one-shot step. (The authors' code runs
guided-diffusion's stochastic `p_sample` chain for the multi-step option; ours is deterministic, so the
smoothed classifier's randomness is only the Gaussian delta.)

Measured against the authors' released code (results/faithfulness/dds.md): the same t* and the same x0^ to
float32 rounding on the same x_t. One difference by design: their code adds the noise of timestep t* itself
(q_sample at t*, standard deviation sqrt(1 - abar_t*) / (2 sqrt(abar_t*)) >= sigma on [0, 1] images) while
certifying at sigma; here, as in the paper's Algorithm 1, the smoothing noise is exactly sigma and the UNet is
told t* (the smallest timestep with at least that much noise).

This module holds

- `load_diffusion(path) -> DiffusionModel`: a diffusers `UNet2DModel` and its noise schedule from a
  local directory in diffusers' `save_pretrained` layout (DDPMPipeline's: `unet/` and `scheduler/`,
  or a bare UNet directory with `scheduler_config.json` beside its `config.json`), with SHA-256 digests
  of the weights and configs (`DiffusionModel.provenance()`).
- `DiffusionDenoiser(model, sigma, steps=1)`: the denoiser above, an `nn.Module` from noisy [0, 1]
  images to denoised [0, 1] images, to put in front of a classifier (`denoise.DenoisedClassifier`).
- `diffusion_denoiser(path, sigma=..., shape=..., steps=...)`: what `certify --denoiser DIR` (and
  predict, attack) use through `models.attach_denoiser`: the directory loaded, its image shape and sigma
  checked (one line each), and the facts a run records and compares on resume and merge (the digests of
  the weights and of the schedule, t*, the steps).
- `train_ddpm(DiffusionTrainSettings)`: a small, exactly resumable DDPM training loop (Ho et al.'s
  recipe, sized for a CPU) that writes the EMA model in the same layout into `<out>/model/`
  (`smoothadv train-diffusion --out DIR ...`).

`diffusers` is an optional dependency (`pip install 'smoothadv[diffusion]'`), imported only inside the
functions that need it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from .data import TensorImageDataset, dataset_names, get_dataset, input_shape
from .errors import SmoothAdvError
from .files import (
    TsvLog,
    atomic_torch_save,
    atomic_write_text,
    file_sha256,
    locked_run_directory,
    read_tsv,
    write_provenance,
)
from .seeds import derive_seed
from .settings import (
    AT_LEAST_ONE,
    COUNT,
    NONNEGATIVE_FLOAT32,
    POSITIVE,
    POSITIVE_FLOAT32,
    PROBABILITY,
    SEED,
    check_fields,
    flag_name,
    row_settings,
    setting,
)

__all__ = [
    "CHECKPOINT", "CHECKPOINT_FORMAT", "DiffusionDenoiser", "DiffusionModel", "DiffusionTrainSettings", "LOG_COLUMNS",
    "MODEL_DIR", "PREDICTION_TYPES", "RESUMABLE_CHANGES", "SCHEDULERS", "WEIGHT_NAMES", "build_scheduler",
    "build_unet", "ddim_timesteps", "diffusion_timestep", "load_diffusion", "train_ddpm",
]

#: the scheduler classes whose configs define the DDPM forward process q(x_t | x_0) we read (their
#: `alphas_cumprod` are computed the same way from the same keys)
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
#: what the UNet predicts: the noise (Ho et al.; the paper's models), v (Salimans & Ho 2022) or x_0
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "smoothadv-ddpm-train"
LOG_COLUMNS = ("kind", "step", "epoch", "loss", "lr", "cpu_seconds", "wall_seconds")
MODEL_DIR = "model"


def _diffusers() -> Any:
    """The `diffusers` package, or a one-line SmoothAdvError saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise SmoothAdvError("diffusion denoised smoothing needs the optional dependency diffusers: "
                             "pip install 'smoothadv[diffusion]'") from None
    return diffusers


# ------------------------------------------------------------------ loading a diffusion model


def _read_json(path: Path, what: str, source: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SmoothAdvError(f"diffusion model {source}: cannot read {what} {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError):
        raise SmoothAdvError(f"diffusion model {source}: {what} {path} is not a JSON file") from None
    if not isinstance(value, dict):
        raise SmoothAdvError(f"diffusion model {source}: {what} {path} is not a JSON object")
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class DiffusionModel:
    """A DDPM: a diffusers `UNet2DModel` (`unet`, in eval mode) and its DDPM scheduler (`scheduler`).

    `alphas_cumprod` (float64, length `num_train_timesteps`) is the scheduler's abar_t, t = 0 .. T-1,
    the training forward process x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps on [-1, 1] images.
    `shape` is the (C, H, W) the UNet was built for. `load_diffusion` builds one from a directory;
    build one from modules in memory (e.g. in tests) with `DiffusionModel(unet, scheduler)`.
    """

    def __init__(self, unet: nn.Module, scheduler: Any, *, source: str | None = None,
                 digests: dict[str, Any] | None = None) -> None:
        self.unet = unet.eval()
        self.scheduler = scheduler
        self.source = source or "(in memory)"
        self._digests = dict(digests or {})
        config: Any = unet.config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        self.shape: tuple[int, int, int] = (int(config.in_channels), int(height), int(width))
        self.prediction_type = str(scheduler.config.get("prediction_type", "epsilon"))
        if self.prediction_type not in PREDICTION_TYPES:
            raise SmoothAdvError(f"diffusion model {self.source}: prediction_type {self.prediction_type!r} is not one "
                                 f"of {', '.join(PREDICTION_TYPES)}")
        variance = str(scheduler.config.get("variance_type", "fixed_small"))
        self.learned_variance = variance in ("learned", "learned_range")
        outputs = int(config.out_channels)
        expected = 2 * self.shape[0] if self.learned_variance else self.shape[0]
        if outputs != expected:
            raise SmoothAdvError(f"diffusion model {self.source}: the UNet has {self.shape[0]} input and {outputs} "
                                 f"output channels; a DDPM with variance_type {variance!r} needs {expected}")
        if config.get("class_embed_type") is not None or config.get("num_class_embeds") is not None:
            raise SmoothAdvError(f"diffusion model {self.source}: the UNet is class-conditional; only unconditional "
                                 "UNets can denoise an unlabelled image")
        self.alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod).double().cpu()
        if self.alphas_cumprod.dim() != 1 or len(self.alphas_cumprod) < 2 \
                or not bool(((self.alphas_cumprod > 0) & (self.alphas_cumprod <= 1)).all()):
            raise SmoothAdvError(f"diffusion model {self.source}: the scheduler's alphas_cumprod is not a schedule in "
                                 "(0, 1]")
        self.num_train_timesteps = len(self.alphas_cumprod)

    def timestep(self, sigma: float) -> int:
        """t* for noise of standard deviation `sigma` on [0, 1] images (`diffusion_timestep`)."""
        return diffusion_timestep(self.alphas_cumprod, sigma, self.source)

    def denoiser(self, sigma: float, steps: int = 1) -> DiffusionDenoiser:
        return DiffusionDenoiser(self, sigma, steps=steps)

    def provenance(self) -> dict[str, Any]:
        """What identifies this model: its directory, the SHA-256 of the weights file(s) and configs, the
        diffusers version, the parameter count, the prediction type, the schedule length and image shape."""
        record: dict[str, Any] = {"source": self.source, **self._digests}
        record.update({
            "diffusers": getattr(_diffusers(), "__version__", None),
            "parameters": sum(p.numel() for p in self.unet.parameters()),
            "prediction_type": self.prediction_type,
            "num_train_timesteps": self.num_train_timesteps,
            "shape": list(self.shape),
        })
        return record


def _unet_directory(root: Path) -> Path:
    for candidate in (root / "unet", root):
        if (candidate / "config.json").is_file():
            return candidate
    checkpoints = sorted(root.glob("*.pth.tar"))  # e.g. a train-denoiser run directory given for its checkpoint
    hint = f"; a denoiser checkpoint is a file: --denoiser {checkpoints[0]}" if checkpoints else ""
    raise SmoothAdvError(f"diffusion model {root}: no UNet config (neither unet/config.json nor config.json){hint}")


def _scheduler_config(root: Path, unet_dir: Path) -> Path:
    for candidate in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json",
                      unet_dir / "scheduler_config.json"):
        if candidate.is_file():
            return candidate
    raise SmoothAdvError(f"diffusion model {root}: no scheduler config (neither scheduler/scheduler_config.json nor "
                         "scheduler_config.json)")


def _weights(root: Path, unet_dir: Path) -> list[Path]:
    """The weights file(s) diffusers loads from `unet_dir` (safetensors first, as diffusers prefers them)."""
    for name in WEIGHT_NAMES:
        index = unet_dir / f"{name}.index.json"
        if index.is_file():  # sharded: the index and every shard it names
            shards = _read_json(index, "weights index", root).get("weight_map", {})
            files = sorted({unet_dir / str(shard) for shard in shards.values()} if isinstance(shards, dict) else [])
            missing = [f.name for f in files if not f.is_file()]
            if missing or not files:
                raise SmoothAdvError(f"diffusion model {root}: {index.name} names missing shards "
                                     f"{', '.join(missing) or '(none listed)'}")
            return [index, *files]
        if (unet_dir / name).is_file():
            return [unet_dir / name]
    raise SmoothAdvError(f"diffusion model {root}: no UNet weights in {unet_dir} "
                         f"(expected {' or '.join(WEIGHT_NAMES)})")


def load_diffusion(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> DiffusionModel:
    """Load an unconditional DDPM saved with diffusers' `save_pretrained` from the local directory `path`.

    Layouts: DDPMPipeline's (`unet/config.json` + weights, `scheduler/scheduler_config.json`), or a
    bare UNet directory (`config.json` + weights) with `scheduler_config.json` at its root. The UNet
    must be a `UNet2DModel` (unconditional); the scheduler config a DDPMScheduler's or DDIMScheduler's
    (the forward process is read from it: betas, timesteps, prediction_type, variance_type). Nothing
    is downloaded. Anything wrong (no such directory, missing files, a config that is not JSON or not
    a UNet2DModel, weights that do not fit the config, diffusers not installed) is a one-line
    SmoothAdvError naming the path. The SHA-256 of the weights file(s), the UNet config and the
    scheduler config are in `provenance()`.
    """
    root = Path(path)
    if not root.is_dir():
        raise SmoothAdvError(f"diffusion model {root}: {'not a directory' if root.exists() else 'no such directory'}")
    unet_dir = _unet_directory(root)
    unet_config_path = unet_dir / "config.json"
    config = _read_json(unet_config_path, "UNet config", root)
    kind = config.get("_class_name")
    if kind != "UNet2DModel":
        raise SmoothAdvError(f"diffusion model {root}: {unet_config_path} describes {kind or 'no diffusers model'}, "
                             "not a UNet2DModel")
    scheduler_path = _scheduler_config(root, unet_dir)
    scheduler_config = _read_json(scheduler_path, "scheduler config", root)
    if scheduler_config.get("_class_name") not in SCHEDULERS:
        raise SmoothAdvError(f"diffusion model {root}: {scheduler_path} describes "
                             f"{scheduler_config.get('_class_name') or 'no scheduler'}, "
                             f"not one of {', '.join(SCHEDULERS)}")
    weights = _weights(root, unet_dir)
    diffusers = _diffusers()
    before = {str(f.relative_to(root)): file_sha256(f) for f in weights}  # compared after loading: see below
    try:
        unet = diffusers.UNet2DModel.from_pretrained(
            unet_dir, local_files_only=True, low_cpu_mem_usage=False,
            use_safetensors=weights[0].name.startswith("diffusion_pytorch_model.safetensors"))
        scheduler = diffusers.DDPMScheduler.from_config(
            {k: v for k, v in scheduler_config.items() if k != "_class_name"})
    except Exception as exc:  # diffusers raises OSError, ValueError, RuntimeError, KeyError, ...
        raise SmoothAdvError(f"diffusion model {root}: cannot load the UNet in {unet_dir}: "
                             f"{_first_line(exc)}") from None
    after = {str(f.relative_to(root)): file_sha256(f) for f in weights}
    if after != before:  # replaced while read (a training run saving its model): the digest would not be of these
        raise SmoothAdvError(f"diffusion model {root}: its weights changed while they were being read (is a run "
                             "writing them?), so the recorded digest might not be of the weights used; use a copy "
                             "that no run is writing")
    digests = {
        "unet": str(unet_dir.relative_to(root)) if unet_dir != root else ".",
        "weights_sha256": after,
        "unet_config_sha256": file_sha256(unet_config_path),
        "scheduler_config": str(scheduler_path.relative_to(root)),
        "scheduler_config_sha256": file_sha256(scheduler_path),
        "scheduler_class": scheduler_config["_class_name"],
    }
    return DiffusionModel(unet.to(device), scheduler, source=str(root), digests=digests)


# ------------------------------------------------------------------ the denoiser


def diffusion_timestep(alphas_cumprod: Tensor | Sequence[float], sigma: float, source: str = "the schedule") -> int:
    """t*: the first timestep t >= 1 whose noise level reaches Gaussian noise of standard deviation `sigma` on
    [0, 1] images (2 sigma on the model's [-1, 1] scale): min { t >= 1 : sqrt(1 - abar_t) / sqrt(abar_t) >= 2 sigma }.

    The paper asks for the t with sigma^2 = (1 - abar_t) / abar_t (on the model's scale), which a discrete
    schedule rarely holds exactly; this is how the authors' released code (`cifar10/certify.py` and
    `imagenet/certify.py` of their repository) resolves it: counting up from t = 1 until the schedule's
    noise is at least the smoothing's. It is the nearest timestep or the one after it (one step more noise
    than present at most; results/faithfulness/dds.md). A one-line SmoothAdvError for a sigma that is not a
    finite number > 0, and for one no timestep reaches (more noise than the model was trained to remove).
    """
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise SmoothAdvError(f"sigma must be a finite number > 0, got {sigma!r}")
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    level = torch.sqrt(1.0 - abar) / torch.sqrt(abar)  # noise std of x_t / sqrt(abar_t), the authors' b / a
    reached = torch.nonzero(level[1:] >= 2.0 * float(sigma)).flatten()
    if len(reached) == 0:
        largest = float(level[-1]) / 2
        raise SmoothAdvError(f"sigma {sigma:g} is beyond the noise schedule of {source} (its last timestep "
                             f"{len(abar) - 1} denoises sigma up to {largest:.3g})")
    return int(reached[0]) + 1


def ddim_timesteps(t_star: int, steps: int) -> list[int]:
    """The `steps` timesteps of the deterministic reverse process, evenly spaced from t* down to 0 (rounded)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SmoothAdvError(f"steps must be an integer >= 1, got {steps!r}")
    if steps == 1:
        return [t_star]
    if steps > t_star + 1:
        raise SmoothAdvError(f"steps {steps} exceeds the {t_star + 1} timesteps from t* = {t_star} down to 0")
    return [round(t_star - i * t_star / (steps - 1)) for i in range(steps)]


CPU_CHUNK = 64
"""The images per UNet evaluation on a CPU (`DiffusionDenoiser(chunk=...)`, set by `diffusion_denoiser` for a CPU
device). On one thread, f behind the released Fashion-MNIST DDPM (`results/diffusion-fmnist/ddpm/model`) ran 1.36
times as many samples per CPU-second in chunks of 64 of a batch of 256 as with the whole batch at once
(`results/diffusion-fmnist/throughput.txt`, `benchmarks/certify_throughput.py --denoiser`); the output is the
same to rounding (`tests/unit/test_diffusion.py`)."""


class DiffusionDenoiser(nn.Module):
    """The diffusion denoiser of Carlini et al. (ICLR 2023), Algorithm 1, for Gaussian noise of level `sigma`.

    Input: a batch (B, C, H, W) of noisy images x + delta, x in [0, 1], delta ~ N(0, sigma^2 I), with
    (C, H, W) the model's `shape` (else a one-line SmoothAdvError). Output: the denoised images in
    [0, 1], same shape. The noise is *not* added here (randomized smoothing adds it; this module is
    part of the base classifier).

    steps = 1 (the paper's choice): one network evaluation at t* (`diffusion_timestep`), returning
    the clipped estimate of x_0 (see the module docstring for the formulas). steps = k > 1: the
    deterministic DDIM (eta = 0) chain over `ddim_timesteps(t*, k)`, k network evaluations; the
    paper found multi-step denoising no better. The UNet's prediction may be the noise (epsilon),
    v or x_0 (the scheduler's `prediction_type`); a learned-variance UNet's extra channels are ignored.

    The UNet is kept in eval mode; gradients flow to the input (for attacks through f o D).

    chunk = K evaluates the UNet on at most K images at a time (None: the whole batch at once). A
    matter of speed only, per image the same computation: on a CPU the UNet's cost per image grows
    with the batch once its activations leave the cache (`CPU_CHUNK`).
    """

    def __init__(self, model: DiffusionModel, sigma: float, steps: int = 1, chunk: int | None = None) -> None:
        super().__init__()
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise SmoothAdvError(f"chunk must be an integer >= 1 or None, got {chunk!r}")
        self.chunk = chunk
        self.model = model
        self.unet = model.unet
        self.sigma = float(sigma)
        self.t_star = model.timestep(sigma)
        self.timesteps = ddim_timesteps(self.t_star, steps)
        self.steps = len(self.timesteps)
        self._abar = {t: float(model.alphas_cumprod[t]) for t in self.timesteps}  # Python floats: no graph break

    def train(self, mode: bool = True) -> DiffusionDenoiser:
        super().train(mode)
        self.unet.eval()  # a pretrained denoiser: never in training mode
        return self

    def extra_repr(self) -> str:
        return f"sigma={self.sigma:g}, t_star={self.t_star}, steps={self.steps}"

    def _predict(self, x_t: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """(x0^ clipped to [-1, 1], the noise consistent with it) from the UNet at timestep t."""
        abar = self._abar[t]
        a, s = math.sqrt(abar), math.sqrt(1.0 - abar)
        timesteps = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
        out = self.unet(x_t, timesteps).sample
        if self.model.learned_variance:
            out = out[:, : x_t.shape[1]]
        kind = self.model.prediction_type
        if kind == "epsilon":
            x0 = (x_t - s * out) / a
        elif kind == "v_prediction":
            x0 = a * x_t - s * out
        else:
            x0 = out
        x0 = x0.clamp(-1.0, 1.0)
        return x0, (x_t - a * x0) / s

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.model.shape:
            want = "x".join(str(v) for v in self.model.shape)
            got = "x".join(str(v) for v in x.shape[1:]) if x.dim() == 4 else f"a {x.dim()}-d tensor"
            raise SmoothAdvError(f"diffusion model {self.model.source} takes batches of {want} images, got {got}")
        if self.chunk is not None and x.shape[0] > self.chunk:
            return torch.cat([self._denoise(part) for part in x.split(self.chunk)])
        return self._denoise(x)

    def _denoise(self, x: Tensor) -> Tensor:
        x_t = math.sqrt(self._abar[self.t_star]) * (2.0 * x - 1.0)
        x0 = x_t
        for i, t in enumerate(self.timesteps):
            x0, eps = self._predict(x_t, t)
            if i + 1 < len(self.timesteps):
                abar = self._abar[self.timesteps[i + 1]]
                x_t = math.sqrt(abar) * x0 + math.sqrt(1.0 - abar) * eps
        return (x0 + 1.0) / 2.0


def model_digest(provenance: dict[str, Any]) -> str:
    """One SHA-256 over what defines a loaded diffusion model: the digests of its weights file(s), UNet config and
    scheduler config (from `DiffusionModel.provenance()`), so two directories holding the same files agree."""
    keys = ("weights_sha256", "unet_config_sha256", "scheduler_config_sha256")
    text = json.dumps({key: provenance.get(key) for key in keys}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def diffusion_denoiser(path: str | os.PathLike[str], *, sigma: float, shape: Sequence[int],
                       device: str | torch.device = "cpu", steps: int = 1) -> tuple[DiffusionDenoiser, dict[str, Any]]:
    """The diffusion denoiser of the diffusers directory `path` for smoothing at `sigma` in front of a classifier
    of (C, H, W) images `shape`, and its metadata (what `models.attach_denoiser` does with a directory).

    One-line SmoothAdvErrors: a directory `load_diffusion` refuses, a model of other images than the
    classifier's, a sigma beyond the schedule, `steps` < 1 or beyond t* + 1. The metadata holds `kind`
    "diffusion", `sigma`, `t_star`, `steps`, `timesteps`, the model's `provenance`, `sha256`
    (`model_digest`) and `facts`: what an evaluation records in OUT.args.json and compares on resume and
    merge (`denoiser_sha256`, `denoiser_weights_sha256`, `denoiser_schedule_sha256`, `denoiser_sigma`,
    `denoiser_t_star`, `denoiser_unet_steps`, `denoiser_arch`; not `denoiser_steps`, the name of the
    run setting that asks for the steps)."""
    model = load_diffusion(path, device)
    if tuple(int(v) for v in shape) != model.shape:
        want, got = ("x".join(str(v) for v in dims) for dims in (model.shape, shape))
        raise SmoothAdvError(f"diffusion model {path} denoises {want} images, but the classifier's are {got}")
    chunk = CPU_CHUNK if torch.device(device).type == "cpu" else None
    denoiser = DiffusionDenoiser(model, sigma, steps=steps, chunk=chunk)
    provenance = model.provenance()
    digest = model_digest(provenance)
    facts = {
        "denoiser_sha256": digest,
        "denoiser_weights_sha256": provenance.get("weights_sha256"),
        "denoiser_schedule_sha256": provenance.get("scheduler_config_sha256"),
        "denoiser_sigma": float(sigma),
        "denoiser_t_star": denoiser.t_star,
        "denoiser_unet_steps": denoiser.steps,
        "denoiser_arch": f"diffusion UNet2DModel ({provenance['parameters']} parameters, "
                         f"{model.num_train_timesteps} timesteps, {model.prediction_type})",
    }
    meta = {"kind": "diffusion", "sigma": float(sigma), "t_star": denoiser.t_star, "steps": denoiser.steps,
            "timesteps": list(denoiser.timesteps), "provenance": provenance, "sha256": digest, "facts": facts}
    return denoiser, meta


# ------------------------------------------------------------------ training a small DDPM


@dataclass(frozen=True, kw_only=True)
class DiffusionTrainSettings:
    """A DDPM training run (Ho et al. 2020, sized for a CPU), for `train_ddpm`.

    Ho et al.'s recipe: T = 1000 timesteps, linear betas 1e-4 .. 0.02, the noise (epsilon) predicted,
    t uniform, MSE loss, Adam at lr 2e-4 with a linear warm-up, gradients clipped at norm 1, an EMA of
    the weights as the released model; data scaled to [-1, 1]. Differences, for a small model on a
    CPU: AdamW with weight decay 0 by default (that is Adam), a 500-step warm-up (theirs: 5000 of
    800k), EMA decay 0.999 (theirs 0.9999, for far longer runs) with diffusers' EMA warm-up
    min(decay, (1 + n) / (10 + n)) after n updates, no dropout, and no horizontal flips (Fashion-MNIST
    is not flip-symmetric in smoothadv's data pipeline either; Ho et al. flip CIFAR-10). The UNet is
    diffusers' `UNet2DModel`: `channels` per resolution level, `layers_per_block` ResNet blocks each,
    self-attention (one head) at `attention_levels` (0 = full resolution) and in the middle block,
    GroupNorm with `norm_groups` groups.
    """

    out_dir: Path = setting(help="run directory (checkpoint.pt, log.tsv, model/)", flag="--out", rows=False)
    dataset: str = setting("fashion_mnist", "dataset to train on", choices=dataset_names)
    epochs: int = setting(20, "training epochs (may be raised on --resume)", limit=AT_LEAST_ONE)
    batch_size: int = setting(128, "batch size", flag="--batch", limit=AT_LEAST_ONE)
    lr: float = setting(2e-4, "learning rate (AdamW; constant after the warm-up)", limit=POSITIVE_FLOAT32)
    warmup_steps: int = setting(500, "linear learning-rate warm-up over this many steps", limit=COUNT)
    weight_decay: float = setting(0.0, "AdamW weight decay", limit=NONNEGATIVE_FLOAT32)
    grad_clip: float = setting(1.0, "clip the gradient to this L2 norm", limit=POSITIVE)
    ema_decay: float = setting(0.999, "EMA decay of the released weights", limit=PROBABILITY)
    seed: int = setting(0, "seed of the initialization, data order, timesteps and noise", limit=SEED)
    channels: tuple[int, ...] = setting((32, 64, 64), "UNet channels per resolution level", limit=AT_LEAST_ONE)
    attention_levels: tuple[int, ...] = setting((2,), "levels with self-attention (0 = full resolution)",
                                                limit=COUNT)
    layers_per_block: int = setting(1, "ResNet blocks per level", limit=AT_LEAST_ONE)
    norm_groups: int = setting(8, "GroupNorm groups (must divide every channel count)", limit=AT_LEAST_ONE)
    timesteps: int = setting(1000, "diffusion timesteps T", limit=(lambda v: v >= 2, "an integer >= 2"))
    beta_start: float = setting(1e-4, "first beta of the linear schedule", limit=PROBABILITY)
    beta_end: float = setting(0.02, "last beta of the linear schedule", limit=PROBABILITY)
    train_subset: int | None = setting(None, "train on the first N images only", limit=AT_LEAST_ONE)
    save_every: int = setting(200, "write the checkpoint every this many steps (and at each epoch end)",
                              limit=AT_LEAST_ONE, rows=False)
    log_every: int = setting(100, "a log.tsv row every this many steps (and one per epoch)", limit=AT_LEAST_ONE,
                             rows=False)
    max_steps: int | None = setting(None, "stop (with a checkpoint) after this many steps in all; resume later",
                                    limit=AT_LEAST_ONE, rows=False)
    data_dir: str | None = setting(None, "data root (default: $SMOOTHADV_DATA or ./data)", rows=False)
    resume: bool = setting(False, "continue the run in --out (required if it exists)", rows=False)

    def __post_init__(self) -> None:
        check_fields(self)
        bad = [c for c in self.channels if c % self.norm_groups]
        if bad:
            raise SmoothAdvError(f"--norm-groups {self.norm_groups} must divide every --channels value, not {bad[0]}")
        if any(level >= len(self.channels) for level in self.attention_levels):
            raise SmoothAdvError(f"--attention-levels must be below the {len(self.channels)} levels of --channels, "
                                 f"got {list(self.attention_levels)}")
        if self.beta_end < self.beta_start:
            raise SmoothAdvError(f"--beta-end {self.beta_end:g} is below --beta-start {self.beta_start:g}")


#: settings a resumed run may change besides those that cannot change a result (rows=False)
RESUMABLE_CHANGES = frozenset({"epochs"})


def build_unet(channels: Sequence[int], shape: Sequence[int], *, layers_per_block: int = 1,
               attention_levels: Sequence[int] = (), norm_groups: int = 8) -> nn.Module:
    """An unconditional diffusers `UNet2DModel` for (C, H, W) images predicting C noise channels.

    Level i has `channels[i]` channels; every level but the last halves the resolution, so H and W
    must be divisible by 2^(levels - 1). Attention (one head over all channels) at `attention_levels`
    and in the middle block.
    """
    diffusers = _diffusers()
    levels = len(channels)
    c, h, w = (int(v) for v in shape)
    if h % 2 ** (levels - 1) or w % 2 ** (levels - 1):
        raise SmoothAdvError(f"{h}x{w} images cannot be halved {levels - 1} times: use fewer --channels levels")
    down = tuple("AttnDownBlock2D" if i in attention_levels else "DownBlock2D" for i in range(levels))
    up = tuple("AttnUpBlock2D" if i in attention_levels else "UpBlock2D" for i in reversed(range(levels)))
    return diffusers.UNet2DModel(
        sample_size=h if h == w else (h, w), in_channels=c, out_channels=c, block_out_channels=tuple(channels),
        layers_per_block=layers_per_block, down_block_types=down, up_block_types=up, norm_num_groups=norm_groups,
        attention_head_dim=max(channels))


def build_scheduler(timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Any:
    """diffusers' DDPMScheduler with Ho et al.'s linear schedule, epsilon prediction, fixed small variance."""
    return _diffusers().DDPMScheduler(num_train_timesteps=timesteps, beta_start=beta_start, beta_end=beta_end,
                                      beta_schedule="linear", prediction_type="epsilon", variance_type="fixed_small",
                                      clip_sample=True)


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _config(cfg: DiffusionTrainSettings) -> dict[str, Any]:
    return _plain(dataclasses.asdict(cfg))


def _check_resumable(saved: dict[str, Any], path: Path, cfg: DiffusionTrainSettings) -> None:
    recorded = saved.get("config")
    if saved.get("format") != CHECKPOINT_FORMAT or not isinstance(recorded, dict):
        raise SmoothAdvError(f"{path} is not a smoothadv DDPM training checkpoint; refusing to resume it")
    fields = {f.name: f for f in dataclasses.fields(DiffusionTrainSettings)}
    changed = [f"{flag_name(fields[name])} {recorded.get(name)!r} -> {_plain(value)!r}"
               for name, value in row_settings(cfg).items()
               if name not in RESUMABLE_CHANGES and _plain(value) != recorded.get(name)]
    if changed:
        raise SmoothAdvError(f"cannot resume {path}: that would change the run ({'; '.join(changed)}); use the "
                             "recorded settings or another --out")


@dataclass
class _State:
    """What a checkpoint carries: the model, its EMA, AdamW, the noise generator, the step and the log sums."""

    unet: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    noise: torch.Generator
    step: int = 0
    epoch_loss: float = 0.0
    epoch_count: int = 0
    window_loss: float = 0.0
    window_count: int = 0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0

    def save(self, path: Path, cfg: DiffusionTrainSettings, steps_per_epoch: int) -> None:
        atomic_torch_save({
            "format": CHECKPOINT_FORMAT, "config": _config(cfg), "step": self.step,
            "epoch": self.step // steps_per_epoch, "batch_in_epoch": self.step % steps_per_epoch,
            "unet": self.unet.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": {"noise": self.noise.get_state(), "torch": torch.get_rng_state()},
            "sums": {"epoch_loss": self.epoch_loss, "epoch_count": self.epoch_count,
                     "window_loss": self.window_loss, "window_count": self.window_count},
            "cpu_seconds": self.cpu_seconds, "wall_seconds": self.wall_seconds,
        }, path)

    def restore(self, path: Path, cfg: DiffusionTrainSettings) -> None:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: torch raises many kinds
            raise SmoothAdvError(f"cannot read the checkpoint {path}: {_first_line(exc)}") from None
        if not isinstance(saved, dict):
            raise SmoothAdvError(f"{path} is not a smoothadv DDPM training checkpoint; refusing to resume it")
        _check_resumable(saved, path, cfg)
        self.unet.load_state_dict(saved["unet"])
        self.ema.load_state_dict(saved["ema"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.noise.set_state(saved["rng"]["noise"])
        torch.set_rng_state(saved["rng"]["torch"])
        self.step = int(saved["step"])
        sums = saved["sums"]
        self.epoch_loss, self.epoch_count = float(sums["epoch_loss"]), int(sums["epoch_count"])
        self.window_loss, self.window_count = float(sums["window_loss"]), int(sums["window_count"])
        self.cpu_seconds, self.wall_seconds = float(saved["cpu_seconds"]), float(saved["wall_seconds"])


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)
        for kept, buffer in zip(ema.buffers(), model.buffers()):
            kept.copy_(buffer)


def _training_images(cfg: DiffusionTrainSettings) -> Tensor:
    """The training images as one float tensor in [-1, 1] (N, C, H, W)."""
    dataset = get_dataset(cfg.dataset, "train", cfg.data_dir)
    count = len(dataset) if cfg.train_subset is None else min(cfg.train_subset, len(dataset))  # type: ignore[arg-type]
    if isinstance(dataset, TensorImageDataset):
        images: Tensor = dataset.images[:count]
        images = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    else:
        images = torch.cat([x for x, _ in DataLoader(Subset(dataset, range(count)), batch_size=1024)])
    if count == 0:
        raise SmoothAdvError(f"the {cfg.dataset} training set is empty")
    return images.mul(2.0).sub(1.0).contiguous()


def _write_model(out: Path, ema: nn.Module, scheduler: Any, info: dict[str, Any]) -> None:
    """Write the EMA model as a DDPMPipeline (`unet/`, `scheduler/`, model_index.json) into `out/model`, swapping a
    complete new directory in for the old one (a kill in between leaves `.model.old`, restored on the next run)."""
    diffusers = _diffusers()
    final, tmp, old = out / MODEL_DIR, out / f".{MODEL_DIR}.tmp", out / f".{MODEL_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    diffusers.DDPMPipeline(unet=ema, scheduler=scheduler).save_pretrained(tmp)
    atomic_write_text(tmp / "training.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _tidy_model_dir(out: Path) -> None:
    """Undo a kill in the middle of `_write_model`: the previous model back in place, a half-written one removed."""
    final, tmp, old = out / MODEL_DIR, out / f".{MODEL_DIR}.tmp", out / f".{MODEL_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    if old.exists() and not final.exists():
        os.replace(old, final)
    shutil.rmtree(old, ignore_errors=True)


def _model_step(out: Path) -> int | None:
    """The step of the EMA model in `out/model` (its training.json), None if there is none."""
    try:
        return int(json.loads((out / MODEL_DIR / "training.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _open_log(path: Path, step: int) -> TsvLog:
    """log.tsv, keeping the rows of steps up to `step` (those the checkpoint holds) and dropping later ones."""
    if step > 0 and path.exists():
        header, rows = read_tsv(path, what="refusing to resume it")
        if header != "\t".join(LOG_COLUMNS):
            raise SmoothAdvError(f"{path} has header {header!r}, not this command's; refusing to resume it")
        kept = [row for row in rows if int(row[1]) <= step]
        atomic_write_text(path, "\n".join([header, *("\t".join(row) for row in kept)]) + "\n")
        return TsvLog(path, LOG_COLUMNS, resume=True, key=lambda fields: f"{fields[0]}:{fields[1]}")
    return TsvLog(path, LOG_COLUMNS, force=True, key=lambda fields: f"{fields[0]}:{fields[1]}")


def train_ddpm(cfg: DiffusionTrainSettings) -> Path:
    """Train a DDPM on `cfg.dataset`; returns the directory of the EMA model (`<out>/model`, DDPMPipeline layout).

    Durable and exactly resumable: the checkpoint `<out>/checkpoint.pt` (model, EMA, AdamW, noise
    generator state, step, log sums; read back with torch.load(weights_only=True)) is written
    atomically every `save_every` steps, at each epoch end and at `max_steps`, so the run survives a
    kill at any moment; `resume=True` continues from it and computes bit for bit what an
    uninterrupted run computes (same data order: each epoch's permutation is drawn from (seed,
    epoch), the batches already trained are skipped; timesteps and noise from the saved generator;
    the learning rate is a function of the step). A run directory that holds a run is refused
    without `resume`; resuming with a setting that changes the run (all but `epochs`, to extend it,
    and those that cannot change a result) is refused in one line. `log.tsv` gets a row every
    `log_every` steps (mean loss since the last row) and one per epoch (mean loss of the epoch), with
    the step, epoch, learning rate and the CPU- and wall-clock seconds spent on the steps the run
    holds (work lost to a kill after the last checkpoint is not counted). At each epoch end the EMA
    model is written to `<out>/model/` (with `training.json`: epoch, step, settings), loadable by
    `load_diffusion` part-way through. `args.json` / `env.json` record the settings and environment.
    """
    out = Path(cfg.out_dir)
    path = out / CHECKPOINT
    if not cfg.resume and any((out / name).exists() for name in (CHECKPOINT, "log.tsv", MODEL_DIR)):
        raise SmoothAdvError(f"{out} already holds a training run; pass --resume to continue it or choose another "
                             "--out")
    with locked_run_directory(out, CHECKPOINT):
        return _train(cfg, out, path)


def _train(cfg: DiffusionTrainSettings, out: Path, path: Path) -> Path:
    shape = input_shape(cfg.dataset)
    torch.manual_seed(cfg.seed)
    unet = build_unet(cfg.channels, shape, layers_per_block=cfg.layers_per_block,
                      attention_levels=cfg.attention_levels, norm_groups=cfg.norm_groups)
    scheduler = build_scheduler(cfg.timesteps, cfg.beta_start, cfg.beta_end)
    ema = copy.deepcopy(unet).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = _State(unet, ema, optimizer, torch.Generator().manual_seed(derive_seed(cfg.seed, 1)))
    if cfg.resume and path.exists():
        state.restore(path, cfg)
    _tidy_model_dir(out)
    images = _training_images(cfg)
    if tuple(images.shape[1:]) != tuple(shape):
        raise SmoothAdvError(f"the {cfg.dataset} images are {tuple(images.shape[1:])}, expected {tuple(shape)}")
    steps_per_epoch = math.ceil(len(images) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    if state.step > total:
        raise SmoothAdvError(f"cannot resume {path} with --epochs {cfg.epochs}: it has trained "
                             f"{state.step / steps_per_epoch:.2f} epochs")
    stop = total if cfg.max_steps is None else min(total, cfg.max_steps)
    write_provenance(out, {**_config(cfg), "parameters": sum(p.numel() for p in unet.parameters()),
                           "steps_per_epoch": steps_per_epoch, "resumed_at_step": state.step})
    log = _open_log(out / "log.tsv", state.step)
    info = {"settings": _config(cfg), "steps_per_epoch": steps_per_epoch}
    if state.step > 0 and state.step % steps_per_epoch == 0 and _model_step(out) != state.step:  # killed before it
        _write_model(out, ema, scheduler, {**info, "epoch": state.step // steps_per_epoch, "step": state.step})
    unet.train()
    cpu0, wall0 = time.process_time() - state.cpu_seconds, time.monotonic() - state.wall_seconds
    try:
        while state.step < stop:
            epoch, skip = divmod(state.step, steps_per_epoch)
            shuffle = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, 0))
            order = torch.randperm(len(images), generator=shuffle)
            chunks = itertools.islice(torch.split(order, cfg.batch_size), skip, None)
            for index in chunks:
                x0 = images[index]
                noise = torch.randn(x0.shape, generator=state.noise)
                t = torch.randint(0, cfg.timesteps, (len(index),), generator=state.noise)
                x_t = scheduler.add_noise(x0, noise, t)
                loss = F.mse_loss(unet(x_t, t).sample, noise)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
                lr = cfg.lr * min(1.0, (state.step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                _ema_update(ema, unet, min(cfg.ema_decay, (1 + state.step) / (10 + state.step)))
                state.step += 1
                value = loss.item()
                state.epoch_loss += value
                state.epoch_count += 1
                state.window_loss += value
                state.window_count += 1
                state.cpu_seconds, state.wall_seconds = time.process_time() - cpu0, time.monotonic() - wall0
                end_of_epoch = state.step % steps_per_epoch == 0
                if state.step % cfg.log_every == 0:
                    log.write(("step", state.step, f"{state.step / steps_per_epoch:.3f}",
                               f"{state.window_loss / state.window_count:.6f}", f"{lr:.6g}",
                               f"{state.cpu_seconds:.1f}", f"{state.wall_seconds:.1f}"))
                    state.window_loss, state.window_count = 0.0, 0
                if end_of_epoch:
                    done = state.step // steps_per_epoch
                    log.write(("epoch", state.step, done, f"{state.epoch_loss / state.epoch_count:.6f}", f"{lr:.6g}",
                               f"{state.cpu_seconds:.1f}", f"{state.wall_seconds:.1f}"))
                    print(f"epoch {done}/{cfg.epochs}  step {state.step}  "
                          f"loss {state.epoch_loss / state.epoch_count:.5f}  {state.cpu_seconds / 60:.1f} CPU-min",
                          flush=True)
                    state.epoch_loss, state.epoch_count = 0.0, 0
                if end_of_epoch or state.step % cfg.save_every == 0 or state.step == stop:
                    state.save(path, cfg, steps_per_epoch)
                if end_of_epoch:
                    _write_model(out, ema, scheduler, {**info, "epoch": state.step // steps_per_epoch,
                                                       "step": state.step})
                if state.step >= stop:
                    break
    finally:
        log.close()
    return out / MODEL_DIR
