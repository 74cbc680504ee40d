#!/usr/bin/env bash
# Diffusion denoised smoothing on Fashion-MNIST (Carlini et al., ICLR 2023) with the released DDPM of train.sh:
# certify the off-the-shelf classifier of the denoised-smoothing experiment (fashion_cnn trained WITHOUT noise,
# results/denoised/runs/classifier_clean, a released model) behind the DDPM, on the same 200 test images (every
# 50th), with the same n0, n, alpha and seed as results/denoised/ (so the same noise per image), then report it
# beside that experiment's rows (bare f, f o D_mse, f o D_stab, the Gaussian-trained model), paired image by image.
#
#   bash experiments/diffusion-fmnist/certify.sh      # from the repository root; re-running resumes
#
# Cost: one UNet forward per noise sample (215 images per CPU-second for this 1.11 M-parameter UNet,
# results/diffusion-fmnist/cost.txt), so 200 images x 10,100 samples are about 2.6 CPU-hours on one thread.
# MAX=2 N=200 OUT=/tmp/dds-smoke runs a smoke test in seconds.
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
SMOOTHADV=${SMOOTHADV:-.venv/bin/smoothadv}
MODEL=${MODEL:-results/diffusion-fmnist/ddpm/model}  # the released DDPM (train.sh writes runs/diffusion-fmnist/model)
OUT=${OUT:-results/diffusion-fmnist}
SIGMA=${SIGMA:-0.25}
CLASSIFIER=results/denoised/runs/classifier_clean/checkpoint.pth.tar
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
nice "$SMOOTHADV" certify "$CLASSIFIER" --denoiser "$MODEL" --sigma "$SIGMA" --n0 100 --n "${N:-10000}" \
  --alpha 0.001 --skip 50 --max "${MAX:-200}" --batch 256 --seed 0 --device cpu --no-progress --resume \
  --out "$OUT/dds_s$SIGMA.tsv"
[ -z "${MAX:-}" ] && [ "$SIGMA" = 0.25 ] && "$SMOOTHADV" report f=results/denoised/clean.tsv \
  "f_D_ddpm=$OUT/dds_s$SIGMA.tsv" f_D_stab=results/denoised/stability.tsv gaussian_f=results/denoised/gaussian.tsv \
  --ci --paired --radii 0 0.25 0.5 0.75 --out "$OUT/table_s$SIGMA.md"
echo "done: $OUT/dds_s$SIGMA.tsv"
