"""Orbax checkpoints of the train state together with the grain iterator position.

Saves are asynchronous; orbax writes each step to a temporary directory and renames it only when
complete, so an interrupted save is never picked up by `latest_step()`.
"""

from __future__ import annotations

import json
import os

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves and restores `{'state': train state, 'data': grain iterator}` under workdir/ckpt."""

    def __init__(self, workdir: str, *, every_steps: int, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every_steps,
                                               create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'ckpt')),
                                             options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_iterator, *, force: bool = False) -> bool:
        return self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=grain.checkpoint.CheckpointSave(data_iterator)),
            force=force)

    def restore(self, step: int, abstract_state, data_iterator) -> dict:
        """Restores into `abstract_state`'s shapes and shardings; moves the iterator in place.

        A checkpoint without a data item (written by `import_torch`) starts the iterator afresh.
        """
        args = {'state': ocp.args.StandardRestore(abstract_state)}
        if (self.manager.directory / str(step) / 'data').exists():  # epath: local or remote.
            args['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**args))['state']

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_with_sharding(abstract_state, sharding) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        abstract_state)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes workdir/config.json atomically (a crash never leaves half a file)."""
    path = os.path.join(workdir, 'config.json')
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(path + '.tmp', 'w', encoding='utf-8') as f:
            f.write(config.to_json_best_effort(indent=2))
        os.replace(path + '.tmp', path)
    except OSError as e:
        raise OSError(f'Cannot write to the workdir {workdir!r} ({e.strerror or e}); choose a '
                      'writable folder with free space. Nothing in it was changed.') from e


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to workdir/config.json."""
    path = os.path.join(workdir, 'config.json')
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} not found: {workdir!r} is not a cmid_jax workdir '
                                '(run cmid_jax.main or cmid_jax.convert.import_torch there first).')
    with open(path, encoding='utf-8') as f:
        return ml_collections.ConfigDict(json.load(f))


def restore_train_state(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict,
                                                                         dict, int]:
    """Loads (config, train state, step) from a workdir's checkpoint; latest step by default.

    The state is restored onto the first local device, without the data iterator, for export and
    evaluation.
    """
    from cmid_jax import optim  # Deferred: step.py builds the networks, which this module need not.
    from cmid_jax.step import Trainer

    config = load_config(workdir)
    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'ckpt')))
    steps = manager.all_steps()
    if not steps:
        raise FileNotFoundError(f'no checkpoint under {os.path.join(workdir, "ckpt")}')
    step = max(steps) if step is None else step
    if step not in steps:
        raise ValueError(f'no checkpoint of step {step} in {workdir}; available: {sorted(steps)}')
    # The schedule does not change any shape; an imported workdir may not have resolved it yet.
    trainer = Trainer.create(config, optim.Schedule(config.total_steps or 1,
                                                    config.steps_per_epoch or 1))
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = abstract_with_sharding(trainer.abstract_state, sharding)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    manager.close()
    return config, restored['state'], step
