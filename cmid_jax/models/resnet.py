"""torchvision-exact ResNet (v1.5) backbone in Flax Linen, with CMID mask-token injection.

The math matches `torchvision.models.resnet50` (and timm `resnet50`, same keys): stride on the
3x3 conv, a 1x1 conv + BN downsample in the first block of every stage (layer1 included), BN eps
1e-5 and torch momentum 0.1 (flax 0.9), no conv biases. Every conv and the stem max-pool use
explicit symmetric padding k//2: XLA 'SAME' pads stride-2 kernels asymmetrically, which gives a
port that is wrong by ~8% without raising any error (jax-practices §12.2).

Known, negligible difference: in train mode flax updates `running_var` with the biased batch
variance, torch with the unbiased one (a factor n/(n-1), n = B*H*W per channel).

Submodule names mirror torchvision (`conv1`, `bn1`, `layer1_0/conv2`, `layer1_0/downsample_0`), so
`to_torch_state_dict` / `from_torch_state_dict` are a rename plus an HWIO<->OIHW transpose.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cmid_jax import flop_counts
from cmid_jax.models import remat as remat_lib
from cmid_jax.models.common import add_mask_token
from cmid_jax.state_dict import (
    flatten,
    match_state_dict,
    resolve_layout,
    torch_model_spec,
    unflatten,
)

Array = jax.Array

# timm `ResNet.init_weights`: kaiming_normal_(mode='fan_out', nonlinearity='relu') on every conv,
# i.e. an untruncated normal with std sqrt(2 / (out_channels * kh * kw)).
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

# variant -> (blocks per stage, stem / base width).
VARIANTS: dict[str, tuple[tuple[int, ...], int]] = {
    '50': ((3, 4, 6, 3), 64),
    # Test-only: one bottleneck per stage; torch counterpart
    # `torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1])`.
    'tiny': ((1, 1, 1, 1), 64),
    # Smoke and demo runs on a CPU: 'tiny' at a quarter of the width (no torch model name).
    'nano': ((1, 1, 1, 1), 16),
}


# --- Registry contract (cmid_jax.models.Backbone) -------------------------------------------------
TORCH_NAMES = {'50': 'resnet50'}
LAYOUTS = ('torchvision',)  # timm's resnet50 has the same keys (cmid-method.md 10.3)
EXPORT_LAYOUT = 'torchvision'
MASK_TOKEN_LAYOUT = 'nchw'  # official MaskResNet: a (1, C, 1, 1) token on the stride-4 stem map
STEM_KERNEL = ('conv1', 'kernel')
TELL_KEYS = ('layer1.0.conv1.weight',)
HAS_BATCH_NORM = True


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric torch-style padding k//2 on both spatial sides (never 'SAME')."""
    return ((k // 2, k // 2), (k // 2, k // 2))


class Bottleneck(nn.Module):
    """torchvision `Bottleneck` (expansion 4, stride on conv2)."""

    planes: int
    stride: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        conv = functools.partial(
            nn.Conv,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=_conv_init,
        )
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            param_dtype=jnp.float32,
        )
        out_ch = self.planes * 4

        y = conv(self.planes, (1, 1), padding=_pad(1), name='conv1')(x)
        y = nn.relu(norm(name='bn1')(y))
        y = conv(
            self.planes, (3, 3), strides=(self.stride, self.stride), padding=_pad(3), name='conv2'
        )(y)
        y = nn.relu(norm(name='bn2')(y))
        y = conv(out_ch, (1, 1), padding=_pad(1), name='conv3')(y)
        # timm zero_init_last: each residual branch starts as the identity.
        y = norm(scale_init=nn.initializers.zeros, name='bn3')(y)

        shortcut = x
        if self.downsample:
            shortcut = conv(
                out_ch,
                (1, 1),
                strides=(self.stride, self.stride),
                padding=_pad(1),
                name='downsample_0',
            )(x)
            shortcut = norm(name='downsample_1')(shortcut)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """ResNet v1.5 trunk (bottleneck blocks) returning the layer4 map, NHWC `(B, H/32, W/32, 2048)`.

    Attributes:
      stage_sizes: blocks per stage; (3, 4, 6, 3) is ResNet-50.
      width: stem channels and the planes of stage 1 (64 in every torchvision ResNet).
      dtype: compute dtype (params are always float32; BN statistics reduce in float32).
      remat: 'none', 'dots' or 'full': what each bottleneck keeps for the backward pass
        (`cmid_jax.models.remat`; the recomputation repeats the BN normalisation with the same
        batch statistics and updates the running averages once).
    """

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    width: int = 64
    dtype: Any = jnp.float32
    remat: str = 'none'

    feature_stride = 32

    @property
    def mask_token_width(self) -> int:
        return self.width  # channels of the stride-4 stem output where the token is added

    @property
    def num_features(self) -> int:
        return self.width * 2 ** (len(self.stage_sizes) - 1) * 4

    @nn.compact
    def __call__(
        self, x: Array, *, train: bool, mask: Array | None = None, mask_token: Array | None = None
    ) -> Array:
        """Args:
        x: `(B, H, W, C)` images, H and W multiples of 32.
        train: BN uses (and updates, with mutable 'batch_stats') batch statistics if True.
        mask: optional `(B, H//32, W//32)` block mask (1 = masked).
        mask_token: `(width,)` token owned by the caller, added at masked positions after the stem.
        """
        x = jnp.asarray(x, self.dtype)
        x = nn.Conv(
            self.width,
            (7, 7),
            strides=(2, 2),
            padding=_pad(7),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=_conv_init,
            name='conv1',
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name='bn1',
        )(x)
        x = nn.relu(x)
        # torch MaxPool2d(3, 2, padding=1) pads with -inf, so padded cells never win the max.
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')

        x = add_mask_token(x, mask, mask_token, self.dtype)
        # Lets tests (and debugging) see the stride-4 map right after token injection.
        self.sow('intermediates', 'stem_tokens', x)

        bottleneck = remat_lib.block(Bottleneck, self.remat, static_argnums=(2,))  # train
        for s, n_blocks in enumerate(self.stage_sizes):
            for b in range(n_blocks):
                x = bottleneck(
                    planes=self.width * 2**s,
                    stride=2 if (s > 0 and b == 0) else 1,
                    downsample=(b == 0),  # also layer1.0: width -> 4 * width channels
                    dtype=self.dtype,
                    name=f'layer{s + 1}_{b}',
                )(x, train)
        return x


def build(
    variant: str,
    *,
    img_size: int,
    dtype: Any = jnp.float32,
    attention_impl: str = 'auto',
    platform: str | None = None,
    remat: str = 'none',
) -> ResNet:
    """ResNet for a variant name ('50', or the small 'tiny' and 'nano'), its bottlenecks
    rematerialised per `remat` (`cmid_jax.models.remat`); any input size that is a multiple of 32
    works, and there is no attention to choose."""
    del img_size, attention_impl, platform
    if variant not in VARIANTS:
        raise ValueError(f'unknown ResNet variant {variant!r}; allowed: {sorted(VARIANTS)}')
    remat_lib.check(remat)
    stage_sizes, width = VARIANTS[variant]
    return ResNet(stage_sizes=stage_sizes, width=width, dtype=dtype, remat=remat)


def forward_flops(variant: str, image_size: int, in_chans: int = 3) -> int:
    """Analytic forward FLOPs of one image (`cmid_jax.flop_counts`)."""
    stage_sizes, width = VARIANTS[variant]
    return flop_counts.resnet_forward(
        image_size=image_size, stage_sizes=stage_sizes, width=width, in_chans=in_chans
    )


def torch_models(
    variant: str, *, img_size: int, in_chans: int, layout: str | None = None
) -> list[dict[str, Any]]:
    """PyTorch constructors the export loads into, strict-loadable (timm) first; torchvision
    misses only `fc.*`. None for the 16-channel 'nano', whose stem no torch library builds."""
    del img_size  # any multiple of 32
    resolve_layout(LAYOUTS, layout, 'ResNet')
    stage_sizes, width = VARIANTS[variant]
    if width != 64:  # timm and torchvision both fix the stem at 64 channels
        return []
    name = TORCH_NAMES.get(variant)
    features = 'model.forward_features(x): (B, C, H/32, W/32), the layer4 map'
    # torchvision always builds the classifier: load with strict=False (or set fc=Identity).
    tv = dict(
        features='conv1, bn1, relu, maxpool, layer1..layer4: (B, C, H/32, W/32)',
        missing_keys=['fc.bias', 'fc.weight'],
    )
    layers = list(stage_sizes)
    if name:
        models = [
            torch_model_spec(
                'timm',
                model_name=name,
                features=features,
                kwargs=dict(in_chans=in_chans, num_classes=0),
            ),
            torch_model_spec('torchvision', model_name=name, kwargs={}, **tv),
        ]
    else:
        models = [
            torch_model_spec(
                'timm',
                cls='timm.models.resnet.ResNet',
                object_kwargs=dict(block='timm.models.resnet.Bottleneck'),
                kwargs=dict(layers=layers, in_chans=in_chans, num_classes=0),
                features=features,
            ),
            torch_model_spec(
                'torchvision',
                cls='torchvision.models.resnet.ResNet',
                object_kwargs=dict(block='torchvision.models.resnet.Bottleneck'),
                kwargs=dict(layers=layers),
                **tv,
            ),
        ]
    return models if in_chans == 3 else models[:1]  # torchvision ResNets take 3 bands only


# ------------------------------------------------------------------------------------------------
# Checkpoint conversion (torchvision / timm `resnet50` key layout, without `fc.*`)
# ------------------------------------------------------------------------------------------------

_INDEXED = re.compile(r'^(layer\d+|downsample)_(\d+)$')
_LEAF = {
    ('params', 'kernel'): 'weight',
    ('params', 'scale'): 'weight',
    ('params', 'bias'): 'bias',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}


def _torch_key(collection: str, path: tuple[str, ...]) -> str:
    mods = [_INDEXED.sub(r'\1.\2', p) for p in path[:-1]]
    return '.'.join(mods + [_LEAF[(collection, path[-1])]])


def _to_torch_layout(x: np.ndarray) -> np.ndarray:
    return x.transpose(3, 2, 0, 1) if x.ndim == 4 else x  # conv HWIO -> OIHW


def _from_torch_layout(x: np.ndarray) -> np.ndarray:
    return x.transpose(2, 3, 1, 0) if x.ndim == 4 else x  # conv OIHW -> HWIO


def to_torch_state_dict(
    variables: Mapping[str, Any], layout: str | None = None
) -> dict[str, np.ndarray]:
    """Flax `{'params', 'batch_stats'}` -> torchvision resnet state_dict (float32 numpy, no `fc.*`).

    Includes `running_mean/var` and an int64 0-d `num_batches_tracked` per BN, so the result loads
    into torchvision with `strict=True` once `fc` is removed (or replaced by `nn.Identity`).
    """
    resolve_layout(LAYOUTS, layout, 'ResNet')
    if 'params' not in variables or 'batch_stats' not in variables:
        raise ValueError("variables must contain 'params' and 'batch_stats'")
    sd: dict[str, np.ndarray] = {}
    for coll in ('params', 'batch_stats'):
        for path, v in flatten(variables[coll]).items():
            sd[_torch_key(coll, path)] = np.ascontiguousarray(
                _to_torch_layout(np.array(v, dtype=np.float32))
            )  # writable, for torch.from_numpy
    for path in flatten(variables['batch_stats']):
        if path[-1] == 'mean':
            prefix = _torch_key('batch_stats', path)[: -len('running_mean')]
            sd[prefix + 'num_batches_tracked'] = np.array(0, dtype=np.int64)
    return dict(sorted(sd.items()))


def _template(model: ResNet) -> dict[str, Any]:
    return jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jnp.zeros((1, 32, 32, 3), jnp.float32),
    )


def from_torch_state_dict(
    state_dict: Mapping[str, Any], model: ResNet
) -> dict[str, dict[str, Any]]:
    """torchvision/timm resnet state_dict -> Flax `{'params', 'batch_stats'}` for `model`.

    Accepts numpy arrays or torch tensors. `num_batches_tracked` entries are optional and ignored.
    Strip `fc.*` before calling. Raises one ValueError listing every unknown key, missing key and
    shape mismatch.
    """
    tmpl = _template(model)
    expected: dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]] = {}
    for coll in ('params', 'batch_stats'):
        for path, leaf in flatten(tmpl[coll]).items():
            shape = (
                leaf.shape if len(leaf.shape) != 4 else tuple(leaf.shape[i] for i in (3, 2, 0, 1))
            )
            expected[_torch_key(coll, path)] = (coll, path, shape)
    optional = {
        k[: -len('running_mean')] + 'num_batches_tracked': None
        for k in expected
        if k.endswith('running_mean')
    }

    arrays = match_state_dict(
        state_dict, {k: e[2] for k, e in expected.items()}, what='ResNet', optional=optional
    )
    out: dict[str, dict[tuple[str, ...], Any]] = {'params': {}, 'batch_stats': {}}
    for key, (coll, path, _) in expected.items():
        out[coll][path] = jnp.asarray(_from_torch_layout(arrays[key].astype(np.float32)))
    return {coll: unflatten(flat) for coll, flat in out.items()}
