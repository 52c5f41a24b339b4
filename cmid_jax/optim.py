"""Adan optimizer and the per-step schedules of the official recipe (cmid-method.md section 8, D5-D6).

`adan` follows the official CMID Adan (`Pretrain/adan.py`, the sail-sg algorithm that timm's
`Adan` also implements), not `optax.adan`, whose update differs (issue 14; see `scale_by_adan`).

All schedules take the (possibly traced) integer step so they run inside the jitted train step
without recompiling.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

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


def learning_rate_fn(
    schedule: Schedule, base_lr: float, min_lr: float, warmup_epochs: float, warmup_factor: float
):
    """Per-step cosine from base_lr to min_lr over all steps, times an mmcv-style linear warm-up.

    During warm-up the factor ramps linearly from `warmup_factor` at step 0 to 1 at the end of
    `warmup_epochs`; it multiplies the cosine value (mmcv `LinearWarmup` on top of `CosineAnnealing`).
    """
    warmup_steps = max(int(round(warmup_epochs * schedule.steps_per_epoch)), 0)

    def lr(step):
        t = jnp.asarray(step, jnp.float32)
        cosine = min_lr + (base_lr - min_lr) * 0.5 * (
            1 + jnp.cos(jnp.pi * t / schedule.total_steps)
        )
        if warmup_steps == 0:
            return cosine
        ramp = 1.0 - (1.0 - t / warmup_steps) * (1.0 - warmup_factor)
        return jnp.where(t < warmup_steps, cosine * ramp, cosine)

    return lr


def ema_momentum(
    step: jax.Array, total_steps: int, base: float = 0.996, final: float = 1.0
) -> jax.Array:
    """Teacher momentum: cosine from `base` at step 0 to `final` at `total_steps`."""
    t = jnp.asarray(step, jnp.float32)
    return final - (final - base) * (jnp.cos(jnp.pi * t / total_steps) + 1) / 2


def weight_decay_mask(params):
    """Decay only tensors with ndim > 1 (no biases, norms or the mask token; D5)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


class AdanState(NamedTuple):
    """State of `scale_by_adan`: the same fields, in the same order, as `optax.ScaleByAdanState`.

    m, v and n are the EMAs of the gradient, of the gradient difference and of the squared
    Nesterov term, g the previous gradient and t the number of steps taken. Keeping optax's layout
    lets checkpoints written with `optax.adan` (before issue 14) restore as they are; their m, v,
    g and t mean the same here, their n averaged (g + (1 - b2) diff)^2 instead of
    (g + b2 diff)^2 and drifts to the new definition with time constant 1 / (1 - b3) = 100 steps.
    """

    m: optax.Updates
    v: optax.Updates
    n: optax.Updates
    g: optax.Updates
    t: jax.Array


def _one_minus_power(b: float, t: jax.Array) -> jax.Array:
    """1 - b**t in float32 without the cancellation of `1 - b**t` at small t (b is a Python float)."""
    return -jnp.expm1(t.astype(jnp.float32) * math.log(b))


def scale_by_adan(
    b1: float = 0.98, b2: float = 0.92, b3: float = 0.99, eps: float = 1e-8
) -> optax.GradientTransformation:
    """The Adan direction exactly as the official CMID code (`Pretrain/adan.py`, sail-sg Adan).

    With the gradient g, d = g - g_prev (0 at the first step) and the step count t from 1:
        m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) d,   n = b3 n + (1 - b3) (g + b2 d)^2
        u = (m / (1 - b1^t) + b2 v / (1 - b2^t)) / (sqrt(n) / sqrt(1 - b3^t) + eps)
    `optax.scale_by_adan` differs in two places: it weights d by 1 - b2 instead of b2 (in n and in
    u), and `optax.adan` adds eps_root = 1e-8 under the square root (issue 14).
    """

    def init_fn(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return AdanState(m=zeros(), v=zeros(), n=zeros(), g=zeros(), t=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        first = state.t == 0
        diff = jax.tree.map(
            lambda g, prev: jnp.where(first, jnp.zeros_like(g), g - prev), updates, state.g
        )
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.m, updates)
        v = jax.tree.map(lambda v, d: b2 * v + (1 - b2) * d, state.v, diff)
        n = jax.tree.map(
            lambda n, g, d: b3 * n + (1 - b3) * jnp.square(g + b2 * d), state.n, updates, diff
        )
        t = optax.safe_increment(state.t)
        c1, c2 = _one_minus_power(b1, t), _one_minus_power(b2, t)
        sqrt_c3 = jnp.sqrt(_one_minus_power(b3, t))

        def direction(m, v, n):
            u = m / c1.astype(m.dtype) + b2 * v / c2.astype(m.dtype)
            return u / (jnp.sqrt(n) / sqrt_c3.astype(n.dtype) + eps)

        u = jax.tree.map(direction, m, v, n)
        return u, AdanState(m=m, v=v, n=n, g=updates, t=t)

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_learning_rate_prox(
    learning_rate: optax.ScalarOrSchedule, weight_decay: float, mask=None
) -> optax.GradientTransformation:
    """-lr (u + wd p) / (1 + lr wd) on decayed leaves, -lr u elsewhere: after
    `add_decayed_weights` this is the official proximal step p <- (p - lr u) / (1 + lr wd).

    Its state is that of `optax.scale_by_learning_rate`: a `ScaleByScheduleState` step count for a
    schedule, `EmptyState` for a constant.
    """
    scheduled = callable(learning_rate)

    def init_fn(params):
        del params
        if scheduled:
            return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        lr = jnp.asarray(learning_rate(state.count) if scheduled else learning_rate, jnp.float32)
        decayed = mask(updates) if callable(mask) else mask
        if decayed is None:
            decayed = jax.tree.map(lambda _: True, updates)
        prox = 1.0 / (1.0 + lr * weight_decay)
        updates = jax.tree.map(
            lambda u, d: (-lr * jnp.where(d, prox, 1.0)).astype(u.dtype) * u, updates, decayed
        )
        if scheduled:
            state = optax.ScaleByScheduleState(count=optax.safe_increment(state.count))
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def adan(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    *,
    b1: float = 0.98,
    b2: float = 0.92,
    b3: float = 0.99,
    eps: float = 1e-8,
    mask=weight_decay_mask,
    prox: bool = False,
) -> optax.GradientTransformation:
    """Adan as in the official CMID code: betas (0.98, 0.92, 0.99), eps 1e-8, bias-corrected.

    Weight decay on the leaves `mask` selects (ndim > 1 by default): decoupled (D5, the default)
    p <- p - lr (u + wd p), i.e. timm's `no_prox=True`; with `prox=True` the official default
    p <- (p - lr u) / (1 + lr wd). The two agree to first order in lr wd.

    The state is (AdanState, MaskedState(EmptyState), ScaleByScheduleState) for a schedule, the
    layout of `optax.adan`'s whatever `prox` is, so checkpoints written with `optax.adan` (before
    issue 14) restore into it; see `AdanState` for what their moments mean.
    """
    if prox:
        last = scale_by_learning_rate_prox(learning_rate, weight_decay, mask)
    else:
        last = optax.scale_by_learning_rate(learning_rate)
    return optax.chain(
        scale_by_adan(b1, b2, b3, eps), optax.add_decayed_weights(weight_decay, mask), last
    )
