#!/usr/bin/env bash
# CPU-scale CMID ablation: 2 backbones x 5 settings, STEPS (default 600) steps of batch 32 at 64 px
# each, on the AID folder AID (required; one folder per class), then kNN and linear probe
# on the seeded 50/50 split of the same folder. SEED (default 0) seeds the model, data
# order and augmentations (not the split); ARCHS and SETTINGS pick backbones and settings (default
# all).
# Usage (from the repository root):
#   AID=DIR [STEPS=N] [SEED=S] [ARCHS=vit] [SETTINGS="full no_mim"] bash experiments/ablation/run_cpu.sh [OUT_DIR]
set -euo pipefail
out=${1:-runs/ablation_cpu}
data=${AID:?set AID to the AID folder (one folder per class)}
steps=${STEPS:-600}
seed=${SEED:-0}
mkdir -p "$out"
for arch in ${ARCHS:-resnet vit}; do
  for setting in ${SETTINGS:-full no_mim mim_only no_local random}; do
    wd="$out/${arch}_${setting}"
    length=(--config.total_steps="$steps" --config.checkpoint_every_steps="$steps")
    [ "$setting" = random ] && length=()  # 0 steps: the initial weights
    python -m cmid_jax.main --config="configs/ablation.py:${arch},${setting},cpu" --workdir="$wd" \
      --config.data.path="$data" --config.seed="$seed" "${length[@]}" 2> "$wd.log"
    for protocol in knn linear; do
      python -m cmid_jax.tools.evaluate --workdir="$wd" --data="$data" --protocol=$protocol 2>> "$wd.log" \
        | tee -a "$out/results.jsonl"
    done
  done
done
