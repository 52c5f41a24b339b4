"""Metric writing: workdir/metrics.jsonl always, TensorBoard through clu when TensorFlow is there.

`clu.metric_writers` imports TensorFlow at module level, so it is optional (the `tensorboard`
extra); the JSONL file is the portable record that tests and plots read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Mapping

import numpy as np


class JsonlWriter:
    """Appends one JSON object per write: {"step": N, name: value, ...}.

    Each record is one `write` call on an O_APPEND descriptor, so a killed process leaves whole
    lines only. After a crash and resume, steps after the restored checkpoint appear again; the
    later line for a step is the one that belongs to the finished run.
    """

    def __init__(self, path: str):
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        record = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
        os.write(self._fd, (json.dumps(record) + '\n').encode())

    def close(self) -> None:
        os.close(self._fd)


class MetricWriter:
    """Fans scalars out to the JSONL file and, where available, clu's TensorBoard writer."""

    def __init__(self, workdir: str, *, is_main_process: bool = True):
        self._writers = []
        if not is_main_process:
            return
        self._writers.append(JsonlWriter(os.path.join(workdir, 'metrics.jsonl')))
        try:
            from clu import metric_writers  # Needs tensorflow + tensorboard.
        except ImportError:
            logging.info('TensorFlow not installed: metrics go to metrics.jsonl only.')
        else:
            self._writers.append(metric_writers.SummaryWriter(os.path.join(workdir, 'tensorboard')))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for w in self._writers:
            w.write_scalars(step, scalars)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """(N, H, W, C) uint8 images to TensorBoard; the JSONL file keeps scalars only."""
        for w in self._writers:
            if hasattr(w, 'write_images'):
                w.write_images(step, images)

    def close(self) -> None:
        for w in self._writers:
            w.close()


class Progress:
    """Formats the progress line: step, loss terms, steps/s and ETA."""

    def __init__(self, total_steps: int, first_step: int):
        self.total_steps = total_steps
        self._last_step, self._last_time = first_step, time.monotonic()

    def line(self, step: int, scalars: Mapping[str, float]) -> tuple[str, float]:
        now = time.monotonic()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        eta = (self.total_steps - step) / rate if rate > 0 else math.inf
        terms = ' '.join(f'{k}={scalars[k]:.4f}' for k in
                         ('loss', 'loss_mim', 'loss_global', 'loss_local') if k in scalars)
        return (f'step {step}/{self.total_steps} {terms} {rate:.2f} steps/s '
                f'ETA {_duration(eta)}'), rate


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return '?'
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f'{h}:{m:02d}:{s:02d}'
