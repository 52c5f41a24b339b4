"""Data-parallel mesh, shardings, multi-host set-up and the multi-host primitives (a barrier and
a value shared from process 0, through JAX's coordination service).

Parameters, optimizer state, teacher, queue and centre are replicated; the batch is split over
the `data` axis. Under `jax.jit` the BatchNorm statistics, the InfoNCE logits and the centre
update then reduce over the global batch (SyncBN semantics, D7) without hand-written collectives.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def maybe_initialize_distributed() -> None:
    """Joins a multi-host job when the launcher says there is one.

    TPU pod slices and SLURM / Open MPI clusters are detected by JAX itself; a plain multi-process
    launch sets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    """
    env = os.environ
    if 'JAX_COORDINATOR_ADDRESS' in env:
        jax.distributed.initialize(
            coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
            num_processes=int(env['JAX_NUM_PROCESSES']),
            process_id=int(env['JAX_PROCESS_ID']),
        )
    elif any(k in env for k in ('TPU_WORKER_HOSTNAMES', 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE')):
        jax.distributed.initialize()


def make_mesh(devices=None) -> Mesh:
    """A 1-D `data` mesh over `devices` (default: every device of every process)."""
    # jax.sharding.Mesh gives Auto axes (classic GSPMD); jax.make_mesh would default to Explicit.
    return Mesh(np.asarray(jax.devices() if devices is None else devices), ('data',))


def shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
    """(replicated, batch-split) shardings."""
    return NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))


def global_batch(local_batch: dict, batch_sharding: NamedSharding) -> dict:
    """Assembles each host's slice of the batch into global arrays sharded over `data`."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding, np.asarray(x)), local_batch
    )


def with_sharding(abstract_tree, sharding) -> dict:
    """`jax.ShapeDtypeStruct`s of `abstract_tree` placed with `sharding` (restore targets)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_tree
    )


# --- Multi-host primitives (coordination service, no device collective) ---------------------


def sync_processes(name: str) -> None:
    """A barrier of all processes through JAX's coordination service (no device collective, so
    it never creates a communicator the train step's collectives would have to agree on)."""
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(ocp.multihost.unique_barrier_key(name))


def share_from_process_0(name: str, value: str | None) -> str:
    """`value` of process 0, on every process (through the coordination service's key-value
    store); `value` is ignored elsewhere."""
    if jax.process_count() == 1:
        return value
    client = ocp.multihost.get_jax_distributed_client()
    key = f'cmid_jax/{ocp.multihost.unique_barrier_key(name)}'
    if jax.process_index() == 0:
        client.key_value_set(key, value)
        return value
    return client.blocking_key_value_get(key, ocp.multihost.coordination_timeout() * 1000)
