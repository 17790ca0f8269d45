"""One data-parallel story: a 1-D mesh named `data` over every device of every host.

Batches are sharded along their leading axis over `data`; parameters and optimizer states are
replicated. A jitted step given arrays with these shardings runs unchanged on one CPU, several
local devices, or several hosts (JAX's multi-controller runtime); XLA inserts the reductions.
The meta-learners' gradients, which each device must take of its own tasks only, go through
`data_parallel_gradient` (shard_map, then an explicit mean over devices).
"""

from __future__ import annotations

import socket
import time
from typing import Callable, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout_s: int = 60) -> None:
    """Starts JAX's multi-controller runtime when asked to; a no-op for a single process.

    Give all three arguments on a cluster JAX cannot detect (localhost tests, plain GPU hosts);
    give none where it can (Cloud TPU VMs, Slurm): set `num_processes=-1` to let JAX detect it.
    On CPU the cross-process collectives use gloo. `timeout_s` bounds how long a process waits
    for the others, so an unreachable coordinator fails instead of hanging.
    """
    if num_processes is None or num_processes == 1:
        if coordinator_address:
            raise ValueError("--coordinator_address given but --num_processes is 1: set the "
                             "number of processes of the run.")
        return
    if num_processes == -1:
        jax.distributed.initialize(initialization_timeout=timeout_s)
        return
    if not coordinator_address or process_id is None:
        raise ValueError(f"--num_processes={num_processes} needs --coordinator_address (host:port "
                         "of process 0) and --process_id (0..num_processes-1).")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id} is outside 0..{num_processes - 1}.")
    if process_id != 0:
        wait_for_coordinator(coordinator_address, timeout_s)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX aborts the process (DEADLINE_EXCEEDED, RegisterTask) when not every process joins in
    # time; this line, printed first, says what that means.
    logging.info("Joining a %d-process run at %s as process %d. Waiting up to %d s for all "
                 "processes; a DEADLINE_EXCEEDED abort means they did not all start with "
                 "--coordinator_address=%s and --num_processes=%d (each with its own "
                 "--process_id).", num_processes, coordinator_address, process_id, timeout_s,
                 coordinator_address, num_processes)
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=timeout_s)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Waits until `host:port` accepts TCP connections, or raises a clear `TimeoutError`.

    JAX's own client aborts the whole process with a low-level message when the coordinator never
    answers; probing first turns that into an error that says what to check.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator_address={address!r} is not host:port.")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"No coordinator answered at {address} within {timeout_s} s ({e}). Start "
                    "process 0 (--process_id=0) with the same --coordinator_address and "
                    "--num_processes, check the host and port, or raise "
                    "--distributed_timeout.") from e
            time.sleep(0.2)


def make_mesh() -> Mesh:
    """A 1-D mesh over all devices of all processes, axis `data`."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Arrays split over the mesh along dimension `axis` (the batch dimension)."""
    return NamedSharding(mesh, P(*([None] * axis), DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_global_batch(global_batch: int, mesh: Mesh, what: str = "batch size") -> int:
    """Returns the per-device batch, or raises if `global_batch` does not split evenly."""
    num_devices = mesh.devices.size
    if global_batch % num_devices:
        raise ValueError(f"{what} {global_batch} is not divisible by the {num_devices} devices "
                         f"of the mesh; choose a multiple of {num_devices}.")
    return global_batch // num_devices


def data_parallel_gradient(fn: Callable, mesh: Mesh, batch_inputs: Sequence[bool]) -> Callable:
    """`fn(params, *inputs) -> (averaged, split)`, with the batch split over the mesh axis `data`.

    Inputs flagged in `batch_inputs` are split along their leading axis, the others and `params`
    replicated. Each device runs `fn` on its share with a device-varying copy of `params`
    (`pcast`): the gradient with respect to a replicated value would be summed over devices (also
    inside an inner loop, mixing tasks). `averaged` is the mean over devices (`pmean`), equal to
    `fn` on the whole batch when it is a mean over the batch; `split` stays split.
    """
    def local(params, *inputs):
        averaged, split = fn(jax.lax.pcast(params, DATA_AXIS, to="varying"), *inputs)
        return jax.lax.pmean(averaged, DATA_AXIS), split

    in_specs = (P(),) + tuple(P(DATA_AXIS) if split else P() for split in batch_inputs)
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=(P(), P(DATA_AXIS)))


def shard_batch(mesh: Mesh, local_batch, axis: int = 0):
    """Assembles each process's share of a batch (a pytree of numpy arrays, batch dimension
    `axis`) into global arrays sharded over the mesh along that dimension."""
    sharding = batch_sharding(mesh, axis)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        local_batch)


def place(tree, shardings):
    """Puts a pytree of host arrays, identical on every process, on the mesh: `shardings` is one
    sharding for every leaf or a pytree of them; each process places only its devices' pieces."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def put(x, sharding):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree, shardings)


def replicate(mesh: Mesh, tree):
    """Places a pytree, identical on every process, on every device of the mesh."""
    return place(tree, replicated_sharding(mesh))


def to_host(tree):
    """Fetches a pytree of replicated (or fully addressable) arrays to numpy on this process."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = x.addressable_shards[0].data
        return np.asarray(x)
    return jax.tree.map(get, tree)


def fingerprint(tree) -> str:
    """A short digest of a pytree of (replicated) arrays: the float64 sum of |x| over all leaves.

    Equal parameters give equal digests on every process, so launchers log it at the end of a
    run and tests compare it across processes and across interrupted and uninterrupted runs.
    """
    leaves = jax.tree.leaves(to_host(tree))
    return f"{sum(float(np.sum(np.abs(np.asarray(x, np.float64)))) for x in leaves):.10e}"


def log_fingerprint(step: int, tree) -> None:
    """Logs `Parameter fingerprint at step <step>: <digest>` (every process)."""
    logging.info("Parameter fingerprint at step %d: %s", step, fingerprint(tree))


def agree(decision: bool) -> bool:
    """Process 0's `decision` on every process (e.g. whether a time limit has passed, which each
    process would judge by its own clock)."""
    if jax.process_count() == 1:
        return bool(decision)
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(decision)))


def is_main_process() -> bool:
    return jax.process_index() == 0
