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
import optax

from accel import benchmarking
from accel.pipeline.layout import Layout
from accel.pipeline.reference import Reference
from experiments.bench_pipeline import (SETTINGS, corpus_bytes, init_params, model_cfg,
                                        train_and_eval)

SCHEDULES = {'synchronous': dict(synchronous=True), 'forward-locked (DDG)':
             dict(forward_locked=True), 'pipelined (Ouroboros)': {}}


def variant(cfg, layout, schedule, steps, st):
  """(init(params), step(state, batch) -> (state, loss), to_model(state)) of one schedule."""
  ref = Reference(cfg, layout, optax.adam(optax.cosine_decay_schedule(st['lr'], steps)),
                  'stored', **SCHEDULES[schedule])

  def run(state, batch):
    state, metrics = ref.step(state, batch)
    return state, metrics['loss']
  return ref.init, run, ref.model_params


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
  rows = []
  for k in (2, 3):
    layout = Layout(st['num_layers'] - st['num_layers'] % k, k, False)
    kst = dict(st, num_layers=layout.num_layers)
    cfg = model_cfg(kst, 256)
    built = {schedule: variant(cfg, layout, schedule, args.steps, kst) for schedule in SCHEDULES}
    runs = train_and_eval(built, init_params(cfg, kst), data, split, kst, args.steps,
                          jax.devices()[:1])['runs']
    rows += [{'K': k, 'layers': layout.num_layers, 'schedule': schedule,
              'eval_bits_per_byte': run['eval_bits_per_byte']} for schedule, run in runs.items()]
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
