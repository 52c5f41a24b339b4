"""Which softmax-attention implementation the ViT uses on which platform (`model.attention_impl`).

'auto' (the default) picks cuDNN's fused attention on NVIDIA GPUs when the compute dtype and head
width suit it, and XLA's attention everywhere else (TPU, CPU, ROCm, float32). 'xla' and 'cudnn'
force one; 'cudnn' where it cannot run fails here, before anything is traced or compiled.

The platform is the one the step is lowered for: this machine's by default, or another one named
explicitly, so a CPU machine can lower the GPU and TPU programs (`tests/test_lowering.py`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn')
PLATFORMS = ('cuda', 'rocm', 'tpu', 'cpu')
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_MAX_HEAD_DIM = 128  # 256 on Hopper and later; 128 holds on every supported GPU.


def current_platform(device: jax.Device | None = None) -> str:
    """`device`'s backend (default: this machine's first device) as a lowering platform: 'cuda',
    'rocm', 'tpu' or 'cpu'."""
    device = device or jax.devices()[0]
    if device.platform != 'gpu':
        return device.platform
    version = str(getattr(device.client, 'platform_version', '')).lower()
    return 'rocm' if 'rocm' in version or 'amd' in device.device_kind.lower() else 'cuda'


def cudnn_unsupported(*, platform: str, dtype: Any, head_dim: int) -> str | None:
    """Why cuDNN fused attention cannot run here, or None if it can."""
    if platform != 'cuda':
        return f'it needs an NVIDIA GPU (platform cuda), not {platform}'
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _CUDNN_DTYPES]:
        return f'it needs model.compute_dtype bfloat16 or float16, not {jnp.dtype(dtype).name}'
    if head_dim % 8 or head_dim > _CUDNN_MAX_HEAD_DIM:
        return f'it needs a head width that is a multiple of 8 and at most 128, not {head_dim}'
    return None


def resolve(requested: str, *, platform: str, dtype: Any, head_dim: int) -> str:
    """'xla' or 'cudnn' for `model.attention_impl=requested` on `platform`.

    Raises ValueError (one line: the field, the platform and what works there) for an unknown value
    or for 'cudnn' where it cannot run.
    """
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f'model.attention_impl={requested!r}; expected one of {IMPLEMENTATIONS}')
    if platform not in PLATFORMS:
        raise ValueError(f'unknown platform {platform!r}; expected one of {PLATFORMS}')
    problem = cudnn_unsupported(platform=platform, dtype=dtype, head_dim=head_dim)
    if requested == 'cudnn' and problem:
        raise ValueError(
            f"model.attention_impl='cudnn' cannot run: {problem}. Use 'auto' "
            "(cuDNN where it runs, XLA elsewhere) or 'xla'."
        )
    resolved = requested if requested != 'auto' else ('xla' if problem else 'cudnn')
    _log_choice(requested, platform, resolved, problem)
    return resolved


@functools.cache
def _log_choice(requested: str, platform: str, resolved: str, problem: str | None) -> None:
    """Logs each choice once per process (networks are built for training and for every eval)."""
    why = f' (cuDNN: {problem})' if requested == 'auto' and problem else ''
    logging.info(
        'Attention on %s: %s (model.attention_impl=%r)%s.', platform, resolved, requested, why
    )
