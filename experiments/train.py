r"""Trains one experiment config.

  python -m experiments.train [--config PATH[:PRESET]] [--config.KEY=VALUE ...] [--workdir DIR]
      [--distributed auto|on|off|METHOD]

Without --config: configs/lm.py (its default preset). Without --workdir: runs/<config>-<time>.
An existing workdir is resumed from its last checkpoint (raise total_steps to extend a run);
one run at a time holds it (WORKDIR/run.lock). Ctrl-C or SIGTERM stops after the current
step with a checkpoint of it. Exit status (accel/faults.py): 0 finished; 1 one `error:`
line; 2 a bad config or command line; 130 / 143 interrupted by SIGINT / SIGTERM.
Several processes (srun, mpirun, a TPU pod, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID on each) start jax.distributed first: accel/distributed.py.
"""
from __future__ import annotations

if __name__ == '__main__':        # first, so that Ctrl-C while jax imports is one line too
  from accel import interrupts
  interrupts.stop_from_the_start()

import importlib.util
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from accel import distributed, faults
from accel.errors import ConfigError, UserError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs', 'lm.py')
_CONFIG = config_flags.DEFINE_config_file('config', DEFAULT_CONFIG, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder (created or resumed).')
_DISTRIBUTED = flags.DEFINE_string(
    'distributed', 'auto', 'Multi-process start-up: auto (when Slurm, Open MPI or a TPU pod '
    'launched several processes, or JAX_COORDINATOR_ADDRESS is set), on, off, or a JAX '
    'cluster detection method (slurm, ompi, mpi4py, ...); see accel/distributed.py.')


def default_workdir(config_arg: str) -> str:
  name = os.path.splitext(os.path.basename(config_arg.split(':')[0]))[0]
  preset = config_arg.split(':')[1] if ':' in config_arg else ''
  stamp = time.strftime('%Y%m%d-%H%M%S')
  return os.path.join('runs', f'{name}{"-" + preset if preset else ""}-{stamp}')


def print_summary(summary: dict) -> None:
  keys = ('train/loss', 'eval/loss', 'eval/accuracy', 'eval/bits_per_byte',
          'perf/step_time_s', 'perf/examples_per_s', 'perf/tokens_per_s')
  print(f'finished step {summary["step"]}:', '  '.join(
      f'{k}={summary[k]:.4g}' for k in keys if k in summary))
  print(f'run written to {summary["workdir"]} (metrics.jsonl, tensorboard/, checkpoints/)')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    distributed.initialize(_DISTRIBUTED.value)
  except UserError as e:
    raise ConfigError(str(e)) from e
  from accel import train  # pylint: disable=g-import-not-at-top  (after distributed init)
  try:
    config = _CONFIG.value
    config.to_dict()  # a config file that failed to load raises on first access
  except Exception as e:  # config files are user code: any error is a bad config
    raise ConfigError(one_line(e)) from e
  workdir = _WORKDIR.value or default_workdir(
      config_flags.get_config_filename(flags.FLAGS['config']))
  print_summary(train.train_and_evaluate(config, workdir))


def _unknown_override(argv) -> str | None:
  """The first --config.KEY=... whose KEY the config does not have, if any."""
  config_arg = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')),
                    DEFAULT_CONFIG)
  path, _, preset = config_arg.partition(':')
  try:
    spec = importlib.util.spec_from_file_location('_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(preset) if preset else module.get_config()
  except Exception:  # the config itself is broken: the generic message says so
    return None
  for arg in argv:
    if arg.startswith('--config.'):
      key = arg[len('--config.'):].split('=', 1)[0]
      node = config
      for part in key.split('.'):
        if not hasattr(node, 'keys') or part not in node:
          return key
        node = node[part]
  return None


def one_line(e: BaseException) -> str:
  """The exception's first line, with the message of its root cause."""
  root = e
  while root.__cause__ or root.__context__:
    root = root.__cause__ or root.__context__
  lines = str(e).strip().splitlines() or [type(e).__name__]
  if any(line.startswith('Traceback') for line in lines):
    lines = lines[:1]
  text = ' '.join(' '.join(lines).split()).rstrip(':')
  root_text = ' '.join(str(root).split())
  return text if root_text in text else f'{text}: {root_text}'[:500]


def parse_flags(argv):
  """absl flag parsing, with one error line (and exit 2) instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # absl and ml_collections raise many types
    unknown = _unknown_override(argv)
    if unknown:
      message = f'unknown config key {unknown!r}'
    else:
      message = one_line(e)
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(faults.main(main), flags_parser=parse_flags)
