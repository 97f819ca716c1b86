"""Binary floating-point formats narrower than float32, and rounding into them.

Values of every format are carried in float32 arrays: `quantize(x, fmt)` returns the
float32 number nearest to x (or a stochastic neighbour) that `fmt` can represent.
Rounding works on the float32 bit pattern with integer arithmetic only (no float64),
papers.md section 3: with s = 23 - m dropped mantissa bits,

  round to nearest even:  bits + (2^(s-1) - 1 + ((bits >> s) & 1)), low s bits cleared;
  stochastic rounding:    bits + uniform integer in [0, 2^s),        low s bits cleared,

so a carry out of the mantissa moves the exponent up by one, as it should. Below the
format's smallest normal number the spacing is fixed, 2^(e_min - m) (subnormals) or
2^e_min (no subnormals: values round to 0 or +-min_normal), and the same two rules
are applied to the significand with a larger shift. Results beyond the largest finite
value saturate to it or become inf (`overflow`); NaN stays NaN.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_SIGN = np.uint32(0x80000000)
_ABS = np.uint32(0x7FFFFFFF)
_INF_BITS = np.uint32(0x7F800000)


@dataclasses.dataclass(frozen=True)
class FloatFormat:
  """Sign, `exp_bits` exponent bits (bias 2^(exp_bits-1) - 1) and `man_bits` mantissa bits.

  finite_only: the top exponent code holds finite numbers too (only the all-ones
    mantissa is NaN), as in float8_e4m3fn; IEEE-style formats reserve it for inf/NaN.
  overflow: 'saturate' (results beyond max become +-max, inf inputs too) or 'inf'.
  """
  exp_bits: int
  man_bits: int
  subnormals: bool = True
  overflow: str = 'inf'
  finite_only: bool = False

  def __post_init__(self):
    if not (2 <= self.exp_bits <= 8 and 0 <= self.man_bits <= 23):
      raise ValueError(f'unsupported format {self}')
    if self.overflow not in ('saturate', 'inf'):
      raise ValueError(f'overflow must be saturate or inf, got {self.overflow!r}')
    if self.finite_only and self.overflow == 'inf':
      raise ValueError('a finite_only format has no inf: use overflow="saturate"')

  @property
  def bias(self) -> int:
    return 2 ** (self.exp_bits - 1) - 1

  @property
  def emin(self) -> int:
    """Exponent of the smallest normal number."""
    return 1 - self.bias

  @property
  def emax(self) -> int:
    return self.bias + (1 if self.finite_only else 0)

  @property
  def max(self) -> float:
    """Largest finite value: finite_only formats lose the all-ones mantissa to NaN."""
    top_mantissa = 2 - 2.0 ** (1 - self.man_bits) if self.finite_only else 2 - 2.0 ** -self.man_bits
    return float(np.ldexp(top_mantissa, self.emax))

  @property
  def min_normal(self) -> float:
    return float(np.ldexp(1.0, self.emin))

  @property
  def min_positive(self) -> float:
    return float(np.ldexp(1.0, self.emin - (self.man_bits if self.subnormals else 0)))

  @property
  def significant_bits(self) -> int:
    return self.man_bits + 1

  @property
  def is_float32(self) -> bool:
    return self == FP32

  @property
  def max_bits(self) -> np.uint32:
    return np.array(self.max, np.float32).view(np.uint32)


E5M2 = FloatFormat(5, 2)                                   # ml_dtypes.float8_e5m2
E4M3 = FloatFormat(4, 3, overflow='saturate', finite_only=True)  # float8_e4m3fn, saturating
E6M9 = FloatFormat(6, 9)                                   # Wang et al.'s 1-6-9 accumulator
FP16 = FloatFormat(5, 10)
BF16 = FloatFormat(8, 7)
FP32 = FloatFormat(8, 23)

FORMATS = {'e5m2': E5M2, 'e4m3': E4M3, 'e6m9': E6M9, 'fp16': FP16, 'bf16': BF16,
           'fp32': FP32}


def get_format(name_or_fmt: str | FloatFormat) -> FloatFormat:
  """A FloatFormat by name ('e5m2', 'e4m3', 'e6m9', 'fp16', 'bf16', 'fp32') or as given."""
  if isinstance(name_or_fmt, FloatFormat):
    return name_or_fmt
  return FORMATS[name_or_fmt]


def _round_shift(v, shift, rand, rounding):
  """v rounded at bit `shift` (low `shift` bits cleared), nearest-even or stochastic.

  v: uint32 with room for the carry; shift: uint32 in [0, 31]; rand: uint32 or None.
  """
  one = jnp.uint32(1)
  mask = (one << shift) - one
  if rounding == 'nearest':
    half_minus_1 = jnp.where(shift > 0, (one << (shift - one)) - one, 0).astype(jnp.uint32)
    inc = half_minus_1 + ((v >> shift) & one)
    inc = jnp.where(shift > 0, inc, jnp.uint32(0))
  else:
    inc = rand & mask
  return (v + inc) & ~mask


def quantize(x: jax.Array, fmt: str | FloatFormat, rounding: str = 'nearest',
             key: jax.Array | None = None) -> jax.Array:
  """float32 array of the values of `fmt` nearest to x ('nearest', ties to even) or one of
  the two neighbours of x with probabilities making E[result] = x ('stochastic', needs key).
  """
  fmt = get_format(fmt)
  x = jnp.asarray(x, jnp.float32)
  if rounding not in ('nearest', 'stochastic'):
    raise ValueError(f'rounding must be nearest or stochastic, got {rounding!r}')
  if fmt.is_float32:
    return x
  rand = None
  if rounding == 'stochastic':
    if key is None:
      raise ValueError('stochastic rounding needs a key')
    rand = jax.random.bits(key, x.shape, jnp.uint32)
  bits = lax.bitcast_convert_type(x, jnp.uint32)
  sign = bits & _SIGN
  mag = bits & _ABS
  s = 23 - fmt.man_bits
  # Normal range of the format (and, for 8-bit exponents with subnormals, everything:
  # float32's own subnormals are then spaced linearly in the bit pattern).
  rounded = _round_shift(mag, jnp.uint32(s), rand, rounding)
  linear_below = fmt.exp_bits == 8 and fmt.subnormals
  if not linear_below:
    exp_field = (mag >> 23).astype(jnp.int32)
    sig = (mag & np.uint32(0x7FFFFF)) | jnp.where(exp_field > 0, np.uint32(0x800000), 0).astype(jnp.uint32)
    ex = jnp.maximum(exp_field, 1) - 127               # exponent of x's leading bit slot
    sub_man = fmt.man_bits if fmt.subnormals else 0
    quantum_exp = fmt.emin - sub_man                     # spacing below min_normal
    shift = quantum_exp - (ex - 23)                      # >= 1 where ex < emin
    if rounding == 'nearest':
      r = _round_shift(sig, jnp.clip(shift, 0, 25).astype(jnp.uint32), None, 'nearest')
      r = jnp.where(shift >= 25, jnp.uint32(0), r >> jnp.clip(shift, 0, 25).astype(jnp.uint32))
    else:
      # Round up with probability (sig mod 2^shift) / 2^shift, resolved to 2^-32.
      sh = jnp.clip(shift, 0, 31).astype(jnp.uint32)
      low = sig & ((jnp.uint32(1) << sh) - jnp.uint32(1))
      low = jnp.where(shift >= 32, sig, low)
      thresh = jnp.where(shift <= 32, low << jnp.clip(32 - shift, 0, 31).astype(jnp.uint32),
                         low >> jnp.clip(shift - 32, 0, 31).astype(jnp.uint32))
      thresh = jnp.where(shift == 0, jnp.uint32(0), thresh)
      r = jnp.where(shift >= 32, 0, sig >> sh).astype(jnp.uint32) + (rand < thresh).astype(jnp.uint32)
    below = r.astype(jnp.float32) * np.float32(2.0 ** quantum_exp)
    below_bits = lax.bitcast_convert_type(below, jnp.uint32)
    rounded = jnp.where(ex < fmt.emin, below_bits, rounded)
  over = rounded > fmt.max_bits
  if fmt.overflow == 'saturate':
    rounded = jnp.where(over, fmt.max_bits, rounded)
  else:
    rounded = jnp.where(over, _INF_BITS, rounded)
  rounded = jnp.where(mag > _INF_BITS, mag, rounded)    # NaN stays NaN
  return lax.bitcast_convert_type(rounded | sign, jnp.float32)


def is_representable(x: jax.Array, fmt: str | FloatFormat) -> jax.Array:
  """True where x is a value of `fmt` (quantize leaves it unchanged)."""
  x = jnp.asarray(x, jnp.float32)
  return (quantize(x, fmt) == x) | jnp.isnan(x)
