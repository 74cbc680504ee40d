#!/usr/bin/env bash
# What a DDS certificate costs at fixed n = 100,000 against the sequential tests, on the same noise: record the vote
# counts along each image's estimation stream (benchmarks/sequential_vs_fixed.py sample) for f o D_ddpm on 50 of the
# 200 images of certify.sh (every 200th test image), so that fixed-n CERTIFY and every sequential policy are replayed
# from them without the model (`sequential_vs_fixed.py table / summary / check`, as results/sequential/ does).
#
#   PARTS=2 bash experiments/diffusion-fmnist/trajectories.sh   # from the repository root; re-running resumes
#
# Cost: at least 100,100 UNet passes per image (more for an image a replayed policy has not settled by then, up to
# 131,072), about 5 million for 50 images. A record's `seconds` is the wall time per image of its process: for the
# 50 images of results/diffusion-fmnist/ it ranged from 576 to 2,093 s (17.1 process-hours in all, mostly PARTS=2 on
# 2 cores that other jobs shared at times), so about 9 hours of wall time with PARTS=2.
# GROUP images are sampled together and written together (2: a record every two images).
#
# PARTS=N runs N processes of one thread each (`sample --part I/N`, each with its own file OUT.partI, skipping the
# images OUT holds) and then folds their files into OUT (`gather`); a run stopped half-way resumes each part's file,
# and `gather` alone folds what is there. Each image's noise depends on its index alone, so the records are those of
# one run. On the 2-core machine of 2026-12-07, one process of two threads took 859 s per image (images 1600 and
# 1800, while short jobs also ran for some minutes); right after it, PARTS=2 recorded images 2000 to 2600 in 37.5
# minutes, one every 562 s: two threads of one process gain little on this UNet. (Trajectories that a change of the
# replayed policies leaves too short are continued in the file a process writes: run PARTS=1 once for OUT's.)
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-results/diffusion-fmnist/trajectories_s0.25.jsonl}
PARTS=${PARTS:-1}
BENCH=benchmarks/sequential_vs_fixed.py
sample() {
  nice "$PYTHON" "$BENCH" sample results/denoised/runs/classifier_clean/checkpoint.pth.tar \
    --denoiser "${MODEL:-results/diffusion-fmnist/ddpm/model}" --sigma 0.25 --skip 200 --max "${MAX:-50}" --n0 100 \
    --batch 256 --group "${GROUP:-2}" --seed 0 "$@"
}
if [ "$PARTS" -le 1 ]; then
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} sample --out "$OUT"
  exit
fi
parts=()
for i in $(seq 1 "$PARTS"); do parts+=("$OUT.part$i"); done
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # a part that fails (or a stop) ends the others
pids=()
for i in $(seq 1 "$PARTS"); do
  OMP_NUM_THREADS=1 sample --out "$OUT.part$i" --part "$i/$PARTS" --also "$OUT" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
"$PYTHON" "$BENCH" gather "$OUT" "${parts[@]}"
