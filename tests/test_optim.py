"""Optimizer and schedules: Adan against a float64 numpy reference and timm's Adan, checkpoints
written with optax.adan (before issue 14), and the learning-rate / EMA schedules."""

import math

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from cmid_jax import optim, parallel
from cmid_jax.config_resolve import resolve
from cmid_jax.step import TrainStep
from cmid_jax.workdir import Workdir
from configs import vitb

B1, B2, B3, EPS = 0.98, 0.92, 0.99, 1e-8
LR, WD, STEPS = 1e-2, 0.3, 6  # wd large enough that decoupled and proximal decay differ visibly.
SHAPES = {'w': (8, 16), 'k': (2, 3, 4), 'b': (16,)}  # 'b' is not decayed (ndim <= 1).


def problem(seed=0):
    """Parameters and a gradient sequence whose elements span 1e-6 to 1 in magnitude, random sign;
    each step's gradients are drawn afresh, so the gradient differences are as large as them."""
    rng = np.random.default_rng(seed)
    signed = lambda shape: rng.choice([-1.0, 1.0], shape) * 10.0 ** rng.uniform(-6, 0, shape)
    params = {k: 0.05 * rng.normal(size=s) for k, s in SHAPES.items()}
    grads = [{k: signed(s) for k, s in SHAPES.items()} for _ in range(STEPS)]
    return params, grads


def numpy_adan(params, grads, lr, wd, prox=False, decayed=None):
    """Official Adan (sail-sg / CMID Pretrain/adan.py) from its formulas, in float64. `lr` is a
    number or one per step; `decayed` names the decayed leaves (default: those with ndim > 1)."""
    lrs = list(lr) if np.ndim(lr) else [lr] * len(grads)
    decayed = {k for k, x in params.items() if x.ndim > 1} if decayed is None else decayed
    p = {k: v.copy() for k, v in params.items()}
    m, v, n = ({k: np.zeros_like(x) for k, x in params.items()} for _ in range(3))
    prev, history = None, []
    for t, (lr, g) in enumerate(zip(lrs, grads), start=1):
        for k in p:
            d = np.zeros_like(g[k]) if prev is None else g[k] - prev[k]
            m[k] = B1 * m[k] + (1 - B1) * g[k]
            v[k] = B2 * v[k] + (1 - B2) * d
            n[k] = B3 * n[k] + (1 - B3) * (g[k] + B2 * d) ** 2
            denom = np.sqrt(n[k]) / math.sqrt(1 - B3**t) + EPS
            u = (m[k] / (1 - B1**t) + B2 * v[k] / (1 - B2**t)) / denom
            decay = wd if k in decayed else 0.0
            if prox:
                p[k] = (p[k] - lr * u) / (1 + lr * decay)
            else:
                p[k] = p[k] - lr * (u + decay * p[k])
        prev = g
        history.append({k: x.copy() for k, x in p.items()})
    return history


def jax_adan(params, grads, tx):
    p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = tx.init(p)
    update = jax.jit(tx.update)
    history = []
    for g in grads:
        u, state = update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state, p)
        p = optax.apply_updates(p, u)
        history.append(jax.device_get(p))
    return history, state


def timm_adan(params, grads, lr, wd, prox=False):
    from timm.optim import Adan

    tp = {k: torch.tensor(x, dtype=torch.float32, requires_grad=True) for k, x in params.items()}
    groups = [
        {'params': [x for x in tp.values() if x.ndim > 1], 'weight_decay': wd},
        {'params': [x for x in tp.values() if x.ndim <= 1], 'weight_decay': 0.0},
    ]
    opt = Adan(groups, lr=lr, betas=(B1, B2, B3), eps=EPS, no_prox=not prox, foreach=False)
    history = []
    for g in grads:
        for k, x in tp.items():
            x.grad = torch.tensor(g[k], dtype=torch.float32)
        opt.step()
        history.append({k: x.detach().numpy().copy() for k, x in tp.items()})
    return history


def assert_same_moves(params, got, want):
    """Each step's parameter change agrees elementwise, to float32 rounding: moves are about lr
    (Adan is sign-like; the smallest here ~1e-3 lr), so an error of 5e-8 = 5e-6 lr is tight, and the
    parameters (|p| ~ 0.05, ulp ~4e-9) add little rounding to the moves."""
    before_got, before_want = params, params
    for t, (g, w) in enumerate(zip(got, want), start=1):
        for k in params:
            np.testing.assert_allclose(
                g[k] - before_got[k],
                w[k] - before_want[k],
                rtol=1e-5,
                atol=5e-8,
                err_msg=f'step {t}, leaf {k}',
            )
            np.testing.assert_allclose(g[k], w[k], rtol=0, atol=1e-7, err_msg=f'step {t}, leaf {k}')
        before_got, before_want = g, w


@pytest.mark.parametrize('prox', [False, True], ids=['decoupled', 'prox'])
def test_adan_matches_float64_reference(prox):
    params, grads = problem()
    want = numpy_adan(params, grads, LR, WD, prox=prox)
    got, state = jax_adan(params, grads, optim.adan(LR, WD, prox=prox))
    assert_same_moves(params, got, want)
    assert int(state[0].t) == STEPS


@pytest.mark.parametrize('prox', [False, True], ids=['decoupled', 'prox'])
def test_adan_matches_timm(prox):
    """timm.optim.Adan (the sail-sg code) with no_prox=True is D5's decoupled decay, its default
    the official proximal one; vectors go in a weight_decay=0 group, as the ndim > 1 mask."""
    params, grads = problem(seed=1)
    want = timm_adan(params, grads, LR, WD, prox=prox)
    got, _ = jax_adan(params, grads, optim.adan(LR, WD, prox=prox))
    assert_same_moves(params, got, want)
    # The two decay modes differ far beyond the tolerance, on the decayed leaves only.
    other, _ = jax_adan(params, grads, optim.adan(LR, WD, prox=not prox))
    assert np.abs(other[-1]['w'] - got[-1]['w']).max() > 1e-5
    np.testing.assert_array_equal(other[-1]['b'], got[-1]['b'])


@pytest.mark.parametrize('prox', [False, True], ids=['decoupled', 'prox'])
def test_adan_composes_with_schedule_and_mask(prox):
    """A schedule is read at the optimizer's own step count (0, 1, ...) as in optax; another mask
    moves the decay to other leaves."""
    params, grads = problem(seed=2)
    schedule = lambda count: 1e-2 * (count + 1)
    mask = lambda tree: {'w': False, 'k': True, 'b': True}
    want = numpy_adan(
        params, grads, [schedule(s) for s in range(STEPS)], WD, prox=prox, decayed={'k', 'b'}
    )
    got, _ = jax_adan(params, grads, optim.adan(schedule, WD, prox=prox, mask=mask))
    assert_same_moves(params, got, want)


def test_adan_state_has_optax_layout():
    params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
    schedule = lambda count: 1e-3
    old = optax.adan(
        schedule, b1=B1, b2=B2, b3=B3, eps=EPS, weight_decay=WD, mask=optim.weight_decay_mask
    ).init(params)
    for prox in (False, True):
        new = optim.adan(schedule, WD, prox=prox).init(params)
        assert (
            jax.tree_util.tree_structure(new).num_leaves
            == jax.tree_util.tree_structure(old).num_leaves
        )
        assert [
            jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(new)[0]
        ] == [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(old)[0]]
        assert new[0]._fields == old[0]._fields


def test_checkpoint_written_with_optax_adan_restores(tmp_path):
    """A train state saved before issue 14, its opt_state an `optax.adan` state two steps in,
    restores through the current TrainStep / Checkpointer as it was, and the new Adan accepts it."""
    config = vitb.get_config('smoke')
    trainer = TrainStep.create(resolve(config), optim.Schedule(10, steps_per_epoch=4))
    abstract = trainer.abstract_state
    rng = np.random.default_rng(0)
    fill = lambda a: (
        jnp.asarray(rng.uniform(0.1, 1, a.shape), a.dtype)
        if jnp.issubdtype(a.dtype, jnp.floating)
        else jnp.full(a.shape, 2, a.dtype)
    )
    state = jax.tree.map(fill, abstract)
    old_tx = optax.adan(
        trainer.lr_fn,
        b1=B1,
        b2=B2,
        b3=B3,
        eps=EPS,
        weight_decay=config.optim.weight_decay,
        mask=optim.weight_decay_mask,
    )
    # The old layout with every moment filled (running its update on 1M parameters takes seconds).
    state['opt_state'] = jax.tree.map(fill, old_tx.init(state['params']))
    assert type(state['opt_state'][0]) is optax.ScaleByAdanState

    ckpt = Workdir(str(tmp_path)).checkpoints(every_steps=1, keep=1)
    ckpt.save(2, state, iter(grain.MapDataset.range(8).to_iter_dataset()), force=True)
    ckpt.wait()
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored = ckpt.restore(
        2,
        parallel.with_sharding(abstract, sharding),
        iter(grain.MapDataset.range(8).to_iter_dataset()),
    )
    ckpt.close()

    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(abstract)
    saved, got = jax.tree.leaves(state['opt_state']), jax.tree.leaves(restored['opt_state'])
    assert len(saved) == len(got)
    for a, b in zip(got, saved):
        np.testing.assert_array_equal(a, b)
    assert int(restored['opt_state'][0].t) == 2 and int(restored['opt_state'][2].count) == 2
    _, new_opt = jax.eval_shape(
        trainer.tx.update, restored['params'], restored['opt_state'], restored['params']
    )
    assert jax.tree_util.tree_structure(new_opt) == jax.tree_util.tree_structure(
        abstract['opt_state']
    )


# --- schedules --------------------------------------------------------------------------------


def test_ema_momentum_schedule_values():
    total = 1000
    assert float(optim.ema_momentum(0, total)) == pytest.approx(0.996)
    assert float(optim.ema_momentum(500, total)) == pytest.approx(0.998)
    assert float(optim.ema_momentum(250, total)) == pytest.approx(
        1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2
    )
    assert float(optim.ema_momentum(total, total)) == pytest.approx(1.0)


def test_learning_rate_warmup_and_cosine():
    sched = optim.Schedule(total_steps=1000, steps_per_epoch=10)
    lr = optim.learning_rate_fn(
        sched, base_lr=4e-3, min_lr=1e-6, warmup_epochs=10, warmup_factor=0.01
    )
    cosine = lambda t: 1e-6 + (4e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * t / 1000))
    assert float(lr(0)) == pytest.approx(4e-3 * 0.01, rel=1e-5)
    # Half way through warm-up the mmcv ramp is 1 - 0.5 * 0.99.
    assert float(lr(50)) == pytest.approx(cosine(50) * (1 - 0.5 * 0.99), rel=1e-5)
    assert float(lr(100)) == pytest.approx(cosine(100), rel=1e-5)
    assert float(lr(1000)) == pytest.approx(1e-6, rel=1e-4)


def test_weight_decay_mask_skips_vectors():
    mask = optim.weight_decay_mask({'w': jnp.zeros((3, 4)), 'b': jnp.zeros(4), 'tok': jnp.zeros(8)})
    assert mask == {'w': True, 'b': False, 'tok': False}
