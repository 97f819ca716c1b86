"""The three GEMMs of a layer in emulated low precision, as Flax `dot_general` /
`conv_general_dilated` hooks (Wang et al. 2018, papers.md section 3).

For y = a @ w (a_MxK activations or patches, w_KxN weights) and the error g = dL/dy:

  forward          y  = chunked(Q_f(a)   @ Q_f(w))     contracts K (fan-in)
  backward-data    da = chunked(Q_d(g)   @ Q_d(w)^T)   contracts N (fan-out)
  weight-gradient  dw = chunked(Q_w(a)^T @ Q_w(g))     contracts M (batch x spatial)

each with its own operand format Q, product and accumulation formats, chunk size, mode
and rounding (`GemmSettings`); a custom_vjp ties them together (the operand rounding is
passed straight through in the backward pass). Stochastic rounding of operands or sums
needs random bits the hook's signature has no room for: they come from a key folded from
`seed`, the GEMM's role and a hash of its operand bits, so they change with the data.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from accel.lowprec.chunked import canonical_operands, chunked_dot_general
from accel.lowprec.formats import FloatFormat, get_format, quantize

_MATMUL = (((1,), (0,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class GemmSettings:
  """Numerics of one GEMM; formats by name ('e5m2', 'e4m3', 'e6m9', 'fp16', 'bf16', 'fp32')."""
  operand_fmt: str | FloatFormat = 'e5m2'
  acc_fmt: str | FloatFormat = 'e6m9'
  mul_fmt: str | FloatFormat = 'fp32'
  chunk_size: int = 64
  mode: str = 'exact'            # 'exact' | 'fast' (chunked.py)
  rounding: str = 'nearest'      # of the operands and of every addition
  impl: str = 'jax'              # 'jax' | 'pallas' (GPU kernel, chunked.py; TPU: jax) | 'auto'
                                 # (pallas on a GPU where kernel.supported, else jax)


@dataclasses.dataclass(frozen=True)
class LayerSettings:
  """The forward, backward-data and weight-gradient GEMMs of a layer."""
  fwd: GemmSettings = GemmSettings()
  bwd_data: GemmSettings = GemmSettings()
  bwd_weight: GemmSettings = GemmSettings()
  seed: int = 0


def _data_key(seed: int, role: int, *arrays) -> jax.Array:
  h = jnp.uint32(0)
  for x in arrays:
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    h = h * jnp.uint32(0x9E3779B1) + jnp.sum(bits * jnp.uint32(0x85EBCA6B) + jnp.uint32(role))
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), role), h)


def _gemm(a, b, dims, s: GemmSettings, seed: int, role: int):
  """Q(a), Q(b), then the chunked product (operands rounded with s.rounding)."""
  fmt = get_format(s.operand_fmt)
  stochastic = s.rounding == 'stochastic'
  key = _data_key(seed, role, a, b) if stochastic else None
  ka, kb, kacc = jax.random.split(key, 3) if stochastic else (None, None, None)
  qa = quantize(a, fmt, s.rounding, ka)
  qb = quantize(b, fmt, s.rounding, kb)

  def product(impl):
    return lambda qa, qb: chunked_dot_general(
        qa, qb, dims, operand_fmt=fmt, mul_fmt=s.mul_fmt, acc_fmt=s.acc_fmt,
        chunk_size=s.chunk_size, mode=s.mode, rounding=s.rounding, key=kacc, impl=impl)
  impl = s.impl
  if impl == 'auto':
    impl = 'pallas' if jax.default_backend() == 'gpu' and _kernels_support(s) else 'jax'
  if impl != 'pallas':
    return product(impl)(qa, qb)
  # The kernels are Pallas on Triton (GPU; interpreted on CPU), with no TPU lowering: a step
  # lowered for TPU takes the JAX path, chosen when the step is lowered for its platform.
  return lax.platform_dependent(qa, qb, tpu=product('jax'), default=product('pallas'))


def _kernels_support(s: GemmSettings) -> bool:
  from accel.lowprec import kernel  # pylint: disable=g-import-not-at-top (loads Pallas: 0.5 s)
  mul_fmt = 'fp32' if s.mode == 'fast' else s.mul_fmt
  return kernel.supported(get_format(s.operand_fmt), get_format(mul_fmt),
                          get_format(s.acc_fmt), s.rounding)


def _make_matmul(settings: LayerSettings):
  @jax.custom_vjp
  def matmul(a_MxK, w_KxN):
    return _gemm(a_MxK, w_KxN, _MATMUL, settings.fwd, settings.seed, 0)

  def fwd(a_MxK, w_KxN):
    return matmul(a_MxK, w_KxN), (a_MxK, w_KxN)

  def bwd(res, g_MxN):
    a_MxK, w_KxN = res
    da_MxK = _gemm(g_MxN, w_KxN, (((1,), (1,)), ((), ())), settings.bwd_data, settings.seed, 1)
    dw_KxN = _gemm(a_MxK, g_MxN, (((0,), (0,)), ((), ())), settings.bwd_weight, settings.seed, 2)
    return da_MxK.astype(a_MxK.dtype), dw_KxN.astype(w_KxN.dtype)

  matmul.defvjp(fwd, bwd)
  return matmul


@dataclasses.dataclass(frozen=True)
class LowPrecDotGeneral:
  """Drop-in for `lax.dot_general` (hand it to `nn.Dense(dot_general=...)`): lhs holds the
  activations, rhs the weights. Batch dimensions are vmapped over the same GEMMs."""
  settings: LayerSettings = LayerSettings()

  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    del precision
    out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype)
    lhs_BxMxK, rhs_BxKxN, out_shape = canonical_operands(
        lhs.astype(jnp.float32), rhs.astype(jnp.float32), dimension_numbers)
    matmul = _make_matmul(self.settings)
    if lhs_BxMxK.shape[0] == 1:
      out = matmul(lhs_BxMxK[0], rhs_BxKxN[0])
    else:
      out = jax.vmap(matmul)(lhs_BxMxK, rhs_BxKxN)
    return out.reshape(out_shape).astype(out_dtype)


@dataclasses.dataclass(frozen=True)
class LowPrecConv:
  """Drop-in for `lax.conv_general_dilated` (`nn.Conv(conv_general_dilated=...)`):
  im2col by `lax.conv_general_dilated_patches`, then the three GEMMs of
  `LowPrecDotGeneral` with K = in_channels * prod(window) ordered (channel, window).

  The backward-data GEMM yields the error of every patch; adding the overlapping patch
  errors back onto the input (the transpose of im2col) is done in float32.
  """
  settings: LayerSettings = LayerSettings()

  def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, batch_group_count=1,
               precision=None, preferred_element_type=None):
    if feature_group_count != 1 or batch_group_count != 1:
      raise ValueError('LowPrecConv supports feature_group_count = batch_group_count = 1')
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    nd = lhs.ndim - 2
    lhs_NxCxS = jnp.transpose(lhs, dn.lhs_spec)
    rhs_OxIxS = jnp.transpose(rhs, dn.rhs_spec)
    window = rhs_OxIxS.shape[2:]
    patches_NxKxS = lax.conv_general_dilated_patches(
        lhs_NxCxS.astype(jnp.float32), window, window_strides, padding,
        lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        precision=lax.Precision.HIGHEST)
    patches_NxSxK = jnp.moveaxis(patches_NxKxS, 1, -1)
    k = patches_NxSxK.shape[-1]
    w_KxO = rhs_OxIxS.reshape(rhs_OxIxS.shape[0], k).T
    dot = LowPrecDotGeneral(self.settings)
    out_NxSxO = dot(patches_NxSxK, w_KxO, (((nd + 1,), (0,)), ((), ())),
                    preferred_element_type=preferred_element_type or jnp.result_type(lhs, rhs))
    out_NxOxS = jnp.moveaxis(out_NxSxO, -1, 1)
    return jnp.transpose(out_NxOxS, _inverse(dn.out_spec))


def _inverse(perm):
  inv = [0] * len(perm)
  for i, p in enumerate(perm):
    inv[p] = i
  return tuple(inv)


def accumulation_lengths(lhs_shape, rhs_shape, dimension_numbers) -> dict[str, int]:
  """Lengths summed by the three GEMMs of a dot_general: fwd (fan-in K), bwd (fan-out N),
  grad (M: batch x spatial), for `accel.lowprec.vrr`."""
  (lc, rc), (lb, rb) = dimension_numbers
  k = math.prod(lhs_shape[d] for d in lc)
  m = math.prod(lhs_shape[d] for d in range(len(lhs_shape)) if d not in lc and d not in lb)
  n = math.prod(rhs_shape[d] for d in range(len(rhs_shape)) if d not in rc and d not in rb)
  return {'fwd': k, 'bwd': n, 'grad': m}
