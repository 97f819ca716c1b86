"""Train-step time of Transformer-XL (accel/models/transformer_xl.py) vs the spine Transformer.

Three variants of one jitted Adam training step, side by side in one process, on the same
synthetic byte batch B x L: the spine's TransformerLM ('transformer', PostLN, learned
positions), Transformer-XL without memory ('txl_mem0', M = 0: relative attention alone) and
Transformer-XL with memory M = L carried from step to step in the state ('txl'). Same N, D,
H, F. What it answers: the cost of relative positions and of attending to M more keys, i.e.
the per-step cost the Ouroboros pipeline starts from. GPU default: the Transformer-XL base
enwik8 model (12 layers, d 512, 8 heads, d_inner 2048, L = M = 512, batch 22);
--quick: CPU scale, seconds.
Also reported: the compiled step's temporary memory (XLA memory_analysis: activations kept
for the backward, workspace), for the memory a pipeline stage will need.
Timing: each variant is compiled and warmed up, then the variants run in interleaved rounds
of `--steps` steps (so drift hits all alike); time per step is the median over `--rounds`.

  python -m experiments.bench_txl --quick --out results   # CPU, seconds
  python -m experiments.bench_txl --out results           # GPU: base enwik8 size
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time

import jax
import jax.numpy as jnp
import optax

from accel import benchmarking
from accel.models import transformer, transformer_xl

VARIANTS = ('transformer', 'txl_mem0', 'txl')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def make_step(variant: str, args):
  """(init_fn, step_fn); step_fn(state, tokens, targets) -> (state, loss)."""
  dtype = DTYPES[args.dtype]
  dims = dict(vocab_size=256, num_layers=args.layers, d_model=args.d_model,
              num_heads=args.heads, d_ff=args.d_ff, dtype=dtype)
  if variant == 'transformer':
    model = transformer.TransformerLM(transformer.TransformerConfig(
        max_len=args.seq_len, pre_ln=False, scan_layers=True, **dims))
  else:
    cfg = transformer_xl.TransformerXLConfig(
        mem_len=0 if variant == 'txl_mem0' else args.seq_len, **dims)
    model = transformer_xl.TransformerXL(cfg)
  tx = optax.adam(2.5e-4)

  def logits_and_mems(params, mems, tokens):
    if variant == 'transformer':
      return model.apply({'params': params}, tokens), mems
    return model.apply({'params': params}, tokens, mems, method='segment')

  def init(tokens):
    params = model.init(jax.random.key(0), tokens)['params']
    mems = (None if variant == 'transformer' else
            transformer_xl.zero_memory(model.cfg, tokens.shape[0]))
    return params, mems, tx.init(params)

  def loss_fn(params, mems, tokens, targets):
    logits, mems = logits_and_mems(params, mems, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(), mems

  def step(state, tokens, targets):
    params, mems, opt_state = state
    (loss, mems), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mems, tokens,
                                                                     targets)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), mems, opt_state), loss

  return jax.jit(init), jax.jit(step, donate_argnums=0)


def run(args) -> dict:
  data = jax.random.randint(jax.random.key(0), (args.batch, args.seq_len + 1), 0, 256)
  tokens, targets = data[:, :-1], data[:, 1:]
  steps, states, compile_s, temp_mib = {}, {}, {}, {}
  for v in VARIANTS:
    init, step = make_step(v, args)
    t0 = time.perf_counter()
    state = init(tokens)
    step = step.lower(state, tokens, targets).compile()
    memory = step.memory_analysis()
    temp_mib[v] = getattr(memory, 'temp_size_in_bytes', float('nan')) / 2**20
    for _ in range(3):  # warm-up
      state, loss = step(state, tokens, targets)
    jax.block_until_ready(loss)
    compile_s[v] = time.perf_counter() - t0
    steps[v], states[v] = step, state
  ms, spread = benchmarking.interleaved_rounds(steps, states, (tokens, targets), args.rounds,
                                                args.steps)
  tokens_per_step = args.batch * args.seq_len
  return dict(
      ms_per_step=ms,
      ms_range=spread,
      tokens_per_s={v: tokens_per_step / (m / 1e3) for v, m in ms.items()},
      compile_and_warmup_s=compile_s, temp_mib=temp_mib,
      ratios={'txl/transformer': ms['txl'] / ms['transformer'],
              'txl_mem0/transformer': ms['txl_mem0'] / ms['transformer'],
              'txl/txl_mem0': ms['txl'] / ms['txl_mem0']},
      setup=dict(model=(f'{args.layers} layers, d_model {args.d_model}, {args.heads} heads, '
                        f'd_ff {args.d_ff}, vocab 256'),
                 batch=f'{args.batch} x {args.seq_len} tokens, memory {args.seq_len} (txl)',
                 dtype=args.dtype, rounds=args.rounds, steps_per_round=args.steps,
                 optimizer='Adam lr 2.5e-4'),
      device=f'{jax.devices()[0].platform}: {jax.devices()[0].device_kind}',
      device_count=jax.device_count(), jax_version=jax.__version__,
      python=platform.python_version(),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      command='python -m experiments.bench_txl ' + ' '.join(sys.argv[1:]))


def to_markdown(r: dict) -> str:
  s = r['setup']
  lines = [
      '# Transformer-XL vs Transformer: train-step time', '',
      f"{s['model']}; batch {s['batch']}; {s['dtype']}; {s['optimizer']}; median of "
      f"{s['rounds']} interleaved rounds of {s['steps_per_round']} steps.", '',
      f"Device: {r['device']} (x{r['device_count']}), jax {r['jax_version']}, "
      f"{r['date']}. Command: `{r['command']}`", '',
      '| variant | ms/step (median) | max-min over rounds (ms) | tokens/s | '
      'step temp memory (MiB) | compile+warm-up (s) |',
      '|---|---|---|---|---|---|']
  for v in VARIANTS:
    lines.append(f"| {v} | {r['ms_per_step'][v]:.3f} | {r['ms_range'][v]:.3f} | "
                 f"{r['tokens_per_s'][v]:.0f} | {r['temp_mib'][v]:.1f} | "
                 f"{r['compile_and_warmup_s'][v]:.1f} |")
  lines += ['', '| ratio | value |', '|---|---|']
  lines += [f'| {k} | {v:.3f} |' for k, v in r['ratios'].items()]
  return '\n'.join(lines) + '\n'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--quick', action='store_true',
                 help='CPU scale: 2 layers, d 64, 4 heads, d_ff 256, batch 4 x 64, 7 rounds of 3')
  p.add_argument('--layers', type=int, default=12)
  p.add_argument('--d_model', type=int, default=512)
  p.add_argument('--heads', type=int, default=8)
  p.add_argument('--d_ff', type=int, default=2048)
  p.add_argument('--seq_len', type=int, default=512, help='segment L (= memory M for txl)')
  p.add_argument('--batch', type=int, default=22)
  p.add_argument('--dtype', choices=sorted(DTYPES), default='float32')
  p.add_argument('--rounds', type=int, default=10)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--out', default='', help='folder for bench_txl_<platform>.json and .md')
  args = p.parse_args(argv)
  if args.quick:
    args.layers, args.d_model, args.heads, args.d_ff = 2, 64, 4, 256
    args.batch, args.seq_len, args.rounds, args.steps = 4, 64, 7, 3
  r = run(args)
  md = to_markdown(r)
  if args.out:
    benchmarking.write_results(args.out, f'bench_txl_{jax.devices()[0].platform}', r, md)
  else:
    print(md)


if __name__ == '__main__':
  main()
