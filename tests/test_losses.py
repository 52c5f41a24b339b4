"""Tests for cmid_jax.losses against independent PyTorch / NumPy references.

The references below are written from the semantics of the official CMID code
(NCHW layout, float64) and are deliberately structured differently from the
JAX implementation (e.g. two batched FFTs instead of one FFT of the mean, the
official cdist/topk/sort selection, prototypes on dim 1).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmid_jax import losses

RTOL = 1e-5
ATOL = 1e-7


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _images(seed: int, b: int = 3, h: int = 32, w: int = 32, c: int = 3):
    rng = np.random.default_rng(seed)
    pred = rng.normal(size=(b, h, w, c)).astype(np.float32)
    target = rng.normal(size=(b, h, w, c)).astype(np.float32)
    # block mask: 8x8 blocks on a 4x4 grid, ~60% masked, per sample
    low = (rng.random((b, h // 8, w // 8)) < 0.6).astype(np.float32)
    low[:, 0, 0] = 1.0  # make sure every sample has masked pixels
    mask = low.repeat(8, axis=1).repeat(8, axis=2)
    return pred, target, mask


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).double()


def _ref_focal_l1(pred, target, mask, alpha=0.2, gamma=1.0):
    """Official MIMLossHead spatial part: element-wise focal L1, (B,1,H,W) mask."""
    p, t = _nchw(pred), _nchw(target)
    m = torch.from_numpy(mask).double().unsqueeze(1)
    d = F.l1_loss(p, t, reduction='none')
    focal = d * (2.0 * torch.sigmoid(alpha * d) - 1.0) ** gamma
    return (focal * m).sum() / (m.sum() + 1e-5) / p.shape[1]


def _ref_ffl(
    pred_t: torch.Tensor, target_t: torch.Tensor, mask_t: torch.Tensor, unmask_weight=0.001
):
    """Official MIMLossHead fft part ('mixed' replace) + FocalFrequencyLoss
    (alpha=1, ave_spectrum, log_matrix, batch_matrix), NCHW tensors."""
    m = mask_t.unsqueeze(1)
    x_rep = 0.5 * pred_t.detach() + 0.5 * target_t
    mask_f = m + (1.0 - m) * unmask_weight
    x_rec = pred_t * mask_f + x_rep * (1.0 - mask_f)
    fp = torch.fft.fft2(x_rec, dim=(2, 3), norm='ortho')
    ft = torch.fft.fft2(target_t, dim=(2, 3), norm='ortho')
    fp = torch.stack([fp.real, fp.imag], -1).mean(0, keepdim=True)
    ft = torch.stack([ft.real, ft.imag], -1).mean(0, keepdim=True)
    sq = (fp - ft) ** 2
    wm = torch.sqrt(sq[..., 0] + sq[..., 1]) ** 1.0
    wm = torch.log(wm + 1.0)
    wm = wm / wm.max()
    wm[torch.isnan(wm)] = 0.0
    wm = torch.clamp(wm, 0.0, 1.0).detach()
    dist = sq[..., 0] + sq[..., 1]
    return (wm * dist).mean()


def _ref_match(loc_s: np.ndarray, loc_t: np.ndarray, num_matches: int):
    """Official position_match / neirest_neighbores selection, on indices."""
    b = loc_s.shape[0]
    ls = torch.from_numpy(loc_s).double().flatten(1, 2)
    lt = torch.from_numpy(loc_t).double().flatten(1, 2)
    dist = torch.cdist(ls, lt, compute_mode='donot_use_mm_for_euclid_dist')
    vals, inds = dist.topk(k=1, largest=False)
    vals, inds = vals.squeeze(-1), inds.squeeze(-1)
    _, order = torch.sort(vals, dim=1)
    _, rank = torch.sort(order, dim=1)
    keep = rank < num_matches
    idx_t = inds.masked_select(keep).reshape(b, num_matches)
    idx_s = (
        torch.arange(ls.shape[1])
        .unsqueeze(0)
        .repeat(b, 1)
        .masked_select(keep)
        .reshape(b, num_matches)
    )
    return idx_s.numpy(), idx_t.numpy()


def _grid(
    top: float, left: float, h: float, w: float, g: int = 7, flip: bool = False
) -> np.ndarray:
    """(g,g,2) cell centres (row, col) of a crop; columns mirrored when flipped."""
    rows = top + (np.arange(g) + 0.5) * h / g
    cols = left + (np.arange(g) + 0.5) * w / g
    grid = np.stack(np.meshgrid(rows, cols, indexing='ij'), axis=-1)
    if flip:
        grid = grid[:, ::-1]
    return grid.astype(np.float32)


# --------------------------------------------------------------------------- #
# focal L1
# --------------------------------------------------------------------------- #
def test_focal_l1_matches_reference():
    pred, target, mask = _images(0)
    got = losses.focal_l1_loss(pred, target, mask)
    ref = _ref_focal_l1(pred, target, mask)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), ref.item(), rtol=RTOL, atol=ATOL)
    # non-default alpha / gamma
    got2 = losses.focal_l1_loss(pred, target, mask, alpha=0.5, gamma=2.0)
    ref2 = _ref_focal_l1(pred, target, mask, alpha=0.5, gamma=2.0)
    np.testing.assert_allclose(float(got2), ref2.item(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('d', [0.3, 1.0, 2.5])
def test_focal_l1_constant_difference(d):
    _, target, mask = _images(1)
    pred = target + d
    expected = d * (2.0 / (1.0 + math.exp(-0.2 * d)) - 1.0)
    # denominator carries +1e-5: sum(M)*C*l / ((sum(M)+1e-5)*C)
    expected *= mask.sum() / (mask.sum() + 1e-5)
    got = losses.focal_l1_loss(pred, target, mask)
    np.testing.assert_allclose(float(got), expected, rtol=RTOL)


def test_focal_l1_ignores_unmasked_pixels():
    pred, target, mask = _images(2)
    noise = np.random.default_rng(3).normal(size=pred.shape).astype(np.float32) * 10
    pred2 = pred + noise * (1.0 - mask)[..., None]
    a = losses.focal_l1_loss(pred, target, mask)
    b = losses.focal_l1_loss(pred2, target, mask)
    assert float(a) == float(b)
    # and changing a masked pixel does change it
    pred3 = pred + noise * mask[..., None]
    assert abs(float(losses.focal_l1_loss(pred3, target, mask)) - float(a)) > 1e-3


# --------------------------------------------------------------------------- #
# focal frequency loss
# --------------------------------------------------------------------------- #
def test_focal_frequency_loss_value_and_grad_match_torch():
    pred, target, mask = _images(4)
    pt = _nchw(pred).requires_grad_(True)
    ref = _ref_ffl(pt, _nchw(target), torch.from_numpy(mask).double())
    ref.backward()
    ref_grad = pt.grad.numpy().transpose(0, 2, 3, 1)

    val, grad = jax.value_and_grad(losses.focal_frequency_loss)(
        jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask)
    )
    assert val.dtype == jnp.float32 and val.shape == ()
    np.testing.assert_allclose(float(val), ref.item(), rtol=RTOL)
    scale = np.abs(ref_grad).max()
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-4, atol=1e-5 * scale)
    # visible pixels only get the 0.001-scaled gradient
    vis = mask == 0
    assert np.abs(np.asarray(grad)[vis]).max() < 0.01 * np.abs(np.asarray(grad)[~vis]).max()


def test_focal_frequency_loss_weight_uses_global_max():
    """batch_matrix: one max over the whole batch-averaged (C,H,W) spectrum, so
    scaling a single channel's error changes the other channels' weights."""
    pred, target, mask = _images(5)
    pred = pred.copy()
    pred[..., 0] = target[..., 0] + 5.0 * (pred[..., 0] - target[..., 0])
    ref = _ref_ffl(_nchw(pred), _nchw(target), torch.from_numpy(mask).double())
    got = losses.focal_frequency_loss(pred, target, mask)
    np.testing.assert_allclose(float(got), ref.item(), rtol=RTOL)


def test_focal_frequency_loss_zero_difference():
    _, target, mask = _images(6)
    val, grad = jax.value_and_grad(losses.focal_frequency_loss)(
        jnp.asarray(target), jnp.asarray(target), jnp.asarray(mask)
    )
    assert float(val) == 0.0
    assert np.all(np.isfinite(np.asarray(grad)))


def test_mim_loss_is_sum():
    pred, target, mask = _images(7)
    total = losses.mim_loss(pred, target, mask)
    ref = _ref_focal_l1(pred, target, mask) + _ref_ffl(
        _nchw(pred), _nchw(target), torch.from_numpy(mask).double()
    )
    np.testing.assert_allclose(float(total), ref.item(), rtol=RTOL)


def test_mim_losses_bf16_inputs_and_jit():
    pred, target, mask = _images(8)
    pb = jnp.asarray(pred, dtype=jnp.bfloat16)
    tb = jnp.asarray(target, dtype=jnp.bfloat16)
    out = jax.jit(losses.mim_loss)(pb, tb, jnp.asarray(mask, dtype=jnp.int32))
    assert out.dtype == jnp.float32
    ref = losses.mim_loss(
        np.asarray(pb.astype(jnp.float32)), np.asarray(tb.astype(jnp.float32)), mask
    )
    np.testing.assert_allclose(float(out), float(ref), rtol=1e-5)


def test_mask_shape_is_checked():
    pred, target, mask = _images(9)
    with pytest.raises(ValueError):
        losses.focal_l1_loss(pred, target, mask[:, ::4, ::4])


# --------------------------------------------------------------------------- #
# InfoNCE
# --------------------------------------------------------------------------- #
def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_infonce_matches_cross_entropy():
    rng = np.random.default_rng(10)
    b, d, k_size = 4, 8, 16
    q = _unit(rng.normal(size=(b, d))).astype(np.float32)
    k = _unit(rng.normal(size=(b, d))).astype(np.float32)
    queue = _unit(rng.normal(size=(k_size, d))).astype(np.float32)
    tq, tk, tqueue = (torch.from_numpy(x).double() for x in (q, k, queue))
    logits = torch.cat([(tq * tk).sum(-1, keepdim=True), tq @ tqueue.T], dim=1) / 0.2
    ref = F.cross_entropy(logits, torch.zeros(b, dtype=torch.long))
    got = losses.infonce_loss(q, k, queue, temperature=0.2)
    np.testing.assert_allclose(float(got), ref.item(), rtol=RTOL)

    # key gets no gradient; query gradient matches torch
    tq.requires_grad_(True)
    logits = torch.cat([(tq * tk).sum(-1, keepdim=True), tq @ tqueue.T], dim=1) / 0.2
    F.cross_entropy(logits, torch.zeros(b, dtype=torch.long)).backward()
    gq, gk, gqueue = jax.grad(losses.infonce_loss, argnums=(0, 1, 2))(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(queue)
    )
    np.testing.assert_allclose(np.asarray(gq), tq.grad.numpy(), rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(gk) == 0) and np.all(np.asarray(gqueue) == 0)


def test_infonce_orthogonal_is_log_k_plus_1():
    rng = np.random.default_rng(11)
    b, d, k_size = 3, 8, 16
    q = np.zeros((b, d), np.float32)
    q[:, 0] = 1.0
    k = rng.normal(size=(b, d))
    k[:, 0] = 0.0
    queue = rng.normal(size=(k_size, d))
    queue[:, 0] = 0.0
    got = losses.infonce_loss(q, _unit(k).astype(np.float32), _unit(queue).astype(np.float32))
    np.testing.assert_allclose(float(got), math.log(k_size + 1), rtol=1e-6)


# --------------------------------------------------------------------------- #
# position matching
# --------------------------------------------------------------------------- #
def test_match_positions_matches_official_selection():
    rng = np.random.default_rng(12)
    b, g, n_match = 4, 7, 20
    loc_s = np.stack(
        [
            _grid(
                *rng.uniform(0, 100, 2), *rng.uniform(80, 200, 2), g=g, flip=bool(rng.integers(2))
            )
            for _ in range(b)
        ]
    )
    loc_t = np.stack(
        [
            _grid(
                *rng.uniform(0, 100, 2), *rng.uniform(80, 200, 2), g=g, flip=bool(rng.integers(2))
            )
            for _ in range(b)
        ]
    )
    # jitter so that there are no exact ties (tie handling is unspecified officially)
    loc_s = loc_s + rng.normal(scale=0.5, size=loc_s.shape).astype(np.float32)
    loc_t = loc_t + rng.normal(scale=0.5, size=loc_t.shape).astype(np.float32)

    idx_s, idx_t = jax.jit(losses.match_positions, static_argnums=2)(loc_s, loc_t, n_match)
    ref_s, ref_t = _ref_match(loc_s, loc_t, n_match)
    assert idx_s.shape == (b, n_match) and idx_s.dtype == jnp.int32 and idx_t.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(idx_s), ref_s)
    np.testing.assert_array_equal(np.asarray(idx_t), ref_t)
    assert np.all(np.diff(np.asarray(idx_s), axis=1) > 0)


def test_match_positions_identity_and_flip():
    g = 7
    base = _grid(10.0, 20.0, 150.0, 120.0, g=g)
    flipped = _grid(10.0, 20.0, 150.0, 120.0, g=g, flip=True)
    loc = np.stack([base, base])
    loc_f = np.stack([flipped, flipped])
    rows, cols = np.divmod(np.arange(g * g), g)
    mirrored = rows * g + (g - 1 - cols)

    # all 49: identical grids -> identity; flipped grid -> mirrored columns
    s, t = losses.match_positions(loc, loc, g * g)
    np.testing.assert_array_equal(np.asarray(s), np.tile(np.arange(g * g), (2, 1)))
    np.testing.assert_array_equal(np.asarray(t), np.tile(np.arange(g * g), (2, 1)))
    s, t = losses.match_positions(loc, loc_f, g * g)
    np.testing.assert_array_equal(np.asarray(s), np.tile(np.arange(g * g), (2, 1)))
    np.testing.assert_array_equal(np.asarray(t), np.tile(mirrored, (2, 1)))

    # 20 matches: all NN distances tie at 0 -> lowest student indices kept
    s, t = losses.match_positions(loc, loc_f, 20)
    np.testing.assert_array_equal(np.asarray(s), np.tile(np.arange(20), (2, 1)))
    np.testing.assert_array_equal(np.asarray(t), np.tile(mirrored[:20], (2, 1)))


def test_match_positions_overlap_and_ties():
    """Student crop (cells of 10 px) inside a teacher crop (cells of 20 px) whose
    centres coincide with every other student centre: 16 student cells have NN
    distance 0, 24 have 10 and 9 have 10*sqrt(2). The 20 kept are the 16 exact
    ones plus the 4 lowest-index cells at distance 10 (stable tie-break), and an
    equidistant nearest teacher cell resolves to the lowest teacher index."""
    g = 7
    student = _grid(0.0, 0.0, 70.0, 70.0, g=g)  # centres 5, 15, ..., 65
    teacher = _grid(-5.0, -5.0, 140.0, 140.0, g=g)  # centres 5, 25, ..., 125
    s, t = losses.match_positions(student[None], teacher[None], 20)
    s, t = np.asarray(s[0]), np.asarray(t[0])

    ls, lt = student.reshape(-1, 2), teacher.reshape(-1, 2)
    dist = np.linalg.norm(ls[:, None] - lt[None], axis=-1)
    nn = dist.min(1)
    exact = np.flatnonzero(nn == 0)
    at_ten = np.flatnonzero(np.isclose(nn, 10.0))
    assert len(exact) == 16 and len(at_ten) == 24
    np.testing.assert_array_equal(s, np.sort(np.concatenate([exact, at_ten[:4]])))
    first_nn = np.array([np.flatnonzero(np.isclose(dist[i], nn[i]))[0] for i in s])
    np.testing.assert_array_equal(t, first_nn)
    # the official selection agrees on the kept NN distances (its tie order is unspecified)
    ref_s, _ = _ref_match(student[None], teacher[None], 20)
    np.testing.assert_allclose(np.sort(nn[s]), np.sort(nn[ref_s[0]]), atol=1e-6)


def test_gather_positions():
    rng = np.random.default_rng(13)
    feats = rng.normal(size=(3, 7, 7, 5)).astype(np.float32)
    idx = np.stack([np.sort(rng.choice(49, 20, replace=False)) for _ in range(3)]).astype(np.int32)
    got = losses.gather_positions(jnp.asarray(feats), jnp.asarray(idx))
    flat = feats.reshape(3, 49, 5)
    ref = np.stack([flat[i, idx[i]] for i in range(3)])
    np.testing.assert_array_equal(np.asarray(got), ref)
    assert got.shape == (3, 20, 5)


# --------------------------------------------------------------------------- #
# DINO local loss, centre, teacher temperature
# --------------------------------------------------------------------------- #
def _ref_local_loss(s: torch.Tensor, t: torch.Tensor, center: torch.Tensor, ts=0.1, tt=0.04):
    """Official LocalLoss.forward: (B, P, n) layout, center (1, P, 1)."""
    t_prob = F.softmax((t - center) / tt, dim=1).detach()
    return torch.sum(-t_prob * F.log_softmax(s / ts, dim=1), dim=1).mean()


def test_dino_local_loss_and_grad_match_torch():
    rng = np.random.default_rng(14)
    b, n, p = 3, 20, 64
    s = rng.normal(size=(b, n, p)).astype(np.float32)
    t = rng.normal(size=(b, n, p)).astype(np.float32)
    c = (0.1 * rng.normal(size=(p,))).astype(np.float32)
    ts_ = torch.from_numpy(s).double().permute(0, 2, 1).requires_grad_(True)
    tt_ = torch.from_numpy(t).double().permute(0, 2, 1)
    tc = torch.from_numpy(c).double().view(1, p, 1)
    for temp in (0.04, 0.07):
        ts_.grad = None
        ref = _ref_local_loss(ts_, tt_, tc, tt=temp)
        ref.backward()
        fn = jax.jit(losses.dino_local_loss)
        val = fn(s, t, c, 0.1, jnp.float32(temp))
        np.testing.assert_allclose(float(val), ref.item(), rtol=RTOL)
        gs, gt, gc = jax.grad(losses.dino_local_loss, argnums=(0, 1, 2))(
            jnp.asarray(s), jnp.asarray(t), jnp.asarray(c), 0.1, temp
        )
        np.testing.assert_allclose(
            np.asarray(gs), ts_.grad.permute(0, 2, 1).numpy(), rtol=1e-4, atol=1e-7
        )
        assert np.all(np.asarray(gt) == 0) and np.all(np.asarray(gc) == 0)


def test_update_center():
    rng = np.random.default_rng(15)
    t = rng.normal(size=(3, 20, 64)).astype(np.float32)
    c = rng.normal(size=(64,)).astype(np.float32)
    got = losses.update_center(c, t, momentum=0.9)
    tt = torch.from_numpy(t).double().permute(0, 2, 1)  # (B, P, n)
    batch_center = tt.sum(dim=(0, 2), keepdim=True) / (tt.shape[0] * tt.shape[2])
    ref = torch.from_numpy(c).double().view(1, -1, 1) * 0.9 + batch_center * 0.1
    np.testing.assert_allclose(np.asarray(got), ref.view(-1).numpy(), rtol=RTOL, atol=1e-7)
    assert got.shape == (64,) and got.dtype == jnp.float32


def test_teacher_temperature():
    sched = np.linspace(0.04, 0.07, 50)
    expected = {0: 0.04, 1: sched[1], 49: 0.07, 50: 0.07, 1000: 0.07}
    jitted = jax.jit(losses.teacher_temperature)
    for epoch, value in expected.items():
        np.testing.assert_allclose(float(losses.teacher_temperature(epoch)), value, rtol=1e-6)
        np.testing.assert_allclose(float(jitted(jnp.int32(epoch))), value, rtol=1e-6)
    np.testing.assert_allclose(float(sched[1]), 0.04 + 0.03 / 49, rtol=1e-12)
    # vectorised over a traced array of epochs
    epochs = jnp.arange(60)
    ref = np.concatenate([sched, np.full(10, 0.07)])
    np.testing.assert_allclose(np.asarray(jitted(epochs)), ref, rtol=1e-6)
