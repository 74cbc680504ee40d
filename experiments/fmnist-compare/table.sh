#!/usr/bin/env bash
# The table and the plot of the comparison (run.sh's last step; runs on whatever certify TSVs are complete):
# certified accuracy per radius with 95% Clopper-Pearson intervals over the 500 test images, ACR, abstentions
# (smoothadv report --ci), each method against Gaussian image by image (--paired: exact McNemar tests, Holm-adjusted
# over all radii and methods), the training cost per method (cost.tsv: CPU-seconds per epoch measured by
# benchmarks/method_cost.py, and each method's cost model).
# The cost columns come from cost.tsv, measured at sigma = 0.25 (an epoch's cost does not depend on sigma).
#   bash experiments/fmnist-compare/table.sh
#   SIGMA=0.5 bash experiments/fmnist-compare/table.sh     # the sigma = 0.5 comparison in s0.5/ (r = 0 ... 1.5)
set -euo pipefail
scripts=$(cd "$(dirname "$0")" && pwd)
here=$(cd "$scripts/../../results/fmnist-compare" && pwd)  # the outputs go to results/fmnist-compare/
SIGMA=${SIGMA:-0.25}
out=${OUT:-$here}
[ "$SIGMA" != 0.25 ] && [ -z "${OUT:-}" ] && out=$here/s$SIGMA
cd "$out"
radii=(0 0.25 0.5 0.75)
[ "$SIGMA" = 0.5 ] && radii=(0 0.25 0.5 0.75 1.0 1.25 1.5)
[ "$SIGMA" = 1.0 ] && radii=(0 0.5 1.0 1.5 2.0 2.5 3.0)
SMOOTHADV=${SMOOTHADV:-smoothadv}
images=${CERTIFY_MAX:-500}
inputs=()
for name in gaussian stability consistency smoothadv smoothmix catrs macer consistency_adv; do
    if [ -f "$name.tsv" ] && [ "$(($(wc -l < "$name.tsv") - 1))" -ge "$images" ]; then
        inputs+=("$name=$name.tsv")
    fi
done
[ ${#inputs[@]} -gt 0 ] || { echo "no complete certify TSV yet"; exit 0; }
paired=()
[ ${#inputs[@]} -gt 1 ] && paired=(--paired)
cost=()
[ -f "$here/cost.tsv" ] && cost=(--cost "$here/cost.tsv")
"$SMOOTHADV" report "${inputs[@]}" --ci "${paired[@]}" --radii "${radii[@]}" "${cost[@]}" --out table.md \
    --plot certified.png --force
cat table.md
# Exploratory, chosen after seeing the comparisons with Gaussian: the other methods against Consistency, the cheapest
# method with supported gains at three radii (its own Holm family; vs_consistency.md)
others=()
for input in "${inputs[@]}"; do
    case $input in gaussian=*|consistency=*) ;; *) others+=("$input") ;; esac
done
if [[ " ${inputs[*]} " == *" consistency=consistency.tsv "* ]] && [ ${#others[@]} -gt 0 ]; then
    "$SMOOTHADV" report consistency=consistency.tsv "${others[@]}" --paired --radii "${radii[@]}" \
        --out vs_consistency.md --force
fi
# The distribution of the certified radius per method (radius_cdf.png), beside certified accuracy
if [ "$SIGMA" = 0.25 ] && [ -z "${OUT:-}" ]; then ${PYTHON:-python} "$scripts/radius_cdf.py"; fi
