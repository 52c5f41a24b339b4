"""Analytic forward FLOPs of the backbones and their building blocks: pure arithmetic.

A multiply-add is 2 FLOPs; only matmuls and convolutions count (plus attention's score and value
products). The backbone modules (`forward_flops`), the step count of `cmid_jax.perf.flops` and the
PyTorch reference (`experiments/benchmarks/torch_reference.py`) all use these formulas, so this
module imports nothing: neither jax nor the rest of cmid_jax.
"""

from __future__ import annotations

from collections.abc import Sequence

# --- building blocks ------------------------------------------------------------------------------


def dense(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def conv(h_out: int, w_out: int, k: int, c_in: int, c_out: int) -> int:
    return 2 * k * k * c_in * c_out * h_out * w_out


def conv_out(size: int, k: int, stride: int) -> int:
    """Output side of a conv / pool with torch-style symmetric padding k // 2."""
    return (size + 2 * (k // 2) - k) // stride + 1


# --- backbones (forward, one image) ---------------------------------------------------------------


def vit_forward(
    *,
    image_size: int,
    patch_size: int,
    embed_dim: int,
    depth: int,
    mlp_ratio: float = 4.0,
    in_chans: int = 3,
    cls_token: bool = True,
) -> int:
    """Patch embedding, then per block qkv, q.k^T, attn.v, output projection and the two MLP layers.

    The head count does not change the FLOPs: the per-head score products sum to T x T x D.
    """
    n = (image_size // patch_size) ** 2
    t = n + int(cls_token)
    d, hidden = embed_dim, int(embed_dim * mlp_ratio)
    block = (
        dense(t, d, 3 * d)
        + 2 * (2 * t * t * d)  # qkv; scores and weighted values
        + dense(t, d, d)
        + dense(t, d, hidden)
        + dense(t, hidden, d)
    )
    return dense(n, patch_size * patch_size * in_chans, d) + depth * block


def resnet_forward(
    *, image_size: int, stage_sizes: Sequence[int], width: int, in_chans: int = 3
) -> int:
    """Sum of 2 k^2 Cin Cout Hout Wout over every conv of a v1.5 bottleneck ResNet (no fc)."""
    h = conv_out(image_size, 7, 2)
    total = conv(h, h, 7, in_chans, width)
    h = conv_out(h, 3, 2)  # Max pool.
    c_in = width
    for s, n_blocks in enumerate(stage_sizes):
        planes = width * 2**s
        for b in range(n_blocks):
            stride = 2 if s > 0 and b == 0 else 1
            h_out = conv_out(h, 3, stride)
            total += (
                conv(h, h, 1, c_in, planes)
                + conv(h_out, h_out, 3, planes, planes)
                + conv(h_out, h_out, 1, planes, 4 * planes)
            )
            if b == 0:  # Downsample shortcut (1x1, strided).
                total += conv(h_out, h_out, 1, c_in, 4 * planes)
            c_in, h = 4 * planes, h_out
    return total


def swin_forward(
    *,
    image_size: int,
    patch_size: int,
    embed_dim: int,
    depths: Sequence[int],
    window_size: int,
    mlp_ratio: float = 4.0,
    in_chans: int = 3,
) -> int:
    """Patch conv, then per block qkv, window attention, projection and MLP, plus patch merging.

    Attention runs on the map padded to a window multiple (mmcls), so padded tokens count there.
    """
    h = image_size // patch_size
    total = conv(h, h, patch_size, in_chans, embed_dim)
    c = embed_dim
    for i, depth in enumerate(depths):
        padded = -(-h // window_size) * window_size
        t, tw = padded * padded, window_size * window_size
        hidden = int(c * mlp_ratio)
        block = (
            dense(t, c, 3 * c)
            + 2 * (2 * t * tw * c)
            + dense(t, c, c)
            + dense(h * h, c, hidden)
            + dense(h * h, hidden, c)
        )
        total += depth * block
        if i < len(depths) - 1:
            h //= 2
            total += dense(h * h, 4 * c, 2 * c)
            c *= 2
    return total
