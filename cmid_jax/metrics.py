"""Metric writing and the progress line.

Scalars go to the workdir's metrics.jsonl always (`cmid_jax.workdir.JsonlFile`: whole lines,
local or remote) and to TensorBoard through clu when TensorFlow is there. `clu.metric_writers`
imports TensorFlow at module level, so it is optional (the `tensorboard` extra); the JSONL file is
the portable record that tests and plots read. After a crash and resume, steps after the restored
checkpoint appear again; the later line for a step is the one that belongs to the finished run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping

import numpy as np

from cmid_jax import workdir as workdir_lib


class MetricWriter:
    """Fans scalars out to metrics.jsonl and, where available, clu's TensorBoard writer."""

    def __init__(self, workdir: workdir_lib.Workdir, *, is_main_process: bool = True):
        self._jsonl = None
        self._tensorboard = None
        if not is_main_process:
            return
        self._jsonl = workdir.jsonl(workdir_lib.METRICS)
        try:
            from clu import metric_writers  # Needs tensorflow + tensorboard.
        except ImportError:
            logging.debug('TensorFlow not installed: metrics go to metrics.jsonl only.')
        else:
            self._tensorboard = metric_writers.SummaryWriter(str(workdir / workdir_lib.TENSORBOARD))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._jsonl is not None:
            self._jsonl.write({'step': int(step), **{k: float(v) for k, v in scalars.items()}})
        if self._tensorboard is not None:
            self._tensorboard.write_scalars(step, scalars)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """(N, H, W, C) uint8 images to TensorBoard; the JSONL file keeps scalars only."""
        if self._tensorboard is not None:
            self._tensorboard.write_images(step, images)

    def flush(self) -> None:
        """Makes every line written so far durable (remote workdirs buffer; see workdir.py)."""
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


class Progress:
    """Formats the progress line: step, loss terms, steps/s and ETA.

    The first step of a session includes the compilation, so its line shows that time instead,
    and the rate (hence the ETA) is the mean over the steps after it.
    """

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self._created = time.monotonic()
        self._since: tuple[int, float] | None = None  # (step, time) of the first line

    def line(self, step: int, scalars: Mapping[str, float]) -> tuple[str, float]:
        """(the line, steps per second; 0.0 until it can be measured)."""
        now = time.monotonic()
        terms = ' '.join(
            f'{k}={scalars[k]:.4f}'
            for k in ('loss', 'loss_mim', 'loss_global', 'loss_local')
            if k in scalars
        )
        head = f'step {step}/{self.total_steps} {terms}'
        if self._since is None:
            self._since = step, now
            return f'{head} (first step, with compilation: {now - self._created:.1f} s)', 0.0
        first_step, first_time = self._since
        rate = (step - first_step) / max(now - first_time, 1e-9)
        eta = (self.total_steps - step) / rate if rate > 0 else math.inf
        return f'{head} {rate:.2f} steps/s ETA {duration(eta)}', rate


def duration(seconds: float) -> str:
    """h:mm:ss, or '?' for an unknown duration."""
    if not math.isfinite(seconds):
        return '?'
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f'{h}:{m:02d}:{s:02d}'
