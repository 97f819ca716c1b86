r"""Sums the device time of each kernel in a perfetto trace written by jax.profiler.

  python -m experiments.trace_summary PATH/perfetto_trace.json.gz [--top 25]

Prints the kernels that took the most time (all steps in the trace together), to find what
to optimise before guessing.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re


def kernel_times(path: str) -> tuple[collections.Counter, dict]:
  with gzip.open(path, 'rt') as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  names = {}
  for e in events:   # process names tell device streams from host threads
    if e.get('ph') == 'M' and e.get('name') == 'process_name':
      names[e['pid']] = e['args'].get('name', '')
  totals = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and 'dur' in e:
      process = names.get(e.get('pid'), '')
      if '/device:' in process.lower() or 'gpu' in process.lower() or 'stream' in process.lower():
        totals[e['name']] += e['dur']
  return totals, names


def find_trace(directory: str) -> str:
  """The perfetto trace jax.profiler.trace(directory, create_perfetto_trace=True) wrote."""
  found = glob.glob(os.path.join(directory, '**', 'perfetto_trace.json.gz'), recursive=True)
  if not found:
    raise FileNotFoundError(f'no perfetto_trace.json.gz under {directory}')
  return max(found, key=os.path.getmtime)


def stream_busy(path: str) -> dict:
  """'process / thread' of each device stream -> busy_ms (sum of its kernel times) and
  span_ms (first kernel start to last kernel end): busy / span is how much it worked."""
  with gzip.open(path, 'rt') as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  procs, threads = {}, {}
  for e in events:
    if e.get('ph') == 'M' and e.get('name') == 'process_name':
      procs[e['pid']] = e['args'].get('name', '')
    if e.get('ph') == 'M' and e.get('name') == 'thread_name':
      threads[(e['pid'], e.get('tid'))] = e['args'].get('name', '')
  rows = {}
  for e in events:
    process = procs.get(e.get('pid'), '')
    if e.get('ph') != 'X' or 'dur' not in e or not ('/device:' in process.lower() or
                                                    'gpu' in process.lower()):
      continue
    key = f'{process} / {threads.get((e["pid"], e.get("tid")), e.get("tid"))}'
    row = rows.setdefault(key, {'busy_ms': 0.0, 'start': e['ts'], 'end': e['ts']})
    row['busy_ms'] += e['dur'] / 1e3
    row['start'] = min(row['start'], e['ts'])
    row['end'] = max(row['end'], e['ts'] + e['dur'])
  return {key: {'busy_ms': r['busy_ms'], 'span_ms': (r['end'] - r['start']) / 1e3}
          for key, r in sorted(rows.items())}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('path')
  parser.add_argument('--top', type=int, default=25)
  parser.add_argument('--hlo', default='', help="the compiled program's text: print the "
                      'instruction behind each of the top fusions')
  args = parser.parse_args()
  totals, names = kernel_times(args.path)
  total = sum(totals.values()) or 1
  print(f'processes: {sorted(set(names.values()))}')
  print(f'device time in trace: {total / 1e3:.1f} ms')
  hlo = open(args.hlo).read().splitlines() if args.hlo else []
  for name, us in totals.most_common(args.top):
    print(f'{us / 1e3:9.2f} ms {us / total:6.1%}  {name[:120]}')
    names = {name, re.sub(r'_(\d+)$', r'.\1', name)}
    for line in hlo:
      stripped = line.strip().removeprefix('ROOT ').lstrip('%')
      if stripped.split(' ', 1)[0] in names:
        print(f'             {stripped[:300]}')


if __name__ == '__main__':
  main()
