"""Backbone registry: one contract per architecture.

`BACKBONES` maps `config.model.arch` to the module that owns that backbone: its variants, its Linen
module, its PyTorch state-dict conversion in each key layout it supports, the PyTorch models its
export loads into, where its mask token goes and how the official checkpoints store it, its
band-mixing stem, and its analytic FLOPs. The networks (`models/cmid.py`), the FLOP counter
(`perf/flops.py`), export, import and the official checkpoint layout (`convert/`) and the N-band
stem adaptation (`convert/adapt.py`) all read it from here, so a new backbone is one module that
implements `Backbone` plus one line in `BACKBONES`.

Every backbone's Linen module has the call signature `apply(variables, x, train=, mask=,
mask_token=)`, returns an NHWC feature map of stride `feature_stride` with `num_features` channels,
and takes the mask token (width `mask_token_width`) from the caller, who owns it as a parameter.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any, Protocol

import flax.linen as nn

from cmid_jax.models import resnet, swin, vit


class Backbone(Protocol):
    """What a backbone module provides (module-level names)."""

    VARIANTS: Mapping[str, Any]  # variant name -> hyper-parameters
    TORCH_NAMES: Mapping[str, str]  # variant -> timm / torchvision name (published variants)
    LAYOUTS: tuple[str, ...]  # PyTorch key layouts; the first is that of the official weights
    EXPORT_LAYOUT: str  # the layout `cmid-export` writes by default (strict-loadable in timm)
    MASK_TOKEN_LAYOUT: str  # official checkpoint shape: 'nchw' (1, C, 1, 1) or 'nlc' (1, 1, C)
    STEM_KERNEL: tuple[str, ...]  # param path of the band-mixing first kernel (HWIO)
    TELL_KEYS: tuple[str, ...]  # torch state_dict keys only this arch has (one per layout)
    HAS_BATCH_NORM: bool  # BN in the backbone (and, as officially, in the local head)

    def build(
        self,
        variant: str,
        *,
        img_size: int,
        dtype: Any = ...,
        attention_impl: str = ...,
        platform: str | None = None,
        remat: str = ...,
    ) -> nn.Module: ...

    def to_torch_state_dict(
        self, variables: Mapping[str, Any], layout: str | None = None
    ) -> dict[str, Any]: ...

    def from_torch_state_dict(
        self, state_dict: Mapping[str, Any], model: nn.Module
    ) -> dict[str, Any]: ...

    def torch_models(
        self, variant: str, *, img_size: int, in_chans: int, layout: str | None = None
    ) -> list[dict[str, Any]]: ...

    def forward_flops(self, variant: str, image_size: int, in_chans: int = 3) -> int: ...


BACKBONES: dict[str, types.ModuleType] = {
    'resnet': resnet,
    'vit': vit,
    'swin': swin,
}


def backbone_module(arch: str) -> Backbone:
    """The module that owns backbone `arch`."""
    if arch not in BACKBONES:
        raise ValueError(
            f'unknown backbone arch {arch!r} (config.model.arch); known: {sorted(BACKBONES)}'
        )
    return BACKBONES[arch]


def build_backbone(arch: str, variant: str, *, img_size: int, **options: Any) -> nn.Module:
    """The Linen module of `arch`/`variant` for `img_size` inputs. `options`: `dtype`;
    `attention_impl` ('auto', 'xla', 'cudnn'; ignored without attention) resolved for `platform`
    (None = this machine's, `cmid_jax.models.attention`); `remat` ('none', 'dots', 'full': which
    block activations the backward pass recomputes, `cmid_jax.models.remat`)."""
    return backbone_module(arch).build(variant, img_size=img_size, **options)


def layouts() -> tuple[str, ...]:
    """Every PyTorch key layout some backbone converts to."""
    return tuple(dict.fromkeys(layout for m in BACKBONES.values() for layout in m.LAYOUTS))


__all__ = ['BACKBONES', 'Backbone', 'backbone_module', 'build_backbone', 'layouts']
