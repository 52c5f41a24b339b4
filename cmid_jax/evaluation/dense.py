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
import os
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from cmid_jax import visualize
from cmid_jax.data import bicubic_resize
from cmid_jax.errors import ConfigError, DataError
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


class DenseTask:
    """What differs between the dense protocols, so that the probe's code has no branch on them:
    the layout of the data folder, how many dated images an example stacks along its bands, how
    their feature maps become the head's input, how labels are checked, the loss weighting and
    the metrics. One instance per task (`SEGMENTATION`, `CHANGE`), compared by identity, so that
    it is a static argument of the jitted functions."""

    name: str  # The protocol's name (`cmid-evaluate --protocol`).
    dates: int  # Images per example (stacked along the bands): 1, or A and B.
    score: str  # The headline metric of the result, logged by the online probe.
    class_weights: str  # 'none', or 'balanced' (`dense_head.balanced_weights`).

    def list_dataset(self, root: str) -> dense_data.DenseSet:
        raise NotImplementedError

    def is_folder(self, root: str) -> bool:
        """Whether `root` is laid out for this task (the online probe tells them apart)."""
        raise NotImplementedError

    def check_labels(
        self, dataset: dense_data.DenseSet, labels: list[np.ndarray]
    ) -> tuple[list[np.ndarray], tuple[str, ...]]:
        """The read labels as class indices, checked (naming the file), and the class names."""
        raise NotImplementedError

    def combine(self, feature_maps: list[jax.Array]) -> jax.Array:
        """The head's input from the feature maps of the example's dated images."""
        raise NotImplementedError

    def loss_weights(self, targets: np.ndarray, num_classes: int) -> np.ndarray | None:
        """Per-class loss weights of the head's training targets (None: all 1)."""
        return None

    def metrics(
        self, confusion: np.ndarray, train_labels: list[np.ndarray], class_names: tuple[str, ...]
    ) -> dict:
        raise NotImplementedError

    def split_dates(self, stacked):
        """(..., dates * bands) -> one (..., bands) array per date (numpy or jax)."""
        bands = stacked.shape[-1] // self.dates
        return [stacked[..., d * bands : (d + 1) * bands] for d in range(self.dates)]

    def head_input(self, feature_map: Callable, windows):
        """`feature_map` of each date of `windows`, combined into the head's input."""
        return self.combine([feature_map(w) for w in self.split_dates(windows)])

    def preview_images(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """The rows of the preview picture an example's image gives."""
        return {'image': image}

    def __repr__(self) -> str:
        return f'DenseTask({self.name!r})'


class Segmentation(DenseTask):
    name, dates, score, class_weights = 'segmentation', 1, 'miou', 'none'

    def list_dataset(self, root: str) -> dense_data.DenseSet:
        return dense_data.list_segmentation(root)

    def is_folder(self, root: str) -> bool:
        return not os.path.isdir(os.path.join(root, 'A'))

    def check_labels(self, dataset, labels):
        class_names = dataset.class_names or dense_data.infer_classes(labels, dataset.ignore_index)
        for path, mask in zip(dataset.labels, labels):
            dense_data.check_segmentation_mask(path, mask, len(class_names), dataset.ignore_index)
        return labels, class_names

    def combine(self, feature_maps):
        (fmap,) = feature_maps
        return fmap

    def metrics(self, confusion, train_labels, class_names):
        metrics = dense_metrics.segmentation_metrics(confusion)
        metrics['per_class_iou'] = dict(zip(class_names, metrics.pop('iou')))
        num_classes = len(class_names)
        train_counts = np.bincount(
            np.concatenate([m.ravel() for m in train_labels]), minlength=256
        )[:num_classes]
        # The test pixel accuracy of always predicting the train split's most frequent class.
        metrics['majority_pixel_accuracy'] = float(
            confusion[np.argmax(train_counts)].sum() / confusion.sum()
        )
        return metrics


class ChangeDetection(DenseTask):
    name, dates, score, class_weights = 'change', 2, 'f1', 'balanced'

    def list_dataset(self, root: str) -> dense_data.DenseSet:
        return dense_data.list_change(root)

    def is_folder(self, root: str) -> bool:
        """A change-detection folder has `A/` (and `B/`, `label/`); a segmentation one `images/`."""
        return os.path.isdir(os.path.join(root, 'A'))

    def check_labels(self, dataset, labels):
        labels = [dense_data.change_to_class(p, m) for p, m in zip(dataset.labels, labels)]
        return labels, dataset.class_names

    def combine(self, feature_maps):
        return pair_features(*feature_maps)

    def loss_weights(self, targets, num_classes):
        return dense_head.balanced_weights(targets, num_classes)

    def metrics(self, confusion, train_labels, class_names):
        metrics = dense_metrics.change_metrics(confusion)
        # Predicting "changed" everywhere scores F1 = 2p / (1 + p) for a changed fraction p.
        metrics['test_changed_fraction'] = float(confusion[1].sum() / confusion.sum())
        return metrics

    def preview_images(self, image):
        a, b = self.split_dates(image)
        return {'A': a, 'B': b}


SEGMENTATION = Segmentation()
CHANGE = ChangeDetection()
TASKS = (SEGMENTATION, CHANGE)


def task_of_folder(root: str) -> DenseTask:
    """The task `root` is laid out for: change with an `A/` sub-folder, else segmentation."""
    return CHANGE if CHANGE.is_folder(root) else SEGMENTATION


@dataclasses.dataclass(frozen=True)
class DenseExamples:
    """The images of some names (A and B stacked along the bands for change) and their label
    maps as class indices."""

    names: tuple[str, ...]
    images: list[np.ndarray]
    labels: list[np.ndarray]

    def subset(self, names: tuple[str, ...]) -> DenseExamples:
        index = {n: i for i, n in enumerate(self.names)}
        return DenseExamples(
            names, [self.images[index[n]] for n in names], [self.labels[index[n]] for n in names]
        )


def read_dense_set(
    dataset: dense_data.DenseSet, data: ml_collections.ConfigDict, task: DenseTask
) -> tuple[DenseExamples, tuple[str, ...]]:
    """Reads and checks every image and label of `dataset`; returns them and the class names."""
    dates = [read_images([files[d] for files in dataset.images], data) for d in range(task.dates)]
    images, labels = [], []
    for i in range(len(dataset.names)):
        first = dates[0][i]
        for d in range(1, task.dates):
            if dates[d][i].shape != first.shape:
                raise DataError(
                    f'{dataset.images[i][d]!r} is {_size(dates[d][i])} but '
                    f'{dataset.images[i][0]!r} is {_size(first)}'
                )
        images.append(first if task.dates == 1 else np.concatenate([d[i] for d in dates], -1))
        labels.append(dense_data.read_label(dataset.labels[i], first.shape[:2]))
    labels, class_names = task.check_labels(dataset, labels)
    return DenseExamples(dataset.names, images, labels), class_names


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


def train_windows(
    data: DenseExamples, size: int, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeSettings:
    """How a probe is trained and applied, besides the data: the head (`dense_head.HEADS`), the
    seed of its init and batches, the feature-extraction batch and the factor the images are
    resized by before the windows cut them."""

    head: str = 'linear'
    seed: int = 0
    batch_size: int = 128
    scale: float = 1.0

    def __post_init__(self):
        if self.head not in dense_head.HEADS:
            raise ConfigError(f'head must be one of {dense_head.HEADS}, got {self.head!r}')
        if not self.scale > 0:
            raise ConfigError(f'scale must be positive, got {self.scale}')
        if not self.batch_size > 0:
            raise ConfigError(f'batch_size must be positive, got {self.batch_size}')


@dataclasses.dataclass(frozen=True)
class Probe:
    """A trained head with what it needs at test time."""

    task: DenseTask
    head: nn.Module
    params: dict
    stats: dict
    losses: np.ndarray
    feature_stride: int
    num_windows: int

    @property
    def num_classes(self) -> int:
        return self.head.num_classes


def train_probe(
    config: ml_collections.ConfigDict,
    variables: dict,
    train: DenseExamples,
    *,
    task: DenseTask,
    num_classes: int,
    settings: ProbeSettings,
) -> Probe:
    """The recipe's head (`dense_head`) trained on the cached feature maps of the windows of
    `train`'s images resized by `settings.scale`."""
    size = int(config.data.image_size)
    windows, labels = train_windows(train, size, settings.scale)
    # No larger batches than there are windows: padding would only burn compute.
    extract = FeatureExtractor(
        config, batch_size=min(settings.batch_size, len(windows)), feature_map=True
    )
    inputs = np.asarray(task.head_input(lambda w: extract(variables, w), windows))
    stats = dense_head.channel_stats(inputs)
    head = dense_head.build_head(settings.head, num_classes)
    targets = dense_head.label_grid(labels)
    params, losses = dense_head.train_head(
        head,
        inputs,
        targets,
        stats,
        seed=settings.seed,
        class_weights=task.loss_weights(targets, num_classes),
    )
    logging.info(
        '%s head on %d windows of %s features: loss %.3f -> %.3f.',
        settings.head,
        len(inputs),
        inputs.shape[1:],
        losses[:50].mean(),
        losses[-50:].mean(),
    )
    return Probe(task, head, params, stats, losses, size // inputs.shape[1], len(inputs))


def make_predict(
    config: ml_collections.ConfigDict, variables: dict, probe: Probe
) -> Callable[[np.ndarray], np.ndarray]:
    """(B, S, S, bands) windows (the dates stacked) -> (B, S, S, classes) logits."""
    logits = _jitted_logits(ml_collections.FrozenConfigDict(config), probe.head, probe.task)
    args = (variables, probe.params, jax.tree.map(jnp.asarray, probe.stats))
    return lambda windows: np.asarray(logits(args, windows))


@functools.lru_cache(maxsize=16)
def _jitted_logits(
    config: ml_collections.FrozenConfigDict, head: nn.Module, task: DenseTask
) -> Callable:
    """Backbone, head and upsampling in one jitted function, one per (config, head, task): the
    online probe scores a new head on new weights every evaluation, of the same shapes."""
    size = int(config.data.image_size)
    feature_map = make_feature_map_fn(config)

    @jax.jit
    def logits(args, windows):
        variables, params, stats = args
        x = task.head_input(lambda w: feature_map(variables, w), windows)
        return dense_head.head_logits(head, params, stats, x, size)

    return logits


def evaluate_probe(
    config: ml_collections.ConfigDict,
    variables: dict,
    probe: Probe,
    test: DenseExamples,
    *,
    ignore_index: int | None,
    settings: ProbeSettings,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(confusion matrix over all test pixels, preview rows of the first test images). The
    windows slide over the images resized by `settings.scale`; the logits are resized back to
    the labels' full resolution, where the metrics are taken."""
    size, scale, num_classes = int(config.data.image_size), settings.scale, probe.num_classes
    predict = make_predict(config, variables, probe)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    shown = test.images[:PREVIEW_IMAGES]
    side = min([max(size, PREVIEW_SIDE)] + [min(im.shape[:2]) for im in shown])
    crops: dict[str, list[np.ndarray]] = {}
    stride = sliding_stride(size)
    total = sum(
        tiling.num_windows(scaled_shape(im.shape, scale), size, stride) for im in test.images
    )
    # A batch of pairs holds two images each: half as many keep the memory of one batch.
    batch = max(1, min(settings.batch_size // probe.task.dates, total))
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
                probe.task, test.images[i], test.labels[i], prediction, side
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
    task: DenseTask, image: np.ndarray, label: np.ndarray, prediction: np.ndarray, side: int
) -> dict[str, np.ndarray]:
    h, w = label.shape
    top, left = (h - side) // 2, (w - side) // 2
    crop = lambda a: a[top : top + side, left : left + side]
    images = {name: crop(im) for name, im in task.preview_images(image).items()}
    return {**images, 'label': crop(label), 'prediction': crop(prediction)}


@dataclasses.dataclass(frozen=True)
class ProbeData:
    """A dense set read, checked and split once: everything `score_probe` needs but weights."""

    task: DenseTask
    examples: DenseExamples
    class_names: tuple[str, ...]
    ignore_index: int | None
    split: dense_data.NameSplit


def read_probe_data(
    dataset: dense_data.DenseSet,
    split: dense_data.NameSplit,
    data: ml_collections.ConfigDict,
    task: DenseTask,
) -> ProbeData:
    """Reads every image and label of `dataset` with the workdir's bands (`read_dense_set`)."""
    examples, class_names = read_dense_set(dataset, data, task)
    logging.info(
        '%s on %s: %d classes, %d train / %d test images, %d-px windows.',
        task.name,
        dataset.root,
        len(class_names),
        len(split.train),
        len(split.test),
        int(data.image_size),
    )
    return ProbeData(task, examples, class_names, dataset.ignore_index, split)


def score_probe(
    config: ml_collections.ConfigDict,
    variables: dict,
    data: ProbeData,
    settings: ProbeSettings,
    *,
    preview: str | os.PathLike | None,
) -> dict:
    """Trains the probe on `data.split.train`, scores it on `data.split.test` and saves the
    preview picture at `preview` (None: no picture); returns the result's fields (metrics and
    settings). `cmid-evaluate` calls it once, the online probe every so many steps."""
    task, class_names, split = data.task, data.class_names, data.split
    train, test = data.examples.subset(split.train), data.examples.subset(split.test)
    num_classes, size = len(class_names), int(config.data.image_size)
    probe = train_probe(
        config, variables, train, task=task, num_classes=num_classes, settings=settings
    )
    confusion, rows = evaluate_probe(
        config, variables, probe, test, ignore_index=data.ignore_index, settings=settings
    )
    if preview is not None:
        colors = visualize.class_colors(np.arange(num_classes), num_classes)
        visualize.save_png(
            preview, visualize.labelled_grid(rows, legend=dict(zip(class_names, colors)))
        )
    return {
        **task.metrics(confusion, train.labels, class_names),
        'head': settings.head,
        'features': 'last stage',
        'feature_stride': probe.feature_stride,
        'num_classes': num_classes,
        'class_names': list(class_names),
        'num_train': len(train.names),
        'num_test': len(test.names),
        'train_windows': probe.num_windows,
        'window': size,
        'test_window_stride': sliding_stride(size),
        'scale': settings.scale,
        'split': split.digest(),
        'head_steps': dense_head.STEPS,
        'head_batch_size': dense_head.BATCH_SIZE,
        'head_lr': dense_head.LR,
        'label_stride': dense_head.LABEL_STRIDE,
        'class_weights': task.class_weights,
        'head_loss': round(float(probe.losses[-50:].mean()), 4),
    }
