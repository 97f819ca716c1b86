r"""Low-precision training (Wang et al. NeurIPS 2018; Sakr et al. ICLR 2019; papers.md
section 3): fp32 vs FP8 GEMMs with chunked FP16 accumulation vs unchunked accumulation vs
round-to-nearest weight updates, and the accumulation bit-width (VRR) table.

Runs: `lm-VARIANT` (configs/fp8_lm.py) for VARIANT in fp32 | fp8 (chunk 64) | fp8_chunk1
(sequential e6m9 accumulation) | fp8_nearest (nearest rounding in the 16-bit update); above
smoke scale also `resnet-VARIANT` (configs/fp8_resnet.py; its largest preset, gpu, stands in
at paper scale). The VRR table is `python -m experiments.vrr` (--quick at smoke scale),
written beside the table as TARGET_SCALE_vrr.{md,json,png} and reused when present.
"""
from __future__ import annotations

import os

from accel import sweep
from accel.reproduce import RunResult, config, embed, fmt, table

TITLE = 'FP8 training with chunk-based accumulation (Wang et al. 2018; Sakr et al. 2019)'
CONFIGS = ('configs/fp8_lm.py', 'configs/fp8_resnet.py')
TABLE_METRICS = ['eval/loss', 'eval/accuracy']
PLOT_METRICS = ['train/loss', 'eval/loss', 'eval/accuracy']
VARIANTS = ('fp32', 'fp8', 'fp8_chunk1', 'fp8_nearest')
DESCRIPTION = {'fp32': 'fp32 baseline', 'fp8': 'FP8 GEMMs, FP16 chunked accumulation (64)',
               'fp8_chunk1': 'FP8 GEMMs, FP16 sequential accumulation (chunk 1)',
               'fp8_nearest': 'FP8 GEMMs (chunk 64), round-to-nearest 16-bit update'}
PAPER = {'fp32': 'baseline',
         'fp8': 'matches fp32 within noise (CIFAR-10, ImageNet, BN50-DNN; numbers not '
                'retrieved)',
         'fp8_chunk1': 'plain FP16 accumulation loses accuracy',
         'fp8_nearest': 'round-to-nearest in the update stalls training'}


def _resnet_scale(scale: str) -> str:
  return 'gpu' if scale == 'paper' else scale


def stages(scale: str, sweep_dir: str) -> list[list[sweep.Run]]:
  del sweep_dir
  runs = [sweep.Run(config('fp8_lm', f'{scale},{v}'), {}, f'lm-{v}') for v in VARIANTS]
  if scale != 'smoke':
    runs += [sweep.Run(config('fp8_resnet', f'{_resnet_scale(scale)},{v}'), {}, f'resnet-{v}')
             for v in VARIANTS]
  return [runs]


def vrr_table(scale: str, out_prefix: str) -> str:
  """experiments.vrr's table and plot, written to OUT_PREFIX_vrr.* (reused when there)."""
  prefix = out_prefix + '_vrr'
  lines = embed(['experiments.vrr', f'--out={os.path.abspath(prefix)}',
                 *(['--quick'] if scale == 'smoke' else [])], prefix + '.md')
  return '\n'.join(lines)   # its plot link is relative to the same folder


def _delta(r: RunResult, base: RunResult, metric: str) -> str:
  a, b = r.final(metric), base.final(metric)
  return f'{a - b:+.4f}' if a is not None and b is not None else '-'


def report(results: dict[str, RunResult], scale: str, out_prefix: str) -> str:
  lm_base = results['lm-fp32']
  resnet = scale != 'smoke'
  rows = []
  for v in VARIANTS:
    lm = results[f'lm-{v}']
    row = [DESCRIPTION[v], PAPER[v], fmt(lm.final('eval/loss')),
           _delta(lm, lm_base, 'eval/loss'), fmt(lm.median('perf/step_time_s'))]
    if resnet:
      r = results[f'resnet-{v}']
      row += [fmt(r.final('eval/accuracy'), '.3f'),
              _delta(r, results['resnet-fp32'], 'eval/accuracy')]
    rows.append(row)
  header = ['variant', 'paper', 'LM eval loss', 'LM vs fp32', 'LM step time (s)']
  if resnet:
    header += ['ResNet eval accuracy', 'ResNet vs fp32']
  return '\n'.join([
      '## Training in reduced precision', '',
      table(header, rows),
      'Emulated on this device (float32 arithmetic rounded to 1-5-2 operands and 1-6-9 '
      'accumulation): step times measure the emulation, not FP8 hardware.'
      + ('' if resnet else ' The ResNet runs are above smoke scale.'), '',
      '## Accumulation bit-width from the variance retention ratio (Sakr et al.)', '',
      "Paper: VRR's closed form and per-GEMM table were not retrieved (papers.md); accel "
      'measures VRR by Monte Carlo with its emulator.', '',
      vrr_table(scale, out_prefix)])
