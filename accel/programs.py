"""The compiled train-step programs of a run: one per shape signature of the step's plan.

The methods decide some inputs of each step on the host (`accel.method.StepPlan`); when
their shapes change (layer dropping: how many blocks run), the step is another program.
`Programs` compiles each on first use and keeps it; `Lookahead` computes the plans of the
next `horizon` steps ahead of time and has their programs compiled in a background thread
in the order the run will need them, so the loop does not stall on a compile it could see
coming. Each program's FLOPs are XLA's cost analysis of its HLO as lowered, before the
backend optimizes it (`lowered_flops`): what the step computes, counted alike on every
backend. The compiled program's analysis is not that on a GPU: for BERT-base (batch 128 x
128) the H200 gave 1.72e12, 2.65e12 and 3.58e12 per step in three processes, the lowered
HLO 8.65e12, which is the 6 x parameters x tokens estimate.

`use_compilation_cache` turns on JAX's persistent compilation cache (config key
`compilation_cache`: by default a folder beside the prepared data), so a resumed or repeated
run loads its programs instead of compiling them again. JAX caches a program whose compile
took at least `jax_persistent_cache_min_compile_time_secs` (default 1 s).
"""
from __future__ import annotations

import collections
import concurrent.futures
import os
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache

LOOKAHEAD_STEPS = 2000
CACHE_OFF = 'off'


def signature(plan_kwargs: dict) -> tuple:
  """What selects a program: the names, shapes and dtypes of the plan's arrays."""
  return tuple((k, np.shape(v), np.asarray(v).dtype.str) for k, v in sorted(plan_kwargs.items()))


def cost_flops(compiled) -> float:
  """FLOPs of a compiled program per XLA's cost analysis (0 where it gives none)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get('flops', 0.0))


def lowered_flops(lowered) -> float:
  """FLOPs of a lowered program by XLA's cost analysis of its unoptimized HLO, run by the CPU
  backend whatever the program's backend (JAX's `Lowered.cost_analysis` is not implemented
  for the GPU plugin); custom calls made at lowering (cuDNN attention) count 0. 0 where the
  CPU backend or the analysis is unavailable."""
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
    module = lowered.compiler_ir('hlo').as_hlo_module()
    analysis = _jax.hlo_module_cost_analysis(xla_bridge.get_backend('cpu'), module)
  except Exception:  # pylint: disable=broad-except  (private API: absent or moved)
    return 0.0
  return float((analysis or {}).get('flops', 0.0))


def step_flops(lowered, compiled) -> float:
  """A program's FLOPs: `lowered_flops`, else (analysis unavailable) the compiled one's."""
  return lowered_flops(lowered) or cost_flops(compiled)


def abstract(tree):
  """Shapes, dtypes and shardings of `tree`'s arrays (what lowering needs, no buffers)."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                      tree)


def cache_dir(config) -> str | None:
  """The persistent compilation cache folder of `config` (None: off).

  config.compilation_cache: '' -> <prepared data dir>/jax_compilation_cache; 'off' -> no
  cache; otherwise the folder itself.
  """
  setting = config.get('compilation_cache', '')
  if setting == CACHE_OFF:
    return None
  if setting:
    return os.path.abspath(os.path.expanduser(setting))
  from accel.data.builders import default_data_dir  # pylint: disable=g-import-not-at-top
  return os.path.join(default_data_dir(config.data.dir or None), 'jax_compilation_cache')


def use_compilation_cache(directory: str | None) -> None:
  """Points JAX's persistent compilation cache at `directory` (None: off), from now on.

  The cache binds its folder at the first compile of a process; a different folder later
  (another run in the same process) resets it.
  """
  if jax.config.jax_compilation_cache_dir == directory:
    return
  jax.config.update('jax_compilation_cache_dir', directory)
  compilation_cache.reset_cache()


class Programs:
  """train_step (jitted) specialised by plan signature, lowered against `state`/`batch` shapes.

  executor: where the background compiles run (default: one thread of its own; XLA
  compiles outside the GIL, so a pool of several compiles several programs at once).
  compile_seconds: each program's lowering + compile, wall-clock.
  """

  def __init__(self, train_step, state, batch,
               executor: concurrent.futures.Executor | None = None):
    self._train_step = train_step
    self._state, self._batch = abstract(state), abstract(batch)
    self._compiled: dict[tuple, Any] = {}
    self._pending: dict[tuple, concurrent.futures.Future] = {}
    self._lock = threading.Lock()
    self._own_pool = executor is None
    self._pool = executor or concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix='compile')
    self.compile_seconds: dict[tuple, float] = {}
    self.flops: dict[tuple, float] = {}

  def _compile(self, plan_kwargs: dict):
    start = time.perf_counter()
    plan = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype),
                        plan_kwargs)
    lowered = self._train_step.lower(self._state, self._batch, plan)
    compiled = lowered.compile()
    sig = signature(plan_kwargs)
    self.compile_seconds[sig] = time.perf_counter() - start
    self.flops[sig] = step_flops(lowered, compiled)
    return compiled

  def prefetch(self, plan_kwargs: dict) -> None:
    """Starts compiling the program of `plan_kwargs` if it is neither compiled nor pending."""
    sig = signature(plan_kwargs)
    with self._lock:
      if sig not in self._compiled and sig not in self._pending:
        self._pending[sig] = self._pool.submit(self._compile, plan_kwargs)

  def get(self, plan_kwargs: dict):
    """The compiled program for `plan_kwargs` (waits for a pending compile; compiles if new)."""
    sig = signature(plan_kwargs)
    program = self._compiled.get(sig)
    if program is None:
      self.prefetch(plan_kwargs)
      program = self._pending[sig].result()
      with self._lock:
        self._compiled[sig] = program
        self._pending.pop(sig, None)
    return program

  def __len__(self) -> int:
    return len(self._compiled)

  def close(self) -> None:
    if self._own_pool:
      self._pool.shutdown(wait=False, cancel_futures=True)


class Lookahead:
  """The plans of steps [start, stop), each computed `horizon` steps before it runs, its
  program prefetched then (so programs compile in the order the run first needs them).

  plan_fn(step) -> StepPlan. `pop()` gives the next step's plan; `advance()`, called after
  that step is dispatched, plans one more step ahead.
  """

  def __init__(self, plan_fn: Callable[[int], Any], programs: Programs, start: int,
               stop: int, horizon: int = LOOKAHEAD_STEPS):
    self._plan_fn, self._programs, self._stop = plan_fn, programs, stop
    self._plans: collections.deque = collections.deque()
    self._next = start
    for _ in range(max(1, horizon)):
      self.advance()

  def advance(self) -> None:
    if self._next < self._stop:
      plan = self._plan_fn(self._next)
      self._programs.prefetch(plan.model_kwargs)
      self._plans.append(plan)
      self._next += 1

  def peek(self):
    return self._plans[0]

  def pop(self):
    return self._plans.popleft()
