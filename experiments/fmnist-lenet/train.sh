#!/usr/bin/env bash
# Train one method of the LeNet Fashion-MNIST table with its recipe configs/fashion_mnist/<method>_s<sigma>.toml
# (90 epochs, SGD lr 0.01 x0.1 every 30 epochs, batch 256, no normalization layer, no augmentation, seed 0; the
# method's published hyperparameters). Re-running resumes. One CPU thread per job.
#   bash experiments/fmnist-lenet/train.sh METHOD SIGMA      # METHOD: gaussian, stability, consistency, smoothadv_pgd_t2_m1_e1.0, ...
set -euo pipefail
cd "$(dirname "$0")/../../results/fmnist-lenet"  # the outputs go to results/fmnist-lenet/
method=$1 sigma=$2
shift 2
recipe=../../configs/fashion_mnist/${method}_s${sigma}.toml
[ "$method" = gaussian ] && recipe=../../configs/fashion_mnist/cohen_gaussian_s${sigma}.toml
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p runs logs
${SMOOTHADV:-smoothadv} train --config "$recipe" --seed 0 --device cpu --no-progress \
    --out "runs/${method}_s${sigma}" --resume "$@" >> "logs/${method}_s${sigma}.log" 2>&1
