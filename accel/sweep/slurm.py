r"""A sweep as one Slurm array job: task i runs run i of the sweep, then a summary job.

SWEEP_DIR/slurm/array.sbatch runs `TASK_COMMAND --run_index=$SLURM_ARRAY_TASK_ID` for the
indices still to run (what the local launcher would run now: not finished, failed ones only
with --retry_failed), one task (one process) each; the task trains that run in
SWEEP_DIR/NAME with the same status record and train.log as the local launcher, so a later
local or Slurm launch skips, resumes and retries it the same way. SWEEP_DIR/slurm/summary.sbatch
writes SWEEP_DIR/summary.* once the array is over (submitted with --dependency=afterany).
Slurm's own logs: SWEEP_DIR/slurm/%A_%a.out (array) and %j.out (summary).

The folder must be on a filesystem that the submitting host and the compute nodes share. Each
run is one process on one node (its GPUs: what --slurm_task_option asks for, seen through the
CUDA_VISIBLE_DEVICES that Slurm sets); a run spanning several nodes is not an array task.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess

from accel.errors import UserError
from accel.sweep import status as status_lib
from accel.sweep.declare import Run
from accel.sweep.runner import ROOT

SLURM_DIR = 'slurm'
ARRAY_SCRIPT = 'array.sbatch'
SUMMARY_SCRIPT = 'summary.sbatch'
_RESERVED = ('--array', '-a', '--ntasks', '-n', '--output', '-o')


def todo_indices(runs: list[Run], sweep_dir: str, retry_failed: bool) -> list[int]:
  """The indices of the runs a launch would run now (status.plan says 'run')."""
  return [i for i, run in enumerate(runs)
          if status_lib.plan(run, status_lib.read_status(os.path.join(sweep_dir, run.name)),
                             retry_failed) == 'run']


def array_spec(indices: list[int], max_running: int | None = None) -> str:
  """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (with '%N': at most N tasks at once)."""
  if not indices:
    raise UserError('an array job needs at least one run')
  parts, start = [], indices[0]
  for previous, index in zip(indices, indices[1:] + [None]):
    if index != previous + 1:
      parts.append(str(start) if start == previous else f'{start}-{previous}')
      start = index
  return ','.join(parts) + (f'%{max_running}' if max_running else '')


def _directives(options: list[str]) -> list[str]:
  for option in options:
    name = option.split('=', 1)[0].split()[0] if option.strip() else ''
    if not name.startswith('-'):
      raise UserError(f'slurm option {option!r}: expected an sbatch option such as '
                      '--partition=gpu')
    if name in _RESERVED:
      raise UserError(f'slurm option {option!r}: the sweep sets {name} itself (one task per '
                      'run, logs under SWEEP_DIR/slurm)')
  return [f'#SBATCH {option}' for option in options]


def _script(directives: list[str], workdir: str, command: str) -> str:
  return '\n'.join(['#!/bin/bash', *directives, 'set -euo pipefail',
                    f'cd {shlex.quote(workdir)}',
                    f'export PYTHONPATH={shlex.quote(ROOT)}${{PYTHONPATH:+:$PYTHONPATH}}',
                    f'exec {command}', ''])


def write_scripts(sweep_dir: str, job_name: str, task_command: list[str],
                  summary_command: list[str], indices: list[int], workdir: str,
                  options: list[str] = (), task_options: list[str] = (),
                  max_running: int | None = None) -> tuple[str, str]:
  """Writes SWEEP_DIR/slurm/{array,summary}.sbatch; their paths.

  Both run in `workdir` (where the sweep was launched: the commands' relative paths, and the
  config path that the run records hold, mean the same there). `task_command` runs one run
  given `--run_index=I` (appended here, I from SLURM_ARRAY_TASK_ID); `options` are sbatch options of both jobs (partition, account),
  `task_options` of the array's tasks only (GPUs, memory, time).
  """
  slurm_dir = os.path.join(os.path.abspath(sweep_dir), SLURM_DIR)
  shared = _directives(list(options))
  array = _script(
      [f'#SBATCH --job-name={job_name}', f'#SBATCH --array={array_spec(indices, max_running)}',
       '#SBATCH --ntasks=1', f'#SBATCH --output={os.path.join(slurm_dir, "%A_%a.out")}',
       *shared, *_directives(list(task_options))],
      workdir, shlex.join(task_command) + ' --run_index="$SLURM_ARRAY_TASK_ID"')
  summary = _script(
      [f'#SBATCH --job-name={job_name}-summary', '#SBATCH --ntasks=1',
       f'#SBATCH --output={os.path.join(slurm_dir, "%j.out")}', *shared],
      workdir, shlex.join(summary_command))
  os.makedirs(slurm_dir, exist_ok=True)
  paths = os.path.join(slurm_dir, ARRAY_SCRIPT), os.path.join(slurm_dir, SUMMARY_SCRIPT)
  for path, text in zip(paths, (array, summary)):
    with open(path, 'w') as f:
      f.write(text)
  return paths


def submit_commands(array_path: str, summary_path: str) -> str:
  """The shell lines that submit the array, then the summary once the array is over."""
  return (f'job=$(sbatch --parsable {shlex.quote(array_path)}) && '
          f'sbatch --dependency=afterany:"${{job%%;*}}" {shlex.quote(summary_path)}')


def require_sbatch() -> None:
  if shutil.which('sbatch') is None:
    raise UserError('sbatch is not on PATH: submit from a Slurm login node (without --submit '
                    'the scripts are written and the command to submit them is printed)')


def submit(array_path: str, summary_path: str) -> tuple[str, str]:
  """sbatch both (the summary after the whole array, whatever its tasks' states); job ids."""
  require_sbatch()

  def sbatch(*args: str) -> str:
    done = subprocess.run(['sbatch', '--parsable', *args], capture_output=True, text=True,
                          timeout=120)
    if done.returncode:
      lines = (done.stderr or done.stdout).strip().splitlines() or ['no output']
      raise UserError(f'sbatch {args[-1]} failed: {lines[-1]}')
    return done.stdout.strip().split(';')[0]   # --parsable prints JOBID[;CLUSTER]
  array_id = sbatch(array_path)
  return array_id, sbatch(f'--dependency=afterany:{array_id}', summary_path)
