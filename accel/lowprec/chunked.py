"""Chunk-based dot products with emulated low-precision accumulation (Wang et al. 2018,
Fig. 3a; papers.md section 3), as a drop-in for `lax.dot_general`.

For each output element, with the contracted axis cut into chunks of `chunk_size`:

  total = 0
  for each chunk:    chunk = 0
                     for k in chunk:  chunk = rnd_acc(chunk + rnd_mul(a_k * b_k))
                     total = rnd_acc(total + chunk)

'exact' runs exactly this (every product rounded to mul_fmt, every addition to acc_fmt);
'fast' computes each chunk sum with one float32 matmul (its products are exact for the
operand formats the kernels take; the order of its additions is the matmul's), rounds it
to acc_fmt and then adds the chunk sums as above. chunk_size = 1 is plain sequential
accumulation in acc_fmt; chunk_size >= K is one chunk.

Every addition is correctly rounded (the result is rnd_acc of the exact sum): the float32
sum followed by rounding is already correct when both addends carry at most as many
significant bits as acc_fmt and acc_fmt has at most 11 (then an inexact float32 sum means
the smaller addend lies below a quarter ulp of the result); otherwise the float32 sum is
made sticky (round-to-odd from the exact TwoSum error, rounding.py) before rounding, correct for
accumulators of up to 22 significant bits. Products are computed in float32, which is
exact for operands holding 24 significant bits or fewer between them (FP8, bf16, fp16
operands); wider operands are rounded to float32 before rnd_mul. Stochastic rounding in
the accumulator rounds the float32 sum. On GPU, XLA may contract a product and the next
addition into one FMA; for operands of more than 12 significant bits (products inexact in
float32) that can change the last bit of a sum. The tests check bit-exactness on CPU.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from accel.lowprec.formats import FP32, FloatFormat, get_format, quantize
from accel.lowprec.rounding import (add_rounded, needs_sticky, on_subnormal_grid, product_bits,
                                     range_ok, round_mantissa)

DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]








def canonical_operands(lhs, rhs, dimension_numbers):
  """lhs -> (B, M, K), rhs -> (B, K, N) and the output shape of lax.dot_general."""
  (lc, rc), (lb, rb) = dimension_numbers
  lc, rc, lb, rb = (tuple(int(d) for d in ds) for ds in (lc, rc, lb, rb))
  lf = [d for d in range(lhs.ndim) if d not in lc and d not in lb]
  rf = [d for d in range(rhs.ndim) if d not in rc and d not in rb]
  batch_shape = [lhs.shape[d] for d in lb]
  out_shape = batch_shape + [lhs.shape[d] for d in lf] + [rhs.shape[d] for d in rf]
  b = math.prod(batch_shape)
  k = math.prod(lhs.shape[d] for d in lc)
  lhs_BxMxK = jnp.transpose(lhs, lb + tuple(lf) + lc).reshape(b, -1, k)
  rhs_BxKxN = jnp.transpose(rhs, rb + rc + tuple(rf)).reshape(b, k, -1)
  return lhs_BxMxK, rhs_BxKxN, tuple(out_shape)


def _chunks(lhs_BxMxK, rhs_BxKxN, chunk_size):
  """Zero-pads K to a multiple of the chunk size; lhs -> (B,M,C,L), rhs -> (B,C,L,N)."""
  b, m, k = lhs_BxMxK.shape
  n = rhs_BxKxN.shape[2]
  size = max(1, min(chunk_size, k))
  c = -(-k // size)
  pad = c * size - k
  lhs_BxMxK = jnp.pad(lhs_BxMxK, ((0, 0), (0, 0), (0, pad)))
  rhs_BxKxN = jnp.pad(rhs_BxKxN, ((0, 0), (0, pad), (0, 0)))
  return lhs_BxMxK.reshape(b, m, c, size), rhs_BxKxN.reshape(b, c, size, n)


def _keys(key, rounding, *shape):
  if rounding == 'stochastic':
    if key is None:
      raise ValueError('stochastic accumulation needs a key')
    return jax.random.split(key, shape)
  return jnp.zeros(shape, jnp.uint32)   # unused placeholder carried through the scans








def _zero_total(shape, *operands):
  """A float32 zero running total that varies over the mesh axes the operands vary over
  (inside jax.shard_map a scan's carry must have its body's output type)."""
  return sum(jnp.zeros_like(x, jnp.float32, shape=shape) for x in operands)


def _exact_BxMxN(lhs_BxMxCxL, rhs_BxCxLxN, operand_fmt, mul_fmt, acc_fmt, rounding, key):
  """Sequential rounded accumulation. With nearest rounding, operands whose products stay
  on the accumulator's subnormal grid, and magnitudes that rule out overflow (checked at
  run time), the rounding is `round_mantissa` (3 flops) instead of `quantize`."""
  b, m, c, size = lhs_BxMxCxL.shape
  n = rhs_BxCxLxN.shape[3]
  lhs_CxLxBxM = jnp.transpose(lhs_BxMxCxL, (2, 3, 0, 1))
  rhs_CxLxBxN = jnp.transpose(rhs_BxCxLxN, (1, 2, 0, 3))
  keys = _keys(key, rounding, c, size + 1)
  stoch = rounding == 'stochastic'
  addend_bits = product_bits(operand_fmt, mul_fmt)

  def run(in_range):
    def rnd_add(acc, x, bits, k):
      if in_range:
        return round_mantissa(acc + x, acc_fmt)
      return add_rounded(acc, x, acc_fmt, bits, rounding, k if stoch else None)

    def element(chunk, xs):
      a_BxM, b_BxN, k = xs
      prod_BxMxN = a_BxM[:, :, None] * b_BxN[:, None, :]
      prod_BxMxN = round_mantissa(prod_BxMxN, mul_fmt) if in_range else quantize(prod_BxMxN, mul_fmt)
      return rnd_add(chunk, prod_BxMxN, addend_bits, k), None

    def one_chunk(total, xs):
      a_LxBxM, b_LxBxN, k_L1 = xs
      chunk, _ = lax.scan(element, _zero_total((b, m, n), a_LxBxM, b_LxBxN),
                          (a_LxBxM, b_LxBxN, k_L1[:-1]))
      return rnd_add(total, chunk, acc_fmt.significant_bits, k_L1[-1]), None

    total, _ = lax.scan(one_chunk, _zero_total((b, m, n), lhs_CxLxBxM, rhs_CxLxBxN),
                        (lhs_CxLxBxM, rhs_CxLxBxN, keys))
    return total

  if (rounding == 'nearest' and not needs_sticky(acc_fmt, addend_bits)
      and on_subnormal_grid(operand_fmt, mul_fmt, acc_fmt)):
    ok = range_ok(lhs_BxMxCxL, rhs_BxCxLxN, c * size, mul_fmt, acc_fmt)
    return lax.cond(ok, lambda: run(True), lambda: run(False))
  return run(False)


def _fast_BxMxN(lhs_BxMxCxL, rhs_BxCxLxN, acc_fmt, rounding, key):
  """One float32 matmul per chunk, rounded to acc_fmt and added to the running total."""
  c = lhs_BxMxCxL.shape[2]
  keys = _keys(key, rounding, c, 2)
  stoch = rounding == 'stochastic'

  def one_chunk(total, xs):
    a_BxMxL, b_BxLxN, k2 = xs
    part = jnp.einsum('bml,bln->bmn', a_BxMxL, b_BxLxN, precision=lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32)
    part = quantize(part, acc_fmt, rounding, k2[0] if stoch else None)
    return add_rounded(total, part, acc_fmt, acc_fmt.significant_bits, rounding,
                       k2[1] if stoch else None), None

  b, m = lhs_BxMxCxL.shape[:2]
  n = rhs_BxCxLxN.shape[3]
  total, _ = lax.scan(one_chunk, _zero_total((b, m, n), lhs_BxMxCxL, rhs_BxCxLxN),
                      (jnp.moveaxis(lhs_BxMxCxL, 2, 0), jnp.moveaxis(rhs_BxCxLxN, 1, 0), keys))
  return total




def chunked_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: DimensionNumbers,
                        precision=None, preferred_element_type=None, *,
                        operand_fmt: str | FloatFormat = FP32, mul_fmt: str | FloatFormat = FP32,
                        acc_fmt: str | FloatFormat = 'e6m9',
                        chunk_size: int = 64, mode: str = 'exact', rounding: str = 'nearest',
                        key: jax.Array | None = None, impl: str = 'jax') -> jax.Array:
  """`lax.dot_general` with chunk-based low-precision accumulation (module docstring).

  The operands are first rounded to operand_fmt (nearest; a no-op for operands already
  in it). The contracted dimensions are flattened in the order given (row-major) and
  summed in that order. `precision` is ignored: the arithmetic is set by the formats. mul_fmt only
  applies in 'exact' mode ('fast' products are float32). The result is float32 (values of
  acc_fmt) unless preferred_element_type says otherwise. impl: 'jax' (every backend) or
  'pallas' (kernel.py: nearest rounding and the settings `kernel.supported` lists;
  interpreted off GPU), bit-identical ('fast': wherever each chunk's float32 sum is exact,
  as kernel.py says).
  """
  del precision
  operand_fmt, mul_fmt, acc_fmt = get_format(operand_fmt), get_format(mul_fmt), get_format(acc_fmt)
  if mode not in ('exact', 'fast'):
    raise ValueError(f'mode must be exact or fast, got {mode!r}')
  out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype)
  lhs_BxMxK, rhs_BxKxN, out_shape = canonical_operands(
      quantize(lhs.astype(jnp.float32), operand_fmt),
      quantize(rhs.astype(jnp.float32), operand_fmt), dimension_numbers)
  if impl == 'pallas':
    out_BxMxN = _pallas_BxMxN(lhs_BxMxK, rhs_BxKxN, operand_fmt, mul_fmt, acc_fmt, chunk_size,
                              mode, rounding)
    if out_BxMxN is not None:
      return out_BxMxN.reshape(out_shape).astype(out_dtype)
  elif impl != 'jax':
    raise ValueError(f'impl must be jax or pallas, got {impl!r}')
  lhs_BxMxCxL, rhs_BxCxLxN = _chunks(lhs_BxMxK, rhs_BxKxN, chunk_size)
  if mode == 'exact' or lhs_BxMxCxL.shape[3] == 1:  # fast with chunks of 1 is exact
    if mode == 'fast':
      mul_fmt = FP32
    out_BxMxN = _exact_BxMxN(lhs_BxMxCxL, rhs_BxCxLxN, operand_fmt, mul_fmt, acc_fmt,
                             rounding, key)
  else:
    out_BxMxN = _fast_BxMxN(lhs_BxMxCxL, rhs_BxCxLxN, acc_fmt, rounding, key)
  return out_BxMxN.reshape(out_shape).astype(out_dtype)


def _pallas_BxMxN(lhs_BxMxK, rhs_BxKxN, operand_fmt, mul_fmt, acc_fmt, chunk_size, mode,
                  rounding):
  """The kernels' result, or None where 'fast' chunks do not fit the matrix units (a
  power of two >= 16): the JAX path then computes the same thing."""
  from accel.lowprec import kernel  # pylint: disable=g-import-not-at-top (loads Pallas: 0.5 s)
  chunk = min(chunk_size, lhs_BxMxK.shape[2])
  if mode == 'fast' and chunk == 1:
    mode, mul_fmt = 'exact', FP32            # as in the JAX path
  elif mode == 'fast' and not kernel.matrix_unit_chunk(chunk):
    return None
  if not kernel.supported(operand_fmt, mul_fmt, acc_fmt, rounding):
    raise ValueError(f'impl=pallas does not support operands {operand_fmt}, mul {mul_fmt}, '
                     f'acc {acc_fmt}, rounding {rounding}; use impl=jax')
  matmul = functools.partial(kernel.chunked_matmul, mul_fmt=mul_fmt, acc_fmt=acc_fmt,
                             chunk_size=chunk_size, mode=mode, operand_fmt=operand_fmt,
                             interpret=jax.default_backend() != 'gpu')
  if lhs_BxMxK.shape[0] == 1:
    return matmul(lhs_BxMxK[0], rhs_BxKxN[0])[None]
  return jax.vmap(matmul)(lhs_BxMxK, rhs_BxKxN)


def make_chunked_dot_general(**settings):
  """`chunked_dot_general` with its keyword settings bound, for `nn.Dense(dot_general=...)`."""
  return functools.partial(chunked_dot_general, **settings)
