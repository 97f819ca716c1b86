"""The compiled train-step programs of a run: one per shape signature of the step's plan.

The methods decide some inputs of each step on the host (`accel.method.StepPlan`); when
their shapes change (layer dropping: how many blocks run), the step is another program.
`Programs` compiles each on first use and keeps it; `prefetch` compiles the next step's in
a background thread while the current step runs, so the loop does not stall on a compile
it could see coming. Each program's FLOPs come from XLA's cost analysis of that program.
"""
from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import jax
import numpy as np


def signature(plan_kwargs: dict) -> tuple:
  """What selects a program: the names, shapes and dtypes of the plan's arrays."""
  return tuple((k, np.shape(v), np.asarray(v).dtype.str) for k, v in sorted(plan_kwargs.items()))


def cost_flops(compiled) -> float:
  """FLOPs of a compiled program per XLA's cost analysis (0 where it gives none)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get('flops', 0.0))


def abstract(tree):
  """Shapes, dtypes and shardings of `tree`'s arrays (what lowering needs, no buffers)."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                      tree)


class Programs:
  """train_step (jitted) specialised by plan signature, lowered against `state`/`batch` shapes."""

  def __init__(self, train_step, state, batch):
    self._train_step = train_step
    self._state, self._batch = abstract(state), abstract(batch)
    self._compiled: dict[tuple, Any] = {}
    self._pending: dict[tuple, concurrent.futures.Future] = {}
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='compile')
    self.compile_seconds: dict[tuple, float] = {}
    self.flops: dict[tuple, float] = {}

  def _compile(self, plan_kwargs: dict):
    start = time.perf_counter()
    plan = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype),
                        plan_kwargs)
    compiled = self._train_step.lower(self._state, self._batch, plan).compile()
    sig = signature(plan_kwargs)
    self.compile_seconds[sig] = time.perf_counter() - start
    self.flops[sig] = cost_flops(compiled)
    return compiled

  def prefetch(self, plan_kwargs: dict) -> None:
    """Starts compiling the program of `plan_kwargs` if it is neither compiled nor pending."""
    sig = signature(plan_kwargs)
    if sig not in self._compiled and sig not in self._pending:
      self._pending[sig] = self._pool.submit(self._compile, plan_kwargs)

  def get(self, plan_kwargs: dict):
    """The compiled program for `plan_kwargs` (waits for a pending compile; compiles if new)."""
    sig = signature(plan_kwargs)
    if sig not in self._compiled:
      self.prefetch(plan_kwargs)
      self._compiled[sig] = self._pending.pop(sig).result()
    return self._compiled[sig]

  def __len__(self) -> int:
    return len(self._compiled)

  def close(self) -> None:
    self._pool.shutdown(wait=False, cancel_futures=True)
