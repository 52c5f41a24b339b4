"""Dense probes: metrics against hand-computed values, tiled inference against brute force, the
seeded split by image / group, bad inputs named in one line, and end-to-end segmentation and
change detection on crops of the real Dubai and LEVIR-CD files in ../shared/data."""

import hashlib
import json
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cmid_jax import train
from cmid_jax.data.files import load_image
from cmid_jax.evaluation import dense, dense_data, dense_head, dense_metrics, tiling
from cmid_jax.evaluation import run as evaluate
from cmid_jax.evaluation.features import RGB8
from cmid_jax.models.cmid import backbone_variables
from cmid_jax.restore import restore_train_state
from configs import vitb

from conftest import SHARED_DATA, run_tool

DUBAI = SHARED_DATA / 'dubai-seg'
LEVIR = SHARED_DATA / 'levir-cd-samples'
DUBAI_TILES = ('tile1_001', 'tile1_004', 'tile2_001', 'tile2_004', 'tile3_001', 'tile3_004')
LEVIR_PAIRS = (
    'test_2_0000_0000',
    'test_2_0000_0512',
    'test_7_0256_0512',
    'train_36_0512_0512',
    'test_102_0512_0000',
)
AREA = r'^(tile\d+)_'
LEVIR_IMAGE = r'^(.*)_\d+_\d+$'  # LEVIR-CD crops are named <image>_<top>_<left>.

needs_data = pytest.mark.skipif(
    not (DUBAI.is_dir() and LEVIR.is_dir()), reason=f'shared data not found at {SHARED_DATA}'
)


# --- metrics ------------------------------------------------------------------------------------


def test_segmentation_metrics_by_hand():
    # 3 classes, 255 ignored. Pixels (true, predicted):
    labels = np.array([[0, 0, 1, 1], [2, 2, 255, 0]])
    preds = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    confusion = dense_metrics.confusion_matrix(labels, preds, 3, ignore_index=255)
    np.testing.assert_array_equal(confusion, [[2, 1, 0], [0, 2, 0], [1, 0, 1]])
    m = dense_metrics.segmentation_metrics(confusion)
    # IoU: class 0: 2 / (3 + 3 - 2) = 1/2; class 1: 2 / (2 + 3 - 2) = 2/3; class 2: 1 / 2.
    assert m['iou'] == pytest.approx([1 / 2, 2 / 3, 1 / 2])
    assert m['miou'] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert m['pixel_accuracy'] == pytest.approx(5 / 7)
    # A class absent from labels and predictions has no IoU and stays out of the mean.
    m4 = dense_metrics.segmentation_metrics(dense_metrics.confusion_matrix(labels, preds, 4, 255))
    assert m4['iou'][3] is None and m4['miou'] == pytest.approx(m['miou'])


def test_segmentation_metrics_match_a_set_based_reference():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (3, 40, 50))
    labels[rng.random(labels.shape) < 0.1] = 255
    preds = np.where(rng.random(labels.shape) < 0.6, labels % 5, rng.integers(0, 5, labels.shape))
    m = dense_metrics.segmentation_metrics(dense_metrics.confusion_matrix(labels, preds, 5, 255))
    valid = labels != 255
    for c in range(5):
        t, p = (labels == c) & valid, (preds == c) & valid
        assert m['iou'][c] == pytest.approx(np.sum(t & p) / np.sum(t | p))
    assert m['pixel_accuracy'] == pytest.approx(np.mean(labels[valid] == preds[valid]))


def test_change_metrics_by_hand():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    preds = np.array([1, 1, 1, 0, 1, 1, 0, 0, 0, 0])  # TP 3, FN 1, FP 2, TN 4
    m = dense_metrics.change_metrics(dense_metrics.confusion_matrix(labels, preds, 2))
    assert m['precision'] == pytest.approx(3 / 5) and m['recall'] == pytest.approx(3 / 4)
    assert m['f1'] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))  # = 2PR / (P + R) = 2/3
    assert m['f1'] == pytest.approx(2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4))
    assert m['iou'] == pytest.approx(3 / 6)
    none = dense_metrics.change_metrics(dense_metrics.confusion_matrix(labels, 0 * preds, 2))
    assert none == {'f1': 0.0, 'iou': 0.0, 'precision': 0.0, 'recall': 0.0}


# --- heads --------------------------------------------------------------------------------------


def test_balanced_weights_by_hand():
    targets = np.array([0] * 90 + [1] * 10 + [255] * 7, np.uint8)
    np.testing.assert_allclose(dense_head.balanced_weights(targets, 2), [100 / 180, 100 / 20])


@pytest.mark.parametrize('name', ['linear', pytest.param('fpn', marks=pytest.mark.slow)])
def test_heads_learn_a_rule_they_can_express(name):
    """Targets from a fixed linear map of the features, bilinearly upsampled like the head's
    logits: the recipe fits them on the train windows and generalises to new ones."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 4, 4, 8)).astype(np.float32) * 3 + 1
    w = rng.normal(size=(8, 3))
    logits = jax.image.resize(jnp.asarray(x @ w), (96, 16, 16, 3), 'bilinear')
    y = np.asarray(jnp.argmax(logits, -1)).astype(np.uint8)
    y[:, :2] = dense_head.IGNORE  # Ignored rows: any answer goes.
    stats = dense_head.channel_stats(x[:64])
    head = dense_head.build_head(name, 3)
    params, losses = dense_head.train_head(head, x[:64], y[:64], stats, steps=300)
    assert losses[-20:].mean() < 0.5 * losses[:20].mean()
    pred = np.argmax(dense_head.head_logits(head, params, stats, jnp.asarray(x[64:]), 16), -1)
    valid = y[64:] != dense_head.IGNORE
    accuracy = np.mean(pred[valid] == y[64:][valid])
    assert accuracy > 0.85


# --- tiled inference ----------------------------------------------------------------------------


def test_window_starts_cover_the_axis():
    assert tiling.window_starts(10, 4, 3) == [0, 3, 6]
    assert tiling.window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert tiling.window_starts(4, 4, 3) == [0]
    with pytest.raises(ValueError):
        tiling.window_starts(3, 4, 3)
    for shape in ((10, 11), (3, 11), (4, 4)):  # Smaller than a window: mirrored up to one.
        batch, offsets = tiling.windows(np.zeros(shape + (2,)), 4, 3)
        assert tiling.num_windows(shape, 4, 3) == len(offsets) == len(batch)
    assert tiling.num_windows((10, 11), 4, 3) == 3 * 4


def coverage_mean(shape, size, stride, window_value):
    """Brute force: every pixel's mean over all windows (every `stride`, plus one flush with the
    border) containing it of `window_value(top, left)[pixel - offset]`."""
    h, w = shape
    tops = sorted({min(t, h - size) for t in range(0, h, stride)})
    lefts = sorted({min(x, w - size) for x in range(0, w, stride)})
    total, count = np.zeros((h, w, 2)), np.zeros((h, w, 1))
    for t in tops:
        for x in lefts:
            total[t : t + size, x : x + size] += window_value(t, x)
            count[t : t + size, x : x + size] += 1
    return total / count


@pytest.mark.parametrize('batch_size', [1, 3, 64])
def test_tiled_predict_stitches_windows(batch_size):
    rng = np.random.default_rng(batch_size)
    size, stride = 8, 6
    shapes = [(8, 8), (13, 21), (5, 11), (16, 9)]  # One window, several, smaller than a window.
    images = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in shapes]

    # A pixel-wise function comes back unchanged, whatever the windows and their overlap.
    def pixelwise(batch):
        return np.sqrt(batch.astype(np.float32))

    out = list(tiling.tiled_predict(pixelwise, images, size, stride, batch_size))
    for image, o in zip(images, out):
        np.testing.assert_allclose(o, np.sqrt(image.astype(np.float32)), rtol=1e-6)

    # An image of one window gives exactly that window's output.
    def nonlocal_fn(batch):
        return batch.astype(np.float32).mean(axis=(1, 2, 3), keepdims=True) + 0 * batch[..., :2]

    one = next(tiling.tiled_predict(nonlocal_fn, images[:1], size, stride, batch_size))
    np.testing.assert_array_equal(one, nonlocal_fn(images[0][None])[0])

    # Position-dependent outputs: each pixel averages the windows covering it.
    def local_coords(batch):
        yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing='ij')
        return np.broadcast_to(np.stack([yy, xx], -1), batch.shape[:3] + (2,)).astype(np.float32)

    for image, o in zip(
        images[:2] + images[3:],
        tiling.tiled_predict(local_coords, images[:2] + images[3:], size, stride, batch_size),
    ):
        expected = coverage_mean(
            image.shape[:2],
            size,
            stride,
            lambda t, x: local_coords(np.zeros((1, size, size, 3)))[0],
        )
        np.testing.assert_allclose(o, expected, rtol=1e-6)


# --- split --------------------------------------------------------------------------------------


def test_split_is_seeded_stable_and_disjoint_by_group():
    names = [f'tile{a}_{p:03d}' for a in range(1, 9) for p in range(1, 10)]
    split = dense_data.split_names(names, 0.5, seed=0, split_group=AREA)
    assert split == dense_data.split_names(list(reversed(names)), 0.5, seed=0, split_group=AREA)
    assert not set(split.train) & set(split.test) and len(split.train) + len(split.test) == 72
    area = lambda n: n.split('_')[0]
    train_areas, test_areas = {area(n) for n in split.train}, {area(n) for n in split.test}
    assert not train_areas & test_areas and len(train_areas) == len(test_areas) == 4
    # The ranking is sha256(f'{seed}/{group}'), computed here independently.
    ranked = sorted(
        {area(n) for n in names}, key=lambda g: hashlib.sha256(f'0/{g}'.encode()).hexdigest()
    )
    assert train_areas == set(ranked[:4])
    assert sorted(train_areas) == ['tile3', 'tile5', 'tile6', 'tile8']  # Pinned across machines.
    assert dense_data.split_names(names, 0.5, seed=1, split_group=AREA) != split
    # Without a group pattern, every name is its own unit.
    by_name = dense_data.split_names(names, 0.25, seed=0)
    assert len(by_name.train) == 18 and not set(by_name.train) & set(by_name.test)
    with pytest.raises(ValueError, match=r"'other' does not match split_group"):
        dense_data.split_names(names + ['other'], 0.5, 0, AREA)
    with pytest.raises(ValueError, match='1 split group'):
        dense_data.split_names(names[:9], 0.5, 0, AREA)


# --- data sets and bad inputs -------------------------------------------------------------------


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def copy_dubai(root: Path, tiles=DUBAI_TILES, crop=(160, 224)) -> Path:
    """Top-left crops of real Dubai tiles (image and mask) with the real classes.json."""
    for name in tiles:
        image = load_image(str(DUBAI / 'images' / f'{name}.jpg'))
        mask = np.asarray(Image.open(DUBAI / 'masks' / f'{name}.png'))
        save(root / 'images' / f'{name}.png', image[: crop[0], : crop[1]])
        save(root / 'masks' / f'{name}.png', mask[: crop[0], : crop[1]])
    (root / 'classes.json').write_text((DUBAI / 'classes.json').read_text())
    return root


def copy_levir(root: Path, pairs=LEVIR_PAIRS) -> Path:
    for name in pairs:
        for folder in ('A', 'B', 'label'):
            (root / folder).mkdir(parents=True, exist_ok=True)
            source = LEVIR / folder / f'{name}.png'
            (root / folder / f'{name}.png').write_bytes(source.read_bytes())
    return root


def synthetic_segmentation(root: Path, classes=None) -> Path:
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(30, 40), (50, 20)]):
        save(root / 'images' / f'im{i}.png', rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        save(root / 'masks' / f'im{i}.png', rng.integers(0, 3, (h, w), dtype=np.uint8))
    if classes is not None:
        (root / 'classes.json').write_text(json.dumps(classes))
    return root


def read(root: Path, change=False):
    task = dense.CHANGE if change else dense.SEGMENTATION
    return dense.read_dense_set(task.list_dataset(str(root)), RGB8, task)


def test_bad_segmentation_inputs_are_named(tmp_path):
    root = synthetic_segmentation(tmp_path / 'seg', {'classes': ['a', 'b', 'c']})
    data, classes = read(root)
    assert classes == ('a', 'b', 'c') and [m.shape for m in data.labels] == [(30, 40), (50, 20)]
    # Without classes.json the classes are 0..max value.
    (root / 'classes.json').unlink()
    assert read(root)[1] == ('0', '1', '2')

    save(root / 'masks' / 'im1.png', np.zeros((50, 21), np.uint8))
    with pytest.raises(ValueError, match=r"masks/im1\.png' is 21x50 px but its image is 20x50"):
        read(root)
    save(root / 'masks' / 'im1.png', np.full((50, 20), 7, np.uint8))
    (root / 'classes.json').write_text(json.dumps({'classes': ['a', 'b', 'c', 'd']}))
    with pytest.raises(
        ValueError,
        match=r"masks/im1\.png' has values \[7\] outside the 4 classes"
        r' \(0-3\) and the ignore value 255',
    ):
        read(root)
    save(root / 'masks' / 'im1.png', np.zeros((50, 20, 3), np.uint8))
    with pytest.raises(ValueError, match=r"masks/im1\.png' is a RGB image; expected a single"):
        read(root)
    (root / 'masks' / 'im1.png').unlink()
    with pytest.raises(ValueError, match=r"images/im1\.png' has no matching masks/im1\.\*"):
        read(root)
    save(root / 'masks' / 'im1.png', np.zeros((50, 20), np.uint8))
    (root / 'classes.json').write_text('{"names": []}')
    with pytest.raises(ValueError, match=r'classes\.json.*expected \{"classes"'):
        read(root)


def test_bad_change_inputs_are_named(tmp_path):
    rng = np.random.default_rng(0)
    for folder in ('A', 'B'):
        save(tmp_path / folder / 'x.png', rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    save(tmp_path / 'label' / 'x.png', (rng.random((20, 30)) < 0.3).astype(np.uint8) * 255)
    data, classes = read(tmp_path, change=True)
    assert classes == ('unchanged', 'changed') and data.images[0].shape == (20, 30, 6)
    assert set(np.unique(data.labels[0])) == {0, 1}

    save(tmp_path / 'A' / 'y.png', rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"A/y\.png' has no matching B/y\.\*"):
        read(tmp_path, change=True)
    save(tmp_path / 'B' / 'y.png', rng.integers(0, 256, (20, 31, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"A/y\.png' has no matching label/y\.\*"):
        read(tmp_path, change=True)
    save(tmp_path / 'label' / 'y.png', np.zeros((20, 30), np.uint8))
    with pytest.raises(ValueError, match=r"B/y\.png' is 31x20 px.*A/y\.png' is 30x20 px"):
        read(tmp_path, change=True)
    save(tmp_path / 'B' / 'y.png', rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    save(tmp_path / 'label' / 'y.png', np.ones((20, 30), np.uint8))
    with pytest.raises(
        ValueError,
        match=r"label/y\.png' has values \[1\]; a change label holds "
        r'only 0',
    ):
        read(tmp_path, change=True)
    (tmp_path / 'A' / 'y.png').unlink()
    with pytest.raises(ValueError, match=r"B/y\.png' has no matching A/y\.\*"):
        read(tmp_path, change=True)


# --- end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """A ViT-mu/16 at 64 px, initial weights (total_steps=0) of a run on Dubai image crops."""
    if not DUBAI.is_dir():
        pytest.skip(f'shared data not found at {DUBAI}')
    pretrain = tmp_path_factory.mktemp('pretrain')
    copy_dubai(pretrain)
    config = vitb.get_config('smoke')
    config.data.path = str(pretrain / 'images')
    config.total_steps = 0
    workdir = str(tmp_path_factory.mktemp('run'))
    train.train_and_evaluate(config, workdir)
    return workdir


@needs_data
@pytest.mark.slow
def test_segmentation_end_to_end(workdir, tmp_path):
    data = copy_dubai(tmp_path / 'dubai')
    r = evaluate.evaluate(workdir, str(data), 'segmentation', split_group=AREA)
    assert (r['protocol'], r['head'], r['step'], r['window']) == ('segmentation', 'linear', 0, 64)
    assert r['num_train'] + r['num_test'] == 6 and r['num_train'] in (2, 4)  # Whole areas.
    assert r['class_names'][0] == 'building' and len(r['per_class_iou']) == 6
    assert 0.0 <= r['miou'] <= 1.0 and 0.0 <= r['pixel_accuracy'] <= 1.0
    assert r['feature_stride'] == 16 and r['features'] == 'last stage'
    assert json.loads(Path(workdir, 'eval.jsonl').read_text().splitlines()[-1]) == r
    picture = Image.open(Path(workdir, 'images', 'segmentation_0.png'))
    assert picture.size[1] == 3 * 160 + 2 * 2 + 20  # image, label, prediction + legend.

    # The probe learns from the features: on its own train images it beats always predicting
    # their majority class. Halving the images still scores every labelled full-size pixel.
    config, state, _ = restore_train_state(workdir)
    variables = backbone_variables(state)
    labelled, _ = read(data)
    train = labelled.subset(dense_data.split_names(labelled.names, 0.5, 0, AREA).train)
    for scale in (1.0, 0.5):
        settings = dense.ProbeSettings(head='linear', seed=0, batch_size=64, scale=scale)
        probe = dense.train_probe(
            config, variables, train, task=dense.SEGMENTATION, num_classes=6, settings=settings
        )
        if scale == 1.0:  # The jitted backbone + head on an image of exactly one window.
            predict = dense.make_predict(config, variables, probe)
            windows = np.stack([im[:64, 32 * i : 32 * i + 64] for i, im in enumerate(train.images)])
            tiled = next(tiling.tiled_predict(predict, windows[1:2], 64, 48, 64))
            np.testing.assert_allclose(tiled, predict(windows)[1], rtol=1e-5, atol=1e-5)
        confusion, _ = dense.evaluate_probe(
            config, variables, probe, train, ignore_index=255, settings=settings
        )
        labels = np.concatenate([m.ravel() for m in train.labels])
        assert confusion.sum() == np.sum(labels != 255)
        majority = np.bincount(labels[labels != 255]).max() / np.sum(labels != 255)
        accuracy = np.trace(confusion) / confusion.sum()
        print(f'scale {scale}: train pixel accuracy {accuracy:.3f}, majority {majority:.3f}')
        assert accuracy > majority


@needs_data
@pytest.mark.slow
def test_change_end_to_end_and_a_bad_file_in_the_cli(workdir, tmp_path):
    data = copy_levir(tmp_path / 'levir')
    r = evaluate.evaluate(workdir, str(data), 'change', head='fpn', split_group=LEVIR_IMAGE)
    assert (r['protocol'], r['head'], r['class_names']) == (
        'change',
        'fpn',
        ['unchanged', 'changed'],
    )
    # The two crops of LEVIR image test_2 fall on one side.
    assert r['num_train'] + r['num_test'] == 5
    for key in ('f1', 'iou', 'precision', 'recall'):
        assert 0.0 <= r[key] <= 1.0
    assert Image.open(Path(workdir, 'images', 'change_0.png')).size[1] == 4 * 256 + 3 * 2 + 20

    # The CLI: a bad file ends it with one line naming the file, no traceback (the listing is
    # checked before the checkpoint is read; the success path is the same `evaluate` as above).
    (data / 'label' / f'{LEVIR_PAIRS[1]}.png').unlink()
    proc = run_tool(
        'tools.evaluate',
        f'--workdir={workdir}',
        f'--data={data}',
        '--protocol=change',
        '--head=fpn',
        f'--split_group={LEVIR_IMAGE}',
    )
    assert proc.returncode == 2  # cmid_jax.errors: an expected error, one line and a hint.
    assert 'Traceback' not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith('Error: ')]
    assert re.fullmatch(
        rf"Error: '.*A/{LEVIR_PAIRS[1]}\.png' has no matching label/{LEVIR_PAIRS[1]}\.\*", line
    )


@needs_data
@pytest.mark.slow
def test_online_dense_probe_scores_what_the_offline_protocol_scores(tmp_path):
    """eval.dense_path: a dense_miou_student point at step 0 and at each evaluation, equal to
    `cmid-evaluate --protocol=segmentation` on the checkpoint of that step with the run's seed."""
    data = copy_dubai(tmp_path / 'dubai')
    config = vitb.get_config('smoke')
    config.data.path = str(data / 'images')
    config.total_steps, config.checkpoint_every_steps = 2, 2
    config.eval.every_steps, config.seed = 2, 3
    config.eval.dense_path, config.eval.dense_split_group = str(data), AREA
    workdir = tmp_path / 'run'
    train.train_and_evaluate(config, str(workdir))
    rows = [json.loads(x) for x in (workdir / 'metrics.jsonl').read_text().splitlines()]
    online = {r['step']: r['dense_miou_student'] for r in rows if 'dense_miou_student' in r}
    assert sorted(online) == [0, 2]
    offline = evaluate.evaluate(str(workdir), str(data), 'segmentation', seed=3, split_group=AREA)
    assert offline['step'] == 2
    assert online[2] == pytest.approx(offline['miou'], abs=1e-6)
    assert online[0] != pytest.approx(online[2], abs=1e-9)  # The weights changed in between.
    assert (workdir / 'images' / 'dense.png').is_file()
    assert (workdir / 'images' / 'dense_00000002.png').is_file()


def test_online_dense_probe_compiles_once_and_scores_new_weights(tmp_path, caplog):
    """The online probe keeps its jitted functions between evaluations: the second evaluation
    compiles nothing, and still scores the weights it is given (not the first ones)."""
    from cmid_jax import optim
    from cmid_jax.config_resolve import resolve
    from cmid_jax.evaluation.online_dense import make_online_dense
    from cmid_jax.step import TrainStep

    data = copy_dubai(tmp_path / 'dubai')
    config = vitb.get_config('smoke')
    config.eval.dense_path, config.eval.dense_split_group = str(data), AREA
    config = resolve(config)
    trainer = TrainStep.create(config, optim.Schedule(10, 4))
    evaluate_dense = make_online_dense(config)
    state_a = jax.jit(trainer.init_state)(jax.random.key(0))
    state_b = jax.jit(trainer.init_state)(jax.random.key(1))
    first = evaluate_dense(state_a)
    with jax.log_compiles(True), caplog.at_level('WARNING'):
        again, other = evaluate_dense(state_a), evaluate_dense(state_b)
    compiles = [r.getMessage()[:80] for r in caplog.records if 'Compiling' in r.getMessage()]
    assert compiles == []
    assert again == first and other != first


def test_dense_images_follow_the_model_bands(tmp_path):
    """A 4-band uint8 GeoTIFF segmentation set read with the workdir's band order, and an image
    without those bands named."""
    rasterio = pytest.importorskip('rasterio')
    rgbn = SHARED_DATA / 'geotiff' / 'rgbn_4band.tif'
    if not rgbn.is_file():
        pytest.skip(f'shared data not found at {rgbn}')
    with rasterio.open(rgbn) as ds:
        scene = np.moveaxis(ds.read(), 0, -1)  # (H, W, 4), read independently of cmid_jax.
    (tmp_path / 'images').mkdir()
    for i in range(2):
        window = scene[100 * i : 100 * i + 70, :90]
        with warnings.catch_warnings():  # A plain, non-georeferenced TIFF is what we want.
            warnings.simplefilter('ignore', rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(
                tmp_path / 'images' / f'w{i}.tif',
                'w',
                driver='GTiff',
                height=70,
                width=90,
                count=4,
                dtype='uint8',
            ) as ds:
                ds.write(np.moveaxis(window, -1, 0))
        save(tmp_path / 'masks' / f'w{i}.png', (window[..., 3] > 100).astype(np.uint8))
    bands = {'bands': (3, 0, 1, 2), 'dtype': 'uint8'}
    data, classes = dense.read_dense_set(
        dense_data.list_segmentation(str(tmp_path)), bands, dense.SEGMENTATION
    )
    assert classes == ('0', '1')
    np.testing.assert_array_equal(data.images[1], scene[100:170, :90][..., [3, 0, 1, 2]])
    (tmp_path / 'images' / 'w1.tif').unlink()
    save(tmp_path / 'images' / 'w1.png', scene[100:170, :90, :3])  # RGB: no fourth band.
    with pytest.raises(ValueError, match=r'w1\.png.*expect data\.bands=\(3, 0, 1, 2\)'):
        dense.read_dense_set(dense_data.list_segmentation(str(tmp_path)), bands, dense.SEGMENTATION)
