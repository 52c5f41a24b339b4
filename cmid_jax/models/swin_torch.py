"""PyTorch key layouts of the Swin backbone (`cmid_jax.models.swin`): the mmcls / mmseg layout of
the official CMID weights and the current timm layout, both ways.

`cmid_jax.models.swin` exposes `to_torch_state_dict` and `from_torch_state_dict` of this module as
its registry contract (`cmid_jax.models.Backbone`); `torch_state_dict_shapes` and `detect_layout`
are used from here. The model is passed in, so this module does not import the network: the
network imports the standard relative position index from here (`relative_position_index`, the
mmcls buffer).
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

from cmid_jax.state_dict import flatten, match_state_dict, resolve_layout, unflatten

LAYOUTS = ('mmcls', 'timm')  # official CMID / mmseg keys, and current timm keys (see below)


@functools.cache
def relative_position_index(window: int) -> np.ndarray:
    """`(W*W, W*W)` int64 index into the `(2W-1)^2` bias table (MS-Swin / timm / mmcls)."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing='ij')).reshape(
        2, -1
    )
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, T, T), each in [0, 2W-2]
    index = (rel[0] * (2 * window - 1) + rel[1]).astype(np.int64)
    index.setflags(write=False)  # cached and shared
    return index


# timm (checked on 1.0.31) differs from mmcls by names only, except for patch merging:
#   patch_embed.projection -> patch_embed.proj     stages.{s}.blocks -> layers.{s}.blocks
#   stages.{s}.downsample  -> layers.{s+1}.downsample (timm merges at the start of the next stage)
#   attn.w_msa.*           -> attn.*               ffn.layers.0.0 / ffn.layers.1 -> mlp.fc1 / mlp.fc2
#   norm3                  -> norm                 downsample 4C axis: channel-major -> block-major
# timm keeps `relative_position_index` and `attn_mask` as non-persistent buffers (not in its
# state_dict); mmcls persists `relative_position_index`, so the mmcls export includes it. Older
# timm (e.g. 0.6.x) used the MS-Swin layout, merging at the end of a stage (`layers.{s}.downsample`,
# s = 0-2); current timm's checkpoint_filter_fn converts that layout, this module does not.


_INDEXED = re.compile(r'^(stages|blocks|layers)((?:_\d+)+)$')
_LEAF = {
    'kernel': 'weight',
    'scale': 'weight',
    'bias': 'bias',
    'relative_position_bias_table': 'relative_position_bias_table',
}
_MMCLS_TO_TIMM: tuple[tuple[str, Any], ...] = (
    (r'^patch_embed\.projection\.', 'patch_embed.proj.'),
    (r'^stages\.(\d+)\.downsample\.', lambda m: f'layers.{int(m.group(1)) + 1}.downsample.'),
    (r'^stages\.', 'layers.'),
    (r'\.attn\.w_msa\.', '.attn.'),
    (r'\.ffn\.layers\.0\.0\.', '.mlp.fc1.'),
    (r'\.ffn\.layers\.1\.', '.mlp.fc2.'),
    (r'^norm\d+\.', 'norm.'),
)


def _mmcls_key(path: tuple[str, ...]) -> str:
    mods = [_INDEXED.sub(lambda m: m.group(1) + m.group(2).replace('_', '.'), p) for p in path[:-1]]
    return '.'.join(mods + [_LEAF[path[-1]]])


def _timm_key(mmcls_key: str) -> str:
    for pattern, repl in _MMCLS_TO_TIMM:
        mmcls_key = re.sub(pattern, repl, mmcls_key)
    return mmcls_key


def _torch_key(path: tuple[str, ...], layout: str) -> str:
    key = _mmcls_key(path)
    return key if layout == 'mmcls' else _timm_key(key)


def _merge_perm(four_c: int) -> np.ndarray:
    """Index array p with v_timm = v_mmcls[p] on a patch-merging 4C axis.

    mmcls/JAX index c*4 + dy*2 + dx; timm index (dx*2 + dy)*C + c.
    """
    return np.arange(four_c).reshape(four_c // 4, 2, 2).transpose(2, 1, 0).reshape(-1)


def _is_merge(path: tuple[str, ...]) -> bool:
    return 'downsample' in path


def _to_torch_layout(path: tuple[str, ...], x: np.ndarray, layout: str) -> np.ndarray:
    if path[-1] == 'kernel':  # conv HWIO -> OIHW; Dense (in, out) -> (out, in)
        x = x.transpose(3, 2, 0, 1) if x.ndim == 4 else x.T
    if layout == 'timm' and _is_merge(path):
        x = x[..., _merge_perm(x.shape[-1])]  # norm (4C,) and reduction (2C, 4C): the 4C axis
    return x


def _from_torch_layout(path: tuple[str, ...], x: np.ndarray, layout: str) -> np.ndarray:
    if layout == 'timm' and _is_merge(path):
        x = x[..., np.argsort(_merge_perm(x.shape[-1]))]
    if path[-1] == 'kernel':
        x = x.transpose(2, 3, 1, 0) if x.ndim == 4 else x.T
    return x


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] != 'kernel':
        return tuple(shape)
    return tuple(shape[i] for i in (3, 2, 0, 1)) if len(shape) == 4 else tuple(shape[::-1])


def _index_buffers(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """mmcls `...attn.w_msa.relative_position_index` (int64) for every block of a param tree."""
    out = {}
    for path, table in flatten(params).items():
        if path[-1] == 'relative_position_bias_table':
            window = (int(round(np.sqrt(table.shape[0]))) + 1) // 2
            key = _mmcls_key(path)[: -len('bias_table')] + 'index'
            out[key] = relative_position_index(window).copy()  # writable, for torch.from_numpy
    return out


def to_torch_state_dict(
    variables: Mapping[str, Any], layout: str | None = None
) -> dict[str, np.ndarray]:
    """Flax `{'params': ...}` -> a torch state_dict (numpy) in the `layout` key layout.

    'mmcls': the official CMID / mmcls / mmseg Swin keys (cmid-method.md 10.4), including the int64
    `relative_position_index` buffers; loads into mmseg `SwinTransformer` with strict=False (mmseg
    adds norm0-2). 'timm': current timm `SwinTransformer(num_classes=0)` keys, strict-loadable.
    """
    layout = resolve_layout(LAYOUTS, layout, 'Swin')
    params = variables['params'] if 'params' in variables else variables
    sd = {
        _torch_key(path, layout): np.ascontiguousarray(  # writable copies, for torch.from_numpy
            _to_torch_layout(path, np.array(v, dtype=np.float32), layout)
        )
        for path, v in flatten(params).items()
    }
    if layout == 'mmcls':
        sd.update(_index_buffers(params))
    return dict(sorted(sd.items()))


def _template(model: nn.Module) -> dict[str, Any]:
    size = model.min_image_size  # param shapes do not depend on the input size
    return jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jnp.zeros((1, size, size, 3), jnp.float32),
    )


def _expected(
    params: Mapping[str, Any], layout: str
) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """torch key -> (param path, torch shape) for a (possibly abstract) param tree."""
    return {
        _torch_key(path, layout): (path, _torch_shape(path, leaf.shape))
        for path, leaf in flatten(params).items()
    }


def torch_state_dict_shapes(
    model: nn.Module, layout: str | None = None
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of `to_torch_state_dict(variables, layout)` for `model`, without allocating."""
    layout = resolve_layout(LAYOUTS, layout, 'Swin')
    params = _template(model)['params']
    shapes = {k: shape for k, (_, shape) in _expected(params, layout).items()}
    if layout == 'mmcls':
        shapes.update({k: v.shape for k, v in _index_buffers(params).items()})
    return dict(sorted(shapes.items()))


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """'timm' if the keys use timm's `layers.*` (and no mmcls `stages.*`), else 'mmcls'."""
    keys = list(state_dict)
    if any(k.startswith('layers.') for k in keys) and not any(
        k.startswith('stages.') for k in keys
    ):
        return 'timm'
    return 'mmcls'


def from_torch_state_dict(
    state_dict: Mapping[str, Any], model: nn.Module
) -> dict[str, dict[str, Any]]:
    """mmcls (official CMID) or timm Swin state_dict -> Flax `{'params': ...}` for `model`.

    The layout is detected from the keys (`detect_layout`). Accepts numpy arrays or torch tensors.
    mmcls `relative_position_index` buffers are optional but must hold the standard index; strip
    heads (`head.*`) and mmseg's extra `norm0-2` before calling. Raises one ValueError listing every
    unknown key, missing key, shape mismatch and invalid buffer.
    """
    layout = detect_layout(state_dict)
    params = _template(model)['params']
    expected = _expected(params, layout)
    buffers = _index_buffers(params) if layout == 'mmcls' else {}

    def standard_index(key: str, arr: np.ndarray) -> str | None:
        if key in buffers and not np.array_equal(arr, buffers[key]):
            return 'differs from the standard relative position index'
        return None

    arrays = match_state_dict(
        state_dict,
        {k: shape for k, (_, shape) in expected.items()},
        what=f'Swin ({layout} layout)',
        optional={k: v.shape for k, v in buffers.items()},
        validate=standard_index,
    )
    out = {
        path: jnp.asarray(_from_torch_layout(path, arrays[key].astype(np.float32), layout))
        for key, (path, _) in expected.items()
    }
    return {'params': unflatten(out)}
