"""A sweep's summary: one table row per run (final and best metrics, step and training time,
steps and training seconds to each target), as CSV and markdown, and the curves as a PNG."""
from __future__ import annotations

import builtins
import dataclasses
import os
import re
from typing import Any

from accel.errors import UserError
from accel.metrics import read_jsonl
from accel.sweep.declare import Run, flag_value


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
  return read_jsonl(path)     # without a torn last line (a run killed while writing it)


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
