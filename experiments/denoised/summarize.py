"""Table, plot and example images of the denoised-smoothing experiment (run.sh writes what this reads).

    python experiments/denoised/summarize.py      # writes table.md, certified.png, examples.png in results/denoised/

Certified accuracy at each radius is k / N over the same N test images, with a two-sided 95% Clopper-Pearson
interval (each end at level 0.025, `smoothadv.stats`). Costs: multiply-adds per noise sample (`denoise.multiply_adds`)
and the measured CPU seconds of each certify step (logs/cpu.tsv, user + system, one thread) per image.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from smoothadv.data import get_dataset
from smoothadv.denoise import load_denoiser, multiply_adds
from smoothadv.files import atomic_write_bytes, atomic_write_text
from smoothadv.models import load_checkpoint
from smoothadv.report import load_results
from smoothadv.stats import (
    average_certified_radius,
    binom_pvalue,
    certified_accuracy,
    clopper_pearson_lower,
    clopper_pearson_upper,
)

HERE = Path(__file__).resolve().parents[2] / "results" / "denoised"  # what run.sh wrote
SIGMA = 0.25
RADII = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
CLASSIFIER = HERE / "runs/classifier_clean/checkpoint.pth.tar"
DENOISERS = {"mse": HERE / "runs/denoiser_mse/denoiser.pth.tar",
             "stability": HERE / "runs/denoiser_stability/denoiser.pth.tar"}
MODELS = {  # tsv stem -> (table name, what it is, denoiser key or None)
    "clean": ("f (no noise in training)", "off-the-shelf, certified directly", None),
    "mse": ("f o D_MSE", "same f, MSE denoiser (f never used in training)", "mse"),
    "stability": ("f o D_stab", "same f, MSE denoiser fine-tuned with stability through f", "stability"),
    "gaussian": ("Gaussian-trained f", "white-box reference: retrained with noise", None),
}
CLASSIFIER_MINUTES = 7.9 * 10 * 6 / 60  # see the note under the training table
CLASSES = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def interval(k: int, n: int) -> tuple[float, float]:
    """Two-sided 95% Clopper-Pearson interval of k successes in n."""
    lower = clopper_pearson_lower(k, n, 0.025) if k > 0 else 0.0
    upper = clopper_pearson_upper(k, n, 0.025) if k < n else 1.0
    return lower, upper


def cpu_seconds() -> dict[str, float]:
    """User + system CPU seconds of each step in logs/cpu.tsv (summed over resumed pieces)."""
    path = HERE / "logs/cpu.tsv"
    totals: dict[str, float] = {}
    if path.exists():
        for row in csv.reader(path.read_text().splitlines(), delimiter="\t"):
            if len(row) == 4:
                totals[row[0]] = totals.get(row[0], 0.0) + float(row[1]) + float(row[2])
    return totals


_QUALITY: dict[str, dict[str, float]] = {}


def quality_of(classifier: torch.nn.Module, denoiser_path: Path | None) -> dict[str, float]:
    """On all test images with one noise draw (seed 0): PSNR of D(x + delta) (of x + delta without a denoiser),
    f's accuracy on it, and f's clean accuracy."""
    key = str(denoiser_path)
    if key not in _QUALITY:
        test = get_dataset("fashion_mnist", "test")
        images = test.images
        x, y = (images.float().div(255) if images.dtype == torch.uint8 else images.float()), test.labels
        noisy = x + SIGMA * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = noisy if denoiser_path is None else torch.cat([load_denoiser(denoiser_path)[0](part)
                                                                 for part in noisy.split(1000)])
            mse = float(((out - x) ** 2).mean())
            acc = float((classifier(out).argmax(1) == y).float().mean())
            clean = float((classifier(x).argmax(1) == y).float().mean())
        _QUALITY[key] = {"psnr": 10 * np.log10(1 / mse), "acc": acc, "clean": clean}
    return _QUALITY[key]


def main() -> None:
    results = {stem: load_results(HERE / f"{stem}.tsv") for stem in MODELS if (HERE / f"{stem}.tsv").exists()}
    if not results:
        raise SystemExit("no certify TSV yet; run run.sh")
    counts = {len(r) for r in results.values()}
    indices = {tuple(r.idx.tolist()) for r in results.values()}
    assert len(indices) == 1, "the models were certified on different images"
    n_images = counts.pop()
    classifier, _ = load_checkpoint(CLASSIFIER)
    f_cost = multiply_adds(classifier, (1, 28, 28))
    d_costs = {k: multiply_adds(load_denoiser(p)[0], (1, 28, 28)) for k, p in DENOISERS.items() if p.exists()}
    cpu = cpu_seconds()

    head = "| model | " + " | ".join(f"r = {r:g}" for r in RADII) + " | ACR | M mult-adds / sample | CPU s / image |"
    lines = [f"Certified accuracy (%) on the same {n_images} Fashion-MNIST test images (every 50th), sigma = {SIGMA}, "
             "n0 = 100, n = 10,000, alpha = 0.001, seed 0; in brackets the 95% Clopper-Pearson interval.", "",
             head, "|---|" + "---:|" * (len(RADII) + 3)]
    for stem, res in results.items():
        name, _, denoiser = MODELS[stem]
        assert res.radius is not None
        accuracy = certified_accuracy(res.radius, res.correct, RADII)
        cells = []
        for value in accuracy:
            k = int(round(value * len(res)))
            low, high = interval(k, len(res))
            cells.append(f"{100 * value:.1f} [{100 * low:.0f}, {100 * high:.0f}]")
        macs = f_cost + (d_costs.get(denoiser, 0) if denoiser else 0)
        seconds = cpu.get(f"certify_{stem}")
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {average_certified_radius(res.radius, res.correct):.3f} | {macs / 1e6:.2f} | "
                     f"{'' if seconds is None else f'{seconds / len(res):.2f}'} |")
    lines += ["", "| model | what it is |", "|---|---|"]
    lines += [f"| {MODELS[s][0]} | {MODELS[s][1]} |" for s in results]
    lines += ["", "Training (one CPU thread, niced, on a shared machine) and what each denoiser does on all 10,000 "
              f"test images with one noise draw (sigma {SIGMA}, seed 0, the same for all; f's clean accuracy "
              f"{quality_of(classifier, None)['clean']:.3f}):", "",
              "| step | CPU minutes | PSNR (dB) | accuracy of f on the denoised (or noisy) images |",
              "|---|---:|---:|---:|"]
    noisy = quality_of(classifier, None)
    lines.append(f"| (no denoiser: f(x + delta)) | | {noisy['psnr']:.2f} | {noisy['acc']:.3f} |")
    for step, key in (("classifier_clean", None), ("denoiser_mse", "mse"), ("denoiser_stability", "stability")):
        minutes = f"{cpu[step] / 60:.1f}" if step in cpu else "n/a"
        if key is None:
            lines.append(f"| {step} | {minutes} (resume checks) + about {CLASSIFIER_MINUTES:.1f} (training, estimated) "
                         "| | |")
        elif DENOISERS[key].exists():
            q = quality_of(classifier, DENOISERS[key])
            lines.append(f"| {step} | {minutes} | {q['psnr']:.2f} | {q['acc']:.3f} |")
    total = sum(cpu.values()) / 60
    lines += ["", f"CPU time of every step in logs/cpu.tsv: {total:.1f} minutes. The classifier's training ran before "
              "run.sh timed its steps, so its row holds only the resume checks; a timed epoch on 6,000 images took "
              f"7.9 CPU-s after start-up, so its 6 epochs on 60,000 cost about {CLASSIFIER_MINUTES:.0f} CPU-minutes "
              f"({total:.1f} measured plus about {CLASSIFIER_MINUTES:.1f} estimated, about "
              f"{total + CLASSIFIER_MINUTES:.0f} CPU-minutes in all). Cost per noise sample: fashion_cnn "
              f"{f_cost / 1e6:.2f} M multiply-adds; the denoiser adds {max(d_costs.values(), default=0) / 1e6:.2f} M."]
    lines += paired(results)
    atomic_write_text(HERE / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results)
    examples(classifier)


def paired(results: dict) -> list[str]:
    """Paired comparisons on the same images (and the same noise): at each radius, how many images one model
    certifies and the other does not, with the exact two-sided sign-test (McNemar) p-value."""
    pairs = [(a, b) for a, b in (("stability", "mse"), ("gaussian", "stability"), ("mse", "clean"))
             if a in results and b in results]
    if not pairs:
        return []
    out = ["", "Paired on the same images: images certified at radius r by the first model only / by the second "
           "only (exact sign-test p-value).", "",
           "| first vs second | " + " | ".join(f"r = {r:g}" for r in RADII) + " |", "|---|" + "---:|" * len(RADII)]
    for a, b in pairs:
        cells = []
        for r in RADII:
            ok_a = (results[a].radius >= r) & (results[a].correct == 1)
            ok_b = (results[b].radius >= r) & (results[b].correct == 1)
            only_a, only_b = int((ok_a & ~ok_b).sum()), int((ok_b & ~ok_a).sum())
            p = binom_pvalue(min(only_a, only_b), only_a + only_b) if only_a + only_b else 1.0
            cells.append(f"{only_a} / {only_b} (p {p:.2g})")
        out.append(f"| {MODELS[a][0]} vs {MODELS[b][0]} | " + " | ".join(cells) + " |")
    return out


def plot(results: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    grid = np.linspace(0, 0.85, 171)
    colours = {"clean": "#7f7f7f", "mse": "#1f77b4", "stability": "#2ca02c", "gaussian": "#d62728"}
    for stem, res in results.items():
        curve = certified_accuracy(res.radius, res.correct, grid)
        bands = np.array([interval(int(round(v * len(res))), len(res)) for v in curve])
        ax.plot(grid, curve, color=colours[stem], linewidth=2, label=MODELS[stem][0])
        ax.fill_between(grid, bands[:, 0], bands[:, 1], color=colours[stem], alpha=0.15, linewidth=0)
    ax.set_xlim(0, 0.85)
    ax.set_ylim(0, 1)
    ax.set_xlabel(r"$\ell_2$ radius")
    ax.set_ylabel("certified accuracy")
    ax.set_title(rf"Fashion-MNIST, $\sigma$ = {SIGMA}, n = 10,000 (bands: 95% CI)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(HERE / "certified.png", buffer.getvalue())


def examples(classifier: torch.nn.Module, count: int = 6) -> None:
    """Clean, noisy and denoised versions of test images 0, 50, 100, ... with f's prediction on each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    test = get_dataset("fashion_mnist", "test")
    x = torch.stack([test[50 * i][0] for i in range(count)])
    labels = [int(test[50 * i][1]) for i in range(count)]
    noisy = x + SIGMA * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    rows = [("clean", x), (f"noisy, sigma {SIGMA}", noisy)]
    with torch.no_grad():
        for key, path in DENOISERS.items():
            if path.exists():
                rows.append((f"D_{key}(noisy)", load_denoiser(path)[0](noisy)))
        predictions = [classifier(images).argmax(1).tolist() for _, images in rows]
    fig = Figure(figsize=(1.3 * count + 1.4, 1.45 * len(rows)), dpi=110)
    FigureCanvasAgg(fig)
    for r, ((title, images), predicted) in enumerate(zip(rows, predictions)):
        for c in range(count):
            ax = fig.add_subplot(len(rows), count, r * count + c + 1)
            ax.imshow(images[c, 0].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            ok = predicted[c] == labels[c]
            ax.set_title(f"f: {CLASSES[predicted[c]]}", fontsize=7, color="black" if ok else "red")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title, fontsize=7)
    fig.suptitle("f's prediction above each image (red: wrong); true: " +
                 ", ".join(CLASSES[label] for label in labels), fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(HERE / "examples.png", buffer.getvalue())


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
