"""Step-time overhead of the standardization loss (papers.md section 4; accel/stdloss.py).

Three variants of one jitted SGD training step, side by side in one process, on the same
synthetic batch: the un-normalized model ('none'), the same model with batch norm
('batch'), and the un-normalized model plus the standardization loss on every hidden
conv ('stdloss', lambda = 1). GPU default: CIFAR ResNet-32, batch 256 of 32x32x3;
--quick (CPU): the paper's MNIST CNN, batch 128 of 28x28x1.
Timing: each variant is compiled and warmed up, then the variants are run in interleaved
rounds of `--steps` steps (so drift hits all alike); the reported time per step is the
median over `--rounds` rounds. The goal (issue 5) is
stdloss <= 1.05 x none on GPU at ResNet size.

  python -m experiments.bench_stdloss --quick --out results   # CPU, seconds
  python -m experiments.bench_stdloss --out results           # GPU: ResNet-32, batch 256
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

from accel import benchmarking, stdloss
from accel.models import cnn

VARIANTS = ('none', 'batch', 'stdloss')


def make_step(variant: str, model_name: str, model_kwargs: dict, weight: float):
  """(init_fn, step_fn) of one variant; step_fn(state, x, y) -> (state, loss)."""
  model = cnn.MODELS[model_name](norm='batch' if variant == 'batch' else 'none',
                                 **model_kwargs)
  tx = optax.sgd(0.01, momentum=0.9)

  def init(x):
    variables = model.init(jax.random.key(0), x)
    params = variables.pop('params')
    return params, variables, tx.init(params)

  def ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def loss_fn(params, mutable, x, y):
    variables = {'params': params, **mutable}
    if variant == 'batch':
      logits, new_mutable = model.apply(variables, x, train=True, mutable=['batch_stats'])
      return ce(logits, y), new_mutable
    if variant == 'stdloss':
      logits, captured = stdloss.capture(model.apply)(variables, x, train=True)
      return ce(logits, y) + weight * stdloss.total_loss(captured), mutable
    return ce(model.apply(variables, x, train=True), y), mutable

  def step(state, x, y):
    params, mutable, opt_state = state
    (loss, mutable), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mutable, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), mutable, opt_state), loss

  return jax.jit(init), jax.jit(step, donate_argnums=0)


def run(args) -> dict:
  key_x, key_y = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key_x, (args.batch, args.size, args.size, args.channels))
  y = jax.random.randint(key_y, (args.batch,), 0, 10)
  model_kwargs = dict(depth=args.depth, width=args.width) if args.model == 'resnet' else {}
  steps, states, compile_s = {}, {}, {}
  for v in VARIANTS:
    init, step = make_step(v, args.model, model_kwargs, args.weight)
    t0 = time.perf_counter()
    state = init(x)
    for _ in range(3):  # compile + warm-up
      state, loss = step(state, x, y)
    jax.block_until_ready(loss)
    compile_s[v] = time.perf_counter() - t0
    steps[v], states[v] = step, state
  ms, spread = benchmarking.interleaved_rounds(steps, states, (x, y), args.rounds, args.steps)
  return dict(
      ms_per_step=ms, ms_range=spread, compile_and_warmup_s=compile_s,
      ratios={'stdloss/none': ms['stdloss'] / ms['none'],
              'stdloss/batch': ms['stdloss'] / ms['batch'],
              'batch/none': ms['batch'] / ms['none']},
      setup=dict(model=(f'ResNet-{args.depth} width {args.width}' if args.model == 'resnet'
                        else f'{args.model} (paper MNIST setup)'),
                 input=f'{args.batch}x{args.size}x{args.size}x{args.channels} float32',
                 weight=args.weight,
                 rounds=args.rounds, steps_per_round=args.steps, optimizer='SGD momentum 0.9'),
      device=f'{jax.devices()[0].platform}: {jax.devices()[0].device_kind}',
      device_count=jax.device_count(), jax_version=jax.__version__,
      python=platform.python_version(),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      command='python -m experiments.bench_stdloss ' + ' '.join(sys.argv[1:]))


def to_markdown(r: dict) -> str:
  lines = [
      '# Standardization loss: step-time overhead', '',
      f"{r['setup']['model']}, input {r['setup']['input']}, {r['setup']['optimizer']}, "
      f"lambda {r['setup']['weight']}; median of {r['setup']['rounds']} interleaved rounds "
      f"of {r['setup']['steps_per_round']} steps.", '',
      f"Device: {r['device']} (x{r['device_count']}), jax {r['jax_version']}, "
      f"{r['date']}. Command: `{r['command']}`", '',
      '| variant | ms/step (median) | max-min over rounds (ms) | compile+warm-up (s) |',
      '|---|---|---|---|']
  for v in VARIANTS:
    lines.append(f"| {v} | {r['ms_per_step'][v]:.3f} | {r['ms_range'][v]:.3f} | "
                 f"{r['compile_and_warmup_s'][v]:.1f} |")
  lines += ['', '| ratio | value |', '|---|---|']
  lines += [f'| {k} | {v:.3f} |' for k, v in r['ratios'].items()]
  return '\n'.join(lines) + '\n'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--quick', action='store_true',
                 help='CPU scale: the paper MNIST CNN, batch 128 of 28x28x1, 15 rounds of 5')
  p.add_argument('--model', choices=sorted(cnn.MODELS), default='resnet')
  p.add_argument('--depth', type=int, default=32, help='resnet only')
  p.add_argument('--width', type=int, default=1, help='resnet only')
  p.add_argument('--batch', type=int, default=256)
  p.add_argument('--size', type=int, default=32)
  p.add_argument('--channels', type=int, default=3)
  p.add_argument('--weight', type=float, default=1.0)
  p.add_argument('--rounds', type=int, default=20)
  p.add_argument('--steps', type=int, default=20)
  p.add_argument('--out', default='', help='folder for stdloss_<platform>.json and .md')
  args = p.parse_args(argv)
  if args.quick:
    args.model, args.batch, args.size, args.channels = 'cnn', 128, 28, 1
    args.rounds, args.steps = 15, 5
  r = run(args)
  md = to_markdown(r)
  if args.out:
    benchmarking.write_results(args.out, f'stdloss_{jax.devices()[0].platform}', r, md)
  else:
    print(md)


if __name__ == '__main__':
  main()
