"""Helpers shared by the backbones (ResNet, ViT, Swin).

* parameter trees <-> `{path tuple: leaf}` dicts, the form every checkpoint conversion works on;
* PyTorch's default `nn.Linear` / `nn.Conv2d` initialisers, for modules whose reference leaves them
  at torch defaults;
* the CMID mask token: the 32-px block mask repeated (nearest) onto a finer feature grid and added;
* reading numpy / jax / torch tensors and checking a torch state_dict against the expected keys,
  with one error that lists every problem at once;
* the description of a PyTorch constructor that an exported state_dict loads into.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested dict -> `{path tuple: leaf}`."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    """`{path tuple: leaf}` -> nested dict (inverse of `flatten`)."""
    out: dict[str, Any] = {}
    for path, v in flat.items():
        d = out
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = v
    return out


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


def as_numpy(v: Any) -> np.ndarray:
    """numpy view of a numpy array, jax array or torch tensor (torch imported only if given)."""
    if hasattr(v, 'detach'):  # torch.Tensor; bf16 tensors have no numpy dtype, so upcast first
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.float()
        return v.numpy()
    return np.asarray(v)


def match_state_dict(
    state_dict: Mapping[str, Any],
    expected: Mapping[str, tuple[int, ...]],
    *,
    what: str,
    optional: Mapping[str, tuple[int, ...] | None] | None = None,
    validate: Callable[[str, np.ndarray], str | None] | None = None,
) -> dict[str, np.ndarray]:
    """Checks `state_dict` against `expected` (torch key -> shape); returns the arrays as numpy.

    `optional` keys may be absent; their shape is checked unless it is None. `validate(key, array)`
    may return an error string for a present, correctly shaped entry. Raises one ValueError listing
    every unknown key, missing key, shape mismatch and invalid value, so a conversion fails once.
    """
    optional = optional or {}
    unknown = sorted(k for k in state_dict if k not in expected and k not in optional)
    missing = sorted(k for k in expected if k not in state_dict)
    mismatched, invalid = [], []
    out = {}
    for key in sorted(set(state_dict) & (set(expected) | set(optional))):
        arr = as_numpy(state_dict[key])
        shape = expected[key] if key in expected else optional[key]
        if shape is not None and tuple(arr.shape) != tuple(shape):
            mismatched.append(f'{key}: got {tuple(arr.shape)}, expected {tuple(shape)}')
            continue
        problem = validate(key, arr) if validate is not None else None
        if problem:
            invalid.append(f'{key}: {problem}')
            continue
        out[key] = arr
    if unknown or missing or mismatched or invalid:
        raise ValueError(
            f'{what} state_dict does not match the model:\n'
            f'  unknown keys ({len(unknown)}): {unknown}\n'
            f'  missing keys ({len(missing)}): {missing}\n'
            f'  shape mismatches ({len(mismatched)}): {mismatched}'
            + (f'\n  invalid values ({len(invalid)}): {invalid}' if invalid else '')
        )
    return out


def resolve_layout(layouts: tuple[str, ...], layout: str | None, what: str) -> str:
    """`layout`, or the first (official) of `layouts` when None; an error for one not supported."""
    if layout is None:
        return layouts[0]
    if layout not in layouts:
        raise ValueError(f'{what} converts to the key layouts {list(layouts)}, not {layout!r}')
    return layout


def torch_model_spec(
    library: str,
    *,
    kwargs: dict[str, Any],
    features: str,
    model_name: str | None = None,
    cls: str | None = None,
    object_kwargs: dict[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One PyTorch constructor, as JSON: `library` with a registered `model_name`, or a `class`
    path, and its kwargs; `object_kwargs` are kwargs whose values are classes named by dotted path
    (`cmid_jax.convert.export.build_torch_model` builds it)."""
    spec = {'library': library}
    spec.update({'model_name': model_name} if model_name else {'class': cls})
    spec['kwargs'] = kwargs
    if object_kwargs:
        spec['object_kwargs'] = object_kwargs
    return dict(spec, features=features, **extra)
