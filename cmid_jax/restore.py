"""A workdir's train state for export and evaluation: `restore_train_state(workdir)`.

It builds the train step of the workdir's config.json to know the state's structure, so it lives
here rather than in `cmid_jax.workdir`, which never imports the model.
"""

from __future__ import annotations

import jax
import ml_collections

from cmid_jax import optim, parallel
from cmid_jax.config_resolve import resolve
from cmid_jax.errors import WorkdirError
from cmid_jax.step import TrainStep
from cmid_jax.workdir import CKPT, Workdir


def restore_train_state(
    workdir: str, step: int | None = None
) -> tuple[ml_collections.FrozenConfigDict, dict, int]:
    """(resolved config, train state, step) from a workdir's checkpoint, on the first local device.

    `step` None: the newest checkpoint that restores (a damaged newer one is skipped with a
    warning and left in place: only a training run moves checkpoints). The data iterator is not
    restored.
    """
    wd = Workdir(workdir)
    config = resolve(wd.read_config())
    # The schedule does not change any shape; an imported workdir may not have resolved it yet.
    step_fn = TrainStep.create(
        config, optim.Schedule(config.total_steps or 1, config.steps_per_epoch or 1)
    )
    abstract = parallel.with_sharding(
        step_fn.abstract_state, jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    )
    if not wd.has_checkpoints():
        raise WorkdirError(f'no checkpoint under {wd / CKPT}', 'run cmid-pretrain there first')
    checkpoints = wd.checkpoints(read_only=True)
    try:
        if step is None:
            state, step = checkpoints.restore_newest(abstract)
            if state is None:
                raise WorkdirError(
                    f'no complete checkpoint under {wd / CKPT}', 'run cmid-pretrain there first'
                )
        elif step not in checkpoints.steps():
            raise WorkdirError(
                f'no checkpoint of step {step} in {wd / CKPT}',
                f'available steps: {checkpoints.steps()}',
            )
        else:
            state = checkpoints.restore(step, abstract)
    finally:
        checkpoints.close()
    return config, state, step
