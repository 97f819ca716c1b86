"""Running a sweep's runs on this machine, each in its own subprocess and workdir.

A fresh subprocess per run: a crash, an out-of-memory kill or a bad value in one run cannot
take the others down, jax and XLA state never leaks between runs, and CUDA_VISIBLE_DEVICES can
give each run its own GPUs (it must be set before jax starts). What is run and what is skipped
follows the run folders' status records (accel/sweep/status.py).
"""
from __future__ import annotations

import builtins
import concurrent.futures
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from typing import Callable

from accel.errors import UserError
from accel.sweep import status as status_lib
from accel.sweep.declare import Run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOG_FILE = 'train.log'
INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)   # a stop, not a failure


def gpu_groups(parallel: int) -> list[str | None]:
  """CUDA_VISIBLE_DEVICES for each of `parallel` slots: the visible GPUs split evenly, or,
  with more slots than GPUs (a multiple of them), each GPU shared by parallel / #GPUs slots
  (small runs side by side on one GPU; `device_env` gives each its share of the memory).

  Counted with nvidia-smi (not jax, which would claim the GPUs' memory in this process).
  Without GPUs every slot is None: the runs share the CPU.
  """
  visible = os.environ.get('CUDA_VISIBLE_DEVICES')
  if visible is not None:
    gpus = [g for g in visible.split(',') if g.strip()]
  else:
    try:
      out = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=30)
      gpus = [str(i) for i, l in enumerate(out.stdout.splitlines()) if l.startswith('GPU ')]
    except (OSError, subprocess.TimeoutExpired):
      gpus = []
  if not gpus:
    return [None] * parallel
  if parallel > len(gpus) and parallel % len(gpus) == 0:
    return [gpus[i % len(gpus)] for i in range(parallel)]
  if len(gpus) % parallel:
    raise UserError(f'--parallel {parallel} neither divides the {len(gpus)} visible GPUs nor '
                    'is a multiple of them')
  per_run = len(gpus) // parallel
  return [','.join(gpus[i * per_run:(i + 1) * per_run]) for i in range(parallel)]


def sharing(groups: list[str | None]) -> int:
  """Slots per GPU of `gpu_groups`' answer (1: every slot has GPUs of its own)."""
  return len(groups) // len(set(groups)) if groups and groups[0] is not None else 1


MEMORY_SHARED = 0.9    # of a GPU's memory, split between the runs that share it


def device_env(run: Run, gpus: str | None, shared_by: int = 1) -> dict[str, str]:
  """The environment that gives `run` its devices out of its slot's GPUs (None: no GPUs);
  a GPU shared by `shared_by` slots gives each run MEMORY_SHARED / shared_by of its memory
  (XLA preallocates 75% of it by default, which would leave the next run none)."""
  if gpus is None:
    return {'JAX_NUM_CPU_DEVICES': str(run.devices)} if run.devices else {}
  listed = gpus.split(',')
  if run.devices > len(listed):
    raise UserError(f'{run.name} needs {run.devices} GPUs, its slot has {len(listed)} '
                    f'({gpus}); use a smaller --parallel')
  env = {'CUDA_VISIBLE_DEVICES': ','.join(listed[:run.devices or len(listed)])}
  if shared_by > 1:
    env['XLA_PYTHON_CLIENT_MEM_FRACTION'] = f'{MEMORY_SHARED / shared_by:.3f}'
  return env


def child_env(**extra: str) -> dict[str, str]:
  """This process's environment for a `python -m` child run from ROOT: ROOT first on
  PYTHONPATH, the parent's own entries kept (packages installed with --target, e.g.)."""
  return {**os.environ, 'PYTHONPATH': os.pathsep.join(
      p for p in (ROOT, os.environ.get('PYTHONPATH')) if p), **extra}


def execute(run: Run, run_dir: str, gpus: str | None = None, shared_by: int = 1) -> dict:
  """Trains `run` in a subprocess, logging to RUN_DIR/train.log; returns its final status."""
  os.makedirs(run_dir, exist_ok=True)
  previous = status_lib.read_status(run_dir) or {}
  command = run.command(run_dir)
  devices = device_env(run, gpus, shared_by)
  env = child_env(**devices)
  status = {'name': run.name, 'config': run.config, 'overrides': run.overrides,
            'devices': run.devices, 'command': command, 'env': devices,
            'host': socket.gethostname(),
            'attempts': previous.get('attempts', 0) + 1,
            'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
            'wall_s': previous.get('wall_s', 0.0)}
  log_path = os.path.join(run_dir, LOG_FILE)
  start = time.perf_counter()
  with open(log_path, 'a') as log:
    log.write(f'\n=== attempt {status["attempts"]} {status["started"]}: '
              f'{" ".join(command)}\n')
    log.flush()
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
    status_lib.write_status(run_dir, {**status, 'state': 'running', 'pid': child.pid})
    returncode = child.wait()
  status['wall_s'] += time.perf_counter() - start   # summed over attempts
  status['returncode'] = returncode
  status['finished'] = time.strftime('%Y-%m-%dT%H:%M:%S%z')
  if returncode == 0:
    status['state'] = 'finished'
  elif -returncode in INTERRUPTS or returncode - 128 in INTERRUPTS:
    status['state'] = 'interrupted'   # stopped from outside (killed by it, or experiments.train
                                      # exiting 128 + its number): the next sweep resumes it
  else:
    with open(log_path) as f:
      status['error'] = (f'killed by {signal.Signals(-returncode).name}' if returncode < 0
                         else status_lib.error_line(f.read().rsplit('\n=== attempt', 1)[-1]))
    status['state'] = 'failed'
  status_lib.write_status(run_dir, status)
  return status


def run_sweep(runs: list[Run], sweep_dir: str, parallel: int = 1, retry_failed: bool = False,
              log: Callable[[str], None] = print) -> dict[str, dict]:
  """Runs what is left of `runs` under `sweep_dir`, `parallel` at a time; {name: status}."""
  if parallel < 1:
    raise UserError(f'--parallel must be at least 1, got {parallel}')
  os.makedirs(sweep_dir, exist_ok=True)
  statuses, todo = {}, []
  for run in runs:
    run_dir = os.path.join(sweep_dir, run.name)
    status = status_lib.read_status(run_dir)
    plan = status_lib.plan(run, status, retry_failed)
    if plan == 'run':
      todo.append(run)
      statuses[run.name] = status or {}
    else:
      log(f'skip {run.name}: {plan}' + (f' ({status.get("error")})' if plan == 'failed' else ''))
      statuses[run.name] = status
  lock = threading.Lock()

  def log_line(message: str) -> None:   # one line at a time from the parallel workers
    with lock:
      log(message)

  groups = gpu_groups(min(parallel, max(len(todo), 1)))
  shared_by = sharing(groups)
  for run in todo:
    device_env(run, groups[0])     # every slot has as many GPUs: refuse before starting
  slots = queue.Queue()
  for gpus in groups:
    slots.put(gpus)

  def one(run: Run) -> dict:
    gpus = slots.get()
    try:
      log_line(f'start {run.name}' + (f' on GPUs {gpus}' if gpus is not None else ''))
      status = execute(run, os.path.join(sweep_dir, run.name), gpus, shared_by)
      log_line(f'{status["state"]} {run.name} in {status["wall_s"]:.1f}s'
               + (f': {status["error"]}' if status['state'] == 'failed' else ''))
      return status
    finally:
      slots.put(gpus)

  with concurrent.futures.ThreadPoolExecutor(max(1, min(parallel, len(todo)))) as pool:
    for run, status in builtins.zip(todo, pool.map(one, todo)):
      statuses[run.name] = status
  return statuses
