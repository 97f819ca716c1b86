r"""Sums the device time of each kernel in a perfetto trace written by jax.profiler.

  python -m experiments.trace_summary PATH/perfetto_trace.json.gz [--top 25] [--hlo FILE]

Prints the kernels that took the most time (all steps in the trace together), to find what
to optimise before guessing. Traces come from `python -m experiments.bench_lm --profile DIR`
(accel.traces.profile), which writes DIR/train_step.hlo.txt for --hlo beside them.
"""
from __future__ import annotations

import argparse
import re

from accel.traces import find_trace, kernel_times, stream_busy  # noqa: F401  (bench_pipeline)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('path')
  parser.add_argument('--top', type=int, default=25)
  parser.add_argument('--hlo', default='', help="the compiled program's text: print the "
                      'instruction behind each of the top fusions')
  args = parser.parse_args(argv)
  totals, names = kernel_times(args.path)
  total = sum(totals.values()) or 1
  print(f'processes: {sorted(set(names.values()))}')
  print(f'device time in trace: {total / 1e3:.1f} ms')
  hlo = open(args.hlo).read().splitlines() if args.hlo else []
  for name, us in totals.most_common(args.top):
    print(f'{us / 1e3:9.2f} ms {us / total:6.1%}  {name[:120]}')
    aliases = {name, re.sub(r'_(\d+)$', r'.\1', name)}
    for line in hlo:
      stripped = line.strip().removeprefix('ROOT ').lstrip('%')
      if stripped.split(' ', 1)[0] in aliases:
        print(f'             {stripped[:300]}')


if __name__ == '__main__':
  main()
