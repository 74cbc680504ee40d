#!/usr/bin/env bash
# What a DDS certificate costs at fixed n = 100,000 against the sequential tests, on the same noise: record the vote
# counts along each image's estimation stream (benchmarks/sequential_vs_fixed.py sample) for f o D_ddpm on 50 of the
# 200 images of certify.sh (every 200th test image), so that fixed-n CERTIFY and every sequential policy are replayed
# from them without the model (`sequential_vs_fixed.py table / summary / check`, as results/sequential/ does).
#
#   bash experiments/diffusion-fmnist/trajectories.sh      # from the repository root; re-running resumes
#
# Cost: at least 100,100 UNet passes per image (more for an image a replayed policy has not settled by then, up to
# 131,072), about 5 million for 50 images: about 9 CPU-hours on one thread at the DDPM's ~150 samples per CPU-second.
# GROUP images are sampled together and written together (2: a record every two images).
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-results/diffusion-fmnist/trajectories_s0.25.jsonl}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
nice "$PYTHON" benchmarks/sequential_vs_fixed.py sample results/denoised/runs/classifier_clean/checkpoint.pth.tar \
  --denoiser "${MODEL:-results/diffusion-fmnist/ddpm/model}" --sigma 0.25 --skip 200 --max "${MAX:-50}" --n0 100 \
  --batch 256 --group "${GROUP:-2}" --seed 0 --out "$OUT"
