"""Prepared datasets on the real files in ../shared/data: cmid_jax.data.shards's ArrayRecord shards
(round trip, manifest, pipeline batches, bad inputs) and TFDS datasets read through
data.source='tfds:...' (built locally from AID images, no download)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip('rasterio')

from cmid_jax.config_resolve import resolve  # noqa: E402
from cmid_jax.data import build_dataset, list_images, load_image, raster  # noqa: E402
from cmid_jax.data import shards as prep  # noqa: E402
from cmid_jax.data.records import MANIFEST, RecordSource, read_manifest  # noqa: E402
from cmid_jax.data.sources import open_source  # noqa: E402
from cmid_jax.errors import ConfigError  # noqa: E402

from conftest import run_tool  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
AID = DATA / 'aid'
GEOTIFF = DATA / 'geotiff'
CROP = GEOTIFF / 'landsat8_LC08_L1TP_224078_20200518_crop1024.tif'
EDGE = GEOTIFF / 'landsat8_LC08_L1TP_224078_20200518_edge512.tif'
RGBN = GEOTIFF / 'rgbn_4band.tif'

pytestmark = pytest.mark.skipif(
    not (AID.is_dir() and GEOTIFF.is_dir()), reason=f'shared data not found at {DATA}'
)


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


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope='module')
def aid_subset(tmp_path_factory) -> Path:
    """24 AID JPEGs (one class folder kept per image, labels ignored)."""
    out = tmp_path_factory.mktemp('aid')
    for f in list_images(AID)[::50]:
        (out / Path(f).parent.name).mkdir(exist_ok=True)
        shutil.copy(f, out / Path(f).parent.name)
    return out


# -------------------------------------------------------------------------- ArrayRecord
def test_prepare_tiles_round_trip_and_pipeline(tmp_path):
    scenes = tmp_path / 'scenes'
    scenes.mkdir()
    for path in (CROP, EDGE, RGBN):
        shutil.copy(path, scenes)
    out = tmp_path / 'shards'
    manifest = prep.prepare(str(scenes), str(out), tile=256, max_nodata=0.25, records_per_shard=7)
    assert manifest == read_manifest(out)
    assert manifest['records'] == 18 and manifest['rejected_nodata'] == 2  # 16 + 4 - 2
    assert manifest['dtype'] == 'uint16' and manifest['bands'] == 3 and manifest['tile_size'] == 256
    assert manifest['band_names'] == ['red', 'green', 'blue']
    assert [s['records'] for s in manifest['shards']] == [7, 7, 4]
    assert manifest['skipped_count'] == 1
    assert 'rgbn_4band.tif' in manifest['skipped'][0]['element']
    assert 'has 4 bands' in manifest['skipped'][0]['reason']
    # Contents: the records are the accepted windows, in scene and row-major order.
    records = RecordSource(out, bands=(0, 1, 2))
    expected = [
        raster.read_raster(CROP, window=raster.Window(r, c, 256, 256))
        for r in range(0, 1024, 256)
        for c in range(0, 1024, 256)
    ]
    expected += [raster.read_raster(EDGE, window=raster.Window(256, c, 256, 256)) for c in (0, 256)]
    assert len(records) == len(expected)
    for i, tile in enumerate(expected):
        got = records.read(i)
        assert got.dtype == np.uint16 and np.array_equal(got, tile)
    # data.path on the folder finds the manifest; data.bands indexes the stored bands.
    data = _data_config(path=str(out), bands=('blue', 0))
    source = open_source(data)
    assert isinstance(source, RecordSource)
    assert np.array_equal(source.read(3), expected[3][..., [2, 0]])
    data.mean, data.std = (0.1, 0.1), (0.01, 0.01)
    resolved = _resolved_data(data, source)
    assert resolved.dtype == 'uint16' and resolved.value_range == (0.0, 65535.0)
    ds = build_dataset(source, image_size=64, global_batch_size=6, seed=0)
    batch = ds[0]
    assert batch['img_a'].shape == (6, 64, 64, 2) and batch['img_a'].dtype == np.uint16
    assert batch['bad_images'].sum() == 0
    # The same shards in 8-bit RGB mode: stretched per record.
    rgb = open_source(_data_config(path=str(out)))
    assert rgb.read(0).dtype == np.uint8 and rgb.read(0).shape == (256, 256, 3)
    with pytest.raises(ValueError, match=r'holds ArrayRecord shards .*set data.tile_size=0'):
        open_source(_data_config(path=str(out), tile_size=256))
    with pytest.raises(ValueError, match='already holds a prepared set'):
        prep.prepare(str(scenes), str(out), tile=256)


def test_prepare_images_cli_equals_the_jpeg_pipeline(tmp_path, aid_subset):
    out = tmp_path / 'aid_shards'
    proc = run_tool(
        'tools.prepare', f'--src={aid_subset}', f'--out={out}', '--records_per_shard=10'
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'wrote 24 records (3 x uint8, whole images) in 3 shards' in proc.stdout
    files = list_images(aid_subset)
    records = open_source(_data_config(path=str(out)))
    for i in (0, 5, 23):
        assert np.array_equal(records.read(i), load_image(files[i]))
    # Records keep the file order, so the globally shuffled pipeline gives the very same
    # batches (files, augmentations) as reading the JPEGs.
    kw = dict(image_size=64, global_batch_size=8, seed=4)
    from_records, from_files = build_dataset(records, **kw), build_dataset(files, **kw)
    for k in (0, 3):  # the second epoch too
        assert _equal(from_records[k], from_files[k])


def test_prepare_skips_and_names_bad_inputs(tmp_path, aid_subset):
    src = tmp_path / 'mixed'
    shutil.copytree(aid_subset, src)
    data = Path(list_images(aid_subset)[0]).read_bytes()
    (src / 'a_truncated.jpg').write_bytes(data[: len(data) // 3])
    (src / 'b_text.jpg').write_text('not a jpeg\n')
    shutil.copy(RGBN, src / 'c_four_bands.tif')
    (src / 'readme.txt').write_text('not an image name: ignored')
    manifest = prep.prepare(str(src), str(tmp_path / 'out'))
    assert manifest['records'] == 24 and manifest['files'] == 27
    reasons = {Path(s['element']).name: s['reason'] for s in manifest['skipped']}
    assert manifest['skipped_count'] == 3 == len(reasons)
    assert 'image file is truncated' in reasons['a_truncated.jpg']
    assert 'cannot identify image file' in reasons['b_text.jpg']
    assert 'has 4 bands, the first usable file has 3' in reasons['c_four_bands.tif']
    # Bands asked by name that a file lacks are named with the file.
    manifest = prep.prepare(str(GEOTIFF), str(tmp_path / 'nir'), bands=('red', 3))
    assert manifest['records'] == 1 and manifest['band_names'] == ['red', None]
    assert manifest['dtype'] == 'uint8'  # from the first file that has the bands
    assert [Path(s['element']).name for s in manifest['skipped']] == [CROP.name, EDGE.name]
    assert all('needs 0-based band index 3' in s['reason'] for s in manifest['skipped'])
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(ValueError, match=r'no image files found under .*empty'):
        prep.prepare(str(empty), str(tmp_path / 'none'))
    assert not (tmp_path / 'none' / MANIFEST).exists()


def test_stale_or_foreign_manifests_and_stats_are_named(tmp_path):
    from cmid_jax.data.stats import load_stats

    folder = tmp_path / 'prepared'
    folder.mkdir()
    manifest, stats = folder / MANIFEST, tmp_path / 'stats.json'
    cases = [
        ('{not json', r'cannot read it'),
        ('["a list"]', r"not a file of format 'cmid_jax.prepare/1' \(its format is 'list'\)"),
        ('{"format": "cmid_jax.data.prepare/0"}', r"its format is 'cmid_jax.data.prepare/0'"),
        ('{"format": "cmid_jax.prepare/1", "records": 3}', r"lacks the keys \['dtype', 'bands'"),
    ]
    for text, message in cases:
        manifest.write_text(text)
        with pytest.raises(ValueError, match=rf"manifest '{re.escape(str(manifest))}'.*{message}"):
            read_manifest(folder)
    stats.write_text('{"format": "cmid_jax.data_stats/1", "mean": [0.5], "std": [0.1]}')
    with pytest.raises(
        ValueError,
        match=r"data.stats='.*stats.json' lacks the keys "
        r"\['value_range', 'dtype', 'bands'\]",
    ):
        load_stats(str(stats))
    with pytest.raises(ValueError, match=r"data.stats='.*missing.json': cannot read it"):
        load_stats(str(tmp_path / 'missing.json'))


# ---------------------------------------------------------------------------------- TFDS
@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory, aid_subset) -> tuple[Path, list[str]]:
    """A tiny TFDS dataset of real AID JPEGs in the array_record format, built locally."""
    tfds = pytest.importorskip('tensorflow_datasets')
    files = list_images(aid_subset)

    class AidTiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version('1.0.0')

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        'image': tfds.features.Image(shape=(None, None, 3)),
                        'filename': tfds.features.Text(),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {'train': self._generate_examples()}

        def _generate_examples(self):
            for f in files:  # encoded JPEG bytes are stored as they are: no TensorFlow needed
                yield f, {'image': f, 'filename': f}

    data_dir = tmp_path_factory.mktemp('tfds')
    AidTiny(data_dir=str(data_dir), file_format='array_record').download_and_prepare()
    return data_dir, files


def test_tfds_source_reads_a_locally_built_dataset(tfds_dir):
    data_dir, files = tfds_dir
    data = _data_config(source='tfds:aid_tiny:train', path=str(data_dir))
    source = open_source(data)
    assert len(source) == len(files) and source.num_bands == 3
    for i in (0, 7):
        name = source._source()[i]['filename']
        name = name.decode() if isinstance(name, bytes) else name
        assert np.array_equal(source.read(i), load_image(name))  # same PIL decode
    resolved = _resolved_data(data, source)
    assert resolved.dtype == 'uint8' and resolved.path == str(data_dir)
    batch = build_dataset(source, image_size=64, global_batch_size=4, seed=0)[0]
    assert batch['img_a'].shape == (4, 64, 64, 3) and batch['bad_images'].sum() == 0
    half = open_source(_data_config(source='tfds:aid_tiny:train[:50%]', path=str(data_dir)))
    assert len(half) == len(files) // 2
    raw = open_source(_data_config(source='tfds:aid_tiny:train', path=str(data_dir), bands=(2,)))
    assert raw.read(0).shape[2] == 1 and raw.dtype == np.uint8
    with pytest.raises(ValueError, match=r'tfds:missing_set:train.*not found.*array_record'):
        open_source(_data_config(source='tfds:missing_set:train', path=str(data_dir)))
    with pytest.raises(ConfigError, match=r"data.source='tfds:aid_tiny': expected 'tfds:NAME"):
        _resolved_data(_data_config(source='tfds:aid_tiny'), None)
    with pytest.raises(ConfigError, match=r'data.tile_size=64 must be 0 with data.source='):
        _resolved_data(_data_config(source='tfds:aid_tiny:train', tile_size=64), None)
