"""What the evaluation protocols share: the context a run gets, the online form's contract, the
options' fields, and the image cache and result fields of the classification protocols."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from jax.sharding import Mesh

from cmid_jax.evaluation.features import FeatureExtractor, load_images
from cmid_jax.evaluation.labelled import ClassSplit, load_split

# The online form of a protocol once built: `fn(train_state, preview_png or None) -> scalars`.
OnlineFn = Callable[[dict, 'str | None'], dict[str, float]]


def option(default: Any, help: str, choices: Sequence[str] | None = None) -> Any:  # noqa: A002
    """A field of a protocol's options: its default, a one-line help (the `cmid-evaluate` flag's)
    and, for a choice among names, those names."""
    return dataclasses.field(default=default, metadata={'help': help, 'choices': choices})


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What a protocol's `run` gets besides its data and options."""

    config: ml_collections.ConfigDict  # The workdir's.
    variables: dict  # The evaluated backbone's {'params', 'batch_stats'}.
    data: str  # The data folder, as given.
    seed: int  # The split seed; also that of anything the protocol draws.
    batch_size: int  # Feature-extraction batch (`config.eval.batch_size`).
    preview: str | os.PathLike | None  # Where a picture of predictions goes (None: none).


@dataclasses.dataclass(frozen=True)
class OnlineEval:
    """A protocol's form in the train loop (`periodic.PeriodicEvals`), run every
    `config.eval.every_steps` and at the session's first step."""

    curve: str  # Its picture is images/<curve>.png (and images/<curve>_<step>.png with preview).
    metric_prefix: str  # Every scalar it logs to metrics.jsonl starts with this.
    enabled: Callable[[ml_collections.ConfigDict], bool]  # Whether the config asks for it.
    build: Callable[[ml_collections.ConfigDict, Mesh | None], OnlineFn]  # Reads its data once.
    plot: Callable[[str | os.PathLike, str | os.PathLike, tuple[str, ...]], None]
    preview: bool = False  # Whether it draws a picture of its predictions at each step.


@dataclasses.dataclass(frozen=True)
class ClassImages:
    """Both halves of a class split read into the image cache, with their labels."""

    split: ClassSplit
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_class_images(split: ClassSplit, protocol: str, context: RunContext) -> ClassImages:
    """Reads both halves of `split` as the model reads its images (`features.load_images`)."""
    config = context.config
    size = int(config.data.image_size)
    images = ClassImages(
        split,
        load_images(split.train_files, size, config.data),
        np.asarray(split.train_labels),
        load_images(split.test_files, size, config.data),
        np.asarray(split.test_labels),
    )
    logging.info(
        '%s on %s: %d classes, %d train / %d test images at %d px.',
        protocol,
        context.data,
        split.num_classes,
        len(images.train_images),
        len(images.test_images),
        size,
    )
    return images


def class_split(data: str, train_fraction: float, seed: int, options: Any) -> ClassSplit:
    """The `split` of the classification protocols: per class and seeded (`labelled.py`)."""
    return load_split(data, train_fraction, seed)


def frozen_top1(
    classifier: Callable[..., float], images: ClassImages, context: RunContext, **recipe: Any
) -> float:
    """`classifier(train features, train labels, test features, test labels, classes, **recipe)`
    on the frozen backbone's global features (`FeatureExtractor`)."""
    extract = FeatureExtractor(context.config, batch_size=context.batch_size)
    return classifier(
        extract(context.variables, images.train_images),
        images.train_labels,
        extract(context.variables, images.test_images),
        images.test_labels,
        images.split.num_classes,
        **recipe,
    )


def classification_fields(images: ClassImages, top1: float, **recipe: Any) -> dict:
    """The result's fields of a classification protocol: accuracy, split, then its recipe."""
    return {
        'top1': top1,
        'num_classes': images.split.num_classes,
        'num_train': len(images.train_images),
        'num_test': len(images.test_images),
        'split': images.split.digest(),
        **recipe,
    }
