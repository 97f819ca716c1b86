"""The benchmark harness: it times the trainers' own step, counts every step it ran, and its
flags, tables and failure reports say what they should."""
import argparse
import os
import subprocess

import jax
import numpy as np
import pytest

from accel import benchmarking
from accel.data.input_pipeline import DatasetInfo
from configs import stdloss_mnist

INFO = DatasetInfo('image', num_classes=10, image_shape=(8, 8, 1))


def _batch():
  rng = np.random.default_rng(0)
  return {'image': rng.random((8, 8, 8, 1), np.float32),
          'label': rng.integers(0, 10, 8).astype(np.int32)}


def _config():
  return stdloss_mnist.get_config('smoke,mlp,stdloss')


def test_compare_times_the_trainers_step_and_runs_every_step_it_counts():
  config, batch = _config(), _batch()
  variant = benchmarking.trainer_variant(config, INFO, batch)
  assert variant.compile_s > 0 and variant.flops > 0
  rows = benchmarking.compare({'mlp': variant}, rounds=2, steps_per_round=2, warmup=1)
  row = rows['mlp']
  assert row['ms_per_step'] > 0 and row['ms_range'] >= 0 and row['warmup_s'] > 0
  assert row['flops_per_step'] == variant.flops
  assert int(variant.state.step) == 1 + 2 * 2
  # The same 5 steps through the jitted step of the trainer accel.train.build gave, from the
  # same initial state.
  trainer = variant.trainer
  device_batch = jax.device_put(batch, trainer.batch_sharding)
  state = trainer.init(jax.random.fold_in(jax.random.key(config.seed), 0), device_batch)
  for _ in range(5):
    state, metrics = trainer.train_step(state, device_batch, {})
  assert 'stdloss/loss' in metrics
  for got, want in zip(jax.tree.leaves(variant.state.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(got, want)


def test_flags_scales_tables_and_failures(tmp_path, capsys):
  parser = argparse.ArgumentParser(parents=[benchmarking.flags()])
  parser.add_argument('--batch', type=int, default=None)
  args = benchmarking.scale_defaults(parser.parse_args(['--quick', '--rounds', '3']),
                                     quick=dict(rounds=7, steps=2, batch=4),
                                     full=dict(rounds=20, steps=20, batch=256))
  assert (args.rounds, args.steps, args.batch, args.out) == (3, 2, 4, 'results')
  args = benchmarking.scale_defaults(parser.parse_args([]), quick={'steps': 2},
                                     full={'steps': 20})
  assert args.steps == 20 and args.rounds is None

  def broken():
    raise ValueError('no such model\nsecond line')
  variants, errors = benchmarking.try_variants({'broken': broken})
  assert variants == {} and errors == {'broken': 'ValueError: no such model'}
  rows = {'a': dict(ms_per_step=2.0, ms_range=0.5, compile_s=1.0, warmup_s=0.1),
          'b': dict(ms_per_step=4.0, ms_range=float('nan'), compile_s=1.0, warmup_s=0.1)}
  table = benchmarking.timing_table(rows, {'tokens/s': lambda r: 1e3 / r['ms_per_step']},
                                    errors)
  assert table.splitlines()[0] == ('| variant | ms/step (median) | max-min over rounds (ms) | '
                                   'compile (s) | warm-up (s) | tokens/s |')
  assert '| a | 2.000 | 0.500 | 1.000 | 0.100 | 500.000 |' in table
  assert '| b | 4.000 | - |' in table
  assert '| broken | failed: ValueError: no such model | - | - | - | - |' in table
  assert benchmarking.ratios(rows, [('a', 'b'), ('a', 'broken')]) == {'a/b': 0.5}
  meta = benchmarking.provenance()
  text = benchmarking.report('Title', 'Setup.', meta, table, {'a/b': 0.5})
  assert text.startswith('# Title\n\nSetup.\n\nDevice: cpu: ')
  assert f"Command: `{meta['command']}`" in text and '| a/b | 0.500 |' in text
  benchmarking.write_results('', 'name', {}, text)
  assert capsys.readouterr().out.startswith('# Title')
  out = str(tmp_path / 'out')
  benchmarking.write_results(out, 'name', {'x': 1}, text)
  assert sorted(os.listdir(out)) == ['name.json', 'name.md']


def test_git_commit_marks_uncommitted_code(monkeypatch, tmp_path):
  monkeypatch.setenv('ACCEL_GIT_COMMIT', 'abc1234')
  assert benchmarking.git_commit() == 'abc1234'
  monkeypatch.delenv('ACCEL_GIT_COMMIT')
  repo = tmp_path / 'repo'
  repo.mkdir()
  git = lambda *a: subprocess.run(['git', '-C', str(repo), *a], check=True, capture_output=True)
  git('init', '-q')
  (repo / 'f.py').write_text('x = 1\n')
  git('add', 'f.py')
  git('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'c')
  monkeypatch.setattr(benchmarking, 'ROOT', str(repo))
  head = benchmarking.git_commit()
  assert head and '+' not in head
  (repo / 'f.py').write_text('x = 2\n')
  assert benchmarking.git_commit() == head + '+changes'


def test_programs_count_the_flops_of_the_lowered_step():
  """A step of one matmul and a tanh: 2 m k n FLOPs (XLA counts the tanh as a
  transcendental, not a FLOP)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from accel.programs import Programs, lowered_flops  # pylint: disable=g-import-not-at-top
  m, k, n = 16, 32, 8
  step = jax.jit(lambda w, x, plan: (w, jnp.tanh(x @ w)))
  w, x = np.ones((k, n), np.float32), np.ones((m, k), np.float32)
  programs = Programs(step, jax.device_put(w), jax.device_put(x))
  programs.get({})
  [flops] = programs.flops.values()
  assert flops == 2 * m * k * n
  assert lowered_flops(step.lower(w, x, {})) == flops
