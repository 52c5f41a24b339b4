#!/usr/bin/env bash
# The GPU figures of experiments/benchmarks/README.md, most important first, on one GPU.
#
#   bash experiments/benchmarks/run_gpu.sh [OUT]    # from the repository root
#
# The headline rows come first and take about 4 minutes on one H100 / H200, compiles included:
# cmid_jax and PyTorch ViT-B/16 at batch 256, then ResNet-50, each with its peak memory. Then the
# correctness checks against the CPU in float32 (about 2 minutes). The rest (remat and attention
# variants, Swin-B, torch.compile) follows while the time budget lasts:
# BUDGET seconds for the whole script (default 540: 9 minutes); a command is
# not started with less than 60 s left, and none runs past the budget. FULL=1 runs every row
# (600 s each at most). At the end a Markdown table of this run's rows is printed
# (experiments/benchmarks/summarize.py); the JSON lines are appended to OUT (default
# runs/benchmarks_gpu.jsonl). The exit status is 1 if a command failed or ran out of time.
#
# Environment: STEPS timed steps (default 20; 3 warm-up steps); DATA, a folder of images, adds the
# cmid_jax `--data=pipeline` rows, with WORKERS data workers (default 8).

set -uo pipefail

out=${1:-runs/benchmarks_gpu.jsonl}
steps=${STEPS:-20}
workers=${WORKERS:-8}
budget=${BUDGET:-540}
[[ -n ${FULL:-} ]] && budget=100000
min_left=60
export PYTHONUNBUFFERED=1
mkdir -p "$(dirname "$out")"
stdout=$(mktemp)
this_run=$(mktemp)
trap 'rm -f "$stdout" "$this_run"' EXIT
failed=()
skipped=()

# run NAME COMMAND...: the command's stdout is echoed; its JSON line goes to $out.
run() {
    local name=$1
    shift
    local left=$((budget - SECONDS))
    if ((left < min_left)); then
        skipped+=("$name")
        return
    fi
    local limit=$((left < 600 ? left : 600))
    echo "=== $name (at most ${limit} s): $*" >&2
    timeout --kill-after=20 "$limit" "$@" >"$stdout"
    local rc=$?
    cat "$stdout"
    # Only the result line: a warning printed to stdout must not corrupt the JSON Lines file.
    if ! grep '^{' "$stdout" | tee -a "$this_run" >>"$out" || ((rc != 0)); then
        local why=''
        ((rc == 124 || rc == 137)) && why=", timed out after $limit s"
        echo "=== FAILED (exit status $rc$why): $name" >&2
        failed+=("$name")
    fi
}

# `timeout` runs programs, not shell functions, hence arrays. The cmid_jax defaults are the
# recipe's: attention 'auto' (cuDNN fused attention on NVIDIA GPUs), remat 'dots'.
jax=(python -m cmid_jax.tools.benchmark)
jax_opts=(--config.batch_size=256 --steps="$steps" --warmup=3)
torch=(python experiments/benchmarks/torch_reference.py)
torch_opts=(--batch-size 256 --image-size 224 --amp bf16 --steps "$steps" --warmup 3)

# --- Headline: ViT-B/16 and ResNet-50, cmid_jax against PyTorch eager -----------------------------
run 'cmid_jax ViT-B/16' "${jax[@]}" --config=configs/vitb.py "${jax_opts[@]}"
run 'PyTorch ViT-B/16, eager' "${torch[@]}" --arch vit_base "${torch_opts[@]}"
run 'cmid_jax ResNet-50' "${jax[@]}" --config=configs/resnet50.py "${jax_opts[@]}"
run 'PyTorch ResNet-50, channels-last, eager' \
    "${torch[@]}" --arch resnet50 "${torch_opts[@]}" --channels-last

# --- Correctness: the step here against the CPU in float32 (cmid_jax/perf/crosscheck.py) ----------
# The recipe's first step (bf16, cuDNN attention) on 8 images, then 50 steps of the smoke preset.
run 'crosscheck ViT-B/16, first step' \
    "${jax[@]}" --config=configs/vitb.py --crosscheck --steps=1 --config.batch_size=8
run 'crosscheck smoke preset, 50 steps' \
    "${jax[@]}" --config=configs/vitb.py:smoke --crosscheck --steps=50 --config.total_steps=50

# --- While the budget lasts ------------------------------------------------------------------------
# Without remat ViT-B/16 keeps about 79 GiB of activations (README: memory): fits an H200 only.
run 'cmid_jax ViT-B/16, remat none' \
    "${jax[@]}" --config=configs/vitb.py "${jax_opts[@]}" --config.model.remat=none
run 'cmid_jax Swin-B' "${jax[@]}" --config=configs/swinb.py "${jax_opts[@]}"
run 'PyTorch Swin-B, eager' "${torch[@]}" --arch swin_base "${torch_opts[@]}"
run 'cmid_jax ViT-B/16, XLA attention' \
    "${jax[@]}" --config=configs/vitb.py "${jax_opts[@]}" --config.model.attention_impl=xla
run 'cmid_jax ResNet-50, remat none' \
    "${jax[@]}" --config=configs/resnet50.py "${jax_opts[@]}" --config.model.remat=none
run 'PyTorch ViT-B/16, compile' "${torch[@]}" --arch vit_base "${torch_opts[@]}" --compile
run 'PyTorch ResNet-50, channels-last, compile' \
    "${torch[@]}" --arch resnet50 "${torch_opts[@]}" --channels-last --compile
run 'PyTorch Swin-B, compile' "${torch[@]}" --arch swin_base "${torch_opts[@]}" --compile
if [[ -n ${DATA:-} ]]; then
    pipeline=(--data=pipeline --config.data.path="$DATA" --config.data.num_workers="$workers")
    run 'cmid_jax ViT-B/16, pipeline' \
        "${jax[@]}" --config=configs/vitb.py "${jax_opts[@]}" "${pipeline[@]}"
    run 'cmid_jax ResNet-50, pipeline' \
        "${jax[@]}" --config=configs/resnet50.py "${jax_opts[@]}" "${pipeline[@]}"
fi

echo >&2
python experiments/benchmarks/summarize.py "$this_run"
echo "run_gpu.sh: ${SECONDS} s; results appended to $out" >&2
if ((${#skipped[@]})); then
    printf 'run_gpu.sh: %d row(s) left for lack of time (BUDGET=%s; FULL=1 runs all):\n' \
        "${#skipped[@]}" "$budget" >&2
    printf '  %s\n' "${skipped[@]}" >&2
fi
if ((${#failed[@]})); then
    printf 'run_gpu.sh: %d command(s) failed:\n' "${#failed[@]}" >&2
    printf '  %s\n' "${failed[@]}" >&2
    exit 1
fi
