"""Certify throughput of fixed n, the alpha-spending schedule and the betting test.

Samples saved only matter if a sequential step does not stall the device. On one real model and the same test
images, at the same batch size, interleaved (the order rotates every repetition; medians are reported):

  forward    bare forward passes of the base model on a static batch: the ceiling in samples per second;
  fixed      `smoothadv certify` (fixed n: n0 = 100 selection + n = 100,000 estimation samples per image);
  spending   `smoothadv certify --mode sequential` (group-sequential Clopper-Pearson, default grid policy);
  betting    `smoothadv certify --mode sequential --test betting` (default grid policy);
  (and, with --single R, both sequential tests at the single radius R).

Each method reports images per second and noisy samples per second (its samples over its time); the ratio of
the latter to `forward` says how much of the device a method leaves idle (host-side statistics, waves, syncs).
Fixed n runs on the first --fixed-images images, the sequential tests on --images (their per-image cost
varies with the image, so they need more images for a stable rate).

    OMP_NUM_THREADS=1 python benchmarks/sequential_throughput.py \\
        results/fashion-mnist/runs/gaussian_sigma0.25/checkpoint.pth.tar --sigma 0.25 --clock cpu
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from smoothadv.accel import prepare_base
from smoothadv.betting import BettingConfig
from smoothadv.data import get_dataset
from smoothadv.evaluate import certify_dataset
from smoothadv.models import load_checkpoint
from smoothadv.run import select_indices
from smoothadv.sequential import SequentialConfig, certify_sequential_dataset
from smoothadv.smoothing import Smooth


def timed(fn: Callable[[], tuple[int, int]]) -> tuple[float, float, float, float]:
    """(images/s wall, images/s CPU, samples/s wall, samples/s CPU) of one call of fn -> (images, samples)."""
    wall, cpu = time.perf_counter(), time.process_time()
    images, samples = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return images / wall, images / cpu, samples / wall, samples / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--sigma", type=float, required=True)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--images", type=int, default=32, help="images for the sequential tests")
    parser.add_argument("--fixed-images", type=int, default=4, help="images for fixed n (100,100 samples each)")
    parser.add_argument("--skip", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--single", type=float, default=None, help="also time both tests at this single radius")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="rates per wall-clock second or per second of process CPU time (steadier when shared)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    loaded, meta = load_checkpoint(args.checkpoint, device)
    model = prepare_base(loaded, device, "fp32", args.channels_last)
    dataset = get_dataset(meta["dataset"], "test", None)
    smooth = Smooth(model, meta["num_classes"], args.sigma)
    indices = select_indices(len(dataset), args.skip, args.images)  # type: ignore[arg-type]
    fixed_indices = indices[:args.fixed_images]
    x0 = dataset[0][0].to(device)
    static = (x0 + args.sigma * torch.randn((args.batch, *x0.shape), generator=torch.Generator().manual_seed(0))
              ).to(device)
    if args.channels_last:
        static = static.contiguous(memory_format=torch.channels_last)

    def forward() -> tuple[int, int]:
        with torch.inference_mode():
            for _ in range(100):
                model(static).argmax(1)
        return 0, 100 * args.batch

    def fixed() -> tuple[int, int]:
        rows = list(certify_dataset(smooth, dataset, fixed_indices, n0=100, n=100_000, alpha=0.001,
                                    batch_size=args.batch, device=device))
        return len(rows), len(rows) * 100_100

    def sequential(config: SequentialConfig | BettingConfig) -> Callable[[], tuple[int, int]]:
        def run() -> tuple[int, int]:
            rows = list(certify_sequential_dataset(smooth, dataset, indices, config=config, batch_size=args.batch,
                                                   device=device))
            return len(rows), sum(row.samples for row in rows)
        return run

    methods: dict[str, Callable[[], tuple[int, int]]] = {
        "forward": forward, "fixed n = 100,000": fixed,
        "alpha spending (grid)": sequential(SequentialConfig(args.sigma)),
        "betting (grid)": sequential(BettingConfig(args.sigma))}
    if args.single is not None:
        methods[f"alpha spending (radius {args.single:g})"] = sequential(SequentialConfig(args.sigma,
                                                                                          radii=(args.single,)))
        methods[f"betting (radius {args.single:g})"] = sequential(BettingConfig(args.sigma, radii=(args.single,)))
    forward()  # warm-up
    results: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in methods}
    names = list(methods)
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            results[name].append(timed(methods[name]))
    clock = 1 if args.clock == "cpu" else 0
    median = {name: (statistics.median(v[clock] for v in values), statistics.median(v[clock + 2] for v in values))
              for name, values in results.items()}
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), device {device}, batch {args.batch}, clock {args.clock}, "
          f"{args.reps} reps (medians); {args.checkpoint}, sigma {args.sigma:g}; sequential on {len(indices)} "
          f"images (every {args.skip}th), fixed n on the first {len(fixed_indices)}")
    print("\n| method | images / s | x fixed n | samples / s | samples / s vs bare forward |")
    print("|---|---|---|---|---|")
    base = median["fixed n = 100,000"][0]
    for name, (images, samples) in median.items():
        if name == "forward":
            print(f"| bare forward | | | {samples:,.0f} | 1 |")
            continue
        print(f"| {name} | {images:.3f} | {images / base:.1f}x | {samples:,.0f} | "
              f"{samples / median['forward'][1]:.3f} |")


if __name__ == "__main__":
    main()
