"""Declaring a sweep: the runs as override dicts, their names and their commands.

A sweep is a list of override dicts {'optimizer.lr': 3e-4, 'seed': 1}; `product` and `zip`
build them from axes:
  product({'optimizer.lr': [1e-4, 3e-4]}, {'seed': [0, 1, 2]})    -> 6 runs
  zip({'optimizer.lr': [1e-4, 3e-4], 'optimizer.warmup_steps': [10, 20]})  -> 2 runs
An argument is either a dict of axes (key -> list of values; `product` crosses them, `zip`
pairs them) or a list of override dicts (an inner sweep), so the two nest.

Each run is `python -m experiments.train --config CONFIG --config.KEY=VALUE ...
--workdir SWEEP_DIR/NAME`; NAME is made from the overrides (`optimizer.lr=0.0003,seed=1`),
filesystem-safe.
"""
from __future__ import annotations

import builtins
import dataclasses
import hashlib
import itertools
import os
import re
import sys
from typing import Any, Iterable

from accel.errors import UserError

MAX_NAME_CHARS = 120


def _as_sweep(part) -> list[dict]:
  """A list of override dicts stays as it is; a dict of axes becomes its cartesian product."""
  if isinstance(part, dict):
    keys = list(part)
    for k in keys:
      if not isinstance(part[k], (list, tuple)):
        raise UserError(f'sweep axis {k!r} must be a list of values, got {part[k]!r}')
    return [dict(builtins.zip(keys, values))
            for values in itertools.product(*(part[k] for k in keys))]
  return [dict(d) for d in part]


def product(*parts) -> list[dict]:
  """Every combination of the parts' runs; later parts vary fastest."""
  runs = [{}]
  for part in parts:
    runs = [{**a, **b} for a in runs for b in _as_sweep(part)]
  return runs


def zip(*parts) -> list[dict]:  # pylint: disable=redefined-builtin
  """The i-th run of every part merged into one; all parts must have the same length.

  A dict argument is zipped axis by axis: zip({'a': [1, 2], 'b': [3, 4]}) -> a=1,b=3; a=2,b=4.
  """
  sweeps = []
  for part in parts:
    if isinstance(part, dict):
      sweeps.extend([{k: v} for v in values] for k, values in part.items())
    else:
      sweeps.append(_as_sweep(part))
  lengths = {len(s) for s in sweeps}
  if len(lengths) > 1:
    raise UserError(f'zip needs axes of one length, got lengths {sorted(lengths)}')
  return [dict(kv for d in row for kv in d.items()) for row in builtins.zip(*sweeps)]


def parse_axis(text: str) -> dict[str, list[str]]:
  """'optimizer.lr=1e-4,3e-4' -> {'optimizer.lr': ['1e-4', '3e-4']} (values stay text)."""
  key, sep, values = text.partition('=')
  key = key.strip()
  if not sep or not key or not values.strip():
    raise UserError(f'--sweep {text!r}: expected KEY=VALUE[,VALUE...]')
  return {key: [v.strip() for v in values.split(',')]}


def flag_value(value: Any) -> str:
  """How `value` is written after --config.KEY= (ml_collections parses it by the key's type)."""
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if isinstance(value, float):
    return repr(value)
  return str(value)


def run_name(overrides: dict) -> str:
  """'optimizer.lr=0.0003,seed=1': the overrides, filesystem-safe; 'base' for none.

  Characters outside [A-Za-z0-9._=+-] become '_'; a name that had any replaced or that is
  longer than MAX_NAME_CHARS gets a hash of the exact overrides so two runs never share one.
  """
  if not overrides:
    return 'base'
  exact = ','.join(f'{k}={flag_value(v)}' for k, v in overrides.items())
  safe = re.sub(r'[^A-Za-z0-9._=,+-]', '_', exact)
  if safe == exact and len(exact) <= MAX_NAME_CHARS and not exact.startswith('.'):
    return exact
  digest = hashlib.sha1(exact.encode()).hexdigest()[:8]
  return f'{safe.lstrip(".")[:MAX_NAME_CHARS - 9]}-{digest}'


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: a config ('path.py:preset'), its overrides and its folder's name.

  `devices`: how many devices the run uses (0: all it is given). On GPU the first `devices`
  GPUs of its slot; without GPUs that many simulated CPU devices (JAX_NUM_CPU_DEVICES).
  """
  config: str
  overrides: dict
  name: str = ''
  devices: int = 0

  def __post_init__(self):
    if not self.name:
      named = {**self.overrides, **({'devices': self.devices} if self.devices else {})}
      object.__setattr__(self, 'name', run_name(named))

  def command(self, workdir: str) -> list[str]:
    path, sep, preset = self.config.partition(':')
    config = os.path.abspath(path) + sep + preset
    return [sys.executable, '-m', 'experiments.train', f'--config={config}',
            *(f'--config.{k}={flag_value(v)}' for k, v in self.overrides.items()),
            '--config.progress_bar=false', f'--workdir={os.path.abspath(workdir)}']


def make_runs(config: str, sweep: Iterable[dict]) -> list[Run]:
  runs = [Run(config, dict(o)) for o in sweep]
  names = [r.name for r in runs]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise UserError(f'the sweep declares the same run more than once: {", ".join(duplicates)}')
  return runs
