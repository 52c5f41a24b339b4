"""CMID losses as pure ``jax.numpy`` functions.

Everything here works on NHWC / channels-last arrays, has static shapes (so it
can be used freely under ``jax.jit``) and does all of its math in float32:
every array input is cast with ``.astype(jnp.float32)`` first, so bf16
activations may be passed straight in (decision D4 of
``docs/cmid-method.md``).

Contents (method doc section in brackets):

* MIM reconstruction [§6.1]: :func:`focal_l1_loss`, :func:`focal_frequency_loss`
  and their sum for one crop, :func:`mim_loss`.
* Global MoCo InfoNCE [§6.2]: :func:`infonce_loss`.
* Local patch distillation [§6.3]: :func:`match_positions`,
  :func:`gather_positions`, :func:`dino_local_loss`, :func:`update_center`,
  :func:`teacher_temperature`.

Semantics follow the official PyTorch code (``Pretrain/models/loss_utils.py``,
``mim_utils.py``, ``contrastive_utils.py``); the deliberate deviations are
documented on the function concerned (tie-breaking in
:func:`match_positions`, the true-epoch teacher temperature of
:func:`teacher_temperature`, i.e. Q4 fixed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = jax.Array | np.ndarray | float | int

__all__ = [
    'focal_l1_loss',
    'focal_frequency_loss',
    'mim_loss',
    'infonce_loss',
    'match_positions',
    'gather_positions',
    'dino_local_loss',
    'update_center',
    'teacher_temperature',
]


def _f32(x: ArrayLike) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _check_mask(pred: jax.Array, pixel_mask: jax.Array) -> None:
    if pred.ndim != 4:
        raise ValueError(f'expected NHWC (B,H,W,C) images, got shape {pred.shape}')
    if pixel_mask.shape != pred.shape[:3]:
        raise ValueError(
            f'pixel_mask must have shape (B,H,W)={pred.shape[:3]} (full resolution, '
            f'1 = masked), got {pixel_mask.shape}'
        )


# --------------------------------------------------------------------------- #
# MIM (§6.1)
# --------------------------------------------------------------------------- #
def focal_l1_loss(
    pred: jax.Array,
    target: jax.Array,
    pixel_mask: jax.Array,
    alpha: float = 0.2,
    gamma: float = 1.0,
) -> jax.Array:
    """Focal L1 averaged over masked pixels and channels.

    ``d = |pred - target|``, ``l = d * (2*sigmoid(alpha*d) - 1)**gamma``;
    returns ``sum(l * M) / (sum(M) + 1e-5) / C``.

    Args:
      pred, target: ``(B, H, W, C)`` images (normalized pixel space).
      pixel_mask: ``(B, H, W)``, 1 = masked; only masked pixels contribute
        (official ``unmask_weight: 0``).
    """
    pred, target, mask = _f32(pred), _f32(target), _f32(pixel_mask)
    _check_mask(pred, mask)
    num_channels = pred.shape[-1]
    d = jnp.abs(pred - target)
    loss = d * (2.0 * jax.nn.sigmoid(alpha * d) - 1.0) ** gamma
    # The mask broadcasts over channels in the numerator only, hence the /C.
    return jnp.sum(loss * mask[..., None]) / (jnp.sum(mask) + 1e-5) / num_channels


def focal_frequency_loss(
    pred: jax.Array,
    target: jax.Array,
    pixel_mask: jax.Array,
    unmask_weight: float = 0.001,
) -> jax.Array:
    """A2MIM focal frequency loss with the ``mixed`` replacement of visible pixels.

    Official settings: ``fft_unmask_replace='mixed'``, ``fft_unmask_weight``,
    ``FocalFrequencyLoss(alpha=1, ave_spectrum=True, log_matrix=True,
    batch_matrix=True)``, patch factor 1.

    1. ``x_rep = 0.5 * stop_gradient(pred) + 0.5 * target``;
       ``m_f = M + (1 - M) * unmask_weight``;
       ``x_tilde = pred * m_f + x_rep * (1 - m_f)``.
    2. Orthonormal 2-D FFT over (H, W) per channel of ``x_tilde`` and
       ``target``, averaged over the batch (``ave_spectrum``).
    3. ``dist = dre**2 + dim**2``; weight ``w = log(sqrt(dist) + 1)``, divided
       by its max over the whole batch-averaged ``(H, W, C)`` tensor
       (``batch_matrix``), NaN -> 0, clipped to [0, 1], no gradient.
    4. Returns ``mean(w * dist)`` over (H, W, C).

    Because the FFT is linear, the batch-averaged spectrum difference is
    computed as the FFT of the batch-mean difference ``mean_b(x_tilde - target)``
    (one FFT instead of two batched ones); this is mathematically identical.
    """
    pred, target, mask = _f32(pred), _f32(target), _f32(pixel_mask)
    _check_mask(pred, mask)
    mask = mask[..., None]
    x_rep = 0.5 * jax.lax.stop_gradient(pred) + 0.5 * target
    mask_f = mask + (1.0 - mask) * unmask_weight
    x_tilde = pred * mask_f + x_rep * (1.0 - mask_f)

    # ave_spectrum: mean over the batch of the spectra == spectrum of the mean.
    diff = jnp.mean(x_tilde - target, axis=0)  # (H, W, C)
    spec = jnp.fft.fft2(diff, axes=(0, 1), norm='ortho')
    dre, dim = jnp.real(spec), jnp.imag(spec)
    freq_dist = dre * dre + dim * dim  # (H, W, C)

    # Spectrum weight matrix (alpha = 1, log_matrix, batch_matrix): built from
    # stop-gradient inputs so no gradient (and no sqrt'(0) NaN) flows through it.
    dist_sg = jax.lax.stop_gradient(freq_dist)
    w = jnp.log(jnp.sqrt(dist_sg) + 1.0)
    w = w / jnp.max(w)  # max over the whole (batch-averaged) tensor
    w = jnp.where(jnp.isnan(w), 0.0, w)  # all-zero difference -> 0/0
    w = jnp.clip(w, 0.0, 1.0)
    return jnp.mean(w * freq_dist)


def mim_loss(
    pred: jax.Array,
    target: jax.Array,
    pixel_mask: jax.Array,
    *,
    alpha: float = 0.2,
    gamma: float = 1.0,
    fft_weight: float = 1.0,
    fft_unmask_weight: float = 0.001,
) -> jax.Array:
    """MIM loss of one crop: ``focal_l1_loss + fft_weight * focal_frequency_loss``.

    ``pred`` is the decoder output, ``target`` the *unmasked* normalized crop,
    ``pixel_mask`` the ``(B, H, W)`` full-resolution mask (1 = masked). The
    official total averages this over crops A and B.
    """
    spatial = focal_l1_loss(pred, target, pixel_mask, alpha=alpha, gamma=gamma)
    freq = focal_frequency_loss(pred, target, pixel_mask, unmask_weight=fft_unmask_weight)
    return spatial + fft_weight * freq


# --------------------------------------------------------------------------- #
# Global InfoNCE (§6.2)
# --------------------------------------------------------------------------- #
def infonce_loss(
    q: jax.Array,
    k: jax.Array,
    queue: jax.Array,
    temperature: float = 0.2,
) -> jax.Array:
    """MoCo InfoNCE with a queue of negatives.

    Args:
      q: ``(B, D)`` student queries, already L2-normalized.
      k: ``(B, D)`` teacher keys, already L2-normalized (stop-gradiented here).
      queue: ``(K, D)`` negatives, one key per **row** (the official buffer is
        ``(D, K)``); treated as a constant.
      temperature: softmax temperature (official 0.2).

    Returns:
      Mean over B of the cross-entropy of ``[q.k, q @ queue.T] / T`` with
      label 0.
    """
    q = _f32(q)
    k = jax.lax.stop_gradient(_f32(k))
    queue = jax.lax.stop_gradient(_f32(queue))
    pos = jnp.sum(q * k, axis=-1, keepdims=True)  # (B, 1)
    neg = jnp.matmul(q, queue.T, precision=jax.lax.Precision.HIGHEST)  # (B, K)
    logits = jnp.concatenate([pos, neg], axis=-1) / temperature
    return -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[:, 0])


# --------------------------------------------------------------------------- #
# Local patch distillation (§6.3)
# --------------------------------------------------------------------------- #
def match_positions(
    loc_student: jax.Array,
    loc_teacher: jax.Array,
    num_matches: int,
) -> tuple[jax.Array, jax.Array]:
    """Nearest-neighbour matching of grid cells between two crops.

    For every student cell, its nearest teacher cell (Euclidean distance of
    cell centres) is found; the ``num_matches`` student cells with the smallest
    nearest-neighbour distance are kept, returned in ascending student-index
    order together with their teacher partners (official
    ``position_match`` / ``neirest_neighbores``).

    Args:
      loc_student, loc_teacher: ``(B, g, g, 2)`` cell centres in source-image
        coordinates; flattened row-major to ``N = g*g`` positions.
      num_matches: static number of kept positions (official 20), ``<= N``.

    Returns:
      ``(idx_student, idx_teacher)``, int32 ``(B, num_matches)`` flat indices
      into the ``g*g`` grid; ``idx_student`` is strictly increasing per row.

    Ties (deterministic here, arbitrary in the official code): the nearest
    teacher is the lowest teacher index among equally near ones, and among
    student cells with equal NN distance at the ``num_matches`` cut the lowest
    student indices are kept (stable sort). Distances are computed exactly from
    coordinate differences, so geometrically equal distances tie exactly. The
    official code uses ``torch.cdist`` (matmul-based for N > 25, which adds
    rounding noise), ``topk`` and a non-stable ``torch.sort``, so its choice
    among exact ties is unspecified.
    """
    ls = jax.lax.stop_gradient(_f32(loc_student))
    lt = jax.lax.stop_gradient(_f32(loc_teacher))
    if ls.ndim != 4 or ls.shape[-1] != 2 or ls.shape != lt.shape:
        raise ValueError(f'expected two (B,g,g,2) location grids, got {ls.shape} and {lt.shape}')
    b = ls.shape[0]
    n = ls.shape[1] * ls.shape[2]
    if not 0 < num_matches <= n:
        raise ValueError(f'num_matches must be in [1, {n}], got {num_matches}')
    ls = ls.reshape(b, n, 2)
    lt = lt.reshape(b, n, 2)
    diff = ls[:, :, None, :] - lt[:, None, :, :]  # (B, N, N, 2)
    # Squared distance: same ordering (and ties) as the Euclidean distance.
    dist2 = jnp.sum(diff * diff, axis=-1)  # (B, N_student, N_teacher)
    nn_idx = jnp.argmin(dist2, axis=-1)  # first minimum -> lowest teacher index
    nn_dist = jnp.min(dist2, axis=-1)  # (B, N)
    order = jnp.argsort(nn_dist, axis=-1, stable=True)
    idx_student = jnp.sort(order[:, :num_matches], axis=-1)
    idx_teacher = jnp.take_along_axis(nn_idx, idx_student, axis=-1)
    return idx_student.astype(jnp.int32), idx_teacher.astype(jnp.int32)


def gather_positions(features: jax.Array, idx: jax.Array) -> jax.Array:
    """Gather grid positions: ``(B, g, g, C)`` features, ``(B, n)`` flat row-major
    indices -> ``(B, n, C)``. Keeps the input dtype."""
    b, gh, gw, c = features.shape
    flat = features.reshape(b, gh * gw, c)
    return jnp.take_along_axis(flat, idx.astype(jnp.int32)[..., None], axis=1)


def dino_local_loss(
    student_out: jax.Array,
    teacher_out: jax.Array,
    center: jax.Array,
    student_temp: float = 0.1,
    teacher_temp: ArrayLike = 0.04,
) -> jax.Array:
    """DINO-style cross-entropy between matched positions.

    Per position ``-sum_p softmax((t - center)/teacher_temp)_p *
    log_softmax(s/student_temp)_p``, averaged over ``B*n``. The teacher side
    (including ``center``) carries no gradient. Official ``LocalLoss.forward``
    uses the centre *before* its update; update it afterwards with
    :func:`update_center`.

    Args:
      student_out, teacher_out: ``(B, n, P)`` head outputs, prototypes last.
      center: ``(P,)`` running teacher centre.
      teacher_temp: may be a traced scalar (see :func:`teacher_temperature`).
    """
    s = _f32(student_out)
    t = jax.lax.stop_gradient(_f32(teacher_out))
    c = jax.lax.stop_gradient(_f32(center))
    tt = jax.lax.stop_gradient(_f32(teacher_temp))
    t_prob = jax.nn.softmax((t - c) / tt, axis=-1)
    s_logp = jax.nn.log_softmax(s / student_temp, axis=-1)
    return jnp.mean(-jnp.sum(t_prob * s_logp, axis=-1))


def update_center(
    center: jax.Array,
    teacher_out: jax.Array,
    momentum: float = 0.9,
) -> jax.Array:
    """EMA of the teacher output: ``center*m + (1-m)*mean_{B,n}(teacher_out)``.

    ``teacher_out`` is ``(B, n, P)``; returns float32 ``(P,)``. Under ``jit``
    with a batch-sharded input the mean is over the global batch, matching the
    official all-reduce, with no explicit collective.
    """
    t = jax.lax.stop_gradient(_f32(teacher_out))
    batch_center = jnp.mean(t.reshape(-1, t.shape[-1]), axis=0)
    return _f32(center) * momentum + batch_center * (1.0 - momentum)


def teacher_temperature(
    epoch: ArrayLike,
    warmup_temp: float = 0.04,
    final_temp: float = 0.07,
    warmup_epochs: int = 50,
) -> jax.Array:
    """Teacher temperature schedule of the local loss.

    ``np.linspace(warmup_temp, final_temp, warmup_epochs)[epoch]`` for
    ``epoch < warmup_epochs``, ``final_temp`` afterwards (negative epochs give
    ``warmup_temp``). ``epoch`` is the 0-based integer training epoch and may
    be a traced array. Indexed by the true epoch for every backbone: the
    official ResNet config indexes it by ``epoch + 1`` (quirk Q4), which is
    fixed on purpose here (decision D3).
    """
    epoch = jnp.asarray(epoch).astype(jnp.int32)
    if warmup_epochs <= 0:
        return jnp.full(epoch.shape, final_temp, dtype=jnp.float32)
    table = jnp.asarray(np.linspace(warmup_temp, final_temp, warmup_epochs).astype(np.float32))
    idx = jnp.clip(epoch, 0, warmup_epochs - 1)
    return jnp.where(epoch < warmup_epochs, table[idx], jnp.float32(final_temp))
