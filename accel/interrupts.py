"""SIGINT (Ctrl-C) and SIGTERM (kill, a scheduler's pre-emption) during a run.

`StopSignals` installs a handler for both while a run is set up and trained (main thread
only; elsewhere it does nothing). Before the training loop a signal raises `Interrupted`
at once, as Ctrl-C raises KeyboardInterrupt: nothing has been trained yet. Once the
loop starts (`defer()`) a signal only sets `requested`: the loop finishes the step it is
in, saves a checkpoint of the step reached (so the rerun loses nothing, not even the steps
since the last regular checkpoint), waits for it up to `CHECKPOINT_WAIT_S`, and raises
`Interrupted(step)`. A second signal while it waits ends the process at once; the rerun
then resumes from the last complete checkpoint (orbax writes each into a temporary folder
and renames it whole, so a checkpoint cut short is never read).

The entry points turn `Interrupted` into its one line, "interrupted at step N; run the
same command to resume", and exit status 128 + the signal's number: 130 for SIGINT, 143
for SIGTERM, what a shell reports for a process that the signal ended.
"""
from __future__ import annotations

import os
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
CHECKPOINT_WAIT_S = 120.0


def exit_status(signum: int) -> int:
  return 128 + signum


class Interrupted(BaseException):
  """The run stopped on a signal. A BaseException, like KeyboardInterrupt, so that library
  code catching Exception lets it through."""

  def __init__(self, signum: int, step: int | None = None, note: str = '',
               exit_now: bool = False):
    self.signum, self.step, self.note, self.exit_now = signum, step, note, exit_now
    super().__init__(self.line)

  @property
  def exit_status(self) -> int:
    return exit_status(self.signum)

  @property
  def line(self) -> str:
    where = (f'at step {self.step}' if self.step is not None
             else 'before the first step')
    return (f'interrupted {where}{"; " + self.note if self.note else ""}; '
            'run the same command to resume')


class StopSignals:
  """SIGINT / SIGTERM handlers for one run (see the module docstring)."""

  def __init__(self):
    self.requested: int | None = None     # the signal received after `defer()`
    self.step: int | None = None          # the step reached, for the lines it writes
    self._deferring = False
    self._previous = {}

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def defer(self) -> None:
    """From now on a signal only sets `requested` (the loop checks it after each step)."""
    self._deferring = True

  def _handle(self, signum, frame) -> None:
    del frame
    if not self._deferring:
      raise Interrupted(signum, self.step)
    if self.requested is None:
      self.requested = signum
      return
    line = Interrupted(signum, self.step, 'stopped again before its checkpoint was '
                       'written, so the rerun starts from the last complete one').line
    os.write(2, (line + '\n').encode())
    os._exit(exit_status(signum))
