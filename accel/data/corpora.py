"""tfds builders for the standard LM corpora (array_record, no TensorFlow).

- `enwik8`: the first 10^8 bytes of an English Wikipedia XML dump (Hutter prize), as bytes.
- `text8`: 10^8 characters of cleaned Wikipedia text (a-z and space), as bytes.
  Both split as Transformer-XL's prep_enwik8.py / prep_text8.py do: the last 5M + 5M
  characters are validation and test, the rest train (90M / 5M / 5M). Written here as
  held-out = len // 20 each, which is exactly 5M on the 10^8-byte files.
- `wikitext103`: WikiText-103 (word level), with its own vocabulary built from train as the
  Transformer-XL code does: every line becomes line.split() + ['<eos>'], the vocabulary is
  '<eos>' (id 0) then the train words by count (most common first, ties in order of first
  occurrence); '<unk>' is an ordinary word of the corpus, and any other word outside the
  vocabulary maps to it. The vocabulary is stored in the dataset's metadata.

Sizes: preparation refuses (UserError, nothing written) a source whose splits do not have
the published sizes (`PUBLISHED_SIZES`; elements per split, and WikiText-103's vocabulary),
and records each split's size in the metadata; `split_stream` checks a prepared split
against both when it is read. Tests with small fakes replace `PUBLISHED_SIZES[name]`.

Records: {'bytes' (uint8) | 'tokens' (int32): one chunk, 'doc': the split's file, 'chunk': i};
`stream(source)` concatenates a split back into one array.

Sources: the canonical archive (URLS) is downloaded on first use, or read from the tfds
manual dir if a file of the same name is there (default: <data_dir>/downloads/manual/, e.g.
~/.cache/accel/tfds/downloads/manual/enwik8.zip), for machines without a network.
"""
from __future__ import annotations

import collections
import io
import zipfile

import numpy as np
import tensorflow_datasets as tfds

from accel.data import downloads
from accel.errors import UserError

CHUNK = 1 << 20                   # elements per record
URLS = {
    'enwik8': 'http://mattmahoney.net/dc/enwik8.zip',
    'text8': 'http://mattmahoney.net/dc/text8.zip',
    'wikitext103': 'https://s3.amazonaws.com/research.metamind.io/wikitext/'
                   'wikitext-103-v1.zip',
}
WIKITEXT_FILES = {'train': 'wikitext-103/wiki.train.tokens',
                  'validation': 'wikitext-103/wiki.valid.tokens',
                  'test': 'wikitext-103/wiki.test.tokens'}
EOS, UNK = '<eos>', '<unk>'
BYTE_VOCAB = 256
# Elements per split as published: enwik8 / text8 bytes (Transformer-XL's prep_enwik8.py /
# prep_text8.py, 90M / 5M / 5M); WikiText-103 tokens with one '<eos>' per line, as
# Merity et al. 2016 (Table 1) count them (so do torchtext and the Transformer-XL loader),
# and its vocabulary of 267,735 words.
PUBLISHED_SIZES = {
    'enwik8': {'train': 90_000_000, 'validation': 5_000_000, 'test': 5_000_000},
    'text8': {'train': 90_000_000, 'validation': 5_000_000, 'test': 5_000_000},
    'wikitext103': {'train': 103_227_021, 'validation': 217_646, 'test': 245_569,
                    'vocab': 267_735},
}


def _features(field: str, dtype) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      field: tfds.features.Tensor(shape=(None,), dtype=dtype),
      'doc': tfds.features.Text(),
      'chunk': tfds.features.Scalar(dtype=np.int32),
  })


def _archive(dl_manager, name: str):
  return downloads.fetch(dl_manager, URLS[name])


def check_sizes(name: str, sizes: dict[str, int], expected: dict[str, int] | None = None,
                where: str = '') -> None:
  """UserError unless `sizes` (split or 'vocab' -> count) are the published ones."""
  expected = PUBLISHED_SIZES[name] if expected is None else expected
  wrong = [f'{k} {sizes.get(k)} (published: {v})' for k, v in expected.items()
           if sizes.get(k) != v]
  if wrong:
    raise UserError(f'{where or name} does not have the published sizes of {name}: '
                    f'{", ".join(wrong)}; is it the canonical archive ({URLS[name]})?')


def _records(field: str, doc: str, array: np.ndarray):
  for i in range(0, max(len(array), 1), CHUNK):
    yield f'{doc}/{i // CHUNK}', {field: array[i:i + CHUNK], 'doc': doc, 'chunk': i // CHUNK}


class _CharacterCorpus(tfds.core.GeneratorBasedBuilder):
  """One file of 10^8 characters in a zip archive, split 90 / 5 / 5 (module docstring)."""
  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.1.0': 'split sizes checked and kept in the metadata'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Optional: put the archive (see accel.data.corpora.URLS) into the manual dir to '
      'avoid the download.')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=_features('bytes', np.uint8),
                                 description=__doc__, metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    name = self.name
    path = _archive(dl_manager, name)
    try:
      with zipfile.ZipFile(path) as archive:
        data = np.frombuffer(archive.read(name), np.uint8)
    except (zipfile.BadZipFile, KeyError, EOFError, OSError) as e:
      raise downloads.corrupt(path, e) from e
    held_out = len(data) // 20
    parts = {'train': data[:len(data) - 2 * held_out],
             'validation': data[len(data) - 2 * held_out:len(data) - held_out],
             'test': data[len(data) - held_out:]}
    sizes = {split: len(part) for split, part in parts.items()}
    check_sizes(name, sizes, where=str(path))
    self.info.metadata['split_sizes'] = sizes
    return {split: self._generate_examples(f'{name}.{split}', part)
            for split, part in parts.items()}

  def _generate_examples(self, doc: str, part: np.ndarray):
    yield from _records('bytes', doc, part)


class Enwik8(_CharacterCorpus):
  """enwik8: Hutter-prize Wikipedia XML, byte level; 90M / 5M / 5M bytes."""


class Text8(_CharacterCorpus):
  """text8: cleaned Wikipedia (a-z and space), character level; 90M / 5M / 5M characters."""


def _lines(archive: zipfile.ZipFile, inner: str):
  with archive.open(inner) as f:
    yield from io.TextIOWrapper(f, encoding='utf-8')


def _words(line: str) -> list[str]:
  return line.split() + [EOS]


def build_vocab(lines) -> list[str]:
  """['<eos>'] + the words of `lines` by count, ties in order of first occurrence."""
  counts = collections.Counter()
  for line in lines:
    counts.update(line.split())
  return [EOS] + [w for w, _ in counts.most_common() if w != EOS]


class Wikitext103(tfds.core.GeneratorBasedBuilder):
  """WikiText-103, word level, ids of the train vocabulary (metadata['vocab'])."""
  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = _CharacterCorpus.RELEASE_NOTES
  MANUAL_DOWNLOAD_INSTRUCTIONS = _CharacterCorpus.MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=_features('tokens', np.int32),
                                 description=__doc__, metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    path = _archive(dl_manager, 'wikitext103')
    try:
      with zipfile.ZipFile(path) as archive:
        vocab = build_vocab(_lines(archive, WIKITEXT_FILES['train']))
        sizes = {split: sum(len(_words(line)) for line in _lines(archive, inner))
                 for split, inner in WIKITEXT_FILES.items()}
    except (zipfile.BadZipFile, KeyError, EOFError, OSError, UnicodeDecodeError) as e:
      raise downloads.corrupt(path, e) from e
    check_sizes('wikitext103', {**sizes, 'vocab': len(vocab)}, where=str(path))
    self.info.metadata['vocab'] = vocab
    self.info.metadata['split_sizes'] = sizes
    ids = {w: i for i, w in enumerate(vocab)}
    if UNK not in ids:
      raise UserError(f'{path}: the train split has no {UNK} token')
    return {split: self._generate_examples(path, inner, ids)
            for split, inner in WIKITEXT_FILES.items()}

  def _generate_examples(self, path, inner: str, ids: dict):
    unk = ids[UNK]
    with zipfile.ZipFile(path) as archive:
      tokens = np.fromiter((ids.get(w, unk) for line in _lines(archive, inner)
                            for w in _words(line)), np.int32)   # no list of 10^8 ints
    yield from _records('tokens', inner.rsplit('/', 1)[1], tokens)


BUILDERS = {'enwik8': Enwik8, 'text8': Text8, 'wikitext103': Wikitext103}
NAMES = tuple(BUILDERS)


def stream(source) -> np.ndarray:
  """All chunks of a split, in order, as one array (uint8 bytes or int32 word ids)."""
  records = sorted((source[i]['chunk'], i) for i in range(len(source)))
  chunks = [source[i] for _, i in records]
  field = 'bytes' if 'bytes' in chunks[0] else 'tokens'
  return np.concatenate([c[field] for c in chunks])


def split_stream(builder: tfds.core.DatasetBuilder, split: str) -> np.ndarray:
  """`stream` of a prepared split, checked against its recorded and published sizes."""
  array = stream(builder.as_data_source(split))
  recorded = builder.info.metadata['split_sizes']
  if len(array) != recorded[split]:
    raise UserError(f'{builder.data_dir}: split {split} holds {len(array)} elements, its '
                    f'preparation wrote {recorded[split]}; delete the folder and run again')
  check_sizes(builder.name, {**recorded, 'vocab': vocab_size(builder)},
              where=builder.data_dir)
  return array


def vocab_size(builder: tfds.core.DatasetBuilder) -> int:
  if isinstance(builder, Wikitext103):
    return len(builder.info.metadata['vocab'])
  return BYTE_VOCAB
