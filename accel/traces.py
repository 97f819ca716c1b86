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
import re


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


# Where a fusion's time goes: its HLO op_name is the jitted function's name stack and the
# primitive ('jit(train_step)/transpose(jvp(TransformerLM))/.../block_3/mlp/fc_in/add'); the
# innermost module name in it, digits as N, says which layer kind, 'transpose(jvp(' that it
# is the backward.


def _hlo_ops(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its op_name metadata, for every instruction of the program."""
  ops = {}
  for line in hlo_text.splitlines():
    match = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = ', line)
    if match:
      op_name = re.search(r'op_name="([^"]*)"', line)
      ops[match.group(1)] = op_name.group(1) if op_name else ''
  return ops


def category(op_name: str, kernel: str) -> str:
  """'phase / scope' of a kernel. phase: forward | backward | update (outside the model's
  autodiff: the optimizer, the gradient norm); scope: the innermost module of the name stack
  with its digits as N ('fc_in', 'stageN_blockN_convN'), 'loss' for the objective (inside
  the autodiff, outside the model), or the library (cublas, cudnn) of a kernel without an
  HLO name."""
  if not op_name:
    library = ('cudnn' if 'cudnn' in kernel else
               'cublas' if re.match(r'(nvjet|sm\d+_|cutlass|gemm)', kernel) else 'other')
    return f'? / {library}'
  phase = ('backward' if 'transpose(jvp(' in op_name else
           'forward' if 'jvp(' in op_name else 'update')
  modules = [p for p in op_name.split('/')[:-1] if '(' not in p and '.' not in p]
  if modules:
    scope = re.sub(r'\d+', 'N', modules[-1])
  else:
    scope = 'loss' if phase != 'update' else 'other'
  return f'{phase} / {scope}'


def breakdown(trace_path: str, hlo_text: str, steps: int, top: int = 20) -> dict:
  """Device time per step of a profiled program by category (`category`), the number of
  kernels per step, and the top kernels with the HLO instruction behind each."""
  events = _events(trace_path)
  procs = _process_names(events)
  ops = _hlo_ops(hlo_text)
  by_category: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
  by_kernel: dict[str, list] = collections.defaultdict(lambda: [0.0, 0, ''])
  for e in events:
    process = procs.get(e.get('pid'), '').lower()
    if e.get('ph') != 'X' or 'dur' not in e or not ('/device:' in process or 'gpu' in process):
      continue
    name = e['name']
    hlo_name = (e.get('args') or {}).get('hlo_op') or re.sub(r'_(\d+)$', r'.\1', name)
    op_name = ops.get(hlo_name, ops.get(name, ''))
    cat = category(op_name, name)
    by_category[cat][0] += e['dur'] / 1e3 / steps
    by_category[cat][1] += 1
    by_kernel[name][0] += e['dur'] / 1e3 / steps
    by_kernel[name][1] += 1
    by_kernel[name][2] = op_name
  return {
      'device_ms_per_step': sum(v[0] for v in by_category.values()),
      'kernels_per_step': sum(v[1] for v in by_category.values()) / steps,
      'categories': {k: {'ms_per_step': v[0], 'kernels_per_step': v[1] / steps}
                     for k, v in sorted(by_category.items(), key=lambda kv: -kv[1][0])},
      'top_kernels': [{'kernel': k, 'ms_per_step': v[0], 'calls_per_step': v[1] / steps,
                       'op_name': v[2][:200]}
                      for k, v in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:top]],
  }


def profile_breakdown(variant, directory: str, steps: int = 3) -> dict:
  """`breakdown` of `steps` steps of `variant` traced into `directory`."""
  trace = profile(variant, directory, steps)
  return breakdown(trace, variant.program.as_text(), steps)


def write_breakdowns(out: str, name: str, title: str, breakdowns: dict, programs: dict,
                     meta: dict) -> None:
  """OUT/NAME.md (per variant: device ms and kernels per step, the time by phase / scope,
  the top kernels), OUT/NAME.json, and OUT/NAME_<variant>.hlo.txt.gz of the `programs`
  (variant -> compiled program) profiled, to look their kernels up; printed only if out=''."""
  from accel import benchmarking  # pylint: disable=g-import-not-at-top
  lines = [f'# {title}', '', benchmarking.provenance_line(meta), '']
  for variant, b in breakdowns.items():
    lines.append(f'## {variant}\n')
    if 'error' in b:
      lines.append(f'failed: {b["error"]}\n')
      continue
    lines.append(f'{b["device_ms_per_step"]:.3f} ms of kernels per step, '
                 f'{b["kernels_per_step"]:.0f} kernels per step.\n')
    lines.append(benchmarking.markdown_table(
        ['phase / scope', 'ms/step', 'kernels/step'],
        [[k, v['ms_per_step'], v['kernels_per_step']] for k, v in b['categories'].items()]))
    lines.append(benchmarking.markdown_table(
        ['kernel', 'ms/step', 'calls/step', 'op_name'],
        [[k['kernel'][:70], k['ms_per_step'], k['calls_per_step'], k['op_name'][-90:]]
         for k in b['top_kernels']]))
  markdown = '\n'.join(lines)
  if not out:
    print(markdown)
    return
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f'{name}.md'), 'w') as f:
    f.write(markdown)
  with open(os.path.join(out, f'{name}.json'), 'w') as f:
    json.dump(breakdowns, f, indent=1, default=str)
  for variant, program in programs.items():
    if variant in breakdowns and program is not None:
      with gzip.open(os.path.join(out, f'{name}_{variant.replace(" ", "_")}.hlo.txt.gz'),
                     'wt') as f:
        f.write(program.as_text())
