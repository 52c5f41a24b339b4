"""Does the train step compute on an accelerator what it computes on the CPU in float32?

    cmid-benchmark --config=configs/vitb.py --crosscheck --steps=1 --config.batch_size=8
    cmid-benchmark --config=configs/vitb.py:smoke --crosscheck --steps=50 --config.total_steps=50

Two runs start from the same initial state (`config.seed`) and take the same batches of real images
(the training input pipeline on `config.data.path`, by default the bundled Landsat tiles). The
candidate runs on this machine's first device with the config as given (on a GPU: its compute dtype
and cuDNN attention); the reference runs on the CPU in float32 with XLA attention. The check passes
when
- the first step's losses and gradient norm agree within `rtol`: before any update the two runs
  differ only in arithmetic (bf16 rounding, fused kernels, reduction order), and
- with more than `TAIL` steps, training goes the same way on both: each loss term's mean over the
  last `TAIL` steps agrees within `curve_rtol`. Steps are not compared one by one: rounding
  differences grow through the updates in any two runs. (In the smoke preset's first 50 steps the
  MIM loss halves while the global and local losses climb, as the queue fills with real keys and
  the teacher temperature warms up; the record has each term's first and last values.)

On a machine without an accelerator both runs are on the CPU, which checks the compute dtype alone.
"""

from __future__ import annotations

import contextlib
import itertools

import jax
import ml_collections
import numpy as np

from cmid_jax import optim, parallel
from cmid_jax.config_resolve import resolve
from cmid_jax.data import open_source
from cmid_jax.models import attention
from cmid_jax.perf.aot import resolve_remat
from cmid_jax.perf.throughput import host_batches, versions
from cmid_jax.step import TrainStep

# bf16 keeps 8 significant bits (0.4% per rounding). Measured on the CPU, bf16 against float32:
# ViT-B/16 first step within 0.2%, the smoke preset's last-5 means within 0.1% after 50 steps.
FIRST_STEP_RTOL = 0.02
CURVE_RTOL = 0.05
TAIL = 5  # Steps averaged at the end of the curve.


def reference_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` computed in float32 with XLA's attention: the arithmetic every platform has."""
    reference = config.copy_and_resolve_references()
    reference.model.compute_dtype = 'float32'
    reference.model.attention_impl = 'xla'
    return reference


def first_batches(config: ml_collections.ConfigDict, count: int) -> list[dict]:
    """The first `count` host batches of the training pipeline (read once, fed to both runs)."""
    config = config.copy_and_resolve_references()
    config.data.num_workers = 0  # A few batches: starting workers would cost more than decoding.
    source = open_source(resolve(config).data)
    config = resolve(config, source)
    with contextlib.closing(host_batches(config, source)) as batches:
        return list(itertools.islice(batches, count))


def run_steps(
    config: ml_collections.ConfigDict, batches: list[dict], device: jax.Device
) -> tuple[list[dict[str, float]], str | None]:
    """Trains from `config.seed`'s initial state on `device`, one step per batch.

    Returns each step's metrics and the attention implementation used (None for CNNs and Swin).
    """
    config = resolve(config, num_devices=1)
    replicated, batch_sharding = parallel.shardings(parallel.make_mesh([device]))
    schedule = optim.Schedule(config.total_steps or len(batches), config.steps_per_epoch or 1)
    step_fn = TrainStep.create(config, schedule, platform=attention.current_platform(device))
    key = jax.device_put(jax.random.key(config.seed), device)
    state = jax.jit(step_fn.init_state, out_shardings=replicated)(key)
    step = step_fn.jit(replicated, batch_sharding, replicated)
    curve = []
    for batch in batches:
        state, metrics = step(state, parallel.global_batch(batch, batch_sharding))
        curve.append(metrics)
    curve = [{k: float(v) for k, v in m.items()} for m in jax.device_get(curve)]
    return curve, getattr(step_fn.nets.backbone, 'attention_impl', None)


def compared_metrics(metrics: dict[str, float]) -> list[str]:
    """The first-step metrics the check compares: the loss, its terms and the gradient norm."""
    return sorted(k for k in metrics if k.startswith('loss') or k == 'grad_norm')


def relative_difference(candidate: float, reference: float) -> float:
    return abs(candidate - reference) / max(abs(reference), 1e-12)


def tail_mean(curve: list[dict[str, float]], name: str) -> float:
    """The mean of `name` over the last `TAIL` steps."""
    return float(np.mean([m[name] for m in curve[-TAIL:]]))


def compare(
    candidate: list[dict[str, float]],
    reference: list[dict[str, float]],
    *,
    rtol: float = FIRST_STEP_RTOL,
    curve_rtol: float = CURVE_RTOL,
) -> tuple[dict, list[str]]:
    """Compares two runs' per-step metrics; returns (record fields, failures in words)."""
    failures = []
    first_step = {}
    for name in compared_metrics(reference[0]):
        c, r = candidate[0][name], reference[0][name]
        diff = relative_difference(c, r)
        first_step[name] = {'candidate': c, 'reference': r, 'relative_difference': diff}
        if not diff <= rtol:  # Also fails for NaN.
            failures.append(f'first-step {name} {c:.6g} vs {r:.6g} on the CPU')
    fields = {
        'rtol': rtol,
        'first_step': first_step,
        'loss_candidate': [m['loss'] for m in candidate],
        'loss_reference': [m['loss'] for m in reference],
    }
    if len(reference) > TAIL:
        fields['curve_rtol'] = curve_rtol
        fields['terms'] = {}
        for name in (n for n in first_step if n != 'grad_norm'):
            c, r = tail_mean(candidate, name), tail_mean(reference, name)
            fields['terms'][name] = {
                'first_candidate': candidate[0][name],
                'first_reference': reference[0][name],
                'last_candidate': c,
                'last_reference': r,
            }
            if not relative_difference(c, r) <= curve_rtol:
                failures.append(
                    f'{name} over the last {TAIL} of {len(reference)} steps {c:.6g} vs {r:.6g} '
                    'on the CPU'
                )
    return fields, failures


def crosscheck(
    config: ml_collections.ConfigDict, steps: int, *, config_name: str | None = None
) -> dict:
    """Runs `steps` steps on the candidate and the reference; returns the record (see above)."""
    if steps < 1:
        raise ValueError(f'steps={steps}; expected at least 1')
    candidate_device = jax.devices()[0]
    reference_device = jax.devices('cpu')[0]
    config = config.copy_and_resolve_references()
    config.model.remat = resolve_remat(resolve(config), [candidate_device])  # 'auto': what fits.
    batches = first_batches(config, steps)
    reference = reference_config(config)
    cand_curve, cand_attention = run_steps(config, batches, candidate_device)
    ref_curve, ref_attention = run_steps(reference, batches, reference_device)
    fields, failures = compare(cand_curve, ref_curve)
    return {
        'check': 'crosscheck',
        'config': config_name,
        'arch': config.model.arch,
        'variant': config.model.variant,
        'image_size': config.data.image_size,
        'global_batch': config.batch_size,
        'steps': steps,
        'candidate': _run_info(candidate_device, config, cand_attention),
        'reference': _run_info(reference_device, reference, ref_attention),
        **fields,
        'passed': not failures,
        'failures': failures,
        'versions': versions(),
    }


def _run_info(device: jax.Device, config: ml_collections.ConfigDict, attention_impl) -> dict:
    return {
        'platform': device.platform,
        'device_kind': device.device_kind,
        'compute_dtype': config.model.compute_dtype,
        'attention_impl': attention_impl,
    }
