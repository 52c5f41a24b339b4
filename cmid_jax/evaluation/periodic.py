"""The evaluations the train loop runs every so many steps: the online forms of the protocols the
config asks for (`protocols.online_evals`: the online kNN with `eval.path`, the online dense
probe with `eval.dense_path`) and the reconstruction grids.

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
from cmid_jax.evaluation import protocols
from cmid_jax.evaluation.reconstruction import make_reconstruction_fn
from cmid_jax.workdir import METRICS, Workdir


class PeriodicEvals:
    """Built once (each online evaluation reads its data into memory, the functions jitted)."""

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
        self.specs = protocols.online_evals(config)
        self.online = {name: spec.build(config, mesh) for name, spec in self.specs.items()}
        self.reconstruct = None
        if config.loss.use_mim and config.images_every_steps:
            self.reconstruct = make_reconstruction_fn(config, out_sharding=NamedSharding(mesh, P()))

    def _due(self, step: int, every: int) -> bool:
        return step % every == 0 or step == self.total_steps

    def run_online(self, name: str, step: int, state: dict) -> dict[str, float]:
        """Runs the online form of protocol `name`, logs its scalars and redraws its curve."""
        spec = self.specs[name]
        preview = None
        if spec.preview and self.is_main:
            preview = self.images_dir / f'{spec.curve}_{step:08d}.png'
        scores = self.online[name](state, preview)
        self.writer.write_scalars(step, scores)
        logging.info('step %d: %s', step, ' '.join(f'{k}={v:.4f}' for k, v in scores.items()))
        if self.is_main:
            self.writer.flush()  # The curve reads metrics.jsonl back (buffered when remote).
            spec.plot(self.metrics_path, self.images_dir / f'{spec.curve}.png', tuple(scores))
        return scores

    def first_points(self, step: int, state: dict) -> dict[str, float]:
        """The curves' first points: at step 0 the untrained baseline; on a resume the restored
        state, unless metrics.jsonl already holds that curve's point for the step. Without it, a
        run resumed with eval.path after an earlier part without it (the demo, say) drew its
        curve from its next due evaluation only: a single point when that is the last step."""
        logged = self._logged_steps()
        scores = {}
        for name, spec in self.specs.items():
            if step not in logged[spec.metric_prefix]:
                scores.update(self.run_online(name, step, state))
        return scores

    def _logged_steps(self) -> dict[str, set[int]]:
        """{metric prefix: the steps metrics.jsonl has a value of that curve at}."""
        records = self.workdir.read_jsonl(METRICS)
        return {
            p: {int(r['step']) for r in records if 'step' in r and any(k.startswith(p) for k in r)}
            for p in {spec.metric_prefix for spec in self.specs.values()}
        }

    def __call__(self, step: int, state: dict, batch: dict) -> dict[str, float]:
        """Runs whatever is due after `step`; returns the scalars it logged."""
        scores = {}
        for name in self.specs:
            if self._due(step, self.config.eval.every_steps):
                scores.update(self.run_online(name, step, state))
        if self.reconstruct is not None and self._due(step, self.config.images_every_steps):
            views = jax.device_get(self.reconstruct(state, batch))
            if self.is_main:
                grid = visualize.reconstruction_grid(
                    views, views['reconstruction'], self.config.data.mean, self.config.data.std
                )
                visualize.save_png(self.images_dir / f'reconstruction_{step:08d}.png', grid)
                self.writer.write_images(step, {'reconstruction': grid[None]})
        return scores
