#!/usr/bin/env bash
# End-to-end check on the real models: `smoothadv certify --mode sequential` (default grid policy) on the first
# 10 images of the trajectory set, compared row by row (samples used, class, radius) with the replay of the
# recorded trajectories (benchmarks/sequential_vs_fixed.py check). Usage: ./check_cli.sh (after run_vs_fixed.sh).
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1
runs=../fashion-mnist/runs
mkdir -p cli_check
for sigma in 0.25 0.5; do
  for kind in gaussian smoothadv; do
    out="cli_check/${kind}_$sigma.tsv"
    smoothadv certify "$runs/${kind}_sigma$sigma/checkpoint.pth.tar" --sigma "$sigma" --mode sequential --skip 20 \
      --max 10 --batch 256 --channels-last --seed 0 --device cpu --no-progress --force --out "$out"
    python ../../benchmarks/sequential_vs_fixed.py check "vs_fixed_${kind}_$sigma.jsonl" --tsv "$out" --sigma "$sigma"
  done
done
