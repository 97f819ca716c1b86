"""SIGINT (Ctrl-C) and SIGTERM (kill, a scheduler's pre-emption) during a run.

`StopSignals` installs a handler for both while a run is set up and trained (main thread
only; elsewhere it does nothing; a signal the launcher set to be ignored, as a shell does
for a background job, stays ignored). Before the training loop nothing has been trained:
a signal ends the process at once, after its one line and `cleanup` (the workdir's lock),
as a kill would — everything accel writes survives a kill (data preparation starts again,
a checkpoint cut short is never read) — rather than raise an exception into whatever
library code runs (a KeyboardInterrupt can be swallowed by a callback, or leave XLA's
threads to crash the interpreter's shutdown). Once the loop starts (`defer()`) a signal
only sets `requested`: the loop finishes the step it is in, saves a checkpoint of the step
reached (so the rerun loses nothing, not even the steps since the last regular
checkpoint), waits for it up to `CHECKPOINT_WAIT_S`, and raises `Interrupted(step)`. A
second signal while it waits ends the process at once; the rerun then resumes from the
last complete checkpoint (orbax writes each into a temporary folder and renames it whole).

The entry points (accel.faults.main) turn `Interrupted` into its one line, "interrupted at
step N; run the same command to resume", and exit status 128 + the signal's number: 130
for SIGINT, 143 for SIGTERM, what a shell reports for a process that the signal ended.
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
               exit_now: bool = False, where: str = ''):
    self.signum, self.step, self.note, self.exit_now = signum, step, note, exit_now
    self.where = f'at step {step}' if step is not None else where
    super().__init__(self.line)

  @property
  def exit_status(self) -> int:
    return exit_status(self.signum)

  @property
  def line(self) -> str:
    return (f'interrupted{" " + self.where if self.where else ""}'
            f'{"; " + self.note if self.note else ""}; run the same command to resume')


class StopSignals:
  """SIGINT / SIGTERM handlers for one run (see the module docstring)."""

  def __init__(self, before_loop: str = ''):
    self.before_loop = before_loop        # where the lines say a run stopped before its loop
    self.requested: int | None = None     # the signal received after `defer()`
    self.step: int | None = None          # the step reached, for the lines it writes
    self.cleanup = lambda: None           # run before the process ends at once
    self._deferring = False
    self._previous = {}

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:   # ignored by the launcher (a
          self._previous[signum] = signal.signal(signum, self._handle)   # background job)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def defer(self) -> None:
    """From now on a signal only sets `requested` (the loop checks it after each step)."""
    self._deferring = True

  def _handle(self, signum, frame) -> None:
    del frame
    if self._deferring and self.requested is None:
      self.requested = signum
      return
    note = ('stopped again before its checkpoint was written, so the rerun starts from the '
            'last complete one') if self._deferring else ''
    line = Interrupted(signum, self.step, note, where=self.before_loop).line
    os.write(2, (line + '\n').encode())
    try:
      self.cleanup()
    finally:
      os._exit(exit_status(signum))


def stop_from_the_start() -> StopSignals:
  """The handlers for an entry point's whole process, installed before it imports jax: a
  signal while it starts up (before a run's own handlers) ends it at once with one line;
  Python's KeyboardInterrupt would print a traceback, or be swallowed by a callback and
  let the run go on."""
  return StopSignals().__enter__()
