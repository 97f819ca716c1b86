"""Pallas kernels (interpret mode on CPU) against the JAX path, bit for bit."""
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from accel.lowprec import chunked as C
from accel.lowprec import formats as F
from accel.lowprec import kernel as Kn
from accel.lowprec import rounding as R
from tests.test_lowprec_formats import _probe_values


@pytest.mark.parametrize('fmt', [F.E5M2, F.E4M3, F.E6M9, F.FP16, F.BF16,
                                 F.FloatFormat(5, 4, subnormals=False, overflow='saturate')])
def test_kernel_rounding_is_quantize(fmt):
  x = np.concatenate([_probe_values(fmt, n=8000), [np.inf, -np.inf, np.nan, 1e38, -3e38]]).astype(np.float32)
  got = np.asarray(jax.jit(lambda v: R.round_nearest(v, fmt))(x)).view(np.uint32)
  want = np.asarray(jax.jit(lambda v: F.quantize(v, fmt))(x)).view(np.uint32)
  np.testing.assert_array_equal(got, want)


def _operands(rng, shape, dtype, spread):
  x = rng.standard_normal(shape) * np.exp2(rng.uniform(-spread, spread, shape))
  return x.astype(np.float32).astype(dtype).astype(np.float32)


E5, E4 = ml_dtypes.float8_e5m2, ml_dtypes.float8_e4m3fn


# e6m9 with these spreads: the range check passes (3-flop rounding); fp16 with spread 6
# and the e4m3 case: it fails (general rounding). Both are compared with the JAX path.
@pytest.mark.parametrize('mode,chunk,acc,spread,dtype,op,mul', [
    ('exact', 1, F.E6M9, 6, E5, F.E5M2, F.FP32), ('exact', 8, F.E6M9, 6, E5, F.E5M2, F.FP32),
    ('exact', 64, F.FP16, 6, E5, F.E5M2, F.FP32), ('exact', 4, F.FP16, 4, E4, F.E4M3, F.E5M2),
    ('exact', 4, F.E6M9, 3, E4, F.E4M3, F.FloatFormat(5, 4)),
    ('fast', 32, F.E6M9, 3, E5, F.E5M2, F.FP32), ('fast', 16, F.BF16, 3, E5, F.E5M2, F.FP32),
    ('fast', 16, F.E6M9, 3, E5, F.E5M2, F.FP32)])
def test_kernel_matches_jax_path_in_interpret_mode(mode, chunk, acc, spread, dtype, op, mul):
  """Tiles of 2 x 2 per 'thread' (16 x 8 blocks, 32 threads, 4 along N), unrolled by 2;
  'fast' over 2 chunks in 'pairs', over 3 'serial' (bf16) and behind fences (e6m9)."""
  rng = np.random.default_rng(chunk)
  a, b = _operands(rng, (20, 40), dtype, spread), _operands(rng, (40, 12), dtype, spread)
  schedule = 'pairs' if chunk == 32 else 'serial' if acc == F.BF16 else 'fence'
  tiling = Kn.Tiling(block_m=16, block_n=8, num_warps=1, threads_n=4, unroll=2,
                     schedule=schedule)
  got = Kn.chunked_matmul(a, b, mul_fmt=mul, acc_fmt=acc, chunk_size=chunk, mode=mode,
                          operand_fmt=op, tiling=tiling, interpret=True)
  want = C.chunked_dot_general(a, b, (((1,), (0,)), ((), ())), operand_fmt=op, mul_fmt=mul,
                               acc_fmt=acc, chunk_size=chunk, mode=mode)
  assert got.shape == (20, 12)
  np.testing.assert_array_equal(np.asarray(got).view(np.uint32), np.asarray(want).view(np.uint32))


@pytest.mark.parametrize('acc,spread,schedule,persistent', [
    (F.E6M9, 3, 'pairs', False), (F.FP16, 6, 'serial', False), (F.E6M9, 3, 'carried', False),
    (F.E6M9, 3, 'carried', True), (F.E6M9, 3, 'pingpong', True)])
def test_mosaic_kernel_matches_jax_path_in_interpret_mode(acc, spread, schedule, persistent):
  """The Mosaic GPU 'fast' kernel (Mosaic's own interpreter) on 3 chunks, in range (e6m9;
  'pairs' pads K to 4 chunks) and on the general rounding path (fp16, spread 6); persistent:
  2 x 2 tiles of C, 2 chunks each, shared by the interpreter's 2 CTAs; 'pingpong' with its
  two compute warpgroups taking turns (128-row blocks)."""
  rng = np.random.default_rng(spread)
  block_m = 128 if schedule == 'pingpong' else 64
  m, k, n = (block_m + 6, 20, 20) if persistent else (20, 40, 12)
  a, b = _operands(rng, (m, k), E5, spread), _operands(rng, (k, n), E5, spread)
  tiling = Kn.Tiling(block_m=block_m, block_n=16, num_warps=block_m // 16, schedule=schedule,
                     backend='mosaic', persistent=persistent)
  got = Kn.chunked_matmul(a, b, acc_fmt=acc, chunk_size=16, mode='fast', operand_fmt=F.E5M2,
                          tiling=tiling, interpret=True)
  want = C.chunked_dot_general(a, b, (((1,), (0,)), ((), ())), operand_fmt=F.E5M2,
                               acc_fmt=acc, chunk_size=16, mode='fast')
  assert got.shape == (m, n)
  np.testing.assert_array_equal(np.asarray(got).view(np.uint32), np.asarray(want).view(np.uint32))
  if schedule == 'pairs':   # in range: the kernel alone (bench_lowprec's '_kernel_only') agrees
    pad = lambda x, multiples: Kn._pad_to(x.astype(jnp.bfloat16), multiples)
    alone = Kn.mosaic_in_range(pad(a, (64, 32)), pad(b, (32, 16)), tiling=tiling, acc_fmt=acc,
                               chunk_size=16, interpret=True)
    np.testing.assert_array_equal(np.asarray(alone[:20, :12]).view(np.uint32),
                                  np.asarray(want).view(np.uint32))


def test_mosaic_tile_order_covers_every_tile_once():
  from accel.lowprec import kernel_mosaic
  for m_tiles, n_tiles in [(3, 5), (20, 7), (1, 4), (64, 64)]:
    m, n = kernel_mosaic._grouped(np.arange(m_tiles * n_tiles), m_tiles, n_tiles)
    assert sorted(zip(np.asarray(m).tolist(), np.asarray(n).tolist())) == [
        (i, j) for i in range(m_tiles) for j in range(n_tiles)]


def test_range_check_and_grid():
  assert R.on_subnormal_grid(F.E5M2, F.FP32, F.E6M9)      # 2^-32 products, 2^-39 grid
  assert not R.on_subnormal_grid(F.E5M2, F.FP32, F.BF16.__class__(5, 7))
  assert not R.on_subnormal_grid(F.E4M3, F.E5M2, F.FP16)  # products below e5m2's grid
  ok = lambda a, k: bool(R.range_ok(np.float32(a), np.float32(1.0), k, F.FP32, F.E6M9))
  assert ok(1000.0, 4096) and not ok(1000.0, 2 ** 22) and not ok(np.inf, 1)


def test_unsupported_settings_are_refused():
  assert Kn.supported(F.E5M2, F.FP32, F.E6M9) and Kn.supported(F.E4M3, F.FP32, F.FP16)
  assert not Kn.supported(F.E5M2, F.FP32, F.E6M9, 'stochastic')
  assert not Kn.supported(F.BF16, F.FP32, F.E6M9)               # 16-bit products: sticky sum
  assert not Kn.supported(F.E5M2, F.FP32, F.FloatFormat(8, 14))  # 15-bit accumulator
  with pytest.raises(ValueError):
    Kn.chunked_matmul(np.ones((4, 4), np.float32), np.ones((4, 4), np.float32),
                      acc_fmt=F.FloatFormat(8, 14), interpret=True)


def test_pallas_impl_through_the_three_gemms_matches_jax():
  from accel.lowprec import gemm as G
  import jax.numpy as jnp
  rng = np.random.default_rng(5)
  a = rng.standard_normal((6, 40)).astype(np.float32)
  w = rng.standard_normal((40, 5)).astype(np.float32)
  c = rng.standard_normal((6, 5)).astype(np.float32)

  def grads(impl):
    s = lambda ch, mode: G.GemmSettings('e5m2', 'e6m9', chunk_size=ch, mode=mode, impl=impl)
    dot = G.LowPrecDotGeneral(G.LayerSettings(s(8, 'exact'), s(1, 'fast'), s(16, 'fast')))
    f = lambda a, w: jnp.sum(dot(a, w, (((1,), (0,)), ((), ()))) * c)
    return jax.jit(jax.grad(f, argnums=(0, 1)))(a, w)

  for x, y in zip(grads('pallas'), grads('jax')):
    np.testing.assert_array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32))


@pytest.mark.parametrize('mode', ['exact', 'fast'])
def test_kernels_lower_to_triton_for_gpu(mode):
  """Cross-lowering on CPU runs the Pallas -> Triton (or Mosaic GPU) lowering of the
  tilings the GPU benchmark sweeps by default, of one tiling per code path of the others
  (backend, schedule, grid, PTX or not, warpgroups) and of the default one shrunk to a
  narrow problem (both rounding paths, the PTX included), so unsupported operations show up
  here."""
  from experiments import bench_lowprec
  a = jax.ShapeDtypeStruct((256, 256), np.float32)
  narrow = jax.ShapeDtypeStruct((300, 64), np.float32), jax.ShapeDtypeStruct((64, 16), np.float32)
  tilings, paths = [], set()
  for i, t in enumerate(bench_lowprec.TILINGS[mode]):
    path = (t.backend, t.schedule, t.persistent, t.ptx, t.block_m // 64)
    if i < bench_lowprec.SWEPT[mode] or path not in paths:
      tilings.append(t)
      paths.add(path)
  for tiling, operands in [(t, (a, a)) for t in tilings] + [(None, narrow)]:
    text = jax.jit(bench_lowprec.pallas(mode, tiling, interpret=False)).trace(*operands).lower(
        lowering_platforms=('cuda',)).as_text()
    backend = 'mosaic_gpu' if tiling and tiling.backend == 'mosaic' else 'triton'
    assert text.count(backend) >= 2


def test_default_fast_tiling_is_mosaic_on_hopper_for_full_blocks(monkeypatch):
  monkeypatch.setattr(Kn, 'on_hopper', lambda: True)
  assert Kn.default_tiling('fast', 4096, 256) == Kn.HOPPER_FAST_TILING
  assert Kn.default_tiling('fast', 4096, 64).backend == 'triton'    # a narrow conv
  assert Kn.default_tiling('fast', 4096, 576, chunk=16).backend == 'triton'   # K = 16
  monkeypatch.setattr(Kn, 'on_hopper', lambda: False)
  assert Kn.default_tiling('fast', 4096, 4096).backend == 'triton'


def test_profile_summary_ranks_where_no_warp_issued():
  """profile_lowprec_kernel --summarize on a hand-written ncu source-page CSV: opcode shares
  of the executed instructions and the instruction with the most not-issued samples first."""
  from experiments import profile_lowprec_kernel as prof
  header = ['Address', 'Source', 'Warp Stall Sampling (All Samples)', prof.IDLE_SAMPLES,
            prof.EXECUTED, 'stall_barrier (Not Issued)', 'stall_long_sb (Not Issued)']
  rows = [['0x0', '  FFMA R1, R2, 16384, R2', '50', '0', '3,000', '0', '0'],
          ['0x10', '  WARPGROUP.DEPBAR.LE gsb0, 0x1', '40', '30', '500', '30', '0'],
          ['0x20', '  @!P1  BRA 0x7f00', '20', '10', '500', '0', '10']]
  lines = ['"Kernel Name","k",'] + [','.join(f'"{c}"' for c in r) for r in [header] + rows]
  text = prof.summarize(lines)
  assert '4,000 warp instructions executed, 40 not-issued samples' in text
  assert '| FFMA | 75.0% | 0.0% |' in text
  sites = [line for line in text.splitlines() if line.startswith('| 1 ') or line.startswith('| 2 ')]
  assert sites[0].startswith('| 1 | `WARPGROUP.DEPBAR.LE gsb0, 0x1` | 500 | 75.0% | barrier 100%')
  assert sites[1].startswith('| 2 | `@!P1  BRA 0x7f00` | 500 | 25.0% | long_sb 100%')
  with pytest.raises(ValueError, match='SourceCounters'):
    prof.summarize([','.join(h for h in header if h != prof.IDLE_SAMPLES)])
