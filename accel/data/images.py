"""tfds builders for MNIST and CIFAR-10 from their canonical archives (array_record, no TF).

tfds's own `mnist` and `cifar10` encode their images with TensorFlow; these store each image
as a uint8 Tensor feature (H x W x C, no Image encoding) with a ClassLabel `label`, in the
standard splits: MNIST 60,000 train / 10,000 test (LeCun et al. 1998), CIFAR-10 50,000 train
(data_batch_1..5) / 10,000 test (Krizhevsky 2009). Neither has a validation split; the input
pipeline evaluates on `test`, as the papers report.

Sources (`accel.data.downloads`: the tfds manual dir first, else the URL):
- `mnist`: the four idx gzip files of `MNIST_FILES` (the CVDF mirror of yann.lecun.com/exdb/
  mnist, the one tfds uses). idx: a big-endian header (magic 0x0803 for images + N, 28, 28;
  0x0801 for labels + N), then N*28*28 (or N) unsigned bytes.
- `cifar10`: cifar-10-python.tar.gz, the pickled batches of cifar-10-batches-py/: each a
  dict with b'data' (10000 x 3072 uint8: 1024 red, 1024 green, 1024 blue values of a 32x32
  image, row-major) and b'labels'. The pickles are read with an unpickler that builds only
  numpy arrays and plain containers (a downloaded pickle could otherwise run code).

A truncated or malformed archive, or one whose splits are not of `SPLIT_SIZES`, is a
UserError raised before tfds renames anything into place: nothing looks prepared.
"""
from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import zlib

import numpy as np
import tensorflow_datasets as tfds

from accel.data import downloads

MNIST_URL = 'https://storage.googleapis.com/cvdf-datasets/mnist/'
MNIST_FILES = {'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
               'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}
IDX_IMAGES, IDX_LABELS = 0x0803, 0x0801
CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
CIFAR10_DIR = 'cifar-10-batches-py/'
CIFAR10_FILES = {'train': tuple(f'data_batch_{i}' for i in range(1, 6)),
                 'test': ('test_batch',)}
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                   'ship', 'truck')
ARCHIVE_ERRORS = (EOFError, OSError, ValueError, KeyError, zlib.error, tarfile.TarError,
                  pickle.UnpicklingError)


class _ImageBuilder(tfds.core.GeneratorBasedBuilder):
  """Records {'image': uint8 SHAPE, 'label': ClassLabel(CLASSES)}, keyed by their index."""
  VERSION = tfds.core.Version('1.0.0')
  SHAPE: tuple
  CLASSES: tuple
  SPLIT_SIZES: dict

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=(
        tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=self.SHAPE, dtype=np.uint8),
            'label': tfds.features.ClassLabel(names=list(self.CLASSES))})))

  def _generate_examples(self, images_NxHxWxC, labels_N):
    for i, (image, label) in enumerate(zip(images_NxHxWxC, labels_N)):
      yield i, {'image': image, 'label': int(label)}


def _check_count(what: str, count: int, expected: int) -> None:
  if count != expected:
    raise ValueError(f'{what} has {count} examples, the standard split {expected}')


def read_idx(path, magic: int) -> np.ndarray:
  """The uint8 array of a gzipped idx file (header: magic, then one int32 per dimension)."""
  with gzip.open(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or int.from_bytes(data[:4], 'big') != magic:
    raise ValueError(f'not an idx file with magic {magic:#06x}')
  ndim = magic & 0xFF
  dims = np.frombuffer(data, '>i4', count=ndim, offset=4).astype(int)
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(dims)):
    raise ValueError(f'the header promises {tuple(dims)} bytes, the file holds {body.size}')
  return body.reshape(dims)


class Mnist(_ImageBuilder):
  """MNIST, 28x28x1 uint8 images, labels 0-9; 60,000 train / 10,000 test."""
  SHAPE = (28, 28, 1)
  CLASSES = tuple(map(str, range(10)))
  SPLIT_SIZES = {'train': 60_000, 'test': 10_000}
  MANUAL_DOWNLOAD_INSTRUCTIONS = ('Optional: put the four idx .gz files (accel.data.images.'
                                  'MNIST_FILES) into the manual dir to avoid the download.')

  def _split_generators(self, dl_manager):
    splits = {}
    for split, (images_file, labels_file) in MNIST_FILES.items():
      images_NxHxW = self._read(dl_manager, images_file, IDX_IMAGES, split)
      labels_N = self._read(dl_manager, labels_file, IDX_LABELS, split)
      splits[split] = (images_NxHxW[..., None], labels_N)
    return {split: self._generate_examples(*arrays) for split, arrays in splits.items()}

  def _read(self, dl_manager, filename: str, magic: int, split: str) -> np.ndarray:
    path = downloads.fetch(dl_manager, MNIST_URL + filename)
    try:
      array = read_idx(path, magic)
      _check_count(split, len(array), self.SPLIT_SIZES[split])
    except ARCHIVE_ERRORS as e:
      raise downloads.corrupt(path, e) from e
    return array


class _ArraysOnly(pickle.Unpickler):
  """Unpickles dicts, lists, bytes and numpy arrays, and nothing that could run code."""
  ALLOWED = {('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode'),
             ('numpy.core.multiarray', '_reconstruct'),
             ('numpy._core.multiarray', '_reconstruct')}

  def find_class(self, module, name):
    if (module, name) not in self.ALLOWED:
      raise pickle.UnpicklingError(f'refusing to unpickle {module}.{name}')
    return super().find_class(module, name)


def read_cifar_batch(data: bytes) -> tuple[np.ndarray, np.ndarray]:
  """(images NxHxWxC uint8, labels N) of one pickled CIFAR-10 python batch."""
  batch = _ArraysOnly(io.BytesIO(data), encoding='bytes').load()
  flat_Nx3072 = np.asarray(batch[b'data'], np.uint8)
  labels_N = np.asarray(batch[b'labels'], np.int64)
  if flat_Nx3072.ndim != 2 or flat_Nx3072.shape[1] != 3 * 32 * 32 or \
      len(labels_N) != len(flat_Nx3072):
    raise ValueError(f'a batch of shape {flat_Nx3072.shape} with {len(labels_N)} labels')
  return flat_Nx3072.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels_N


class Cifar10(_ImageBuilder):
  """CIFAR-10, 32x32x3 uint8 images, 10 classes; 50,000 train / 10,000 test."""
  SHAPE = (32, 32, 3)
  CLASSES = CIFAR10_CLASSES
  SPLIT_SIZES = {'train': 50_000, 'test': 10_000}
  MANUAL_DOWNLOAD_INSTRUCTIONS = ('Optional: put cifar-10-python.tar.gz into the manual dir '
                                  'to avoid the download.')

  def _split_generators(self, dl_manager):
    path = downloads.fetch(dl_manager, CIFAR10_URL)
    wanted = {CIFAR10_DIR + f for files in CIFAR10_FILES.values() for f in files}
    try:
      members = {}
      with tarfile.open(path, 'r:gz') as archive:
        for member in archive:               # reads to the end: a truncation shows here
          if member.name in wanted:
            members[member.name] = archive.extractfile(member).read()
      missing = sorted(wanted - set(members))
      if missing:
        raise KeyError(f'no {", ".join(missing)} in the archive')
      splits = {}
      for split, files in CIFAR10_FILES.items():
        batches = [read_cifar_batch(members[CIFAR10_DIR + f]) for f in files]
        images, labels = (np.concatenate(a) for a in zip(*batches))
        _check_count(split, len(labels), self.SPLIT_SIZES[split])
        if labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES):
          raise ValueError(f'labels outside 0..{len(CIFAR10_CLASSES) - 1}')
        splits[split] = (images, labels)
    except ARCHIVE_ERRORS as e:
      raise downloads.corrupt(path, e) from e
    return {split: self._generate_examples(*arrays) for split, arrays in splits.items()}


BUILDERS = {'mnist': Mnist, 'cifar10': Cifar10}
