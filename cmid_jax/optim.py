"""Adan optimizer and the per-step schedules of the official recipe (cmid-method.md section 8, D5-D6).

All schedules take the (possibly traced) integer step so they run inside the jitted train step
without recompiling.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Step counts that every schedule is defined on."""
    total_steps: int
    steps_per_epoch: int

    def epoch(self, step: jax.Array) -> jax.Array:
        return step // self.steps_per_epoch


def learning_rate_fn(schedule: Schedule, base_lr: float, min_lr: float, warmup_epochs: float,
                     warmup_factor: float):
    """Per-step cosine from base_lr to min_lr over all steps, times an mmcv-style linear warm-up.

    During warm-up the factor ramps linearly from `warmup_factor` at step 0 to 1 at the end of
    `warmup_epochs`; it multiplies the cosine value (mmcv `LinearWarmup` on top of `CosineAnnealing`).
    """
    warmup_steps = max(int(round(warmup_epochs * schedule.steps_per_epoch)), 0)

    def lr(step):
        t = jnp.asarray(step, jnp.float32)
        cosine = min_lr + (base_lr - min_lr) * 0.5 * (1 + jnp.cos(jnp.pi * t / schedule.total_steps))
        if warmup_steps == 0:
            return cosine
        ramp = 1.0 - (1.0 - t / warmup_steps) * (1.0 - warmup_factor)
        return jnp.where(t < warmup_steps, cosine * ramp, cosine)

    return lr


def ema_momentum(step: jax.Array, total_steps: int, base: float = 0.996,
                 final: float = 1.0) -> jax.Array:
    """Teacher momentum: cosine from `base` at step 0 to `final` at `total_steps`."""
    t = jnp.asarray(step, jnp.float32)
    return final - (final - base) * (jnp.cos(jnp.pi * t / total_steps) + 1) / 2


def weight_decay_mask(params):
    """Decay only tensors with ndim > 1 (no biases, norms or the mask token; D5)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def adan(lr_fn, weight_decay: float) -> optax.GradientTransformation:
    """optax Adan with the official betas (0.98, 0.92, 0.99), eps 1e-8 and decoupled decay."""
    return optax.adan(lr_fn, b1=0.98, b2=0.92, b3=0.99, eps=1e-8, weight_decay=weight_decay,
                      mask=weight_decay_mask)
