r"""Reproduces a paper's headline table with accel's runs, beside the paper's numbers.

  python -m experiments.reproduce {ouroboros,pld,lowprec,stdloss,together} \
      [--scale smoke|cpu|gpu|paper] [--out runs/tables] [--runs_dir runs/reproduce] \
      [--parallel N] [--retry_failed] [--set KEY=VALUE ...]

Runs the target's runs through the sweep machinery (accel.sweep: one subprocess and workdir
per run in RUNS_DIR/TARGET_SCALE/, resumable: a second call reuses finished runs) and writes
OUT/TARGET_SCALE.md (the table, with command, device, versions and date), .csv and .png.
Everything goes under runs/ (git-ignored) by default; `--out results/tables` writes the
committed tables (what the README cites) instead.
smoke and cpu run on CPU here; gpu and paper need GPUs, and every table lists their commands.
--set KEY=VALUE (repeatable) sets a config key in every run, e.g. a gpu scale cut to a
budget (`--set total_steps=2000`) or on the data at hand (`--set data.name=shakespeare`); the
table's header lists them.
Exit status 1 if a run failed (the table is still written, its cells '-').
"""
from __future__ import annotations

if __name__ == '__main__':        # first, so that Ctrl-C while jax imports is one line too
  from accel import interrupts
  interrupts.stop_from_the_start()

import shlex
import sys

from absl import app, flags

from accel import faults, reproduce
from accel.errors import UserError

_SCALE = flags.DEFINE_enum('scale', 'smoke', reproduce.SCALES, 'Size of the runs.')
_OUT = flags.DEFINE_string('out', 'runs/tables', 'Folder of the tables and plots '
                           '(results/tables: the committed ones).')
_RUNS_DIR = flags.DEFINE_string('runs_dir', 'runs/reproduce', 'Folder of the sweeps.')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Runs trained side by side.')
_RETRY = flags.DEFINE_bool('retry_failed', False, 'Run failed runs again.')
_SET = flags.DEFINE_multi_string('set', [], "A config key set in every run, 'KEY=VALUE'.")


def main(argv):
  if len(argv) != 2:
    raise app.UsageError(f'give one target: {", ".join(reproduce.TARGETS)}')
  try:
    path, ok = reproduce.reproduce(
        argv[1], _SCALE.value, _OUT.value, _RUNS_DIR.value, _PARALLEL.value, _RETRY.value,
        command=shlex.join(['python', '-m', 'experiments.reproduce', *sys.argv[1:]]),
        overrides=reproduce.parse_overrides(_SET.value))
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'table written to {path}')
  if not ok:
    sys.exit(1)


if __name__ == '__main__':
  app.run(faults.main(main))
