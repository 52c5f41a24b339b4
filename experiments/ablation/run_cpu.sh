#!/usr/bin/env bash
# CPU-scale CMID ablation on the 1,200-image AID subset (../shared/data/aid): 2 backbones x 4
# settings, 600 steps of batch 32 at 64 px each, then kNN and linear probe on the seeded 50/50 split.
# Usage: bash experiments/ablation/run_cpu.sh [OUT_DIR]   (from the repository root)
set -euo pipefail
out=${1:-runs/ablation_cpu}
data=${AID:-../shared/data/aid}
mkdir -p "$out"
for arch in resnet vit; do
  for setting in full no_mim mim_only random; do
    wd="$out/${arch}_${setting}"
    python -m cmid_jax.main --config="configs/ablation.py:${arch},${setting},cpu" --workdir="$wd" \
      --config.data.path="$data" 2> "$wd.log"
    for protocol in knn linear; do
      python -m cmid_jax.evaluate --workdir="$wd" --data="$data" --protocol=$protocol 2>> "$wd.log" \
        | tee -a "$out/results.jsonl"
    done
  done
done
