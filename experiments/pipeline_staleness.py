r"""What the pipelined forward's extra weight staleness costs in loss (Ouroboros vs DDG).

  python -m experiments.pipeline_staleness --out results            # CPU, ~2 min
  python -m experiments.pipeline_staleness --steps 1500 --out DIR   # longer budget

Trains the tiny model of `bench_pipeline --quick` (4 layers, d_model 64, bytes of Python's
standard library) with the single-device reference (`accel.pipeline.reference`) under three
schedules, 'stored' backward, same batches, same Adam and cosine schedule:
  synchronous      every delay 0 (ordinary training);
  forward-locked   DDG: module j's weights K-1-j updates stale (devices would wait for the
                   forward);
  pipelined        Ouroboros as accel implements it: 2(K-1-j) updates stale.
for K = 2 and 3 (untied), and reports held-out bits per byte. If the gap to synchronous
halves from pipelined to forward-locked, the extra staleness of the pipelined forward is
what costs the loss.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from accel import benchmarking
from accel.models.transformer import TransformerLM
from accel.pipeline import pieces
from accel.pipeline.layout import Layout
from accel.pipeline.reference import Reference
from experiments.bench_pipeline import SETTINGS, batches, corpus_bytes, model_cfg

SCHEDULES = {'synchronous': dict(synchronous=True), 'forward-locked (DDG)':
             dict(forward_locked=True), 'pipelined (Ouroboros)': {}}


def train(cfg, layout, schedule, params, data, st, steps):
  ref = Reference(cfg, layout, optax.adam(optax.cosine_decay_schedule(st['lr'], steps)),
                  'stored', **SCHEDULES[schedule])
  state = ref.init(params)
  it = batches(data, st['batch'], st['seq'], 7)
  for _ in tqdm.trange(steps, desc=f'K={layout.num_modules} {schedule}', leave=False):
    state, _ = ref.step(state, next(it))
  return ref.model_params(state)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--steps', type=int, default=300)
  ap.add_argument('--lr', type=float, default=0.0, help='peak learning rate (0: the setting)')
  ap.add_argument('--out', default='results')
  args = ap.parse_args()
  st = dict(SETTINGS[True], dtype='float32')
  st['lr'] = args.lr or st['lr']
  data = corpus_bytes(1_000_000)
  split = int(0.95 * len(data))
  eval_batches = [b for _, b in zip(range(8), batches(data[split:], st['batch'], st['seq'],
                                                       123))]
  rows = []
  for k in (2, 3):
    layout = Layout(st['num_layers'] - st['num_layers'] % k, k, False)
    kcfg = model_cfg(dict(st, num_layers=layout.num_layers), 256)
    kparams = TransformerLM(kcfg).init(jax.random.key(0), jnp.zeros((1, st['seq']),
                                                                    jnp.int32))['params']
    k_eval = jax.jit(lambda p, b, c=kcfg: pieces.full_loss(c, p, b['inputs'], b['targets']))
    for schedule in SCHEDULES:
      final = train(kcfg, layout, schedule, kparams, data[:split], st, args.steps)
      bpb = float(np.mean([k_eval(final, b) for b in eval_batches])) / np.log(2)
      rows.append({'K': k, 'layers': layout.num_layers, 'schedule': schedule,
                   'eval_bits_per_byte': bpb})
      print(rows[-1], flush=True)
  record = benchmarking.provenance()
  record.update(settings=dict(st, steps=args.steps), rows=rows)
  lines = ['# Weight staleness: synchronous vs forward-locked (DDG) vs pipelined (Ouroboros)', '',
           f'`{record["command"]}` — {record["date"]}, {record["device"]}, jax {record["jax"]}, '
           f'commit {record["git_commit"]}', '',
           f'Tiny LM (`bench_pipeline --quick` model, layers divisible by K), {args.steps} steps, '
           f'Adam lr {st["lr"]:g} cosine, batch {st["batch"]} x {st["seq"]} bytes, untied '
           "layout, 'stored' backward; one seed; held-out bits per byte.", '',
           '| K | layers | schedule | module weight staleness (updates) | bits/byte | vs synchronous |',
           '|---|---|---|---|---|---|']
  for r in rows:
    sync = next(x for x in rows if x['K'] == r['K'] and x['schedule'] == 'synchronous')
    k = r['K']
    stale = {'synchronous': [0] * k, 'forward-locked (DDG)': [k - 1 - j for j in range(k)],
             'pipelined (Ouroboros)': [2 * (k - 1 - j) for j in range(k)]}[r['schedule']]
    lines.append(f'| {k} | {r["layers"]} | {r["schedule"]} | {stale} | '
                 f'{r["eval_bits_per_byte"]:.4f} | '
                 f'{100 * (r["eval_bits_per_byte"] / sync["eval_bits_per_byte"] - 1):+.2f}% |')
  benchmarking.write_results(args.out, 'pipeline_staleness_cpu', record, '\n'.join(lines) + '\n')


if __name__ == '__main__':
  main()
