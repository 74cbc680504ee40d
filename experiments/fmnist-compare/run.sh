#!/usr/bin/env bash
# All methods on equal terms: Fashion-MNIST, LeNet, sigma = 0.25, the same epochs and learning-rate
# schedule for every method, each method's published hyperparameters otherwise (its recipe
# configs/fashion_mnist/<method>_s0.25.toml), seed 0, certified on the same 500 test images.
#
#   bash experiments/fmnist-compare/run.sh     # smoothadv installed; re-running continues where it stopped
#
# The budget (docs/compute.md): EPOCHS = 3 epochs
# (the published 90 with drops every 30, scaled by 1/30: --lr-step 1, so lr 0.01, 0.001, 0.0001), the warm-ups
# of SmoothAdv and SmoothMix scaled from 10 of 90 epochs to 1 (full strength from the first epoch), MACER's
# deferred start scaled from epoch 30 to epoch 1 (the first epoch at the dropped rate, as in the recipe).
# CAT-RS trains toward the smoothed prediction of a Gaussian prior model (catrs_prior_gaussian_s0.25.toml)
# trained on the same budget, computed with N_PI = 100 noisy copies per training image (published: 10,000).
#
# Steps, cheap methods first; each one is skipped when its output is complete, and an interrupted one resumes
# (train --resume, smooth-prediction --resume, certify --resume):
#   train runs/<method>  ->  certify <method>.tsv  (500 test images: --skip 20; n0 = 100, n = 100,000,
#   alpha = 0.001, --mode sequential with its default alpha-spending grid schedule: looks 1024, 2048, ... and
#   the grid policy settling r = 0, 0.25, 0.5, 0.75; the class from all n0 samples, --selection fixed), then
#   table.sh (the table and the plot).
# logs/<step>.log holds each step's output; logs/cpu.tsv one line per step run: name, user and system
# CPU-seconds, wall seconds.
#
# Variables (for a quick check of the script, not for the published run): OUT (output folder, default
# results/fmnist-compare/), EPOCHS, TRAIN_SUBSET (train on the first N images), CERTIFY_MAX (certify at most this
# many of the 500 images), N_PI, N (certification samples). ONLY="macer catrs ..." runs only the named methods
# (catrs with its prior and pi), for example to split the comparison over two cores or machines sharing this folder.
#
# SIGMA=0.5 runs the same comparison at sigma = 0.5 (the <method>_s0.5.toml recipes, certified at sigma 0.5, the
# table at r = 0 ... 1.5) into s0.5/ (or OUT). CAT-RS's pi comes from the sigma = 0.25 Gaussian prior at every
# sigma, as published (catrs_s0.5.toml), so it reuses this folder's runs/catrs_prior when OUT is not given.
set -euo pipefail

main() {
    local scripts here
    scripts=$(cd "$(dirname "$0")" && pwd)
    local repo=$scripts/../..
    here=$(cd "$repo/results/fmnist-compare" && pwd)  # the outputs go to results/fmnist-compare/
    SMOOTHADV=${SMOOTHADV:-smoothadv}
    SIGMA=${SIGMA:-0.25}
    local prior=runs/catrs_prior
    if [ "$SIGMA" != 0.25 ] && [ -z "${OUT:-}" ]; then
        OUT=$here/s$SIGMA
        prior=$here/runs/catrs_prior
    fi
    OUT=${OUT:-$here}
    export OUT SIGMA  # table.sh reads both
    EPOCHS=${EPOCHS:-3}
    local step=$((EPOCHS / 3 > 0 ? EPOCHS / 3 : 1))
    N_PI=${N_PI:-100}
    N=${N:-100000}
    export OMP_NUM_THREADS=1
    mkdir -p "$OUT/runs" "$OUT/logs"
    cd "$OUT"
    local subset=()
    [ -n "${TRAIN_SUBSET:-}" ] && subset=(--train-subset "$TRAIN_SUBSET")
    local certify_max=()
    [ -n "${CERTIFY_MAX:-}" ] && certify_max=(--max "$CERTIFY_MAX")
    # the budget, the same for every method (flags given after --config win over the recipe)
    TRAIN=(--epochs "$EPOCHS" --lr-step "$step" --seed 0 --device cpu --no-progress "${subset[@]}")
    # --selection fixed: the class from all n0 = 100 selection samples (Cohen's rule, the one every method of the
    # comparison was certified with; the sequential test's default became the adaptive rule meanwhile)
    CERTIFY=(--sigma "$SIGMA" --n0 100 --n "$N" --alpha 0.001 --batch 1000 --skip 20 --mode sequential --selection fixed
             --seed 0 --device cpu --no-progress "${certify_max[@]}")
    local pi=$prior/smooth_prediction_train.tsv

    method gaussian cohen_gaussian
    method stability stability
    method consistency consistency
    method smoothadv smoothadv_pgd_t2_m1_e1.0 --warmup 1
    method smoothmix smoothmix --warmup 1
    wanted catrs && SIGMA=0.25 train "$prior" catrs_prior_gaussian
    if wanted catrs && ! complete "$pi" 60000 "${TRAIN_SUBSET:-}"; then
        run smooth_prediction "$SMOOTHADV" smooth-prediction "$prior/checkpoint.pth.tar" --sigma 0.25 \
            --n "$N_PI" --split train --batch 1000 --seed 0 --device cpu --no-progress --resume \
            ${TRAIN_SUBSET:+--max "$TRAIN_SUBSET"} --out "$pi"
    fi
    method catrs catrs --smoothed-prediction "$pi"
    method macer macer --deferred "$step"
    method consistency_adv consistency_adv --warmup 1
    [ -n "${ONLY:-}" ] || run table bash "$scripts/table.sh"
    echo "$(date -u +%T) all done"
}

run() {  # run NAME COMMAND...: niced, "NAME user system wall" appended to logs/cpu.tsv, output to logs/NAME.log
    local name=$1
    shift
    echo "$(date -u +%T) $name"
    /usr/bin/time -a -o logs/cpu.tsv -f "$name	%U	%S	%e" nice "$@" >> "logs/$name.log" 2>&1
}

complete() {  # complete FILE ROWS [SUBSET]: the TSV exists with ROWS data rows (SUBSET rows if given)
    local rows=${3:-}
    rows=${rows:-$2}
    [ -f "$1" ] && [ "$(($(wc -l < "$1") - 1))" -ge "$rows" ]
}

wanted() {  # wanted NAME: NAME is among ONLY, or ONLY is unset
    [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]
}

train() {  # train NAME|DIR RECIPE [FLAGS...]: train runs/NAME (or DIR) with configs/fashion_mnist/RECIPE_s<SIGMA>.toml
    local name=$1 recipe=$2 dir=runs/$1
    shift 2
    [[ $name == */* ]] && { dir=$name; name=$(basename "$name"); }
    if ! complete "$dir/log.tsv" "$EPOCHS"; then
        run "train_$name" "$SMOOTHADV" train --config "$repo/configs/fashion_mnist/${recipe}_s${SIGMA}.toml" \
            "${TRAIN[@]}" "$@" --resume --out "$dir"
    fi
}

method() {  # method NAME RECIPE [FLAGS...]: train, then certify NAME.tsv
    local name=$1
    wanted "$name" || return 0
    train "$@"
    local images=$((10000 / 20))
    [ -n "${CERTIFY_MAX:-}" ] && images=$CERTIFY_MAX
    if ! complete "$name.tsv" "$images"; then
        run "certify_$name" "$SMOOTHADV" certify "runs/$name/checkpoint.pth.tar" "${CERTIFY[@]}" --resume \
            --out "$name.tsv"
    fi
}

main "$@"; exit $?
