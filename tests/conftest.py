"""Shared fixtures: one prepared-data folder per test session, tiny configs."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


@pytest.fixture(scope='session', autouse=True)
def data_dir(tmp_path_factory):
  """Datasets are prepared once per session into a temporary ACCEL_DATA_DIR."""
  path = os.environ.get('ACCEL_TEST_DATA_DIR') or str(tmp_path_factory.mktemp('tfds'))
  os.environ['ACCEL_DATA_DIR'] = path
  return path
