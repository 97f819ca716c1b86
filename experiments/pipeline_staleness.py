r"""What weight staleness costs in loss: Ouroboros vs DDG vs plain delayed training.

  python -m experiments.pipeline_staleness --out results                       # CPU, ~2 min
  python -m experiments.pipeline_staleness --steps 1500 --out DIR              # longer budget
  python -m experiments.pipeline_staleness --size mid --ks 2 --lr 2.5e-4 --steps 600 \
      --schedules synchronous,delayed,pipelined --tag _mid_lr2.5e-4 --out results  # ~10 min

Trains the tiny model of `bench_pipeline --quick` (4 layers, d_model 64, bytes of Python's
standard library; --size mid: d_model 256, seq 256) with the single-device reference
(`accel.pipeline.reference`) under these schedules, 'stored' backward, same batches, same
Adam and cosine schedule:
  synchronous      every delay 0 (ordinary training);
  forward-locked   DDG: module j's weights K-1-j updates stale (devices would wait for the
                   forward);
  pipelined        Ouroboros as accel implements it: 2(K-1-j) updates stale;
  delayed          no pipeline: plain training of the whole model that applies every
                   gradient 2(K-1) steps after computing it (the staleness of the pipeline's
                   module 0, for every parameter);
for K = 2 and 3 (untied), and reports held-out bits per byte. If the gap to synchronous
halves from pipelined to forward-locked, the extra staleness of the pipelined forward is
what costs the loss; if plain delayed training trails by as much, the cost is that of
delayed gradients with Adam, not of the pipeline.
"""
from __future__ import annotations

import argparse

import jax
import optax

import jax.numpy as jnp

from accel import benchmarking
from accel.pipeline import pieces
from accel.pipeline.layout import Layout
from accel.pipeline.reference import Reference
from experiments.bench_pipeline import (SETTINGS, corpus_bytes, init_params, model_cfg,
                                        train_and_eval)

SCHEDULES = {'synchronous': dict(synchronous=True), 'forward-locked (DDG)':
             dict(forward_locked=True), 'pipelined (Ouroboros)': {}, 'delayed': None}
SIZES = {'tiny': {}, 'mid': dict(d_model=256, num_heads=4, d_ff=1024, seq=256)}


def staleness(schedule: str, k: int) -> list[int]:
  """Each module's weight staleness in updates under `schedule`."""
  return {'synchronous': [0] * k, 'forward-locked (DDG)': [k - 1 - j for j in range(k)],
          'pipelined (Ouroboros)': [2 * (k - 1 - j) for j in range(k)],
          'delayed': [2 * (k - 1)] * k}[schedule]


def delayed_variant(cfg, delay: int, tx):
  """Plain training, every gradient applied `delay` steps after it was computed (a ring of
  the last `delay` gradients; no update while it fills)."""
  tmap = jax.tree_util.tree_map
  loss_fn = lambda p, b: pieces.full_loss(cfg, p, b['inputs'], b['targets'])

  def init(params):
    ring = tmap(lambda a: jnp.zeros((delay,) + a.shape, a.dtype), params)
    return params, tx.init(params), ring, jnp.zeros((), jnp.int32)

  @jax.jit
  def run(state, batch):
    params, opt, ring, t = state
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    old = tmap(lambda r: r[t % delay], ring)
    ring = tmap(lambda r, g: r.at[t % delay].set(g), ring, grads)
    updates, new_opt = tx.update(old, opt, params)
    new = (optax.apply_updates(params, updates), new_opt)
    params, opt = tmap(lambda a, b: jnp.where(t >= delay, a, b), new, (params, opt))
    return (params, opt, ring, t + 1), loss
  return init, run, lambda state: state[0]


def variant(cfg, layout, schedule, steps, st):
  """(init(params), step(state, batch) -> (state, loss), to_model(state)) of one schedule."""
  tx = optax.adam(optax.cosine_decay_schedule(st['lr'], steps))
  if SCHEDULES[schedule] is None:
    return delayed_variant(cfg, 2 * (layout.num_modules - 1), tx)
  ref = Reference(cfg, layout, tx, 'stored', **SCHEDULES[schedule])

  def run(state, batch):
    state, metrics = ref.step(state, batch)
    return state, metrics['loss']
  return ref.init, run, ref.model_params


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--steps', type=int, default=300)
  ap.add_argument('--lr', type=float, default=0.0, help='peak learning rate (0: the setting)')
  ap.add_argument('--size', default='tiny', choices=tuple(SIZES))
  ap.add_argument('--ks', default='2,3', help='comma-separated K')
  ap.add_argument('--schedules', default='', help='comma-separated name parts (empty: all)')
  ap.add_argument('--tag', default='', help='suffix of the results files')
  ap.add_argument('--out', default='results')
  args = ap.parse_args()
  st = dict(SETTINGS[True], dtype='float32', **SIZES[args.size])
  st['lr'] = args.lr or st['lr']
  data = corpus_bytes(1_000_000)
  split = int(0.95 * len(data))
  rows = []
  names = [s for s in SCHEDULES if not args.schedules or
           any(part in s for part in args.schedules.split(','))]
  if 'synchronous' not in names:
    names.insert(0, 'synchronous')
  for k in [int(x) for x in args.ks.split(',')]:
    layout = Layout(st['num_layers'] - st['num_layers'] % k, k, False)
    kst = dict(st, num_layers=layout.num_layers)
    cfg = model_cfg(kst, 256)
    built = {schedule: variant(cfg, layout, schedule, args.steps, kst) for schedule in names}
    runs = train_and_eval(built, init_params(cfg, kst), data, split, kst, args.steps,
                          jax.devices()[:1])['runs']
    rows += [{'K': k, 'layers': layout.num_layers, 'schedule': schedule,
              'eval_bits_per_byte': run['eval_bits_per_byte']} for schedule, run in runs.items()]
  record = benchmarking.provenance()
  record.update(settings=dict(st, steps=args.steps), rows=rows)
  lines = ['# Weight staleness: synchronous vs forward-locked (DDG) vs pipelined (Ouroboros) '
           'vs plain delayed training', '',
           f'`{record["command"]}` — {record["date"]}, {record["device"]}, jax {record["jax"]}, '
           f'commit {record["git_commit"]}', '',
           f'LM of {st["num_layers"]} layers (layers divisible by K), d_model {st["d_model"]}, '
           f'{args.steps} steps, Adam lr {st["lr"]:g} cosine, batch {st["batch"]} x {st["seq"]} '
           "bytes, untied layout, 'stored' backward; one seed; held-out bits per byte. "
           "'delayed': plain training (no pipeline), every gradient applied 2(K-1) steps "
           'late.', '',
           '| K | layers | schedule | module weight staleness (updates) | bits/byte | vs synchronous |',
           '|---|---|---|---|---|---|']
  for r in rows:
    sync = next(x for x in rows if x['K'] == r['K'] and x['schedule'] == 'synchronous')
    k = r['K']
    stale = staleness(r['schedule'], k)
    lines.append(f'| {k} | {r["layers"]} | {r["schedule"]} | {stale} | '
                 f'{r["eval_bits_per_byte"]:.4f} | '
                 f'{100 * (r["eval_bits_per_byte"] / sync["eval_bits_per_byte"] - 1):+.2f}% |')
  benchmarking.write_results(args.out, f'pipeline_staleness_cpu{args.tag}', record, '\n'.join(lines) + '\n')


if __name__ == '__main__':
  main()
