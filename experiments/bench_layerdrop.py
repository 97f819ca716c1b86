r"""Progressive Layer Dropping vs the PreLN baseline, in one process (issue 14).

  python -m experiments.bench_layerdrop --gpu --out results     # one GPU: BERT-base, seq 128
  python -m experiments.bench_layerdrop --out results           # CPU, configs/pld_bert.py:cpu
  python -m experiments.bench_layerdrop --quick --out results   # CPU, a 4-block encoder

Every variant is configs/pld_bert.py at one preset, built through `accel.train.build` (the
task, trainer and compiled programs the training loop runs, `accel.programs`): `baseline`
(layerdrop.enabled=False) and `pld` (theta_bar 0.5; gamma so that theta is within 0.01 of
theta_bar after a quarter of the run), each at the learning rates `--lr_factors` x the
preset's. Every program of every run is compiled first, from an empty persistent cache (the
baseline's, PLD's program L and one steady program alone, then the rest `--compile_workers`
at once), so no timing overlaps a compile. Then, each part written to
OUT/layerdrop_<mode>.{json,md,png} as soon as it is done (a cut run keeps what it finished):

1. Programs: per program (the baseline's; PLD's program N for every N of its steady state,
   theta = theta_bar) its compile seconds, the seconds to trace it and read it back from the
   cache (a repeated run), XLA's FLOPs and ms/step in interleaved rounds; no_drop is the
   mechanism alone, program L with every p_l = 1 (what gamma = 0 runs). Then PLD's real gate
   sequence from the steady window in chunks against the baseline's, and the steps a run
   needs for the saved time to pay for its extra compile time.
2. Convergence at the preset lr, then 3. the sweep (PLD first at each lr: the paper's claim
   is that it takes the larger one): `--steps` steps each, training time only (steps queued
   in chunks, one synchronization per chunk; evaluation every `--eval_every` steps not
   timed); PLD may train `--extra` x steps longer to reach the best baseline final
   validation MLM loss known so far. `--budget_s` skips sweep runs that would end after it.
Reported: wall-clock to the baseline's final validation MLM loss at the same lr and with each
variant at its best lr (by validation loss at `--steps`); the loss curves as a plot.
Goals (GPU, BERT-base, seq 128): s/step PLD / baseline <= 0.78, no_drop <= 1.02, >= 1.3x
faster to the baseline's final validation loss.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import math
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from accel import benchmarking, layerdrop, train
from accel.data import input_pipeline
from accel.programs import Programs, signature, use_compilation_cache
from configs import pld_bert

PRESETS = {'quick': 'smoke', 'cpu': 'cpu', 'gpu': 'gpu'}


def make_config(mode: str, steps: int, pld: bool, lr: float | None = None):
  c = pld_bert.get_config(PRESETS[mode])
  c.progress_bar = False
  if mode == 'quick':
    c.model.update(num_layers=4, d_model=64, num_heads=2, d_ff=256)
    c.data.seq_len = 64
  c.total_steps = steps
  c.optimizer.warmup_steps = max(1, steps // 50)
  c.layerdrop.gamma = math.log((1 - c.layerdrop.theta_bar) / 0.01) / (steps / 4)
  c.layerdrop.enabled = pld
  if lr is not None:
    c.optimizer.lr = lr
  return c


def steady_start(config) -> int:
  ld = config.layerdrop
  return max(int(math.ceil(math.log((1 - ld.theta_bar) / 0.01) / ld.gamma)),
             config.total_steps // 2)


def steady_probs(config) -> dict[int, float]:
  """P(N kept blocks) at theta = theta_bar: the Poisson-binomial law of the gates."""
  p_L = np.asarray(layerdrop.keep_probs(10 ** 9, config.model.num_layers,
                                        config.layerdrop.theta_bar, 0.001))
  dist = np.array([1.0])
  for p in p_L:
    dist = np.convolve(dist, [1 - p, p])
  return {n: float(q) for n, q in enumerate(dist)}


class Run:
  """One config as the loop runs it: trainer, programs, state and a clock of training."""

  def __init__(self, config, data, executor, stop: int):
    self.config = config
    self.task, self.trainer = train.build(config, data.info)
    batch = self.put(data.train(0))
    self.state = self.trainer.init(jax.random.fold_in(jax.random.key(config.seed), 0), batch)
    self.programs = Programs(self.trainer.train_step, self.state, batch, executor)
    self.batch, self.stop = batch, stop
    self.step, self.train_s, self.curve, self.plans = 0, 0.0, [], {}

  def put(self, host_batch):
    return jax.device_put(host_batch, self.trainer.batch_sharding)

  def plan(self, step):
    if step not in self.plans:
      self.plans[step] = self.task.methods.plan(step)
    return self.plans[step]

  def needed(self) -> list[dict]:
    """The plan arrays of every program steps [0, stop) use, one per program."""
    return list({signature(p.model_kwargs): p.model_kwargs
                 for p in map(self.plan, range(self.stop))}.values())

  def dispatch(self, plan, batch=None):
    program = self.programs.get(plan.model_kwargs)
    self.state, metrics = program(self.state, self.batch if batch is None else batch,
                                  jax.device_put(plan.model_kwargs, self.trainer.replicated))
    return metrics

  def train(self, data, stop: int, chunk: int, eval_every: int):
    while self.step < stop:
      end = min(stop, (self.step // chunk + 1) * chunk)
      batches = [self.put(data.train(s)) for s in range(self.step, end)]
      plans = [self.plan(s) for s in range(self.step, end)]
      for p in plans:
        self.programs.get(p.model_kwargs)        # compiled outside the clock
      jax.block_until_ready(self.state)
      t0 = time.perf_counter()
      for p, b in zip(plans, batches):
        metrics = self.dispatch(p, b)
      jax.block_until_ready(metrics)
      self.train_s += time.perf_counter() - t0
      self.step = end
      if self.step % eval_every == 0 or self.step == stop:
        loss = train.evaluate(self.trainer, self.state, data)['eval/loss']
        self.curve.append((self.step, self.train_s, float(loss)))

  def loss_at(self, step):
    return next((loss for s, _, loss in self.curve if s == step), None)


def _per_n_plans(run: Run, steps) -> dict[int, object]:
  """One steady-state plan for each number N of kept blocks the steady window holds."""
  plans = {}
  for t in steps:
    plan = run.plan(t)
    plans.setdefault(len(plan.model_kwargs['layer_ids_N']), plan)
  return dict(sorted(plans.items()))


def programs_part(args, base: Run, pld: Run, window: range) -> dict:
  """Compile time and ms/step of every program the steady state uses; its real mix."""
  cfg = pld.config
  num_layers = cfg.model.num_layers
  per_n = _per_n_plans(pld, window)
  no_drop = layerdrop.plan_arrays(np.ones(num_layers, bool), np.ones(num_layers, np.float32))
  timed = [('baseline', base, {}), ('no_drop', pld, no_drop)] + [
      (f'N={n}', pld, p.model_kwargs) for n, p in per_n.items()]
  rows = {}
  for name, run, plan_kwargs in timed:
    sig = signature(plan_kwargs)
    rows[name] = {'compile_s': run.programs.compile_seconds[sig],
                  'flops': run.programs.flops[sig]}
  for name, run, plan_kwargs in timed[:2]:   # a repeated run: traced, then read from the cache
    jax.clear_caches()                       # (not the in-memory copy of this process)
    t0 = time.perf_counter()
    run.trainer.train_step.lower(run.state, run.batch, jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), plan_kwargs)).compile()
    rows[name]['cache_load_s'] = time.perf_counter() - t0
  steps, states = {}, {}
  for name, run, plan_kwargs in timed:
    program = run.programs.get(plan_kwargs)
    device_plan = jax.device_put(plan_kwargs, run.trainer.replicated)
    steps[name] = (lambda s, program=program, plan=device_plan, batch=run.batch:
                   program(s, batch, plan))
    states[name] = jax.tree.map(lambda a: a.copy(), run.state)
  for name, step in steps.items():   # warm-up
    states[name], out = step(states[name])
  jax.block_until_ready(out)
  ms, spread = benchmarking.interleaved_rounds(steps, states, (), args.rounds, args.chunk)
  del states
  for name in steps:
    rows.setdefault(name, {}).update(ms_per_step=ms[name], ms_range=spread[name])
  # The steady state: PLD's own gate sequence, chunk by chunk against the baseline's.
  pld_ms, base_ms = [], []
  for r in range(args.rounds):
    plans = [pld.plan(t) for t in window[r * args.chunk:(r + 1) * args.chunk]]
    for who, times in ((base, base_ms), (pld, pld_ms)) if r % 2 == 0 else ((pld, pld_ms),
                                                                             (base, base_ms)):
      jax.block_until_ready(who.state)
      t0 = time.perf_counter()
      for p in (plans if who is pld else [base.plan(0)] * len(plans)):
        metrics = who.dispatch(p)
      jax.block_until_ready(metrics)
      times.append(1e3 * (time.perf_counter() - t0) / len(plans))
  probs = steady_probs(cfg)
  layers_run = [len(pld.plan(t).model_kwargs['layer_ids_N']) for t in window]
  base_ms_step, pld_ms_step = statistics.median(base_ms), statistics.median(pld_ms)
  # Every program PLD's run uses (not only those timed here) against the baseline's one.
  compile_pld = sum(pld.programs.compile_seconds.values())
  extra_compile = compile_pld - rows['baseline']['compile_s']
  saved_ms = base_ms_step - pld_ms_step
  return {
      'rows': rows, 'steady_window': [window.start, window.stop],
      'steady_probs': {n: probs[n] for n in range(num_layers + 1)},
      'expected_ms_per_step': sum(probs[n] * rows[f'N={n}']['ms_per_step']
                                  for n in per_n) / sum(probs[n] for n in per_n),
      'baseline_ms_per_step': base_ms_step, 'pld_ms_per_step': pld_ms_step,
      'pld_layers_run': float(np.mean(layers_run)),
      'ratio_pld': pld_ms_step / base_ms_step,
      'ratio_no_drop': rows['no_drop']['ms_per_step'] / rows['baseline']['ms_per_step'],
      'compile_s_pld_total': compile_pld, 'compile_s_baseline': rows['baseline']['compile_s'],
      'programs_pld': len(pld.programs),
      'break_even_steps': (extra_compile / (saved_ms / 1e3) if saved_ms > 0 else None),
  }


def run_summary(run: Run) -> dict:
  return {'lr': run.config.optimizer.lr, 'steps': run.step, 'train_s': run.train_s,
          'curve': run.curve, 'programs': len(run.programs),
          'compile_s': sum(run.programs.compile_seconds.values()),
          'layers_run': float(np.mean([run.plan(s).metrics.get(
              'layerdrop/layers_run', run.config.model.num_layers) for s in range(run.step)]))}


def comparisons(runs: dict) -> dict:
  """Same-lr and tuned (each variant's best lr by validation loss at `steps`)."""
  out = {}
  def best(variant):
    done = [r for name, r in runs.items() if name.startswith(variant) and r['final'] is not None]
    return min(done, key=lambda r: r['final'], default=None)
  pairs = {'same_lr': (runs.get('baseline@1'), runs.get('pld@1')),
           'tuned': (best('baseline'), best('pld'))}
  for key, (base, pld) in pairs.items():
    if base is None or pld is None:
      continue
    target = base['final']
    _, base_s = _time_to(base['curve'], target)
    pld_step, pld_s = _time_to(pld['curve'], target)
    out[key] = {'baseline_lr': base['lr'], 'pld_lr': pld['lr'], 'target': target,
                'baseline_s': base_s, 'pld_step': pld_step, 'pld_s': pld_s,
                'speedup': base_s / pld_s if pld_s else None}
  return out


def _time_to(curve, target):
  return next(((s, t) for s, t, loss in curve if loss <= target), (None, None))


def to_markdown(r: dict) -> str:
  s = r['setup']
  model = s['model']
  lines = [f'# Progressive Layer Dropping vs baseline PreLN ({s["mode"]})', '',
           f'Encoder: {model["num_layers"]} layers, d_model {model["d_model"]}, '
           f'{model["num_heads"]} heads, d_ff {model["d_ff"]}, {model["dtype"]}, PreLN; MLM on '
           f'Shakespeare bytes, batch {s["batch_size"]} x {s["seq_len"]}. PLD: theta_bar '
           f'{s["theta_bar"]}, gamma {s["gamma"]:.4g} (theta within 0.01 of theta_bar after a '
           f'quarter of the {s["steps"]} steps); every program built by accel.train.build.', '',
           benchmarking.provenance_line(r['meta']), '']
  p = r.get('programs')
  if p:
    lines += [f'## Programs (steady state: steps {p["steady_window"][0]}..'
              f'{p["steady_window"][1]}, theta = theta_bar)', '']
    table = []
    for name, row in p['rows'].items():
      n = int(name[2:]) if name.startswith('N=') else None
      table.append([name, row.get('compile_s'), row.get('cache_load_s'),
                    row.get('flops'), row['ms_per_step'],
                    row['ms_per_step'] / p['rows']['baseline']['ms_per_step'],
                    None if n is None else p['steady_probs'][n]])
    lines += [f'{r["compile_programs"]} programs (all runs) compiled cold in '
              f'{r["compile_wall_s"]:.1f} s: the baseline\'s, N=L and one steady N alone '
              f'(first), then the others {s["compile_workers"]} at once; a program\'s seconds '
              'below are its own lowering + compile, wall-clock. no_drop is program N=L with '
              'every p = 1.', '',
              benchmarking.markdown_table(
        ['program', 'compile s', 'traced + read from cache s', 'XLA FLOPs',
         'ms/step', 'vs baseline', 'P(N) at theta_bar'], table, floats='.4g'), '']
    be = p['break_even_steps']
    lines += [benchmarking.markdown_table(['steady state', 'value', 'goal'], [
        ['s/step PLD / baseline (real gate sequence)', p['ratio_pld'], '<= 0.78'],
        ['s/step no_drop / baseline (mechanism, nothing dropped)', p['ratio_no_drop'],
         '<= 1.02'],
        ['PLD ms/step (median of chunks)', p['pld_ms_per_step'], ''],
        ['baseline ms/step (median of chunks)', p['baseline_ms_per_step'], ''],
        ['expected PLD ms/step, sum_N P(N) t(N)', p['expected_ms_per_step'], ''],
        ['layers run (steady window)', p['pld_layers_run'], '8.75 of 12 at BERT-base'],
        [f'compile s, the {p["programs_pld"]} programs of PLD\'s run / the baseline\'s one',
         f'{p["compile_s_pld_total"]:.1f} / {p["compile_s_baseline"]:.1f}', ''],
        ['steps for the saved step time to pay for the extra compile time',
         'never' if be is None else f'{be:.0f}', '']], floats='.3f'), '']
  runs = r.get('runs', {})
  if runs:
    lines += ['## Convergence', '',
              f'{s["steps"]} steps each, training time only (evaluation every '
              f'{s["eval_every"]} steps not timed); PLD may train {s["extra"]:.0%} longer to '
              'reach the target.', '']
    lines += [benchmarking.markdown_table(
        ['run', 'lr', f'val MLM loss at {s["steps"]}', 'train s', 'steps run',
         'mean layers run', 'programs', 'compile s'],
        [[name, row['lr'], row['final'], row['train_s'], row['steps'], row['layers_run'],
          row['programs'], row['compile_s']] for name, row in runs.items()], floats='.4g'), '']
    comp = r.get('comparisons', {})
    table = [[key, c['baseline_lr'], c['pld_lr'], c['target'], c['baseline_s'],
              c['pld_s'] if c['pld_s'] is not None else 'not reached', c['speedup']]
             for key, c in comp.items()]
    if table:
      lines += [benchmarking.markdown_table(
          ['comparison', 'baseline lr', 'PLD lr', 'target (baseline final val loss)',
           'baseline s', 'PLD s to target', 'speedup (goal >= 1.3)'], table, floats='.4g'), '']
    skipped = r.get('skipped', [])
    if skipped:
      lines += ['Not run (time budget): ' + ', '.join(skipped), '']
    if r.get('plot'):
      lines += [f'![validation MLM loss]({os.path.basename(r["plot"])})', '']
  return '\n'.join(lines)


def plot(r: dict, path: str) -> str | None:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name, row in r['runs'].items():
    steps, seconds, losses = zip(*row['curve'])
    style = '-' if name.startswith('pld') else '--'
    axes[0].plot(steps, losses, style, label=f'{name} (lr {row["lr"]:.2g})')
    axes[1].plot(seconds, losses, style, label=f'{name} (lr {row["lr"]:.2g})')
  for ax, xlabel in zip(axes, ('step', 'training seconds')):
    ax.set_xlabel(xlabel)
    ax.set_ylabel('validation MLM loss (nats)')
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  group = parser.add_mutually_exclusive_group()
  group.add_argument('--quick', action='store_true', help='tiny CPU run')
  group.add_argument('--gpu', action='store_true', help='BERT-base at seq 128, one GPU')
  parser.add_argument('--steps', type=int, default=0, help='0: 60 quick, 400 cpu, 600 gpu')
  parser.add_argument('--chunk', type=int, default=0, help='0: 5 quick, 20 cpu/gpu')
  parser.add_argument('--rounds', type=int, default=4, help='timing rounds (part 1)')
  parser.add_argument('--eval_every', type=int, default=0, help='0: 20 quick, 100 cpu/gpu')
  parser.add_argument('--extra', type=float, default=0.5,
                      help='PLD may train this fraction of --steps longer to reach the target')
  parser.add_argument('--lr_factors', default='1,2,0.5',
                      help='the sweep: multiples of the preset lr (the first is "same lr")')
  parser.add_argument('--parts', default='programs,convergence,sweep')
  parser.add_argument('--budget_s', type=float, default=None,
                      help='start no sweep run expected to end after this (0: none; '
                           'default 300 gpu, 0 cpu)')
  parser.add_argument('--compile_workers', type=int, default=0, help='0: 12 gpu, 1 cpu')
  parser.add_argument('--out', default='', help='folder for layerdrop_<mode>.json/.md/.png')
  args = parser.parse_args()
  t_start = time.perf_counter()
  mode = 'quick' if args.quick else 'gpu' if args.gpu else 'cpu'
  args.steps = args.steps or {'quick': 60, 'cpu': 400, 'gpu': 600}[mode]
  args.chunk = args.chunk or (5 if mode == 'quick' else 20)
  args.eval_every = args.eval_every or (20 if mode == 'quick' else 100)
  if args.budget_s is None:
    args.budget_s = 300 if mode == 'gpu' else 0
  workers = args.compile_workers or (12 if mode == 'gpu' else 1)
  parts = args.parts.split(',')
  factors = [float(f) for f in args.lr_factors.split(',')]
  # Cold compiles: an empty persistent cache of this process's own (the loop's default, a
  # cache beside the data, would make a repeated benchmark measure loads). Programs that
  # differ only in what the compiled code ignores (no_drop's gamma, eval and init steps
  # across learning rates) are compiled once and read back.
  use_compilation_cache(tempfile.mkdtemp(prefix='bench_layerdrop_cache_'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

  lr0 = make_config(mode, args.steps, False).optimizer.lr
  order = [('baseline', factors[0]), ('pld', factors[0])]
  if 'sweep' in parts:   # PLD first: the paper's claim is that it takes the larger lr
    order += [(v, f) for f in factors[1:] for v in ('pld', 'baseline')]
  if 'convergence' not in parts:
    order = order[:2] if 'programs' in parts else []
  configs = {key: make_config(mode, args.steps, key[0] == 'pld', lr0 * key[1]) for key in order}
  c = configs[('pld', factors[0])]
  data = input_pipeline.build(c)
  r = {'meta': benchmarking.provenance(), 'runs': {}, 'skipped': [], 'setup': {
      'mode': mode, 'steps': args.steps, 'chunk': args.chunk, 'eval_every': args.eval_every,
      'extra': args.extra, 'batch_size': c.batch_size, 'seq_len': c.data.seq_len,
      'model': dict(c.model), 'optimizer': dict(c.optimizer), 'theta_bar': c.layerdrop.theta_bar,
      'gamma': c.layerdrop.gamma, 'lrs': [lr0 * f for f in factors],
      'compile_workers': workers}}

  def write():
    r['comparisons'] = comparisons(r['runs'])
    if args.out and r['runs']:
      r['plot'] = plot(r, os.path.join(args.out, f'layerdrop_{mode}.png'))
    benchmarking.write_results(args.out, f'layerdrop_{mode}', r, to_markdown(r))

  if args.out:
    os.makedirs(args.out, exist_ok=True)
  # Every program of every run, compiled up front, `workers` at once (timing never overlaps
  # a compile), the ones the programs part times first.
  executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix='compile')
  runs = {key: Run(configs[key], data, executor,
                   args.steps + (int(args.extra * args.steps) if key[0] == 'pld' else 0))
          for key in order}
  base, pld = runs[order[0]], runs[order[1]]
  num_layers = c.model.num_layers
  window = range(steady_start(c), steady_start(c) + args.rounds * args.chunk)
  first = [{}, layerdrop.plan_arrays(np.ones(num_layers, bool), np.ones(num_layers, np.float32)),
           *[p.model_kwargs for p in _per_n_plans(pld, window).values()]]
  t0 = time.perf_counter()
  # The baseline's, program L and a steady program N < L alone (XLA's autotuner measures
  # their GEMMs on an idle device; the other programs read its results from its cache).
  steady_n = max(steady_probs(c), key=steady_probs(c).get)
  alone = [(base, {}), (pld, first[1])] + [(pld, k) for k in first[2:]
                                            if len(k['layer_ids_N']) == steady_n][:1]
  for run, kwargs in alone:
    run.programs.get(kwargs)
  for run, kwargs in [(pld, k) for k in first[2:]] + [
      (run, k) for run in runs.values() for k in run.needed()]:
    run.programs.prefetch(kwargs)
  for run in runs.values():
    for kwargs in run.needed():
      run.programs.get(kwargs)
  r['compile_wall_s'] = time.perf_counter() - t0
  r['compile_programs'] = sum(len(run.programs) for run in runs.values())
  if 'programs' in parts:
    r['programs'] = programs_part(args, base, pld, window)
    write()
    for run in (base, pld):   # the convergence runs start from the initial state again
      run.state = run.trainer.init(jax.random.fold_in(jax.random.key(run.config.seed), 0),
                                   run.batch)
  seconds_per_run = {}
  for (variant, factor), run in runs.items():
    name = f'{variant}@{factor:g}'
    if 'convergence' not in parts:
      break
    elapsed = time.perf_counter() - t_start
    if (args.budget_s and factor != factors[0]
        and elapsed + seconds_per_run.get(variant, 0.0) > args.budget_s):
      r['skipped'].append(name)
      write()
      continue
    t0 = time.perf_counter()
    run.train(data, args.steps, args.chunk, args.eval_every)
    finals = [row['final'] for n, row in r['runs'].items() if n.startswith('baseline')]
    target = min(finals, default=-math.inf)
    while variant == 'pld' and run.curve[-1][2] > target and run.step < run.stop:
      run.train(data, min(run.stop, run.step + args.eval_every), args.chunk, args.eval_every)
    r['runs'][name] = {**run_summary(run), 'final': run.loss_at(args.steps)}
    run.state = None
    seconds_per_run[variant] = time.perf_counter() - t0
    write()
  executor.shutdown(wait=False, cancel_futures=True)
  r['total_s'] = time.perf_counter() - t_start
  write()


if __name__ == '__main__':
  main()
