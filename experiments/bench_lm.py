r"""Train-step throughput of accel's baseline LM: its speed options side by side, XLA flag sets
and the PyTorch bar in the same interleaved rounds, against the device's matmul ceiling.

  python -m experiments.bench_lm --torch --out results          # GPU: GPT-2 small, batch 32
  python -m experiments.bench_lm --quick --out results          # CPU: a tiny model, a minute

GPT-2 small (configs/lm.py:gpu): 12 layers, d_model 768, 12 heads, context 1024, vocabulary
50304, tied embeddings, bf16 compute, cuDNN attention, AdamW, the train step of
accel.train.build on random tokens (no input pipeline). Model FLOPs per token = 6 N + 12 L d T
(nanoGPT/PaLM convention, N = all parameters), MFU = model FLOP/s / the bf16 8192^3 matmul
rate measured in the same process.

What is timed, all in one set of interleaved rounds (accel.benchmarking.compare_with_processes):
- VARIANTS: each a config change a user can make (model.* keys, train_accuracy), built in
  this process; 'baseline' is configs/lm.py:gpu as it was at commit 9dfa920 (the options
  below off), 'candidate' the gpu preset now: the options issue 16's profile points to,
  together: positions by gather (the residual stream's layout), the GELU recomputed in the
  backward (no tanh kept), no train-step accuracy (results/bench_lm_gpu_profile.md, the loss
  table); measured at 1.024x the PyTorch bar (results/bench_lm_gpu.md), they became the
  gpu preset's defaults;
- FLAG_SETS: --flag_variant ('candidate') compiled under other XLA options, in this process
  (benchmarking.compiled's compiler_options: the XLA_FLAGS names, for that program alone),
  after the variants and only while --budget_s leaves 60 s;
- --torch: experiments/bench_lm_torch.py (torch.compile, flash SDPA, bf16 autocast, fused
  AdamW) in a child process, started first: its compilation runs while this process
  compiles its variants (both autotune on the device meanwhile; the timing comes after).
The child serves 'run N' requests (accel.benchmarking.ProcessVariant), so every round runs
N steps of every variant and of the bar in turn. With the child, no process preallocates
device memory (XLA_PYTHON_CLIENT_PREALLOCATE=false).
Before the steps, LOSS_HEADS times the loss and accuracy over B x L x V bf16 logits alone
(forward only: the backward is the same formula in all), the two-pass logsumexp with a
separate argmax as the code was before issue 16 against accel.losses' one pass.
--profile DIR: a trace of 3 steps of each variant named in --profile_variants, summarised per step by phase and module (accel.traces.breakdown) into
OUT/bench_lm_<platform>_profile.md; the traces themselves go to DIR.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from accel import benchmarking, losses, traces
from accel.data.input_pipeline import DatasetInfo
from configs import lm

# name -> dotted config overrides of configs/lm.py:gpu ('candidate': the preset itself).
BASELINE = {'model.position_lookup': 'broadcast', 'model.gelu_recompute': False,
            'train_accuracy': True}
VARIANTS = {
    'baseline': BASELINE,
    'candidate': {},
    'candidate + no bias': {'model.use_bias': False},
    'position gather': {**BASELINE, 'model.position_lookup': 'gather'},
    'gelu recompute': {**BASELINE, 'model.gelu_recompute': True},
    'no train accuracy': {**BASELINE, 'train_accuracy': False},
    'no bias': {**BASELINE, 'model.use_bias': False},
    'qkv split': {**BASELINE, 'model.qkv_projection': 'split'},
    'remat dots': {**BASELINE, 'model.remat': True, 'model.remat_policy': 'dots'},
    'qkv split + no bias': {**BASELINE, 'model.qkv_projection': 'split',
                            'model.use_bias': False},
}
# The default GPU run fits one call of ~150 s (--budget_s): its 4 variants and 1 flag set
# compile in this process one after another. On one H200 (results/bench_lm_gpu.md) 'qkv
# split' was 1.3% slower than 'baseline' and 'no bias' 2.0% faster; 'remat dots'
# recomputes every block's elementwise work and its cuDNN attention in the backward.
GPU_DEFAULT = ('baseline', 'candidate', 'candidate + no bias', 'position gather')
CPU_DEFAULT = ('baseline', 'candidate', 'candidate + no bias', 'position gather')
FLAG_SETS = {
    'XLA latency-hiding scheduler': {'xla_gpu_enable_latency_hiding_scheduler': True},
    'XLA cuBLASLt': {'xla_gpu_enable_cublaslt': True},
}
DEFAULT_FLAG_SETS = ('XLA latency-hiding scheduler',)   # on CPU: no effect, the plumbing
TORCH = 'PyTorch bar (bench_lm_torch)'
QUICK = dict(rounds=3, steps=3)
FULL = dict(rounds=5, steps=10)
READY_TIMEOUT_S = 300


def gpt2_config(quick: bool):
  config = lm.get_config('gpu')
  config.total_steps = 1000
  config.model.attention_impl = 'cudnn'
  if quick:
    config.batch_size, config.data.seq_len = 4, 64
    config.model.update(num_layers=2, d_model=64, num_heads=2, d_ff=256, dtype='float32',
                        attention_impl='')
  return config


def vocab_size(quick: bool) -> int:
  return 256 if quick else 50304


def variant_config(quick: bool, name: str):
  config = gpt2_config(quick)
  config.update_from_flattened_dict(VARIANTS[name])
  return config


def model_flops_per_token(n_params: int, cfg) -> float:
  return 6 * n_params + 12 * cfg.model.num_layers * cfg.model.d_model * cfg.data.seq_len


def random_batch(config, vocab: int) -> dict:
  tokens = np.random.default_rng(1).integers(0, vocab, (config.batch_size,
                                                        config.data.seq_len + 1), np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}


def build_variant(quick: bool, name: str,
                  compiler_options: dict | None = None) -> benchmarking.Variant:
  config = variant_config(quick, name)
  vocab = vocab_size(quick)
  return benchmarking.trainer_variant(config, DatasetInfo('lm', vocab_size=vocab),
                                      random_batch(config, vocab),
                                      compiler_options=compiler_options)


def variant_info(variant: benchmarking.Variant, compiler_options: dict | None = None) -> dict:
  """What the table needs of a variant."""
  variant.state, metrics = variant.step(variant.state)
  return {'compile_s': variant.compile_s, 'flops': variant.flops,
          'temp_bytes': variant.temp_bytes, 'loss': float(jax.device_get(metrics['loss'])),
          'params': int(sum(x.size for x in jax.tree.leaves(variant.state.params))),
          'compiler_options': compiler_options or {}}


# --- the loss over the logits alone ------------------------------------------------------

def _two_pass(logits, labels, with_argmax: bool):
  """The objective as it was before issue 16: a max and a sum pass for logsumexp, and a
  separate argmax pass for the accuracy."""
  z = logits.astype(jnp.float32)
  target = jnp.take_along_axis(z, labels[..., None], axis=-1)[..., 0]
  loss = (jax.nn.logsumexp(z, axis=-1) - target).mean()
  return loss, (logits.argmax(-1) == labels).mean() if with_argmax else jnp.nan


def _one_pass(logits, labels, with_argmax: bool):
  if with_argmax:
    loss, hits = losses.cross_entropy_and_hits(logits, labels)
    return loss.mean(), hits.mean()
  return losses.cross_entropy(logits, labels).mean(), jnp.nan


LOSS_HEADS = {
    'two-pass logsumexp + argmax (before)': lambda z, y: _two_pass(z, y, True),
    'two-pass logsumexp, no accuracy': lambda z, y: _two_pass(z, y, False),
    'one pass with argmax (losses.cross_entropy_and_hits)': lambda z, y: _one_pass(z, y, True),
    'one pass, no accuracy (losses.cross_entropy)': lambda z, y: _one_pass(z, y, False),
}


def time_loss_heads(config, vocab: int, rounds: int, steps: int) -> dict:
  dtype = jnp.float32 if config.model.dtype == 'float32' else jnp.bfloat16
  shape = (config.batch_size, config.data.seq_len)
  logits = (3 * jax.random.normal(jax.random.key(0), (*shape, vocab))).astype(dtype)
  labels = jax.random.randint(jax.random.key(1), shape, 0, vocab)
  variants = {}
  for name, head in LOSS_HEADS.items():
    program, seconds, flops = benchmarking.compiled(jax.jit(head), logits, labels)
    variants[name] = benchmarking.Variant(
        step=lambda s, p=program: (s, p(logits, labels)), state=None, compile_s=seconds,
        flops=flops, temp_bytes=benchmarking.temp_bytes(program))
  rows = benchmarking.compare(variants, rounds, steps)
  results = {name: jax.device_get(v.step(None)[1]) for name, v in variants.items()}
  for name, row in rows.items():
    row['loss'], row['accuracy'] = (float(x) for x in results[name])
  return rows


# --- the parent ---------------------------------------------------------------------------

def log(message: str) -> None:
  print(f'[bench_lm {time.strftime("%H:%M:%S")}] {message}', file=sys.stderr, flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   parents=[benchmarking.flags()])
  parser.add_argument('--torch', action='store_true',
                      help='also time experiments/bench_lm_torch.py (the PyTorch bar)')
  parser.add_argument('--variants', default=None,
                      help=f'comma-separated names of VARIANTS ({", ".join(VARIANTS)})')
  parser.add_argument('--flags', default=None, help='comma-separated names of FLAG_SETS '
                      f'({", ".join(FLAG_SETS)}), or none (default: '
                      f'{", ".join(DEFAULT_FLAG_SETS)})')
  parser.add_argument('--flag_variant', default='candidate',
                      help='the variant compiled under each flag set')
  parser.add_argument('--profile', default='', help='trace folder: profile the variants of '
                      '--profile_variants (3 steps each) and summarise where the time goes')
  parser.add_argument('--profile_variants', default='baseline',
                      help="comma-separated row names to profile, or 'all'")
  parser.add_argument('--budget_s', type=float, default=420,
                      help='compile no flag-set variant after this many seconds (60 s before '
                      'it) and no profile (20 s before it), so the results are written in time')
  args = benchmarking.scale_defaults(parser.parse_args(argv), QUICK, FULL)
  names = lambda text, default: (default if text is None else
                                 [] if text == 'none' else
                                 [n.strip() for n in text.split(',') if n.strip()])
  chosen = list(names(args.variants, CPU_DEFAULT if args.quick else GPU_DEFAULT))
  flag_sets = list(names(args.flags, DEFAULT_FLAG_SETS))
  unknown = [n for n in chosen + [args.flag_variant] if n not in VARIANTS]
  unknown += [n for n in flag_sets if n not in FLAG_SETS]
  if unknown:
    parser.error(f'unknown variant or flag set: {", ".join(unknown)}')

  started = time.monotonic()
  left_s = lambda: args.budget_s - (time.monotonic() - started)
  work = tempfile.mkdtemp(prefix='bench_lm_')
  if args.torch:   # two processes share the device: neither takes it all up front
    os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
  config = gpt2_config(args.quick)
  vocab = vocab_size(args.quick)
  processes, errors = {}, {}
  module = [sys.executable, '-m']
  torch_child = None
  if args.torch:   # torch.compile runs while this process compiles its variants
    log('starting the PyTorch bar')
    env = dict(os.environ, JAX_PLATFORMS='cpu')   # its process imports accel, never JAX's GPU
    torch_child = benchmarking.ProcessVariant(
        module + ['experiments.bench_lm_torch', '--serve', f'--batch={config.batch_size}',
                  f'--seq={config.data.seq_len}'], env=env,
        log_path=os.path.join(work, 'torch.log'))
  # Build order: the variants up to --flag_variant, its flag sets, the other variants; once
  # less than 60 s of --budget_s is left, the rest are reported as not run.
  builds = [(name, name, None) for name in chosen]
  at = chosen.index(args.flag_variant) + 1 if args.flag_variant in chosen else len(chosen)
  builds[at:at] = [(f'{args.flag_variant} + {f}', args.flag_variant, FLAG_SETS[f])
                   for f in flag_sets]
  variants, infos = {}, {}
  for row, name, options in builds:
    if variants and left_s() < 60:
      errors[row] = f'not run: less than 60 s of --budget_s {args.budget_s:.0f} left'
      continue
    built, build_errors = benchmarking.try_variants(
        {row: lambda n=name, o=options: build_variant(args.quick, n, o)})
    errors.update(build_errors)
    for variant in built.values():
      variants[row], infos[row] = variant, variant_info(variant, options)
      log(f'built {row} (compile {variant.compile_s:.0f} s)')
  if torch_child is not None:
    try:
      torch_child.wait_ready(READY_TIMEOUT_S)
      processes[TORCH] = torch_child
      log(f'PyTorch bar ready ({torch_child.info.get("warmup_s", 0):.0f} s)')
    except RuntimeError as e:
      torch_child.close()
      errors[TORCH] = str(e)
  log('matmul ceiling')
  ceiling = benchmarking.matmul_ceiling(512 if args.quick else 8192,
                                        jnp.float32 if args.quick else jnp.bfloat16)
  log('loss heads')
  head_rows = time_loss_heads(config, vocab, args.rounds, args.steps)
  log(f'timing {args.rounds} rounds of {args.steps} steps')
  rows, run_errors = benchmarking.compare_with_processes(variants, processes, args.rounds,
                                                         args.steps)
  errors.update(run_errors)
  profiles = {}
  if args.profile:
    wanted = list(rows) if args.profile_variants == 'all' else names(args.profile_variants, [])
    for name in wanted:
      if left_s() < 20:
        profiles[name] = {'error': 'not run: less than 20 s of --budget_s left'}
        continue
      directory = os.path.join(args.profile, name.replace(' ', '_').replace('/', '_'))
      log(f'profiling {name}')
      try:
        if name in variants:
          profiles[name] = traces.profile_breakdown(variants[name], directory)
      except (RuntimeError, OSError, KeyError) as e:
        profiles[name] = {'error': str(e)[:300]}
  for child in processes.values():
    child.close()

  tokens_per_step = config.batch_size * config.data.seq_len
  for name, row in rows.items():
    info = infos.get(name) or processes[name].info
    tokens_per_s = tokens_per_step / (row['ms_per_step'] / 1e3)
    flops_per_s = model_flops_per_token(info['params'], config) * tokens_per_s
    row.update(tokens_per_s=tokens_per_s, model_flops_per_s=flops_per_s,
               mfu=flops_per_s / ceiling['flops_per_s'], loss=info['loss'],
               compiler_options=info.get('compiler_options', {}),
               torch=info.get('torch'))
  bar = rows.get(TORCH)
  for row in rows.values():
    row['vs_torch'] = row['tokens_per_s'] / bar['tokens_per_s'] if bar else None
  meta = benchmarking.provenance()
  meta['torch'] = bar and bar.get('torch')
  table = benchmarking.timing_table(rows, {
      'tokens/s': lambda r: f"{r['tokens_per_s']:,.0f}",
      'vs PyTorch bar': lambda r: r['vs_torch'] and f"{r['vs_torch']:.3f}",
      'model TFLOP/s': lambda r: f"{r['model_flops_per_s'] / 1e12:.1f}",
      'MFU vs matmul': lambda r: f"{r['mfu']:.1%}",
      'temp memory (MiB)': lambda r: r['temp_mib'], 'loss': lambda r: r['loss']}, errors)
  head_table = benchmarking.timing_table(head_rows, {
      'loss': lambda r: r['loss'], 'accuracy': lambda r: r['accuracy']})
  setup = (f'Model: {config.model.num_layers} layers, d_model {config.model.d_model}, '
           f'{config.model.num_heads} heads, batch {config.batch_size} x '
           f'{config.data.seq_len}, vocabulary {vocab}, AdamW; the train step of '
           f'accel.train.build; median of {args.rounds} interleaved rounds of {args.steps} '
           f'steps, every row in the same rounds (the PyTorch bar in its own process; rows '
           f'named "+ XLA ..." compiled with those XLA options). Ceiling: {ceiling["dtype"]} {ceiling["n"]}^3 matmul = '
           f'{ceiling["flops_per_s"] / 1e12:.1f} TFLOP/s. Variants: '
           + '; '.join(f'{n}: {VARIANTS[n] or "configs/lm.py:gpu"}' for n in chosen)
           + '; flag sets: ' + ('; '.join(f'{n}: {FLAG_SETS[n]}' for n in flag_sets) or 'none'))
  platform = 'cpu' if args.quick else 'gpu'
  title = f'Baseline LM train step ({"quick CPU" if args.quick else "GPT-2 small"})'
  markdown = benchmarking.report(title, setup, meta, table)
  markdown += ('\nThe loss over the logits alone (forward; B x L x V logits in the compute '
               'dtype):\n\n' + head_table)
  benchmarking.write_results(
      args.out, f'bench_lm_{platform}',
      {'meta': meta, 'ceiling': ceiling, 'rows': rows, 'errors': errors,
       'loss_heads': head_rows, 'setup': setup}, markdown)
  if profiles:
    traces.write_breakdowns(args.out, f'bench_lm_{platform}_profile',
                            "Where the LM step's device time goes", profiles,
                            {n: v.program for n, v in variants.items()}, meta)


if __name__ == '__main__':
  main()
