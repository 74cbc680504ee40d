#!/usr/bin/env bash
# The published rows on the same 500 test images as ours. The CAT-RS authors' per-image certification logs
# cover all 10,000 test images; restricted to every 20th image (idx % 20 == 0, our --skip 20) they tell how much of a
# difference from the published 10,000-image row comes from which images were drawn, and the paired test (same
# images, their model against ours) tells whether the models differ. Their logs are not part of this repository:
# pass a checkout of https://github.com/alinlab/smoothing-catrs (its data/fmnist/noise_<sigma>/<method>/ folders).
#   bash experiments/fmnist-lenet/same_images.sh PATH/TO/smoothing-catrs    # writes same_images_s<sigma>.md
set -euo pipefail
[ $# -eq 1 ] && [ -d "$1/data/fmnist" ] || {
  echo "same_images.sh: give one argument, a checkout of alinlab/smoothing-catrs (with data/fmnist/)" >&2; exit 2; }
catrs=$(cd "$1" && pwd)
cd "$(dirname "$0")/../../results/fmnist-lenet"  # the outputs go to results/fmnist-lenet/
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for sigma in 0.25 0.5; do
  radii=(0 0.25 0.5 0.75 1); [ "$sigma" = 0.5 ] && radii=(0 0.25 0.5 0.75 1 1.25 1.5 2)
  out="same_images_s${sigma}.md"
  : > "$tmp/out.md"
  for pair in "Gaussian:gaussian:cohen" "Stability:stability:stab" "Consistency:consistency:consistency" \
              "SmoothAdv T2 m1:smoothadv_pgd_t2_m1_e1.0:salman"; do
    IFS=: read -r name method theirs <<< "$pair"
    ours="certify/${method}_s${sigma}.tsv"
    [ -e "$ours" ] && [ "$(($(wc -l < "$ours") - 1))" -ge 500 ] || continue
    log=$(find "$catrs/data/fmnist/noise_${sigma}/$theirs" -name '*.tsv' 2> /dev/null | head -n 1)
    [ -n "$log" ] || { echo "same_images.sh: no log for $theirs at sigma $sigma under $catrs" >&2; exit 2; }
    awk -F'\t' 'NR == 1 || $1 % 20 == 0' "$log" > "$tmp/published.tsv"
    { echo "## $name, sigma = $sigma: published model (${log#"$catrs"/}) and ours on the same 500 images"; echo
      ${SMOOTHADV:-smoothadv} report "published=$tmp/published.tsv" "ours=$ours" --ci --paired --radii "${radii[@]}"
      echo
      echo "All 10,000 images of the published log:"; echo
      ${SMOOTHADV:-smoothadv} report "published=$log" --ci --radii "${radii[@]}"; echo; } >> "$tmp/out.md"
  done
  if [ -s "$tmp/out.md" ]; then sed "s|$tmp/||g" "$tmp/out.md" > "$out"; echo "wrote $out"; fi
done
