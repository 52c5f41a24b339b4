"""Random batches in the input pipeline's format, for tests and benchmarks (numpy only, no jax)."""

from __future__ import annotations

import math

import numpy as np


def synthetic_batch(seed: int, batch: int, size: int, ratio: float = 0.6) -> dict:
    """A random batch in the pipeline's format (uint8 crops, exact-count masks, pixel grids)."""
    rng = np.random.default_rng(seed)
    g = size // 32
    masks = np.zeros((2, batch, g * g), bool)
    for v in range(2):
        for i in range(batch):
            masks[v, i, rng.choice(g * g, math.ceil(g * g * ratio), replace=False)] = True
    cells = (np.arange(g) + 0.5) * 32
    grid = np.stack(np.meshgrid(cells, cells, indexing='ij'), -1).astype(np.float32)
    loc = lambda: (grid[None] * rng.uniform(0.5, 1.5, (batch, 1, 1, 1))
                   + rng.uniform(0, 40, (batch, 1, 1, 2)))
    return {
        'img_a': rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
        'img_b': rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
        'mask_a': masks[0].reshape(batch, g, g), 'mask_b': masks[1].reshape(batch, g, g),
        'loc_a': loc().astype(np.float32), 'loc_b': loc().astype(np.float32),
    }
