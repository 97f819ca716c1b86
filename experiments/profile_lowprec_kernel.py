"""The Hopper 'fast' chunked-matmul kernel alone, run a few times, for a profiler; and a
summary of the profiler's per-instruction table.

Runs `kernel.mosaic_in_range` (the Mosaic GPU kernel of `kernel.HOPPER_FAST_TILING`, or of
the --schedule / --stages / --[no-]persistent given, with the in-range rounding, as
`chunked_matmul` runs it when its range check passes) on n x n bf16 operands holding e5m2
values, `--calls` times.
Under Nsight Compute, one launch:

  ncu -k regex:mosaic --launch-skip 1 --launch-count 1 --section SpeedOfLight \\
      --section ComputeWorkloadAnalysis --section SchedulerStats --section WarpStateStats \\
      --section InstructionStats --print-details all \\
      python -m experiments.profile_lowprec_kernel --n 4096

(ncu fixes the SM clock at its base, 1.36 GHz on the H200, unless given --clock-control
none: cycles, not microseconds, are what compares with a timed run.)
results/bench_lowprec_gpu_ncu.md holds one such profile.

Where the warps wait, instruction by instruction: add `--section SourceCounters
--export REPORT`, then

  ncu -i REPORT.ncu-rep --page source --csv --print-source sass > source.csv
  python -m experiments.profile_lowprec_kernel --summarize source.csv --out summary.md

which tabulates the executed instructions by opcode and the SASS instructions at which the
scheduler found no warp to issue (Nsight Compute's 'not-issued' stall samples), with their
leading stall reasons (results/bench_lowprec_gpu_ncu_source.md).
"""
from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import gzip
import sys

IDLE_SAMPLES = 'Warp Stall Sampling (Not-issued Samples)'
EXECUTED = 'Instructions Executed'


def _number(text: str) -> int:
  return int(text.replace(',', '') or 0)


def _opcode(sass: str) -> str:
  """'@!P1 BRA 0x..' -> 'BRA', 'HGMMA.64x128x16.F32.BF16 ..' -> 'HGMMA'."""
  words = sass.split()
  if words and words[0].startswith('@'):
    words = words[1:]
  return words[0].split('.')[0] if words else ''


def summarize(lines, top: int = 12) -> str:
  """Markdown tables from the lines of `ncu --page source --csv --print-source sass`."""
  rows = list(csv.reader(lines))
  header_at = next((i for i, r in enumerate(rows) if 'Source' in r and EXECUTED in r), None)
  if header_at is None:
    raise ValueError(f"not an ncu source-page CSV: no header with 'Source' and '{EXECUTED}'")
  header, data = rows[header_at], [r for r in rows[header_at + 1:] if len(r) > 1]
  col = {name: i for i, name in enumerate(header)}
  if IDLE_SAMPLES not in col:
    raise ValueError(f"the CSV has no '{IDLE_SAMPLES}' column: profile with --section "
                     'SourceCounters (stall sampling)')
  reasons = [h for h in header if h.startswith('stall_') and '(Not Issued)' in h]
  field = lambda r, name: _number(r[col[name]])
  executed = sum(field(r, EXECUTED) for r in data)
  idle = sum(field(r, IDLE_SAMPLES) for r in data)
  by_opcode, idle_by_opcode = collections.Counter(), collections.Counter()
  for r in data:
    op = _opcode(r[col['Source']])
    by_opcode[op] += field(r, EXECUTED)
    idle_by_opcode[op] += field(r, IDLE_SAMPLES)
  out = [f'{len(data)} SASS instructions, {executed:,} warp instructions executed, '
         f'{idle:,} not-issued samples.', '',
         '| opcode | share of executed instructions | share of not-issued samples |',
         '|---|---|---|']
  for op, n in by_opcode.most_common(top):
    out.append(f'| {op} | {n / max(executed, 1):.1%} | {idle_by_opcode[op] / max(idle, 1):.1%} |')
  out += ['', '| # | SASS instruction | executed | share of not-issued samples | leading reasons |',
          '|---|---|---|---|---|']
  for index, r in sorted(enumerate(data), key=lambda ir: -field(ir[1], IDLE_SAMPLES))[:top]:
    leading = sorted(((field(r, c), c) for c in reasons), reverse=True)[:2]
    why = ', '.join(f"{c.split(' ')[0][len('stall_'):]} {n / max(field(r, IDLE_SAMPLES), 1):.0%}"
                    for n, c in leading if n)
    out.append(f"| {index} | `{r[col['Source']].strip()}` | {field(r, EXECUTED):,} | "
               f'{field(r, IDLE_SAMPLES) / max(idle, 1):.1%} | {why} |')
  return '\n'.join(out) + '\n'


def run_kernel(n: int, calls: int, schedule: str, stages: int, persistent: bool):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from accel.lowprec import formats, kernel  # pylint: disable=g-import-not-at-top
  from experiments.bench_lowprec import normal_operands  # pylint: disable=g-import-not-at-top
  t = dataclasses.replace(kernel.HOPPER_FAST_TILING, schedule=schedule, num_stages=stages,
                          persistent=persistent)
  a, b = (x.astype(jnp.bfloat16) for x in normal_operands(n))
  fn = jax.jit(lambda a, b: kernel.mosaic_in_range(a, b, tiling=t, acc_fmt=formats.E6M9,
                                                   chunk_size=64))
  for _ in range(calls):
    jax.block_until_ready(fn(a, b))
  grid = 'a persistent grid' if persistent else 'a CTA per tile'
  print(f"{calls} calls of the kernel ('{schedule}', {stages} stages, {grid}) at n = {n}")


def main(argv=None):
  from accel.lowprec import kernel, kernel_mosaic  # pylint: disable=g-import-not-at-top
  default = kernel.HOPPER_FAST_TILING
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--n', type=int, default=4096, help='M = N = K')
  p.add_argument('--calls', type=int, default=3)
  p.add_argument('--schedule', choices=kernel_mosaic.SCHEDULES, default=default.schedule)
  p.add_argument('--stages', type=int, default=default.num_stages)
  p.add_argument('--persistent', action=argparse.BooleanOptionalAction,
                 default=default.persistent, help='one CTA per multiprocessor (--no-persistent: '
                 'one per tile, as the committed profiles ran)')
  p.add_argument('--summarize', metavar='CSV', default='',
                 help="summarize ncu's source-page CSV (.csv or .csv.gz) instead of running")
  p.add_argument('--out', default='', help='with --summarize: write the markdown here')
  args = p.parse_args(argv)
  if args.summarize:
    opener = gzip.open if args.summarize.endswith('.gz') else open
    try:
      with opener(args.summarize, 'rt', newline='') as f:
        text = summarize(f)
    except (OSError, ValueError) as e:
      p.exit(2, f'error: {args.summarize}: {e}\n')
    if not args.out:
      sys.stdout.write(text)
      return
    try:
      with open(args.out, 'w') as f:
        f.write(text)
    except OSError as e:
      p.exit(2, f'error: --out {args.out}: {e}\n')
    return
  multiple = max(default.block_m, default.block_n,
                 64 * kernel_mosaic.chunks_per_step(args.schedule))
  if args.n < multiple or args.n % multiple:
    p.error(f'--n must be a positive multiple of {multiple}, got {args.n}')
  if args.stages < 1:
    p.error(f'--stages must be at least 1, got {args.stages}')
  run_kernel(args.n, args.calls, args.schedule, args.stages, args.persistent)


if __name__ == '__main__':
  main()
