#!/usr/bin/env bash
# Every GPU figure of experiments/benchmarks/README.md ("Table to fill"), in one go, on one GPU.
#
#   bash experiments/benchmarks/run_gpu.sh [OUT]    # from the repository root
#
# Appends each command's JSON line to OUT (default runs/benchmarks_gpu.jsonl). The most important
# and cheapest runs come first, so a session that runs out of time still has the headline rows.
# A failed or timed-out command (600 s each) is logged to stderr and the script goes on; the exit
# status is 1 if any command failed.
#
# Environment: STEPS timed steps (default 20; 3 warm-up steps); DATA, a folder of images, adds the
# cmid_jax `--data=pipeline` rows, with WORKERS data workers (default 8).

set -uo pipefail

out=${1:-runs/benchmarks_gpu.jsonl}
steps=${STEPS:-20}
workers=${WORKERS:-8}
export PYTHONUNBUFFERED=1
mkdir -p "$(dirname "$out")"
stdout=$(mktemp)
trap 'rm -f "$stdout"' EXIT
failed=()

# run NAME COMMAND...: the command's stdout is echoed; its JSON line goes to $out.
run() {
    local name=$1
    shift
    echo "=== $name: $*" >&2
    timeout --kill-after=30 600 "$@" >"$stdout"
    local rc=$?
    cat "$stdout"
    # Only the result line: a warning printed to stdout must not corrupt the JSON Lines file.
    if ! grep '^{' "$stdout" >>"$out" || ((rc != 0)); then
        local why=''
        ((rc == 124 || rc == 137)) && why=', timed out after 600 s'
        echo "=== FAILED (exit status $rc$why): $name" >&2
        failed+=("$name")
    fi
}

# The README's commands; `timeout` runs programs, not shell functions, hence arrays.
jax=(python -m cmid_jax.tools.benchmark)
jax_opts=(--config.batch_size=256 --steps="$steps" --warmup=3)
torch=(python experiments/benchmarks/torch_reference.py)
torch_opts=(--batch-size 256 --image-size 224 --amp bf16 --steps "$steps" --warmup 3)
cudnn=--config.model.attention_impl=cudnn

run 'cmid_jax ViT-B/16, cuDNN attention' \
    "${jax[@]}" --config=configs/vitb.py "${jax_opts[@]}" "$cudnn"
run 'PyTorch ViT-B/16, eager' "${torch[@]}" --arch vit_base "${torch_opts[@]}"
run 'cmid_jax ResNet-50' "${jax[@]}" --config=configs/resnet50.py "${jax_opts[@]}"
run 'PyTorch ResNet-50, channels-last, eager' \
    "${torch[@]}" --arch resnet50 "${torch_opts[@]}" --channels-last
run 'cmid_jax Swin-B' "${jax[@]}" --config=configs/swinb.py "${jax_opts[@]}"
run 'PyTorch Swin-B, eager' "${torch[@]}" --arch swin_base "${torch_opts[@]}"
run 'PyTorch ViT-B/16, compile' "${torch[@]}" --arch vit_base "${torch_opts[@]}" --compile
run 'PyTorch ResNet-50, channels-last, compile' \
    "${torch[@]}" --arch resnet50 "${torch_opts[@]}" --channels-last --compile
run 'PyTorch Swin-B, compile' "${torch[@]}" --arch swin_base "${torch_opts[@]}" --compile
run 'cmid_jax ViT-B/16, XLA attention' "${jax[@]}" --config=configs/vitb.py "${jax_opts[@]}"
if [[ -n ${DATA:-} ]]; then
    pipeline=(--data=pipeline --config.data.path="$DATA" --config.data.num_workers="$workers")
    run 'cmid_jax ViT-B/16, cuDNN attention, pipeline' \
        "${jax[@]}" --config=configs/vitb.py "${jax_opts[@]}" "$cudnn" "${pipeline[@]}"
    run 'cmid_jax ResNet-50, pipeline' \
        "${jax[@]}" --config=configs/resnet50.py "${jax_opts[@]}" "${pipeline[@]}"
fi

if ((${#failed[@]})); then
    printf 'run_gpu.sh: %d command(s) failed:\n' "${#failed[@]}" >&2
    printf '  %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "run_gpu.sh: all results in $out" >&2
