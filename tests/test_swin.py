"""Swin tests: parameter count and key layouts, parity with timm, mmcls/timm conversion, masking.

Parity runs on CPU in float32 with small models: 'tiny-test' (window 7 at 224 px, the geometry of
Swin-B) and 'nano' (window 2 at 64 px, the smoke preset's model). Swin-B itself is only checked
through `jax.eval_shape` and timm's meta-device model. mmcv is not installed, so the official mmcls
layout is checked against the key list of cmid-method.md 10.4 and through timm: weights written in
the mmcls layout, read back and exported to timm give timm's features.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')

from test_backbones import PARITY_TOL, _abstract_init, _max_rel_err, _n_params, _randomise  # noqa: E402

from cmid_jax import train  # noqa: E402
from cmid_jax.models import build_backbone, swin, swin_torch  # noqa: E402
from configs import swinb  # noqa: E402

SWIN_B_PARAMS = 86_743_224  # timm swin_base_patch4_window7_224, num_classes=0


def _timm_swin(model: swin.SwinTransformer, img: int):
    """timm's SwinTransformer with `model`'s hyper-parameters (no head, no drop path)."""
    return timm.models.swin_transformer.SwinTransformer(
        img_size=img,
        patch_size=model.patch_size,
        embed_dim=model.embed_dim,
        depths=tuple(model.depths),
        num_heads=tuple(model.num_heads),
        window_size=model.window_size,
        mlp_ratio=model.mlp_ratio,
        num_classes=0,
        drop_path_rate=0.0,
    )


def _timm_features(tm, state_dict: dict, x: np.ndarray) -> np.ndarray:
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    tm.eval()
    with torch.no_grad():
        # Current timm Swin is NHWC inside: forward_features returns (B, H, W, C) after the norm.
        return tm.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()


def _forward(model, variables, x, **kwargs):
    return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False, **kwargs))(variables, x))


@functools.cache
def _setup(variant: str, img: int):
    """Model, random variables (non-zero rel-pos tables and biases), a float32 input batch and its
    features; cached, so tests share one compiled forward per variant."""
    model = build_backbone('swin', variant, img_size=img)
    variables = _randomise(_abstract_init(model, img), 1)
    x = np.random.default_rng(2).normal(size=(2, img, img, 3)).astype(np.float32)
    return model, variables, x, _forward(model, variables, x)


def _mmcls_swin_b_shapes() -> dict[str, tuple[int, ...]]:
    """The official Swin-B backbone keys, written out from cmid-method.md 10.4."""
    shapes = {
        'patch_embed.projection.weight': (128, 3, 4, 4),
        'patch_embed.projection.bias': (128,),
        'patch_embed.norm.weight': (128,),
        'patch_embed.norm.bias': (128,),
        'norm3.weight': (1024,),
        'norm3.bias': (1024,),
    }
    for s, (depth, heads) in enumerate(zip((2, 2, 18, 2), (4, 8, 16, 32))):
        c = 128 * 2**s
        for b in range(depth):
            p = f'stages.{s}.blocks.{b}.'
            shapes.update(
                {
                    p + 'norm1.weight': (c,),
                    p + 'norm1.bias': (c,),
                    p + 'attn.w_msa.relative_position_bias_table': (169, heads),
                    p + 'attn.w_msa.relative_position_index': (49, 49),
                    p + 'attn.w_msa.qkv.weight': (3 * c, c),
                    p + 'attn.w_msa.qkv.bias': (3 * c,),
                    p + 'attn.w_msa.proj.weight': (c, c),
                    p + 'attn.w_msa.proj.bias': (c,),
                    p + 'norm2.weight': (c,),
                    p + 'norm2.bias': (c,),
                    p + 'ffn.layers.0.0.weight': (4 * c, c),
                    p + 'ffn.layers.0.0.bias': (4 * c,),
                    p + 'ffn.layers.1.weight': (c, 4 * c),
                    p + 'ffn.layers.1.bias': (c,),
                }
            )
        if s < 3:
            p = f'stages.{s}.downsample.'
            shapes.update(
                {
                    p + 'norm.weight': (4 * c,),
                    p + 'norm.bias': (4 * c,),
                    p + 'reduction.weight': (2 * c, 4 * c),
                }
            )
    return shapes


# ------------------------------------------------------------------------------ shapes / counts


def test_swin_b_parameter_count_equals_timm():
    model = build_backbone('swin', 'B', img_size=224)
    with torch.device('meta'):
        tm = timm.create_model('swin_base_patch4_window7_224', num_classes=0)
    ours = _n_params(_abstract_init(model, 224)['params'])
    assert ours == sum(p.numel() for p in tm.parameters()) == SWIN_B_PARAMS
    # The mmcls layout lacks no timm parameter (timm's final `norm` is `norm3`); it only adds the
    # 24 int64 relative_position_index buffers, which timm keeps non-persistent.
    mm = swin_torch.torch_state_dict_shapes(model, 'mmcls')
    assert sum(math.prod(s) for k, s in mm.items() if not k.endswith('index')) == SWIN_B_PARAMS
    assert sum(k.endswith('relative_position_index') for k in mm) == 24


def test_swin_b_keys_match_mmcls_list_and_timm():
    model = build_backbone('swin', 'B', img_size=224)
    assert swin_torch.torch_state_dict_shapes(model, 'mmcls') == _mmcls_swin_b_shapes()
    assert len(_mmcls_swin_b_shapes()) == 351
    with torch.device('meta'):
        tm = timm.create_model('swin_base_patch4_window7_224', num_classes=0)
    theirs = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    assert swin_torch.torch_state_dict_shapes(model, 'timm') == theirs and len(theirs) == 327


def test_attributes_registry_and_input_checks():
    b = build_backbone('swin', 'B', img_size=224)
    assert (b.feature_stride, b.num_features, b.mask_token_width, b.min_image_size) == (
        32,
        1024,
        128,
        224,
    )
    t = build_backbone('swin', 'tiny-test', img_size=224)
    n = build_backbone('swin', 'nano', img_size=64)
    assert (t.num_features, t.mask_token_width, t.min_image_size) == (256, 32, 224)
    assert (n.feature_stride, n.num_features, n.mask_token_width, n.min_image_size) == (
        32,
        256,
        32,
        64,
    )
    assert swin.TORCH_NAMES['B'] == 'swin_base_patch4_window7_224'
    with pytest.raises(ValueError, match=r"'T'.*allowed"):
        build_backbone('swin', 'T', img_size=224)
    x = jnp.zeros((2, 64, 64, 3))
    assert jax.eval_shape(
        lambda: n.init_with_output(jax.random.key(0), x, train=False)[0]
    ).shape == (2, 2, 2, 256)
    with pytest.raises(ValueError, match='at least 224 px'):  # 2x2 last stage < window 7
        jax.eval_shape(lambda: t.init(jax.random.key(0), x, train=False))
    with pytest.raises(ValueError, match='multiple of 32'):
        jax.eval_shape(lambda: n.init(jax.random.key(0), jnp.zeros((1, 80, 80, 3)), train=False))


def test_relative_position_index_is_the_standard_one():
    # mmcls computes it differently (double_step_seq, sum with its transpose, flip); same result.
    w = 7
    seq = ((2 * w - 1) * np.arange(w)[:, None] + np.arange(w)[None, :]).reshape(1, -1)
    mmcls = np.flip(seq + seq.T, axis=1)
    timm_index = timm.models.swin_transformer.get_relative_position_index(w, w).numpy()
    ours = swin_torch.relative_position_index(w)
    assert ours.dtype == np.int64 and ours.shape == (49, 49)
    np.testing.assert_array_equal(ours, mmcls)
    np.testing.assert_array_equal(ours, timm_index)


def test_init_follows_the_official_code():
    # One block is enough (and cheap: jitting a whole model's init compiles one RNG per leaf).
    block = swin.SwinBlock(num_heads=4, window_size=2, shift=True)
    p = jax.jit(block.init)(jax.random.key(0), jnp.zeros((1, 4, 4, 128)))['params']
    assert not np.any(p['attn']['w_msa']['relative_position_bias_table'])  # Q8: zeros
    assert np.all(p['norm1']['scale'] == 1) and not np.any(p['norm1']['bias'])
    k = np.asarray(p['ffn']['layers_0_0']['kernel'])  # (128, 512)
    bound = 1 / np.sqrt(128)  # torch Linear default: U(+-1/sqrt(fan_in)), bias likewise
    assert np.abs(k).max() <= bound and k.std() == pytest.approx(bound / np.sqrt(3), rel=0.05)
    assert 0 < np.abs(np.asarray(p['ffn']['layers_0_0']['bias'])).max() <= bound


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize('variant, img', [('tiny-test', 224), ('nano', 64)])
def test_forward_parity_with_timm_and_mmcls_route(variant, img):
    model, variables, x, ours = _setup(variant, img)
    tm = _timm_swin(model, img)

    timm_sd = swin.to_torch_state_dict(variables, layout='timm')
    ref = _timm_features(tm, timm_sd, x)
    err = np.abs(ours - ref).max()
    print(f'swin {variant} parity with timm: max abs {err:.2e}, max |ref| {np.abs(ref).max():.2f}')
    assert ours.shape == ref.shape == (2, img // 32, img // 32, model.num_features)
    assert err < PARITY_TOL

    # mmcls layout -> JAX -> timm layout is exact, so it gives timm's features too; the
    # patch-merging permutation is what makes it so (a plain rename does not).
    mm_sd = swin.to_torch_state_dict(variables, layout='mmcls')
    assert set(mm_sd) == set(swin_torch.torch_state_dict_shapes(model, 'mmcls'))
    reread = swin.from_torch_state_dict(mm_sd, model)
    jax.tree.map(np.testing.assert_array_equal, reread, variables)
    via_mmcls = swin.to_torch_state_dict(reread, layout='timm')
    assert set(via_mmcls) == set(timm_sd)
    for k, v in via_mmcls.items():
        np.testing.assert_array_equal(v, timm_sd[k], err_msg=k)
    assert np.abs(_timm_features(tm, via_mmcls, x) - ours).max() < PARITY_TOL
    renamed = {swin_torch._timm_key(k): v for k, v in mm_sd.items() if not k.endswith('index')}
    assert np.abs(_timm_features(tm, renamed, x) - ref).max() > 1e-2


def test_padded_maps_match_timm():
    """Window 3 at 128 px pads every stage map (32, 16, 8, 4 -> 33, 18, 9, 6); one unshifted block
    per stage, where mmcls and timm agree (they differ in where they pad when a block shifts)."""
    model = swin.SwinTransformer(
        embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=3
    )
    variables = _randomise(_abstract_init(model, 128), 3)
    x = np.random.default_rng(4).normal(size=(1, 128, 128, 3)).astype(np.float32)
    ref = _timm_features(_timm_swin(model, 128), swin.to_torch_state_dict(variables, 'timm'), x)
    assert np.abs(_forward(model, variables, x) - ref).max() < PARITY_TOL


# ------------------------------------------------------------------------------ conversion


def test_round_trips_are_exact():
    model = build_backbone('swin', 'nano', img_size=64)
    tm = _timm_swin(model, 64)
    with torch.no_grad():
        for p in tm.parameters():
            p.normal_()
    timm_sd = tm.state_dict()
    assert swin_torch.detect_layout(timm_sd) == 'timm'
    variables = swin.from_torch_state_dict(timm_sd, model)  # torch tensors in
    back = swin.to_torch_state_dict(variables, layout='timm')
    assert set(back) == set(timm_sd)
    for k, v in timm_sd.items():
        assert back[k].dtype == np.float32
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)

    mm_sd = swin.to_torch_state_dict(variables)  # default layout: the official mmcls keys
    assert swin_torch.detect_layout(mm_sd) == 'mmcls'
    index = mm_sd['stages.2.blocks.1.attn.w_msa.relative_position_index']
    assert index.dtype == np.int64 and index.shape == (4, 4)  # window 2
    again = swin.to_torch_state_dict(swin.from_torch_state_dict(mm_sd, model))
    assert set(again) == set(mm_sd)
    for k, v in mm_sd.items():
        np.testing.assert_array_equal(again[k], v, err_msg=k)
    # The buffers are optional on the way in.
    no_index = {k: v for k, v in mm_sd.items() if not k.endswith('relative_position_index')}
    jax.tree.map(
        np.testing.assert_array_equal, swin.from_torch_state_dict(no_index, model), variables
    )


@pytest.mark.parametrize('layout', ['mmcls', 'timm'])
def test_from_torch_reports_all_problems_at_once(layout):
    model = build_backbone('swin', 'nano', img_size=64)
    sd = swin.to_torch_state_dict(_randomise(_abstract_init(model, 64), 5), layout=layout)
    if layout == 'mmcls':
        missing, wrong = (
            'stages.2.blocks.1.ffn.layers.1.bias',
            'stages.0.downsample.reduction.weight',
        )
        bad_index = 'stages.1.blocks.0.attn.w_msa.relative_position_index'
        sd[bad_index] = sd[bad_index][::-1].copy()
    else:
        missing, wrong = 'layers.2.blocks.1.mlp.fc2.bias', 'layers.1.downsample.reduction.weight'
        bad_index = None
    del sd[missing]
    sd['head.fc.weight'] = np.zeros((10, 256), np.float32)
    sd[wrong] = np.zeros((1,) + sd[wrong].shape, np.float32)
    with pytest.raises(ValueError) as e:
        swin.from_torch_state_dict(sd, model)
    msg = str(e.value)
    assert f'{layout} layout' in msg
    assert missing in msg and 'head.fc.weight' in msg and wrong in msg
    if bad_index:
        assert f'{bad_index}: differs from the standard relative position index' in msg
    with pytest.raises(ValueError, match='Swin converts to the key layouts'):
        swin.to_torch_state_dict({}, layout='mmseg')


# ------------------------------------------------------------------------------ masking / dtype


def test_swin_mask_token_injection():
    model, variables, x, unmasked = _setup('nano', 64)
    token = jnp.asarray(np.random.default_rng(8).normal(size=(32,)), jnp.float32)
    # One compiled program for every masked call, so they compare exactly.
    apply = jax.jit(
        lambda m: model.apply(
            variables, x, train=False, mask=m, mask_token=token, mutable=['intermediates']
        )
    )
    base, inter0 = apply(jnp.zeros((2, 2, 2)))
    # Two compiled programs may fuse differently, so equality is up to float32 rounding.
    np.testing.assert_allclose(np.asarray(base), unmasked, rtol=1e-5, atol=1e-5)

    mask = np.zeros((2, 2, 2), np.float32)
    mask[1, 0, 1] = 1.0  # block (0, 1) of the second image = patches rows 0-7, cols 8-15
    out1, inter1 = apply(jnp.asarray(mask))
    diff = np.asarray(
        inter1['intermediates']['patch_tokens'][0] - inter0['intermediates']['patch_tokens'][0]
    )
    expect = np.zeros_like(diff)
    expect[1, 0:8, 8:16] = token  # nearest x8 onto the 16x16 stride-4 grid, after the norm
    np.testing.assert_allclose(diff, expect, atol=1e-6)
    assert np.abs(np.asarray(out1[1]) - np.asarray(base[1])).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(out1[0]), np.asarray(base[0]))
    with pytest.raises(ValueError, match='without mask_token'):
        model.apply(variables, x, train=False, mask=jnp.asarray(mask))


def test_bf16_compute_keeps_fp32_params():
    _, variables, x, out32 = _setup('nano', 64)
    m16 = build_backbone('swin', 'nano', img_size=64, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(_abstract_init(m16, 64)))
    out16 = jax.jit(lambda v: m16.apply(v, x, train=False))(variables)
    assert out16.dtype == jnp.bfloat16
    assert _max_rel_err(np.asarray(out16, np.float32), out32) < 0.1


# ------------------------------------------------------------------------------ training


@pytest.mark.slow
def test_smoke_preset_trains(tmp_path):
    assert swinb.get_config().model.variant == 'B'
    assert swinb.get_config().model.local_use_bn is None  # BN in the local head: ResNets only
    assert swinb.get_config('demo').model.variant == 'nano'
    config = swinb.get_config('smoke')
    assert (config.model.arch, config.model.variant, config.data.image_size) == ('swin', 'nano', 64)
    config.total_steps = 2
    logged = train.train_and_evaluate(config, str(tmp_path))
    for k in ('loss', 'loss_mim', 'loss_global', 'loss_local'):
        assert np.isfinite(logged[k]), (k, logged[k])
