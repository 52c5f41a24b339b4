"""Compiling for TPUs and GPUs without one (`cmid-benchmark --aot`), and `model.remat='auto'`.

The compilers (libtpu, the CUDA plugin) live in their own environment, `.venv-aot` (`.ci/run`
builds it; `CMID_AOT_PYTHON` names another python): the tests that compile for a target run the
tool there. Without it they are skipped, unless CMID_REQUIRE_AOT=1 (CI), where they fail.
"""

import json
import os
import re
from pathlib import Path

import jax
import pytest

from cmid_jax import errors
from cmid_jax.perf import aot, flops
from configs import resnet50, vitb

from conftest import REPO, TIMEOUT_SCALE, run_tool

AOT_PYTHON = Path(os.environ.get('CMID_AOT_PYTHON', REPO / '.venv-aot' / 'bin' / 'python'))
RECORD_FIELDS = {
    'target',
    'device_kind',
    'devices',
    'hosts',
    'per_device_batch',
    'global_batch',
    'attention_impl',
    'remat',
    'compile_s',
    'argument_bytes',
    'output_bytes',
    'alias_bytes',
    'temp_bytes',
    'peak_bytes',
    'device_memory_bytes',
    'memory_budget_bytes',
    'headroom_bytes',
    'fits',
    'compiler_message',
    'xla_flops_per_device',
    'xla_bytes_accessed_per_device',
    'roofline_images_per_s_bound',
    'versions',
}

needs_aot = pytest.mark.skipif(
    not AOT_PYTHON.exists() and os.environ.get('CMID_REQUIRE_AOT') != '1',
    reason=f'no AOT environment at {AOT_PYTHON} (.ci/run builds it)',
)


def run_aot(*args: str, timeout: float = 300) -> dict:
    """One `cmid-benchmark --aot` run in the AOT environment; its JSON record."""
    import subprocess  # pylint: disable=import-outside-toplevel

    env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_')}
    env['PYTHONPATH'] = str(REPO)
    proc = subprocess.run(
        [str(AOT_PYTHON), '-m', 'cmid_jax.tools.benchmark', *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout * TIMEOUT_SCALE,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = proc.stdout.strip().splitlines()
    return json.loads(line)


def check_memory_fields(r: dict) -> None:
    assert RECORD_FIELDS <= set(r), RECORD_FIELDS - set(r)
    check_memory_fields_partial(r)
    assert r['alias_bytes'] > 0  # The donated state is reused for the new state.
    assert r['headroom_bytes'] == r['memory_budget_bytes'] - r['peak_bytes']
    assert r['per_device_batch'] * r['devices'] == r['global_batch']


# --- Without the compilers ---------------------------------------------------------------------


@pytest.mark.skipif(
    aot._installed('libtpu') is not None, reason='libtpu is installed in this environment'
)
def test_missing_compiler_is_one_line_saying_what_to_install():
    proc = run_tool(
        'tools.benchmark', '--config=configs/vitb.py:smoke', '--aot=tpu:v5e:2x2', timeout=120
    )
    assert proc.returncode == errors.EXIT_USER_ERROR, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith('Error:')]
    assert 'needs libtpu' in line and ".[aot]'" in line, line


def test_targets_parse_and_unknown_ones_are_config_errors():
    assert aot.parse_target('tpu:v5e:4x4') == ('tpu', 'v5e:4x4', '')
    assert aot.parse_target('gpu:h100') == ('cuda', 'h100', '1x1x1')
    assert aot.parse_target('gpu:a100-80:1x1x8') == ('cuda', 'a100-80', '1x1x8')
    for bad in ('gpu:v100', 'gpu:h100:8', 'h100', 'tpu:'):
        with pytest.raises(errors.ConfigError):
            aot.parse_target(bad)


def test_gpu_target_files_name_their_device_and_memory():
    for name in aot.GPU_TARGETS:
        text = aot.gpu_target_config(name)
        memory = aot._proto_number(text, 'device_memory_size')
        assert 79 * aot.GIB < memory < 142 * aot.GIB, (name, memory)
        assert aot._proto_number(text, 'memory_bandwidth') > 1e12


def test_all_reduce_group_sizes_read_every_replica_group_notation():
    hlo = '\n'.join(
        [
            "%a = f32[8]{0} all-reduce(%x), channel_id=1, replica_groups=mesh['axis_0'=16,"
            "'axis_1'=1] {'axis_0'}, to_apply=%add",
            '%b = f32[8]{0} all-reduce-start(%y), replica_groups=[1,4]<=[4], to_apply=%add',
            '%c = f32[8]{0} all-reduce(%z), replica_groups={{0,1},{2,3}}, to_apply=%add',
            '%d = f32[8]{0} add(%z, %z)',
        ]
    )
    assert aot.all_reduce_group_sizes(hlo) == [16, 4, 2]


def test_memory_budget_is_the_allocator_pool_less_the_margin(monkeypatch):
    monkeypatch.delenv('XLA_PYTHON_CLIENT_MEM_FRACTION', raising=False)
    monkeypatch.delenv('XLA_PYTHON_CLIENT_ALLOCATOR', raising=False)
    gpu, why = aot.memory_budget('cuda', 80 * aot.GIB)
    assert gpu == int(80 * aot.GIB * 0.75 * (1 - aot.ALLOCATOR_MARGIN)) and '75%' in why
    assert aot.memory_budget('tpu', 16 * aot.GIB)[0] == int(16 * aot.GIB * 0.95)
    monkeypatch.setenv('XLA_PYTHON_CLIENT_MEM_FRACTION', '.9')
    assert aot.memory_budget('cuda', 80 * aot.GIB)[0] == int(80 * aot.GIB * 0.9 * 0.95)


# --- The largest batch and the remat choice (compiles stubbed or on this CPU) -------------------


def test_largest_batch_bisects_to_the_last_multiple_of_8_that_fits():
    for limit in (0, 7, 8, 100, 256, 257, 1000):
        probes = []

        def fits_at(batch, limit=limit, probes=probes):
            probes.append(batch)
            return batch <= limit

        assert aot.largest_batch(fits_at, start=256) == limit // 8 * 8, limit
        assert len(probes) == len(set(probes)) <= 12
    assert aot.largest_batch(lambda b: True, start=64, cap=100) == 96


def test_largest_batch_needs_few_probes_with_a_linear_estimate():
    probes = []
    peak = lambda b: 2e9 + 0.1e9 * b  # Bytes: state plus activations linear in the batch.
    budget = 40e9

    def fits_at(batch):
        probes.append(batch)
        return peak(batch) <= budget

    estimate = lambda: int((budget - 2e9) / 0.1e9)
    assert aot.largest_batch(fits_at, start=256, estimate=estimate) == 376
    assert len(probes) <= 3, probes


def fake_compile(peaks: dict[str, float]):
    """A compile_fn whose peak bytes per device are peaks[policy] per image."""

    def compile_fn(config, devices, platform, per_device, policy):
        peak = int(peaks[policy] * per_device)
        memory = dict(argument_bytes=peak, output_bytes=0, alias_bytes=0, temp_bytes=0)
        return aot.CompiledStep(
            policy, per_device, 0.0, None, memory={**memory, 'peak_bytes': peak}
        )

    return compile_fn


def test_auto_picks_the_lightest_policy_that_fits_and_says_why():
    config = vitb.get_config('smoke')
    config.model.remat = 'auto'
    config.batch_size = 64
    devices = jax.devices()[:1]
    compile_fn = fake_compile({'none': 3e8, 'dots': 1e8, 'full': 5e7})
    pick = lambda gib: aot.choose_remat(
        config, devices, budget=(int(gib * aot.GIB), f'{gib} GiB'), compile_fn=compile_fn
    )
    assert pick(100).policy == 'none'
    choice = pick(10)
    assert choice.policy == 'dots' and [s.policy for s in choice.steps] == ['none', 'dots']
    assert "'none' needs 17.88 GiB" in choice.reason and "-> 'dots'" in choice.reason
    assert pick(4).policy == 'full'
    with pytest.raises(aot.DoesNotFit) as raised:
        pick(1)  # 'full' holds 21 images per device in 1 GiB: 16 in multiples of 8.
    assert 'even with model.remat=full' in raised.value.message
    assert '16 images per device fit: --config.batch_size=16' in raised.value.message
    config.model.remat = 'dots'
    assert pick(1).policy == 'dots'  # An explicit policy is never second-guessed.


def test_auto_is_none_on_the_cpu_without_compiling():
    config = vitb.get_config()
    assert config.model.remat == 'auto'
    assert vitb.get_config('smoke').model.remat == 'none'

    def no_compile(*args):
        raise AssertionError('compiled')

    choice = aot.choose_remat(config, jax.devices()[:1], compile_fn=no_compile)
    assert choice.policy == 'none' and 'CPU' in choice.reason and 'host memory' in choice.reason


def test_auto_with_the_exact_budget_of_none_keeps_none_on_a_real_compile():
    """A real compile on this CPU: the budget of 'none''s own peak keeps 'none'."""
    config = resnet50.get_config('smoke')
    config.model.remat = 'auto'
    devices = jax.devices()[:1]
    none = aot.compile_step(config, devices, 'cpu', config.batch_size, 'none')
    check_memory_fields_partial(none.memory)
    exact = aot.choose_remat(config, devices, budget=(none.peak_bytes, 'exact'))
    assert exact.policy == 'none' and exact.steps[0].peak_bytes == none.peak_bytes


@needs_aot
@pytest.mark.slow
def test_auto_moves_to_a_heavier_policy_when_none_does_not_fit_the_gpu():
    """Compiled for an H100 (where, unlike on a CPU, 'dots' keeps less than 'none'): with a budget
    just under 'none''s peak, 'auto' compiles 'none', finds it too big, and picks a heavier
    policy whose peak fits."""
    args = ['--config=configs/resnet50.py:smoke', '--config.batch_size=64']
    args += ['--config.loss.queue_size=512', '--aot=gpu:h100']
    none = run_aot(*args, '--config.model.remat=none')
    assert none['fits'] is True
    budget = (none['peak_bytes'] - 4096) / aot.GIB
    auto = run_aot(*args, '--config.model.remat=auto', f'--aot_budget_gib={budget!r}')
    assert auto['remat_requested'] == 'auto' and auto['remat'] in ('dots', 'full')
    assert auto['fits'] is True and auto['peak_bytes'] < none['peak_bytes'] - 4096
    assert "'none' needs" in auto['remat_reason'], auto['remat_reason']


def check_memory_fields_partial(memory: dict) -> None:
    assert memory['peak_bytes'] == (
        memory['argument_bytes']
        + memory['output_bytes']
        - memory['alias_bytes']
        + memory['temp_bytes']
    )


# --- Compiled for a TPU and a GPU (the AOT environment) -----------------------------------------


@needs_aot
def test_gpu_record_memory_and_flops_against_the_analytic_count():
    """ViT-S/16 at 64 px (matmuls dominate, unlike the smoke ViT's width of 64): XLA's flops of
    the step within 5% of the analytic count of `cmid_jax.perf.flops`."""
    args = ['--config.model.variant=S/16', '--config.batch_size=32', '--config.loss.queue_size=64']
    r = run_aot(
        '--config=configs/vitb.py:smoke', *args, '--config.model.remat=auto', '--aot=gpu:h100'
    )
    check_memory_fields(r)
    assert (r['device_kind'], r['devices'], r['hosts']) == ('NVIDIA H100 80GB HBM3', 1, 1)
    assert r['fits'] is True and r['compiler_message'] is None
    assert r['remat'] == 'none' and "model.remat='auto' -> 'none'" in r['remat_reason']
    config = vitb.get_config('smoke')
    config.model.variant, config.batch_size = 'S/16', 32
    analytic = flops.step_flops(flops.StepShape.from_config(config), 32)['per_step']
    assert r['xla_flops_per_device'] == pytest.approx(analytic, rel=0.05)
    assert r['versions']['jax_cuda13_plugin'] == jax.__version__
    assert 0 < r['roofline_images_per_s_bound'] < float('inf')


@needs_aot
def test_tpu_record_and_the_compilers_refusal_of_an_absurd_batch():
    r = run_aot('--config=configs/resnet50.py:smoke', '--aot=tpu:v5e:2x2')
    check_memory_fields(r)
    assert (r['device_kind'], r['devices'], r['hosts'], r['per_device_batch']) == (
        'TPU v5 lite',
        4,
        1,
        2,
    )
    assert r['fits'] is True and r['xla_bytes_accessed_per_device'] > 0
    assert r['versions']['libtpu']
    # 16,384 images per chip of 16 GiB: the TPU compiler's own out-of-memory line, as a result.
    big = ['--config.batch_size=65536', '--config.loss.queue_size=131072']
    r = run_aot('--config=configs/vitb.py:smoke', *big, '--aot=tpu:v5e:2x2')
    assert r['fits'] is False and r['peak_bytes'] is None
    assert re.search(r'RESOURCE_EXHAUSTED.*HBM', r['compiler_message']), r['compiler_message']


@needs_aot
def test_multi_host_tpu_program_all_reduces_over_every_chip(tmp_path):
    hlo = tmp_path / 'step.hlo'
    r = run_aot(
        '--config=configs/vitb.py:smoke',
        '--config.batch_size=32',
        '--aot=tpu:v5e:4x4',
        f'--aot_hlo={hlo}',
    )
    assert (r['devices'], r['hosts'], r['per_device_batch']) == (16, 4, 2)
    assert r['largest_all_reduce_devices'] == 16
    # Read independently of the tool's parser: an all-reduce over a 16-device axis.
    lines = [x for x in hlo.read_text().splitlines() if re.search(r'\ball-reduce\(', x)]
    assert any("'axis_0'=16" in x or '<=[16]' in x for x in lines), lines[:3]


def test_readme_fits_table_is_built_from_the_committed_results():
    import importlib.util  # pylint: disable=import-outside-toplevel

    path = REPO / 'experiments' / 'benchmarks' / 'aot_table.py'
    spec = importlib.util.spec_from_file_location('aot_table', path)
    aot_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(aot_table)
    readme = (REPO / 'README.md').read_text()
    section = readme.split(aot_table.START)[1].split(aot_table.END)[0].strip()
    assert section == aot_table.table(aot_table.load()).strip(), (
        'run python experiments/benchmarks/aot_table.py --write'
    )
