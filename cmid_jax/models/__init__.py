"""Backbones for cmid_jax: a torchvision-exact ResNet, a timm-exact ViT and the official mmcls Swin.

All share one call signature, `model.apply(variables, x, train=..., mask=..., mask_token=...)`,
return an NHWC feature map of stride `feature_stride` with `num_features` channels, and take the
mask token (width `mask_token_width`) from the caller, who owns it as a parameter.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cmid_jax.models import resnet, swin, vit
from cmid_jax.models.resnet import ResNet
from cmid_jax.models.swin import SwinTransformer
from cmid_jax.models.vit import VisionTransformer

ARCHS = ('resnet', 'vit', 'swin')

# timm / torchvision model names of each (arch, variant), for export metadata. The test-only
# variants ('tiny', 'nano', 'mu/16', 'tiny-test') have no registered torch model name.
TORCH_NAMES: dict[tuple[str, str], str] = {
    ('resnet', '50'): 'resnet50',
    ('vit', 'Ti/16'): 'vit_tiny_patch16_224',
    ('vit', 'S/16'): 'vit_small_patch16_224',
    ('vit', 'B/16'): 'vit_base_patch16_224',
    ('swin', 'B'): 'swin_base_patch4_window7_224',
}


def build_backbone(arch: str, variant: str, *, img_size: int, dtype: Any = jnp.float32,
                   attention_impl: str = 'auto', platform: str | None = None,
                   remat: str = 'none') -> nn.Module:
    """Backbone module for `arch` in {'resnet', 'vit', 'swin'} and a variant of it.

    `img_size` sets the ViT position-embedding length (ResNets accept any multiple of 32, Swins any
    multiple of 32 from `min_image_size`, 224 px for window 7);
    `attention_impl` ('auto', 'xla' or 'cudnn') only applies to the ViT, resolved for `platform`
    (None = this machine's; `cmid_jax.models.attention`); `remat` ('none', 'dots', 'full') wraps
    the blocks (`cmid_jax.models.remat`).
    """
    if arch == 'resnet':
        return resnet.build_resnet(variant, dtype=dtype, remat=remat)
    if arch == 'vit':
        return vit.build_vit(variant, img_size=img_size, dtype=dtype,
                             attention_impl=attention_impl, platform=platform, remat=remat)
    if arch == 'swin':
        return swin.build_swin(variant, dtype=dtype, remat=remat)
    raise ValueError(f'unknown backbone arch {arch!r}; allowed: {list(ARCHS)}')


__all__ = ['ARCHS', 'TORCH_NAMES', 'ResNet', 'SwinTransformer', 'VisionTransformer', 'build_backbone',
           'resnet', 'swin', 'vit']
