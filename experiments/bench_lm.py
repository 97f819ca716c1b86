r"""Train-step throughput of accel's baseline LM, against the device's matmul ceiling.

  python -m experiments.bench_lm --out results            # GPU: GPT-2 small, batch 32 x 1024
  python -m experiments.bench_lm --quick --out results    # CPU: a tiny model, seconds

GPT-2 small: 12 layers, d_model 768, 12 heads, context 1024, vocabulary 50304, tied
embeddings, bf16 compute, AdamW, the spine's jitted data-parallel train step on random
tokens (no input pipeline). Model FLOPs per token = 6 N + 12 L d T (nanoGPT/PaLM
convention, N = all parameters), MFU = model FLOP/s / the bf16 8192^3 matmul rate measured in
the same process. Variants differ only in model.* settings.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback

import jax
import jax.numpy as jnp

from accel import benchmarking, train
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


def bench_variant(config, vocab: int, iters: int, profile_dir: str = '') -> dict:
  info = DatasetInfo('lm', vocab_size=vocab)
  _, trainer = train.build(config, info, jax.devices()[:1])
  shape = (config.batch_size, config.data.seq_len + 1)
  tokens = jax.random.randint(jax.random.key(1), shape, 0, vocab, jnp.int32)
  batch = jax.device_put({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]},
                         trainer.batch_sharding)
  state = trainer.init(jax.random.key(0), batch)
  step = trainer.train_step.lower(state, batch, {}).compile()
  holder = {'state': state}

  def run(state_batch):
    holder['state'], metrics = step(holder['state'], state_batch, {})
    return holder['state'], metrics
  seconds = benchmarking.time_calls(run, lambda: (batch,), iters)
  if profile_dir:
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      jax.block_until_ready(benchmarking.time_calls(run, lambda: (batch,), 3, warmup=0))
    with open(os.path.join(profile_dir, 'train_step.hlo.txt'), 'w') as f:
      f.write(step.as_text())   # to look up what the profile's fusion names compute
  tokens_per_step = config.batch_size * config.data.seq_len
  flops_token = model_flops_per_token(state.params, config)
  xla_flops = step.cost_analysis()
  xla_flops = (xla_flops[0] if isinstance(xla_flops, (list, tuple)) else xla_flops).get('flops')
  return {'step_s': seconds, 'tokens_per_s': tokens_per_step / seconds,
          'model_flops_per_s': flops_token * tokens_per_step / seconds,
          'xla_flops_per_step': xla_flops,
          'loss': float(jax.device_get(run(batch)[1]['loss']))}


def torch_reference(batch: int) -> dict:
  """experiments/bench_lm_torch.py in a subprocess, run before JAX takes device memory."""
  result = subprocess.run([sys.executable, '-m', 'experiments.bench_lm_torch',
                           f'--batch={batch}'], capture_output=True, text=True, check=False)
  if result.returncode:
    return {'error': (result.stderr.strip().splitlines() or ['failed'])[-1][:200]}
  return json.loads(result.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='tiny CPU run')
  parser.add_argument('--out', default='results')
  parser.add_argument('--iters', type=int, default=0)
  parser.add_argument('--profile', default='', help='write a perfetto trace of the first variant '
                      'here (3 steps)')
  parser.add_argument('--torch', action='store_true',
                      help='also time experiments/bench_lm_torch.py (the PyTorch bar) first')
  parser.add_argument('--variants', default='', help='comma-separated subset of variant names')
  args = parser.parse_args()
  config = gpt2_config(args.quick)
  iters = args.iters or (3 if args.quick else 20)
  rows = {}
  if args.torch:
    rows['PyTorch reference (bench_lm_torch)'] = torch_reference(config.batch_size)
  ceiling = benchmarking.matmul_ceiling(512 if args.quick else 8192,
                                        jnp.float32 if args.quick else jnp.bfloat16)
  variants = CPU_VARIANTS if args.quick else GPU_VARIANTS
  chosen = [v.strip() for v in args.variants.split(',') if v.strip()] or list(variants)
  for i, name in enumerate(chosen):
    variant = config.copy_and_resolve_references()
    variant.model.update(**variants[name])
    try:
      rows[name] = bench_variant(variant, 256 if args.quick else 50304, iters,
                                 args.profile if i == 0 else '')
    except Exception as e:  # report a failing variant, keep measuring the others
      traceback.print_exc()
      rows[name] = {'error': f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'}
    print(name, rows[name], flush=True)
  meta = benchmarking.provenance()
  lines = [f'# Baseline LM train step ({"quick CPU" if args.quick else "GPT-2 small"})', '',
           f'{meta["date"]}, {meta["device"]} x{meta["device_count"]}, jax {meta["jax"]}, '
           f'flax {meta["flax"]}, commit {meta["git_commit"]}', '',
           f'Command: `{meta["command"]}`', '',
           f'Model: {config.model.num_layers} layers, d_model {config.model.d_model}, '
           f'{config.model.num_heads} heads, batch {config.batch_size} x '
           f'{config.data.seq_len}, vocabulary {256 if args.quick else 50304}, AdamW.', '',
           f'Ceiling: {ceiling["dtype"]} {ceiling["n"]}^3 matmul = '
           f'{ceiling["flops_per_s"] / 1e12:.1f} TFLOP/s', '',
           '| variant | step (ms) | tokens/s | model TFLOP/s | MFU vs matmul | loss |',
           '|---|---|---|---|---|---|']
  for name, r in rows.items():
    if 'error' in r:
      lines.append(f'| {name} | failed: {r["error"]} | | | | |')
      continue
    lines.append(f'| {name} | {r["step_s"] * 1e3:.1f} | {r["tokens_per_s"]:,.0f} | '
                 f'{r["model_flops_per_s"] / 1e12:.1f} | '
                 f'{r["model_flops_per_s"] / ceiling["flops_per_s"]:.1%} | {r["loss"]:.3f} |')
  name = 'bench_lm_cpu' if args.quick else 'bench_lm_gpu'
  benchmarking.write_results(args.out, name, {'meta': meta, 'ceiling': ceiling, 'rows': rows},
                             '\n'.join(lines) + '\n')


if __name__ == '__main__':
  main()
