"""Contiguous LM streams and the enwik8 / text8 / WikiText-103 builders on fake archives."""
import zipfile

import ml_collections
import numpy as np
import pytest

from accel.data import corpora, input_pipeline
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


def _fake_zip(path, members: dict):
  path.parent.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(path, 'w') as z:
    for name, data in members.items():
      z.writestr(name, data)


@pytest.mark.parametrize('name', ['enwik8', 'text8'])
def test_character_corpus_split_90_5_5_from_the_manual_dir(tmp_path, monkeypatch, name):
  """A 2000-byte fake: train = first 1800, validation = next 100, test = last 100."""
  # the published 90M / 5M / 5M, scaled to the fake; refused at the published sizes
  monkeypatch.setitem(corpora.PUBLISHED_SIZES, name,
                      {'train': 1800, 'validation': 100, 'test': 100})
  rng = np.random.default_rng(0)
  alphabet = (np.arange(256, dtype=np.uint8) if name == 'enwik8' else
              np.frombuffer(b'abcdefghijklmnopqrstuvwxyz ', np.uint8))
  data = rng.choice(alphabet, 2000).tobytes()
  prepared = tmp_path / 'tfds'
  # the default manual dir of a builder in `prepared` (see the corpora docstring)
  _fake_zip(prepared / 'downloads' / 'manual' / f'{name}.zip', {name: data})
  config = _config(name, seq_len=8, batch=3, order='contiguous')
  config.data.dir = str(prepared)
  built = input_pipeline.build(config)
  builder = input_pipeline.prepared(name, config.data)
  splits = {s: corpora.stream(builder.as_data_source(s)).tobytes()
            for s in ('train', 'validation', 'test')}
  assert splits == {'train': data[:1800], 'validation': data[1800:1900],
                    'test': data[1900:]}
  assert built.info.vocab_size == 256
  np.testing.assert_array_equal(built.train(0)['inputs'][1],
                                np.frombuffer(data[600:608], np.uint8))
  # a prepared dataset is checked when read, too
  monkeypatch.setitem(corpora.PUBLISHED_SIZES, name, {'train': 1800, 'validation': 99})
  with pytest.raises(UserError, match=r'validation 100 \(published: 99\)'):
    input_pipeline.build(config)


def test_corpus_of_other_sizes_is_refused_before_anything_is_written(tmp_path):
  prepared = tmp_path / 'tfds'
  _fake_zip(prepared / 'downloads' / 'manual' / 'text8.zip', {'text8': b'ab cd ' * 100})
  config = _config('text8')
  config.data.dir = str(prepared)
  with pytest.raises(UserError, match='train 540 .published: 90000000.*canonical archive'):
    input_pipeline.build(config)
  assert not (prepared / 'text8').exists() or not any(
      p.name[0].isdigit() for p in (prepared / 'text8').iterdir())


def test_wikitext103_vocabulary_and_ids(tmp_path, monkeypatch):
  train = ' = Title = \n\n the cat <unk> the dog \n the end \n'
  valid = ' the bird \n'                       # 'bird' is not in the train vocabulary
  test = '\n cat \n'
  prepared = tmp_path / 'tfds'
  _fake_zip(prepared / 'downloads' / 'manual' / 'wikitext-103-v1.zip',
            {'wikitext-103/wiki.train.tokens': train, 'wikitext-103/wiki.valid.tokens': valid,
             'wikitext-103/wiki.test.tokens': test})
  monkeypatch.setattr(corpora, 'CHUNK', 4)     # several records per split
  # with one '<eos>' per line, as the published 103,227,021 / 217,646 / 245,569 count
  monkeypatch.setitem(corpora.PUBLISHED_SIZES, 'wikitext103',
                      {'train': 14, 'validation': 3, 'test': 3, 'vocab': 8})
  config = _config('wikitext103', seq_len=2, batch=2, order='contiguous')
  config.data.dir, config.eval_batch_size = str(prepared), 1
  built = input_pipeline.build(config)
  builder = input_pipeline.prepared('wikitext103', config.data)
  # by count (the 3, = 2, the rest 1), ties in order of first occurrence, '<eos>' first
  vocab = ['<eos>', 'the', '=', 'Title', 'cat', '<unk>', 'dog', 'end']
  assert builder.info.metadata['vocab'] == vocab
  assert built.info.vocab_size == len(vocab)
  ids = {w: i for i, w in enumerate(vocab)}
  words = lambda text: [w for line in text.splitlines(True)  # noqa: E731
                        for w in line.split() + ['<eos>']]
  expected = {'train': [ids[w] for w in words(train)],
              'validation': [ids['the'], ids['<unk>'], 0],
              'test': [0, ids['cat'], 0]}
  for split, tokens in expected.items():
    assert corpora.stream(builder.as_data_source(split)).tolist() == tokens, split
  assert len(builder.as_data_source('train')) == 4   # 14 ids in chunks of 4
