"""Data builders on small files made here, and the step-indexed pipeline."""
import ml_collections
import numpy as np
import pytest

from accel.data import builders, input_pipeline, preparation
from accel.errors import UserError


def data_config(name, path='', seq_len=16, batch=4, seed=0):
  return ml_collections.ConfigDict(dict(
      seed=seed, batch_size=batch, eval_batch_size=0, eval_steps=-1,
      data=dict(name=name, path=path, dir='', seq_len=seq_len)))


def test_user_text_round_trips_bytes_and_splits_per_file(tmp_path):
  prepared, tmp_path = tmp_path / 'prepared', tmp_path / 'text'
  texts = {'a.txt': 'Now is the winter of our discontent. ' * 20,
           'sub/b.md': 'Ünïcödé — made glorious summer by this sun of York. ' * 20}
  for name, text in texts.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text, encoding='utf-8')
  builder = preparation.prepare(builders.UserText, path=str(tmp_path),
                                file_format='array_record', data_dir=str(prepared))
  train = input_pipeline.byte_stream(builder.as_data_source('train'))
  val = input_pipeline.byte_stream(builder.as_data_source('validation'))
  expected_train, expected_val = b'', b''
  for name in sorted(texts):
    data = texts[name].encode()
    cut = int(len(data) * 0.9)
    expected_train += data[:cut]
    expected_val += data[cut:]
  assert train.tobytes() == expected_train
  assert val.tobytes() == expected_val


def test_lm_batches_are_shifted_windows_and_a_function_of_the_step(tmp_path):
  (tmp_path / 'f.txt').write_text(''.join(chr(97 + i % 26) for i in range(5000)))
  data = input_pipeline.build(data_config('text', str(tmp_path)))
  batch = data.train(3)
  assert batch['inputs'].shape == (4, 16) and batch['inputs'].dtype == np.int32
  np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
  # consecutive letters: every target is the next letter of its input
  np.testing.assert_array_equal((batch['inputs'] - 97 + 1) % 26, batch['targets'] - 97)
  again = input_pipeline.build(data_config('text', str(tmp_path)))
  np.testing.assert_array_equal(again.train(3)['inputs'], batch['inputs'])
  other_seed = input_pipeline.build(data_config('text', str(tmp_path), seed=1))
  assert not np.array_equal(other_seed.train(3)['inputs'], batch['inputs'])
  # one epoch visits every window once, in shuffled order
  num = data.info.num_train_examples
  stream = (tmp_path / 'f.txt').read_bytes()[:int(5000 * 0.9)]
  grid = [stream[j * 16:j * 16 + 17] for j in range(num)]
  epoch = [data.train.examples[i].tobytes() for i in range(num)]
  assert sorted(epoch) == sorted(grid) and epoch != grid


def test_shakespeare_split_and_genres():
  config = data_config('shakespeare', seq_len=64)
  builder = input_pipeline.prepared('shakespeare', config.data)
  assert builder.info.features['genre'].names == list(builders.SHAKESPEARE_GENRES)
  train = builder.as_data_source('train')
  val = builder.as_data_source('validation')
  plays = builders.shakespeare_plays()
  assert len(plays) == 38
  total = sum(p.stat().st_size for _, _, p in plays)
  n_train = sum(len(r['bytes']) for r in (train[i] for i in range(len(train))))
  n_val = sum(len(r['bytes']) for r in (val[i] for i in range(len(val))))
  assert n_train + n_val == total
  assert 0.09 < n_val / total < 0.11


def test_digits():
  data = input_pipeline.build(data_config('digits', batch=8))
  assert data.info.num_classes == 10 and data.info.image_shape == (8, 8, 1)
  assert data.info.num_train_examples == 1437
  batch = data.train(0)
  assert batch['image'].shape == (8, 8, 8, 1) and batch['label'].shape == (8,)
  assert 0.0 <= batch['image'].min() and batch['image'].max() <= 1.0
  assert sum(len(b['label']) for b in data.eval_batches()) == 360 // 8 * 8


@pytest.mark.parametrize('name,path,message', [
    ('nope', '', 'unknown data.name'),
    ('text', '/does/not/exist', 'does not exist'),
])
def test_bad_data_config(name, path, message):
  with pytest.raises(UserError, match=message):
    input_pipeline.build(data_config(name, path))


def test_empty_and_binary_text(tmp_path):
  (tmp_path / 'empty').mkdir()
  with pytest.raises(UserError, match='no non-empty files'):
    input_pipeline.build(data_config('text', str(tmp_path / 'empty')))
  (tmp_path / 'bin').mkdir()
  (tmp_path / 'bin' / 'x.dat').write_bytes(b'\xff\xfe\x00abc')
  with pytest.raises(UserError, match='not UTF-8'):
    input_pipeline.build(data_config('text', str(tmp_path / 'bin')))
