#!/usr/bin/env bash
# A small DDPM on Fashion-MNIST for diffusion denoised smoothing (Carlini et al., ICLR 2023), on ONE CPU thread.
#
#   OMP_NUM_THREADS=1 nohup bash experiments/diffusion-fmnist/train.sh > runs/diffusion-fmnist.out 2>&1 &
#
# Re-running resumes: --resume is passed when the run directory exists (the run continues bit for bit from its
# last checkpoint, written every 200 steps and at each epoch end). The EMA model of the last finished epoch is
# in $RUN/model/ (diffusers' DDPMPipeline layout: unet/, scheduler/), loadable with smoothadv.diffusion.load_diffusion
# and usable as `smoothadv certify ... --denoiser $RUN/model`.
#
# Settings: UNet2DModel with channels 32/64/64, one ResNet block per level, attention at the 7x7 level and in the
# middle block (1.11 M parameters); Ho et al.'s DDPM (T = 1000, linear betas 1e-4..0.02, epsilon prediction,
# uniform t, MSE), AdamW lr 2e-4 (weight decay 0), 500 warm-up steps, gradient norm clipped at 1, EMA 0.999,
# batch 128, no flips, seed 0, 10 epochs (the released model, results/diffusion-fmnist/ddpm/; EPOCHS=20 with the
# run directory present extends it, as the learning rate is constant after the warm-up). Cost: about 12.5
# CPU-minutes per epoch in the released run (results/diffusion-fmnist/ddpm/log.tsv, cpu_seconds), so 10 epochs
# are about 2.1 CPU-hours (results/diffusion-fmnist/cost.txt measures 14.6 CPU-minutes per epoch in isolation).
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
PYTHON=${PYTHON:-.venv/bin/python}
RUN=${RUN:-runs/diffusion-fmnist}
EPOCHS=${EPOCHS:-10}
export OMP_NUM_THREADS=1  # one core: the other one is shared
resume=()
[ -d "$RUN" ] && resume=(--resume)
exec nice "$PYTHON" -m smoothadv train-diffusion --out "$RUN" --dataset fashion_mnist --epochs "$EPOCHS" \
  --batch 128 --lr 2e-4 --warmup-steps 500 --weight-decay 0 --grad-clip 1 --ema-decay 0.999 --seed 0 \
  --channels 32 64 64 --layers-per-block 1 --attention-levels 2 --norm-groups 8 \
  --timesteps 1000 --beta-start 1e-4 --beta-end 0.02 --save-every 200 --log-every 100 "${resume[@]}"
