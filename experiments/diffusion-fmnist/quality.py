"""How well the released DDPM denoises, measured as results/denoised/table.md measures the DnCNN denoisers: on all
10,000 Fashion-MNIST test images with one noise draw (seed 0) at sigma = 0.25, the PSNR of D(x + delta) against x
and the accuracy of the off-the-shelf classifier f (results/denoised/runs/classifier_clean) on D(x + delta), for
the one-shot DDS denoiser (Carlini et al., ICLR 2023, Algorithm 1) and its multi-step variant (k = 2, 4, 8 UNet
passes: `DiffusionDenoiser(model, sigma, steps=k)`, a deterministic DDIM chain from t* to 0).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/diffusion-fmnist/quality.py  # writes quality.md

It writes results/diffusion-fmnist/quality.md. About 1.5 CPU-minutes on one thread for the one-shot denoiser
(10,000 UNet passes), k times that for k steps: about 25 CPU-minutes in all.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from smoothadv.data import get_dataset
from smoothadv.diffusion import DiffusionDenoiser, load_diffusion
from smoothadv.models import load_checkpoint
from smoothadv.stats import mcnemar_exact

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "results" / "diffusion-fmnist" / "ddpm" / "model"
CLASSIFIER = ROOT / "results" / "denoised" / "runs" / "classifier_clean" / "checkpoint.pth.tar"
OUT = ROOT / "results" / "diffusion-fmnist" / "quality.md"
SIGMA = 0.25
STEPS = (1, 2, 4, 8)  # one-shot, and the multi-step variant (a DDIM chain from t* to 0) with k UNet passes


def main() -> int:
    test = get_dataset("fashion_mnist", "test")
    images = test.images
    x = images.float().div(255) if images.dtype == torch.uint8 else images.float()
    x = x.view(-1, 1, 28, 28)
    y = test.labels
    noisy = x + SIGMA * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))  # as results/denoised
    classifier, _ = load_checkpoint(CLASSIFIER)
    classifier.eval()
    model = load_diffusion(MODEL)
    rows, right = [], {}
    with torch.no_grad():
        for label, out, seconds in [("(no denoiser: f(x + delta))", noisy, None),
                                    *[_denoised(model, noisy, k) for k in STEPS]]:
            mse = float(((out - x) ** 2).mean())
            right[label] = torch.cat([classifier(part).argmax(1) for part in out.split(1000)]) == y
            rows.append((label, 10 * math.log10(1 / mse), float(right[label].float().mean()), seconds))
    one_shot = rows[1][0]
    lines = [f"# The released DDPM as a denoiser at sigma = {SIGMA}", "",
             "Made by `OMP_NUM_THREADS=1 .venv/bin/python experiments/diffusion-fmnist/quality.py` on all 10,000 "
             "test images, one noise draw (seed 0), as `results/denoised/table.md` measures the DnCNN denoisers "
             f"(same images, same noise). The timestep t* = {DiffusionDenoiser(model, SIGMA).t_star}.", "",
             "Against one-shot DDS, on the same images: how many f labels correctly after one denoiser only, and "
             "the exact McNemar p-value (two-sided) of that split.", "",
             "| denoiser | PSNR (dB) | accuracy of f on the denoised (or noisy) images | CPU-s for 10,000 images | "
             "right only after one-shot | right only after this one | McNemar p |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, psnr, acc, s in rows:
        only_one = int((right[one_shot] & ~right[label]).sum())
        only_this = int((right[label] & ~right[one_shot]).sum())
        p_value = mcnemar_exact(only_one, only_this)
        paired = "| | | |" if label == one_shot else f"| {only_one} | {only_this} | {p_value:.3g} |"
        lines.append(f"| {label} | {psnr:.2f} | {acc:.4f} | {'' if s is None else f'{s:.0f}'} {paired}")
    OUT.write_text("\n".join(lines) + "\n")
    print(OUT.read_text())
    return 0


def _denoised(model, noisy: torch.Tensor, steps: int) -> tuple[str, torch.Tensor, float]:
    denoiser = DiffusionDenoiser(model, SIGMA, steps=steps)
    start = time.process_time()
    out = torch.cat([denoiser(part) for part in noisy.split(500)])
    label = "DDS one-shot (1 UNet pass)" if steps == 1 else f"DDS multi-step (DDIM, {steps} UNet passes)"
    return label, out, time.process_time() - start


if __name__ == "__main__":
    sys.exit(main())
