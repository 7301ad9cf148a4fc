"""Multi-host start-up and per-host batches.

Every process of a multi-host run (a TPU pod slice, a GPU cluster) calls `initialize_distributed()` once, before any
other JAX call; `jax.devices()` then lists the devices of every host and one mesh spans them. Each host loads its
own share of each batch, and `global_batch` assembles the shares into global `jax.Array`s split over the mesh as the
`batch` logical axis says (`jax.make_array_from_process_local_data`: no host ever holds the whole batch).

Environment variables, read for any argument not given:
  A1_JAX_COORDINATOR    host:port of the coordinator service that process 0 starts (e.g. 10.0.0.2:8476)
  A1_JAX_NUM_PROCESSES  number of processes in the run (usually one per host)
  A1_JAX_PROCESS_ID     this process's index, 0 .. A1_JAX_NUM_PROCESSES-1
  A1_JAX_DISTRIBUTED    `auto`: let JAX find the cluster itself (Cloud TPU pods and multi-slice, SLURM, Open MPI,
                        ...); any of the three above that is set still wins over what JAX detects
Without `auto`, the coordinator, process count and process id come together (all three or none). With none of
them, or a process count of 1, the run is single-process and nothing is initialised.

Where hosts must agree (a workdir created once, resume or start, the step to resume from), process 0 decides and
`agree` hands its value to every process; `barrier` holds each process until all reach it. Both are free in a
single-process run. Values of sharded arrays are read through `gather`: `device_get` of a shard another process
holds fails, so what is read is first computed onto every device (a collective every process joins).
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from a1_jax.errors import UserError
from a1_jax.parallel import axes
from a1_jax.parallel.mesh import Rules, logical_sharding

ENV_COORDINATOR = "A1_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "A1_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "A1_JAX_PROCESS_ID"
ENV_DISTRIBUTED = "A1_JAX_DISTRIBUTED"


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name} must be an integer, got {value!r}") from None


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, auto: bool = False,
                           environ: Mapping[str, str] | None = None) -> bool:
    """Joins this process to a multi-process run when the arguments or the environment ask for one.

    `coordinator`/`num_processes`/`process_id` (else `A1_JAX_*`, see the module docstring) go to
    `jax.distributed.initialize`; `auto=True` (or `A1_JAX_DISTRIBUTED=auto`) lets JAX detect what is not given.
    Idempotent: a second call returns at once. Returns whether the run is multi-process.
    """
    if jax.distributed.is_initialized():
        return True
    environ = os.environ if environ is None else environ
    coordinator = coordinator or environ.get(ENV_COORDINATOR, "").strip() or None
    num_processes = _env_int(environ, ENV_NUM_PROCESSES) if num_processes is None else num_processes
    process_id = _env_int(environ, ENV_PROCESS_ID) if process_id is None else process_id
    mode = environ.get(ENV_DISTRIBUTED, "").strip().lower()
    if mode not in ("", "auto"):
        raise UserError(f"{ENV_DISTRIBUTED} must be 'auto' or unset, got {mode!r}")
    auto = auto or mode == "auto"

    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if num_processes == 1 or not (auto or any(v is not None for v in given.values())):
        return False  # single-process
    if not auto and None in given.values():
        missing = [name for name, value in given.items() if value is None]
        raise UserError(f"a multi-process run needs the coordinator address, process count and process id; "
                        f"missing {missing} (set {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}, or "
                        f"{ENV_DISTRIBUTED}=auto on a TPU pod or SLURM cluster to let JAX detect them)")
    if num_processes is not None and num_processes < 1:
        raise UserError(f"the process count must be at least 1, got {num_processes}")
    if process_id is not None and (process_id < 0 or (num_processes is not None and process_id >= num_processes)):
        raise UserError(f"process id {process_id} must be at least 0 and below the process count ({num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return True


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (`name` must be the same on all, and unique per use)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(value: int) -> int:
    """Process 0's integer, on every process (each host may see a shared filesystem at another moment)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def gather(fn: Any, tree: Any, mesh: Mesh | None) -> Any:
    """`fn(tree)` computed under `jax.jit`, its result on every device of `mesh` (None: the default device): every
    process can read it (`np.asarray`), where reading a shard another process holds would fail."""
    from jax.sharding import NamedSharding, PartitionSpec

    out = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    return jax.jit(fn, out_shardings=out)(tree)


def batch_ways(mesh: Mesh, rules: Rules) -> int:
    """How many ways the mesh splits the `batch` logical axis: a global batch must be a multiple of it."""
    spec = logical_sharding((axes.BATCH,), mesh, rules).spec
    return math.prod(mesh.shape[a] for a in jax.tree_util.tree_leaves(tuple(spec[:1])))


def global_batch(host_batch: Any, mesh: Mesh, rules: Rules) -> Any:
    """This host's share of a batch -> global `jax.Array`s, split over `mesh` along the `batch` logical axis.

    `host_batch`: a tree (e.g. a dict) of NumPy arrays, each with the batch on axis 0 and this host's rows only
    (every process passes its own, in the same tree structure). The global batch has `jax.process_count()` times
    as many rows; where each host's rows land follows the mesh's device order (for training any order will do: every
    row is a distinct example). On one host it equals `host_batch`.
    """
    def one(array: Any) -> jax.Array:
        array = np.asarray(array)
        if array.ndim == 0:
            raise ValueError("global_batch needs arrays with a leading batch axis; got a scalar")
        sharding = logical_sharding((axes.BATCH,) + (None,) * (array.ndim - 1), mesh, rules)
        ways = batch_ways(mesh, rules)
        rows = array.shape[0] * jax.process_count()
        if rows % ways:
            raise UserError(f"a global batch of {rows} examples ({array.shape[0]} per host) does not split over the "
                            f"{ways} devices of the mesh's batch axes {sharding.spec[0]}; use a batch size that is a "
                            f"multiple of {ways}")
        return jax.make_array_from_process_local_data(sharding, array)

    return jax.tree_util.tree_map(one, host_batch)
