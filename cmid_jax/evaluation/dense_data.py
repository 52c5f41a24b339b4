"""Datasets of the dense probes, their checks, and a seeded train/test split by image (jax-free).

Segmentation: `DIR/images/NAME.{jpg,jpeg,png,tif,tiff}` with `DIR/masks/NAME.png`, one uint8
class index per pixel (`ignore_index`, default 255, for pixels without a label), and an optional
`DIR/classes.json`, `{"classes": [names], "ignore_index": 255}`. Without it the classes are
0..max(mask value) over all masks (the ignore value aside), named by their index.

Change detection: `DIR/A/NAME.*` (first date), `DIR/B/NAME.*` (second date) and
`DIR/label/NAME.png` with 0 (unchanged) or 255 (changed) per pixel, as LEVIR-CD.

Every pair is checked: one line names the file that is missing, the mask whose size differs from
its image, or the values outside the classes.

Split: names are grouped (by default each name is its own group; `split_group`, a regular
expression, makes the group the first captured group of its search in the name, e.g.
`'^(tile\\d+)_'` keeps the tiles of one area together), the groups are ranked by
`sha256(f'{seed}/{group}')` and the first `train_count(train_fraction, groups)` go to train (see
`labelled.py`). The split depends only on the seed and the names, so it is the same on every
machine, and the windows of one image never fall on both sides.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image

from cmid_jax.data import IMAGE_EXTENSIONS
from cmid_jax.errors import DataError
from cmid_jax.evaluation.labelled import train_count

IGNORE_INDEX = 255
CHANGE_VALUES = (0, 255)  # Unchanged, changed: class 0 and class 1.


@dataclasses.dataclass(frozen=True)
class DenseSet:
    """Sorted names and, for each, its image files (one for segmentation, A and B for change)
    and its label file."""

    root: str
    names: tuple[str, ...]
    images: tuple[tuple[str, ...], ...]
    labels: tuple[str, ...]
    class_names: tuple[str, ...]
    ignore_index: int | None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _files_by_name(folder: str, extensions: Sequence[str]) -> dict[str, str]:
    """{name without extension: path} of the files of `folder` with one of `extensions`."""
    if not os.path.isdir(folder):
        raise DataError(f'folder {folder!r} does not exist')
    found: dict[str, str] = {}
    for entry in sorted(os.listdir(folder)):
        name, ext = os.path.splitext(entry)
        if entry.startswith('.') or ext.lower() not in extensions:
            continue
        path = os.path.join(folder, entry)
        if name in found:
            raise DataError(f'{path!r} and {found[name]!r} have the same name; keep one')
        found[name] = path
    if not found:
        raise DataError(f'{folder!r} holds no files with extension {", ".join(extensions)}')
    return found


def _match(folders: dict[str, dict[str, str]]) -> list[str]:
    """The common names of `{folder: {name: path}}`, after checking that every folder has the
    same names as the first one."""
    (first_folder, first), *others = folders.items()
    for folder, files in others:
        for name in sorted(first.keys() - files.keys()):
            raise DataError(f'{first[name]!r} has no matching {folder}/{name}.*')
        for name in sorted(files.keys() - first.keys()):
            raise DataError(f'{files[name]!r} has no matching {first_folder}/{name}.*')
    return sorted(first)


def _read_classes(path: str) -> tuple[tuple[str, ...], int]:
    try:
        with open(path, encoding='utf-8') as f:
            spec = json.load(f)
        classes, ignore = spec['classes'], spec.get('ignore_index', IGNORE_INDEX)
        if (
            not isinstance(classes, list)
            or not classes
            or not all(isinstance(c, str) for c in classes)
        ):
            raise ValueError('"classes" must be a non-empty list of names')
        if not isinstance(ignore, int) or not 0 <= ignore <= 255 or ignore < len(classes):
            raise ValueError(f'"ignore_index" must be an integer in [{len(classes)}, 255]')
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(
            f'{path!r}: expected {{"classes": [names], "ignore_index": 255}}; '
            f'{type(e).__name__}: {e}'
        ) from None
    return tuple(classes), ignore


def list_segmentation(root: str) -> DenseSet:
    """`root/images/*` with `root/masks/*.png` and the optional `root/classes.json`. The class
    list without `classes.json` is found by `infer_classes` after the masks are read."""
    root = os.fspath(root)
    images = _files_by_name(os.path.join(root, 'images'), IMAGE_EXTENSIONS)
    masks = _files_by_name(os.path.join(root, 'masks'), ('.png',))
    names = _match({'images': images, 'masks': masks})
    classes_json = os.path.join(root, 'classes.json')
    classes, ignore = ((), IGNORE_INDEX)
    if os.path.exists(classes_json):
        classes, ignore = _read_classes(classes_json)
    return DenseSet(
        root,
        tuple(names),
        tuple((images[n],) for n in names),
        tuple(masks[n] for n in names),
        classes,
        ignore,
    )


def list_change(root: str) -> DenseSet:
    """`root/A/*`, `root/B/*` and `root/label/*.png`, matched by name."""
    root = os.fspath(root)
    a, b = (_files_by_name(os.path.join(root, d), IMAGE_EXTENSIONS) for d in 'AB')
    labels = _files_by_name(os.path.join(root, 'label'), ('.png',))
    names = _match({'A': a, 'B': b, 'label': labels})
    return DenseSet(
        root,
        tuple(names),
        tuple((a[n], b[n]) for n in names),
        tuple(labels[n] for n in names),
        ('unchanged', 'changed'),
        None,
    )


def read_label(path: str, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 values of a single-band 8-bit PNG, checked to be `shape` (its image's)."""
    with Image.open(path) as im:
        if im.mode not in ('L', 'P'):
            raise DataError(
                f'{path!r} is a {im.mode} image; expected a single-band 8-bit PNG '
                '(mode L or P) of class indices'
            )
        label = np.asarray(im)
    if label.shape != tuple(shape):
        raise DataError(
            f'{path!r} is {label.shape[1]}x{label.shape[0]} px but its image is '
            f'{shape[1]}x{shape[0]} px (width x height)'
        )
    return label


def check_segmentation_mask(
    path: str, mask: np.ndarray, num_classes: int, ignore_index: int
) -> None:
    """Raises naming `path` if a value is neither a class index nor `ignore_index`."""
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != ignore_index)]
    if bad.size:
        raise DataError(
            f'{path!r} has values {bad.tolist()} outside the {num_classes} classes '
            f'(0-{num_classes - 1}) and the ignore value {ignore_index}'
        )


def change_to_class(path: str, label: np.ndarray) -> np.ndarray:
    """0 / 255 -> class 0 / 1, raising naming `path` for any other value."""
    bad = np.setdiff1d(np.unique(label), CHANGE_VALUES)
    if bad.size:
        raise DataError(
            f'{path!r} has values {bad.tolist()}; a change label holds only 0 '
            '(unchanged) and 255 (changed)'
        )
    return (label == 255).astype(np.uint8)


def infer_classes(masks: Sequence[np.ndarray], ignore_index: int) -> tuple[str, ...]:
    """Classes 0..max value of all masks (the ignore value aside), named by their index."""
    top = max((int(v.max()) for m in masks if (v := m[m != ignore_index]).size), default=0)
    return tuple(str(i) for i in range(top + 1))


@dataclasses.dataclass(frozen=True)
class NameSplit:
    train: tuple[str, ...]
    test: tuple[str, ...]

    def digest(self) -> str:
        """Short fingerprint of the split (both name lists)."""
        text = 'train:' + '\n'.join(self.train) + '|test:' + '\n'.join(self.test)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def group_of(name: str, split_group: str | None) -> str:
    """The split unit of `name`: itself, or the first group of `split_group`'s match in it."""
    if not split_group:
        return name
    match = re.search(split_group, name)
    if match is None:
        raise DataError(f'name {name!r} does not match split_group={split_group!r}')
    return match.group(1) if match.groups() else match.group(0)


def split_names(
    names: Sequence[str], train_fraction: float, seed: int, split_group: str | None = None
) -> NameSplit:
    """Seeded split of `names` by group (see the module docstring); both halves sorted."""
    groups = sorted({group_of(n, split_group) for n in names})
    if len(groups) < 2:
        raise DataError(
            f'{len(groups)} split group(s) {groups} among {len(names)} names; need '
            'at least 2 so that train and test both get one'
            + (f' (split_group={split_group!r})' if split_group else '')
        )
    ranked = sorted(groups, key=lambda g: hashlib.sha256(f'{seed}/{g}'.encode()).hexdigest())
    train_groups = set(ranked[: train_count(train_fraction, len(groups))])
    train = tuple(n for n in sorted(names) if group_of(n, split_group) in train_groups)
    test = tuple(n for n in sorted(names) if group_of(n, split_group) not in train_groups)
    return NameSplit(train, test)
