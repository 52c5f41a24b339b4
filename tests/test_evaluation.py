"""Evaluation: kNN and linear probe against references, the seeded split, pictures, and an
end-to-end run (pretrain briefly on five AID classes, then kNN / linear / fine-tune)."""

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from cmid_jax import parallel, train, visualize
from cmid_jax.config_resolve import resolve
from cmid_jax.data.files import list_images, load_image
from cmid_jax.data.views import make_views
from cmid_jax.evaluation import (
    knn_scores,
    knn_top1,
    linear_probe_top1,
    load_split,
    make_online_knn,
    make_reconstruction_fn,
    split_per_class,
)
from cmid_jax.evaluation import run as evaluate
from cmid_jax.restore import restore_train_state
from cmid_jax.workdir import Workdir
from configs import vitb

from conftest import run_tool

AID = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'aid'
AID_CLASSES = ('Airport', 'Beach', 'Desert', 'Farmland', 'Forest')


# --- kNN ----------------------------------------------------------------------------------------


def knn_reference(train, train_y, test, num_classes, k, temperature):
    """Brute force, one query at a time, float64: cosine, top k, exp(sim / T) weighted votes."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    scores = np.zeros((len(test), num_classes))
    for i, q in enumerate(test):
        sims = train @ (q / np.linalg.norm(q))
        for j in np.argsort(-sims)[:k]:
            scores[i, train_y[j]] += math.exp(sims[j] / temperature)
    return scores


@pytest.mark.parametrize('k,temperature,chunk', [(20, 0.07, 1024), (5, 0.5, 10), (500, 0.1, 7)])
def test_knn_matches_bruteforce_reference(k, temperature, chunk):
    rng = np.random.default_rng(k)
    train, test = rng.normal(size=(57, 16)), rng.normal(size=(33, 16))
    train_y, test_y = rng.integers(0, 4, 57), rng.integers(0, 4, 33)
    expected = knn_reference(train, train_y, test, 4, min(k, 57), temperature)
    got = knn_scores(train, train_y, test, 4, k=k, temperature=temperature, chunk=chunk)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    np.testing.assert_array_equal(np.argmax(got, 1), np.argmax(expected, 1))
    assert knn_top1(train, train_y, test, test_y, 4, k=k, temperature=temperature) == pytest.approx(
        np.mean(np.argmax(expected, 1) == test_y)
    )


# --- split --------------------------------------------------------------------------------------


def make_class_folders(root: Path, counts: dict) -> Path:
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f'{name.lower()}_{i}.jpg').touch()  # The split never decodes.
    return root


def test_split_is_per_class_seeded_and_stable(tmp_path):
    counts = {'Beach': 10, 'Airport': 7, 'Desert': 4, 'Forest': 2}
    root = make_class_folders(tmp_path / 'one', counts)
    a, b = load_split(root, 0.5, seed=0), load_split(root, 0.5, seed=0)
    assert a == b
    assert a.class_names == ('Airport', 'Beach', 'Desert', 'Forest')
    for label, name in enumerate(a.class_names):
        n_train, n_test = a.train_labels.count(label), a.test_labels.count(label)
        assert n_train >= 1 and n_test >= 1  # every class in both halves
        assert n_train == math.floor(0.5 * counts[name] + 0.5) and n_train + n_test == counts[name]
        train = {f for f, y in zip(a.train_files, a.train_labels) if y == label}
        test = {f for f, y in zip(a.test_files, a.test_labels) if y == label}
        assert not train & test and all(Path(f).parent.name == name for f in train | test)
    # The fraction is respected per class.
    c = load_split(root, 0.7, seed=0)
    assert [c.train_labels.count(i) for i in range(4)] == [5, 7, 3, 1]
    # Another seed gives another split; the same files elsewhere give the same one.
    assert load_split(root, 0.5, seed=1).train_files != a.train_files
    moved = load_split(shutil.copytree(root, tmp_path / 'elsewhere'), 0.5, seed=0)
    assert [Path(f).name for f in moved.train_files] == [Path(f).name for f in a.train_files]
    assert moved.digest() == a.digest()
    # Pinned: the split is a sha256 ranking, the same on every machine and numpy version.
    assert sorted(Path(f).name for f in a.train_files if 'airport' in f) == [
        'airport_1.jpg',
        'airport_4.jpg',
        'airport_5.jpg',
        'airport_6.jpg',
    ]
    with pytest.raises(ValueError):
        split_per_class({'a': ['x.jpg'], 'b': ['y.jpg', 'z.jpg']}, 0.5, 0)


# --- linear probe -------------------------------------------------------------------------------


def clusters(seed, n=200, d=64, num_classes=5, spread=3.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes, d)) * spread
    y = rng.integers(0, num_classes, n)
    return centers[y] + rng.normal(size=(n, d)), y


def test_linear_probe_separates_clusters_and_not_shuffled_labels():
    x, y = clusters(0)
    assert linear_probe_top1(x[:100], y[:100], x[100:], y[100:], 5) >= 0.99
    # A probe that leaked test labels or memorised anything would not be at chance here.
    shuffled = np.random.default_rng(1).permutation(y)
    assert linear_probe_top1(x[:100], shuffled[:100], x[100:], shuffled[100:], 5) < 0.4


def test_linear_probe_beats_knn_on_a_linear_but_not_local_rule():
    # Labels from a single direction in 32-d noise: linear, but neighbours are mostly noise.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 32))
    y = (x[:, 0] > 0).astype(int)
    linear = linear_probe_top1(x[:200], y[:200], x[200:], y[200:], 2)
    knn = knn_top1(x[:200], y[:200], x[200:], y[200:], 2)
    assert linear > 0.9 and linear > knn + 0.15


# --- pictures -----------------------------------------------------------------------------------


def test_reconstruction_grid_takes_masked_cells_from_the_prediction():
    rng = np.random.default_rng(0)
    n, size, mean, std = 3, 64, (0.3, 0.4, 0.5), (0.2, 0.2, 0.2)
    views = {
        'img_a': rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        'mask_a': rng.random((n, 2, 2)) < 0.5,
    }
    rec = rng.normal(size=(n, size, size, 3)).astype(np.float32) * 0.5
    grid = visualize.reconstruction_grid(views, rec, mean, std, gap=2)
    margin = grid.shape[1] - (n * size + (n - 1) * 2)  # The row names on the left.
    assert grid.shape[0] == 4 * size + 3 * 2 and 40 < margin < 120 and grid.dtype == np.uint8
    for r in range(4):  # Each row's name: dark text on white, inside its own row.
        label = grid[r * 66 : r * 66 + size, :margin]
        assert np.any(label < 100) and np.all(label[:8] == 255) and np.all(label[-8:] == 255)
    cell = lambda r, c: grid[r * 66 : r * 66 + size, margin + c * 66 : margin + c * 66 + size]
    pred = np.clip(np.rint((rec * np.array(std) + np.array(mean)) * 255), 0, 255)
    for c in range(n):
        m = np.kron(views['mask_a'][c], np.ones((32, 32), bool))
        np.testing.assert_array_equal(cell(0, c), views['img_a'][c])
        np.testing.assert_array_equal(cell(3, c), views['img_a'][c])
        # Masked: the prediction (float32 vs float64 rounding may differ by one level).
        np.testing.assert_allclose(cell(2, c)[m], pred[c][m], atol=1)
        assert np.mean(cell(2, c)[m] != views['img_a'][c][m]) > 0.9
        np.testing.assert_array_equal(cell(2, c)[~m], views['img_a'][c][~m])  # visible: input
        np.testing.assert_array_equal(cell(1, c)[~m], views['img_a'][c][~m])
        if m.any():
            channel_mean = np.rint(views['img_a'][c].reshape(-1, 3).mean(0))
            np.testing.assert_array_equal(
                cell(1, c)[m], np.broadcast_to(channel_mean, (m.sum(), 3))
            )
    two = visualize.reconstruction_grid(views, rec, mean, std, max_images=2)
    assert two.shape[1] == margin + 2 * size + 2


def test_plot_knn_curve_reads_metrics_and_eval_files(tmp_path):
    metrics = tmp_path / 'metrics.jsonl'
    metrics.write_text(
        ''.join(
            json.dumps(r) + '\n'
            for r in (
                {'step': 10, 'loss': 3.0},
                {'step': 20, 'knn_top1_student': 0.3, 'knn_top1_teacher': 0.4},
                {'step': 40, 'knn_top1_student': 0.5, 'knn_top1_teacher': 0.6},
            )
        )
    )
    series = visualize.plot_knn_curve(str(metrics), str(tmp_path / 'knn.png'))
    assert series == {
        'knn_top1_student': [(20, 0.3), (40, 0.5)],
        'knn_top1_teacher': [(20, 0.4), (40, 0.6)],
    }
    from PIL import Image

    assert Image.open(tmp_path / 'knn.png').size == (720, 420)
    evals = tmp_path / 'eval.jsonl'
    evals.write_text(json.dumps({'protocol': 'linear', 'which': 'teacher', 'step': 5, 'top1': 0.7}))
    assert visualize.plot_knn_curve(str(evals), str(tmp_path / 'e.png')) == {
        'linear_teacher': [(5, 0.7)]
    }


def test_plot_training_curves_one_panel_per_logged_scalar(tmp_path):
    metrics = tmp_path / 'metrics.jsonl'
    metrics.write_text(
        ''.join(
            json.dumps(r) + '\n'
            for r in (
                {'step': 1, 'loss': 9.0, 'loss_mim': 0.6, 'recon_psnr': 10.5},
                {'step': 10, 'loss': 11.0, 'loss_mim': 0.4, 'recon_psnr': float('nan')},
                {'step': 20, 'loss': 10.0, 'loss_mim': 0.3, 'recon_psnr': 13.0},
            )
        )
    )
    out = tmp_path / 'curves.png'
    series = visualize.plot_training_curves(
        str(metrics),
        str(out),
        columns=2,
        panel_size=(200, 150),
        references={'loss': {'ln(1 + queue)': 5.5}},
    )
    assert series == {
        'loss': [(1, 9.0), (10, 11.0), (20, 10.0)],
        'loss_mim': [(1, 0.6), (10, 0.4), (20, 0.3)],
        'recon_psnr': [(1, 10.5), (20, 13.0)],
    }  # NaN left out; no other scalars
    from PIL import Image

    assert Image.open(out).size == (400, 300)  # 3 panels on a 2 x 2 grid
    with pytest.raises(ValueError, match='none of'):
        visualize.plot_training_curves(str(metrics), str(out), names=('knn_top1_student',))


def _jsonl(path, records):
    with open(path, 'a', encoding='utf-8') as f:
        f.write(''.join(json.dumps(r) + '\n' for r in records))


def test_knn_curve_keeps_every_run_of_a_resumed_workdir(tmp_path):
    """A crashed run and its resumption append to one metrics.jsonl; the curve has every point,
    and a step evaluated by both runs takes the resumed run's value."""
    metrics = tmp_path / 'metrics.jsonl'
    _jsonl(
        metrics,
        [
            {'step': 0, 'knn_top1_student': 0.1},
            {'step': 10, 'loss': 9.0},
            {'step': 20, 'loss': 8.0, 'knn_top1_student': 0.2},
            {'step': 40, 'knn_top1_student': 0.35},
        ],
    )  # Run 1 dies after step 40.
    _jsonl(
        metrics,
        [
            {'step': 30, 'loss': 7.0},  # Run 2 resumes from the checkpoint of step 20.
            {'step': 40, 'knn_top1_student': 0.4},
            {'step': 60, 'knn_top1_student': 0.5},
        ],
    )
    series = visualize.plot_knn_curve(str(metrics), str(tmp_path / 'knn.png'))
    assert series == {'knn_top1_student': [(0, 0.1), (20, 0.2), (40, 0.4), (60, 0.5)]}
    assert visualize.read_scalar_series(str(metrics), ['loss']) == {
        'loss': [(10, 9.0), (20, 8.0), (30, 7.0)]
    }


def test_resumed_run_starts_its_knn_curve_at_the_restored_step(tmp_path, monkeypatch):
    """First kNN point: at step 0; on a resume at the restored step unless metrics.jsonl has it
    (before the fix a resume evaluated only at its next due step: one point after the demo)."""
    from cmid_jax import metrics as metrics_lib
    from cmid_jax.evaluation import periodic
    from cmid_jax.evaluation.protocols import knn

    calls = []

    def fake_knn(state):
        calls.append(state)
        return {'knn_top1_student': 0.25 + 0.01 * len(calls)}

    fake = dataclasses.replace(
        knn.ONLINE, build=lambda config, mesh: lambda state, _: fake_knn(state)
    )
    monkeypatch.setattr(knn, 'ONLINE', fake)
    config = vitb.get_config('smoke')
    config.eval.path = str(tmp_path)  # Only checked for being set; the kNN is faked.
    config.images_every_steps = 0

    def evals_in(path):
        wd = Workdir(str(path))
        writer = metrics_lib.MetricWriter(wd)
        return periodic.PeriodicEvals(config, None, wd, writer, 100), writer

    resumed = tmp_path / 'resumed'  # The first part of the run had no eval.path.
    resumed.mkdir()
    _jsonl(resumed / 'metrics.jsonl', [{'step': 10, 'loss': 9.0}, {'step': 60, 'loss': 8.0}])
    evals, writer = evals_in(resumed)
    evals.first_points(60, 'state at 60')
    evals.run_online('knn', 100, 'state at 100')
    writer.close()
    assert calls == ['state at 60', 'state at 100']
    assert visualize.read_accuracy_series(str(resumed / 'metrics.jsonl')) == {
        'knn_top1_student': [(60, 0.26), (100, 0.27)]
    }
    assert os.path.exists(resumed / 'images' / 'knn.png')

    evals, writer = evals_in(resumed)  # Resumed again at 60: that point is already there.
    assert evals.first_points(60, 'again') == {} and len(calls) == 2
    writer.close()
    fresh = tmp_path / 'fresh'
    fresh.mkdir()
    evals, writer = evals_in(fresh)
    evals.first_points(0, 'initial state')
    writer.close()
    assert calls[-1] == 'initial state'


# --- end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    """A ViT-mu pretrained for 40 steps on 5 AID classes x 40 images (about 20 s on 2 cores)."""
    if not AID.is_dir():
        pytest.skip(f'AID sample not found at {AID}')
    data = tmp_path_factory.mktemp('aid5')
    for name in AID_CLASSES:
        os.symlink(AID / name, data / name, target_is_directory=True)
    config = vitb.get_config('smoke')
    config.data.path = str(data)
    config.batch_size = 16
    config.total_steps = 40
    config.steps_per_epoch = 12
    config.log_every_steps = 20
    config.checkpoint_every_steps = 40
    workdir = str(tmp_path_factory.mktemp('run'))
    train.train_and_evaluate(config, workdir)
    return workdir, str(data)


@pytest.fixture(scope='module')
def offline(pretrained):
    """kNN and linear probe of both backbones through the `evaluate` API."""
    workdir, data = pretrained
    results = {
        f'{p}_{w}': evaluate.evaluate(workdir, data, p, which=w)
        for p in ('knn', 'linear')
        for w in ('student', 'teacher')
    }
    print({k: v['top1'] for k, v in results.items()})
    return results


@pytest.mark.slow
def test_evaluate_protocols_beat_chance(pretrained, offline):
    workdir, data = pretrained
    for name, r in offline.items():
        assert r['num_classes'] == 5 and r['num_train'] == 100 and r['num_test'] == 100, name
        assert r['step'] == 40
        assert r['top1'] > 0.4, (name, r['top1'])  # chance is 0.2
    # The CLI: one printed JSON line, the same result, appended to eval.jsonl.
    proc = run_tool(
        'tools.evaluate',
        f'--workdir={workdir}',
        f'--data={data}',
        '--protocol=knn',
        '--which=teacher',
        '--train_fraction=0.5',
        '--seed=0',
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out['top1'] == offline['knn_teacher']['top1']
    last = json.loads(Path(workdir, 'eval.jsonl').read_text().splitlines()[-1])
    assert last == out


@pytest.mark.slow
def test_finetune_runs_one_epoch(pretrained):
    workdir, data = pretrained
    r = evaluate.evaluate(workdir, data, 'finetune', epochs=1, batch_size=32, lr=1e-4)
    print('finetune', r['top1'])
    assert r['protocol'] == 'finetune' and r['epochs'] == 1 and 0.0 <= r['top1'] <= 1.0
    assert r['top1'] > 0.2


@pytest.mark.slow
def test_online_hooks_on_the_training_mesh(pretrained, offline):
    """make_online_knn and the reconstruction grid as train.py uses them: replicated state on an
    8-device mesh; the online kNN agrees with the offline one on the same split."""
    workdir, data = pretrained
    config, state, _ = restore_train_state(workdir)
    config = config.as_configdict()
    config.eval.path = data
    config = resolve(config)
    mesh = parallel.make_mesh()
    replicated, batch_sharding = parallel.shardings(mesh)
    state = jax.device_put(state, replicated)
    online = make_online_knn(config, mesh=mesh)(state)
    for which in ('student', 'teacher'):
        ref = offline[f'knn_{which}']['top1']
        assert abs(online[f'knn_top1_{which}'] - ref) <= 0.02, (which, online, ref)

    # A train batch in the pipeline's format, built directly from the views module.
    rng = np.random.default_rng(0)
    views = [make_views(load_image(f), rng, 64) for f in list_images(data)[::12][:16]]
    batch = {k: np.stack([v[k] for v in views]) for k in views[0]}
    out = jax.device_get(
        make_reconstruction_fn(config, out_sharding=replicated)(
            state, parallel.global_batch(batch, batch_sharding)
        )
    )
    grid = visualize.reconstruction_grid(
        out, out['reconstruction'], config.data.mean, config.data.std
    )
    assert grid.shape[0] == 4 * 64 + 6 and grid.shape[1] > 8 * 64 + 14  # + the row names
    np.testing.assert_array_equal(out['img_a'], batch['img_a'][:8])
    assert out['mask_a'].shape == (8, 2, 2) and np.all(out['mask_a'].sum(axis=(1, 2)) == 3)
    visualize.save_png(os.path.join(workdir, 'images', 'reconstruction.png'), grid)
