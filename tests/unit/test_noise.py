"""`noise`: the draws every training method and the smoothed soft classifier share."""

from __future__ import annotations

import torch

from smoothadv import objectives
from smoothadv.distributed import RankSlicedNoise
from smoothadv.noise import (
    gaussian_noise,
    noise_copies,
    noisy_rows,
    row_generator,
    standard_normal,
    uniform_draws,
)
from smoothadv.smoothing import SoftSmoothed


def test_the_helpers_are_the_ones_objectives_use() -> None:
    assert objectives.gaussian_noise is gaussian_noise and objectives.noisy_rows is noisy_rows


def test_same_source_state_same_draws_and_a_row_source_slices_rows() -> None:
    x = torch.zeros(6, 1, 2, 2)
    a = gaussian_noise(x, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(a, gaussian_noise(x, 0.5, torch.Generator().manual_seed(3)))
    assert torch.allclose(a, 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3)))
    whole = standard_normal((6, 3), x, RankSlicedNoise(torch.Generator().manual_seed(1)))
    part = standard_normal((3, 3), x, RankSlicedNoise(torch.Generator().manual_seed(1), 1, 2))
    assert torch.equal(part, whole[1::2])
    local = torch.Generator()
    assert row_generator(RankSlicedNoise(torch.Generator(), local=local)) is local
    u = uniform_draws((1000,), x, torch.Generator().manual_seed(0))
    assert 0 < float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.05


def test_copies_are_image_major_and_soft_smoothed_uses_them() -> None:
    x = torch.arange(2.0).view(2, 1, 1, 1)
    noise = noise_copies(x, 3, 1.0, torch.Generator().manual_seed(0))
    assert noise.shape == (2, 3, 1, 1, 1)
    rows = noisy_rows(x, noise)
    assert torch.equal(rows[:3], x[0] + noise[0]) and torch.equal(rows[3:], x[1] + noise[1])
    seen: list[torch.Tensor] = []

    class Probe(torch.nn.Module):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            seen.append(z)
            return torch.zeros(len(z), 2)

    SoftSmoothed(Probe(), noise)(x)
    assert torch.equal(seen[0], rows)
