r"""Ouroboros (Yang et al. NeurIPS 2019; papers.md section 1): throughput of the stale-gradient
pipeline against device count and against data parallelism, and bits per byte after a
fixed budget (the same steps on the same batches for every run).

Runs (configs/ouroboros_lm.py at the scale), for each device count D of the scale:
`ouroboros-Ddev` (pipeline.num_modules = D + 1: a tied ring of D + 1 modules on D stages)
and `dp-Ddev` (pipeline off: data parallelism over D devices; skipped where the batch does
not split over D). `dp-1dev` is the single-device baseline of the speedups. Without GPUs the
devices are simulated CPU devices sharing the host's cores: the schedule runs, the
throughput is not a parallel speedup. An Ouroboros run that logged no
`train/pipeline_filled` (the pipeline trainer's metric) is flagged in the table. On a
machine with fewer GPUs than a run needs, that run is listed, not run (`ouroboros-1dev`, K=2
on one stage, is the delayed-gradient algorithm without model parallelism: its throughput
against `dp-1dev` is what the pipeline's bookkeeping costs; its loss what staleness costs).
"""
from __future__ import annotations

import os

from accel import sweep
from accel.reproduce import (LOCAL_SCALES, NOT_RUN_HERE, RunResult, config, embed, fmt,
                             load_config, ratio, table, visible_gpus)

TITLE = 'Ouroboros stale-gradient model parallelism (Yang et al. NeurIPS 2019)'
CONFIGS = ('configs/ouroboros_lm.py',)
TABLE_METRICS = ['eval/bits_per_byte', 'eval/loss']
PLOT_METRICS = ['train/loss', 'eval/bits_per_byte', 'perf/tokens_per_s']
DEVICE_COUNTS = {'smoke': (1,), 'cpu': (1, 2), 'gpu': (1, 2, 3), 'paper': (1, 2, 3)}
PAPER = ('4 V100s, Transformer / Transformer-XL on enwik8, text8, WikiText-103: a much larger '
         'speedup than data parallelism at comparable or better bpc / perplexity (per-table '
         'numbers not retrieved); Transformer-XL base reference 0.99 bpc on enwik8')


def stages(scale: str, sweep_dir: str) -> list[list[sweep.Run]]:
  del sweep_dir
  batch = load_config(config('ouroboros_lm', scale)).batch_size
  runs = []
  for d in DEVICE_COUNTS[scale]:
    if batch % d == 0:
      runs.append(sweep.Run(config('ouroboros_lm', scale), {'pipeline.enabled': False},
                            f'dp-{d}dev', devices=d))
    runs.append(sweep.Run(config('ouroboros_lm', scale),
                          {'pipeline.enabled': True, 'pipeline.num_modules': d + 1},
                          f'ouroboros-{d}dev', devices=d))
  return [runs]


def gpipe_comparison(scale: str, out_prefix: str) -> str:
  """experiments.bench_pipeline (single device, data parallel, naive model parallel, GPipe,
  Ouroboros on the same devices), run into OUT_PREFIX_bench/ above smoke scale."""
  quick = scale in LOCAL_SCALES
  if scale == 'smoke':
    return ('Against GPipe and naive model parallelism: `python -m experiments.bench_pipeline '
            '--quick` (embedded here from the cpu scale up).')
  gpus = None if quick else visible_gpus()
  if gpus is not None and gpus < 2:
    return ('Against GPipe, naive model parallelism and data parallelism: needs 2 GPUs, this '
            f'machine has {gpus}: `python -m experiments.bench_pipeline --out DIR`.')
  folder = os.path.abspath(out_prefix + '_bench')
  lines = embed(['experiments.bench_pipeline', *(['--quick'] if quick else []),
                 f'--out={folder}'],
                os.path.join(folder, f'bench_pipeline_{"cpu" if quick else "gpu"}.md'))
  return '\n'.join(['## Against GPipe, naive model parallelism and data parallelism '
                    '(experiments.bench_pipeline)', ''] +
                   [l.replace('## ', '### ', 1) if l.startswith('## ') else l for l in lines])


def report(results: dict[str, RunResult], scale: str, out_prefix: str) -> str:
  single = results.get('dp-1dev')
  single_tps = single.median('perf/tokens_per_s') if single else None
  rows = []
  for d in DEVICE_COUNTS[scale]:
    for kind in ('dp', 'ouroboros'):
      r = results.get(f'{kind}-{d}dev')
      if r is None:
        rows.append([d, kind, 'skipped: the batch does not split', '-', '-', '-', '-'])
        continue
      tps = r.median('perf/tokens_per_s')
      state = r.status.get('state', 'not run')
      if state == NOT_RUN_HERE:
        state = f'{state}: {r.status["error"]}'
      if kind == 'ouroboros' and r.finished and not r.values('train/pipeline_filled'):
        state = 'finished WITHOUT the pipeline (no train/pipeline_filled logged)'
      rows.append([d, kind if kind == 'dp' else f'ouroboros (K={d + 1})', state,
                   fmt(tps, '.4g'),
                   fmt(ratio(tps, single_tps), '.2f'), fmt(r.final('eval/bits_per_byte'), '.4f'),
                   fmt(r.step_count())])
  return '\n'.join([
      '## Throughput and bits per byte after a fixed budget', '',
      table(['devices', 'schedule', 'state', 'tokens/s (median)', 'speedup vs 1 device',
             'eval bits/byte', 'steps'], rows),
      f'Paper: {PAPER}.', '', gpipe_comparison(scale, out_prefix), ''])
