"""Shared pieces of the benchmarks in `experiments/bench_*.py`: timing, ceilings, provenance.

Timing queues `iters` calls back to back and synchronizes once (synchronizing after every
call hides the device's throughput behind launch latency).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp


def provenance() -> dict:
  """Device, versions, date and the exact command: what every results file records."""
  devices = jax.devices()
  try:
    import flax  # pylint: disable=g-import-not-at-top
    flax_version = flax.__version__
  except ImportError:
    flax_version = None
  commit = os.environ.get('ACCEL_GIT_COMMIT')   # set where the tree travels without .git
  if not commit:
    try:
      commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                              text=True, check=False).stdout.strip() or None
    except OSError:
      commit = None
  return {
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'command': ' '.join(shlex.quote(a) for a in [os.path.basename(sys.executable),
                                                   '-m', _module_name()] + sys.argv[1:]),
      'device': devices[0].device_kind, 'device_count': len(devices),
      'platform': devices[0].platform, 'jax': jax.__version__, 'flax': flax_version,
      'python': platform.python_version(), 'git_commit': commit,
  }


def _module_name() -> str:
  main = sys.modules.get('__main__')
  spec = getattr(main, '__spec__', None)
  return spec.name if spec is not None else (sys.argv[0] if sys.argv else '?')


def time_calls(fn: Callable, args_fn: Callable[[], tuple], iters: int, warmup: int = 2) -> float:
  """Median-free steady-state seconds per call: `iters` queued calls, one synchronization.

  `args_fn()` gives the arguments of the next call (so donated buffers are renewed); `fn`
  returns its new state as the first output when the call is a step.
  """
  out = None
  for _ in range(warmup):
    out = fn(*args_fn())
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(iters):
    out = fn(*args_fn())
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / iters


def matmul_ceiling(n: int, dtype=jnp.bfloat16, iters: int = 20,
                   precision=None) -> dict:
  """Achieved FLOP/s of an n^3 matmul chain: the device's practical dense-math ceiling."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (n, n), dtype)
  b = jax.random.normal(key_b, (n, n), dtype)
  matmul = jax.jit(lambda x, y: jnp.matmul(x, y, precision=precision))
  seconds = time_calls(matmul, lambda: (a, b), iters)
  return {'n': n, 'dtype': jnp.dtype(dtype).name, 'seconds': seconds,
          'flops_per_s': 2 * n ** 3 / seconds}


def write_results(out_dir: str, name: str, payload: dict, markdown: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f'{name}.json'), 'w') as f:
    json.dump(payload, f, indent=2, default=str)
  with open(os.path.join(out_dir, f'{name}.md'), 'w') as f:
    f.write(markdown)
  print(markdown)


def interleaved_rounds(steps: dict, states: dict, args: tuple, rounds: int,
                       steps_per_round: int) -> tuple[dict, dict]:
  """Times variants round-robin so drift hits all alike.

  `steps[v](state, *args) -> (state, out)`; each round runs `steps_per_round` queued steps of
  every variant and synchronizes once. Returns (median ms/step, max-min ms/step over rounds)
  per variant; `states` is updated in place.
  """
  times = {v: [] for v in steps}
  for _ in range(rounds):
    for v, step in steps.items():
      state, out = states[v], None
      start = time.perf_counter()
      for _ in range(steps_per_round):
        state, out = step(state, *args)
      jax.block_until_ready(out)
      times[v].append((time.perf_counter() - start) / steps_per_round)
      states[v] = state
  median = {v: 1e3 * statistics.median(t) for v, t in times.items()}
  spread = {v: 1e3 * (max(t) - min(t)) for v, t in times.items()}
  return median, spread
