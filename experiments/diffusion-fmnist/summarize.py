"""The certified table of diffusion denoised smoothing on Fashion-MNIST, with what each certificate cost.

    OMP_NUM_THREADS=1 python experiments/diffusion-fmnist/summarize.py   # after certify.sh; writes certify/table.md
    python experiments/diffusion-fmnist/summarize.py --accuracy          # prints the accuracy table (docs/dds.md)

Reads the sequential certify TSVs of `certify.sh` (results/diffusion-fmnist/certify/*_s0.25.tsv) and writes
results/diffusion-fmnist/certify/table.md:

- certified accuracy at r = 0, 0.25, 0.5, 0.75 with 95% Clopper-Pearson intervals, ACR and abstentions, then every
  row compared with f o D_ddpm on the same images (exact McNemar per radius, Holm-adjusted over all comparisons;
  the ACR difference with its 95% interval): what `smoothadv report --ci --paired` prints for these files;
- the cost: noise samples per image (selection + estimation, from the TSVs' `samples` column: each is one forward
  pass of the classifier, and of the denoiser when there is one), the CPU-seconds of one noise sample through each
  model (measured here: `time.process_time` of the forward passes at the certify batch of 256, one thread, median
  of 5 after a warm-up, on the same kind of input), and their product, the CPU-seconds per image;
- the same images certified at fixed n = 10,000 (results/denoised/*.tsv, the same seed) beside the sequential rows,
  for the rows that have one.

When a file is not finished, every row is restricted to the images all of them hold (said in the table).
`--accuracy` prints only the accuracy table and one sentence per paired comparison (no timing: the same output from
the same files), the generated block of docs/dds.md.

Then, when certify.sh's row f_D_ddpm_k4 exists (the 4-step DDIM chain, `--denoiser-steps 4`, on every 200th test
image), one shot against 4 steps on the images both hold: the same accuracy table and paired test, and their cost.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from smoothadv.report import (
    Results,
    compare_to_first,
    describe_comparison,
    format_table,
    load_results,
    paired_text,
    summarize,
)
from smoothadv.run import load_smoothed
from smoothadv.settings import CertifySettings, RunSettings
from smoothadv.stats import certified_accuracy

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "results" / "diffusion-fmnist" / "certify"
SIGMA, RADII, BATCH = 0.25, (0.0, 0.25, 0.5, 0.75), 256
CLEAN = "results/denoised/runs/classifier_clean/checkpoint.pth.tar"
ROWS = {  # row -> (what it is, checkpoint, denoiser, the fixed-n TSV of results/denoised on the same images)
    "f_D_ddpm": ("f behind the DDPM, one shot (diffusion denoised smoothing)", CLEAN,
                 "results/diffusion-fmnist/ddpm/model", None),
    "f_D_mse": ("f behind the DnCNN trained with the MSE loss", CLEAN,
                "results/denoised/runs/denoiser_mse/denoiser.pth.tar", "results/denoised/mse.tsv"),
    "f_D_stab": ("f behind the DnCNN fine-tuned with the stability loss through f", CLEAN,
                 "results/denoised/runs/denoiser_stability/denoiser.pth.tar", "results/denoised/stability.tsv"),
    "f": ("f, the off-the-shelf fashion_cnn trained without noise, bare", CLEAN, None, "results/denoised/clean.tsv"),
    "gaussian": ("fashion_cnn trained with Gaussian noise (white-box reference)",
                 "results/fashion-mnist/runs/gaussian_sigma0.25/checkpoint.pth.tar", None,
                 "results/denoised/gaussian.tsv"),
    "consistency": ("LeNet trained with Consistency, the best row of the LeNet table by ACR",
                    "results/fmnist-lenet/runs/consistency_s0.25/checkpoint.pth.tar", None, None),
}


def samples(results: Results) -> list[int]:
    """The `samples` column (selection + estimation noise samples per image) of a sequential certify file."""
    assert results.samples is not None, f"{results.path} records the samples of each image"
    return results.samples.tolist()


def seconds_per_sample(checkpoint: str, denoiser: str | None, repeats: int = 5, steps: int = 1) -> float:
    """CPU-seconds of one noise sample through the model certify runs (`run.load_smoothed`: the same
    preparation; `steps` UNet evaluations of a diffusion denoiser), at batch 256 on one thread: the median of
    `repeats` timed forward passes after a warm-up."""
    run = RunSettings(checkpoint=str(ROOT / checkpoint), out=Path("unused.tsv"), device="cpu",
                      denoiser=None if denoiser is None else str(ROOT / denoiser), denoiser_steps=steps)
    smooth, dataset, _, _ = load_smoothed(run, CertifySettings(sigma=SIGMA))
    x = dataset[0][0].unsqueeze(0).repeat(BATCH, 1, 1, 1)
    generator = torch.Generator().manual_seed(0)
    noisy = x + SIGMA * torch.randn(x.shape, generator=generator)
    timings = []
    with torch.no_grad():
        smooth.base_classifier(noisy)
        for _ in range(repeats):
            began = time.process_time()
            smooth.base_classifier(noisy)
            timings.append((time.process_time() - began) / BATCH)
    return statistics.median(timings)


def accuracy_table(certify: dict[str, Results]) -> str:
    """Certified accuracy at RADII with 95% intervals, ACR and abstentions, one row per entry (markdown)."""
    return format_table(summarize(certify, list(RADII), ci=True), "markdown").rstrip()


def multi_step(one_shot: Results, one_shot_seconds: float) -> list[str]:
    """The lines comparing f o D_ddpm one shot with the 4-step row on the images both hold (none without it)."""
    path = HERE / f"f_D_ddpm_k4_s{SIGMA}.tsv"
    if not path.exists() or len(path.read_text(encoding="utf-8").splitlines()) < 3:
        return []  # not started, or fewer than the 2 images a paired test needs
    four = load_results(path)
    keep = {int(i) for i in four.idx} & {int(i) for i in one_shot.idx}
    pair = {"f_D_ddpm": one_shot.restricted(keep), "f_D_ddpm_k4": four.restricted(keep)}
    planned = 50  # certify.sh's f_D_ddpm_k4 row: every 200th test image
    scope = (f"the {len(keep)} images of its run (every 200th test image)" if len(keep) == planned else
             f"the {len(keep)} of its {planned} images certified so far (every 200th test image; the run is not "
             "finished)")
    lines = ["", f"One shot against the 4-step DDIM chain (`--denoiser-steps 4`, row f_D_ddpm_k4 of certify.sh) on "
             f"{scope}, the same test and settings. Certified accuracy (%) with its 95% interval, then the paired "
             "test.", "", accuracy_table(pair), "", paired_text(pair, list(RADII)).strip(), ""]
    per_sample = seconds_per_sample(CLEAN, ROWS["f_D_ddpm"][2], steps=4)
    lines += ["Cost (CPU time timed as in the table above; x one shot: the 4-step row's CPU-s per image over one "
              "shot's, on these images).", "",
              "| row | mean samples / image | CPU-ms / sample | CPU-s / image | x one shot |",
              "|---|---:|---:|---:|---:|"]
    measured = (("f_D_ddpm", one_shot_seconds), ("f_D_ddpm_k4", per_sample))
    rows = [(name, statistics.mean(samples(pair[name])), seconds) for name, seconds in measured]
    one_shot_cost = rows[0][1] * rows[0][2]
    lines += [f"| {name} | {mean:,.0f} | {seconds * 1e3:.3f} | {mean * seconds:.2f} | "
              f"{mean * seconds / one_shot_cost:.2f} |" for name, mean, seconds in rows]
    return lines


def scope_of(count: int, total: int) -> str:
    """Which images the table holds: all of certify.sh's, or those every row has so far."""
    return (f"all {count} test images of certify.sh (every 50th)" if count == total else
            f"the {count} of the {total} images (every 50th) that every row has certified so far (f o D_ddpm's "
            "run is not finished); every row restricted to them")


def accuracy_lines(certify: dict[str, Results], scope: str) -> list[str]:
    """The `--accuracy` output: the table with intervals and one sentence per comparison with f_D_ddpm."""
    lines = [f"Fashion-MNIST, sigma = {SIGMA}, {scope}; sequential test, n0 = 100, alpha = 0.001, seed 0. Certified "
             "accuracy (%) with its 95% Clopper-Pearson interval, ACR and abstentions; then each row against f_D_ddpm "
             "on the same images (the per-radius tables: results/diffusion-fmnist/certify/table.md).", ""]
    lines.append(accuracy_table(certify))
    lines += ["", *(describe_comparison(comparison) for comparison in compare_to_first(certify, list(RADII)))]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accuracy", action="store_true", help="print the accuracy table only (no timing)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    files = {name: HERE / f"{name}_s{SIGMA}.tsv" for name in ROWS}
    loaded = {name: load_results(path) for name, path in files.items()}
    keep = set.intersection(*({int(i) for i in results.idx} for results in loaded.values()))
    total = max(len(results) for results in loaded.values())
    certify = {name: results.restricted(keep) for name, results in loaded.items()}
    scope = scope_of(len(keep), total)
    if args.accuracy:
        print("\n".join(accuracy_lines(certify, scope)))
        return
    lines = [f"Fashion-MNIST, sigma = {SIGMA}, {scope}; sequential test (`certify --mode sequential`: the "
             "default alpha-spending grid schedule, looks 1,024 ... 111,616, adaptive class selection), n0 = 100, "
             "alpha = 0.001, seed 0. Made by `experiments/diffusion-fmnist/summarize.py` from the TSVs beside "
             "this file (`experiments/diffusion-fmnist/certify.sh`).", "",
             "| row | what it is |", "|---|---|"]
    lines += [f"| {name} | {what} |" for name, (what, *_rest) in ROWS.items()]
    lines += ["", "Certified accuracy (%) with its 95% Clopper-Pearson interval, ACR and abstentions; then each row "
              "against f_D_ddpm on the same images.", ""]
    lines += [accuracy_table(certify) + paired_text(certify, list(RADII)).rstrip(), ""]

    lines += ["What a certificate cost. Noise samples per image: selection and estimation (each is one forward pass "
              "of the classifier, and of the denoiser when there is one). CPU-s per sample: one forward through the "
              "certified model at batch 256 on one thread, measured by this script on this machine. CPU-s per "
              "image: their product (mean samples x CPU-s per sample).", "",
              "| row | mean samples / image | median | max | CPU-ms / sample | CPU-s / image | x f |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    costs = {}
    for name, (_, checkpoint, denoiser, _) in ROWS.items():
        drawn = samples(certify[name])
        per_sample = seconds_per_sample(checkpoint, denoiser)
        costs[name] = (statistics.mean(drawn), statistics.median(drawn), max(drawn), per_sample)
    base = costs["f"][0] * costs["f"][3]
    for name, (mean, median, most, per_sample) in costs.items():
        lines.append(f"| {name} | {mean:,.0f} | {median:,.0f} | {most:,} | {per_sample * 1e3:.3f} | "
                     f"{mean * per_sample:.2f} | {mean * per_sample / base:.1f} |")
    lines += ["", "Sequential against fixed n = 10,000 on the same images (results/denoised/, same seed): certified "
              "accuracy (%) at each radius and the mean samples per image (fixed: n0 + n = 10,100).", "",
              "| row | test | " + " | ".join(f"r = {r:g}" for r in RADII) + " | mean samples / image |",
              "|---|---|" + "---:|" * (len(RADII) + 1)]
    for name, (_, _, _, fixed) in ROWS.items():
        if fixed is None:
            continue
        for label, results, mean in (("sequential", certify[name], costs[name][0]),
                                     ("fixed n", load_results(ROOT / fixed).restricted(keep), 10_100)):
            assert results.radius is not None, f"{name}: a certify file has a radius column"
            accuracy = 100 * certified_accuracy(results.radius, results.correct, RADII)
            lines.append(f"| {name} | {label} | " + " | ".join(f"{a:.1f}" for a in accuracy) + f" | {mean:,.0f} |")
    lines += multi_step(loaded["f_D_ddpm"], costs["f_D_ddpm"][3])
    (HERE / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {HERE / 'table.md'}")


if __name__ == "__main__":
    main()
