"""A labelled class-per-folder dataset and its seeded, per-class train/test split.

`root/<class>/**/<image>`: every immediate sub-folder of `root` is a class (sorted by name, so
label i is the i-th folder name), holding any number of images found by `list_images`.

The split is per class: within a class the files are ranked by
`sha256(f'{seed}/{class name}/{path relative to the class folder}')` (for nested class folders,
relative to the deepest folder common to the class's files) and the first
`floor(train_fraction * n + 0.5)` (at least 1 and at most n - 1 when n >= 2) go to train, the
rest to test. It depends only on the seed, the class name and the file names, not on where the
data lives, the numpy version or Python's salted `hash`, so it is the same on every machine and
run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os

from cmid_jax.data import list_images
from cmid_jax.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class ClassSplit:
    """The seeded split of a class-per-folder dataset: file paths and integer labels of both
    halves; label i names `class_names[i]` (a dense set's split by name is `NameSplit`)."""

    class_names: tuple[str, ...]
    train_files: tuple[str, ...]
    train_labels: tuple[int, ...]
    test_files: tuple[str, ...]
    test_labels: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def digest(self) -> str:
        """Short fingerprint of the split (class names and both file lists, relative paths)."""
        h = hashlib.sha256()
        for name, files in (('train', self.train_files), ('test', self.test_files)):
            h.update(name.encode())
            for f in files:
                h.update(('/'.join(f.replace(os.sep, '/').split('/')[-2:]) + '\n').encode())
        h.update('|'.join(self.class_names).encode())
        return h.hexdigest()[:12]


def list_labelled(root: str | os.PathLike) -> dict[str, list[str]]:
    """{class name: sorted image paths} for every class folder of `root` (hidden ones skipped)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f'labelled data folder {root!r} does not exist')
    classes = sorted(
        d
        for d in os.listdir(root)
        if not d.startswith('.') and os.path.isdir(os.path.join(root, d))
    )
    if len(classes) < 2:
        raise DataError(
            f'{root!r} must hold one sub-folder per class (at least 2); found {classes}'
        )
    return {c: list_images(os.path.join(root, c)) for c in classes}


def _rank_key(seed: int, class_name: str, class_dir: str, path: str) -> str:
    rel = os.path.relpath(path, class_dir).replace(os.sep, '/')
    return hashlib.sha256(f'{seed}/{class_name}/{rel}'.encode()).hexdigest()


def train_count(train_fraction: float, n: int) -> int:
    """How many of `n` ranked items go to train: `floor(train_fraction * n + 0.5)`, at least 1
    and at most n - 1 (half-up rounding: Python's round() would send 2.5 to 2 but 3.5 to 4)."""
    if not 0.0 < train_fraction < 1.0:
        raise ConfigError(f'train_fraction must be in (0, 1), got {train_fraction}')
    return min(max(math.floor(train_fraction * n + 0.5), 1), n - 1)


def split_per_class(
    files_by_class: dict[str, list[str]], train_fraction: float, seed: int
) -> ClassSplit:
    """Seeded per-class split of `{class: files}` (see the module docstring)."""
    names = tuple(sorted(files_by_class))
    train_f, train_y, test_f, test_y = [], [], [], []
    for label, name in enumerate(names):
        files = sorted(files_by_class[name])
        if len(files) < 2:
            raise DataError(
                f'class {name!r} has {len(files)} image(s); need at least 2 '
                'so that both halves of the split see it'
            )
        # The deepest folder common to the class's files: the class folder for a flat layout.
        class_dir = os.path.commonpath([os.path.dirname(f) for f in files])
        ranked = sorted(files, key=lambda f: _rank_key(seed, name, class_dir, f))
        n_train = train_count(train_fraction, len(files))
        train_f += ranked[:n_train]
        test_f += ranked[n_train:]
        train_y += [label] * n_train
        test_y += [label] * (len(files) - n_train)
    return ClassSplit(names, tuple(train_f), tuple(train_y), tuple(test_f), tuple(test_y))


def load_split(root: str | os.PathLike, train_fraction: float = 0.5, seed: int = 0) -> ClassSplit:
    """The seeded per-class split of the class-per-folder dataset at `root`."""
    return split_per_class(list_labelled(root), train_fraction, seed)
