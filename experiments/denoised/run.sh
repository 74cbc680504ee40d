#!/usr/bin/env bash
# Denoised smoothing on Fashion-MNIST (Salman et al., NeurIPS 2020): certify a classifier trained
# WITHOUT noise, bare and behind a denoiser, against a Gaussian-trained classifier (white-box reference).
#
#   bash experiments/denoised/run.sh        # from the repository root, smoothadv installed; re-running resumes
#
# 1. the "off-the-shelf" classifier: fashion_cnn trained on clean images (sigma 0), the recipe of the committed
#    Gaussian model (6 epochs, lr 0.1 stepped x0.1 every 2 epochs, batch 256, seed 0);
# 2. an MSE denoiser (dncnn_small, 5 conv x 16 channels) for sigma 0.25, no classifier involved (query access);
# 3. that denoiser fine-tuned with the stability objective through the frozen off-the-shelf classifier (full
#    access): the paper's MSE-then-stability recipe;
# 4. CERTIFY of clean f, f o D_mse, f o D_stab and the Gaussian-trained model (results/fashion-mnist/runs) on the same
#    200 test images (every 50th), n0 = 100, n = 10,000, alpha = 0.001, the same seed (so the same noise per image);
# 5. the table with 95% Clopper-Pearson intervals, the plot and the example images (summarize.py).
#
# Outputs: runs/*/ (checkpoints, log.tsv, args.json), {clean,mse,stability,gaussian}.tsv (+ .args.json with both
# files' SHA-256), logs/*.log, logs/cpu.tsv (user and system CPU seconds and wall seconds of each step), table.md,
# certified.png, examples.png.
set -euo pipefail
cd "$(dirname "$0")/../../results/denoised"  # the outputs go to results/denoised/
SMOOTHADV=${SMOOTHADV:-smoothadv}
PYTHON=${PYTHON:-python}
SIGMA=0.25
MSE_EPOCHS=${MSE_EPOCHS:-4}        # Adam 1e-3, x0.1 for the last epoch (the CPU budget: ~60 CPU-minutes in all)
STAB_EPOCHS=${STAB_EPOCHS:-2}      # Adam 1e-4 from the MSE denoiser
CERTIFY=(--sigma $SIGMA --n0 100 --n 10000 --alpha 0.001 --skip 50 --max 200 --batch 256 --seed 0 --device cpu
         --fold-bn --channels-last --no-progress --resume)
export OMP_NUM_THREADS=1
mkdir -p logs runs

step() {  # step NAME COMMAND...: run niced, append "NAME user system wall" to logs/cpu.tsv, log to logs/NAME.log
    local name=$1
    shift
    echo "$(date -u +%T) $name"
    /usr/bin/time -a -o logs/cpu.tsv -f "$name	%U	%S	%e" nice "$@" >> "logs/$name.log" 2>&1
}

CLASSIFIER=runs/classifier_clean/checkpoint.pth.tar
GAUSSIAN=../fashion-mnist/runs/gaussian_sigma0.25/checkpoint.pth.tar
step classifier_clean $SMOOTHADV train gaussian --dataset fashion_mnist --arch fashion_cnn --sigma 0 \
    --epochs 6 --lr 0.1 --lr-step 2 --batch 256 --seed 0 --device cpu --no-progress --resume --out runs/classifier_clean
step denoiser_mse $SMOOTHADV train-denoiser --dataset fashion_mnist --arch dncnn_small --sigma $SIGMA --objective mse \
    --epochs "$MSE_EPOCHS" --lr 1e-3 --lr-step $((MSE_EPOCHS - 1)) --batch 256 --seed 0 --device cpu \
    --eval-classifier $CLASSIFIER --no-progress --resume --out runs/denoiser_mse
step denoiser_stability $SMOOTHADV train-denoiser --dataset fashion_mnist --arch dncnn_small --sigma $SIGMA \
    --objective stability --classifier $CLASSIFIER --init runs/denoiser_mse/denoiser.pth.tar \
    --epochs "$STAB_EPOCHS" --lr 1e-4 --lr-step 100 --batch 256 --seed 1 --device cpu --no-progress --resume \
    --out runs/denoiser_stability
step certify_clean $SMOOTHADV certify $CLASSIFIER "${CERTIFY[@]}" --out clean.tsv
step certify_gaussian $SMOOTHADV certify $GAUSSIAN "${CERTIFY[@]}" --out gaussian.tsv
step certify_mse $SMOOTHADV certify $CLASSIFIER --denoiser runs/denoiser_mse/denoiser.pth.tar "${CERTIFY[@]}" \
    --out mse.tsv
step certify_stability $SMOOTHADV certify $CLASSIFIER --denoiser runs/denoiser_stability/denoiser.pth.tar \
    "${CERTIFY[@]}" --out stability.tsv
$PYTHON summarize.py
echo "$(date -u +%T) all done"
