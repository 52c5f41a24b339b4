"""Throughput of the real CMID train step: compile, warm up, time N steps, print one JSON line.

    python -m cmid_jax.tools.benchmark --config=configs/vitb.py --config.model.remat=none
    python -m cmid_jax.tools.benchmark --config=configs/resnet50.py --data=pipeline \
        --config.data.path=IMAGES

`--data=synthetic` (default) feeds one device-resident batch to every step, so the number is the
step itself; `--data=pipeline` runs the grain pipeline of `cmid_jax.train` on `--config.data.path`
(default: the bundled demo tiles), so the input cost shows. MFU uses the analytic model FLOPs of
`cmid_jax.perf.flops` against the dense bf16 peak of the device (null on CPU and unknown devices).
Field meanings and the GPU commands: experiments/benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import platform
import queue
import threading
import time
from collections.abc import Callable, Iterator

import flax
import jax
import jaxlib
import ml_collections
import numpy as np

from cmid_jax import optim, parallel, train
from cmid_jax.config_resolve import override, resolve
from cmid_jax.data import open_source
from cmid_jax.data.pipeline import Source
from cmid_jax.perf import flops
from cmid_jax.perf.aot import resolve_remat
from cmid_jax.perf.synthetic import synthetic_batch
from cmid_jax.step import TrainStep

DATA_SOURCES = ('synthetic', 'pipeline')


def synthetic_batches(config: ml_collections.ConfigDict, batch_sharding) -> Iterator[dict]:
    """The same device-resident batch forever: no host work or transfer inside the timed loop.

    The batch is 8-bit RGB, the default input; multi-band configs need `--data=pipeline`.
    """
    local = synthetic_batch(
        config.seed, config.batch_size // jax.process_count(), config.data.image_size
    )
    batch = parallel.global_batch(local, batch_sharding)
    while True:
        yield batch


def host_batches(config: ml_collections.ConfigDict, source: Source) -> Iterator[dict]:
    """Host batches of the training input pipeline, decoded and cropped, without the bad-image
    counts (also the crosscheck's batches).

    `config` must already be resolved against `source` (`config_resolve.resolve`), as in training.
    """
    data_iter = train.input_pipeline(config, source)
    try:
        while True:
            batch = next(data_iter)
            batch.pop('bad_images')
            yield batch
    finally:
        data_iter.close()


def pipeline_batches(
    config: ml_collections.ConfigDict, source: Source, batch_sharding
) -> Iterator[dict]:
    """Batches of the training input pipeline, decoded, cropped and transferred per step."""
    with contextlib.closing(host_batches(config, source)) as batches:
        for batch in batches:
            yield parallel.global_batch(batch, batch_sharding)


def time_steps(
    step: Callable, state: dict, batches: Iterator[dict], steps: int
) -> tuple[dict, float, list[float]]:
    """Runs `steps` steps; returns (state, total seconds, per-step seconds).

    The loop only dispatches. A watcher thread waits on each step's loss in turn and stamps when it
    became ready, which gives per-step times (for the median) without a host sync between steps.
    """
    pending: queue.Queue = queue.Queue()
    ready: list[float] = []

    def watch():
        for _ in range(steps):
            jax.block_until_ready(pending.get())
            ready.append(time.perf_counter())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, next(batches))
        pending.put(metrics['loss'])
    jax.block_until_ready(state)
    total = time.perf_counter() - start
    watcher.join()
    return state, total, list(np.diff([start] + ready))


def time_input(batches: Iterator[dict], steps: int) -> float:
    """Seconds the pipeline takes to deliver `steps` batches to the devices, with no step running.

    As many batches are taken untimed first, so batches the prefetch buffer filled while the steps
    ran do not count.
    """
    for _ in range(steps):
        next(batches)
    start = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(next(batches))
    return time.perf_counter() - start


def xla_flops_per_device(compiled) -> float | None:
    """XLA's FLOP count of one device's program, if the backend reports one.

    On one device that is the whole step, norms, optimizer and losses included. Under SPMD each
    device also repeats the replicated work (optimizer, EMA), so it is not the global count / N.
    """
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # Not every backend / version implements it; it is informative only.
        return None
    if isinstance(analysis, (list, tuple)):  # Older jax versions return one dict per program.
        analysis = analysis[0] if analysis else None
    count = (analysis or {}).get('flops')
    return float(count) if count else None


def peak_memory_bytes() -> int | None:
    """Largest `peak_bytes_in_use` over this process's devices; None where not reported (CPU)."""
    peaks = []
    for device in jax.local_devices():
        try:
            stats = device.memory_stats()
        except Exception:  # Some backends raise instead of returning None.
            stats = None
        if stats and 'peak_bytes_in_use' in stats:
            peaks.append(int(stats['peak_bytes_in_use']))
    return max(peaks) if peaks else None


def versions() -> dict[str, str]:
    return {
        'python': platform.python_version(),
        'jax': jax.__version__,
        'jaxlib': jaxlib.__version__,
        'flax': flax.__version__,
    }


def run_benchmark(
    config: ml_collections.ConfigDict,
    *,
    data: str = 'synthetic',
    steps: int = 20,
    warmup: int = 3,
    config_name: str | None = None,
) -> dict:
    """Benchmarks the train step of `config`; returns the result record (see the README)."""
    if data not in DATA_SOURCES:
        raise ValueError(f'data={data!r}; expected one of {DATA_SOURCES}')
    # --- Mesh, as in training -------------------------------------------------------------------
    mesh = parallel.make_mesh()
    replicated, batch_sharding = parallel.shardings(mesh)
    devices = dict(num_devices=jax.device_count(), num_processes=jax.process_count())

    # --- Input --------------------------------------------------------------------------------
    if data == 'pipeline':
        # As in training: the source fixes the bands, pixel type and statistics the step sees.
        source = open_source(resolve(config).data)
        config = resolve(config, source, **devices)
        batches = pipeline_batches(config, source, batch_sharding)
    else:
        config = resolve(config, **devices)
        batches = synthetic_batches(config, batch_sharding)

    # --- Model, state and step ------------------------------------------------------------------
    config = override(config, {'model.remat': resolve_remat(config, list(mesh.devices.flat))})
    # The schedules change values, not the cost of a step; any valid lengths do.
    schedule = optim.Schedule(config.total_steps or warmup + steps, config.steps_per_epoch or 1)
    step_fn = TrainStep.create(config, schedule)
    state = jax.jit(step_fn.init_state, out_shardings=replicated)(jax.random.key(config.seed))
    try:
        first = next(batches)
        start = time.perf_counter()
        step = step_fn.jit(replicated, batch_sharding, replicated).lower(state, first).compile()
        compile_s = time.perf_counter() - start

        # --- Warm-up, then the timed steps --------------------------------------------------------
        for i in range(warmup):
            state, _ = step(state, first if i == 0 else next(batches))
        jax.block_until_ready(state)
        _, total_s, step_s = time_steps(step, state, batches, steps)
        input_s = time_input(batches, steps) if data == 'pipeline' else None
    finally:
        batches.close()

    # --- Record -------------------------------------------------------------------------------
    device = jax.devices()[0]
    mean_s = total_s / steps
    model_flops = flops.step_flops(flops.StepShape.from_config(config), config.batch_size)
    achieved = model_flops['per_step'] / mean_s
    peak = flops.peak_flops(device.device_kind) if device.platform != 'cpu' else None
    m = config.model
    return {
        'implementation': 'jax',
        'config': config_name,
        'arch': m.arch,
        'variant': m.variant,
        'image_size': config.data.image_size,
        'compute_dtype': m.compute_dtype,
        # As resolved for this platform ('auto' -> 'cudnn' or 'xla'); null for CNNs and Swin.
        'attention_impl': getattr(step_fn.nets.backbone, 'attention_impl', None),
        'remat': m.remat,
        'data': data,
        'platform': device.platform,
        'device_kind': device.device_kind,
        'device_count': jax.device_count(),
        'process_count': jax.process_count(),
        'global_batch': config.batch_size,
        'warmup_steps': warmup,
        'timed_steps': steps,
        'step_time_ms_mean': 1e3 * mean_s,
        'step_time_ms_median': 1e3 * float(np.median(step_s)),
        'images_per_sec': config.batch_size / mean_s,  # Source images; each gives two crops.
        # What the host feeds with no step running: the ceiling the pipeline puts on the step.
        'input_images_per_sec': config.batch_size * steps / input_s if input_s else None,
        'model_flops_per_image': model_flops['per_image'],
        'model_flops_per_step': model_flops['per_step'],
        'xla_flops_per_device': xla_flops_per_device(step),
        'achieved_tflops': achieved / 1e12,
        'peak_tflops_per_device': peak / 1e12 if peak else None,
        'mfu': achieved / (peak * jax.device_count()) if peak else None,
        'peak_memory_bytes': peak_memory_bytes(),
        'compile_time_s': compile_s,
        'versions': versions(),
    }
