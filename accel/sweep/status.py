"""The record each run folder holds (`sweep_status.json`) and what a launcher does with it.

state (running | finished | failed | interrupted), the command, the error line of a failure,
wall-clock seconds, the attempt count. A launcher skips finished runs, runs again interrupted
ones (stopped by SIGINT/SIGTERM/SIGHUP, or whose launcher died while they ran: the training
loop restarts from the run's last checkpoint), leaves failed ones failed unless asked to
retry them, and leaves alone a run whose recorded process is still alive. A finished run is
not compared with the config file again: after editing a config, use a new sweep folder.
"""
from __future__ import annotations

import json
import os
import socket

from accel.errors import UserError
from accel.sweep.declare import Run

STATUS_FILE = 'sweep_status.json'


def read_status(run_dir: str) -> dict | None:
  try:
    with open(os.path.join(run_dir, STATUS_FILE)) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, json.JSONDecodeError):
    return None   # a torn write of an interrupted sweep: treated as never run, and resumed


def write_status(run_dir: str, status: dict) -> None:
  path = os.path.join(run_dir, STATUS_FILE)
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w') as f:
    json.dump(status, f, indent=2)
  os.replace(tmp, path)


def alive(status: dict) -> bool:
  """Whether the process a 'running' record names is still running (on this host)."""
  if status.get('host') != socket.gethostname() or not status.get('pid'):
    return False
  try:
    os.kill(status['pid'], 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def error_line(log_text: str) -> str:
  """The child's 'error: ...' line (experiments.train prints one), else its last line."""
  lines = [l.strip() for l in log_text.splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith('error:')]
  line = errors[-1][len('error:'):].strip() if errors else (lines[-1] if lines else 'no output')
  return line[:400]


def _jsonable(value):
  return json.loads(json.dumps(value))


def plan(run: Run, status: dict | None, retry_failed: bool) -> str:
  """'run' or why not: 'finished', 'failed', 'running elsewhere'."""
  if status is None:
    return 'run'
  recorded = status.get('config'), status.get('overrides'), status.get('devices') or 0
  if recorded != (run.config, _jsonable(run.overrides), run.devices):
    raise UserError(f'{run.name}: the folder holds another run ({recorded[0]} {recorded[1]}'
                    f'{f" on {recorded[2]} devices" if recorded[2] else ""}); use a new '
                    'sweep folder')
  state = status.get('state')
  if state == 'finished':
    return 'finished'
  if state == 'failed' and not retry_failed:
    return 'failed'
  if state == 'running' and alive(status):
    return 'running elsewhere'
  return 'run'
