"""Train step: heads against PyTorch, EMA, queue, and sharded == single-device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from cmid_jax import augment, objective, optim, parallel
from cmid_jax.config_resolve import resolve
from cmid_jax.models.cmid import Networks
from cmid_jax.models.heads import LocalHead, Projector, pixel_shuffle
from cmid_jax.objective import cmid_loss
from cmid_jax.perf.synthetic import synthetic_batch
from cmid_jax.step import TrainStep
from configs import resnet50, swinb, vitb


def make_trainer(config_module, total_steps=10, **overrides):
    config = config_module.get_config('smoke')
    for k, v in overrides.items():
        node = config
        *path, leaf = k.split('.')
        for p in path:
            node = node[p]
        node[leaf] = v
    config = resolve(config)
    return TrainStep.create(config, optim.Schedule(total_steps, steps_per_epoch=4)), config


def run_steps(trainer, devices, batches):
    mesh = parallel.make_mesh(devices)
    replicated, batch_sharding = parallel.shardings(mesh)
    state = jax.jit(trainer.init_state, out_shardings=replicated)(jax.random.key(0))
    step = trainer.jit(replicated, batch_sharding, replicated)
    history = []
    for b in batches:
        state, m = step(state, parallel.global_batch(b, batch_sharding))
        history.append(jax.device_get(m))
    return jax.device_get(state), history


# --- heads and device-side preprocessing against PyTorch / numpy ------------------------------


def test_pixel_shuffle_matches_torch():
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 3 * 4 * 4)).astype(np.float32)
    ours = np.asarray(pixel_shuffle(jnp.asarray(x), 4))
    ref = torch.nn.PixelShuffle(4)(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    np.testing.assert_allclose(ours, ref.numpy(), atol=0)


def test_projector_matches_torch_mlp():
    proj = Projector(hidden_dim=32, out_dim=8)
    x = np.random.default_rng(1).normal(size=(5, 16)).astype(np.float32)
    params = proj.init(jax.random.key(0), jnp.asarray(x))['params']
    ref = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    with torch.no_grad():
        for i, name in ((0, 'fc1'), (2, 'fc2')):
            ref[i].weight.copy_(torch.from_numpy(np.asarray(params[name]['kernel']).T))
            ref[i].bias.copy_(torch.from_numpy(np.asarray(params[name]['bias'])))
        expected = torch.nn.functional.normalize(ref(torch.from_numpy(x)), dim=-1).numpy()
    np.testing.assert_allclose(
        np.asarray(proj.apply({'params': params}, jnp.asarray(x))), expected, atol=1e-6
    )


def test_local_head_matches_torch_conv1d_head_with_batchnorm():
    head = LocalHead(hidden_dim=32, bottleneck_dim=8, prototypes=16, use_bn=True)
    x = np.random.default_rng(2).normal(size=(4, 5, 12)).astype(np.float32)  # (B, N, C)
    variables = head.init(jax.random.key(1), jnp.asarray(x), train=False)
    ours, _ = head.apply(variables, jnp.asarray(x), train=True, mutable=['batch_stats'])
    p = variables['params']
    convs = [torch.nn.Conv1d(12, 32, 1), torch.nn.Conv1d(32, 32, 1), torch.nn.Conv1d(32, 8, 1)]
    bns = [torch.nn.BatchNorm1d(32), torch.nn.BatchNorm1d(32)]
    last = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(8, 16, 1, bias=False))
    with torch.no_grad():
        for conv, name in zip(convs, ('fc1', 'fc2', 'fc3')):
            conv.weight.copy_(torch.from_numpy(np.asarray(p[name]['kernel']).T[..., None]))
            conv.bias.copy_(torch.from_numpy(np.asarray(p[name]['bias'])))
        for bn, name in zip(bns, ('bn1', 'bn2')):
            bn.weight.copy_(torch.from_numpy(np.asarray(p[name]['scale']) + 0.5))
            bn.bias.copy_(torch.from_numpy(np.asarray(p[name]['bias']) + 0.1))
        v = np.asarray(p['prototypes']).T[..., None]
        last.parametrizations.weight.original1.copy_(torch.from_numpy(v))
        last.parametrizations.weight.original0.fill_(1.0)
        h = torch.from_numpy(x).permute(0, 2, 1)
        h = torch.nn.functional.gelu(bns[0](convs[0](h)))
        h = torch.nn.functional.gelu(bns[1](convs[1](h)))
        h = torch.nn.functional.normalize(convs[2](h), dim=1)
        expected = last(h).permute(0, 2, 1).numpy()
    p2 = jax.tree.map(lambda a: a, p)
    for name in ('bn1', 'bn2'):
        p2[name] = {'scale': p[name]['scale'] + 0.5, 'bias': p[name]['bias'] + 0.1}
    ours, _ = head.apply(
        {'params': p2, 'batch_stats': variables['batch_stats']},
        jnp.asarray(x),
        train=True,
        mutable=['batch_stats'],
    )
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5)


def test_prepare_views_normalise_and_mean_fill_match_numpy():
    b = synthetic_batch(0, 2, 64)
    mean, std = np.array([0.3, 0.4, 0.5]), np.array([0.1, 0.2, 0.3])
    config = vitb.get_config('smoke')
    config.seed, config.data.mean, config.data.std = 4, tuple(mean), tuple(std)
    views = objective.prepare_views(b, jnp.int32(7), resolve(config))
    mask = np.asarray(views['a']['block_mask'])
    assert mask.shape == (2, 2, 2) and np.all(mask.sum(axis=(1, 2)) == 3)
    x = (b['img_a'] / 255.0 - mean) / std  # crop A: no photometric change
    m = np.kron(mask, np.ones((32, 32)))[..., None]
    expected = x * (1 - m) + x.mean(axis=(1, 2), keepdims=True) * m
    np.testing.assert_allclose(np.asarray(views['a']['masked']), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(views['a']['target']), x, atol=1e-5)
    # Crop B: the augmented pixels of this step's key, normalised.
    pixels = augment.augment_batch(b, augment.step_key(4, 7), mask_ratio=0.6, mask_patch=32)
    np.testing.assert_allclose(
        np.asarray(views['b']['target']),
        (np.asarray(pixels['img_b']) / 255.0 - mean) / std,
        atol=1e-5,
    )
    np.testing.assert_array_equal(views['b']['block_mask'], pixels['mask_b'])


def test_enqueue_wraps_around_and_inserts_each_key_once():
    queue = jnp.zeros((6, 2))
    keys = jnp.arange(8.0).reshape(4, 2)
    q, ptr = objective.enqueue(queue, jnp.int32(4), keys)
    expected = np.zeros((6, 2))
    for i, row in enumerate(np.arange(8.0).reshape(4, 2)):
        expected[(4 + i) % 6] = row
    np.testing.assert_array_equal(np.asarray(q), expected)
    assert int(ptr) == 2


# --- the step ---------------------------------------------------------------------------------


def test_step_updates_teacher_by_ema_and_fills_queue():
    trainer, config = make_trainer(vitb)
    state0 = jax.device_get(trainer.init_state(jax.random.key(0)))
    state1, (m,) = run_steps(trainer, jax.devices()[:1], [synthetic_batch(1, 8, 64)])
    mom = float(optim.ema_momentum(0, 10))
    assert m['ema_momentum'] == pytest.approx(mom)
    for name in ('backbone', 'projector', 'local_head'):
        expected = jax.tree.map(
            lambda t, s: mom * t + (1 - mom) * s,
            state0['teacher_params'][name],
            state1['params'][name],
        )
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
            state1['teacher_params'][name],
            expected,
        )
    assert (
        'decoder' not in state1['teacher_params'] and 'mask_token' not in state1['teacher_params']
    )
    # 2 x batch keys entered the queue, unit norm, at the front.
    assert int(state1['queue_ptr']) == 16
    np.testing.assert_allclose(np.linalg.norm(state1['queue'][:16], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(state1['queue'][16:], state0['queue'][16:], atol=1e-6)
    for k in ('loss', 'loss_mim', 'loss_global', 'loss_local'):
        assert np.isfinite(m[k]) and m[k] > 0
    assert m['loss'] == pytest.approx(m['loss_mim'] + m['loss_global'] + m['loss_local'], rel=1e-6)


def test_loss_terms_can_be_switched_off():
    trainer, _ = make_trainer(vitb, **{'loss.use_mim': False, 'loss.use_global': False})
    state, (m,) = run_steps(trainer, jax.devices()[:1], [synthetic_batch(1, 8, 64)])
    assert m['loss_mim'] == 0 and m['loss_global'] == 0 and m['loss_local'] > 0
    assert int(state['queue_ptr']) == 0


@pytest.mark.slow
@pytest.mark.parametrize('config_module', [vitb, resnet50], ids=['vit', 'resnet'])
def test_sharded_step_equals_single_device(config_module):
    assert jax.device_count() == 8
    trainer, _ = make_trainer(config_module)
    batches = [synthetic_batch(s, 8, 64) for s in range(2)]
    single_state, single = run_steps(trainer, jax.devices()[:1], batches)
    sharded_state, sharded = run_steps(trainer, jax.devices(), batches)
    for a, b in zip(single, sharded):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=k)
    # A bias right before BatchNorm (the ResNet local head's fc1 / fc2) has a zero gradient in
    # exact arithmetic: only rounding noise, whose sign Adan's normalised step follows (as the
    # official Adan does), so its updates may differ by up to 2 lr per step between reduction
    # orders. Every other leaf must agree to float32 precision.
    noise_only = {('local_head', 'fc1', 'bias'), ('local_head', 'fc2', 'bias')}
    bound = 2 * sum(m['lr'] for m in single) * 1.001
    for key in (
        'params',
        'batch_stats',
        'teacher_params',
        'teacher_batch_stats',
        'queue',
        'center',
    ):
        for (path, a), b in zip(
            jax.tree_util.tree_leaves_with_path(single_state[key]),
            jax.tree.leaves(sharded_state[key]),
        ):
            names = tuple(getattr(k, 'key', None) for k in path)
            if key == 'params' and names in noise_only and trainer.nets.local_head.use_bn:
                assert np.abs(a - b).max() <= bound, (names, np.abs(a - b).max(), bound)
            else:
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f'{key} {names}')


# --- both crops in one backbone call, and the non-finite guard --------------------------------


def record_network_calls(monkeypatch) -> list:
    """(sub-network name, batch size) of every `Networks.apply` call from now on."""
    calls = []
    apply = Networks.apply

    def recording_apply(self, name, variables, x, *args, **kw):
        calls.append((name, x.shape[0]))
        return apply(self, name, variables, x, *args, **kw)

    monkeypatch.setattr(Networks, 'apply', recording_apply)
    return calls


@pytest.mark.parametrize(
    'config_module', [vitb, pytest.param(swinb, marks=pytest.mark.slow)], ids=['vit', 'swin']
)
def test_one_backbone_call_for_both_crops_equals_one_per_crop(config_module, monkeypatch):
    """Backbones without BatchNorm see both crops in one call: the losses, gradients and aux equal
    the per-crop path (the official two calls) to fp32 rounding."""
    trainer, _ = make_trainer(config_module)
    state = trainer.init_state(jax.random.key(0))
    batch = synthetic_batch(3, 8, 64)
    calls = record_network_calls(monkeypatch)
    results = {}
    for per_crop in (None, True):
        monkeypatch.setattr(objective, 'cmid_loss', functools.partial(cmid_loss, per_crop=per_crop))
        calls.clear()
        loss_fn, _ = trainer.objective(state, batch)
        results[per_crop] = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state['params'])
        backbone_batches = [b for name, b in calls if name == 'backbone']
        assert backbone_batches == ([16, 16] if per_crop is None else [8] * 4)
    (loss, aux), grads = results[None]
    (ref_loss, ref_aux), ref_grads = results[True]
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for k in ('mim', 'global', 'local'):
        np.testing.assert_allclose(aux['terms'][k], ref_aux['terms'][k], rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(aux['new_keys'], ref_aux['new_keys'], atol=1e-6)
    np.testing.assert_allclose(aux['center'], ref_aux['center'], atol=1e-7)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads
    )
    assert optax.tree.norm(grads) > 0


def test_resnet_keeps_one_backbone_call_per_crop(monkeypatch):
    trainer, _ = make_trainer(resnet50)
    state = trainer.init_state(jax.random.key(0))
    calls = record_network_calls(monkeypatch)
    loss_fn, _ = trainer.objective(state, synthetic_batch(3, 8, 64))
    jax.eval_shape(loss_fn, state['params'])
    assert [b for name, b in calls if name == 'backbone'] == [8] * 4


@pytest.mark.slow
def test_nonfinite_step_leaves_every_state_array_unchanged():
    """ResNet (BN statistics in the backbone and the local head): an infinite mask token makes the
    loss NaN; weights, teacher, Adan moments, BN statistics, queue, pointer and centre stay
    bit-identical, and only the step and the non-finite count move."""
    trainer, _ = make_trainer(resnet50)
    state = trainer.init_state(jax.random.key(0))
    state['params']['mask_token'] = jnp.full_like(state['params']['mask_token'], jnp.inf)
    before = jax.device_get(state)
    new_state, metrics = jax.jit(trainer)(state, synthetic_batch(1, 8, 64))
    after = jax.device_get(new_state)
    assert not np.isfinite(metrics['loss'])
    assert (int(after['step']), int(after['nonfinite_steps'])) == (1, 1)
    for key in set(before) - {'step', 'nonfinite_steps'}:
        jax.tree.map(np.testing.assert_array_equal, after[key], before[key])
