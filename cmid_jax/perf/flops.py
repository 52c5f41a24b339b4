"""Analytic model FLOPs of a CMID train step and accelerator peaks, for MFU (jax-practices §13-14).

Conventions:
* A multiply-add is 2 FLOPs. Only matmuls and convolutions count (plus attention's score and value
  products); norms, activations, softmax, pooling, masking and the FFT loss are left out, as in the
  usual MFU definitions, so XLA's own count is a few percent higher.
* Whatever the student differentiates costs 3x its forward (backward = 2x forward); the teacher runs
  forward only. One step on a source image = 2 crops x (3 x student fwd + teacher fwd), where
  a student forward is backbone + MIM decoder + projector + InfoNCE logits + local head on the
  matched positions, and a teacher forward is backbone + projector + local head.

Pure Python with no jax import at module level: the PyTorch reference
(`experiments/benchmarks/torch_reference.py`) uses the same formulas and peaks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

# Dense bf16 peak FLOP/s per device (no sparsity), matched as a substring of the lower-cased
# `device_kind` (jax) or CUDA device name (torch); the first match wins, so the more specific
# names come first. PCIe / NVL H100s have lower clocks and power than the SXM part.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ('h100 pcie', 756e12),
    ('h100 nvl', 835e12),
    ('h100', 989e12),  # SXM, e.g. 'NVIDIA H100 80GB HBM3'.
    ('h200', 989e12),
    ('a100', 312e12),
    ('tpu v4', 275e12),
    ('tpu v5 lite', 197e12),  # jax calls v5e 'TPU v5 lite'.
    ('tpu v5e', 197e12),
    ('tpu v5p', 459e12),
    ('tpu v5', 459e12),
    ('tpu v6 lite', 918e12),  # v6e (Trillium).
    ('tpu v6e', 918e12),
)


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak of one device, or None (CPU, unknown accelerator): MFU is then undefined."""
    kind = device_kind.lower()
    return next((peak for name, peak in PEAK_BF16_FLOPS if name in kind), None)


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


@dataclasses.dataclass(frozen=True)
class Backbone:
    """What the step count needs to know of a backbone."""

    forward_flops: int  # One image at the step's resolution.
    num_features: int  # Channels of the last-stage map.
    feature_stride: int


def backbone(arch: str, variant: str, image_size: int) -> Backbone:
    """The cmid_jax backbone `arch`/`variant`, through its registry entry (`cmid_jax.models`)."""
    from cmid_jax.models import backbone_module  # Here, so this module stays jax-free.

    module = backbone_module(arch)
    net = module.build(variant, img_size=image_size)
    return Backbone(module.forward_flops(variant, image_size), net.num_features, net.feature_stride)


# --- the whole step -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepShape:
    """Sizes that set the cost of one CMID step (defaults: the official recipe)."""

    backbone: Backbone
    image_size: int
    proj_hidden_dim: int = 2048
    proj_dim: int = 256
    local_hidden_dim: int = 2048
    local_bottleneck_dim: int = 256
    local_prototypes: int = 2048
    num_matches: int = 20
    queue_size: int = 65536
    use_mim: bool = True
    use_global: bool = True
    use_local: bool = True

    @classmethod
    def from_config(cls, config: Any, backbone_shape: Backbone | None = None) -> StepShape:
        """Sizes from a cmid_jax config; `backbone_shape` replaces the config's backbone (torch)."""
        m, loss = config.model, config.loss
        if backbone_shape is None:
            backbone_shape = backbone(m.arch, m.variant, config.data.image_size)
        return cls(
            backbone=backbone_shape,
            image_size=config.data.image_size,
            proj_hidden_dim=m.proj_hidden_dim,
            proj_dim=m.proj_dim,
            local_hidden_dim=m.local_hidden_dim,
            local_bottleneck_dim=m.local_bottleneck_dim,
            local_prototypes=m.local_prototypes,
            num_matches=loss.num_matches,
            queue_size=loss.queue_size,
            use_mim=loss.use_mim,
            use_global=loss.use_global,
            use_local=loss.use_local,
        )


def head_flops(s: StepShape) -> dict[str, int]:
    """Forward FLOPs of each head for one crop."""
    c = s.backbone.num_features
    side = s.image_size // s.backbone.feature_stride
    lh, lb, m = s.local_hidden_dim, s.local_bottleneck_dim, s.num_matches
    return {
        # 1x1 conv to stride^2 x 3 channels at every position of the last-stage map.
        'decoder': dense(side * side, c, s.backbone.feature_stride**2 * 3),
        'projector': dense(1, c, s.proj_hidden_dim) + dense(1, s.proj_hidden_dim, s.proj_dim),
        # Logits against the positive key and the whole queue.
        'infonce': dense(1, s.proj_dim, 1 + s.queue_size),
        'local_head': (
            dense(m, c, lh) + dense(m, lh, lh) + dense(m, lh, lb) + dense(m, lb, s.local_prototypes)
        ),
    }


def step_flops(s: StepShape, batch_size: int) -> dict[str, int]:
    """Model FLOPs of one train step on `batch_size` source images (two crops each)."""
    h = head_flops(s)
    bb = s.backbone.forward_flops
    student = (
        bb
        + s.use_mim * h['decoder']
        + s.use_global * (h['projector'] + h['infonce'])
        + s.use_local * h['local_head']
    )
    teacher = bb + s.use_global * h['projector'] + s.use_local * h['local_head']
    per_image = 2 * (3 * student + teacher)
    return {
        'backbone_forward_per_crop': bb,
        'student_forward_per_crop': student,
        'teacher_forward_per_crop': teacher,
        'per_image': per_image,
        'per_step': per_image * batch_size,
    }
