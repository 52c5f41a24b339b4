#!/usr/bin/env bash
# CPU-scale CMID ablation: 2 backbones x 4 settings, STEPS (default 600) steps of batch 32 at 64 px
# each, on the AID folder AID (default the 1,200-image subset in ../shared/data/aid), then kNN and
# linear probe on the seeded 50/50 split of the same folder.
# Usage (from the repository root): [AID=DIR] [STEPS=N] bash experiments/ablation/run_cpu.sh [OUT_DIR]
set -euo pipefail
out=${1:-runs/ablation_cpu}
data=${AID:-../shared/data/aid}
steps=${STEPS:-600}
mkdir -p "$out"
for arch in resnet vit; do
  for setting in full no_mim mim_only random; do
    wd="$out/${arch}_${setting}"
    length=(--config.total_steps="$steps" --config.checkpoint_every_steps="$steps")
    [ "$setting" = random ] && length=()  # 0 steps: the initial weights
    python -m cmid_jax.main --config="configs/ablation.py:${arch},${setting},cpu" --workdir="$wd" \
      --config.data.path="$data" "${length[@]}" 2> "$wd.log"
    for protocol in knn linear; do
      python -m cmid_jax.evaluate --workdir="$wd" --data="$data" --protocol=$protocol 2>> "$wd.log" \
        | tee -a "$out/results.jsonl"
    done
  done
done
