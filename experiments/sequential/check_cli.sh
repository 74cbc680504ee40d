#!/usr/bin/env bash
# End-to-end check on the real models: `smoothadv certify --mode sequential` (default grid policy; then the betting
# test, --test betting) on the first 10 images of the trajectory set, compared row by row (samples used, class,
# radius) with the replay of the recorded trajectories (benchmarks/sequential_vs_fixed.py check). The CLI's
# default class selection is adaptive: the replay reads the selection votes of selection_*.jsonl
# (adaptive_selection.md); SELECTION=fixed checks Cohen's n0 = 100 rule instead.
# Usage: ./check_cli.sh (after run_vs_fixed.sh); ./check_cli.sh betting runs only the betting test.
set -euo pipefail
cd "$(dirname "$0")/../../results/sequential"  # the outputs go to results/sequential/
export OMP_NUM_THREADS=1
runs=../fashion-mnist/runs
mkdir -p cli_check
tests=${1:-spending betting}
selection=${SELECTION:-adaptive}
suffix=""; [ "$selection" = adaptive ] && suffix=", adaptive selection"
for test in $tests; do
  for sigma in 0.25 0.5; do
    for kind in gaussian smoothadv; do
      if [ "$test" = spending ]; then out="cli_check/${kind}_$sigma"; policy=grid; else
        out="cli_check/${kind}_${sigma}_betting"; policy="betting grid"; fi
      [ "$selection" = adaptive ] && out="${out}_adaptive"
      out="$out.tsv"; policy="$policy$suffix"
      smoothadv certify "$runs/${kind}_sigma$sigma/checkpoint.pth.tar" --sigma "$sigma" --mode sequential \
        --test "$test" --selection "$selection" --skip 20 --max 10 --batch 256 --channels-last --seed 0 \
        --device cpu --no-progress --force --out "$out"
      python ../../benchmarks/sequential_vs_fixed.py check "vs_fixed_${kind}_$sigma.jsonl" --tsv "$out" \
        --sigma "$sigma" --policy "$policy"
    done
  done
done
