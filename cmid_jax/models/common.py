"""Linen building blocks shared by the backbones (ResNet, ViT, Swin).

* PyTorch's default `nn.Linear` / `nn.Conv2d` initialisers, for modules whose reference leaves them
  at torch defaults, and the layers built with them;
* the CMID mask token: the 32-px block mask repeated (nearest) onto a finer feature grid and added.

The PyTorch state_dict helpers (key matching, param-tree flattening) are in `cmid_jax.state_dict`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# torch nn.Linear / nn.Conv2d default weight init, kaiming_uniform(a=sqrt(5)), is U(+-1/sqrt(fan_in)):
# variance 1/(3 fan_in). flax computes fan_in from (in,) for Dense and from (kh, kw, in) for Conv.
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_default_bias_init(fan_in: int) -> Callable[..., Array]:
    """torch's default bias init for a layer with `fan_in` inputs: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_dense(
    features: int, fan_in: int, *, dtype: Any, name: str, use_bias: bool = True
) -> nn.Dense:
    """nn.Dense with torch.nn.Linear's default init (kaiming-uniform kernel, uniform bias with
    bound 1/sqrt(fan_in)) and float32 parameters."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=torch_default_kernel_init,
        bias_init=torch_default_bias_init(fan_in),
        name=name,
    )


def patch_conv(x: Array, patch_size: int, embed_dim: int, dtype: Any, name: str) -> Array:
    """A p x p stride-p conv with bias at torch's default init (timm and mmcv patch embeddings).

    Call it inside a compact method: the conv becomes a child `name` of the calling module.
    """
    p = patch_size
    return nn.Conv(
        embed_dim,
        (p, p),
        strides=(p, p),
        padding='VALID',
        use_bias=True,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=torch_default_kernel_init,
        bias_init=torch_default_bias_init(p * p * x.shape[-1]),
        name=name,
    )(x)


def upsampled_mask_term(
    mask: Array, mask_token: Array, feat_shape: tuple[int, ...], dtype: Any
) -> Array:
    """`mask_token * mask` with the 32-px block mask repeated (nearest) onto the feature grid."""
    _, h, w, c = feat_shape
    mh, mw = mask.shape[1:]
    if h % mh or w % mw or h // mh != w // mw:
        raise ValueError(f'mask grid {mask.shape[1:]} does not tile feature grid {(h, w)}')
    if mask_token.shape != (c,):
        raise ValueError(f'mask_token shape {mask_token.shape} != ({c},)')
    r = h // mh
    m = jnp.repeat(jnp.repeat(mask.astype(dtype), r, axis=1), r, axis=2)
    return mask_token.astype(dtype) * m[..., None]


def add_mask_token(x: Array, mask: Array | None, mask_token: Array | None, dtype: Any) -> Array:
    """`x + mask_token * mask` on the NHWC map `x` (official `replace=False`); `x` if no mask."""
    if mask is None:
        return x
    if mask_token is None:
        raise ValueError('mask given without mask_token')
    return x + upsampled_mask_term(mask, mask_token, x.shape, dtype)
