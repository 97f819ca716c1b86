"""The convergence study's cost and time model (accel/pipeline/study.py): what one step of a
scanned program costs by XLA's analysis, its kernels, and the seconds estimated from them."""
import jax
import jax.numpy as jnp
import pytest

from accel import programs
from accel.pipeline import study


def _scan(x, n):
  def body(c, _):
    return jnp.tanh(c @ c) * 0.5, None
  return jax.lax.scan(body, x, None, length=n)[0]


@pytest.fixture(scope='module')
def scanned():
  """A scan of 4 steps (dot, then tanh and scale) and the one-step program's FLOPs."""
  x = jnp.ones((32, 32))
  compiled = jax.jit(_scan, static_argnums=1).lower(x, 4).compile()
  step_flops = programs.lowered_flops(jax.jit(lambda c: jnp.tanh(c @ c) * 0.5).lower(x))
  return compiled, step_flops


def test_program_cost_is_per_step(scanned):
  compiled, step_flops = scanned
  cost = study.program_cost(compiled, step_flops, chunk=4)
  # One step's FLOPs (the dot's 2 * 32^3 and the elementwise ops), not four steps'.
  assert 2 * 32 ** 3 <= cost['flops_per_step'] < 1.5 * step_flops
  assert cost['bytes_per_step'] > 0
  # The body launches the dot and the fused tanh * 0.5 (CPU: at least those two ops, not
  # the loop's counter, tuples or parameters).
  assert 2 <= cost['kernels_per_step'] <= 6


def test_kernels_per_step_reads_loop_bodies_only():
  hlo = '\n'.join([
      '%fused_computation (p: f32[4]) -> f32[4] {',
      '  %p = f32[4]{0} parameter(0)',
      '  ROOT %t = f32[4]{0} tanh(f32[4]{0} %p)',
      '}',
      '%body (s: (s32[], f32[4], /*index=2*/f32[4])) -> (s32[], f32[4]) {',
      '  %s = (s32[], f32[4]{0}) parameter(0)',
      '  %x = f32[4]{0} get-tuple-element((s32[], f32[4]{0}) %s), index=1',
      '  %f = f32[4]{0} fusion(f32[4]{0} %x), kind=kLoop, calls=%fused_computation',
      '  %g = f32[4]{0} custom-call(f32[4]{0} %f), custom_call_target="x"',
      '  %c = f32[4]{0} copy(f32[4]{0} %g)',
      '  ROOT %r = (s32[], f32[4]{0}) tuple(s32[] %i, f32[4]{0} %c)',
      '}',
      '%cond (s: (s32[], f32[4])) -> pred[] {',
      '  ROOT %lt = pred[] compare(s32[] %a, s32[] %b), direction=LT',
      '}',
      'ENTRY %main (a: f32[4]) -> f32[4] {',
      '  %e = f32[4]{0} fusion(f32[4]{0} %a), kind=kLoop, calls=%fused_computation',
      '  %w = (s32[], f32[4]{0}) while((s32[], f32[4]{0}) %t0), condition=%cond, body=%body',
      '}'])
  # The body's fusion, library call and copy; not the entry's fusion (once per call), the
  # condition, nor the ops inside the fused computation.
  assert study.kernels_per_step(hlo) == 3


def test_estimate_seconds():
  cost = {'flops_per_step': 4e9, 'bytes_per_step': 1e9, 'kernels_per_step': 100,
          'eval': {'flops_per_step': 1e9, 'bytes_per_step': 0.0, 'kernels_per_step': 10,
                   'iterations': 4}}
  device = {'flops_per_s': 1e12, 'bytes_per_s': 1e12, 'kernel_s': 1e-5, 'round_trip_s': 0.1}
  # 10 steps of max(4 ms, 1 ms) + 1 ms of kernels, 2 round trips, one evaluation of 4
  # iterations of (1 ms + 0.1 ms) and its round trip.
  want = 10 * 5e-3 + 2 * 0.1 + (4 * 1.1e-3 + 0.1)
  assert study.estimate_seconds(cost, 10, 5, 1, device) == pytest.approx(want)


def test_resume_adds_remedies_and_packs_the_missing_runs():
  """--resume continues a study whose remedies are a subset of the current ones (each
  unchanged), and the runs a call still lacks join the next call of their group: the
  variants added to a screen that ran run first, several seeds per call."""
  from experiments.pipeline_staleness import Study, resumable
  from accel.pipeline.study import Run
  old = {'steps': 6000, 'remedies': {'a': {'x': 1}}}
  assert resumable(old, {'steps': 6000, 'remedies': {'a': {'x': 1}, 'n': {'y': 0.9}}})
  assert not resumable(old, {'steps': 6000, 'remedies': {'a': {'x': 2}, 'n': {'y': 0.9}}})
  assert not resumable(old, {'steps': 3000, 'remedies': {'a': {'x': 1}}})
  study = Study.__new__(Study)
  study.st = {'runs_per_call': 3}
  runs = {(layout, seed): [Run(v, layout, seed, {}, 1e-3, 10) for v in 'abcd']
          for seed in (0, 1, 2) for layout in ('K2', 'K3')}
  study.record = {'runs': [{'variant': r.variant, 'layout': r.layout, 'optimizer': 'adam',
                            'seed': r.seed, 'lr': r.lr, 'steps': r.steps}
                           for (layout, seed), rs in runs.items() if seed < 2
                           for r in rs if r.variant != 'd']}
  calls = []
  study._call = lambda phase, layout, family, part: calls.append(
      (layout, [(r.variant, r.seed) for r in part]))
  study.execute('screen', [(layout, 'adam', runs[layout, seed])
                           for seed in (0, 1, 2) for layout in ('K2', 'K3')])
  assert calls == [('K2', [('d', 0), ('d', 1), ('a', 2)]),     # the layouts alternate
                   ('K3', [('d', 0), ('d', 1), ('a', 2)]),
                   ('K2', [('b', 2), ('c', 2), ('d', 2)]),
                   ('K3', [('b', 2), ('c', 2), ('d', 2)])]
