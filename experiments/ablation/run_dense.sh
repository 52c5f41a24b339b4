#!/usr/bin/env bash
# Dense probes of ablation workdirs (written by run_cpu.sh or the GPU commands): semantic
# segmentation on dubai-seg (split by area) and change detection on SZTAKI AirChange and the
# LEVIR-CD samples (the crops of one LEVIR image kept together), linear head on the last feature
# map, windows of the workdir's image size over the images resized by SCALE (default 1: native
# resolution). SEED (default 0) seeds the split and the head. Appends to each workdir's
# eval.jsonl (collect.py reads them).
# Usage (from the repository root):
#   DATA=DIR [SCALE=S] [SEED=N] bash experiments/ablation/run_dense.sh WORKDIR...
set -euo pipefail
data=${DATA:?set DATA to the folder that holds dubai-seg, sztaki-cd and levir-cd-samples}
common=(--scale="${SCALE:-1}" --seed="${SEED:-0}")
for wd in "$@"; do
  wd=${wd%/}
  python -m cmid_jax.tools.evaluate --workdir="$wd" --data="$data/dubai-seg" "${common[@]}" \
    --protocol=segmentation --split_group='^(tile\d+)_' 2>> "$wd.dense.log"
  python -m cmid_jax.tools.evaluate --workdir="$wd" --data="$data/sztaki-cd" "${common[@]}" \
    --protocol=change 2>> "$wd.dense.log"
  python -m cmid_jax.tools.evaluate --workdir="$wd" --data="$data/levir-cd-samples" \
    "${common[@]}" --protocol=change --split_group='^(.*)_\d+_\d+$' 2>> "$wd.dense.log"
done
