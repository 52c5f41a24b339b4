"""Per-device memory of the CMID train step, worked out without an accelerator.

Three figures, one JSON record per config (`cmid-benchmark --memory`):

* state: the train state every device holds (student, teacher, Adan moments, queue, centre), from
  `jax.eval_shape`, so nothing is allocated;
* saved activations: the arrays the forward pass keeps for the backward pass, read off the traced
  program of `jax.vjp(loss)`; they depend on the model, batch, dtype, attention and remat policy,
  not on the platform, and dominate the peak at large batch. Arrays the step receives as
  arguments (the weights) are part of the state and are not counted again;
* XLA's buffer assignment (`compiled.memory_analysis()`) where the current platform compiles the
  step: the real peak of that platform's program (XLA may fuse cheap elementwise ops into their
  consumers and so hold fewer arrays than the traced program saves).

The traced figure is an upper bound of what a GPU or TPU program keeps, up to XLA's own
rematerialisation; `saved + state` is what `tests/test_memory.py` holds the official recipes to.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core as jex
import ml_collections
import numpy as np

from cmid_jax import optim
from cmid_jax.config_resolve import resolve
from cmid_jax.errors import ConfigError
from cmid_jax.models import attention
from cmid_jax.perf.aot import resolve_remat
from cmid_jax.perf.synthetic import synthetic_batch
from cmid_jax.step import TrainStep

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Residual:
    """One array kept from the forward to the backward pass."""

    shape: tuple[int, ...]
    dtype: str
    producer: str  # The primitive that computed it, e.g. 'dot_general', 'exp', 'erf'.

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def saved_residuals(
    fun: Callable, primal: Any, *consts: Any, has_aux: bool = False
) -> list[Residual]:
    """The arrays reverse-mode differentiation of `fun(primal, *consts)` with respect to `primal`
    keeps for the backward pass, each array once; the inputs themselves are not counted.

    Arguments may be `jax.ShapeDtypeStruct`s: the function is only traced.
    """

    def forward(primal, *consts):
        return jax.vjp(lambda p: fun(p, *consts), primal, has_aux=has_aux)[1]  # vjp_fn: residuals

    jaxpr = jax.make_jaxpr(forward)(primal, *consts).jaxpr
    inputs = set(jaxpr.invars)
    producers = {}
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == 'reduce_precision':  # Marks values remat saves; name what computed them.
            name = producers.get(eqn.invars[0], name)
        producers.update((v, name) for v in eqn.outvars)
    seen, out = set(), []
    for v in jaxpr.outvars:
        if isinstance(v, jex.Literal) or v in inputs or v in seen:
            continue
        seen.add(v)
        out.append(Residual(tuple(v.aval.shape), str(v.aval.dtype), producers.get(v, 'constant')))
    return out


def tree_bytes(tree: Any) -> int:
    return sum(
        int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )


def largest(residuals: list[Residual], n: int = 5) -> list[dict]:
    """The `n` (shape, dtype, producer) groups holding the most bytes, with their counts."""
    groups = collections.Counter(residuals)
    rows = [
        dict(
            shape=list(r.shape), dtype=r.dtype, producer=r.producer, count=k, gib=k * r.nbytes / GIB
        )
        for r, k in groups.items()
    ]
    return sorted(rows, key=lambda row: -row['gib'])[:n]


def xla_memory(compiled) -> dict | None:
    """XLA's buffer sizes of a compiled program, or None where the backend reports none."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # Not every backend implements it; the figure is informative only.
        return None
    if m is None:
        return None
    fields = (
        'argument_size_in_bytes',
        'output_size_in_bytes',
        'alias_size_in_bytes',
        'temp_size_in_bytes',
        'generated_code_size_in_bytes',
    )
    out = {f: int(getattr(m, f)) for f in fields}
    # Donated state aliases the outputs: live at once are the arguments, the temporaries and the
    # outputs that are not the donated arguments' buffers.
    out['peak_estimate_bytes'] = (
        out['argument_size_in_bytes']
        + out['output_size_in_bytes']
        - out['alias_size_in_bytes']
        + out['temp_size_in_bytes']
    )
    return out


def memory_report(
    config: ml_collections.ConfigDict,
    per_device_batch: int,
    *,
    platform: str | None = None,
    compile_step: bool = True,
    config_name: str | None = None,
) -> dict:
    """Per-device memory of `config`'s train step at `per_device_batch` source images.

    The step is data parallel (replicated state), so one device at that batch is each device of a
    larger mesh. `platform` ('cuda', 'tpu', 'cpu'; None = this machine's) resolves
    `model.attention_impl='auto'` for the device the figures are meant for. XLA's memory analysis
    needs the step compiled for this machine, so it is null when `platform` names another.
    """
    config = config.copy_and_resolve_references()
    config.batch_size = per_device_batch
    here = attention.current_platform()
    platform = platform or here
    if config.model.remat == 'auto':
        if platform != here:
            raise ConfigError(
                f"model.remat='auto' is chosen on the device the step runs on, not {platform} "
                'from here',
                'pass --config.model.remat=none, dots or full, or compile for the target with '
                '--aot=TARGET',
            )
        config.model.remat = resolve_remat(resolve(config), jax.devices()[:1])
    config = resolve(config, num_devices=1)
    step_fn = TrainStep.create(config, optim.Schedule(1, 1), platform=platform)
    state = step_fn.abstract_state
    batch = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
        synthetic_batch(0, per_device_batch, config.data.image_size),
    )

    def loss_of_params(params, state, batch):
        return step_fn.objective(state, batch)[0](params)

    residuals = saved_residuals(loss_of_params, state['params'], state, batch, has_aux=True)
    saved = sum(r.nbytes for r in residuals)
    state_bytes = tree_bytes(state)
    xla = None
    if compile_step and platform == here:
        step = jax.jit(step_fn, donate_argnums=(0,))
        xla = xla_memory(step.lower(state, batch).compile())
    m = config.model
    return {
        'config': config_name,
        'arch': m.arch,
        'variant': m.variant,
        'image_size': config.data.image_size,
        'compute_dtype': m.compute_dtype,
        'platform': platform,
        'attention_impl': getattr(step_fn.nets.backbone, 'attention_impl', None),
        'remat': m.remat,
        'per_device_batch': per_device_batch,
        'state_gib': state_bytes / GIB,
        'params_gib': tree_bytes(state['params']) / GIB,
        'batch_gib': tree_bytes(batch) / GIB,
        'saved_activations_gib': saved / GIB,
        'saved_activations_count': len(residuals),
        'saved_plus_state_gib': (saved + state_bytes) / GIB,
        'largest_saved': largest(residuals),
        'xla_platform': here if xla else None,
        'xla': xla,
    }
