"""Certification throughput against the model's own forward throughput.

In one process, interleaved (the order rotates every repetition; medians are reported):

  forward    the base model's bare forward passes on a static random batch of --batch samples:
             the limit any certification loop can reach on this device;
  certify    `Smooth.certify(x, n0, n, ...)` on one input (n0 + n samples);
  dataset    `evaluate.certify_dataset`, the `smoothadv certify` path (several inputs, packed);
  cohen      a straightforward implementation of Cohen et al.'s CERTIFY pseudocode as their code
             does it: per batch `x.repeat`, `randn_like`, argmax, `.cpu().numpy()` and a host-side
             counting loop, under `no_grad`.

Every method runs the same model (random weights: throughput does not depend on them) on
batches of the same size, and each reports noisy samples per second; ratios are to `forward`.

    OMP_NUM_THREADS=1 python benchmarks/certify_throughput.py                 # both models, CPU
    python benchmarks/certify_throughput.py --device cuda --batch 4000 --samples 200000

`--fold-bn` / `--channels-last` apply the same optimisation to the model of every method, and the
table then also shows the optimised model's forward throughput relative to the plain one.

`--denoiser DIR` puts a diffusion model (diffusers layout; diffusion denoised smoothing, Carlini et al.
2023) in front of every model, as `certify --denoiser DIR` does (`models.attach_denoiser`, sigma 0.25):
`forward` is then the bare f o D forward (UNet + classifier, the UNet in chunks of `diffusion.CPU_CHUNK`
images on a CPU, as certify runs it), and the table also shows f o D with the whole batch through the UNet
at once, relative to it:

    OMP_NUM_THREADS=1 python benchmarks/certify_throughput.py --models fashion_cnn --batch 256 --samples 2560 \
        --reps 3 --clock cpu --denoiser results/diffusion-fmnist/ddpm/model
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from smoothadv.accel import fold_batchnorm
from smoothadv.denoise import DenoisedClassifier
from smoothadv.diffusion import DiffusionDenoiser
from smoothadv.evaluate import certify_dataset
from smoothadv.models import attach_denoiser, build_model
from smoothadv.smoothing import Smooth

MODELS = {"fashion_cnn": ("fashion_mnist", (1, 28, 28)), "cifar_resnet20": ("cifar10", (3, 32, 32)),
          "cifar_resnet110": ("cifar10", (3, 32, 32))}


class CohenStraightforward:
    """Cohen et al.'s sampling loop, written as their reference code does it (for comparison only)."""

    def __init__(self, model: nn.Module, num_classes: int, sigma: float) -> None:
        self.model, self.num_classes, self.sigma = model, num_classes, sigma

    def _sample_noise(self, x: torch.Tensor, num: int, batch_size: int) -> np.ndarray:
        with torch.no_grad():
            counts = np.zeros(self.num_classes, dtype=int)
            for _ in range(int(np.ceil(num / batch_size))):
                this_batch_size = min(batch_size, num)
                num -= this_batch_size
                batch = x.repeat((this_batch_size, 1, 1, 1))
                noise = torch.randn_like(batch, device=x.device) * self.sigma
                predictions = self.model(batch + noise).argmax(1)
                counts += self._count_arr(predictions.cpu().numpy(), self.num_classes)
            return counts

    @staticmethod
    def _count_arr(arr: np.ndarray, length: int) -> np.ndarray:
        counts = np.zeros(length, dtype=int)
        for idx in arr:
            counts[idx] += 1
        return counts

    def certify(self, x: torch.Tensor, n0: int, n: int, batch_size: int) -> int:
        self.model.eval()
        counts0 = self._sample_noise(x, n0, batch_size)
        c_hat = int(counts0.argmax())
        counts = self._sample_noise(x, n, batch_size)
        return int(counts[c_hat])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], int], device: torch.device) -> tuple[float, float]:
    """Samples per second of one call of fn (which returns its sample count): per wall-clock second and
    per second of this process's CPU time (all threads; steadier than wall-clock on a shared machine)."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    samples = fn()
    sync(device)
    return samples / (time.perf_counter() - wall), samples / (time.process_time() - cpu)


def bench_model(arch: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    dataset, shape = MODELS[arch]
    torch.manual_seed(0)
    plain = build_model(arch, dataset).to(device).eval()
    model: nn.Module = plain
    if args.fold_bn:
        model = fold_batchnorm(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    whole = None
    if args.denoiser:
        classifier = model
        model, _ = attach_denoiser(classifier, args.denoiser, sigma=0.25, shape=shape, device=device)
        chunked = cast(DiffusionDenoiser, model.denoiser)  # the same loaded UNet, the whole batch in one call
        whole = DenoisedClassifier(DiffusionDenoiser(chunked.model, chunked.sigma, chunked.steps), classifier).eval()
    batch, samples, n0 = args.batch[arch], args.samples[arch], args.n0
    n = samples - n0
    static = torch.rand(batch, *shape, device=device)
    if args.channels_last:
        static = static.contiguous(memory_format=torch.channels_last)
    x = torch.rand(shape, device=device)
    smooth = Smooth(model, 10, 0.25)
    cohen = CohenStraightforward(model, 10, 0.25)
    per_image = max(n0 + 1, samples // args.images)
    images = TensorDataset(torch.rand(args.images, *shape), torch.zeros(args.images, dtype=torch.long))

    def forward_of(net: nn.Module) -> Callable[[], int]:
        def run() -> int:
            with torch.inference_mode():
                for _ in range(samples // batch):
                    net(static)
            return (samples // batch) * batch
        return run

    def run_certify() -> int:
        smooth.certify(x, n0, n, 0.001, batch, generator=torch.Generator(device).manual_seed(0))
        return n0 + n

    def run_dataset() -> int:
        rows = list(certify_dataset(smooth, images, range(args.images), n0=n0, n=per_image - n0, alpha=0.001,
                                    batch_size=batch, seed=0, device=device))
        return len(rows) * per_image

    def run_cohen() -> int:
        cohen.certify(x, n0, n, batch)
        return n0 + n

    buffer = torch.empty(batch, *shape, device=device)
    logits = torch.randn(batch, 10, device=device)
    gen = torch.Generator(device).manual_seed(0)

    def run_overhead() -> int:
        """The per-batch work certify adds to a forward pass: noise into the buffer, + x, argmax, bincount."""
        with torch.inference_mode():
            for _ in range(samples // batch):
                buffer.normal_(0.0, 0.25, generator=gen)
                buffer.add_(x)
                torch.bincount(logits.argmax(dim=1), minlength=10)
        return (samples // batch) * batch

    methods: dict[str, Callable[[], int]] = {"forward": forward_of(model), "certify": run_certify,
                                             "dataset": run_dataset, "cohen": run_cohen, "overhead": run_overhead}
    if args.fold_bn or args.channels_last:
        methods["forward_plain"] = forward_of(plain)
    if whole is not None:
        methods["forward_whole"] = forward_of(whole)
    for fn in methods.values():  # warm-up (allocations, oneDNN primitive caches, cudnn autotuning)
        fn()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
    names = list(methods)
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            results[name].append(timed(methods[name], device))
    clock = 1 if args.clock == "cpu" else 0
    return {name: statistics.median(v[clock] for v in values) for name, values in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fashion_cnn", "cifar_resnet20"], choices=list(MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or 1)")
    parser.add_argument("--batch", type=int, default=None, help="samples per forward pass (default: per model)")
    parser.add_argument("--samples", type=int, default=None, help="samples per measurement (default: per model)")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--images", type=int, default=4, help="inputs in the certify_dataset measurement")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="samples per wall-clock second, or per second of process CPU time (CPU only; "
                             "use on a shared, oversubscribed machine)")
    parser.add_argument("--fold-bn", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--denoiser", default=None, help="a diffusion model directory: certify f o D (see above)")
    args = parser.parse_args()
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batch = {m: args.batch or (4000 if gpu else 1000 if m == "fashion_cnn" else 200) for m in MODELS}
    args.samples = {m: args.samples or (200_000 if gpu else 10_000 if m == "fashion_cnn" else 2000) for m in MODELS}
    where = torch.cuda.get_device_name(device) if gpu else f"{platform.processor() or platform.machine()} CPU"
    print(f"# device: {where}; torch {torch.__version__}; threads {threads}; reps {args.reps} (medians); "
          f"clock {args.clock}; fold_bn={args.fold_bn} channels_last={args.channels_last}"
          + (f"; every model behind the diffusion denoiser {args.denoiser} (f o D)" if args.denoiser else ""))
    print("| model | batch | forward (samples/s) | Smooth.certify | smoothadv certify | Cohen-style loop "
          "| certify / forward | smoothadv certify / forward | Cohen-style / forward |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arch in args.models:
        r = bench_model(arch, args, device)
        f = r["forward"]
        print(f"| {arch} | {args.batch[arch]} | {f:,.0f} | {r['certify']:,.0f} | {r['dataset']:,.0f} | "
              f"{r['cohen']:,.0f} | {r['certify'] / f:.3f} | {r['dataset'] / f:.3f} | {r['cohen'] / f:.3f} |",
              flush=True)
        print(f"|   (certify's own per-sample work, timed alone: {f / r['overhead']:.3f} of a forward pass, so the "
              f"ratio it allows is {r['overhead'] / (r['overhead'] + f):.3f}) |")
        if "forward_whole" in r:
            print(f"|   (f o D with the whole batch through the UNet at once: {r['forward_whole']:,.0f} samples/s; "
                  f"in chunks / whole = {f / r['forward_whole']:.3f}) |")
        if "forward_plain" in r:
            print(f"|   (plain model forward: {r['forward_plain']:,.0f} samples/s; optimised / plain = "
                  f"{f / r['forward_plain']:.3f}) |")


if __name__ == "__main__":
    main()
