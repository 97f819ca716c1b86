"""The SPMD Ouroboros program against the single-device reference, on simulated devices.

Runs in a subprocess with 8 simulated CPU devices (the pytest process already started jax
with one), started when the tests are collected so that it runs beside the others. Each
case trains 2K+1 iterations (past the warm-up of every module, so 'stored' and 'recompute'
have diverged; with weight prediction 4K, `_iterations`) on a tiny model
and compares the SPMD parameters and loss with `Reference` after every iteration. They
agree to float32 rounding, not bitwise: the SPMD program is compiled as one XLA computation
(other fusion, other summation order), and the tied table's two gradient parts are added in
another order. Tolerance: 2e-6 absolute
on parameters of size ~0.02-1.

Models: 'lm' the spine's TransformerLM; 'txl' / 'txl_preln' Transformer-XL (PostLN / PreLN,
memory 4 for segments of 8), whose modules keep the memory of their layers in the pipeline
state: any slip in which memory a forward or a delayed backward reads shows here.

Default cases (8 compilations) cover for 'lm' K = 2, 3, 4, tied and untied, 'stored' and
'recompute', data x stage meshes (2 x 3 and 2 x 4 = all 8 devices), and for 'txl' K = 2
tied 'stored' (PostLN, one stage holding both modules' memory) and K = 3 untied
'recompute' (PreLN, 2 x 3 mesh); dropout (data axis 1 only: with more data shards each
draws its own masks, the reference has one) and the global-norm clip (its value is below
the gradient norm at most filled iterations, so it scales them; the norm itself is
compared too); weight prediction ('stored', `PREDICTION`): 'lm' K=4 untied on 2 x 4, s = 2,
and K=4 tied ring with dropout and clip, s = 1. ACCEL_PIPELINE_FULL=1 runs all 12 'lm' and
8 'txl' (K, layout, backward) combinations with and without dropout and clip, plus 'lm' on
2 x 4 and 4 x 2 (tied ring K=3) meshes, 'txl' on two 2 x S meshes, and weight prediction
also for 'lm' K=2 untied, K=3 tied ring and 'txl' K=3 untied. Two cases read the compiled text of the step
they ran: one checks for conditionals, one for copies of the 'stored' history ring.
"""
import functools
import json
import os
import sys

import pytest

from tests import background
from tests.helpers import ROOT

CLIP = 0.5
# (model, K, tied ring, backward weights, data axis, dropout rate, clip norm, weight
# prediction s[, remedies: 'key=value,...' of accel.pipeline.remedies, and optimizer=muon])
# Weight prediction: shapes, dropout and clip as two s = 0 cases below, whose reference
# compilations they share (`_TX`); only their SPMD step compiles anew.
PREDICTION = [('lm', 4, False, 'stored', 2, 0.0, 0.0, 2.0),
              ('lm', 4, True, 'stored', 1, 0.1, CLIP, 1.0)]
DEFAULT = [('lm', 2, True, 'stored', 1, 0.1, CLIP, 0.0),
           ('lm', 3, False, 'recompute', 2, 0.0, CLIP, 0.0),
           ('lm', 4, True, 'recompute', 1, 0.1, CLIP, 0.0),
           ('lm', 4, False, 'stored', 2, 0.0, 0.0, 0.0),   # data x stage = 2 x 4, 8 devices
           ('txl', 2, True, 'stored', 1, 0.1, CLIP, 0.0),
           ('txl_preln', 3, False, 'recompute', 2, 0.0, CLIP, 0.0)] + PREDICTION
FULL = [(model, k, tied, bw, 1, rate, clip, 0.0)
        for model, ks in (('lm', (2, 3, 4)), ('txl', (2, 3))) for k in ks
        for tied in (True, False) for bw in ('stored', 'recompute')
        for rate, clip in ((0.0, 0.0), (0.1, CLIP))] + [
            ('lm', 4, False, 'stored', 2, 0.0, CLIP, 0.0),
            ('lm', 3, True, 'stored', 4, 0.0, 0.0, 0.0),
            ('txl', 3, True, 'recompute', 2, 0.0, CLIP, 0.0),
            ('txl_preln', 3, False, 'stored', 2, 0.0, 0.0, 0.0),
            ('lm', 2, False, 'stored', 2, 0.0, CLIP, 2.0), ('lm', 3, True, 'stored', 1, 0.1, 0.0, 1.0),
            ('txl', 3, False, 'stored', 1, 0.1, CLIP, 2.0)] + PREDICTION
# The remedies (accel/pipeline/remedies.py), all together: on the shapes of the K=2 tied
# ring case above (its reference compilations shared), and with weight prediction on the
# K=3 tied ring; the synchronous warm-up is its own program, the others act within the
# pipelined one. Muon (per layer: its Newton-Schulz orthogonalises each layer's matrices,
# as the reference's per-module optax.contrib.muon does over the layer axis) on the 2 x 2
# untied K=2 mesh. Each is also run by `simulate.Simulated` (the study's single-device
# step), which must match the reference as closely, and the reference without them, from
# which it must differ. Each remedy's arithmetic alone: test_pipeline_reference.py.
REMEDIES = [('lm', 2, True, 'stored', 1, 0.1, CLIP, 0.0,
             'sync_warmup_steps=3,delay_compensation=50,pipemare_steps=6,error_feedback=1,'
             'nesterov_momentum=0.9'),
            ('lm', 3, True, 'stored', 1, 0.0, CLIP, 1.0, 'sync_warmup_steps=2,'
             'delay_compensation=50,pipemare_steps=6,error_feedback=0.5,nesterov_momentum=0.5'),
            ('lm', 2, False, 'stored', 2, 0.0, 0.0, 0.0, 'optimizer=muon')]
CASES = (FULL if os.environ.get('ACCEL_PIPELINE_FULL') else DEFAULT) + REMEDIES
# The case whose compiled step is checked for conditionals (the stage program is the same
# ops on every stage, roles selected by masks: spmd's docstring). In DEFAULT and FULL.
HLO_CASE = ('lm', 4, True, 'recompute', 1, 0.1, CLIP, 0.0)
# The case whose compiled step is checked for copies of a whole 'stored' history ring
# (stage 0 of K=2 reads the slot it then overwrites: spmd's docstring); one device, so
# local shapes are the global ones. In DEFAULT and FULL.
RING_CASE = ('lm', 2, True, 'stored', 1, 0.1, CLIP, 0.0)


def _iterations(k, prediction, remedies=''):
  """2K+1, past every module's warm-up; with weight prediction 4K, so that module 0's
  first predicted forward (iteration 2K-1, after its first update) is back-propagated
  (iteration 4K-3) and applied; after a synchronous warm-up of N iterations N more."""
  return (4 * k if prediction else 2 * k + 1) + _remedies(remedies).get('sync_warmup_steps', 0)


def _remedies(text):
  """'key=value,...' -> {key: number} (optimizer: its name)."""
  out = {}
  for item in filter(None, text.split(',')):
    key, value = item.split('=')
    out[key] = value if key == 'optimizer' else (int(value) if key.endswith('steps')
                                                 else float(value))
  return out


def _model(name, num_layers, rate):
  """(cfg, params) of a tiny model of the family `name` with dropout rate `rate`."""
  import jax
  import jax.numpy as jnp
  from accel.models.transformer import TransformerConfig, TransformerLM
  from accel.models.transformer_xl import TransformerXL, TransformerXLConfig
  if name == 'lm':
    cfg = TransformerConfig(vocab_size=32, num_layers=num_layers, d_model=16, num_heads=2,
                            d_ff=32, max_len=8, scan_layers=True, dropout_rate=rate)
    model = TransformerLM(cfg)
  else:
    cfg = TransformerXLConfig(vocab_size=32, num_layers=num_layers, d_model=16, num_heads=2,
                              d_ff=32, mem_len=4, pre_ln=name == 'txl_preln',
                              dropout_rate=rate)
    model = TransformerXL(cfg)
  return cfg, jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']


def _ring_copies(hlo, state):
  """Ops of a compiled one-device step that copy a whole 'stored' history ring (an HLO
  copy or a fusion named for one), among the rings whose shape no other state array has."""
  import re
  import jax
  hlo_shape = lambda v: ({'float32': 'f32', 'int32': 's32', 'uint32': 'u32'}.get(
      str(v.dtype), str(v.dtype)) + str(list(v.shape)).replace(' ', ''))
  others = {hlo_shape(v) for key, tree in state.items() if key != 'hist'
            for v in jax.tree_util.tree_leaves(tree)}
  rings = {hlo_shape(v) for v in jax.tree_util.tree_leaves(state['hist'])} - others
  assert rings
  count = 0
  for line in hlo.splitlines():
    m = re.match(r'\s*(?:ROOT )?%(\S+) = (\S+?)\{[^}]*\} (\S+?)\(', line)
    count += bool(m and m.group(2) in rings and 'copy' in m.group(1) + m.group(3))
  return count


@functools.cache
def _tx(name='adam'):
  """One optimizer object per name for every case: the reference's jits take it as a
  static argument, so cases of the same shapes share their compilations."""
  import optax
  if name == 'muon':
    from accel import optim
    return optim.muon(1e-2, 1e-2, beta=0.95, b1=0.9, b2=0.999, eps=1e-4)
  return optax.adam(1e-2, eps=1e-4)   # see test_pipeline_reference._adam


@functools.cache
def _simulated(model, k, tied, rate, clip, optimizer):
  """One `Simulated` and its jitted step per shape (its knobs are state: cases share it)."""
  import jax
  from accel.pipeline.layout import Layout
  from accel.pipeline.simulate import Simulated
  layout = Layout(2 * (k - 1) if tied else k, k, tied)
  sim = Simulated(_model(model, layout.num_layers, rate)[0], layout, _tx(optimizer),
                  rng=jax.random.key(7), clip_norm=clip)
  return sim, jax.jit(sim.step)


def _run_case(model, k, tied, bw, data, rate, clip, prediction, remedies=''):
  """Returns the worst parameter / loss / gradient-norm difference over `_iterations`
  and how many iterations the clip scaled; with remedies also the worst parameter
  difference of `simulate.Simulated` to the reference and the largest of the reference
  to the same case without them."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from accel.pipeline.layout import Layout
  from accel.pipeline.reference import Reference
  from accel.pipeline.simulate import Knobs
  from accel.pipeline.spmd import Pipeline, make_mesh

  on = _remedies(remedies)
  name = on.pop('optimizer', 'adam')
  # Untied: one block per module; tied ring: two per stage (module 0 and K-1 one each).
  layout = Layout(2 * (k - 1) if tied else k, k, tied)
  cfg, params = _model(model, layout.num_layers, rate)
  rng = jax.random.key(7)
  tx = _tx(name)
  devices = jax.devices()[:data * layout.num_stages]
  pipe = Pipeline(cfg, layout, tx, bw, make_mesh(data, layout.num_stages, devices), rng=rng,
                  clip_norm=clip, weight_prediction=prediction, **on)
  batch_size = 2 * data
  state = pipe.init(params, batch_size, 8)
  ref = Reference(cfg, layout, tx, bw, rng=rng, clip_norm=clip, weight_prediction=prediction,
                  **on)
  ref_state = ref.init(params, batch_size)
  others = {}
  if remedies:   # the study's step, and the reference without the remedies
    sim, sim_step = _simulated(model, k, tied, rate, clip, name)
    others['sim'] = (sim, sim_step, None)
    plain = Reference(cfg, layout, _tx(), bw, rng=rng, clip_norm=clip)
    others['plain'] = (plain, plain.step, plain.init(params, batch_size))
  data_rng = np.random.default_rng(1)
  worst = {'param': 0.0, 'loss': 0.0, 'grad_norm': 0.0, 'valid_losses': 0, 'clipped': 0,
           'sim': 0.0, 'plain': 0.0}
  for t in range(_iterations(k, prediction, remedies)):
    seq = data_rng.integers(0, 32, (batch_size, 9)).astype(np.int32)
    batch = {'inputs': jnp.asarray(seq[:, :-1]), 'targets': jnp.asarray(seq[:, 1:])}
    state, m = pipe.step(state, batch, t)
    ref_state, rm = ref.step(ref_state, batch)
    for key, (other, step, other_state) in others.items():
      if other_state is None:
        other_state = other.init(params, batch, Knobs(weight_prediction=prediction, **on))
      other_state, _ = step(other_state, batch)
      others[key] = (other, step, other_state)
      diffs = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()),
                                     other.model_params(other_state), ref.model_params(ref_state))
      worst[key] = max(worst[key], *jax.tree_util.tree_leaves(diffs))
    assert bool(m['loss_valid']) == (rm['loss'] is not None)
    if rm['loss'] is not None:
      worst['loss'] = max(worst['loss'], abs(float(m['loss']) - float(rm['loss'])))
      worst['valid_losses'] += 1
    worst['grad_norm'] = max(worst['grad_norm'],
                             abs(float(m['grad_norm']) - float(rm['grad_norm'])))
    worst['clipped'] += int(clip > 0 and float(rm['grad_norm']) > clip)
    diffs = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()),
                                   pipe.model_params(state), ref.model_params(ref_state))
    worst['param'] = max(worst['param'], *jax.tree_util.tree_leaves(diffs))
  case = (model, k, tied, bw, data, rate, clip, prediction)
  if remedies:
    return worst
  # The compiled step's text: the program the loop ran (the persistent compilation cache,
  # `results`, returns it without compiling it again).
  if case in (HLO_CASE, RING_CASE):
    from jax.sharding import NamedSharding, PartitionSpec as P
    batch = jax.device_put(batch, NamedSharding(pipe.mesh, P('data')))
    hlo = jax.jit(pipe.step_fn, donate_argnums=0).lower(state, batch).compile().as_text()
    if case == HLO_CASE:
      worst['conditionals'] = hlo.count(' conditional(')
    if case == RING_CASE:
      worst['ring_copies'] = _ring_copies(hlo, state)
  return worst


def _cases_job():
  """All cases in one subprocess of 8 CPU devices. XLA compiles with its backend (LLVM)
  optimizations off: the cases check what the programs compute and the compiled HLO (its
  conditionals and copies), not their speed; and a persistent compilation cache returns the
  programs whose text two checks read."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8 '
                       '--xla_backend_optimization_level=0',
             JAX_COMPILATION_CACHE_DIR=background.folder('spmd_jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  return background.Job([sys.executable, os.path.abspath(__file__), json.dumps(CASES)],
                        env, ROOT, timeout=1800)


def background_jobs():
  return {'test_spmd_matches_reference': _cases_job()}


@pytest.fixture(scope='module')
def results():
  """{case: worst differences} of the subprocess."""
  proc = background.result('test_spmd_matches_reference', _cases_job)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = {}
  for line in proc.stdout.splitlines():
    if line.startswith('CASE '):
      case, worst = json.loads(line[5:])
      out[tuple(case)] = worst
  return out


def _case_id(c):
  return (f'{c[0]}-K{c[1]}-{"tied" if c[2] else "untied"}-{c[3]}-data{c[4]}'
          f'{f"-dropout{c[5]}" if c[5] else ""}{f"-clip{c[6]}" if c[6] else ""}'
          f'{f"-prediction{c[7]}" if c[7] else ""}{f"-{c[8]}" if len(c) > 8 else ""}')


@pytest.mark.parametrize('case', CASES, ids=_case_id)
def test_spmd_matches_reference(results, case):
  worst = results[tuple(case)]
  k, clip, remedies = case[1], case[6], case[8] if len(case) > 8 else ''
  iterations = _iterations(k, case[7], remedies)
  # losses from iteration K-1 on; with a warm-up in every warm-up iteration, then from N+K-1
  assert worst['valid_losses'] == iterations - (k - 1), worst
  assert worst['loss'] < 1e-5, worst
  assert worst['grad_norm'] < 1e-5, worst
  assert worst['param'] < 2e-6, worst
  if remedies:
    assert worst['sim'] < 2e-6, worst
    assert worst['plain'] > 1e-4, worst    # the remedies change what is trained
  if tuple(case) == HLO_CASE:
    # A conditional makes XLA:GPU copy the branch index to the host and wait for it.
    assert worst['conditionals'] == 0, worst
  if tuple(case) == RING_CASE:
    # Written in place: the step reads the slot before it writes it (`spmd.ring.after`).
    assert worst['ring_copies'] == 0, worst
  if clip:
    assert worst['clipped'] >= iterations - k, worst   # all but one filled iteration


if __name__ == '__main__':
  for case in json.loads(sys.argv[1]):
    print('CASE ' + json.dumps([case, _run_case(*case)]), flush=True)
