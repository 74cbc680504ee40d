"""SmoothAdv training cost against Gaussian-augmentation training and the cost model m(2T+3)/3.

In one process, interleaved (the order rotates every repetition; medians are reported), the same
model, data batches and optimizer settings are trained for `--batches` loader batches with

  gaussian   `objectives.GaussianAugmentation(sigma)` (one forward and backward per image), and
  smoothadv  `objectives.SmoothAdv(sigma, attack=PGDL2(eps, T), m=m, multi_noise=True)` for each
             requested (T, m): T attack steps, each a forward and an input-gradient backward over
             m noisy copies, then a training forward and backward over the m copies.

Cost model (reference efficiency notes, Section 4.1): a forward is 1 unit, an input-gradient
backward 1, a training backward (input and parameter gradients) 2, so SmoothAdv costs m(2T+3)
units per image against Gaussian's 3: ratio m(2T+3)/3. The table shows the measured ratio and
measured / model (target <= 1.15). Random data of the dataset's shape (the cost does not depend on
the pixel values); `train.train_epoch` is the loop both objectives run in, as in `smoothadv train`.

    OMP_NUM_THREADS=1 python benchmarks/training_cost.py
    python benchmarks/training_cost.py --model cifar_resnet20 --configs 1x1 2x2 --batches 4
    python benchmarks/training_cost.py --device cuda --precision bf16   # also mixed precision (train --precision)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from smoothadv.accel import autocast_dtype
from smoothadv.attacks import PGDL2
from smoothadv.models import build_model
from smoothadv.objectives import GaussianAugmentation, Objective, SmoothAdv
from smoothadv.train import train_epoch

MODELS = {"fashion_cnn": ("fashion_mnist", (1, 28, 28)), "cifar_resnet20": ("cifar10", (3, 32, 32))}


def cost_model(steps: int, m: int) -> float:
    """Predicted SmoothAdv / Gaussian cost per image: m (2T + 3) / 3."""
    return m * (2 * steps + 3) / 3


def parse_config(text: str) -> tuple[int, int]:
    steps, m = (int(v) for v in text.lower().split("x"))
    return steps, m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fashion_cnn", choices=list(MODELS))
    parser.add_argument("--configs", nargs="+", default=["1x1", "2x2", "4x2"], help="TxM: attack steps x noise draws")
    parser.add_argument("--batch", type=int, default=256, help="loader batch (images)")
    parser.add_argument("--batches", type=int, default=8, help="loader batches per measurement")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--eps", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or 1)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall-clock, or process CPU time (steadier on a shared, oversubscribed CPU)")
    parser.add_argument("--precision", choices=("bf16", "fp16"), default=None,
                        help="also measure this mixed precision, as `smoothadv train --precision` runs it "
                             "(fp16: GPU only; bf16 on a CPU without bf16 instructions is emulated and slow)")
    args = parser.parse_args()
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    dataset, shape = MODELS[args.model]
    gen = torch.Generator().manual_seed(0)
    data = [(torch.rand(args.batch, *shape, generator=gen), torch.randint(0, 10, (args.batch,), generator=gen))
            for _ in range(args.batches)]
    data = [(x.to(device), y.to(device)) for x, y in data]
    torch.manual_seed(0)
    model = build_model(args.model, dataset).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)  # small lr: weights barely move
    configs = [parse_config(c) for c in args.configs]
    objectives: dict[str, Objective] = {"gaussian": GaussianAugmentation(args.sigma)}
    for steps, m in configs:
        objectives[f"smoothadv T={steps} m={m}"] = SmoothAdv(args.sigma, attack=PGDL2(args.eps, steps), m=m,
                                                              multi_noise=True, warmup=1)
    precisions: list[torch.dtype | None] = [None]
    if args.precision:
        precisions.append(autocast_dtype(args.precision, device))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(objective: Objective, dtype: torch.dtype | None) -> Callable[[], float]:
        def once() -> float:
            scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            train_epoch(model, objective, optimizer, iter(data), device,
                        generator=torch.Generator(device).manual_seed(1), precision=dtype, scaler=scaler)
            sync()
            return (time.perf_counter() - wall) if args.clock == "wall" else (time.process_time() - cpu)
        return once

    def units(dtype: torch.dtype | None) -> tuple[float, float, float]:
        """Seconds of a forward (F), a forward + input-gradient backward (A) and a training step (G) on one
        batch of --batch samples: the passes the cost model counts as 1, 2 and 3 units."""
        x, y = data[0]
        amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

        def forward() -> None:
            with torch.no_grad():
                model(x)

        def input_grad() -> None:
            point = x.detach().requires_grad_(True)
            torch.autograd.grad(torch.nn.functional.cross_entropy(model(point), y, reduction="sum"), point)

        def train_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

        out = []
        for fn, train_mode in ((forward, False), (input_grad, False), (train_step, True)):
            model.train(train_mode)
            samples = []
            with amp:
                for _ in range(args.reps + 1):
                    sync()
                    wall, cpu = time.perf_counter(), time.process_time()
                    fn()
                    sync()
                    samples.append((time.perf_counter() - wall) if args.clock == "wall" else
                                   (time.process_time() - cpu))
            out.append(statistics.median(samples[1:]))
        return out[0], out[1], out[2]

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU"
    print(f"# {args.model}, {args.batches} batches of {args.batch} images, sigma {args.sigma}, eps {args.eps}; "
          f"device: {where}; torch {torch.__version__}; threads {threads}; clock {args.clock}; "
          f"reps {args.reps} (medians)")
    print("| precision | objective | s / batch | ratio to gaussian | cost model m(2T+3)/3 | measured / model "
          "| calibrated model m(T A + G)/G | measured / calibrated |")
    print("|---|---|---|---|---|---|---|---|")
    baseline_fp32 = None
    for dtype in precisions:
        label = "fp32" if dtype is None else str(dtype).replace("torch.", "")
        jobs = {name: run(obj, dtype) for name, obj in objectives.items()}
        for job in jobs.values():  # warm-up
            job()
        times: dict[str, list[float]] = {name: [] for name in jobs}
        names = list(jobs)
        for rep in range(args.reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                times[name].append(jobs[name]())
        median = {name: statistics.median(v) / args.batches for name, v in times.items()}
        gauss = median["gaussian"]
        baseline_fp32 = baseline_fp32 or gauss
        f, a, g = units(dtype)
        print(f"| {label} | gaussian | {gauss:.4f} | 1.00 | 1.00 | - | 1.00 | - |")
        for (steps, m), name in zip(configs, names[1:]):
            ratio, model_ratio, calibrated = median[name] / gauss, cost_model(steps, m), m * (steps * a + g) / g
            print(f"| {label} | {name} | {median[name]:.4f} | {ratio:.2f} | {model_ratio:.2f} | "
                  f"{ratio / model_ratio:.2f} | {calibrated:.2f} | {ratio / calibrated:.2f} |", flush=True)
        print(f"| {label} | (units on this model: A / F = {a / f:.2f}, G / F = {g / f:.2f}; "
              f"the cost model assumes 2 and 3) | | | | | | |")
        if dtype is not None:
            print(f"| {label} | (gaussian speed-up over fp32: {baseline_fp32 / gauss:.2f}x) | | | | | | |")


if __name__ == "__main__":
    main()
