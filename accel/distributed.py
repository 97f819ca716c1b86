"""Multi-process start-up: `jax.distributed.initialize` where the launch asks for it.

Which path (`mode`, from experiments.train --distributed):
  auto (default)  initialize when JAX's own cluster detection finds a launch of more than one
                  process (Slurm: SLURM_JOB_ID with SLURM_NTASKS > 1 inside srun; Open MPI:
                  mpirun; Cloud TPU pods), or when the explicit variables below are set;
                  otherwise run as one process.
  on              initialize in any case (a single-process Slurm step or TPU host too).
  off             never.
  slurm, ompi, mpi4py, gcetpu, gketpu, ...   initialize through that JAX detection method
                  (mpi4py is one JAX only uses when asked).
Explicit override: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID.
Under a detected cluster each one set replaces what JAX detects; without one all three are
needed. JAX itself reads JAX_COORDINATOR_PORT (the port on the detected coordinator host) and
JAX_LOCAL_DEVICE_IDS. Must run before anything touches a jax backend.
"""
from __future__ import annotations

import dataclasses
import os

import jax

from accel.errors import UserError

EXPLICIT = {'coordinator_address': 'JAX_COORDINATOR_ADDRESS',
            'num_processes': 'JAX_NUM_PROCESSES',
            'process_id': 'JAX_PROCESS_ID'}
MODES = ('auto', 'on', 'off')


@dataclasses.dataclass(frozen=True)
class Cluster:
  """A launch environment that jax.distributed's detection recognises."""
  method: str
  num_processes: int


def detected_cluster(method: str | None = None) -> Cluster | None:
  """The environment `jax.distributed.initialize()` would detect, by JAX's own rule.

  JAX keeps its detectors in jax._src.clusters (no public listing): initialize() picks the
  first one that is present and not opt-in-only (mpi4py is opt-in), or the one named by
  `cluster_detection_method`. This asks the same detectors, so the decision here and JAX's
  never disagree.
  """
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    chosen = env.name == method if method else not env.opt_in_only_method
    if chosen and env.is_env_present():
      try:
        return Cluster(env.name, int(env.get_process_count()))
      except Exception as e:  # pylint: disable=broad-except  (each detector raises its own)
        raise UserError(f'JAX detects a {env.name} launch but cannot count its processes '
                        f'({e}); --distributed=off runs as one process') from e
  return None


def _known_methods() -> list[str]:
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  return [env.name for env in clusters.ClusterEnv._cluster_types]  # pylint: disable=protected-access


def _explicit(environ) -> dict:
  values = {}
  for arg, var in EXPLICIT.items():
    text = environ.get(var, '').strip()
    if not text:
      continue
    if arg != 'coordinator_address':
      try:
        text = int(text)
      except ValueError:
        raise UserError(f'{var} must be an integer, got {environ[var]!r}') from None
    values[arg] = text
  return values


def initialize_arguments(mode: str = 'auto', environ=None) -> dict | None:
  """The keyword arguments for jax.distributed.initialize, or None to run as one process.

  Raises UserError naming what is missing when multi-process start-up was asked for (a flag
  or an explicit variable) but neither a detected cluster nor the variables give all of the
  coordinator address, the process count and this process's id.
  """
  environ = os.environ if environ is None else environ
  if mode == 'off':
    return None
  method = None if mode in MODES else mode
  if method and method not in _known_methods():
    raise UserError(f'--distributed={mode}: expected auto, on, off or one of JAX\'s cluster '
                    f'detection methods ({", ".join(_known_methods())})')
  explicit = _explicit(environ)
  cluster = detected_cluster(method)
  if method and cluster is None:
    raise UserError(f'--distributed={method}: JAX does not detect a {method} launch here')
  wanted = (mode != 'auto' or explicit
            or (cluster is not None and cluster.num_processes > 1))
  if not wanted:
    return None
  if cluster is None:
    missing = [var for arg, var in EXPLICIT.items() if arg not in explicit]
    if missing:
      raise UserError(
          f'multi-process start-up needs {", ".join(missing)}: set JAX_COORDINATOR_ADDRESS, '
          'JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process, or launch under Slurm '
          '(srun), Open MPI (mpirun) or a Cloud TPU pod, where JAX detects them')
  return {**explicit, **({'cluster_detection_method': method} if method else {})}


def initialize(mode: str = 'auto') -> bool:
  """Starts jax.distributed when `mode` and the environment ask for it; whether it did."""
  arguments = initialize_arguments(mode)
  if arguments is None:
    return False
  jax.distributed.initialize(**arguments)
  return True
