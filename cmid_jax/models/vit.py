"""timm-exact ViT (`vit_base_patch16_224` family) backbone in Flax Linen, with CMID mask tokens.

Math as timm `VisionTransformer(num_classes=0)`: patch conv with bias, cls token, a learned
position embedding with 1 + (H/p)(W/p) rows added after concatenating cls, pre-norm blocks,
LayerNorm eps 1e-6, fused qkv Dense with bias laid out q|k|v and head-major, exact GELU, final
LayerNorm. The backbone
returns the patch tokens after the final norm as a `(B, H/p, W/p, D)` map (cls dropped).

Submodule names mirror timm (`patch_embed/proj`, `blocks_3/attn/qkv`, `norm`), so the conversion to
and from a timm state_dict is a rename plus a transpose.

CMID adaptation (cmid-method.md D2): a caller-owned mask token is *added* to the patch embeddings of
masked patches before the position embedding is added.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cmid_jax import flop_counts
from cmid_jax.models import attention
from cmid_jax.models import remat as remat_lib
from cmid_jax.models.common import add_mask_token, patch_conv
from cmid_jax.state_dict import (
    flatten,
    match_state_dict,
    resolve_layout,
    torch_model_spec,
    unflatten,
)

Array = jax.Array

# timm's trunc_normal_(std=.02) truncates at absolute +-2, i.e. +-100 std: effectively a plain
# normal. jax's truncated_normal takes bounds in units of std, so pass +-100 to match exactly.
_trunc_normal_02 = nn.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)

VARIANTS: dict[str, dict[str, int]] = {
    'mu/16': dict(patch_size=16, embed_dim=64, depth=2, num_heads=2),  # test-only
    'Ti/16': dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    'S/16': dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    'B/16': dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
}


# --- Registry contract (cmid_jax.models.Backbone) -------------------------------------------------
TORCH_NAMES = {
    'Ti/16': 'vit_tiny_patch16_224',
    'S/16': 'vit_small_patch16_224',
    'B/16': 'vit_base_patch16_224',
}
LAYOUTS = ('timm',)  # the official code has no ViT; timm's keys are ours up to a rename
EXPORT_LAYOUT = 'timm'
MASK_TOKEN_LAYOUT = 'nlc'  # a token sequence, like the official MaskSwin's (1, 1, C)
STEM_KERNEL = ('patch_embed', 'proj', 'kernel')
TELL_KEYS = ('blocks.0.attn.qkv.weight',)
HAS_BATCH_NORM = False


def _attention(
    q: Array, k: Array, v: Array, *, implementation: str, pad_to_multiple: int | None = None
) -> Array:
    """Softmax attention on `(B, T, N, Dh)` q/k/v (scale 1/sqrt(Dh)); returns `(B, T, N, Dh)`.

    With `pad_to_multiple`, the token axis is zero-padded to a multiple of it and the padded keys
    are excluded through `key_value_seq_lengths`; the padded query rows are dropped afterwards.
    cuDNN fused attention rejects T=197 (jax-practices §11.6), hence the padding for 'cudnn'.
    """
    t = q.shape[1]
    if pad_to_multiple is None or t % pad_to_multiple == 0:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    t_pad = -(-t // pad_to_multiple) * pad_to_multiple
    widths = ((0, 0), (0, t_pad - t), (0, 0), (0, 0))
    q, k, v = (jnp.pad(a, widths) for a in (q, k, v))
    lens = jnp.full((q.shape[0],), t, dtype=jnp.int32)
    out = jax.nn.dot_product_attention(
        q, k, v, key_value_seq_lengths=lens, implementation=implementation
    )
    return out[:, :t]


class Attention(nn.Module):
    """timm `Attention`: fused qkv (q|k|v, head-major), softmax attention, output projection."""

    dim: int
    num_heads: int
    dtype: Any = jnp.float32
    attention_impl: str = 'xla'

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, t, d = x.shape
        dense = functools.partial(
            nn.Dense,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=_trunc_normal_02,
            bias_init=nn.initializers.zeros,
        )
        qkv = dense(3 * d, name='qkv')(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.attention_impl == 'cudnn':
            o = _attention(q, k, v, implementation='cudnn', pad_to_multiple=8)
        elif self.attention_impl == 'xla':
            o = _attention(q, k, v, implementation='xla')
        else:
            raise ValueError(
                f"attention_impl must be 'xla' or 'cudnn', got {self.attention_impl!r}"
            )
        return dense(d, name='proj')(o.reshape(b, t, d))


class Mlp(nn.Module):
    """timm `Mlp`: fc1 -> exact GELU -> fc2."""

    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dense = functools.partial(
            nn.Dense,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=_trunc_normal_02,
            bias_init=nn.initializers.zeros,
        )
        d = x.shape[-1]
        # torch nn.GELU() is exact; jax's default tanh approximation is not (pitfall §11.4).
        x = nn.gelu(dense(self.hidden_dim, name='fc1')(x), approximate=False)
        return dense(d, name='fc2')(x)


def _layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
    # Statistics reduce in float32 even for bf16 inputs (force_float32_reductions default).
    return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, name=name)


class Block(nn.Module):
    """Pre-norm transformer block (timm `Block`, no layer scale, no drop path)."""

    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    attention_impl: str = 'xla'

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = x + Attention(self.dim, self.num_heads, self.dtype, self.attention_impl, name='attn')(
            _layer_norm(self.dtype, 'norm1')(x)
        )
        x = x + Mlp(int(self.dim * self.mlp_ratio), self.dtype, name='mlp')(
            _layer_norm(self.dtype, 'norm2')(x)
        )
        return x


class PatchEmbed(nn.Module):
    """timm `PatchEmbed`: a p x p stride-p conv with bias; output stays NHWC."""

    patch_size: int
    embed_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        # timm leaves the patch conv at torch's default init.
        return patch_conv(x, self.patch_size, self.embed_dim, self.dtype, 'proj')


class VisionTransformer(nn.Module):
    """ViT backbone returning the final-norm patch tokens as `(B, H/p, W/p, embed_dim)`.

    Attributes:
      img_size: training resolution; sets the number of position-embedding rows.
      dtype: compute dtype (params are always float32).
      attention_impl: 'xla' (any backend) or 'cudnn' (GPU only; needs dtype bf16/fp16 and a head
        dim that is a multiple of 8; the tokens are padded to a multiple of 8). `build`
        resolves 'auto' (`cmid_jax.models.attention`).
      remat: 'none', 'dots' or 'full': what each block keeps for the backward pass
        (`cmid_jax.models.remat`).
    """

    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    img_size: int = 224
    dtype: Any = jnp.float32
    attention_impl: str = 'xla'
    remat: str = 'none'

    @property
    def feature_stride(self) -> int:
        return self.patch_size

    @property
    def num_features(self) -> int:
        return self.embed_dim

    @property
    def mask_token_width(self) -> int:
        return self.embed_dim

    @nn.compact
    def __call__(
        self, x: Array, *, train: bool, mask: Array | None = None, mask_token: Array | None = None
    ) -> Array:
        """Args:
        x: `(B, H, W, C)` images with H = W = img_size (the position embedding is not resampled).
        train: unused (no dropout / drop path); kept for a common backbone signature.
        mask: optional `(B, H//32, W//32)` block mask (1 = masked).
        mask_token: `(embed_dim,)` token owned by the caller, added to masked patch embeddings.
        """
        del train
        b, h, w, _ = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f'image size {(h, w)} is not a multiple of patch size {p}')
        gh, gw = h // p, w // p
        d = self.embed_dim

        x = PatchEmbed(p, d, self.dtype, name='patch_embed')(jnp.asarray(x, self.dtype))
        if mask is not None and 32 % p:
            raise ValueError(f'patch size {p} does not divide the 32-px mask blocks')
        x = add_mask_token(x, mask, mask_token, self.dtype)
        # Lets tests (and debugging) see the patch embeddings right after token injection.
        self.sow('intermediates', 'patch_tokens', x)

        n_pos = 1 + (self.img_size // p) ** 2
        cls = self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, d), jnp.float32)
        pos = self.param('pos_embed', _trunc_normal_02, (1, n_pos, d), jnp.float32)
        if 1 + gh * gw != n_pos:
            raise ValueError(f'input grid {(gh, gw)} does not match img_size {self.img_size}')
        x = x.reshape(b, gh * gw, d)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), x], axis=1)
        x = x + pos.astype(self.dtype)

        block = remat_lib.block(Block, self.remat)
        for i in range(self.depth):
            x = block(
                d,
                self.num_heads,
                self.mlp_ratio,
                self.dtype,
                self.attention_impl,
                name=f'blocks_{i}',
            )(x)
        x = _layer_norm(self.dtype, 'norm')(x)
        return x[:, 1:].reshape(b, gh, gw, d)


def build(
    variant: str,
    *,
    img_size: int,
    dtype: Any = jnp.float32,
    attention_impl: str = 'auto',
    platform: str | None = None,
    remat: str = 'none',
) -> VisionTransformer:
    """ViT for a variant name ('mu/16' test-only, 'Ti/16', 'S/16', 'B/16') at `img_size`.

    `attention_impl` ('auto', 'xla', 'cudnn') is resolved for `platform` ('cuda', 'tpu', ...;
    None = this machine's), the platform the model will be lowered for.
    """
    if variant not in VARIANTS:
        raise ValueError(f'unknown ViT variant {variant!r}; allowed: {sorted(VARIANTS)}')
    remat_lib.check(remat)
    v = VARIANTS[variant]
    impl = attention.resolve(
        attention_impl,
        platform=platform or attention.current_platform(),
        dtype=dtype,
        head_dim=v['embed_dim'] // v['num_heads'],
    )
    return VisionTransformer(**v, img_size=img_size, dtype=dtype, attention_impl=impl, remat=remat)


def forward_flops(variant: str, image_size: int, in_chans: int = 3) -> int:
    """Analytic forward FLOPs of one image (`cmid_jax.flop_counts`)."""
    v = VARIANTS[variant]
    return flop_counts.vit_forward(
        image_size=image_size,
        patch_size=v['patch_size'],
        embed_dim=v['embed_dim'],
        depth=v['depth'],
        in_chans=in_chans,
    )


def torch_models(
    variant: str, *, img_size: int, in_chans: int, layout: str | None = None
) -> list[dict[str, Any]]:
    """The timm VisionTransformer the export loads into (strict)."""
    resolve_layout(LAYOUTS, layout, 'ViT')
    features = (
        'model.forward_features(x)[:, model.num_prefix_tokens:]: (B, N, D) patch tokens '
        'after the final norm (cmid_jax drops the cls token)'
    )
    name = TORCH_NAMES.get(variant)
    if name:
        return [
            torch_model_spec(
                'timm',
                model_name=name,
                features=features,
                kwargs=dict(img_size=img_size, in_chans=in_chans, num_classes=0),
            )
        ]
    v = VARIANTS[variant]
    return [
        torch_model_spec(
            'timm',
            cls='timm.models.vision_transformer.VisionTransformer',
            features=features,
            kwargs=dict(
                img_size=img_size,
                patch_size=v['patch_size'],
                embed_dim=v['embed_dim'],
                depth=v['depth'],
                num_heads=v['num_heads'],
                in_chans=in_chans,
                num_classes=0,
            ),
        )
    ]


# ------------------------------------------------------------------------------------------------
# Checkpoint conversion (timm VisionTransformer key layout, without `head.*`)
# ------------------------------------------------------------------------------------------------

_INDEXED = re.compile(r'^(blocks)_(\d+)$')
_LEAF = {
    'kernel': 'weight',
    'scale': 'weight',
    'bias': 'bias',
    'cls_token': 'cls_token',
    'pos_embed': 'pos_embed',
}


def _torch_key(path: tuple[str, ...]) -> str:
    mods = [_INDEXED.sub(r'\1.\2', p) for p in path[:-1]]
    return '.'.join(mods + [_LEAF[path[-1]]])


def _to_torch_layout(path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
    if path[-1] != 'kernel':  # cls_token / pos_embed / biases / LayerNorm are identical
        return x
    # conv HWIO -> OIHW; Dense (in, out) -> (out, in)
    return x.transpose(3, 2, 0, 1) if x.ndim == 4 else x.T


def _from_torch_layout(path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
    if path[-1] != 'kernel':
        return x
    return x.transpose(2, 3, 1, 0) if x.ndim == 4 else x.T


def to_torch_state_dict(
    variables: Mapping[str, Any], layout: str | None = None
) -> dict[str, np.ndarray]:
    """Flax `{'params': ...}` -> timm VisionTransformer state_dict (float32 numpy, no `head.*`)."""
    resolve_layout(LAYOUTS, layout, 'ViT')
    params = variables['params'] if 'params' in variables else variables
    sd = {}
    for path, v in flatten(params).items():
        sd[_torch_key(path)] = np.ascontiguousarray(
            _to_torch_layout(path, np.array(v, dtype=np.float32))
        )  # writable copy
    return dict(sorted(sd.items()))


def _template(model: VisionTransformer) -> dict[str, Any]:
    return jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jnp.zeros((1, model.img_size, model.img_size, 3), jnp.float32),
    )


def from_torch_state_dict(
    state_dict: Mapping[str, Any], model: VisionTransformer
) -> dict[str, dict[str, Any]]:
    """timm VisionTransformer state_dict -> Flax `{'params': ...}` for `model`.

    Accepts numpy arrays or torch tensors. Strip `head.*` before calling. Raises one ValueError
    listing every unknown key, missing key and shape mismatch (e.g. a pos_embed for another
    img_size: resample it first).
    """
    expected = {}
    for path, leaf in flatten(_template(model)['params']).items():
        if path[-1] == 'kernel':
            shape = (
                tuple(leaf.shape[i] for i in (3, 2, 0, 1))
                if len(leaf.shape) == 4
                else tuple(leaf.shape[::-1])
            )
        else:
            shape = tuple(leaf.shape)
        expected[_torch_key(path)] = (path, shape)

    arrays = match_state_dict(
        state_dict, {k: shape for k, (_, shape) in expected.items()}, what='ViT'
    )
    out = {
        path: jnp.asarray(_from_torch_layout(path, arrays[key].astype(np.float32)))
        for key, (path, _) in expected.items()
    }
    return {'params': unflatten(out)}
