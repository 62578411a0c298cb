"""Multi-process runs: `initialize(...)` once, before any other JAX call.

Which processes form the run, in order of precedence:
  1. Explicit flags: `--coordinator_address=host:port --num_processes=N
     --process_id=i` (JAX's own `JAX_COORDINATOR_ADDRESS` also counts). On a
     detected cluster (2.) a flag left out is filled from the cluster.
  2. A cluster JAX configures by itself, detected from its environment
     variables: a SLURM job step of several tasks, a multi-host Cloud TPU
     slice, or `mpirun` (Open MPI). Then `jax.distributed.initialize()` runs
     with no arguments, as JAX documents for these environments.
  3. Otherwise one process: nothing is initialised, so a laptop run never
     opens a socket or waits for peers that will not come.

Multi-process CPU runs (tests, CPU clusters) also need a cross-process
collectives library: `cpu_collectives="gloo"` (`--cpu_collectives`) selects
it. Everything after `initialize` is the same code for one process or many:
`jax.devices()` is global, each process feeds its own rows of each batch
(`ftjax.data.pipeline`), only process 0 writes metrics (`ftjax.logs`), and
orbax writes one checkpoint from all processes together.
"""

import dataclasses
import os
from collections.abc import Sequence

import jax

from ftjax.errors import ConfigError

CPU_COLLECTIVES = ("gloo", "mpi")


@dataclasses.dataclass(frozen=True)
class Setup:
  """What `initialize` did, for the log: `how` is "single process", "flags" or a cluster name."""

  how: str
  coordinator_address: str | None = None
  num_processes: int = 1
  process_id: int = 0


def detect_cluster(environ=None) -> str | None:
  """The multi-process environment JAX can configure by itself, or None.

  Only environments of more than one process count: a one-task SLURM job
  (an interactive `salloc` shell, one node's GPUs) is an ordinary run, and
  initialising there would only hide the node's other devices (JAX gives a
  SLURM task the device of its local rank).
  """
  env = os.environ if environ is None else environ
  if "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env and _int(env, "SLURM_NTASKS") > 1:
    return "SLURM"
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return "Cloud TPU"
  if "MEGASCALE_COORDINATOR_ADDRESS" in env:
    return "Cloud TPU (multislice)"
  if "OMPI_MCA_orte_hnp_uri" in env and _int(env, "OMPI_COMM_WORLD_SIZE") > 1:
    return "Open MPI"
  return None


def _int(env, key: str) -> int:
  try:
    return int(env.get(key, ""))
  except ValueError:
    return 0


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
               *, cpu_collectives: str | None = None,
               initialization_timeout: int = 300) -> Setup:
  """Joins this process to the run, as the module docstring orders; returns what it did.

  Raises a one-line `ConfigError` for flags that cannot describe a run
  (process_id >= num_processes, a coordinator without a port, ...) before
  anything connects.
  """
  if cpu_collectives is not None:
    if cpu_collectives not in CPU_COLLECTIVES:
      raise ConfigError(f"--cpu_collectives={cpu_collectives!r}; expected one of "
                        f"{CPU_COLLECTIVES}")
    # Read when the CPU backend starts, so it must precede any device use.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)

  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  local_device_ids = list(local_device_ids) if local_device_ids else None
  cluster = detect_cluster()
  explicit = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if not any(explicit) and cluster is None:
    if local_device_ids:
      raise ConfigError("--local_device_ids is set but this is a single-process run; set "
                        "--coordinator_address, --num_processes and --process_id too")
    return Setup("single process")
  if cluster is None and not all(explicit):
    missing = [f"--{n}" for n, given in zip(("coordinator_address", "num_processes",
                                             "process_id"), explicit) if not given]
    raise ConfigError(f"a multi-process run needs {', '.join(missing)} as well (no SLURM, "
                      f"Cloud TPU or Open MPI environment to take them from)")
  _check(coordinator_address, num_processes, process_id, local_device_ids)
  if jax.distributed.is_initialized():
    raise ConfigError("jax.distributed is already initialised in this process; call "
                      "ftjax.distributed.initialize once, at start-up")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids,
                             initialization_timeout=initialization_timeout)
  return Setup("flags" if all(explicit) else cluster, coordinator_address,
               jax.process_count(), jax.process_index())


def _check(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
           local_device_ids: list[int] | None) -> None:
  """One-line errors for values that cannot be right, whatever the cluster."""
  if coordinator_address is not None:
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ConfigError(f"--coordinator_address={coordinator_address!r}; expected host:port "
                        f"of process 0, e.g. 10.0.0.1:1234")
  if num_processes is not None and num_processes < 1:
    raise ConfigError(f"--num_processes={num_processes}; expected >= 1")
  if process_id is not None and process_id < 0:
    raise ConfigError(f"--process_id={process_id}; expected >= 0")
  if None not in (num_processes, process_id) and process_id >= num_processes:
    raise ConfigError(f"--process_id={process_id} with --num_processes={num_processes}; "
                      f"expected 0 <= process_id < {num_processes}")
  if local_device_ids is not None:
    if any(i < 0 for i in local_device_ids) or len(set(local_device_ids)) != len(
        local_device_ids):
      raise ConfigError(f"--local_device_ids={','.join(map(str, local_device_ids))}; expected "
                        f"distinct device ids >= 0")
