r"""Train-step throughput of accel's baseline LM, against the device's matmul ceiling.

  python -m experiments.bench_lm --out results            # GPU: GPT-2 small, batch 32 x 1024
  python -m experiments.bench_lm --quick --out results    # CPU: a tiny model, seconds

GPT-2 small (configs/lm.py:gpu): 12 layers, d_model 768, 12 heads, context 1024, vocabulary
50304, tied embeddings, bf16 compute, AdamW, the train step of accel.train.build on random
tokens (no input pipeline). Model FLOPs per token = 6 N + 12 L d T (nanoGPT/PaLM
convention, N = all parameters), MFU = model FLOP/s / the bf16 8192^3 matmul rate measured in
the same process. Variants differ only in model.* settings; they are timed in interleaved
rounds (accel.benchmarking.compare).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from accel import benchmarking, traces
from accel.data.input_pipeline import DatasetInfo
from configs import lm

GPU_VARIANTS = {
    'bf16 loop cudnn-attention': dict(attention_impl='cudnn'),
    'bf16 loop xla-attention': dict(attention_impl='xla'),
    'bf16 scan cudnn-attention': dict(attention_impl='cudnn', scan_layers=True),
    'bf16 scan+remat cudnn-attention': dict(attention_impl='cudnn', scan_layers=True,
                                             remat=True),
}
CPU_VARIANTS = {
    'fp32 loop': dict(),
    'fp32 scan': dict(scan_layers=True),
}
TORCH = 'PyTorch reference (bench_lm_torch)'
QUICK = dict(rounds=3, steps=3)
FULL = dict(rounds=5, steps=10)


def gpt2_config(quick: bool):
  config = lm.get_config('gpu')
  config.total_steps = 1000
  if quick:
    config.batch_size, config.data.seq_len = 4, 64
    config.model.update(num_layers=2, d_model=64, num_heads=2, d_ff=256, dtype='float32')
  return config


def model_flops_per_token(params, cfg) -> float:
  n = sum(x.size for x in jax.tree.leaves(params))
  return 6 * n + 12 * cfg.model.num_layers * cfg.model.d_model * cfg.data.seq_len


def torch_reference(batch: int) -> dict:
  """experiments/bench_lm_torch.py in a subprocess, run before JAX takes device memory."""
  result = subprocess.run([sys.executable, '-m', 'experiments.bench_lm_torch',
                           f'--batch={batch}'], capture_output=True, text=True, check=False)
  if result.returncode:
    return {'error': (result.stderr.strip().splitlines() or ['failed'])[-1][:200]}
  return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   parents=[benchmarking.flags()])
  parser.add_argument('--profile', default='', help='write a perfetto trace of the first '
                      'variant here (3 steps) and its compiled program')
  parser.add_argument('--torch', action='store_true',
                      help='also time experiments/bench_lm_torch.py (the PyTorch bar) first')
  parser.add_argument('--variants', default='', help='comma-separated subset of variant names')
  args = benchmarking.scale_defaults(parser.parse_args(argv), QUICK, FULL)
  config = gpt2_config(args.quick)
  vocab = 256 if args.quick else 50304
  torch_row = torch_reference(config.batch_size) if args.torch else None
  ceiling = benchmarking.matmul_ceiling(512 if args.quick else 8192,
                                        jnp.float32 if args.quick else jnp.bfloat16)
  chosen = CPU_VARIANTS if args.quick else GPU_VARIANTS
  chosen = {name: chosen[name.strip()] for name in args.variants.split(',') if name.strip()} \
      or chosen
  tokens = np.random.default_rng(1).integers(0, vocab, (config.batch_size,
                                                        config.data.seq_len + 1), np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}

  def builder(overrides):
    variant = config.copy_and_resolve_references()
    variant.model.update(**overrides)
    return lambda: benchmarking.trainer_variant(variant, DatasetInfo('lm', vocab_size=vocab),
                                                batch)
  variants, errors = benchmarking.try_variants({n: builder(o) for n, o in chosen.items()})
  rows = benchmarking.compare(variants, args.rounds, args.steps)
  tokens_per_step = config.batch_size * config.data.seq_len
  for name, row in rows.items():
    flops_per_s = (model_flops_per_token(variants[name].state.params, config)
                   * tokens_per_step / (row['ms_per_step'] / 1e3))
    variants[name].state, metrics = variants[name].step(variants[name].state)
    row.update(tokens_per_s=tokens_per_step / (row['ms_per_step'] / 1e3),
               model_flops_per_s=flops_per_s, mfu=flops_per_s / ceiling['flops_per_s'],
               loss=float(jax.device_get(metrics['loss'])))
  if args.profile and variants:
    traces.profile(next(iter(variants.values())), args.profile)
  if torch_row is not None and 'error' in torch_row:
    errors = {TORCH: torch_row['error'], **errors}
  elif torch_row is not None:   # its own timing: queued steps, one synchronization
    rows = {TORCH: dict(torch_row, ms_per_step=1e3 * torch_row['step_s'], ms_range=None,
                        compile_s=None, warmup_s=None,
                        mfu=torch_row['model_flops_per_s'] / ceiling['flops_per_s']), **rows}
  meta = benchmarking.provenance()
  table = benchmarking.timing_table(rows, {
      'tokens/s': lambda r: f"{r['tokens_per_s']:,.0f}",
      'model TFLOP/s': lambda r: f"{r['model_flops_per_s'] / 1e12:.1f}",
      'MFU vs matmul': lambda r: f"{r['mfu']:.1%}", 'loss': lambda r: r['loss']}, errors)
  setup = (f'Model: {config.model.num_layers} layers, d_model {config.model.d_model}, '
           f'{config.model.num_heads} heads, batch {config.batch_size} x '
           f'{config.data.seq_len}, vocabulary {vocab}, AdamW; the train step of '
           f'accel.train.build; median of {args.rounds} interleaved rounds of {args.steps} '
           f'steps. Ceiling: {ceiling["dtype"]} {ceiling["n"]}^3 matmul = '
           f'{ceiling["flops_per_s"] / 1e12:.1f} TFLOP/s.')
  title = f'Baseline LM train step ({"quick CPU" if args.quick else "GPT-2 small"})'
  benchmarking.write_results(
      args.out, 'bench_lm_cpu' if args.quick else 'bench_lm_gpu',
      {'meta': meta, 'ceiling': ceiling, 'rows': rows, 'errors': errors},
      benchmarking.report(title, setup, meta, table))


if __name__ == '__main__':
  main()
