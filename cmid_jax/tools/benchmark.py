"""Throughput of the real CMID train step, or its memory; prints one JSON line (`cmid-benchmark`).

    cmid-benchmark --config=configs/vitb.py
    cmid-benchmark --config=configs/resnet50.py --data=pipeline --config.data.path=IMAGES
    cmid-benchmark --config=configs/vitb.py --memory --per_device_batch=256 [--platform=cuda]
    cmid-benchmark --config=configs/vitb.py --crosscheck --steps=1 --config.batch_size=8
    cmid-benchmark --config=configs/vitb.py --aot=tpu:v5e:2x2 [--aot_max_batch]

`--memory` runs nothing: it traces the step (and compiles it for this machine's platform) and
reports state, saved activations and XLA's buffer sizes per device (`cmid_jax.perf.memory`).
`--crosscheck` runs `--steps` steps here as configured and on the CPU in float32, on the same
batches, and compares their losses (`cmid_jax.perf.crosscheck`); exit status 1 if they differ.
`--aot=TARGET` runs nothing either: it compiles the step with a TPU's or GPU's own compiler
for a target this machine does not have (`tpu:v5e:2x2`, `gpu:h100`, ...) and reports its fit,
memory and cost (`cmid_jax.perf.aot`; the compilers are the `aot` extra, in a separate environment).
See `cmid_jax.perf.throughput` and experiments/benchmarks/README.md for the fields.
"""

import json
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from cmid_jax import errors, parallel
from cmid_jax.models.attention import PLATFORMS
from cmid_jax.perf import aot
from cmid_jax.perf.crosscheck import crosscheck
from cmid_jax.perf.memory import memory_report
from cmid_jax.perf.throughput import DATA_SOURCES, run_benchmark

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file.', lock_config=True
)
_DATA = flags.DEFINE_enum(
    'data',
    'synthetic',
    DATA_SOURCES,
    'synthetic: one device-resident batch reused; pipeline: the grain pipeline.',
)
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps.', lower_bound=1)
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.', lower_bound=0)
_MEMORY = flags.DEFINE_bool('memory', False, 'Report per-device memory instead of timing steps.')
_CROSSCHECK = flags.DEFINE_bool(
    'crosscheck',
    False,
    'Run --steps steps here and on the CPU in float32 from the same state on the same batches, '
    'and compare their losses instead of timing steps.',
)
_PER_DEVICE_BATCH = flags.DEFINE_integer(
    'per_device_batch',
    None,
    '--memory: source images per device (default: config.batch_size over the devices).',
    lower_bound=1,
)
_PLATFORM = flags.DEFINE_enum(
    'platform',
    None,
    PLATFORMS,
    '--memory: the platform to trace for (default: this machine); '
    "XLA buffer sizes need this machine's.",
)
_COMPILE = flags.DEFINE_bool('compile', True, "--memory: also compile for XLA's buffer sizes.")
_AOT = flags.DEFINE_string(
    'aot',
    None,
    'Compile the step for TARGET without running it: tpu:TOPOLOGY (e.g. tpu:v5e:2x2, '
    'tpu:v5e:4x4) or gpu:NAME[:SLICESxHOSTSxGPUS] (h100, h200, a100-80); --config.batch_size is '
    "the global batch over the target's devices.",
)
_AOT_MAX_BATCH = flags.DEFINE_bool(
    'aot_max_batch', False, '--aot: find the largest per-device batch that fits (multiples of 8).'
)
_AOT_BUDGET_GIB = flags.DEFINE_float(
    'aot_budget_gib',
    None,
    '--aot: the per-device memory budget in GiB (default: the device memory JAX may use, '
    'less the allocator margin).',
    lower_bound=0,
)
_AOT_HLO = flags.DEFINE_string('aot_hlo', None, '--aot: write the compiled HLO text to this file.')
flags.mark_flags_as_required(['config'])


def aot_main(config, config_name: str) -> dict:
    """--aot: compile for a target this machine does not have (CPU backend only here)."""
    # Only the compile-only devices of the target: no GPU or TPU backend is started (the CUDA
    # plugin would report a CUDA error where there is no GPU), and compile times are real ones.
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_enable_compilation_cache', False)
    target = aot.open_target(_AOT.value)
    budget = None
    if _AOT_BUDGET_GIB.value is not None:
        budget = (
            int(_AOT_BUDGET_GIB.value * aot.GIB),
            f'{_AOT_BUDGET_GIB.value:g} GiB (--aot_budget_gib)',
        )
    if _AOT_MAX_BATCH.value:
        return aot.aot_max_batch(config, target, config_name=config_name, budget=budget)
    return aot.aot_record(
        config, target, config_name=config_name, budget=budget, hlo_path=_AOT_HLO.value
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    overrides = config_flags.get_override_values(flags.FLAGS['config'])
    config_name = ' '.join(
        [config_flags.get_config_filename(flags.FLAGS['config'])]
        + [f'--config.{k}={v}' for k, v in overrides.items()]
    )
    if _AOT.value:
        print(json.dumps(aot_main(_CONFIG.value, config_name)), flush=True)
        return
    parallel.maybe_initialize_distributed()
    if _MEMORY.value:
        per_device = _PER_DEVICE_BATCH.value or max(
            _CONFIG.value.batch_size // jax.device_count(), 1
        )
        result = memory_report(
            _CONFIG.value,
            per_device,
            platform=_PLATFORM.value,
            compile_step=_COMPILE.value,
            config_name=config_name,
        )
    elif _CROSSCHECK.value:
        result = crosscheck(_CONFIG.value, _STEPS.value, config_name=config_name)
    else:
        result = run_benchmark(
            _CONFIG.value,
            data=_DATA.value,
            steps=_STEPS.value,
            warmup=_WARMUP.value,
            config_name=config_name,
        )
    if jax.process_index() == 0:  # One line per run, also on several hosts.
        print(json.dumps(result), flush=True)
    if not result.get('passed', True):
        sys.stderr.write(f'crosscheck failed: {"; ".join(result["failures"])}\n')
        sys.exit(1)


def run() -> None:
    errors.run(main)


if __name__ == '__main__':
    run()
