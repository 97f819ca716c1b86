"""A run's folder: claimed by one run at a time, and checked before anything is prepared.

`claim(workdir)` creates the folder if needed and writes WORKDIR/run.lock holding the pid,
host and start of the run that has it; a second run on the folder is refused with one line
naming the holder, and a lock whose process is gone (same host: no such pid, or a pid reused
by a later process) is taken over. The lock is the run's first write, so a read-only
folder, a full disk or a path that is a file is reported before data is prepared or
anything compiled. `release()` removes the lock, and the folder again if this run created
it and left nothing in it.

`check_resumable` holds the rules for what a folder may already hold:
  config.json          the experiment; another one (outside config_lib.RESUMABLE_KEYS) is
                       refused. It is written once the run's first checkpoint is complete,
                       so a first run that fails before it leaves nothing that blocks the
                       corrected rerun.
  config.json, no checkpoint   refused: the run cannot be resumed (its checkpoints are gone).
  a checkpoint at step N >= total_steps   "already at step N" (an error below N).
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time

from absl import logging

from accel import config_lib
from accel.errors import UserError

LOCK_FILE = 'run.lock'
CONFIG_FILE = 'config.json'
CHECKPOINTS = 'checkpoints'


def _process_start(pid: int) -> str | None:
  """The kernel's start time of process `pid` (/proc/PID/stat field 22), None if unknown."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _holder_alive(holder: dict) -> bool:
  """Whether the lock's process still runs; a lock from another host counts as alive."""
  if holder.get('host') != socket.gethostname():
    return True
  pid = holder.get('pid')
  if not isinstance(pid, int):
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  recorded = holder.get('process_start')
  return recorded is None or _process_start(pid) in (None, recorded)


def _read_lock(path: str) -> dict | None:
  try:
    with open(path) as f:
      holder = json.load(f)
    return holder if isinstance(holder, dict) else {}
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}    # being written this instant, or torn by a kill


def _holder_text(holder: dict) -> str:
  return (f'pid {holder.get("pid", "?")} on host {holder.get("host", "?")} (started '
          f'{holder.get("started", "?")})')


def write_error(path: str, e: OSError) -> UserError:
  """One line for an OSError writing `path` (read-only, no space, not a folder, ...)."""
  return UserError(f'cannot write {path} ({e.strerror or e}); the workdir was left as it is '
                   '— use a writable --workdir')


@dataclasses.dataclass
class Lock:
  """WORKDIR/run.lock, held by this process until `release()`."""
  workdir: str
  record: dict
  created: str | None       # the topmost folder this run created, removed again if left empty

  @property
  def path(self) -> str:
    return os.path.join(self.workdir, LOCK_FILE)

  def release(self) -> None:
    if _read_lock(self.path) == self.record:
      os.remove(self.path)
    if self.created:
      _remove_empty_folders(self.created)


def _remove_empty_folders(top: str) -> None:
  for folder, _, _ in os.walk(top, topdown=False):   # deepest first
    try:
      os.rmdir(folder)
    except OSError:
      pass                 # holds something: kept


def _create_folder(workdir: str) -> str | None:
  """Makes `workdir` (and missing parents); returns the topmost folder made, if any."""
  workdir = os.path.abspath(workdir)
  if os.path.isdir(workdir):
    return None
  if os.path.exists(workdir):
    raise UserError(f'--workdir {workdir} is a file, not a folder; nothing was written')
  top = workdir
  while not os.path.exists(os.path.dirname(top)):
    top = os.path.dirname(top)
  if not os.path.isdir(os.path.dirname(top)):
    raise UserError(f'--workdir {workdir}: {os.path.dirname(top)} is a file, not a folder; '
                    'nothing was written')
  try:
    os.makedirs(workdir)
  except OSError as e:
    raise write_error(workdir, e) from e
  return top


def claim(workdir: str) -> Lock:
  """Creates `workdir` if needed and takes its lock; UserError if another run holds it."""
  created = _create_folder(workdir)
  path = os.path.join(workdir, LOCK_FILE)
  record = {'pid': os.getpid(), 'host': socket.gethostname(),
            'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
            'process_start': _process_start(os.getpid())}
  try:
    for attempt in range(20):
      try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        holder = _read_lock(path)
        if holder == {} and attempt < 5:
          time.sleep(0.1)        # another run is writing its lock this instant
          continue
        if holder is None:
          continue               # released in the meantime
        if holder and _holder_alive(holder):
          raise UserError(f'workdir {os.path.abspath(workdir)} is in use by '
                          f'{_holder_text(holder)}; wait for that run to end, or if it is '
                          f'gone delete {path}') from None
        _take_over(path, holder)
        continue
      with os.fdopen(fd, 'w') as f:
        json.dump(record, f)
      return Lock(workdir, record, created)
  except OSError as e:
    if created:
      _remove_empty_folders(created)
    raise write_error(path, e) from e
  raise UserError(f'could not take the lock {path}: other runs keep taking it')


def _take_over(path: str, stale: dict) -> None:
  """Moves a dead run's lock away (unless another run replaced it meanwhile)."""
  aside = f'{path}.stale.{os.getpid()}'
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return
  if _read_lock(aside) != stale:     # a live run's lock, written after we read the stale
    try:
      os.link(aside, path)           # put back, unless yet another run holds it now
    except FileExistsError:
      pass
  else:
    print(f'warning: took over the lock of {_holder_text(stale) if stale else "a run"}, '
          "which is no longer running", file=sys.stderr, flush=True)
  os.remove(aside)


def checkpoint_folder_problem(workdir: str) -> str | None:
  """Why WORKDIR/checkpoints cannot hold checkpoints, if it cannot."""
  path = os.path.join(workdir, CHECKPOINTS)
  if os.path.exists(path) and not os.path.isdir(path):
    return f'{path} is a file, not a folder of checkpoints'
  return None


def read_saved_config(workdir: str) -> dict | None:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'{path} is unreadable ({e}); the workdir was left as it is') from e


def check_resumable(config, workdir: str, latest_step: int | None) -> None:
  """The folder's rules (module docstring); raises UserError, or returns if the run may go."""
  problem = checkpoint_folder_problem(workdir)
  if problem:
    raise UserError(f'{problem}; the workdir was left as it is — use a new --workdir')
  saved = read_saved_config(workdir)
  if saved is not None:
    added = config_lib.check_same_experiment(saved, config, workdir)
    if added:
      logging.info('resuming %s, written before these config keys existed; they take their '
                   'defaults: %s', workdir, ', '.join(added))
    if latest_step is None:
      raise UserError(f'workdir {workdir} holds {CONFIG_FILE} but no checkpoint to resume '
                      f'from in {os.path.join(workdir, CHECKPOINTS)}; it was left as it is — use '
                      f'a new --workdir, or delete {CONFIG_FILE} there to train from step 0')
  if latest_step is not None and latest_step > config.total_steps:
    raise UserError(f'workdir {workdir} is already at step {latest_step}, beyond '
                    f'total_steps={config.total_steps}; raise total_steps above '
                    f'{latest_step} to extend the run')


def write_config(config, workdir: str) -> None:
  """WORKDIR/config.json, replaced whole."""
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(config_lib.to_json(config))
  os.replace(tmp, path)
