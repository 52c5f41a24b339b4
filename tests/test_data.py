"""Tests of cmid_jax.data on the real development data in ../shared/data."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmid_jax import errors
from cmid_jax.data import (
    ImageError,
    build_dataset,
    demo_data_path,
    list_images,
    load_image,
    location_grid,
    make_iterator,
    make_views,
)
from cmid_jax.data import pipeline as P
from cmid_jax.data import views as V

DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
AID = DATA / 'aid'
GEOTIFF = DATA / 'geotiff'
EDGE512 = GEOTIFF / 'landsat8_LC08_L1TP_224078_20200518_edge512.tif'

needs_data = pytest.mark.skipif(not AID.is_dir(), reason=f'shared data not found at {DATA}')


@pytest.fixture(scope='module')
def aid_files():
    if not AID.is_dir():
        pytest.skip(f'shared data not found at {DATA}')
    return list_images(AID)


# ------------------------------------------------------------------------------ files
@needs_data
def test_list_aid(aid_files):
    assert len(aid_files) == 1200
    assert aid_files == sorted(aid_files)
    assert all(f.endswith('.jpg') for f in aid_files)
    classes = {Path(f).parent.name for f in aid_files}
    assert len(classes) == 30  # nested class folders, labels ignored


def test_list_demo_tiles():
    files = list_images(demo_data_path())
    assert len(files) == 12
    assert all(f.endswith('.tif') for f in files)
    total = sum(os.path.getsize(f) for f in files)
    assert total < 3_000_000
    attribution = Path(demo_data_path(), 'ATTRIBUTION.md').read_text()
    assert 'Landsat-8 image courtesy of the U.S. Geological Survey' in attribution
    assert 'LC08_L1TP_224078_20200518' in attribution


def test_list_nesting_case_and_errors(tmp_path):
    (tmp_path / 'a' / 'b' / 'c').mkdir(parents=True)
    (tmp_path / 'a' / 'b' / 'c' / 'X.JPG').write_bytes(b'')
    (tmp_path / 'a' / 'y.TiFf').write_bytes(b'')
    (tmp_path / 'z.png').write_bytes(b'')
    (tmp_path / 'a' / 'notes.txt').write_text('x')
    (tmp_path / 'a' / '._hidden.jpg').write_bytes(b'')
    got = list_images(tmp_path)
    assert [os.path.relpath(f, tmp_path) for f in got] == sorted(
        ['a/b/c/X.JPG', 'a/y.TiFf', 'z.png']
    )
    missing = tmp_path / 'does_not_exist'
    with pytest.raises(errors.DataError, match='does_not_exist'):
        list_images(missing)
    empty = tmp_path / 'empty'
    empty.mkdir()
    (empty / 'readme.txt').write_text('no images')
    with pytest.raises(ValueError, match=r'empty.*\.jpg.*\.tiff'):
        list_images(empty)


@pytest.mark.skipif(not EDGE512.is_file(), reason='shared geotiff not found')
def test_uint16_tif_stretch_keeps_nodata():
    import tifffile

    raw = tifffile.imread(EDGE512)
    assert raw.dtype == np.uint16
    img = load_image(EDGE512)
    assert img.shape == (512, 512, 3) and img.dtype == np.uint8
    nodata = np.all(raw == 0, axis=2)
    assert 0.25 < nodata.mean() < 0.35
    assert np.all(img[nodata] == 0)
    valid = img[~nodata]
    # 2-98 percentile stretch: about 2% of the valid pixels saturate at each end.
    for b in range(3):
        assert 0.005 < np.mean(valid[:, b] == 255) < 0.04
        assert np.mean(valid[:, b] == 0) < 0.04
        assert valid[:, b].std() > 30
    # the demo tile cut from the same nodata corner behaves the same
    name = 'landsat8_LC08_L1TP_224078_20200518_edge512_y0000_x0000.tif'
    tile = load_image(Path(demo_data_path()) / name)
    assert tile.shape == (256, 256, 3) and tile.dtype == np.uint8
    assert np.all(tile[np.all(raw[:256, :256] == 0, axis=2)] == 0)


EDGE_TILES = sorted(Path(demo_data_path()).glob('*edge512*.tif'))


@pytest.mark.parametrize('bands', [None, (0, 1, 2)], ids=['rgb8', 'raw_bands'])
def test_whole_images_with_nodata_are_rejected_and_replaced(bands):
    """Whole-image mode applies data.max_nodata like tiles: the two bundled edge tiles with 48% /
    72% nodata are rejected (TileRejected), replaced and not counted as bad."""
    import tifffile

    from cmid_jax.data import TileRejected

    if bands is not None:
        pytest.importorskip('rasterio')
    raw = [tifffile.imread(f) for f in EDGE_TILES]  # read independently of cmid_jax
    expected = [float(np.all(r == 0, axis=2).mean()) for r in raw]
    assert [round(e, 2) for e in expected] == [0.48, 0.72, 0.0, 0.0]
    source = P.FileSource([str(f) for f in EDGE_TILES], bands, max_nodata=0.25)
    for i, fraction in enumerate(expected):
        if fraction > 0.25:
            with pytest.raises(
                TileRejected,
                match=rf'{EDGE_TILES[i].name}: .*nodata pixels, '
                r'more than data.max_nodata=0.25',
            ) as e:
                source.read(i)
            # 8-bit RGB counts black pixels of the stretched image: nodata plus ~1% clipped.
            assert fraction <= e.value.fraction <= fraction + (0.02 if bands is None else 0)
        else:
            image = source.read(i)
            assert image.dtype == (np.uint8 if bands is None else np.uint16)
            if bands is not None:
                assert np.array_equal(image, raw[i])
    assert P.FileSource([str(EDGE_TILES[1])], bands).read(0).shape == (256, 256, 3)  # default 1.0
    # In the pipeline the 48% tile (index 0) is replaced by files drawn at random with the
    # element's generator until one passes (index 2 or 3): the same views as decoding that file
    # with the generator after those draws, and nothing counted as bad.
    decode = P.DecodeProcessSlice(source, image_size=64, seed=0)
    got = decode.decode(0, np.random.default_rng(7))
    rng, index = np.random.default_rng(7), 0
    while expected[index] > 0.25:
        index = int(rng.integers(len(EDGE_TILES)))
    want = decode.decode(index, rng)
    assert not got['bad_images'].any() and all(np.array_equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match=r'data.max_nodata=1.5 must be a fraction'):
        P.FileSource([str(EDGE_TILES[0])], bands, max_nodata=1.5)


def test_open_source_passes_max_nodata_to_whole_images():
    from cmid_jax.data.sources import open_source
    from configs import vitb

    data = vitb.get_config('demo').data
    source = open_source(data)  # the bundled demo tiles, whole-image mode
    assert isinstance(source, P.FileSource) and source.max_nodata == data.max_nodata == 0.25


def test_tif_band_layouts(tmp_path):
    import tifffile

    rng = np.random.default_rng(0)
    hwc = rng.integers(1, 4000, size=(40, 50, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / 'hwc.tif', hwc)
    tifffile.imwrite(tmp_path / 'chw.tif', np.moveaxis(hwc, -1, 0).copy(), photometric='minisblack')
    a, b = load_image(tmp_path / 'hwc.tif'), load_image(tmp_path / 'chw.tif')
    assert a.shape == (40, 50, 3) and np.array_equal(a, b)
    single = rng.integers(0, 256, size=(30, 20), dtype=np.uint8)
    tifffile.imwrite(tmp_path / 'one.tif', single)
    one = load_image(tmp_path / 'one.tif')
    assert one.shape == (30, 20, 3) and all(np.array_equal(one[..., c], single) for c in range(3))
    four = rng.integers(0, 256, size=(30, 20, 4), dtype=np.uint8)
    tifffile.imwrite(tmp_path / 'four.tiff', four, photometric='minisblack', planarconfig='contig')
    assert np.array_equal(load_image(tmp_path / 'four.tiff'), four[..., :3])


@needs_data
def test_bad_files_raise_image_error(tmp_path, aid_files):
    data = Path(aid_files[0]).read_bytes()
    trunc = tmp_path / 'trunc.jpg'
    trunc.write_bytes(data[: len(data) // 2])
    text = tmp_path / 'text.jpg'
    text.write_text('this is not an image\n')
    text_tif = tmp_path / 'text.tif'
    text_tif.write_text('this is not a tiff\n')
    for bad in (trunc, text, text_tif, tmp_path / 'missing.png'):
        with pytest.raises(ImageError) as e:
            load_image(bad)
        assert isinstance(e.value, ValueError)
        assert str(bad) in str(e.value)
        again = pickle.loads(pickle.dumps(e.value))  # crosses worker processes
        assert again.path == str(bad) and str(again) == str(e.value)
    assert load_image(aid_files[0]).shape == (150, 150, 3)


# ------------------------------------------------------------------------------ views
def test_location_grid_hand_values():
    loc = location_grid(10, 20, 70, 140, False, 7)
    assert loc.shape == (7, 7, 2) and loc.dtype == np.float32
    ys = [15, 25, 35, 45, 55, 65, 75]  # 10 + (r + .5) * 10
    xs = [30, 50, 70, 90, 110, 130, 150]  # 20 + (c + .5) * 20
    assert np.array_equal(loc[:, 3, 0], ys) and np.array_equal(loc[2, :, 1], xs)
    assert np.all(loc[:, :, 0] == loc[:, :1, 0]) and np.all(loc[:, :, 1] == loc[:1, :, 1])
    flipped = location_grid(10, 20, 70, 140, True, 7)
    assert np.array_equal(flipped[..., 0], loc[..., 0])
    assert np.array_equal(flipped[..., 1], loc[:, ::-1, 1])
    assert np.array_equal(flipped[0, :, 1], xs[::-1])
    # pixel offsets are used (fix of Q1): the same crop moved by 50 px shifts by 50
    moved = location_grid(60, 70, 70, 140, False, 7)
    assert np.allclose(moved - loc, 50)


@needs_data
@pytest.mark.parametrize('size', [224, 128, 64])
def test_make_views_shapes(aid_files, size):
    g = size // 32
    v = make_views(load_image(aid_files[5]), np.random.default_rng(3), size)
    assert set(v) == {'img_a', 'img_b', 'loc_a', 'loc_b'}
    for k in ('img_a', 'img_b'):
        assert v[k].shape == (size, size, 3) and v[k].dtype == np.uint8
    for k in ('loc_a', 'loc_b'):
        assert v[k].shape == (g, g, 2) and v[k].dtype == np.float32
        assert np.all(v[k] > 0) and np.all(v[k] < size)  # inside the pre-resized source
    again = make_views(load_image(aid_files[5]), np.random.default_rng(3), size)
    assert all(np.array_equal(v[k], again[k]) for k in v)  # deterministic per rng


def test_image_size_must_be_multiple_of_32():
    with pytest.raises(ValueError, match='multiple of 32'):
        make_views(np.zeros((64, 64, 3), np.uint8), np.random.default_rng(0), 100)


@needs_data
def test_crops_are_pure_geometric_pil_reference(aid_files):
    """Crops A and B == PIL bicubic pre-resize -> crop -> PIL bilinear resize -> flip."""
    source = load_image(aid_files[17])
    pre = np.asarray(Image.fromarray(source).resize((224, 224), Image.BICUBIC))
    seen_flip = set()
    for seed in range(40):
        rng = np.random.default_rng(seed)
        crops = [(*V.sample_crop_box(rng, 224, 224), rng.random() < 0.5) for _ in 'ab']
        if crops[0][4] in seen_flip or crops[0][2] == 224:
            continue
        seen_flip.add(crops[0][4])
        v = make_views(source, np.random.default_rng(seed), 224)
        for view, (top, left, h, w, flip) in zip('ab', crops):  # drawn in this order
            ref = Image.fromarray(np.ascontiguousarray(pre[top : top + h, left : left + w]))
            ref = ref.resize((224, 224), Image.BILINEAR)
            if flip:
                ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
            diff = np.abs(v[f'img_{view}'].astype(int) - np.asarray(ref).astype(int))
            assert diff.max() <= 1 and diff.mean() < 0.3  # fixed-point rounding only
            assert np.array_equal(v[f'loc_{view}'], location_grid(top, left, h, w, flip, 7))
    assert seen_flip == {True, False}
    # an unflipped full-image crop A is exactly the pre-resized image
    full = V.apply_crop(pre, V.Crop(0, 0, 224, 224, False), 224)
    assert np.array_equal(full, pre)


def test_bilinear_matches_pil_upsampling():
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    for _ in range(5):
        top, left, h, w = V.sample_crop_box(rng, 224, 224)
        ours = V.resized_crop(img, top, left, h, w, 224).astype(int)
        crop = Image.fromarray(np.ascontiguousarray(img[top : top + h, left : left + w]))
        ref = np.asarray(crop.resize((224, 224), Image.BILINEAR)).astype(int)
        assert np.abs(ours - ref).max() <= 1


# --------------------------------------------------------------------------- pipeline
def test_shuffle_is_new_every_epoch():
    ds = P.index_dataset(50, seed=7)
    epochs = [[ds[e * 50 + i] for i in range(50)] for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(50))
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(50))
    assert [ds[i] for i in range(50)] == epochs[0]  # deterministic


@needs_data
def test_bad_files_are_skipped_and_counted(tmp_path, aid_files, iters):
    for i, f in enumerate(aid_files[::120]):  # 10 good images
        shutil.copy(f, tmp_path / f'good_{i:02d}_{Path(f).name}')
    data = Path(aid_files[0]).read_bytes()
    (tmp_path / 'good_03_x_truncated.jpg').write_bytes(data[: len(data) // 3])
    (tmp_path / 'good_07_x_text.jpg').write_text('not a jpeg at all\n')
    files = list_images(tmp_path)
    assert len(files) == 12
    bad = {
        files.index(str(tmp_path / name))
        for name in ('good_03_x_truncated.jpg', 'good_07_x_text.jpg')
    }
    ds = build_dataset(files, image_size=64, global_batch_size=12, seed=0)
    it = iters(ds, num_workers=0)
    for _ in range(2):  # each batch is exactly one epoch: both bad files read first at least once
        batch = next(it)
        skipped = batch['bad_images']
        assert skipped.dtype == np.int32 and skipped.shape == (12, P.MAX_DECODE_TRIES)
        assert set(skipped[skipped > 0] - 1) == bad  # 1 + the index of each file replaced
        assert batch['img_a'].shape == (12, 64, 64, 3)

    only_bad = [str(tmp_path / 'good_03_x_truncated.jpg'), str(tmp_path / 'good_07_x_text.jpg')]
    with pytest.raises(errors.DataError, match='64 random tries .*x_truncated.jpg'):
        P.DecodeProcessSlice(only_bad, image_size=64, seed=0).decode(0, np.random.default_rng(0))


@pytest.fixture
def iters():
    """make_iterator that closes every iterator at the end of the test (no leaked
    prefetch threads / worker processes)."""
    made = []

    def make(ds, **kw):
        it = make_iterator(ds, **kw)
        made.append(it)
        return it

    yield make
    for it in made:
        it.close()


@pytest.fixture(scope='module')
def demo_ds():
    files = list_images(demo_data_path())
    return build_dataset(files, image_size=64, global_batch_size=4, seed=1)


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_iterator_resumes_bit_identically(demo_ds, tmp_path, iters):
    import grain
    import orbax.checkpoint as ocp

    it = iters(demo_ds, num_workers=0)
    first = [next(it) for _ in range(4)]  # crosses the 12-file epoch boundary
    state = it.get_state()
    ckptr = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
    ckptr.save(tmp_path / 'data', args=grain.checkpoint.CheckpointSave(it))
    ref = [next(it) for _ in range(3)]

    it2 = iters(demo_ds, num_workers=0)
    it2.set_state(state)
    assert all(_equal(a, b) for a, b in zip(ref, [next(it2) for _ in range(3)]))

    it3 = iters(demo_ds, num_workers=0)
    ckptr.restore(tmp_path / 'data', args=grain.checkpoint.CheckpointRestore(it3))
    assert all(_equal(a, b) for a, b in zip(ref, [next(it3) for _ in range(3)]))
    # new epochs bring new crops
    assert not _equal(first[0], ref[0])
    b = ref[0]
    assert b['img_a'].shape == (4, 64, 64, 3) and b['img_a'].dtype == np.uint8
    assert b['loc_b'].shape == (4, 2, 2, 2) and b['loc_b'].dtype == np.float32
    assert b['bad_images'].shape == (4, P.MAX_DECODE_TRIES) and b['bad_images'].dtype == np.int32


@needs_data
def test_processes_split_each_global_batch(aid_files, monkeypatch):
    """Two processes decode disjoint halves of each global batch; together they give
    exactly the single-process batch (same files, same augmentations)."""
    files = aid_files[::30]  # 40 files
    seen: dict[int, list[str]] = {0: [], 1: [], 2: []}
    real_load = P.load_image
    batches = {}
    for key, (index, count) in enumerate([(0, 2), (1, 2), (0, 1)]):

        def spy(path, _key=key):
            if path in files:  # other tests' prefetch threads may still be loading
                seen[_key].append(path)
            return real_load(path)

        monkeypatch.setattr(P, 'load_image', spy)
        ds = build_dataset(
            files,
            image_size=64,
            global_batch_size=20,
            seed=0,
            process_index=index,
            process_count=count,
        )
        batches[key] = [ds[0], ds[1]]  # read in this thread
    assert len(seen[0]) == len(set(seen[0])) == 20  # 10 per batch, two batches of one epoch
    assert len(seen[1]) == len(set(seen[1])) == 20
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(seen[2]) == set(files)
    for i in range(2):
        for k in batches[2][i]:
            joined = np.concatenate([batches[0][i][k], batches[1][i][k]])
            assert np.array_equal(joined, batches[2][i][k]), k


def test_worker_process_matches_in_process(demo_ds, iters):
    it0 = iters(demo_ds, num_workers=0)
    ref = [next(it0) for _ in range(3)]
    it1 = iters(demo_ds, num_workers=1)  # spawned worker process
    got = [next(it1) for _ in range(2)]
    state = it1.get_state()
    assert all(_equal(a, b) for a, b in zip(ref, got))
    it2 = iters(demo_ds, num_workers=1)
    it2.set_state(state)
    assert _equal(next(it2), ref[2])


def test_worker_batches_on_a_jax_device_leave_no_shared_memory_behind():
    """grain's workers hand batches over in shared memory. JAX on CPU wraps host arrays without
    copying and frees them through the cycle collector only, so the last batch used to outlive the
    process: 'leaked shared_memory objects' at the end of every run with data.num_workers > 0."""
    from conftest import run_tool

    code = (
        'from absl import flags\n'
        'from cmid_jax import parallel\n'
        'from cmid_jax.data import build_dataset, demo_data_path, list_images, make_iterator\n'
        'flags.FLAGS.mark_as_parsed()\n'
        '_, sharding = parallel.shardings(parallel.make_mesh())\n'
        'ds = build_dataset(list_images(demo_data_path()), image_size=64, global_batch_size=8,\n'
        '                   seed=0)\n'
        'it = make_iterator(ds, num_workers=1)\n'
        'for _ in range(3):\n'
        '    batch = next(it)\n'
        "    batch.pop('bad_images')\n"
        '    batch = parallel.global_batch(batch, sharding)\n'
        'it.close()\n'
        "print('read', batch['img_a'].shape)\n"
    )
    proc = run_tool('', python_code=code, timeout=300)
    assert proc.returncode == 0 and 'read (8, 64, 64, 3)' in proc.stdout, proc.stderr[-3000:]
    assert 'leaked shared_memory' not in proc.stderr, proc.stderr[-3000:]
