"""Training cost of every objective, each with its recipe, against Gaussian augmentation.

For each recipe (default: the eight methods of the Fashion-MNIST LeNet comparison, sigma = 0.25), the
objective is built from the recipe exactly as `smoothadv train --config` builds it (`train.recipe`),
then `train.train_epoch` (the loop `smoothadv train` runs, chunking included) trains the recipe's model
(architecture, normalization, batch size, SGD with its lr, momentum and weight decay) for `--batches` loader
batches. The measured CPU time per batch, times the batches of one epoch of the training set (235 for
Fashion-MNIST at batch 256), is the CPU-seconds per epoch; the test pass of `smoothadv train` (1,000 noisy
test images, under 1% of a Gaussian epoch) is not counted. Methods run interleaved, the order rotating every
repetition; medians are reported.

Schedules are set to their full strength: MACER's deferred robustness term is on (`at_epoch` past the
deferral), SmoothAdv's eps and SmoothMix's weight are past their warm-ups. CAT-RS is given a uniform pi
(its cost does not depend on pi). Random images of the dataset's shape and random labels: the passes do
not depend on the pixel values, except that MACER computes its hinge on the images it classifies correctly.

Two cost models, both in units of a Gaussian epoch:

  U model (one forward+backward = 1 U, an attack step ~ 1 U):
    gaussian 1, stability 2, smoothadv m (T + 1), consistency m, smoothadv + consistency m (T + 1),
    macer m, smoothmix m (T + 2), catrs m (T + 2)
  pass model (benchmarks/training_cost.py; a forward 1, an input-gradient backward 1, a training
  backward 2, so a training pass is 3 and an attack step 2):
    gaussian 1, stability 2, smoothadv m (2T + 3) / 3, consistency m, smoothadv + consistency
    m (2T + 3) / 3, macer m, smoothmix m (2T + 6) / 3, catrs m (2T + 6) / 3

The table gives the measured ratio to Gaussian and measured / model for both. With `--forward-n` it also
measures CAT-RS's one-off precomputation (`smoothadv smooth-prediction`: forward passes of noisy copies in
batches of 1000, `Smooth.sample_counts`, the same code path) on the Gaussian recipe's model: CPU-seconds per
training image at N noisy copies, extrapolated linearly from `--forward-n` copies. With `--rows` it also
times the first recipe's objective (Gaussian by default) on loader batches of each given size: CPU time per
image, and its ratio to the first size. A method that passes m copies of each of B images through the model
at once (MACER: 16 x 256 = 4,096 rows) pays this per-row price on top of its cost model.

    OMP_NUM_THREADS=1 python benchmarks/method_cost.py
    OMP_NUM_THREADS=1 python benchmarks/method_cost.py --batches 2 --reps 2 --forward-n 2000 --n 10000 1000
    OMP_NUM_THREADS=1 python benchmarks/method_cost.py gaussian=configs/fashion_mnist/cohen_gaussian_s0.25.toml \
        macer=configs/fashion_mnist/macer_s0.25.toml --batches 1 --reps 3 --rows 256 1024 4096
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from smoothadv.data import dataset_info
from smoothadv.models import build_model
from smoothadv.objectives import CATRS, MACER, Objective, SmoothAdv, SmoothMix, StabilityTraining
from smoothadv.settings import fields_of, read_toml
from smoothadv.smoothing import Smooth
from smoothadv.train import recipe as train_recipe
from smoothadv.train import train_epoch

ROOT = Path(__file__).resolve().parent.parent
COMPARISON = [f"{name}=configs/fashion_mnist/{recipe}_s0.25.toml" for name, recipe in (
    ("gaussian", "cohen_gaussian"), ("stability", "stability"), ("consistency", "consistency"),
    ("smoothadv", "smoothadv_pgd_t2_m1_e1.0"), ("smoothmix", "smoothmix"), ("catrs", "catrs"), ("macer", "macer"),
    ("consistency_adv", "consistency_adv"))]
TRAIN_SIZES = {"fashion_mnist": 60000, "cifar10": 50000}


def label(objective: Objective) -> str:
    """A short name with the settings that set the cost."""
    if isinstance(objective, SmoothAdv):
        attack = objective.attack
        name = "smoothadv + consistency" if objective.consistency else "smoothadv"
        return f"{name} (T={attack.steps}, m={objective.m})"  # type: ignore[attr-defined]  # PGD or DDN
    if isinstance(objective, (SmoothMix, CATRS)):
        return f"{type(objective).__name__.lower()} (T={objective.steps}, m={objective.m})"
    if isinstance(objective, StabilityTraining):
        return "stability"
    m = getattr(objective, "m", None)
    name = {"GaussianAugmentation": "gaussian"}.get(type(objective).__name__, type(objective).__name__.lower())
    return f"{name} (m={m})" if m is not None else name


def cost_models(objective: Objective) -> tuple[float, float, str]:
    """(U model, pass model, the U model's formula): cost per epoch in Gaussian epochs; see the module docstring."""
    if isinstance(objective, SmoothAdv):
        steps, m = objective.attack.steps, objective.m  # type: ignore[attr-defined]  # PGD or DDN
        return m * (steps + 1), m * (2 * steps + 3) / 3, "m (T + 1)"
    if isinstance(objective, (SmoothMix, CATRS)):
        steps, m = objective.steps, objective.m
        return m * (steps + 2), m * (2 * steps + 6) / 3, "m (T + 2)"
    if isinstance(objective, StabilityTraining):
        return 2.0, 2.0, "2"
    copies = getattr(objective, "m", None)
    return (float(copies), float(copies), "m") if copies is not None else (1.0, 1.0, "1")


def build(recipe: Path, train_size: int) -> tuple[Objective, dict]:
    """The objective a recipe trains with (at full strength) and its training settings."""
    values = {k: v for k, v in read_toml(recipe).items() if k not in ("paper", "certify")}
    values["out"] = "unused"
    catrs = values.get("objective") == "catrs"
    own = {}
    if catrs:  # its pi comes from a precomputed file: build the settings as Gaussian's, then CAT-RS itself
        values.pop("smoothed_prediction", None)
        own = {k: values.pop(k) for k in list(values) if k in fields_of(CATRS) and k != "sigma"}
        values["objective"] = "gaussian"
    settings, objective = train_recipe(values, source=str(recipe))
    if catrs:
        objective = CATRS(settings.sigma, **own, pi=torch.full((train_size, 10), 0.1))
    if isinstance(objective, MACER):
        objective = objective.at_epoch(objective.deferred)
    warmup = getattr(objective, "warmup", 1)
    objective = objective.at_epoch(max(warmup, 1))
    return objective, {"arch": settings.arch, "dataset": settings.dataset, "batch": settings.batch_size,
                       "lr": settings.lr, "momentum": settings.momentum, "weight_decay": settings.weight_decay,
                       "normalization": settings.normalization, "sigma": settings.sigma}


def model_and_optimizer(cfg: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The recipe's model (seed 0) and its SGD optimizer."""
    torch.manual_seed(0)
    model = build_model(cfg["arch"], cfg["dataset"], cfg["normalization"])
    return model, torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                  weight_decay=cfg["weight_decay"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", default=COMPARISON, metavar="[NAME=]RECIPE",
                        help="recipe TOMLs, optionally named (default: the methods of results/fmnist-compare at sigma "
                             "0.25, named as it names its runs); the first is the baseline the "
                             "ratios divide by")
    parser.add_argument("--tsv", default=None,
                        help="also write the costs as a TSV for `smoothadv report --cost` (name, recipe, objective, "
                             "cpu_s_per_epoch, model = the U model, formula, pass_model)")
    parser.add_argument("--batches", type=int, default=3, help="loader batches per measurement")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=None,
                        help="training images per epoch (default: the dataset's training split)")
    parser.add_argument("--forward-n", type=int, default=0,
                        help="noisy copies to time for CAT-RS's precomputation (0: skip)")
    parser.add_argument("--rows", type=int, nargs="+", default=[],
                        help="also time the first recipe's objective per image on loader batches of these sizes")
    parser.add_argument("--n", type=int, nargs="+", default=[10000, 1000],
                        help="N of the precomputation to extrapolate to (default: 10000 1000)")
    args = parser.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    named = [item.split("=", 1) if "=" in item else [Path(item).stem, item] for item in args.recipes]
    recipes = [Path(r) if Path(r).is_absolute() or Path(r).exists() else ROOT / r for _, r in named]
    run_names = {recipe: name for recipe, (name, _) in zip(recipes, named)}
    built = []
    for recipe in recipes:
        dataset = read_toml(recipe).get("dataset", "fashion_mnist")
        size = args.train_size or TRAIN_SIZES.get(dataset, 60000)
        built.append((recipe, *build(recipe, size), size))
    gen = torch.Generator().manual_seed(0)
    jobs = {}
    for recipe, objective, cfg, size in built:
        shape, batch = dataset_info(cfg["dataset"]).input_shape, cfg["batch"]
        data = [(torch.rand(batch, *shape, generator=gen), torch.randint(0, 10, (batch,), generator=gen),
                 torch.randint(0, size, (batch,), generator=gen)) for _ in range(args.batches)]
        model, optimizer = model_and_optimizer(cfg)

        def once(model=model, objective=objective, optimizer=optimizer, data=data) -> float:
            start = time.process_time()
            train_epoch(model, objective, optimizer, iter(data), device, generator=torch.Generator().manual_seed(1))
            return time.process_time() - start
        batches_per_epoch = -(-size // batch)
        jobs[recipe] = (once, objective, batches_per_epoch)
    for once, _, _ in jobs.values():  # warm-up
        once()
    times: dict[Path, list[float]] = {recipe: [] for recipe in jobs}
    names = list(jobs)
    for rep in range(args.reps):
        for recipe in names[rep % len(names):] + names[:rep % len(names)]:
            times[recipe].append(jobs[recipe][0]())
    per_epoch = {r: statistics.median(times[r]) / args.batches * jobs[r][2] for r in names}
    base = per_epoch[names[0]]
    cpu = platform.processor() or platform.machine()
    print(f"# {args.batches} loader batches per measurement, {args.reps} reps (medians), process CPU time, "
          f"{threads} thread(s), {cpu} CPU, torch {torch.__version__}")
    print(f"| recipe | objective | CPU-s / epoch | ratio to {run_names[names[0]]} | U model | measured / U model "
          "| pass model | measured / pass model |")
    print("|---|---|---|---|---|---|---|---|")
    tsv = ["name\trecipe\tobjective\tcpu_s_per_epoch\tmodel\tformula\tpass_model"]
    for recipe in names:
        _, objective, _ = jobs[recipe]
        u_model, pass_model, formula = cost_models(objective)
        ratio = per_epoch[recipe] / base
        print(f"| {recipe.name} | {label(objective)} | {per_epoch[recipe]:.0f} | {ratio:.2f} | "
              f"{formula} = {u_model:g} | {ratio / u_model:.2f} | {pass_model:.3g} | {ratio / pass_model:.2f} |",
              flush=True)
        tsv.append(f"{run_names[recipe]}\t{recipe.name}\t{label(objective)}\t{per_epoch[recipe]:.1f}\t{u_model:g}\t"
                   f"{formula}\t{pass_model:.4g}")
    if args.tsv:
        Path(args.tsv).write_text("\n".join(tsv) + "\n")
    if args.rows:
        row_scaling(built[0], args.rows, args.reps, gen)
    if args.forward_n:
        _, _, cfg, _ = built[0]
        torch.manual_seed(0)
        model = build_model(cfg["arch"], cfg["dataset"], cfg["normalization"]).eval()
        smooth = Smooth(model, 10, cfg["sigma"])
        x = torch.rand(*dataset_info(cfg["dataset"]).input_shape, generator=gen)
        samples = []
        for _ in range(args.reps + 1):
            start = time.process_time()
            smooth.sample_counts(x, args.forward_n, 1000, generator=torch.Generator().manual_seed(2))
            samples.append(time.process_time() - start)
        per_copy = statistics.median(samples[1:]) / args.forward_n
        size = built[0][3]
        print()
        print(f"CAT-RS precomputation (smooth-prediction, batch 1000, {cfg['arch']}): "
              f"{per_copy * 1e6:.1f} CPU-us per noisy copy, measured on {args.forward_n} copies")
        for n in args.n:
            print(f"  N = {n}: {per_copy * n:.2f} CPU-s per training image, {per_copy * n * size / 3600:.2f} "
                  f"CPU-h for {size} images = {per_copy * n * size / base:.1f} Gaussian epochs")


def row_scaling(baseline: tuple[Path, Objective, dict, int], rows: list[int], reps: int,
                gen: torch.Generator) -> None:
    """Print the CPU time per image of one training step of the baseline recipe's objective on a loader
    batch of each size in `rows`, interleaved and repeated `reps` times (medians), as a ratio to the first."""
    recipe, objective, cfg, size = baseline
    shape = dataset_info(cfg["dataset"]).input_shape
    model, optimizer = model_and_optimizer(cfg)
    data = {n: [(torch.rand(n, *shape, generator=gen), torch.randint(0, 10, (n,), generator=gen),
                 torch.randint(0, size, (n,), generator=gen))] for n in rows}
    times: dict[int, list[float]] = {n: [] for n in rows}
    for rep in range(reps + 1):  # the first round warms up
        for n in rows[rep % len(rows):] + rows[:rep % len(rows)]:
            start = time.process_time()
            train_epoch(model, objective, optimizer, iter(data[n]), torch.device("cpu"),
                        generator=torch.Generator().manual_seed(1))
            if rep:
                times[n].append((time.process_time() - start) / n)
    base = statistics.median(times[rows[0]])
    print()
    print(f"Per-image cost of {recipe.name} ({label(objective)}) by loader batch size, {reps} reps (medians):")
    print(f"| rows per pass | CPU-us per image | ratio to {rows[0]} rows |")
    print("|---:|---:|---:|")
    for n in rows:
        per_image = statistics.median(times[n])
        print(f"| {n} | {per_image * 1e6:.0f} | {per_image / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
