r"""Sweeps: many runs of `experiments.train`, each in its own subprocess and workdir.

  declare.py   the runs: override dicts built with `product` / `zip`, names, commands
  status.py    the record in each run folder, and what a launcher runs, skips or resumes
  runner.py    running them on this machine, N side by side, each on its share of the GPUs
  slurm.py     the same runs as one Slurm array job (task i runs run i, same folders/records)
  summary.py   the table (CSV, markdown) and the curves (PNG) of a sweep folder

Config files declare sweeps with the names imported here:
  from accel import sweep
  def get_sweep(arg): return sweep.product({'optimizer.lr': [1e-4, 3e-4]}, {'seed': [0, 1]})
"""
from accel.sweep.declare import Run, flag_value, make_runs, parse_axis, product, run_name, zip  # pylint: disable=redefined-builtin
