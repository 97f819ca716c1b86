"""The spine end to end: training, exact resume, data parallelism, multi-process."""
import glob
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from accel import train
from accel.checkpoint import Checkpoints
from accel.metrics import event_records, read_jsonl
from configs import lm
from tests.helpers import cache_env, compilation_cache, run_python


@pytest.fixture(scope='module', autouse=True)
def _shared_compiles(compile_cache_dir):
  with compilation_cache(compile_cache_dir):
    yield


def smoke(**overrides):
  config = lm.get_config('smoke')
  config.progress_bar = False
  for key, value in overrides.items():
    node = config
    *path, last = key.split('.')
    for part in path:
      node = node[part]
    node[last] = value
  return config


def losses(workdir):
  return [(m['step'], m['train/loss']) for m in read_jsonl(os.path.join(workdir, 'metrics.jsonl'))]


def event_steps(workdir):
  """The steps of the scalars in each TensorBoard event file, oldest file first."""
  return [[step for _, step in event_records(path) if step is not None]
          for path in sorted(glob.glob(os.path.join(workdir, 'tensorboard', 'events.*')))]


def final_params(workdir):
  """Params of the last checkpoint, restored without a template."""
  manager = Checkpoints(workdir, 3)
  restored = manager._manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())
  manager.close()
  return restored['params']


def test_smoke_run_learns_and_writes_everything(tmp_path):
  workdir = str(tmp_path / 'run')
  summary = train.train_and_evaluate(smoke(total_steps=30, **{'optimizer.schedule': 'constant'}),
                                     workdir)   # the constant schedule's programs are shared
  logged = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  assert [m['step'] for m in logged] == [5, 10, 15, 20, 25, 30]
  assert logged[-1]['train/loss'] < logged[0]['train/loss'] - 0.3
  for key in ('train/loss', 'perf/step_time_s', 'perf/examples_per_s', 'perf/tokens_per_s',
              'perf/flops_per_step'):
    assert key in logged[0]
  assert logged[0]['perf/flops_per_step'] > 1e7
  assert 'eval/loss' in logged[1] and 'eval/bits_per_byte' in logged[1]
  np.testing.assert_allclose(logged[1]['eval/bits_per_byte'], logged[1]['eval/loss'] / np.log(2),
                             rtol=1e-6)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['d_model'] == 32
  assert event_steps(workdir) == [[5, 10, 15, 20, 25, 30]]
  assert summary['eval/loss'] == logged[-1]['eval/loss']


def test_resume_is_bitwise_equal_to_uninterrupted(tmp_path, trained_workdir):
  # The shared workdir stopped at 10; raise total_steps to 20: a constant schedule does not
  # depend on total_steps, so the resumed run must repeat the uninterrupted one exactly.
  const_a = str(tmp_path / 'const_a')
  const_b = shutil.copytree(trained_workdir, str(tmp_path / 'const_b'))
  train.train_and_evaluate(smoke(total_steps=20, **{'optimizer.schedule': 'constant'}), const_a)
  train.train_and_evaluate(smoke(total_steps=20, **{'optimizer.schedule': 'constant'}), const_b)
  assert losses(const_a) == losses(const_b)
  a, b = final_params(const_a), final_params(const_b)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert event_steps(const_b) == [[5, 10], [15, 20]]    # one event file per attempt


def test_data_parallel_on_4_devices_matches_1_device(trained_workdir, compile_cache_dir):
  """The shared workdir's 10 steps on this process's one device, against the same run on 4."""
  code = """
    import json, os, sys, tempfile
    import jax
    from accel import train
    from configs import lm
    config = lm.get_config('smoke'); config.progress_bar = False; config.total_steps = 10
    config.optimizer.schedule = 'constant'
    out = train.train_and_evaluate(config, tempfile.mkdtemp())
    print(json.dumps({'devices': jax.device_count(), 'loss': out['train/loss'],
                      'eval': out['eval/loss']}))
  """
  four = run_python(code, devices=4, env=cache_env(compile_cache_dir))
  assert four.returncode == 0, four.stderr[-2000:]
  r4 = json.loads(four.stdout.strip().splitlines()[-1])
  one = read_jsonl(os.path.join(trained_workdir, 'metrics.jsonl'))[-1]
  assert (jax.device_count(), one['step'], r4['devices']) == (1, 10, 4)
  np.testing.assert_allclose(r4['loss'], one['train/loss'], rtol=2e-5)
  np.testing.assert_allclose(r4['eval'], one['eval/loss'], rtol=2e-5)
