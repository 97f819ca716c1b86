"""Train-step time of Transformer-XL (accel/models/transformer_xl.py) vs the spine Transformer.

Three variants of the train step `experiments.train` runs (accel.train.build), side by side
in one process on one synthetic byte batch B x L, all from configs/txl_enwik8.py (Adam
2.5e-4, clip 0.25, PostLN) without dropout: the spine's TransformerLM ('transformer',
learned positions, scanned layers), Transformer-XL without memory ('txl_mem0', M = 0:
relative attention alone) and Transformer-XL with memory M = L carried from step to step in
the train state ('txl'). Same N, D, H, F. What it answers: the cost of relative positions
and of attending to M more keys, the per-step cost the Ouroboros pipeline starts from.
GPU default: the Transformer-XL base enwik8 model (12 layers, d 512, 8 heads, d_inner 2048,
L = M = 512, batch 22); --quick: CPU scale, seconds. Also reported: the compiled step's
temporary memory (XLA memory analysis), for the memory a pipeline stage will need.

  python -m experiments.bench_txl --quick --out results   # CPU, a minute
  python -m experiments.bench_txl --out results           # GPU: base enwik8 size
"""
from __future__ import annotations

import argparse

import jax
import numpy as np

from accel import benchmarking
from accel.data.input_pipeline import DatasetInfo
from accel.models import DTYPES
from configs import txl_enwik8

VARIANTS = ('transformer', 'txl_mem0', 'txl')
RATIOS = [('txl', 'transformer'), ('txl_mem0', 'transformer'), ('txl', 'txl_mem0')]
QUICK = dict(layers=2, d_model=64, heads=4, d_ff=256, batch=4, seq_len=64, rounds=7, steps=3)
FULL = dict(layers=12, d_model=512, heads=8, d_ff=2048, batch=22, seq_len=512, rounds=10,
            steps=10)


def variant_config(args, variant: str):
  config = txl_enwik8.get_config('paper')
  config.batch_size, config.data.seq_len = args.batch, args.seq_len
  config.model.update(num_layers=args.layers, d_model=args.d_model, num_heads=args.heads,
                      d_ff=args.d_ff, dtype=args.dtype, dropout_rate=0.0,
                      mem_len=0 if variant == 'txl_mem0' else args.seq_len)
  if variant == 'transformer':
    config.model.update(name='transformer_lm', scan_layers=True)
  return config


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                              parents=[benchmarking.flags()])
  p.add_argument('--layers', type=int)
  p.add_argument('--d_model', type=int)
  p.add_argument('--heads', type=int)
  p.add_argument('--d_ff', type=int)
  p.add_argument('--seq_len', type=int, help='segment L (= memory M for txl)')
  p.add_argument('--batch', type=int)
  p.add_argument('--dtype', choices=sorted(DTYPES), default='float32')
  args = benchmarking.scale_defaults(p.parse_args(argv), QUICK, FULL)
  tokens = np.random.default_rng(0).integers(0, 256, (args.batch, args.seq_len + 1), np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}
  info = DatasetInfo('lm', vocab_size=256)
  variants = {v: benchmarking.trainer_variant(variant_config(args, v), info, batch)
              for v in VARIANTS}
  rows = benchmarking.compare(variants, args.rounds, args.steps)
  ratios = benchmarking.ratios(rows, RATIOS)
  tokens_per_step = args.batch * args.seq_len
  setup = (f'{args.layers} layers, d_model {args.d_model}, {args.heads} heads, d_ff '
           f'{args.d_ff}, vocab 256; batch {args.batch} x {args.seq_len} tokens, memory '
           f'{args.seq_len} (txl); {args.dtype}; configs/txl_enwik8.py:paper\'s optimizer '
           f'(Adam 2.5e-4, clip 0.25), no dropout, the train step of accel.train.build; '
           f'median of {args.rounds} interleaved rounds of {args.steps} steps.')
  meta = benchmarking.provenance()
  table = benchmarking.timing_table(rows, {
      'tokens/s': lambda r: f"{tokens_per_step / (r['ms_per_step'] / 1e3):.0f}",
      'step temp memory (MiB)': lambda r: r['temp_mib']})
  markdown = benchmarking.report('Transformer-XL vs Transformer: train-step time', setup, meta,
                                 table, ratios)
  benchmarking.write_results(args.out, f'bench_txl_{jax.devices()[0].platform}',
                             dict(meta=meta, setup=setup, rows=rows, ratios=ratios), markdown)


if __name__ == '__main__':
  main()
