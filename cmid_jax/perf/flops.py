"""Analytic model FLOPs of a CMID train step and accelerator peaks, for MFU (jax-practices §13-14).

Conventions:
* A multiply-add is 2 FLOPs. Only matmuls and convolutions count (plus attention's score and value
  products); norms, activations, softmax, pooling, masking and the FFT loss are left out, as in the
  usual MFU definitions, so XLA's own count is a few percent higher.
* Whatever the student differentiates costs 3x its forward (backward = 2x forward); the teacher runs
  forward only. One step on a source image = 2 crops x (3 x student fwd + teacher fwd), where
  a student forward is backbone + MIM decoder + projector + InfoNCE logits + local head on the
  matched positions, and a teacher forward is backbone + projector + local head.

The per-backbone formulas live in `cmid_jax.flop_counts` (imported by the backbones too). Pure
Python with no jax import at module level: the PyTorch reference
(`experiments/benchmarks/torch_reference.py`) uses the same formulas and peaks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cmid_jax.flop_counts import dense

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
