"""Evaluation of N-band / uint16 models on windows of the real GeoTIFFs in ../shared/data: the
image cache holds the pretraining reader's pixels, kNN / linear and the online kNN run on a 4-band
uint8 and a 3-band uint16 workdir, and images that do not fit the model are named."""

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip('rasterio')

from cmid_jax import train  # noqa: E402
from cmid_jax.data.files import load_image  # noqa: E402
from cmid_jax.data.pipeline import FileSource  # noqa: E402
from cmid_jax.data.views import pre_resize  # noqa: E402
from cmid_jax.errors import ImageError  # noqa: E402
from cmid_jax.evaluation import load_images  # noqa: E402
from cmid_jax.evaluation import run as evaluate  # noqa: E402
from cmid_jax.evaluation.finetune import augment  # noqa: E402
from cmid_jax.workdir import Workdir  # noqa: E402
from configs import vitb  # noqa: E402

from conftest import SHARED_DATA  # noqa: E402

GEOTIFF = SHARED_DATA / 'geotiff'
RGBN = GEOTIFF / 'rgbn_4band.tif'  # 403 x 515 x 4 uint8
LANDSAT = GEOTIFF / 'landsat8_LC08_L1TP_224078_20200518_crop1024.tif'  # 1024 x 1024 x 3 uint16
SIZE = 64
# (height, width) of the windows of every class: as is, resized square, cropped only, both.
SHAPES = ((64, 64), (96, 96), (64, 96), (80, 120))
CLASSES = {'plain': lambda w: w, 'reversed': lambda w: w[:, :, ::-1], 'dim': lambda w: w // 2}

pytestmark = pytest.mark.skipif(not GEOTIFF.is_dir(), reason=f'shared data not found at {GEOTIFF}')


def read_full(path: Path) -> np.ndarray:
    """The whole image as (H, W, C), read independently of cmid_jax."""
    with rasterio.open(path) as ds:
        return np.moveaxis(ds.read(), 0, -1)


def write_tif(path: Path, array: np.ndarray) -> None:
    with warnings.catch_warnings():  # A plain, non-georeferenced TIFF is what we want.
        warnings.simplefilter('ignore', rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(
            path,
            'w',
            driver='GTiff',
            height=array.shape[0],
            width=array.shape[1],
            count=array.shape[2],
            dtype=array.dtype.name,
        ) as ds:
            ds.write(np.moveaxis(array, -1, 0))


def labelled_set(root: Path, scene: np.ndarray) -> dict[str, np.ndarray]:
    """Class-per-folder GeoTIFFs: the same windows of `scene` as they are, band-reversed and at
    half brightness; returns {path: the pixels written}."""
    written = {}
    for name, change in CLASSES.items():
        (root / name).mkdir(parents=True)
        for i, (h, w) in enumerate(SHAPES):
            top, left = 50 * i, 60 * i
            window = np.ascontiguousarray(change(scene[top : top + h, left : left + w]))
            path = root / name / f'{name}_{i}.tif'
            write_tif(path, window)
            written[str(path)] = window
    return written


@pytest.fixture(scope='module')
def rgbn_set(tmp_path_factory):
    """(root, {path: pixels}) of 4-band uint8 images."""
    root = tmp_path_factory.mktemp('rgbn')
    return root, labelled_set(root, read_full(RGBN))


@pytest.fixture(scope='module')
def landsat_set(tmp_path_factory):
    """(root, {path: pixels}) of 3-band uint16 images."""
    root = tmp_path_factory.mktemp('landsat')
    return root, labelled_set(root, read_full(LANDSAT))


@pytest.mark.parametrize(
    'which,bands,dtype', [('rgbn', (3, 0, 1, 2), np.uint8), ('landsat', (2, 0), np.uint16)]
)
def test_cache_holds_the_pretraining_readers_pixels(which, bands, dtype, request):
    _, written = request.getfixturevalue(f'{which}_set')
    files = sorted(written)
    cache = load_images(files, SIZE, {'bands': bands, 'dtype': np.dtype(dtype).name})
    assert cache.shape == (len(files), SIZE, SIZE, len(bands)) and cache.dtype == dtype
    source = FileSource(files, bands)  # The pretraining reader of image folders.
    for i, path in enumerate(files):
        raw = written[path][:, :, list(bands)]
        assert np.array_equal(source.read(i), raw)
        h, w = raw.shape[:2]
        if (h, w) == (SIZE, SIZE):  # Kept as is.
            np.testing.assert_array_equal(cache[i], raw)
        elif h == SIZE:  # Shorter side already at size: only the central square is cut.
            left = (w - SIZE) // 2
            np.testing.assert_array_equal(cache[i], raw[:, left : left + SIZE])
        elif h == w:  # Square: exactly the pretraining pre-resize (per band bicubic).
            np.testing.assert_array_equal(cache[i], pre_resize(raw, SIZE))
        else:  # Resized, then cropped: close to the pre-resize of the central square.
            left = (w - h) // 2
            square = pre_resize(raw[:, left : left + h], SIZE)
            assert np.abs(cache[i] - square.astype(float)).mean() < 0.01 * raw.std()


def test_rgb_cache_is_unchanged(tmp_path):
    """8-bit RGB (data.bands None): `load_image`, shorter side PIL bicubic, central square."""
    from PIL import Image

    scene = read_full(RGBN)
    files = [str(tmp_path / 'a.png'), str(tmp_path / 'b.tif')]
    Image.fromarray(np.ascontiguousarray(scene[:80, :120, :3])).save(files[0])
    write_tif(Path(files[1]), read_full(LANDSAT)[:96, :150])  # uint16: stretched to 8 bits
    cache = load_images(files, SIZE)
    assert cache.dtype == np.uint8 and cache.shape == (2, SIZE, SIZE, 3)
    for image, path in zip(cache, files):
        rgb = load_image(path)
        h, w = rgb.shape[:2]
        nh, nw = SIZE, round(w * SIZE / h)
        resized = np.asarray(Image.fromarray(rgb).resize((nw, nh), resample=Image.BICUBIC))
        left = (nw - SIZE) // 2
        np.testing.assert_array_equal(image, resized[:, left : left + SIZE])


def test_finetune_augmentation_treats_every_band_alike():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 65536, (3, SIZE, SIZE, 4), dtype=np.uint16)
    out = augment(images, np.random.default_rng(1), (0.08, 1.0))
    assert out.shape == images.shape and out.dtype == np.uint16
    for b in range(4):  # The same crops and flips, band by band.
        alone = augment(images[..., b : b + 1], np.random.default_rng(1), (0.08, 1.0))
        np.testing.assert_array_equal(out[..., b : b + 1], alone)


# --- end to end ---------------------------------------------------------------------------------


def initial_workdir(tmp_path_factory, config, data: Path, bands, mean, std) -> str:
    """A total_steps=0 run (initial weights saved, online kNN at step 0) pretraining on `data`."""
    config.data.path = str(data)
    config.data.bands = bands
    config.data.mean, config.data.std = mean, std
    config.total_steps = 0
    config.eval.path = str(data)
    workdir = str(tmp_path_factory.mktemp('run'))
    train.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope='module')
def workdirs(tmp_path_factory, rgbn_set, landsat_set):
    """{name: (workdir, labelled data)}: ViT-mu on 4 uint8 bands and on 3 uint16 bands."""
    (rgbn, _), (landsat, _) = rgbn_set, landsat_set
    return {
        'rgbn': (
            initial_workdir(
                tmp_path_factory,
                vitb.get_config('smoke'),
                rgbn,
                (3, 0, 1, 2),
                (0.4,) * 4,
                (0.2,) * 4,
            ),
            str(rgbn),
        ),
        'landsat': (
            initial_workdir(
                tmp_path_factory,
                vitb.get_config('smoke'),
                landsat,
                (0, 1, 2),
                (0.12,) * 3,
                (0.03,) * 3,
            ),
            str(landsat),
        ),
    }


@pytest.mark.slow
@pytest.mark.parametrize('name,dtype,bands', [('rgbn', 'uint8', 4), ('landsat', 'uint16', 3)])
def test_knn_and_linear_on_n_band_workdirs(workdirs, name, dtype, bands):
    workdir, data = workdirs[name]
    config = Workdir(workdir).read_config()
    assert config.data.dtype == dtype and len(config.data.bands) == bands
    knn = evaluate.evaluate(workdir, data, 'knn')
    linear = evaluate.evaluate(workdir, data, 'linear')
    for r in (knn, linear):
        assert (r['step'], r['num_classes'], r['num_train'], r['num_test']) == (0, 3, 6, 6)
        assert 0.0 <= r['top1'] <= 1.0 and r['image_size'] == SIZE
    assert knn['top1'] > 1 / 3  # Chance; even initial weights tell the band order and brightness.
    # The online kNN of the run read the same split the same way (on an 8-device mesh).
    metrics = [json.loads(line) for line in Path(workdir, 'metrics.jsonl').read_text().splitlines()]
    online = next(m for m in metrics if 'knn_top1_student' in m)
    assert online['step'] == 0
    assert abs(online['knn_top1_student'] - knn['top1']) < 1e-6


@pytest.mark.slow
def test_finetune_on_the_uint16_workdir(workdirs):
    workdir, data = workdirs['landsat']
    r = evaluate.evaluate(workdir, data, 'finetune', epochs=1, batch_size=6)
    assert r['protocol'] == 'finetune' and r['num_test'] == 6 and 0.0 <= r['top1'] <= 1.0


@pytest.mark.slow
def test_images_that_do_not_fit_the_model_are_named(workdirs, rgbn_set, landsat_set, tmp_path):
    workdir, _ = workdirs['rgbn']  # bands (3, 0, 1, 2) of uint8 pixels
    landsat, three_bands = landsat_set
    with pytest.raises(
        ValueError,
        match=rf"(?s){re.escape(str(landsat))}/\w+/\w+\.tif': has 3 "
        r'bands.*index 3.*expect data\.bands=\(3, 0, 1, 2\) '
        r'\(4 bands\) of uint8',
    ):
        evaluate.evaluate(workdir, str(landsat), 'knn')
    # One misfit among fitting files is named as well.
    data = Workdir(workdir).read_config().data
    misfit = sorted(three_bands)[0]
    with pytest.raises(ImageError, match=rf"{re.escape(misfit)}': has 3 bands.*\(4 bands\)"):
        load_images(sorted(rgbn_set[1]) + [misfit], SIZE, data)
    # Four bands of 16-bit pixels: the model's data.dtype decides, not the files.
    path = tmp_path / 'u16.tif'
    write_tif(path, read_full(RGBN)[:64, :64].astype(np.uint16) * 200)
    with pytest.raises(ImageError, match=r'u16\.tif.*has uint16 pixels.*\(4 bands\) of uint8'):
        load_images([str(path)], SIZE, data)
