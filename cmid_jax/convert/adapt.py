"""Adapting RGB-pretrained weights to an N-band input (``config.data.bands``).

Only the first layer sees the bands: the ResNet stem convolution ``conv1``, the ViT patch
embedding ``patch_embed/proj`` and the Swin patch embedding ``patch_embed/projection``. Its kernel
(HWIO, I = 3) is adapted by timm's ``adapt_input_conv`` rule, so that numbers match timm's
``in_chans=N`` loading:

* N = 1: the sum over the RGB input channels (a grey image gives the RGB model's response to the
  same grey in R, G and B);
* N = 3: unchanged;
* other N: the RGB kernels repeated cyclically over the N inputs (R, G, B, R, G, ...) and scaled
  by 3 / N, which keeps the activation scale of an input whose bands are alike.

Integration point: ``cmid_jax.convert.import_torch`` converts a 3-channel torch state dict; call
:func:`adapt_stem` on the converted backbone parameters before they are checked against and put
into a state built for ``num_bands(config.data)`` input channels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from cmid_jax.models import BACKBONES


def adapt_input_channels(kernel_hwio, n: int):
    """An ``(H, W, 3, O)`` kernel adapted to ``n`` input channels (the rule above); the result
    has the input's array type (numpy or JAX) and dtype, and shape ``(H, W, n, O)``.

    Raises:
      ValueError: ``n`` < 1, or a kernel that does not have 3 input channels.
    """
    if n < 1:
        raise ValueError(f'cannot adapt a kernel to {n} input channels')
    if kernel_hwio.ndim != 4 or kernel_hwio.shape[2] != 3:
        raise ValueError(f'expected an RGB kernel of shape (H, W, 3, O), got {kernel_hwio.shape}')
    if n == 3:
        return kernel_hwio
    xp = np if isinstance(kernel_hwio, np.ndarray) else _jnp()
    dtype = kernel_hwio.dtype
    kernel = kernel_hwio.astype(xp.float32)  # timm adapts in float32 and casts back
    if n == 1:
        out = kernel.sum(axis=2, keepdims=True)
    else:
        repeats = math.ceil(n / 3)
        out = xp.concatenate([kernel] * repeats, axis=2)[:, :, :n] * (3.0 / n)
    return out.astype(dtype)


def _jnp():
    import jax.numpy as jnp

    return jnp


def adapt_stem(params: Mapping[str, Any], n: int) -> dict[str, Any]:
    """A copy of backbone ``params`` whose stem kernel (the ``STEM_KERNEL`` of a registered
    backbone, :mod:`cmid_jax.models`) is adapted to ``n`` input channels; every other leaf is
    shared, not copied.

    Raises:
      KeyError: none of the known stem kernels is in ``params``.
    """
    stems = [module.STEM_KERNEL for module in BACKBONES.values()]
    for path in stems:
        node = params
        for key in path:
            if not isinstance(node, Mapping) or key not in node:
                break
            node = node[key]
        else:
            return _replace(params, path, adapt_input_channels(node, n))
    raise KeyError(
        f'no stem kernel found; looked for {["/".join(p) for p in stems]} '
        f'among the top-level keys {sorted(params)}'
    )


def _replace(tree: Mapping[str, Any], path: tuple[str, ...], value) -> dict[str, Any]:
    out = dict(tree)
    out[path[0]] = value if len(path) == 1 else _replace(tree[path[0]], path[1:], value)
    return out
