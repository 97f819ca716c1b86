"""Two processes on localhost start jax.distributed (explicit variables; a simulated Slurm
launch of two tasks, detected by JAX) and train like one process does."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

from accel.metrics import read_jsonl
from tests.helpers import ROOT

# XLA's backend optimizations off: the processes compare losses with each other, and each
# training run compiles in ~2/3 of the time (10.8 -> 7.3 CPU s for a smoke run here).
BASE_ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT,
            'XLA_FLAGS': '--xla_force_host_platform_device_count=1 '
                         '--xla_backend_optimization_level=0'}


def free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def start(command, env):
  return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env={**BASE_ENV, **env})


def finish(procs):
  """Waits for every process; asserts each exited 0; their stdouts."""
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-2000:]
  return [out for out, _ in outputs]


def test_two_processes_match_one(tmp_path):
  """JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID: the explicit override."""
  train = [sys.executable, '-m', 'experiments.train', '--config=configs/lm.py:smoke',
           '--config.total_steps=10', '--config.progress_bar=False']
  port = free_port()
  # The one-process reference runs beside the pair (three processes at once).
  procs = [start([*train, f'--workdir={tmp_path / "single"}'], {})] + [
      start([*train, f'--workdir={tmp_path / "multi"}'],
            {'JAX_COORDINATOR_ADDRESS': f'localhost:{port}', 'JAX_NUM_PROCESSES': '2',
             'JAX_PROCESS_ID': str(i)}) for i in range(2)]
  finish(procs)
  one = read_jsonl(str(tmp_path / 'single' / 'metrics.jsonl'))
  two = read_jsonl(str(tmp_path / 'multi' / 'metrics.jsonl'))
  assert [m['step'] for m in two] == [m['step'] for m in one]
  np.testing.assert_allclose([m['train/loss'] for m in two], [m['train/loss'] for m in one],
                             rtol=2e-5)
  assert os.path.isdir(tmp_path / 'multi' / 'checkpoints' / '10')


PROBE = textwrap.dedent('''
    import json
    import sys
    from accel import distributed
    started = distributed.initialize(sys.argv[1])
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    ids = multihost_utils.process_allgather(np.int32(jax.process_index()))
    print(json.dumps({'started': started, 'processes': jax.process_count(),
                      'index': jax.process_index(), 'devices': jax.device_count(),
                      'gathered': np.asarray(ids).tolist()}))
''')


def test_simulated_slurm_launch_of_two_tasks_is_detected():
  """srun's variables for two tasks on one node: JAX's own detection gives the coordinator
  (the first node of SLURM_STEP_NODELIST, on JAX_COORDINATOR_PORT), the count and the ids,
  and the two processes exchange values. A bad explicit override is one error line."""
  port = free_port()
  slurm = {'SLURM_JOB_ID': '4242', 'SLURM_STEP_NODELIST': 'localhost', 'SLURM_NTASKS': '2',
           'JAX_COORDINATOR_PORT': str(port)}
  procs = [start([sys.executable, '-c', PROBE, 'auto'],
                 {**slurm, 'SLURM_PROCID': str(i), 'SLURM_LOCALID': str(i)}) for i in range(2)]
  bad = start([sys.executable, '-m', 'experiments.train', '--config=configs/lm.py:smoke'],
              {'JAX_COORDINATOR_ADDRESS': 'localhost:1', 'JAX_NUM_PROCESSES': '2'})
  reports = [json.loads(out.strip().splitlines()[-1]) for out in finish(procs)]
  for i, report in enumerate(reports):
    assert report == {'started': True, 'processes': 2, 'index': i, 'devices': 2,
                      'gathered': [0, 1]}
  _, err = bad.communicate(timeout=300)
  assert bad.returncode == 2
  assert err.strip().splitlines()[-1].startswith(
      'error: multi-process start-up needs JAX_PROCESS_ID: set JAX_COORDINATOR_ADDRESS')
