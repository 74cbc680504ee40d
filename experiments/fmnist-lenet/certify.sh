#!/usr/bin/env bash
# Certify one trained model of the LeNet Fashion-MNIST table: every 20th test image (500), n0 = 100,
# n = 100,000, alpha = 0.001, with the sequential test (--mode sequential: the default alpha-spending schedule
# and the standard-radii grid policy, measured within 0.4 pp of fixed n in results/sequential/; adaptive class
# selection, pinned so that every method of the table is certified alike). Re-running resumes.
#   bash experiments/fmnist-lenet/certify.sh METHOD SIGMA     # after train.sh METHOD SIGMA has finished its 90 epochs
# To use k cores, run k jobs SHARD=0/k ... SHARD=k-1/k (each writes certify/M_sS.tsv.shard-i-of-k and resumes
# alike), then `smoothadv merge results/fmnist-lenet/certify/M_sS.tsv`. Rows do not depend on sharding: each
# image draws its noise from its own seeded generator, so the merged file is the one a single job writes.
set -euo pipefail
cd "$(dirname "$0")/../../results/fmnist-lenet"  # the outputs go to results/fmnist-lenet/
method=$1 sigma=$2
run="runs/${method}_s${sigma}"
out="certify/${method}_s${sigma}.tsv"
epochs=$(($(wc -l < "$run/log.tsv") - 1))
[ "$epochs" -ge 90 ] || { echo "certify.sh: $run has $epochs of 90 epochs; finish it with train.sh first" >&2; exit 2; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p certify logs
shard=() suffix=
if [ -n "${SHARD:-}" ]; then shard=(--shard "$SHARD") suffix=".shard-${SHARD%/*}-of-${SHARD#*/}"; fi
written="$out$suffix" log="logs/certify_${method}_s${sigma}$suffix.log"
resume=(); [ -e "$written" ] && resume=(--resume)
${SMOOTHADV:-smoothadv} certify "$run/checkpoint.pth.tar" --sigma "$sigma" --out "$out" --skip 20 --n0 100 --n 100000 \
    --alpha 0.001 --mode sequential --selection adaptive --batch 1000 --seed 0 --device cpu --no-progress \
    "${shard[@]}" "${resume[@]}" >> "$log" 2>&1
