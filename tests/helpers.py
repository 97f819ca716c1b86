"""Test utilities: run code in a subprocess with N simulated CPU devices, run the CLI (in a
subprocess, or in this process), share JAX's persistent compilation cache."""
import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_KEYS = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
              'jax_persistent_cache_min_entry_size_bytes')


def cache_env(directory):
  """The environment that points a subprocess's JAX at the persistent cache `directory`."""
  if not directory:
    return {}
  return {'JAX_COMPILATION_CACHE_DIR': str(directory),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
          'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}


@contextlib.contextmanager
def compilation_cache(directory):
  """JAX's persistent compilation cache in `directory` for this process, then as before: a
  program compiled once (here or by a subprocess given `cache_env`) is read, not compiled."""
  # pylint: disable=g-import-not-at-top
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc
  before = [getattr(jax.config, k) for k in CACHE_KEYS]
  for key, value in zip(CACHE_KEYS, (str(directory), 0, 0)):
    jax.config.update(key, value)
  cc.reset_cache()
  try:
    yield
  finally:
    for key, value in zip(CACHE_KEYS, before):
      jax.config.update(key, value)
    cc.reset_cache()


def xla_flags(devices: int) -> str:
  """This process's XLA_FLAGS (conftest's backend optimization level) with `devices` CPU
  devices."""
  return f'{os.environ.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count={devices}'


def run_python(code: str, devices: int = 1, timeout: int = 300, env=None):
  """Runs `code` in a fresh interpreter with `devices` CPU devices; returns CompletedProcess."""
  full_env = {**os.environ, 'XLA_FLAGS': xla_flags(devices),
              'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT, **(env or {})}
  return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=ROOT, env=full_env,
                        capture_output=True, text=True, timeout=timeout)


def cli_command(*args):
  return [sys.executable, '-m', 'experiments.train', *args]


def cli_env(env=None):
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT, **(env or {})}


def run_cli(*args, timeout: int = 300, env=None):
  return subprocess.run(cli_command(*args), cwd=ROOT, env=cli_env(env), capture_output=True,
                        text=True, timeout=timeout)


@contextlib.contextmanager
def logging_restored():
  """Undoes what accel.faults.quiet_logs and a fault's exit do to logging (levels, the
  handlers' filters, logging.disable) when they run inside the test process: pytest keeps
  its capture handlers from test to test, so a filter left on them hides later records."""
  import logging  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  levels = logging.getLogger('jax').level, absl_logging.get_verbosity()
  handlers = [absl_logging.get_absl_handler(), *logging.getLogger().handlers]
  filters = [list(h.filters) for h in handlers]
  try:
    yield
  finally:
    logging.disable(logging.NOTSET)
    logging.getLogger('jax').setLevel(levels[0])
    absl_logging.set_verbosity(levels[1])
    for handler, kept in zip(handlers, filters):
      handler.filters[:] = kept


def cli_in_process(*args) -> subprocess.CompletedProcess:
  """experiments.train's command line run in this process (flag parsing, the entry point
  and accel.faults.main as `python -m experiments.train` runs them), with its exit status,
  stdout and stderr: for the many cases that fail before training, without a new
  interpreter, jax import and compile each. Needs the working directory at ROOT."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from accel import faults  # pylint: disable=g-import-not-at-top
  from experiments import train as entry  # pylint: disable=g-import-not-at-top
  out, err, status = io.StringIO(), io.StringIO(), 0
  hooks, argv = (threading.excepthook, sys.unraisablehook), sys.argv
  sys.argv = ['experiments.train', *args]   # ml_collections reads the overrides from here
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), logging_restored():
      try:
        flags.FLAGS.unparse_flags()
        faults.main(entry.main)(entry.parse_flags(sys.argv))
      except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  finally:
    (threading.excepthook, sys.unraisablehook), sys.argv = hooks, argv
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith('config.')]:
      delattr(flags.FLAGS, name)       # defined by each parse of --config, for its overrides
  return subprocess.CompletedProcess(args, status, out.getvalue(), err.getvalue())


def json_script_job(path: str, devices: int, timeout: int = 900):
  """A `tests.background.Job` running the file `path` as a script with `devices` CPU
  devices (its result: `json_result`), XLA flags as `xla_flags`."""
  from tests import background  # pylint: disable=g-import-not-at-top
  env = {**os.environ, 'XLA_FLAGS': xla_flags(devices), 'JAX_PLATFORMS': 'cpu',
         'PYTHONPATH': ROOT + os.pathsep + os.environ.get('PYTHONPATH', '')}
  return background.Job([sys.executable, path], env, ROOT, timeout=timeout)


def json_result(proc: subprocess.CompletedProcess):
  """The JSON on the last line of a script's output, asserting it exited cleanly."""
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])
