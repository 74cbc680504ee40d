#!/usr/bin/env bash
# Sequential vs fixed n = 100,000 on the four Fashion-MNIST models, 500 test images each (every 20th), on the same
# noise (benchmarks/sequential_vs_fixed.py). Usage: ./run_vs_fixed.sh 0.25 (or 0.5); both can run at once, one core
# each. Rounds of 100 images per model, so a stopped run leaves a uniform subsample; rerunning resumes. Run it with
# smoothadv's environment active (`. .venv/bin/activate`) and the checkpoints of experiments/fashion-mnist/run.sh.
set -euo pipefail
cd "$(dirname "$0")/../../results/sequential"  # the outputs go to results/sequential/
export OMP_NUM_THREADS=1
sigma=$1
runs=../fashion-mnist/runs
for max in 100 200 300 400 500; do
  for kind in gaussian smoothadv; do
    python ../../benchmarks/sequential_vs_fixed.py sample "$runs/${kind}_sigma$sigma/checkpoint.pth.tar" \
      --sigma "$sigma" --skip 20 --max "$max" --batch 256 --channels-last --out "vs_fixed_${kind}_$sigma.jsonl"
  done
done
