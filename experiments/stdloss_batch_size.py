"""Batch-size study: batch norm vs group norm vs the standardization loss, small scale.

Collins, Ballé, Shlens 2019 (papers.md section 4) trained MobileNet-v1 with 2..128
examples per core: the standardization loss stayed flat (66.5-66.9 %), beat batch norm at
2 and 4 per core, and group norm beat both. Here: the paper's MNIST CNN on the 8x8 digits
(configs/stdloss_mnist.py), one device, so examples per device = the batch size b. Every run
sees the same number of examples (`--epochs` passes over the 1437 training digits), with
SGD momentum 0.9 and the linear scaling rule lr = `--lr` * b / 128. The moments of batch
norm and of the standardization loss are both taken over the b examples of a step.

  python -m experiments.stdloss_batch_size --out results
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from accel import train
from configs import stdloss_mnist
from experiments import stdloss_speedup

TRAIN_EXAMPLES = 1437   # digits train split (accel.data.builders.Digits)


def run_all(args) -> dict:
  runs = {}
  for b in args.batch_sizes:
    for variant in args.variants:
      for seed in range(args.seeds):
        c = stdloss_mnist.get_config(f'cpu,cnn,{variant}')
        c.seed = seed
        c.progress_bar = False
        c.batch_size = b
        c.total_steps = max(1, args.epochs * TRAIN_EXAMPLES // b)
        c.eval_every = c.log_every = c.checkpoint_every = c.total_steps
        c.optimizer.lr = args.lr * b / 128
        c.optimizer.momentum = 0.9
        c.stdloss.weight = args.weight
        workdir = os.path.join(args.runs, f'b{b}-{variant}-seed{seed}')
        t0 = time.perf_counter()
        train.train_and_evaluate(c, workdir)
        accuracy = stdloss_speedup.eval_curve(workdir)[-1][1]
        runs[f'{b}/{variant}/{seed}'] = dict(accuracy=accuracy, steps=c.total_steps,
                                             lr=c.optimizer.lr, wall_s=time.perf_counter() - t0)
        print(f'b={b} {variant} seed {seed}: accuracy {accuracy:.4f} '
              f'({time.perf_counter() - t0:.0f} s)', flush=True)
  return runs


def to_markdown(args, runs: dict, meta: dict) -> str:
  lines = ['# Standardization loss: batch-size study (small scale)', '',
           f"Paper MNIST CNN on 8x8 digits, one device, {args.epochs} epochs of "
           f"{TRAIN_EXAMPLES} examples at every batch size, SGD momentum 0.9, "
           f"lr = {args.lr} * b / 128, weight decay 4e-5, lambda {args.weight}, "
           f"{args.seeds} seed(s); validation accuracy (%) on the 360 held-out digits after "
           f"the last step, mean +- std over seeds.", '',
           stdloss_speedup.provenance(meta), '',
           '| examples per device (b) | steps | ' + ' | '.join(args.variants) + ' |',
           '|---|---|' + '---|' * len(args.variants)]
  for b in args.batch_sizes:
    cells = []
    for variant in args.variants:
      accs = [100 * runs[f'{b}/{variant}/{s}']['accuracy'] for s in range(args.seeds)]
      std = statistics.stdev(accs) if len(accs) > 1 else 0.0
      cells.append(f'{statistics.mean(accs):.1f} +- {std:.1f}')
    lines.append(f"| {b} | {runs[f'{b}/{args.variants[0]}/0']['steps']} | "
                 + ' | '.join(cells) + ' |')
  lines += ['', 'Paper (MobileNet-v1, ImageNet, 2..128 per core): standardization loss flat at '
            '66.5-66.9 %, better than batch norm at 2 and 4 per core; group norm better than '
            'both.']
  return '\n'.join(lines) + '\n'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch_sizes', default='2,4,16,128',
                 type=lambda s: [int(x) for x in s.split(',')])
  p.add_argument('--variants', default='none,batch,group,stdloss', type=lambda s: s.split(','))
  p.add_argument('--epochs', type=int, default=8)
  p.add_argument('--lr', type=float, default=0.01, help='at b = 128')
  p.add_argument('--weight', type=float, default=1.0, help='lambda')
  p.add_argument('--seeds', type=int, default=2)
  p.add_argument('--runs', default='', help='folder for the run workdirs (default: a temp)')
  p.add_argument('--out', default='', help='folder for stdloss_batch_size.json and .md')
  args = p.parse_args(argv)
  args.runs = args.runs or tempfile.mkdtemp(prefix='stdloss_batch_size_')
  t0 = time.perf_counter()
  runs = run_all(args)
  meta = stdloss_speedup.run_meta(t0, 'stdloss_batch_size')
  md = to_markdown(args, runs, meta)
  print(md)
  if args.out:
    stdloss_speedup.write_outputs(args.out, 'stdloss_batch_size', dict(meta=meta, runs=runs), md)


if __name__ == '__main__':
  main()
