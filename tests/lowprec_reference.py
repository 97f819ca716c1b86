"""Exact-arithmetic reference for the low-precision tests: rationals, rounded by definition."""
from fractions import Fraction

import numpy as np


def round_nearest(x: Fraction, fmt) -> Fraction:
  """The value of fmt nearest to the rational x, ties to even mantissa; overflow per fmt."""
  if x == 0:
    return Fraction(0)
  sign = 1 if x > 0 else -1
  a = abs(x)
  e = a.numerator.bit_length() - a.denominator.bit_length()
  if Fraction(2) ** e > a:
    e -= 1                                   # now 2^e <= a < 2^(e+1)
  low = fmt.emin - (fmt.man_bits if fmt.subnormals else 0)
  quantum_exp = e - fmt.man_bits if e >= fmt.emin else low
  q = Fraction(2) ** quantum_exp
  r = a / q
  n = r.numerator // r.denominator
  frac = r - n
  if frac > Fraction(1, 2) or (frac == Fraction(1, 2) and n % 2 == 1):
    n += 1
  v = n * q
  if v > Fraction(fmt.max):
    if fmt.overflow != 'saturate':
      raise OverflowError('the reference keeps to finite values')
    v = Fraction(fmt.max)
  return sign * v


def chunked_dot(a_MxK: np.ndarray, b_KxN: np.ndarray, mul_fmt, acc_fmt, chunk: int,
                fast: bool = False) -> np.ndarray:
  """Loops over every output element, product and addition (Wang et al. Fig. 3a);
  fast: each chunk summed exactly, then rounded once."""
  m, k = a_MxK.shape
  n = b_KxN.shape[1]
  out = np.zeros((m, n), np.float32)
  for i in range(m):
    for j in range(n):
      total = Fraction(0)
      for start in range(0, k, chunk):
        part = Fraction(0)
        for t in range(start, min(start + chunk, k)):
          p = Fraction(float(a_MxK[i, t])) * Fraction(float(b_KxN[t, j]))
          part = part + p if fast else round_nearest(part + round_nearest(p, mul_fmt), acc_fmt)
        part = round_nearest(part, acc_fmt)
        total = round_nearest(total + part, acc_fmt)
      out[i, j] = float(total)
  return out
