"""The 'fast' chunked matmul (kernel.py's module docstring) as a Mosaic GPU kernel for
Hopper (Pallas `plgpu`), where each chunk's dot is an explicit asynchronous wgmma.

Triton decides itself when to wait for a dot, and waits for every dot whose result the loop
reads (kernel.py), so its matrix units idle while a chunk is rounded. Here the waits are
written out. A CTA owns a (block_m, block_n) tile of C, taken in `_grouped` order; one
producer warpgroup streams the chunks' operands into shared memory (TMA, `stages` steps
deep), and block_m / 64 compute warpgroups each own 64 rows of the tile, with the running
total in registers. With schedule 'pairs' a pipeline step holds two chunks; a warpgroup
issues both chunks' wgmmas into fresh accumulators, waits for the first only
(`wgmma_accumulator_load(wait_n=1)`) and rounds it into the total while the second runs:

  issue(acc_0, c);  issue(acc_1, c + 1);
  total = fold(total, wait(acc_0));  total = fold(total, wait(acc_1))

No wgmma is in flight across loop iterations: with the second accumulator carried to the
next step, ptxas serialized every wgmma of the kernel (its message C7514, seen on the H200).
'serial' waits for each chunk's wgmma before rounding it. 'carried' (two chunks a step)
rounds every chunk while the next one's wgmma runs, carrying the last chunk's sum, as
values, from one step to the next; each wgmma is still waited for within its step:

  issue(acc_0, c);      total = fold(total, pending);  pending = wait(acc_0)
  issue(acc_1, c + 1);  total = fold(total, pending);  pending = wait(acc_1)

(the first step folds a pending sum of zeros, which leaves the total unchanged; the last
chunk is folded after the loop). In 'pairs' the second chunk's rounding has no wgmma of its
warpgroup to hide behind. Whichever the schedule, the compute warpgroups of a CTA can
overlap each other. 'pingpong' is 'pairs' with the two compute warpgroups of a 128-row
block (else it is 'pairs') taking turns to issue their wgmmas, through two shared-memory
barriers: warpgroup 1 issues a step's pair once warpgroup 0 has its first chunk sum, and
warpgroup 0 the next step's once warpgroup 1 has its own, so that one warpgroup's rounding
would run while the other's wgmmas do, instead of both waiting for the matrix units at once.
On one H200, 'carried' ran as fast as 'pairs', not faster: the kernel alone 54.1% against
53.9% of native bf16 at 4096 (results/bench_lowprec_gpu_carried.md); on one H100 'pingpong'
lost to 'pairs' (45.9% / 41.6% of native bf16 at 4096 / 8192 against 46.6% / 43.2%,
results/bench_lowprec_gpu_persistent.md).
A profile of 'pairs' (results/bench_lowprec_gpu_ncu.md) has the tensor pipe active 33% of
the cycles and the issue slots 68%; its SASS has the minimum 7 float32 instructions per
output and chunk.

The chunk sums are the matrix units' float32 sums of bf16 products, as in the Triton
kernel, so the results agree with it and with the JAX path bit for bit wherever a chunk's
sum is exact in float32.

Measured on one H200 (results/bench_lowprec_gpu_kernel_only.md): 'pairs' 128 x 128, 3
stages, the op 45.6% / 42.9% of native bf16 at n = 4096 / 8192, the kernel alone 53.1% /
45.6% (the Triton kernel 40.3% / 36.4% in the same run). Per chunk a warp rounds 64 outputs
with 7 float32 instructions each, and the two warpgroups put two warps on each SM
sub-partition: ~900 issue cycles per chunk, against ~740 of matrix work for the tile at the
rate native bf16 reaches at 8192 (~550 at the bf16 peak). The kernel alone takes ~1760
cycles per chunk at 4096 (1.98 GHz), about their sum: as if the rounding and the matrix
units did not overlap. Where the warps wait, instruction by instruction, is in
results/bench_lowprec_gpu_ncu_source.md: in the SASS of 'carried', ptxas spreads a chunk's
rounding between the HGMMAs of the next chunk and issues the last one just before its wait.
The same profile puts a third of its samples taken when no warp issued at the epilogue's
barriers and the waits for operands; `persistent=True` (one CTA per multiprocessor looping
over the tiles) is meant for those. On one H100 (results/bench_lowprec_gpu_persistent.md,
one run) it gained 0.1-1.8 points: 'pairs' 48.4% / 43.8% of native bf16 for the op at 4096 /
8192 against 46.6% / 43.2% with a CTA per tile; 'carried', 2 stages, 48.6% / 44.5% (47.9% /
44.4% per tile), the kernel alone 58.5% / 48.7%: the best of the run, and the Hopper
default (kernel.HOPPER_FAST_TILING).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

WG_ROWS = 64        # rows of C per compute warpgroup: the wgmma M
EPILOGUE_N = 64     # columns of C per shared-memory copy of the result
GROUP_M = 8         # rows of tiles per group in the CTAs' order (`_grouped`)
SCHEDULES = ('serial', 'pairs', 'carried', 'pingpong')


def chunks_per_step(schedule: str) -> int:
  """Chunks a pipeline step of `schedule` holds (K is padded to a multiple of them)."""
  return 1 if schedule == 'serial' else 2


def _swizzled(minor_elems: int, dtype):
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  swizzle = plgpu.find_swizzle(minor_elems * jnp.dtype(dtype).itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def _grouped(tile, m_tiles: int, n_tiles: int):
  """The (m, n) tile of C that CTA `tile` computes: column by column within groups of
  GROUP_M rows of tiles, so that the CTAs running at one time share A's and B's panels in
  L2 (a wave of 132 CTAs reads ~8 + 17 panels instead of ~m_tiles + 2 at n = 8192)."""
  per_group = GROUP_M * n_tiles
  first_m = (tile // per_group) * GROUP_M
  group_rows = jnp.minimum(m_tiles - first_m, GROUP_M)
  within = tile % per_group
  return first_m + within % group_rows, within // group_rows


def _interpret_params():
  """Mosaic GPU's own interpreter (barriers, TMA and wgmma emulated on the CPU); JAX
  exports it nowhere yet."""
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # pylint: disable=g-import-not-at-top
  return InterpretGPUParams()


H100_SMS = 132      # a persistent grid's CTAs when lowered on a host without the GPU


def _num_sms(interpret: bool) -> int:
  """The device's multiprocessors (a persistent grid's CTAs); 2 in Mosaic's interpreter."""
  if interpret:
    return 2
  return getattr(jax.devices()[0], 'core_count', None) or H100_SMS


def fast_matmul(a_bf16, b_bf16, *, block_m: int, block_n: int, stages: int, schedule: str,
                chunk: int, fold, persistent: bool = False,
                interpret: bool = False) -> jax.Array:
  """C = A @ B (float32) from bf16 A (M x K) and B (K x N), M a multiple of block_m, N of
  block_n and K of chunk (of 2 chunks with 'pairs'): every chunk's float32 wgmma sum is
  folded into the running total by `fold(total, chunk_sum)`.

  persistent: one CTA per multiprocessor, each looping over its share of the tiles (in
  `_grouped` order, `plgpu.nd_loop`), as Pallas' own Hopper matmul does; meant to let the
  producer load a tile's first operands while the compute warpgroups still round the tile
  before and write it out (module docstring); else one CTA per tile."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  m, k = a_bf16.shape
  n = b_bf16.shape[1]
  if block_m % WG_ROWS or (block_n > EPILOGUE_N and block_n % EPILOGUE_N):
    raise ValueError(f'block_m must be a multiple of {WG_ROWS}, block_n at most {EPILOGUE_N} '
                     f'or a multiple of it; got {block_m} x {block_n}')
  if schedule not in SCHEDULES:
    raise ValueError(f"the Mosaic kernel's schedule is one of {SCHEDULES}, got {schedule!r}")
  per_step = chunks_per_step(schedule)
  carried = schedule == 'carried'
  wgs = block_m // WG_ROWS
  ordered = schedule == 'pingpong' and wgs == 2
  if m % block_m or n % block_n or k % (chunk * per_step):
    raise ValueError(f'shape {(m, k, n)} not padded to {(block_m, chunk * per_step, block_n)}')
  steps = k // (chunk * per_step)
  epi_n = min(EPILOGUE_N, block_n)

  a_spec = lambda j: plgpu.BlockSpec((block_m, chunk), lambda s: (0, per_step * s + j),
                                     transforms=_swizzled(chunk, a_bf16.dtype))
  b_spec = lambda j: plgpu.BlockSpec((chunk, block_n), lambda s: (per_step * s + j, 0),
                                     transforms=_swizzled(block_n, b_bf16.dtype))

  def pipeline(body, context):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(steps,), memory_registers=40,
        in_specs=[a_spec(j) for j in range(per_step)] + [b_spec(j) for j in range(per_step)],
        wg_axis='wg', num_compute_wgs=wgs, max_concurrent_steps=stages,
        compute_context=context)

  m_tiles, n_tiles = m // block_m, n // block_n
  ctas = min(_num_sms(interpret), m_tiles * n_tiles) if persistent else m_tiles * n_tiles

  def kernel(a_gmem, b_gmem, o_gmem):
    def one_tile(tile, allocs, out_smem, turns):
      m_idx, n_idx = _grouped(tile, m_tiles, n_tiles)
      rows = pl.ds(m_idx * block_m, block_m)
      cols = pl.ds(n_idx * block_n, block_n)
      wg = lax.axis_index('wg')
      wg_rows = pl.ds(wg * WG_ROWS, WG_ROWS)
      acc_type = plgpu.ACC((WG_ROWS, block_n), jnp.float32)

      def body(_, *refs):
        a_refs, b_refs, carry = refs[:per_step], refs[per_step:-1], refs[-1]

        def chunk_sums(*accs):                       # fresh accumulators hold zeros
          if carried:                                # carry: (total, the last chunk's sum)
            folded, pending = carry
            for acc, a_smem, b_smem in zip(accs, a_refs, b_refs):
              plgpu.wgmma(acc, a_smem.at[wg_rows], b_smem)
              folded = fold(folded, pending)         # the chunk before, while this one runs
              pending = plgpu.wgmma_accumulator_load(acc, wait_n=0)
            return folded, pending
          if ordered:                                # my turn to issue
            plgpu.barrier_wait(turns.at[wg])
          for acc, a_smem, b_smem in zip(accs, a_refs, b_refs):
            plgpu.wgmma(acc, a_smem.at[wg_rows], b_smem)
          folded = carry
          for i, acc in enumerate(accs):             # chunk i is rounded while i + 1 runs
            chunk_sum = plgpu.wgmma_accumulator_load(acc, wait_n=per_step - 1 - i)
            if ordered and i == 0:                   # the other warpgroup's turn
              plgpu.barrier_arrive(turns.at[1 - wg])
            folded = fold(folded, chunk_sum)
          return folded
        return pl.run_scoped(chunk_sums, *[acc_type] * per_step)

      def write_out(total):
        for j in range(block_n // epi_n):
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          out_smem[wg] = total[:, j * epi_n:(j + 1) * epi_n]
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(
              out_smem.at[wg], o_gmem.at[rows, cols].at[wg_rows, pl.ds(j * epi_n, epi_n)])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

      def context(run):
        zeros = jnp.zeros((WG_ROWS, block_n), jnp.float32)
        if carried:   # folding a first chunk sum of zeros leaves the zero total as it is
          total, pending = run((zeros, zeros))
          write_out(fold(total, pending))
        else:
          write_out(run(zeros))
      pipeline(body, context)(*[a_gmem.at[rows]] * per_step, *[b_gmem.at[:, cols]] * per_step,
                              allocations=allocs)

    ignore = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore).get_allocations(*[a_gmem] * per_step, *[b_gmem] * per_step),
        out_smem=plgpu.SMEM((wgs, WG_ROWS, epi_n), jnp.float32,
                            transforms=_swizzled(epi_n, jnp.float32)),
        turns=plgpu.Barrier(num_arrivals=1, num_barriers=2),
        collective_axes='wg')
    def scope(allocs, out_smem, turns):
      if ordered:   # warpgroup 0 issues first
        pl.when(lax.axis_index('wg') == 1)(lambda: plgpu.barrier_arrive(turns.at[0]))
      if persistent:
        plgpu.nd_loop((m_tiles * n_tiles,), collective_axes='tile')(
            lambda info: one_tile(info.index[0], allocs, out_smem, turns))
      else:
        one_tile(lax.axis_index('tile'), allocs, out_smem, turns)
      if ordered:   # warpgroup 1's last turn back
        pl.when(lax.axis_index('wg') == 0)(lambda: plgpu.barrier_wait(turns.at[0]))

  call = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((m, n), jnp.float32),
      grid=(ctas,), grid_names=('tile',),
      num_threads=wgs + 1, thread_name='wg', interpret=_interpret_params() if interpret else None,
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
  return call(a_bf16, b_bf16)
