"""The CMID train step compiled by a TPU's or GPU's own compiler without the accelerator (ahead of
time): what fits, its memory and cost per target, the largest batch each holds, and
`model.remat='auto'` resolved by what fits.

    cmid-benchmark --config=configs/vitb.py --aot=tpu:v5e:2x2
    cmid-benchmark --config=configs/vitb.py --aot=gpu:h100 --config.model.remat=none
    cmid-benchmark --config=configs/resnet50.py --aot=gpu:h100 --aot_max_batch

Targets: `tpu:TOPOLOGY`, any topology libtpu knows (`v4:2x2x1`, `v5e:2x2`, `v5p:2x2x1`, `v6e:2x2`;
`v5e:4x4` is 16 chips in 4 hosts, compiled from this one process), and `gpu:NAME[:SxHxG]` with
NAME one of `GPU_TARGETS` and the CUDA plugin's topology of S slices x H hosts x G GPUs per host
(default 1x1x1; `gpu:h100:1x1x8` is one host with 8 GPUs). The compilers are libtpu and the CUDA
PJRT plugin, the `aot` extra (pyproject.toml), in their own environment: `.ci/run` builds it.

The step is the one the train loop runs (`TrainStep.jit`, replicated state donated, batch
split over all devices), at `config.batch_size` global images. Figures per device:

* memory: XLA's buffer assignment; the peak is arguments + outputs - aliased (donated state) +
  temporaries. It fits when the compiler accepts it and the peak is within the budget
  (`memory_budget`): the device's memory, on a GPU the share JAX's allocator takes (75% unless
  XLA_PYTHON_CLIENT_MEM_FRACTION / XLA_PYTHON_CLIENT_ALLOCATOR say otherwise), less
  `ALLOCATOR_MARGIN`. A program the TPU compiler refuses is a result (`fits: false` and its line);
* cost: XLA's flops and bytes accessed of the compiled per-device program, and from them a
  roofline bound on images/s (the chip's published peak bf16 FLOP/s and memory bandwidth): an
  upper bound, not a measurement. The CUDA plugin does not report a cost analysis; the flops of a
  GPU target are then XLA's count of the program before optimisation over the devices.

Without a GPU to autotune on, Triton's GEMM tiling fails, so GPU targets compile with Triton GEMMs
off and autotuning at level 0 (`GPU_COMPILER_OPTIONS`): cuBLAS GEMMs, the real buffer assignment.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np

from cmid_jax import errors, optim, parallel
from cmid_jax.config_resolve import editable, resolve
from cmid_jax.data.bands import num_bands
from cmid_jax.models import remat as remat_lib
from cmid_jax.perf import flops
from cmid_jax.step import TrainStep

GIB = 2**30
# Fraction of the memory budget kept free for the allocator (fragmentation, cuBLAS / cuDNN
# workspaces, the runtime's own buffers): a program must fit in the other 95%.
ALLOCATOR_MARGIN = 0.05
# JAX preallocates this fraction of a GPU's memory as its pool (XLA_PYTHON_CLIENT_MEM_FRACTION).
DEFAULT_GPU_MEM_FRACTION = 0.75
GPU_COMPILER_OPTIONS = {'xla_gpu_enable_triton_gemm': False, 'xla_gpu_autotune_level': 0}
AOT_INSTALL_HINT = (
    "the AOT compilers are the 'aot' extra, in an environment of their own: "
    "python -m venv --system-site-packages .venv-aot && .venv-aot/bin/pip install -e '.[aot]', "
    'then run .venv-aot/bin/cmid-benchmark --aot=...'
)

# GPU targets: XLA's published GpuTargetConfigProto of each GPU (openxla/xla,
# xla/backends/gpu/target_config/specs), with the fields the installed jaxlib's proto knows.
GPU_TARGETS = {
    'h100': 'h100_sxm.txtpb',
    'h200': 'h200.txtpb',
    'a100-80': 'a100_sxm_80.txtpb',
}
_GPU_TARGET_DIR = Path(__file__).parent / 'gpu_targets'

# Published per-chip memory of the TPU generations (matched on the lower-cased device kind, more
# specific names first): HBM capacity in bytes and bandwidth in bytes/s, from the Cloud TPU
# system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e). GPU figures come
# from the target config (device_memory_size, memory_bandwidth). Peak bf16 FLOP/s:
# `flops.PEAK_BF16_FLOPS`.
TPU_MEMORY: tuple[tuple[str, int, float], ...] = (
    ('tpu v5 lite', 16 * GIB, 819e9),  # v5e
    ('tpu v6 lite', 32 * GIB, 1640e9),  # v6e (Trillium)
    ('tpu v5', 95 * GIB, 2765e9),  # v5p
    ('tpu v4', 32 * GIB, 1200e9),
)


class AotUnavailable(errors.UserError):
    """The compiler for a target is not installed here (the `aot` extra)."""


class DoesNotFit(errors.ConfigError):
    """The train step does not fit the device even with `model.remat='full'`."""


@dataclasses.dataclass(frozen=True)
class Target:
    """Compile-only devices of a TPU topology or a GPU model, and the chip's published figures."""

    name: str  # As given, e.g. 'tpu:v5e:2x2' or 'gpu:h100'.
    platform: str  # 'tpu' or 'cuda' (the lowering platform).
    devices: tuple
    device_memory_bytes: int
    memory_bandwidth: float | None  # Bytes/s.
    peak_bf16_flops: float | None

    @property
    def device_kind(self) -> str:
        return self.devices[0].device_kind

    @property
    def hosts(self) -> int:
        return len({d.process_index for d in self.devices})


def _installed(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def compiler_versions() -> dict[str, str | None]:
    """jax, jaxlib and the AOT compilers (None where not installed)."""
    return {
        'jax': jax.__version__,
        'jaxlib': _installed('jaxlib'),
        'libtpu': _installed('libtpu'),
        'jax_cuda13_plugin': _installed('jax-cuda13-plugin'),
        'jax_cuda13_pjrt': _installed('jax-cuda13-pjrt'),
    }


def parse_target(spec: str) -> tuple[str, str, str]:
    """'tpu:v5e:2x2' -> ('tpu', 'v5e:2x2', ''); 'gpu:h100[:1x1x8]' -> ('cuda', 'h100', '1x1x8')."""
    kind, _, rest = spec.partition(':')
    if kind == 'tpu' and rest:
        return 'tpu', rest, ''
    if kind == 'gpu' and rest:
        name, _, topology = rest.partition(':')
        if name not in GPU_TARGETS:
            raise errors.ConfigError(
                f'--aot={spec}: unknown GPU {name!r}; expected one of {sorted(GPU_TARGETS)}'
            )
        topology = topology or '1x1x1'
        if not re.fullmatch(r'\d+x\d+x\d+', topology):
            raise errors.ConfigError(
                f'--aot={spec}: the GPU topology must be SLICESxHOSTSxGPUS, e.g. 1x1x8'
            )
        return 'cuda', name, topology
    raise errors.ConfigError(
        f'--aot={spec!r}: expected tpu:TOPOLOGY (e.g. tpu:v5e:2x2) or gpu:NAME '
        f'(one of {sorted(GPU_TARGETS)}, optionally :SLICESxHOSTSxGPUS)'
    )


def gpu_target_config(name: str) -> str:
    """The GpuTargetConfigProto of GPU `name`, in text form."""
    return (_GPU_TARGET_DIR / GPU_TARGETS[name]).read_text()


def _proto_number(text: str, field: str) -> float | None:
    match = re.search(rf'^\s*{field}:\s*([0-9.eE+]+)\s*$', text, re.MULTILINE)
    return float(match.group(1)) if match else None


@functools.cache
def open_target(spec: str) -> Target:
    """The compile-only devices of `spec`; AotUnavailable where its compiler is not installed."""
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

    platform, name, topology = parse_target(spec)
    try:
        if platform == 'tpu':
            if _installed('libtpu') is None:
                raise AotUnavailable(f'--aot={spec} needs libtpu, which is not installed', '')
            devices = topologies.get_topology_desc(platform='tpu', topology_name=name).devices
        else:
            if _installed('jax-cuda13-plugin') is None:
                raise AotUnavailable(
                    f'--aot={spec} needs the CUDA plugin (jax-cuda13-plugin), which is not '
                    'installed',
                    '',
                )
            config = gpu_target_config(name)
            devices = topologies.get_topology_desc(
                name, platform='cuda', target_config=config, topology=topology
            ).devices
    except AotUnavailable as e:
        raise AotUnavailable(f'{e.message}; {AOT_INSTALL_HINT}') from None
    except (RuntimeError, ValueError, NotImplementedError) as e:
        raise errors.ConfigError(f'--aot={spec}: {errors.one_line(e)}') from e
    kind = devices[0].device_kind
    if platform == 'tpu':
        row = next((r for r in TPU_MEMORY if r[0] in kind.lower()), None)
        if row is None:
            raise errors.ConfigError(f'--aot={spec}: no published memory figures for {kind!r}')
        memory, bandwidth = row[1], row[2]
    else:
        memory = int(_proto_number(config, 'device_memory_size'))
        bandwidth = _proto_number(config, 'memory_bandwidth')
    return Target(spec, platform, tuple(devices), memory, bandwidth, flops.peak_flops(kind))


# --- Memory budget ---------------------------------------------------------------------------------


def pool_fraction(platform: str) -> tuple[float, str]:
    """The share of device memory JAX's allocator may use on `platform`, and why."""
    if platform != 'cuda':
        return 1.0, 'all of the device memory'
    if os.environ.get('XLA_PYTHON_CLIENT_ALLOCATOR', '') == 'platform':
        return 1.0, 'XLA_PYTHON_CLIENT_ALLOCATOR=platform: all of the device memory'
    fraction = os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION')
    if fraction:
        return float(fraction), f'XLA_PYTHON_CLIENT_MEM_FRACTION={fraction}'
    return DEFAULT_GPU_MEM_FRACTION, "75%: JAX's default GPU pool"


def memory_budget(platform: str, device_memory_bytes: int) -> tuple[int, str]:
    """Bytes a compiled step may peak at per device, and how that was worked out."""
    fraction, why = pool_fraction(platform)
    budget = int(device_memory_bytes * fraction * (1 - ALLOCATOR_MARGIN))
    return budget, (
        f'{budget / GIB:.1f} GiB = {device_memory_bytes / GIB:.1f} GiB x {fraction:g} ({why}) '
        f'less a {ALLOCATOR_MARGIN:.0%} allocator margin'
    )


def device_budget(device: jax.Device) -> tuple[int, str] | None:
    """The budget of a real device from its allocator's limit (None where it reports none)."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # Some backends raise instead of returning None.
        stats = {}
    if 'bytes_limit' not in stats:
        return None
    limit = int(stats['bytes_limit'])
    budget = int(limit * (1 - ALLOCATOR_MARGIN))
    return budget, (
        f'{budget / GIB:.1f} GiB = the allocator limit {limit / GIB:.1f} GiB of '
        f'{device.device_kind} less a {ALLOCATOR_MARGIN:.0%} margin'
    )


# --- Compiling the step ----------------------------------------------------------------------------


def abstract_batch(config: ml_collections.ConfigDict, batch_sharding) -> dict:
    """Shapes of a global batch as the input pipeline delivers it (`cmid_jax.data.views`)."""
    b, size = config.batch_size, config.data.image_size
    grid = size // config.mask.patch_size
    image = jax.ShapeDtypeStruct(
        (b, size, size, num_bands(config.data)),
        np.dtype(config.data.get('dtype') or 'uint8'),
        sharding=batch_sharding,
    )
    loc = jax.ShapeDtypeStruct((b, grid, grid, 2), np.float32, sharding=batch_sharding)
    return {'img_a': image, 'img_b': image, 'loc_a': loc, 'loc_b': loc}


@dataclasses.dataclass
class CompiledStep:
    """One compile of the train step: XLA's figures, or the compiler's refusal."""

    policy: str
    per_device_batch: int
    compile_s: float
    attention_impl: str | None
    memory: dict | None = None  # argument/output/alias/temp/peak bytes.
    cost: dict | None = None  # flops, bytes accessed (per device) and where they come from.
    refusal: str | None = None  # The compiler's own line when it refused (out of memory).
    hlo_text: str | None = None

    @property
    def peak_bytes(self) -> int | None:
        return self.memory['peak_bytes'] if self.memory else None


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {
        'argument_bytes': int(m.argument_size_in_bytes),
        'output_bytes': int(m.output_size_in_bytes),
        'alias_bytes': int(m.alias_size_in_bytes),
        'temp_bytes': int(m.temp_size_in_bytes),
        'generated_code_bytes': int(m.generated_code_size_in_bytes),
    }
    # Donated state aliases the outputs: live at once are the arguments, the temporaries and the
    # outputs that are not the donated arguments' buffers.
    out['peak_bytes'] = (
        out['argument_bytes'] + out['output_bytes'] - out['alias_bytes'] + out['temp_bytes']
    )
    return out


def _cost(compiled, lowered, num_devices: int) -> dict:
    """XLA's flops and bytes accessed per device.

    Where the backend has a cost analysis (TPU), the compiled program's. The CUDA plugin has none:
    then the flops are XLA's count of the program before optimisation over the devices, and the
    bytes XLA's (CPU) cost analysis of the compiled per-device program, which counts each fusion's
    operands and results, plus the operands and results of its library calls (cuBLAS, cuDNN),
    which that analysis cannot see into.
    """
    try:
        analysis = compiled.cost_analysis()
    except NotImplementedError:
        analysis = None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if analysis and analysis.get('flops'):
        return {
            'xla_flops_per_device': float(analysis['flops']),
            'xla_bytes_accessed_per_device': float(analysis.get('bytes accessed', 0)) or None,
            'xla_cost_source': 'compiled program',
        }
    from jax._src.lib import _jax  # pylint: disable=import-outside-toplevel

    cpu = jax.devices('cpu')[0].client
    before = _jax.hlo_module_cost_analysis(cpu, lowered.compiler_ir('hlo').as_hlo_module())
    module = compiled.runtime_executable().hlo_modules()[0]
    after = _jax.hlo_module_cost_analysis(cpu, module)
    calls, call_bytes = _library_calls(compiled.as_text())
    return {
        'xla_flops_per_device': float(before['flops']) / num_devices,
        # Each library call counts -1 byte in XLA's analysis (unknown).
        'xla_bytes_accessed_per_device': float(after['bytes accessed']) + calls + call_bytes,
        'xla_cost_source': 'flops: the program before optimisation / devices; bytes: the '
        "compiled program (fusions: XLA's cost analysis; library calls: operands and results)",
    }


_HLO_ITEMSIZE = {'s16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4}
_HLO_ITEMSIZE.update({'s64': 8, 'u64': 8, 'f64': 8})
_HLO_ARRAY = re.compile(r'\b(pred|[suf]\d+|bf16|f8e\w+)\[([\d,]*)\]')


def _library_calls(hlo_text: str) -> tuple[int, int]:
    """(count, operand + result bytes) of the custom calls in compiled HLO text (1-D byte
    arrays, the calls' scratch workspaces, left out)."""
    count = total = 0
    for line in hlo_text.splitlines():
        if ' custom-call(' not in line:
            continue
        count += 1
        for dtype, dims in _HLO_ARRAY.findall(line.split('custom_call_target=')[0]):
            if dtype in ('s8', 'u8') and ',' not in dims:
                continue
            size = math.prod(int(d) for d in dims.split(',') if d)
            total += size * _HLO_ITEMSIZE.get(dtype, 1)  # 1: pred, 8-bit and 8-bit floats.
    return count, total


def _out_of_memory(error: Exception) -> str | None:
    """The compiler's line when `error` is its refusal for lack of memory, else None."""
    text = str(error)
    if 'RESOURCE_EXHAUSTED' not in text:
        return None
    return errors.one_line(error)


def compile_step(
    config: ml_collections.ConfigDict,
    devices: Sequence,
    platform: str,
    per_device_batch: int,
    policy: str,
    *,
    keep_hlo: bool = False,
) -> CompiledStep:
    """Compiles `config`'s train step over `devices` (data parallel, as in training) at
    `per_device_batch` images per device with `model.remat=policy`."""
    config = editable(config)
    config.batch_size = per_device_batch * len(devices)
    config.model.remat = policy
    config = resolve(
        config, num_devices=len(devices), num_processes=len({d.process_index for d in devices})
    )
    mesh = parallel.make_mesh(list(devices))
    replicated, batch_sharding = parallel.shardings(mesh)
    # The schedules change values, not the program's size or cost.
    step_fn = TrainStep.create(config, optim.Schedule(1000, 100), platform=platform)
    state = parallel.with_sharding(step_fn.abstract_state, replicated)
    batch = abstract_batch(config, batch_sharding)
    options = GPU_COMPILER_OPTIONS if platform == 'cuda' else None
    attention_impl = getattr(step_fn.nets.backbone, 'attention_impl', None)
    start = time.perf_counter()
    lowered = step_fn.jit(replicated, batch_sharding, replicated).lower(state, batch)
    try:
        compiled = lowered.compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as e:
        refusal = _out_of_memory(e)
        if refusal is None:
            raise
        seconds = time.perf_counter() - start
        return CompiledStep(policy, per_device_batch, seconds, attention_impl, refusal=refusal)
    seconds = time.perf_counter() - start
    return CompiledStep(
        policy,
        per_device_batch,
        seconds,
        attention_impl,
        memory=_memory(compiled),
        cost=_cost(compiled, lowered, len(devices)),
        hlo_text=compiled.as_text() if keep_hlo else None,
    )


def fits(step: CompiledStep, budget_bytes: int) -> bool:
    return step.refusal is None and step.peak_bytes <= budget_bytes


# --- The largest batch -----------------------------------------------------------------------------


def batch_cap(config: ml_collections.ConfigDict, num_devices: int) -> int | None:
    """The largest per-device batch the config allows (the queue holds 2 x batch keys)."""
    if not config.loss.use_global:
        return None
    return config.loss.queue_size // (2 * num_devices)


def largest_batch(
    fits_at: Callable[[int], bool],
    *,
    start: int = 256,
    step: int = 8,
    cap: int | None = None,
    estimate: Callable[[], int | None] | None = None,
) -> int:
    """The largest multiple of `step` (up to `cap`) for which `fits_at` holds; 0 if none does.

    Bisection on a bracket [fits, does not fit], found by doubling from `start` (or starting from
    [0, start] when `start` does not fit). Fitting is taken to be monotone in the batch.
    `estimate()`, if given, proposes the next probe from what was compiled so far (peak memory is
    close to linear in the batch), which saves compiles; probes stay inside the bracket and the
    bracket still closes to adjacent multiples of `step`.
    """
    top = None if cap is None else cap // step * step
    if top is not None and top < step:
        return 0
    probe = max(step, start // step * step)
    if top is not None:
        probe = min(probe, top)
    lo, hi = 0, None  # The largest batch known to fit, the smallest known not to.
    while hi is None:
        if not fits_at(probe):
            hi = probe
            break
        lo = probe
        if top is not None and probe >= top:
            return probe
        guess = estimate() if estimate else None
        probe = probe * 2 if guess is None else max(guess // step * step, probe + step)
        if top is not None:
            probe = min(probe, top)
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        guess = estimate() if estimate else None
        if guess is not None and lo < guess // step * step < hi:
            mid = guess // step * step
        mid = max(mid, lo + step)
        if fits_at(mid):
            lo = mid
        else:
            hi = mid
    return lo


# --- model.remat='auto' ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RematChoice:
    policy: str
    reason: str  # One line: which and why.
    steps: tuple[CompiledStep, ...] = ()  # The compiles tried, lightest policy first.


def choose_remat(
    config: ml_collections.ConfigDict,
    devices: Sequence | None = None,
    *,
    platform: str | None = None,
    budget: tuple[int, str] | None = None,
    device_memory_bytes: int | None = None,
    compile_fn: Callable[..., CompiledStep] = compile_step,
) -> RematChoice:
    """`config.model.remat`, or for 'auto' the lightest policy (none, dots, full) whose compiled
    step fits `devices` (default: every device) at `config.batch_size` global images.

    The budget is `budget` (bytes, why) when given (tests force a small one), else the devices'
    allocator limit, else `memory_budget` of `device_memory_bytes` (AOT targets). On a CPU 'auto'
    is 'none' without compiling: host memory. Raises `DoesNotFit` (one line, naming the per-device
    batch that fits with 'full') when no policy fits.
    """
    requested = config.model.remat
    if requested != 'auto':
        remat_lib.check(requested)
        return RematChoice(requested, f'model.remat={requested!r} as configured')
    devices = list(devices if devices is not None else jax.devices())
    platform = platform or _platform(devices[0])
    if budget is None and platform == 'cpu':
        return RematChoice(
            'none',
            "model.remat='auto' -> 'none': on the CPU activations live in host memory, so the "
            'step is not compiled to check',
        )
    if budget is None:
        budget = device_budget(devices[0])
    if budget is None:
        if device_memory_bytes is None:
            raise ValueError(f'no memory budget for {devices[0].device_kind}')
        budget = memory_budget(platform, device_memory_bytes)
    limit, why = budget
    per_device = config.batch_size // len(devices)
    policy, tried = lightest_fitting(config, devices, platform, limit, compile_fn)
    if policy is not None:
        return RematChoice(policy, _choice_line(tried, per_device, why), tuple(tried))

    def full_fits(batch: int) -> bool:
        return fits(compile_fn(config, devices, platform, batch, 'full'), limit)

    cap = min(per_device - 1, batch_cap(config, len(devices)) or per_device)
    largest = largest_batch(full_fits, start=per_device // 2, cap=cap)
    raise DoesNotFit(
        f'the train step at {per_device} images per device does not fit '
        f'{devices[0].device_kind} even with model.remat=full ({_needs(tried[-1])}; budget {why}); '
        + (
            f'{largest} images per device fit: --config.batch_size={largest * len(devices)}'
            if largest
            else 'not even 8 images per device fit'
        ),
        'set --config.batch_size lower, or run on more devices',
    )


def lightest_fitting(
    config: ml_collections.ConfigDict,
    devices: Sequence,
    platform: str,
    limit: int,
    compile_fn: Callable[..., CompiledStep] = compile_step,
) -> tuple[str | None, list[CompiledStep]]:
    """The first of none, dots, full whose step fits `limit` bytes (None if none does), and the
    compiles tried."""
    per_device = config.batch_size // len(devices)
    tried = []
    for policy in remat_lib.POLICIES:
        tried.append(compile_fn(config, devices, platform, per_device, policy))
        if fits(tried[-1], limit):
            return policy, tried
    return None, tried


def _choice_line(tried: list[CompiledStep], per_device: int, why: str) -> str:
    step, lighter = tried[-1], '; '.join(_needs(s) for s in tried[:-1])
    return (
        f"model.remat='auto' -> {step.policy!r} for {per_device} images per device: "
        f'{_needs(step)}' + (f', while {lighter}' if lighter else '') + f'; budget {why}'
    )


def _needs(step: CompiledStep) -> str:
    if step.refusal is not None:
        return f'{step.policy!r} refused by the compiler ({step.refusal})'
    return f'{step.policy!r} needs {step.peak_bytes / GIB:.2f} GiB'


def _platform(device) -> str:
    from cmid_jax.models import attention  # pylint: disable=import-outside-toplevel

    return attention.current_platform(device)


def resolve_remat(config: ml_collections.ConfigDict, devices: Sequence | None = None) -> str:
    """The remat policy the run uses on `devices` (the train loop's one call); logs the choice."""
    choice = choose_remat(config, devices)
    if config.model.remat == 'auto':
        logging.info('%s.', choice.reason)
    return choice.policy


# --- The AOT record --------------------------------------------------------------------------------


def _roofline(step: CompiledStep, target: Target) -> dict:
    """A bound on images/s per device from peak FLOP/s and memory bandwidth: never a measurement."""
    flops_dev = step.cost['xla_flops_per_device'] if step.cost else None
    bytes_dev = step.cost['xla_bytes_accessed_per_device'] if step.cost else None
    times = {}
    if flops_dev and target.peak_bf16_flops:
        times['compute'] = flops_dev / target.peak_bf16_flops
    if bytes_dev and target.memory_bandwidth:
        times['memory'] = bytes_dev / target.memory_bandwidth
    if not times:
        return {'roofline_images_per_s_bound': None, 'roofline_bound_by': None}
    by = max(times, key=times.get)
    return {
        'roofline_images_per_s_bound': step.per_device_batch / times[by],
        'roofline_bound_by': by,
        'roofline_step_ms_bound': 1e3 * times[by],
    }


def all_reduce_group_sizes(hlo_text: str) -> list[int]:
    """The replica-group sizes of the all-reduces in compiled HLO text."""
    sizes = []
    for line in hlo_text.splitlines():
        if not re.search(r'\ball-reduce(-start)?\(', line):
            continue
        groups = re.search(r'replica_groups=(\S+(?: \{[^}]*\})?)', line)
        if not groups:
            continue
        text = groups.group(1)
        if m := re.match(r'mesh\[([^\]]*)\] \{([^}]*)\}', text):
            axes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
            sizes.append(math.prod(int(axes[a]) for a in re.findall(r"'(\w+)'", m.group(2))))
        elif m := re.match(r'\[(\d+),(\d+)\]<=', text):
            sizes.append(int(m.group(2)))
        elif m := re.match(r'\{\{([^}]*)\}', text):
            sizes.append(len(m.group(1).split(',')))
    return sizes


def aot_record(
    config: ml_collections.ConfigDict,
    target: Target,
    *,
    config_name: str | None = None,
    budget: tuple[int, str] | None = None,
    hlo_path: str | None = None,
) -> dict:
    """Compiles `config`'s step for `target` at `config.batch_size` global images; one record."""
    n = len(target.devices)
    if config.batch_size % n:
        raise errors.ConfigError(
            f'batch_size={config.batch_size} must be a multiple of the {n} devices of {target.name}'
        )
    per_device = config.batch_size // n
    budget = budget or memory_budget(target.platform, target.device_memory_bytes)
    compile_fn = functools.partial(compile_step, keep_hlo=bool(hlo_path))
    devices, platform = target.devices, target.platform
    if config.model.remat == 'auto':
        policy, tried = lightest_fitting(config, devices, platform, budget[0], compile_fn)
        step = tried[-1]
        reason = (
            _choice_line(tried, per_device, budget[1])
            if policy
            else f"model.remat='auto': no policy fits ({'; '.join(_needs(s) for s in tried)})"
        )
    else:
        remat_lib.check(config.model.remat)
        step = compile_fn(config, devices, platform, per_device, config.model.remat)
        reason = f'model.remat={config.model.remat!r} as configured'
    record = _record(config, target, step, budget, config_name)
    record['remat_requested'] = config.model.remat
    record['remat_reason'] = reason
    if step.hlo_text is not None:
        Path(hlo_path).write_text(step.hlo_text)
        sizes = all_reduce_group_sizes(step.hlo_text)
        record['largest_all_reduce_devices'] = max(sizes) if sizes else None
    return record


def aot_max_batch(
    config: ml_collections.ConfigDict,
    target: Target,
    *,
    config_name: str | None = None,
    budget: tuple[int, str] | None = None,
) -> dict:
    """The largest per-device batch (a multiple of 8) whose step fits `target` with the config's
    remat policy ('auto': the lightest that fits at `config.batch_size`), and that step's record."""
    budget = budget or memory_budget(target.platform, target.device_memory_bytes)
    n = len(target.devices)
    policy = config.model.remat
    if policy == 'auto':
        policy = lightest_fitting(config, target.devices, target.platform, budget[0])[0] or 'full'
    steps: dict[int, CompiledStep] = {}

    def compiled(batch: int) -> CompiledStep:
        if batch not in steps:
            steps[batch] = compile_step(config, target.devices, target.platform, batch, policy)
        return steps[batch]

    def estimate() -> int | None:
        """Where the peak meets the budget on a line through the compiled peaks (through the
        state alone at batch 0 while there is one)."""
        points = sorted((b, s.peak_bytes) for b, s in steps.items() if s.peak_bytes is not None)
        if len(points) == 1:
            b = points[0][0]
            points.insert(0, (0, steps[b].memory['argument_bytes']))
        if len(points) < 2 or points[-1][1] <= points[0][1]:
            return None
        (b0, p0), (b1, p1) = points[0], points[-1]
        return int(b0 + (budget[0] - p0) * (b1 - b0) / (p1 - p0))

    largest = largest_batch(
        lambda b: fits(compiled(b), budget[0]),
        start=config.batch_size // n,
        cap=batch_cap(config, n),
        estimate=estimate,
    )
    best = compiled(largest) if largest else compiled(min(steps))
    record = _record(config, target, best, budget, config_name)
    record.update(
        remat_requested=config.model.remat,
        max_per_device_batch=largest,
        max_batch_compiles=sorted(
            (b, s.peak_bytes if s.refusal is None else None) for b, s in steps.items()
        ),
    )
    return record


def _record(
    config: ml_collections.ConfigDict,
    target: Target,
    step: CompiledStep,
    budget: tuple[int, str],
    config_name: str | None,
) -> dict:
    n = len(target.devices)
    m = config.model
    resolved = editable(config)
    resolved.batch_size = step.per_device_batch * n
    model = flops.step_flops(flops.StepShape.from_config(resolved), resolved.batch_size)
    memory = step.memory or {}
    record = {
        'aot': True,
        'target': target.name,
        'platform': target.platform,
        'device_kind': target.device_kind,
        'devices': n,
        'hosts': target.hosts,
        'config': config_name,
        'arch': m.arch,
        'variant': m.variant,
        'image_size': config.data.image_size,
        'compute_dtype': m.compute_dtype,
        'global_batch': step.per_device_batch * n,
        'per_device_batch': step.per_device_batch,
        'attention_impl': step.attention_impl,
        'remat': step.policy,
        'compile_s': round(step.compile_s, 2),
        'fits': fits(step, budget[0]),
        'compiler_message': step.refusal,
        **{k: memory.get(k) for k in _MEMORY_FIELDS},
        'peak_gib': memory['peak_bytes'] / GIB if memory else None,
        'device_memory_bytes': target.device_memory_bytes,
        'memory_budget_bytes': budget[0],
        'memory_budget': budget[1],
        'headroom_bytes': budget[0] - memory['peak_bytes'] if memory else None,
        **(
            step.cost
            or dict.fromkeys(
                ('xla_flops_per_device', 'xla_bytes_accessed_per_device', 'xla_cost_source')
            )
        ),
        'model_flops_per_device': model['per_step'] / n,
        'peak_bf16_flops': target.peak_bf16_flops,
        'memory_bandwidth_bytes_per_s': target.memory_bandwidth,
        **_roofline(step, target),
        'versions': compiler_versions(),
    }
    return record


_MEMORY_FIELDS = ('argument_bytes', 'output_bytes', 'alias_bytes', 'temp_bytes', 'peak_bytes')
