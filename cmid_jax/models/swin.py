"""mmcls-style Swin Transformer backbone (the official CMID Swin-B) in Flax Linen, with mask tokens.

Math as the official `Pretrain/models/swin_transformer.py` (mmcls 0.x `SwinTransformer(arch='base',
drop_path_rate=0, out_indices=(3,))`, cmid-method.md section 9): patch conv with bias + LayerNorm,
no absolute position embedding, pre-norm blocks with window attention (qkv bias, relative position
bias indexed the standard way), shifted windows in odd blocks, patch merging (2x2 gather,
LayerNorm(4C), Linear(4C -> 2C) without bias) after stages 0-2, exact GELU, LayerNorm eps 1e-5 and a
final LayerNorm `norm3` on the last stage. The backbone returns that map as NHWC
`(B, H/32, W/32, 8 * embed_dim)`.

Input sizes (mmcls `pad_small_map=False`, the official setting): H and W must be multiples of 32
and every stage map at least one window wide (>= 224 px for window 7). A map that is not a window
multiple is zero-padded at the bottom/right *before* the cyclic shift and the shift mask is built
on the padded map, as mmcls does (timm pads after the shift; both agree whenever no padding is
needed, e.g. at 224 px). Padded tokens are attended to, as in mmcls. A block whose map is exactly
one window wide (min(H, W) == window, the 7x7 last stage at 224 px) does not shift.

Submodule names mirror the mmcls keys (`patch_embed/projection`, `stages_2/blocks_5/attn/w_msa/qkv`,
`.../ffn/layers_0_0`, `stages_0/downsample/reduction`, `norm3`), so the export to the official
layout is a rename plus a transpose. The 2x2 patch-merging gather uses mmcv's `nn.Unfold` order
(channel-major, index c*4 + k with k over (dy, dx) = (0,0), (0,1), (1,0), (1,1)); the timm layout
(block-major [x(0,0), x(1,0), x(0,1), x(1,1)], cmid-method.md 10.4) is reached by permuting the
4C axis of `downsample.norm` and `downsample.reduction` on conversion. Both key layouts are in
`cmid_jax.models.swin_torch`.

Init follows the official code, which never calls mmcls `init_weights` (Q8): torch-default Linear
and conv init, zero relative-position tables, LayerNorm ones/zeros.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cmid_jax import flop_counts
from cmid_jax.models import remat as remat_lib
from cmid_jax.models import swin_torch
from cmid_jax.models.common import add_mask_token, patch_conv, torch_dense
from cmid_jax.state_dict import resolve_layout, torch_model_spec

Array = jax.Array

VARIANTS: dict[str, dict[str, Any]] = {
    # mmcls arch 'base' = timm swin_base_patch4_window7_224.
    'B': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7),
    # Test-only, at 224 px: the window-7 geometry of Swin-B (shifted 56/28/14 maps, unshifted 7x7
    # last stage) at a quarter of its width and two blocks per stage.
    'tiny-test': dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7),
    # Smoke and demo runs on a CPU: window 2, so inputs from 64 px work (at 64 px the 2x2 last stage
    # is one unshifted window, as the 7x7 one of Swin-B at 224 px; a window-7 model needs 224 px and
    # costs several times more per CPU step). One block per stage except the deepest, stage 2 (18 in
    # Swin-B), which keeps a shifted-window block; blocks dominate the compile time. No torch name.
    'nano': dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=2),
}

# --- Registry contract (cmid_jax.models.Backbone) -------------------------------------------------
TORCH_NAMES = {'B': 'swin_base_patch4_window7_224'}
LAYOUTS = swin_torch.LAYOUTS  # official CMID / mmseg keys, and current timm keys
EXPORT_LAYOUT = 'timm'
MASK_TOKEN_LAYOUT = 'nlc'  # official MaskSwin: a (1, 1, C) token on the patch embeddings
STEM_KERNEL = ('patch_embed', 'projection', 'kernel')
TELL_KEYS = ('stages.0.blocks.0.attn.w_msa.qkv.weight', 'layers.0.blocks.0.attn.qkv.weight')
HAS_BATCH_NORM = False
# The PyTorch key layouts (cmid_jax.models.swin_torch).
to_torch_state_dict = swin_torch.to_torch_state_dict
from_torch_state_dict = swin_torch.from_torch_state_dict

# Logit offset between tokens of different regions in a shifted window, as mmcls / timm (not -inf:
# exp(-100) already underflows to 0, and a row can never be fully masked).
_MASK_VALUE = -100.0


def _layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
    # torch nn.LayerNorm default eps; statistics reduce in float32 even for bf16 inputs.
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, name=name)


# ------------------------------------------------------------------------------------------------
# Static window bookkeeping (numpy, computed once per shape at trace time)
# ------------------------------------------------------------------------------------------------


def window_partition(x: Any, window: int) -> Any:
    """`(B, H, W, C)` -> `(B, nW, window*window, C)`, windows in row-major order (numpy or jax)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // window) * (w // window), window * window, c)


def window_reverse(windows: Array, window: int, h: int, w: int) -> Array:
    """Inverse of `window_partition`."""
    b, _, _, c = windows.shape
    x = windows.reshape(b, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


@functools.cache
def shifted_window_mask(h: int, w: int, window: int, shift: int) -> np.ndarray:
    """`(nW, T, T)` float32 additive mask for a map rolled by `-shift`: 0 within a region, -100 across.

    After the cyclic shift a window on the bottom/right edge holds tokens from up to 4 regions that
    are not neighbours in the image; they must not attend to each other.
    """
    regions = np.zeros((1, h, w, 1), np.float32)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, hs in enumerate(bounds):
        for j, ws in enumerate(bounds):
            regions[:, hs, ws, :] = 3 * i + j
    ids = window_partition(regions, window)[0, :, :, 0]  # (nW, T)
    mask = np.where(ids[:, None, :] != ids[:, :, None], _MASK_VALUE, 0.0).astype(np.float32)
    mask.setflags(write=False)  # cached and shared
    return mask


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------


class WindowMSA(nn.Module):
    """mmcls `WindowMSA`: multi-head self-attention inside each window, relative position bias."""

    num_heads: int
    window_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: np.ndarray | None = None) -> Array:
        """x: `(B, nW, T, C)` windows; mask: optional `(nW, T, T)` additive logit mask."""
        b, nw, t, c = x.shape
        heads, ws = self.num_heads, self.window_size
        dh = c // heads
        # Zero-initialised: mmcls only draws it from trunc_normal in the init_weights CMID never calls.
        table = self.param(
            'relative_position_bias_table',
            nn.initializers.zeros,
            ((2 * ws - 1) ** 2, heads),
            jnp.float32,
        )
        # qkv laid out q|k|v, each head-major, as torch's reshape(B_, N, 3, heads, Dh).
        qkv = torch_dense(3 * c, c, dtype=self.dtype, name='qkv')(x).reshape(b, nw, t, 3, heads, dh)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        q = q * dh**-0.5  # scaled before the product, like the reference
        # Logits, bias, mask and softmax in float32 whatever the compute dtype.
        logits = jnp.einsum('bwqhd,bwkhd->bwhqk', q, k, preferred_element_type=jnp.float32)
        bias = table[swin_torch.relative_position_index(ws).reshape(-1)].reshape(t, t, heads)
        logits = logits + bias.transpose(2, 0, 1)
        if mask is not None:
            logits = logits + mask[:, None]  # (nW, 1, T, T): same mask for every image and head
        attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum('bwhqk,bwkhd->bwqhd', attn, v).reshape(b, nw, t, c)
        return torch_dense(c, c, dtype=self.dtype, name='proj')(out)


class ShiftWindowMSA(nn.Module):
    """mmcls `ShiftWindowMSA` with `pad_small_map=False`: pad, cyclic shift, window attention."""

    num_heads: int
    window_size: int
    shift: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        _, h, w, _ = x.shape
        ws = self.window_size  # min(h, w) >= ws: SwinTransformer checks the input size
        # A map exactly one window wide gains nothing from a shift; the reference skips it there.
        shift = ws // 2 if self.shift and min(h, w) > ws else 0
        pad_b, pad_r = -h % ws, -w % ws
        if pad_b or pad_r:
            x = jnp.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
        hp, wp = h + pad_b, w + pad_r
        if shift:
            x = jnp.roll(x, (-shift, -shift), axis=(1, 2))
        mask = shifted_window_mask(hp, wp, ws, shift) if shift else None
        y = WindowMSA(self.num_heads, ws, self.dtype, name='w_msa')(window_partition(x, ws), mask)
        y = window_reverse(y, ws, hp, wp)
        if shift:
            y = jnp.roll(y, (shift, shift), axis=(1, 2))
        return y[:, :h, :w]


class FFN(nn.Module):
    """mmcv `FFN` with two fcs: `layers.0.0` (C -> hidden) -> exact GELU -> `layers.1` (-> C)."""

    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        x = torch_dense(self.hidden_dim, c, dtype=self.dtype, name='layers_0_0')(x)
        # torch nn.GELU() is exact; jax's default tanh approximation is not (pitfall §11.4).
        x = nn.gelu(x, approximate=False)
        return torch_dense(c, self.hidden_dim, dtype=self.dtype, name='layers_1')(x)


class SwinBlock(nn.Module):
    """Pre-norm Swin block (no drop path: CMID pretrains with drop_path_rate 0)."""

    num_heads: int
    window_size: int
    shift: bool
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = x + ShiftWindowMSA(
            self.num_heads, self.window_size, self.shift, self.dtype, name='attn'
        )(_layer_norm(self.dtype, 'norm1')(x))
        return x + FFN(int(x.shape[-1] * self.mlp_ratio), self.dtype, name='ffn')(
            _layer_norm(self.dtype, 'norm2')(x)
        )


class PatchMerging(nn.Module):
    """mmcv `PatchMerging`: 2x2 gather (nn.Unfold order, c*4 + k), LayerNorm(4C), Linear(4C -> 2C)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape  # H, W even: inputs are multiples of 32
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)  # (.., c, dy, dx)
        x = _layer_norm(self.dtype, 'norm')(x.reshape(b, h // 2, w // 2, 4 * c))
        return torch_dense(2 * c, 4 * c, use_bias=False, dtype=self.dtype, name='reduction')(x)


class SwinStage(nn.Module):
    """mmcls `SwinBlockSequence`: blocks (shift in odd ones), then optional patch merging."""

    depth: int
    num_heads: int
    window_size: int
    downsample: bool
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    remat: str = 'none'

    @nn.compact
    def __call__(self, x: Array) -> Array:
        block = remat_lib.block(SwinBlock, self.remat)
        for i in range(self.depth):
            x = block(
                self.num_heads,
                self.window_size,
                shift=i % 2 == 1,
                mlp_ratio=self.mlp_ratio,
                dtype=self.dtype,
                name=f'blocks_{i}',
            )(x)
        if self.downsample:
            x = PatchMerging(self.dtype, name='downsample')(x)
        return x


class PatchEmbed(nn.Module):
    """mmcv `PatchEmbed`: p x p stride-p conv with bias (`projection`), then LayerNorm (`norm`)."""

    patch_size: int
    embed_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = patch_conv(x, self.patch_size, self.embed_dim, self.dtype, 'projection')
        return _layer_norm(self.dtype, 'norm')(x)


class SwinTransformer(nn.Module):
    """Swin backbone returning the `norm3`-normalised last stage, NHWC `(B, H/32, W/32, 8 * C)`.

    Attributes:
      embed_dim: channels C of the patch embedding (stage s has C * 2**s channels).
      depths / num_heads: blocks and attention heads per stage.
      window_size: attention window (7 for every official Swin).
      dtype: compute dtype (params are always float32; attention softmax runs in float32).
      remat: 'none', 'dots' or 'full': what each block keeps for the backward pass
        (`cmid_jax.models.remat`).

    Window attention stays XLA's on every platform: cuDNN's fused attention rejects the 49-token
    windows in training (odd lengths with a bias), would need the relative-position bias and shift
    mask as a materialised (B*nW, heads, 49, 49) bias, and gains little on 49x49 score matrices.
    """

    patch_size: int = 4
    embed_dim: int = 128
    depths: Sequence[int] = (2, 2, 18, 2)
    num_heads: Sequence[int] = (4, 8, 16, 32)
    window_size: int = 7
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    remat: str = 'none'

    @property
    def feature_stride(self) -> int:
        return self.patch_size * 2 ** (len(self.depths) - 1)

    @property
    def num_features(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def mask_token_width(self) -> int:
        return self.embed_dim  # the token is added to the stride-4 patch embeddings

    @property
    def min_image_size(self) -> int:
        """Smallest input side: the last stage map must hold one whole window (224 for window 7)."""
        return self.feature_stride * self.window_size

    @nn.compact
    def __call__(
        self, x: Array, *, train: bool, mask: Array | None = None, mask_token: Array | None = None
    ) -> Array:
        """Args:
        x: `(B, H, W, C)` images, H and W multiples of 32 and at least `min_image_size`.
        train: unused (no dropout / drop path); kept for a common backbone signature.
        mask: optional `(B, H//32, W//32)` block mask (1 = masked), repeated x8 onto the patches.
        mask_token: `(embed_dim,)` token owned by the caller, added to masked patch embeddings
          after the patch-embedding norm (official MaskSwin, `replace=False`).
        """
        del train
        _, h, w, _ = x.shape
        s = self.feature_stride
        if h % s or w % s or min(h, w) < self.min_image_size:
            raise ValueError(
                f'Swin input {(h, w)} must be a multiple of {s} and at least '
                f'{self.min_image_size} px (window {self.window_size} on the last '
                'stage; mmcls pad_small_map=False)'
            )

        x = PatchEmbed(self.patch_size, self.embed_dim, self.dtype, name='patch_embed')(
            jnp.asarray(x, self.dtype)
        )
        x = add_mask_token(x, mask, mask_token, self.dtype)
        # Lets tests (and debugging) see the patch embeddings right after token injection.
        self.sow('intermediates', 'patch_tokens', x)

        n = len(self.depths)
        for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            x = SwinStage(
                depth,
                heads,
                self.window_size,
                downsample=i < n - 1,
                mlp_ratio=self.mlp_ratio,
                dtype=self.dtype,
                remat=self.remat,
                name=f'stages_{i}',
            )(x)
        return _layer_norm(self.dtype, f'norm{n - 1}')(x)


def build(
    variant: str,
    *,
    img_size: int,
    dtype: Any = jnp.float32,
    attention_impl: str = 'auto',
    platform: str | None = None,
    remat: str = 'none',
) -> SwinTransformer:
    """Swin for a variant name ('B', or the small 'tiny-test' and 'nano'), its blocks
    rematerialised per `remat`. Inputs of any multiple of 32 from `min_image_size` work; window
    attention always runs in XLA (its relative-position bias and shift mask are no fused-kernel
    case)."""
    del img_size, attention_impl, platform
    if variant not in VARIANTS:
        raise ValueError(f'unknown Swin variant {variant!r}; allowed: {sorted(VARIANTS)}')
    remat_lib.check(remat)
    return SwinTransformer(**VARIANTS[variant], dtype=dtype, remat=remat)


def forward_flops(variant: str, image_size: int, in_chans: int = 3) -> int:
    """Analytic forward FLOPs of one image (`cmid_jax.flop_counts`)."""
    v = VARIANTS[variant]
    return flop_counts.swin_forward(
        image_size=image_size,
        patch_size=4,
        embed_dim=v['embed_dim'],
        depths=v['depths'],
        window_size=v['window_size'],
        in_chans=in_chans,
    )


def torch_models(
    variant: str, *, img_size: int, in_chans: int, layout: str | None = None
) -> list[dict[str, Any]]:
    """timm SwinTransformer (strict) for the 'timm' layout; mmseg's SwinTransformer (the official
    CMID downstream code, loaded non-strictly) for 'mmcls'."""
    layout = resolve_layout(LAYOUTS, layout or EXPORT_LAYOUT, 'Swin')
    v = VARIANTS[variant]
    shape = dict(
        embed_dim=v['embed_dim'],
        depths=list(v['depths']),
        num_heads=list(v['num_heads']),
        window_size=v['window_size'],
    )
    if layout == 'timm':
        name = TORCH_NAMES.get(variant)
        features = 'model.forward_features(x): (B, H/32, W/32, C) after the final norm'
        if name:
            return [
                torch_model_spec(
                    'timm',
                    model_name=name,
                    features=features,
                    kwargs=dict(img_size=img_size, in_chans=in_chans, num_classes=0),
                )
            ]
        return [
            torch_model_spec(
                'timm',
                cls='timm.models.swin_transformer.SwinTransformer',
                features=features,
                kwargs=dict(
                    img_size=img_size, patch_size=4, **shape, in_chans=in_chans, num_classes=0
                ),
            )
        ]
    # What mmseg / mmdet read; not loaded by our tests.
    return [
        torch_model_spec(
            'mmseg',
            cls='mmseg.models.backbones.SwinTransformer',
            kwargs=dict(
                pretrain_img_size=img_size,
                in_channels=in_chans,
                embed_dims=shape['embed_dim'],
                depths=shape['depths'],
                num_heads=shape['num_heads'],
                window_size=shape['window_size'],
                patch_size=4,
                out_indices=[3],
            ),
            features='out_indices=(3,): the norm3 map, (B, C, H/32, W/32)',
            note='mmseg / mmdet load it through init_cfg=dict(type="Pretrained", '
            'checkpoint=...), non-strictly (cmid-method.md 10.4)',
        )
    ]
