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

Medians of --repeats timed repetitions after one warm-up. Run it on one thread:

    OMP_NUM_THREADS=1 python benchmarks/diffusion_cost.py
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from smoothadv.diffusion import build_scheduler, build_unet

CANDIDATES = {
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
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}, {platform.processor() or platform.machine()}")
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


if __name__ == "__main__":
    main()
