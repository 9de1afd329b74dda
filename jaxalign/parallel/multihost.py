"""Multi-host start-up: `jax.distributed.initialize` from the config, the environment, or auto-detection.

Order of precedence:
1. `distributed.coordinator_address` / `num_processes` / `process_id` in the config (any launcher);
2. the environment: JAXALIGN_COORDINATOR_ADDRESS, JAXALIGN_NUM_PROCESSES, JAXALIGN_PROCESS_ID (what
   launch/local_multiprocess.sh and launch/gpu_mpirun.sh export);
3. JAX's own cluster detection (Cloud TPU pod slices, SLURM, Open MPI) when one of those environments is
   visible: jax.distributed.initialize() with no arguments;
4. otherwise a single process: nothing to do.

On CPU the cross-process collectives use gloo. A coordinator that never answers fails after
`distributed.timeout_s` seconds with a one-line error, instead of hanging the job.
"""
import os

import jax

from jaxalign import JaxalignError

ENV = ("JAXALIGN_COORDINATOR_ADDRESS", "JAXALIGN_NUM_PROCESSES", "JAXALIGN_PROCESS_ID")
CLUSTER_HINTS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
_initialized = False


DEFAULTS = {"coordinator_address": "", "num_processes": 0, "process_id": -1, "timeout_s": 300}


def _section(section) -> dict:
    return {**DEFAULTS, **({k: section[k] for k in DEFAULTS if k in section} if section is not None else {})}


def settings(section=None) -> dict:
    """The explicit (address, count, id) from the config section or the environment, or {} for none."""
    s = _section(section)
    address = s["coordinator_address"] or os.environ.get(ENV[0], "")
    if not address:
        return {}
    count = s["num_processes"] or os.environ.get(ENV[1])
    pid = s["process_id"] if s["process_id"] >= 0 else os.environ.get(ENV[2])
    if count in (None, "") or pid in (None, ""):
        raise JaxalignError(f"distributed: coordinator {address} given without num_processes and process_id "
                            f"(config distributed.* or {ENV[1]}/{ENV[2]})")
    return {"coordinator_address": address, "num_processes": int(count), "process_id": int(pid)}


def cluster_detected() -> bool:
    """A launcher JAX can read its process layout from: SLURM with more than one task, Open MPI, a TPU pod."""
    if "SLURM_JOB_ID" in os.environ:
        return os.environ.get("SLURM_NTASKS", "2") != "1"
    return any(k in os.environ for k in CLUSTER_HINTS[1:])


def initialize(section=None, log=print) -> bool:
    """Join the job's processes (once per interpreter); True when running multi-process."""
    global _initialized
    if _initialized:
        return jax.process_count() > 1
    explicit = settings(section)
    if not explicit and not cluster_detected():
        return False
    timeout = int(_section(section)["timeout_s"])
    # CPU collectives across processes (only the CPU backend reads it; harmless on GPU/TPU)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit and explicit["process_id"] != 0:
        wait_for_coordinator(explicit["coordinator_address"], timeout)
    try:
        jax.distributed.initialize(**explicit, initialization_timeout=timeout)
    except Exception as e:  # the runtime raises assorted types (XlaRuntimeError, RuntimeError, ValueError)
        where = explicit.get("coordinator_address", "auto-detected cluster")
        raise JaxalignError(f"distributed: could not join the job at {where} within {timeout}s "
                            f"({str(e).splitlines()[0][:200]})") from None
    _initialized = True
    _barrier_timeout[0] = timeout
    _orbax_barriers_through_the_coordinator()
    if jax.process_index() == 0:
        log(f"distributed: {jax.process_count()} processes, {jax.device_count()} devices "
            f"({jax.local_device_count()} per process)")
    return True


def wait_for_coordinator(address: str, timeout: float):
    """Poll the coordinator's port until it accepts a connection: the runtime would abort the process (a C++
    check failure, no Python error) when it cannot register in time."""
    import socket
    import time
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise JaxalignError(f"distributed: coordinator address {address!r}: expected host:port")
    deadline = time.time() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as e:
            if time.time() >= deadline:
                raise JaxalignError(f"distributed: could not join the job at {address} within {timeout:.0f}s "
                                    f"(no coordinator answers: {e.strerror or e}); is process 0 running?") from None
            time.sleep(0.5)


_barrier_timeout = [300]  # distributed.timeout_s of the job this process joined
_barriers = [0]


def _orbax_barriers_through_the_coordinator():
    """Orbax's checkpoint barriers through the coordination service (its own 300 s timeout) instead of a device
    collective: on CPU that is a gloo collective, whose first use gives up after 30 s when the processes reach it
    that far apart (one still compiling on a cold cache: seen in CI)."""
    import orbax.checkpoint  # noqa: F401  (defines the flag)
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS(["jaxalign"], known_only=True)
    if "experimental_orbax_use_distributed_barrier" in flags.FLAGS:
        flags.FLAGS.experimental_orbax_use_distributed_barrier = True


def barrier(name: str):
    """Wait for every process at the coordination service (distributed.timeout_s), not a device collective."""
    from jax._src import distributed
    _barriers[0] += 1
    distributed.global_state.client.wait_at_barrier(f"jaxalign/{name}/{_barriers[0]}", _barrier_timeout[0] * 1000)


def allgather(x):
    """Every process's host array, concatenated along axis 0 in process order (identity on one process):
    for statistics that must span the global batch (advantage whitening, batch-scaled rewards). The processes
    meet at a barrier first, so the collective's own 30 s rendezvous (gloo on CPU) never waits on a straggler."""
    import numpy as np
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    barrier("allgather")
    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def local_rows(x, n: int):
    """This process's n rows of a process-ordered concatenation (the inverse of allgather)."""
    rank = jax.process_index()
    return x[rank * n:(rank + 1) * n]


def is_main() -> bool:
    return jax.process_index() == 0


def main_only(log):
    """A log function that prints on process 0 only (every process runs the same code)."""
    return lambda *a, **k: log(*a, **k) if jax.process_index() == 0 else None
