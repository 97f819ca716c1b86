"""Contiguous LM streams and the enwik8 / text8 / WikiText-103 builders on fake archives."""
import ml_collections
import numpy as np
import pytest

from accel.data import input_pipeline
from accel.errors import UserError


def _config(name, path='', seq_len=8, batch=3, order='contiguous'):
  return ml_collections.ConfigDict(dict(
      seed=0, batch_size=batch, eval_batch_size=0, eval_steps=-1,
      data=dict(name=name, path=path, dir='', seq_len=seq_len, order=order)))


def test_contiguous_rows_continue_each_other(tmp_path):
  text = bytes(range(32, 127)) * 4                     # 380 bytes; train = first 342
  (tmp_path / 'f.txt').write_bytes(text)
  data = input_pipeline.build(_config('text', str(tmp_path)))
  stream = np.frombuffer(text[:int(len(text) * 0.9)], np.uint8)
  row_len = len(stream) // 3                           # 114 bytes per row
  windows = (row_len - 1) // 8                         # 14 windows of 8 (+1) per row
  assert data.train.windows == windows
  for step in (0, 1, 5, windows - 1, windows, 3 * windows + 2):
    batch = data.train(step)
    start = (step % windows) * 8
    for b in range(3):
      expected = stream[b * row_len + start: b * row_len + start + 9]
      np.testing.assert_array_equal(batch['inputs'][b], expected[:-1])
      np.testing.assert_array_equal(batch['targets'][b], expected[1:])
  # row b of step t+1 starts where row b of step t stopped
  np.testing.assert_array_equal(data.train(3)['targets'][:, -1], data.train(4)['inputs'][:, 0])


def test_contiguous_order_is_refused_for_images():
  with pytest.raises(UserError, match='data.order'):
    input_pipeline.build(_config('digits', order='contiguous'))
