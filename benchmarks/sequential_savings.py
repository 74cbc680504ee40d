"""Forward passes saved by sequential certification, and its table against fixed-n CERTIFY.

Reads certify TSVs written by `smoothadv certify` (fixed mode: Cohen's six columns; sequential
mode: also `samples`, the forward passes each row used, `n` before smoothadv 0.2) and prints, per
sequential file:

- the mean forward passes per image and the saving against fixed n (n0 + n per image, e.g. 100,100);
- the certified-accuracy table at the radii, for the sequential run and (with --fixed, on the
  images both files have) for the fixed-n run, with the largest difference in percentage points
  and the number of (image, radius) decisions on which the two differ.

    python benchmarks/sequential_savings.py --fixed-cost 100100 --radii 0 0.25 0.5 0.75 \\
        --sequential grid=seq_grid.tsv single=seq_r025.tsv --fixed fixed_100k.tsv

(`benchmarks/sequential_vs_fixed.py` makes the same comparison from recorded vote counts, without
running the model twice.)
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from smoothadv.errors import SmoothAdvError
from smoothadv.report import certified_by_image, certified_curve, load_results


def compare(args: argparse.Namespace) -> None:
    fixed = load_results(args.fixed) if args.fixed else None
    header = " | ".join(f"r={r:g}" for r in args.radii)
    print(f"| run | images | mean forward passes / image | fewer than fixed ({args.fixed_cost:,}) | {header} |")
    print("|---|---|---|---|" + "---|" * len(args.radii))
    for spec in args.sequential:
        name, sep, path = spec.partition("=")
        if not sep:
            raise SmoothAdvError(f"--sequential takes NAME=path, got {spec!r}")
        seq = load_results(path)
        if seq.samples is None:
            raise SmoothAdvError(f"{path} has no samples column (not a sequential certify TSV)")
        mean_n = float(np.mean(seq.samples))
        cells = " | ".join(f"{100 * a:.1f}" for a in certified_curve(seq, args.radii))
        print(f"| {name} | {len(seq)} | {mean_n:,.0f} | {args.fixed_cost / mean_n:.1f}x | {cells} |")
        if fixed is None:
            continue
        common = sorted(set(seq.idx.tolist()) & set(fixed.idx.tolist()))
        if not common:
            print(f"| {name}: no image in common with {args.fixed} | | | |")
            continue
        seq_common, fixed_common = seq.restricted(common), fixed.restricted(common)
        a = certified_curve(seq_common, args.radii)
        b = certified_curve(fixed_common, args.radii)
        decisions = int(np.sum(certified_by_image(seq_common, args.radii)
                               != certified_by_image(fixed_common, args.radii)))
        mean_c = float(np.mean(seq.samples[np.isin(seq.idx, common)]))
        print(f"| {name} on the {len(common)} fixed-n images | {len(common)} | {mean_c:,.0f} | "
              f"{args.fixed_cost / mean_c:.1f}x | " + " | ".join(f"{100 * v:.1f}" for v in a) + " |")
        print(f"| fixed n on the same images | {len(common)} | {args.fixed_cost:,} | 1x | "
              + " | ".join(f"{100 * v:.1f}" for v in b) + " |")
        print(f"| difference (pp), decisions differing | | max {100 * np.max(np.abs(a - b)):.1f} pp | "
              f"{decisions} of {len(common) * len(args.radii)} | " + " | ".join(
                  f"{100 * (x - y):+.1f}" for x, y in zip(a, b)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequential", nargs="+", required=True, help="NAME=path of sequential-mode TSVs")
    parser.add_argument("--fixed", default=None, help="fixed-mode TSV to compare tables with (common images)")
    parser.add_argument("--fixed-cost", type=int, default=100_100, help="forward passes per image of fixed n")
    parser.add_argument("--radii", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    try:
        compare(parser.parse_args())
    except SmoothAdvError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
