"""Benchmark CLI on CPU, and the analytic FLOPs against published counts and XLA's own count."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from cmid_jax.models import build_backbone
from cmid_jax.perf import crosscheck, flops, throughput
from configs import vitb

from conftest import REPO, run_tool

FIELDS = {
    'implementation',
    'config',
    'arch',
    'variant',
    'image_size',
    'compute_dtype',
    'attention_impl',
    'remat',
    'data',
    'platform',
    'device_kind',
    'device_count',
    'process_count',
    'global_batch',
    'warmup_steps',
    'timed_steps',
    'step_time_ms_mean',
    'step_time_ms_median',
    'images_per_sec',
    'input_images_per_sec',
    'model_flops_per_image',
    'model_flops_per_step',
    'xla_flops_per_device',
    'achieved_tflops',
    'peak_tflops_per_device',
    'mfu',
    'peak_memory_bytes',
    'compile_time_s',
    'versions',
}


_CACHE_OPTIONS = {
    'jax_compilation_cache_dir': None,
    'jax_persistent_cache_min_compile_time_secs': 0,
    'jax_persistent_cache_min_entry_size_bytes': -1,
}


@pytest.fixture(scope='module')
def compilation_cache_dir(tmp_path_factory):
    """A throwaway persistent compilation cache for this module, then the previous settings.

    Both data sources compile the same init and train step; loading them from the cache for the
    second run roughly halves this file's CPU time.
    """
    saved = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
    # The cache is switched on or off once per process, at the first compilation: reset it.
    compilation_cache.reset_cache()
    options = dict(_CACHE_OPTIONS, jax_compilation_cache_dir=str(tmp_path_factory.mktemp('xla')))
    for name, value in options.items():
        jax.config.update(name, value)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.mark.slow
@pytest.mark.multidevice
@pytest.mark.parametrize('data', ['synthetic', 'pipeline'])
def test_benchmark_returns_one_sane_record(data, compilation_cache_dir):
    config = vitb.get_config('smoke')
    r = throughput.run_benchmark(config, data=data, steps=2, warmup=1, config_name='smoke')
    assert set(r) == FIELDS
    assert (r['implementation'], r['config'], r['data']) == ('jax', 'smoke', data)
    assert (r['arch'], r['variant'], r['image_size']) == ('vit', 'mu/16', 64)
    assert (r['platform'], r['device_count'], r['global_batch']) == ('cpu', 8, 8)
    assert (r['warmup_steps'], r['timed_steps']) == (1, 2)
    for key in ('step_time_ms_mean', 'step_time_ms_median', 'compile_time_s', 'achieved_tflops'):
        assert r[key] > 0, key
    mean_s = r['step_time_ms_mean'] / 1e3
    assert r['images_per_sec'] == pytest.approx(r['global_batch'] / mean_s, rel=1e-9)
    assert (r['input_images_per_sec'] is None) == (data == 'synthetic')
    expected = flops.step_flops(flops.StepShape.from_config(vitb.get_config('smoke')), 8)
    assert r['model_flops_per_step'] == expected['per_step'] == 8 * r['model_flops_per_image']
    assert r['achieved_tflops'] == pytest.approx(r['model_flops_per_step'] / mean_s / 1e12)
    # A CPU has no bf16 peak in the table, so MFU is undefined; it reports no memory stats either.
    assert r['peak_tflops_per_device'] is None and r['mfu'] is None
    assert r['peak_memory_bytes'] is None
    assert r['xla_flops_per_device'] is None or r['xla_flops_per_device'] > 0
    assert r['versions']['jax'] == jax.__version__


@pytest.mark.slow
def test_cli_prints_one_json_line_with_the_overrides():
    config = 'configs/vitb.py:smoke'
    proc = run_tool(
        'tools.benchmark', f'--config={config}', '--config.batch_size=16', '--steps=1', '--warmup=0'
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, lines
    r = json.loads(lines[0])
    assert (r['global_batch'], r['timed_steps'], r['config']) == (
        16,
        1,
        f'{config} --config.batch_size=16',
    )
    bad = run_tool('tools.benchmark', f'--config={config}', '--steps=0')
    assert bad.returncode != 0 and 'steps' in bad.stderr


# --- crosscheck: the step here against the CPU in float32 ----------------------------------------


def test_crosscheck_compare_names_what_differs_beyond_the_tolerances():
    """Hand-made curves: which differences fail the check, and which are tolerated or not compared."""
    reference = [
        {'loss': 10.0 + i, 'loss_mim': 1.0, 'loss_global': 4.0, 'grad_norm': 2.0, 'lr': 0.1}
        for i in range(8)
    ]
    candidate = [dict(m, lr=0.5) for m in reference]  # lr is not a computed result: not compared.
    candidate[0] = dict(candidate[0], loss_mim=1.019, grad_norm=2.05, loss_global=float('nan'))
    for m in candidate[3:]:  # The last five steps: loss_global 4.3 (7.5% off), loss 2% off.
        m.update(loss_global=4.3, loss=m['loss'] * 1.02)
    fields, failures = crosscheck.compare(candidate, reference, rtol=0.02, curve_rtol=0.05)
    assert failures == [
        'first-step grad_norm 2.05 vs 2 on the CPU',
        'first-step loss_global nan vs 4 on the CPU',
        'loss_global over the last 5 of 8 steps 4.3 vs 4 on the CPU',
    ]
    assert fields['first_step']['loss_mim']['relative_difference'] == pytest.approx(0.019)
    assert set(fields['first_step']) == {'grad_norm', 'loss', 'loss_global', 'loss_mim'}
    assert fields['terms']['loss']['last_reference'] == pytest.approx(np.mean(range(13, 18)))
    assert fields['loss_candidate'][-1] == pytest.approx(17 * 1.02)
    # Up to TAIL steps there is no curve to compare: the first step only.
    fields, failures = crosscheck.compare(candidate[:5], reference[:5], rtol=0.03)
    assert 'terms' not in fields and len(failures) == 1 and 'loss_global nan' in failures[0]


@pytest.mark.slow
def test_crosscheck_of_bf16_against_float32_passes_on_the_same_batches():
    config = vitb.get_config('smoke')
    config.model.compute_dtype = 'bfloat16'
    r = crosscheck.crosscheck(config, steps=6, config_name='smoke')
    assert r['passed'] and r['failures'] == [], r['failures']
    assert (r['candidate']['compute_dtype'], r['reference']['compute_dtype']) == (
        'bfloat16',
        'float32',
    )
    assert r['reference']['attention_impl'] == 'xla' and r['reference']['platform'] == 'cpu'
    assert len(r['loss_candidate']) == len(r['loss_reference']) == 6
    assert set(r['terms']) == {'loss', 'loss_mim', 'loss_global', 'loss_local'}
    for name, d in r['first_step'].items():
        # Different arithmetic really ran (not one run compared with itself), and stayed close.
        assert 0 < d['relative_difference'] <= crosscheck.FIRST_STEP_RTOL, name


# --- analytic FLOPs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    'arch, variant, published_gmac',
    [
        ('vit', 'B/16', 17.58),  # jax-practices §14 (fvcore / timm count at 224 px).
        ('resnet', '50', 4.11),  # jax-practices §14.
        ('swin', 'B', 15.4),  # Swin paper, Table 1 (FLOPs there are multiply-adds).
    ],
    ids=['vit-b16', 'resnet50', 'swin-b'],
)
def test_backbone_forward_flops_match_published_counts(arch, variant, published_gmac):
    gmac = flops.backbone(arch, variant, 224).forward_flops / 2e9
    assert gmac == pytest.approx(published_gmac, rel=0.02)


@pytest.mark.parametrize('arch, variant', [('vit', 'Ti/16'), ('resnet', 'tiny')])
def test_backbone_forward_flops_agree_with_xla(arch, variant):
    """XLA also counts norms and activations (+) and skips padded conv taps (-): within 10%."""
    model = build_backbone(arch, variant, img_size=64)
    x = jnp.zeros((2, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
    ours = 2 * flops.backbone(arch, variant, 64).forward_flops
    assert throughput.xla_flops_per_device(compiled) == pytest.approx(ours, rel=0.10)


def test_head_flops_of_the_official_vit_b_recipe():
    shape = flops.StepShape.from_config(vitb.get_config())
    c, hid, out, lh, lb, protos, m = 768, 2048, 256, 2048, 256, 2048, 20
    assert flops.head_flops(shape) == {
        'decoder': 2 * 14 * 14 * c * 16 * 16 * 3,
        'projector': 2 * (c * hid + hid * out),
        'infonce': 2 * out * (1 + 65536),
        'local_head': 2 * m * (c * lh + lh * lh + lh * lb + lb * protos),
    }
    step = flops.step_flops(shape, 256)
    assert step['per_step'] == 256 * 2 * (
        3 * step['student_forward_per_crop'] + step['teacher_forward_per_crop']
    )
    # Two crops, student fwd+bwd and teacher fwd: ~8 backbone forwards per source image.
    assert step['per_image'] / step['backbone_forward_per_crop'] == pytest.approx(8, rel=0.02)


def test_peak_flops_table():
    assert flops.peak_flops('NVIDIA H100 80GB HBM3') == 989e12
    assert flops.peak_flops('NVIDIA H100 PCIe') == 756e12
    assert flops.peak_flops('NVIDIA H200') == 989e12
    assert flops.peak_flops('NVIDIA A100-SXM4-80GB') == 312e12
    assert flops.peak_flops('TPU v5 lite') == 197e12
    assert flops.peak_flops('TPU v5p') == 459e12
    assert flops.peak_flops('TPU v6 lite') == 918e12
    assert flops.peak_flops('cpu') is None


def test_gpu_summary_table_has_one_row_per_record(tmp_path):
    """run_gpu.sh ends with this table; partial output of a crashed run is skipped."""
    record = {
        'implementation': 'jax',
        'arch': 'vit',
        'variant': 'B/16',
        'global_batch': 256,
        'compute_dtype': 'bfloat16',
        'attention_impl': 'cudnn',
        'remat': 'dots',
        'data': 'synthetic',
        'images_per_sec': 1600.4,
        'step_time_ms_mean': 160.0,
        'step_time_ms_median': 159.5,
        'mfu': 0.3712,
        'peak_memory_bytes': 3 * 2**30,
        'compile_time_s': 41.6,
        'device_kind': 'NVIDIA H100 80GB HBM3',
    }
    torch_record = dict(
        record,
        implementation='torch',
        arch='resnet',
        variant='50',
        mfu=None,
        attention_impl=None,
        config='torch_reference.py --compile',
        peak_memory_bytes=None,
        compile_time_s=None,
    )
    results = tmp_path / 'results.jsonl'
    results.write_text(json.dumps(record) + '\n{"truncated\n' + json.dumps(torch_record) + '\n')
    proc = subprocess.run(
        [sys.executable, 'experiments/benchmarks/summarize.py', str(results)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    header, rule, *rows = proc.stdout.strip().splitlines()
    assert header.startswith('| backbone | implementation | options') and len(rows) == 2
    assert rows[0] == (
        '| ViT-B/16 | cmid_jax | bfloat16, cudnn attention, remat dots | 256 | '
        '1,600 | 160.0 / 159.5 | 37.1% | 3.0 | 42 | NVIDIA H100 80GB HBM3 |'
    )
    assert rows[1].startswith('| ResNet-50 | PyTorch | bfloat16, compile | 256 | 1,600 |')
    assert rows[1].endswith('| – | – | – | NVIDIA H100 80GB HBM3 |')
