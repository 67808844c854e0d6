"""Process start-up for multi-process runs (TPU pods, GPU clusters, several CPU processes on one machine).

JAX is multi-controller: every process runs the same program on its own devices, and jax.distributed
connects them. `initialize` is called once per process, before any device is used:

  explicit      coordinator HOST:PORT, num_processes N, process_id I (bare clusters, CPU tests)
  auto          a cluster environment JAX knows (SLURM, Open MPI, a multi-host TPU pod) is detected from
                its environment variables; jax.distributed.initialize() then finds the rest itself
  single        neither: one process, nothing to initialise

On the CPU, collectives between processes go through gloo, and each process may simulate several devices
(`cpu_devices`, XLA's --xla_force_host_platform_device_count, read when the backend starts).
"""

from __future__ import annotations

import os
from typing import Mapping

import jax


class DistributedError(ValueError):
  """A multi-process setting that cannot work; the message names the problem."""


def detect_cluster(env: Mapping[str, str] | None = None) -> str | None:
  """The multi-process cluster environment the variables describe ("slurm", "openmpi", "tpu_pod"), or None."""
  env = os.environ if env is None else env
  count = lambda key: int(env.get(key, "1") or 1)
  if "SLURM_JOB_ID" in env and count("SLURM_NTASKS") > 1:
    return "slurm"
  if count("OMPI_COMM_WORLD_SIZE") > 1:
    return "openmpi"
  if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu_pod"
  return None


def set_cpu_devices(count: int) -> None:
  """Simulate `count` CPU devices in this process (before jax starts its backend)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(
      "--xla_force_host_platform_device_count")]
  os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={int(count)}"])


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, env: Mapping[str, str] | None = None) -> str:
  """Connects this process to the others; returns how ("explicit", the detected cluster, or "single")."""
  if jax.distributed.is_initialized():
    return "explicit"
  explicit = (coordinator, num_processes, process_id)
  if any(x is not None for x in explicit):
    if None in explicit:
      raise DistributedError("multi-process start needs all of --coordinator=HOST:PORT, --num_processes=N and "
                             "--process_id=I")
    if ":" not in str(coordinator):
      raise DistributedError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    if int(num_processes) < 1 or not 0 <= int(process_id) < int(num_processes):
      raise DistributedError(f"--process_id must be in [0, {num_processes}), got {process_id}")
    if int(num_processes) == 1:
      return "single"
    _cpu_collectives()
    jax.distributed.initialize(coordinator_address=str(coordinator), num_processes=int(num_processes),
                               process_id=int(process_id))
    return "explicit"
  cluster = detect_cluster(env)
  if cluster is None:
    return "single"
  _cpu_collectives()
  try:
    jax.distributed.initialize()
  except (ValueError, RuntimeError) as e:
    raise DistributedError(f"{cluster} environment detected but jax.distributed.initialize() failed: "
                           f"{str(e).splitlines()[0]}") from e
  return cluster


def _cpu_collectives() -> None:
  # Harmless on accelerators (it only configures the CPU client); required for CPU multi-process collectives.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
