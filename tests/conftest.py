"""Shared fixtures: one prepared-data folder per test session, tiny configs."""
import os
import sys

import pytest

# XLA's backend (LLVM) optimizations off for this process and the subprocesses that inherit
# its environment: the tests check what programs compute, not how fast, and compiling is
# most of their time (about a fifth less with this). Before jax is imported.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_backend_optimization_level=0').strip()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


@pytest.fixture(scope='session', autouse=True)
def data_dir(tmp_path_factory):
  """Datasets are prepared once per session into a temporary ACCEL_DATA_DIR."""
  path = os.environ.get('ACCEL_TEST_DATA_DIR') or str(tmp_path_factory.mktemp('tfds'))
  os.environ['ACCEL_DATA_DIR'] = path
  return path


def pytest_collection_finish(session):
  """The selected tests' slow subprocesses (`tests.background`) start now."""
  from tests import background  # pylint: disable=g-import-not-at-top
  jobs, modules = {}, {}
  for item in session.items:
    module = getattr(item, 'module', None)
    if module is not None and hasattr(module, 'background_jobs'):
      mine = modules.setdefault(module, module.background_jobs())
      name = getattr(item, 'originalname', item.name)
      if name in mine:
        jobs.setdefault(name, mine[name])
  if jobs:
    background.start(jobs)
  session.config.add_cleanup(background.stop)


@pytest.fixture(autouse=True)
def logging_restored():
  """What accel.faults.quiet_logs and a fault's exit do to logging, undone after each test."""
  from tests.helpers import logging_restored as restored  # pylint: disable=g-import-not-at-top
  with restored():
    yield


@pytest.fixture(scope='session')
def compile_cache_dir(tmp_path_factory):
  """One JAX persistent compilation cache for the tests that train the smoke LM (in this
  process through tests.helpers.compilation_cache, in subprocesses through cache_env)."""
  return str(tmp_path_factory.mktemp('jax_cache'))


# The run that `trained_workdir` holds: the smoke LM, 10 steps, constant learning rate (so
# that extending it to N steps repeats an uninterrupted N-step run exactly).
TRAINED_STEPS = 10
TRAINED_ARGS = ('--config=configs/lm.py:smoke', '--config.optimizer.schedule=constant',
                '--config.progress_bar=False')


@pytest.fixture(scope='session')
def trained_workdir(tmp_path_factory, compile_cache_dir):
  """A workdir that trained TRAINED_ARGS to step TRAINED_STEPS (checkpoint at 10, metrics
  at 5 and 10), shared by the tests: read it, or copy it (`copy_of`) to change it."""
  from accel import train  # pylint: disable=g-import-not-at-top
  from tests.helpers import compilation_cache  # pylint: disable=g-import-not-at-top
  from tests.test_train import smoke  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  with compilation_cache(compile_cache_dir):
    train.train_and_evaluate(
        smoke(total_steps=TRAINED_STEPS, **{'optimizer.schedule': 'constant'}), workdir)
  return workdir
