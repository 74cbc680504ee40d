#!/usr/bin/env bash
# What the cheaper SmoothAdv attack plausibly costs. Our SmoothAdv row trains with PGD T = 2, m = 1; the
# published Fashion-MNIST row used T = 10, m = 4. Salman et al. ran both on CIFAR-10 (ResNet-110, eps = 255/256,
# sigma = 0.25 and 0.5, 150 epochs) and released per-image certification logs on the same 500 test images (every
# 20th), so paired tests against T10 m4 separate the two knobs there: T (T2 m4) and m (T10 m1), and both (T2 m1).
# T at m = 1 (T2 m1 against T10 m1) is read from the rows only, not tested. Their logs are not part of this
# repository: pass a checkout of
# https://github.com/Hadisalman/smoothing-adversarial (its data/certify/cifar10/ folders).
#   bash experiments/fmnist-lenet/attack_cost.sh PATH/TO/smoothing-adversarial    # writes attack_cost.md
set -euo pipefail
[ $# -eq 1 ] && [ -d "$1/data/certify/cifar10" ] || {
  echo "attack_cost.sh: give one argument, a checkout of Hadisalman/smoothing-adversarial (with data/certify/cifar10/)" >&2
  exit 2; }
salman=$(cd "$1" && pwd)
cd "$(dirname "$0")/../../results/fmnist-lenet"  # the outputs go to results/fmnist-lenet/
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for sigma in 0.25 0.50; do
  radii=(0 0.25 0.5 0.75); [ "$sigma" = 0.50 ] && radii=(0 0.25 0.5 0.75 1 1.25 1.5)
  args=()
  for pair in "T10 m4:PGD_10steps_multiNoiseSamples/4-multitrain" "T2 m4:PGD_2steps_multiNoiseSamples/4-multitrain" \
              "T10 m1:PGD_10steps" "T2 m1:PGD_2steps"; do
    IFS=: read -r name config <<< "$pair"
    log="$salman/data/certify/cifar10/$config/eps_255/cifar10/resnet110/noise_$sigma/test/sigma_$sigma"
    [ -e "$log" ] || { echo "attack_cost.sh: no log $log" >&2; exit 2; }
    args+=("$name=$log")
  done
  { echo "## CIFAR-10, ResNet-110, SmoothAdv PGD, eps = 255/256, sigma = $sigma: Salman et al.'s logs, 500 images"; echo
    ${SMOOTHADV:-smoothadv} report "${args[@]}" --ci --paired --radii "${radii[@]}"; echo; } >> "$tmp/out.md"
done
sed "s|$salman/||g" "$tmp/out.md" > attack_cost.md
echo "wrote attack_cost.md"
