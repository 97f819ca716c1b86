"""The spine end to end: training, exact resume, data parallelism, multi-process."""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from accel import train
from accel.checkpoint import Checkpoints
from accel.metrics import read_jsonl
from configs import lm
from tests.helpers import run_python


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


def final_params(workdir):
  """Params of the last checkpoint, restored without a template."""
  manager = Checkpoints(workdir, 3)
  restored = manager._manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())
  manager.close()
  return restored['params']


def test_smoke_run_learns_and_writes_everything(tmp_path):
  workdir = str(tmp_path / 'run')
  summary = train.train_and_evaluate(smoke(total_steps=30), workdir)
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
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  assert summary['eval/loss'] == logged[-1]['eval/loss']


def test_resume_is_bitwise_equal_to_uninterrupted(tmp_path):
  # Stop at 10, then raise total_steps to 20: a constant schedule does not depend on
  # total_steps, so the resumed run must repeat the uninterrupted one exactly.
  const_a, const_b = str(tmp_path / 'const_a'), str(tmp_path / 'const_b')
  train.train_and_evaluate(smoke(total_steps=20, **{'optimizer.schedule': 'constant'}), const_a)
  train.train_and_evaluate(smoke(total_steps=10, **{'optimizer.schedule': 'constant'}), const_b)
  train.train_and_evaluate(smoke(total_steps=20, **{'optimizer.schedule': 'constant'}), const_b)
  assert losses(const_a) == losses(const_b)
  a, b = final_params(const_a), final_params(const_b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_data_parallel_on_4_devices_matches_1_device():
  code = """
    import json, os, sys, tempfile
    import jax
    from accel import train
    from configs import lm
    config = lm.get_config('smoke'); config.progress_bar = False; config.total_steps = 10
    out = train.train_and_evaluate(config, tempfile.mkdtemp())
    print(json.dumps({'devices': jax.device_count(), 'loss': out['train/loss'],
                      'eval': out['eval/loss']}))
  """
  one, four = (run_python(code, devices=n) for n in (1, 4))
  assert one.returncode == 0, one.stderr[-2000:]
  assert four.returncode == 0, four.stderr[-2000:]
  r1, r4 = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (one, four))
  assert (r1['devices'], r4['devices']) == (1, 4)
  np.testing.assert_allclose(r4['loss'], r1['loss'], rtol=2e-5)
  np.testing.assert_allclose(r4['eval'], r1['eval'], rtol=2e-5)
