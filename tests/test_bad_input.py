"""Bad input: one clear error line, a non-zero exit, nothing already written lost."""
import hashlib
import os

import jax
import optax
import pytest

from accel import train, trainer
from accel.errors import UserError
from tests.helpers import run_cli
from tests.test_train import smoke


def tree_digest(root):
  digest = hashlib.sha256()
  for folder, _, files in sorted(os.walk(root)):
    for name in sorted(files):
      path = os.path.join(folder, name)
      digest.update(path.encode())
      with open(path, 'rb') as f:
        digest.update(f.read())
  return digest.hexdigest()


def assert_one_error_line(result, fragment, code=None):
  assert result.returncode != 0 and (code is None or result.returncode == code)
  lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1, result.stderr[-2000:]
  assert fragment in lines[0], lines[0]
  assert 'Traceback' not in result.stderr


@pytest.mark.parametrize('args,fragment', [
    (['--config.model.bogus=1'], "unknown config key 'model.bogus'"),
    (['--config.model.d_model=abc'], "invalid literal for int()"),
    (['--config=configs/lm.py:nosuchpreset'], "unknown preset 'nosuchpreset'"),
    (['--config=configs/nosuchfile.py'], 'nosuchfile.py'),
    (['--config.data.name=nosuchdata'], "unknown data.name 'nosuchdata'"),
    (['--config.data.name=text', '--config.data.path=/no/such/path'], 'does not exist'),
])
def test_cli_rejects_bad_config(tmp_path, args, fragment):
  result = run_cli('--config=configs/lm.py:smoke', *args, f'--workdir={tmp_path / "w"}')
  assert_one_error_line(result, fragment)


def test_cli_refuses_other_experiment_and_corrupt_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  ok = run_cli('--config=configs/lm.py:smoke', '--config.total_steps=10',
               '--config.progress_bar=False', f'--workdir={workdir}')
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert 'run written to' in ok.stdout
  before = tree_digest(workdir)

  other = run_cli('--config=configs/lm.py:smoke', '--config.model.d_model=64',
                  f'--workdir={workdir}')
  assert_one_error_line(other, 'holds a different experiment (model.d_model: 32 -> 64)', 1)
  assert tree_digest(workdir) == before

  for folder, _, files in os.walk(os.path.join(workdir, 'checkpoints', '10')):
    for name in files:
      with open(os.path.join(folder, name), 'wb') as f:
        f.write(b'not a checkpoint')
  corrupted = tree_digest(workdir)
  broken = run_cli('--config=configs/lm.py:smoke', '--config.total_steps=20',
                   f'--workdir={workdir}')
  assert_one_error_line(broken, 'cannot be restored', 1)
  assert tree_digest(workdir) == corrupted


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(smoke(total_steps=10), workdir)
  before = tree_digest(os.path.join(workdir, 'checkpoints'))
  real = trainer.optim.build_optimizer

  def exploding(opt_cfg, total_steps, **kwargs):
    tx, schedule = real(opt_cfg, total_steps, **kwargs)

    def update(grads, state, params):   # same state as tx, so the checkpoint restores
      updates, state = tx.update(grads, state, params)
      return jax.tree.map(lambda u: u * 1e30, updates), state   # inf, then NaN
    return optax.GradientTransformation(tx.init, update), schedule
  monkeypatch.setattr(trainer.optim, 'build_optimizer', exploding)
  with pytest.raises(train.TrainingDiverged, match='the last good checkpoint, step 10'):
    train.train_and_evaluate(smoke(total_steps=20), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['10']
  assert tree_digest(os.path.join(workdir, 'checkpoints')) == before
  assert issubclass(train.TrainingDiverged, UserError)
