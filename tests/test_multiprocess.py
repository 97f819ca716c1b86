"""Two processes on localhost train through jax.distributed like one process does."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

from accel.metrics import read_jsonl
from tests.helpers import ROOT


def free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  args = ['--config=configs/lm.py:smoke', '--config.total_steps=10',
          '--config.progress_bar=False']
  base_env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT,
              'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  single = subprocess.run([sys.executable, '-m', 'experiments.train', *args,
                           f'--workdir={tmp_path / "single"}'],
                          cwd=ROOT, env=base_env, capture_output=True, text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-2000:]
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'experiments.train', *args, f'--workdir={tmp_path / "multi"}'],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**base_env, 'JAX_COORDINATOR_ADDRESS': f'localhost:{port}',
           'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': str(i)}) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-2000:]
  one = read_jsonl(str(tmp_path / 'single' / 'metrics.jsonl'))
  two = read_jsonl(str(tmp_path / 'multi' / 'metrics.jsonl'))
  assert [m['step'] for m in two] == [m['step'] for m in one]
  np.testing.assert_allclose([m['train/loss'] for m in two], [m['train/loss'] for m in one],
                             rtol=2e-5)
  assert os.path.isdir(tmp_path / 'multi' / 'checkpoints' / '10')
