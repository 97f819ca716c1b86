"""Variants in child processes (accel.benchmarking.ProcessVariant / serve) timed in the same
interleaved rounds as in-process ones; a child that fails is reported, not fatal."""
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from accel import benchmarking

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = ('import sys, time\n'
         'from accel.benchmarking import serve\n'
         'fail_after = int(sys.argv[1])\n'
         'calls = []\n'
         'def run(n):\n'
         '  calls.append(n)\n'
         '  if len(calls) > fail_after: raise SystemExit("child gave up")\n'
         '  time.sleep(0.001 * n)\n'
         '  return 0.001\n'
         'print("a stray line the parent skips", flush=True)\n'
         'serve(run, {"compile_s": 1.5, "loss": 2.0}, {"echo": lambda word: [word, len(calls)]})\n')


def _child(tmp_path, name, fail_after=100):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  return benchmarking.ProcessVariant([sys.executable, '-c', CHILD, str(fail_after)], env=env,
                                     log_path=str(tmp_path / f'{name}.log'))


def test_children_are_timed_in_the_rounds_and_failures_reported(tmp_path):
  good, bad = _child(tmp_path, 'good'), _child(tmp_path, 'bad', fail_after=1)
  assert good.wait_ready(120) == {'compile_s': 1.5, 'loss': 2.0}
  bad.wait_ready(120)
  assert good.run(4) == pytest.approx(0.001)
  assert good.request('echo hello') == ['hello', 1]
  step = jax.jit(lambda s: (s + 1, s))
  local = benchmarking.Variant(step=step, state=jnp.zeros(()), compile_s=0.1)
  rows, errors = benchmarking.compare_with_processes({'local': local},
                                                     {'good': good, 'bad': bad}, 3, 2)
  assert set(rows) == {'local', 'good'} and set(errors) == {'bad'}
  assert 'exited' in errors['bad'] and 'child gave up' in errors['bad']
  assert rows['good']['ms_per_step'] == pytest.approx(1.0) and rows['good']['compile_s'] == 1.5
  assert int(local.state) == 2 + 3 * 2          # warm-up, then 3 rounds of 2 steps
  assert good.request('echo again') == ['again', 1 + 3]
  good.close()
  bad.close()
  assert good.proc.returncode == 0
