"""Forward passes saved by sequential certification, and its table against fixed-n CERTIFY.

Reads certify TSVs written by `smoothadv certify` (fixed mode: Cohen's six columns; sequential
mode: also `n`, the forward passes used per row) and prints, per sequential file:

- the mean forward passes per image and the saving against fixed n (n0 + n per image, e.g. 100,100);
- the certified-accuracy table at the radii, for the sequential run and (with --fixed, on the
  images both files have) for the fixed-n run, with the largest difference in percentage points
  and the number of (image, radius) decisions on which the two differ.

    python benchmarks/sequential_savings.py --fixed-cost 100100 --radii 0 0.25 0.5 0.75 \\
        --sequential grid=seq_grid.tsv single=seq_r025.tsv --fixed fixed_100k.tsv
"""

from __future__ import annotations

import argparse
import csv

import numpy as np

from smoothadv.stats import certified_accuracy


def read(path: str) -> dict[int, dict[str, str]]:
    with open(path, newline="") as handle:
        return {int(row["idx"]): row for row in csv.DictReader(handle, delimiter="\t")}


def samples(row: dict[str, str]) -> int:
    """Samples an image used: the `samples` column (`n` before smoothadv 0.2)."""
    return int(row["samples"] if "samples" in row else row["n"])


def table(rows: list[dict[str, str]], radii: list[float]) -> np.ndarray:
    radius = [float(r["radius"]) for r in rows]
    correct = [int(r["correct"]) for r in rows]
    return certified_accuracy(radius, correct, radii)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequential", nargs="+", required=True, help="NAME=path of sequential-mode TSVs")
    parser.add_argument("--fixed", default=None, help="fixed-mode TSV to compare tables with (common images)")
    parser.add_argument("--fixed-cost", type=int, default=100_100, help="forward passes per image of fixed n")
    parser.add_argument("--radii", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    args = parser.parse_args()
    fixed = read(args.fixed) if args.fixed else None
    header = " | ".join(f"r={r:g}" for r in args.radii)
    print(f"| run | images | mean forward passes / image | fewer than fixed ({args.fixed_cost:,}) | {header} |")
    print("|---|---|---|---|" + "---|" * len(args.radii))
    for spec in args.sequential:
        name, path = spec.split("=", 1)
        seq = read(path)
        mean_n = float(np.mean([samples(r) for r in seq.values()]))
        acc = table(list(seq.values()), args.radii)
        cells = " | ".join(f"{100 * a:.1f}" for a in acc)
        print(f"| {name} | {len(seq)} | {mean_n:,.0f} | {args.fixed_cost / mean_n:.1f}x | {cells} |")
        if fixed is not None:
            common = sorted(set(seq) & set(fixed))
            if not common:
                print(f"| {name}: no image in common with {args.fixed} | | | |")
                continue
            a = table([seq[i] for i in common], args.radii)
            b = table([fixed[i] for i in common], args.radii)
            decisions = sum(
                (int(seq[i]["correct"]) and float(seq[i]["radius"]) >= r)
                != (int(fixed[i]["correct"]) and float(fixed[i]["radius"]) >= r)
                for i in common for r in args.radii)
            mean_c = float(np.mean([samples(seq[i]) for i in common]))
            print(f"| {name} on the {len(common)} fixed-n images | {len(common)} | {mean_c:,.0f} | "
                  f"{args.fixed_cost / mean_c:.1f}x | " + " | ".join(f"{100 * v:.1f}" for v in a) + " |")
            print(f"| fixed n on the same images | {len(common)} | {args.fixed_cost:,} | 1x | "
                  + " | ".join(f"{100 * v:.1f}" for v in b) + " |")
            print(f"| difference (pp), decisions differing | | max {100 * np.max(np.abs(a - b)):.1f} pp | "
                  f"{decisions} of {len(common) * len(args.radii)} | " + " | ".join(
                      f"{100 * (x - y):+.1f}" for x, y in zip(a, b)) + " |")


if __name__ == "__main__":
    main()
