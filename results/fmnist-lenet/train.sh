#!/usr/bin/env bash
# The LeNet Fashion-MNIST recipe of the CAT-RS authors' logs (issue 14): 90 epochs, SGD lr 0.01 (x0.1 every 30
# epochs), batch 256, momentum 0.9, weight decay 1e-4, no normalization layer, no augmentation, seed 0.
# Usage (from the repository root, smoothadv installed; one CPU thread per job; re-running resumes):
#   bash results/fmnist-lenet/train.sh METHOD SIGMA [extra train flags]
set -euo pipefail
cd "$(dirname "$0")"
method=$1 sigma=$2
shift 2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p runs logs
${SMOOTHADV:-smoothadv} train --dataset fashion_mnist --arch lenet --normalization none --objective "$method" \
    --sigma "$sigma" --epochs 90 --lr 0.01 --lr-step 30 --batch 256 --seed 0 --device cpu --no-progress \
    --out "runs/${method}_s${sigma}" --resume "$@" >> "logs/${method}_s${sigma}.log" 2>&1
