r"""The methods together (configs/together.py): progressive layer dropping, FP8 GEMMs with
chunked accumulation and the standardization loss in one Transformer LM, against each
method alone and the baseline.

Runs (configs/together.py at the scale, methods switched with METHOD.enabled): `baseline`
(none), `layerdrop`, `lowprec`, `stdloss` (one each), the three pairs `layerdrop+lowprec`,
`layerdrop+stdloss`, `lowprec+stdloss`, and `together` (all three); at smoke scale only
`baseline`, `layerdrop` and `together`.
No paper combines them; the paper column says what each method alone reports.

Reported per run: final eval loss and bits per byte, the steps and training seconds to the
baseline's final eval loss, median step time, executed FLOPs per step. The FP8 GEMMs are
emulated (float32 arithmetic rounded to 1-5-2 / 1-6-9), so their step time measures the
emulation, not FP8 hardware: the lowprec rows are about numerics.
"""
from __future__ import annotations

import itertools

from accel import sweep
from accel.reproduce import RunResult, config, fmt, ratio, speedup, table

TITLE = 'Layer dropping + FP8 chunked GEMMs + standardization loss, together'
CONFIGS = ('configs/together.py',)
TABLE_METRICS = ['eval/loss', 'eval/bits_per_byte']
PLOT_METRICS = ['train/loss', 'eval/loss']
METHODS = ('layerdrop', 'lowprec', 'stdloss')
PAPER = {'layerdrop': 'PLD: 25% fewer FLOPs, 24% less time per sample, same accuracy',
         'lowprec': 'FP8 + chunked FP16 accumulation: fp32 accuracy within noise',
         'stdloss': 'std loss: 2.2-2.8x fewer steps to the baseline best (CNNs)'}


def combinations(scale: str) -> list[tuple[str, ...]]:
  """Every subset of METHODS; at smoke scale the baseline, layer dropping alone (whose FLOPs
  the tests check) and all three."""
  if scale == 'smoke':
    return [(), ('layerdrop',), METHODS]
  return [c for k in range(len(METHODS) + 1) for c in itertools.combinations(METHODS, k)]


def run_name(methods: tuple[str, ...]) -> str:
  if not methods:
    return 'baseline'
  return 'together' if len(methods) == len(METHODS) else '+'.join(methods)


def stages(scale: str, sweep_dir: str) -> list[list[sweep.Run]]:
  del sweep_dir
  return [[sweep.Run(config('together', scale),
                     {f'{m}.enabled': m in methods for m in METHODS}, run_name(methods))
           for methods in combinations(scale)]]


def report(results: dict[str, RunResult], scale: str, out_prefix: str) -> str:
  del out_prefix
  base = results['baseline']
  base_loss, base_seconds = base.final('eval/loss'), base.train_seconds()
  base_flops = base.mean('perf/flops_per_step')
  rows = []
  for methods in combinations(scale):
    r = results[run_name(methods)]
    steps_to, seconds_to = (r.reach('eval/loss', base_loss) if base_loss is not None
                            else (None, None))
    rows.append([
        run_name(methods), *('on' if m in methods else '-' for m in METHODS),
        r.status.get('state', 'not run'), fmt(r.final('eval/loss')),
        fmt(r.final('eval/bits_per_byte')),
        f'{fmt(steps_to)} / {fmt(seconds_to, ".3g")}',
        ('1x (definition)' if not methods else
         speedup(base_seconds, seconds_to) if r.finished else '-'),
        fmt(r.median('perf/step_time_s')),
        fmt(ratio(r.mean('perf/flops_per_step'), base_flops), '.3f'),
        r.status.get('error', '') if r.status.get('state') == 'failed' else ''])
  alone = [[m, PAPER[m]] for m in METHODS]
  return '\n'.join([
      '## Each method alone, in pairs and together', '',
      table(['run', *METHODS, 'state', 'final eval loss', 'eval bits/byte',
             "steps / train s to baseline's final loss", 'speedup', 'step time (s, median)',
             'FLOPs / baseline', 'error'], rows),
      'Steps to the baseline loss are counted at evaluation steps; training seconds sum the '
      'logged step times (compilation, evaluation and checkpoints excluded). FLOPs are the '
      "executed ones (a dropped block's are not counted). The FP8 GEMMs are emulated, so "
      "the lowprec runs' step times and FLOPs (XLA's count, rounding arithmetic included) "
      'are those of the emulation, not of FP8 hardware.', '',
      '## What each paper reports for its method alone', '',
      table(['method', 'paper'], alone)])
