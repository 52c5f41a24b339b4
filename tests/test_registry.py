"""One contract per architecture: every registered backbone fulfils it, and a new backbone is one
module plus one registry line (checked with tests/toy_backbone.py)."""

import jax
import numpy as np
import pytest

from cmid_jax import models, optim
from cmid_jax.config_resolve import resolve
from cmid_jax.convert import adapt, official, weights
from cmid_jax.models import BACKBONES, backbone_module
from cmid_jax.models.cmid import backbone_variables, build_networks
from cmid_jax.perf import flops
from cmid_jax.perf.synthetic import synthetic_batch
from cmid_jax.step import TrainStep
from configs import vitb

import toy_backbone

SMALL = {'resnet': 'nano', 'vit': 'mu/16', 'swin': 'nano'}
CONSTANTS = (
    'VARIANTS',
    'TORCH_NAMES',
    'LAYOUTS',
    'EXPORT_LAYOUT',
    'MASK_TOKEN_LAYOUT',
    'STEM_KERNEL',
    'TELL_KEYS',
    'HAS_BATCH_NORM',
)
FUNCTIONS = (
    'build',
    'to_torch_state_dict',
    'from_torch_state_dict',
    'torch_models',
    'forward_flops',
)


def _init(module, variant, size=64):
    net = module.build(variant, img_size=size)
    x = np.zeros((1, size, size, 3), np.float32)
    return net, jax.eval_shape(lambda: net.init(jax.random.key(0), x, train=False))


@pytest.mark.parametrize('arch', sorted(BACKBONES))
def test_every_registered_backbone_fulfils_the_contract(arch):
    module = backbone_module(arch)
    for name in CONSTANTS + FUNCTIONS:
        assert hasattr(module, name), f'{arch} lacks {name}'
    assert module.EXPORT_LAYOUT in module.LAYOUTS
    assert module.MASK_TOKEN_LAYOUT in ('nchw', 'nlc')
    assert set(module.TORCH_NAMES) <= set(module.VARIANTS)
    net, variables = _init(module, SMALL[arch])
    node = variables['params']
    for key in module.STEM_KERNEL:  # The stem kernel is where the contract says, HWIO with 3 in.
        node = node[key]
    assert node.ndim == 4 and node.shape[2] == 3
    # Its tell-tale keys name this arch and no other.
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables)
    keys = {k for layout in module.LAYOUTS for k in module.to_torch_state_dict(zeros, layout)}
    assert set(module.TELL_KEYS) <= keys
    for other, m in BACKBONES.items():
        if other != arch:
            assert not set(m.TELL_KEYS) & keys, (arch, other)
    with pytest.raises(ValueError, match='key layouts'):
        module.to_torch_state_dict(zeros, layout='no-such-layout')


def test_unknown_arch_names_the_config_field():
    with pytest.raises(ValueError, match=r"unknown backbone arch 'convnext' \(config.model.arch\)"):
        backbone_module('convnext')


def test_a_new_backbone_is_one_module_and_one_registry_line(monkeypatch, tmp_path):
    monkeypatch.setitem(BACKBONES, 'toy', toy_backbone)  # The one line.
    config = vitb.get_config('smoke')
    config.model.arch, config.model.variant = 'toy', 'S'
    config = resolve(config)

    # The networks, and a whole train step traced (every code path, no compile).
    nets = build_networks(config)
    assert not nets.local_head.use_bn  # HAS_BATCH_NORM = False
    trainer = TrainStep.create(resolve(config), optim.Schedule(10, 4))
    state = jax.device_get(jax.jit(trainer.init_state)(jax.random.key(0)))
    batch = synthetic_batch(0, config.batch_size, config.data.image_size)
    new_state, metrics = jax.eval_shape(trainer, state, batch)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert metrics['loss'].shape == ()

    # The FLOP counter: the backbone's own formula plus the heads.
    shape = flops.StepShape.from_config(config)
    assert shape.backbone.forward_flops == toy_backbone.forward_flops('S', 64)
    assert (shape.backbone.num_features, shape.backbone.feature_stride) == (32, 32)

    # Export through the registry, and the official full-checkpoint layout both ways.
    sd = weights.backbone_state_dict(state, 'toy')
    assert sorted(sd) == ['0.bias', '0.weight', '1.bias', '1.weight']
    np.testing.assert_array_equal(
        sd['0.weight'], state['params']['backbone']['stem']['kernel'].transpose(3, 2, 0, 1)
    )
    full = official.to_official_state_dict(state, arch='toy')
    assert full['online_encoder.mask_token'].shape == (1, 8, 1, 1)  # MASK_TOKEN_LAYOUT 'nchw'
    parts = official.from_official_state_dict(
        full, arch='toy', backbone=nets.backbone, template=trainer.abstract_state
    )
    jax.tree.map(
        np.testing.assert_array_equal, parts['params']['backbone'], state['params']['backbone']
    )
    assert models.build_backbone('toy', 'M', img_size=64).num_features == 64

    # N-band stem adaptation finds the stem through the registry.
    adapted = adapt.adapt_stem(backbone_variables(state)['params'], 4)
    assert adapted['stem']['kernel'].shape[2] == 4
