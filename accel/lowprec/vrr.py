"""Variance retention ratio of low-precision accumulation (Sakr et al. 2019, papers.md
section 3), measured by Monte Carlo with the emulator.

  VRR(n, m_acc) = Var(computed sum of n terms) / Var(exact sum)

for i.i.d. N(0, 1) terms added sequentially in an accumulator with m_acc mantissa bits
(8 exponent bits, so only the mantissa limits it), plainly or in chunks (chunked.py).
Small terms swamped by a large running sum are lost, and the computed sum keeps less
than the full variance. Both sums use the same terms (paired samples), so the estimate
is sharp where VRR is near 1. The exact sum is a compensated (TwoSum) float32 sum.

The lengths of a model's accumulations are read off its layers by tracing it with
recording hooks: fan-in (forward), fan-out (backward-data) and batch x spatial
(weight-gradient) of every Dense and Conv (`accumulation_lengths_of`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from accel.lowprec.rounding import add_rounded
from accel.lowprec.formats import FloatFormat
from accel.lowprec.gemm import accumulation_lengths


def accumulator(m_acc: int) -> FloatFormat:
  return FloatFormat(8, m_acc)


def _two_sum(s, c, x):
  """Compensated running sum: (s, c) + x with s + c kept exact to float32 precision."""
  t = s + x
  bb = t - s
  err = (s - (t - bb)) + (x - bb)
  return t, c + err


def vrr_curve(m_acc: int, n_max: int, chunk_size: int | None = None, trials: int = 512,
              block: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """VRR at n = block, 2*block, ..., n_max (n_max a multiple of block; chunk_size, if
  given, a multiple of block or a divisor of it). Returns (n, vrr)."""
  fmt = accumulator(m_acc)
  cl = n_max + 1 if chunk_size is None else chunk_size   # plain: never folds
  bits = fmt.significant_bits
  num_blocks = n_max // block
  key = jax.random.key(seed)

  def step(carry, i):
    total, chunk, s, c = carry
    x_BxT = jax.random.normal(jax.random.fold_in(key, i), (block, trials), jnp.float32)

    def element(inner, j):
      total, chunk, s, c = inner
      x = x_BxT[j]
      chunk = add_rounded(chunk, x, fmt, 24)
      at_end = (i * block + j + 1) % cl == 0
      folded = add_rounded(total, chunk, fmt, bits)
      total = jnp.where(at_end, folded, total)
      chunk = jnp.where(at_end, 0.0, chunk)
      s, c = _two_sum(s, c, x)
      return (total, chunk, s, c), None

    (total, chunk, s, c), _ = lax.scan(element, (total, chunk, s, c), jnp.arange(block))
    computed = total if chunk_size is not None else chunk
    return (total, chunk, s, c), (computed, s + c)

  zeros = jnp.zeros((trials,), jnp.float32)
  run = jax.jit(lambda: lax.scan(step, (zeros,) * 4, jnp.arange(num_blocks))[1])
  computed, exact = (np.asarray(a, np.float64) for a in run())
  n = block * np.arange(1, num_blocks + 1)
  vrr = computed.var(axis=1) / exact.var(axis=1)
  if chunk_size is not None:   # between chunk ends the chunked sum is incomplete
    keep = n % cl == 0
    n, vrr = n[keep], vrr[keep]
  return n, vrr


def smallest_m_acc(n: int, max_loss: float, curves: dict[int, tuple[np.ndarray, np.ndarray]]):
  """Smallest m_acc among `curves` whose VRR at length n (the next measured length >= n)
  satisfies |1 - VRR| <= max_loss; None if none does. Both directions count: swamping
  loses variance, coarse rounding of a large running sum adds error variance."""
  for m in sorted(curves):
    ns, vrr = curves[m]
    i = int(np.searchsorted(ns, n))
    if i < len(ns) and abs(1 - vrr[i]) <= max_loss:
      return m
  return None


@dataclasses.dataclass(frozen=True, eq=False)
class _Recorder:
  """dot_general / conv_general_dilated hooks that log (name, fwd, bwd, grad) lengths."""
  log: list

  def dot_general(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    self.log.append(('dense', accumulation_lengths(lhs.shape, rhs.shape, dimension_numbers)))
    return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)

  def conv(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
           dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
           preferred_element_type=None):
    out = lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                   dimension_numbers, feature_group_count, batch_group_count,
                                   precision, preferred_element_type)
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    fan_in = int(np.prod([rhs.shape[d] for d in dn.rhs_spec[1:]]))
    spatial = int(np.prod([out.shape[d] for d in dn.out_spec[2:]]))
    self.log.append(('conv', {'fwd': fan_in, 'bwd': rhs.shape[dn.rhs_spec[0]],
                              'grad': out.shape[dn.out_spec[0]] * spatial}))
    return out


def accumulation_lengths_of(build_model, inputs: Any, **apply_kwargs) -> list[tuple[str, dict]]:
  """(kind, {'fwd', 'bwd', 'grad'}) for every GEMM of `build_model(recorder)` applied to
  `inputs` in one forward pass (shapes only; nothing is computed). `build_model` hands
  `recorder.dot_general` and `recorder.conv` to the model's hooks."""
  recorder = _Recorder([])
  model = build_model(recorder)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **apply_kwargs), inputs)
  recorder.log.clear()   # an init may trace a block more than once (stacked layer params)
  jax.eval_shape(lambda v, x: model.apply(v, x, **apply_kwargs), variables, inputs)
  return list(recorder.log)
