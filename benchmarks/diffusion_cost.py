"""Cost of a small DDPM on Fashion-MNIST on one CPU core: forward throughput and training seconds per batch.

For each candidate UNet (`smoothadv.diffusion.build_unet`, 1x28x28 images, GroupNorm 8, one
attention level plus the middle block's) it measures, on random data of the right shape (the cost
does not depend on pixel values):

  forward   images per CPU-second of the UNet forward (eval mode, no gradients) at batch --eval-batch;
            one-shot diffusion denoising costs exactly one such forward per noise sample, the
            multi-step variant k of them;
  train     CPU-seconds of one training step at batch --batch (DDPM noising, forward, MSE backward,
            gradient clipping, AdamW, EMA update: the loop of `smoothadv.diffusion.train_ddpm`),
            and from it CPU-minutes per epoch over --images images.

With --cifar10 it measures instead what diffusion denoised smoothing costs on CIFAR-10 per noise sample
(`configs/cifar10/dds_s*.toml`): CPU-seconds per image of the forward pass of a UNet in the configuration of
Ho et al.'s CIFAR-10 DDPM (`google/ddpm-cifar10-32` in diffusers: channels 128/256/256/256, two ResNet blocks
per level, attention at 16x16, 35.7 M parameters; random weights: the cost does not depend on them), of
smoothadv's `cifar_resnet110` (Cohen et al.'s classifier) and of torchvision's ViT-B/16 at 224x224 (the
paper's CIFAR-10 classifier's architecture, images upsampled), with their multiply-adds
(`denoise.multiply_adds`: convolutions and linear layers), and the ratios that scale a classifier's
certification time to f o D's.

Medians of --repeats timed repetitions after one warm-up. Run it on one thread:

    OMP_NUM_THREADS=1 python benchmarks/diffusion_cost.py
    OMP_NUM_THREADS=1 python benchmarks/diffusion_cost.py --cifar10
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import time
from typing import Any, cast

import torch
import torch.nn.functional as F

from smoothadv.denoise import multiply_adds
from smoothadv.diffusion import build_scheduler, build_unet

CANDIDATES: dict[str, dict[str, Any]] = {
    "small": dict(channels=(32, 64, 64), layers_per_block=1),
    "medium": dict(channels=(64, 128, 128), layers_per_block=2),
}


def _cpu_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--batch", type=int, default=128, help="training batch")
    parser.add_argument("--eval-batch", type=int, default=100, help="forward batch")
    parser.add_argument("--images", type=int, default=60_000, help="images per epoch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cifar10", action="store_true", help="the CIFAR-10 DDS cost model instead (see above)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}, {platform.processor() or platform.machine()}")
    if args.cifar10:
        cifar10_cost(args.repeats)
        return
    print(f"training batch {args.batch}, forward batch {args.eval_batch}, {args.repeats} repeats (median)")
    scheduler = build_scheduler()
    for name in args.candidates:
        torch.manual_seed(0)
        unet = build_unet(CANDIDATES[name]["channels"], (1, 28, 28), attention_levels=(2,),
                          layers_per_block=CANDIDATES[name]["layers_per_block"], norm_groups=8)
        params = sum(p.numel() for p in unet.parameters())
        x = torch.rand(args.eval_batch, 1, 28, 28) * 2 - 1
        t = torch.full((args.eval_batch,), 200, dtype=torch.long)
        unet.eval()

        def forward(unet=unet, x=x, t=t) -> None:
            with torch.no_grad():
                unet(x, t)

        fwd = _cpu_seconds(forward, args.repeats)
        unet.train()
        ema = copy.deepcopy(unet).requires_grad_(False)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-4, weight_decay=0.0)
        x0 = torch.rand(args.batch, 1, 28, 28) * 2 - 1

        def step(unet=unet, ema=ema, optimizer=optimizer, x0=x0) -> None:
            noise = torch.randn_like(x0)
            tt = torch.randint(0, 1000, (len(x0),))
            loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, tt), tt).sample, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            with torch.no_grad():
                for e, p in zip(ema.parameters(), unet.parameters()):
                    e.lerp_(p, 0.001)

        train = _cpu_seconds(step, args.repeats)
        steps = math.ceil(args.images / args.batch)
        print(f"{name:7s} channels {CANDIDATES[name]['channels']} layers/block {CANDIDATES[name]['layers_per_block']}"
              f"  {params / 1e6:.2f} M params  forward {args.eval_batch / fwd:.0f} images/CPU-s"
              f"  train {train:.3f} CPU-s/batch of {args.batch}  = {steps * train / 60:.1f} CPU-min/epoch"
              f" ({steps} steps)", flush=True)


def ddpm_cifar10_unet() -> torch.nn.Module:
    """A UNet2DModel in the configuration of `google/ddpm-cifar10-32` (Ho et al.'s CIFAR-10 DDPM), random weights."""
    import diffusers

    return cast(torch.nn.Module, diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32, norm_eps=1e-6,
        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, attention_head_dim=None))


def cifar10_cost(repeats: int) -> None:
    """CPU-seconds per image of the DDPM UNet, ResNet-110 and ViT-B/16 forwards (no gradients), and their ratios."""
    from torchvision.models import vit_b_16

    from smoothadv.models import build_model

    torch.manual_seed(0)
    unet = ddpm_cifar10_unet().eval()
    resnet = build_model("cifar_resnet110", "cifar10").eval()
    vit = vit_b_16().eval()  # random weights (no download); 224x224 inputs
    timestep = torch.full((1,), 145, dtype=torch.long)  # t* at sigma 0.25 on the linear T = 1000 schedule

    class Eps(torch.nn.Module):  # the UNet as f o D calls it: one timestep, the noise prediction
        def __init__(self) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, x):
            return self.unet(x, timestep.expand(len(x))).sample

    eps = Eps()
    rows = []
    for name, module, shape, batch in (("DDPM UNet (google/ddpm-cifar10-32 config)", eps, (3, 32, 32), 16),
                                       ("cifar_resnet110", resnet, (3, 32, 32), 64),
                                       ("ViT-B/16 at 224x224", vit, (3, 224, 224), 4)):
        x = torch.rand(batch, *shape)

        def forward(module=module, x=x) -> None:
            with torch.no_grad():
                module(x)

        seconds = _cpu_seconds(forward, repeats) / batch
        params = sum(p.numel() for p in module.parameters())
        macs = multiply_adds(module, shape)
        rows.append((name, seconds, params, macs))
        mark = "*" if module is vit else " "
        print(f"{name:42s} {params / 1e6:6.1f} M params  {macs / 1e9:6.2f} G multiply-adds/image{mark} "
              f"{seconds * 1e3:8.1f} CPU-ms/image (batch {batch})", flush=True)
    unet_s, resnet_s, vit_s = rows[0][1], rows[1][1], rows[2][1]
    print(f"UNet / ResNet-110: {unet_s / resnet_s:.1f}x time, {rows[0][3] / rows[1][3]:.1f}x multiply-adds; "
          f"f o D = {1 + unet_s / resnet_s:.1f}x the ResNet-110 alone")
    print(f"UNet / ViT-B/16 at 224: {unet_s / vit_s:.2f}x time; f o D = {1 + unet_s / vit_s:.2f}x the ViT alone "
          "(* the ViT's attention projections and products are not counted in its multiply-adds)")


if __name__ == "__main__":
    main()
