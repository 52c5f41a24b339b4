"""Backbone tests: parameter counts, numerical parity with torchvision/timm, conversion, masking.

Parity runs on CPU in float32 with small models (ResNet 'tiny' = bottleneck [1,1,1,1], ViT 'mu/16')
and small images; the full-size models are only checked through `jax.eval_shape`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
timm = pytest.importorskip('timm')

from cmid_jax.models import build_backbone, resnet, vit  # noqa: E402

PARITY_TOL = 1e-4


def _n_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _abstract_init(model, img: int):
    return jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jnp.zeros((1, img, img, 3), jnp.float32),
    )


def _init(model, img: int):
    return jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0), jnp.zeros((1, img, img, 3), jnp.float32)
    )


def _randomise(variables, seed: int):
    """Random leaves: norm scales around 1, variances positive, everything else non-zero."""
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    treedef = jax.tree_util.tree_structure(variables)
    rng = np.random.default_rng(seed)
    leaves = []
    for path, x in flat:
        name = path[-1].key
        shape = x.shape
        if name == 'scale':
            v = rng.uniform(0.5, 1.5, shape)
        elif name == 'var':
            v = rng.uniform(0.5, 2.0, shape)
        elif name in ('bias', 'mean'):
            v = rng.normal(0.0, 0.1, shape)
        elif name == 'kernel':
            fan_in = np.prod(shape[:-1])
            v = rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)
        else:  # cls_token, pos_embed
            v = rng.normal(0.0, 0.1, shape)
        leaves.append(jnp.asarray(v, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _torch_resnet_tiny():
    m = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1])
    m.fc = torch.nn.Identity()
    return m


def _torch_layer4(m, x_nhwc: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)
    for name in ('conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4'):
        x = getattr(m, name)(x)
    return x.permute(0, 2, 3, 1).detach().numpy()


def _torch_vit_mu(img: int):
    return timm.models.vision_transformer.VisionTransformer(
        img_size=img, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=0
    )


def _max_rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


# ------------------------------------------------------------------------------ shapes / counts


def test_parameter_counts_match_torch():
    r50 = build_backbone('resnet', '50', img_size=224)
    tv = torchvision.models.resnet50()
    tv_count = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith('fc.'))
    assert _n_params(_abstract_init(r50, 64)['params']) == tv_count == 23_508_032

    vitb = build_backbone('vit', 'B/16', img_size=224)
    with torch.device('meta'):
        tm = timm.create_model('vit_base_patch16_224', num_classes=0)
    assert (
        _n_params(_abstract_init(vitb, 224)['params'])
        == sum(p.numel() for p in tm.parameters())
        == 85_798_656
    )


def test_resnet50_keys_and_shapes_match_torchvision():
    tv_sd = {
        k: v
        for k, v in torchvision.models.resnet50().state_dict().items()
        if not k.startswith('fc.')
    }
    model = build_backbone('resnet', '50', img_size=224)
    variables = resnet.from_torch_state_dict(tv_sd, model)  # raises on any key/shape mismatch
    back = resnet.to_torch_state_dict(variables)
    assert set(back) == set(tv_sd) and len(back) == 318
    assert all(back[k].shape == tuple(tv_sd[k].shape) for k in back)


def test_vit_b16_keys_and_shapes_match_timm():
    with torch.device('meta'):
        tm = timm.create_model('vit_base_patch16_224', num_classes=0)
    model = build_backbone('vit', 'B/16', img_size=224)
    abstract = _abstract_init(model, 224)['params']
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    ours = {}
    for path, leaf in flat:
        keys = tuple(p.key for p in path)
        shape = leaf.shape
        if keys[-1] == 'kernel':
            shape = tuple(shape[i] for i in (3, 2, 0, 1)) if len(shape) == 4 else shape[::-1]
        ours[vit._torch_key(keys)] = tuple(shape)
    theirs = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    assert ours == theirs and len(ours) == 150


def test_output_shapes_and_attributes():
    r = build_backbone('resnet', 'tiny', img_size=64)
    v = build_backbone('vit', 'mu/16', img_size=64)
    assert (r.feature_stride, r.num_features, r.mask_token_width) == (32, 2048, 64)
    assert (v.feature_stride, v.num_features, v.mask_token_width) == (16, 64, 64)
    assert build_backbone('resnet', '50', img_size=224).num_features == 2048
    vb = build_backbone('vit', 'B/16', img_size=224)
    assert (vb.feature_stride, vb.num_features, vb.mask_token_width) == (16, 768, 768)
    x = jnp.zeros((2, 64, 64, 3))
    assert jax.eval_shape(
        lambda: r.init_with_output(jax.random.key(0), x, train=False)[0]
    ).shape == (2, 2, 2, 2048)
    assert jax.eval_shape(
        lambda: v.init_with_output(jax.random.key(0), x, train=False)[0]
    ).shape == (2, 4, 4, 64)


def test_build_backbone_errors_and_torch_names():
    with pytest.raises(ValueError, match=r"'convnext'.*resnet.*swin.*vit"):
        build_backbone('convnext', 'B', img_size=224)
    with pytest.raises(ValueError, match=r"'101'"):
        build_backbone('resnet', '101', img_size=224)
    with pytest.raises(ValueError, match=r"'L/16'"):
        build_backbone('vit', 'L/16', img_size=224)
    with pytest.raises(ValueError, match='attention_impl'):
        build_backbone('vit', 'B/16', img_size=224, attention_impl='flash')
    assert vit.TORCH_NAMES['B/16'] == 'vit_base_patch16_224'
    assert resnet.TORCH_NAMES['50'] == 'resnet50'
    assert vit.TORCH_NAMES['Ti/16'] == 'vit_tiny_patch16_224'
    assert vit.TORCH_NAMES['S/16'] == 'vit_small_patch16_224'


def test_init_follows_timm():
    r = build_backbone('resnet', 'tiny', img_size=64)
    p = _init(r, 64)['params']
    for s in range(1, 5):
        blk = p[f'layer{s}_0']
        assert not np.any(blk['bn3']['scale'])  # zero_init_last
        assert np.all(blk['downsample_1']['scale'] == 1)
    k = np.asarray(p['layer3_0']['conv2']['kernel'])  # 3x3x256x256
    assert k.std() == pytest.approx(np.sqrt(2.0 / (9 * 256)), rel=0.05)  # kaiming fan_out

    v = build_backbone('vit', 'mu/16', img_size=64)
    p = _init(v, 64)['params']
    assert not np.any(p['blocks_0']['attn']['qkv']['bias'])
    assert np.asarray(p['blocks_1']['mlp']['fc1']['kernel']).std() == pytest.approx(0.02, rel=0.1)
    assert np.asarray(p['pos_embed']).std() == pytest.approx(0.02, rel=0.2)
    assert np.abs(np.asarray(p['cls_token'])).max() < 1e-4


# ------------------------------------------------------------------------------ parity


def test_resnet_forward_parity_with_torchvision():
    model = build_backbone('resnet', 'tiny', img_size=64)
    variables = _randomise(_abstract_init(model, 64), 1)
    x = np.random.default_rng(2).normal(size=(2, 64, 64, 3)).astype(np.float32)

    ours = np.asarray(model.apply(variables, x, train=False))
    tm = _torch_resnet_tiny()
    tm.load_state_dict(
        {k: torch.from_numpy(v) for k, v in resnet.to_torch_state_dict(variables).items()},
        strict=True,
    )
    tm.eval()
    with torch.no_grad():
        ref = _torch_layer4(tm, x)
    assert ours.shape == ref.shape == (2, 2, 2, 2048)
    err = np.abs(ours - ref).max()
    print(f'resnet tiny eval parity: max abs {err:.2e}, max |ref| {np.abs(ref).max():.2f}')
    assert _max_rel_err(ours, ref) < PARITY_TOL

    # Train mode (the CMID teacher runs BN on batch statistics): outputs and running means agree.
    ours_t, upd = model.apply(variables, x, train=True, mutable=['batch_stats'])
    tm.train()
    with torch.no_grad():
        ref_t = _torch_layer4(tm, x)
    assert _max_rel_err(ours_t, ref_t) < PARITY_TOL
    np.testing.assert_allclose(
        np.asarray(upd['batch_stats']['bn1']['mean']), tm.bn1.running_mean.numpy(), atol=1e-5
    )


def test_vit_forward_parity_with_timm():
    model = build_backbone('vit', 'mu/16', img_size=64)
    variables = _randomise(_abstract_init(model, 64), 3)
    x = np.random.default_rng(4).normal(size=(2, 64, 64, 3)).astype(np.float32)

    ours = np.asarray(model.apply(variables, x, train=False))
    tm = _torch_vit_mu(64)
    tm.load_state_dict(
        {k: torch.from_numpy(v) for k, v in vit.to_torch_state_dict(variables).items()}, strict=True
    )
    tm.eval()
    with torch.no_grad():
        ref = tm.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))[:, 1:]
    ref = ref.reshape(2, 4, 4, 64).numpy()
    err = np.abs(ours - ref).max()
    print(f'vit mu/16 parity: max abs {err:.2e}, max |ref| {np.abs(ref).max():.2f}')
    assert err < PARITY_TOL


# ------------------------------------------------------------------------------ conversion


def _randomised_torch_resnet_tiny():
    tm = _torch_resnet_tiny()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, buf in tm.named_buffers():
            if name.endswith('running_mean'):
                buf.copy_(torch.randn(buf.shape, generator=g))
            elif name.endswith('running_var'):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
        for p in tm.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return tm


@pytest.mark.parametrize('arch', ['resnet', 'vit'])
def test_round_trip_torch_jax_torch_is_exact(arch):
    if arch == 'resnet':
        tm, mod, model = (
            _randomised_torch_resnet_tiny(),
            resnet,
            build_backbone('resnet', 'tiny', img_size=64),
        )
    else:
        tm, mod, model = _torch_vit_mu(64), vit, build_backbone('vit', 'mu/16', img_size=64)
        with torch.no_grad():
            for p in tm.parameters():
                p.normal_()
    sd = tm.state_dict()
    back = mod.to_torch_state_dict(mod.from_torch_state_dict(sd, model))
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == (np.int64 if k.endswith('num_batches_tracked') else np.float32), k
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)


@pytest.mark.parametrize('arch', ['resnet', 'vit'])
def test_from_torch_reports_all_problems_at_once(arch):
    if arch == 'resnet':
        mod, model, tm = resnet, build_backbone('resnet', 'tiny', img_size=64), _torch_resnet_tiny()
        missing, wrong = 'layer2.0.bn2.running_var', 'layer3.0.conv1.weight'
    else:
        mod, model, tm = vit, build_backbone('vit', 'mu/16', img_size=64), _torch_vit_mu(64)
        missing, wrong = 'blocks.1.attn.qkv.bias', 'pos_embed'
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    del sd[missing]
    sd['extra.weight'] = np.zeros(3, np.float32)
    sd[wrong] = np.zeros((1,) + sd[wrong].shape, np.float32)
    with pytest.raises(ValueError) as e:
        mod.from_torch_state_dict(sd, model)
    msg = str(e.value)
    assert missing in msg and 'extra.weight' in msg and wrong in msg


# ------------------------------------------------------------------------------ masking


def test_resnet_mask_token_injection():
    model = build_backbone('resnet', 'tiny', img_size=128)
    variables = _randomise(_abstract_init(model, 128), 5)
    x = np.random.default_rng(6).normal(size=(2, 128, 128, 3)).astype(np.float32)
    token = jnp.asarray(np.random.default_rng(7).normal(size=(64,)), jnp.float32)
    apply = jax.jit(
        lambda x, m: model.apply(
            variables, x, train=False, mask=m, mask_token=token, mutable=['intermediates']
        )
    )
    base, inter0 = jax.jit(
        lambda x: model.apply(variables, x, train=False, mutable=['intermediates'])
    )(x)
    out0, _ = apply(x, jnp.zeros((2, 4, 4)))
    # Two compiled programs may fuse differently, so equality is up to float32 rounding.
    np.testing.assert_allclose(np.asarray(out0), np.asarray(base), rtol=1e-6, atol=1e-6)

    mask = np.zeros((2, 4, 4), bool)
    mask[0, 0, 0] = True  # one 32-px block of the first image
    out1, inter1 = apply(x, jnp.asarray(mask))
    stem_diff = np.asarray(
        inter1['intermediates']['stem_tokens'][0] - inter0['intermediates']['stem_tokens'][0]
    )
    expect = np.zeros_like(stem_diff)
    expect[0, :8, :8] = token  # nearest x8 onto the 32x32 stride-4 grid
    np.testing.assert_allclose(stem_diff, expect, atol=1e-5)

    # Layer4 cell o reads stride-4 cells [8o-8, 8o+8]; block 0 (cells 0..7) reaches o in {0, 1}.
    # (Tolerance, not 0: conv algorithms may mix rounding across neighbouring output positions.)
    d = np.abs(np.asarray(out1) - np.asarray(base)).max(-1)
    assert d[0, :2, :2].min() > 1e-2
    assert d[0, 2:, :].max() < 1e-5 and d[0, :, 2:].max() < 1e-5 and d[1].max() < 1e-5


def test_vit_mask_token_injection():
    model = build_backbone('vit', 'mu/16', img_size=64)
    variables = _randomise(_abstract_init(model, 64), 8)
    x = np.random.default_rng(9).normal(size=(2, 64, 64, 3)).astype(np.float32)
    token = jnp.asarray(np.random.default_rng(10).normal(size=(64,)), jnp.float32)

    base, inter0 = model.apply(variables, x, train=False, mutable=['intermediates'])
    out0 = model.apply(variables, x, train=False, mask=jnp.zeros((2, 2, 2)), mask_token=token)
    np.testing.assert_array_equal(np.asarray(out0), np.asarray(base))

    mask = np.zeros((2, 2, 2), np.float32)
    mask[1, 0, 1] = 1.0  # block (0, 1) of the second image = patches rows 0-1, cols 2-3
    out1, inter1 = model.apply(
        variables,
        x,
        train=False,
        mask=jnp.asarray(mask),
        mask_token=token,
        mutable=['intermediates'],
    )
    diff = np.asarray(
        inter1['intermediates']['patch_tokens'][0] - inter0['intermediates']['patch_tokens'][0]
    )
    expect = np.zeros_like(diff)
    expect[1, 0:2, 2:4] = token
    np.testing.assert_allclose(diff, expect, atol=1e-6)
    assert np.abs(np.asarray(out1[1]) - np.asarray(base[1])).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(out1[0]), np.asarray(base[0]))


# ------------------------------------------------------------------------------ attention


def test_padded_attention_matches_unpadded():
    rng = np.random.default_rng(11)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 17, 2, 8)), jnp.float32) for _ in range(3))
    ref = vit._attention(q, k, v, implementation='xla')
    padded = vit._attention(q, k, v, implementation='xla', pad_to_multiple=8)
    assert padded.shape == ref.shape
    np.testing.assert_allclose(np.asarray(padded), np.asarray(ref), atol=1e-6)
    # The check has teeth: padding without the key lengths lets the padded keys take weight.
    widths = ((0, 0), (0, 7), (0, 0), (0, 0))
    naive = jax.nn.dot_product_attention(
        *(jnp.pad(a, widths) for a in (q, k, v)), implementation='xla'
    )[:, :17]
    assert np.abs(np.asarray(naive) - np.asarray(ref)).max() > 1e-2


def test_cudnn_path_padding_matches_xla_model(monkeypatch):
    """Run the 'cudnn' model code path on CPU by routing its attention call to XLA."""
    real = jax.nn.dot_product_attention
    seen = []

    def fake(q, k, v, *args, implementation=None, key_value_seq_lengths=None, **kw):
        seen.append((implementation, q.shape[1], key_value_seq_lengths))
        return real(
            q, k, v, *args, implementation='xla', key_value_seq_lengths=key_value_seq_lengths, **kw
        )

    xla_model = build_backbone('vit', 'mu/16', img_size=64)
    variables = _randomise(_abstract_init(xla_model, 64), 12)
    x = np.random.default_rng(13).normal(size=(2, 64, 64, 3)).astype(np.float32)
    ref = xla_model.apply(variables, x, train=False)

    monkeypatch.setattr(jax.nn, 'dot_product_attention', fake)
    # The module itself, as `build` resolves it on a GPU ('cudnn' needs bf16 there; the
    # padding logic is checked in float32 here).
    cudnn_model = vit.VisionTransformer(
        **vit.VARIANTS['mu/16'], img_size=64, attention_impl='cudnn'
    )
    out = cudnn_model.apply(variables, x, train=False)
    assert [s[:2] for s in seen] == [('cudnn', 24)] * 2  # 17 tokens padded to 24, both blocks
    assert all(np.all(np.asarray(s[2]) == 17) for s in seen)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


# ------------------------------------------------------------------------------ bf16


def test_bf16_compute_keeps_fp32_params():
    x = np.random.default_rng(14).normal(size=(2, 64, 64, 3)).astype(np.float32)
    for arch, variant in (('resnet', 'tiny'), ('vit', 'mu/16')):
        m32 = build_backbone(arch, variant, img_size=64)
        m16 = build_backbone(arch, variant, img_size=64, dtype=jnp.bfloat16)
        variables = _randomise(_abstract_init(m32, 64), 15)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(_abstract_init(m16, 64)))
        out16 = m16.apply(variables, x, train=False)
        out32 = m32.apply(variables, x, train=False)
        assert out16.dtype == jnp.bfloat16
        err = _max_rel_err(np.asarray(out16, np.float32), np.asarray(out32))
        assert err < 0.1, (arch, err)
