"""PyTorch state_dicts of the backbones: the helpers every key-layout conversion works with.

* parameter trees <-> `{path tuple: leaf}` dicts, the form every checkpoint conversion works on;
* reading numpy / jax / torch tensors and checking a torch state_dict against the expected keys,
  with one error that lists every problem at once;
* choosing a key layout, and the description of a PyTorch constructor that an exported state_dict
  loads into.

numpy only (torch tensors are read through their own methods): the backbones' key layouts
(`cmid_jax.models`) and the conversions of `cmid_jax.convert` both use it, and it imports neither.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np


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
    (`cmid_jax.convert.weights.build_torch_model` builds it)."""
    spec = {'library': library}
    spec.update({'model_name': model_name} if model_name else {'class': cls})
    spec['kwargs'] = kwargs
    if object_kwargs:
        spec['object_kwargs'] = object_kwargs
    return dict(spec, features=features, **extra)
