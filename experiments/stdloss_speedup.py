"""Steps to the un-normalized baseline's best accuracy: batch norm and the standardization loss.

Collins, Ballé, Shlens 2019 (papers.md section 4): for each seed, train the un-normalized
model ('none'); A* = its best validation accuracy over the run, reached at step S_none.
For each other variant, S_v = the first evaluation step with accuracy >= A* (none if never
within total_steps); speedup = S_none / S_v. Also the accuracy after the last step, mean
and spread over seeds, beside the paper's MNIST numbers. Every run is one
`accel.train.train_and_evaluate` of configs/stdloss_mnist.py, in this process.

  python -m experiments.stdloss_speedup --out results                # cnn, 5 seeds, CPU
  python -m experiments.stdloss_speedup --models cnn,mlp --seeds 5 --out results
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import jax

from accel import train
from configs import stdloss_mnist

# Paper, MNIST, accuracy after 1000 steps (mean +- std over runs); papers.md section 4 does
# not say whether these are the CNN's or the MLP's.
PAPER_ACCURACY = {'none': (24.6, 6.5), 'batch': (85.6, 1.1), 'stdloss': (75.2, 2.6)}


def _rows(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f]


def eval_curve(workdir: str) -> list[tuple[int, float]]:
  """[(step, eval/accuracy)] from a run's metrics.jsonl."""
  return [(r['step'], r['eval/accuracy']) for r in _rows(workdir) if 'eval/accuracy' in r]


def train_once(config, workdir: str) -> float:
  """Trains `config` in `workdir` unless it already holds the finished run; wall seconds."""
  curve = eval_curve(workdir)
  if curve and curve[-1][0] == config.total_steps:
    return 0.0
  t0 = time.perf_counter()
  train.train_and_evaluate(config, workdir)
  return time.perf_counter() - t0


def first_step_reaching(curve, target: float) -> int | None:
  return next((s for s, a in curve if a >= target), None)


def run_all(args) -> dict:
  """Every (model, seed, variant) run; finished runs already in `args.runs` are reused."""
  runs = {}
  for model in args.models:
    for seed in range(args.seeds):
      for variant in args.variants:
        config = stdloss_mnist.get_config(f'{args.preset},{model},{variant}')
        config.seed = seed
        config.progress_bar = False
        if args.total_steps:
          config.total_steps = args.total_steps
        workdir = os.path.join(args.runs, f'{model}-{variant}-seed{seed}')
        wall_s = train_once(config, workdir)
        curve = eval_curve(workdir)
        last = _rows(workdir)[-1]
        runs[f'{model}/{variant}/{seed}'] = dict(
            curve=curve, wall_s=wall_s, final_train_loss=last['train/loss'],
            final_stdloss=last.get('train/stdloss/loss'))
        print(f'{model} {variant} seed {seed}: final accuracy {curve[-1][1]:.4f} '
              f'({wall_s:.0f} s)', flush=True)
  return runs


def _mean_std(xs):
  return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(args, runs: dict) -> dict:
  table = {}
  for model in args.models:
    rows = {}
    for variant in args.variants:
      finals, steps, base_steps, speedups, stdl = [], [], [], [], []
      for seed in range(args.seeds):
        base = runs[f'{model}/none/{seed}']['curve']
        best = max(a for _, a in base)
        base_steps.append(first_step_reaching(base, best))
        run = runs[f'{model}/{variant}/{seed}']
        finals.append(100 * run['curve'][-1][1])
        stdl.append(run['final_stdloss'])
        steps.append(first_step_reaching(run['curve'], best))
        speedups.append(base_steps[-1] / steps[-1] if steps[-1] else None)
      reached = [s for s in steps if s is not None]
      rows[variant] = dict(
          final_accuracy=_mean_std(finals), steps_to_baseline_best=steps,
          reached=len(reached),
          mean_steps=statistics.mean(reached) if reached else None,
          speedups=speedups,
          mean_speedup=(statistics.mean([x for x in speedups if x is not None])
                        if reached else None),
          speedup_of_means=(statistics.mean(base_steps) / statistics.mean(steps)
                            if len(reached) == args.seeds else None),
          final_stdloss=_mean_std(stdl) if None not in stdl else None)
    table[model] = rows
  return table


def run_meta(t0: float, script: str) -> dict:
  """Device, versions, date, wall time since t0 and the command line of a study."""
  return dict(device=f'{jax.devices()[0].platform} x{jax.device_count()}',
              jax_version=jax.__version__, wall_s=time.perf_counter() - t0,
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
              command=f'python -m experiments.{script} ' + ' '.join(sys.argv[1:]))


def provenance(meta: dict) -> str:
  return (f"Device: {meta['device']}, jax {meta['jax_version']}, {meta['date']}, "
          f"{meta['wall_s']:.0f} s in this invocation. Command: `{meta['command']}`")


def write_outputs(out: str, name: str, record: dict, md: str) -> None:
  """<out>/<name>.json and <out>/<name>.md."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, name + '.json'), 'w') as f:
    json.dump(record, f, indent=1)
  with open(os.path.join(out, name + '.md'), 'w') as f:
    f.write(md)


def _fmt(x, spec: str) -> str:
  return '-' if x is None else format(x, spec)


def to_markdown(args, table: dict, meta: dict) -> str:
  lines = ['# Standardization loss: steps to the un-normalized baseline\'s best accuracy', '',
           f"configs/stdloss_mnist.py:{args.preset} (digits 8x8, SGD lr {meta['lr']}, "
           f"batch {meta['batch_size']}, wd {meta['weight_decay']}, lambda {meta['weight']}), "
           f"{args.seeds} seeds (0..{args.seeds - 1}), "
           f"{meta['total_steps']} steps, validation accuracy on all 360 held-out digits "
           f"every {meta['eval_every']} steps.", '',
           provenance(meta), '',
           'A* = the best accuracy of the no-normalization run of the same seed; steps = the '
           'first evaluation step at or above A* (mean over the seeds that reach it); '
           'speedup = the baseline\'s own step to A* / that step, as the mean of the per-seed '
           'ratios (seeds that reach A*) and as the ratio of the mean steps (all seeds reach '
           'A*). The std-loss term is the unweighted sum over layers, logged at the last '
           'step.', '']
  for model, rows in table.items():
    lines += [f'## {model}', '',
              '| variant | accuracy after last step (%) | paper, MNIST 1000 steps (%) | '
              'seeds reaching A* | steps to A* (mean) | per seed | speedup, x (mean of seeds) | '
              'speedup, x (of mean steps) | std-loss term, last step |',
              '|---|---|---|---|---|---|---|---|---|']
    for variant, r in rows.items():
      paper = PAPER_ACCURACY.get(variant)
      lines.append(
          f"| {variant} | {r['final_accuracy'][0]:.1f} +- {r['final_accuracy'][1]:.1f} | "
          f"{f'{paper[0]} +- {paper[1]}' if paper else '-'} | {r['reached']}/{args.seeds} | "
          f"{_fmt(r['mean_steps'], '.0f')} | "
          f"{', '.join(_fmt(s, 'd') for s in r['steps_to_baseline_best'])} | "
          f"{_fmt(r['mean_speedup'], '.2f')} | {_fmt(r['speedup_of_means'], '.2f')} | "
          f"{'-' if r['final_stdloss'] is None else '%.2f +- %.2f' % r['final_stdloss']} |")
    lines.append('')
  lines += ['Paper, steps to the baseline\'s best accuracy (speedup): PointNet 26.6K / BN 6.1K '
            '(4.4x) / std loss 12.1K (2.2x); Inception-v2 1972K / 534K (3.7x) / 700K (2.8x); '
            'ResNet-50 89.4K / 39.5K (2.3x) / 40.0K (2.2x). The paper gives no speedup for '
            'MNIST, only the accuracies above (which of its two MNIST models they are is '
            'not recorded in papers.md).']
  return '\n'.join(lines) + '\n'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--preset', default='cpu', choices=stdloss_mnist.PRESETS)
  p.add_argument('--models', default='cnn', type=lambda s: s.split(','))
  p.add_argument('--variants', default='none,batch,stdloss', type=lambda s: s.split(','))
  p.add_argument('--seeds', type=int, default=5)
  p.add_argument('--total_steps', type=int, default=0, help='0: the preset\'s')
  p.add_argument('--runs', default='', help='folder for the run workdirs (default: a temp)')
  p.add_argument('--out', default='',
                 help='folder for stdloss_mnist_<preset>_<models>.json and .md')
  args = p.parse_args(argv)
  if 'none' not in args.variants:
    args.variants.insert(0, 'none')
  args.runs = args.runs or tempfile.mkdtemp(prefix='stdloss_speedup_')
  t0 = time.perf_counter()
  runs = run_all(args)
  table = summarize(args, runs)
  config = stdloss_mnist.get_config(args.preset)
  meta = dict(run_meta(t0, 'stdloss_speedup'),
              total_steps=args.total_steps or config.total_steps,
              eval_every=config.eval_every, lr=config.optimizer.lr,
              batch_size=config.batch_size, weight_decay=config.optimizer.weight_decay,
              weight=config.stdloss.weight)
  md = to_markdown(args, table, meta)
  print(md)
  if args.out:
    write_outputs(args.out, f'stdloss_mnist_{args.preset}_{"_".join(args.models)}',
                  dict(meta=meta, table=table, runs=runs), md)


if __name__ == '__main__':
  main()
