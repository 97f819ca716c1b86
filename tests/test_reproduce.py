"""Paper tables: reductions and formulas against hand values; each existing target at smoke
scale writes its table, CSV and plot."""
import csv
import math
import os
import sys

import pytest

from accel import reproduce, sweep
from accel.sweep import summary
from accel.errors import UserError
from accel.reproduce import pld, stdloss
from tests import background
from tests.helpers import ROOT


def _result(lines, config=None):
  return reproduce.RunResult(sweep.Run('configs/lm.py', {}, 'r'), {'state': 'finished'}, lines,
                             config or {})


def test_run_result_reductions():
  r = _result([{'step': 10, 'perf/step_time_s': 1.0, 'eval/loss': 3.0, 'eval/accuracy': 0.1},
               {'step': 20, 'perf/step_time_s': 0.5, 'eval/loss': 2.0, 'eval/accuracy': 0.4},
               {'step': 30, 'perf/step_time_s': 0.5, 'eval/loss': 2.5, 'eval/accuracy': 0.3}])
  assert r.final('eval/loss') == 2.5 and r.best('eval/loss') == 2.0
  assert r.best('eval/accuracy') == 0.4 and r.mean('eval/accuracy') == pytest.approx(0.8 / 3)
  assert r.median('perf/step_time_s') == 0.5 and r.step_count() == 30
  assert r.train_seconds() == pytest.approx(20.0)
  assert r.reach('eval/loss', 2.6) == (20, pytest.approx(15.0))     # lower is better
  assert r.reach('eval/accuracy', 0.35) == (20, pytest.approx(15.0))  # higher is better
  assert r.reach('eval/loss', 1.0) == (None, None)
  assert reproduce.speedup(30.0, 15.0) == '2.00x faster'
  assert reproduce.speedup(30.0, None) == 'not reached'


def test_pld_expected_layers_formula():
  # theta_bar = 1: nothing is dropped.
  assert pld.expected_layers(12, 1.0, 0.001, 100) == 12
  # gamma = 0: theta stays 1.
  assert pld.expected_layers(12, 0.5, 0.0, 100) == 12
  # A huge gamma: theta(0) = 1, theta(t > 0) = theta_bar; mean theta = 0.5 + 0.5 / T.
  T = 10
  assert pld.expected_layers(12, 0.5, 1e9, T) == pytest.approx(12 - (0.5 - 0.5 / T) * 13 / 2)
  # The paper's steady state for L = 12, theta_bar = 0.5: 8.75 layers.
  assert pld.expected_layers(12, 0.5, 1e9, 10 ** 6) == pytest.approx(8.75, abs=1e-4)
  # Direct sum for a small case.
  want = sum(sum(1 - l / 4 * (1 - (0.5 * math.exp(-0.3 * t) + 0.5)) for l in range(1, 5))
             for t in range(7)) / 7
  assert pld.expected_layers(4, 0.5, 0.3, 7) == pytest.approx(want)


def test_target_errors(monkeypatch):
  with pytest.raises(UserError, match='unknown target'):
    reproduce.load_target('nosuch')
  monkeypatch.setattr(pld, 'CONFIGS', ('configs/not_written_yet.py',))
  with pytest.raises(UserError, match='configs/not_written_yet.py, which does not exist yet'):
    reproduce.load_target('pld')
  monkeypatch.undo()
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')
  with pytest.raises(UserError, match="scale 'paper' needs GPUs"):
    reproduce.reproduce('pld', 'paper', '/tmp/unused', '/tmp/unused')


def test_overrides_and_runs_that_need_more_gpus(tmp_path):
  with pytest.raises(UserError, match="expected KEY=VALUE"):
    reproduce.parse_overrides(['total_steps'])
  overrides = reproduce.parse_overrides(['total_steps=7', 'data.name=shakespeare'])
  assert overrides == {'total_steps': '7', 'data.name': 'shakespeare'}
  cfg = reproduce.config('ouroboros_lm', 'smoke')
  stages = [[sweep.Run(cfg, {'pipeline.enabled': False}, 'one', devices=1),
             sweep.Run(cfg, {'total_steps': 3}, 'two', devices=2)]]
  with pytest.raises(UserError, match='total_stpes is not a key of configs/ouroboros_lm.py'):
    reproduce.with_overrides(stages, {'total_stpes': '7'})
  [[one, two]] = reproduce.with_overrides(stages, overrides)
  assert (one.name, one.overrides) == ('one', {'pipeline.enabled': False, **overrides})
  assert two.overrides == {'total_steps': '7', 'data.name': 'shakespeare'}
  # On one GPU the two-device run is listed, not run; nothing is started for it.
  results = reproduce.run_stages([[two]], str(tmp_path), 1, False, gpus=1)
  assert results['two'].status == {'state': reproduce.NOT_RUN_HERE,
                                   'error': 'needs 2 GPUs, this machine has 1'}
  assert not os.path.exists(tmp_path / 'two')


def test_embedded_experiment_sees_the_parents_packages(tmp_path, monkeypatch):
  """A report embedded from another experiment runs with the parent's PYTHONPATH kept
  (the GPU image installs grain with --target, on PYTHONPATH only)."""
  (tmp_path / 'only_on_pythonpath.py').write_text(
      'import sys\nopen(sys.argv[1], "w").write("# title\\nfrom the child\\n")\n')
  monkeypatch.setenv('PYTHONPATH', str(tmp_path))
  md = tmp_path / 'report.md'
  assert reproduce.embed(['only_on_pythonpath', str(md)], str(md)) == ['from the child']

TABLES = {'test_pld_smoke_table': 'pld', 'test_stdloss_smoke_table': 'stdloss',
          'test_together_smoke_table': 'together', 'test_ouroboros_smoke_table': 'ouroboros'}


def _reproduce_job(target):
  """`experiments.reproduce TARGET --scale=smoke` in a subprocess, writing under its job
  folder. One JAX persistent compilation cache for the runs of every table: a program that
  two runs compile alike (the fine-tuning runs of pld, most evaluation steps) is compiled
  once. The runs compile with XLA's backend optimizations off (conftest): the tables' assertions are
  about what the runs compute and count (FLOPs from XLA's cost analysis), not speed."""
  home = background.folder(f'reproduce_{target}')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT,
         'JAX_COMPILATION_CACHE_DIR': background.folder('reproduce_jax_cache'),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
         'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}
  return background.Job([sys.executable, '-m', 'experiments.reproduce', target,
                         '--scale=smoke', f'--out={home}/tables', f'--runs_dir={home}/runs'],
                        env, ROOT, timeout=600)


def background_jobs():
  return {test: _reproduce_job(target) for test, target in TABLES.items()}


def _reproduced(test):
  """(CompletedProcess, tables folder, runs folder) of the table `test` checks."""
  target = TABLES[test]
  done = background.result(test, lambda: _reproduce_job(target))
  assert done.returncode == 0, done.stderr[-2000:]
  home = background.folder(f'reproduce_{target}')
  return f'{home}/tables', f'{home}/runs'


def _check_outputs(out, target, n_runs, may_fail=()):
  """The table, CSV and plot exist; every run finished except those in `may_fail`."""
  prefix = os.path.join(out, f'{target}_smoke')
  with open(prefix + '.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == n_runs, rows
  assert all(r['state'] == 'finished' for r in rows if r['run'] not in may_fail), rows
  assert os.path.getsize(prefix + '.png') > 1000
  with open(prefix + '.md') as f:
    text = f.read()
  assert f'- command: `python -m experiments.reproduce {target} --scale=smoke --out={out}' \
         in text
  assert '- device: 1 x cpu' in text and 'jax 0.' in text and '- date: 20' in text
  module = reproduce.load_target(target)
  scales = reproduce.scales_of(module)
  if 'paper' in scales:
    assert f'`paper`, needs GPUs: run it elsewhere: `python -m experiments.reproduce {target} ' \
           '--scale paper`' in text
  # The largest scale's train commands, one by one.
  assert f'--config=configs/' in text.split('## Other scales')[1]
  runs_preset = getattr(module, 'RUNS_OF_SCALE', {}).get(scales[-1], scales[-1])
  assert f':{runs_preset}' in text.split('## Other scales')[1]
  return text


def test_pld_smoke_table():
  out, runs = _reproduced('test_pld_smoke_table')
  text = _check_outputs(out, 'pld', 4)
  flops_row = next(l for l in text.splitlines() if l.startswith('| FLOPs per step'))
  base_flops, pld_flops, flops_ratio = (float(c) for c in flops_row.split('|')[3:6])
  # Fewer blocks executed -> fewer FLOPs; the ratio cell is the ratio of the two cells.
  assert pld_flops < base_flops and flops_ratio == pytest.approx(pld_flops / base_flops,
                                                                 rel=2e-3)
  assert 'python -m experiments.train --config=configs/pld_bert_finetune.py:paper ' \
         '--config.finetune.pretrained_workdir=runs/reproduce/pld_paper/pld' in text


def test_stdloss_steps_to_baseline_best():
  none = _result([{'step': 25, 'eval/accuracy': 0.2}, {'step': 50, 'eval/accuracy': 0.5},
                  {'step': 75, 'eval/accuracy': 0.4}])
  fast = _result([{'step': 25, 'eval/accuracy': 0.6}, {'step': 50, 'eval/accuracy': 0.7}])
  slow = _result([{'step': 25, 'eval/accuracy': 0.3}, {'step': 50, 'eval/accuracy': 0.45}])
  assert stdloss.steps_to_baseline_best(none, fast) == (50, 25)
  assert stdloss.steps_to_baseline_best(none, slow) == (50, None)
  assert stdloss.steps_to_baseline_best(none, none) == (50, 50)


def test_stdloss_seed_rows_against_hand_values(monkeypatch):
  monkeypatch.setitem(stdloss.SEEDS, 'smoke', (0, 1))
  curve = lambda *accs: [{'step': 25 * (i + 1), 'eval/accuracy': a} for i, a in enumerate(accs)]
  results = {'cnn-none-seed0': _result(curve(0.2, 0.5, 0.4)),      # A* 0.5 at step 50
             'cnn-none-seed1': _result(curve(0.3, 0.3, 0.6)),      # A* 0.6 at step 75
             'cnn-stdloss-seed0': _result(curve(0.6, 0.7) + [{'step': 50,
                                                               'train/stdloss/loss': 2.0}]),
             'cnn-stdloss-seed1': _result(curve(0.1, 0.2, 0.3) + [{'step': 75,
                                                                    'train/stdloss/loss': 4.0}])}
  none, std = stdloss.seed_rows(results, 'smoke', 'cnn')
  assert none == ['none', '50.0 +- 14.1', '24.6 +- 6.5', '2/2', '62', '50, 75', '1.00', '1.00',
                  '-']
  # seed 0 reaches 0.5 at step 25 (2x), seed 1 never reaches 0.6: no ratio of the means.
  assert std == ['stdloss', '50.0 +- 28.3', '75.2 +- 2.6', '1/2', '25', '25, -', '2.00', '-',
                 '3.00 +- 1.41']


def test_stdloss_smoke_table():
  out, runs = _reproduced('test_stdloss_smoke_table')
  text = _check_outputs(out, 'stdloss', 4)
  assert os.path.getsize(os.path.join(out, 'stdloss_smoke_batch.png')) > 1000
  # The un-normalized run reaches its own best at its own step: speedup 1 by definition,
  # as the mean of the seeds' ratios and as the ratio of the mean steps.
  none = next(l for l in text.splitlines() if l.startswith('| none |')).split('|')
  assert none[7].strip() == '1.00' and none[8].strip() == '1.00'
  # The std-loss run logs its term; the batch-size study ran 80 examples in 20 steps of 4.
  stdloss_row = next(l for l in text.splitlines() if l.startswith('| stdloss |')).split('|')
  assert float(stdloss_row[9].split('+-')[0]) > 0
  assert next(l for l in text.splitlines() if l.startswith('| 4 |')).startswith('| 4 | 20 |')
  with pytest.raises(UserError, match="has no scale 'paper'"):
    reproduce.reproduce('stdloss', 'paper', out, runs)


def test_together_smoke_table():
  """Baseline, each method alone and all three in one run: every run trains."""
  out, runs = _reproduced('test_together_smoke_table')
  text = _check_outputs(out, 'together', 3)
  row = next(l for l in text.splitlines() if l.startswith('| together |'))
  assert row.startswith('| together | on | on | on | finished |')
  base = next(l for l in text.splitlines() if l.startswith('| baseline |'))
  assert base.split('|')[9].strip() == '1x (definition)'
  # Layer dropping executes fewer blocks than the baseline.
  layerdrop = next(l for l in text.splitlines() if l.startswith('| layerdrop |'))
  assert float(layerdrop.split('|')[11]) < 1.0


def test_ouroboros_smoke_table():
  """Data parallel and the Ouroboros pipeline on one device: both train, the pipeline run
  logged the pipeline trainer's metric, the speedup column is relative to dp-1dev."""
  out, runs = _reproduced('test_ouroboros_smoke_table')
  text = _check_outputs(out, 'ouroboros', 2)
  dp = next(l for l in text.splitlines() if l.startswith('| 1 | dp |'))
  ouro = next(l for l in text.splitlines() if l.startswith('| 1 | ouroboros (K=2) |'))
  assert dp.split('|')[3].strip() == 'finished' and ouro.split('|')[3].strip() == 'finished'
  assert dp.split('|')[5].strip() == '1.00'
  lines = summary.read_metrics(os.path.join(runs, 'ouroboros_smoke', 'ouroboros-1dev'))
  assert any('train/pipeline_filled' in l for l in lines)
