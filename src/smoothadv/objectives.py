"""Training objectives: the per-batch loss is the only thing training methods differ in.

An `Objective` maps (model, x, y) to a `LossOutput`; `train.fit` runs one loop for all of them.
Adding a method (consistency regularization, MACER, ...) is one small class and one entry in
`OBJECTIVES`.

- `GaussianAugmentation`: cross-entropy of f on x + delta, delta ~ N(0, sigma^2 I)
  (Cohen et al. 2019, Section 4, "training").
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LossOutput(NamedTuple):
    loss: Tensor      # scalar to backpropagate
    logits: Tensor    # what the loss was computed on (for training accuracy)
    targets: Tensor   # the labels matching `logits` rows


class Objective(ABC):
    """A training method's per-batch loss. Implementations are frozen dataclasses."""

    #: optimizer steps the loop takes per loader batch (the batch is split into this many chunks)
    steps_per_batch: int = 1

    @abstractmethod
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> LossOutput:
        """The loss on one batch x (B, C, H, W) in [0, 1] with labels y (B,); the model is in train mode."""

    def at_epoch(self, epoch: int) -> Objective:
        """The objective to use in (0-indexed) `epoch`; schedules such as eps warm-up override this."""
        return self

    def describe(self) -> dict:
        """Plain-data description stored in checkpoints and run folders."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} if dataclasses.is_dataclass(self) else {}
        return {"name": type(self).__name__, **{k: (v.describe() if hasattr(v, "describe") else
                                                    repr(v) if dataclasses.is_dataclass(v) else v)
                                                 for k, v in fields.items()}}


def gaussian_noise(x: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """N(0, sigma^2) noise shaped like x, drawn on x's device (from `generator` if given)."""
    return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator) * sigma


@dataclass(frozen=True)
class GaussianAugmentation(Objective):
    """Cross-entropy of the base classifier on Gaussian-noised inputs (Cohen et al. 2019).

    Training f this way makes f(x + delta) accurate, which is what the smoothed classifier needs.
    """

    sigma: float

    def __post_init__(self) -> None:
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> LossOutput:
        logits = model(x + gaussian_noise(x, self.sigma, generator))
        return LossOutput(F.cross_entropy(logits, y), logits, y)


OBJECTIVES: dict[str, type[Objective]] = {"gaussian": GaussianAugmentation}
"""Objective name (the CLI's --objective) -> class."""
