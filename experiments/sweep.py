r"""Runs a sweep of experiments.train runs and writes its summary table and curves.

  python -m experiments.sweep --config configs/lm.py:smoke --sweep_dir runs/lr_sweep \
      --sweep 'optimizer.lr=1e-3,3e-3' --sweep 'seed=0,1,2' [--zip] \
      [--target 'eval/loss<=2.5'] [--metrics eval/loss,eval/accuracy] [--parallel N] \
      [--retry_failed]

Without --sweep the config file's `get_sweep(preset)` declares the runs (a list of override
dicts, built with accel.sweep.product / zip). Several --sweep axes are crossed (every
combination), or paired one-to-one with --zip; an axis with one value is a fixed override.
Each run trains in its own subprocess in SWEEP_DIR/NAME, NAME made of its overrides. Running
the same command again skips finished runs, resumes interrupted ones from their checkpoints,
and leaves failed ones (recorded with their error in NAME/sweep_status.json, log in
NAME/train.log) unless --retry_failed. --parallel N trains N runs side by side: on GPU each
gets its own 1/N of the visible GPUs through CUDA_VISIBLE_DEVICES; on CPU they share it.
Writes SWEEP_DIR/summary.csv, summary.md (final and best metrics, step time, training time,
steps and training seconds to each --target) and summary.png (curves). Exit status 1 if any
run failed.
"""
from __future__ import annotations

import importlib.util
import os
import sys

from absl import app, flags

from accel import sweep as sweep_lib
from accel.errors import UserError
from accel.sweep import runner, summary

_CONFIG = flags.DEFINE_string('config', None, 'Config file, PATH[:PRESET].', required=True)
_SWEEP = flags.DEFINE_multi_string('sweep', [], "An axis 'KEY=V1,V2,...'; repeatable.")
_ZIP = flags.DEFINE_bool('zip', False, 'Pair the --sweep axes one-to-one instead of crossing.')
_SWEEP_DIR = flags.DEFINE_string('sweep_dir', None, 'Folder of the runs.', required=True)
_RETRY = flags.DEFINE_bool('retry_failed', False, 'Run failed runs again.')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Runs trained side by side.')
_TARGET = flags.DEFINE_multi_string('target', [], "'METRIC<=VALUE' or 'METRIC>=VALUE'.")
_METRICS = flags.DEFINE_list('metrics', ['eval/loss', 'eval/accuracy'],
                             'Metrics whose final and best values the table shows.')
_PLOT = flags.DEFINE_list('plot', ['train/loss', 'eval/loss'], 'Metrics plotted per run.')


def declared_sweep(config_arg: str) -> list[dict]:
  """The --sweep axes, or else the config file's get_sweep(preset)."""
  if _SWEEP.value:
    axes = [sweep_lib.parse_axis(a) for a in _SWEEP.value]
    return sweep_lib.zip(*axes) if _ZIP.value else sweep_lib.product(*axes)
  path, _, preset = config_arg.partition(':')
  if not os.path.exists(path):
    raise UserError(f'config file {path} does not exist')
  spec = importlib.util.spec_from_file_location('_sweep_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_sweep'):
    raise UserError(f'{path} has no get_sweep(arg); give the runs with --sweep KEY=V1,V2')
  return module.get_sweep(preset) if preset else module.get_sweep()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    targets = [summary.Target.parse(t) for t in _TARGET.value]
    runs = sweep_lib.make_runs(_CONFIG.value, declared_sweep(_CONFIG.value))
    sweep_dir = _SWEEP_DIR.value
    statuses = runner.run_sweep(runs, sweep_dir, _PARALLEL.value, _RETRY.value)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  curves = {r.name: summary.read_metrics(os.path.join(sweep_dir, r.name)) for r in runs}
  present = {k for lines in curves.values() for line in lines for k in line}
  metrics = [m for m in _METRICS.value if m in present]
  rows = summary.write_summary(runs, sweep_dir, statuses, metrics, targets,
                                 [m for m in _PLOT.value if m in present] or ['train/loss'],
                                 os.path.join(sweep_dir, 'summary'))
  print(summary.markdown_table(rows))
  print(f'summary: {os.path.join(sweep_dir, "summary")}.{{csv,md,png}}')
  if any(r['state'] != 'finished' for r in rows):
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
