"""Rounded float32 arithmetic for the chunked dot products (chunked.py, kernel.py).

Every value is a float32 array holding values of a narrower format (formats.py). A sum
rnd_acc(a + b) is formed as the float32 sum, then rounded to acc_fmt. That is already the
correctly rounded sum when both addends carry at most as many significant bits as acc_fmt
and acc_fmt has at most 11 (`needs_sticky` false: an inexact float32 sum then means the
smaller addend lies below a quarter ulp of the result); otherwise the float32 sum is made
sticky first (round-to-odd from the exact TwoSum error), correct for accumulators of up to
22 significant bits.

Two roundings that a GPU kernel lowers (no 64-bit or variable shifts):
- `round_mantissa`, the 3-flop Veltkamp split, exact in the format's normal range (and on
  its subnormal grid: `on_subnormal_grid`, `range_ok` say when that holds);
- `round_nearest`, `formats.quantize(x, fmt, 'nearest')` from int32 / float32 elementwise
  operations, everywhere.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from accel.lowprec.formats import FloatFormat, quantize


def sticky_sum(a: jax.Array, b: jax.Array) -> jax.Array:
  """float32 a + b rounded to odd: the float32 RNE sum, moved one ulp towards the exact
  sum when that is not representable and the RNE result is even (TwoSum error)."""
  s = a + b
  bb = s - a
  err = (a - (s - bb)) + (b - bb)
  bits = lax.bitcast_convert_type(s, jnp.int32)
  towards = jnp.where((err > 0) == (s > 0), 1, -1)
  fix = (err != 0) & ((bits & 1) == 0)
  return lax.bitcast_convert_type(jnp.where(fix, bits + towards, bits), jnp.float32)


def needs_sticky(acc_fmt: FloatFormat, addend_bits: int) -> bool:
  """Whether float32 addition then rounding to acc_fmt could double-round."""
  if acc_fmt.is_float32:
    return False
  if acc_fmt.significant_bits > 22:
    raise ValueError(f'accumulators of 23 significant bits are not emulated: {acc_fmt}')
  return addend_bits > acc_fmt.significant_bits or acc_fmt.significant_bits > 11


def add_rounded(acc: jax.Array, x: jax.Array, acc_fmt: FloatFormat, addend_bits: int = 24,
                rounding: str = 'nearest', key: jax.Array | None = None) -> jax.Array:
  """rnd_acc(acc + x) for acc in acc_fmt and x of at most `addend_bits` significant bits."""
  if acc_fmt.is_float32:
    return acc + x
  if rounding == 'nearest' and needs_sticky(acc_fmt, addend_bits):
    return quantize(sticky_sum(acc, x), acc_fmt)
  return quantize(acc + x, acc_fmt, rounding, key)


def product_bits(operand_fmt: FloatFormat, mul_fmt: FloatFormat) -> int:
  """Significant bits a rounded product can carry."""
  return min(2 * operand_fmt.significant_bits, mul_fmt.significant_bits, 24)


def round_mantissa(x: jax.Array, fmt: FloatFormat) -> jax.Array:
  """x rounded to fmt's significant bits, ties to even, by Veltkamp splitting:
  c = x * (2^s + 1); x_hi = c - (c - x)  (s = 23 - man_bits). c is formed as x * 2^s + x
  (the product is exact), so a compiler that contracts multiply-adds into FMAs (GPU
  backends do) cannot change it. Correct in fmt's normal range only: no subnormals, no
  overflow (see `range_ok`)."""
  if fmt.is_float32:
    return x
  c = x * np.float32(2.0 ** (23 - fmt.man_bits)) + x
  return c - (c - x)


def round_nearest(x: jax.Array, fmt: FloatFormat) -> jax.Array:
  """quantize(x, fmt, 'nearest') from int32/float32 elementwise ops a GPU kernel lowers:
  int32 bit operations for the normal range and float32's own rounding for the
  fixed-spacing range below min_normal (the float32 sum |x| + 2^(q+23) is |x| rounded to a
  multiple of 2^q, ties to even, plus 2^(q+23); its bit pattern minus that of 2^(q+23)
  counts the multiples)."""
  if fmt.is_float32:
    return x
  s = 23 - fmt.man_bits
  bits = lax.bitcast_convert_type(x, jnp.int32)
  mag = bits & np.int32(0x7FFFFFFF)
  sign = bits ^ mag
  half_m1 = np.int32((1 << (s - 1)) - 1) if s > 0 else np.int32(0)
  r = (mag + half_m1 + ((mag >> s) & 1)) & np.int32(~((1 << s) - 1))
  if not (fmt.exp_bits == 8 and fmt.subnormals):
    q = fmt.emin - (fmt.man_bits if fmt.subnormals else 0)
    magic = np.float32(2.0 ** (q + 23))
    absx = lax.bitcast_convert_type(mag, jnp.float32)
    steps = lax.bitcast_convert_type(absx + magic, jnp.int32) - magic.view(np.int32)
    below = lax.bitcast_convert_type(steps.astype(jnp.float32) * np.float32(2.0 ** q), jnp.int32)
    r = jnp.where(mag < np.int32(np.float32(fmt.min_normal).view(np.int32)), below, r)
  max_bits = np.int32(np.float32(fmt.max).view(np.int32))
  over = max_bits if fmt.overflow == 'saturate' else np.int32(0x7F800000)
  r = jnp.where(r > max_bits, over, r)
  r = jnp.where(mag > np.int32(0x7F800000), mag, r)     # NaN (r may have wrapped)
  return lax.bitcast_convert_type(r | sign, jnp.float32)


def on_subnormal_grid(operand_fmt: FloatFormat, mul_fmt: FloatFormat, acc_fmt: FloatFormat):
  """Whether every product lies on mul_fmt's subnormal grid and every product and sum on
  acc_fmt's, so that values below min_normal never need rounding."""
  finest = operand_fmt.min_positive ** 2
  if not mul_fmt.is_float32:
    if not (mul_fmt.subnormals and finest >= mul_fmt.min_positive):
      return False
    finest = min(finest, mul_fmt.min_positive)
  return acc_fmt.subnormals and finest >= acc_fmt.min_positive


def range_ok(a, b, k, mul_fmt, acc_fmt):
  """Runtime check: |products| and every partial sum stay below half of the largest
  finite values (sum of |a_i b_i| <= max|a| max|b| K; rounding adds less than 2x)."""
  bound = jnp.max(jnp.abs(a)).astype(jnp.float32) * jnp.max(jnp.abs(b)).astype(jnp.float32)
  return (bound * k <= acc_fmt.max / 2) & (bound <= mul_fmt.max / 2)
