"""Trained tokenizers (accel.data.tokenization): where they live, what they keep, and what the
tasks make of them (bits per byte, whole-word masking)."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tokenizers

from accel import mlm, tasks
from accel.data import input_pipeline, tokenization
from accel.errors import UserError

TEXT = ('The quick brown fox jumps over the lazy dog; the dog sleeps.\n'
        'Unbelievable tokenization, unbelievably tokenized! Café naïve.\n') * 30


def _config(tmp_path, tokenizer, vocab_size):
  (tmp_path / 'text').mkdir(exist_ok=True)
  (tmp_path / 'text' / 'corpus.txt').write_text(TEXT, encoding='utf-8')
  return ml_collections.ConfigDict(dict(
      seed=0, batch_size=2, eval_batch_size=0, eval_steps=-1,
      data=dict(name='text', path=str(tmp_path / 'text'), dir=str(tmp_path / 'tfds'),
                seq_len=8, order='shuffled', tokenizer=tokenizer, vocab_size=vocab_size)))


def _folder(tmp_path, kind, size):
  (corpus,) = os.listdir(tmp_path / 'tfds' / 'tokenizers' / 'user_text')
  (version,) = os.listdir(tmp_path / 'tfds' / 'tokenizers' / 'user_text' / corpus)
  return tmp_path / 'tfds' / 'tokenizers' / 'user_text' / corpus / version / f'{kind}-{size}'


def test_bpe_is_trained_once_saved_beside_the_data_and_lossless(tmp_path):
  data = input_pipeline.build(_config(tmp_path, 'bpe', 300))
  folder = _folder(tmp_path, 'bpe', 300)
  tokenizer = tokenizers.Tokenizer.from_file(str(folder / 'tokenizer.json'))
  assert data.info.vocab_size == data.info.vocab.size == tokenizer.get_vocab_size() == 300
  cut = int(len(TEXT.encode()) * 0.9)                 # user_text: the last 10% validate
  val_ids = np.load(folder / 'validation.npy')
  assert tokenizer.decode(val_ids.tolist()).encode() == TEXT.encode()[cut:]
  assert data.info.bytes_per_token == pytest.approx((len(TEXT.encode()) - cut) / len(val_ids))
  assert data.info.bytes_per_token > 1.5              # merges were learnt
  batch = data.train(0)
  np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
  assert batch['inputs'].max() < 300 and batch['inputs'].min() >= len(tokenization.SPECIALS)
  # reused, not trained again; a folder with a missing array is made again
  stamp = os.path.getmtime(folder / 'tokenizer.json')
  input_pipeline.build(_config(tmp_path, 'bpe', 300))
  assert os.path.getmtime(folder / 'tokenizer.json') == stamp
  os.remove(folder / 'train.npy')
  again = input_pipeline.build(_config(tmp_path, 'bpe', 300))
  np.testing.assert_array_equal(np.load(folder / 'validation.npy'), val_ids)
  np.testing.assert_array_equal(again.train(0)['inputs'], batch['inputs'])
  assert not [p for p in os.listdir(folder.parent) if 'incomplete' in p]


def test_words_are_ordered_by_frequency_and_have_no_bits_per_byte(tmp_path):
  data = input_pipeline.build(_config(tmp_path, 'words', 64))
  tokenizer = tokenizers.Tokenizer.from_file(str(_folder(tmp_path, 'words', 64) /
                                                 'tokenizer.json'))
  words = TEXT[:int(len(TEXT) * 0.9)].split()
  counts = [words.count(tokenizer.id_to_token(i))
            for i in range(len(tokenization.SPECIALS), tokenizer.get_vocab_size())]
  assert counts == sorted(counts, reverse=True) and counts[0] == words.count('the')
  assert data.info.bytes_per_token == 0.0           # whitespace is gone: no bits per byte


def test_bits_per_byte_uses_the_bytes_per_token():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 7))
  batch = {'targets': jnp.asarray([[1, 2, 3], [4, 5, 6]])}
  per_byte = tasks.LanguageModelTask(None, None, None).objective(logits, batch)[1]
  per_token = tasks.LanguageModelTask(None, None, None, bytes_per_token=2.5).objective(logits, batch)
  words = tasks.LanguageModelTask(None, None, None, bytes_per_token=0.0).objective(logits, batch)
  np.testing.assert_allclose(per_token[1]['bits_per_byte'], per_byte['bits_per_byte'] / 2.5)
  np.testing.assert_allclose(per_byte['bits_per_byte'], per_byte['loss'] / np.log(2))
  assert 'bits_per_byte' not in words[1] and 'perplexity' in words[1]


def test_wordpiece_masks_whole_words(tmp_path):
  data = input_pipeline.build(_config(tmp_path, 'wordpiece', 120))
  vocab = data.info.vocab
  assert not vocab.word_start.all()                  # there are '##' pieces
  rows = np.resize(np.load(_folder(tmp_path, 'wordpiece', 120) / 'train.npy'), (64, 31))
  tokens = mlm.with_cls(jnp.asarray(rows), vocab)
  inputs, _, weights = map(np.asarray, jax.jit(mlm.mask_tokens, static_argnums=2)(jax.random.key(0), tokens, vocab))
  starts = vocab.word_start[np.asarray(tokens)]
  budget = np.round(0.15 * 31)
  assert np.all(weights.sum(1) <= budget) and weights.sum() >= 0.5 * budget * 64
  assert weights[:, 0].sum() == 0                     # never CLS
  for row, start in zip(weights, starts):
    word = np.cumsum(start) - 1
    for w in np.unique(word[row == 1]):
      assert row[(word == w) & (np.arange(32) > 0)].all(), 'a word was masked in part'
  assert set(np.asarray(inputs)[weights == 1].tolist()) >= {vocab.mask}


@pytest.mark.parametrize('overrides,message', [
    (dict(tokenizer='sentencepiece', vocab_size=300), 'unknown data.tokenizer'),
    (dict(tokenizer='bpe', vocab_size=200), 'too small'),
    (dict(name='digits', tokenizer='bpe', vocab_size=300), 'language-modelling text'),
])
def test_bad_tokenizer_config(tmp_path, overrides, message):
  config = _config(tmp_path, 'bpe', 300)
  config.data.update(overrides)
  with pytest.raises(UserError, match=message):
    input_pipeline.build(config)
