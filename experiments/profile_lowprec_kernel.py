"""The Hopper default 'fast' chunked-matmul kernel alone, run a few times, for a profiler.

Runs `kernel.mosaic_in_range` (the Mosaic GPU kernel of `kernel.HOPPER_FAST_TILING` with
the in-range rounding, as `chunked_matmul` runs it when its range check passes) on n x n
bf16 operands holding e5m2 values, `--calls` times. Under Nsight Compute, one launch:

  ncu -k regex:mosaic --launch-skip 1 --launch-count 1 --section SpeedOfLight \\
      --section ComputeWorkloadAnalysis --section SchedulerStats --section WarpStateStats \\
      --section InstructionStats --print-details all \\
      python -m experiments.profile_lowprec_kernel --n 4096

(ncu fixes the SM clock at its base, 1.36 GHz on the H200: cycles, not microseconds, are
what compares with a timed run.) results/bench_lowprec_gpu_ncu.md holds one such profile.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from accel.lowprec import formats, kernel


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--n', type=int, default=4096, help='M = N = K')
  p.add_argument('--calls', type=int, default=3)
  args = p.parse_args(argv)
  t = kernel.HOPPER_FAST_TILING
  multiple = max(t.block_m, t.block_n, 2 * 64)   # its blocks; two chunks of 64 a step
  if args.n < multiple or args.n % multiple:
    p.error(f'--n must be a positive multiple of {multiple}, got {args.n}')
  ka, kb = jax.random.split(jax.random.key(0))
  a, b = (formats.quantize(jax.random.normal(k, (args.n, args.n)), formats.E5M2)
          .astype(jnp.bfloat16) for k in (ka, kb))
  fn = jax.jit(lambda a, b: kernel.mosaic_in_range(a, b, tiling=kernel.HOPPER_FAST_TILING,
                                                   acc_fmt=formats.E6M9, chunk_size=64))
  for _ in range(args.calls):
    jax.block_until_ready(fn(a, b))
  print(f'{args.calls} calls of the kernel at n = {args.n}')


if __name__ == '__main__':
  main()
