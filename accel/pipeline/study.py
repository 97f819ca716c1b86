"""The convergence study's machinery (`experiments/pipeline_staleness.py`): runs of the
pipeline's single-device arithmetic (`accel.pipeline.simulate.Simulated`) vmapped per layout
and optimizer, scanned over chunks of steps with their batches drawn on the device, held-out
bits/byte curves, and the tables and plot of the results.

A `Group` is one compiled program: its runs differ only in what is state (their seed, lr,
budget, the remedies' knobs, Adam's b1 through optax.inject_hyperparams), so the runs of one
layout and optimizer share it. The lr follows a cosine from the run's peak to 0 over its
budget, applied as `Knobs.lr_scale` on an optimizer built at lr 1 (the update of Adam and
Muon is linear in the lr).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from accel import optim
from accel.data import input_pipeline
from accel.models.transformer import TransformerConfig
from accel.pipeline import families, pieces
from accel.pipeline.layout import Layout
from accel.pipeline.simulate import SYNCHRONOUS, Knobs, Simulated

LAYOUTS = {'K=2 untied': (2, False), 'K=3 tied ring': (3, True)}
RECIPE = dict(lr=2.5e-4, b1=0.9, b2=0.999, eps=1e-8, clip=0.25)
MUON_LR = 0.02   # Muon's matrices (Jordan et al.'s default); Adam's lr on the rest



@dataclasses.dataclass(frozen=True)
class Run:
  variant: str
  layout: str          # a LAYOUTS key; synchronous runs go with any
  seed: int
  knobs: dict          # Knobs fields, and b1
  lr: float
  steps: int

  @property
  def synchronous(self) -> bool:
    return self.knobs.get('sync_warmup_steps', 0) >= SYNCHRONOUS


def model_cfg(st) -> TransformerConfig:
  return TransformerConfig(vocab_size=256, num_layers=st['num_layers'], d_model=st['d_model'],
                           num_heads=st['num_heads'], d_ff=st['d_ff'], max_len=st['seq'],
                           scan_layers=True)


def corpus(data_dir: str):
  """(train, validation) bytes of the Shakespeare corpus, through accel/data."""
  builder = input_pipeline.prepared('shakespeare', {'dir': data_dir})
  return [input_pipeline.byte_stream(builder.as_data_source(split))
          for split in ('train', input_pipeline.eval_split(builder))]


def optimizer(family: str):
  """The per-module optimizer at lr 1 (the study scales each update by its run's lr at
  that step, Knobs.lr_scale); Adam with b1 in its state, so runs may differ in it. Muon:
  a run's lr is Muon's (MUON_LR), Adam's on the rest that times recipe lr / MUON_LR."""
  if family == 'muon':
    return optim.muon(1.0, RECIPE['lr'] / MUON_LR, beta=0.95, b1=RECIPE['b1'],
                      b2=RECIPE['b2'], eps=RECIPE['eps'])
  return optax.inject_hyperparams(optax.adam)(learning_rate=1.0, b1=RECIPE['b1'],
                                              b2=RECIPE['b2'], eps=RECIPE['eps'])


def with_b1(opt_state, b1):
  """Adam's state from optax.inject_hyperparams with its b1 set (Muon's: unchanged)."""
  if 'b1' in getattr(opt_state, 'hyperparams', {}):
    return opt_state._replace(hyperparams={**opt_state.hyperparams,
                                           'b1': jnp.asarray(b1, jnp.float32)})
  return opt_state


class Group:
  """The runs of one layout and optimizer: one program, vmapped over the runs."""

  def __init__(self, st, layout_name: str, family: str, train, val):
    k, tied = LAYOUTS[layout_name]
    self.st, self.family = st, family
    self.cfg = model_cfg(st)
    self.layout = Layout(st['num_layers'], k, tied)
    self.sim = Simulated(self.cfg, self.layout, optimizer(family), clip_norm=RECIPE['clip'])
    self.train = jnp.asarray(train)
    seq, batch, n = st['seq'], st['batch'], st['eval_batches']
    windows = np.stack([val[i * seq:i * seq + seq + 1] for i in range(n * batch)])
    self.eval_BxL1 = jnp.asarray(windows.astype(np.int32).reshape(n, batch, seq + 1))
    self._advance = jax.jit(self._chunk, static_argnums=2, donate_argnums=0)
    self._eval = jax.jit(jax.vmap(self._eval_one))

  def init(self, runs: list[Run]):
    mp = families.for_config(self.cfg)
    seq, batch = self.st['seq'], self.st['batch']
    dummy = {'inputs': jnp.zeros((batch, seq), jnp.int32),
             'targets': jnp.zeros((batch, seq), jnp.int32)}
    states = []
    for r in runs:
      params = mp.init_params(jax.random.key(r.seed), jnp.zeros((1, seq), jnp.int32))
      knobs = Knobs(**{f.name: r.knobs.get(f.name, f.default)
                       for f in dataclasses.fields(Knobs)})
      s = self.sim.init(params, dummy, knobs)
      b1 = r.knobs.get('b1', RECIPE['b1'])
      s['opt'] = [with_b1(o, b1) for o in s['opt']]
      s['opt_E'] = with_b1(s['opt_E'], b1)
      states.append(s)
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *states)

  def _batch(self, seed, t):
    seq, batch = self.st['seq'], self.st['batch']
    key = jax.random.fold_in(jax.random.key(seed), t)
    starts = jax.random.randint(key, (batch,), 0, self.train.shape[0] - seq - 1)
    w = jax.vmap(lambda s: lax.dynamic_slice(self.train, (s,), (seq + 1,)))(starts)
    w = w.astype(jnp.int32)
    return {'inputs': w[:, :-1], 'targets': w[:, 1:]}

  def _chunk(self, states, run_arrays, chunk: int, t0):
    seeds, lr, horizon = run_arrays

    def one(state, seed, lr_, horizon_, t):
      cosine = 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(t, horizon_) / horizon_))
      state = dict(state, knobs=dict(state['knobs'], lr_scale=lr_ * cosine))
      return self.sim.step(state, self._batch(seed, t))

    def body(states, t):
      states, metrics = jax.vmap(one, in_axes=(0, 0, 0, 0, None))(states, seeds, lr,
                                                                   horizon, t)
      return states, metrics['loss']
    return lax.scan(body, states, t0 + jnp.arange(chunk))

  def _eval_one(self, state):
    params = self.sim.model_params(state)
    losses = lax.map(lambda w: pieces.full_loss(self.cfg, params, w[:, :-1], w[:, 1:]),
                     self.eval_BxL1)
    return jnp.mean(losses) / jnp.log(2.0)

  def train_runs(self, runs: list[Run]) -> list:
    """Trains `runs` (one length, at most st['runs_per_call']) in one call, padded to
    runs_per_call with copies of the last run whose results are dropped (one compiled
    program per group); returns each run's curve [(step, bits/byte)]."""
    size = self.st['runs_per_call']
    return self._train_call(runs + [runs[-1]] * (size - len(runs)))[:len(runs)]

  def _train_call(self, runs: list[Run]) -> list:
    st, steps = self.st, runs[0].steps
    states = self.init(runs)
    arrays = (jnp.asarray([r.seed for r in runs]), jnp.asarray([r.lr for r in runs]),
              jnp.asarray([float(r.steps) for r in runs]))
    curves = [[] for _ in runs]
    t, chunk = 0, st['chunk']
    while t < steps:
      n = min(chunk, steps - t)
      states, _ = self._advance(states, arrays, n, jnp.asarray(t, jnp.int32))
      t += n
      if t % st['eval_every'] == 0 or t == steps:
        bpb = np.asarray(self._eval(states))
        for curve, v in zip(curves, bpb):
          curve.append((t, float(v)))
    return curves


def stats(values):
  v = np.asarray(values)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summary(record) -> list[dict]:
  """Per (phase, layout, optimizer, lr, steps, variant): bits/byte mean and spread at each
  horizon point of the curves, and the gap to synchronous training of the same setting."""
  groups = {}
  for r in record['runs']:
    key = (r['optimizer'], r['lr'], r['steps'], r['layout'], r['variant'])
    groups.setdefault(key, []).append(r)
  rows = []
  for (family, lr, steps, layout, variant), runs in groups.items():
    points = sorted({s for s, _ in runs[0]['curve']})
    horizons = [p for p in points if p in (1500, 6000, 20000) or p == steps]
    row = {'optimizer': family, 'lr': lr, 'steps': steps, 'layout': layout,
           'variant': variant, 'seeds': len(runs), 'at': {}}
    for h in horizons:
      row['at'][h] = stats([dict(r['curve'])[h] for r in runs])
    rows.append(row)
  for row in rows:
    sync = next((x for x in rows if x['variant'] == 'synchronous' and x['optimizer'] ==
                 row['optimizer'] and x['lr'] == row['lr'] and x['steps'] == row['steps']),
                None)
    row['gap'] = {h: 100 * (m / sync['at'][h][0] - 1) for h, (m, _) in row['at'].items()
                  if sync and h in sync['at']}
  return rows


def markdown(record) -> str:
  st, c = record['settings'], record['corpus']
  lines = [
      '# Convergence: synchronous training vs the Ouroboros pipeline vs its remedies', '',
      f'`{record["command"]}` — {record["date"]}, {record["device"]}, jax {record["jax"]}, '
      f'commit {record["git_commit"]}, {record.get("seconds", 0):.0f} s', '',
      f'Model: byte-level TransformerLM, {st["num_layers"]} layers, d_model {st["d_model"]}, '
      f'{st["num_heads"]} heads, d_ff {st["d_ff"]}, {record["params"]:,} parameters; batch '
      f'{st["batch"]} x {st["seq"]} bytes. Data: {c["name"]}, train {c["train_bytes"]:,} '
      f'bytes, validation {c["validation_bytes"]:,} (held-out bits/byte on '
      f'{st["eval_batches"] * st["batch"] * st["seq"]:,} of them); a {st["steps"]}-step run '
      f'makes {c["epochs_per_run"]:.2f} epochs. Recipe: Adam({st["recipe"]["b1"]}, '
      f'{st["recipe"]["b2"]}, {st["recipe"]["eps"]}), cosine from the lr to 0 over the run, '
      f'no warm-up, clip {st["recipe"]["clip"]} (Transformer-XL enwik8). Every run is the '
      "single-device form of the pipeline ('stored'; accel/pipeline/simulate.py, equal to "
      "the reference and the SPMD program to float32 rounding). Mean ± standard deviation "
      f'over {st["seeds"]} seeds (init and batches); gap: of the mean to the synchronous '
      'mean of the same optimizer, lr and budget.', '',
      f'Remedy settings: `{json.dumps(st["remedies"])}`; Muon lr {st["muon_lr"]} on the '
      'matrices, Adam at the recipe lr on the rest.', '']
  for layout, best in record.get('combinations', {}).items():
    lines.append(f'Combined ({layout}): {", ".join(best["names"])} — `{json.dumps(best["knobs"])}`')
  lines.append('')
  rows = summary(record)
  for (family, lr, steps) in sorted({(r['optimizer'], r['lr'], r['steps']) for r in rows}):
    sel = [r for r in rows if (r['optimizer'], r['lr'], r['steps']) == (family, lr, steps)]
    horizons = sorted({h for r in sel for h in r['at']})
    lines += [f'## {family}, lr {lr:g}, {steps} steps', '',
              '| layout | variant | ' + ' | '.join(f'bits/byte @{h} | gap @{h}'
                                                 for h in horizons) + ' |',
              '|---|---|' + '---|---|' * len(horizons)]
    for r in sorted(sel, key=lambda r: (r['variant'] != 'synchronous', r['layout'],
                                        r['variant'])):
      cells = []
      for h in horizons:
        m, s = r['at'].get(h, (math.nan, math.nan))
        g = r['gap'].get(h)
        cells.append(f'{m:.4f} ± {s:.4f} | ' + (f'{g:+.2f}%' if g is not None else ''))
      layout = 'any' if r['variant'].startswith('synchronous') else r['layout']
      lines.append(f'| {layout} | {r["variant"]} | ' + ' | '.join(cells) + ' |')
    lines.append('')
  for p, entries in record['phases'].items():
    for e in entries:
      lines.append(f'- phase {p}, {e["layout"]} {e["family"]}: {e["runs"]} runs x '
                   f'{e["steps"]} steps in {e["seconds"]:.1f} s (one call, compile included)')
  for s in record['skipped']:
    lines.append(f'- skipped (time limit): phase {s["phase"]}, {s["layout"]} {s["family"]}, '
                 f'{s["runs"]} runs ({", ".join(s["variants"])}), estimated '
                 f'{s["estimated_s"]:.0f} s')
  return '\n'.join(lines) + '\n'


def plot(record, path):
  """Mean held-out bits/byte curves (main budget, recipe lr), one panel per layout."""
  import matplotlib   # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt   # pylint: disable=g-import-not-at-top
  steps = record['settings']['steps']
  runs = [r for r in record['runs'] if r['steps'] == steps and r['lr'] == RECIPE['lr']]
  if not runs:
    return
  fig, axes = plt.subplots(1, len(LAYOUTS), figsize=(7 * len(LAYOUTS), 5), squeeze=False)
  for ax, layout in zip(axes[0], LAYOUTS):
    curves = {}
    for r in runs:
      if r['layout'] == layout or (r['variant'].startswith('synchronous')):
        curves.setdefault(f'{r["variant"]} ({r["optimizer"]})', []).append(r['curve'])
    for name, cs in sorted(curves.items()):
      x = [s for s, _ in cs[0]]
      y = np.mean([[v for _, v in c] for c in cs], axis=0)
      ax.plot(x, y, label=name, lw=2 if 'synchronous' in name or 'combined' in name else 1)
    ax.set_title(f'{layout} vs synchronous')
    ax.set_xlabel('step')
    ax.set_ylabel('held-out bits/byte')
    ax.set_ylim(top=min(ax.get_ylim()[1], 4.5))
    ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
