"""The house rule for faults, in one place.

Every run either finishes, or ends with one line on stderr that names the problem and what
to do, and a non-zero exit status:
  `error: ...`, status 2   a bad config or command line (accel.errors.ConfigError): found
                           before anything is prepared, compiled or written;
  `error: ...`, status 1   any other accel.errors.UserError: data, workdir, checkpoint, a
                           diverged loss, or the environment (read-only or full file system,
                           a path that is a file, out of device memory; `environment_errors`);
  `interrupted at step N; run the same command to resume`, status 130 / 143
                           SIGINT / SIGTERM (accel.interrupts).
A run that fails before its first checkpoint changes nothing that existed before it (it
may append the lines of the steps it trained to metrics.jsonl and TensorBoard; a resume
drops those past the checkpoint it starts from). The library raises; `main` (every
entry point's absl main) prints. A traceback means a bug in accel.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import sys
import threading
from typing import Callable

from accel import interrupts
from accel.errors import ConfigError, UserError

_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")    # TensorStore's text of an OSError
_QUOTED_FILE = re.compile(r'local file "([^"]+)"')
_ENVIRONMENT_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM,
                       errno.ENOTDIR, errno.EISDIR, errno.EIO}


def _chain(e: BaseException):
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def _problem(number: int, path: str | None) -> str:
  return f'{os.strerror(number).lower()}{f": {path}" if path else ""}'


def environment_problem(e: BaseException) -> str | None:
  """What in the environment `e` reports, in a few words with its path; None if it is
  not an environment error (a bug, or bad input reported elsewhere)."""
  for cause in _chain(e):
    if isinstance(cause, OSError) and cause.errno in _ENVIRONMENT_ERRNOS:
      return _problem(cause.errno, cause.filename)
    text = str(cause)
    code = _OS_ERROR_CODE.search(text)      # orbax's checkpoint writes fail in TensorStore
    if code and int(code.group(1)) in _ENVIRONMENT_ERRNOS:
      path = _QUOTED_FILE.search(text)
      return _problem(int(code.group(1)), path.group(1) if path else None)
    if 'RESOURCE_EXHAUSTED' in text and not code:
      detail = ' '.join(text.split())
      detail = detail[detail.index('RESOURCE_EXHAUSTED'):][:200]
      return f'out of device memory ({detail}); lower batch_size or the model\'s size'
  return None


@contextlib.contextmanager
def environment_errors(state: Callable[[], str]):
  """Turns an environment error raised inside into a UserError: the problem, then
  `state()` (where the run stands: its step, its last intact checkpoint)."""
  try:
    yield
  except (UserError, interrupts.Interrupted):
    raise
  except Exception as e:  # OSError, orbax/TensorStore ValueError, XlaRuntimeError, ...
    problem = environment_problem(e)
    if problem is None:
      raise
    raise UserError(f'{problem}; {state()}') from e


class _LibraryNoise(logging.Filter):
  """Drops orbax's and absl's own log records (accel reports what goes wrong itself) and
  jax's INFO lines about the platforms it probes (no TPU, no GPU)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if f'{os.sep}orbax{os.sep}' in record.pathname:
      return False
    return record.levelno >= logging.WARNING or not record.name.startswith(('jax', 'absl'))


def _closed_loop_callbacks_hook(previous):
  """sys.unraisablehook without TensorStore's callbacks into the event loop of an orbax save
  that already failed (a full disk): its C++ threads report 'RuntimeError: Event loop is
  closed' for each write still in flight, before accel's line."""

  def hook(unraisable):
    if (isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == 'Event loop is closed'):
      return
    previous(unraisable)
  hook.quiets_closed_loops = True
  return hook


def quiet_logs() -> None:
  """Library logging down to what the user needs: warnings and errors, no orbax."""
  if not getattr(sys.unraisablehook, 'quiets_closed_loops', False):
    sys.unraisablehook = _closed_loop_callbacks_hook(sys.unraisablehook)
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)
  for handler in [absl_logging.get_absl_handler(), *logging.getLogger().handlers]:
    if not any(isinstance(f, _LibraryNoise) for f in handler.filters):
      handler.addFilter(_LibraryNoise())
  logging.getLogger('jax').setLevel(logging.WARNING)


def _silence_background_threads() -> None:
  """After the one line is written, failures of library threads (orbax's writers hitting
  the same full disk) and of interpreter shutdown stay quiet."""
  threading.excepthook = lambda args: None
  sys.unraisablehook = lambda args: None
  logging.disable(logging.CRITICAL)


def _finish(line: str, status: int, now: bool = False) -> None:
  _silence_background_threads()
  print(line, file=sys.stderr, flush=True)
  if now:                        # a thread is still writing; do not wait for it
    sys.stdout.flush()
    os._exit(status)
  sys.exit(status)


def main(fn: Callable[[list[str]], None], user_error_status: int = 1):
  """Wraps an entry point's absl main with the house rule (module docstring).
  user_error_status: the exit status of a UserError that is not a ConfigError."""

  @functools.wraps(fn)
  def wrapped(argv):
    quiet_logs()
    try:
      return fn(argv)
    except ConfigError as e:
      _finish(f'error: {e}', 2)
    except UserError as e:
      _finish(f'error: {e}', user_error_status)
    except interrupts.Interrupted as e:
      _finish(e.line, e.exit_status, now=e.exit_now)
    except KeyboardInterrupt:    # where no StopSignals is installed (interrupts.py)
      _finish(interrupts.Interrupted(2).line, interrupts.exit_status(2))
  return wrapped
