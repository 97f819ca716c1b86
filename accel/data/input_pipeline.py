"""Deterministic, step-indexed input pipelines over tfds data sources and grain.

A training batch is a pure function of (seed, step): `TrainBatches(step)` reads example
indices `step * B + i` of a grain `MapDataset` that is shuffled afresh every epoch. The loader
state is therefore the step alone — a resumed run sees exactly the batches an uninterrupted run
would — and each process reads only its own rows of the global batch.
With `data.order = 'contiguous'` (segment-recurrent LMs) `ContiguousBatches` reads
consecutive windows of B fixed rows of the stream instead: row b of step t+1 continues row b of
step t.

Evaluation reads the 'validation' split, or 'test' where a dataset has none (`eval_split`).

Batches: LM {'inputs': int32 BxL, 'targets': int32 BxL} (targets = inputs shifted by one);
images {'image': float32 BxHxWxC in [0, 1], 'label': int32 B}; text classification {'inputs': int32 BxL,
'label': int32 B}.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from accel.data import builders, corpora, genre, glue, images, preparation, tokenization
from accel.data.vocabulary import BYTES, Vocabulary
from accel.errors import UserError

TEXT_DATASETS = ('shakespeare', 'text') + corpora.NAMES   # enwik8, text8, wikitext103
TEXT_CLASSIFICATION_DATASETS = ('shakespeare_genre',) + glue.NAMES   # glue/cola, ...
IMAGE_DATASETS = ('digits',) + tuple(images.BUILDERS)   # mnist, cifar10
BYTE_VOCAB = BYTES.text_stop


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  kind: str                       # 'lm' | 'image' | 'text_classification'
  vocab_size: int = 0             # lm (a decoder's softmax), text_classification
  num_classes: int = 0            # image, text_classification
  image_shape: tuple = ()         # image
  num_train_examples: int = 0
  vocab: Vocabulary = BYTES       # lm, text_classification: the ids an encoder sees
  bytes_per_token: float = 1.0    # lm: bits/byte = bits/token / this; 0: not meaningful


@dataclasses.dataclass
class TrainBatches:
  """Global batch `step`, this process's rows; a pure function of (seed, step)."""
  examples: grain.MapDataset      # infinite, reshuffled each epoch
  global_batch: int
  collate: Callable[[list], dict]

  def __call__(self, step: int) -> dict:
    per_process = self.global_batch // jax.process_count()
    first = step * self.global_batch + jax.process_index() * per_process
    return self.collate([self.examples[first + i] for i in range(per_process)])


@dataclasses.dataclass
class ContiguousBatches:
  """LM batches that continue each other (`data.order = 'contiguous'`).

  The stream is cut into B equal rows (as the Transformer-XL data iterator does); step t
  reads window t mod W of every row, W = (row length - 1) // L windows per row, so row b of
  step t+1 continues row b of step t. A pure function of the step; no shuffling.
  """
  stream: np.ndarray
  global_batch: int
  seq_len: int

  def __post_init__(self):
    self.row_len = len(self.stream) // self.global_batch
    self.windows = (self.row_len - 1) // self.seq_len
    if self.windows < 1:
      raise UserError(f'the text has {len(self.stream)} tokens, fewer than batch_size '
                      f'{self.global_batch} rows of data.seq_len + 1 = {self.seq_len + 1}')

  def __call__(self, step: int) -> dict:
    per_process = self.global_batch // jax.process_count()
    start = (step % self.windows) * self.seq_len
    rows = [(jax.process_index() * per_process + b) * self.row_len + start
            for b in range(per_process)]
    return _collate_lm([self.stream[r: r + self.seq_len + 1] for r in rows])


@dataclasses.dataclass
class Data:
  info: DatasetInfo
  train: TrainBatches | ContiguousBatches
  eval_batches: Callable[[], Sequence[dict]]   # the same batches on every call


def prepared(name: str, data_cfg) -> tfds.core.DatasetBuilder:
  """The builder of data.name `name`, its data prepared (once) and complete."""
  prepare = functools.partial(
      preparation.prepare, data_dir=builders.default_data_dir(data_cfg.get('dir') or None),
      file_format='array_record')
  if name in ('shakespeare', 'shakespeare_genre'):
    return prepare(builders.Shakespeare)
  if name == 'text':
    return prepare(builders.UserText, path=data_cfg.path)
  if name == 'digits':
    return prepare(builders.Digits)
  if name in images.BUILDERS:
    return prepare(images.BUILDERS[name])
  if name in corpora.NAMES:
    return prepare(corpora.BUILDERS[name])
  if name in glue.NAMES:
    return prepare(glue.Glue, config=glue.task_of(name))
  raise UserError(f'unknown data.name {name!r}; known: '
                  f'{", ".join(TEXT_DATASETS + TEXT_CLASSIFICATION_DATASETS + IMAGE_DATASETS)}')


def eval_split(builder: tfds.core.DatasetBuilder) -> str:
  """'validation', or 'test' for data published without one (MNIST, CIFAR-10)."""
  return 'validation' if 'validation' in builder.info.splits else 'test'


def byte_stream(source) -> np.ndarray:
  """All chunks of a text split, in document order, as one uint8 array."""
  records = sorted((r['doc'], r['chunk'], i) for i, r in enumerate(_scan(source)))
  return np.concatenate([source[i]['bytes'] for _, _, i in records])


def _scan(source):
  return (source[i] for i in range(len(source)))


def _lm_windows(stream: np.ndarray, seq_len: int) -> grain.MapDataset:
  num = (len(stream) - 1) // seq_len
  if num < 1:
    raise UserError(f'the text has {len(stream)} bytes, fewer than one window of '
                    f'data.seq_len + 1 = {seq_len + 1}')
  return grain.MapDataset.range(num).map(
      lambda i: stream[i * seq_len: i * seq_len + seq_len + 1])


def _collate_lm(windows: list) -> dict:
  tokens = np.stack(windows).astype(np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}


def _collate_images(examples: list) -> dict:
  """float32 images; uint8 pixels (MNIST, CIFAR-10) scaled to [0, 1] by 1/255."""
  images_BxHxWxC = np.stack([e['image'] for e in examples])
  scale = 1 / 255 if images_BxHxWxC.dtype == np.uint8 else 1.0
  return {'image': images_BxHxWxC.astype(np.float32) * np.float32(scale),
          'label': np.asarray([e['label'] for e in examples], np.int32)}


def _eval_batches(dataset: grain.MapDataset, batch: int, num_batches: int, collate):
  """The first `num_batches` (all, if -1) full batches of a split, in order."""
  available = len(dataset) // batch
  if available == 0:
    raise UserError(f'the validation split has {len(dataset)} examples, fewer than one '
                    f'batch of {batch}')
  count = available if num_batches < 0 else min(num_batches, available)
  per_process = batch // jax.process_count()
  offset = jax.process_index() * per_process
  cache = []

  def batches():
    if not cache:
      cache.extend(collate([dataset[b * batch + offset + i] for i in range(per_process)])
                   for b in range(count))
    return cache
  return batches


def _text_streams(builder, name: str) -> list[np.ndarray]:
  """The train and validation text of a TEXT_DATASETS builder (bytes, WikiText-103 ids)."""
  if name in corpora.NAMES:
    return [corpora.split_stream(builder, s) for s in ('train', 'validation')]
  return [byte_stream(builder.as_data_source(s)) for s in ('train', 'validation')]


def _tokenized(builder, data_cfg, streams) -> tokenization.Tokenized:
  return tokenization.tokenized(
      data_cfg.tokenizer, data_cfg.get('vocab_size', 0), builder.info.full_name,
      builders.default_data_dir(data_cfg.get('dir') or None),
      dict(zip(('train', 'validation'), streams)))


def _glue_encoding(data_cfg) -> tuple[Vocabulary, Callable[[str], list]]:
  """GLUE text in the encoder's vocabulary: bytes, or the `data.tokenizer` trained on the
  pretraining corpus `data.tokenizer_corpus` (the same folder its pretraining used)."""
  if data_cfg.get('tokenizer', '') in ('', 'bytes'):
    return BYTES, glue.byte_ids
  corpus = data_cfg.get('tokenizer_corpus', '')
  if corpus not in TEXT_DATASETS or corpus == 'wikitext103':
    raise UserError(f'data.tokenizer={data_cfg.tokenizer} on GLUE needs '
                    'data.tokenizer_corpus, the corpus the encoder was pretrained on (one of '
                    f'{", ".join(n for n in TEXT_DATASETS if n != "wikitext103")})')
  builder = prepared(corpus, data_cfg)
  done = _tokenized(builder, data_cfg, _text_streams(builder, corpus))
  tokenizer = tokenization.load(done.folder)
  return done.vocabulary, lambda text: tokenizer.encode(text, add_special_tokens=False).ids


def _lm_streams(builder, data_cfg) -> tuple[np.ndarray, np.ndarray, DatasetInfo]:
  """(train, validation) token streams in `data.tokenizer` and their DatasetInfo."""
  name, kind = data_cfg.name, data_cfg.get('tokenizer', '')
  streams = _text_streams(builder, name)
  if name == 'wikitext103':
    if kind:
      raise UserError(f'data.tokenizer={kind!r}: WikiText-103 uses its own word-level '
                      "vocabulary (leave data.tokenizer='')")
    size = corpora.vocab_size(builder)
    return *streams, DatasetInfo('lm', vocab_size=size, vocab=Vocabulary.after_text(size),
                                 bytes_per_token=0.0)
  if kind in ('', 'bytes'):
    return *streams, DatasetInfo('lm', vocab_size=BYTE_VOCAB)
  done = _tokenized(builder, data_cfg, streams)
  return done.ids['train'], done.ids['validation'], DatasetInfo(
      'lm', vocab_size=done.vocabulary.size, vocab=done.vocabulary,
      bytes_per_token=done.bytes_per_token['validation'] if done.lossless else 0.0)


def build(config) -> Data:
  """Data for `config.data.name`, batched by `config.batch_size`, seeded by `config.seed`."""
  data_cfg = config.data
  name = data_cfg.name
  batch = config.batch_size
  eval_batch = config.get('eval_batch_size') or batch
  if batch % jax.process_count() or eval_batch % jax.process_count():
    raise UserError(f'batch_size {batch} is not divisible by {jax.process_count()} processes')
  builder = prepared(name, data_cfg)
  train_src = builder.as_data_source('train')
  val_src = builder.as_data_source(eval_split(builder))
  order = data_cfg.get('order', 'shuffled')
  if order not in ('shuffled', 'contiguous') or (order == 'contiguous' and
                                                 name not in TEXT_DATASETS):
    raise UserError(f'data.order {order!r} is not available for data.name {name!r} '
                    f"(shuffled: any data; contiguous: {', '.join(TEXT_DATASETS)})")
  if data_cfg.get('tokenizer', '') not in ('', 'bytes') and name not in (TEXT_DATASETS +
                                                                          glue.NAMES):
    raise UserError(f'data.tokenizer is for the language-modelling text '
                    f'({", ".join(TEXT_DATASETS)}) and GLUE, not data.name {name!r}')
  if name in TEXT_DATASETS:
    train_stream, val_stream, info = _lm_streams(builder, data_cfg)
    train = _lm_windows(train_stream, data_cfg.seq_len)
    val = _lm_windows(val_stream, data_cfg.seq_len)
    info = dataclasses.replace(info, num_train_examples=len(train))
    collate = _collate_lm
  elif name in glue.NAMES:
    task = glue.task_of(name)
    vocab, to_ids = _glue_encoding(data_cfg)
    train = glue.dataset(train_src, task, vocab, data_cfg.seq_len, to_ids)
    val = glue.dataset(val_src, task, vocab, data_cfg.seq_len, to_ids,
                       pad_to_multiple=eval_batch)
    info = DatasetInfo('text_classification', vocab_size=vocab.size, vocab=vocab,
                       num_classes=glue.num_classes(builder), num_train_examples=len(train))
    collate = glue.collate
  elif name in TEXT_CLASSIFICATION_DATASETS:
    train, val = genre.passage_datasets(train_src, val_src,
                                        builder.info.features['genre'].names, data_cfg.seq_len)
    info = DatasetInfo('text_classification', vocab_size=BYTE_VOCAB,
                       num_classes=len(genre.GENRES), num_train_examples=len(train))
    collate = genre.collate
  else:
    train = grain.MapDataset.source(train_src)
    val = grain.MapDataset.source(val_src)
    feature = builder.info.features
    info = DatasetInfo('image', num_classes=feature['label'].num_classes,
                       image_shape=tuple(feature['image'].shape),
                       num_train_examples=len(train))
    collate = _collate_images
  if order == 'contiguous':
    train_batches = ContiguousBatches(train_stream, batch, data_cfg.seq_len)
  else:
    train_batches = TrainBatches(train.shuffle(seed=config.seed).repeat(), batch, collate)
  return Data(info=info, train=train_batches,
              eval_batches=_eval_batches(val, eval_batch, config.eval_steps, collate))
