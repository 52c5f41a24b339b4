"""Orbax checkpoints of the train state together with the grain iterator position.

Saves are asynchronous; orbax writes each step to a temporary directory and renames it only when
complete, so an interrupted save is never picked up by `latest_step()`.
"""

from __future__ import annotations

import os

import grain
import jax
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
        """Restores into `abstract_state`'s shapes and shardings; moves the iterator in place."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                          data=grain.checkpoint.CheckpointRestore(data_iterator)))
        return restored['state']

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_with_sharding(abstract_state, sharding) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        abstract_state)
