r"""Runs a sweep of experiments.train runs and writes its summary table and curves.

  python -m experiments.sweep --config configs/lm.py:smoke [--sweep_dir runs/lr_sweep] \
      --sweep 'optimizer.lr=1e-3,3e-3' --sweep 'seed=0,1,2' [--zip] \
      [--target 'eval/loss<=2.5'] [--metrics eval/loss,eval/accuracy] [--parallel N] \
      [--retry_failed] [--launcher slurm [--submit] [--slurm_option=--partition=gpu ...]
      [--slurm_task_option=--gres=gpu:1 ...]]

Without --sweep the config file's `get_sweep(preset)` declares the runs (a list of override
dicts, built with accel.sweep.product / zip). Several --sweep axes are crossed (every
combination), or paired one-to-one with --zip; an axis with one value is a fixed override.
Each run trains in its own subprocess in SWEEP_DIR/NAME, NAME made of its overrides;
SWEEP_DIR is runs/sweeps/CONFIG[-PRESET] (git-ignored) unless --sweep_dir is given. Running
the same command again skips finished runs, resumes interrupted ones from their checkpoints,
and leaves failed ones (recorded with their error in NAME/sweep_status.json, log in
NAME/train.log) unless --retry_failed. --parallel N trains N runs side by side: on GPU each
gets its own 1/N of the visible GPUs through CUDA_VISIBLE_DEVICES, or, with N a multiple
of the GPUs, N/#GPUs small runs share each GPU (each with 0.9 #GPUs/N of its memory,
XLA_PYTHON_CLIENT_MEM_FRACTION); on CPU they share it.
Writes SWEEP_DIR/summary.csv, summary.md (final and best metrics, step time, training time,
steps and training seconds to each --target) and summary.png (curves). Exit status 1 if any
run failed.

--launcher slurm writes SWEEP_DIR/slurm/array.sbatch (one array task per run still to run,
at most --parallel at once when given; its task i runs `... --run_index=i`, i.e. run i here
with the same folder and status record) and summary.sbatch (`... --summary_only`), and with
--submit submits both, the summary after the array. The same command with the local launcher
(or --summary_only) afterwards reads the same records: --retry_failed and the summary work
unchanged. accel/sweep/slurm.py.
"""
from __future__ import annotations

if __name__ == '__main__':        # first, so that Ctrl-C while jax imports is one line too
  from accel import interrupts
  interrupts.stop_from_the_start()

import os
import sys

from absl import app, flags

from accel import config_lib, faults
from accel import sweep as sweep_lib
from accel.errors import UserError
from accel.sweep import runner, slurm, summary
from accel.sweep import status as status_lib

_CONFIG = flags.DEFINE_string('config', None, 'Config file, PATH[:PRESET].', required=True)
_SWEEP = flags.DEFINE_multi_string('sweep', [], "An axis 'KEY=V1,V2,...'; repeatable.")
_ZIP = flags.DEFINE_bool('zip', False, 'Pair the --sweep axes one-to-one instead of crossing.')
_SWEEP_DIR = flags.DEFINE_string('sweep_dir', None, 'Folder of the runs (default: '
                                  'runs/sweeps/CONFIG[-PRESET]).')
_RETRY = flags.DEFINE_bool('retry_failed', False, 'Run failed runs again.')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Runs trained side by side (slurm: array '
                                 'tasks running at once, when given).')
_TARGET = flags.DEFINE_multi_string('target', [], "'METRIC<=VALUE' or 'METRIC>=VALUE'.")
_METRICS = flags.DEFINE_list('metrics', ['eval/loss', 'eval/accuracy'],
                             'Metrics whose final and best values the table shows.')
_PLOT = flags.DEFINE_list('plot', ['train/loss', 'eval/loss'], 'Metrics plotted per run.')
_LAUNCHER = flags.DEFINE_enum('launcher', 'local', ['local', 'slurm'],
                              'local: run here; slurm: write (and --submit) an array job.')
_SUBMIT = flags.DEFINE_bool('submit', False, 'With --launcher slurm: sbatch the scripts.')
_SLURM_OPTION = flags.DEFINE_multi_string(
    'slurm_option', [], "An sbatch option of the array and the summary job, e.g. "
    "'--partition=gpu', '--account=abc'; repeatable.")
_SLURM_TASK_OPTION = flags.DEFINE_multi_string(
    'slurm_task_option', [], "An sbatch option of the array's tasks only, e.g. "
    "'--gres=gpu:1', '--time=04:00:00', '--mem=64G'; repeatable.")
_RUN_INDEX = flags.DEFINE_integer('run_index', None, 'Run only the sweep\'s run with this '
                                  '0-based index, no summary (what a Slurm array task runs).')
_SUMMARY_ONLY = flags.DEFINE_bool('summary_only', False, 'Run nothing; write the summary of '
                                  'what the folder holds.')


def default_sweep_dir(config_arg: str) -> str:
  """runs/sweeps/CONFIG[-PRESET]: under runs/, which git ignores."""
  path, _, preset = config_arg.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join('runs', 'sweeps', f'{name}-{preset}' if preset else name)


def declared_sweep(config_arg: str) -> list[dict]:
  """The --sweep axes, or else the config file's get_sweep(preset)."""
  if _SWEEP.value:
    axes = [sweep_lib.parse_axis(a) for a in _SWEEP.value]
    return sweep_lib.zip(*axes) if _ZIP.value else sweep_lib.product(*axes)
  path, _, preset = config_arg.partition(':')
  module = config_lib.load_file(path)
  if not hasattr(module, 'get_sweep'):
    raise UserError(f'{path} has no get_sweep(arg); give the runs with --sweep KEY=V1,V2')
  return module.get_sweep(preset) if preset else module.get_sweep()


def sweep_command(*extra: str) -> list[str]:
  """This sweep's command line with `extra` flags: what the jobs run (in this folder)."""
  return [sys.executable, '-m', 'experiments.sweep', f'--config={_CONFIG.value}',
          f'--sweep_dir={_SWEEP_DIR.value}', *(f'--sweep={a}' for a in _SWEEP.value),
          *(['--zip'] if _ZIP.value else []), *extra]


def launch_slurm(runs: list[sweep_lib.Run]) -> bool:
  """Writes (and --submit: submits) the array and summary jobs; False if nothing is left."""
  indices = slurm.todo_indices(runs, _SWEEP_DIR.value, _RETRY.value)
  if not indices:
    print('nothing to run: every run is finished, or failed (--retry_failed runs those again)')
    return False
  if _SUBMIT.value:
    slurm.require_sbatch()   # before anything is written
  task = sweep_command(*(['--retry_failed'] if _RETRY.value else []))
  report = sweep_command('--summary_only', f'--metrics={",".join(_METRICS.value)}',
                         f'--plot={",".join(_PLOT.value)}',
                         *(f'--target={t}' for t in _TARGET.value))
  array, summary_script = slurm.write_scripts(
      _SWEEP_DIR.value, os.path.basename(os.path.abspath(_SWEEP_DIR.value)), task, report,
      indices, os.getcwd(), _SLURM_OPTION.value, _SLURM_TASK_OPTION.value,
      _PARALLEL.value if flags.FLAGS['parallel'].present else None)
  print(f'{len(indices)} of {len(runs)} runs in the array job: {array}')
  print(f'summary job: {summary_script}')
  if _SUBMIT.value:
    array_id, summary_id = slurm.submit(array, summary_script)
    print(f'submitted array job {array_id}, summary job {summary_id} after it')
  else:
    print(f'submit with: {slurm.submit_commands(array, summary_script)}')
  return True


def write_summary(runs: list[sweep_lib.Run], statuses: dict[str, dict],
                  targets: list[summary.Target]) -> list[dict]:
  sweep_dir = _SWEEP_DIR.value
  curves = {r.name: summary.read_metrics(os.path.join(sweep_dir, r.name)) for r in runs}
  present = {k for lines in curves.values() for line in lines for k in line}
  metrics = [m for m in _METRICS.value if m in present]
  rows = summary.write_summary(runs, sweep_dir, statuses, metrics, targets,
                               [m for m in _PLOT.value if m in present] or ['train/loss'],
                               os.path.join(sweep_dir, 'summary'))
  print(summary.markdown_table(rows))
  print(f'summary: {os.path.join(sweep_dir, "summary")}.{{csv,md,png}}')
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _SWEEP_DIR.value:
    flags.FLAGS.sweep_dir = default_sweep_dir(_CONFIG.value)
  try:
    targets = [summary.Target.parse(t) for t in _TARGET.value]
    runs = sweep_lib.make_runs(_CONFIG.value, declared_sweep(_CONFIG.value))
    sweep_dir = _SWEEP_DIR.value
    if _RUN_INDEX.value is not None:
      if not 0 <= _RUN_INDEX.value < len(runs):
        raise UserError(f'--run_index={_RUN_INDEX.value}: the sweep has runs 0 to '
                        f'{len(runs) - 1}')
      run = runs[_RUN_INDEX.value]
      status = runner.run_sweep([run], sweep_dir, 1, _RETRY.value)[run.name]
      sys.exit(0 if status.get('state') == 'finished' else 1)
    if _LAUNCHER.value == 'slurm' and not _SUMMARY_ONLY.value and launch_slurm(runs):
      return
    if _SUMMARY_ONLY.value or _LAUNCHER.value == 'slurm':
      statuses = {r.name: status_lib.read_status(os.path.join(sweep_dir, r.name)) for r in runs}
    else:
      statuses = runner.run_sweep(runs, sweep_dir, _PARALLEL.value, _RETRY.value)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  rows = write_summary(runs, statuses, targets)
  if any(r['state'] != 'finished' for r in rows):
    sys.exit(1)


if __name__ == '__main__':
  app.run(faults.main(main))
