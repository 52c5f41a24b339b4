"""Multispectral / GeoTIFF data on the real files in ../shared/data: windowed reads, nodata
rejection, band selection, value scale and N-band augmentations, statistics, bad inputs, RGB
weight adaptation, and a short N-band training run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip('rasterio')

from cmid_jax import errors  # noqa: E402
from cmid_jax.config_resolve import resolve  # noqa: E402
from cmid_jax.data import bands as B  # noqa: E402
from cmid_jax.data import pipeline as P  # noqa: E402
from cmid_jax.data import raster  # noqa: E402
from cmid_jax.data import views as V  # noqa: E402
from cmid_jax.data.sources import open_source  # noqa: E402
from cmid_jax.data.stats import compute_stats, load_stats, write_stats  # noqa: E402
from cmid_jax.data.tiles import TileIndex, TileSource  # noqa: E402
from cmid_jax.errors import ImageError, TileRejected  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
GEOTIFF = DATA / 'geotiff'
CROP = GEOTIFF / 'landsat8_LC08_L1TP_224078_20200518_crop1024.tif'
EDGE = GEOTIFF / 'landsat8_LC08_L1TP_224078_20200518_edge512.tif'
RGBN = GEOTIFF / 'rgbn_4band.tif'

pytestmark = pytest.mark.skipif(not GEOTIFF.is_dir(), reason=f'shared data not found at {DATA}')


def _full(path: Path) -> np.ndarray:
    """Whole image as (H, W, C), read independently of cmid_jax."""
    with rasterio.open(path) as ds:
        return np.moveaxis(ds.read(), 0, -1)


def _data_config(**overrides):
    from configs import vitb

    config = vitb.get_config('smoke')
    for key, value in overrides.items():
        config.data[key] = value
    return config.data


def _resolved_data(data, source):
    """`data` resolved against `source` as a run resolves its config."""
    from configs import vitb

    config = vitb.get_config('smoke')
    config.data = data
    return resolve(config, source).data


# ------------------------------------------------------------------------- windowed reads
def test_windowed_reads_equal_slices_of_a_full_read():
    import tifffile

    crop = tifffile.imread(CROP)  # deflate, tiled 256: tifffile reads it without imagecodecs
    assert np.array_equal(_full(CROP), crop)
    rgbn = _full(RGBN)  # LZW: read by GDAL
    for path, full in ((CROP, crop), (RGBN, rgbn)):
        for top, left, h, w in ((0, 0, 64, 64), (200, 300, 150, 100), (1, 7, 33, 250)):
            window = raster.Window(top, left, h, w)
            got = raster.read_raster(path, window=window)
            assert got.dtype == full.dtype
            assert np.array_equal(got, full[top : top + h, left : left + w])
        assert np.array_equal(raster.read_raster(path, [2, 0]), full[:, :, [2, 0]])
    # The tile index covers the scene with windows equal to slices of the full array.
    source = TileSource(TileIndex.build([str(CROP)], 224, (0, 1, 2)), rgb8=False)
    assert len(source) == 25  # ceil(1024 / 224) = 5 windows per side, spread to end at 1024
    scene, window = source.index.locate(24)
    assert (window.top, window.left) == (800, 800)
    assert np.array_equal(source.read(24), crop[800:, 800:])
    assert np.array_equal(source.read(7), crop[200:424, 400:624])
    with pytest.raises(ImageError, match='outside the 1024x1024 image'):
        raster.read_raster(CROP, window=raster.Window(900, 0, 200, 10))


def test_window_grid_and_rgb_tiles():
    assert list(TileIndex.build([str(EDGE)], 256).scenes[0].rows) == [0, 256]
    from cmid_jax.data.tiles import window_starts

    assert list(window_starts(403, 224)) == [0, 179]
    assert list(window_starts(224, 224)) == [0]
    # 8-bit RGB mode: a uint16 tile is stretched per tile like a whole image.
    source = TileSource(TileIndex.build([str(CROP)], 256), rgb8=True)
    tile = source.read(5)
    assert tile.dtype == np.uint8 and tile.shape == (256, 256, 3)
    from cmid_jax.data.files import to_rgb_uint8

    assert np.array_equal(tile, to_rgb_uint8(_full(CROP)[256:512, 256:512], 'x'))


# -------------------------------------------------------------------------- nodata
def test_nodata_tiles_of_the_edge_crop_are_rejected_and_replaced(tmp_path):
    full = _full(EDGE)
    nodata = np.all(full == 0, axis=2)
    index = TileIndex.build([str(EDGE)], 256, (0, 1, 2))
    fractions = [
        nodata[w.top : w.top + 256, w.left : w.left + 256].mean()
        for w in (index.locate(i)[1] for i in range(4))
    ]
    assert fractions[0] == pytest.approx(0.483, abs=1e-3) and fractions[2:] == [0.0, 0.0]
    strict = TileSource(index, rgb8=False, max_nodata=0.25)
    loose = TileSource(index, rgb8=False, max_nodata=0.5)
    for i in (0, 1):
        with pytest.raises(TileRejected, match=r'edge512\.tif window .*nodata pixels'):
            strict.read(i)
    assert np.array_equal(loose.read(0), full[:256, :256])
    with pytest.raises(TileRejected):
        loose.read(1)
    # In the pipeline a rejected tile is replaced by an accepted one and not counted as bad:
    # with max_nodata=0 only the two nodata-free tiles can appear.
    ds = P.build_dataset(
        TileSource(index, rgb8=False, max_nodata=0.0), image_size=64, global_batch_size=8, seed=0
    )
    for k in range(2):
        batch = ds[k]
        assert batch['img_a'].dtype == np.uint16 and batch['img_a'].shape == (8, 64, 64, 3)
        assert not np.any(np.all(batch['img_a'] == 0, axis=-1))
        assert batch['bad_images'].sum() == 0


# --------------------------------------------------------------------- band selection
def test_band_selection_and_order_on_the_4_band_tile(tmp_path):
    full = _full(RGBN)
    assert full.shape == (403, 515, 4) and full.dtype == np.uint8
    info = raster.read_info(RGBN)
    assert info.band_names == ('red', 'green', 'blue', None)  # GDAL colour interpretation
    for request, order in (((3, 0, 1), [3, 0, 1]), (('BLUE', 'red', 3), [2, 0, 3]), ((1,), [1])):
        source = P.FileSource([str(RGBN)], request)
        assert source.num_bands == len(order) and source.dtype == np.uint8
        assert np.array_equal(source.read(0), full[:, :, order])
    tiles = TileSource(TileIndex.build([str(RGBN)], 128, (3, 2, 1, 0)), rgb8=False)
    _, w = tiles.index.locate(6)  # 4 x 5 windows spread over 403 x 515: row 1, column 1
    assert (w.top, w.left) == (92, 97)
    assert np.array_equal(tiles.read(6), full[92:220, 97:225, ::-1])
    # The pixel type comes from the first file that has the bands: none here.
    with pytest.raises(ValueError, match=r'rgbn_4band\.tif.*4 bands.*band index 4'):
        P.FileSource([str(RGBN)], (0, 4))
    with pytest.raises(
        ValueError, match=r"rgbn_4band\.tif.*'nir'.*named \['red', 'green', 'blue', None\]"
    ):
        P.FileSource([str(RGBN)], ('nir',))
    # Later files without the bands are skipped and counted like unreadable ones.
    mixed = P.FileSource([str(RGBN), str(CROP)], (3, 0))
    with pytest.raises(ImageError, match=r'crop1024\.tif.*has 3 bands.*band index 3'):
        mixed.read(1)
    with pytest.raises(ValueError, match=r'data.bands=\(\) selects no band'):
        B.check_bands_setting(())
    # The model's channels follow data.bands; colour ops only for 3 bands (or data.rgb).
    data = _data_config(bands=(3, 0, 1, 2))
    assert B.num_bands(data) == 4 and not B.is_rgb(data)
    assert B.num_bands(_data_config()) == 3 and B.is_rgb(_data_config())
    with pytest.raises(ValueError, match='data.rgb=True needs 3 bands'):
        B.is_rgb(_data_config(bands=(0, 1), rgb=True))


def test_views_of_uint16_and_4_band_images():
    u16 = _full(CROP)[:300, :300]
    v = V.make_views(u16, np.random.default_rng(1), 64)
    assert v['img_a'].dtype == v['img_b'].dtype == np.uint16 and v['img_b'].shape == (64, 64, 3)
    assert 4000 < v['img_a'].mean() < 12000  # raw values kept, not stretched
    four = _full(RGBN)
    v4 = V.make_views(four, np.random.default_rng(1), 64)
    assert v4['img_a'].shape == (64, 64, 4) and v4['img_a'].dtype == np.uint8
    # The crops do not depend on the band count.
    v3 = V.make_views(np.ascontiguousarray(four[:, :, :3]), np.random.default_rng(1), 64)
    for key in v3:
        assert np.array_equal(v4[key][..., : v3[key].shape[-1]], v3[key])


def test_normalize_divides_by_the_type_maximum():
    import jax.numpy as jnp

    from cmid_jax.pixels import normalize_pixels

    x = np.array([[[[0, 65535, 13107, 100]]]], np.uint16)
    mean, std = (0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.25, 1.0)
    got = np.asarray(normalize_pixels(jnp.asarray(x), mean, std))
    np.testing.assert_allclose(got, (x / 65535.0 - np.array(mean)) / np.array(std), atol=1e-6)
    with pytest.raises(ValueError, match='3 / 3 values, but the images have 4 bands'):
        normalize_pixels(jnp.asarray(x), mean[:3], std[:3])


# ------------------------------------------------------------------------ statistics
def test_data_stats_equal_numpy_on_the_full_arrays(tmp_path):
    import tifffile

    folder = tmp_path / 'scenes'
    folder.mkdir()
    for path in (CROP, EDGE):
        shutil.copy(path, folder)
    pixels = []
    for path in sorted(folder.iterdir()):
        full = tifffile.imread(path).astype(np.float64)
        pixels.append(full[np.any(full != 0, axis=2)])  # nodata (all bands 0) left out
    pixels = np.concatenate(pixels)
    # The edge scene is 30% nodata: kept here (max_nodata 1), rejected at the default 0.25.
    default = compute_stats(
        open_source(_data_config(path=str(folder), bands=(0, 1, 2))), samples=100, seed=3
    )
    assert default['rejected_nodata'] == 1 and default['elements_used'] == 1
    data = _data_config(path=str(folder), bands=(0, 1, 2), max_nodata=1.0)
    stats = compute_stats(open_source(data), samples=100, seed=3)
    np.testing.assert_allclose(stats['mean'], pixels.mean(axis=0) / 65535, rtol=1e-12)
    np.testing.assert_allclose(stats['std'], pixels.std(axis=0) / 65535, rtol=1e-9)
    np.testing.assert_allclose(stats['mean_raw'], pixels.mean(axis=0), rtol=1e-12)
    assert stats['pixels'] == len(pixels) and stats['elements_used'] == 2
    medians = [int(np.percentile(pixels[:, b], 50, method='inverted_cdf')) for b in range(3)]
    assert stats['percentiles_raw']['50'] == medians
    assert stats['value_range'] == [
        min(stats['percentiles_raw']['0.1']),
        max(stats['percentiles_raw']['99.9']),
    ]
    # Tiles: the 16 windows of 256 cover the 1024 crop exactly once; the edge crop's two
    # nodata-heavy tiles are rejected, its two clean ones used.
    data = _data_config(path=str(folder), bands=(0, 1, 2), tile_size=256)
    tiles = compute_stats(open_source(data), samples=1000, seed=0)
    assert tiles['elements_used'] == 18 and tiles['rejected_nodata'] == 2
    crop = tifffile.imread(CROP).reshape(-1, 3).astype(np.float64)
    edge = tifffile.imread(EDGE)[256:].reshape(-1, 3).astype(np.float64)
    both = np.concatenate([crop, edge[np.any(edge != 0, axis=1)]])
    np.testing.assert_allclose(tiles['mean'], both.mean(axis=0) / 65535, rtol=1e-12)

    # data.stats sets mean / std / value_range of the config, checked against the data.
    from cmid_jax.data.sources import source_stats
    from configs import vitb

    config = vitb.get_config('smoke')
    config.data.path, config.data.bands = str(folder), (0, 1, 2)
    config.data.max_nodata = 1.0  # As `stats` above, which keeps the edge scene.
    out = tmp_path / 'stats.json'
    write_stats(source_stats(config, 2), str(out))
    assert load_stats(str(out))['bands'] == [0, 1, 2]
    config.data.stats = str(out)
    resolved = resolve(config, open_source(config.data))
    assert resolved.data.mean == pytest.approx(tuple(stats['mean']))
    assert resolved.data.value_range == tuple(stats['value_range'])
    assert resolved.data.dtype == 'uint16'
    config.data.bands = (2, 1, 0)
    with pytest.raises(
        errors.DataError, match=r'computed for bands \[0, 1, 2\].*reads bands \[2, 1, 0\]'
    ):
        resolve(config, open_source(config.data))


def test_mean_std_must_match_the_band_count(tmp_path):
    data = _data_config(path=str(GEOTIFF / 'rgbn_4band.tif'), bands=(0, 1, 2, 3))
    with pytest.raises(errors.DataError, match=r'data.mean has 3 values for 4 bands.*data_stats'):
        _resolved_data(data, open_source(data))
    data.mean, data.std = (0.5,) * 4, (0.2, 0.2, 0.0, 0.2)
    with pytest.raises(errors.DataError, match='data.std=.* must be positive'):
        _resolved_data(data, open_source(data))
    data.std = (0.2,) * 4
    resolved = _resolved_data(data, open_source(data))
    assert resolved.dtype == 'uint8' and resolved.value_range == (0.0, 255.0)


# ------------------------------------------------------------------------- bad inputs
def test_bad_inputs_are_named_skipped_and_counted(tmp_path, caplog):
    scenes = tmp_path / 'scenes'
    scenes.mkdir()
    shutil.copy(CROP, scenes / 'a_good.tif')
    shutil.copy(RGBN, scenes / 'b_four_bands.tif')
    (scenes / 'c_not_an_image.tif').write_text('this is not a GeoTIFF\n')
    (scenes / 'notes.txt').write_text('ignored: not an image name')
    shutil.copy(EDGE, scenes / 'd_small.tif')
    data = CROP.read_bytes()
    (scenes / 'e_truncated.tif').write_bytes(data[: len(data) // 3])  # header fine, tiles cut

    index = TileIndex.build(sorted(str(p) for p in scenes.glob('*.tif')), 600, (0, 1, 2))
    reasons = dict((Path(p).name, r) for p, r in index.skipped)
    assert set(reasons) == {'b_four_bands.tif', 'c_not_an_image.tif', 'd_small.tif'}
    assert 'pixel type uint8 differs from the uint16' in reasons['b_four_bands.tif']
    assert 'a_good.tif' in reasons['b_four_bands.tif']
    assert '512x512 pixels, smaller than data.tile_size=600' in reasons['d_small.tif']
    assert 'c_not_an_image.tif' in caplog.text
    # A truncated scene fails only when a missing window is read: skipped and counted then.
    source = TileSource(index, rgb8=False)
    truncated = [i for i in range(len(source)) if 'e_truncated' in source.describe(i)]
    with pytest.raises(ImageError, match='e_truncated.tif'):
        source.read(truncated[-1])
    ds = P.build_dataset(source, image_size=64, global_batch_size=len(source), seed=0)
    assert 0 < ds[0]['bad_images'].sum()  # one epoch reads every window once
    # The 4-band scene alone: band 3 asked of 3-band scenes names each file.
    mixed = TileIndex.build(
        [str(scenes / 'b_four_bands.tif'), str(scenes / 'a_good.tif')], 300, (0, 3)
    )
    assert [Path(p).name for p, _ in mixed.skipped] == ['a_good.tif']
    assert 'has 3 bands; data.bands=(0, 3) needs 0-based band index 3' in mixed.skipped[0][1]

    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(ValueError, match=r'no image files found under .*empty'):
        open_source(_data_config(path=str(empty), tile_size=64))
    with pytest.raises(
        errors.ConfigError,
        match=r'data.tile_size=32 must be 0 or at least the crop data.image_size=64',
    ):
        _resolved_data(_data_config(path=str(scenes), tile_size=32), None)
    with pytest.raises(
        ValueError, match=r'(?s)no usable scene .*c_not_an_image.tif.*not recognized'
    ):
        TileIndex.build([str(scenes / 'c_not_an_image.tif')], 64)
    with pytest.raises(ValueError, match=r"data.source='hf:x'.*tfds:NAME"):
        open_source(_data_config(source='hf:x'))


def test_tile_pipeline_splits_processes_and_resumes(tmp_path):
    import grain

    index = TileIndex.build([str(CROP), str(EDGE)], 256, (0, 1, 2))
    source = TileSource(index, rgb8=False, max_nodata=0.25)
    one = P.build_dataset(source, image_size=64, global_batch_size=8, seed=5)
    halves = [
        P.build_dataset(
            source, image_size=64, global_batch_size=8, seed=5, process_index=i, process_count=2
        )
        for i in range(2)
    ]
    for k in range(3):  # crosses the 20-tile epoch
        ref = one[k]
        for key in ref:
            assert np.array_equal(np.concatenate([h[k][key] for h in halves]), ref[key]), key
    it = P.make_iterator(one, num_workers=0)
    try:
        next(it)
        state = it.get_state()
        expected = [next(it) for _ in range(2)]
        it2 = P.make_iterator(one, num_workers=0)
        it2.set_state(state)
        got = [next(it2) for _ in range(2)]
        it2.close()
    finally:
        it.close()
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(expected, got) for k in a)
    assert isinstance(one, grain.MapDataset)


# -------------------------------------------------------- RGB weights -> N-band models
def test_adapt_input_channels_matches_timm_on_resnet_and_vit_kernels():
    import jax
    import jax.numpy as jnp
    import torch
    from timm.models._manipulate import adapt_input_conv

    from cmid_jax.convert.adapt import adapt_input_channels, adapt_stem
    from cmid_jax.models import build_backbone

    for arch, variant, size, path in (
        ('resnet', 'nano', 64, ('conv1', 'kernel')),
        ('vit', 'mu/16', 64, ('patch_embed', 'proj', 'kernel')),
    ):
        model = build_backbone(arch, variant, img_size=size)
        init = lambda x, model=model: model.init(jax.random.key(0), x, train=False)
        # Shapes of the real RGB model (no compile), filled with random weights.
        rgb = jax.tree.map(
            lambda a: np.random.default_rng(a.size).standard_normal(a.shape).astype(a.dtype),
            jax.eval_shape(init, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)),
        )
        kernel = rgb['params']
        for key in path:
            kernel = kernel[key]
        assert kernel.shape[2] == 3
        assert kernel.shape[:2] == ((7, 7) if arch == 'resnet' else (16, 16))
        for n in (1, 2, 4, 6, 13):
            ours = np.asarray(adapt_input_channels(jnp.asarray(kernel), n))
            ref = adapt_input_conv(n, torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
            np.testing.assert_array_equal(ours, ref.numpy().transpose(2, 3, 1, 0))
        # Flax infers the input channels: a 4-band model has a (.., 4, ..) stem, and the
        # adapted RGB weights have exactly its parameter shapes and run on 4-band input.
        four = jax.eval_shape(init, jax.ShapeDtypeStruct((1, size, size, 4), jnp.float32))
        adapted = adapt_stem(rgb['params'], 4)
        assert jax.tree.map(np.shape, adapted) == jax.tree.map(np.shape, four['params'])
        out = jax.eval_shape(
            lambda v, x, model=model: model.apply(v, x, train=False),
            {**rgb, 'params': adapted},
            jnp.zeros((2, size, size, 4)),
        )
        assert out.shape[0] == 2
        assert adapt_input_channels(kernel, 3) is kernel  # RGB weights stay as they are
    with pytest.raises(ValueError, match=r'\(H, W, 3, O\)'):
        adapt_input_channels(np.zeros((3, 3, 4, 8)), 5)


# ------------------------------------------------------------------------ training
@pytest.mark.slow
def test_two_training_steps_on_a_4_band_geotiff_folder(tmp_path):
    import json

    from cmid_jax import train
    from configs import vitb

    scenes = tmp_path / 'scenes'
    scenes.mkdir()
    shutil.copy(RGBN, scenes / 'rgbn.tif')
    config = vitb.get_config('smoke')
    config.data.path = str(scenes)
    config.data.tile_size = 128  # 4 x 5 windows of the 403 x 515 tile
    config.data.bands = ('red', 'green', 'blue', 3)
    config.total_steps = 2
    config.images_every_steps = 2  # The reconstruction grid shows the first three bands.
    stats = compute_stats(open_source(config.data), samples=100, seed=0)
    stats['bands'] = list(config.data.bands)
    write_stats(stats, str(tmp_path / 'stats.json'))
    config.data.stats = str(tmp_path / 'stats.json')
    metrics = train.train_and_evaluate(config, str(tmp_path / 'run'))
    assert np.isfinite(metrics['loss']) and metrics['bad_images'] == 0
    saved = json.loads((tmp_path / 'run' / 'config.json').read_text())['data']
    assert saved['bands'] == ['red', 'green', 'blue', 3] and saved['dtype'] == 'uint8'
    assert saved['mean'] == pytest.approx(stats['mean']) and len(saved['std']) == 4
    assert saved['value_range'] == [0.0, 255.0]
    from PIL import Image

    grid = Image.open(tmp_path / 'run' / 'images' / 'reconstruction_00000002.png')
    assert grid.mode == 'RGB' and grid.size[1] == 4 * 64 + 3 * 2
    assert grid.size[0] > 8 * 64 + 7 * 2  # + the row names
