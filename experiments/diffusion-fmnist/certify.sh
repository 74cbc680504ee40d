#!/usr/bin/env bash
# Diffusion denoised smoothing on Fashion-MNIST (Carlini et al., ICLR 2023) with the released DDPM of train.sh,
# certified with the sequential test beside the rows it is compared with, all on the same 200 test images (every
# 50th, as results/denoised/), sigma 0.25, n0 = 100, alpha = 0.001, seed 0, the default alpha-spending grid
# schedule (looks 1,024 ... 111,616, radii 0 ... 0.75, docs/sequential.md) and adaptive class selection:
#
#   f          the off-the-shelf classifier of results/denoised/ (fashion_cnn trained without noise), bare
#   f_D_mse    f behind the DnCNN trained with the MSE loss (results/denoised/runs/denoiser_mse)
#   f_D_stab   f behind the DnCNN trained with the stability loss (results/denoised/runs/denoiser_stability)
#   f_D_ddpm   f behind the DDPM, one-shot (results/diffusion-fmnist/ddpm/model)
#   f_D_ddpm_k4  f behind the DDPM's 4-step DDIM chain (--denoiser-steps 4), on 50 of the 200 images (every 200th
#              test image, those of trajectories.sh): 4 UNet passes per noise sample
#   gaussian   fashion_cnn trained with Gaussian noise (results/fashion-mnist/runs/gaussian_sigma0.25)
#   consistency  the best row of the LeNet table by ACR (results/fmnist-lenet/runs/consistency_s0.25)
#
#   bash experiments/diffusion-fmnist/certify.sh            # every row, then the table; re-running resumes
#   bash experiments/diffusion-fmnist/certify.sh f_D_ddpm   # one row (rows are independent: one core each)
#
# Cost: one UNet forward per noise sample for f_D_ddpm (about 200 images per CPU-second for this 1.11 M-parameter
# UNet, results/diffusion-fmnist/cost.txt); the other rows take minutes. MAX=2 OUT=/tmp/dds-smoke runs a smoke test.
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
SMOOTHADV=${SMOOTHADV:-.venv/bin/smoothadv}
OUT=${OUT:-results/diffusion-fmnist/certify}
SIGMA=0.25
CLEAN=results/denoised/runs/classifier_clean/checkpoint.pth.tar
DDPM=${MODEL:-results/diffusion-fmnist/ddpm/model}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"

certify() {  # row checkpoint [more flags]; SKIP and COUNT (the images: every SKIP-th, COUNT of them) from the caller
  local row=$1 checkpoint=$2; shift 2
  local out="$OUT/${row}_s$SIGMA.tsv" resume=()
  [ -e "$out" ] && resume=(--resume)
  nice "$SMOOTHADV" certify "$checkpoint" "$@" --sigma "$SIGMA" --mode sequential --selection adaptive --n0 100 \
    --alpha 0.001 --skip "${SKIP:-50}" --max "${MAX:-${COUNT:-200}}" --batch 256 --seed 0 --device cpu --no-progress \
    "${resume[@]}" --out "$out"
}

row() {
  case $1 in
    f) certify f "$CLEAN" ;;
    f_D_mse) certify f_D_mse "$CLEAN" --denoiser results/denoised/runs/denoiser_mse/denoiser.pth.tar ;;
    f_D_stab) certify f_D_stab "$CLEAN" --denoiser results/denoised/runs/denoiser_stability/denoiser.pth.tar ;;
    f_D_ddpm) certify f_D_ddpm "$CLEAN" --denoiser "$DDPM" ;;
    f_D_ddpm_k4) SKIP=200 COUNT=50 certify f_D_ddpm_k4 "$CLEAN" --denoiser "$DDPM" --denoiser-steps 4 ;;
    gaussian) certify gaussian results/fashion-mnist/runs/gaussian_sigma0.25/checkpoint.pth.tar ;;
    consistency) certify consistency results/fmnist-lenet/runs/consistency_s0.25/checkpoint.pth.tar ;;
    *) echo "certify.sh: unknown row '$1' (f, f_D_mse, f_D_stab, f_D_ddpm, f_D_ddpm_k4, gaussian, consistency)" >&2; exit 2 ;;
  esac
}

if [ $# -gt 0 ]; then
  for r in "$@"; do row "$r"; done
  exit 0
fi
for r in f f_D_mse f_D_stab gaussian consistency f_D_ddpm f_D_ddpm_k4; do row "$r"; done
[ -n "${MAX:-}" ] && exit 0
"$SMOOTHADV" report "f_D_ddpm=$OUT/f_D_ddpm_s$SIGMA.tsv" "f_D_mse=$OUT/f_D_mse_s$SIGMA.tsv" \
  "f_D_stab=$OUT/f_D_stab_s$SIGMA.tsv" "f=$OUT/f_s$SIGMA.tsv" "gaussian=$OUT/gaussian_s$SIGMA.tsv" \
  "consistency=$OUT/consistency_s$SIGMA.tsv" --ci --paired --radii 0 0.25 0.5 0.75 --out "$OUT/table_s$SIGMA.md"
echo "done: $OUT/table_s$SIGMA.md"
