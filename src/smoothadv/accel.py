"""Speed options for the base classifier at certification time: BatchNorm folding, autocast precision,
channels_last, compile.

`prepare_base(model, device, precision, channels_last, compile, fold_bn)` returns a module with the same
interface (a (B, C, H, W) batch of [0, 1] images -> (B, K) float32 logits) that `Smooth` uses as
its base classifier f; the noise is still drawn and added in float32 by the sampler.

Validity: CERTIFY's guarantee (Cohen et al. 2019, Theorem 1 with the Clopper-Pearson bound) holds
for *any* base classifier, so certifying f_bf16 (f run under bf16 autocast) is as valid as
certifying f: the certificate is about the smoothed classifier built from f_bf16, which is the one
you must then deploy (predict with the same precision). What changes is the radius, because
f_bf16's votes differ slightly from f's; measure it before relying on it (fp32 is the default).
`channels_last` and `compile` change memory layout and kernels only (votes may differ at floating
point ties). `fold_bn` folds each eval-mode BatchNorm into the convolution before it (w' = w * g / s,
b' = (b - mu) * g / s + beta): the same function up to float rounding, one kernel fewer per layer.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .errors import SmoothAdvError

__all__ = [
    "Autocast", "ChannelsLast", "PRECISIONS", "autocast_dtype", "check_precision", "fold_batchnorm", "prepare_base",
    "resolve_device",
]

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Autocast(nn.Module):
    """Runs `inner` under `torch.autocast(device_type, dtype)` and returns float32 outputs."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype, device_type: str) -> None:
        super().__init__()
        self.inner = inner
        self.dtype = dtype
        self.device_type = device_type

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.inner(x)
        return out.float()


class ChannelsLast(nn.Module):
    """Feeds `inner` (whose weights are channels_last) its input in channels_last memory format."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)


def check_precision(precision: str) -> None:
    """Raise SmoothAdvError unless `precision` is one of PRECISIONS (device checks: `autocast_dtype`)."""
    if precision not in PRECISIONS:
        raise SmoothAdvError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of `precision` ("fp32": None, "bf16", "fp16") on `device`, checked.

    Raises SmoothAdvError for an unknown precision, fp16 on CPU (use bf16), or bf16 on a GPU
    without bf16 support.
    """
    device = torch.device(device)
    check_precision(precision)
    dtype = PRECISIONS[precision]
    if dtype is torch.float16 and device.type != "cuda":
        raise SmoothAdvError("fp16 autocast needs a GPU; on CPU use --precision bf16")
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SmoothAdvError("this GPU does not support bf16; use --precision fp16")
    return dtype


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with every BatchNorm that directly follows a convolution folded into it.

    The copy computes the same function as `model.eval()` up to float rounding; `model` is left
    unchanged. Raises SmoothAdvError if the model cannot be traced by torch.fx (data-dependent
    control flow).
    """
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(copy.deepcopy(model).eval())
    except Exception as exc:  # torch.fx raises several types on untraceable code
        raise SmoothAdvError(f"cannot fold BatchNorm in this model ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else 'not traceable'})") from None


def prepare_base(model: nn.Module, device: torch.device | str, precision: str = "fp32", channels_last: bool = False,
                 compile: bool = False, fold_bn: bool = False) -> nn.Module:
    """`model` wrapped for fast inference as requested (unchanged with the defaults).

    With `fold_bn` the model is replaced by `fold_batchnorm(model)` (for inference only: the folded
    copy has no BatchNorm left to train).

    Raises SmoothAdvError as `autocast_dtype` does.
    """
    device = torch.device(device)
    dtype = autocast_dtype(precision, device)
    if fold_bn:
        model = fold_batchnorm(model)
    if channels_last:
        model = ChannelsLast(model)
    if dtype is not None:
        model = Autocast(model, dtype, device.type)
    if compile:
        try:
            model = torch.compile(model)  # type: ignore[assignment]
        except RuntimeError as exc:
            raise SmoothAdvError(f"torch.compile failed: {str(exc).splitlines()[0]}") from None
    return model


def resolve_device(name: str | None) -> torch.device:
    """'auto' -> cuda when available, else cpu; otherwise the named device (checked)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SmoothAdvError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SmoothAdvError("device cuda requested but CUDA is not available")
    return device
