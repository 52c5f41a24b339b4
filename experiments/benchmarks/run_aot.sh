#!/usr/bin/env bash
# What fits where: the three recipes at remat none / dots / full, compiled by the GPU and TPU
# compilers without the accelerator (cmid-benchmark --aot), appended to results/aot_<target>.jsonl.
# Per target and config: one record at 256 images per device, then the largest per-device batch
# that fits (--aot_max_batch). GPU targets first (about 30 s a compile on 2 cores), then TPU
# targets (about 5 minutes a compile). README's "What fits where" is built from the results:
#   python experiments/benchmarks/aot_table.py
#
#   experiments/benchmarks/run_aot.sh [TARGET ...]    # default: every target below
# Needs the aot extra in .venv-aot (see .ci/run); AOT_PYTHON names another python.
set -uo pipefail
cd "$(dirname "$0")/../.."
python=${AOT_PYTHON:-.venv-aot/bin/python}
results=experiments/benchmarks/results
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(gpu:h100 gpu:h200 gpu:a100-80 tpu:v5e:2x2 tpu:v6e:2x2 tpu:v5p:2x2x1 tpu:v4:2x2x1)
fi
devices() {  # Devices of a target's topology.
  case $1 in
    gpu:*) echo 1 ;;
    *) "$python" -c "import jax; jax.config.update('jax_platforms', 'cpu')
from cmid_jax.perf import aot; print(len(aot.open_target('$1').devices))" 2>/dev/null ;;
  esac
}
for target in "${targets[@]}"; do
  n=$(devices "$target")
  out=$results/aot_${target//[:]/_}.jsonl
  for config in vitb resnet50 swinb; do
    for remat in none dots full; do
      for mode in 256 max; do
        extra=()
        [ "$mode" = max ] && extra=(--aot_max_batch)
        echo "$target $config remat=$remat ${mode}" >&2
        nice -n 10 "$python" -m cmid_jax.tools.benchmark --config="configs/$config.py" \
          --config.batch_size=$((256 * n)) --config.model.remat=$remat --aot="$target" \
          "${extra[@]}" >> "$out" 2>> "$results/aot.log" || echo "failed: see $results/aot.log" >&2
      done
    done
  done
done
