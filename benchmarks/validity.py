"""The statistical validity suite at full size (issue 7): invalid-certificate rates versus alpha.

Runs `smoothadv.validity.run_suite` (every certification mode: fixed-n CERTIFY, packed
certify_many, group-sequential CP with policies full/grid/tolerance and label mode, PREDICT, and
the unsound point-estimate control) on linear binary classifiers in 1, 16, 192 and 784 dimensions
at sigma 0.12-1.0 and on 3- and 5-class interval classifiers, each input placed where fixed-n
Clopper-Pearson is most likely to fail, and writes the table and the JSON:

    OMP_NUM_THREADS=1 python benchmarks/validity.py --trials 2000 --alpha 0.1 --n 100 --n0 10 \\
        --out results/reliability

(`smoothadv validity` is the same suite from the command line; this script adds the output files.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from smoothadv.files import atomic_write_text
from smoothadv.validity import format_summary, format_table, results_json, run_suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--n0", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="results/reliability", help="directory for validity_*.md/json")
    args = parser.parse_args()
    started = time.time()
    results = run_suite(trials=args.trials, alpha=args.alpha, n=args.n, n0=args.n0, seed=args.seed, quick=args.quick,
                        progress=lambda r: print(f"  {r.problem:<34} {r.mode:<40} {r.checked:>5}/{r.trials}",
                                                 file=sys.stderr, flush=True))
    text = format_table(results) + "\n\n" + format_summary(results) + f"\n\n({time.time() - started:.0f} s)\n"
    print(text)
    out = Path(args.out)
    stem = f"validity_alpha{args.alpha:g}_n{args.n}_n0{args.n0}_trials{args.trials}_seed{args.seed}"
    atomic_write_text(out / f"{stem}.md", text)
    atomic_write_text(out / f"{stem}.json", results_json(results) + "\n")
    print(f"wrote {out / stem}.md and .json")
    if not all(r.passed for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
