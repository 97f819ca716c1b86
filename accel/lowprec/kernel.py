"""Pallas GPU kernels for the chunked matmul of chunked.py: C_MxN = A_MxK @ B_KxN.

'exact': each program owns a (block_m, block_n) tile of C and walks K in order, keeping
the chunk sum and the running total in registers; every product is rounded to mul_fmt and
every addition to acc_fmt, as `chunked_dot_general(mode='exact')` with nearest rounding,
bit for bit. Where the operands' products lie on the accumulator's subnormal grid and a
run-time bound on their magnitudes rules out overflow (FP8 operands into e6m9 or fp16),
each rounding is the 3-flop Veltkamp split `rounding.round_mantissa`, so a multiply-add
costs 5 float32 operations; otherwise it is `round_nearest`: int32 bit operations for the
normal range and float32's own rounding for the fixed-spacing range below min_normal (the
float32 sum |x| + 2^(q+23) is |x| rounded to a multiple of 2^q, ties to even, plus
2^(q+23); its bit pattern minus that of 2^(q+23) counts the multiples).
'fast': each chunk is one matrix-unit dot (bf16 operands where the operand format fits in
bf16, which makes every product exact, float32 accumulation), rounded to acc_fmt and
added to the running total in acc_fmt.

Only round-to-nearest accumulators whose float32 sum-then-round is already correct
(`rounding.needs_sticky` false: acc_fmt of at most 11 significant bits, products no wider)
are supported; the JAX path in chunked.py covers everything else and runs on every
backend. On CPU the kernels run with `interpret=True` (the tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from accel.lowprec.formats import FP32, FloatFormat, get_format
from accel.lowprec.rounding import (needs_sticky, on_subnormal_grid, product_bits, range_ok,
                                     round_mantissa, round_nearest)




def _exact_kernel(aT_ref, b_ref, o_ref, *, num_chunks, chunk, mul_fmt, acc_fmt, in_range,
                  unroll):
  """in_range: every product and sum is known to stay within the normal range of acc_fmt
  or on its subnormal grid, so rounding is `round_mantissa` (3 flops) instead of the
  general `round_nearest`."""
  bm, bn = aT_ref.shape[1], b_ref.shape[1]
  rnd = round_mantissa if in_range else round_nearest

  def element(k, part):
    a_M = aT_ref[k, :]
    b_N = b_ref[k, :]
    prod = rnd(a_M[:, None] * b_N[None, :], mul_fmt)
    return rnd(part + prod, acc_fmt)

  def chunk_body(c, total):
    # `unroll` elements per loop iteration, written out (Triton lowers no unrolled scan).
    def group(g, part):
      for u in range(unroll):
        part = element(c * chunk + g * unroll + u, part)
      return part
    part = lax.fori_loop(0, chunk // unroll, group, jnp.zeros((bm, bn), jnp.float32))
    for r in range(chunk % unroll):
      part = element(c * chunk + (chunk // unroll) * unroll + r, part)
    return rnd(total + part, acc_fmt)

  o_ref[...] = lax.fori_loop(0, num_chunks, chunk_body, jnp.zeros((bm, bn), jnp.float32))


def _fast_kernel(a_ref, b_ref, o_ref, *, num_chunks, chunk, acc_fmt, precision):
  bm, bn = a_ref.shape[0], b_ref.shape[1]

  def chunk_body(c, total):
    a = a_ref[:, pl.ds(c * chunk, chunk)]
    b = b_ref[pl.ds(c * chunk, chunk), :]
    part = jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)
    return round_nearest(total + round_nearest(part, acc_fmt), acc_fmt)

  o_ref[...] = lax.fori_loop(0, num_chunks, chunk_body, jnp.zeros((bm, bn), jnp.float32))


def matrix_unit_chunk(chunk: int) -> bool:
  """Whether 'fast' can give a chunk to the matrix units (a power of two >= 16)."""
  return chunk >= 16 and chunk & (chunk - 1) == 0


def _pad_to(x, multiples):
  return jnp.pad(x, [(0, -d % m) for d, m in zip(x.shape, multiples)])


def supported(operand_fmt, mul_fmt, acc_fmt, rounding: str = 'nearest') -> bool:
  """Whether the kernels implement these settings (else use the JAX path)."""
  operand_fmt, mul_fmt, acc_fmt = (get_format(f) for f in (operand_fmt, mul_fmt, acc_fmt))
  return rounding == 'nearest' and not needs_sticky(acc_fmt, product_bits(operand_fmt, mul_fmt))


@functools.partial(jax.jit, static_argnames=('mul_fmt', 'acc_fmt', 'chunk_size', 'mode',
                                             'operand_fmt', 'block_m', 'block_n', 'num_warps',
                                             'num_stages', 'unroll', 'interpret'))
def chunked_matmul(a_MxK: jax.Array, b_KxN: jax.Array, *, mul_fmt: FloatFormat = FP32,
                   acc_fmt: FloatFormat = FloatFormat(6, 9), chunk_size: int = 64,
                   mode: str = 'exact', operand_fmt: FloatFormat = FP32, block_m: int = 64,
                   block_n: int = 64, num_warps: int = 4, num_stages: int = 1, unroll: int = 1,
                   interpret: bool = False) -> jax.Array:
  """C = A @ B with chunk-based accumulation (module docstring); float32 result.

  operand_fmt: the format A and B already hold (it bounds the products' width; 'fast'
  feeds bf16 to the matrix units when it fits in bf16). K is zero-padded to a multiple of
  chunk_size, M and N to the block sizes. 'exact' picks, at run time, the 3-flop
  rounding when the operands' magnitudes rule out overflow and their products lie on the
  accumulator's subnormal grid (e.g. e5m2/e4m3 operands, e6m9/fp16 accumulators), else
  the general one.
  """
  mul_fmt, acc_fmt = get_format(mul_fmt), get_format(acc_fmt)
  operand_fmt = get_format(operand_fmt)
  if not supported(operand_fmt, mul_fmt, acc_fmt):
    raise ValueError(f'the kernel does not support operands {operand_fmt} / mul {mul_fmt} / '
                     f'acc {acc_fmt}')
  m, k = a_MxK.shape
  n = b_KxN.shape[1]
  chunk = max(1, min(chunk_size, k))
  a = _pad_to(a_MxK.astype(jnp.float32), (block_m, chunk))
  b = _pad_to(b_KxN.astype(jnp.float32), (chunk, block_n))
  mp, kp = a.shape
  np_ = b.shape[1]
  grid = (mp // block_m, np_ // block_n)
  params = dict(compiler_params=None if interpret else _triton_params(num_warps, num_stages),
                interpret=interpret)
  out_spec = pl.BlockSpec((block_m, block_n), lambda i, j: (i, j))
  b_spec = pl.BlockSpec((kp, block_n), lambda i, j: (0, j))
  if mode == 'exact':
    def call(in_range):
      kernel = functools.partial(_exact_kernel, num_chunks=kp // chunk, chunk=chunk,
                                 mul_fmt=mul_fmt, acc_fmt=acc_fmt, in_range=in_range,
                                 unroll=unroll)
      return pl.pallas_call(
          kernel, out_shape=jax.ShapeDtypeStruct((mp, np_), jnp.float32), grid=grid,
          in_specs=[pl.BlockSpec((kp, block_m), lambda i, j: (0, i)), b_spec],
          out_specs=out_spec, **params)(a.T, b)
    if on_subnormal_grid(operand_fmt, mul_fmt, acc_fmt):
      out = lax.cond(range_ok(a, b, k, mul_fmt, acc_fmt), lambda: call(True), lambda: call(False))
    else:
      out = call(False)
  elif mode == 'fast':
    fits_bf16 = operand_fmt.exp_bits <= 8 and operand_fmt.man_bits <= 7
    dtype = jnp.bfloat16 if fits_bf16 else jnp.float32
    precision = lax.Precision.DEFAULT if fits_bf16 else lax.Precision.HIGHEST
    kernel = functools.partial(_fast_kernel, num_chunks=kp // chunk, chunk=chunk,
                               acc_fmt=acc_fmt, precision=precision)
    out = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((mp, np_), jnp.float32), grid=grid,
        in_specs=[pl.BlockSpec((block_m, kp), lambda i, j: (i, 0)), b_spec],
        out_specs=out_spec, **params)(a.astype(dtype), b.astype(dtype))
  else:
    raise ValueError(f'mode must be exact or fast, got {mode!r}')
  return out[:m, :n]


def _triton_params(num_warps: int, num_stages: int):
  from jax.experimental.pallas import triton as pltriton
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
