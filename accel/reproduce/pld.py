r"""PLD (Zhang & He, NeurIPS 2020; papers.md section 2): BERT pretraining with and without
progressive layer dropping, then fine-tuning each encoder on a downstream task.

Runs: `baseline` (configs/pld_bert.py, layerdrop.enabled=false) and `pld` (the same with
dropping); then `baseline-genre`, `pld-genre` (configs/pld_bert_finetune.py from each
pretrained encoder; dropping off, as the paper fine-tunes) and, above smoke scale,
`scratch-genre` (no pretraining, the reference that shows what pretraining buys).

Reported: FLOPs per step (the executed blocks, `perf/flops_per_step`), time per step, mean
layers run against the schedule's expectation sum_l p_l(t) = L - (1 - theta(t)) (L + 1) / 2
averaged over t < T, the MLM loss, steps and training seconds for PLD to reach the baseline's
final MLM loss (and the speedup), and the downstream accuracy. The paper's downstream numbers
are GLUE (dev) averages; accel's downstream task is genre classification of held-out
Shakespeare plays: the comparison is of the direction, not the value.
"""
from __future__ import annotations

import math
import os

from accel import sweep
from accel.reproduce import RunResult, config, fmt, ratio, speedup, table

TITLE = 'Progressive Layer Dropping (Zhang & He, NeurIPS 2020)'
CONFIGS = ('configs/pld_bert.py', 'configs/pld_bert_finetune.py')
TABLE_METRICS = ['eval/loss', 'eval/accuracy']
PLOT_METRICS = ['train/loss', 'eval/loss', 'train/layerdrop/layers_run']

# papers.md section 2 (BERT-base, 64 V100s, fp16).
PAPER = {
    'flops': '25% fewer',
    'time_per_sample': '24% less (38.45 h -> 29.22 h)',
    'speedup': '2.5x to the same downstream accuracy',
    'layers': '8.75 of 12 at steady state (theta_bar 0.5)',
    'downstream': 'GLUE avg 82.1 (baseline) / 82.9 (PLD)',
}


def stages(scale: str, sweep_dir: str) -> list[list[sweep.Run]]:
  pretrain = config('pld_bert', scale)
  finetune = config('pld_bert_finetune', scale)
  return [
      [sweep.Run(pretrain, {'layerdrop.enabled': False}, 'baseline'),
       sweep.Run(pretrain, {'layerdrop.enabled': True}, 'pld')],
      [sweep.Run(finetune, {'finetune.pretrained_workdir': os.path.join(sweep_dir, 'baseline')},
                 'baseline-genre'),
       sweep.Run(finetune, {'finetune.pretrained_workdir': os.path.join(sweep_dir, 'pld')},
                 'pld-genre'),
       *([sweep.Run(finetune, {}, 'scratch-genre')] if scale != 'smoke' else [])],
  ]


def expected_layers(num_layers: int, theta_bar: float, gamma: float, total_steps: int) -> float:
  """Mean over t < T of sum_l p_l(t) = L - (1 - theta(t)) (L + 1) / 2, theta(t) =
  (1 - theta_bar) exp(-gamma t) + theta_bar (papers.md section 2)."""
  mean_theta = sum((1 - theta_bar) * math.exp(-gamma * t) + theta_bar
                   for t in range(total_steps)) / total_steps
  return num_layers - (1 - mean_theta) * (num_layers + 1) / 2


def report(results: dict[str, RunResult], scale: str, out_prefix: str) -> str:
  del scale, out_prefix
  base, pld = results['baseline'], results['pld']
  base_loss = base.final('eval/loss')
  steps_to, seconds_to = pld.reach('eval/loss', base_loss) if base_loss is not None else (None,
                                                                                           None)
  base_seconds = base.train_seconds()
  expected = None
  if pld.config:
    c = pld.config
    expected = expected_layers(c['model']['num_layers'], c['layerdrop']['theta_bar'],
                               c['layerdrop']['gamma'], c['total_steps'])
  num_layers = base.config.get('model', {}).get('num_layers')
  rows = [
      ['FLOPs per step (mean of logged steps)', PAPER['flops'],
       fmt(base.mean('perf/flops_per_step'), '.4g'), fmt(pld.mean('perf/flops_per_step'), '.4g'),
       fmt(ratio(pld.mean('perf/flops_per_step'), base.mean('perf/flops_per_step')), '.3f')],
      ['time per step, median (s)', PAPER['time_per_sample'],
       fmt(base.median('perf/step_time_s')), fmt(pld.median('perf/step_time_s')),
       fmt(ratio(pld.median('perf/step_time_s'), base.median('perf/step_time_s')), '.3f')],
      ['training time (s, steps only)', '38.45 h / 29.22 h', fmt(base_seconds),
       fmt(pld.train_seconds()), fmt(ratio(pld.train_seconds(), base_seconds), '.3f')],
      ['layers run per step (mean of logged / expected)', PAPER['layers'], fmt(num_layers),
       f'{fmt(pld.mean("train/layerdrop/layers_run"), ".3g")} / {fmt(expected, ".3g")}', '-'],
      ['final MLM eval loss', '-', fmt(base_loss), fmt(pld.final('eval/loss')),
       fmt(ratio(pld.final('eval/loss'), base_loss), '.3f')],
      ["steps / training s to the baseline's final MLM loss", PAPER['speedup'],
       f'{fmt(base.step_count())} / {fmt(base_seconds, ".3g")}',
       f'{fmt(steps_to)} / {fmt(seconds_to, ".3g")}',
       speedup(base_seconds, seconds_to)],
  ]
  genre = [results.get(n) for n in ('baseline-genre', 'pld-genre', 'scratch-genre')]
  downstream = [
      ['downstream accuracy, final (genre of held-out plays)', PAPER['downstream'],
       *(fmt(r and r.final('eval/accuracy'), '.3f') for r in genre)],
      ['downstream accuracy, best', '-',
       *(fmt(r and r.best('eval/accuracy'), '.3f') for r in genre)],
  ]
  return '\n'.join([
      '## Pretraining (masked LM)', '',
      table(['quantity', 'paper (baseline -> PLD)', 'accel baseline', 'accel PLD',
             'accel PLD / baseline'], rows),
      'Training time sums the logged per-step times (compilation, evaluation and '
      'checkpoints excluded). Steps to the baseline loss are counted at evaluation steps.', '',
      '## Downstream (fine-tuned, no dropping)', '',
      table(['quantity', 'paper', 'from baseline', 'from PLD', 'no pretraining'], downstream),
      "The paper's downstream numbers are GLUE dev averages; accel's task is the genre of "
      'passages from held-out plays (accel/data/genre.py).', ''])
