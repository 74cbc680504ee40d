"""The statistical validity suite at full size: invalid-certificate rates versus alpha.

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


def papers_scale(out: str) -> None:
    """Exact probability, at alpha = 0.001 with Cohen's n0 = 100 selection samples, that the certificate's radius
    exceeds sigma * Phi^-1(p_A) on a binary linear classifier, across p_A: fixed n = 100,000 CERTIFY, the grid
    policy's default sequential schedule with policy full (every look; the grid policy stops on a subset of
    them, so it fails at most as often), and the betting test (`--test betting`, default schedule, policy full),
    each also with adaptive class selection (16 votes when unanimous, else 100), with, beside them, the betting
    test with a factor-2 slip (wealth threshold 1 / (2 alpha)). Scale-free in sigma (0.5 here: looks up to
    111,616)."""
    from scipy.stats import norm

    from smoothadv.betting import BettingConfig
    from smoothadv.sequential import SequentialConfig
    from smoothadv.validity import Problem, exact_betting_failure, exact_certify_failure, exact_sequential_failure

    config = SequentialConfig(0.5)
    betting = BettingConfig(0.5, policy="full", selection="fixed")
    adaptive = BettingConfig(0.5, policy="full", selection="adaptive")
    slipped = BettingConfig(0.5, 0.002, policy="full", last=betting.schedule.last, selection="fixed")
    lines = ["| p_A | fixed n = 100,000 | sequential, default schedule (alpha spending) | the same, adaptive selection "
             "| betting, default | the same, adaptive selection | betting at 2 alpha (unsound) | alpha |",
             "|---|---|---|---|---|---|---|---|"]
    worst = [0.0] * 6
    for tail in (0.4, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5):
        problem = Problem("lin", (1, 1, 1), 0.5, (0.0,), 0.5 * float(norm.ppf(1 - tail)))
        rates = [exact_certify_failure(problem, 100, 100_000, 0.001),
                 *(exact_sequential_failure(problem, 100, config.schedule.looks, 0.001, levels=config.schedule.levels,
                                            selection=selection) for selection in ("fixed", "adaptive")),
                 exact_betting_failure(problem, 100, betting), exact_betting_failure(problem, 100, adaptive),
                 exact_betting_failure(problem, 100, slipped)]
        worst = [max(w, r) for w, r in zip(worst, rates)]
        lines.append(f"| {1 - tail:.5g} | " + " | ".join(f"{r:.2e}" for r in rates) + " | 0.001 |")
        print(lines[-1], file=sys.stderr, flush=True)
    text = ("looks " + ", ".join(f"{n:,}" for n in config.schedule.looks) + "; levels (x alpha) "
            + ", ".join(f"{v / 0.001:.4g}" for v in config.schedule.levels)
            + f"\nbetting: first draw {betting.first}, last {betting.schedule.last:,}, half of alpha on the final "
            + "look\n"
            + "selection: Cohen's (all n0 = 100 votes) unless marked; adaptive: 16 votes when unanimous, else 100\n\n"
            + "\n".join(lines)
            + f"\n\nlargest: fixed n {worst[0]:.2e}, sequential {worst[1]:.2e} (adaptive selection {worst[2]:.2e}), "
              f"betting {worst[3]:.2e} (adaptive selection {worst[4]:.2e}), betting at 2 alpha {worst[5]:.2e} "
              "(alpha = 0.001)\n")
    print(text)
    atomic_write_text(Path(out) / "validity_papers_scale.md", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--n0", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=None, help="only the modes whose name contains this (e.g. betting)")
    parser.add_argument("--out", default="results/reliability", help="directory for validity_*.md/json")
    parser.add_argument("--papers-scale", action="store_true",
                        help="instead: exact failure probabilities at alpha = 0.001 of fixed n = 100,000 CERTIFY, "
                             "of the default sequential schedule and of the betting test (no sampling)")
    args = parser.parse_args()
    if args.papers_scale:
        papers_scale(args.out)
        return
    started = time.time()
    results = run_suite(trials=args.trials, alpha=args.alpha, n=args.n, n0=args.n0, seed=args.seed, quick=args.quick,
                        only=args.only,
                        progress=lambda r: print(f"  {r.problem:<34} {r.mode:<40} {r.checked:>5}/{r.trials}",
                                                 file=sys.stderr, flush=True))
    text = format_table(results) + "\n\n" + format_summary(results) + f"\n\n({time.time() - started:.0f} s)\n"
    print(text)
    out = Path(args.out)
    stem = f"validity_alpha{args.alpha:g}_n{args.n}_n0{args.n0}_trials{args.trials}_seed{args.seed}" + (
        f"_{args.only}" if args.only else "")
    atomic_write_text(out / f"{stem}.md", text)
    atomic_write_text(out / f"{stem}.json", results_json(results) + "\n")
    print(f"wrote {out / stem}.md and .json")
    if not all(r.passed for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
