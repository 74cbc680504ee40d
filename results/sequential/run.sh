#!/usr/bin/env bash
# Sequential vs fixed-n certification on the Fashion-MNIST models of results/fashion-mnist (issue 5).
# g = Gaussian augmentation, s = SmoothAdv; 025 / 05 = sigma 0.25 / 0.5. Run from this directory with the
# checkpoints copied next to it; every command used --channels-last --batch 1000 --seed 0, 1 thread.
# (The grid runs were stopped after the first 128 / 32 images to fit the CPU budget.) These first subset runs
# predate the fitted looks and the 0.05 forecast default; the 500-image comparison is run_vs_fixed.sh / tables.sh.
set -euo pipefail
export OMP_NUM_THREADS=1
C="smoothadv certify --skip 20 --batch 1000 --seed 0 --device cpu --channels-last --no-progress --force"
S="$C --mode sequential"      # class from n0 = 100 selection samples (Cohen's), alpha = 0.001, looks 1024..131072
$S gaussian_0.25.pth.tar --sigma 0.25 --max 128 --out g025_grid.tsv                      # radii 0, .25, .5, .75
$S gaussian_0.25.pth.tar --sigma 0.25 --max 96 --forecast-alpha 0.05 --out g025_grid_f05.tsv
$S gaussian_0.25.pth.tar --sigma 0.25 --max 96 --radii 0.5 --out g025_r05.tsv
$C gaussian_0.25.pth.tar --sigma 0.25 --skip 120 --max 16 --n0 100 --n 100000 --out g025_fixed100k.tsv
$S gaussian_0.5.pth.tar --sigma 0.5 --max 32 --out g05_grid.tsv                           # radii 0, .25, ..., 1.75
$S gaussian_0.5.pth.tar --sigma 0.5 --max 16 --forecast-alpha 0.05 --out g05_grid_f05.tsv
$S gaussian_0.5.pth.tar --sigma 0.5 --max 96 --radii 0.5 --out g05_r05.tsv
$C gaussian_0.5.pth.tar --sigma 0.5 --skip 80 --max 8 --n0 100 --n 100000 --out g05_fixed100k.tsv
$S smoothadv_0.25.pth.tar --sigma 0.25 --max 32 --out s025_grid.tsv
$S smoothadv_0.25.pth.tar --sigma 0.25 --max 96 --radii 0.5 --out s025_r05.tsv
$S smoothadv_0.5.pth.tar --sigma 0.5 --max 96 --radii 0.5 --out s05_r05.tsv
# tables: python ../../benchmarks/sequential_savings.py --sequential grid=g025_grid.tsv --fixed g025_fixed100k.tsv
