r"""Standardization loss (Collins, Ballé, Shlens 2019; papers.md section 4): no normalization
vs normalization layers vs the standardization loss on the paper's MNIST models, and across
batch sizes. Digits 8x8 (configs/stdloss_mnist.py) stand in for MNIST offline.

Runs at cpu scale (smoke: the first seed, fewer variants, one batch size, 20-step runs):
- `MODEL-VARIANT-seedS`, the paper's setup (SGD lr 1e-3, batch 128, 1000 steps, weight
  decay 4e-5, lambda 1) for 5 seeds: the CNN with none | batch | group | layer | stdloss,
  the MLP with none | batch | stdloss.
- `VARIANT-bsB-seedS`, the batch-size study (the paper's is MobileNet-v1 with 2..128
  examples per core): the CNN with none | batch | group | stdloss at B = 2, 4, 16, 128 on one
  device, 2 seeds; every run sees the same 8 epochs of the 1437 training digits (steps =
  8 * 1437 // B), SGD momentum 0.9 with the linear scaling rule lr = 0.01 B / 128, evaluated
  after the last step. The moments of batch norm and of the std loss both come from the B
  examples of a step.

Steps to the baseline's best, per seed (the paper's definition): A* = the best evaluation
accuracy of the un-normalized run, first reached at step S_none; S_v = the first evaluation
step at which variant v reaches A* (none if never); speedup = S_none / S_v, as the mean of
the per-seed ratios (seeds that reach A*) and as the ratio of the mean steps (all seeds
reach A*).
The cpu scale is the paper's MNIST hyperparameters; the models are a few thousand
parameters, so the gpu scale runs the same runs (on a GPU, side by side with --parallel)
and adds the step-time overhead at ResNet size on that GPU: experiments.bench_stdloss's
table (ResNet-32, batch 256; none vs batch norm vs std loss), written beside the table as
stdloss_gpu_resnet_step.{md,json}. There is no paper scale.
"""
from __future__ import annotations

import os
import statistics

from accel import sweep
from accel.reproduce import RunResult, config, embed, fmt, table

TITLE = 'Standardization loss (Collins, Ballé, Shlens 2019)'
CONFIGS = ('configs/stdloss_mnist.py',)
SCALES = ('smoke', 'cpu', 'gpu')
RUNS_OF_SCALE = {'smoke': 'smoke', 'cpu': 'cpu', 'gpu': 'cpu'}   # gpu: cpu's runs on a GPU
STEP_TIME_TAG = '_resnet_step'     # bench_stdloss's files beside the gpu table
TABLE_METRICS = ['eval/accuracy', 'eval/loss']
PLOT_METRICS = ['train/loss', 'eval/accuracy']

# The studies at each scale: model -> variants (the first is the baseline, 'none').
SEED_VARIANTS = {'smoke': {'cnn': ('none', 'stdloss')},
                 'cpu': {'cnn': ('none', 'batch', 'group', 'layer', 'stdloss'),
                         'mlp': ('none', 'batch', 'stdloss')}}
SEEDS = {'smoke': (0,), 'cpu': (0, 1, 2, 3, 4)}
BATCH_VARIANTS = {'smoke': ('batch', 'stdloss'), 'cpu': ('none', 'batch', 'group', 'stdloss')}
BATCH_SIZES = {'smoke': (4,), 'cpu': (2, 4, 16, 128)}
BATCH_SEEDS = {'smoke': (0,), 'cpu': (0, 1)}
BATCH_EXAMPLES = {'smoke': 80, 'cpu': 8 * 1437}   # cpu: 8 epochs of the digits train split
BATCH_LR_AT_128 = 0.01

# papers.md section 4: MNIST accuracy after 1000 steps (mean +- std), steps to the baseline's
# best accuracy on larger models, MobileNet-v1 across batch sizes.
PAPER_ACCURACY = {'none': '24.6 +- 6.5', 'batch': '85.6 +- 1.1', 'stdloss': '75.2 +- 2.6'}
PAPER_SPEEDUP = ("Paper, steps to the baseline's best accuracy (speedup): PointNet 26.6K / BN "
                 '6.1K (4.4x) / std loss 12.1K (2.2x); Inception-v2 1972K / 534K (3.7x) / 700K '
                 '(2.8x); ResNet-50 89.4K / 39.5K (2.3x) / 40.0K (2.2x). The paper gives no '
                 'speedup for MNIST, only the accuracies above (which of its two MNIST models '
                 'they are is not recorded in papers.md).')
PAPER_BATCH = ('Paper (MobileNet-v1, ImageNet, 2..128 per core): standardization loss flat at '
               '66.5-66.9 %, better than batch norm at 2 and 4 per core; group norm better '
               'than both.')


def batch_overrides(scale: str, batch_size: int, seed: int) -> dict:
  """The batch-size study's run at `batch_size`: the same examples seen, lr scaled by B."""
  steps = max(1, BATCH_EXAMPLES[scale] // batch_size)
  return {'seed': seed, 'batch_size': batch_size, 'total_steps': steps, 'eval_every': steps,
          'log_every': steps, 'checkpoint_every': steps,
          'optimizer.lr': BATCH_LR_AT_128 * batch_size / 128, 'optimizer.momentum': 0.9}


def stages(scale: str, sweep_dir: str) -> list[list[sweep.Run]]:
  del sweep_dir
  scale = RUNS_OF_SCALE[scale]
  seeds = [sweep.Run(config('stdloss_mnist', f'{scale},{model},{v}'), {'seed': s},
                     f'{model}-{v}-seed{s}')
           for model, variants in SEED_VARIANTS[scale].items() for s in SEEDS[scale]
           for v in variants]
  sizes = [sweep.Run(config('stdloss_mnist', f'{scale},cnn,{v}'), batch_overrides(scale, b, s),
                     f'{v}-bs{b}-seed{s}')
           for b in BATCH_SIZES[scale] for v in BATCH_VARIANTS[scale] for s in BATCH_SEEDS[scale]]
  return [seeds + sizes]


def steps_to_baseline_best(none: RunResult, other: RunResult) -> tuple[int | None, int | None]:
  """(S_none, S_v): steps at which the un-normalized run first reaches its best accuracy,
  and at which `other` first reaches it."""
  best = none.best('eval/accuracy')
  if best is None:
    return None, None
  return none.reach('eval/accuracy', best)[0], other.reach('eval/accuracy', best)[0]


def _mean_std(values: list, scale: float = 1.0, spec: str = '.1f') -> str:
  if not values or None in values:
    return '-'
  spread = statistics.stdev(values) if len(values) > 1 else 0.0
  return f'{format(scale * statistics.mean(values), spec)} +- {format(scale * spread, spec)}'


def seed_rows(results: dict[str, RunResult], scale: str, model: str) -> list[list]:
  """One row per variant of `model`: accuracy, steps to the baseline's best, speedups."""
  seeds, rows = SEEDS[scale], []
  for v in SEED_VARIANTS[scale][model]:
    runs = [results[f'{model}-{v}-seed{s}'] for s in seeds]
    pairs = [steps_to_baseline_best(results[f'{model}-none-seed{s}'], r)
             for s, r in zip(seeds, runs)]
    steps = [s_v for _, s_v in pairs]
    reached = [s for s in steps if s is not None]
    ratios = [s_none / s_v for s_none, s_v in pairs if s_none is not None and s_v]
    all_reached = len(reached) == len(seeds) and None not in (p[0] for p in pairs)
    of_means = (statistics.mean(p[0] for p in pairs) / statistics.mean(steps)
                if all_reached else None)
    rows.append([v, _mean_std([r.final('eval/accuracy') for r in runs], 100),
                 PAPER_ACCURACY.get(v, '-'), f'{len(reached)}/{len(seeds)}',
                 fmt(statistics.mean(reached), '.0f') if reached else '-',
                 ', '.join(fmt(s) for s in steps),
                 fmt(statistics.mean(ratios), '.2f') if ratios else '-', fmt(of_means, '.2f'),
                 _mean_std([r.final('train/stdloss/loss') for r in runs], spec='.2f')])
  return rows


def batch_rows(results: dict[str, RunResult], scale: str) -> list[list]:
  rows = []
  for b in BATCH_SIZES[scale]:
    cells = [_mean_std([results[f'{v}-bs{b}-seed{s}'].final('eval/accuracy')
                        for s in BATCH_SEEDS[scale]], 100) for v in BATCH_VARIANTS[scale]]
    rows.append([b, batch_overrides(scale, b, 0)['total_steps'], *cells])
  return rows


def report(results: dict[str, RunResult], scale: str, out_prefix: str) -> str:
  step_time = step_time_table(out_prefix) if scale == 'gpu' else []
  scale = RUNS_OF_SCALE[scale]
  seeds = SEEDS[scale]
  text = ["## Accuracy after the last step and steps to the un-normalized baseline's best "
          f'accuracy ({len(seeds)} seed(s))', '',
          'configs/stdloss_mnist.py at this scale; validation accuracy on all 360 held-out '
          "digits. A* = the best accuracy of the no-normalization run of the same seed; steps "
          '= the first evaluation step at or above A* (mean over the seeds that reach it); '
          "speedup = the baseline's own step to A* / that step, as the mean of the per-seed "
          'ratios and as the ratio of the mean steps. The std-loss term is the unweighted sum '
          'over layers at the last logged step.', '']
  for model in SEED_VARIANTS[scale]:
    text += [f'### {model}', '', table(
        ['variant', 'accuracy after last step (%)', 'paper, MNIST 1000 steps (%)',
         'seeds reaching A*', 'steps to A* (mean)', 'per seed', 'speedup, x (mean of seeds)',
         'speedup, x (of mean steps)', 'std-loss term, last step'],
        seed_rows(results, scale, model))]
  text += [PAPER_SPEEDUP, '']
  lr = BATCH_LR_AT_128
  text += ['## Batch-size study', '',
           f'The CNN, one device, {BATCH_EXAMPLES[scale]} examples at every batch size b, SGD '
           f'momentum 0.9, lr = {lr} * b / 128, {len(BATCH_SEEDS[scale])} seed(s); '
           'validation accuracy (%) after the last step, mean +- std over seeds.', '',
           table(['examples per device (b)', 'steps', *BATCH_VARIANTS[scale]],
                 batch_rows(results, scale)),
           PAPER_BATCH, '',
           f'![accuracy vs batch size]({os.path.basename(out_prefix)}_batch.png)', '']
  _plot_batch_sizes(results, scale, out_prefix + '_batch.png')
  return '\n'.join(text + step_time)


def step_time_table(out_prefix: str) -> list[str]:
  """experiments.bench_stdloss on this GPU (ResNet-32, batch 256), reused when there."""
  folder = os.path.dirname(os.path.abspath(out_prefix))
  lines = embed(['experiments.bench_stdloss', f'--out={folder}', f'--tag={STEP_TIME_TAG}'],
                os.path.join(folder, f'stdloss_gpu{STEP_TIME_TAG}.md'))
  return ['## Step-time overhead at ResNet size on this GPU', '', *lines, '']


def _plot_batch_sizes(results, scale, path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 3.6))
  for v in BATCH_VARIANTS[scale]:
    points = [(b, [results[f'{v}-bs{b}-seed{s}'].final('eval/accuracy')
                   for s in BATCH_SEEDS[scale]]) for b in BATCH_SIZES[scale]]
    points = [(b, statistics.mean(a)) for b, a in points if None not in a]
    if points:
      ax.plot(*zip(*points), marker='o', label=v)
  ax.set_xscale('log', base=2)
  ax.set_xlabel('batch size')
  ax.set_ylabel('final eval/accuracy (mean over seeds)')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
