"""accel.lowprec.formats against ml_dtypes casts and the statistics of stochastic rounding."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from accel.lowprec import formats as F


def _probe_values(fmt: F.FloatFormat, n=40000, seed=0):
  """float32 values over the whole range of fmt: random bit patterns, exact ties,
  neighbours of ties, subnormals and the region just below overflow."""
  rng = np.random.default_rng(seed)
  lo, hi = np.log2(fmt.min_positive) - 3, np.log2(fmt.max)
  mags = np.exp2(rng.uniform(lo, hi, n)).astype(np.float32)
  # Exact ties between neighbours of the format, and one float32 ulp either side.
  grid = np.exp2(rng.uniform(lo + 3, hi, n // 4)).astype(np.float32)
  grid = np.asarray(F.quantize(grid, fmt))
  step = np.exp2(np.floor(np.log2(np.maximum(grid, fmt.min_normal))) - fmt.man_bits)
  ties = (grid + step / 2).astype(np.float32)
  ties_bits = ties.view(np.uint32)
  near = np.concatenate([ties, (ties_bits + 1).view(np.float32), (ties_bits - 1).view(np.float32)])
  sub = (rng.integers(0, 2 ** (fmt.man_bits + 2), n // 4) * fmt.min_positive / 4).astype(np.float32)
  vals = np.concatenate([mags, near, sub, [0.0, fmt.min_normal, fmt.min_positive, fmt.max]])
  vals = vals[np.abs(vals) <= fmt.max].astype(np.float32)
  signs = rng.choice([-1.0, 1.0], vals.shape).astype(np.float32)
  return vals * signs


@pytest.mark.parametrize('fmt,dtype', [(F.FP16, np.float16), (F.BF16, ml_dtypes.bfloat16),
                                       (F.E5M2, ml_dtypes.float8_e5m2),
                                       (F.E4M3, ml_dtypes.float8_e4m3fn)])
def test_nearest_matches_ml_dtypes_bit_for_bit(fmt, dtype):
  x = _probe_values(fmt)
  if fmt is F.BF16:  # float32 subnormals too
    x = np.concatenate([x, (np.arange(1, 5000, dtype=np.uint32) * 997).view(np.float32)])
  want = x.astype(dtype).astype(np.float32)
  got = np.asarray(jax.jit(lambda v: F.quantize(v, fmt))(x))
  assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), x[got.view(np.uint32) != want.view(np.uint32)][:10]


def test_format_constants():
  assert F.E4M3.max == float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max) == 448
  assert F.E5M2.max == 57344 and F.FP16.max == 65504
  assert F.E6M9.max == (2 - 2 ** -9) * 2 ** 31 and F.E6M9.min_positive == 2.0 ** -39
  assert F.BF16.min_positive == 2.0 ** -133


def test_overflow_saturate_and_inf():
  x = np.array([500.0, -1e30, np.inf, 70000.0, np.nan], np.float32)
  e4 = np.asarray(F.quantize(x, F.E4M3))
  np.testing.assert_array_equal(e4[:3], [448, -448, 448])
  assert np.isnan(e4[4])
  e5 = np.asarray(F.quantize(x, F.E5M2))
  np.testing.assert_array_equal(e5[:4], [512, -np.inf, np.inf, np.inf])
  sat = F.FloatFormat(5, 2, overflow='saturate')
  np.testing.assert_array_equal(np.asarray(F.quantize(x, sat))[:4], [512, -57344, 57344, 57344])


def test_no_subnormals_rounds_to_zero_or_min_normal():
  fmt = F.FloatFormat(5, 2, subnormals=False)
  m = fmt.min_normal
  x = np.array([0.3 * m, 0.6 * m, -0.6 * m, 0.5 * m, 1.5 * m], np.float32)
  np.testing.assert_array_equal(np.asarray(F.quantize(x, fmt)), [0, m, -m, 0, 1.5 * m])


def test_e6m9_is_a_subset_of_fp16_precision_and_keeps_9_bits():
  x = np.linspace(1, 2, 1 << 12, dtype=np.float32)
  q = np.asarray(F.quantize(x, F.E6M9))
  assert len(np.unique(q)) == 2 ** 9 + 1
  assert np.all(np.abs(q - x) <= 2.0 ** -10)


@pytest.mark.parametrize('fmt', [F.E5M2, F.E6M9, F.BF16])
def test_stochastic_rounding_is_unbiased_and_stays_between_neighbours(fmt):
  rng = np.random.default_rng(1)
  base = np.concatenate([np.exp2(rng.uniform(np.log2(fmt.min_positive), np.log2(fmt.max) - 1, 48)),
                         rng.uniform(0, 4, 16) * fmt.min_positive]).astype(np.float32)
  base *= rng.choice([-1, 1], base.shape).astype(np.float32)
  reps = 4000
  keys = jax.random.split(jax.random.key(0), reps)
  q = np.asarray(jax.jit(jax.vmap(lambda k: F.quantize(base, fmt, 'stochastic', k)))(keys))
  down = np.asarray(F.quantize(base, fmt))  # nearest is one of the two neighbours
  lo_b = np.minimum(down, base)
  hi_b = np.maximum(down, base)
  # each sample is one of the two representable neighbours of x
  ulp = np.exp2(np.floor(np.log2(np.maximum(np.abs(base), fmt.min_normal))) - fmt.man_bits)
  assert np.all(np.abs(q - base) < ulp)
  assert np.all(np.asarray(F.is_representable(q.reshape(-1), fmt)))
  assert np.all((q >= lo_b - ulp) & (q <= hi_b + ulp))
  # unbiased: |mean - x| within 5 standard errors of a two-point distribution
  x64, ulp64 = base.astype(np.float64), ulp.astype(np.float64)
  p = np.abs(x64 - np.floor(x64 / ulp64) * ulp64) / ulp64
  se = ulp64 * np.sqrt(p * (1 - p) / reps)
  assert np.all(np.abs(q.astype(np.float64).mean(0) - x64) <= 5 * se + ulp64 * 1e-6)
  assert np.any(q.std(0) > 0)
