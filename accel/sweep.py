r"""Sweeps: many runs of `experiments.train`, each in its own subprocess and workdir.

Declaring a sweep. A sweep is a list of override dicts {'optimizer.lr': 3e-4, 'seed': 1};
`product` and `zip` build them from axes:
  product({'optimizer.lr': [1e-4, 3e-4]}, {'seed': [0, 1, 2]})    -> 6 runs
  zip({'optimizer.lr': [1e-4, 3e-4], 'optimizer.warmup_steps': [10, 20]})  -> 2 runs
An argument is either a dict of axes (key -> list of values; `product` crosses them, `zip`
pairs them) or a list of override dicts (an inner sweep), so the two nest.

Running one. Each run is `python -m experiments.train --config CONFIG --config.KEY=VALUE ...
--workdir SWEEP_DIR/NAME` in a fresh subprocess: a crash, an out-of-memory kill or a bad value
in one run cannot take the others down, jax and XLA state never leaks between runs, and
CUDA_VISIBLE_DEVICES can give each run its own GPUs (it must be set before jax starts).
NAME is made from the overrides (`optimizer.lr=0.0003,seed=1`), filesystem-safe.

Resuming. Each run folder holds `sweep_status.json`: state (running | finished | failed |
interrupted), the command, the error line of a failure, wall-clock seconds, the attempt count.
Running the same sweep again skips finished runs, resumes interrupted ones (stopped by
SIGINT/SIGTERM/SIGHUP, or whose sweep died while they ran: the training loop restarts from
the run's last checkpoint), leaves failed ones failed unless asked to retry them, and leaves
alone a run whose recorded process is still alive. A finished run is not compared with the
config file again: after editing a config, use a new sweep folder.
"""
from __future__ import annotations

import builtins
import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterable

from accel.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATUS_FILE = 'sweep_status.json'
LOG_FILE = 'train.log'
INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)   # a stop, not a failure
MAX_NAME_CHARS = 120


# ------------------------------------------------------------------------ declaring a sweep

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


# ---------------------------------------------------------------------------- status records

def read_status(run_dir: str) -> dict | None:
  try:
    with open(os.path.join(run_dir, STATUS_FILE)) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, json.JSONDecodeError):
    return None   # a torn write of an interrupted sweep: treated as never run, and resumed


def write_status(run_dir: str, status: dict) -> None:
  path = os.path.join(run_dir, STATUS_FILE)
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w') as f:
    json.dump(status, f, indent=2)
  os.replace(tmp, path)


def _alive(status: dict) -> bool:
  """Whether the process a 'running' record names is still running (on this host)."""
  if status.get('host') != socket.gethostname() or not status.get('pid'):
    return False
  try:
    os.kill(status['pid'], 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def error_line(log_text: str) -> str:
  """The child's 'error: ...' line (experiments.train prints one), else its last line."""
  lines = [l.strip() for l in log_text.splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith('error:')]
  line = errors[-1][len('error:'):].strip() if errors else (lines[-1] if lines else 'no output')
  return line[:400]


# --------------------------------------------------------------------------------- executing

def gpu_groups(parallel: int) -> list[str | None]:
  """CUDA_VISIBLE_DEVICES for each of `parallel` slots: the visible GPUs split evenly.

  Counted with nvidia-smi (not jax, which would claim the GPUs' memory in this process).
  Without GPUs every slot is None: the runs share the CPU.
  """
  visible = os.environ.get('CUDA_VISIBLE_DEVICES')
  if visible is not None:
    gpus = [g for g in visible.split(',') if g.strip()]
  else:
    try:
      out = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=30)
      gpus = [str(i) for i, l in enumerate(out.stdout.splitlines()) if l.startswith('GPU ')]
    except (OSError, subprocess.TimeoutExpired):
      gpus = []
  if not gpus:
    return [None] * parallel
  if len(gpus) % parallel:
    raise UserError(f'--parallel {parallel} does not divide the {len(gpus)} visible GPUs')
  per_run = len(gpus) // parallel
  return [','.join(gpus[i * per_run:(i + 1) * per_run]) for i in range(parallel)]


def device_env(run: Run, gpus: str | None) -> dict[str, str]:
  """The environment that gives `run` its devices out of its slot's GPUs (None: no GPUs)."""
  if gpus is None:
    return {'JAX_NUM_CPU_DEVICES': str(run.devices)} if run.devices else {}
  listed = gpus.split(',')
  if run.devices > len(listed):
    raise UserError(f'{run.name} needs {run.devices} GPUs, its slot has {len(listed)} '
                    f'({gpus}); use a smaller --parallel')
  return {'CUDA_VISIBLE_DEVICES': ','.join(listed[:run.devices or len(listed)])}


def execute(run: Run, run_dir: str, gpus: str | None = None) -> dict:
  """Trains `run` in a subprocess, logging to RUN_DIR/train.log; returns its final status."""
  os.makedirs(run_dir, exist_ok=True)
  previous = read_status(run_dir) or {}
  command = run.command(run_dir)
  devices = device_env(run, gpus)
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
      p for p in (ROOT, os.environ.get('PYTHONPATH')) if p), **devices}
  status = {'name': run.name, 'config': run.config, 'overrides': run.overrides,
            'devices': run.devices, 'command': command, 'env': devices,
            'host': socket.gethostname(),
            'attempts': previous.get('attempts', 0) + 1,
            'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
            'wall_s': previous.get('wall_s', 0.0)}
  log_path = os.path.join(run_dir, LOG_FILE)
  start = time.perf_counter()
  with open(log_path, 'a') as log:
    log.write(f'\n=== attempt {status["attempts"]} {status["started"]}: '
              f'{" ".join(command)}\n')
    log.flush()
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
    write_status(run_dir, {**status, 'state': 'running', 'pid': child.pid})
    returncode = child.wait()
  status['wall_s'] += time.perf_counter() - start   # summed over attempts
  status['returncode'] = returncode
  status['finished'] = time.strftime('%Y-%m-%dT%H:%M:%S%z')
  if returncode == 0:
    status['state'] = 'finished'
  elif -returncode in INTERRUPTS:
    status['state'] = 'interrupted'   # stopped from outside: the next sweep resumes it
  else:
    with open(log_path) as f:
      status['error'] = (f'killed by {signal.Signals(-returncode).name}' if returncode < 0
                         else error_line(f.read().rsplit('\n=== attempt', 1)[-1]))
    status['state'] = 'failed'
  write_status(run_dir, status)
  return status


def _jsonable(value):
  return json.loads(json.dumps(value))


def _plan(run: Run, status: dict | None, retry_failed: bool) -> str:
  """'run' or why not: 'finished', 'failed', 'running elsewhere'."""
  if status is None:
    return 'run'
  recorded = status.get('config'), status.get('overrides'), status.get('devices') or 0
  if recorded != (run.config, _jsonable(run.overrides), run.devices):
    raise UserError(f'{run.name}: the folder holds another run ({recorded[0]} {recorded[1]}'
                    f'{f" on {recorded[2]} devices" if recorded[2] else ""}); use a new '
                    'sweep folder')
  state = status.get('state')
  if state == 'finished':
    return 'finished'
  if state == 'failed' and not retry_failed:
    return 'failed'
  if state == 'running' and _alive(status):
    return 'running elsewhere'
  return 'run'


def run_sweep(runs: list[Run], sweep_dir: str, parallel: int = 1, retry_failed: bool = False,
              log: Callable[[str], None] = print) -> dict[str, dict]:
  """Runs what is left of `runs` under `sweep_dir`, `parallel` at a time; {name: status}."""
  if parallel < 1:
    raise UserError(f'--parallel must be at least 1, got {parallel}')
  os.makedirs(sweep_dir, exist_ok=True)
  statuses, todo = {}, []
  for run in runs:
    run_dir = os.path.join(sweep_dir, run.name)
    status = read_status(run_dir)
    plan = _plan(run, status, retry_failed)
    if plan == 'run':
      todo.append(run)
      statuses[run.name] = status or {}
    else:
      log(f'skip {run.name}: {plan}' + (f' ({status.get("error")})' if plan == 'failed' else ''))
      statuses[run.name] = status
  lock = threading.Lock()

  def log_line(message: str) -> None:   # one line at a time from the parallel workers
    with lock:
      log(message)

  groups = gpu_groups(min(parallel, max(len(todo), 1)))
  for run in todo:
    device_env(run, groups[0])     # every slot has as many GPUs: refuse before starting
  slots = queue.Queue()
  for gpus in groups:
    slots.put(gpus)

  def one(run: Run) -> dict:
    gpus = slots.get()
    try:
      log_line(f'start {run.name}' + (f' on GPUs {gpus}' if gpus is not None else ''))
      status = execute(run, os.path.join(sweep_dir, run.name), gpus)
      log_line(f'{status["state"]} {run.name} in {status["wall_s"]:.1f}s'
               + (f': {status["error"]}' if status['state'] == 'failed' else ''))
      return status
    finally:
      slots.put(gpus)

  with concurrent.futures.ThreadPoolExecutor(max(1, min(parallel, len(todo)))) as pool:
    for run, status in builtins.zip(todo, pool.map(one, todo)):
      statuses[run.name] = status
  return statuses


# ---------------------------------------------------------------------------------- summary

_LOWER_IS_BETTER = ('loss', 'perplexity', 'bits_per_byte', 'bpc', 'error', 'time', 'flops')


def higher_is_better(metric: str) -> bool:
  """accuracy, f1, ... up; loss, perplexity, bits per byte, error, time down."""
  return not any(word in metric.rsplit('/', 1)[-1] for word in _LOWER_IS_BETTER)


@dataclasses.dataclass(frozen=True)
class Target:
  """'eval/loss<=2.5': the first logged step at which `metric op value` holds."""
  metric: str
  op: str
  value: float

  @classmethod
  def parse(cls, text: str) -> 'Target':
    match = re.fullmatch(r'\s*([\w/.\-]+)\s*(<=|>=|<|>)\s*([-+\d.eE]+)\s*', text)
    if not match:
      raise UserError(f'--target {text!r}: expected METRIC<=VALUE or METRIC>=VALUE, '
                      'e.g. eval/loss<=2.5')
    return cls(match[1], match[2], float(match[3]))

  def met(self, x: float) -> bool:
    return {'<=': x <= self.value, '>=': x >= self.value,
            '<': x < self.value, '>': x > self.value}[self.op]

  def __str__(self):
    return f'{self.metric}{self.op}{self.value:g}'


def read_metrics(run_dir: str) -> list[dict]:
  path = os.path.join(run_dir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def train_seconds(lines: list[dict]) -> list[float]:
  """Cumulative training time at each logged line: sum of perf/step_time_s x steps logged.

  The loop times the steps between two logs and restarts its timer after evaluating and
  checkpointing, so this counts training steps only (no compilation, eval or checkpoints).
  """
  total, previous, out = 0.0, 0, []
  for line in lines:
    if 'perf/step_time_s' in line:
      total += line['perf/step_time_s'] * (line['step'] - previous)
      previous = line['step']
    out.append(total)
  return out


def summarize(run: Run, run_dir: str, status: dict | None, metrics: list[str],
              targets: list[Target]) -> dict:
  """One table row: overrides, state, final and best of each metric, time to each target."""
  lines = read_metrics(run_dir)
  status = status or {}
  row: dict[str, Any] = {'run': run.name, **{k: flag_value(v) for k, v in run.overrides.items()},
                         'state': status.get('state', 'not run'),
                         'step': lines[-1]['step'] if lines else 0}
  for metric in metrics:
    values = [(l['step'], l[metric]) for l in lines if metric in l]
    row[f'final {metric}'] = values[-1][1] if values else None
    pick = max if higher_is_better(metric) else min
    row[f'best {metric}'] = pick(v for _, v in values) if values else None
  step_times = sorted(l['perf/step_time_s'] for l in lines if 'perf/step_time_s' in l)
  row['step time (s)'] = step_times[len(step_times) // 2] if step_times else None
  seconds = train_seconds(lines)
  row['train time (s)'] = seconds[-1] if seconds else None
  row['wall-clock (s)'] = status.get('wall_s')
  for target in targets:
    hit = next(((l['step'], s) for l, s in builtins.zip(lines, seconds)
                if target.metric in l and target.met(l[target.metric])), (None, None))
    row[f'steps to {target}'], row[f'train s to {target}'] = hit
  if status.get('state') == 'failed':
    row['error'] = status.get('error', '')
  return row


def summary_rows(runs: list[Run], sweep_dir: str, statuses: dict[str, dict],
                 metrics: list[str], targets: list[Target]) -> list[dict]:
  return [summarize(r, os.path.join(sweep_dir, r.name), statuses.get(r.name), metrics, targets)
          for r in runs]


def columns_of(rows: list[dict]) -> list[str]:
  columns: list[str] = []
  for row in rows:
    columns.extend(k for k in row if k not in columns)
  return columns


def format_value(value: Any) -> str:
  if value is None:
    return '-'
  if isinstance(value, float):
    return f'{value:.4g}'
  return str(value)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
  columns = columns or columns_of(rows)
  cell = lambda v: format_value(v).replace('|', '\\|')
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(cell(r.get(c)) for c in columns) + ' |' for r in rows]
  return '\n'.join(lines) + '\n'


def write_csv(rows: list[dict], path: str) -> None:
  import csv  # pylint: disable=g-import-not-at-top
  columns = columns_of(rows)
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, columns, restval='')
    writer.writeheader()
    writer.writerows({k: '' if v is None else v for k, v in r.items()} for r in rows)


def plot_curves(curves: dict[str, list[dict]], metrics: list[str], path: str) -> None:
  """One panel per metric, one line per run (x: step); PNG via matplotlib's Agg backend."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for ax, metric in builtins.zip(axes[0], metrics):
    for i, (name, lines) in enumerate(curves.items()):   # one colour per run in every panel
      points = [(l['step'], l[metric]) for l in lines if metric in l]
      if points:
        ax.plot(*builtins.zip(*points), marker='.' if len(points) < 30 else None, label=name,
                color=colors[i % len(colors)])
    ax.set_xlabel('step')
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
  labelled = {}
  for ax in axes[0]:
    handles, labels = ax.get_legend_handles_labels()
    labelled.update(builtins.zip(labels, handles))
  handles, labels = list(labelled.values()), list(labelled)
  if handles:
    fig.legend(handles, labels, loc='lower center', ncol=min(len(labels), 3), fontsize=8,
               bbox_to_anchor=(0.5, 0.0))
  fig.tight_layout(rect=(0, 0.06 + 0.03 * ((len(labels) - 1) // 3 if handles else 0), 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_summary(runs: list[Run], sweep_dir: str, statuses: dict[str, dict],
                  metrics: list[str], targets: list[Target], plot_metrics: list[str],
                  out_prefix: str) -> list[dict]:
  """OUT_PREFIX.csv, OUT_PREFIX.md (the table) and OUT_PREFIX.png (the curves); the rows."""
  rows = summary_rows(runs, sweep_dir, statuses, metrics, targets)
  write_csv(rows, out_prefix + '.csv')
  with open(out_prefix + '.md', 'w') as f:
    f.write(markdown_table(rows))
  curves = {r.name: read_metrics(os.path.join(sweep_dir, r.name)) for r in runs}
  plot_curves(curves, plot_metrics, out_prefix + '.png')
  return rows
