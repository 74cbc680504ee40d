"""Draw docs/smoothing.png: what randomized smoothing guarantees, on a 2-D toy classifier.

    .venv/bin/python docs/make_smoothing_figure.py            # writes docs/smoothing.png

The "image" is a point x = (x1, x2) in [0, 1]^2 (a 1x1x2 tensor). The base classifier f has three
classes: blue above a wavy boundary, orange below, and a small green island next to x. Left panel:
f's regions, the noise cloud x + N(0, sigma^2 I) coloured by f's vote, and x. Right panel: the smoothed
classifier g(x) = argmax_c P(f(x + delta) = c) (computed by Monte Carlo on a grid), which washes the
island out, and the L2 ball of radius R = sigma * Phi^-1(p_A lower bound) that `Smooth.certify`
returns for x: g is constant on it (with probability >= 1 - alpha over the sampling).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from smoothadv import Smooth

SIGMA = 0.15
X = (0.30, 0.66)
COLOURS = ["#4c72b0", "#dd8452", "#55a868"]


class Toy(nn.Module):
    """f: 0 above x2 = 0.45 + 0.08 sin(2 pi * 1.5 x1), 1 below, 2 inside a disc of radius 0.06 at (0.40, 0.75)."""

    def forward(self, x: Tensor) -> Tensor:
        p = x.reshape(x.shape[0], 2)
        u, v = p[:, 0], p[:, 1]
        label = (v < 0.45 + 0.08 * torch.sin(2 * math.pi * 1.5 * u)).long()
        label[(u - 0.40) ** 2 + (v - 0.75) ** 2 < 0.06**2] = 2
        return torch.nn.functional.one_hot(label, 3).float()


def smoothed_labels(f: nn.Module, grid: Tensor, sigma: float, draws: int = 1000) -> Tensor:
    """g on each grid point (Monte Carlo with `draws` samples; for the picture only, no certificate)."""
    gen = torch.Generator().manual_seed(1)
    votes = torch.zeros(len(grid), 3)
    for _ in range(draws // 50):
        noisy = grid.unsqueeze(1) + sigma * torch.randn((len(grid), 50, 2), generator=gen)
        votes += f(noisy.reshape(-1, 2)).reshape(len(grid), 50, 3).sum(1)
    return votes.argmax(1)


def main(out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle

    f = Toy()
    smooth = Smooth(f, num_classes=3, sigma=SIGMA)
    x = torch.tensor(X).reshape(1, 1, 2)
    cert = smooth.certify(x, n0=100, n=100_000, alpha=0.001, batch_size=10_000,
                          generator=torch.Generator().manual_seed(0))
    side = np.linspace(0, 1, 241)
    uu, vv = np.meshgrid(side, side)
    grid = torch.tensor(np.stack([uu.ravel(), vv.ravel()], 1), dtype=torch.float32)
    base = f(grid).argmax(1).reshape(uu.shape).numpy()
    smoothed = smoothed_labels(f, grid, SIGMA).reshape(uu.shape).numpy()
    cloud = x.reshape(1, 2) + SIGMA * torch.randn((400, 2), generator=torch.Generator().manual_seed(2))
    cloud_votes = f(cloud).argmax(1).numpy()

    fig = Figure(figsize=(9, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    cmap = ListedColormap(COLOURS)
    for i, (labels, title) in enumerate([(base, "base classifier f and the noise x + N(0, σ²I)"),
                                         (smoothed, "smoothed classifier g and its certified ball")]):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.imshow(labels, origin="lower", extent=(0, 1, 0, 1), cmap=cmap, alpha=0.35, vmin=0, vmax=2,
                  interpolation="nearest")
        if i == 0:
            ax.scatter(cloud[:, 0], cloud[:, 1], s=5, c=[COLOURS[c] for c in cloud_votes], edgecolors="none")
        else:
            ax.add_patch(Circle(X, cert.radius, fill=False, linestyle="--", linewidth=2, color="black"))
            ax.annotate(f"R = σ·Φ⁻¹(p_A lower bound) = {cert.radius:.3f}", xy=(X[0] + cert.radius * 0.7,
                            X[1] + cert.radius * 0.7), xytext=(0.35, 0.93),
                        fontsize=9, arrowprops={"arrowstyle": "->", "linewidth": 0.8})
        ax.plot(*X, marker="*", markersize=14, color="black", markeredgecolor="white")
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    top = "blue orange green".split()[cert.prediction]
    fig.suptitle(f"σ = {SIGMA}: g(x) = {top}, P(f(x + δ) = {top}) ≥ {cert.p_lower:.3f} (n = 100,000, α = 0.001)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out} (prediction {cert.prediction}, radius {cert.radius:.4f}, p_lower {cert.p_lower:.4f})")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "smoothing.png")
