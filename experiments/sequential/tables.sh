#!/usr/bin/env bash
# Tables of sequential vs fixed n = 100,000 from the trajectories run_vs_fixed.sh records (no model needed).
set -euo pipefail
cd "$(dirname "$0")/../../results/sequential"  # the outputs go to results/sequential/
for kind in gaussian smoothadv; do
  for sigma in 0.25 0.5; do
    python ../../benchmarks/sequential_vs_fixed.py table "vs_fixed_${kind}_$sigma.jsonl" --sigma "$sigma"
    echo
  done
done
