#!/usr/bin/env bash
# The table and the plot of the comparison (run.sh's last step; runs on whatever certify TSVs are complete):
# certified accuracy per radius with 95% Clopper-Pearson intervals over the 500 test images, ACR, abstentions
# (smoothadv report --ci), each method against Gaussian image by image (--paired: exact McNemar tests, Holm-adjusted
# over all radii and methods), and the training cost per method (cost.tsv: CPU-seconds per epoch measured by
# benchmarks/method_cost.py, and each method's cost model).
#   bash results/fmnist-compare/table.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "${OUT:-$here}"
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
"$SMOOTHADV" report "${inputs[@]}" --ci "${paired[@]}" --radii 0 0.25 0.5 0.75 "${cost[@]}" --out table.md \
    --plot certified.png --force
cat table.md
# Exploratory, chosen after seeing the comparisons with Gaussian: the other methods against Consistency, the cheapest
# method with supported gains at three radii (its own Holm family; vs_consistency.md)
others=()
for input in "${inputs[@]}"; do
    case $input in gaussian=*|consistency=*) ;; *) others+=("$input") ;; esac
done
if [[ " ${inputs[*]} " == *" consistency=consistency.tsv "* ]] && [ ${#others[@]} -gt 0 ]; then
    "$SMOOTHADV" report consistency=consistency.tsv "${others[@]}" --paired --radii 0 0.25 0.5 0.75 \
        --out vs_consistency.md --force
fi
