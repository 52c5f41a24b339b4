"""The dense probes: semantic segmentation and change detection from a frozen backbone.

Both read every image at its own size as the classification protocols read theirs (the
workdir's `data.bands` / `data.dtype`, `features.read_images`) with its label (`dense_data`),
then:
* train: each train image is cut into non-overlapping windows of `config.data.image_size` px (the
  last row and column flush with the border; an image smaller than a window is mirrored up to
  one, its label extended with the ignore value), the backbone's last feature map of every window
  is computed once (batched, jitted: `FeatureExtractor(feature_map=True)`) and a light head is
  trained on the cached maps (`dense_head`);
* test: windows overlapping by a quarter of their side slide over each test image
  (`tiling.tiled_predict`), the head's logits of each window are bilinearly upsampled to its
  pixels (backbone, head and upsampling in one jitted function), averaged where windows overlap,
  and the arg-max is scored against the full-resolution label (`dense_metrics`).
Change detection feeds both dates through the same backbone; the head sees, per position, the
concatenation of |f_A - f_B| and f_A * f_B (2C channels) and predicts unchanged / changed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from cmid_jax import visualize
from cmid_jax.data import bicubic_resize
from cmid_jax.evaluation import dense_data, dense_head, dense_metrics, tiling
from cmid_jax.evaluation.features import FeatureExtractor, make_feature_map_fn, read_images

PREVIEW_IMAGES = 4  # Test images shown in the preview picture.
PREVIEW_SIDE = 256  # Side of their centre crops (at least one window, at most the image).


def sliding_stride(size: int) -> int:
    """Windows at test time overlap by a quarter of their side."""
    return size - size // 4


def pair_features(fa: jax.Array, fb: jax.Array) -> jax.Array:
    """The change head's input: [|f_A - f_B|, f_A * f_B] along the channels."""
    return jnp.concatenate([jnp.abs(fa - fb), fa * fb], axis=-1)


@dataclasses.dataclass(frozen=True)
class Labelled:
    """The images of some names (for change, A and B stacked along the bands) and their labels
    as class indices."""

    names: tuple[str, ...]
    images: list[np.ndarray]
    labels: list[np.ndarray]

    def subset(self, names: tuple[str, ...]) -> Labelled:
        index = {n: i for i, n in enumerate(self.names)}
        return Labelled(
            names, [self.images[index[n]] for n in names], [self.labels[index[n]] for n in names]
        )


def read_dense_set(
    dataset: dense_data.DenseSet, data: ml_collections.ConfigDict, change: bool
) -> tuple[Labelled, tuple[str, ...]]:
    """Reads and checks every image and label of `dataset`; returns them and the class names."""
    dates = [read_images([files[d] for files in dataset.images], data) for d in range(1 + change)]
    images, labels = [], []
    for i in range(len(dataset.names)):
        first = dates[0][i]
        if change and dates[1][i].shape != first.shape:
            raise ValueError(
                f'{dataset.images[i][1]!r} is {_size(dates[1][i])} but '
                f'{dataset.images[i][0]!r} is {_size(first)}'
            )
        images.append(np.concatenate([d[i] for d in dates], axis=-1) if change else first)
        labels.append(dense_data.read_label(dataset.labels[i], first.shape[:2]))
    class_names = dataset.class_names
    if change:
        labels = [dense_data.change_to_class(p, m) for p, m in zip(dataset.labels, labels)]
    else:
        class_names = class_names or dense_data.infer_classes(labels, dataset.ignore_index)
        for path, mask in zip(dataset.labels, labels):
            dense_data.check_segmentation_mask(path, mask, len(class_names), dataset.ignore_index)
    return Labelled(dataset.names, images, labels), class_names


def _size(image: np.ndarray) -> str:
    return f'{image.shape[1]}x{image.shape[0]} px with {image.shape[2]} bands'


def scaled_shape(shape: tuple[int, ...], scale: float) -> tuple[int, int]:
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def rescale(image: np.ndarray, scale: float, label: bool = False) -> np.ndarray:
    """`image` resized by `scale` (PIL bicubic per band; nearest for a label); as it is for 1."""
    if scale == 1.0:
        return image
    height, width = scaled_shape(image.shape, scale)
    if label:
        return np.asarray(Image.fromarray(image).resize((width, height), Image.NEAREST))
    return bicubic_resize(image, height, width)


def upsample_logits(logits: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(h, w, C) logits bilinearly resized to `shape` (H, W), class by class."""
    if logits.shape[:2] == tuple(shape):
        return logits
    size = (shape[1], shape[0])
    return np.stack(
        [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(logits[..., c])).resize(size, Image.BILINEAR)
            )
            for c in range(logits.shape[-1])
        ],
        axis=-1,
    )


def train_windows(data: Labelled, size: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping (N, size, size, bands) image windows of all images resized by `scale` and
    their (N, size, size) labels (the ignore value where an image was mirrored up to a
    window)."""
    images, labels = [], []
    for image, label in zip(data.images, data.labels):
        image, label = rescale(image, scale), rescale(label, scale, label=True)
        h, w = label.shape
        label = np.pad(
            label, ((0, max(size - h, 0)), (0, max(size - w, 0))), constant_values=dense_head.IGNORE
        )
        images.append(tiling.windows(image, size, size)[0])
        labels.append(tiling.windows(label, size, size)[0])
    return np.concatenate(images), np.concatenate(labels)


@dataclasses.dataclass(frozen=True)
class Probe:
    """A trained head with what it needs at test time."""

    head: nn.Module
    params: dict
    stats: dict
    losses: np.ndarray
    feature_stride: int
    num_windows: int


def train_probe(
    config: ml_collections.ConfigDict,
    variables: dict,
    train: Labelled,
    num_classes: int,
    head_name: str,
    change: bool,
    seed: int,
    batch_size: int,
    scale: float = 1.0,
) -> Probe:
    """The recipe's head (`dense_head`) trained on the cached feature maps of the windows of
    `train`'s images resized by `scale`."""
    size = int(config.data.image_size)
    windows, labels = train_windows(train, size, scale)
    # No larger batches than there are windows: padding would only burn compute.
    extract = FeatureExtractor(config, batch_size=min(batch_size, len(windows)), feature_map=True)
    if change:
        bands = windows.shape[-1] // 2
        inputs = np.asarray(
            pair_features(
                extract(variables, windows[..., :bands]), extract(variables, windows[..., bands:])
            )
        )
    else:
        inputs = extract(variables, windows)
    stats = dense_head.channel_stats(inputs)
    head = dense_head.build_head(head_name, num_classes)
    targets = dense_head.label_grid(labels)
    weights = dense_head.balanced_weights(targets, num_classes) if change else None
    params, losses = dense_head.train_head(
        head, inputs, targets, stats, seed=seed, class_weights=weights
    )
    logging.info(
        '%s head on %d windows of %s features: loss %.3f -> %.3f.',
        head_name,
        len(inputs),
        inputs.shape[1:],
        losses[:50].mean(),
        losses[-50:].mean(),
    )
    return Probe(head, params, stats, losses, size // inputs.shape[1], len(inputs))


def make_predict(
    config: ml_collections.ConfigDict, variables: dict, probe: Probe, change: bool
) -> Callable[[np.ndarray], np.ndarray]:
    """(B, S, S, bands) windows (A and B stacked for change) -> (B, S, S, classes) logits."""
    logits = _jitted_logits(ml_collections.FrozenConfigDict(config), probe.head, change)
    args = (variables, probe.params, jax.tree.map(jnp.asarray, probe.stats))
    return lambda windows: np.asarray(logits(args, windows))


@functools.lru_cache(maxsize=16)
def _jitted_logits(
    config: ml_collections.FrozenConfigDict, head: nn.Module, change: bool
) -> Callable:
    """Backbone, head and upsampling in one jitted function, one per (config, head): the online
    probe scores a new head on new weights every evaluation, of the same shapes."""
    size = int(config.data.image_size)
    feature_map = make_feature_map_fn(config)

    @jax.jit
    def logits(args, windows):
        variables, params, stats = args
        if change:
            bands = windows.shape[-1] // 2
            x = pair_features(
                feature_map(variables, windows[..., :bands]),
                feature_map(variables, windows[..., bands:]),
            )
        else:
            x = feature_map(variables, windows)
        return dense_head.head_logits(head, params, stats, x, size)

    return logits


def evaluate_probe(
    config: ml_collections.ConfigDict,
    variables: dict,
    probe: Probe,
    test: Labelled,
    num_classes: int,
    ignore_index: int | None,
    change: bool,
    batch_size: int,
    scale: float = 1.0,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(confusion matrix over all test pixels, preview rows of the first test images). The
    windows slide over the images resized by `scale`; the logits are resized back to the
    labels' full resolution, where the metrics are taken."""
    size = int(config.data.image_size)
    predict = make_predict(config, variables, probe, change)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    shown = test.images[:PREVIEW_IMAGES]
    side = min([max(size, PREVIEW_SIDE)] + [min(im.shape[:2]) for im in shown])
    crops: dict[str, list[np.ndarray]] = {}
    stride = sliding_stride(size)
    total = sum(
        tiling.num_windows(scaled_shape(im.shape, scale), size, stride) for im in test.images
    )
    # A batch of pairs holds two images each: half as many keep the memory of one batch.
    batch = max(1, min(batch_size // (1 + change), total))
    outputs = tiling.tiled_predict(
        predict, (rescale(im, scale) for im in test.images), size, stride, batch
    )
    for i, logits in enumerate(outputs):
        logits = upsample_logits(logits, test.labels[i].shape)
        prediction = np.argmax(logits, axis=-1).astype(np.uint8)
        confusion += dense_metrics.confusion_matrix(
            test.labels[i], prediction, num_classes, ignore_index
        )
        if i < len(shown):
            for name, crop in _preview_crops(
                test.images[i], test.labels[i], prediction, side, change
            ).items():
                crops.setdefault(name, []).append(crop)
    rows = {
        name: visualize.class_colors(np.stack(c), num_classes)
        if name in ('label', 'prediction')
        else visualize.display_images(np.stack(c))
        for name, c in crops.items()
    }
    return confusion, rows


def _preview_crops(
    image: np.ndarray, label: np.ndarray, prediction: np.ndarray, side: int, change: bool
) -> dict[str, np.ndarray]:
    h, w = label.shape
    top, left = (h - side) // 2, (w - side) // 2
    crop = lambda a: a[top : top + side, left : left + side]
    if change:
        bands = image.shape[-1] // 2
        images = {'A': crop(image[..., :bands]), 'B': crop(image[..., bands:])}
    else:
        images = {'image': crop(image)}
    return {**images, 'label': crop(label), 'prediction': crop(prediction)}


@dataclasses.dataclass(frozen=True)
class ProbeData:
    """A dense set read, checked and split once: everything `score_probe` needs but weights."""

    labelled: Labelled
    class_names: tuple[str, ...]
    ignore_index: int | None
    split: dense_data.NameSplit
    change: bool


def read_probe_data(
    dataset: dense_data.DenseSet,
    split: dense_data.NameSplit,
    data: ml_collections.ConfigDict,
    change: bool,
) -> ProbeData:
    """Reads every image and label of `dataset` with the workdir's bands (`read_dense_set`)."""
    labelled, class_names = read_dense_set(dataset, data, change)
    logging.info(
        '%s on %s: %d classes, %d train / %d test images, %d-px windows.',
        'change' if change else 'segmentation',
        dataset.root,
        len(class_names),
        len(split.train),
        len(split.test),
        int(data.image_size),
    )
    return ProbeData(labelled, class_names, dataset.ignore_index, split, change)


def score_probe(
    config: ml_collections.ConfigDict,
    variables: dict,
    data: ProbeData,
    *,
    head: str,
    seed: int,
    scale: float,
    batch_size: int,
    preview: str | None,
) -> dict:
    """Trains the probe on `data.split.train`, scores it on `data.split.test` and saves the
    preview picture at `preview` (None: no picture); returns the result's fields (metrics and
    settings). `cmid-evaluate` calls it once, the online probe every so many steps."""
    labelled, class_names, split, change = data.labelled, data.class_names, data.split, data.change
    train, test = labelled.subset(split.train), labelled.subset(split.test)
    num_classes, size = len(class_names), int(config.data.image_size)
    probe = train_probe(
        config, variables, train, num_classes, head, change, seed, batch_size, scale
    )
    confusion, rows = evaluate_probe(
        config, variables, probe, test, num_classes, data.ignore_index, change, batch_size, scale
    )
    if preview is not None:
        colors = visualize.class_colors(np.arange(num_classes), num_classes)
        visualize.save_png(
            preview, visualize.labelled_grid(rows, legend=dict(zip(class_names, colors)))
        )
    if change:
        metrics = dense_metrics.change_metrics(confusion)
        # Predicting "changed" everywhere scores F1 = 2p / (1 + p) for a changed fraction p.
        metrics['test_changed_fraction'] = float(confusion[1].sum() / confusion.sum())
    else:
        metrics = dense_metrics.segmentation_metrics(confusion)
        metrics['per_class_iou'] = dict(zip(class_names, metrics.pop('iou')))
        train_counts = np.bincount(
            np.concatenate([m.ravel() for m in train.labels]), minlength=256
        )[:num_classes]
        # The test pixel accuracy of always predicting the train split's most frequent class.
        metrics['majority_pixel_accuracy'] = float(
            confusion[np.argmax(train_counts)].sum() / confusion.sum()
        )
    return {
        **metrics,
        'head': head,
        'features': 'last stage',
        'feature_stride': probe.feature_stride,
        'num_classes': num_classes,
        'class_names': list(class_names),
        'num_train': len(train.names),
        'num_test': len(test.names),
        'train_windows': probe.num_windows,
        'window': size,
        'test_window_stride': sliding_stride(size),
        'scale': scale,
        'split': split.digest(),
        'head_steps': dense_head.STEPS,
        'head_batch_size': dense_head.BATCH_SIZE,
        'head_lr': dense_head.LR,
        'label_stride': dense_head.LABEL_STRIDE,
        'class_weights': 'balanced' if change else 'none',
        'head_loss': round(float(probe.losses[-50:].mean()), 4),
    }
