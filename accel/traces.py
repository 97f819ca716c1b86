"""Profiles of a benchmark's step: writing them (jax.profiler) and reading where the device
time went (the perfetto traces jax.profiler writes).

`profile(variant, directory)` traces a few steps of an `accel.benchmarking.Variant` and
writes its compiled program beside the trace, to look up what the trace's fusion names
compute; `kernel_times` sums the device time per kernel, `stream_busy` how much each device
stream worked over its span.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os


def profile(variant, directory: str, steps: int = 3) -> str:
  """Traces `steps` steps of `variant` into `directory`; returns the perfetto trace's path."""
  import jax  # pylint: disable=g-import-not-at-top
  out = None
  with jax.profiler.trace(directory, create_perfetto_trace=True):
    for _ in range(steps):
      variant.state, out = variant.step(variant.state)
    jax.block_until_ready(out)
  if variant.program is not None:
    with open(os.path.join(directory, 'train_step.hlo.txt'), 'w') as f:
      f.write(variant.program.as_text())
  return find_trace(directory)


def _events(path: str) -> list[dict]:
  with gzip.open(path, 'rt') as f:
    trace = json.load(f)
  return trace['traceEvents'] if isinstance(trace, dict) else trace


def _process_names(events: list[dict]) -> dict:
  """pid -> process name: the names tell device streams from host threads."""
  return {e['pid']: e['args'].get('name', '') for e in events
          if e.get('ph') == 'M' and e.get('name') == 'process_name'}


def kernel_times(path: str) -> tuple[collections.Counter, dict]:
  """(kernel name -> total device microseconds, pid -> process name) of a trace."""
  events = _events(path)
  names = _process_names(events)
  totals = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and 'dur' in e:
      process = names.get(e.get('pid'), '').lower()
      if '/device:' in process or 'gpu' in process or 'stream' in process:
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
  events = _events(path)
  procs = _process_names(events)
  threads = {(e['pid'], e.get('tid')): e['args'].get('name', '') for e in events
             if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
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
