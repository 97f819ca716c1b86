"""chunked_dot_general against an exact-arithmetic loop (tests/lowprec_reference.py)."""
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax

from accel.lowprec import chunked as C
from accel.lowprec import formats as F
from tests import lowprec_reference as ref


def _operands(rng, shape, dtype, spread):
  x = rng.standard_normal(shape) * np.exp2(rng.uniform(-spread, spread, shape))
  return x.astype(np.float32).astype(dtype).astype(np.float32)


# operand_fmt given: 3-flop rounding when in range (e5m2/e6m9 cases), else quantize;
# operand_fmt fp32: the sticky (round-to-odd) sums.
@pytest.mark.parametrize('dtype,op,mul,acc,chunk,spread', [
    (ml_dtypes.float8_e5m2, F.E5M2, F.FP32, F.E6M9, 1, 6),
    (ml_dtypes.float8_e5m2, F.E5M2, F.FP32, F.E6M9, 4, 6),
    (ml_dtypes.float8_e5m2, F.FP32, F.FP32, F.E6M9, 16, 6),
    (ml_dtypes.float8_e4m3fn, F.E4M3, F.FP32, F.BF16, 8, 4),
    (ml_dtypes.float8_e4m3fn, F.E4M3, F.E5M2, F.FP16, 5, 3),    # products rounded
    (ml_dtypes.float8_e4m3fn, F.E4M3, F.FloatFormat(5, 4), F.E6M9, 5, 3),
    (ml_dtypes.bfloat16, F.FP32, F.FP32, F.E6M9, 6, 4),
    (ml_dtypes.bfloat16, F.BF16, F.FP32, F.FloatFormat(8, 14), 64, 4),  # one chunk, 15-bit acc
])
def test_exact_mode_matches_loop_reference(dtype, op, mul, acc, chunk, spread):
  rng = np.random.default_rng(chunk)
  a = _operands(rng, (3, 37), dtype, spread)
  b = _operands(rng, (37, 4), dtype, spread)
  dot = functools.partial(C.chunked_dot_general, dimension_numbers=(((1,), (0,)), ((), ())),
                          operand_fmt=op, mul_fmt=mul, acc_fmt=acc, chunk_size=chunk)
  got = jax.jit(dot)(a, b)
  np.testing.assert_array_equal(np.asarray(got), ref.chunked_dot(a, b, mul, acc, chunk))


@pytest.mark.parametrize('chunk', [1, 8, 64])
def test_fast_mode_matches_reference(chunk):
  rng = np.random.default_rng(7)
  # spread 3: every chunk sum of e5m2 products is exact in float32, whatever the order.
  a = _operands(rng, (4, 40), ml_dtypes.float8_e5m2, 3)
  b = _operands(rng, (40, 3), ml_dtypes.float8_e5m2, 3)
  got = C.chunked_dot_general(a, b, (((1,), (0,)), ((), ())), acc_fmt=F.E6M9,
                              chunk_size=chunk, mode='fast')
  np.testing.assert_array_equal(np.asarray(got), ref.chunked_dot(a, b, F.FP32, F.E6M9, chunk, fast=True))


def test_general_dimension_numbers_and_drop_in_shapes():
  rng = np.random.default_rng(3)
  lhs = _operands(rng, (2, 3, 5, 4), ml_dtypes.float8_e5m2, 4)    # batch 2, free 3, contract (5,4)
  rhs = _operands(rng, (4, 2, 5, 6), ml_dtypes.float8_e5m2, 4)    # contract (4, 5), batch 2
  dims = (((2, 3), (2, 0)), ((0,), (1,)))
  got = np.asarray(C.chunked_dot_general(lhs, rhs, dims, acc_fmt=F.E6M9, chunk_size=7))
  assert got.shape == lax.dot_general(lhs, rhs, dims).shape == (2, 3, 6)
  for bi in range(2):
    a = lhs[bi].reshape(3, 20)
    b = np.transpose(rhs[:, bi], (1, 0, 2)).reshape(20, 6)
    np.testing.assert_array_equal(got[bi], ref.chunked_dot(a, b, F.FP32, F.E6M9, 7))
  # fp32 accumulation is an ordinary dot product
  exact = C.chunked_dot_general(lhs, rhs, dims, acc_fmt=F.FP32, chunk_size=7)
  np.testing.assert_allclose(exact, lax.dot_general(lhs, rhs, dims, precision='highest'), rtol=1e-6)


def test_chunking_beats_swamping():
  """1 + 2^-12 * 4096 terms: sequential e6m9 accumulation swamps, chunks of 64 do not."""
  a = np.full((1, 4096), 2.0 ** -10, np.float32)
  b = np.ones((4096, 1), np.float32)
  dims = (((1,), (0,)), ((), ()))
  seq = C.chunked_dot_general(a, b, dims, acc_fmt=F.E6M9, chunk_size=1)
  chunked = C.chunked_dot_general(a, b, dims, acc_fmt=F.E6M9, chunk_size=64)
  assert float(seq[0, 0]) == 2.0 ** -10 * 2 ** 10  # stalls at 1: 2^-10 is half an ulp there
  assert float(chunked[0, 0]) == 4.0


def test_stochastic_accumulation_is_unbiased_on_average():
  a = np.full((1, 2048), 2.0 ** -10, np.float32)
  b = np.ones((2048, 1), np.float32)
  f = jax.jit(jax.vmap(lambda k: C.chunked_dot_general(
      a, b, (((1,), (0,)), ((), ())), acc_fmt=F.E6M9, chunk_size=1, rounding='stochastic', key=k)))
  out = np.asarray(f(jax.random.split(jax.random.key(0), 64)))
  assert abs(out.mean() - 2.0) < 0.05 and out.std() > 0


def test_additions_are_correctly_rounded_where_float32_would_double_round():
  """(1 + 2^-9) + (2^-10 - 2^-24): float32 rounds onto the e6m9 midpoint, which then ties
  up to 1 + 2^-8; the exact sum lies below it, so the right answer is 1 + 2^-9."""
  a = np.array([[1 + 2.0 ** -9, 2.0 ** -10 * (1 - 2.0 ** -7)]], np.float32)
  b = np.array([[1.0], [1 + 2.0 ** -7]], np.float32)
  for run in (lambda f: f, jax.jit):   # XLA must not simplify the TwoSum away
    got = run(lambda a, b: C.chunked_dot_general(a, b, (((1,), (0,)), ((), ())), acc_fmt=F.E6M9,
                                                 chunk_size=64))(a, b)
    assert float(got[0, 0]) == 1 + 2.0 ** -9
  assert float(F.quantize(np.float32(a[0, 0] + a[0, 1] * b[1, 0]), F.E6M9)) == 1 + 2.0 ** -8
