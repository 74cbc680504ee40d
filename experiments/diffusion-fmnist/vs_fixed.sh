#!/usr/bin/env bash
# What a DDS certificate costs, fixed n = 100,000 against the sequential tests, replayed without the model from the
# vote counts trajectories.sh records (benchmarks/sequential_vs_fixed.py, as results/sequential/ does):
#
#   1. `selection`: the selection votes of each recorded image every 16 samples (100 UNet passes per image, from the
#      same selection stream; refused unless they end at the recorded votes), for the adaptive selection rule;
#   2. `table` -> results/diffusion-fmnist/vs_fixed.md: fixed n and every replayed policy on the same noise, their
#      forward passes per image (one UNet pass each) and the largest difference between their tables;
#   3. `summary` (appended): each policy's saving against its share of the clairvoyant and Wald bounds, and CPU-s
#      per image at MS_PER_PASS CPU-ms per forward pass (f o D_ddpm's 8.406, measured by summarize.py on one
#      thread at batch 256: the cost table of results/diffusion-fmnist/certify/table.md);
#   4. `where` (appended): which images the grid and single-radius policies spend their samples on;
#   5. `check` (appended): the rows certify.sh wrote for f_D_ddpm (the CLI's sequential test, grid schedule,
#      adaptive selection) equal the replay of that policy on every image both files hold.
#
#   bash experiments/diffusion-fmnist/vs_fixed.sh    # from the repository root, on the images recorded so far
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
PYTHON=${PYTHON:-.venv/bin/python}
HERE=results/diffusion-fmnist
TRAJECTORIES=$HERE/trajectories_s0.25.jsonl
BENCH=benchmarks/sequential_vs_fixed.py
MS_PER_PASS=${MS_PER_PASS:-8.406}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
nice "$PYTHON" "$BENCH" selection "$TRAJECTORIES" results/denoised/runs/classifier_clean/checkpoint.pth.tar \
  --denoiser "${MODEL:-$HERE/ddpm/model}" --sigma 0.25 --out "$HERE/selection_votes_of_trajectories_s0.25.jsonl"
{
  echo "<!-- bash experiments/diffusion-fmnist/vs_fixed.sh (benchmarks/sequential_vs_fixed.py table, summary, where, check) -->"
  echo
  "$PYTHON" "$BENCH" table "$TRAJECTORIES" --sigma 0.25
  echo
  "$PYTHON" "$BENCH" summary "$TRAJECTORIES:0.25" --policies "grid" "grid, adaptive selection" "betting grid" \
    "radius 0.5" "radius 0.5, adaptive selection" "betting radius 0.5" --ms-per-pass "$MS_PER_PASS"
  echo
  "$PYTHON" "$BENCH" where "$TRAJECTORIES" --sigma 0.25 --policies "grid" "radius 0.5"
  echo
  "$PYTHON" "$BENCH" check "$TRAJECTORIES" --tsv "$HERE/certify/f_D_ddpm_s0.25.tsv" --policy "grid, adaptive selection" \
    --sigma 0.25
} > "$HERE/vs_fixed.md"
echo "wrote $HERE/vs_fixed.md"
