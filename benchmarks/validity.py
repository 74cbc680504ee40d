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
from collections.abc import Callable
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


def search_worst(rate: Callable[[float], float], *, lo: float = 2e-5, hi: float = 0.45, grid: int = 48,
                 keep: int = 4, rounds: int = 2, points: int = 6,
                 log: Callable[[str], None] = lambda line: None) -> tuple[float, float, list[tuple[float, float]]]:
    """The largest value of `rate(p_A)` a documented search finds over p_A in [1 - hi, 1 - lo]: (p_A, rate, every
    (p_A, rate) evaluated).

    The search: a grid of `grid` values of 1 - p_A evenly spaced in log scale from `hi` down to `lo`; then, around
    each of the `keep` largest local maxima of the grid, `rounds` rounds of refinement, each evaluating `points`
    values evenly spaced (in log(1 - p_A)) between the best point's two neighbours so far and moving to the best.
    The exact failure probability is a sawtooth in p_A (it drops where p_A passes a count's lower confidence
    bound, and rises in between), so this finds a value at least as large as the grid's, not a proven supremum:
    its resolution is that of the last round around each maximum.
    """
    import math

    logs = [math.log(hi) + (math.log(lo) - math.log(hi)) * i / (grid - 1) for i in range(grid)]
    seen: dict[float, float] = {}

    def value(log_tail: float) -> float:
        if log_tail not in seen:
            seen[log_tail] = rate(1 - math.exp(log_tail))
            log(f"  p_A {1 - math.exp(log_tail):.7g}: {seen[log_tail]:.4e}")
        return seen[log_tail]

    values = [value(x) for x in logs]
    peaks = [i for i in range(grid) if (i == 0 or values[i] >= values[i - 1]) and
             (i == grid - 1 or values[i] >= values[i + 1])]
    for i in sorted(peaks, key=lambda j: values[j], reverse=True)[:keep]:
        left, best, right = logs[max(i - 1, 0)], logs[i], logs[min(i + 1, grid - 1)]
        for _ in range(rounds):
            candidates = [left + (right - left) * k / (points + 1) for k in range(1, points + 1)]
            ordered = sorted([left, *candidates, best, right])
            top = max(ordered, key=value)
            at = ordered.index(top)
            left, best, right = ordered[max(at - 1, 0)], top, ordered[min(at + 1, len(ordered) - 1)]
    worst = max(seen, key=lambda x: seen[x])
    evaluated = sorted((1 - math.exp(x), r) for x, r in seen.items())
    return 1 - math.exp(worst), seen[worst], evaluated


def papers_search(out: str, grid: int, keep: int, rounds: int, points: int) -> None:
    """`search_worst` of the exact failure probability at alpha = 0.001 (n0 = 100, policy full, Cohen's selection)
    of fixed n = 100,000 CERTIFY, of the default alpha-spending schedule and of the default betting test; writes
    results/reliability/validity_papers_scale_search_grid{grid}.md."""
    from scipy.stats import norm

    from smoothadv.betting import BettingConfig
    from smoothadv.sequential import SequentialConfig
    from smoothadv.validity import Problem, exact_betting_failure, exact_certify_failure, exact_sequential_failure

    config = SequentialConfig(0.5)
    betting = BettingConfig(0.5, policy="full", selection="fixed")

    def problem(p_a: float) -> Problem:
        return Problem("lin", (1, 1, 1), 0.5, (0.0,), 0.5 * float(norm.ppf(p_a)))

    modes: dict[str, Callable[[float], float]] = {
        "fixed n = 100,000": lambda p: exact_certify_failure(problem(p), 100, 100_000, 0.001),
        "sequential, default schedule (alpha spending)": lambda p: exact_sequential_failure(
            problem(p), 100, config.schedule.looks, 0.001, levels=config.schedule.levels, selection="fixed"),
        "betting, default": lambda p: exact_betting_failure(problem(p), 100, betting),
    }
    started = time.time()
    lines = ["| mode | largest found | at p_A | evaluations | alpha |", "|---|---|---|---|---|"]
    details = []
    for name, rate in modes.items():
        print(name, file=sys.stderr, flush=True)
        p_a, worst, evaluated = search_worst(rate, grid=grid, keep=keep, rounds=rounds, points=points,
                                             log=lambda line: print(line, file=sys.stderr, flush=True))
        lines.append(f"| {name} | {worst:.3e} | {p_a:.7g} | {len(evaluated)} | 0.001 |")
        details.append(f"\n{name}:\n\n| p_A | exact failure probability |\n|---|---|\n" +
                       "\n".join(f"| {p:.7g} | {r:.4e} |" for p, r in evaluated))
    text = (f"Search of the worst p_A (benchmarks/validity.py --papers-search --grid {grid} --keep {keep} --rounds "
            f"{rounds} --points {points}): a grid of {grid} values of 1 - p_A, log-spaced from 0.45 to 2e-5, then "
            f"{rounds} rounds of {points}-point refinement between the neighbours of each of the {keep} largest local "
            "maxima. Exact probabilities (no sampling) that the radius exceeds sigma Phi^-1(p_A), alpha = 0.001, "
            "n0 = 100, Cohen's selection, every look made; the largest value found, not a proven supremum.\n\n"
            + "\n".join(lines) + "\n" + "\n".join(details) + f"\n\n({time.time() - started:.0f} s)\n")
    print(text)
    atomic_write_text(Path(out) / f"validity_papers_scale_search_grid{grid}.md", text)


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
    parser.add_argument("--papers-search", action="store_true",
                        help="instead: search p_A for the largest exact failure probability at alpha = 0.001 of each "
                             "of those three (a grid, then refinement around its largest local maxima)")
    parser.add_argument("--grid", type=int, default=48, help="--papers-search: grid points (default: 48)")
    parser.add_argument("--keep", type=int, default=4, help="--papers-search: local maxima refined (default: 4)")
    parser.add_argument("--rounds", type=int, default=2, help="--papers-search: refinement rounds (default: 2)")
    parser.add_argument("--points", type=int, default=6, help="--papers-search: points per round (default: 6)")
    args = parser.parse_args()
    if args.papers_search:
        papers_search(args.out, args.grid, args.keep, args.rounds, args.points)
        return
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
