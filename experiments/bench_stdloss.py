"""Step-time overhead of the standardization loss (papers.md section 4; accel/stdloss.py).

Four variants of the train step `experiments.train` runs (accel.train.build), side by side
in one process on one synthetic batch: the un-normalized model ('none'), the same model with
batch norm ('batch'), the un-normalized model plus the standardization loss on every
hidden conv ('stdloss') and the same with stdloss.layer_metrics ('stdloss layer metrics');
each with its config's optimizer. GPU default: the CIFAR ResNet-32
of configs/stdloss_resnet.py, batch 256 of 32x32x3; --quick (CPU): the paper's MNIST CNN of
configs/stdloss_mnist.py, batch 128 of 28x28x1. Timing: accel.benchmarking.compare
(interleaved rounds, median). The goal (issue 5): stdloss <= 1.05 x none on GPU at
ResNet size.

  python -m experiments.bench_stdloss --quick --out results   # CPU, a minute
  python -m experiments.bench_stdloss --out results           # GPU: ResNet-32, batch 256
  python -m experiments.bench_stdloss --out results --tag _flags \
      --flags 'command buffers off,all command buffers'   # GPU: XLA options (FLAG_SETS)
  python -m experiments.bench_stdloss --depth 20 --batch 64 --size 16 --rounds 7 --steps 3 \
      --tag _resnet20 --out results                           # CPU, ResNet-20
--profile DIR: after the timing, a trace of 3 steps of each variant, summarised per step by
phase and layer (device ms, kernels: accel.traces.breakdown) into
OUT/stdloss_<platform><tag>_profile.md, with the compiled programs beside it; the traces
themselves go to DIR.
"""
from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from accel import benchmarking, traces
from accel.data.input_pipeline import DatasetInfo
from configs import stdloss_mnist, stdloss_resnet

# 'stdloss layer metrics': stdloss with stdloss.layer_metrics (two more scalars per layer
# out of every step).
VARIANTS = ('none', 'batch', 'stdloss', 'stdloss layer metrics')
RATIOS = [('stdloss', 'none'), ('stdloss', 'batch'), ('batch', 'none'),
          ('stdloss layer metrics', 'none')]
# --flags: 'none' and 'stdloss' again, compiled with these XLA options (benchmarking.compiled:
# for those programs alone, so all variants share the process and its rounds). The step is
# ~5 ms of ~500 kernels on an H200 and the loss adds ~145 small ones (results/
# stdloss_gpu_profile.md): CUDA graphs (command buffers) take the launches off the host.
FLAG_SETS = {
    'command buffers off': {'xla_gpu_enable_command_buffer': ''},
    'all command buffers': {
        'xla_gpu_enable_command_buffer': 'FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,'
                                         'CONDITIONAL',
        'xla_gpu_graph_min_graph_size': 1},
}
FLAGGED = ('none', 'stdloss')
QUICK = dict(model='cnn', batch=128, size=28, channels=1, rounds=15, steps=5)
FULL = dict(model='resnet', depth=32, width=1, batch=256, size=32, channels=3, rounds=20,
            steps=20)


def variant_config(args, variant: str):
  layer_metrics = variant == 'stdloss layer metrics'
  variant = 'stdloss' if layer_metrics else variant
  if args.model == 'resnet':
    config = stdloss_resnet.get_config(f'cpu,{variant}')
    config.model.depth, config.model.width = args.depth, args.width
  else:
    config = stdloss_mnist.get_config(f'cpu,{args.model},{variant}')
  config.batch_size = args.batch
  config.stdloss.layer_metrics = layer_metrics
  return config


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                              parents=[benchmarking.flags()])
  p.add_argument('--model', choices=stdloss_mnist.MODELS + ('resnet',))
  p.add_argument('--depth', type=int, help='resnet only')
  p.add_argument('--width', type=int, help='resnet only')
  p.add_argument('--batch', type=int)
  p.add_argument('--size', type=int)
  p.add_argument('--channels', type=int)
  p.add_argument('--tag', default='', help='appended to the results file name')
  p.add_argument('--profile', default='', help='trace folder: profile each variant (3 steps)')
  p.add_argument('--flags', default='', help='comma-separated names of FLAG_SETS '
                 f'({", ".join(FLAG_SETS)}): none and stdloss again under each')
  args = benchmarking.scale_defaults(p.parse_args(argv), QUICK, FULL)
  rng = np.random.default_rng(0)
  batch = {'image': rng.standard_normal((args.batch, args.size, args.size, args.channels),
                                        np.float32),
           'label': rng.integers(0, 10, args.batch).astype(np.int32)}
  info = DatasetInfo('image', num_classes=10, image_shape=batch['image'].shape[1:])
  flag_sets = [f.strip() for f in args.flags.split(',') if f.strip()]
  unknown = sorted(set(flag_sets) - set(FLAG_SETS))
  if unknown:
    p.error(f'unknown --flags {unknown}; known: {", ".join(FLAG_SETS)}')
  configs = {v: variant_config(args, v) for v in VARIANTS}
  variants = {v: benchmarking.trainer_variant(c, info, batch) for v, c in configs.items()}
  flagged, errors = benchmarking.try_variants({
      f'{v} [{f}]': (lambda v=v, f=f: benchmarking.trainer_variant(
          configs[v], info, batch, compiler_options=FLAG_SETS[f]))
      for f in flag_sets for v in FLAGGED})
  rows = benchmarking.compare({**variants, **flagged}, args.rounds, args.steps)
  ratios = benchmarking.ratios(rows, RATIOS + [
      pair for f in flag_sets for pair in ((f'stdloss [{f}]', f'none [{f}]'),
                                           (f'none [{f}]', 'none'),
                                           (f'stdloss [{f}]', 'none'))])
  c = configs['stdloss']
  model = (f'ResNet-{args.depth} width {args.width} (configs/stdloss_resnet.py)'
           if args.model == 'resnet' else f'{args.model} (configs/stdloss_mnist.py, the paper '
                                           'MNIST setup)')
  setup = (f'{model}, input {args.batch}x{args.size}x{args.size}x{args.channels} float32, '
           f'the train step of accel.train.build with the config\'s optimizer '
           f'({c.optimizer.name}, momentum {c.optimizer.momentum}, weight decay '
           f'{c.optimizer.weight_decay}), lambda {c.stdloss.weight}; median of {args.rounds} '
           f'interleaved rounds of {args.steps} steps.')
  meta = benchmarking.provenance()
  markdown = benchmarking.report(
      'Standardization loss: step-time overhead', setup, meta,
      benchmarking.timing_table(rows, {'step temp memory (MiB)': lambda r: r['temp_mib']},
                                errors),
      ratios)
  name = f'stdloss_{jax.devices()[0].platform}{args.tag}'
  benchmarking.write_results(args.out, name,
                             dict(meta=meta, setup=setup, rows=rows, ratios=ratios,
                                  flag_sets={f: FLAG_SETS[f] for f in flag_sets},
                                  errors=errors), markdown)
  if args.profile:
    breakdowns = {v: traces.profile_breakdown(variants[v], os.path.join(args.profile, v))
                  for v in VARIANTS}
    traces.write_breakdowns(args.out, f'{name}_profile',
                            'Standardization loss: where the step\'s device time goes',
                            breakdowns, {v: variants[v].program for v in VARIANTS}, meta)


if __name__ == '__main__':
  main()
