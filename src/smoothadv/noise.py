"""Gaussian noise draws shared by training objectives, denoiser losses, distributed training and smoothing.

Randomized smoothing classifies x by the votes of f on x + delta, delta ~ N(0, sigma^2 I) (Cohen et al.
2019); every training method here (Cohen et al. 2019, Section 4; Salman et al. 2019; the denoiser losses
of Salman et al. 2020, "Denoised Smoothing", arXiv:2003.01908) draws that noise the same way:

- from a `NoiseSource`: a `torch.Generator`, a `RowNoise` (one row per batch example, e.g.
  `distributed.RankSlicedNoise`, so an example's noise does not depend on the number of torchrun
  processes), or None (the global RNG);
- m copies per image as one (B, m, C, H, W) tensor, row i for image i (`noise_copies`), fed to the
  model image-major (`noisy_rows`: the m copies of image 1, then of image 2, ...).

Contract: with the same source state, the same shapes give the same draws; every row-per-example draw
goes through `standard_normal`, so a `RowNoise` sees all of them. Only torch is imported here.

In your own training loop, pass an objective a `torch.Generator` (or nothing, for torch's global generator):
`RowNoise` is what torchrun training uses. The package's convention for `generator=`, `generators=` and
`seed=` arguments, devices included, is stated once in `smoothadv.seeds`.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

__all__ = [
    "NoiseSource", "RowNoise", "gaussian_noise", "noise_copies", "noisy_rows", "row_generator", "standard_normal",
    "uniform_draws",
]


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


def uniform_draws(shape: tuple[int, ...], like: Tensor, generator: NoiseSource = None) -> Tensor:
    """U(0, 1) draws of `shape` (row i for batch example i), made as Phi(z) of N(0, 1) draws from `generator`,
    so that a `RowNoise` gives every example the same draws whatever the number of torchrun processes."""
    return torch.special.ndtr(standard_normal(shape, like, generator))


def gaussian_noise(x: Tensor, sigma: float, generator: NoiseSource = None) -> Tensor:
    """N(0, sigma^2) noise shaped like x, drawn on x's device (from `generator` if given)."""
    return standard_normal(tuple(x.shape), x, generator) * sigma


def noise_copies(x: Tensor, m: int, sigma: float, generator: NoiseSource = None) -> Tensor:
    """m draws of N(0, sigma^2 I) per image of x (B, C, H, W): a (B, m, C, H, W) tensor, row i for image i."""
    return standard_normal((x.shape[0], m, *x.shape[1:]), x, generator) * sigma


def noisy_rows(x: Tensor, noise: Tensor) -> Tensor:
    """The B*m noisy inputs x_i + delta_ij, image-major ((B, m, ...) noise flattened to (B*m, ...))."""
    return (x.unsqueeze(1) + noise).flatten(0, 1)
