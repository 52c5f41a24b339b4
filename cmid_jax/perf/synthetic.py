"""Random batches in the input pipeline's format, for tests and benchmarks (numpy only, no jax)."""

from __future__ import annotations

import numpy as np


def synthetic_batch(seed: int, batch: int, size: int) -> dict:
    """A random batch in the pipeline's format: uint8 crops and their pixel-position grids."""
    rng = np.random.default_rng(seed)
    g = size // 32
    cells = (np.arange(g) + 0.5) * 32
    grid = np.stack(np.meshgrid(cells, cells, indexing='ij'), -1).astype(np.float32)
    loc = lambda: (
        grid[None] * rng.uniform(0.5, 1.5, (batch, 1, 1, 1)) + rng.uniform(0, 40, (batch, 1, 1, 2))
    )
    return {
        'img_a': rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
        'img_b': rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
        'loc_a': loc().astype(np.float32),
        'loc_b': loc().astype(np.float32),
    }
