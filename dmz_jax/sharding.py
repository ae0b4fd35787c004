"""Device mesh and shardings: the batch split over every device, the train state split over
the "fsdp" axis.

The mesh has axes ("data", "fsdp"). The batch is split over both. With mesh.fsdp = 1 the
state (parameters, EMA, optimizer moments) is replicated; with mesh.fsdp = F > 1 every
array of it is split F ways along one of its dimensions (`state_shardings`), so each device
holds about 1/F of the state and XLA gathers what a step needs (fully sharded data
parallelism). The same code runs on 1 CPU, 8 GPUs or a TPU pod.
"""

from __future__ import annotations

import collections
import itertools
from typing import Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")  # the batch is split over both axes


def create_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default: all); data=-1 takes what is left."""
    devices = jax.devices() if devices is None else list(devices)
    if data == -1:
        if len(devices) % fsdp:
            raise ValueError(f"mesh.fsdp={fsdp} does not divide the {len(devices)} devices.")
        data = len(devices) // fsdp
    if data * fsdp != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} != {len(devices)} devices.")
    return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple, fsdp: int) -> P:
    """The PartitionSpec of an array of `shape` in the state: its largest dimension that
    `fsdp` divides (the last of equals) split on "fsdp"; replicated when none is (scalars,
    odd sizes) or fsdp == 1."""
    dims = [i for i, n in enumerate(shape) if fsdp > 1 and n % fsdp == 0]
    if not dims:
        return P()
    axis = max(dims, key=lambda i: (shape[i], i))
    return P(*(["fsdp" if i == axis else None for i in range(len(shape))]))


def state_shardings(abstract_state, mesh: Mesh):
    """A NamedSharding per array of `abstract_state` (anything with .shape): `fsdp_spec`
    on `mesh`, replicated on "data"."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp)),
                        abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every mesh axis."""
    return NamedSharding(mesh, P(DATA_AXES))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Per-process numpy batch -> global jax.Arrays sharded on the batch axis."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def prefetch_to_mesh(local_batches: Iterator[dict], mesh: Mesh, size: int = 2
                     ) -> Iterator[dict]:
    """`global_batch` of each local batch, `size` batches ahead: their host-to-device copies
    (asynchronous) overlap the steps that run before they are needed."""
    queue = collections.deque()

    def enqueue(n):
        for local in itertools.islice(local_batches, n):
            queue.append(global_batch(local, mesh))

    enqueue(size)
    while queue:
        yield queue.popleft()
        enqueue(1)


def per_process_batch_size(global_batch_size: int) -> int:
    """The share of the global batch this process feeds."""
    if global_batch_size % jax.process_count():
        raise ValueError(f"batch_size {global_batch_size} is not divisible by the "
                         f"{jax.process_count()} processes.")
    return global_batch_size // jax.process_count()


def process_rows(mesh: Mesh, global_batch_size: int) -> tuple[int, int]:
    """(first, stop): the rows of a global batch that this process's devices hold; raises
    when they are not one contiguous block (a mesh whose device order interleaves processes:
    build it from jax.devices(), as `create_mesh` does)."""
    indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    rows = sorted({i for index in indices.values()
                   for i in range(*index[0].indices(global_batch_size))})
    if rows != list(range(rows[0], rows[-1] + 1)):
        raise ValueError("This process's devices do not hold one contiguous block of the "
                         "batch; build the mesh from jax.devices() (sharding.create_mesh).")
    return rows[0], rows[-1] + 1

