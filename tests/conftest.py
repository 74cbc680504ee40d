"""Shared test helpers: linear base classifiers whose smoothed classifier is known in closed form, and checkpoints
whose unpickling would run code (for the unsafe-loading tests of the library and of the command line)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


class LinearBinary(nn.Module):
    """f(x) = 1 if <w, x> + b > 0 else 0, with ||w||_2 = 1.

    Under x + N(0, sigma^2 I), P(f = 1) = Phi(margin / sigma) with margin = <w, x> + b, so the smoothed
    classifier predicts sign(margin) and its exact certified L2 radius is |margin| (distance to the hyperplane).
    """

    def __init__(self, w: Tensor, b: float) -> None:
        super().__init__()
        self.w = nn.Parameter(w / w.norm(), requires_grad=False)
        self.b = b

    def margin(self, x: Tensor) -> Tensor:
        return (x.flatten(1) * self.w.flatten()).sum(1) + self.b

    def forward(self, x: Tensor) -> Tensor:
        m = self.margin(x)
        return torch.stack([torch.zeros_like(m), m], dim=1)


@pytest.fixture
def linear_model() -> LinearBinary:
    w = torch.zeros(1, 4, 4)
    w[0, 0, 0] = 1.0
    return LinearBinary(w, -0.5)  # margin = x[0,0,0] - 0.5


def image_with_margin(margin: float) -> Tensor:
    x = torch.full((1, 4, 4), 0.5)
    x[0, 0, 0] = 0.5 + margin
    return x


@pytest.fixture(scope="session")
def toy_checkpoint(tmp_path_factory) -> Path:
    """A toy_cnn checkpoint for the synthetic data with fixed random weights (seed 0); treat it as read-only."""
    from smoothadv.models import build_model, normalization_spec, save_checkpoint

    path = tmp_path_factory.mktemp("toy") / "toy.pth.tar"
    torch.manual_seed(0)
    save_checkpoint(path, build_model("toy_cnn", "synthetic"), arch="toy_cnn", dataset="synthetic",
                    normalization=normalization_spec("synthetic"), sigma=0.25)
    return path


def run_command(argv: list, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit status and stderr of one in-process `smoothadv` command (arguments as str); a failure must be one clean
    `smoothadv: error:` line and never a traceback."""
    from smoothadv.cli import main

    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    if code != 0:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("smoothadv: error: "), err
    return code, err


# ------------------------------------------------------------------ checkpoints that run code when unpickled


class Payload:
    """Unpickling this object calls open(marker, "w"), i.e. creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _toy_state() -> dict:
    from smoothadv.models import build_model

    return {k: v.clone() for k, v in build_model("toy_cnn", "synthetic").state_dict().items()}


def craft(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    marker = tmp_path / f"pwned-{kind}"
    path = tmp_path / f"evil-{kind}.pth.tar"
    evil = Payload(marker)
    if kind == "zip":
        torch.save({"arch": "toy_cnn", "state_dict": _toy_state(), "extra": evil}, path)
    elif kind == "legacy":
        torch.save({"arch": "toy_cnn", "state_dict": _toy_state(), "extra": evil}, path,
                   _use_new_zipfile_serialization=False)
    elif kind == "in_state_dict":
        state = _toy_state()
        state["1.fc.weight"] = evil  # type: ignore[assignment]
        torch.save({"arch": "toy_cnn", "state_dict": state}, path)
    elif kind == "raw_pickle":
        with open(path, "wb") as handle:
            pickle.dump({"arch": "toy_cnn", "state_dict": {}, "extra": evil}, handle)
    else:
        raise ValueError(kind)
    assert not marker.exists()
    return path, marker
