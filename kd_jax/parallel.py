"""Data parallelism: one 1-D ("data",) mesh over every device of every process.

`jax.jit` over this mesh replaces `pmap`: the batch is sharded along "data", the train state and
the teacher are replicated, and every batch-level quantity (BatchNorm statistics, relational
losses, Sinkhorn-Knopp, top-k) is computed over the *global* batch, so a run gives the same
numbers on 1 CPU, 8 devices or a pod slice.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed(requested: bool = False) -> None:
    """Starts JAX's multi-controller runtime when a config key or env var asks for it.

    `launch/` sets KD_JAX_DISTRIBUTED=1 on pods and multi-node GPU hosts; on TPU VMs
    `jax.distributed.initialize()` finds the coordinator by itself, elsewhere it reads
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (or the explicit env vars below).
    """
    if not (requested or os.environ.get("KD_JAX_DISTRIBUTED", "") not in ("", "0")):
        return
    if jax.distributed.is_initialized():
        return
    kwargs = {}
    if os.environ.get("KD_JAX_COORDINATOR"):
        kwargs = dict(
            coordinator_address=os.environ["KD_JAX_COORDINATOR"],
            num_processes=int(os.environ["KD_JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["KD_JAX_PROCESS_ID"]),
        )
    jax.distributed.initialize(**kwargs)


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all devices. Built with `Mesh` (Auto axes), not `jax.make_mesh`, whose
    Explicit axes would demand an out_sharding for every B×B Gram matrix over the batch."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh, key: str = "batch_size") -> int:
    """Returns the per-process batch; fails with the config key named when it cannot split."""
    n_dev, n_proc = mesh.devices.size, jax.process_count()
    if global_batch % n_dev:
        raise ValueError(
            f"config.{key}={global_batch} must be divisible by the number of devices ({n_dev}): "
            f"each device takes an equal share of the global batch. Try "
            f"{max(n_dev, global_batch // n_dev * n_dev)}."
        )
    return global_batch // n_proc


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Host-local numpy arrays -> global jax.Arrays sharded along the batch axis."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local
    )


def replicate(tree, mesh: Mesh):
    """Places a pytree (identical on every process) replicated on the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda x: (
            jax.make_array_from_process_local_data(sharding, np.asarray(x))
            if jax.process_count() > 1
            else jax.device_put(x, sharding)
        ),
        tree,
    )


def allgather_ints(value: int) -> np.ndarray:
    """Gathers one integer from every process (e.g. per-host example counts)."""
    if jax.process_count() == 1:
        return np.asarray([value])
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray([value]))).reshape(-1)


def to_host(tree):
    """Fully-replicated or addressable global arrays -> numpy on this host."""

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(fetch, tree)
