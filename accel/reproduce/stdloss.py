r"""Standardization loss (Collins, Ballé, Shlens 2019; papers.md section 4): no normalization
vs batch norm vs the standardization loss on the paper's MNIST CNN, and across batch sizes.

Runs (configs/stdloss_mnist.py, digits 8x8 standing in for MNIST offline):
- `VARIANT-seedS` for VARIANT in none | batch | stdloss and each seed: the paper's setup (SGD
  lr 1e-3, batch 128, 1000 steps at cpu scale, lambda 1).
- `VARIANT-bsB` for VARIANT in batch | group | stdloss and each batch size B (seed 0): the
  paper's batch-size study (MobileNet-v1 there, 2..128 examples per core).

Steps to the baseline's best, per seed (the paper's definition): A* = the best evaluation
accuracy of the un-normalized run, first reached at step S_none; S_v = the first evaluation
step at which variant v reaches A* (none if never); speedup = S_none / S_v.
The cpu scale is the paper's MNIST hyperparameters; the model is a few thousand parameters, so
there is no gpu or paper scale.
"""
from __future__ import annotations

import os
import statistics

from accel import sweep
from accel.reproduce import RunResult, config, fmt, table

TITLE = 'Standardization loss (Collins, Ballé, Shlens 2019)'
CONFIGS = ('configs/stdloss_mnist.py',)
SCALES = ('smoke', 'cpu')
TABLE_METRICS = ['eval/accuracy', 'eval/loss']
PLOT_METRICS = ['train/loss', 'eval/accuracy']
VARIANTS = ('none', 'batch', 'stdloss')
BATCH_VARIANTS = ('batch', 'group', 'stdloss')
SEEDS = {'smoke': (0,), 'cpu': (0, 1, 2, 3, 4)}
BATCH_SIZES = {'smoke': (4,), 'cpu': (2, 8, 32, 128)}

# papers.md section 4: MNIST accuracy after 1000 steps (mean +- std), steps to the baseline's
# best accuracy on larger models, MobileNet-v1 across batch sizes.
PAPER_ACCURACY = {'none': '24.6 +- 6.5', 'batch': '85.6 +- 1.1', 'stdloss': '75.2 +- 2.6'}
PAPER_SPEEDUP = {'batch': 'PointNet 4.4x, Inception-v2 3.7x, ResNet-50 2.3x',
                 'stdloss': 'PointNet 2.2x, Inception-v2 2.8x, ResNet-50 2.2x'}
PAPER_BATCH = ('MobileNet-v1, 2..128 per core: std loss flat (66.5-66.9%) and above batch '
               'norm at 2 and 4 per core; group norm above both')


def stages(scale: str, sweep_dir: str) -> list[list[sweep.Run]]:
  del sweep_dir
  seeds = [sweep.Run(config('stdloss_mnist', f'{scale},cnn,{v}'), {'seed': s}, f'{v}-seed{s}')
           for s in SEEDS[scale] for v in VARIANTS]
  sizes = [sweep.Run(config('stdloss_mnist', f'{scale},cnn,{v}'), {'batch_size': b},
                     f'{v}-bs{b}')
           for b in BATCH_SIZES[scale] for v in BATCH_VARIANTS]
  return [seeds + sizes]


def steps_to_baseline_best(none: RunResult, other: RunResult) -> tuple[int | None, int | None]:
  """(S_none, S_v): steps at which the un-normalized run first reaches its best accuracy,
  and at which `other` first reaches it."""
  best = none.best('eval/accuracy')
  if best is None:
    return None, None
  return none.reach('eval/accuracy', best)[0], other.reach('eval/accuracy', best)[0]


def _mean_std(values: list[float]) -> str:
  if not values:
    return '-'
  spread = statistics.stdev(values) if len(values) > 1 else 0.0
  return f'{100 * statistics.mean(values):.1f} +- {100 * spread:.1f}'


def report(results: dict[str, RunResult], scale: str, out_prefix: str) -> str:
  seeds = SEEDS[scale]
  accuracy = {v: [results[f'{v}-seed{s}'].final('eval/accuracy') for s in seeds] for v in VARIANTS}
  rows = []
  for v in VARIANTS:
    speedups, steps = [], []
    for s in seeds:
      s_none, s_v = steps_to_baseline_best(results[f'none-seed{s}'], results[f'{v}-seed{s}'])
      steps.append(s_v)
      if s_none is not None and s_v:
        speedups.append(s_none / s_v)
    reached = [x for x in steps if x is not None]
    rows.append([v, PAPER_ACCURACY[v],
                 _mean_std([a for a in accuracy[v] if a is not None]),
                 ', '.join(fmt(x) for x in steps),
                 f'{len(reached)}/{len(steps)}',
                 fmt(statistics.median(speedups), '.2f') + 'x' if speedups else '-',
                 PAPER_SPEEDUP.get(v, '1x (definition)')])
  sizes = BATCH_SIZES[scale]
  batch_rows = [[b, *(fmt(results[f'{v}-bs{b}'].final('eval/accuracy'), '.3f')
                      for v in BATCH_VARIANTS)] for b in sizes]
  _plot_batch_sizes(results, sizes, out_prefix + '_batch.png')
  return '\n'.join([
      f'## Accuracy after the last step and steps to the baseline\'s best ({len(seeds)} '
      'seed(s))', '',
      table(['variant', 'paper MNIST accuracy (%)', 'accel accuracy (%)',
             "accel steps to none's best, per seed", 'reached', 'accel speedup (median)',
             'paper speedup (other models)'], rows),
      "Digits (8x8, scikit-learn) stand in for MNIST; the paper's step counts are for "
      'PointNet, Inception-v2 and ResNet-50, its MNIST study reports accuracy only.', '',
      '## Accuracy across batch sizes (seed 0)', '',
      table(['batch size', *(f'accel {v}' for v in BATCH_VARIANTS)], batch_rows),
      f'Paper: {PAPER_BATCH}.', '',
      f'![accuracy vs batch size]({os.path.basename(out_prefix)}_batch.png)', ''])


def _plot_batch_sizes(results, sizes, path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 3.6))
  for v in BATCH_VARIANTS:
    points = [(b, results[f'{v}-bs{b}'].final('eval/accuracy')) for b in sizes]
    points = [(b, a) for b, a in points if a is not None]
    if points:
      ax.plot(*zip(*points), marker='o', label=v)
  ax.set_xscale('log', base=2)
  ax.set_xlabel('batch size')
  ax.set_ylabel('final eval/accuracy')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
