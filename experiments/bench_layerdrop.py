r"""Progressive Layer Dropping vs the PreLN baseline, side by side in one process (issue 3).

  python -m experiments.bench_layerdrop --quick --out results   # CPU, tiny encoder, seconds
  python -m experiments.bench_layerdrop --out results           # CPU, configs/pld_bert.py:cpu
  python -m experiments.bench_layerdrop --gpu --out results     # GPU, BERT-base, seq 128

The variants are configs/pld_bert.py at one preset — same data order, seed and learning
rate: the baseline with layerdrop.enabled=False, PLD, and `no_drop` (the PLD code path with
gamma = 0, so nothing is ever dropped: the cost of the mechanism alone). They train in interleaved chunks of
`--chunk` steps (queued, one synchronization per chunk; the order alternates each chunk, so
drift in the machine's load hits both alike) and are evaluated at the same steps (not timed).

Reported:
- FLOPs per step at steady state: XLA's cost of the compiled step less the dropped blocks
  (`LayerDrop.executed_flops`, per device), mean over the steady window;
- wall-clock per step at steady state: the median over the chunks of the same window of
  chunk time / steps; the window starts when theta(t) - theta_bar < 0.01, or at half the
  run if that is later;
- wall-clock (training only, evaluation excluded) until the validation MLM loss first
  reaches the baseline's final validation MLM loss; PLD may train up to `--extra` x steps
  longer (at the final learning rate) to get there.
The issue's goals (GPU, BERT-base, seq 128, theta_bar 0.5): >= 25% fewer FLOPs and >= 24%
less time per step, >= 1.3x faster to the baseline's final validation loss.
The --gpu mode shortens the gpu preset to `--steps` steps (gamma raised so that theta
settles within the first quarter) to fit in about 3 minutes on one H200.
"""
from __future__ import annotations

import argparse
import math
import time

import jax
import numpy as np

from accel import benchmarking, layerdrop, train
from accel.data import input_pipeline
from accel.programs import Programs, signature
from configs import pld_bert

# no_drop: the PLD code path (blocks under cond, their remat policy) with gamma = 0, so
# theta = 1 and no block is ever dropped: what the mechanism itself costs or saves.
VARIANTS = ('baseline', 'pld', 'no_drop')


def make_config(mode: str, steps: int, variant: str):
  preset = {'quick': 'smoke', 'cpu': 'cpu', 'gpu': 'gpu'}[mode]
  c = pld_bert.get_config(preset)
  c.progress_bar = False
  if mode == 'quick':
    c.model.update(num_layers=6, d_model=64, num_heads=2, d_ff=256)
    c.data.seq_len = 64
  if steps:
    c.total_steps = steps
  if mode != 'cpu':   # theta within 0.01 of theta_bar after a quarter of the run
    c.layerdrop.gamma = math.log((1 - c.layerdrop.theta_bar) / 0.01) / (c.total_steps / 4)
    c.optimizer.warmup_steps = max(1, c.total_steps // 50)
  c.layerdrop.enabled = variant != 'baseline'
  if variant == 'no_drop':
    c.layerdrop.gamma = 0.0
  return c


def steady_start(config) -> int:
  ld = config.layerdrop
  settle = math.log((1 - ld.theta_bar) / 0.01) / ld.gamma
  return max(int(math.ceil(settle)), config.total_steps // 2)


class Variant:
  """One config's trainer, compiled step, state and records."""

  def __init__(self, config, data):
    self.config = config
    self.task, self.trainer = train.build(config, data.info)
    batch = self.put(data.train(0))
    self.state = self.trainer.init(jax.random.fold_in(jax.random.key(config.seed), 0), batch)
    t0 = time.perf_counter()
    self.programs = Programs(self.trainer.train_step, self.state, batch)
    self.programs.get(self.task.methods.plan(0).model_kwargs)
    self.compile_s = time.perf_counter() - t0
    self.compiled_flops = next(iter(self.programs.flops.values()))
    self.step_seconds, self.step_flops, self.layers_run, self.train_loss = [], [], [], []
    self.evals = []   # (step, training seconds so far, eval loss)

  def put(self, host_batch):
    return jax.device_put(host_batch, self.trainer.batch_sharding)

  def run_chunk(self, first_step, batches):
    plans = [self.task.methods.plan(first_step + i) for i in range(len(batches))]
    for plan in plans:
      self.programs.get(plan.model_kwargs)   # compiled outside the timed chunk
    t0 = time.perf_counter()
    metrics = []
    for batch, plan in zip(batches, plans):
      self.state, m = self.programs.get(plan.model_kwargs)(
          self.state, batch, jax.device_put(plan.model_kwargs, self.trainer.replicated))
      metrics.append(m)
    jax.block_until_ready(self.state)
    seconds = time.perf_counter() - t0
    for m, plan in zip(jax.device_get(metrics), plans):
      run = plan.metrics.get('layerdrop/layers_run', self.config.model.num_layers)
      self.layers_run.append(run)
      self.step_flops.append(self.task.methods.executed_flops(
          self.task.model, self.programs.flops[signature(plan.model_kwargs)], plan))
      self.train_loss.append(float(m['loss']))
      self.step_seconds.append(seconds / len(batches))

  def evaluate(self, data, step):
    loss = train.evaluate(self.trainer, self.state, data)['eval/loss']
    self.evals.append((step, float(np.sum(self.step_seconds)), loss))


def run(mode: str, steps: int, chunk: int, eval_every: int, extra: float) -> dict:
  configs = {v: make_config(mode, steps, v) for v in VARIANTS}
  total = configs['baseline'].total_steps
  data = input_pipeline.build(configs['baseline'])   # identical batches for both
  variants = {v: Variant(c, data) for v, c in configs.items()}
  for start in range(0, total, chunk):
    stop = min(start + chunk, total)
    host = [data.train(s) for s in range(start, stop)]
    order = VARIANTS if (start // chunk) % 2 == 0 else VARIANTS[::-1]
    for v in order:
      variants[v].run_chunk(start, [variants[v].put(b) for b in host])
    if stop % eval_every == 0 or stop == total:
      for v in VARIANTS:
        variants[v].evaluate(data, stop)
  target = variants['baseline'].evals[-1][2]
  pld = variants['pld']
  step = total
  while pld.evals[-1][2] > target and step < total + extra * total:
    for start in range(step, step + eval_every, chunk):
      pld.run_chunk(start, [pld.put(data.train(s)) for s in range(start, start + chunk)])
    step += eval_every
    pld.evaluate(data, step)
  window = slice(steady_start(configs['pld']), total)
  rows = {}
  for v, var in variants.items():
    reached = next(((s, t) for s, t, loss in var.evals if loss <= target), None)
    at_total = next(e for e in var.evals if e[0] == total)
    rows[v] = {
        'compiled_flops': var.compiled_flops, 'compile_s': var.compile_s,
        'flops_per_step': float(np.mean(var.step_flops[window])),
        'seconds_per_step': float(np.median(var.step_seconds[window])),
        'layers_run': float(np.mean(var.layers_run[window])),
        'final_eval_loss': at_total[2],
        'train_seconds': at_total[1],
        'steps_to_target': reached[0] if reached else None,
        'seconds_to_target': reached[1] if reached else None,
        'evals': var.evals,
    }
  base, pld, no_drop = rows['baseline'], rows['pld'], rows['no_drop']
  ratios = {
      'flops_per_step pld/baseline': pld['flops_per_step'] / base['flops_per_step'],
      'seconds_per_step pld/baseline': pld['seconds_per_step'] / base['seconds_per_step'],
      'flops_per_step no_drop/baseline': no_drop['flops_per_step'] / base['flops_per_step'],
      'seconds_per_step no_drop/baseline': (no_drop['seconds_per_step']
                                            / base['seconds_per_step']),
      'speedup to baseline final eval loss': (
          base['seconds_to_target'] / pld['seconds_to_target']
          if pld['seconds_to_target'] else None),
  }
  c = configs['pld']
  setup = {
      'mode': mode, 'steps': total, 'chunk': chunk, 'eval_every': eval_every,
      'pld_extra_steps_allowed': int(extra * total), 'steady_window_from_step': window.start, 'batch_size': c.batch_size,
      'seq_len': c.data.seq_len, 'model': dict(c.model), 'optimizer': dict(c.optimizer),
      'layerdrop': dict(c.layerdrop),
      'expected_layers_at_theta_bar': float(layerdrop.expected_layers(
          c.model.num_layers, c.layerdrop.theta_bar)),
  }
  return {'meta': benchmarking.provenance(), 'setup': setup, 'rows': rows, 'ratios': ratios}


def _fmt(x, spec):
  return 'not reached' if x is None else format(x, spec)


def to_markdown(r: dict) -> str:
  s, m, rows, ratios = r['setup'], r['meta'], r['rows'], r['ratios']
  model, ld = s['model'], s['layerdrop']
  lines = [
      f'# Progressive Layer Dropping vs baseline PreLN ({s["mode"]})', '',
      f'{m["date"]}, {m["device"]} x{m["device_count"]}, jax {m["jax"]}, flax {m["flax"]}, '
      f'commit {m["git_commit"]}', '', f'Command: `{m["command"]}`', '',
      f'Encoder: {model["num_layers"]} layers, d_model {model["d_model"]}, '
      f'{model["num_heads"]} heads, d_ff {model["d_ff"]}, {model["dtype"]}, '
      f'{"PreLN" if model["pre_ln"] else "PostLN"}; MLM on Shakespeare bytes, batch '
      f'{s["batch_size"]} x {s["seq_len"]}; {s["steps"]} steps, AdamW lr '
      f'{s["optimizer"]["lr"]} (same for both; if PLD has not reached the baseline\'s final '
      f'loss by then it trains on, at the final learning rate, for up to '
      f'{s["pld_extra_steps_allowed"]} more steps). PLD: theta_bar {ld["theta_bar"]}, '
      f'gamma {ld["gamma"]:.4g}; expected layers at theta_bar '
      f'{s["expected_layers_at_theta_bar"]:.2f} of {model["num_layers"]}.', '',
      f'Steady state: steps {s["steady_window_from_step"]}..{s["steps"]}. Timing: '
      f'interleaved chunks of {s["chunk"]} steps; evaluation every {s["eval_every"]} steps '
      'is not timed.', '',
      '| variant | FLOPs/step (steady mean) | s/step (steady median) | layers run (steady) | '
      f'val MLM loss at step {s["steps"]} | train s to step {s["steps"]} | '
      'steps to baseline final | s to baseline final |',
      '|---|---|---|---|---|---|---|---|']
  for v, row in rows.items():
    lines.append(
        f'| {v} | {row["flops_per_step"]:.4g} | {row["seconds_per_step"]:.4g} | '
        f'{row["layers_run"]:.2f} | {row["final_eval_loss"]:.4f} | '
        f'{row["train_seconds"]:.1f} | {_fmt(row["steps_to_target"], "d")} | '
        f'{_fmt(row["seconds_to_target"], ".1f")} |')
  lines += ['', '| ratio | value | goal (GPU, BERT-base) |', '|---|---|---|',
            f'| FLOPs/step pld/baseline | {ratios["flops_per_step pld/baseline"]:.3f} | <= 0.75 |',
            f'| s/step pld/baseline | {ratios["seconds_per_step pld/baseline"]:.3f} | <= 0.76 |',
            f'| speedup to baseline final val loss | '
            f'{_fmt(ratios["speedup to baseline final eval loss"], ".2f")} | >= 1.3 |',
            f'| FLOPs/step no_drop/baseline | '
            f'{ratios["flops_per_step no_drop/baseline"]:.3f} | (mechanism, nothing dropped) |',
            f'| s/step no_drop/baseline | {ratios["seconds_per_step no_drop/baseline"]:.3f} | '
            '(mechanism, nothing dropped) |', '',
            'no_drop = the PLD code path (blocks under cond with their remat policy) with '
            'gamma = 0: theta stays 1 and no block is dropped.', '',
            'Validation MLM loss by step (training seconds so far):', '',
            '| step | ' + ' | '.join(rows) + ' |', '|---' * (len(rows) + 1) + '|']
  for i, (step, _, _) in enumerate(rows['pld']['evals']):
    cells = [f'{row["evals"][i][2]:.4f} ({row["evals"][i][1]:.1f} s)'
             if i < len(row['evals']) else '' for row in rows.values()]
    lines.append(f'| {step} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  group = parser.add_mutually_exclusive_group()
  group.add_argument('--quick', action='store_true', help='tiny CPU run, seconds')
  group.add_argument('--gpu', action='store_true', help='BERT-base at seq 128, ~3 min on an H200')
  parser.add_argument('--steps', type=int, default=0, help='0: 60 quick, 400 cpu, 800 gpu')
  parser.add_argument('--chunk', type=int, default=0, help='0: 5 quick, 20 cpu/gpu')
  parser.add_argument('--eval_every', type=int, default=0, help='0: 20 quick, 100 cpu/gpu')
  parser.add_argument('--extra', type=float, default=0.5,
                      help='PLD may train this fraction of --steps longer to reach the target')
  parser.add_argument('--out', default='', help='folder for layerdrop_<mode>.json and .md')
  args = parser.parse_args()
  mode = 'quick' if args.quick else 'gpu' if args.gpu else 'cpu'
  steps = args.steps or {'quick': 60, 'cpu': 0, 'gpu': 800}[mode]
  chunk = args.chunk or (5 if mode == 'quick' else 20)
  eval_every = args.eval_every or (20 if mode == 'quick' else 100)
  r = run(mode, steps, chunk, eval_every, args.extra)
  markdown = to_markdown(r)
  if args.out:
    benchmarking.write_results(args.out, f'layerdrop_{mode}', r, markdown)
  else:
    print(markdown)


if __name__ == '__main__':
  main()
