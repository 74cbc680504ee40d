#!/usr/bin/env bash
# Rebuild the comparison with the published LeNet Fashion-MNIST rows from the finished certify TSVs (all 500 images):
# table_s<sigma>.md and certified_s<sigma>.png, certified accuracy per radius with 95% Clopper-Pearson intervals
# over the 500 images, each measured row followed by the published one (a dagger marks published values outside
# the measured interval).   bash experiments/fmnist-lenet/table.sh
set -euo pipefail
cd "$(dirname "$0")/../../results/fmnist-lenet"  # the outputs go to results/fmnist-lenet/
recipes=../../configs/fashion_mnist
for sigma in 0.25 0.5; do
  args=() published=()
  for pair in "Gaussian:gaussian:cohen_gaussian" "Stability:stability:stability" "Consistency:consistency:consistency" \
              "SmoothAdv T2 m1:smoothadv_pgd_t2_m1_e1.0:smoothadv_pgd_t2_m1_e1.0"; do
    IFS=: read -r name method recipe <<< "$pair"
    tsv="certify/${method}_s${sigma}.tsv"
    [ -e "$tsv" ] && [ "$(($(wc -l < "$tsv") - 1))" -ge 500 ] || continue  # finished certifications only
    args+=("$name=$tsv")  # the inputs first, then the flags: argparse takes the inputs as one list
    published+=(--published "$name=$recipes/${recipe}_s${sigma}.toml")
  done
  [ ${#args[@]} -gt 0 ] || continue
  radii=(0 0.25 0.5 0.75 1); [ "$sigma" = 0.5 ] && radii=(0 0.25 0.5 0.75 1 1.25 1.5 2)  # to the first radius past the cap 3.81 sigma
  ${SMOOTHADV:-smoothadv} report "${args[@]}" "${published[@]}" --ci --radii "${radii[@]}" --out "table_s${sigma}.md" \
      --plot "certified_s${sigma}.png" --force
done
