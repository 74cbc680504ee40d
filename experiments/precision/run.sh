#!/usr/bin/env bash
# Mixed-precision training (train --precision) against fp32 on Fashion-MNIST, same seed and settings: noisy test
# accuracy after 3 epochs of Gaussian augmentation at sigma 0.25 (this CPU has no bf16 instructions; see README).
set -euo pipefail
cd "$(dirname "$0")/../../results/precision"  # the outputs go to results/precision/
export OMP_NUM_THREADS=1
for p in fp32 bf16; do
  smoothadv train --dataset fashion_mnist --sigma 0.25 --epochs 3 --lr-step 2 --eval-subset 10000 --device cpu \
    --precision "$p" --out "gaussian_$p" --no-progress --force
done
