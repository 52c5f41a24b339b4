"""On-device augmentation (cmid_jax/augment.py) against a numpy reference and hand values."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cmid_jax import augment as A
from cmid_jax.data import list_images, load_image, make_views

import photometric_reference as R
from conftest import SHARED_DATA

EIGHT_BIT = A.Levels()


@functools.cache
def _aid_image(i: int) -> np.ndarray:
    files = list_images(str(SHARED_DATA / 'aid'))
    return load_image(files[i * 97])[:64, :64].astype(np.float32)


_photometric = jax.jit(A.photometric, static_argnums=(2, 3))


def _draws(seed: int, shape, **force) -> A.Draws:
    d = A.sample_draws(jax.random.key(seed), shape)
    return d._replace(**{k: jnp.asarray(v) for k, v in force.items()})


@pytest.mark.parametrize('seed', range(4))
def test_photometric_chain_equals_the_numpy_reference_on_aid(seed):
    x = _aid_image(seed)
    # Every op on, in a random order, on real images; grey on for half of them.
    d = _draws(seed, x.shape, jitter=True, noise=True, solarize=seed % 2 == 0, gray=seed >= 2)
    got = np.asarray(_photometric(jnp.asarray(x), d, EIGHT_BIT, True))
    ref = R.photometric(x, jax.tree.map(np.asarray, d), EIGHT_BIT, True)
    assert np.abs(got - ref).max() <= 1 and np.mean(got != ref) < 1e-3  # rounding ties only
    assert np.all(got == np.rint(got)) and got.min() >= 0 and got.max() <= 255
    assert np.mean(got != x) > 0.5  # the chain changed the image


def test_each_op_against_the_reference_and_hand_values():
    x = _aid_image(5)
    f = lambda op, *a: np.asarray(
        jax.jit(op, static_argnums=tuple(range(2, len(a) + 1)))(jnp.asarray(x), *a)
    )
    np.testing.assert_array_equal(
        f(A.adjust_brightness, 1.3, EIGHT_BIT), R.brightness(x, 1.3, EIGHT_BIT)
    )
    for rgb in (True, False):
        np.testing.assert_array_equal(
            f(A.adjust_contrast, 0.7, EIGHT_BIT, rgb), R.contrast(x, 0.7, EIGHT_BIT, rgb)
        )
    np.testing.assert_array_equal(
        f(A.adjust_saturation, 1.2, EIGHT_BIT), R.saturation(x, 1.2, EIGHT_BIT)
    )
    assert np.abs(f(A.adjust_hue, 0.07, EIGHT_BIT) - R.hue(x, 0.07, EIGHT_BIT)).max() <= 1
    np.testing.assert_array_equal(f(A.adjust_hue, 0.0, EIGHT_BIT), x)
    for size in (3, 5, 7):
        got = np.asarray(
            jax.jit(A.gaussian_blur, static_argnums=3)(jnp.asarray(x), size, 1.5, EIGHT_BIT)
        )
        assert np.abs(got - R.gaussian_blur(x, size, 1.5, EIGHT_BIT)).max() <= 1
    # Hand values: solarize at 128, luma weights, OpenCV's 3-tap kernel for sigma 0.8.
    ramp = jnp.arange(256, dtype=jnp.float32)[None, :, None]
    np.testing.assert_array_equal(
        np.asarray(A.solarize(ramp, EIGHT_BIT))[0, :, 0],
        np.where(np.arange(256) >= 128, 255 - np.arange(256), np.arange(256)),
    )
    np.testing.assert_array_equal(
        A.to_gray(jnp.array([[[100.0, 200.0, 50.0]]]), EIGHT_BIT), [[[153.0] * 3]]
    )  # 29.9 + 117.4 + 5.7 = 153.0
    e = math.exp(-1 / (2 * 0.64))
    np.testing.assert_allclose(
        A.blur_kernel(3, 0.8),
        [0, 0, e / (1 + 2 * e), 1 / (1 + 2 * e), e / (1 + 2 * e), 0, 0],
        rtol=1e-6,
    )


def test_uint16_four_band_levels():
    """Non-RGB data: no colour ops; noise and solarize scale with the data's black and white."""
    rng = np.random.default_rng(0)
    levels = A.levels_for(np.uint16, (5000, 10000))
    assert levels == A.Levels(5000.0, 10000.0, 65535.0)
    x = rng.integers(4000, 12000, (32, 32, 4)).astype(np.float32)
    for seed in range(3):
        d = _draws(seed, x.shape, jitter=True, noise=True, solarize=True, gray=True)
        got = np.asarray(_photometric(jnp.asarray(x), d, levels, False))
        ref = R.photometric(x, jax.tree.map(np.asarray, d), levels, False)
        assert np.abs(got - ref).max() <= 1 and np.mean(got != ref) < 1e-3
    flat = jnp.full((200, 200, 1), 7000.0)
    noisy = np.asarray(
        A.gauss_noise(flat, jax.random.normal(jax.random.key(1), flat.shape), 30.0, levels)
    )
    assert noisy.std() == pytest.approx(30**0.5 * 5000 / 255, rel=0.03)
    threshold = 5000 + 5000 * 128 / 255
    sol = A.solarize(jnp.array([[[6000.0, threshold, 9000.0]]]), levels)
    assert np.asarray(sol).tolist() == [[[6000.0, np.rint(15000 - threshold), 6000.0]]]
    with pytest.raises(ValueError, match='value_range'):
        A.levels_for(np.uint8, (10, 5))


def test_draws_follow_the_official_probabilities_and_ranges():
    n = 4000
    d = jax.vmap(lambda k: A.sample_draws(k, (2, 2, 3)))(jax.random.split(jax.random.key(0), n))
    d = jax.tree.map(np.asarray, d)
    tol = 4 * math.sqrt(0.25 / n)
    for name, p in (('jitter', 0.8), ('noise', 0.6), ('solarize', 0.2), ('gray', 0.2)):
        assert abs(getattr(d, name).mean() - p) < tol, name
    sizes, counts = np.unique(d.blur_size, return_counts=True)
    assert sizes.tolist() == [3, 5, 7]
    np.testing.assert_allclose(counts / n, [0.2, 0.4, 0.4], atol=tol)
    for i, (lo, hi) in enumerate((A.BRIGHTNESS, A.CONTRAST, A.SATURATION, A.HUE)):
        assert lo <= d.factors[:, i].min() and d.factors[:, i].max() <= hi
        assert abs(d.factors[:, i].mean() - (lo + hi) / 2) < (hi - lo) * 0.02
    assert np.all(np.sort(d.order, axis=1) == np.arange(4))
    assert len({tuple(o) for o in d.order}) == 24  # every order occurs
    assert 0.1 <= d.blur_sigma.min() and d.blur_sigma.max() <= 2.0
    assert 10 <= d.noise_var.min() and d.noise_var.max() <= 50


def test_block_masks_are_exact_count_uniform_and_independent():
    for grid, count in ((7, 30), (4, 10), (2, 3)):
        assert A.mask_count(grid, 0.6) == count == math.ceil(grid * grid * 0.6)
    keys = jax.random.split(jax.random.key(3), 3000)
    masks = np.asarray(jax.vmap(lambda k: A.block_mask(k, 7, 0.6))(keys))
    assert masks.shape == (3000, 7, 7) and np.all(masks.sum(axis=(1, 2)) == 30)
    np.testing.assert_allclose(masks.mean(axis=0), 30 / 49, atol=0.05)


def test_batch_augmentation_is_per_example_and_sharding_independent():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    views = [make_views(image, np.random.default_rng(i), 64) for i in range(8)]
    batch = {k: np.stack([v[k] for v in views]) for k in ('img_a', 'img_b')}
    batch['img_b'][:] = batch['img_b'][0]  # the same crop B at every position
    fn = functools.partial(A.augment_batch, mask_ratio=0.6, mask_patch=32)
    key = A.step_key(0, jnp.int32(5))
    single = jax.device_get(jax.jit(fn)(batch, key))
    mesh = Mesh(np.array(jax.devices()), ('data',))
    sharded_batch = jax.device_put(batch, NamedSharding(mesh, P('data')))
    sharded = jax.device_get(jax.jit(fn)(sharded_batch, key))
    for k in single:
        np.testing.assert_array_equal(single[k], sharded[k], err_msg=k)
    np.testing.assert_array_equal(single['img_a'], batch['img_a'])  # crop A: geometric only
    assert single['img_b'].dtype == np.float32
    assert len({single['img_b'][i].tobytes() for i in range(8)}) == 8  # per-example draws
    assert not np.array_equal(single['mask_a'], single['mask_b'])
    assert np.all(single['mask_a'].sum(axis=(1, 2)) == 3)
    # Another step draws anew; the same step repeats exactly.
    other = jax.device_get(jax.jit(fn)(batch, A.step_key(0, jnp.int32(6))))
    assert not np.array_equal(other['img_b'], single['img_b'])
    again = jax.device_get(jax.jit(fn)(batch, A.step_key(0, jnp.int32(5))))
    np.testing.assert_array_equal(again['img_b'], single['img_b'])
    with pytest.raises(ValueError, match='data.rgb is set, but the images have 4 bands'):
        fn(
            {
                'img_a': batch['img_a'][..., :1].repeat(4, -1),
                'img_b': batch['img_b'][..., :1].repeat(4, -1),
            },
            key,
            rgb=True,
        )
