"""CMID heads: MIM decoder, global projector and local (DINO-style) head.

Layouts mirror the official PyTorch modules so that a checkpoint converts by rename and transpose:
`mim2org.decoder_pred.0` (1x1 conv + PixelShuffle), `online_projector.layer.0.{0,3}` (Linear-ReLU-
Linear, no BN) and `class_projector.mlp.*` / `class_projector.last_layer` (Conv1d k=1 MLP, weight-
normed prototypes with the norm fixed to 1). Initialisation follows PyTorch defaults (official Q8).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmid_jax.models.common import torch_default_kernel_init, torch_dense


def pixel_shuffle(x: jax.Array, factor: int) -> jax.Array:
    """NHWC equivalent of torch.nn.PixelShuffle: channel c*r*r + i*r + j goes to pixel (i, j)."""
    b, h, w, c = x.shape
    out_c = c // (factor * factor)
    x = x.reshape(b, h, w, out_c, factor, factor)
    x = x.transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * factor, w * factor, out_c)


class MIMDecoder(nn.Module):
    """1x1 convolution to stride^2 * channels, then pixel shuffle back to input resolution."""

    stride: int
    out_chans: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, fmap: jax.Array) -> jax.Array:
        x = torch_dense(
            self.stride * self.stride * self.out_chans,
            fmap.shape[-1],
            dtype=self.dtype,
            name='decoder_pred',
        )(fmap)
        return pixel_shuffle(x.astype(jnp.float32), self.stride)


class Projector(nn.Module):
    """Global projector Linear(C, hidden) - ReLU - Linear(hidden, out); output L2-normalised."""

    hidden_dim: int = 2048
    out_dim: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = torch_dense(self.hidden_dim, x.shape[-1], dtype=self.dtype, name='fc1')(x)
        x = nn.relu(x)
        x = torch_dense(self.out_dim, self.hidden_dim, dtype=self.dtype, name='fc2')(x)
        return l2_normalize(x.astype(jnp.float32))


class LocalHead(nn.Module):
    """Three-layer position-wise MLP to a bottleneck, L2 norm, then weight-normed prototypes.

    Input (B, N, C) features at N matched positions; output (B, N, prototypes) float32 logits.
    BatchNorm (CNN backbones only) normalises over batch and positions, like BatchNorm1d.
    """

    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    prototypes: int = 2048
    use_bn: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        fan_in = x.shape[-1]
        for i in range(2):
            x = torch_dense(self.hidden_dim, fan_in, dtype=self.dtype, name=f'fc{i + 1}')(x)
            if self.use_bn:
                x = nn.BatchNorm(
                    use_running_average=not train,
                    momentum=0.9,
                    epsilon=1e-5,
                    dtype=self.dtype,
                    param_dtype=jnp.float32,
                    name=f'bn{i + 1}',
                )(x)
            x = nn.gelu(x, approximate=False)
            fan_in = self.hidden_dim
        x = torch_dense(self.bottleneck_dim, fan_in, dtype=self.dtype, name='fc3')(x)
        x = l2_normalize(x.astype(jnp.float32))
        # weight_norm with g fixed to 1: each prototype is the unit-norm direction of its weight vector.
        v = self.param(
            'prototypes', torch_default_kernel_init, (self.bottleneck_dim, self.prototypes)
        )
        return x @ l2_normalize(v, axis=0)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """torch.nn.functional.normalize: x / max(||x||, eps)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)
