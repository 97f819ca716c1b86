"""MNIST and CIFAR-10 builders on small fakes in the canonical formats, and interrupted or
damaged preparations (accel.data.images, accel.data.preparation)."""
import gzip
import io
import os
import pickle
import tarfile

import ml_collections
import numpy as np
import pytest

from accel.data import images, input_pipeline, preparation
from accel.errors import UserError

MNIST_SIZES = {'train': 6, 'test': 4}
CIFAR_PER_BATCH = {'train': 2, 'test': 3}     # 5 train batches: 10 train images


def _config(name, data_dir, batch=2):
  return ml_collections.ConfigDict(dict(
      seed=0, batch_size=batch, eval_batch_size=0, eval_steps=-1,
      data=dict(name=name, path='', dir=str(data_dir), seq_len=8, order='shuffled')))


def _manual(data_dir):
  path = data_dir / 'downloads' / 'manual'
  path.mkdir(parents=True, exist_ok=True)
  return path


def _idx(magic, array):
  header = magic.to_bytes(4, 'big') + b''.join(d.to_bytes(4, 'big') for d in array.shape)
  return gzip.compress(header + array.astype(np.uint8).tobytes())


def write_fake_mnist(data_dir):
  """The four idx gzip files; image i of a split is filled with i * 10 + (1 for test)."""
  arrays = {}
  for split, (images_file, labels_file) in images.MNIST_FILES.items():
    n = MNIST_SIZES[split]
    pixels = np.arange(n)[:, None, None] * 10 + (split == 'test') + np.zeros((1, 28, 28), int)
    pixels[:, 0, 1] = 255
    labels = (np.arange(n) * 3 + 1) % 10
    (_manual(data_dir) / images_file).write_bytes(_idx(images.IDX_IMAGES, pixels))
    (_manual(data_dir) / labels_file).write_bytes(_idx(images.IDX_LABELS, labels))
    arrays[split] = pixels, labels
  return arrays


def write_fake_cifar(data_dir):
  """cifar-10-python.tar.gz with pickled batches; image i's red plane is i, green 100 + i."""
  rng = np.random.default_rng(0)
  arrays, members = {'train': [], 'test': []}, {}
  for split, files in images.CIFAR10_FILES.items():
    for f in files:
      hwc = rng.integers(0, 256, (CIFAR_PER_BATCH[split], 32, 32, 3), dtype=np.uint8)
      labels = rng.integers(0, 10, CIFAR_PER_BATCH[split]).tolist()
      flat = hwc.transpose(0, 3, 1, 2).reshape(len(labels), -1)   # R plane, G, B
      members[images.CIFAR10_DIR + f] = pickle.dumps(
          {b'batch_label': f.encode(), b'labels': labels, b'data': flat}, protocol=2)
      arrays[split].append((hwc, np.asarray(labels)))
  members[images.CIFAR10_DIR + 'batches.meta'] = pickle.dumps(
      {b'label_names': [c.encode() for c in images.CIFAR10_CLASSES]}, protocol=2)
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode='w:gz') as archive:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      archive.addfile(info, io.BytesIO(data))
  (_manual(data_dir) / 'cifar-10-python.tar.gz').write_bytes(buffer.getvalue())
  return {s: tuple(np.concatenate(a) for a in zip(*parts)) for s, parts in arrays.items()}


@pytest.fixture
def small_splits(monkeypatch):
  monkeypatch.setattr(images.Mnist, 'SPLIT_SIZES', MNIST_SIZES)
  monkeypatch.setattr(images.Cifar10, 'SPLIT_SIZES',
                      {'train': 5 * CIFAR_PER_BATCH['train'], 'test': CIFAR_PER_BATCH['test']})


def _split(builder, split):
  source = builder.as_data_source(split)
  records = [source[i] for i in range(len(source))]
  return (np.stack([r['image'] for r in records]), np.asarray([r['label'] for r in records]))


@pytest.mark.parametrize('name,write', [('mnist', write_fake_mnist),
                                        ('cifar10', write_fake_cifar)])
def test_builder_round_trips_the_canonical_archive(tmp_path, small_splits, name, write):
  expected = write(tmp_path)
  data = input_pipeline.build(_config(name, tmp_path))
  builder = input_pipeline.prepared(name, _config(name, tmp_path).data)
  assert set(builder.info.splits) == {'train', 'test'}
  assert builder.info.features['image'].np_dtype == np.uint8
  shape = (28, 28, 1) if name == 'mnist' else (32, 32, 3)
  pairs = lambda pixels, labels: sorted(  # noqa: E731
      (p.astype(np.uint8).reshape(shape).tobytes(), int(l)) for p, l in zip(pixels, labels))
  for split, (pixels, labels) in expected.items():
    assert pairs(*_split(builder, split)) == pairs(pixels, labels), split
  assert data.info.image_shape == shape and data.info.num_classes == 10
  batch = data.train(0)
  assert batch['image'].dtype == np.float32 and batch['image'].shape == (2, *shape)
  assert 0.0 <= batch['image'].min() and batch['image'].max() == 1.0   # pixel 255
  # evaluation reads the test split (there is no validation split): its full batches
  test = dict(pairs(*expected['test']))
  evaluated = [(np.rint(image * 255).astype(np.uint8).tobytes(), int(label))
               for b in data.eval_batches() for image, label in zip(b['image'], b['label'])]
  assert len(evaluated) == len(test) // 2 * 2
  assert all(test[image] == label for image, label in evaluated)


def _nothing_prepared(data_dir, name):
  root = data_dir / name
  return not root.exists() or not any(p.name[0].isdigit() or p.name.startswith('incomplete')
                                      for p in root.rglob('*') if p.is_dir())


@pytest.mark.parametrize('name,write,archive', [
    ('mnist', write_fake_mnist, 'train-images-idx3-ubyte.gz'),
    ('cifar10', write_fake_cifar, 'cifar-10-python.tar.gz')])
def test_truncated_archive_is_a_user_error_and_prepares_nothing(tmp_path, small_splits, name,
                                                               write, archive):
  write(tmp_path)
  path = _manual(tmp_path) / archive
  path.write_bytes(path.read_bytes()[:len(path.read_bytes()) * 2 // 3])
  with pytest.raises(UserError, match='truncated or corrupt.*manual dir'):
    input_pipeline.build(_config(name, tmp_path))
  assert _nothing_prepared(tmp_path, name)


def test_split_of_the_wrong_size_is_refused(tmp_path, monkeypatch):
  write_fake_mnist(tmp_path)        # 6 / 4 examples, the published split 60,000 / 10,000
  with pytest.raises(UserError, match='60000'):
    input_pipeline.build(_config('mnist', tmp_path))
  assert _nothing_prepared(tmp_path, 'mnist')


def test_interrupted_or_damaged_preparation_is_prepared_again(tmp_path, small_splits,
                                                             monkeypatch):
  write_fake_mnist(tmp_path)
  prepare = lambda: preparation.prepare(images.Mnist, data_dir=str(tmp_path),  # noqa: E731
                                        file_format='array_record')
  # killed half way: the generator dies after 3 examples, nothing is renamed into place
  generate = images.Mnist._generate_examples

  def dies(self, *arrays):
    for i, example in enumerate(generate(self, *arrays)):
      if i == 3:
        raise KeyboardInterrupt
      yield example
  monkeypatch.setattr(images.Mnist, '_generate_examples', dies)
  with pytest.raises(KeyboardInterrupt):
    prepare()
  monkeypatch.setattr(images.Mnist, '_generate_examples', generate)
  assert _nothing_prepared(tmp_path, 'mnist')
  # a killed process also leaves its incomplete.* folder: removed before the next try
  builder = prepare()
  leftover = os.path.join(os.path.dirname(builder.data_dir), 'incomplete.ABCDEF_1.0.0')
  os.makedirs(leftover)
  reference = _split(builder, 'train')

  shard = builder.info.splits['train'].filepaths[0]
  with open(shard, 'r+b') as f:                  # a shard cut short (a partial copy)
    f.truncate(os.path.getsize(shard) // 2)
  assert preparation.problems(builder) == [
      f'split train: {os.path.basename(shard)} is unreadable']
  builder = prepare()
  assert not os.path.exists(leftover) and preparation.problems(builder) == []
  np.testing.assert_array_equal(_split(builder, 'train')[0], reference[0])

  os.remove(os.path.join(builder.data_dir, preparation.INFO_FILE))   # metadata missing
  builder = prepare()
  assert preparation.problems(builder) == []
  np.testing.assert_array_equal(_split(builder, 'train')[1], reference[1])


def test_downloads_from_the_url_without_a_manual_dir(tmp_path, small_splits, monkeypatch):
  """tfds's downloader (no TensorFlow) fetches the idx files from an HTTP server on this
  machine standing in for the canonical URL; with the server gone it is a UserError."""
  import functools
  import http.server
  import threading
  served = tmp_path / 'served'
  write_fake_mnist(served)
  handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                              directory=str(_manual(served)))
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  monkeypatch.setattr(images, 'MNIST_URL', f'http://127.0.0.1:{server.server_port}/')
  try:
    builder = preparation.prepare(images.Mnist, data_dir=str(tmp_path / 'tfds'),
                                  file_format='array_record')
  finally:
    server.shutdown()
    server.server_close()
  assert builder.info.splits['train'].num_examples == MNIST_SIZES['train']
  # tfds retries a refused connection with backoff for minutes; once is enough here
  from tensorflow_datasets.core.download import downloader
  monkeypatch.setattr(downloader, 'MAX_RETRIES', 0)
  with pytest.raises(UserError, match='could not download .*put train-images-idx3-ubyte.gz '
                                      'into the tfds manual dir'):
    preparation.prepare(images.Mnist, data_dir=str(tmp_path / 'other'),
                        file_format='array_record')


def test_prepare_entry_point(tmp_path, small_splits, capsys):
  from experiments import prepare
  write_fake_mnist(tmp_path)
  prepare.main(['mnist', '--data_dir', str(tmp_path)])
  assert f'mnist: {tmp_path}/mnist/1.0.0 (train 6, test 4 records)' in capsys.readouterr().out
  with pytest.raises(SystemExit) as stop:
    prepare.main(['nope', '--data_dir', str(tmp_path)])
  assert stop.value.code == 1 and 'error: unknown data.name' in capsys.readouterr().err
