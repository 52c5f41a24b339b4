"""The evaluations the train loop runs every so many steps: online kNN, the online dense probe
and reconstruction grids.

Every process runs the jitted computations (they are collective on a multi-host mesh); only
process 0 writes files. Each curve gets its first point where the session starts
(`first_points`).
"""

from __future__ import annotations

import jax
import ml_collections
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cmid_jax import visualize
from cmid_jax.evaluation.online import make_online_knn
from cmid_jax.evaluation.online_dense import make_online_dense
from cmid_jax.evaluation.reconstruction import make_reconstruction_fn
from cmid_jax.workdir import METRICS, Workdir


class PeriodicEvals:
    """Built once (the labelled split is decoded into memory, the functions jitted)."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        mesh: Mesh,
        workdir: Workdir,
        writer,
        total_steps: int,
    ):
        self.config, self.writer, self.total_steps = config, writer, total_steps
        self.is_main = jax.process_index() == 0
        self.images_dir = workdir.images_dir()
        self.workdir = workdir
        self.metrics_path = workdir / METRICS
        self.knn = make_online_knn(config, mesh=mesh) if config.eval.path else None
        self.dense = make_online_dense(config) if config.eval.dense_path else None
        self.reconstruct = None
        if config.loss.use_mim and config.images_every_steps:
            self.reconstruct = make_reconstruction_fn(config, out_sharding=NamedSharding(mesh, P()))

    def _due(self, step: int, every: int) -> bool:
        return step % every == 0 or step == self.total_steps

    def run_knn(self, step: int, state: dict) -> dict[str, float]:
        scores = self.knn(state)
        self.writer.write_scalars(step, scores)
        logging.info('step %d: %s', step, ' '.join(f'{k}={v:.4f}' for k, v in scores.items()))
        if self.is_main:
            self.writer.flush()  # The curve reads metrics.jsonl back (buffered when remote).
            visualize.plot_knn_curve(self.metrics_path, self.images_dir / 'knn.png')
        return scores

    def run_dense(self, step: int, state: dict) -> dict[str, float]:
        preview = self.images_dir / f'dense_{step:08d}.png' if self.is_main else None
        scores = self.dense(state, preview)
        self.writer.write_scalars(step, scores)
        logging.info('step %d: %s', step, ' '.join(f'{k}={v:.4f}' for k, v in scores.items()))
        if self.is_main:
            self.writer.flush()
            visualize.plot_training_curves(
                self.metrics_path, self.images_dir / 'dense.png', names=tuple(scores), columns=1
            )
        return scores

    def first_points(self, step: int, state: dict) -> dict[str, float]:
        """The curves' first points: at step 0 the untrained baseline; on a resume the restored
        state, unless metrics.jsonl already holds that curve's point for the step. Without it, a
        run resumed with eval.path after an earlier part without it (the demo, say) drew its
        curve from its next due evaluation only: a single point when that is the last step."""
        logged = self._logged_steps()
        scores = {}
        if self.knn is not None and step not in logged['knn_top1']:
            scores.update(self.run_knn(step, state))
        if self.dense is not None and step not in logged['dense_']:
            scores.update(self.run_dense(step, state))
        return scores

    def _logged_steps(self) -> dict[str, set[int]]:
        """{'knn_top1': steps, 'dense_': steps} that metrics.jsonl has a value of those curves at."""
        records = self.workdir.read_jsonl(METRICS)
        return {
            p: {int(r['step']) for r in records if 'step' in r and any(k.startswith(p) for k in r)}
            for p in ('knn_top1', 'dense_')
        }

    def __call__(self, step: int, state: dict, batch: dict) -> dict[str, float]:
        """Runs whatever is due after `step`; returns the scalars it logged."""
        scores = {}
        if self.knn is not None and self._due(step, self.config.eval.every_steps):
            scores.update(self.run_knn(step, state))
        if self.dense is not None and self._due(step, self.config.eval.every_steps):
            scores.update(self.run_dense(step, state))
        if self.reconstruct is not None and self._due(step, self.config.images_every_steps):
            views = jax.device_get(self.reconstruct(state, batch))
            if self.is_main:
                grid = visualize.reconstruction_grid(
                    views, views['reconstruction'], self.config.data.mean, self.config.data.std
                )
                visualize.save_png(self.images_dir / f'reconstruction_{step:08d}.png', grid)
                self.writer.write_images(step, {'reconstruction': grid[None]})
        return scores
