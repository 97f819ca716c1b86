r"""Emulated low-precision arithmetic on GPU: the matmul kernels (a sweep of their tilings)
and the FP8-simulated train steps, each part in one process.

  python -m experiments.bench_lowprec --quick --out results   # CPU, tiny sizes, interpret mode
  python -m experiments.bench_lowprec --out results           # GPU: sweep at 4096, best at 8192
  python -m experiments.bench_lowprec --part steps --out results   # GPU: train steps vs fp32

--part steps: the train step of configs/fp8_resnet.py:gpu (ResNet-20, CIFAR-sized images)
and of configs/fp8_lm.py:gpu, built by accel's trainer (accel.train.build), in the variants
of STEP_VARIANTS (fp32; FP8 with the JAX or the Pallas GEMMs, fast or exact; chunk 1), timed in
interleaved rounds; OUT/bench_lowprec_steps_{gpu,cpu}.{json,md} give ms/step and the ratio
to the fp32 step: what a simulated run costs. The kernels part writes
OUT/bench_lowprec_{gpu,cpu}.{json,md}.

--part kernels (the default):
C = A @ B with A, B holding e5m2 values, an e6m9 accumulator, chunks of 64 (Wang et al.):
- native_fp32   jnp.dot in float32, precision=highest (the reference for 'exact')
- native_bf16   jnp.dot of bf16 operands, float32 accumulation (the reference for 'fast')
- jax_exact / jax_fast          chunked.py, the bit-level definition
- pallas_exact_* / pallas_fast_*   kernel.py, one row per `kernel.Tiling`: the tilings of
  --tilings (default: the first SWEPT[mode] of TILINGS, those that did not lose clearly on
  the H200) at --sweep_size, the --top best of each mode (and the defaults) at the other
  sizes.
Every kernel row is checked against the JAX path: 'exact' must be bit-identical; 'fast'
must be bit-identical on operands whose chunk sums are exact in float32 (e5m2 values with
exponents in [-3, 2]: products on a 2^-10 grid, |chunk sum| <= 64 * 7^2 < 2^12), and on
the random normal operands the row gives the fraction of outputs that differ (the matrix
units may add a chunk in another order than XLA's float32 dot). The general rounding path
(operands too large for the range check) is checked at n = --check_size.

Analytic limits (written beside each row as 'of limit'), from the device's peak float32
rate P32 (one FFMA per lane and cycle, counted as 2 FLOPs: P32 / 2 instructions per
second) and peak dense bf16 matrix rate P16 (H200 SXM: P32 = 66.9, P16 = 989 TFLOP/s):
- exact: every multiply-add is 4 float32 instructions (x = fma(a, b, part); c = fma(x, 2^s,
  x); d = c - x; part = c - d; products of e5m2 values are exact, so the FMA is the
  rounded sum), i.e. 2 FLOPs per 4 instructions: limit = (P32 / 2) * 2 / 4 = P32 / 4
  = 16.7 TFLOP/s, 33% of the ~50 TFLOP/s native float32 measured on the H200 (native
  runs 1 FFMA per multiply-add, so at native's efficiency exact would reach 25%).
- fast: a chunk of L = 64 products per output runs on the matrix units (2 L FLOPs at
  P16); rounding it and adding it to the total is 7 float32 instructions per output and
  chunk (3 + 1 + 3), so limit = min(P16, (P32 / 2) * 2 L / 7) = min(989, 612) = 612
  TFLOP/s (77% of the ~790 measured native bf16), bound by the CUDA cores, reached only
  if the rounding fully overlaps the matrix units. FP8 matrix units (twice P16) would not
  raise it. The Triton kernel cannot overlap fully: Triton waits for every dot whose
  result the loop reads before the next iteration (the rules of its wgmma pipelining), so
  with two chunks per iteration one of the two dots runs alone (seen in Triton 3.9's
  output; on a 128 x 128 tile about 256 of ~1300 cycles per chunk). In the Mosaic kernel
  the rounding is 85% of the instructions issued, the other 15% mostly address and
  descriptor arithmetic (results/bench_lowprec_gpu_ncu_source.md): with those, issuing
  every cycle would reach ~0.85 * 612 = 520 TFLOP/s.
Both parts write their files after every row (a call cut short keeps what it measured);
each variant runs inside try/except, a failing one is reported.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from accel import benchmarking
from accel.lowprec import chunked, formats, kernel, rounding

ACC = formats.E6M9
OPERANDS = formats.E5M2
CHUNK = 64
DIMS = (((1,), (0,)), ((), ()))
# (P32, P16) in FLOP/s: float32 FFMA peak and dense bf16 matrix peak, from the datasheets.
PEAKS = {'NVIDIA H200': (66.9e12, 989.4e12), 'NVIDIA H100 80GB HBM3': (66.9e12, 989.4e12)}
T = kernel.Tiling
# Every tiling the sweep knows (--tilings all). The default sweep (SWEPT) leaves out those
# that lost clearly on one H200 (results/bench_lowprec_gpu.md at 4096, of native: exact
# 10.5-16.9% against the best 22.6%; fast 22.2-34.7% against 38.9%).
TILINGS = {
    'exact': (
        T(64, 128, num_warps=4, threads_n=16, unroll=8),    # kernel.DEFAULT_TILING
        T(128, 64, num_warps=4, threads_n=8, unroll=8),
        T(64, 64, num_warps=4, threads_n=8, unroll=8),
        T(128, 128, num_warps=8, threads_n=16, unroll=8),   # the default before that sweep
        T(128, 128, num_warps=8, threads_n=16, unroll=8, ptx=False),
        T(128, 128, num_warps=8, threads_n=8, unroll=8),
        T(128, 128, num_warps=8, threads_n=16, unroll=4),
        T(128, 128, num_warps=8, threads_n=16, unroll=16),
        T(128, 64, num_warps=8, threads_n=8, unroll=8),
        T(64, 128, num_warps=8, threads_n=16, unroll=8),
        T(64, 256, num_warps=8, threads_n=32, unroll=8),
    ),
    # Shared memory: Triton buffers each dot's operands num_stages deep, and 'pairs' has
    # two dots per loop iteration: 128x128 s3 in pairs needs 224 KiB (the H200 allows 227).
    'fast': (
        T(128, 128, num_warps=8, num_stages=3, schedule='pairs'),    # kernel.DEFAULT_TILING
        T(128, 128, num_warps=8, num_stages=2, schedule='carried', backend='mosaic',
          persistent=True),                                # kernel.HOPPER_FAST_TILING
        T(128, 128, num_warps=8, num_stages=3, schedule='pairs', backend='mosaic'),
        T(128, 128, num_warps=8, num_stages=3, schedule='carried', backend='mosaic'),
        T(128, 128, num_warps=8, num_stages=4, schedule='serial', backend='mosaic'),
        T(128, 128, num_warps=8, num_stages=2, schedule='carried', backend='mosaic'),
        T(128, 128, num_warps=8, num_stages=3, schedule='pairs', backend='mosaic',
          persistent=True),
        # 'pingpong' lost to 'pairs' on one H100 (results/bench_lowprec_gpu_persistent.md,
        # 45.9% / 41.6% of native bf16 at 4096 / 8192 against 46.6% / 43.2%).
        T(128, 128, num_warps=8, num_stages=3, schedule='pingpong', backend='mosaic'),
        T(128, 128, num_warps=8, num_stages=3, schedule='pingpong', backend='mosaic',
          persistent=True),
        T(128, 128, num_warps=8, num_stages=2, schedule='pairs', backend='mosaic'),
        T(128, 64, num_warps=8, num_stages=4, schedule='pairs', backend='mosaic'),
        T(192, 128, num_warps=12, num_stages=4, schedule='serial', backend='mosaic'),
        T(64, 128, num_warps=4, num_stages=4, schedule='pairs', backend='mosaic'),
        T(64, 64, num_warps=4, num_stages=4, schedule='serial'),
        T(128, 128, num_warps=8, num_stages=3, schedule='serial'),
        T(128, 128, num_warps=8, num_stages=4, schedule='serial'),
        T(128, 64, num_warps=4, num_stages=3, schedule='serial'),
        # 'fence' and 16 warps lost on the H200 (results/bench_lowprec_gpu_schedules.md,
        # 4096: 25.1-29.8% and 38.5% of native bf16 against 41.1% for the first row).
        T(128, 128, num_warps=8, num_stages=3, schedule='fence'),
        T(128, 128, num_warps=8, num_stages=4, schedule='fence'),
        T(128, 128, num_warps=16, num_stages=3, schedule='fence'),
        T(64, 128, num_warps=4, num_stages=4, schedule='fence'),
        T(128, 64, num_warps=4, num_stages=4, schedule='fence'),
        T(128, 128, num_warps=16, num_stages=3, schedule='pairs'),
        T(128, 128, num_warps=8, num_stages=3, schedule='pairs', ptx=False),
        T(128, 128, num_warps=8, num_stages=2, schedule='pairs'),
        T(128, 64, num_warps=8, num_stages=2, schedule='pairs'),
        T(128, 64, num_warps=4, num_stages=2, schedule='pairs'),
        T(64, 128, num_warps=4, num_stages=2, schedule='pairs'),
        T(64, 64, num_warps=4, num_stages=2, schedule='pairs'),
        T(64, 64, num_warps=4, num_stages=3, schedule='pairs'),
    ),
}
# The default sweep: the first SWEPT[mode] of TILINGS[mode] (the first runs in --quick).
SWEPT = {'exact': 3, 'fast': 5}


SCHEDULE_SUFFIX = {'serial': '', 'pairs': 'o', 'fence': 'f', 'carried': 'c', 'pingpong': 'p'}


def tiling_name(mode: str, t: kernel.Tiling) -> str:
  name = f'pallas_{mode}_{t.block_m}x{t.block_n}w{t.num_warps}'
  if mode == 'exact':
    name += f'n{t.threads_n}u{t.unroll}'
  else:
    name += f's{t.num_stages}' + SCHEDULE_SUFFIX[t.schedule]
  return (name + ('' if t.ptx else '_nopx') + ('_mgpu' if t.backend == 'mosaic' else '')
          + ('_persistent' if t.persistent else ''))


def analytic_limit(mode: str, device: str) -> float | None:
  """FLOP/s bound of the mode's kernel on `device` (module docstring), None if unknown."""
  if device not in PEAKS:
    return None
  p32, p16 = PEAKS[device]
  return p32 / 4 if mode == 'exact' else min(p16, p32 / 2 * 2 * CHUNK / 7)


def normal_operands(n: int, seed: int = 0):
  ka, kb = jax.random.split(jax.random.key(seed))
  return (formats.quantize(jax.random.normal(ka, (n, n)), OPERANDS),
          formats.quantize(jax.random.normal(kb, (n, n)), OPERANDS))


def grid_operands(n: int, exponents: tuple[int, int], seed: int = 1):
  """e5m2 values +-(1 + f/4) 2^e, f in 0..3, e uniform in `exponents` (inclusive)."""
  rng = np.random.default_rng(seed)

  def one():
    e = rng.integers(exponents[0], exponents[1] + 1, (n, n))
    f = rng.integers(0, 4, (n, n))
    s = rng.choice([-1.0, 1.0], (n, n))
    return jnp.asarray(s * (1 + f / 4) * np.exp2(e), jnp.float32)
  return one(), one()


def references():
  jax_dot = lambda mode: jax.jit(functools.partial(
      chunked.chunked_dot_general, dimension_numbers=DIMS, operand_fmt=OPERANDS, acc_fmt=ACC,
      chunk_size=CHUNK, mode=mode))
  return {
      'native_fp32': jax.jit(lambda a, b: jnp.dot(a, b, precision='highest')),
      'native_bf16': jax.jit(lambda a, b: jnp.dot(
          a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)),
      'jax_exact': jax_dot('exact'), 'jax_fast': jax_dot('fast'),
  }


def pallas(mode: str, t: kernel.Tiling, interpret: bool):
  return functools.partial(kernel.chunked_matmul, acc_fmt=ACC, chunk_size=CHUNK, mode=mode,
                           operand_fmt=OPERANDS, tiling=t, interpret=interpret)


def _bits(x) -> np.ndarray:
  return np.asarray(x).view(np.uint32)


def _timed(fn, a, b, iters):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(a, b))        # compile + first run
  first = time.perf_counter() - start
  return out, first, benchmarking.time_calls(fn, lambda: (a, b), iters, warmup=1)


def _timed_row(row: dict, fn, a, b, iters: int, reference: dict):
  """Times fn(a, b) into row (first call, seconds, TFLOP/s of the n^3 product, fraction of
  the reference row's rate); returns its output."""
  n = a.shape[0]
  out, first, seconds = _timed(fn, a, b, iters)
  row.update(first_call_s=first, seconds=seconds, tflops=2 * n ** 3 / seconds / 1e12)
  if 'seconds' in reference:
    row['of_reference'] = reference['seconds'] / seconds
  return out


class Run:
  """Rows of results, written out after each one (OUT/NAME_{cpu,gpu}.json and .md)."""

  def __init__(self, args, meta, interpret: bool, name: str, markdown):
    self.args, self.meta, self.interpret, self.rows = args, meta, interpret, []
    self.name = f"{name}_{meta['platform']}"
    self.markdown = markdown

  def add(self, row: dict):
    self.rows.append(row)
    print({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    self.write(final=False)

  def write(self, final: bool):
    payload = {'meta': self.meta, 'rows': self.rows, 'complete': final}
    text = self.markdown(self.rows, self.meta)
    if final:
      benchmarking.write_results(self.args.out, self.name, payload, text)
      return
    os.makedirs(self.args.out, exist_ok=True)   # quietly: a crash later keeps these
    with open(os.path.join(self.args.out, f'{self.name}.json'), 'w') as f:
      json.dump(payload, f, indent=2, default=str)
    with open(os.path.join(self.args.out, f'{self.name}.md'), 'w') as f:
      f.write(text)


def _error(e: Exception) -> str:
  traceback.print_exc()
  return f'{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""}'


def bench_size(run: Run, n: int, tilings: dict, iters: int, slow_iters: int):
  """References and the given tilings at n x n x n; returns {mode: [(fraction, tiling)]}."""
  device = run.meta['device']
  a, b = normal_operands(n)
  a_grid, b_grid = grid_operands(n, (-3, 2))
  refs, ref_rows, ref_out = references(), {}, {}
  for name, fn in refs.items():
    row = {'n': n, 'variant': name, 'mode': name.split('_')[1] if name.startswith('jax') else None}
    try:
      slow = name == 'jax_exact' or run.interpret and name.startswith('jax')
      out, first, seconds = _timed(fn, a, b, slow_iters if slow else iters)
      row.update(first_call_s=first, seconds=seconds, tflops=2 * n ** 3 / seconds / 1e12)
      ref_out[name] = out
      if name == 'jax_fast':
        ref_out['jax_fast_grid'] = fn(a_grid, b_grid)
    except Exception as e:   # report and go on: one failing variant must not stop the rest
      row['error'] = _error(e)
    ref_rows[name] = row
    run.add(row)
  ranked = {}
  for mode, ts in tilings.items():
    reference = ref_rows['native_fp32' if mode == 'exact' else 'native_bf16']
    limit = analytic_limit(mode, device)
    ranked[mode] = []
    for t in ts:
      row = {'n': n, 'variant': tiling_name(mode, t), 'mode': mode,
             'tiling': dataclasses.asdict(t)}
      try:
        fn = pallas(mode, t, run.interpret)
        out = _timed_row(row, fn, a, b, slow_iters if mode == 'exact' or run.interpret
                         else iters, reference)
        if limit:
          row['of_limit'] = row['tflops'] * 1e12 / limit
        if f'jax_{mode}' in ref_out:
          same = _bits(out) == _bits(ref_out[f'jax_{mode}'])
          row['identical'] = bool(same.all())
          row['differing_fraction'] = float(1 - same.mean())
        if mode == 'fast' and 'jax_fast_grid' in ref_out:
          row['identical_exact_sums'] = bool(np.array_equal(
              _bits(fn(a_grid, b_grid)), _bits(ref_out['jax_fast_grid'])))
        ok = row.get('identical' if mode == 'exact' else 'identical_exact_sums', False)
        ranked[mode].append((row.get('of_reference', 0.0) if ok else -1.0, t))
      except Exception as e:
        row['error'] = _error(e)
      run.add(row)
      if mode == 'fast' and t.backend == 'mosaic' and not run.interpret:
        run.add(kernel_only_row(n, t, a, b, reference, iters))
    ranked[mode].sort(key=lambda ft: -ft[0])
  return ranked


def kernel_only_row(n: int, t: kernel.Tiling, a, b, reference: dict, iters: int) -> dict:
  """The Mosaic kernel of tiling t alone (`kernel.mosaic_in_range`: no cast to bf16, range
  check or branch), on the same operands cast beforehand: where the op's time goes."""
  row = {'n': n, 'variant': tiling_name('fast', t) + '_kernel_only', 'mode': 'fast',
         'tiling': dataclasses.asdict(t)}
  try:
    fn = jax.jit(functools.partial(kernel.mosaic_in_range, tiling=t, acc_fmt=ACC,
                                   chunk_size=CHUNK))
    _timed_row(row, fn, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), iters, reference)
  except Exception as e:
    row['error'] = _error(e)
  return row


def check_general_path(run: Run, n: int, tilings: dict):
  """Operands too large for the range check (the integer rounding path, overflow to inf)."""
  wide = {'exact': normal_operands(n), 'fast': grid_operands(n, (8, 13))}
  big = formats.E5M2.max
  a, b = wide['exact']
  wide['exact'] = (a.at[0, 0].set(big), b.at[0, 0].set(big))
  refs = references()
  for mode, ts in tilings.items():
    a, b = wide[mode]
    want = _bits(refs[f'jax_{mode}'](a, b))
    for t in ts:
      row = {'n': n, 'variant': tiling_name(mode, t) + '_general_path', 'mode': mode,
             'tiling': dataclasses.asdict(t), 'range_check_passes': bool(
                 rounding.range_ok(a, b, n, formats.FP32, ACC))}
      try:
        got = _bits(pallas(mode, t, run.interpret)(a, b))
        row['identical'] = bool(np.array_equal(got, want))
        row['differing_fraction'] = float((got != want).mean())
      except Exception as e:
        row['error'] = _error(e)
      run.add(row)


def markdown(rows, meta) -> str:
  lines = ['# Emulated low-precision matmul (e5m2 operands, e6m9 accumulator, chunk 64)', '',
           f"{meta['device']} x{meta['device_count']}, jax {meta['jax']}, {meta['date']}, "
           f"commit {meta['git_commit']}  ", f"Command: `{meta['command']}`", '',
           'Reference: native_fp32 for exact, native_bf16 for fast. Limit: the analytic bound '
           '(experiments/bench_lowprec.py docstring). Identical: bit-identical to the JAX path '
           "(fast: on operands with exact chunk sums; 'differ' is the fraction of outputs that "
           'differ on the random normal operands).', '',
           '| n | variant | TFLOP/s | ms | of reference | of limit | identical | differ | first call s |',
           '|---:|---|---:|---:|---:|---:|---|---:|---:|']
  pct = lambda r, k: f'{r[k]:.1%}' if k in r else ''
  for r in rows:
    if 'error' in r:
      lines.append(f"| {r['n']} | {r['variant']} | failed: {r['error']} | | | | | | |")
      continue
    key = 'identical_exact_sums' if r.get('mode') == 'fast' and 'identical_exact_sums' in r \
        else 'identical'
    ident = {True: 'yes', False: 'NO'}.get(r.get(key), '')
    timing = (f"{r['tflops']:.3f} | {r['seconds'] * 1e3:.2f}" if 'seconds' in r else ' | ')
    first = f"{r['first_call_s']:.1f}" if 'first_call_s' in r else ''
    differ = f"{r['differing_fraction']:.2%}" if 'differing_fraction' in r else ''
    lines.append(f"| {r['n']} | {r['variant']} | {timing} | {pct(r, 'of_reference')} | "
                 f"{pct(r, 'of_limit')} | {ident} | {differ} | {first} |")
  if meta['platform'] == 'cpu':   # interpreted kernels: their times mean nothing
    return '\n'.join(lines) + '\n'
  lines += ['', 'Goals (issue 16, H200): pallas_exact >= 20% of native_fp32, pallas_fast >= 50% '
            'of native_bf16 at 4096 and 8192, each bit-identical as above. Best per size:', '']
  for n in sorted({r['n'] for r in rows if 'tflops' in r}):
    for mode, goal in (('exact', 0.2), ('fast', 0.5)):
      key = 'identical' if mode == 'exact' else 'identical_exact_sums'
      cands = [r for r in rows if r['n'] == n and r.get('mode') == mode and
               r['variant'].startswith('pallas') and 'of_reference' in r and r.get(key)]
      if not cands:
        lines.append(f'- n={n} {mode}: no bit-identical kernel run')
        continue
      best = max(cands, key=lambda r: r['of_reference'])
      met = 'met' if best['of_reference'] >= goal else 'NOT met'
      lines.append(f"- n={n} {mode}: {best['variant']} {best['tflops']:.1f} TFLOP/s, "
                   f"{best['of_reference']:.1%} of reference ({met}), {pct(best, 'of_limit')} "
                   f"of limit; tiling {best['tiling']}")
  return '\n'.join(lines) + '\n'


STEP_FAMILIES = ('resnet', 'lm')
# name -> overrides of the lowprec block, on the configs' FP8 variant (configs/fp8_*.py:
# e5m2 operands of all three GEMMs, e6m9 chunk-64 accumulation, e6m9 weights and optimizer
# state with stochastic rounding, the first and last layers float32).
STEP_VARIANTS = {
    'fp32': None,
    'fp8 jax fast': dict(mode='fast', impl='jax'),
    'fp8 pallas fast': dict(mode='fast', impl='pallas'),
    'fp8 pallas exact': dict(mode='exact', impl='pallas'),
    'fp8 jax exact': dict(mode='exact', impl='jax'),
    'fp8 chunk 1': dict(mode='fast', chunk_size=1, impl='auto'),   # the configs' fp8_chunk1
}
GPU_STEP_VARIANTS = ('fp32', 'fp8 pallas fast', 'fp8 chunk 1', 'fp8 jax fast', 'fp8 pallas exact')
# --budget_s: family i of n may use the budget up to (i + 1) / n of it, and no variant is
# built with less than this many seconds of its share left (its compile, mostly Triton's
# for the Pallas kernels, and the timing rounds must fit); each family's rows are written
# once it is timed, so a call cut short keeps the families before.
STEP_RESERVE_S = 20


def step_config(family: str, variant: str, quick: bool):
  """configs/fp8_resnet.py:gpu (ResNet-20, batch 128; CIFAR-10's 32x32x3 images) or
  configs/fp8_lm.py:gpu (4 x 128 LM, batch 16 x 128 bytes); their smoke presets in --quick."""
  from configs import fp8_lm, fp8_resnet  # pylint: disable=g-import-not-at-top
  module = fp8_resnet if family == 'resnet' else fp8_lm
  overrides = STEP_VARIANTS[variant]
  preset = 'smoke' if quick else 'gpu'
  config = module.get_config(preset + (',fp32' if overrides is None else ',fp8'))
  for gemm in ('fwd', 'bwd_data', 'bwd_weight'):
    config.lowprec[gemm].update(overrides or {})
  return config


def synthetic_data(family: str, config, quick: bool):
  """(DatasetInfo, batch): random inputs of the training batch's shapes (a step's cost does
  not depend on the data; images ~ N(0, 1) like normalised pixels, so the range check of
  the kernels passes). Images 32x32x3 as CIFAR-10's, 8x8x1 in --quick."""
  from accel.data.input_pipeline import DatasetInfo  # pylint: disable=g-import-not-at-top
  ka, kb = jax.random.split(jax.random.key(2))
  b = config.batch_size
  if family == 'resnet':
    shape = (8, 8, 1) if quick else (32, 32, 3)
    return (DatasetInfo('image', num_classes=10, image_shape=shape),
            {'image': jax.random.normal(ka, (b, *shape)),
             'label': jax.random.randint(kb, (b,), 0, 10, jnp.int32)})
  tokens = jax.random.randint(ka, (b, config.data.seq_len + 1), 0, 256, jnp.int32)
  return (DatasetInfo('lm', vocab_size=256),
          {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]})


def _step(trainer, batch, plan):
  return lambda state: trainer.train_step(state, batch, plan)


def bench_steps(run: Run, family: str, variants, rounds: int, steps_per_round: int,
                left_s=lambda: float('inf')):
  """One train step per variant through accel's own trainer (accel.train.build), timed in
  interleaved rounds; rows give ms/step and the ratio to the fp32 step. A variant is not
  built once left_s() (the family's share of --budget_s) < STEP_RESERVE_S (a row says so)."""
  from accel import train  # pylint: disable=g-import-not-at-top
  steps, states, first = {}, {}, {}
  for variant in variants:
    if left_s() < STEP_RESERVE_S:
      run.add({'family': family, 'variant': variant,
               'error': f'not run: less than {STEP_RESERVE_S} s of its --budget_s share left'})
      continue
    config = step_config(family, variant, run.args.quick)
    info, host_batch = synthetic_data(family, config, run.args.quick)
    try:
      task, trainer = train.build(config, info, devices=jax.devices()[:1])
      batch = jax.device_put(host_batch, trainer.batch_sharding)
      plan = jax.device_put(task.methods.plan(0).model_kwargs, trainer.replicated)
      state = trainer.init(jax.random.key(0), batch)
      step = _step(trainer, batch, plan)
      start = time.perf_counter()
      state, metrics = step(state)
      jax.block_until_ready(metrics)
      first[variant] = time.perf_counter() - start
      steps[variant], states[variant] = step, state
    except Exception as e:   # report and go on
      run.add({'family': family, 'variant': variant, 'error': _error(e)})
  if not steps:
    return
  median, spread = benchmarking.interleaved_rounds(steps, states, (), rounds, steps_per_round)
  for variant in steps:
    row = {'family': family, 'variant': variant, 'step_ms': median[variant],
           'spread_ms': spread[variant], 'first_step_s': first[variant],
           'lowprec': STEP_VARIANTS[variant] or 'off'}
    if 'fp32' in median:
      row['vs_fp32'] = median[variant] / median['fp32']
    run.add(row)


def steps_markdown(rows, meta) -> str:
  lines = ['# FP8-simulated train steps through accel\'s trainer, as a ratio to the fp32 step', '',
           f"{meta['device']} x{meta['device_count']}, jax {meta['jax']}, {meta['date']}, "
           f"commit {meta['git_commit']}  ", f"Command: `{meta['command']}`", '',
           'ResNet: configs/fp8_resnet.py:gpu (ResNet-20, batch 128, 32x32x3 images); LM: '
           'configs/fp8_lm.py:gpu (4 layers x 128, batch 16 x 128 bytes); --quick: their smoke '
           'presets, 8x8x1 images; random inputs. fp8: e5m2 operands in all three GEMMs of '
           'every layer but the first and last, e6m9 chunk-64 accumulation, e6m9 weights and '
           'optimizer state. Median of interleaved rounds; spread = max - min over rounds.', '',
           '| model | variant | ms / step | x fp32 step | spread ms | first step s |',
           '|---|---|---:|---:|---:|---:|']
  for r in rows:
    if 'error' in r:
      lines.append(f"| {r['family']} | {r['variant']} | failed: {r['error']} | | | |")
      continue
    ratio = f"{r['vs_fp32']:.2f}" if 'vs_fp32' in r else ''
    lines.append(f"| {r['family']} | {r['variant']} | {r['step_ms']:.2f} | {ratio} | "
                 f"{r['spread_ms']:.2f} | {r['first_step_s']:.1f} |")
  return '\n'.join(lines) + '\n'


def chosen_tilings(spec: str, quick: bool) -> dict:
  """--tilings: 'swept' (SWEPT[mode] of each mode; the first of each in --quick), 'all',
  or comma-separated row names (tiling_name), e.g. pallas_fast_128x128w8s3o."""
  if spec in ('', 'swept'):
    return {m: ts[:1] if quick else ts[:SWEPT[m]] for m, ts in TILINGS.items()}
  if spec == 'all':
    return dict(TILINGS)
  names = [n.strip() for n in spec.split(',') if n.strip()]
  known = {tiling_name(m, t): (m, t) for m, ts in TILINGS.items() for t in ts}
  unknown = [n for n in names if n not in known]
  if unknown:
    raise SystemExit(f'error: unknown --tilings {", ".join(unknown)}; known: '
                     f'{", ".join(known)}')
  return {m: tuple(known[n][1] for n in names if known[n][0] == m) for m in TILINGS}


def bench_kernels(args, meta, interpret: bool):
  sizes = [int(s) for s in args.sizes.split(',')] if args.sizes else (
      [64, 128] if args.quick else [4096, 8192])
  sweep_size = args.sweep_size or sizes[0]
  run = Run(args, meta, interpret, 'bench_lowprec', markdown)
  every = chosen_tilings(args.tilings, args.quick)
  iters, slow = (2, 1) if args.quick else (args.iters, args.slow_iters)
  ranked = bench_size(run, sweep_size, every, iters, slow)
  best = {m: [t for _, t in ranked[m][:args.top]] for m in every}
  defaults = {m: [kernel.DEFAULT_TILING[m]] for m in every}
  if kernel.on_hopper():   # the default there
    defaults['fast'].append(kernel.HOPPER_FAST_TILING)
  for m in every:   # the defaults run at every size (of the modes swept)
    if every[m]:
      best[m] += [t for t in defaults[m] if t not in best[m]]
  for n in sizes:
    if n != sweep_size:
      bench_size(run, n, best, iters, slow)
  check_general_path(run, args.check_size or (32 if args.quick else 1024),
                     {m: best[m][:1] for m in best if best[m]})
  run.write(final=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--part', choices=('kernels', 'steps'), default='kernels',
                 help='kernels: the matmul sweep (bench_lowprec); steps: the FP8-simulated '
                 'train steps (bench_lowprec_steps)')
  p.add_argument('--quick', action='store_true', help='CPU, tiny sizes, kernels interpreted')
  p.add_argument('--sizes', default='', help='comma-separated n (default 4096,8192; quick 64,128)')
  p.add_argument('--sweep_size', type=int, default=0,
                 help='the n at which every tiling runs, first (default: the first size)')
  p.add_argument('--tilings', default='swept',
                 help="kernels: 'swept' (the default sweep), 'all', or comma-separated row "
                 'names (pallas_fast_128x128w8s3o, ...)')
  p.add_argument('--top', type=int, default=3, help='tilings per mode carried to other sizes')
  p.add_argument('--check_size', type=int, default=0,
                 help='n of the general-rounding-path check (default 1024; quick 32)')
  p.add_argument('--iters', type=int, default=20)
  p.add_argument('--slow_iters', type=int, default=3, help='for the exact-mode rows')
  p.add_argument('--step_variants', default='',
                 help=f'comma-separated, of {", ".join(STEP_VARIANTS)} (default on GPU: '
                 f'{", ".join(GPU_STEP_VARIANTS)}; --quick: all)')
  p.add_argument('--rounds', type=int, default=3, help='steps: interleaved rounds')
  p.add_argument('--steps_per_round', type=int, default=5)
  p.add_argument('--families', default=','.join(STEP_FAMILIES),
                 help=f'steps: comma-separated, of {", ".join(STEP_FAMILIES)}, in this order')
  p.add_argument('--budget_s', type=float, default=0,
                 help='steps: seconds for all families, split evenly; no variant is built with '
                 f'less than {STEP_RESERVE_S} s of its family\'s share left (0: no budget)')
  p.add_argument('--out', default='results')
  args = p.parse_args(argv)
  interpret = args.quick or jax.default_backend() != 'gpu'
  meta = benchmarking.provenance()
  if args.part == 'kernels':
    bench_kernels(args, meta, interpret)
    return
  variants = ([v.strip() for v in args.step_variants.split(',') if v.strip()] or
              (list(STEP_VARIANTS) if args.quick else list(GPU_STEP_VARIANTS)))
  unknown = set(variants) - set(STEP_VARIANTS)
  if unknown:
    p.error(f'unknown --step_variants {sorted(unknown)}')
  if set(args.families.split(',')) - set(STEP_FAMILIES):
    p.error(f'unknown --families {args.families!r}; known: {", ".join(STEP_FAMILIES)}')
  run = Run(args, meta, interpret, 'bench_lowprec_steps', steps_markdown)
  rounds, per_round = (2, 1) if args.quick else (args.rounds, args.steps_per_round)
  started = time.monotonic()
  families = args.families.split(',')
  for i, family in enumerate(families):
    share_s = args.budget_s * (i + 1) / len(families)
    left_s = ((lambda s=share_s: s - (time.monotonic() - started)) if args.budget_s
              else (lambda: float('inf')))
    bench_steps(run, family, variants, rounds, per_round, left_s)
  run.write(final=True)


if __name__ == '__main__':
  main()
