"""Pixel metrics of the dense probes from a confusion matrix (numpy only).

`confusion[t, p]` counts the pixels of true class t predicted as p; pixels labelled
`ignore_index` are left out. Segmentation: IoU of class c = TP / (TP + FP + FN); a class absent
from both the labels and the predictions has no IoU (None) and is left out of the mean (mIoU);
pixel accuracy = trace / total. Change detection: precision, recall, F1 and IoU of the change
class (index 1); a ratio whose denominator is 0 is 0.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(
    labels: np.ndarray, predictions: np.ndarray, num_classes: int, ignore_index: int | None = None
) -> np.ndarray:
    """(num_classes, num_classes) int64 counts of (true, predicted) pixel pairs."""
    labels, predictions = np.asarray(labels).ravel(), np.asarray(predictions).ravel()
    if ignore_index is not None:
        keep = labels != ignore_index
        labels, predictions = labels[keep], predictions[keep]
    pairs = labels.astype(np.int64) * num_classes + predictions.astype(np.int64)
    return np.bincount(pairs, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_metrics(confusion: np.ndarray) -> dict:
    """{'miou', 'pixel_accuracy', 'iou': [per class, None where the class never occurs]}."""
    confusion = np.asarray(confusion, np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = [float(t / u) if u > 0 else None for t, u in zip(tp, union)]
    present = [v for v in iou if v is not None]
    total = confusion.sum()
    return {
        'miou': float(np.mean(present)) if present else 0.0,
        'pixel_accuracy': float(tp.sum() / total) if total else 0.0,
        'iou': iou,
    }


def change_metrics(confusion: np.ndarray) -> dict:
    """{'f1', 'iou', 'precision', 'recall'} of the change class from a 2x2 confusion matrix."""
    (_, fp), (fn, tp) = np.asarray(confusion, np.float64)
    ratio = lambda a, b: float(a / b) if b > 0 else 0.0
    return {
        'f1': ratio(2 * tp, 2 * tp + fp + fn),
        'iou': ratio(tp, tp + fp + fn),
        'precision': ratio(tp, tp + fp),
        'recall': ratio(tp, tp + fn),
    }
