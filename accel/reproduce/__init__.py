r"""Paper tables: the runs behind each paper's headline results, and their table beside it.

A target is a module of this package with
  TITLE, CONFIGS      the paper, and the config files its runs need (checked before running);
  stages(scale)       lists of `accel.sweep.Run`s, run in order through the sweep machinery
                      (a later stage may start from an earlier one's workdir, e.g.
                      fine-tuning after pretraining);
  report(results, scale, out_prefix)
                      the Markdown body: the paper's reported numbers beside accel's, computed
                      from the runs' metrics.jsonl (`RunResult`); it may write PNGs beside
                      OUT_PREFIX and link them.
`reproduce()` runs a target at a scale (smoke | cpu here; gpu | paper need GPUs) and writes
OUT/TARGET_SCALE.md (header with command, device, versions and date; the body; a per-run
table; the commands of the other scales), .csv (per-run table) and .png (curves).
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
from typing import Any

from accel import config_lib, sweep
from accel.sweep import runner, summary
from accel.sweep.status import error_line
from accel.errors import UserError

TARGETS = ('ouroboros', 'pld', 'lowprec', 'stdloss', 'together')
SCALES = ('smoke', 'cpu', 'gpu', 'paper')
LOCAL_SCALES = ('smoke', 'cpu')      # run without GPUs
NOT_RUN_HERE = 'not run here'        # a run's state where it needs more GPUs than there are
ROOT = runner.ROOT


def config(name: str, arg: str) -> str:
  """'configs/NAME.py:ARG', absolute (a sweep's runs are recorded with it)."""
  return f'{os.path.join(ROOT, "configs", name + ".py")}:{arg}'


def load_config(config_arg: str):
  """The ConfigDict of 'PATH.py:PRESET' (the file imported by path, as the runs load it)."""
  path, _, preset = config_arg.partition(':')
  module = config_lib.load_file(path)
  return module.get_config(preset) if preset else module.get_config()


def parse_overrides(items: list[str]) -> dict[str, str]:
  """{'KEY': 'VALUE'} of 'KEY=VALUE' strings (the value parsed by the key's type later)."""
  overrides = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep or not key.strip():
      raise UserError(f'--set {item!r}: expected KEY=VALUE, e.g. total_steps=2000')
    overrides[key.strip()] = value
  return overrides


def with_overrides(stages: list[list[sweep.Run]], overrides: dict[str, str]
                   ) -> list[list[sweep.Run]]:
  """Every run of `stages` with `overrides` on top of its own (names kept); a key that
  a run's config does not have is refused before anything runs."""
  if not overrides:
    return stages
  for config_arg in {r.config for runs in stages for r in runs}:
    keys = {k for k, _ in config_lib.flatten(load_config(config_arg).to_dict())}
    unknown = sorted(set(overrides) - keys)
    if unknown:
      raise UserError(f'--set: {", ".join(unknown)} is not a key of {shown(config_arg)}; '
                      'nothing was run')
  return [[dataclasses.replace(r, overrides={**r.overrides, **overrides}) for r in runs]
          for runs in stages]


def shown(path: str) -> str:
  """A path as a reader would type it from the repository root."""
  return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def train_command(run: sweep.Run, workdir: str, gpus: bool) -> str:
  """The shell command of one run, with the device variable that gives it its devices."""
  path, _, arg = run.config.partition(':')
  overrides = [f'--config.{k}={sweep.flag_value(v)}' for k, v in run.overrides.items()]
  env = []
  if run.devices:
    env = [f'CUDA_VISIBLE_DEVICES={",".join(map(str, range(run.devices)))}' if gpus
           else f'JAX_NUM_CPU_DEVICES={run.devices}']
  return ' '.join([*env, *(shlex.quote(a) for a in [
      'python', '-m', 'experiments.train', f'--config={shown(path)}:{arg}', *overrides,
      f'--workdir={shown(workdir)}'])])


@dataclasses.dataclass
class RunResult:
  """One run's status and logged metrics, with the reductions the tables use."""
  run: sweep.Run
  status: dict
  lines: list[dict]
  config: dict            # the resolved config the run saved (empty if it never started)

  @property
  def finished(self) -> bool:
    return self.status.get('state') == 'finished'

  def step_count(self) -> int | None:
    return self.lines[-1]['step'] if self.lines else None

  def values(self, metric: str) -> list[tuple[int, float]]:
    return [(l['step'], l[metric]) for l in self.lines if metric in l]

  def final(self, metric: str) -> float | None:
    values = self.values(metric)
    return values[-1][1] if values else None

  def best(self, metric: str) -> float | None:
    values = [v for _, v in self.values(metric)]
    if not values:
      return None
    return max(values) if summary.higher_is_better(metric) else min(values)

  def median(self, metric: str) -> float | None:
    values = sorted(v for _, v in self.values(metric))
    return values[len(values) // 2] if values else None

  def mean(self, metric: str) -> float | None:
    values = [v for _, v in self.values(metric)]
    return sum(values) / len(values) if values else None

  def train_seconds(self) -> float | None:
    seconds = summary.train_seconds(self.lines)
    return seconds[-1] if seconds else None

  def reach(self, metric: str, value: float) -> tuple[int | None, float | None]:
    """(step, training seconds) of the first logged `metric` at least as good as `value`."""
    target = summary.Target(metric, '>=' if summary.higher_is_better(metric) else '<=', value)
    for line, seconds in zip(self.lines, summary.train_seconds(self.lines)):
      if metric in line and target.met(line[metric]):
        return line['step'], seconds
    return None, None


def fmt(value: Any, spec: str = '.4g') -> str:
  """A table cell: '-' for a missing value."""
  if value is None:
    return '-'
  return format(value, spec) if isinstance(value, (int, float)) else str(value)


def ratio(a: float | None, b: float | None) -> float | None:
  return a / b if a is not None and b else None


def speedup(baseline_seconds: float | None, seconds: float | None) -> str:
  """'2.31x faster' (baseline time / this run's time), or why there is none."""
  if seconds is None:
    return 'not reached'
  value = ratio(baseline_seconds, seconds)
  return f'{value:.2f}x faster' if value is not None else '-'


def table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(fmt(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def embed(module_args: list[str], markdown_path: str) -> list[str]:
  """The Markdown lines of another experiment's report (its title dropped), running
  `python -m MODULE ARGS...` first unless `markdown_path` is already there."""
  if not os.path.exists(markdown_path):
    done = subprocess.run([sys.executable, '-m', *module_args], cwd=ROOT, text=True,
                          capture_output=True, env=runner.child_env())
    if done.returncode:
      raise UserError(f'{module_args[0]} failed: {error_line(done.stderr)}')
  with open(markdown_path) as f:
    lines = f.read().splitlines()
  return [l for l in lines if not l.startswith('# ')]


def load_target(name: str):
  if name not in TARGETS:
    raise UserError(f'unknown target {name!r}; known: {", ".join(TARGETS)}')
  module = importlib.import_module(f'accel.reproduce.{name}')
  missing = [c for c in module.CONFIGS if not os.path.exists(os.path.join(ROOT, c))]
  if missing:
    raise UserError(f'target {name!r} needs {", ".join(missing)}, which does not exist yet; '
                    'nothing was run')
  return module


def environment() -> dict[str, str]:
  """Device, versions, commit and date of a table (jax is imported here, after the runs)."""
  import jax  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo')
              if l.startswith('model name')), platform.processor()) \
      if os.path.exists('/proc/cpuinfo') else platform.processor()
  from accel.benchmarking import git_commit  # pylint: disable=g-import-not-at-top
  commit = git_commit()
  return {
      'device': f'{len(devices)} x {devices[0].device_kind} ({devices[0].platform}); '
                f'host CPU {cpu}, {os.cpu_count()} cores',
      'versions': f'python {platform.python_version()}, jax {jax.__version__}, '
                  f'flax {flax.__version__}, optax {optax.__version__}',
      'commit': commit or 'unknown',
      'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
  }


def visible_gpus() -> int:
  """How many GPUs this process may give its runs (`runner.gpu_groups`' count)."""
  groups = runner.gpu_groups(1)
  return len(groups[0].split(',')) if groups[0] else 0


def run_stages(stages: list[list[sweep.Run]], sweep_dir: str, parallel: int,
               retry_failed: bool, gpus: int | None = None) -> dict[str, RunResult]:
  """Every run, stage after stage; with `gpus` (a GPU scale) a run that needs more GPUs
  than that is not run: its status says so (`NOT_RUN_HERE`), nothing else fails for it."""
  results = {}
  for runs in stages:
    fits = [r for r in runs if gpus is None or r.devices <= gpus]
    for run in runs:
      if run not in fits:
        results[run.name] = RunResult(run, {'state': NOT_RUN_HERE, 'error': (
            f'needs {run.devices} GPUs, this machine has {gpus}')}, [], {})
    statuses = runner.run_sweep(fits, sweep_dir, parallel, retry_failed)
    for run in fits:
      run_dir = os.path.join(sweep_dir, run.name)
      results[run.name] = RunResult(run, statuses.get(run.name) or {},
                                    summary.read_metrics(run_dir), _saved_config(run_dir))
  return results


def _saved_config(run_dir: str) -> dict:
  try:
    with open(os.path.join(run_dir, 'config.json')) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return {}


def scales_of(module) -> tuple[str, ...]:
  """The scales a target has: all of SCALES unless its module lists fewer."""
  return getattr(module, 'SCALES', SCALES)


def other_scales(target: str, module, scale: str) -> str:
  """The commands of the target's other scales, and its largest scale's runs one by one."""
  lines = ['## Other scales', '']
  for other in scales_of(module):
    if other == scale:
      continue
    where = 'runs on CPU here' if other in LOCAL_SCALES else 'needs GPUs: run it elsewhere'
    lines += [f'- `{other}`, {where}: `python -m experiments.reproduce {target} '
              f'--scale {other}`']
  largest = scales_of(module)[-1]
  largest_dir = os.path.join('runs', 'reproduce', f'{target}_{largest}')
  lines += ['', f'The {largest}-scale runs, one by one:', '', '```']
  for runs in module.stages(largest, largest_dir):
    lines += [train_command(r, os.path.join(largest_dir, r.name), largest not in LOCAL_SCALES)
              for r in runs]
  return '\n'.join(lines + ['```', ''])


def reproduce(target: str, scale: str, out_dir: str, runs_dir: str, parallel: int = 1,
              retry_failed: bool = False, command: str = '',
              overrides: dict[str, str] | None = None) -> tuple[str, bool]:
  """Runs `target` at `scale` and writes its table; (path of the .md, all runs finished).

  `command`: the command line to print in the table (default: the equivalent one).
  `overrides`: config keys set in every run (a scale cut to a budget, data at hand), listed
  in the table's header.
  """
  if scale not in SCALES:
    raise UserError(f'unknown scale {scale!r}; known: {", ".join(SCALES)}')
  module = load_target(target)
  if scale not in scales_of(module):
    raise UserError(f'target {target!r} has no scale {scale!r}; it has '
                    f'{", ".join(scales_of(module))} ({module.__doc__.strip().splitlines()[-1]})')
  gpus = None if scale in LOCAL_SCALES else visible_gpus()
  if gpus == 0:
    raise UserError(f'scale {scale!r} needs GPUs and none is visible; the commands to run '
                    f'elsewhere: python -m experiments.reproduce {target} --scale {scale}')
  sweep_dir = os.path.abspath(os.path.join(runs_dir, f'{target}_{scale}'))
  stages = with_overrides(module.stages(scale, sweep_dir), overrides or {})
  results = run_stages(stages, sweep_dir, parallel, retry_failed, gpus)
  os.makedirs(out_dir, exist_ok=True)
  prefix = os.path.join(out_dir, f'{target}_{scale}')
  runs = [r for stage in stages for r in stage]
  statuses = {name: result.status for name, result in results.items()}
  rows = summary.write_summary(runs, sweep_dir, statuses, module.TABLE_METRICS, [],
                             module.PLOT_METRICS, prefix)
  env = environment()
  command = command or ' '.join(['python -m experiments.reproduce', target,
                                 f'--scale {scale}', f'--out {shown(os.path.abspath(out_dir))}'])
  failed = [r for r in results.values()
            if not r.finished and r.status.get('state') != NOT_RUN_HERE]
  not_here = [r for r in results.values() if r.status.get('state') == NOT_RUN_HERE]
  text = [f'# {module.TITLE}: accel at scale `{scale}`', '',
          f'- command: `{command}`', f'- device: {env["device"]}',
          f'- versions: {env["versions"]}', f'- commit: {env["commit"]}',
          f'- date: {env["date"]}', f'- runs: `{shown(sweep_dir)}`']
  if overrides:
    text.append('- every run with ' + ', '.join(f'`{k}={v}`' for k, v in overrides.items()) +
                f' (on top of the `{scale}` presets)')
  if parallel > 1:
    shared_by = runner.sharing(runner.gpu_groups(parallel))
    text.append(f'- {parallel} runs side by side' + (
        f', {shared_by} per GPU: their step times are those of a shared GPU, not of one run '
        'alone' if shared_by > 1 else ''))
  text.append('')
  if failed:
    text += ['**Runs that did not finish** (their cells are `-`):', '']
    text += [f'- `{r.run.name}`: {r.status.get("state", "not run")} '
             f'{r.status.get("error", "")}' for r in failed] + ['']
  if not_here:
    text += ['**Runs not run on this machine** (their cells are `-`; the commands below):', '']
    text += [f'- `{r.run.name}`: {r.status["error"]}' for r in not_here] + ['']
  text += [module.report(results, scale, prefix), '',
           f'## Runs', '', f'![curves]({os.path.basename(prefix)}.png)', '',
           summary.markdown_table(rows), other_scales(target, module, scale)]
  with open(prefix + '.md', 'w') as f:
    f.write('\n'.join(text))
  return prefix + '.md', not failed
