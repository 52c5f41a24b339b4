"""A toy backbone written against the registry contract (`cmid_jax.models.Backbone`) only.

tests/test_registry.py registers it with one line (`BACKBONES['toy'] = toy_backbone`) and runs
the networks, a train step, the FLOP counter, export, the official checkpoint layout and the N-band
stem adaptation on it: if any of them still had a table of its own, that would fail.

The network: a 4x4 stride-4 patch conv (the stem, where the mask token is added), then an 8x8
stride-8 conv to the stride-32 map. Its PyTorch twin is `torch.nn.Sequential(Conv2d, Conv2d)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cmid_jax import flop_counts
from cmid_jax.models.common import add_mask_token
from cmid_jax.state_dict import flatten, match_state_dict, resolve_layout, unflatten

VARIANTS = {'S': 8, 'M': 16}  # stem width
TORCH_NAMES: dict[str, str] = {}
LAYOUTS = ('sequential',)
EXPORT_LAYOUT = 'sequential'
MASK_TOKEN_LAYOUT = 'nchw'
STEM_KERNEL = ('stem', 'kernel')
TELL_KEYS = ('0.weight',)
HAS_BATCH_NORM = False
_TORCH = {'stem': '0', 'body': '1'}


class Toy(nn.Module):
    width: int = 8
    dtype: Any = jnp.float32
    feature_stride = 32

    @property
    def num_features(self) -> int:
        return 4 * self.width

    @property
    def mask_token_width(self) -> int:
        return self.width

    @nn.compact
    def __call__(self, x, *, train: bool, mask=None, mask_token=None):
        del train
        x = nn.Conv(self.width, (4, 4), strides=4, dtype=self.dtype, name='stem')(x)
        x = add_mask_token(x, mask, mask_token, self.dtype)
        return nn.Conv(self.num_features, (8, 8), strides=8, dtype=self.dtype, name='body')(x)


def build(
    variant: str,
    *,
    img_size: int,
    dtype: Any = jnp.float32,
    attention_impl: str = 'auto',
    platform: str | None = None,
    remat: str = 'none',
) -> Toy:
    del img_size, attention_impl, platform, remat
    return Toy(VARIANTS[variant], dtype)


def forward_flops(variant: str, image_size: int, in_chans: int = 3) -> int:
    w, h = VARIANTS[variant], image_size // 4
    return flop_counts.conv(h, h, 4, in_chans, w) + flop_counts.conv(h // 8, h // 8, 8, w, 4 * w)


def torch_models(
    variant: str, *, img_size: int, in_chans: int, layout: str | None = None
) -> list[dict[str, Any]]:
    resolve_layout(LAYOUTS, layout, 'Toy')
    return []


def to_torch_state_dict(
    variables: Mapping[str, Any], layout: str | None = None
) -> dict[str, np.ndarray]:
    resolve_layout(LAYOUTS, layout, 'Toy')
    out = {}
    for (module, leaf), v in flatten(variables['params']).items():
        v = np.array(v, np.float32)
        out[f'{_TORCH[module]}.{"weight" if leaf == "kernel" else "bias"}'] = (
            v.transpose(3, 2, 0, 1) if leaf == 'kernel' else v
        )
    return out


def from_torch_state_dict(state_dict: Mapping[str, Any], model: Toy) -> dict[str, Any]:
    template = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )['params']
    expected, paths = {}, {}
    for path, leaf in flatten(template).items():
        key = f'{_TORCH[path[0]]}.{"weight" if path[1] == "kernel" else "bias"}'
        shape = leaf.shape
        expected[key] = tuple(shape[i] for i in (3, 2, 0, 1)) if len(shape) == 4 else shape
        paths[key] = path
    arrays = match_state_dict(state_dict, expected, what='Toy')
    return {
        'params': unflatten(
            {
                paths[k]: jnp.asarray(a.transpose(2, 3, 1, 0) if a.ndim == 4 else a)
                for k, a in arrays.items()
            }
        ),
        'batch_stats': {},
    }
