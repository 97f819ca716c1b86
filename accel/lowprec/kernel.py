"""Pallas GPU kernels (Triton) for the chunked matmul of chunked.py: C_MxN = A_MxK @ B_KxN.

'exact': each program owns a (block_m, block_n) tile of C and walks K in order, keeping
the chunk sum and the running total in registers; every product is rounded to mul_fmt and
every addition to acc_fmt, as `chunked_dot_general(mode='exact')` with nearest rounding,
bit for bit. The tile is held as (R, C, Tm, Tn) with m = r*Tm + tm, n = c*Tn + tn: Triton's
default layout then puts one thread on each (tm, tn) and gives it an R x C sub-tile, so an
element step loads R values of A and C of B (straight from L1: fewer elements than threads
keeps Triton from staging them through shared memory) for R*C multiply-adds.
Where the operands' products lie on the accumulator's subnormal grid and a run-time bound
on their magnitudes rules out overflow (FP8 operands into e6m9 or fp16), each rounding is
the Veltkamp split `rounding.round_mantissa`; with float32 products (exact for FP8
operands) a multiply-add is then 4 float32 instructions:

  x = fma(a, b, part);  c = fma(x, 2^s, x);  d = c - x;  part = c - d     (s = 23 - m)

(`Tiling.ptx` writes them as PTX, so that no compiler setting can split the FMAs);
otherwise every rounding is `rounding.round_nearest` (integer bit operations).

'fast': each chunk is one matrix-unit dot (bf16 operands, which hold every supported
operand format exactly, so every product is exact; float32 accumulation),
rounded to acc_fmt and added to the running total in acc_fmt: 7 float32 instructions per
output and chunk with the Veltkamp rounding. `Tiling.schedule` orders the dots and the
roundings: 'serial' rounds each chunk after its dot; the others issue a chunk's dot before
the previous chunk is rounded, so that the matrix units and the rounding overlap. Triton
runs a dot asynchronously only if the loop does not read its result before the next
iteration's first wait for all dots (the rules of its wgmma pipelining); 'pairs' takes two
chunks per iteration, the first of whose dots Triton waits for at once (it runs alone),
'fence' one chunk per iteration behind a 'fence': a tiny dot (block_m x 16 x 16 of the
chunk's operands) whose wait, at the top of the iteration, also completes the previous
chunk's dot, which thus runs while that chunk's predecessor is rounded. On one H200
'fence' lost to 'pairs' (29.7% against 41.1% of native bf16 at 4096,
results/bench_lowprec_gpu_schedules.md): kept for the sweep, not the default.
`Tiling.backend='mosaic'` runs 'fast' as kernel_mosaic.py's Mosaic GPU kernel instead
(Hopper), whose waits for the matrix units are explicit.
The chunk sums equal the JAX path's float32 chunk sums, hence the results are bit-identical,
wherever every chunk's sum of products is exact in float32 (e.g. e5m2 operands whose
exponents span at most 6 binades: products on a 2^q grid, chunk sums below 2^(q+24));
elsewhere a chunk sum may differ in its last float32 bits by the order (and, for the
matrix units, the alignment) of its additions, which can change the rounded chunk sum.

Only round-to-nearest accumulators whose float32 sum-then-round is already correct
(`rounding.needs_sticky` false: acc_fmt of at most 11 significant bits, products no wider)
are supported; the JAX path in chunked.py covers everything else and runs on every
backend. On CPU the kernels run with `interpret=True` (the tests), the PTX as jnp.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from accel.lowprec import kernel_mosaic
from accel.lowprec.formats import FP32, FloatFormat, get_format
from accel.lowprec.rounding import (needs_sticky, on_subnormal_grid, product_bits, range_ok,
                                     round_mantissa, round_nearest)


@dataclasses.dataclass(frozen=True)
class Tiling:
  """How a kernel cuts C into programs and schedules them (experiments/bench_lowprec.py
  sweeps these on the GPU). threads_n and unroll apply to 'exact', schedule to
  'fast'; num_warps * 32 threads, num_stages of software pipelining (Triton)."""
  block_m: int = 128
  block_n: int = 128
  num_warps: int = 8
  num_stages: int = 1
  threads_n: int = 16        # exact: threads along N (Tn); Tm = 32 * num_warps / Tn along M
  unroll: int = 8            # exact: K elements per loop iteration
  schedule: str = 'pairs'    # fast: 'serial' | 'pairs' | 'fence' (module docstring)
  ptx: bool = True           # the in-range rounding as explicit fma.rn / sub.rn
  backend: str = 'triton'    # fast: 'triton' | 'mosaic' (kernel_mosaic.py: Hopper only;
                             # block_m / 64 compute warpgroups, schedule 'serial' | 'pairs' |
                             # 'carried' | 'pingpong')
  persistent: bool = False   # mosaic: one CTA per multiprocessor looping over the tiles


# The best bit-identical tiling of each mode in bench_lowprec's sweep on one H200
# (results/bench_lowprec_gpu.md, 4096 and 8192): exact 64x128, 4 warps, 16 threads along N,
# unroll 8 (22.6% / 24.5% of native float32); fast 128x128, 8 warps, 3 stages, overlapped
# (38.9% / 35.4% of native bf16).
DEFAULT_TILING = {
    'exact': Tiling(64, 128, num_warps=4, num_stages=1, threads_n=16, unroll=8),
    'fast': Tiling(128, 128, num_warps=8, num_stages=3, schedule='pairs'),
}
# 'fast' on Hopper where C has at least a block of rows and columns: the Mosaic GPU kernel
# (43.6% / 41.0% of native bf16 at 4096 / 8192 on one H200 against the Triton kernel's
# 39.3% / 35.1% in the same run, results/bench_lowprec_gpu_mosaic.md), 'carried' on a
# persistent grid: on one H100 48.6% / 44.5%, the best of the run, against 46.6% / 43.2%
# for 'pairs', 3 stages, one CTA per tile (results/bench_lowprec_gpu_persistent.md).
MOSAIC_CHUNK = 64    # the chunk length the Mosaic kernel was measured with
HOPPER_FAST_TILING = Tiling(128, 128, num_warps=8, num_stages=2, schedule='carried',
                            backend='mosaic', persistent=True)


def on_hopper() -> bool:
  """Whether the default device is a Hopper GPU (compute capability 9.x)."""
  device = jax.devices()[0]
  capability = str(getattr(device, 'compute_capability', ''))
  return device.platform == 'gpu' and capability.startswith('9')


def default_tiling(mode: str, m: int, n: int, chunk: int = 64) -> Tiling:
  """DEFAULT_TILING[mode] with its blocks shrunk to small problems (a conv's 16 output
  channels would otherwise fill a 128-wide block with padding); HOPPER_FAST_TILING for
  'fast' on a Hopper GPU when m and n fill its block and chunks are MOSAIC_CHUNK long (the
  length measured; a conv's K of 16 channels, chunks of 16, failed Mosaic's layout
  inference on the H200)."""
  t = DEFAULT_TILING[mode]
  h = HOPPER_FAST_TILING
  if (mode == 'fast' and m >= h.block_m and n >= h.block_n and chunk == MOSAIC_CHUNK
      and on_hopper()):
    return h
  pow2 = lambda x: 1 << max(0, x - 1).bit_length()
  if mode == 'exact':
    block_n = min(t.block_n, max(8, pow2(n)))
    threads_n = min(t.threads_n, block_n)
    warps = t.num_warps
    while warps > 1 and 32 * warps // threads_n > max(8, pow2(m)):
      warps //= 2
    block_m = min(t.block_m, max(32 * warps // threads_n, pow2(m)))
    return dataclasses.replace(t, block_m=block_m, block_n=block_n, num_warps=warps,
                               threads_n=threads_n)
  block_n = min(t.block_n, max(16, pow2(n)))
  block_m = min(t.block_m, max(64, pow2(m)))
  return dataclasses.replace(t, block_m=block_m, block_n=block_n,
                             num_warps=min(t.num_warps, 4 * block_m // 64))


def matrix_unit_chunk(chunk: int) -> bool:
  """Whether 'fast' can give a chunk to the matrix units (a power of two >= 16)."""
  return chunk >= 16 and chunk & (chunk - 1) == 0


def supported(operand_fmt, mul_fmt, acc_fmt, rounding: str = 'nearest') -> bool:
  """Whether the kernels implement these settings (else use the JAX path)."""
  operand_fmt, mul_fmt, acc_fmt = (get_format(f) for f in (operand_fmt, mul_fmt, acc_fmt))
  return rounding == 'nearest' and not needs_sticky(acc_fmt, product_bits(operand_fmt, mul_fmt))


def _hex(x: float) -> str:
  return '0f' + format(np.float32(x).view(np.uint32), '08X')


def _ptx(asm: str, *args):
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
  shape = jnp.broadcast_shapes(*(a.shape for a in args))
  args = [jnp.broadcast_to(a, shape) for a in args]
  [out] = pltriton.elementwise_inline_asm(
      asm, args=args, constraints='=f' + ',f' * len(args), pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)])
  return out


def _veltkamp_ptx(fmt: FloatFormat, x: str, out: str) -> str:
  """PTX: out = round_mantissa(x, fmt), i.e. c = fma(x, 2^s, x); out = c - (c - x)."""
  return (f' fma.rn.f32 c, {x}, {_hex(2.0 ** (23 - fmt.man_bits))}, {x};\n'
          f' sub.rn.f32 d, c, {x};\n sub.rn.f32 {out}, c, d;\n')


def _rounded_ops(in_range: bool, ptx: bool, mul_fmt: FloatFormat, acc_fmt: FloatFormat):
  """mul_add(part, a, b) = rnd_acc(part + rnd_mul(a b)), add(x, y) = rnd_acc(x + y) and
  fold(total, part) = add(total, rnd_acc(part)), rnd the Veltkamp split when in_range."""
  if in_range and ptx and mul_fmt.is_float32 and not acc_fmt.is_float32:
    regs = '{ .reg .f32 x, p, c, d;\n'
    mul_add = lambda part, a, b: _ptx(
        regs + ' fma.rn.f32 x, $2, $3, $1;\n' + _veltkamp_ptx(acc_fmt, 'x', '$0') + '}',
        part, a, b)
    add = lambda x, y: _ptx(
        regs + ' add.rn.f32 x, $1, $2;\n' + _veltkamp_ptx(acc_fmt, 'x', '$0') + '}', x, y)
    fold = lambda total, part: _ptx(
        regs + _veltkamp_ptx(acc_fmt, '$2', 'p') + ' add.rn.f32 x, $1, p;\n' +
        _veltkamp_ptx(acc_fmt, 'x', '$0') + '}', total, part)
    return mul_add, add, fold
  rnd = round_mantissa if in_range else round_nearest
  add = lambda x, y: rnd(x + y, acc_fmt)
  return (lambda part, a, b: add(part, rnd(a * b, mul_fmt)), add,
          lambda total, part: add(total, rnd(part, acc_fmt)))


def _exact_kernel(a_ref, b_ref, o_ref, *, num_chunks, chunk, unroll, mul_add, add):
  """a_ref: A^T as (K, R, Tm); b_ref: B as (K, C, Tn); o_ref: the tile as (R, C, Tm, Tn)."""
  def element(k, part):
    return mul_add(part, a_ref[k][:, None, :, None], b_ref[k][None, :, None, :])

  def chunk_body(c, total):
    # `unroll` elements per loop iteration, written out (Triton lowers no unrolled scan).
    def group(g, part):
      for u in range(unroll):
        part = element(c * chunk + g * unroll + u, part)
      return part
    part = lax.fori_loop(0, chunk // unroll, group, jnp.zeros(o_ref.shape, jnp.float32))
    for r in range(chunk % unroll):
      part = element(c * chunk + (chunk // unroll) * unroll + r, part)
    return add(total, part)

  o_ref[...] = lax.fori_loop(0, num_chunks, chunk_body, jnp.zeros(o_ref.shape, jnp.float32))


SCHEDULES = ('serial', 'pairs', 'fence')
BACKENDS = ('triton', 'mosaic')
FENCE_N = 16   # the fence dot's N and K


def _fast_kernel(a_ref, b_ref, o_ref, *probe_ref, num_chunks, chunk, schedule, fold):
  """probe_ref: with schedule 'fence', the fence dots' running maximum (block_m, FENCE_N),
  written out so that no compiler removes the fence."""
  def dot(c):
    a = a_ref[:, pl.ds(c * chunk, chunk)]
    b = b_ref[pl.ds(c * chunk, chunk), :]
    return jnp.dot(a, b, preferred_element_type=jnp.float32)

  zeros = jnp.zeros(o_ref.shape, jnp.float32)
  if schedule == 'serial':
    o_ref[...] = lax.fori_loop(0, num_chunks, lambda c, total: fold(total, dot(c)), zeros)
    return

  if schedule == 'fence':
    [probe_ref] = probe_ref
    n = probe_ref.shape[1]

    def fence(c, probe):
      a = a_ref[:, pl.ds(c * chunk, FENCE_N)]
      b = b_ref[pl.ds(c * chunk, FENCE_N), pl.ds(0, n)]
      # maximum, not +: Triton would fold `probe + dot` into an accumulating dot, which it
      # runs asynchronously (no wait).
      return jnp.maximum(probe, jnp.dot(a, b, preferred_element_type=jnp.float32))

    def body(c, carry):
      total, part, probe = carry
      probe = fence(c, probe)    # waits for every dot in flight: the previous chunk's
      nxt = dot(c)               # runs while `part` (chunk c - 1) is rounded
      return fold(total, part), nxt, probe

    init = (zeros, dot(0), jnp.full(probe_ref.shape, -jnp.inf, jnp.float32))
    total, part, probe = lax.fori_loop(1, num_chunks, body, init)
    o_ref[...] = fold(total, part)
    probe_ref[...] = probe
    return

  # 'pairs': two chunks per iteration, so that the two chunk sums swap roles without copies.
  def pair(i, carry):
    total, part = carry
    nxt = dot(2 * i + 1)
    total = fold(total, part)
    part = dot(2 * i + 2)
    return fold(total, nxt), part

  total, part = lax.fori_loop(0, (num_chunks - 1) // 2, pair, (zeros, dot(0)))
  if num_chunks % 2 == 0:
    total, part = fold(total, part), dot(num_chunks - 1)
  o_ref[...] = fold(total, part)


def mosaic_in_range(a_bf16: jax.Array, b_bf16: jax.Array, *, tiling: Tiling,
                    acc_fmt: FloatFormat = FloatFormat(6, 9), chunk_size: int = 64,
                    interpret: bool = False) -> jax.Array:
  """The Mosaic 'fast' kernel alone, as `chunked_matmul` runs it when the range check passes,
  on bf16 operands already padded to the tiling's blocks: the kernel's own rate, without
  chunked_matmul's cast to bf16, range check and branch (bench_lowprec's 'kernel only' rows;
  experiments/profile_lowprec_kernel.py)."""
  return _mosaic(a_bf16, b_bf16, tiling, get_format(acc_fmt), chunk_size, True, interpret)


def _mosaic(a_bf16, b_bf16, t: Tiling, acc_fmt: FloatFormat, chunk: int, in_range: bool,
            interpret: bool) -> jax.Array:
  """kernel_mosaic.fast_matmul with tiling t and the fold of acc_fmt (in_range: the
  Veltkamp rounding, else the integer one)."""
  *_, fold = _rounded_ops(in_range, False, FP32, acc_fmt)
  return kernel_mosaic.fast_matmul(a_bf16, b_bf16, block_m=t.block_m, block_n=t.block_n,
                                   stages=t.num_stages, schedule=t.schedule, chunk=chunk,
                                   fold=fold, persistent=t.persistent, interpret=interpret)


def _pad_to(x, multiples):
  return jnp.pad(x, [(0, -d % m) for d, m in zip(x.shape, multiples)])


@functools.partial(jax.jit, static_argnames=('mul_fmt', 'acc_fmt', 'chunk_size', 'mode',
                                             'operand_fmt', 'tiling', 'interpret'))
def chunked_matmul(a_MxK: jax.Array, b_KxN: jax.Array, *, mul_fmt: FloatFormat = FP32,
                   acc_fmt: FloatFormat = FloatFormat(6, 9), chunk_size: int = 64,
                   mode: str = 'exact', operand_fmt: FloatFormat = FP32,
                   tiling: Tiling | None = None, interpret: bool = False) -> jax.Array:
  """C = A @ B with chunk-based accumulation (module docstring); float32 result.

  operand_fmt: the format A and B already hold (it bounds the products' width and picks
  the matrix units' operand type). K is zero-padded to a multiple of chunk_size, M and N
  to the block sizes. The cheap in-range rounding is chosen at run time (`range_ok`).
  tiling: `default_tiling(mode, M, N)` when None.
  """
  mul_fmt, acc_fmt = get_format(mul_fmt), get_format(acc_fmt)
  operand_fmt = get_format(operand_fmt)
  if mode not in ('exact', 'fast'):
    raise ValueError(f'mode must be exact or fast, got {mode!r}')
  if not supported(operand_fmt, mul_fmt, acc_fmt):
    raise ValueError(f'the kernel does not support operands {operand_fmt} / mul {mul_fmt} / '
                     f'acc {acc_fmt}')
  m, k = a_MxK.shape
  n = b_KxN.shape[1]
  chunk = max(1, min(chunk_size, k))
  t = tiling or default_tiling(mode, m, n, chunk)
  mosaic = mode == 'fast' and t.backend == 'mosaic'
  k_multiple = chunk * (kernel_mosaic.chunks_per_step(t.schedule) if mosaic else 1)
  # 'fast' reads bf16 operands (exact for its operand formats, checked below): cast first,
  # so that the range check reads the bf16 copy (one pass over the float32 operands).
  dtype = jnp.bfloat16 if mode == 'fast' else jnp.float32
  a = _pad_to(a_MxK.astype(dtype), (t.block_m, k_multiple))
  b = _pad_to(b_KxN.astype(dtype), (k_multiple, t.block_n))
  mp, kp = a.shape
  np_ = b.shape[1]
  grid = (mp // t.block_m, np_ // t.block_n)
  params = dict(compiler_params=None if interpret else _triton_params(t), interpret=interpret)
  ptx = t.ptx and not interpret

  if mode == 'exact':
    tm = 32 * t.num_warps // t.threads_n
    if t.block_m % tm or t.block_n % t.threads_n:
      raise ValueError(f'{t}: block_m must be a multiple of 32 * num_warps / threads_n = {tm} '
                       f'and block_n of threads_n')
    rows, cols = t.block_m // tm, t.block_n // t.threads_n
    a_KxMtxRxTm = a.T.reshape(kp, grid[0], rows, tm)
    b_KxNtxCxTn = b.reshape(kp, grid[1], cols, t.threads_n)

    def call(in_range):
      mul_add, add, _ = _rounded_ops(in_range, ptx, mul_fmt, acc_fmt)
      # The integer rounding path is slow anyway: no unrolling keeps its compile short.
      kernel = functools.partial(_exact_kernel, num_chunks=kp // chunk, chunk=chunk,
                                 unroll=t.unroll if in_range else 1, mul_add=mul_add, add=add)
      out = pl.pallas_call(
          kernel, grid=grid,
          out_shape=jax.ShapeDtypeStruct((*grid, rows, cols, tm, t.threads_n), jnp.float32),
          in_specs=[pl.BlockSpec((kp, pl.squeezed, rows, tm), lambda i, j: (0, i, 0, 0)),
                    pl.BlockSpec((kp, pl.squeezed, cols, t.threads_n), lambda i, j: (0, j, 0, 0))],
          out_specs=pl.BlockSpec((pl.squeezed, pl.squeezed, rows, cols, tm, t.threads_n),
                                 lambda i, j: (i, j, 0, 0, 0, 0)),
          **params)(a_KxMtxRxTm, b_KxNtxCxTn)
      return out.transpose(0, 2, 4, 1, 3, 5).reshape(mp, np_)
  else:
    if not matrix_unit_chunk(chunk):
      raise ValueError(f"'fast' chunks must be a power of two >= 16, got {chunk}")
    if operand_fmt.exp_bits > 8 or operand_fmt.man_bits > 7:
      raise ValueError(f'bf16 matrix units do not hold {operand_fmt} operands exactly')
    mul_fmt = FP32

    if t.backend not in BACKENDS:
      raise ValueError(f'backend must be one of {BACKENDS}, got {t.backend!r}')
    if mosaic and t.num_warps != 4 * (t.block_m // kernel_mosaic.WG_ROWS):
      raise ValueError(f'{t}: the Mosaic kernel runs 4 warps per {kernel_mosaic.WG_ROWS} rows '
                       f'of block_m')
    if not mosaic and t.schedule not in SCHEDULES:   # kernel_mosaic checks its own
      raise ValueError(f'schedule must be one of {SCHEDULES}, got {t.schedule!r}')
    out_shape = [jax.ShapeDtypeStruct((mp, np_), jnp.float32)]
    out_specs = [pl.BlockSpec((t.block_m, t.block_n), lambda i, j: (i, j))]
    if t.schedule == 'fence':
      probe_n = min(FENCE_N, t.block_n)
      out_shape.append(jax.ShapeDtypeStruct((mp, grid[1] * probe_n), jnp.float32))
      out_specs.append(pl.BlockSpec((t.block_m, probe_n), lambda i, j: (i, j)))

    def call(in_range):
      if mosaic:
        return _mosaic(a, b, t, acc_fmt, chunk, in_range, interpret)
      *_, fold = _rounded_ops(in_range, ptx, FP32, acc_fmt)
      kernel = functools.partial(_fast_kernel, num_chunks=kp // chunk, chunk=chunk,
                                 schedule=t.schedule, fold=fold)
      return pl.pallas_call(
          kernel, grid=grid, out_shape=out_shape,
          in_specs=[pl.BlockSpec((t.block_m, kp), lambda i, j: (i, 0)),
                    pl.BlockSpec((kp, t.block_n), lambda i, j: (0, j))],
          out_specs=out_specs,
          **params)(a, b)[0]

  if on_subnormal_grid(operand_fmt, mul_fmt, acc_fmt):
    out = lax.cond(range_ok(a, b, k, mul_fmt, acc_fmt), lambda: call(True), lambda: call(False))
  else:
    out = call(False)
  return out[:m, :n]


def _triton_params(t: Tiling):
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
  return pltriton.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)
