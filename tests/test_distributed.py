"""Which start-up path accel.distributed takes in each launch environment (no processes are
started here; tests/test_multiprocess.py starts real ones)."""
import pytest

from accel import distributed
from accel.errors import UserError

LAUNCH_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
               'SLURM_LOCALID', 'OMPI_MCA_orte_hnp_uri', 'OMPI_COMM_WORLD_SIZE',
               'OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_LOCAL_RANK', 'KUBERNETES_SERVICE_HOST',
               'TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES', *distributed.EXPLICIT.values())


@pytest.fixture
def env(monkeypatch):
  """This process's environment with no launcher in it; the test adds one."""
  for var in LAUNCH_VARS:
    monkeypatch.delenv(var, raising=False)

  def setenv(**values):
    for var, value in values.items():
      monkeypatch.setenv(var, str(value))
  return setenv


def slurm(ntasks, procid=0):
  return dict(SLURM_JOB_ID=4242, SLURM_STEP_NODELIST='node[001-002]', SLURM_NTASKS=ntasks,
              SLURM_PROCID=procid, SLURM_LOCALID=procid)


def test_one_process_without_a_launcher(env):
  assert distributed.detected_cluster() is None
  assert distributed.initialize_arguments('auto') is None
  assert distributed.initialize_arguments('off') is None
  assert distributed.initialize(mode='auto') is False
  with pytest.raises(UserError, match='needs JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, '
                                      'JAX_PROCESS_ID'):
    distributed.initialize_arguments('on')


def test_slurm_of_several_tasks_uses_jax_detection(env):
  env(**slurm(ntasks=2, procid=1))
  assert distributed.detected_cluster() == distributed.Cluster('slurm', 2)
  assert distributed.initialize_arguments('auto') == {}   # JAX detects all of it
  assert distributed.initialize_arguments('slurm') == {'cluster_detection_method': 'slurm'}
  assert distributed.initialize_arguments('off') is None
  env(JAX_COORDINATOR_ADDRESS='10.0.0.7:1234')   # an explicit variable overrides one value
  assert distributed.initialize_arguments('auto') == {'coordinator_address': '10.0.0.7:1234'}


def test_slurm_of_one_task_stays_one_process_unless_asked(env):
  env(**slurm(ntasks=1))     # e.g. one task of a sweep's array job
  assert distributed.detected_cluster() == distributed.Cluster('slurm', 1)
  assert distributed.initialize_arguments('auto') is None
  assert distributed.initialize_arguments('on') == {}


def test_open_mpi_is_detected(env):
  env(OMPI_MCA_orte_hnp_uri='1531576320.0;tcp://10.96.0.1:34911', OMPI_COMM_WORLD_SIZE=4,
      OMPI_COMM_WORLD_RANK=3, OMPI_COMM_WORLD_LOCAL_RANK=1)
  assert distributed.detected_cluster() == distributed.Cluster('ompi', 4)
  assert distributed.initialize_arguments('auto') == {}
  with pytest.raises(UserError, match='JAX does not detect a slurm launch here'):
    distributed.initialize_arguments('slurm')


def test_explicit_variables(env):
  env(JAX_COORDINATOR_ADDRESS='localhost:1234', JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=1)
  assert distributed.initialize_arguments('auto') == {
      'coordinator_address': 'localhost:1234', 'num_processes': 2, 'process_id': 1}
  env(JAX_PROCESS_ID='first')
  with pytest.raises(UserError, match="JAX_PROCESS_ID must be an integer, got 'first'"):
    distributed.initialize_arguments('auto')


def test_missing_explicit_variable_is_named(env):
  env(JAX_COORDINATOR_ADDRESS='localhost:1234', JAX_NUM_PROCESSES=2)
  with pytest.raises(UserError, match=r'needs JAX_PROCESS_ID: set'):
    distributed.initialize_arguments('auto')


def test_unknown_mode(env):
  with pytest.raises(UserError, match=r'--distributed=slurmm: expected auto, on, off or one '
                                      r'of .*slurm'):
    distributed.initialize_arguments('slurmm')
