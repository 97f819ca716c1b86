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
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from accel import optim, programs
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
    self._init = jax.jit(jax.vmap(self._init_one))
    self._init_compiled = None
    self._lowered_ops = None
    self.programs, self.costs = {}, {}

  def init(self, runs: list[Run]):
    """The runs' states stacked (one jitted program: each run's init under vmap)."""
    return (self._init_compiled or self._init)(*self._init_args(runs))

  @staticmethod
  def _init_args(runs: list[Run]):
    knobs = {f.name: jnp.asarray([r.knobs.get(f.name, f.default) for r in runs],
                                 jnp.int32 if f.type in (int, 'int') else jnp.float32)
             for f in dataclasses.fields(Knobs)}
    return (jnp.asarray([r.seed for r in runs], jnp.int32), knobs,
            jnp.asarray([r.knobs.get('b1', RECIPE['b1']) for r in runs], jnp.float32))

  def _init_one(self, seed, knobs, b1):
    seq, batch = self.st['seq'], self.st['batch']
    dummy = {'inputs': jnp.zeros((batch, seq), jnp.int32),
             'targets': jnp.zeros((batch, seq), jnp.int32)}
    params = families.for_config(self.cfg).init_params(jax.random.key(seed),
                                                       jnp.zeros((1, seq), jnp.int32))
    s = self.sim.init(params, dummy, Knobs(**knobs))
    s['opt'] = [with_b1(o, b1) for o in s['opt']]
    s['opt_E'] = with_b1(s['opt_E'], b1)
    return s

  def _batch(self, seed, t):
    seq, batch = self.st['seq'], self.st['batch']
    key = jax.random.fold_in(jax.random.key(seed), t)
    starts = jax.random.randint(key, (batch,), 0, self.train.shape[0] - seq - 1)
    w = jax.vmap(lambda s: lax.dynamic_slice(self.train, (s,), (seq + 1,)))(starts)
    w = w.astype(jnp.int32)
    return {'inputs': w[:, :-1], 'targets': w[:, 1:]}

  def _steps(self, states, run_arrays, t):
    """Step t of every run (vmapped), at its lr's cosine value for step t."""
    seeds, lr, horizon = run_arrays

    def one(state, seed, lr_, horizon_):
      cosine = 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(t, horizon_) / horizon_))
      state = dict(state, knobs=dict(state['knobs'], lr_scale=lr_ * cosine))
      return self.sim.step(state, self._batch(seed, t))

    states, metrics = jax.vmap(one)(states, seeds, lr, horizon)
    return states, metrics['loss']

  def _chunk(self, states, run_arrays, chunk: int, t0):
    return lax.scan(lambda s, t: self._steps(s, run_arrays, t), states,
                    t0 + jnp.arange(chunk))

  def _eval_one(self, state):
    params = self.sim.model_params(state)
    losses = lax.map(lambda w: pieces.full_loss(self.cfg, params, w[:, :-1], w[:, 1:]),
                     self.eval_BxL1)
    return jnp.mean(losses) / jnp.log(2.0)

  # -------------------------------------------------------------------- programs, cost
  def _abstract(self, n_runs: int):
    runs = [Run('', '', 0, {}, 0.0, 1)] * n_runs
    states = jax.eval_shape(self._init, *self._init_args(runs))
    arrays = (jax.ShapeDtypeStruct((n_runs,), jnp.int32),
              jax.ShapeDtypeStruct((n_runs,), jnp.float32),
              jax.ShapeDtypeStruct((n_runs,), jnp.float32))
    return states, arrays

  def lowered_ops(self) -> int:
    """Instructions of the chunk program's StableHLO (lowering only, no compile): what the
    next group's compile time is scaled by (`Study`); lowered once per group."""
    if self._lowered_ops is None:
      states, arrays = self._abstract(self.st['runs_per_call'])
      text = self._advance.lower(states, arrays, self.st['chunk'],
                                 jax.ShapeDtypeStruct((), jnp.int32)).as_text()
      self._lowered_ops = text.count(' = ')
    return self._lowered_ops

  def compile(self, chunk: int) -> dict:
    """Compiles the programs of a call whose chunks are `chunk` steps (the chunk program
    and the evaluation, for runs_per_call runs) and returns their cost (`program_cost`) and
    compile seconds; cached per chunk length."""
    if chunk in self.programs:
      return self.costs[chunk]
    t0 = time.perf_counter()
    states, arrays = self._abstract(self.st['runs_per_call'])
    t_abstract = jax.ShapeDtypeStruct((), jnp.int32)
    step_flops = programs.lowered_flops(jax.jit(self._steps).lower(states, arrays, t_abstract))
    eval_flops = programs.lowered_flops(jax.jit(jax.vmap(self._eval_one)).lower(states))
    advance = self._advance.lower(states, arrays, chunk, t_abstract).compile()
    evaluate = self._eval.lower(states).compile()
    if self._init_compiled is None:
      dummy = [Run('', '', 0, {}, 0.0, 1)] * self.st['runs_per_call']
      self._init_compiled = self._init.lower(*self._init_args(dummy)).compile()
    self.programs[chunk] = (advance, evaluate)
    n_eval = self.st['eval_batches']
    self.costs[chunk] = dict(program_cost(advance, step_flops, chunk),
                             compile_s=time.perf_counter() - t0,
                             eval=dict(program_cost(evaluate, eval_flops / n_eval, n_eval),
                                       iterations=n_eval))
    return self.costs[chunk]

  def train_runs(self, runs: list[Run], deadline: float = math.inf):
    """Trains `runs` (one length, at most st['runs_per_call']) in one call, padded to
    runs_per_call with copies of the last run whose results are dropped (one compiled
    program per group). Returns (each run's curve [(step, bits/byte)], timing), or
    (None, timing) where the call stopped because its measured pace would end it after
    `deadline` (time.perf_counter()); timing: seconds of the first and of later chunks,
    and of the evaluations."""
    size = self.st['runs_per_call']
    curves, timing = self._train_call(runs + [runs[-1]] * (size - len(runs)), deadline)
    return (curves[:len(runs)] if curves is not None else None), timing

  def _train_call(self, runs: list[Run], deadline: float):
    st, steps, chunk = self.st, runs[0].steps, self.st['chunk']
    if steps % chunk or chunk % st['eval_every'] and st['eval_every'] % chunk:
      raise ValueError(f'steps {steps}, chunk {chunk} and eval_every {st["eval_every"]} '
                       'must divide one another')
    advance, evaluate = self.programs[chunk]
    states = self.init(runs)
    arrays = (jnp.asarray([r.seed for r in runs], jnp.int32),
              jnp.asarray([r.lr for r in runs], jnp.float32),
              jnp.asarray([float(r.steps) for r in runs], jnp.float32))
    curves = [[] for _ in runs]
    timing = {'chunks_s': [], 'evals_s': []}
    t = 0
    while t < steps:
      t0 = time.perf_counter()
      states, losses = advance(states, arrays, jnp.asarray(t, jnp.int32))
      losses.block_until_ready()   # one host round-trip per chunk
      timing['chunks_s'].append(time.perf_counter() - t0)
      t += chunk
      if t % st['eval_every'] == 0 or t == steps:
        t0 = time.perf_counter()
        bpb = np.asarray(evaluate(states))
        timing['evals_s'].append(time.perf_counter() - t0)
        for curve, v in zip(curves, bpb):
          curve.append((t, float(v)))
      left = (steps - t) // chunk
      evals_left = sum(1 for s in range(t + chunk, steps + 1, chunk)
                       if s % st['eval_every'] == 0 or s == steps)
      pace = max(timing['chunks_s'][1:] or timing['chunks_s'])
      eval_pace = max(timing['evals_s'] or [0.0])
      if t < steps and time.perf_counter() + left * pace + evals_left * eval_pace > deadline:
        timing['cut_at_step'] = t
        return None, timing
    return curves, timing


# The H200 constants of `estimate_seconds`, chosen before the study ran (README of
# results/pipeline_staleness_gpu*.md: how each compares with what the run measured).
H200 = {
    # TF32 matmuls of this size (d_model 128, 4096 rows per run, runs batched by vmap):
    # a quarter of the ~160 TFLOP/s the 8 x d512 single-device step reaches
    # (results/bench_pipeline_gpu_fp32_b16.md: 572k tokens/s at ~2.3 TFLOP per step).
    'flops_per_s': 40e12,
    # Half of the 4.8 TB/s HBM peak (elementwise kernels: Adam, the rings, LayerNorms).
    'bytes_per_s': 2.4e12,
    # Per kernel: the stdloss step's 145 extra tiny kernels cost 0.61 ms of step time on
    # the H200 (results/stdloss_gpu_profile.md), 4.2 us each.
    'kernel_s': 4e-6,
    # Per chunk: the host dispatches the chunk program and waits for its losses.
    'round_trip_s': 1e-3,
}


def program_cost(compiled, lowered_step_flops: float, chunk: int) -> dict:
  """What one step of a compiled chunk program costs by XLA's analysis: FLOPs and bytes
  accessed, and the kernels it launches per step (`kernels_per_step`). XLA's cost analysis
  counts a while loop's body once; where it counts all `chunk` iterations (its FLOPs are
  far above the one-step program's, `lowered_step_flops`) they are divided by chunk."""
  analysis = _analysis(compiled.cost_analysis())
  flops, nbytes = float(analysis.get('flops', 0.0)), float(analysis.get('bytes accessed', 0.0))
  per = chunk if lowered_step_flops and flops > 1.5 * lowered_step_flops else 1
  return {'flops_per_step': flops / per, 'bytes_per_step': nbytes / per,
          'lowered_flops_per_step': lowered_step_flops,
          'kernels_per_step': kernels_per_step(compiled.as_text())}


def _analysis(analysis) -> dict:
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return analysis or {}


_KERNEL_OPS = ('fusion', 'custom-call', 'copy', 'copy-start', 'dynamic-update-slice',
               'dynamic-slice', 'scatter', 'gather', 'sort', 'dot', 'convolution', 'reduce',
               'concatenate', 'transpose', 'select', 'add', 'multiply', 'broadcast')


def kernels_per_step(hlo_text: str) -> int:
  """Kernel launches of one iteration of a compiled program's while loops: the
  instructions of the computations a while loop runs as its body (and those they call),
  not inside a fusion, whose opcode launches work (a fusion, a library call, a copy, an
  unfused op). On GPU every elementwise op is inside a fusion, so this counts the fusions
  and library calls the step launches; on CPU it is a proxy of that."""
  bodies, blocks, name = set(), {}, None
  for line in re.sub(r'/\*.*?\*/', '', hlo_text).splitlines():   # /*index=5*/ comments
    head = re.match(r'\s*(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$', line)
    if head and '=' not in line.split('{')[0]:
      name = head.group(2)
      blocks[name] = []
      continue
    if name is not None and line.strip() == '}':
      name = None
      continue
    if name is not None:
      blocks[name].append(line)
      bodies.update(re.findall(r'body=%?([\w.\-]+)', line))
  called = {}
  for comp, lines in blocks.items():
    called[comp] = set()
    for line in lines:
      if ' fusion(' not in line:
        called[comp].update(re.findall(r'(?:to_apply|calls|branch_computations)=\{?%?([\w.\-]+)',
                                       line))
  seen, todo, count = set(), list(bodies), 0
  while todo:
    comp = todo.pop()
    if comp in seen or comp not in blocks:
      continue
    seen.add(comp)
    todo.extend(called[comp])
    for line in blocks[comp]:
      op = re.search(r'=\s*[^=]*?\s([a-z][a-z\-]*)\(', line)
      if op and op.group(1) in _KERNEL_OPS:
        count += 1
  return count


def estimate_seconds(cost: dict, steps: int, chunk: int, evals: int,
                     device: dict = H200) -> float:
  """Seconds of one call of `steps` steps from the programs' cost, compile excluded:
    steps * (max(FLOPs / R, bytes / BW) + kernels * t_kernel)    per step
    + (steps / chunk) * t_round_trip + evals * (the same for one evaluation)
  A small model underuses the GPU, so the per-kernel term (launch and tail of kernels
  that each do little) is added to the compute, not overlapped with it."""
  def per_step(c):   # an evaluation: its loop's iterations (eval batches) per call
    compute = max(c['flops_per_step'] / device['flops_per_s'],
                  c['bytes_per_step'] / device['bytes_per_s'])
    return c.get('iterations', 1) * (compute + c['kernels_per_step'] * device['kernel_s'])
  return (steps * per_step(cost) + steps / chunk * device['round_trip_s']
          + evals * (per_step(cost['eval']) + device['round_trip_s']))


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
  lines += ['## Calls', '',
            '| phase | layout | optimizer | runs x steps | compile s | training s | '
            'H200 model estimate s | s per chunk | s per evaluation | GFLOP per step | '
            'kernels per step |',
            '|---|---|---|---|---|---|---|---|---|---|---|']
  for p, entries in record['phases'].items():
    for e in entries:
      cost = e.get('cost', {})
      compile_s = e.get('compile_s')
      lines.append(
          f'| {p} | {e["layout"]} | {e["family"]} | {e["runs"]} x {e["steps"]} | '
          + (f'{compile_s:.1f}' if compile_s is not None else '-') + ' | '
          f'{e["seconds"]:.1f} | {e.get("estimated_s", math.nan):.1f} | '
          f'{e.get("chunk_s", math.nan):.3f} ({e.get("chunk", "?")} steps) | '
          f'{e.get("eval_s", math.nan):.3f} | '
          f'{cost.get("flops_per_step", math.nan) / 1e9:.1f} | '
          f'{cost.get("kernels_per_step", "-")} |')
  lines.append('')
  lines.append('Model estimate: `accel.pipeline.study.estimate_seconds` from the compiled '
               'program\'s cost (FLOPs and bytes per step by XLA\'s cost analysis, kernels '
               'per step counted in its HLO) and the constants `study.H200`; training s: '
               'measured, the runs\' init and evaluations included, compile excluded.')
  lines.append('')
  for c in record.get('calls', []):
    lines.append(f'- call at commit {c["git_commit"]}, {c["date"]}: phases '
                 f'{",".join(c["phases"])}, time limit {c["time_limit"]:.0f} s, '
                 + (f'{c["seconds"]:.0f} s' if 'seconds' in c else 'running'))
  for s in record['skipped']:
    what = (f'{s["runs"]} runs x {s["steps"]} steps ({", ".join(s["variants"])}), '
            f'{s["estimated_s"]:.0f} s' if 'runs' in s else '')
    lines.append(f'- not run in the last call: phase {s["phase"]}, {s["layout"]}'
                 f'{" " + s["family"] if "family" in s else ""}: {s["reason"]}'
                 + (f'; {what}' if what else '')
                 + (f' (stopped at step {s["cut_at_step"]})' if 'cut_at_step' in s else ''))
  return '\n'.join(lines) + '\n'


def plot(record, path):
  """Mean held-out bits/byte curves of the main budget, one column per layout, to `path`:
  top, every variant at the recipe's lr; bottom, synchronous, plain and combined training
  at the other (optimizer, lr) groups (the synchronous best lr, Muon). False where there is
  nothing to plot yet."""
  import matplotlib   # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt   # pylint: disable=g-import-not-at-top
  steps = record['settings']['steps']
  main = [r for r in record['runs'] if r['steps'] == steps]
  recipe = [r for r in main if r['lr'] == RECIPE['lr'] and r['optimizer'] == 'adam']
  if not recipe:
    return False
  others = sorted({(r['optimizer'], r['lr']) for r in main
                   if r['variant'] in ('plain pipeline', 'combined')} - {('adam', RECIPE['lr'])})
  synchronous_layouts = {}
  for r in main:
    if r['variant'] == 'synchronous':
      synchronous_layouts.setdefault((r['optimizer'], r['lr']), set()).add(r['layout'])
  rows = 2 if others else 1
  fig, axes = plt.subplots(rows, len(LAYOUTS), figsize=(7 * len(LAYOUTS), 5 * rows),
                           squeeze=False)

  def draw(ax, curves, styles):
    for name, cs in sorted(curves.items()):
      x = [s for s, _ in cs[0]]
      y = np.mean([[v for _, v in c] for c in cs], axis=0)
      ax.plot(x, y, label=name, **styles(name))
    ax.set_xlabel('step')
    ax.set_ylabel('held-out bits/byte')
    low, high = ax.get_ylim()
    if low < 4.5 < high:   # the early plateau (~4.4, the unigram's level) off the scale
      ax.set_ylim(low, 4.5)
    ax.legend(fontsize=7)

  for col, layout in enumerate(LAYOUTS):
    curves = {}
    for r in recipe:
      if r['layout'] == layout or r['variant'].startswith('synchronous'):
        curves.setdefault(f'{r["variant"]} ({r["optimizer"]})', []).append(r['curve'])
    draw(axes[0][col], curves, lambda n: {'lw': 2 if 'synchronous' in n or 'combined' in n
                                          else 1})
    axes[0][col].set_title(f'{layout} vs synchronous, adam lr {RECIPE["lr"]:g}')
    if not others:
      continue
    curves, group_of = {}, {}
    for r in main:
      group = (r['optimizer'], r['lr'])
      # a group's synchronous run stands for every layout that has none of its own
      own = r['layout'] == layout or (r['variant'] == 'synchronous' and
                                      layout not in synchronous_layouts[group])
      if group in others and own and r['variant'] in ('plain pipeline', 'combined',
                                                      'synchronous'):
        label = f'{r["optimizer"]} lr {r["lr"]:g}: {r["variant"]}'
        curves.setdefault(label, []).append(r['curve'])
        group_of[label] = group
    colours = {g: f'C{i}' for i, g in enumerate(others)}
    draw(axes[1][col], curves, lambda n: {'color': colours[group_of[n]],
                                          'lw': 2 if 'synchronous' in n else 1.2,
                                          'ls': '--' if 'plain' in n else '-'})
    axes[1][col].set_title(f'{layout}: synchronous (thick), combined (solid), plain (dashed)')
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fig.savefig(path, dpi=100, format='png')
  plt.close(fig)
  return True
